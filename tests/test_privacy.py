"""Privacy of presence and membership, each rule against a stranger (docs/PROTOCOL.md, "Privacy").

mallory shares no conversation with alice: she sees alice offline with no
note and no last seen, hears nothing of her, cannot put her in a group
(an invitation alice may decline, silently), and cannot list the directory
without a prefix. bob, alice's contact, sees what contacts see.
"""

from twisted.internet import task
from twisted.trial import unittest

import tests.test_encrypted as encrypted_tests
from securechatd import commands
from securechatd.commands import InvalidArgument, NoSuchConversation, NotAllowed, RateLimited
from tests.helpers import Connection, make_hub, settle

PASSWORD = "correct horse battery"
NOW = 1_700_000_000


class PrivacyTestCase(unittest.TestCase):
    settings = {"presence_scope": "contacts", "invitations": "on"}

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.hub = make_hub(self, clock=self.clock, **self.settings)
        setup = Connection(self.hub)
        for name in ("alice", "bob", "carol", "mallory"):
            self.ok(setup, commands.Register, username=name, password=PASSWORD)
        self.bob = self.connect("bob")
        self.alice = self.connect("alice")
        # (how two people first share a group: one invites, the other accepts)
        group = self.ok(self.alice, commands.CreateConversation, members=["bob"], title="friends")
        self.friends = group["conversation_id"]
        self.ok(self.bob, commands.AnswerInvitation, conversation_id=self.friends, accept=True)
        self.mallory = self.connect("mallory")
        self.settle()

    def connect(self, username):
        conn = Connection(self.hub)
        self.ok(conn, commands.Login, username=username, password=PASSWORD)
        return conn

    def ok(self, conn, command, **arguments):
        return self.successResultOf(conn.call(command, **arguments))

    def error(self, conn, error, command, **arguments):
        return str(self.failureResultOf(conn.call(command, **arguments), error).value)

    def settle(self):
        settle(self.clock, [self.alice, self.bob, self.mallory])

    def seen(self, conn, name="alice"):
        [row] = self.ok(conn, commands.GetPresence, usernames=[name])["presence"]
        return row["status"], row.get("note"), row["last_seen"] and row["last_seen"].timestamp()

    def listed(self, conn, prefix="a"):
        return {row["username"]: row["status"] for row in self.ok(conn, commands.ListUsers, prefix=prefix)["users"]}

    def pushed(self, conn, command, name="alice"):
        return [args for pushed, args in conn.pushes if pushed == command and args.get("username", name) == name]


