"""Encrypted conversations, server side (docs/PROTOCOL.md, "Encrypted conversations"): the server
stores and relays what it cannot read.

Devices, chains and envelopes are made with the client's own e2ee modules
(keys.Device, chain.first/add, envelope.seal) and real X25519/Ed25519 keys;
a wrap is an 89-byte stand-in, since the server never opens one. Membership
states are built here from docs/E2EE.md's field list and labels, not with
the code under test. Most tests go through the real protocol (iosim) on a
hub with the daemon's default settings: plaintext refused.
"""

import os
import sqlite3
from dataclasses import replace

from twisted.internet import defer, task
from twisted.protocols import amp
from twisted.trial import unittest

from securechatd import commands
from securechatd.commands import (
    BadSignature,
    InvalidArgument,
    MailboxFull,
    MessageTooLarge,
    NoSuchConversation,
    NoSuchDevice,
    NotAllowed,
    RateLimited,
)
from securechatd.config import Settings
from securechatd.e2ee import chain, envelope, keys, transcript
from securechatd.e2ee.encoding import digest, enc
from securechatd.server import conversations as conversations_module
from securechatd.server.encrypted import ACK_FLUSH, MAX_STAGED_MESSAGES, body_limit
from securechatd.store import StoreError
from securechatd.store.encrypted import EncryptedStore
from securechatd.store.messaging import NewState
from tests.helpers import (
    Connection,
    connected_client,
    make_hub,
    make_store,
    settle,
    start_daemon,
    tls_connect,
    when_lost,
)

PASSWORD = "correct horse battery"
NOW = 1_700_000_000
ZERO = bytes(32)
# docs/E2EE.md's labels, spelled out here rather than taken from the code under test
MEMBERSHIP_LABEL = "securechatd/membership/v1"
MEMBERSHIP_HASH_LABEL = "securechatd/membership-hash/v1"
MARKER = b"MARKER-plaintext-that-must-never-reach-the-server"


class State:
    """A signed membership state as a client makes it (docs/E2EE.md, "Membership")."""

    def __init__(self, conversation, epoch, prev, op, kind, title, members, actor, actor_device, signature=b""):
        self.conversation, self.epoch, self.prev, self.op = conversation, epoch, prev, op
        self.kind, self.title, self.members = kind, title, tuple(sorted(members))
        self.actor, self.actor_device, self.signature = actor, actor_device, signature

    def fields(self):
        return [
            self.conversation,
            self.epoch,
            self.prev,
            self.op,
            self.kind,
            self.title,
            enc(list(self.members)),
            self.actor,
            self.actor_device,
        ]

    def signed(self, device):
        self.signature = device.sign(MEMBERSHIP_LABEL, self.fields())
        return self

    def to_bytes(self):
        return enc(self.fields() + [self.signature])

    def hash(self):
        return digest(MEMBERSHIP_HASH_LABEL, self.fields() + [self.signature])

    def changed(self, **changes):
        """A copy with `changes` (signature kept: sign again if it should check)."""
        copy = State(*[getattr(self, name) for name in FIELDS], self.signature)
        for name, value in changes.items():
            setattr(copy, name, tuple(sorted(value)) if name == "members" else value)
        return copy


FIELDS = ("conversation", "epoch", "prev", "op", "kind", "title", "members", "actor", "actor_device")


def dummy_wrap(device, key, context):
    """A wrap of the right size (a type 1 wrap is 89 bytes); the server never opens it."""
    return b"\x01" + digest("securechatd/test-wrap/v1", [device, context]) + bytes(56)


class EncryptedTestCase(unittest.TestCase):
    """A hub with the daemon's defaults (plaintext refused) and users alice, bob, carol, dave.

    `bob_watch` is a version 1 session of bob (bound to no device) that must
    never be disturbed and never see an encrypted message.
    """

    settings = {}

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.hub = make_hub(self, clock=self.clock, plaintext="refused", **self.settings)
        setup = Connection(self.hub)
        for name in ("alice", "bob", "carol", "dave"):
            self.ok(setup, commands.Register, username=name, password=PASSWORD)
        self.chains = {}  # user -> e2ee.chain.ChainState, as their clients verified it
        self.first = {}  # user -> their first device, which adds the others
        self.counters = {}  # device id -> the last counter it sent
        self.latest = {}  # conversation id -> its latest State
        self.bob_watch = self.connect("bob")

    # -- users, devices, sessions ---------------------------------------------------------

    def connect(self, username, device=None, answering=True):
        conn = Connection(self.hub, answering=answering)
        arguments = {} if device is None else {"device_id": device.id.hex()}
        self.ok(conn, commands.Login, username=username, password=PASSWORD, **arguments)
        self.settle(conn)
        return conn

    def device(self, user, name="laptop"):
        """A new device of `user`, published in their chain (by their first device)."""
        device = keys.Device.generate(user)
        state = self.chains.get(user, chain.ChainState(user))
        signer = self.first.setdefault(user, device)
        link = chain.first(device, name) if signer is device else chain.add(state, signer, device, name)
        conn = Connection(self.hub)
        self.ok(conn, commands.Login, username=user, password=PASSWORD, device_id=signer.id.hex())
        self.ok(conn, commands.PublishChainLink, link=link.to_bytes())
        conn.drop()
        self.chains[user] = state.extend([link])
        return device

    def revoke(self, user, device):
        signer = self.first[user]
        link = chain.revoke(self.chains[user], signer, device.id)
        conn = Connection(self.hub)
        self.ok(conn, commands.Login, username=user, password=PASSWORD, device_id=signer.id.hex())
        self.ok(conn, commands.PublishChainLink, link=link.to_bytes())
        conn.drop()
        self.chains[user] = self.chains[user].extend([link])

    def wait(self, seconds, *conns):
        """Let `seconds` pass, the connections `conns` staying alive (answering pings)."""
        while seconds > 0:
            step = min(seconds, 10)
            self.clock.advance(step)
            seconds -= step
            for conn in conns:
                conn.pump.flush()

    def settle(self, *conns):
        settle(self.clock, conns)

    def ok(self, conn, command, **arguments):
        return self.successResultOf(conn.call(command, **arguments))

    def refused(self, conn, error, command, **arguments):
        """The command fails with `error`: its text. The connection and the witness carry on."""
        failure = self.failureResultOf(conn.call(command, **arguments), error)
        self.assertFalse(conn.server.lost)
        self.ok(conn, commands.Ping)
        self.ok(self.bob_watch, commands.ListConversations)
        return str(failure.value)

    # -- conversations and membership ------------------------------------------------------

    def create(self, conn, members, title=None, **arguments):
        if title is not None:
            arguments["title"] = title
        return self.ok(conn, commands.CreateConversation, members=members, **arguments)

    def epoch1(self, conversation_id, actor_device, members, kind="group", title=""):
        return State(
            conversation_id, 1, ZERO, "create", kind, title, members, actor_device.user, actor_device.id
        ).signed(actor_device)

    def next_state(self, conversation_id, op, members, actor_device):
        previous = self.latest[conversation_id]
        return State(
            conversation_id,
            previous.epoch + 1,
            previous.hash(),
            op,
            previous.kind,
            previous.title,
            members,
            actor_device.user,
            actor_device.id,
        ).signed(actor_device)

    def publish(self, conn, state):
        answer = self.ok(
            conn, commands.PublishMembership, conversation_id=state.conversation, membership=state.to_bytes()
        )
        self.assertEqual(answer, {"epoch": state.epoch})
        self.latest[state.conversation] = state
        return state

    def add(self, conn, conversation_id, names, actor_device):
        members = set(self.latest[conversation_id].members) | set(names)
        state = self.next_state(conversation_id, "add", members, actor_device)
        self.ok(conn, commands.AddMembers, conversation_id=conversation_id, members=names, membership=state.to_bytes())
        self.latest[conversation_id] = state
        return state

    def group(self, conn, actor_device, others, title="team"):
        """A new encrypted group of the caller and `others`, with its epoch 1 published: its id."""
        conversation_id = self.create(conn, others, title)["conversation_id"]
        self.publish(conn, self.epoch1(conversation_id, actor_device, [actor_device.user, *others], title=title))
        return conversation_id

    # -- messages -----------------------------------------------------------------------------

    def seal(self, device, conversation_id, recipients, plaintext=b"hello", counter=None, members=None, **header):
        """An envelope from `device` to the `recipients` devices; `header` changes header fields."""
        counter = counter if counter is not None else self.counters.get(device.id, 0) + 1
        self.counters[device.id] = max(counter, self.counters.get(device.id, 0))
        members = members if members is not None else self.latest[conversation_id].hash()
        sealed = envelope.seal(
            plaintext,
            conversation_id,
            members,
            device.user,
            device.id,
            counter,
            NOW * 1000,
            [device.id for device in recipients],
            dummy_wrap,
        )
        if header:
            fields = envelope.Header.from_bytes(sealed.header)
            sealed = replace(sealed, header=replace(fields, **header).to_bytes())
        return sealed

    @staticmethod
    def wraps(sealed, **changes):
        return [{"device_id": device.hex(), "wrap": wrap} for device, wrap in sealed.wraps.items()]

    def send(self, conn, conversation_id, sealed, client_msg_id=None, wraps=None, **arguments):
        """SendEncrypted's arguments for `sealed`."""
        self._sent = getattr(self, "_sent", 0) + 1
        return dict(
            conversation_id=conversation_id,
            client_msg_id=client_msg_id or f"e{self._sent}",
            header=sealed.header,
            body=sealed.body,
            wraps=self.wraps(sealed) if wraps is None else wraps,
            **arguments,
        )

    def sent(self, conn, conversation_id, sealed, **arguments):
        return self.ok(conn, commands.SendEncrypted, **self.send(conn, conversation_id, sealed, **arguments))

    def pushed(self, conn, kind="DeliverEncrypted"):
        return [p for name, p in conn.pushes if name == kind]

    def wrap_rows(self):
        """(user, device_id, seq) of every wrap the database holds once acknowledged ones are deleted."""
        self.hub.encrypted.flush_acknowledged()  # (otherwise within ACK_FLUSH)
        rows = self.successResultOf(self.hub.store._read("test", _wrap_rows))
        return sorted(rows)


