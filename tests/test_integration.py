"""The real daemon (tap.build) on 127.0.0.1 with several real TLS clients.

Each test starts the service as twistd would, registers users, and talks to
it through real TLS sockets, asserting on what the users' clients see: the
pushes they receive (Deliver, Receipt, PresenceChanged, ConversationUpdated)
and the answers to their commands. Waits are driven by the pushes
themselves (a Deferred that fires when an expected push has arrived), bounded
so that a missing push fails the test quickly with a summary of what did
arrive.
"""

import os
from datetime import datetime, timedelta, timezone

from twisted.internet import defer, reactor, task
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.protocols import amp
from twisted.trial import unittest

from securechatd import commands, config, tap
from securechatd.commands import NoSuchConversation
from tests.helpers import PUSHES, tls_connect

PASSWORD = "correct horse battery"
WAIT = 10  # seconds any one expected push may take before the test fails



def gather(deferreds):
    """All results, or the first failure (the others' failures are consumed)."""
    return defer.gatherResults(deferreds, consumeErrors=True)


class WaitTimeout(Exception):
    """An expected push did not arrive in time."""


def bounded(waited, seconds, what):
    """A new Deferred with `waited`'s result, or WaitTimeout after `seconds` (`waited` is left alone)."""
    result = Deferred()

    def timed_out():
        result.errback(WaitTimeout(f"no {what} within {seconds} s"))

    timer = reactor.callLater(seconds, timed_out)

    def done(outcome):
        if timer.active():
            timer.cancel()
            result.callback(outcome)
        return outcome

    waited.addBoth(done)
    return result


class ChatClient(amp.AMP):
    """A user's connection that records every push and answers it (its acknowledgement).

    The recorder attributes of tests.helpers.RecordingClient: `pushes` is a
    list of (command name, arguments); with `answering` False Deliver and
    the other pushes are left unanswered, their pending answers kept in
    `unanswered` as (name, arguments, Deferred). `wait_until` returns a
    Deferred that fires once a predicate over this client holds.
    """

    def __init__(self, username, answering=True):
        super().__init__()
        self.username = username
        self.answering = answering
        self.pushes = []
        self.unanswered = []
        self.pushes_at_login = None  # how many pushes had arrived when the login answer came
        self.lost = Deferred()
        self._waiters = []
        self._check = None

    def __repr__(self):
        return f"<ChatClient {self.username}>"

    # -- receiving pushes -----------------------------------------------------------

    def locateResponder(self, name):
        command = PUSHES.get(name)
        if command is None:
            return super().locateResponder(name)

        def respond(box):
            arguments = command.parseArguments(box, self)
            self.pushes.append((name.decode(), arguments))
            answer = Deferred()
            if command is commands.Ping:
                answer.callback({"server_time": datetime.now(timezone.utc)})
            elif self.answering:
                answer.callback({})
            else:
                self.unanswered.append((name.decode(), arguments, answer))
            if self._check is None:
                # checked on the next turn, after this answer has gone out
                self._check = reactor.callLater(0, self._check_waiters)
            return answer.addCallback(lambda result: command.makeResponse(result, self))

        return respond

    def answer(self, seq, conversation_id=None):
        """Answer the unanswered Deliver of `seq` (in `conversation_id`, if given)."""
        for index, (name, arguments, answer) in enumerate(self.unanswered):
            if (
                name == "Deliver"
                and arguments["seq"] == seq
                and conversation_id in (None, arguments["conversation_id"])
            ):
                del self.unanswered[index]
                answer.callback({})
                return
        raise AssertionError(f"{self} has no unanswered Deliver of seq {seq}")

    def connectionLost(self, reason):
        super().connectionLost(reason)
        if self._check is not None and self._check.active():
            self._check.cancel()
        self._check = None
        self._check_waiters()
        for _, _, what, result, timer in self._waiters:
            timer.cancel()
            result.errback(WaitTimeout(f"{self} lost its connection while waiting for {what}"))
        self._waiters = []
        self.lost.callback(None)

    # -- waiting ----------------------------------------------------------------------

    def wait_until(self, predicate, what, seconds=WAIT):
        """A Deferred firing with this client once `predicate(self)` is true."""
        result = Deferred()
        if predicate(self):
            result.callback(self)
            return result
        waiter = []
        timer = reactor.callLater(seconds, self._timed_out, waiter, seconds)
        waiter.extend([self, predicate, what, result, timer])
        self._waiters.append(waiter)
        return result

    def _check_waiters(self):
        self._check = None
        for waiter in list(self._waiters):
            _, predicate, _, result, timer = waiter
            if predicate(self):
                self._waiters.remove(waiter)
                timer.cancel()
                result.callback(self)

    def _timed_out(self, waiter, seconds):
        self._waiters.remove(waiter)
        _, _, what, result, _ = waiter
        result.errback(WaitTimeout(f"{self} got no {what} within {seconds} s; it got {self.summary()}"))

    def summary(self):
        kinds = {}
        for name, _ in self.pushes:
            kinds[name] = kinds.get(name, 0) + 1
        return f"{kinds}, last: {self.pushes[-3:]}"

    # -- what the user has seen ------------------------------------------------------------

    def pushed(self, kind):
        return [arguments for name, arguments in self.pushes if name == kind]

    def delivered(self, conversation_id=None):
        return [d for d in self.pushed("Deliver") if conversation_id in (None, d["conversation_id"])]

    def seqs(self, conversation_id=None):
        return [d["seq"] for d in self.delivered(conversation_id)]

    def bodies(self, conversation_id=None):
        return [d["body"] for d in self.delivered(conversation_id)]

    def receipts(self, conversation_id=None):
        return [
            (r["username"], r["state"], r["seq"])
            for r in self.pushed("Receipt")
            if conversation_id in (None, r["conversation_id"])
        ]

    def presence_of(self, username):
        return [p["status"] for p in self.pushed("PresenceChanged") if p["username"] == username]

    # -- common waits --------------------------------------------------------------------

    def wait_for_body(self, body, conversation_id=None):
        return self.wait_until(
            lambda c: body in c.bodies(conversation_id), f"Deliver of {body!r}"
        )

    def wait_for_delivers(self, count, conversation_id=None):
        return self.wait_until(
            lambda c: len(c.delivered(conversation_id)) >= count,
            f"{count} Delivers in conversation {conversation_id}",
        )

    def wait_for_receipt(self, username, state, seq, conversation_id=None):
        return self.wait_until(
            lambda c: any(
                r[:2] == (username, state) and r[2] >= seq for r in c.receipts(conversation_id)
            ),
            f"Receipt({username}, {state}, {seq})",
        )

    def wait_for_presence(self, username, statuses):
        return self.wait_until(
            lambda c: c.presence_of(username) == list(statuses),
            f"PresenceChanged of {username} {statuses}",
        )

    def wait_for_update(self, conversation_id, members):
        return self.wait_until(
            lambda c: any(
                u["conversation_id"] == conversation_id and sorted(u["members"]) == sorted(members)
                for u in c.pushed("ConversationUpdated")
            ),
            f"ConversationUpdated({conversation_id}, {members})",
        )