class PresenceTests(PrivacyTestCase):
    def test_only_contacts_see_it(self):
        self.ok(self.alice, commands.SetPresence, status="away", note="lunch")
        self.assertEqual(self.seen(self.bob), ("away", "lunch", None))
        self.assertEqual(self.seen(self.mallory), ("offline", None, None))
        self.assertEqual(self.listed(self.bob)["alice"], "away")
        self.assertEqual(self.listed(self.mallory)["alice"], "offline")
        self.alice.drop()
        self.settle()
        self.assertEqual(self.seen(self.bob), ("offline", None, NOW))
        self.assertEqual(self.seen(self.mallory), ("offline", None, None))  # no last seen either

    def test_only_contacts_hear_of_it(self):
        self.ok(self.alice, commands.SetPresence, status="busy")
        self.settle()
        self.assertEqual([p["status"] for p in self.pushed(self.bob, "PresenceChanged")], ["busy"])
        self.assertEqual(self.pushed(self.mallory, "PresenceChanged"), [])

    def test_a_direct_conversation_shows_it_once_they_write_back(self):
        direct = self.ok(self.mallory, commands.CreateConversation, members=["alice"])["conversation_id"]
        self.ok(self.mallory, commands.SendMessage, conversation_id=direct, client_msg_id="1", body="hi alice")
        self.settle()
        self.assertEqual(self.seen(self.mallory), ("offline", None, None))
        self.ok(self.alice, commands.SendMessage, conversation_id=direct, client_msg_id="1", body="hi")
        self.assertEqual(self.seen(self.mallory)[0], "online")
        self.assertEqual(self.seen(self.alice, "mallory")[0], "online")  # mallory wrote first

    def test_everyone_when_the_operator_widens_it(self):
        hub = make_hub(self, clock=self.clock, store=self.hub.store, presence_scope="everyone")
        stranger = Connection(hub)
        self.ok(stranger, commands.Login, username="mallory", password=PASSWORD)
        alice = Connection(hub)
        self.ok(alice, commands.Login, username="alice", password=PASSWORD)
        self.assertEqual(self.seen(stranger)[0], "online")

    def test_hide_last_seen(self):
        self.assertEqual(self.ok(self.alice, commands.SetPrivacy, hide_last_seen=True), {"hide_last_seen": True, "appear_offline": False})
        self.clock.advance(5)
        self.alice.drop()
        self.settle()
        self.assertEqual(self.seen(self.bob), ("offline", None, None))
        alice = self.connect("alice")
        self.ok(alice, commands.SetPresence, status="invisible")
        self.assertEqual(self.seen(alice), ("offline", None, NOW + 5))  # her own, she sees
        self.assertEqual(self.ok(alice, commands.SetPrivacy), {"hide_last_seen": True, "appear_offline": False})

    def test_appear_offline(self):
        self.clock.advance(5)
        self.ok(self.alice, commands.SetPrivacy, appear_offline=True)
        self.settle()
        self.assertEqual(self.pushed(self.bob, "PresenceChanged")[-1]["status"], "offline")
        self.assertEqual(self.seen(self.bob), ("offline", None, NOW + 5))
        self.assertEqual(self.seen(self.alice)[0], "online")  # not to herself
        self.clock.advance(5)
        laptop = self.connect("alice")  # a new session appears offline from the start
        self.ok(laptop, commands.SetPresence, status="busy")
        self.settle()
        self.assertEqual(self.seen(self.bob), ("offline", None, NOW + 5))
        self.assertEqual(self.pushed(self.bob, "PresenceChanged")[-1]["status"], "offline")
        self.ok(laptop, commands.SetPrivacy, appear_offline=False)
        self.settle()
        self.assertEqual(self.pushed(self.bob, "PresenceChanged")[-1]["status"], "online")  # (her first session's)


class DirectoryTests(PrivacyTestCase):
    settings = {**PrivacyTestCase.settings, "directory_prefix": 3}

    def test_a_prefix_is_needed(self):
        for prefix in (None, "", "a", "al"):
            arguments = {} if prefix is None else {"prefix": prefix}
            self.assertIn("3 characters", self.error(self.mallory, InvalidArgument, commands.ListUsers, **arguments))
        self.assertEqual(self.listed(self.mallory, "ALI"), {"alice": "offline"})

    def test_searches_are_limited(self):
        """A burst of 30 searches, then one every 2 seconds: a directory of thousands cannot be paged through."""
        for n in range(29):
            self.listed(self.mallory, f"aa{n:02d}")
        self.assertEqual(self.listed(self.mallory, "ali"), {"alice": "offline"})  # the 30th
        refused = self.error(self.mallory, RateLimited, commands.ListUsers, prefix="bob")
        self.assertEqual(refused, "Too many searches of the directory; retry in 2 seconds.")
        self.assertEqual(self.listed(self.bob, "ali"), {"alice": "online"})  # another user's searches are their own
        self.clock.advance(2)
        self.assertEqual(self.listed(self.mallory, "bob"), {"bob": "offline"})
        self.error(self.mallory, RateLimited, commands.ListUsers, prefix="car")


    def test_presence_of_strangers_is_a_search_too(self):
        """NO_SUCH_USER tells who exists, so asking about anyone but contacts spends a search, whether the
        names exist or not: a stranger cannot test a list of names faster than the directory limit."""
        for n in range(15):
            self.error(self.mallory, commands.NoSuchUser, commands.GetPresence, usernames=[f"nobody{n}"])
            self.seen(self.mallory)  # (alice exists: the same cost)
        for names in (["nobody"], ["alice"], ["mallory", "bob"]):
            refused = self.error(self.mallory, RateLimited, commands.GetPresence, usernames=names)
            self.assertEqual(refused, "Too many searches of the directory; retry in 2 seconds.")
        self.ok(self.mallory, commands.GetPresence, usernames=["mallory"])  # (oneself is no search)
        for _ in range(40):  # contacts are no search either
            self.assertEqual(self.seen(self.bob)[0], "online")

    def test_who_shares_a_conversation_is_no_search(self):
        """A client fetches its conversations' members' chains before every message it seals: someone who
        opened a direct conversation with alice, who never wrote back, knows she exists and is never limited
        (though she is still offline to him: she did not consent)."""
        self.ok(self.mallory, commands.CreateConversation, members=["carol"])
        for _ in range(50):
            self.assertEqual(self.ok(self.mallory, commands.GetPresence, usernames=["carol"])["presence"][0]["status"],
                             "offline")
            self.assertEqual(self.ok(self.mallory, commands.GetDeviceChain, username="carol")["links"], [])


