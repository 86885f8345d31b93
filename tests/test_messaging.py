"""Conversations, sending, delivery, receipts and history through the real protocol (iosim)."""

from dataclasses import replace
from twisted.internet import defer, task
from twisted.protocols import amp
from twisted.trial import unittest

from securechatd import commands
from securechatd.commands import (
    InvalidArgument,
    MessageTooLarge,
    NoSuchConversation,
    NoSuchUser,
    NotAllowed,
    AuthRequired,
)
from securechatd.store.base import StoreError
from tests.helpers import LIMITS, Connection, make_hub, settle

PASSWORD = "correct horse battery"


class MessagingTestCase(unittest.TestCase):
    """A hub with users alice, bob, carol registered; `connect` logs one in."""

    window = 32

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.hub = make_hub(self, clock=self.clock, delivery_window=self.window)
        setup = Connection(self.hub)
        for name in ("alice", "bob", "carol", "dave"):
            self.successResultOf(setup.call(commands.Register, username=name, password=PASSWORD))

    def connect(self, username, answering=True):
        conn = Connection(self.hub, answering=answering)
        self.successResultOf(conn.call(commands.Login, username=username, password=PASSWORD))
        self.settle(conn)
        return conn

    def settle(self, *conns):
        settle(self.clock, conns)

    def ok(self, conn, command, **arguments):
        return self.successResultOf(conn.call(command, **arguments))

    def error(self, conn, error, command, **arguments):
        return self.failureResultOf(conn.call(command, **arguments), error)

    def dm(self, conn, other):
        return self.ok(conn, commands.CreateConversation, members=[other])["conversation_id"]

    def send(self, conn, conversation_id, body, client_msg_id=None):
        self._sent = getattr(self, "_sent", 0) + 1
        return self.ok(
            conn,
            commands.SendMessage,
            conversation_id=conversation_id,
            client_msg_id=client_msg_id or f"m{self._sent}",
            body=body,
        )

    def delivered(self, conn, conversation_id=None):
        return [
            (p["sender"], p["seq"], p["body"])
            for name, p in conn.pushes
            if name == "Deliver" and conversation_id in (None, p["conversation_id"])
        ]

    def pushed(self, conn, kind):
        return [p for name, p in conn.pushes if name == kind]


class SmokeTests(MessagingTestCase):
    def test_direct_message_delivered_with_receipt(self):
        alice, bob = self.connect("alice"), self.connect("bob")
        conversation = self.dm(alice, "bob")
        sent = self.send(alice, conversation, "hello bob")
        self.settle(alice, bob)
        self.assertEqual(sent["seq"], 1)
        self.assertEqual(self.delivered(bob), [("alice", 1, "hello bob")])
        receipts = self.pushed(alice, "Receipt")
        self.assertEqual(
            [(r["username"], r["state"], r["seq"]) for r in receipts], [("bob", "delivered", 1)]
        )