class ServiceTestCase(unittest.TestCase):
    """The daemon on 127.0.0.1:0 with its own certificates and database."""

    timeout = 60
    # The per-user message rate limit is not what these tests are about: they
    # send hundreds of messages in a moment.
    overrides = dict(  # (version 1's tests: plaintext, everyone's presence to see, no invitations)
        message_burst=100_000, message_rate=100_000.0, plaintext="allowed", presence_scope="everyone",
        invitations="off",
    )

    def setUp(self):
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        self.ca = os.path.join(base, "certs", "ca.pem")
        self.settings = config.Settings(
            interface="127.0.0.1",
            port=0,
            certs=os.path.join(base, "certs"),
            database=os.path.join(base, "chat.sqlite"),
            bcrypt_cost=10,
            **self.overrides,
        )
        daemon = tap.build(self.settings, reactor)
        listener = daemon.getServiceNamed("listener")
        # Note each server-side connection, to wait for its end in cleanup
        # (an open one would leave its keep-alive timer in the reactor).
        chat_factory = listener.factory.wrappedFactory
        self.server_side = {}
        build_protocol = chat_factory.buildProtocol

        def buildProtocol(address):
            protocol = build_protocol(address)
            lost = Deferred()
            connection_lost = protocol.connectionLost

            def connectionLost(reason):
                transport = protocol.transport
                connection_lost(reason)
                lost.callback(transport)

            protocol.connectionLost = connectionLost
            self.server_side[address.port] = (protocol, lost)
            return protocol

        chat_factory.buildProtocol = buildProtocol
        self.hub = chat_factory.hub  # only to hold the daemon at a point (see LoginWindowTests)
        daemon.startService()
        self.addCleanup(self._stop, daemon)
        self.port = listener.port.getHost().port

    @inlineCallbacks
    def _stop(self, daemon):
        """After every client closed: wait for the server's side of each, then stop."""
        for protocol, lost in list(self.server_side.values()):
            if not lost.called:
                try:
                    yield bounded(lost, 5, "server-side close")
                except WaitTimeout:
                    protocol.transport.abortConnection()
                    yield lost
        yield daemon.stopService()

    # -- users and connections ----------------------------------------------------------------

    @inlineCallbacks
    def connect(self, username="nobody", answering=True):
        """A TLS connection, closed (and waited for) at the end of the test."""
        client = ChatClient(username, answering)
        yield tls_connect(reactor, self.port, self.ca, protocol=client)
        client.local_port = client.transport.getHost().port
        self.addCleanup(self._close, client)
        return client

    def _close(self, client):
        if not client.lost.called:
            client.transport.loseConnection()
        return bounded(client.lost, 5, f"close of {client}")

    @inlineCallbacks
    def register(self, *usernames):
        setup = yield self.connect()
        yield gather(
            [setup.callRemote(commands.Register, username=n, password=PASSWORD) for n in usernames]
        )
        yield self.disconnect(setup)

    @inlineCallbacks
    def login(self, username, answering=True):
        """A new connection logged in as `username`; pushes_at_login notes what came before the answer."""
        client = yield self.connect(username, answering)
        answer = yield self.log_in(client)
        self.assertEqual(answer["username"], username)
        return client

    def log_in(self, client):
        def answered(answer):
            client.pushes_at_login = len(client.pushes)  # before any later box is read
            return answer

        return client.callRemote(
            commands.Login, username=client.username, password=PASSWORD, client_name="integration"
        ).addCallback(answered)

    @inlineCallbacks
    def disconnect(self, client):
        """Close `client`'s connection and wait until the server has seen it close too."""
        client.transport.loseConnection()
        yield bounded(client.lost, 5, f"close of {client}")
        _, server_lost = self.server_side[client.local_port]
        yield bounded(server_lost, 5, f"server-side close of {client}")

    # -- conversations and messages ------------------------------------------------------------

    @inlineCallbacks
    def create(self, client, members, title=None):
        answer = yield client.callRemote(commands.CreateConversation, members=members, title=title)
        return answer["conversation_id"]

    def send(self, client, conversation_id, body, client_msg_id=None):
        return client.callRemote(
            commands.SendMessage,
            conversation_id=conversation_id,
            client_msg_id=client_msg_id or body[:64],
            body=body,
        )

    @inlineCallbacks
    def send_many(self, client, conversation_id, bodies, in_flight=16):
        """Send `bodies` with up to `in_flight` unanswered at once; the answers, in order."""
        answers = [None] * len(bodies)
        work = iter(enumerate(bodies))

        @inlineCallbacks
        def worker():
            for index, body in work:
                answers[index] = yield self.send(client, conversation_id, body)

        yield gather([worker() for _ in range(in_flight)])
        return answers

    @inlineCallbacks
    def sentinel(self, sender, conversation_id, *receivers, body="sentinel"):
        """Send a last message and wait for every receiver to get it.

        Deliver comes in seq order per conversation, so once it is in, every
        earlier message of the conversation has arrived too (or never will).
        """
        sent = yield self.send(sender, conversation_id, body)
        yield gather(
            [r.wait_for_body(body, conversation_id) for r in receivers]
        )
        return sent

    @inlineCallbacks
    def poll(self, ask, ready, what, seconds=5):
        """Ask again every 10 ms until `ready(answer)`, for at most `seconds`."""
        for _ in range(int(seconds / 0.01)):
            answer = yield ask()
            if ready(answer):
                return answer
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.fail(f"no {what} within {seconds} s")

    @inlineCallbacks
    def barrier(self, client):
        """A round trip: every push the server wrote before it has arrived."""
        yield client.callRemote(commands.Ping)


