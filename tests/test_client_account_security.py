"""The rest of issue 13 in the client library, against the real daemon over TLS on 127.0.0.1:
privacy settings, invitations (a plaintext group, and an encrypted one completed by the inviter's
device on its own), and client certificates (mutual TLS)."""

import os
import sqlite3
import stat
from datetime import datetime, timezone

import segno
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectionClosed
from twisted.trial import unittest

from securechatd import commands
from securechatd.certs import write_certs, write_client_cert
from securechatd.client import ui
from securechatd.client.crypto import EncryptionUnavailable
from securechatd.client.library import RefusedAtTLS, _strangers
from securechatd.commands import NoSuchConversation, NotAllowed
from securechatd.server.account_log import AccountLog
from tests.helpers import start_daemon, wall_now
from tests.test_account_security import CLOSE_GAPS
from tests.test_client import PASSWORD, Inbox
from tests.test_client_twofactor import DaemonClientCase


def watch_invitations(client, inbox):
    """Collect `client`'s Invited and InvitationAccepted pushes in `inbox` too."""
    inbox.items.update(invited=[], invitation_accepted=[])
    client.on_invited = lambda invitation: inbox._add("invited", invitation)
    client.on_invitation_accepted = lambda *accepted: inbox._add("invitation_accepted", accepted)


class AccountSecurityCase(DaemonClientCase):
    settings = {"invitations": "on", "presence_scope": "contacts"}

    @inlineCallbacks
    def user(self, name, install=None):
        """A new account's client, logged in (with its own device if `install`), and its Inbox."""
        client = self.make_client(install)
        inbox = Inbox(client)
        watch_invitations(client, inbox)
        yield client.connect()
        yield client.register(name, PASSWORD)
        yield client.login(name, PASSWORD)
        return client, inbox


class PrivacyTests(AccountSecurityCase):
    @inlineCallbacks
    def test_read_and_change_the_settings(self):
        alice, _ = yield self.user("alice", "alice-laptop")
        bob, _ = yield self.user("bob", "bob-laptop")
        conversation_id, _ = yield bob.create_conversation(["alice"])
        yield alice.send_message(conversation_id, "hi")  # (bob's contact: she wrote in their direct conversation)
        [seen] = yield bob.get_presence(["alice"])
        self.assertEqual(seen.status, "online")
        privacy = yield alice.set_privacy()
        self.assertEqual((privacy.hide_last_seen, privacy.appear_offline), (False, False))
        privacy = yield alice.set_privacy(appear_offline=True)
        self.assertEqual((privacy.hide_last_seen, privacy.appear_offline), (False, True))
        [seen] = yield bob.get_presence(["alice"])
        self.assertEqual(seen.status, "offline")
        privacy = yield alice.set_privacy(hide_last_seen=True, appear_offline=False)
        self.assertEqual((privacy.hide_last_seen, privacy.appear_offline), (True, False))
        [seen] = yield bob.get_presence(["alice"])
        self.assertEqual(seen.status, "online")


class StrangersTests(unittest.SynchronousTestCase):
    def test_the_names_an_invitation_required_refusal_lists(self):
        """docs/PROTOCOL.md: every name, joined by ", ", before " share(s) no conversation with you:"."""
        for text, names, expected in (
            ("carol shares no conversation with you: invite them (InviteMembers); ...", ["carol"], ["carol"]),
            ("bob, shareef share no conversation with you: invite them", ["bob", "shareef", "x"], ["bob", "shareef"]),
            ("mallory shares no conversation with you:", ["carol"], []),  # (only names that were asked for)
            ("Something else.", ["carol"], []),
        ):
            self.assertEqual(_strangers(commands.InvitationRequired(text), names), expected, text)