class ConversationTests(MessagingTestCase):
    def test_direct_conversation_is_created_once(self):
        alice, bob = self.connect("alice"), self.connect("bob")
        first = self.ok(alice, commands.CreateConversation, members=["Bob"])
        again = self.ok(bob, commands.CreateConversation, members=["alice"])
        self.assertEqual((first["created"], again["created"]), (True, False))
        self.assertEqual(first["conversation_id"], again["conversation_id"])
        self.settle(alice, bob)
        [update] = self.pushed(bob, "ConversationUpdated")
        self.assertEqual((update["kind"], update["members"]), ("direct", ["alice", "bob"]))
        self.assertEqual(self.pushed(alice, "ConversationUpdated"), [])

    def test_creator_other_sessions_hear_of_it(self):
        phone, laptop = self.connect("alice"), self.connect("alice")
        self.dm(phone, "bob")
        self.settle(phone, laptop)
        self.assertEqual(len(self.pushed(laptop, "ConversationUpdated")), 1)

    def test_group_with_title(self):
        alice, carol = self.connect("alice"), self.connect("carol")
        created = self.ok(alice, commands.CreateConversation, members=["bob", "carol", "bob"], title="Plans")
        self.settle(alice, carol)
        [update] = self.pushed(carol, "ConversationUpdated")
        self.assertEqual(update["conversation_id"], created["conversation_id"])
        self.assertEqual((update["kind"], update["title"]), ("group", "Plans"))
        self.assertEqual(update["members"], ["alice", "bob", "carol"])
        # a titled conversation with one other member is a group, not the direct one
        again = self.ok(alice, commands.CreateConversation, members=["carol"], title="Just us")
        self.assertNotEqual(again["conversation_id"], self.dm(alice, "carol"))

    def test_bad_members(self):
        alice = self.connect("alice")
        self.error(alice, InvalidArgument, commands.CreateConversation, members=[])
        self.error(alice, InvalidArgument, commands.CreateConversation, members=["alice"])
        self.error(alice, NoSuchUser, commands.CreateConversation, members=["bob", "zed"])
        self.error(alice, NoSuchUser, commands.CreateConversation, members=["not a name!"])
        self.error(alice, InvalidArgument, commands.CreateConversation, members=["bob"], title=" ")
        self.error(alice, InvalidArgument, commands.CreateConversation, members=["bob"], title="x" * 201)
        self.assertEqual(self.ok(alice, commands.ListConversations)["conversations"], [])

    def test_member_limit(self):
        self.hub.conversations.max_members = 3
        alice = self.connect("alice")
        self.error(alice, InvalidArgument, commands.CreateConversation, members=["bob", "carol", "dave"])
        group = self.ok(alice, commands.CreateConversation, members=["bob", "carol"], title="t")
        self.error(
            alice, InvalidArgument, commands.AddMembers, conversation_id=group["conversation_id"], members=["dave"]
        )

    def test_list_conversations(self):
        alice, bob = self.connect("alice"), self.connect("bob")
        direct = self.dm(alice, "bob")
        group = self.ok(alice, commands.CreateConversation, members=["carol"], title="C")["conversation_id"]
        self.send(bob, direct, "one")
        self.send(bob, direct, "two")
        self.send(alice, direct, "mine")
        listing = self.ok(alice, commands.ListConversations)
        self.assertFalse(listing["has_more"])
        rows = {row["conversation_id"]: row for row in listing["conversations"]}
        self.assertEqual(set(rows), {direct, group})
        self.assertEqual(
            (rows[direct]["kind"], rows[direct]["last_seq"], rows[direct]["unread"]), ("direct", 3, 2)
        )
        self.assertEqual((rows[group]["title"], rows[group]["members"]), ("C", ["alice", "carol"]))
        self.assertEqual([row["conversation_id"] for row in self.ok(bob, commands.ListConversations)["conversations"]], [direct])
        after = self.ok(alice, commands.ListConversations, after_id=direct)["conversations"]
        self.assertEqual([row["conversation_id"] for row in after], [group])

    def test_add_members(self):
        alice, dave = self.connect("alice"), self.connect("dave")
        group = self.ok(alice, commands.CreateConversation, members=["bob"], title="G")["conversation_id"]
        self.send(alice, group, "before dave")
        self.ok(alice, commands.AddMembers, conversation_id=group, members=["dave", "bob"])
        self.settle(alice, dave)
        [update] = self.pushed(dave, "ConversationUpdated")
        self.assertEqual(update["members"], ["alice", "bob", "dave"])
        self.send(alice, group, "after dave")
        self.settle(alice, dave)
        self.assertEqual(self.delivered(dave), [("alice", 2, "after dave")])
        [row] = self.ok(dave, commands.ListConversations)["conversations"]
        self.assertEqual(row["unread"], 1)

    def test_add_members_errors(self):
        alice, carol = self.connect("alice"), self.connect("carol")
        direct = self.dm(alice, "bob")
        self.error(alice, NotAllowed, commands.AddMembers, conversation_id=direct, members=["carol"])
        group = self.ok(alice, commands.CreateConversation, members=["bob"], title="G")["conversation_id"]
        self.error(alice, NoSuchUser, commands.AddMembers, conversation_id=group, members=["zed"])
        self.error(alice, InvalidArgument, commands.AddMembers, conversation_id=group, members=[])
        self.error(carol, NoSuchConversation, commands.AddMembers, conversation_id=group, members=["carol"])

    def test_leave(self):
        alice, bob = self.connect("alice"), self.connect("bob")
        group = self.ok(alice, commands.CreateConversation, members=["bob"], title="G")["conversation_id"]
        self.ok(bob, commands.LeaveConversation, conversation_id=group)
        self.send(alice, group, "anyone?")
        self.settle(alice, bob)
        self.assertEqual(self.delivered(bob), [])
        self.assertEqual(self.pushed(alice, "ConversationUpdated")[-1]["members"], ["alice"])
        self.error(bob, NoSuchConversation, commands.History, conversation_id=group)
        self.assertEqual(self.ok(bob, commands.ListConversations)["conversations"], [])
        self.error(bob, NotAllowed, commands.LeaveConversation, conversation_id=self.dm(bob, "alice"))

    def test_who_left_hears_no_receipts(self):
        alice, bob = self.connect("alice"), self.connect("bob")
        group = self.ok(alice, commands.CreateConversation, members=["bob"], title="G")["conversation_id"]
        self.send(alice, group, "before leaving")
        self.ok(alice, commands.LeaveConversation, conversation_id=group)
        self.settle(alice, bob)
        receipts_before = len(self.pushed(alice, "Receipt"))
        self.ok(bob, commands.MarkRead, conversation_id=group, seq=1)
        self.settle(alice, bob)
        self.assertEqual(len(self.pushed(alice, "Receipt")), receipts_before)

    def test_send_racing_leave_stores_nothing(self):
        alice = self.connect("alice")
        group = self.ok(alice, commands.CreateConversation, members=["bob"], title="G")["conversation_id"]
        self.successResultOf(self.hub.store.remove_member(group, "alice"))  # the leave committed first
        self.error(alice, NoSuchConversation, commands.SendMessage, conversation_id=group, client_msg_id="x", body="b")
        self.assertEqual(self.successResultOf(self.hub.store.messages_from(group, 1, 10)), [])

    def test_list_users(self):
        alice = self.connect("alice")
        self.connect("carol")
        users = self.ok(alice, commands.ListUsers)["users"]
        self.assertEqual(
            [(u["username"], u["status"]) for u in users],
            [("alice", "online"), ("bob", "offline"), ("carol", "online"), ("dave", "offline")],
        )
        self.assertEqual([u["username"] for u in self.ok(alice, commands.ListUsers, prefix="C")["users"]], ["carol"])
        self.assertEqual(len(self.ok(alice, commands.ListUsers, limit=2)["users"]), 2)
        for bad in (0, -1, 201):
            self.error(alice, InvalidArgument, commands.ListUsers, limit=bad)