def now():
    return datetime.now(timezone.utc)


class DeliveryTests(ServiceTestCase):
    @inlineCallbacks
    def test_live_delivery_then_read_receipts(self):
        yield self.register("alice", "bob")
        alice = yield self.login("alice")
        bob, bob_phone = yield gather([self.login("bob"), self.login("bob")])
        started = now() - timedelta(seconds=1)
        conversation = yield self.create(alice, ["bob"])
        yield bob.wait_for_update(conversation, ["alice", "bob"])
        yield bob_phone.wait_for_update(conversation, ["alice", "bob"])

        sent = yield self.send(alice, conversation, "hello bob")
        self.assertEqual(sent["seq"], 1)
        for session in (bob, bob_phone):
            yield session.wait_for_delivers(1, conversation)
            [deliver] = session.delivered()
            self.assertEqual(
                deliver,
                {
                    "message_id": sent["message_id"],
                    "conversation_id": conversation,
                    "seq": 1,
                    "sender": "alice",
                    "body": "hello bob",
                    "sent_at": sent["sent_at"],
                },
            )
        yield alice.wait_for_receipt("bob", "delivered", 1)
        listing = yield bob_phone.callRemote(commands.ListConversations)
        [row] = listing["conversations"]
        self.assertEqual((row["conversation_id"], row["last_seq"], row["unread"]), (conversation, 1, 1))

        yield bob.callRemote(commands.MarkRead, conversation_id=conversation, seq=1)
        yield alice.wait_for_receipt("bob", "read", 1)
        yield bob_phone.wait_for_receipt("bob", "read", 1)
        # both of bob's sessions answered the Deliver: still one delivered receipt
        self.assertEqual(alice.receipts(), [("bob", "delivered", 1), ("bob", "read", 1)])
        self.assertEqual(bob_phone.receipts(), [("bob", "read", 1)])
        self.assertEqual(bob.receipts(), [])  # the reading session is not told of itself
        self.assertEqual([d["seq"] for d in alice.delivered()], [])  # no copy to the sender's session
        listing = yield bob_phone.callRemote(commands.ListConversations)
        self.assertEqual(listing["conversations"][0]["unread"], 0)

        answer = yield alice.callRemote(
            commands.GetReceipts, conversation_id=conversation, message_id=sent["message_id"]
        )
        [receipt] = answer["receipts"]
        self.assertEqual(receipt["username"], "bob")
        self.assertTrue(started <= receipt["delivered_at"] <= receipt["read_at"] <= now(), receipt)
        [read_push] = alice.pushed("Receipt")[1:]
        self.assertEqual(read_push["at"], receipt["read_at"])

    @inlineCallbacks
    def test_offline_messages_pushed_in_order_after_login(self):
        yield self.register("alice", "bob")
        alice = yield self.login("alice")
        conversation = yield self.create(alice, ["bob"])
        bodies = [f"offline message {i}" for i in range(1, 51)]
        answers = yield self.send_many(alice, conversation, bodies)
        self.assertEqual(sorted(a["seq"] for a in answers), list(range(1, 51)))
        by_seq = {a["seq"]: (a["message_id"], body) for a, body in zip(answers, bodies)}
        yield self.disconnect(alice)

        bob = yield self.login("bob")
        self.assertEqual(bob.pushes_at_login, 0)  # nothing before the Login answer
        yield bob.wait_for_delivers(50)
        self.assertEqual(bob.seqs(), list(range(1, 51)))
        self.assertEqual(
            [(d["message_id"], d["body"]) for d in bob.delivered()], [by_seq[s] for s in range(1, 51)]
        )
        self.assertEqual({d["sender"] for d in bob.delivered()}, {"alice"})

        # bob's delivered mark reached 50 while alice was away
        yield self.poll(
            lambda: bob.callRemote(
                commands.GetReceipts, conversation_id=conversation, message_id=by_seq[50][0]
            ),
            lambda answer: answer["receipts"][0]["delivered_at"] is not None,
            "bob's delivered mark at 50",
        )
        alice = yield self.login("alice")
        self.assertEqual(alice.pushes_at_login, 0)
        yield alice.wait_for_receipt("bob", "delivered", 50)
        receipts = alice.receipts()
        self.assertEqual({r[:2] for r in receipts}, {("bob", "delivered")})
        self.assertEqual(receipts[-1], ("bob", "delivered", 50))
        self.assertEqual(alice.delivered(), [])  # her own old messages are not pushed back

        yield self.sentinel(alice, conversation, bob)
        self.assertEqual(bob.seqs(), list(range(1, 52)))  # exactly once each

    @inlineCallbacks
    def test_unanswered_delivers_come_again_after_drop(self):
        yield self.register("alice", "bob")
        alice, bob = yield gather([self.login("alice"), self.login("bob")])
        conversation = yield self.create(alice, ["bob"])
        yield self.send_many(alice, conversation, [f"answered {i}" for i in range(1, 6)], in_flight=1)
        yield bob.wait_for_delivers(5)
        yield alice.wait_for_receipt("bob", "delivered", 5)

        bob.answering = False
        yield self.send_many(alice, conversation, [f"unanswered {i}" for i in range(6, 11)], in_flight=1)
        yield bob.wait_for_delivers(10)
        self.assertEqual(len(bob.unanswered), 5)
        yield self.disconnect(bob)
        self.assertEqual(max(r[2] for r in alice.receipts()), 5)  # unanswered: no receipt

        bob = yield self.login("bob")
        yield bob.wait_for_delivers(5)
        yield self.sentinel(alice, conversation, bob, body="after the drop")
        self.assertEqual(bob.seqs(), list(range(6, 12)))
        self.assertEqual(bob.bodies()[:5], [f"unanswered {i}" for i in range(6, 11)])
        yield alice.wait_for_receipt("bob", "delivered", 11)

    @inlineCallbacks
    def test_answers_out_of_order_lose_nothing(self):
        """Answers may come in any order; everything from the first unanswered Deliver comes again.

        The delivered mark is one seq per user and conversation, so Delivers
        answered above a gap (2 and 4 here) are pushed again too: at least
        once, never lost; clients drop repeats by message_id.
        """
        yield self.register("alice", "bob")
        alice, bob = yield gather([self.login("alice"), self.login("bob", answering=False)])
        conversation = yield self.create(alice, ["bob"])
        yield self.send_many(alice, conversation, [f"message {i}" for i in range(1, 6)], in_flight=1)
        yield bob.wait_for_delivers(5)
        bob.answer(2)
        bob.answer(4)
        yield self.barrier(bob)
        yield self.disconnect(bob)

        bob = yield self.login("bob")
        yield self.sentinel(alice, conversation, bob, body="after the drop")
        self.assertEqual(bob.seqs(), [1, 2, 3, 4, 5, 6])

    @inlineCallbacks
    def test_carbons_between_sessions(self):
        yield self.register("alice", "bob")
        laptop, phone, bob = yield gather(
            [self.login("alice"), self.login("alice"), self.login("bob")]
        )
        conversation = yield self.create(laptop, ["bob"])
        yield phone.wait_for_update(conversation, ["alice", "bob"])

        yield self.send(laptop, conversation, "from the laptop")
        yield self.send(bob, conversation, "from bob")
        yield self.send(phone, conversation, "from the phone")
        yield self.sentinel(bob, conversation, laptop, phone, body="last from bob")
        yield bob.wait_for_body("from the phone")

        self.assertEqual(
            [(d["sender"], d["seq"], d["body"]) for d in laptop.delivered()],
            [("bob", 2, "from bob"), ("alice", 3, "from the phone"), ("bob", 4, "last from bob")],
        )
        self.assertEqual(
            [(d["sender"], d["seq"], d["body"]) for d in phone.delivered()],
            [("alice", 1, "from the laptop"), ("bob", 2, "from bob"), ("bob", 4, "last from bob")],
        )
        self.assertEqual(
            [(d["sender"], d["seq"], d["body"]) for d in bob.delivered()],
            [("alice", 1, "from the laptop"), ("alice", 3, "from the phone")],
        )
        # alice's own sessions' answers are not receipts: only bob's are
        yield laptop.wait_for_receipt("bob", "delivered", 3)
        yield phone.wait_for_receipt("bob", "delivered", 3)
        for session in (laptop, phone):
            self.assertEqual({r[:2] for r in session.receipts()}, {("bob", "delivered")})
        yield bob.wait_for_receipt("alice", "delivered", 4)
        self.assertEqual({r[:2] for r in bob.receipts()}, {("alice", "delivered")})

    @inlineCallbacks
    def test_resent_client_msg_id_stored_and_delivered_once(self):
        yield self.register("alice", "bob")
        alice, bob = yield gather([self.login("alice"), self.login("bob")])
        conversation = yield self.create(alice, ["bob"])
        first = yield self.send(alice, conversation, "hello", client_msg_id="same-id")
        again = yield self.send(alice, conversation, "hello", client_msg_id="same-id")
        changed = yield self.send(alice, conversation, "hello, edited", client_msg_id="same-id")
        self.assertEqual(first, again)
        self.assertEqual(first, changed)
        # both copies in flight at once
        twins = yield gather(
            [self.send(alice, conversation, "twin", client_msg_id="twin-id") for _ in range(2)]
        )
        self.assertEqual(twins[0], twins[1])
        self.assertEqual(twins[0]["seq"], 2)

        last = yield self.sentinel(alice, conversation, bob)
        self.assertEqual(
            [(d["seq"], d["message_id"], d["body"]) for d in bob.delivered()],
            [
                (1, first["message_id"], "hello"),
                (2, twins[0]["message_id"], "twin"),
                (3, last["message_id"], "sentinel"),
            ],
        )
        history = yield bob.callRemote(commands.History, conversation_id=conversation)
        self.assertEqual([m["body"] for m in history["messages"]], ["hello", "twin", "sentinel"])