def _wrap_rows(txn):
    txn.execute("SELECT u.username, w.device_id, w.seq FROM wraps w JOIN users u ON u.id = w.user_id")
    return txn.fetchall()


class Scene(EncryptedTestCase):
    """alice (laptop), bob (phone and laptop) and carol (laptop) in an encrypted group; alice's laptop online."""

    def setUp(self):
        super().setUp()
        self.alice_laptop = self.device("alice")
        self.bob_phone = self.device("bob", "phone")
        self.bob_laptop = self.device("bob", "laptop")
        self.carol_laptop = self.device("carol")
        self.alice = self.connect("alice", self.alice_laptop)
        self.group_id = self.group(self.alice, self.alice_laptop, ["bob", "carol"])
        self.everyone = [self.bob_phone, self.bob_laptop, self.carol_laptop]


# -- plaintext and the setting ------------------------------------------------------------------


class PlaintextSettingTests(EncryptedTestCase):
    def test_the_default_is_refused(self):
        self.assertEqual(Settings().plaintext, "refused")
        self.assertEqual(Settings().max_recipient_devices, 500)

    def test_new_conversations_are_encrypted_and_plaintext_is_refused(self):
        alice, carol = self.connect("alice"), self.connect("carol")
        direct = self.create(alice, ["bob"])
        self.assertEqual(direct, {"conversation_id": direct["conversation_id"], "created": True, "encrypted": True, "invited": None})
        text = self.refused(alice, NotAllowed, commands.CreateConversation, members=["carol"], encrypted=False)
        self.assertIn("refuses plaintext conversations", text)
        group = self.create(alice, ["bob", "carol"], "team", encrypted=True)
        self.assertTrue(group["encrypted"])
        self.settle(alice, carol, self.bob_watch)
        [update] = self.pushed(carol, "ConversationUpdated")
        self.assertEqual((update["conversation_id"], update["encrypted"]), (group["conversation_id"], True))
        listing = self.ok(alice, commands.ListConversations)["conversations"]
        self.assertEqual([(c["kind"], c["encrypted"]) for c in listing], [("direct", True), ("group", True)])

    def test_a_pair_has_one_direct_conversation_of_each_kind(self):
        hub = make_hub(self, clock=self.clock, plaintext="allowed")
        setup = Connection(hub)
        for name in ("alice", "bob"):
            self.ok(setup, commands.Register, username=name, password=PASSWORD)
        alice = Connection(hub)
        self.ok(alice, commands.Login, username="alice", password=PASSWORD)
        plain = self.ok(alice, commands.CreateConversation, members=["bob"])
        secret = self.ok(alice, commands.CreateConversation, members=["bob"], encrypted=True)
        again = self.ok(alice, commands.CreateConversation, members=["bob"], encrypted=True)
        self.assertEqual(plain, {"conversation_id": plain["conversation_id"], "created": True, "encrypted": None, "invited": None})
        self.assertNotEqual(plain["conversation_id"], secret["conversation_id"])
        self.assertEqual((again["conversation_id"], again["created"]), (secret["conversation_id"], False))

    def test_with_plaintext_allowed_a_conversation_is_as_in_version_1_byte_for_byte(self):
        """No `encrypted` key anywhere: the answer, the listing and the push are version 1's boxes."""
        hub = make_hub(self, clock=self.clock, plaintext="allowed")
        setup = Connection(hub)
        for name in ("alice", "bob"):
            self.ok(setup, commands.Register, username=name, password=PASSWORD)
        alice, bob = Connection(hub), Connection(hub)
        boxes = []
        for conn, name in ((alice, "alice"), (bob, "bob")):
            received = conn.client.ampBoxReceived
            conn.client.ampBoxReceived = lambda box, received=received: (boxes.append(box), received(box))[1]
            self.ok(conn, commands.Login, username=name, password=PASSWORD)
        self.ok(alice, commands.CreateConversation, members=["bob"])
        self.ok(alice, commands.ListConversations)
        self.settle(alice, bob)
        self.assertTrue(any(box.get(b"_command") == b"ConversationUpdated" for box in boxes))
        self.assertFalse(
            [box for box in boxes if b"encrypted" in box or b"encrypted" in box.get(b"conversations", b"")]
        )
        sent = self.ok(alice, commands.SendMessage, conversation_id=1, client_msg_id="m1", body="hi")
        self.assertEqual(sent["seq"], 1)

    def test_sendmessage_to_an_old_plaintext_conversation_once_plaintext_is_refused(self):
        """A conversation made while plaintext was allowed stays readable, but takes no more plaintext."""
        store = make_store(self)
        allowed = make_hub(self, clock=self.clock, store=store, plaintext="allowed")
        setup = Connection(allowed)
        for name in ("alice", "bob"):
            self.ok(setup, commands.Register, username=name, password=PASSWORD)
        alice = Connection(allowed)
        self.ok(alice, commands.Login, username="alice", password=PASSWORD)
        conversation_id = self.ok(alice, commands.CreateConversation, members=["bob"])["conversation_id"]
        self.ok(alice, commands.SendMessage, conversation_id=conversation_id, client_msg_id="m1", body="old")
        refused = make_hub(self, clock=self.clock, store=store, plaintext="refused")
        alice = Connection(refused)
        self.ok(alice, commands.Login, username="alice", password=PASSWORD)
        failure = self.failureResultOf(
            alice.call(commands.SendMessage, conversation_id=conversation_id, client_msg_id="m2", body="new"),
            NotAllowed,
        )
        self.assertIn("no longer accepts plaintext", str(failure.value))
        history = self.ok(alice, commands.History, conversation_id=conversation_id)
        self.assertEqual([m["body"] for m in history["messages"]], ["old"])

    def test_an_encrypted_title_must_fit_a_membership_state(self):
        alice = self.connect("alice")
        text = self.refused(alice, InvalidArgument, commands.CreateConversation, members=["bob"], title="é" * 101)
        self.assertIn("200 bytes", text)
        self.create(alice, ["bob"], "é" * 100)


class VersionOneCommandsTests(Scene):
    def test_sendmessage_and_history_answer_not_allowed(self):
        for conn in (self.alice, self.bob_watch):
            text = self.refused(
                conn, NotAllowed, commands.SendMessage, conversation_id=self.group_id, client_msg_id="m1", body="hi"
            )
            self.assertIn("This conversation is end-to-end encrypted; ", text)
            text = self.refused(conn, NotAllowed, commands.History, conversation_id=self.group_id)
            self.assertIn("This conversation is end-to-end encrypted; ", text)

    def test_a_non_member_still_learns_nothing(self):
        dave = self.connect("dave")
        for command, arguments in (
            (commands.SendMessage, {"client_msg_id": "m1", "body": "hi"}),
            (commands.History, {}),
            (commands.HistoryEncrypted, {}),
            (commands.GetMembership, {}),
        ):
            self.refused(dave, NoSuchConversation, command, conversation_id=self.group_id, **arguments)

    def test_mark_read_receipts_listing_and_presence_keep_working(self):
        carol = self.connect("carol")  # a version 1 client: no device
        sent = self.sent(self.alice, self.group_id, self.seal(self.alice_laptop, self.group_id, self.everyone))
        listing = self.ok(carol, commands.ListConversations)["conversations"]
        self.assertEqual(
            [(c["conversation_id"], c["encrypted"], c["last_seq"], c["unread"]) for c in listing],
            [(self.group_id, True, 1, 1)],
        )
        self.ok(carol, commands.MarkRead, conversation_id=self.group_id, seq=1)
        self.settle(self.alice, carol)
        self.assertIn(
            ("carol", "read", 1), [(r["username"], r["state"], r["seq"]) for r in self.pushed(self.alice, "Receipt")]
        )
        receipts = self.ok(carol, commands.GetReceipts, conversation_id=self.group_id, message_id=sent["message_id"])
        self.assertEqual([r["username"] for r in receipts["receipts"]], ["bob", "carol"])
        self.ok(carol, commands.SetPresence, status="away")
        self.settle(self.alice, carol)
        self.assertIn("away", [p["status"] for p in self.pushed(self.alice, "PresenceChanged")])
        self.assertEqual(self.pushed(carol), [])
        self.assertEqual(self.pushed(carol, "Deliver"), [])