class InvitationTests(PrivacyTestCase):
    def test_a_stranger_cannot_put_you_in_a_group(self):
        group = self.ok(self.mallory, commands.CreateConversation, members=["alice", "carol"], title="spam")
        self.assertEqual(group["invited"], ["alice", "carol"])  # (the answer says so)
        group = group["conversation_id"]
        self.settle()
        [listed] = [c for c in self.ok(self.mallory, commands.ListConversations)["conversations"] if c["conversation_id"] == group]
        self.assertEqual(listed["members"], ["mallory"])
        [invited] = self.pushed(self.alice, "Invited", name=None)
        self.assertEqual((invited["conversation_id"], invited["inviter"], invited["title"]), (group, "mallory", "spam"))
        [row] = self.ok(self.alice, commands.ListInvitations)["invitations"]
        self.assertEqual((row["conversation_id"], row["inviter"], row["accepted"]), (group, "mallory", False))
        self.assertEqual(
            [(i["username"], i["accepted"]) for i in self.ok(self.mallory, commands.GetInvitations, conversation_id=group)["invitations"]],
            [("alice", False), ("carol", False)],
        )
        self.error(self.alice, NoSuchConversation, commands.History, conversation_id=group)  # not a member
        self.assertEqual(self.seen(self.mallory), ("offline", None, None))  # and no presence streams to mallory

    def test_declining_tells_nobody(self):
        group = self.ok(self.mallory, commands.CreateConversation, members=["alice"], title="spam")["conversation_id"]
        self.settle()
        pushes = len(self.mallory.pushes)
        self.assertEqual(self.ok(self.alice, commands.AnswerInvitation, conversation_id=group, accept=False), {"joined": False})
        self.settle()
        self.assertEqual(len(self.mallory.pushes), pushes)
        self.assertEqual(self.ok(self.alice, commands.ListInvitations)["invitations"], [])
        self.error(self.alice, NoSuchConversation, commands.AnswerInvitation, conversation_id=group, accept=True)

    def test_accepting_joins_a_plaintext_group(self):
        group = self.ok(self.mallory, commands.CreateConversation, members=["alice"], title="club")["conversation_id"]
        self.assertEqual(self.ok(self.alice, commands.AnswerInvitation, conversation_id=group, accept=True), {"joined": True})
        self.settle()
        [update] = [a for name, a in self.mallory.pushes if name == "ConversationUpdated" and a["conversation_id"] == group]
        self.assertEqual(update["members"], ["alice", "mallory"])
        self.ok(self.mallory, commands.SendMessage, conversation_id=group, client_msg_id="1", body="welcome")
        self.assertEqual(self.seen(self.mallory)[0], "online")  # now alice shares a group with her, by choice

    def test_adding_a_stranger_invites_and_a_contact_joins(self):
        created = self.ok(self.bob, commands.CreateConversation, members=["alice"], title="book club")
        self.assertIsNone(created["invited"])  # nobody was: absent from the answer, as in version 1
        group = created["conversation_id"]
        self.assertEqual(
            [c["members"] for c in self.ok(self.bob, commands.ListConversations)["conversations"] if c["conversation_id"] == group],
            [["alice", "bob"]],  # alice and bob share "friends": she joins at once
        )
        self.assertEqual(self.ok(self.bob, commands.AddMembers, conversation_id=group, members=["mallory"]), {"invited": ["mallory"]})
        self.assertEqual([i["username"] for i in self.ok(self.bob, commands.GetInvitations, conversation_id=group)["invitations"]], ["mallory"])
        self.assertEqual(self.ok(self.bob, commands.InviteMembers, conversation_id=group, members=["mallory", "alice"]), {"invited": []})

    def test_invitation_bad_input(self):
        direct = self.ok(self.mallory, commands.CreateConversation, members=["alice"])["conversation_id"]
        self.error(self.mallory, NotAllowed, commands.InviteMembers, conversation_id=direct, members=["carol"])
        self.error(self.mallory, InvalidArgument, commands.InviteMembers, conversation_id=0, members=["carol"])
        self.error(self.mallory, NoSuchConversation, commands.InviteMembers, conversation_id=self.friends, members=["carol"])
        self.error(self.mallory, NoSuchConversation, commands.GetInvitations, conversation_id=self.friends)
        self.error(self.bob, InvalidArgument, commands.InviteMembers, conversation_id=self.friends, members=[])
        self.error(self.bob, commands.NoSuchUser, commands.InviteMembers, conversation_id=self.friends, members=["nobody"])
        self.error(self.alice, InvalidArgument, commands.AnswerInvitation, conversation_id=-1, accept=True)
        self.error(self.alice, NoSuchConversation, commands.AnswerInvitation, conversation_id=999, accept=True)
        self.error(self.alice, NoSuchConversation, commands.AnswerInvitation, conversation_id=self.friends, accept=True)

    def test_off_as_in_version_1(self):
        hub = make_hub(self, clock=self.clock, store=self.hub.store, invitations="off")
        conn = Connection(hub)
        self.ok(conn, commands.Login, username="mallory", password=PASSWORD)
        group = self.ok(conn, commands.CreateConversation, members=["carol"], title="old ways")["conversation_id"]
        [listed] = [c for c in self.ok(conn, commands.ListConversations)["conversations"] if c["conversation_id"] == group]
        self.assertEqual(listed["members"], ["carol", "mallory"])