class AccessTests(ServiceTestCase):
    @inlineCallbacks
    def test_non_member_cannot_tell_a_conversation_exists(self):
        yield self.register("alice", "bob", "carol")
        alice, bob, carol = yield gather(
            [self.login("alice"), self.login("bob"), self.login("carol")]
        )
        direct = yield self.create(alice, ["bob"])
        group = yield self.create(alice, ["bob"], title="just us")
        sent = yield self.send(alice, direct, "private")
        yield self.send(alice, group, "also private")
        yield bob.wait_for_delivers(2)
        missing = group + 1000

        def attempts(conversation_id):
            return [
                (commands.History, dict(conversation_id=conversation_id)),
                (commands.SendMessage, dict(conversation_id=conversation_id, client_msg_id="x", body="hi")),
                (commands.MarkRead, dict(conversation_id=conversation_id, seq=1)),
                (commands.GetReceipts, dict(conversation_id=conversation_id, message_id=sent["message_id"])),
                (commands.AddMembers, dict(conversation_id=conversation_id, members=["carol"])),
                (commands.LeaveConversation, dict(conversation_id=conversation_id)),
            ]

        @inlineCallbacks
        def refusal(command, arguments):
            try:
                yield carol.callRemote(command, **arguments)
            except NoSuchConversation as error:
                return str(error).replace(str(arguments["conversation_id"]), "<id>")
            self.fail(f"{command.__name__} {arguments} did not answer NO_SUCH_CONVERSATION")

        for conversation in (direct, group):
            for (command, theirs), (_, absent) in zip(attempts(conversation), attempts(missing)):
                said = yield refusal(command, theirs)
                said_absent = yield refusal(command, absent)
                self.assertEqual(said, said_absent, command.__name__)

        yield self.barrier(carol)  # the connection carried on
        listing = yield alice.callRemote(commands.ListConversations)
        self.assertEqual(
            [(c["conversation_id"], c["members"], c["last_seq"]) for c in listing["conversations"]],
            [(direct, ["alice", "bob"], 1), (group, ["alice", "bob"], 1)],
        )
        carols = yield carol.callRemote(commands.ListConversations)
        self.assertEqual(carols["conversations"], [])
        yield self.barrier(alice)
        yield self.barrier(bob)
        self.assertEqual(carol.pushes, [])
        self.assertNotIn("carol", [r[0] for r in alice.receipts()])
        self.assertEqual(len(bob.pushed("ConversationUpdated")), 2)  # the two creations only