# -- membership ---------------------------------------------------------------------------------


class MembershipTests(EncryptedTestCase):
    def setUp(self):
        super().setUp()
        self.laptop = self.device("alice")
        self.bob_phone = self.device("bob", "phone")
        self.alice = self.connect("alice", self.laptop)
        self.bob = self.connect("bob", self.bob_phone)
        self.group_id = self.create(self.alice, ["bob"], "team")["conversation_id"]
        self.good = self.epoch1(self.group_id, self.laptop, ["alice", "bob"], title="team")

    def publish_refused(self, error, state, conn=None):
        data = state if isinstance(state, bytes) else state.to_bytes()
        return self.refused(
            conn or self.alice, error, commands.PublishMembership, conversation_id=self.group_id, membership=data
        )

    def states(self, conn=None, **arguments):
        return self.ok(conn or self.bob, commands.GetMembership, conversation_id=self.group_id, **arguments)

    def test_epoch_1_by_a_member_after_create(self):
        self.assertEqual(self.states(), {"states": [], "has_more": False})
        self.publish(self.bob, self.epoch1(self.group_id, self.bob_phone, ["alice", "bob"], title="team"))
        self.assertEqual(self.states(self.alice)["states"], [self.latest[self.group_id].to_bytes()])
        text = self.publish_refused(NotAllowed, self.good)  # the creator came second
        self.assertIn("changed; fetch it", text)

    def test_a_direct_conversation_has_its_epoch_1_too(self):
        direct = self.create(self.alice, ["bob"])["conversation_id"]
        state = self.epoch1(direct, self.laptop, ["alice", "bob"], kind="direct")
        self.publish(self.alice, state)
        wrong = self.epoch1(direct, self.laptop, ["alice", "bob"], kind="group")
        self.refused(
            self.alice, NotAllowed, commands.PublishMembership, conversation_id=direct, membership=wrong.to_bytes()
        )

    def test_malformed_states(self):
        data = self.good.to_bytes()
        fields = self.good.fields() + [self.good.signature]
        bad = {
            "empty": b"",
            "garbage": b"\xff" * 40,
            "truncated": data[:-1],
            "a field too many": data + enc([b"x"]),
            "epoch of 4 bytes": enc(fields[:1] + [b"\x00\x00\x00\x01"] + fields[2:]),
            "short prev": enc(fields[:2] + [b"\x00" * 31] + fields[3:]),
            "unknown op": self.good.changed(op="rename").signed(self.laptop).to_bytes(),
            "unknown kind": self.good.changed(kind="channel").signed(self.laptop).to_bytes(),
            "unsorted members": enc(fields[:6] + [enc(["bob", "alice"])] + fields[7:]),
            "a member twice": enc(fields[:6] + [enc(["alice", "alice", "bob"])] + fields[7:]),
            "a member not a user name": enc(fields[:6] + [enc(["Alice", "bob"])] + fields[7:]),
            "a title too long": self.good.changed(title="t" * 201).signed(self.laptop).to_bytes(),
            "short signature": enc(fields[:-1] + [self.good.signature[:63]]),
            "actor not UTF-8": enc(fields[:7] + [b"\xff"] + fields[8:]),
        }
        for what, data in bad.items():
            text = self.publish_refused(InvalidArgument, data)
            self.assertTrue(text.startswith("Not a membership state"), (what, text))
        self.assertEqual(self.states()["states"], [])
        self.publish(self.alice, self.good)  # nothing was half-stored

    def test_each_rule_with_its_error(self):
        other = self.create(self.alice, ["carol"], "other")["conversation_id"]
        cases = [
            ("another conversation", InvalidArgument, self.good.changed(conversation=other).signed(self.laptop)),
            ("epoch 2 first", NotAllowed, self.good.changed(epoch=2).signed(self.laptop)),
            ("a prev for epoch 1", NotAllowed, self.good.changed(prev=b"\x01" * 32).signed(self.laptop)),
            ("an add first", NotAllowed, self.good.changed(op="add").signed(self.laptop)),
            ("bob's name", NotAllowed, self.good.changed(actor="bob").signed(self.laptop)),
            ("another device", NotAllowed, self.good.changed(actor_device=self.bob_phone.id).signed(self.laptop)),
            ("another kind", NotAllowed, self.good.changed(kind="direct", title="").signed(self.laptop)),
            ("another title", NotAllowed, self.good.changed(title="not team").signed(self.laptop)),
            ("carol added", NotAllowed, self.good.changed(members=["alice", "bob", "carol"]).signed(self.laptop)),
            ("bob left out", NotAllowed, self.good.changed(members=["alice"]).signed(self.laptop)),
            ("unsigned", BadSignature, self.good.changed(signature=bytes(64))),
            ("signed by another key", BadSignature, self.good.changed().signed(keys.Device.generate("alice"))),
        ]
        texts = {what: self.publish_refused(error, state) for what, error, state in cases}
        self.assertIn("conversation", texts["another conversation"])
        self.assertIn("changed; fetch it", texts["epoch 2 first"])
        self.assertIn("must be you", texts["bob's name"])
        self.assertIn("bound to", texts["another device"])
        self.assertIn("members", texts["carol added"])
        self.assertIn("signature", texts["unsigned"])
        self.assertEqual(self.states()["states"], [])
        self.publish(self.alice, self.good)

    def test_the_actor_must_be_a_bound_current_device(self):
        unbound = self.connect("alice")
        text = self.refused(
            unbound,
            NotAllowed,
            commands.PublishMembership,
            conversation_id=self.group_id,
            membership=self.good.to_bytes(),
        )
        self.assertIn("log in with your device_id", text)
        stranger = keys.Device.generate("carol")  # carol has no chain yet: any device may log in
        carol = self.connect("carol", stranger)
        group = self.create(carol, ["alice"], "hers")["conversation_id"]
        state = self.epoch1(group, stranger, ["alice", "carol"], title="hers")
        self.refused(
            carol, NoSuchDevice, commands.PublishMembership, conversation_id=group, membership=state.to_bytes()
        )

    def test_not_for_plaintext_conversations(self):
        hub = make_hub(self, clock=self.clock, plaintext="allowed")
        setup = Connection(hub)
        for name in ("alice", "bob"):
            self.ok(setup, commands.Register, username=name, password=PASSWORD)
        alice = Connection(hub)
        self.ok(alice, commands.Login, username="alice", password=PASSWORD)
        conversation_id = self.ok(alice, commands.CreateConversation, members=["bob"], title="plain")["conversation_id"]
        state = self.epoch1(conversation_id, self.laptop, ["alice", "bob"], title="plain")
        for command, arguments in (
            (commands.PublishMembership, {"membership": state.to_bytes()}),
            (commands.GetMembership, {}),
        ):
            self.failureResultOf(alice.call(command, conversation_id=conversation_id, **arguments), NotAllowed)
        self.failureResultOf(
            alice.call(commands.AddMembers, conversation_id=conversation_id, members=["bob"], membership=b"x"),
            InvalidArgument,
        )

    def test_add_and_leave_need_the_signed_state(self):
        self.publish(self.alice, self.good)
        text = self.refused(
            self.alice, NotAllowed, commands.AddMembers, conversation_id=self.group_id, members=["carol"]
        )
        self.assertIn("end-to-end encrypted", text)
        self.refused(self.bob, NotAllowed, commands.LeaveConversation, conversation_id=self.group_id)
        carol = self.connect("carol")
        added = self.add(self.alice, self.group_id, ["carol"], self.laptop)
        self.settle(self.alice, self.bob, carol)
        [update] = self.pushed(carol, "ConversationUpdated")
        self.assertEqual((update["members"], update["encrypted"]), (["alice", "bob", "carol"], True))
        leave = self.next_state(self.group_id, "leave", ["alice", "carol"], self.bob_phone)
        self.ok(self.bob, commands.LeaveConversation, conversation_id=self.group_id, membership=leave.to_bytes())
        self.latest[self.group_id] = leave
        self.assertEqual(self.states(self.alice)["states"], [self.good.to_bytes(), added.to_bytes(), leave.to_bytes()])
        listing = self.ok(self.alice, commands.ListConversations)["conversations"]
        self.assertEqual([c["members"] for c in listing if c["conversation_id"] == self.group_id], [["alice", "carol"]])

    def test_an_add_must_be_the_servers_change(self):
        self.publish(self.alice, self.good)
        cases = [
            ("not carol", ["alice", "bob", "dave"], ["carol"], NotAllowed),
            ("dave too", ["alice", "bob", "carol", "dave"], ["carol"], NotAllowed),
            ("bob dropped", ["alice", "carol"], ["carol"], NotAllowed),
            ("nobody new", ["alice", "bob"], ["bob"], NotAllowed),
        ]
        for what, members, names, error in cases:
            state = self.next_state(self.group_id, "add", members, self.laptop)
            self.refused(
                self.alice,
                error,
                commands.AddMembers,
                conversation_id=self.group_id,
                members=names,
                membership=state.to_bytes(),
            )
        stale = self.next_state(self.group_id, "add", ["alice", "bob", "carol"], self.laptop).changed(prev=b"\x02" * 32)
        text = self.refused(
            self.alice,
            NotAllowed,
            commands.AddMembers,
            conversation_id=self.group_id,
            members=["carol"],
            membership=stale.signed(self.laptop).to_bytes(),
        )
        self.assertIn("changed; fetch it", text)
        leave_as_add = self.next_state(self.group_id, "leave", ["alice", "bob", "carol"], self.laptop)
        self.refused(
            self.alice,
            NotAllowed,
            commands.AddMembers,
            conversation_id=self.group_id,
            members=["carol"],
            membership=leave_as_add.to_bytes(),
        )
        self.assertEqual(len(self.states()["states"]), 1)
        self.assertEqual(
            self.ok(self.alice, commands.ListConversations)["conversations"][0]["members"], ["alice", "bob"]
        )

    def test_a_leave_must_remove_the_caller_only(self):
        self.publish(self.alice, self.good)
        self.add(self.alice, self.group_id, ["carol"], self.laptop)
        for members in (["alice", "bob", "carol"], ["alice"], ["bob"], ["bob", "carol", "dave"]):
            state = self.next_state(self.group_id, "leave", members, self.laptop)
            self.refused(
                self.alice,
                NotAllowed,
                commands.LeaveConversation,
                conversation_id=self.group_id,
                membership=state.to_bytes(),
            )
        self.assertEqual(len(self.states()["states"]), 2)

    def test_two_changes_at_one_epoch_one_wins(self):
        self.publish(self.alice, self.good)
        first = self.next_state(self.group_id, "add", ["alice", "bob", "carol"], self.laptop)
        second = self.next_state(self.group_id, "add", ["alice", "bob", "dave"], self.laptop)
        store = self.hub.store
        won = store.add_members(self.group_id, ["carol"], NOW, NewState(2, first.prev, first.hash(), first.to_bytes()))
        lost = store.add_members(
            self.group_id, ["dave"], NOW, NewState(2, second.prev, second.hash(), second.to_bytes())
        )
        self.assertEqual(self.successResultOf(won).members, ("alice", "bob", "carol"))
        self.assertIsNone(self.successResultOf(lost))
        stored = self.successResultOf(store.conversation(self.group_id))
        self.assertEqual((stored.members, stored.epoch, stored.members_hash), (("alice", "bob", "carol"), 2, first.hash()))

    def test_states_made_by_the_clients_own_builders(self):
        """e2ee.membership's create, add and leave make states the server takes, the same as this file's."""
        from securechatd.e2ee import membership

        carol = self.connect("carol", self.device("carol"))
        created = membership.create(self.group_id, "group", "team", ["bob"], self.laptop)
        self.assertEqual(created.to_bytes(), self.good.to_bytes())
        self.ok(self.alice, commands.PublishMembership, conversation_id=self.group_id, membership=created.to_bytes())
        added = membership.add(created, ["carol"], self.bob_phone)
        arguments = {"conversation_id": self.group_id, "membership": added.to_bytes()}
        self.ok(self.bob, commands.AddMembers, members=["carol"], **arguments)
        left = membership.leave(added, self.laptop)
        self.ok(self.alice, commands.LeaveConversation, conversation_id=self.group_id, membership=left.to_bytes())
        states = self.ok(carol, commands.GetMembership, conversation_id=self.group_id)["states"]
        self.assertEqual(states, [state.to_bytes() for state in (created, added, left)])
        membership.verify_membership(self.group_id, map(membership.State.from_bytes, states), self.lookup)

    def lookup(self, user, device_id):
        """The DeviceKeys of a current device of `user`'s chain, as their clients verified it."""
        device = self.chains[user].devices.get(device_id)
        return device.keys if device is not None else None

    def test_get_membership_pages(self):
        self.patch(conversations_module, "MEMBERSHIP_PAGE", 2)
        self.publish(self.alice, self.good)
        self.add(self.alice, self.group_id, ["carol"], self.laptop)
        self.add(self.alice, self.group_id, ["dave"], self.laptop)
        first = self.states()
        self.assertEqual(len(first["states"]), 2)
        self.assertTrue(first["has_more"])
        rest = self.states(after_epoch=2)
        self.assertEqual((len(rest["states"]), rest["has_more"]), (1, False))
        self.assertEqual(self.states(after_epoch=3), {"states": [], "has_more": False})
        self.refused(self.bob, InvalidArgument, commands.GetMembership, conversation_id=self.group_id, after_epoch=-1)