class EncryptedInvitationTests(AccountSecurityCase):
    @inlineCallbacks
    def test_a_stranger_is_invited_accepts_and_the_inviters_device_adds_them(self):
        alice, alice_inbox = yield self.user("alice", "alice-laptop")
        carol, carol_inbox = yield self.user("carol", "carol-laptop")
        group, created = yield alice.create_conversation(["carol"], title="Team")
        self.assertTrue(created)
        self.assertEqual((yield alice.members(group)), ("alice",))  # the first signed state: alice alone
        [invitation] = yield carol_inbox.wait("invited", 1)
        self.assertEqual((invitation.conversation_id, invitation.inviter, invitation.title), (group, "alice", "Team"))
        self.assertTrue(invitation.encrypted)
        [listed] = yield carol.list_invitations()
        self.assertEqual((listed.conversation_id, listed.accepted), (group, False))
        [row] = yield alice.group_invitations(group)
        self.assertEqual((row.username, row.inviter, row.accepted), ("carol", "alice", False))

        joined = yield carol.answer_invitation(group, True)
        self.assertFalse(joined)  # an encrypted group: a member's device completes it
        [accepted] = yield alice_inbox.wait("invitation_accepted", 1)
        self.assertEqual(accepted, (group, "carol", True))
        [conversation] = yield carol_inbox.wait("conversation", 1)
        self.assertEqual(set(conversation.members), {"alice", "carol"})
        self.assertEqual((yield carol.members(group)), ("alice", "carol"))
        self.assertEqual((yield alice.group_invitations(group)), [])
        yield carol.send_message(group, "thanks for the invitation")
        [message] = yield alice_inbox.wait("deliver", 1)
        self.assertEqual(message.body, "thanks for the invitation")

    @inlineCallbacks
    def team(self):
        """alice's encrypted group with bob (who wrote to her first, so he joins at once) and carol, a stranger:
        ({name: (client, inbox)}, the direct conversation, the group)."""
        people = {}
        for name in ("alice", "bob", "carol"):
            people[name] = yield self.user(name, f"{name}-laptop")
        direct, _ = yield people["bob"][0].create_conversation(["alice"])
        yield people["bob"][0].send_message(direct, "hello alice")  # (his own accord)
        group, _ = yield people["alice"][0].create_conversation(["bob"], title="Team")
        return people, direct, group

    @inlineCallbacks
    def test_adding_a_stranger_invites_them_and_a_declined_invitation_is_gone(self):
        people, direct, group = yield self.team()
        (alice, _), (carol, carol_inbox) = people["alice"], people["carol"]
        invited = yield alice.add_members(group, ["Carol"])
        self.assertEqual(invited, ["carol"])
        self.assertEqual((yield alice.members(group)), ("alice", "bob"))
        yield carol_inbox.wait("invited", 1)
        self.assertFalse((yield carol.answer_invitation(group, False)))
        self.assertEqual((yield carol.list_invitations()), [])
        with self.assertRaises(NoSuchConversation):
            yield carol.answer_invitation(group, True)
        with self.assertRaises(NotAllowed):  # (direct conversations are never invitations)
            yield alice.invite_members(direct, ["carol"])
        self.assertEqual((yield alice.invite_members(group, ["bob", "carol"])), ["carol"])

    @inlineCallbacks
    def test_strangers_and_a_contact_added_at_once(self):
        """The server names both strangers (INVITATION_REQUIRED): they are invited, the contact is added."""
        people, _, group = yield self.team()
        alice = people["alice"][0]
        dave, _ = yield self.user("dave", "dave-laptop")
        erin, _ = yield self.user("erin", "erin-laptop")
        to_alice, _ = yield erin.create_conversation(["alice"])
        yield erin.send_message(to_alice, "hello alice")  # (erin's own accord: she is alice's contact)
        self.assertEqual((yield alice.add_members(group, ["carol", "dave", "erin"])), ["carol", "dave"])
        self.assertEqual((yield alice.members(group)), ("alice", "bob", "erin"))
        self.assertEqual({row.username for row in (yield alice.group_invitations(group))}, {"carol", "dave"})

    @inlineCallbacks
    def test_only_the_inviters_device_adds_who_accepted(self):
        people, _, group = yield self.team()
        (alice, alice_inbox), (bob, bob_inbox), (carol, carol_inbox) = people["alice"], people["bob"], people["carol"]
        yield bob_inbox.wait("conversation", 1)  # (the group: bob made the direct conversation himself)
        self.assertEqual((yield bob.invite_members(group, ["carol"])), ["carol"])  # bob invites
        yield carol_inbox.wait("invited", 1)
        yield carol.answer_invitation(group, True)
        [by_bob] = yield bob_inbox.wait("invitation_accepted", 1)
        [by_alice] = yield alice_inbox.wait("invitation_accepted", 1)
        self.assertEqual((by_bob, by_alice), ((group, "carol", True), (group, "carol", False)))
        self.assertEqual((yield alice.members(group)), ("alice", "bob", "carol"))