class HistoryTests(ServiceTestCase):
    @inlineCallbacks
    def test_pages_of_large_messages_fit_an_amp_value(self):
        yield self.register("alice", "bob")
        alice = yield self.login("alice")
        conversation = yield self.create(alice, ["bob"])
        # 15,000 bytes of UTF-8 each (7,498 two-byte characters)
        bodies = [f"{i:02d}:x" + "\u00fc" * 7498 for i in range(1, 31)]
        self.assertEqual({len(b.encode("utf-8")) for b in bodies}, {15000})
        answers = yield self.send_many(alice, conversation, bodies, in_flight=4)
        body_of = {a["seq"]: body for a, body in zip(answers, bodies)}

        bob = yield self.login("bob")
        pages, before = [], None
        for _ in range(31):
            page = yield bob.callRemote(commands.History, conversation_id=conversation, before_seq=before)
            seqs = [m["seq"] for m in page["messages"]]
            self.assertTrue(seqs, f"empty page before {before}")
            self.assertEqual(seqs, sorted(seqs))
            self.assertEqual(seqs[-1], (before or 31) - 1)  # the newest ones before `before`
            pages.append(page)
            for message in page["messages"]:
                self.assertEqual(message["body"], body_of[message["seq"]])
                self.assertEqual(message["sender"], "alice")
            if not page["has_more"]:
                break
            before = seqs[0]
        seen = [m["seq"] for page in reversed(pages) for m in page["messages"]]
        self.assertEqual(seen, list(range(1, 31)))  # each exactly once
        self.assertGreater(len(pages), 7, "pages were not cut to fit 65,535 bytes")
        self.assertTrue(all(page["has_more"] for page in pages[:-1]))
        self.assertEqual(pages[-1]["messages"][0]["seq"], 1)

        small = yield bob.callRemote(commands.History, conversation_id=conversation, limit=2)
        self.assertEqual(([m["seq"] for m in small["messages"]], small["has_more"]), ([29, 30], True))
        yield bob.wait_for_delivers(30)  # and each arrived whole as a Deliver too
        self.assertEqual(bob.bodies(), [body_of[s] for s in range(1, 31)])