# -- sending ------------------------------------------------------------------------------------


class SendTests(Scene):
    def send_refused(self, error, sealed, conn=None, conversation_id=None, **arguments):
        conversation_id = conversation_id or self.group_id
        return self.refused(
            conn or self.alice, error, commands.SendEncrypted, **self.send(conn, conversation_id, sealed, **arguments)
        )

    def test_the_answer(self):
        sent = self.sent(self.alice, self.group_id, self.seal(self.alice_laptop, self.group_id, self.everyone))
        self.assertEqual((sent["seq"], sent["sent_at"].timestamp()), (1, NOW))
        self.assertEqual(len(self.wrap_rows()), 3)

    def test_a_new_message_to_three_devices_costs_eight_statements(self):
        """The store's common case: the recipients' devices, one statement for every other check
        and the seq (and its chain link), the link, the message (with its envelope and counter), 3 wraps
        and the sender's marks."""
        statements = []
        add_envelope_txn = EncryptedStore._add_envelope_txn

        def traced(txn, *args):
            txn.connection.set_trace_callback(statements.append)
            try:
                return add_envelope_txn(txn, *args)
            finally:
                txn.connection.set_trace_callback(None)

        # (not self.patch: it would put the function back without its staticmethod)
        self.addCleanup(setattr, EncryptedStore, "_add_envelope_txn", EncryptedStore.__dict__["_add_envelope_txn"])
        EncryptedStore._add_envelope_txn = staticmethod(traced)
        sent = self.sent(self.alice, self.group_id, self.seal(self.alice_laptop, self.group_id, self.everyone))
        self.assertEqual(sent["seq"], 1)
        self.assertEqual(len(self.wrap_rows()), 3)
        self.assertEqual(len(statements), 8, "\n".join(statements))

    def test_only_from_a_session_bound_to_a_device(self):
        unbound = self.connect("alice")
        sealed = self.seal(self.alice_laptop, self.group_id, self.everyone)
        text = self.send_refused(NotAllowed, sealed, conn=unbound)
        self.assertIn("log in with your device_id", text)
        for command, arguments in (
            (commands.StageWraps, {"client_msg_id": "s1", "wraps": self.wraps(sealed)}),
            (commands.HistoryEncrypted, {}),
        ):
            self.refused(unbound, NotAllowed, command, conversation_id=self.group_id, **arguments)

    def test_the_header_must_name_this_conversation_the_caller_and_the_device(self):
        other = self.group(self.alice, self.alice_laptop, ["carol"], "other")
        alice_phone = self.device("alice", "phone")
        cases = [
            (InvalidArgument, {"conversation": other}, "conversation"),
            (NotAllowed, {"sender": "bob"}, "must be you"),
            (NotAllowed, {"sender_device": alice_phone.id}, "bound to"),
        ]
        for error, header, words in cases:
            text = self.send_refused(error, self.seal(self.alice_laptop, self.group_id, self.everyone, **header))
            self.assertIn(words, text)
        self.assertEqual(self.wrap_rows(), [])

    def test_malformed_headers_and_bodies(self):
        sealed = self.seal(self.alice_laptop, self.group_id, self.everyone)
        header = envelope.Header.from_bytes(sealed.header)
        fields = header.fields()
        for bad in (
            b"",
            sealed.header[:-1],
            sealed.header + enc([b"x"]),
            enc(["securechatd-e2ee-v2", *fields[1:]]),
            enc([*fields[:5], b"\x00" * 4, *fields[6:]]),
            enc([*fields[:4], b"\x01" * 15, *fields[5:]]),
        ):
            text = self.send_refused(InvalidArgument, replace(sealed, header=bad))
            self.assertIn("Not a message header", text)
        for body in (b"", sealed.body[:-1], sealed.body + b"\x00", bytes(255 + 16)):
            text = self.send_refused(InvalidArgument, replace(sealed, body=body))
            self.assertIn("padding bucket", text)

    def test_the_membership_must_be_the_latest(self):
        old = self.latest[self.group_id]
        dave_laptop = self.device("dave")
        self.add(self.alice, self.group_id, ["dave"], self.alice_laptop)
        text = self.send_refused(
            NotAllowed, self.seal(self.alice_laptop, self.group_id, self.everyone, members=old.hash())
        )
        self.assertIn("the membership changed; fetch it", text)
        text = self.send_refused(
            NotAllowed, self.seal(self.alice_laptop, self.group_id, self.everyone, members=bytes(32))
        )
        self.assertIn("the membership changed; fetch it", text)
        self.sent(self.alice, self.group_id, self.seal(self.alice_laptop, self.group_id, [*self.everyone, dave_laptop]))

    def test_no_message_before_epoch_1(self):
        conversation_id = self.create(self.alice, ["bob"], "early")["conversation_id"]
        sealed = self.seal(self.alice_laptop, conversation_id, self.everyone[:2], members=bytes(32))
        text = self.send_refused(NotAllowed, sealed, conversation_id=conversation_id)
        self.assertIn("the membership changed", text)

    def test_counters_only_move_forward_per_device_and_conversation(self):
        self.sent(self.alice, self.group_id, self.seal(self.alice_laptop, self.group_id, self.everyone, counter=5))
        for counter in (5, 4, 0):
            text = self.send_refused(
                InvalidArgument, self.seal(self.alice_laptop, self.group_id, self.everyone, counter=counter)
            )
            self.assertIn("replayed or out of order", text)
        self.sent(
            self.alice, self.group_id, self.seal(self.alice_laptop, self.group_id, self.everyone, counter=2**64 - 1)
        )
        self.send_refused(InvalidArgument, self.seal(self.alice_laptop, self.group_id, self.everyone, counter=2**63))
        # another conversation, and another device of the same user, count on their own
        other = self.group(self.alice, self.alice_laptop, ["bob"], "other")
        self.sent(self.alice, other, self.seal(self.alice_laptop, other, self.everyone[:2], counter=1))
        phone = self.device("alice", "phone")
        alice_phone = self.connect("alice", phone)
        self.sent(alice_phone, self.group_id, self.seal(phone, self.group_id, self.everyone, counter=1))

    def test_a_resend_answers_the_first_message_and_stores_nothing(self):
        bob = self.connect("bob", self.bob_phone)
        sealed = self.seal(self.alice_laptop, self.group_id, self.everyone)
        first = self.sent(self.alice, self.group_id, sealed, client_msg_id="same")
        again = self.sent(self.alice, self.group_id, sealed, client_msg_id="same")
        changed = self.seal(self.alice_laptop, self.group_id, self.everyone)
        third = self.sent(self.alice, self.group_id, changed, client_msg_id="same")
        self.assertEqual(first, again)
        self.assertEqual(first, third)
        self.settle(bob, self.alice)
        self.assertEqual([p["seq"] for p in self.pushed(bob)], [1])

    def test_every_wrap_goes_to_a_current_device_of_a_current_member(self):
        dave_laptop = self.device("dave")  # not a member
        stranger = keys.Device.generate("bob")  # not in bob's chain
        revoked = self.device("carol", "old phone")
        self.revoke("carol", revoked)
        for device in (dave_laptop, stranger, revoked):
            text = self.send_refused(
                NoSuchDevice, self.seal(self.alice_laptop, self.group_id, [*self.everyone, device])
            )
            self.assertIn(device.id.hex(), text)
        self.assertEqual(self.wrap_rows(), [])

    def test_wrap_sizes_ids_and_counts(self):
        sealed = self.seal(self.alice_laptop, self.group_id, self.everyone)
        wraps = self.wraps(sealed)
        for size in (0, 88, 90, 128, 130):
            bad = [{**wraps[0], "wrap": bytes(size)}, *wraps[1:]]
            text = self.send_refused(InvalidArgument, sealed, wraps=bad)
            self.assertIn("89 or 129 bytes", text)
        first_message_wrap = [{**wraps[0], "wrap": bytes(129)}, *wraps[1:]]
        self.send_refused(InvalidArgument, sealed, wraps=wraps + wraps[:1])
        self.send_refused(InvalidArgument, sealed, wraps=[{**wraps[0], "device_id": "AB" * 16}])
        own = [{"device_id": self.alice_laptop.id.hex(), "wrap": bytes(89)}]
        text = self.send_refused(InvalidArgument, sealed, wraps=own)
        self.assertIn("sending device", text)
        self.sent(self.alice, self.group_id, sealed, wraps=first_message_wrap)

    def test_a_message_of_no_recipients_is_still_a_message(self):
        sent = self.sent(self.alice, self.group_id, self.seal(self.alice_laptop, self.group_id, []))
        self.assertEqual(sent["seq"], 1)

    def test_the_sending_device_must_be_in_the_chain(self):
        stranger = keys.Device.generate("dave")  # dave has no chain: his sessions may bind any device
        dave = self.connect("dave", stranger)
        conversation_id = self.create(dave, ["alice"], "daves")["conversation_id"]
        carol = self.connect("carol", self.carol_laptop)
        self.add_state_directly(
            conversation_id, self.epoch1(conversation_id, stranger, ["alice", "dave"], title="daves")
        )
        text = self.send_refused(
            NoSuchDevice,
            self.seal(stranger, conversation_id, [self.alice_laptop]),
            conn=dave,
            conversation_id=conversation_id,
        )
        self.assertIn("publish its link first", text)
        self.ok(carol, commands.Ping)

    def add_state_directly(self, conversation_id, state):
        """Record `state` as the conversation's membership without the service's checks."""
        new = NewState(state.epoch, state.prev, state.hash(), state.to_bytes())
        self.assertIsNotNone(self.successResultOf(self.hub.store.publish_membership(conversation_id, new, NOW)))
        self.hub.conversations._cache.pop(conversation_id, None)
        self.latest[conversation_id] = state

    def test_sendencrypted_to_a_plaintext_conversation(self):
        hub = make_hub(self, clock=self.clock, store=self.hub.store, plaintext="allowed")
        alice = Connection(hub)
        self.ok(alice, commands.Login, username="alice", password=PASSWORD, device_id=self.alice_laptop.id.hex())
        plain = self.ok(alice, commands.CreateConversation, members=["bob"], encrypted=False)["conversation_id"]
        sealed = self.seal(self.alice_laptop, plain, self.everyone[:2], members=bytes(32))
        failure = self.failureResultOf(
            alice.call(commands.SendEncrypted, **self.send(alice, plain, sealed)), NotAllowed
        )
        self.assertIn("not end-to-end encrypted", str(failure.value))
        self.failureResultOf(alice.call(commands.HistoryEncrypted, conversation_id=plain), NotAllowed)

    def test_the_message_rate_limit_applies(self):
        for _ in range(Settings().message_burst):
            self.sent(self.alice, self.group_id, self.seal(self.alice_laptop, self.group_id, self.everyone))
        text = self.send_refused(RateLimited, self.seal(self.alice_laptop, self.group_id, self.everyone))
        self.assertIn("retry in", text)