class AccessTests(MessagingTestCase):
    def test_everything_needs_login(self):
        conn = Connection(self.hub)
        calls = [
            (commands.CreateConversation, {"members": ["bob"]}),
            (commands.ListConversations, {}),
            (commands.AddMembers, {"conversation_id": 1, "members": ["bob"]}),
            (commands.LeaveConversation, {"conversation_id": 1}),
            (commands.SendMessage, {"conversation_id": 1, "client_msg_id": "x", "body": "x"}),
            (commands.History, {"conversation_id": 1}),
            (commands.MarkRead, {"conversation_id": 1, "seq": 1}),
            (commands.GetReceipts, {"conversation_id": 1, "message_id": 1}),
            (commands.SetPresence, {"status": "away"}),
            (commands.GetPresence, {"usernames": ["bob"]}),
            (commands.ListUsers, {}),
        ]
        for command, arguments in calls:
            self.error(conn, AuthRequired, command, **arguments)

    def test_non_member_sees_no_conversation(self):
        alice, carol = self.connect("alice"), self.connect("carol")
        direct = self.dm(alice, "bob")
        sent = self.send(alice, direct, "private")
        calls = [
            (commands.SendMessage, {"client_msg_id": "c1", "body": "hi"}),
            (commands.History, {}),
            (commands.MarkRead, {"seq": 1}),
            (commands.GetReceipts, {"message_id": sent["message_id"]}),
            (commands.AddMembers, {"members": ["carol"]}),
            (commands.LeaveConversation, {}),
        ]
        for command, arguments in calls:
            theirs = self.error(carol, NoSuchConversation, command, conversation_id=direct, **arguments)
            missing = self.error(carol, NoSuchConversation, command, conversation_id=direct + 1000, **arguments)
            self.assertEqual(
                str(theirs.value).replace(str(direct), "N"), str(missing.value).replace(str(direct + 1000), "N")
            )
        self.assertEqual(self.ok(alice, commands.History, conversation_id=direct)["messages"][0]["body"], "private")