class GroupTests(ServiceTestCase):
    @inlineCallbacks
    def test_fan_out_joining_and_leaving(self):
        names = ("alice", "bob", "carol", "dave")
        yield self.register(*names)
        alice, bob, carol, dave = yield gather([self.login(n) for n in names])
        group = yield self.create(alice, ["bob", "carol"], title="plans")
        for member in (bob, carol):
            yield member.wait_for_update(group, ["alice", "bob", "carol"])
        [update] = bob.pushed("ConversationUpdated")
        self.assertEqual((update["kind"], update["title"]), ("group", "plans"))

        yield self.sentinel(bob, group, alice, carol, body="hi all")
        yield alice.callRemote(commands.AddMembers, conversation_id=group, members=["dave"])
        everyone = ["alice", "bob", "carol", "dave"]
        for member in (bob, carol, dave):
            yield member.wait_for_update(group, everyone)
        yield self.sentinel(carol, group, alice, bob, dave, body="welcome dave")
        yield self.sentinel(dave, group, alice, bob, carol, body="thanks")
        self.assertEqual([(d["seq"], d["body"]) for d in dave.delivered()], [(2, "welcome dave")])
        self.assertEqual(alice.bodies(), ["hi all", "welcome dave", "thanks"])
        self.assertEqual(bob.bodies(), ["welcome dave", "thanks"])
        self.assertEqual(carol.bodies(), ["hi all", "thanks"])
        self.assertEqual(alice.pushed("ConversationUpdated"), [])  # the one who acted is not told

        yield carol.callRemote(commands.LeaveConversation, conversation_id=group)
        for member in (alice, bob, dave):
            yield member.wait_for_update(group, ["alice", "bob", "dave"])
        sent = yield self.sentinel(alice, group, bob, dave, body="after carol left")
        yield self.barrier(carol)  # the fan-out had pushed to her before alice's answer
        self.assertEqual(carol.bodies(), ["hi all", "thanks"])
        with self.assertRaises(NoSuchConversation):
            yield carol.callRemote(commands.History, conversation_id=group)
        receipts = yield bob.callRemote(
            commands.GetReceipts, conversation_id=group, message_id=sent["message_id"]
        )
        self.assertEqual([r["username"] for r in receipts["receipts"]], ["bob", "dave"])
        yield alice.wait_for_receipt("dave", "delivered", 4)
        self.assertNotIn("carol", [r[0] for r in alice.receipts() if r[2] >= 4])