class BodyLimitTests(Scene):
    settings = {"max_message_bytes": 300}

    def test_a_body_is_at_most_the_bucket_of_the_largest_message(self):
        self.assertEqual(body_limit(300), 512 + 16)
        self.assertEqual(body_limit(16384), 32768 + 16)
        self.assertEqual(body_limit(255), 256 + 16)
        largest = self.seal(self.alice_laptop, self.group_id, self.everyone, plaintext=b"x" * 300)
        self.assertEqual(len(largest.body), 528)
        self.sent(self.alice, self.group_id, largest)
        too_large = self.seal(self.alice_laptop, self.group_id, self.everyone, plaintext=b"x" * 600)
        text = self.refused(
            self.alice, MessageTooLarge, commands.SendEncrypted, **self.send(self.alice, self.group_id, too_large)
        )
        self.assertIn("528 bytes", text)


class RecipientLimitTests(Scene):
    settings = {"max_recipient_devices": 2}

    def test_at_most_max_recipient_devices_in_all(self):
        sealed = self.seal(self.alice_laptop, self.group_id, self.everyone)
        wraps = self.wraps(sealed)
        text = self.refused(
            self.alice, InvalidArgument, commands.SendEncrypted, **self.send(self.alice, self.group_id, sealed)
        )
        self.assertIn("at most 2 devices", text)
        self.ok(self.alice, commands.StageWraps, conversation_id=self.group_id, client_msg_id="big", wraps=wraps[:2])
        arguments = self.send(self.alice, self.group_id, sealed, client_msg_id="big", wraps=wraps[2:])
        text = self.refused(self.alice, InvalidArgument, commands.SendEncrypted, **arguments)
        self.assertIn("at most 2 devices", text)
        text = self.refused(
            self.alice,
            InvalidArgument,
            commands.StageWraps,
            conversation_id=self.group_id,
            client_msg_id="big",
            wraps=wraps[2:],
        )
        self.assertIn("at most 2 devices", text)


