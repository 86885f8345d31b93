"""The services in domain terms: driven directly, heard through a recording IChatClient, no AMP.

The connection layer is the only IChatClient of the daemon; here a fake one
records what each service tells a session, so what a service decides is
tested apart from how it is encoded.
"""

import ast
import os

from twisted.internet import task
from twisted.internet.defer import succeed
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from securechatd.records import Message, Presence, Receipt
from securechatd.server.connection import ChatProtocol
from securechatd.server.sessions import IChatClient
from tests.helpers import make_hub

PASSWORD = "correct horse battery"
SERVICES = (
    "accounts",
    "conversations",
    "delivery",
    "encrypted",
    "hub",
    "keys",
    "membership",
    "messages",
    "policy",
    "presence",
    "receipts",
    "sessions",
)


@implementer(IChatClient)
class RecordingClient:
    """Records every push as (kind, record); answers each at once, or raises if `broken`."""

    def __init__(self, broken=False):
        self.told = []
        self.broken = broken
        self.ended = None

    def _told(self, kind, record):
        if self.broken:
            raise RuntimeError("this client breaks on every push")
        self.told.append((kind, record))
        return succeed(True)

    def deliver(self, message):
        return self._told("deliver", message)

    def deliver_encrypted(self, message, wrap):
        return self._told("deliver_encrypted", (message, wrap))

    def receipt(self, receipt):
        return self._told("receipt", receipt)

    def transcript_signed(self, conversation_id, username, head):
        return self._told("transcript_signed", (conversation_id, username, head))

    def mode_changed(self, conversation_id):
        return self._told("mode_changed", conversation_id)

    def devices_changed(self, username):
        return self._told("devices_changed", username)

    def presence_changed(self, presence):
        return self._told("presence", presence)

    def conversation_changed(self, conversation):
        return self._told("conversation", conversation)

    def session_ended(self, reason):
        self.ended = reason

    def of(self, kind):
        return [record for told, record in self.told if told == kind]


class ServiceTestCase(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.hub = make_hub(self, clock=self.clock)
        for name in ("alice", "bob", "carol"):
            self.successResultOf(self.hub.accounts.register(name, PASSWORD, "10.0.0.1"))

    def login(self, username, client=None):
        """(session, client): a started session of `username` whose pushes `client` records."""
        client = client or RecordingClient()
        session, _ = self.successResultOf(self.hub.accounts.login(username, PASSWORD, None, "10.0.0.1", client))
        self.hub.session_started(session)
        self.clock.advance(0)  # delivery starts the next turn
        return session, client

    def direct(self, session, other):
        conversation, _, _ = self.successResultOf(self.hub.conversations.create(session, [other], None))
        return conversation


class SendingTests(ServiceTestCase):
    def test_a_message_reaches_every_session_of_every_member_but_the_sending_one(self):
        alice, alice_here = self.login("alice")
        _, alice_phone = self.login("alice")
        bob, bob_client = self.login("bob")
        _, carol_client = self.login("carol")
        conversation = self.direct(alice, "bob")
        message = self.successResultOf(self.hub.messages.send(alice, conversation.id, "m1", "hello"))
        self.assertEqual(message, Message(message.id, conversation.id, 1, "alice", "hello", 1_700_000_000))
        self.assertEqual(bob_client.of("deliver"), [message])
        self.assertEqual(alice_phone.of("deliver"), [message])
        self.assertEqual(alice_here.of("deliver"), [])
        self.assertEqual(carol_client.told, [])

    def test_the_answer_moves_the_mark_and_the_sender_hears_of_it(self):
        alice, alice_client = self.login("alice")
        bob, _ = self.login("bob")
        conversation = self.direct(alice, "bob")
        self.successResultOf(self.hub.messages.send(alice, conversation.id, "m1", "hello"))
        self.clock.advance(0)  # answers of one turn move the mark once
        self.assertEqual(
            alice_client.of("receipt"), [Receipt(conversation.id, "bob", "delivered", 1, 1_700_000_000)]
        )


class ReceiptTests(ServiceTestCase):
    def read(self, private):
        """Alice writes to bob, who reads it on one of his two sessions: (conversation, clients)."""
        alice, alice_client = self.login("alice")
        bob, bob_here = self.login("bob")
        _, bob_phone = self.login("bob")
        conversation = self.direct(alice, "bob")
        self.successResultOf(self.hub.messages.send(alice, conversation.id, "m1", "hello"))
        self.clock.advance(0)
        self.successResultOf(self.hub.receipts.mark_read(bob, conversation.id, 1, private))
        return conversation, alice_client, bob_here, bob_phone

    def test_reading_tells_the_sender_and_the_readers_other_sessions(self):
        conversation, alice_client, bob_here, bob_phone = self.read(private=False)
        read = Receipt(conversation.id, "bob", "read", 1, 1_700_000_000)
        self.assertIn(read, alice_client.of("receipt"))
        self.assertIn(read, bob_phone.of("receipt"))
        self.assertNotIn(read, bob_here.of("receipt"))

    def test_a_private_read_tells_only_the_readers_sessions(self):
        _, alice_client, _, bob_phone = self.read(private=True)
        self.assertEqual([r.state for r in alice_client.of("receipt")], ["delivered"])
        self.assertEqual([r.state for r in bob_phone.of("receipt")], ["read"])


class FanOutTests(ServiceTestCase):
    def test_one_broken_client_does_not_stop_a_broadcast(self):
        alice, _ = self.login("alice")
        bob, _ = self.login("bob", RecordingClient(broken=True))
        _, carol_client = self.login("carol")
        group, _, _ = self.successResultOf(self.hub.conversations.create(alice, ["bob", "carol"], "team"))
        self.assertEqual(carol_client.of("conversation"), [group])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_the_creator_is_not_told_of_its_own_conversation(self):
        alice, alice_client = self.login("alice")
        _, bob_client = self.login("bob")
        conversation = self.direct(alice, "bob")
        self.assertEqual(alice_client.of("conversation"), [])
        self.assertEqual(bob_client.of("conversation"), [conversation])

    def test_presence_reaches_contacts_only(self):
        alice, _ = self.login("alice")
        _, bob_client = self.login("bob")
        _, carol_client = self.login("carol")
        self.direct(alice, "bob")
        self.successResultOf(self.hub.presence.set_status(alice, "away", "lunch"))
        self.assertEqual(bob_client.of("presence"), [Presence("alice", "away", "lunch", 1_700_000_000)])
        self.assertEqual(carol_client.of("presence"), [])


class SeamTests(unittest.TestCase):
    def test_the_connection_is_the_chat_client(self):
        self.assertTrue(IChatClient.implementedBy(ChatProtocol))
        verifyObject(IChatClient, RecordingClient())

    def test_services_import_nothing_of_the_wire(self):
        """Services speak records to IChatClient; AMP, boxes and encoding are the connection layer's."""
        import securechatd.server

        wire = {"twisted.protocols.amp", "securechatd.server.wire", "securechatd.server.framing",
                "securechatd.server.connection", "securechatd.server.protocol"}
        folder = os.path.dirname(securechatd.server.__file__)
        for name in SERVICES:
            with open(os.path.join(folder, f"{name}.py"), encoding="utf-8") as source:
                tree = ast.parse(source.read())
            imported = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    imported.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom):
                    imported.add(node.module)
                    imported.update(f"{node.module}.{alias.name}" for alias in node.names)
            self.assertEqual(imported & wire, set(), f"server/{name}.py imports the wire")