class PresenceTests(ServiceTestCase):
    @inlineCallbacks
    def presence(self, client, username):
        answer = yield client.callRemote(commands.GetPresence, usernames=[username])
        [row] = answer["presence"]
        return row

    @inlineCallbacks
    def test_status_combines_sessions(self):
        yield self.register("alice", "bob")
        bob = yield self.login("bob")
        yield self.create(bob, ["alice"])
        before = yield self.presence(bob, "alice")
        self.assertEqual((before["status"], before["last_seen"]), ("offline", None))

        laptop = yield self.login("alice")
        yield bob.wait_for_presence("alice", ["online"])
        phone = yield self.login("alice")
        yield laptop.callRemote(commands.SetPresence, status="away", note="lunch")
        row = yield self.presence(bob, "alice")
        self.assertEqual(row["status"], "online")  # the phone is still online

        yield phone.callRemote(commands.Logout)
        yield bob.wait_for_presence("alice", ["online", "away"])
        [_, away] = [p for p in bob.pushed("PresenceChanged") if p["username"] == "alice"]
        self.assertEqual(away["note"], "lunch")
        row = yield self.presence(bob, "alice")
        self.assertEqual((row["status"], row["note"]), ("away", "lunch"))

        yield self.disconnect(laptop)
        yield bob.wait_for_presence("alice", ["online", "away", "offline"])
        row = yield self.presence(bob, "alice")
        self.assertEqual(row["status"], "offline")
        self.assertIsNotNone(row["last_seen"])
        self.assertTrue(now() - timedelta(seconds=30) < row["last_seen"] <= now(), row)
        self.assertEqual(phone.pushed("PresenceChanged"), [])  # logged out: told nothing
        self.assertEqual(bob.presence_of("bob"), [])


class FlowControlTests(ServiceTestCase):
    @inlineCallbacks
    def test_stalled_client_holds_only_its_window(self):
        window = self.settings.delivery_window
        self.assertEqual(window, config.Settings().delivery_window)  # the default
        yield self.register("alice", "bob", "carol")
        alice, carol = yield gather([self.login("alice"), self.login("carol")])
        bob = yield self.login("bob", answering=False)
        with_bob = yield self.create(alice, ["bob"])
        with_carol = yield self.create(alice, ["carol"])
        carol_bob = yield self.create(carol, ["bob"])

        flood = self.send_many(alice, with_bob, [f"flood {i}" for i in range(1, 501)], in_flight=32)
        # meanwhile alice and carol chat, and carol writes to bob too
        yield self.sentinel(alice, with_carol, carol, body="carol, are you there?")
        yield self.sentinel(carol, with_carol, alice, body="yes, alice")
        yield self.send_many(carol, carol_bob, [f"carol to bob {i}" for i in range(1, 6)], in_flight=5)
        sent = yield flood
        self.assertEqual(sorted(a["seq"] for a in sent), list(range(1, 501)))
        self.assertEqual(carol.bodies(), ["carol, are you there?"])
        yield alice.wait_for_receipt("carol", "delivered", 1, with_carol)

        yield self.barrier(bob)
        self.assertEqual(len(bob.delivered()), window)
        self.assertEqual(len([u for u in bob.unanswered if u[0] == "Deliver"]), window)
        yield self.barrier(bob)
        self.assertEqual(len(bob.delivered()), window)  # and no more come
        self.assertEqual(alice.receipts(with_bob), [])

        yield self.disconnect(bob)
        bob = yield self.login("bob")
        yield bob.wait_for_delivers(500, with_bob)
        yield bob.wait_for_delivers(5, carol_bob)
        yield self.sentinel(alice, with_bob, bob, body="did you get it all?")
        self.assertEqual(bob.seqs(with_bob), list(range(1, 502)))
        body_by_seq = {answer["seq"]: f"flood {i}" for i, answer in enumerate(sent, 1)}
        self.assertEqual(bob.bodies(with_bob)[:500], [body_by_seq[s] for s in range(1, 501)])
        self.assertEqual(bob.bodies(carol_bob), [f"carol to bob {i}" for i in range(1, 6)])
        yield alice.wait_for_receipt("bob", "delivered", 501, with_bob)