class PlaintextInvitationTests(AccountSecurityCase):
    def setUp(self):
        self.port, self.ca, self.hub = start_daemon(self, reactor, **self.settings)
        self.base = os.path.abspath(self.mktemp())

    @inlineCallbacks
    def test_accepting_joins_at_once(self):
        alice, alice_inbox = yield self.user("alice")
        carol, carol_inbox = yield self.user("carol")
        group, _ = yield alice.create_conversation(["carol"], title="Lunch", encrypted=False)
        yield carol_inbox.wait("invited", 1)
        self.assertEqual((yield alice.add_members(group, ["carol"])), ["carol"])  # still a stranger: invited
        self.assertTrue((yield carol.answer_invitation(group, True)))
        [conversation] = yield carol_inbox.wait("conversation", 1)
        self.assertEqual(set(conversation.members), {"alice", "carol"})
        self.assertEqual(alice_inbox.items["invitation_accepted"], [])  # (only encrypted groups wait for it)


class ClientCertificateTests(DaemonClientCase):
    settings = {"client_certificates": "required"}

    def setUp(self):
        super().setUp()
        self.certs = os.path.dirname(self.ca)
        for name in ("alice", "bob"):
            write_client_cert(self.certs, name, now=wall_now())

    def certificate(self, name, directory=None):
        directory = directory or self.certs
        path = os.path.join(directory, name)
        return {"client_cert": f"{path}.pem", "client_key": f"{path}.key"}

    @inlineCallbacks
    def test_the_right_certificate_logs_in(self):
        client = self.make_client(reconnect=False, **self.certificate("alice"))
        yield client.connect()
        yield client.register("alice", PASSWORD)
        login = yield client.login("alice", PASSWORD)
        self.assertEqual(login.username, "alice")

    @inlineCallbacks
    def test_another_accounts_certificate_is_refused(self):
        alice = self.make_client(reconnect=False, **self.certificate("alice"))
        yield alice.connect()
        yield alice.register("alice", PASSWORD)
        client = self.make_client(reconnect=False, **self.certificate("bob"))
        yield client.connect()
        for step in (client.login, client.register):  # (nor can it take a name issued to another)
            with self.assertRaises(NotAllowed) as refused:
                yield step("alice", PASSWORD)
            self.assertIn("client certificate is for another account", str(refused.exception))

    @inlineCallbacks
    def test_no_certificate_or_another_cas_is_refused_at_tls(self):
        other = self.mktemp()
        write_certs(other, ["localhost"], now=wall_now())
        write_client_cert(other, "alice", now=wall_now())
        for certificate, alert in (({}, "certificate required"), (self.certificate("alice", other), "unknown ca")):
            client = self.make_client(reconnect=False, **certificate)
            yield client.connect()  # (TLS 1.3: the server checks the client's certificate after the handshake)
            with self.assertRaises(RefusedAtTLS) as refused:
                yield client.register("alice", PASSWORD)
            self.assertIn(alert, refused.exception.alert)

    @inlineCallbacks
    def test_a_refused_certificate_is_not_tried_again(self):
        client = self.make_client()  # (a client that reconnects)
        lost = Deferred()
        client.on_disconnected = lambda reason: lost.callback(reason.value)
        yield client.connect()
        with self.assertRaises(RefusedAtTLS):
            yield client.register("alice", PASSWORD)
        self.assertIsInstance((yield lost), RefusedAtTLS)
        self.assertIsNone(client._retry)  # (no reconnection scheduled)
        with self.assertRaises(ConnectionClosed):  # (at once: nothing waits for a reconnection)
            yield client.ping()


