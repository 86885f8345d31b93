"""The client library against the real daemon over TLS on 127.0.0.1."""

import os

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial import unittest

from securechatd.certs import write_certs
from securechatd.client.library import ChatClient, TLSHandshakeFailed
from securechatd.commands import BadCredentials, NoSuchConversation
from tests.helpers import start_daemon, wall_now

PASSWORD = "correct horse battery"


def forget_delivery(txn, conversation_id, username):
    """What a daemon killed before writing an acknowledgement leaves: the message is pending again."""
    txn.execute(
        "UPDATE members SET delivered_seq = 0 WHERE conversation_id = ?"
        " AND user_id = (SELECT id FROM users WHERE username = ?)",
        (conversation_id, username),
    )


class Inbox:
    """Collects a client's pushes; `wait(kind, count)` fires once that many arrived."""

    def __init__(self, client):
        self.items = {"deliver": [], "receipt": [], "presence": [], "conversation": []}
        self._waiting = []
        client.on_deliver = lambda m: self._add("deliver", m)
        client.on_receipt = lambda r: self._add("receipt", r)
        client.on_presence = lambda p: self._add("presence", p)
        client.on_conversation = lambda c: self._add("conversation", c)

    def _add(self, kind, item):
        self.items[kind].append(item)
        for waiting in list(self._waiting):
            if waiting[0] == kind and len(self.items[kind]) >= waiting[1]:
                self._waiting.remove(waiting)
                waiting[2].callback(self.items[kind])

    def wait(self, kind, count):
        waiting = Deferred()
        if len(self.items[kind]) >= count:
            waiting.callback(self.items[kind])
        else:
            self._waiting.append((kind, count, waiting))
        return waiting.addTimeout(10, reactor)