class LoginWindowTests(ServiceTestCase):
    """Pushes to a user around their log-in, and pushes the client never acknowledged.

    The daemon is held, by a test double of its store's `add_resume_token`,
    after the password was checked and before the Login answer, so that
    what happens in that window is reproducible.
    """

    def hold_login(self):
        """(reached, release): `reached` fires when a Login waits on its token write."""
        store = self.hub.accounts.store
        original = store.add_resume_token
        reached, release = Deferred(), Deferred()

        def held(*arguments):
            store.add_resume_token = original
            reached.callback(None)
            return release.addCallback(lambda _: original(*arguments))

        self.patch(store, "add_resume_token", held)
        return reached, release

    @inlineCallbacks
    def alice_wrote_to_bob(self):
        yield self.register("alice", "bob")
        alice, bob = yield gather([self.login("alice"), self.login("bob")])
        conversation = yield self.create(alice, ["bob"])
        yield self.sentinel(alice, conversation, bob, body="read me")
        yield alice.wait_for_receipt("bob", "delivered", 1)
        return alice, bob, conversation

    @inlineCallbacks
    def test_receipt_while_logging_in_comes_after_the_answer(self):
        alice, bob, conversation = yield self.alice_wrote_to_bob()
        yield self.disconnect(alice)
        reached, release = self.hold_login()
        alice = yield self.connect("alice")
        logging_in = self.log_in(alice)
        yield reached  # the password is checked; the answer is not out yet
        yield bob.callRemote(commands.MarkRead, conversation_id=conversation, seq=1)
        yield self.barrier(bob)
        release.callback(None)
        yield logging_in
        yield alice.wait_until(lambda c: c.receipts(), "the read receipt", seconds=2)
        self.assertEqual(alice.receipts(), [("bob", "read", 1)])
        self.assertEqual(alice.pushes_at_login, 0, f"pushed before the Login answer: {alice.pushes}")


    @inlineCallbacks
    def test_receipt_not_lost_when_login_connection_drops(self):
        alice, bob, conversation = yield self.alice_wrote_to_bob()
        yield self.disconnect(alice)
        reached, release = self.hold_login()
        dropped = yield self.connect("alice")
        logging_in = self.log_in(dropped)
        logging_in.addErrback(lambda _: None)  # it never gets an answer
        yield reached
        yield self.disconnect(dropped)  # gone before its Login was answered
        yield bob.callRemote(commands.MarkRead, conversation_id=conversation, seq=1)
        release.callback(None)
        presence = yield bob.callRemote(commands.GetPresence, usernames=["alice"])
        self.assertEqual(presence["presence"][0]["status"], "offline")

        alice = yield self.login("alice")
        yield alice.wait_until(lambda c: c.receipts(), "the read receipt", seconds=2)
        self.assertEqual(alice.receipts(), [("bob", "read", 1)])


    @inlineCallbacks
    def test_unacknowledged_receipt_pushed_again(self):
        alice, bob, conversation = yield self.alice_wrote_to_bob()
        alice.answering = False
        yield bob.callRemote(commands.MarkRead, conversation_id=conversation, seq=1)
        yield alice.wait_for_receipt("bob", "read", 1)
        self.assertEqual([u[0] for u in alice.unanswered], ["Receipt"])
        yield self.disconnect(alice)  # the Receipt was never acknowledged

        alice = yield self.login("alice")
        yield alice.wait_until(lambda c: c.receipts(), "the read receipt again", seconds=2)
        self.assertEqual(alice.receipts(), [("bob", "read", 1)])