class AccountLogTests(AccountSecurityCase):
    @inlineCallbacks
    def test_checked_against_the_pinned_key_and_a_dropped_event_is_named(self):
        alice, _ = yield self.user("alice", "alice-laptop")
        yield alice.end_other_sessions()  # (an action signed by the device: checked with its key from the chain)
        report = yield alice.check_account_log()
        self.assertEqual((report.verified, report.problem), (True, None))
        self.assertEqual([row.kind for row in report.events], ["login", "device_add", "sessions_end_others"])
        self.assertEqual(report.events[-1].signed, "yes")
        state = os.path.join(self.base, "alice-laptop", "alice.account-log.json")
        self.assertEqual(stat.S_IMODE(os.stat(state).st_mode), 0o600)

        db = sqlite3.connect(self.hub.store._pool.connargs[0], isolation_level=None)
        try:  # the server drops alice's second event and rebuilds its tree without it
            db.execute(
                "DELETE FROM account_events WHERE seq = 2"
                " AND user_id = (SELECT id FROM users WHERE username = 'alice')"
            )
            for statement, arguments in CLOSE_GAPS:
                db.execute(statement, arguments)
        finally:
            db.close()
        log = self.hub.account_log
        self.hub.account_log = self.hub.security.log = AccountLog(self.hub.store, reactor, log.key, log._run)
        broken = yield alice.check_account_log()
        self.assertFalse(broken.verified)
        self.assertIn("the server's log was cut: it no longer holds the tree head of size 3", broken.problem)
        again = yield alice.check_account_log()
        self.assertEqual((again.verified, again.problem), (False, broken.problem))  # (named until it checks again)

    @inlineCallbacks
    def test_without_a_device_it_says_why(self):
        plain, _ = yield self.user("alice")
        with self.assertRaises(EncryptionUnavailable) as why:
            yield plain.check_account_log()
        self.assertIn("give it a state_directory", str(why.exception))


NOW = datetime(2026, 11, 30, 10, 0, tzinfo=timezone.utc)
URI = "otpauth://totp/securechatd:alice?secret=JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP&issuer=securechatd"


def render(record):
    return ui.render(record, NOW, timezone.utc)


def modules(lines):
    """The dark (True) and light modules of a QR code drawn in half blocks, light ones drawn, two rows a line."""
    top = {" ": True, "▄": True, "▀": False, "█": False}
    bottom = {" ": True, "▀": True, "▄": False, "█": False}
    rows = []
    for line in lines:
        rows += [[top[c] for c in line], [bottom[c] for c in line]]
    return rows