class SendTests(MessagingTestCase):
    def test_seq_numbers_per_conversation(self):
        alice, bob = self.connect("alice"), self.connect("bob")
        direct = self.dm(alice, "bob")
        group = self.ok(alice, commands.CreateConversation, members=["bob"], title="G")["conversation_id"]
        seqs = [
            self.send(alice, direct, "a")["seq"],
            self.send(bob, direct, "b")["seq"],
            self.send(alice, group, "c")["seq"],
            self.send(alice, direct, "d")["seq"],
        ]
        self.assertEqual(seqs, [1, 2, 1, 3])

    def test_body_limits(self):
        alice, bob = self.connect("alice"), self.connect("bob")
        direct = self.dm(alice, "bob")
        self.error(
            alice, MessageTooLarge, commands.SendMessage, conversation_id=direct, client_msg_id="big", body="é" * 8193
        )
        self.error(alice, InvalidArgument, commands.SendMessage, conversation_id=direct, client_msg_id="e", body="")
        self.assertEqual(self.send(alice, direct, "é" * 8192)["seq"], 1)
        self.settle(alice, bob)
        self.assertEqual(len(self.delivered(bob)), 1)

    def test_control_characters_are_refused(self):
        alice, bob = self.connect("alice"), self.connect("bob")
        direct = self.dm(alice, "bob")
        for bad in ("nul\x00here", "bell\x07", "escape \x1b[2J", "c1 \x9b"):
            self.error(alice, InvalidArgument, commands.SendMessage, conversation_id=direct, client_msg_id="c", body=bad)
        self.assertEqual(self.send(alice, direct, "two lines\n\tand a tab, ok 👍")["seq"], 1)
        self.settle(alice, bob)
        self.assertEqual([body for _, _, body in self.delivered(bob)], ["two lines\n\tand a tab, ok 👍"])

    def test_client_msg_id_rules(self):
        alice = self.connect("alice")
        direct = self.dm(alice, "bob")
        for bad in ("", "x" * 65):
            self.error(alice, InvalidArgument, commands.SendMessage, conversation_id=direct, client_msg_id=bad, body="b")
        self.send(alice, direct, "ok", client_msg_id="x" * 64)

    def test_resend_is_idempotent(self):
        alice, bob = self.connect("alice"), self.connect("bob")
        direct = self.dm(alice, "bob")
        first = self.send(alice, direct, "once", client_msg_id="same")
        again = self.send(alice, direct, "once", client_msg_id="same")
        self.assertEqual(first, again)
        self.settle(alice, bob)
        self.assertEqual(self.delivered(bob), [("alice", 1, "once")])
        self.assertEqual(self.send(alice, direct, "next")["seq"], 2)

    def test_bad_ids(self):
        alice = self.connect("alice")
        self.error(alice, InvalidArgument, commands.SendMessage, conversation_id=0, client_msg_id="x", body="b")
        self.error(alice, InvalidArgument, commands.History, conversation_id=2**63)
        self.error(alice, InvalidArgument, commands.MarkRead, conversation_id=1, seq=2**64)
        self.error(alice, NoSuchConversation, commands.SendMessage, conversation_id=999, client_msg_id="x", body="b")