class ClientTests(unittest.TestCase):
    def setUp(self):
        self.port, self.ca, self.hub = start_daemon(self, reactor)

    @inlineCallbacks
    def client(self, username, register=True, **kw):
        client = ChatClient("127.0.0.1", self.port, self.ca, hostname="localhost", reactor=reactor, **kw)
        self.addCleanup(client.close)
        inbox = Inbox(client)
        yield client.connect()
        if register:
            yield client.register(username, PASSWORD)
        yield client.login(username, PASSWORD)
        return client, inbox

    @inlineCallbacks
    def test_conversation_round_trip(self):
        alice, alice_inbox = yield self.client("alice")
        bob, bob_inbox = yield self.client("bob")
        conversation, created = yield alice.create_conversation(["bob"])
        self.assertTrue(created)
        [update] = yield bob_inbox.wait("conversation", 1)
        self.assertEqual((update.conversation_id, update.members), (conversation, ("alice", "bob")))
        sent = yield alice.send_message(conversation, "hello bob")
        [message] = yield bob_inbox.wait("deliver", 1)
        self.assertEqual((message.message_id, message.sender, message.body), (sent.message_id, "alice", "hello bob"))
        [receipt] = yield alice_inbox.wait("receipt", 1)
        self.assertEqual((receipt.username, receipt.state, receipt.seq), ("bob", "delivered", 1))
        yield bob.mark_read(conversation, sent.seq)
        receipts = yield alice_inbox.wait("receipt", 2)
        self.assertEqual(receipts[1].state, "read")
        [row] = yield alice.get_receipts(conversation, sent.message_id)
        self.assertIsNotNone(row.read_at)
        page = yield bob.history(conversation)
        self.assertEqual([m.body for m in page.messages], ["hello bob"])
        [listed] = yield bob.list_conversations()
        self.assertEqual((listed.kind, listed.unread), ("direct", 0))
        yield bob.set_presence("away", "lunch")
        presence = yield alice_inbox.wait("presence", 1)
        self.assertEqual((presence[-1].username, presence[-1].status), ("bob", "away"))
        [seen] = yield alice.get_presence(["bob"])
        self.assertEqual((seen.status, seen.note), ("away", "lunch"))
        users = yield alice.list_users()
        self.assertEqual(users, [("alice", "online"), ("bob", "away")])
        with self.assertRaises(NoSuchConversation):
            yield bob.history(conversation + 1)

    @inlineCallbacks
    def test_deliver_is_acknowledged_after_the_callback(self):
        alice, alice_inbox = yield self.client("alice")
        bob, _ = yield self.client("bob")
        shown, handled = Deferred(), Deferred()
        bob.on_deliver = lambda message: shown.callback(message) or handled
        conversation, _ = yield alice.create_conversation(["bob"])
        yield alice.send_message(conversation, "slow to show")
        yield shown.addTimeout(10, reactor)
        yield alice.ping()  # a round trip: an early acknowledgement would have landed by now
        [session] = self.hub.registry.sessions_of("bob")
        self.assertEqual((session.outbox.in_flight, alice_inbox.items["receipt"]), (1, []))
        handled.callback(None)
        [receipt] = yield alice_inbox.wait("receipt", 1)
        self.assertEqual((receipt.state, receipt.seq), ("delivered", 1))

    @inlineCallbacks
    def test_a_message_pushed_again_is_shown_once_across_restarts(self):
        """Delivery is at least once: after a lost acknowledgement (a daemon crash), the repeat is not shown."""
        state = os.path.abspath(self.mktemp())
        alice, _ = yield self.client("alice")
        bob, bob_inbox = yield self.client("bob", state_directory=state)
        conversation, _ = yield alice.create_conversation(["bob"])
        yield alice.send_message(conversation, "only once, please")
        yield bob_inbox.wait("deliver", 1)
        yield alice.ping()
        yield bob.close()  # a restart of bob's client: it saves what it has shown
        self.assertEqual(os.stat(os.path.join(state, "bob.seen.json")).st_mode & 0o777, 0o600)
        yield self.hub.store._write("forget the acknowledgement", forget_delivery, conversation, "bob")
        bob, bob_inbox = yield self.client("bob", register=False, state_directory=state)
        yield alice.send_message(conversation, "and a new one")
        [new] = yield bob_inbox.wait("deliver", 1)  # the repeat of the first was acknowledged, not shown
        self.assertEqual(new.body, "and a new one")
        self.assertEqual(len(bob_inbox.items["deliver"]), 1)

    @inlineCallbacks
    def test_register_with_an_invitation_where_registration_is_closed(self):
        from securechatd.commands import NotAllowed
        from securechatd.server.passwords import token_hash

        port, ca, hub = start_daemon(self, reactor, registration="closed")
        now = reactor.seconds()
        yield hub.store.add_invite(token_hash("an-invitation"), now, now + 3600)
        client = ChatClient("127.0.0.1", port, ca, hostname="localhost", reactor=reactor)
        self.addCleanup(client.close)
        yield client.connect()
        with self.assertRaises(NotAllowed):
            yield client.register("carol", PASSWORD)
        self.assertEqual((yield client.register("carol", PASSWORD, "an-invitation")), "carol")

    @inlineCallbacks
    def test_reconnect_resends_without_duplicates(self):
        alice, _ = yield self.client("alice")
        bob, bob_inbox = yield self.client("bob")
        conversation, _ = yield alice.create_conversation(["bob"])
        reconnected = Deferred()
        alice.on_reconnected = reconnected.callback

        # the first send is committed, then the connection dies before the answer
        original = self.hub.messages.send
        dropped = []

        def send_then_drop(session, *arguments):
            def drop(message):
                if not dropped:
                    dropped.append(message)
                    session.client.transport.abortConnection()
                return message

            return original(session, *arguments).addCallback(drop)

        self.hub.messages.send = send_then_drop
        answers = [alice.send_message(conversation, f"m{i}") for i in range(3)]
        login = yield reconnected
        self.assertEqual((login.username, len(dropped)), ("alice", 1))
        sent = []
        for answer in answers:
            sent.append((yield answer))
        self.assertEqual([s.seq for s in sent], [1, 2, 3])
        delivered = yield bob_inbox.wait("deliver", 3)
        self.assertEqual([m.body for m in delivered], ["m0", "m1", "m2"])
        page = yield bob.history(conversation)
        self.assertEqual(len(page.messages), 3)

    @inlineCallbacks
    def test_expired_resume_token_logs_out(self):
        alice, _ = yield self.client("alice")
        logged_out = Deferred()
        alice.on_logged_out = logged_out.callback
        yield self.hub.store.revoke_resume_token("alice", self.hub.registry.sessions_of("alice")[0].session_id)
        self.hub.registry.sessions_of("alice")[0].client.transport.abortConnection()
        reason = yield logged_out.addTimeout(10, reactor)
        self.assertIn("log in again", reason)
        self.assertIsNone(alice.username)

    @inlineCallbacks
    def test_a_reconnect_keeps_the_presence_and_is_never_seen_online(self):
        alice, _ = yield self.client("alice")
        bob, bob_inbox = yield self.client("bob")
        yield alice.create_conversation(["bob"])
        yield alice.set_presence("invisible")
        yield bob_inbox.wait("presence", 1)
        reconnected = Deferred()
        alice.on_reconnected = reconnected.callback
        self.hub.registry.sessions_of("alice")[0].client.transport.abortConnection()
        yield reconnected.addTimeout(10, reactor)
        yield alice.ping()
        yield bob.ping()
        self.assertEqual([p.status for p in bob_inbox.items["presence"] if p.username == "alice"], ["offline"])
        [seen] = yield bob.get_presence(["alice"])
        self.assertEqual(seen.status, "offline")  # invisible still

    @inlineCallbacks
    def test_a_body_over_the_servers_limit_gets_its_error_however_large(self):
        from securechatd.commands import MessageTooLarge

        alice, _ = yield self.client("alice")
        yield self.client("bob")
        conversation, _ = yield alice.create_conversation(["bob"])
        self.assertEqual(alice.max_message_bytes, 16 * 1024)
        for size in (17_000, 70_000):  # (70,000 bytes cannot even be one AMP value)
            with self.assertRaises(MessageTooLarge) as raised:
                yield alice.send_message(conversation, "x" * size)
            self.assertEqual(str(raised.exception), "A message body is at most 16384 bytes of UTF-8.")
        sent = yield alice.send_message(conversation, "still connected")
        self.assertEqual(sent.seq, 1)

    @inlineCallbacks
    def test_remembered_password_logs_in_again(self):
        client = ChatClient("127.0.0.1", self.port, self.ca, hostname="localhost", reactor=reactor)
        self.addCleanup(client.close)
        yield client.connect()
        yield client.register("alice", PASSWORD)
        yield client.login("alice", PASSWORD, remember_password=True)
        [session] = self.hub.registry.sessions_of("alice")
        yield self.hub.store.revoke_resume_token("alice", session.session_id)
        reconnected = Deferred()
        client.on_reconnected = reconnected.callback
        session.client.transport.abortConnection()
        login = yield reconnected.addTimeout(10, reactor)
        self.assertEqual(login.username, "alice")

    @inlineCallbacks
    def test_wrong_password(self):
        client = ChatClient("127.0.0.1", self.port, self.ca, hostname="localhost", reactor=reactor)
        self.addCleanup(client.close)
        yield client.connect()
        with self.assertRaises(BadCredentials):
            yield client.login("nobody", PASSWORD)

    @inlineCallbacks
    def test_untrusted_server_is_refused_before_login(self):
        other = self.mktemp()
        write_certs(other, ["localhost"], ["127.0.0.1"], now=wall_now())
        client = ChatClient("127.0.0.1", self.port, os.path.join(other, "ca.pem"), hostname="localhost", reactor=reactor)
        with self.assertRaises(TLSHandshakeFailed) as refused:
            yield client.connect()
        self.assertIn("certificate verify failed", str(refused.exception))

    @inlineCallbacks
    def test_wrong_hostname_is_refused(self):
        client = ChatClient("127.0.0.1", self.port, self.ca, hostname="chat.example.org", reactor=reactor)
        with self.assertRaises(TLSHandshakeFailed):
            yield client.connect()