class MailboxTests(EncryptedTestCase):
    settings = {"max_pending": 2}

    def test_a_direct_conversation_holds_max_pending_for_its_recipient(self):
        laptop, phone = self.device("alice"), self.device("bob", "phone")
        alice = self.connect("alice", laptop)
        direct = self.create(alice, ["bob"])["conversation_id"]
        self.publish(alice, self.epoch1(direct, laptop, ["alice", "bob"], kind="direct"))
        for _ in range(2):
            self.sent(alice, direct, self.seal(laptop, direct, [phone]))
        failure = self.failureResultOf(
            alice.call(commands.SendEncrypted, **self.send(alice, direct, self.seal(laptop, direct, [phone]))),
            MailboxFull,
        )
        self.assertIn("2 messages are waiting", str(failure.value))
        bob = self.connect("bob", phone)
        self.settle(bob, alice)
        self.assertEqual(len(self.pushed(bob)), 2)
        self.sent(alice, direct, self.seal(laptop, direct, [phone]))


class StageTests(Scene):
    def stage(self, client_msg_id, wraps, conn=None, conversation_id=None):
        return self.ok(
            conn or self.alice,
            commands.StageWraps,
            conversation_id=conversation_id or self.group_id,
            client_msg_id=client_msg_id,
            wraps=wraps,
        )["staged"]

    def test_staged_and_sent_wraps_go_out_together(self):
        bob, carol = self.connect("bob", self.bob_phone), self.connect("carol", self.carol_laptop)
        sealed = self.seal(self.alice_laptop, self.group_id, self.everyone)
        wraps = self.wraps(sealed)
        self.assertEqual(self.stage("big", wraps[:1]), 1)
        self.assertEqual(self.stage("big", wraps[:2]), 2)  # a retried staging replaces, not adds
        self.sent(self.alice, self.group_id, sealed, client_msg_id="big", wraps=wraps[2:], staged=2)
        self.settle(bob, carol)
        [to_bob], [to_carol] = self.pushed(bob), self.pushed(carol)
        self.assertEqual(to_bob["wrap"], sealed.wraps[self.bob_phone.id])
        self.assertEqual(to_carol["wrap"], sealed.wraps[self.carol_laptop.id])
        self.assertEqual(len(self.wrap_rows()), 1)  # bob's laptop's, offline
        self.assertEqual(self.staged_rows(), [])

    def test_the_answer_names_members_with_a_device_left_out(self):
        """So a client that keeps device chains between messages knows whose to fetch again."""
        everyone = self.sent(self.alice, self.group_id, self.seal(self.alice_laptop, self.group_id, self.everyone))
        self.assertIsNone(everyone["missing"])
        one = self.sent(self.alice, self.group_id, self.seal(self.alice_laptop, self.group_id, [self.bob_laptop]))
        self.assertEqual(one["missing"], ["bob", "carol"])  # bob's phone, and carol's only device
        alice_phone = self.device("alice", "phone")  # the sender's own other device counts too ...
        own = self.sent(self.alice, self.group_id, self.seal(self.alice_laptop, self.group_id, self.everyone))
        self.assertEqual(own["missing"], ["alice"])
        self.revoke("bob", self.bob_laptop)  # ... and a revoked device no longer does
        staged = self.seal(self.alice_laptop, self.group_id, [alice_phone, self.bob_phone, self.carol_laptop])
        self.stage("left-out", self.wraps(staged)[:1])
        answer = self.sent(self.alice, self.group_id, staged, client_msg_id="left-out", wraps=self.wraps(staged)[1:], staged=1)
        self.assertIsNone(answer["missing"])
        again = self.sent(self.alice, self.group_id, staged, client_msg_id="left-out", wraps=self.wraps(staged)[1:], staged=1)
        self.assertIsNone(again["missing"])  # a resend: the first answer's place, nothing more

    def staged_rows(self):
        return self.successResultOf(
            self.hub.store._read("test", lambda txn: txn.execute("SELECT * FROM staged_wraps").fetchall())
        )

    def test_the_staged_count_tells_lost_wraps(self):
        sealed = self.seal(self.alice_laptop, self.group_id, self.everyone)
        wraps = self.wraps(sealed)
        self.stage("m", wraps[:2])
        self.wait(Settings().staging_timeout + 1, self.alice, self.bob_watch)
        arguments = self.send(self.alice, self.group_id, sealed, client_msg_id="m", wraps=wraps[2:], staged=2)
        text = self.refused(self.alice, InvalidArgument, commands.SendEncrypted, **arguments)
        self.assertIn("0 wraps are staged for this message, not 2: stage them again", text)
        self.stage("m", wraps[:2])
        self.ok(self.alice, commands.SendEncrypted, **arguments)

    def test_a_device_staged_and_sent_again(self):
        sealed = self.seal(self.alice_laptop, self.group_id, self.everyone)
        wraps = self.wraps(sealed)
        self.stage("m", wraps[:2])
        arguments = self.send(self.alice, self.group_id, sealed, client_msg_id="m", wraps=wraps[1:])
        text = self.refused(self.alice, InvalidArgument, commands.SendEncrypted, **arguments)
        self.assertIn("staged wrap and another", text)

    def test_staged_wraps_are_checked_when_the_message_is_sent(self):
        dave_laptop = self.device("dave")
        sealed = self.seal(self.alice_laptop, self.group_id, [*self.everyone, dave_laptop])
        wraps = self.wraps(sealed)
        self.stage("m", wraps[3:])
        arguments = self.send(self.alice, self.group_id, sealed, client_msg_id="m", wraps=wraps[:3])
        self.refused(self.alice, NoSuchDevice, commands.SendEncrypted, **arguments)

    def test_staging_rules(self):
        sealed = self.seal(self.alice_laptop, self.group_id, self.everyone)
        wraps = self.wraps(sealed)
        other = self.group(self.alice, self.alice_laptop, ["bob"], "other")
        self.stage("m", wraps[:1])
        text = self.refused(
            self.alice, InvalidArgument, commands.StageWraps, conversation_id=other, client_msg_id="m", wraps=wraps[1:2]
        )
        self.assertIn("another conversation", text)
        arguments = self.send(self.alice, other, self.seal(self.alice_laptop, other, []), client_msg_id="m")
        self.refused(self.alice, InvalidArgument, commands.SendEncrypted, **arguments)
        self.sent(self.alice, self.group_id, sealed, client_msg_id="m", wraps=wraps[1:])
        text = self.refused(
            self.alice,
            InvalidArgument,
            commands.StageWraps,
            conversation_id=self.group_id,
            client_msg_id="m",
            wraps=wraps[:1],
        )
        self.assertIn("sent already", text)
        for bad in ([], [{**wraps[0], "wrap": bytes(90)}], wraps[:1] * 2):
            self.refused(
                self.alice,
                InvalidArgument,
                commands.StageWraps,
                conversation_id=self.group_id,
                client_msg_id="n",
                wraps=bad,
            )
        self.refused(
            self.alice,
            InvalidArgument,
            commands.StageWraps,
            conversation_id=self.group_id,
            client_msg_id="",
            wraps=wraps[:1],
        )

    def test_a_user_stages_for_a_few_messages_at_once(self):
        wraps = self.wraps(self.seal(self.alice_laptop, self.group_id, self.everyone))
        for number in range(MAX_STAGED_MESSAGES + 1):
            self.stage(f"m{number}", wraps[:1])
            self.wait(1, self.alice, self.bob_watch)
        held = {row[1] for row in self.staged_rows()}
        self.assertEqual(held, {f"m{number}" for number in range(1, MAX_STAGED_MESSAGES + 1)})


# -- delivery -----------------------------------------------------------------------------------


