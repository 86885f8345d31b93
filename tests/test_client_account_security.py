"""The rest of issue 13 in the client library, against the real daemon over TLS on 127.0.0.1:
privacy settings, invitations (a plaintext group, and an encrypted one completed by the inviter's
device on its own), and client certificates (mutual TLS)."""

import os

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks

from securechatd.certs import write_certs, write_client_cert
from securechatd.client.library import ChatClient, RefusedAtTLS
from securechatd.commands import NoSuchConversation, NotAllowed
from tests.helpers import start_daemon, wall_now
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
    def test_adding_a_stranger_invites_them_and_a_declined_invitation_is_gone(self):
        alice, _ = yield self.user("alice", "alice-laptop")
        bob, _ = yield self.user("bob", "bob-laptop")
        carol, carol_inbox = yield self.user("carol", "carol-laptop")
        direct, _ = yield bob.create_conversation(["alice"])
        yield bob.send_message(direct, "hello alice")  # bob shares a conversation with alice of his own accord
        group, _ = yield alice.create_conversation(["bob"], title="Team")
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
        return {"client_cert": os.path.join(directory, f"{name}.pem"), "client_key": os.path.join(directory, f"{name}.key")}

    @inlineCallbacks
    def test_the_right_certificate_logs_in(self):
        client = self.make_client(reconnect=False, **self.certificate("alice"))
        yield client.connect()
        yield client.register("alice", PASSWORD)
        login = yield client.login("alice", PASSWORD)
        self.assertEqual(login.username, "alice")

    @inlineCallbacks
    def test_another_accounts_certificate_is_refused(self):
        client = self.make_client(reconnect=False, **self.certificate("bob"))
        yield client.connect()
        yield client.register("alice", PASSWORD)
        with self.assertRaises(NotAllowed) as refused:
            yield client.login("alice", PASSWORD)
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