class RenderTests(unittest.TestCase):
    def test_the_enrolment_shows_the_uri_as_a_qr_code(self):
        lines = render({"event": "answer", "command": "2fa", "action": "enrol", "secret": "JBSW", "uri": URI})
        code = [line for line in lines if set(line) <= set(" ▀▄█")]
        expected = [[bool(m) for m in row] for row in segno.make(URI).matrix_iter(border=4)]
        self.assertEqual(modules(code)[: len(expected)], expected)  # (the last half row is the quiet zone's)
        self.assertIn(f"  URI:    {URI}", lines)
        self.assertNotIn("\x1b", "".join(lines))  # (no escape sequences: the full-screen client shows it as text)
        at_login = render({"event": "enrol", "username": "alice", "secret": "JBSW", "uri": URI, "at": NOW})
        self.assertEqual([line for line in at_login if set(line) <= set(" ▀▄█")], code)

    def test_privacy(self):
        record = {"event": "answer", "command": "privacy", "hide_last_seen": True, "appear_offline": False}
        self.assertEqual(render(record), ["last seen: hidden from everyone", "appear offline: off"])

    def test_invitations(self):
        invitation = {"conversation_id": 12, "kind": "group", "title": "Team\x1b[2J", "inviter": "alice",
                      "invited_at": NOW, "accepted": False, "encrypted": True}
        [pushed] = render({"event": "invited", **invitation, "invited_at": None, "at": NOW})
        self.assertEqual(
            pushed, "10:00 * alice invites you to [Team�[2J] (end-to-end encrypted): /accept 12 or /decline 12"
        )
        group = {"username": "carol", "inviter": "alice", "invited_at": NOW, "accepted": True}
        mine = [invitation, dict(invitation, title=None, accepted=True)]
        listed = render({"event": "answer", "command": "invitations", "invitations": mine,
                         "conversation_id": 3, "conversation": "Lunch", "group": [group]})
        self.assertEqual(listed, [
            "  #12    [Team�[2J] from alice, 10:00  /accept 12 or /decline 12",
            "  #12    [group #12] from alice, 10:00 (accepted: a member adds you with a signed state)",
            "invited to [Lunch]:",
            "  carol by alice, 10:00: accepted, waiting for a member's signed state",
        ])
        none = {"event": "answer", "command": "invitations", "invitations": []}
        self.assertEqual(render(none), ["no invitations to you"])
        accept = {"event": "answer", "command": "accept", "conversation_id": 12, "conversation": "Team"}
        self.assertIn("when a member's device adds you", render(dict(accept, joined=False))[0])
        self.assertEqual(render(dict(accept, joined=True)), ["you joined [Team]; /open Team to talk there"])
        accepted = {"event": "invitation_accepted", "conversation_id": 12, "conversation": "Team",
                    "username": "carol", "at": NOW}
        self.assertEqual(render(dict(accepted, added=True)),
                         ["10:00 * [Team] carol accepted the invitation; you added them with a signed state"])
        add = {"event": "answer", "command": "add", "conversation": "Team", "members": ["alice", "bob"],
               "invited": ["carol"]}
        self.assertEqual(render(add), ["[Team] members: alice, bob; invited carol (they join once they accept)"])

    def test_security(self):
        row = {"seq": 4, "time": "2026-11-30 10:00:00 UTC", "kind": "session_end", "address": "127.0.0.1",
               "device": "7f9ff192" + "0" * 24, "target": "9b2535c4", "signed": "yes"}
        record = {"event": "answer", "command": "security", "username": "alice", "verified": True, "problem": None,
                  "tree_size": 9, "events": [row], "file": None}
        self.assertEqual(render(record), [
            "account log of alice: verified (1 events, tree of 9)",
            "  #4    2026-11-30 10:00:00 UTC  session_end 9b2535c4 from 127.0.0.1 device 7f9ff192"
            "  signed by its device",
        ])
        resume = dict(row, kind="login", target="token", signed="no")
        resumes = [dict(resume, seq=5 + n, time=f"2026-11-30 1{n}:00:00 UTC") for n in range(3)]
        elsewhere = dict(resume, seq=8, address="10.9.9.9")
        again = dict(resume, seq=9)
        self.assertEqual(render(dict(record, events=[row, *resumes, elsewhere, again]))[2:], [
            "  #5-#7 2026-11-30 10:00:00 UTC to 2026-11-30 12:00:00 UTC  3 x login token from 127.0.0.1 device 7f9ff192",
            "  #8    2026-11-30 10:00:00 UTC  login token from 10.9.9.9 device 7f9ff192",
            "  #9    2026-11-30 10:00:00 UTC  login token from 127.0.0.1 device 7f9ff192",
        ])  # (a client that reconnected all day is one line; --batch keeps every event)
        broken = render(dict(record, verified=False, problem="event #5 was rewritten", file="/tmp/log.json"))
        self.assertEqual(broken[0], "!! account log of alice does NOT check: event #5 was rewritten")
        self.assertEqual(broken[-2:], ["  (verified up to #4)",
                                       "  written to /tmp/log.json: securechatd-verify-log /tmp/log.json checks it"])