class DeliveryTests(Scene):
    settings = {"message_burst": 1000}

    def test_each_device_gets_only_its_own_wrap(self):
        phone = self.connect("bob", self.bob_phone)
        carol = self.connect("carol", self.carol_laptop)
        sealed = self.seal(self.alice_laptop, self.group_id, self.everyone)
        sent = self.sent(self.alice, self.group_id, sealed)
        self.settle(phone, carol, self.alice, self.bob_watch)
        for conn, device in ((phone, self.bob_phone), (carol, self.carol_laptop)):
            [push] = self.pushed(conn)
            self.assertEqual(
                push,
                {
                    "conversation_id": self.group_id,
                    "message_id": sent["message_id"],
                    "seq": 1,
                    "sender": "alice",
                    "sender_device": self.alice_laptop.id.hex(),
                    "sent_at": sent["sent_at"],
                    "header": sealed.header,
                    "body": sealed.body,
                    "wrap": sealed.wraps[device.id],
                    "signature": None,
                    "link": transcript.Receipt.from_bytes(sent["receipt"]).links[0].to_bytes(),
                    "receipt": sent["receipt"],  # (the same signed head covers it for everyone)
                },
            )
        self.assertEqual(self.pushed(self.alice), [])  # the sending session has its answer
        self.assertEqual(self.pushed(self.bob_watch), [])  # bound to no device: nothing of it
        self.assertEqual(self.pushed(self.bob_watch, "Deliver"), [])
        self.assertEqual(self.wrap_rows(), [("bob", self.bob_laptop.id.hex(), 1)])  # the answered wraps are gone
        receipts = [(r["username"], r["state"], r["seq"]) for r in self.pushed(self.alice, "Receipt")]
        self.assertEqual(sorted(receipts), [("bob", "delivered", 1), ("carol", "delivered", 1)])

    def test_acknowledged_wraps_are_deleted_within_ack_flush(self):
        """An answer marks the device's wraps for deletion; they are deleted, all devices' at once, ACK_FLUSH later."""
        phone = self.connect("bob", self.bob_phone)
        carol = self.connect("carol", self.carol_laptop)
        for n in range(3):
            sealed = self.seal(self.alice_laptop, self.group_id, self.everyone, plaintext=b"%d" % n)
            self.sent(self.alice, self.group_id, sealed)
        self.settle(phone, carol, self.alice)
        answered = {self.bob_phone.id.hex(), self.carol_laptop.id.hex()}

        def answered_rows():
            rows = self.successResultOf(self.hub.store._read("test", _wrap_rows))
            return sorted((device, seq) for _, device, seq in rows if device in answered)

        self.assertEqual(len(answered_rows()), 6)  # answered, still held
        self.clock.advance(ACK_FLUSH)
        self.assertEqual(answered_rows(), [])

    def test_an_offline_device_gets_its_wraps_at_its_next_login(self):
        phone = self.connect("bob", self.bob_phone)
        envelopes = [self.seal(self.alice_laptop, self.group_id, self.everyone, plaintext=b"%d" % n) for n in range(3)]
        for sealed in envelopes:
            self.sent(self.alice, self.group_id, sealed)
        self.settle(phone, self.alice)
        self.assertEqual([p["seq"] for p in self.pushed(phone)], [1, 2, 3])
        laptop = self.connect("bob", self.bob_laptop)  # the user's mark moved already: the device's wraps did not
        self.assertEqual(
            [(p["seq"], p["wrap"]) for p in self.pushed(laptop)],
            [(n + 1, sealed.wraps[self.bob_laptop.id]) for n, sealed in enumerate(envelopes)],
        )
        self.assertEqual([row[0] for row in self.wrap_rows()], ["carol"] * 3)
        again = self.connect("bob", self.bob_laptop)
        self.assertEqual(self.pushed(again), [])

    def test_the_senders_other_devices_get_their_wraps(self):
        alice_phone = self.device("alice", "phone")
        phone = self.connect("alice", alice_phone)
        other_laptop_session = self.connect("alice", self.alice_laptop)
        sealed = self.seal(self.alice_laptop, self.group_id, [*self.everyone, alice_phone])
        self.sent(self.alice, self.group_id, sealed)
        self.settle(phone, other_laptop_session, self.alice)
        [push] = self.pushed(phone)
        self.assertEqual((push["sender"], push["wrap"]), ("alice", sealed.wraps[alice_phone.id]))
        self.assertEqual(self.pushed(other_laptop_session), [])  # the sending device has no wrap
        self.assertNotIn("alice", [row[0] for row in self.wrap_rows()])

    def test_a_device_added_or_revoked_is_pushed_to_contacts_and_own_other_devices(self):
        """DevicesChanged: clients keep chains between messages and fetch this one before encrypting again."""
        carol = self.connect("carol", self.carol_laptop)
        bob_phone = self.connect("bob", self.bob_phone)
        dave = self.connect("dave", self.device("dave"))  # shares no conversation with bob
        self.settle(carol, bob_phone, dave, self.bob_watch, self.alice)
        before = {conn: len(self.pushed(conn, "DevicesChanged")) for conn in (carol, bob_phone, dave, self.bob_watch, self.alice)}
        tablet = self.device("bob", "tablet")
        self.revoke("bob", tablet)
        self.settle(carol, bob_phone, dave, self.bob_watch, self.alice)
        told = {conn: self.pushed(conn, "DevicesChanged")[before[conn]:] for conn in before}
        self.assertEqual(told[carol], [{"username": "bob"}] * 2)
        self.assertEqual(told[self.alice], [{"username": "bob"}] * 2)
        self.assertEqual(told[bob_phone], [{"username": "bob"}] * 2)  # (the publishing session itself is not told)
        self.assertEqual(told[dave], [])
        self.assertEqual(told[self.bob_watch], [])  # a version 1 session knows no devices

    def test_a_device_change_is_answered_even_if_its_contacts_cannot_be_told(self):
        self.patch(self.hub.store, "contacts_of", lambda username: defer.fail(StoreError("contacts_of: disk I/O error")))
        tablet = self.device("bob", "tablet")  # (PublishChainLink answered: the helper checks it)
        self.assertIn(tablet.id.hex(), [d["device_id"] for d in self.ok(self.connect("bob", self.bob_phone), commands.ListDevices)["devices"]])
        self.assertEqual(len(self.flushLoggedErrors(StoreError)), 1)

    def test_a_device_without_a_wrap_gets_nothing_and_delivery_goes_on(self):
        phone = self.connect("bob", self.bob_phone)
        self.sent(self.alice, self.group_id, self.seal(self.alice_laptop, self.group_id, [self.carol_laptop]))
        self.sent(self.alice, self.group_id, self.seal(self.alice_laptop, self.group_id, self.everyone))
        self.settle(phone)
        self.assertEqual([p["seq"] for p in self.pushed(phone)], [2])

    def test_unanswered_deliveries_come_again_after_a_drop(self):
        phone = self.connect("bob", self.bob_phone, answering=False)
        for _ in range(3):
            self.sent(self.alice, self.group_id, self.seal(self.alice_laptop, self.group_id, self.everyone))
        self.settle(phone)
        self.assertEqual(len(phone.unanswered), 3)
        phone.unanswered.pop(0).callback({})
        self.settle(phone)
        phone.drop()
        self.settle()
        phone_rows = [row[2] for row in self.wrap_rows() if row[1] == self.bob_phone.id.hex()]
        self.assertEqual(phone_rows, [2, 3])
        again = self.connect("bob", self.bob_phone)
        self.assertEqual([p["seq"] for p in self.pushed(again)], [2, 3])

    def test_the_window_bounds_unanswered_deliveries(self):
        phone = self.connect("bob", self.bob_phone, answering=False)
        window = Settings().delivery_window
        for _ in range(window + 5):
            self.sent(self.alice, self.group_id, self.seal(self.alice_laptop, self.group_id, self.everyone))
        self.settle(phone)
        self.assertEqual(len(phone.unanswered), window)
        while phone.unanswered:
            phone.unanswered.pop(0).callback({})
            self.settle(phone)
        self.assertEqual([p["seq"] for p in self.pushed(phone)], list(range(1, window + 6)))

    def test_a_new_member_gets_messages_from_when_they_joined(self):
        dave_laptop = self.device("dave")
        dave = self.connect("dave", dave_laptop)
        self.sent(self.alice, self.group_id, self.seal(self.alice_laptop, self.group_id, self.everyone))
        self.add(self.alice, self.group_id, ["dave"], self.alice_laptop)
        self.settle(dave)
        self.sent(self.alice, self.group_id, self.seal(self.alice_laptop, self.group_id, [*self.everyone, dave_laptop]))
        self.settle(dave)
        self.assertEqual([p["seq"] for p in self.pushed(dave)], [2])

    def test_who_left_gets_nothing_more(self):
        carol = self.connect("carol", self.carol_laptop)
        leave = self.next_state(self.group_id, "leave", ["alice", "bob"], self.carol_laptop)
        self.ok(carol, commands.LeaveConversation, conversation_id=self.group_id, membership=leave.to_bytes())
        self.latest[self.group_id] = leave
        text = self.refused(
            self.alice,
            NoSuchDevice,
            commands.SendEncrypted,
            **self.send(self.alice, self.group_id, self.seal(self.alice_laptop, self.group_id, self.everyone)),
        )
        self.assertIn(self.carol_laptop.id.hex(), text)
        self.sent(self.alice, self.group_id, self.seal(self.alice_laptop, self.group_id, self.everyone[:2]))
        self.settle(carol)
        self.assertEqual(self.pushed(carol), [])

    def test_a_revoked_devices_wraps_are_deleted(self):
        self.sent(self.alice, self.group_id, self.seal(self.alice_laptop, self.group_id, self.everyone))
        self.revoke("bob", self.bob_laptop)
        self.assertNotIn(self.bob_laptop.id.hex(), [row[1] for row in self.wrap_rows()])

    def test_a_deleted_users_wraps_are_deleted(self):
        self.sent(self.alice, self.group_id, self.seal(self.alice_laptop, self.group_id, self.everyone))
        self.assertTrue(self.successResultOf(self.hub.store.delete_user("carol", NOW)))
        self.assertEqual({row[0] for row in self.wrap_rows()}, {"bob"})