class EncryptedInvitationTests(encrypted_tests.EncryptedTestCase):
    """An encrypted group: an accepted invitation waits for a member device's signed state."""

    settings = {"invitations": "on"}

    def test_a_member_completes_an_accepted_invitation(self):
        alice_device, bob_device = self.device("alice"), self.device("bob")
        alice = self.connect("alice", alice_device)
        bob = self.connect("bob", bob_device)
        # alice and bob share a conversation of their own accord (bob wrote to alice)
        direct = self.create(bob, ["alice"])["conversation_id"]
        self.publish(bob, self.epoch1(direct, bob_device, ["alice", "bob"], kind="direct"))
        sealed = self.seal(bob_device, direct, [alice_device])
        self.ok(bob, commands.SendEncrypted, **self.send(bob, direct, sealed))
        group = self.group(alice, alice_device, ["bob"])  # bob joins at once: no invitation
        carol_device = self.device("carol")
        carol = self.connect("carol", carol_device)
        self.device("dave")
        state = self.next_state(group, "add", ["alice", "bob", "carol", "dave"], alice_device)
        text = self.refused(
            alice, commands.InvitationRequired, commands.AddMembers,
            conversation_id=group, members=["carol", "dave"], membership=state.to_bytes(),
        )
        self.assertTrue(text.startswith("carol, dave share no conversation with you: invite them (InviteMembers)"), text)
        self.assertEqual(self.ok(alice, commands.InviteMembers, conversation_id=group, members=["carol"]), {"invited": ["carol"]})
        self.assertEqual(self.ok(carol, commands.AnswerInvitation, conversation_id=group, accept=True), {"joined": False})
        self.settle(alice, bob, carol)
        self.assertIn(("InvitationAccepted", {"conversation_id": group, "username": "carol"}), alice.pushes)
        self.assertEqual(
            self.ok(bob, commands.GetInvitations, conversation_id=group)["invitations"][0]["accepted"], True
        )
        self.refused(carol, NoSuchConversation, commands.GetMembership, conversation_id=group)  # not a member yet
        self.add(bob, group, ["carol"], bob_device)  # any member's device completes it
        self.assertEqual(self.ok(carol, commands.GetMembership, conversation_id=group)["states"][-1], self.latest[group].to_bytes())
        self.assertEqual(self.ok(bob, commands.GetInvitations, conversation_id=group)["invitations"], [])
        self.assertEqual(self.ok(carol, commands.ListInvitations)["invitations"], [])