class DeliveryTests(MessagingTestCase):
    window = 4

    def test_own_messages_are_not_pending_for_their_sender(self):
        alice = self.connect("alice")
        direct = self.dm(alice, "bob")
        for i in range(5):
            self.send(alice, direct, f"m{i}")
        [membership] = self.successResultOf(self.hub.store.memberships("alice"))
        self.assertEqual((membership.delivered_seq, membership.read_seq, membership.last_seq), (5, 5, 5))
        [bobs] = self.successResultOf(self.hub.store.memberships("bob"))
        self.assertEqual(bobs.delivered_seq, 0)

    def test_a_backlog_is_read_half_a_window_at_a_time(self):
        alice = self.connect("alice")
        direct = self.dm(alice, "bob")
        for i in range(20):
            self.send(alice, direct, f"m{i}")
        reads = []
        real = self.hub.store.messages_from

        def messages_from(conversation_id, first_seq, limit):
            reads.append(limit)
            return real(conversation_id, first_seq, limit)

        self.patch(self.hub.store, "messages_from", messages_from)
        bob = self.connect("bob")
        for _ in range(20):
            self.settle(bob)
        self.assertEqual([seq for _, seq, _ in self.delivered(bob)], list(range(1, 21)))
        self.assertGreaterEqual(min(reads), self.window // 2)  # not one read per answer

    def test_carbons_to_the_senders_other_sessions(self):
        phone, laptop, bob = self.connect("alice"), self.connect("alice"), self.connect("bob")
        direct = self.dm(phone, "bob")
        self.send(phone, direct, "from phone")
        self.send(bob, direct, "from bob")
        self.settle(phone, laptop, bob)
        self.assertEqual(self.delivered(laptop), [("alice", 1, "from phone"), ("bob", 2, "from bob")])
        self.assertEqual(self.delivered(phone), [("bob", 2, "from bob")])
        # copies of her own message answered by alice's laptop move no mark: no receipt for alice
        self.assertEqual([r["username"] for r in self.pushed(bob, "Receipt")], ["alice"])

    def test_offline_messages_arrive_in_order_after_login(self):
        alice = self.connect("alice")
        direct = self.dm(alice, "bob")
        group = self.ok(alice, commands.CreateConversation, members=["bob"], title="G")["conversation_id"]
        for i in range(10):
            self.send(alice, direct if i % 2 else group, f"m{i}")
        bob = Connection(self.hub)
        self.successResultOf(bob.call(commands.Login, username="bob", password=PASSWORD))
        self.assertEqual(self.delivered(bob), [])  # nothing before the Login answer
        self.settle(bob)
        self.assertEqual([seq for _, seq, _ in self.delivered(bob, direct)], [1, 2, 3, 4, 5])
        self.assertEqual([seq for _, seq, _ in self.delivered(bob, group)], [1, 2, 3, 4, 5])
        bob.drop()
        again = self.connect("bob")
        self.assertEqual(self.delivered(again), [])  # answered once: not pending any more

    def test_window_bounds_unanswered_delivers(self):
        alice, bob = self.connect("alice"), self.connect("bob", answering=False)
        direct = self.dm(alice, "bob")
        for i in range(10):
            self.send(alice, direct, f"m{i}")
        self.settle(alice, bob)
        self.assertEqual([seq for _, seq, _ in self.delivered(bob)], [1, 2, 3, 4])
        [session] = self.hub.registry.sessions_of("bob")
        self.assertEqual(session.outbox.in_flight, 4)
        for answer in bob.unanswered:
            answer.callback({})
        bob.unanswered.clear()
        self.settle(alice, bob)
        self.assertEqual([seq for _, seq, _ in self.delivered(bob)], list(range(1, 9)))

    def test_unanswered_delivers_come_again_after_a_drop(self):
        alice, bob = self.connect("alice"), self.connect("bob", answering=False)
        direct = self.dm(alice, "bob")
        for i in range(3):
            self.send(alice, direct, f"m{i}")
        self.settle(alice, bob)
        bob.unanswered.pop(0).callback({})  # only the first is answered
        self.settle(alice, bob)
        bob.drop()
        again = self.connect("bob")
        self.assertEqual([seq for _, seq, _ in self.delivered(again)], [2, 3])

    def test_error_answer_ends_the_session(self):
        alice, bob = self.connect("alice"), self.connect("bob", answering=False)
        direct = self.dm(alice, "bob")
        self.send(alice, direct, "refused")
        self.settle(alice, bob)
        bob.unanswered.pop().errback(amp.RemoteAmpError(b"CLIENT_BUG", "cannot show it"))
        self.settle(alice, bob)
        self.assertTrue(bob.server.lost)  # the mark cannot pass a refused message
        self.send(alice, direct, "second")
        self.assertEqual(self.pushed(alice, "Receipt"), [])
        self.assertEqual([seq for _, seq, _ in self.delivered(self.connect("bob"))], [1, 2])

    def test_database_error_while_reading_backlog_is_retried(self):
        alice = self.connect("alice")
        direct = self.dm(alice, "bob")
        for i in range(3):
            self.send(alice, direct, f"m{i}")
        read, failures = self.hub.store.messages_from, []

        def failing_once(*args):
            if not failures:
                failures.append(args)
                return defer.fail(StoreError("database is locked"))
            return read(*args)

        self.hub.store.messages_from = failing_once
        bob = self.connect("bob")
        self.assertEqual(self.delivered(bob), [])
        self.clock.advance(1)
        self.settle(bob)
        self.assertEqual([seq for _, seq, _ in self.delivered(bob)], [1, 2, 3])

    def test_delivery_that_cannot_start_ends_the_session(self):
        self.hub.store.memberships = lambda username, device_id=None: defer.fail(StoreError("database is locked"))
        bob = self.connect("bob")
        self.flushLoggedErrors(StoreError)
        self.assertTrue(bob.server.lost)

    def test_receipts_wait_for_an_offline_sender(self):
        alice = self.connect("alice")
        direct = self.dm(alice, "bob")
        self.send(alice, direct, "one")
        self.send(alice, direct, "two")
        alice.drop()
        bob = self.connect("bob")
        self.ok(bob, commands.MarkRead, conversation_id=direct, seq=1)
        back = Connection(self.hub)
        self.successResultOf(back.call(commands.Login, username="alice", password=PASSWORD))
        self.settle(back)
        receipts = [(r["username"], r["state"], r["seq"]) for r in self.pushed(back, "Receipt")]
        self.assertEqual(receipts, [("bob", "delivered", 2), ("bob", "read", 1)])
        back.drop()
        self.assertEqual(self.pushed(self.connect("alice"), "Receipt"), [])


class ReceiptTests(MessagingTestCase):
    def setUp(self):
        super().setUp()
        self.alice, self.bob, self.bob2 = self.connect("alice"), self.connect("bob"), self.connect("bob")
        self.direct = self.dm(self.alice, "bob")
        for i in range(3):
            self.send(self.alice, self.direct, f"m{i}")
        self.settle(self.alice, self.bob, self.bob2)

    def receipts(self, conn, state):
        return [r["seq"] for r in self.pushed(conn, "Receipt") if r["state"] == state]

    def test_mark_read(self):
        self.ok(self.bob, commands.MarkRead, conversation_id=self.direct, seq=2)
        self.settle(self.alice, self.bob, self.bob2)
        self.assertEqual(self.receipts(self.alice, "read"), [2])
        self.assertEqual(self.receipts(self.bob2, "read"), [2])
        self.assertEqual(self.receipts(self.bob, "read"), [])
        [row] = self.ok(self.bob2, commands.ListConversations)["conversations"]
        self.assertEqual(row["unread"], 1)

    def test_never_backwards_and_clamped(self):
        self.ok(self.bob, commands.MarkRead, conversation_id=self.direct, seq=2)
        self.ok(self.bob, commands.MarkRead, conversation_id=self.direct, seq=1)
        self.ok(self.bob, commands.MarkRead, conversation_id=self.direct, seq=999)
        self.settle(self.alice)
        self.assertEqual(self.receipts(self.alice, "read"), [2, 3])
        self.error(self.bob, InvalidArgument, commands.MarkRead, conversation_id=self.direct, seq=-1)

    def test_private_read_tells_only_my_devices(self):
        self.ok(self.bob, commands.MarkRead, conversation_id=self.direct, seq=3, private=True)
        self.settle(self.alice, self.bob2)
        self.assertEqual(self.receipts(self.alice, "read"), [])
        self.assertEqual(self.receipts(self.bob2, "read"), [3])

    def test_get_receipts(self):
        first = self.ok(self.alice, commands.History, conversation_id=self.direct)["messages"][0]
        self.clock.advance(5)
        self.ok(self.bob, commands.MarkRead, conversation_id=self.direct, seq=1)
        [row] = self.ok(
            self.alice, commands.GetReceipts, conversation_id=self.direct, message_id=first["message_id"]
        )["receipts"]
        self.assertEqual(row["username"], "bob")
        self.assertEqual(row["delivered_at"].timestamp(), 1_700_000_000)
        self.assertEqual(row["read_at"].timestamp(), 1_700_000_005)
        other = self.dm(self.alice, "carol")
        self.error(
            self.alice, InvalidArgument, commands.GetReceipts, conversation_id=other, message_id=first["message_id"]
        )


class HistoryTests(MessagingTestCase):
    def setUp(self):
        super().setUp()
        self.alice = self.connect("alice")
        self.direct = self.dm(self.alice, "bob")

    def history(self, **arguments):
        return self.ok(self.alice, commands.History, conversation_id=self.direct, **arguments)

    def test_pages_backwards_in_ascending_order(self):
        for i in range(7):
            self.send(self.alice, self.direct, f"m{i}")
        page = self.history(limit=3)
        self.assertEqual([m["seq"] for m in page["messages"]], [5, 6, 7])
        self.assertTrue(page["has_more"])
        page = self.history(limit=3, before_seq=5)
        self.assertEqual([m["seq"] for m in page["messages"]], [2, 3, 4])
        page = self.history(limit=3, before_seq=2)
        self.assertEqual(([m["seq"] for m in page["messages"]], page["has_more"]), ([1], False))
        self.assertEqual(page["messages"][0]["sender"], "alice")

    def test_limits(self):
        for bad in ({"limit": 0}, {"limit": 501}, {"before_seq": 0}):
            self.error(self.alice, InvalidArgument, commands.History, conversation_id=self.direct, **bad)
        self.assertEqual(self.history(), {"messages": [], "has_more": False})

    def test_large_bodies_are_cut_to_fit_amp(self):
        for i in range(10):
            self.send(self.alice, self.direct, chr(0x4E00 + i) * 5000)  # 15,000 bytes each
        seen, before = [], None
        while True:
            page = self.history(**({"before_seq": before} if before else {}))
            self.assertLessEqual(len(page["messages"]), 4)
            seen = [m["seq"] for m in page["messages"]] + seen
            if not page["has_more"]:
                break
            before = page["messages"][0]["seq"]
        self.assertEqual(seen, list(range(1, 11)))


class PresenceTests(MessagingTestCase):
    def setUp(self):
        super().setUp()
        self.bob = self.connect("bob")
        self.dm(self.bob, "alice")

    def changes(self):
        return [(p["username"], p["status"], p.get("note")) for p in self.pushed(self.bob, "PresenceChanged")]

    def test_a_session_can_start_away_or_invisible_and_is_never_shown_online(self):
        away = Connection(self.hub)
        answer = self.successResultOf(
            away.call(commands.Login, username="alice", password=PASSWORD, status="away", note="back at 3")
        )
        self.assertEqual(answer["max_message_bytes"], 16 * 1024)  # (so a client can check a body first)
        hidden = Connection(self.hub)
        self.successResultOf(hidden.call(commands.Login, username="carol", password=PASSWORD, status="invisible"))
        self.settle(self.bob, away, hidden)
        self.assertEqual(self.changes(), [("alice", "away", "back at 3")])

    def test_a_bad_initial_presence_is_refused_before_the_password_is_checked(self):
        conn = Connection(self.hub)
        for bad in (dict(status="sleepy"), dict(status="away", note="x" * 201), dict(note="a note alone")):
            self.failureResultOf(
                conn.call(commands.Login, username="alice", password="wrong password", **bad), InvalidArgument
            )
        self.successResultOf(conn.call(commands.Login, username="alice", password=PASSWORD))  # no failures counted

    def test_sessions_combine(self):
        phone, laptop = self.connect("alice"), self.connect("alice")
        self.ok(phone, commands.SetPresence, status="away", note="lunch")
        self.settle(self.bob)
        self.assertEqual(self.changes(), [("alice", "online", None)])  # laptop still online
        laptop.drop()
        self.settle(self.bob)
        self.assertEqual(self.changes()[-1], ("alice", "away", "lunch"))
        self.ok(phone, commands.SetPresence, status="invisible")
        self.settle(self.bob)
        self.assertEqual(self.changes()[-1], ("alice", "offline", None))
        [row] = self.ok(self.bob, commands.GetPresence, usernames=["alice"])["presence"]
        self.assertEqual((row["status"], row["last_seen"].timestamp()), ("offline", 1_700_000_000))

    def test_only_contacts_hear(self):
        carol = self.connect("carol")
        self.connect("alice")
        self.settle(carol, self.bob)
        self.assertEqual(self.pushed(carol, "PresenceChanged"), [])
        self.assertEqual(self.changes(), [("alice", "online", None)])

    def test_bad_presence_arguments(self):
        self.error(self.bob, InvalidArgument, commands.SetPresence, status="asleep")
        self.error(self.bob, InvalidArgument, commands.SetPresence, status="away", note="n" * 201)
        self.error(self.bob, NoSuchUser, commands.GetPresence, usernames=["zed"])
        self.error(self.bob, InvalidArgument, commands.GetPresence, usernames=[])

    def test_dead_connection_is_dropped(self):
        alice = self.connect("alice")
        self.settle(self.bob)
        for _ in range(3):  # alice's side goes silent: only bob's connection is pumped
            self.clock.advance(30)
            self.bob.pump.flush()
        self.assertTrue(alice.server.transport.disconnecting)
        alice.pump.flush()
        self.settle(self.bob)
        self.assertEqual(self.changes()[-1], ("alice", "offline", None))

    def test_live_connection_survives_quiet_periods(self):
        alice = self.connect("alice")
        for _ in range(10):
            self.clock.advance(30)
            alice.pump.flush()
            self.bob.pump.flush()
        self.assertFalse(alice.server.lost)
        self.assertEqual(self.ok(self.bob, commands.GetPresence, usernames=["alice"])["presence"][0]["status"], "online")


class RateLimitTests(MessagingTestCase):
    def test_burst_then_rate(self):
        alice = self.connect("alice")
        group = self.ok(alice, commands.CreateConversation, members=["bob", "carol", "dave"], title="G")
        group = group["conversation_id"]
        for i in range(30):  # a group message counts once, however many receive it
            self.send(alice, group, f"m{i}")
        refused = self.error(
            alice, commands.RateLimited, commands.SendMessage, conversation_id=group, client_msg_id="x", body="b"
        )
        self.assertIn("retry in 1 second", str(refused.value))
        self.assertEqual(self.ok(alice, commands.History, conversation_id=group, limit=500)["messages"][-1]["seq"], 30)
        self.clock.advance(0.1)
        self.assertEqual(self.send(alice, group, "one more")["seq"], 31)
        self.error(alice, commands.RateLimited, commands.SendMessage, conversation_id=group, client_msg_id="y", body="b")
        bob = self.connect("bob")
        self.send(bob, group, "bob has his own allowance")

    def test_resends_cost_nothing(self):
        alice = self.connect("alice")
        direct = self.dm(alice, "bob")
        for i in range(29):
            self.send(alice, direct, f"m{i}", client_msg_id=f"id{i}")
        for _ in range(5):
            self.send(alice, direct, "m0", client_msg_id="id0")  # lost answers, resent
        self.assertEqual(self.send(alice, direct, "the thirtieth")["seq"], 30)


class ActionLimitTests(MessagingTestCase):
    def test_presence_and_membership_changes_are_limited(self):
        alice = self.connect("alice")
        for i in range(20):
            self.ok(alice, commands.SetPresence, status="away" if i % 2 else "online")
        refused = self.error(alice, commands.RateLimited, commands.SetPresence, status="busy")
        self.assertIn("retry in 1 second", str(refused.value))
        self.error(alice, commands.RateLimited, commands.CreateConversation, members=["bob"])
        self.clock.advance(1)
        self.ok(alice, commands.CreateConversation, members=["bob"])

    def test_a_client_that_answers_no_push_is_dropped(self):
        alice = self.connect("alice")
        bob = Connection(self.hub, limits=replace(LIMITS, max_unanswered=5))
        self.successResultOf(bob.call(commands.Login, username="bob", password=PASSWORD))
        self.settle(bob)
        self.dm(alice, "bob")
        self.settle(alice, bob)
        bob.server.send_command = lambda encoded: defer.Deferred()  # never answered
        for status in ("away", "online", "busy", "online", "away"):
            self.ok(alice, commands.SetPresence, status=status)
        self.assertFalse(bob.server.transport.disconnecting)
        self.ok(alice, commands.SetPresence, status="online")
        self.assertTrue(bob.server.transport.disconnecting)

    def test_large_receipt_lists_come_in_pages(self):
        alice = self.connect("alice")
        direct = self.dm(alice, "bob")
        sent = self.send(alice, direct, "hi")
        page = self.ok(alice, commands.GetReceipts, conversation_id=direct, message_id=sent["message_id"])
        self.assertEqual(([r["username"] for r in page["receipts"]], page["has_more"]), (["bob"], False))
        after = self.ok(
            alice, commands.GetReceipts, conversation_id=direct, message_id=sent["message_id"], after="bob"
        )
        self.assertEqual(after["receipts"], [])

    def test_presence_note_is_limited_in_bytes(self):
        alice = self.connect("alice")
        self.error(alice, InvalidArgument, commands.SetPresence, status="away", note="😀" * 51)
        self.ok(alice, commands.SetPresence, status="away", note="😀" * 50)


class PendingLimitTests(MessagingTestCase):
    """At most max_pending messages wait for a recipient in one conversation (ejabberd's max_user_offline_messages)."""

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.hub = make_hub(self, clock=self.clock, max_pending=5, message_burst=100)
        setup = Connection(self.hub)
        for name in ("alice", "bob", "carol"):
            self.successResultOf(setup.call(commands.Register, username=name, password=PASSWORD))

    def test_a_direct_conversation_refuses_beyond_the_limit_until_the_recipient_catches_up(self):
        alice = self.connect("alice")
        direct = self.dm(alice, "bob")
        for i in range(5):
            self.send(alice, direct, f"m{i}")
        refused = self.error(
            alice, commands.MailboxFull, commands.SendMessage, conversation_id=direct, client_msg_id="x", body="b"
        )
        self.assertIn("5 messages are waiting", str(refused.value))
        self.assertNotIn(str(direct), str(refused.value))  # no internal ids in errors
        self.assertEqual(self.send(alice, direct, "m0", client_msg_id="m1")["seq"], 1)  # a resend is still answered
        bob = self.connect("bob")
        self.settle(alice, bob)
        self.assertEqual(len(self.delivered(bob)), 5)
        self.assertEqual(self.send(alice, direct, "after")["seq"], 6)

    def test_the_sender_can_still_answer_in_the_other_direction(self):
        alice, bob = self.connect("alice"), self.connect("bob", answering=False)
        direct = self.dm(alice, "bob")
        for i in range(5):
            self.send(alice, direct, f"m{i}")
        self.send(bob, direct, "bob may still write to alice")

    def test_a_group_member_back_after_too_many_gets_the_newest(self):
        alice = self.connect("alice")
        group = self.ok(alice, commands.CreateConversation, members=["bob", "carol"], title="G")["conversation_id"]
        for i in range(8):
            self.send(alice, group, f"m{i}")  # a group is never refused for one member's backlog
        bob = self.connect("bob")
        self.settle(alice, bob)
        self.assertEqual([seq for _, seq, _ in self.delivered(bob)], [4, 5, 6, 7, 8])
        history = self.ok(bob, commands.History, conversation_id=group)["messages"]
        self.assertEqual(len(history), 8)  # the older ones are in History


class AdministratorChangesTests(MessagingTestCase):
    """securechatd-admin writes the database from another process; the daemon's session check catches up."""

    def ended(self, conn):
        return conn.server.transport.disconnecting or conn.server.lost

    def test_a_deleted_account_loses_its_sessions_and_its_direct_conversation_closes(self):
        alice, bob = self.connect("alice"), self.connect("bob")
        direct = self.dm(alice, "bob")
        self.settle(alice, bob)
        self.successResultOf(self.hub.store.delete_user("bob", self.clock.seconds()))
        self.assertFalse(self.ended(bob))
        self.successResultOf(self.hub.check_sessions())
        self.assertTrue(self.ended(bob))
        self.settle(alice)
        [update] = [p for p in self.pushed(alice, "ConversationUpdated") if p["conversation_id"] == direct][-1:]
        self.assertEqual(update["members"], ["alice"])
        refused = self.error(
            alice, NotAllowed, commands.SendMessage, conversation_id=direct, client_msg_id="gone", body="hello?"
        )
        self.assertIn("account was deleted", str(refused.value))
        self.assertFalse(self.ended(alice))

    def test_a_password_changed_by_the_administrator_ends_the_sessions_but_not_its_own_change(self):
        alice, bob = self.connect("alice"), self.connect("bob")
        self.ok(alice, commands.ChangePassword, old_password=PASSWORD, new_password="a new one, long enough")
        self.successResultOf(self.hub.check_sessions())
        self.assertFalse(self.ended(alice))  # its own change moved its generation with it
        self.successResultOf(self.hub.store.set_password("bob", "$2b$04$" + "x" * 53, self.clock.seconds()))
        self.successResultOf(self.hub.check_sessions())
        self.assertTrue(self.ended(bob))
        self.assertFalse(self.ended(alice))