class HistoryTests(Scene):
    def test_pages_with_this_devices_wrap_while_it_has_one(self):
        envelopes = [self.seal(self.alice_laptop, self.group_id, self.everyone, plaintext=b"%d" % n) for n in range(5)]
        sent = [self.sent(self.alice, self.group_id, sealed) for sealed in envelopes]
        phone = self.connect("bob", self.bob_phone)  # answers: its wraps are gone
        laptop = Connection(self.hub, answering=False)
        self.ok(laptop, commands.Login, username="bob", password=PASSWORD, device_id=self.bob_laptop.id.hex())
        newest = self.ok(laptop, commands.HistoryEncrypted, conversation_id=self.group_id, limit=2)
        self.assertTrue(newest["has_more"])
        self.assertEqual(
            newest["messages"],
            [
                {
                    "message_id": sent[n]["message_id"],
                    "seq": n + 1,
                    "sender": "alice",
                    "sender_device": self.alice_laptop.id.hex(),
                    "sent_at": sent[n]["sent_at"],
                    "header": envelopes[n].header,
                    "body": envelopes[n].body,
                    "wrap": envelopes[n].wraps[self.bob_laptop.id],
                    "signature": None,
                    "link": transcript.Receipt.from_bytes(sent[n]["receipt"]).links[0].to_bytes(),
                }
                for n in (3, 4)
            ],
        )
        older = self.ok(laptop, commands.HistoryEncrypted, conversation_id=self.group_id, before_seq=4)
        self.assertEqual(([m["seq"] for m in older["messages"]], older["has_more"]), ([1, 2, 3], False))
        self.settle(phone)
        self.clock.advance(ACK_FLUSH)  # the answered wraps are deleted
        answered = self.ok(phone, commands.HistoryEncrypted, conversation_id=self.group_id)
        self.assertEqual([m["wrap"] for m in answered["messages"]], [None] * 5)
        own = self.ok(self.alice, commands.HistoryEncrypted, conversation_id=self.group_id)
        self.assertEqual([m["body"] for m in own["messages"]], [sealed.body for sealed in envelopes])

    def test_limits_and_large_bodies(self):
        for bad in ({"limit": 0}, {"limit": 501}, {"before_seq": 0}):
            self.refused(self.alice, InvalidArgument, commands.HistoryEncrypted, conversation_id=self.group_id, **bad)
        for _ in range(4):
            sealed = self.seal(self.alice_laptop, self.group_id, self.everyone, plaintext=b"x" * 16384)
            self.sent(self.alice, self.group_id, sealed)
        page = self.ok(self.alice, commands.HistoryEncrypted, conversation_id=self.group_id)
        self.assertEqual(([m["seq"] for m in page["messages"]], page["has_more"]), ([4], True))


# -- what the server keeps ----------------------------------------------------------------------


class DatabaseTests(EncryptedTestCase):
    def test_no_plaintext_reaches_the_database(self):
        """The SQLite file and its WAL hold headers, bodies and wraps, never a message's text."""
        laptop, phone = self.device("alice"), self.device("bob", "phone")
        alice, bob = self.connect("alice", laptop), self.connect("bob", phone)
        conversation_id = self.group(alice, laptop, ["bob"], "secrets")
        for n in range(3):
            sealed = self.seal(laptop, conversation_id, [phone], plaintext=MARKER + b" %d" % n)
            self.assertNotIn(MARKER, sealed.header + sealed.body)
            self.sent(alice, conversation_id, sealed)
        sealed = self.seal(phone, conversation_id, [laptop], plaintext=MARKER * 100)
        self.sent(bob, conversation_id, sealed)
        self.settle(alice, bob)
        self.assertEqual(len(self.pushed(bob)), 3)
        self.successResultOf(self.hub.store.flush())
        [path] = [self.hub.store._pool.connargs[0]]
        found = {}
        for suffix in ("", "-wal"):
            if os.path.exists(path + suffix):
                with open(path + suffix, "rb") as f:
                    found[suffix] = f.read()
        self.assertIn("-wal", found)
        self.assertTrue(any(b"secrets" in data for data in found.values()))  # (titles are not secret: it is there)
        for suffix, data in found.items():
            self.assertNotIn(MARKER, data, f"plaintext in the database file{suffix}")
            self.assertNotIn(MARKER[:16], data, f"plaintext in the database file{suffix}")
        db = sqlite3.connect(path)
        try:
            self.assertEqual(db.execute("SELECT DISTINCT body FROM messages").fetchall(), [("",)])
        finally:
            db.close()


class Receiver(amp.AMP):
    """A client that answers pushes and hands over the first DeliverEncrypted it gets."""

    def __init__(self):
        super().__init__()
        self.delivered = defer.Deferred()

    @commands.DeliverEncrypted.responder
    def deliver_encrypted(self, **arguments):
        if not self.delivered.called:
            self.delivered.callback(arguments)
        return {}

    @commands.ConversationUpdated.responder
    def conversation_updated(self, **arguments):
        return {}


class DaemonTests(unittest.TestCase):
    """The daemon as `twistd securechatd` builds it, over real TLS: its defaults, signatures checked in a thread."""

    @defer.inlineCallbacks
    def test_the_default_daemon_refuses_plaintext_and_relays_encrypted_messages(self):
        from twisted.internet import reactor

        port, ca, _ = start_daemon(self, reactor, plaintext=Settings().plaintext)
        alice = yield connected_client(self, reactor, port, ca)
        bob = yield tls_connect(reactor, port, ca, protocol=Receiver())
        lost = when_lost(bob)
        self.addCleanup(lambda: (bob.transport.loseConnection(), lost)[1])
        laptop, phone = keys.Device.generate("alice"), keys.Device.generate("bob")
        for client, device in ((alice, laptop), (bob, phone)):
            yield client.callRemote(commands.Register, username=device.user, password=PASSWORD)
            yield client.callRemote(commands.Login, username=device.user, password=PASSWORD, device_id=device.id.hex())
            yield client.callRemote(commands.PublishChainLink, link=chain.first(device, "laptop").to_bytes())
        with self.assertRaises(NotAllowed):
            yield alice.callRemote(commands.CreateConversation, members=["bob"], encrypted=False)
        created = yield alice.callRemote(commands.CreateConversation, members=["bob"])
        self.assertTrue(created["encrypted"])
        conversation_id = created["conversation_id"]
        with self.assertRaises(NotAllowed):
            yield alice.callRemote(commands.SendMessage, conversation_id=conversation_id, client_msg_id="m", body="hi")
        state = State(conversation_id, 1, ZERO, "create", "direct", "", ["alice", "bob"], "alice", laptop.id, bytes(64))
        with self.assertRaises(BadSignature):
            yield alice.callRemote(
                commands.PublishMembership, conversation_id=conversation_id, membership=state.to_bytes()
            )
        state.signed(laptop)
        yield alice.callRemote(commands.PublishMembership, conversation_id=conversation_id, membership=state.to_bytes())
        sealed = envelope.seal(
            MARKER, conversation_id, state.hash(), "alice", laptop.id, 1, NOW * 1000, [phone.id], dummy_wrap
        )
        yield alice.callRemote(
            commands.SendEncrypted,
            conversation_id=conversation_id,
            client_msg_id="e1",
            header=sealed.header,
            body=sealed.body,
            wraps=[{"device_id": phone.id.hex(), "wrap": sealed.wraps[phone.id]}],
        )
        pushed = yield bob.delivered
        self.assertEqual((pushed["header"], pushed["body"]), (sealed.header, sealed.body))
        self.assertEqual(pushed["wrap"], sealed.wraps[phone.id])
        page = yield bob.callRemote(commands.HistoryEncrypted, conversation_id=conversation_id)
        [message] = page["messages"]
        self.assertEqual((message["header"], message["body"]), (sealed.header, sealed.body))


class LiveDeliveryAfterOwnMessagesTests(EncryptedTestCase):
    """A device behind in a conversation, whose user then writes there: its next message still comes live.

    (Its own messages carry no wrap for it, so only the pump can move it past
    them; once nothing was in flight, nothing started the pump and the
    message waited in the database until the next login.)
    """

    settings = {"message_burst": 1000}

    def test_a_message_after_ones_own_while_behind_is_pushed_live(self):
        laptop, phone = self.device("alice"), self.device("bob", "phone")
        alice = self.connect("alice", laptop, answering=False)
        bob = self.connect("bob", phone)
        cid = self.create(alice, ["bob"])["conversation_id"]
        self.publish(alice, self.epoch1(cid, laptop, ["alice", "bob"], kind="direct"))

        def bob_sends(count):
            for _ in range(count):
                self.sent(bob, cid, self.seal(phone, cid, [laptop]))
            self.settle(alice, bob)

        bob_sends(33)  # the window (32) is pushed; seq 33 waits: behind
        self.assertEqual(len(self.pushed(alice)), 32)
        self.sent(alice, cid, self.seal(laptop, cid, [phone]))  # seq 34, her own: no wrap for the laptop
        while alice.unanswered:
            alice.unanswered.pop(0).callback({})
            self.settle(alice, bob)
        self.assertEqual(self.pushed(alice)[-1]["seq"], 33)
        bob_sends(1)  # seq 35
        self.assertEqual(self.pushed(alice)[-1]["seq"], 35)
