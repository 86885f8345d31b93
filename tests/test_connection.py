"""Connection limits, driven with raw bytes where the case is about framing."""

import struct

from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from securechatd import commands
from securechatd.config import Settings
from securechatd.server.connection import ChatFactory, ConnectionLimits
from tests.helpers import LIMITS, Connection, make_hub, wall_now

PASSWORD = "correct horse battery"


def pair(key, value):
    return struct.pack("!H", len(key)) + key + struct.pack("!H", len(value)) + value


def box(**fields):
    return b"".join(pair(k.encode(), v) for k, v in fields.items()) + b"\x00\x00"


class RawConnection:
    """A ChatProtocol fed raw bytes over a StringTransport."""

    def __init__(self, hub, factory=None, address="10.0.0.1"):
        self.factory = factory or ChatFactory(hub, hub.clock, LIMITS)
        self.protocol = self.factory.buildProtocol(IPv4Address("TCP", address, 40000))
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", address, 40000))
        self.protocol.makeConnection(self.transport)

    def send(self, data):
        self.protocol.dataReceived(data)

    @property
    def dropped(self):
        return self.transport.disconnecting

    def buffered(self):
        """Bytes the parser holds for this connection: the partial box and unparsed input."""
        current = self.protocol._box or {}
        held = sum(len(k) + len(v) for k, v in current.items())
        return held + len(self.protocol._key or b"") + len(self.protocol._unparsed)

    def lose(self):
        self.protocol.connectionLost(Failure(ConnectionDone()))


class FramingTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.hub = make_hub(self, clock=self.clock)
        self.logged = []
        self.patch(
            __import__("securechatd.server.framing", fromlist=["log"]).log,
            "warn",
            lambda text, **fields: self.logged.append(text.format(**fields)),
        )

    def test_never_ending_box_before_login(self):
        conn = RawConnection(self.hub)
        for i in range(100_000):
            conn.send(pair(b"k%d" % i, b"v" * 200))
            if conn.dropped:
                break
        self.assertTrue(conn.dropped)
        self.assertLess(i, 40)
        self.assertLessEqual(conn.buffered(), 8 * 1024)
        self.assertEqual(len(self.logged), 1)

    def test_never_ending_box_in_large_records(self):
        conn = RawConnection(self.hub)
        stream = b"".join(pair(b"k%d" % i, b"v" * 1000) for i in range(1000))  # ~1 MB
        for start in range(0, len(stream), 16 * 1024):  # as TLS hands it over: 16 KiB records
            conn.send(stream[start : start + 16 * 1024])
        self.assertTrue(conn.dropped)
        self.assertLessEqual(conn.buffered(), 8 * 1024 + 16 * 1024)

    def test_boxes_split_anywhere(self):
        """However TCP and TLS cut the stream, each box is parsed once and answered in order."""
        pings = b"".join(box(_command=b"Ping", _ask=b"%d" % tag) for tag in range(1, 4))
        unknown = box(_command=b"Shout", _ask=b"4", words=b"x" * 300)
        stream = pings + unknown
        for size in (1, 2, 3, 7, 64, len(stream)):
            conn = RawConnection(self.hub)
            for start in range(0, len(stream), size):
                conn.send(stream[start : start + size])
            answers = conn.transport.value()
            self.assertEqual(answers.count(b"server_time"), 3, size)
            self.assertLess(answers.index(b"\x00\x07_answer\x00\x013"), answers.index(b"UNHANDLED"))
            self.assertFalse(conn.dropped)
            self.assertEqual(conn.buffered(), 0)

    def test_forty_keys_before_login(self):
        conn = RawConnection(self.hub)
        conn.send(b"".join(pair(b"k%d" % i, b"") for i in range(40)) + b"\x00\x00")
        self.assertTrue(conn.dropped)
        self.assertIn("too many keys", self.logged[0])

    def test_value_longer_than_the_budget_is_not_buffered(self):
        conn = RawConnection(self.hub)
        conn.send(struct.pack("!H", 4) + b"_ask" + struct.pack("!H", 60000) + b"x" * 100)
        self.assertTrue(conn.dropped)

    def test_junk(self):
        conn = RawConnection(self.hub)
        conn.send(b"\xff" * (1 << 20))
        self.assertTrue(conn.dropped)
        self.assertIn("beyond", self.logged[0])

    def test_key_over_255_bytes(self):
        conn = RawConnection(self.hub)
        conn.send(struct.pack("!H", 256) + b"k" * 256)
        self.assertTrue(conn.dropped)

    def test_box_neither_command_nor_answer(self):
        conn = RawConnection(self.hub)
        conn.send(box(hello=b"world"))
        self.assertTrue(conn.dropped)
        self.assertIn("neither a command nor an answer", self.logged[0])

    def test_answer_to_an_unknown_tag(self):
        conn = RawConnection(self.hub)
        conn.send(box(_answer=b"77"))
        self.assertTrue(conn.dropped)

    def test_unknown_command_keeps_connection(self):
        conn = RawConnection(self.hub)
        conn.send(box(_command=b"Shout", _ask=b"1"))
        self.assertFalse(conn.dropped)
        self.assertIn(b"UNHANDLED", conn.transport.value())

    def test_command_without_a_tag_gets_no_answer(self):
        conn = RawConnection(self.hub)
        conn.send(box(_command=b"Ping") + box(_command=b"Shout") + box(_command=b"Ping", _ask=b"9"))
        self.assertFalse(conn.dropped)
        answers = conn.transport.value()
        self.assertEqual(answers.count(b"server_time"), 1)  # only the tagged Ping is answered
        self.assertNotIn(b"UNHANDLED", answers)

    def test_push_to_a_connection_without_transport_fails_quietly(self):
        conn = RawConnection(self.hub)
        conn.protocol.transport = None  # (between losing the socket and being told so)
        pushed = conn.protocol.send_command(box(_command=b"Ping")[:-2])
        self.failureResultOf(pushed, ConnectionLost)

    def test_larger_boxes_after_login(self):
        conn = Connection(self.hub)
        self.successResultOf(conn.call(commands.Register, username="alice", password=PASSWORD))
        self.successResultOf(conn.call(commands.Register, username="bob", password=PASSWORD))
        self.successResultOf(conn.call(commands.Login, username="alice", password=PASSWORD))
        conversation = self.successResultOf(conn.call(commands.CreateConversation, members=["bob"]))
        sent = conn.call(
            commands.SendMessage,
            conversation_id=conversation["conversation_id"],
            client_msg_id="big",
            body="b" * 16 * 1024,
        )
        self.assertEqual(self.successResultOf(sent)["seq"], 1)

    def test_large_box_before_login_drops(self):
        conn = Connection(self.hub)
        self.failureResultOf(conn.call(commands.Login, username="alice", password="p" * 9000), ConnectionDone)
        self.assertTrue(conn.server.lost)
        self.assertIn("beyond the box's budget", self.logged[0])


class ConnectionLimitTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.hub = make_hub(self, clock=self.clock)

    def test_login_deadline_not_reset_by_slow_drip(self):
        conn = RawConnection(self.hub)
        for byte in box(_command=b"Ping", _ask=b"1")[:-1]:
            self.clock.advance(6)
            conn.send(bytes([byte]))
            if conn.dropped:
                break
        self.assertTrue(conn.dropped)
        self.assertEqual(self.clock.seconds(), 60)

    def test_login_cancels_the_deadline(self):
        conn = Connection(self.hub)
        self.successResultOf(conn.call(commands.Register, username="alice", password=PASSWORD))
        self.successResultOf(conn.call(commands.Login, username="alice", password=PASSWORD))
        for _ in range(4):
            self.clock.advance(20)
            conn.pump.flush()
        self.assertFalse(conn.server.lost)

    def test_unauthenticated_connections_per_address(self):
        factory = ChatFactory(self.hub, self.clock, ConnectionLimits.from_settings(Settings(), unauthenticated_per_address=3))
        address = IPv4Address("TCP", "10.0.0.9", 1)
        conns = [RawConnection(self.hub, factory, "10.0.0.9") for _ in range(3)]
        self.assertFalse(factory.admit(address))
        self.assertTrue(factory.admit(IPv4Address("TCP", "10.0.0.10", 1)))
        conns[0].lose()
        self.assertTrue(factory.admit(address))

    def test_global_cap(self):
        factory = ChatFactory(self.hub, self.clock, ConnectionLimits.from_settings(Settings(), max_connections=2))
        RawConnection(self.hub, factory, "10.0.0.1")
        RawConnection(self.hub, factory, "10.0.0.2")
        self.assertFalse(factory.admit(IPv4Address("TCP", "10.0.0.3", 1)))


class SlowReaderTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.hub = make_hub(self, clock=self.clock)

    def test_pipelined_pings_never_read(self):
        limits = ConnectionLimits.from_settings(Settings(), max_unread_output=64 * 1024)
        conn = RawConnection(self.hub, ChatFactory(self.hub, self.clock, limits))
        conn.transport.producer.pauseProducing()  # the kernel buffer is full: the client reads nothing
        for i in range(10_000):
            conn.send(box(_command=b"Ping", _ask=b"%d" % i))
            if conn.dropped:
                break
        self.assertTrue(conn.dropped)
        self.assertLessEqual(conn.protocol.unread_output, 64 * 1024 + 200)
        self.assertLess(len(conn.transport.value()), 64 * 1024 + 200)

    def test_write_stall(self):
        conn = RawConnection(self.hub)
        conn.transport.producer.pauseProducing()
        self.clock.advance(14)
        self.assertFalse(conn.dropped)
        self.clock.advance(1)
        self.assertTrue(conn.dropped)

    def test_stall_ends_when_the_client_reads(self):
        conn = RawConnection(self.hub)
        conn.transport.producer.pauseProducing()
        self.clock.advance(10)
        conn.transport.producer.resumeProducing()
        self.clock.advance(10)
        self.assertFalse(conn.dropped)

    def test_reads_pause_with_too_many_commands_in_flight(self):
        from twisted.internet.defer import Deferred

        limits = ConnectionLimits.from_settings(Settings(), commands_in_flight=4)
        conn = RawConnection(self.hub, ChatFactory(self.hub, self.clock, limits))
        held = []  # password hashes that have not finished
        self.hub.accounts.hasher._run = lambda f, *a: held.append((Deferred(), f, a)) or held[-1][0]

        def register(i):
            conn.send(box(_command=b"Register", _ask=b"%d" % i, username=b"user%d" % i, password=b"p" * 10))

        for i in range(4):
            register(i)
        # four in flight: reading goes on (the client's acknowledgements must still be read) ...
        self.assertEqual((conn.transport.producerState, conn.protocol.in_flight), ("producing", 4))
        for i in range(4, 8):
            register(i)
        # ... until as many wait behind them
        self.assertEqual((conn.transport.producerState, len(conn.protocol._waiting_commands)), ("paused", 4))
        done, f, a = held.pop(0)
        done.callback(f(*a))  # one finishes: a waiting command starts, and reading resumes
        self.assertEqual(conn.protocol.in_flight, 4)
        self.assertEqual((conn.transport.producerState, len(conn.protocol._waiting_commands)), ("producing", 3))


class FloodTests(unittest.TestCase):
    """A client that keeps sending what it was told to wait with is not read for a while."""

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.hub = make_hub(self, clock=self.clock)
        self.limits = ConnectionLimits.from_settings(Settings(), refusals_before_pause=10, refusal_pause=5.0)
        setup = Connection(self.hub)
        for name in ("alice", "bob"):
            self.successResultOf(setup.call(commands.Register, username=name, password=PASSWORD))
        self.conn = Connection(self.hub, limits=self.limits)
        self.successResultOf(self.conn.call(commands.Login, username="alice", password=PASSWORD))
        self.direct = self.successResultOf(self.conn.call(commands.CreateConversation, members=["bob"]))[
            "conversation_id"
        ]
        self.sent = 0
        self.reading = []  # what the server asked of the transport: (iosim's ignores it)
        transport = self.conn.server.transport
        transport.pauseProducing = lambda: self.reading.append("pause")
        transport.resumeProducing = lambda: self.reading.append("resume")

    def send(self):
        self.sent += 1
        return self.conn.call(
            commands.SendMessage, conversation_id=self.direct, client_msg_id=f"m{self.sent}", body="spam"
        )

    def refused_in_a_row(self, count):
        for _ in range(count):
            self.failureResultOf(self.send(), commands.RateLimited)

    def test_reads_pause_after_refusals_in_a_row_then_resume(self):
        for _ in range(30):  # the burst
            self.successResultOf(self.send())
        self.refused_in_a_row(9)
        self.assertEqual(self.reading, [])
        self.refused_in_a_row(1)
        self.assertEqual(self.reading, ["pause"])
        self.clock.advance(4.9)
        self.assertEqual(self.reading, ["pause"])
        self.clock.advance(0.1)
        self.assertEqual(self.reading, ["pause", "resume"])
        self.successResultOf(self.send())  # refilled meanwhile: the connection was never dropped

    def test_an_accepted_command_starts_the_count_again(self):
        for _ in range(30):
            self.successResultOf(self.send())
        self.refused_in_a_row(9)
        self.successResultOf(self.conn.call(commands.Ping))
        self.refused_in_a_row(9)
        self.assertEqual(self.reading, [])


class HandshakeTests(unittest.TestCase):
    """A connection that never finishes TLS is dropped at the login deadline, for that reason."""

    def test_a_stalled_handshake_is_logged_as_such(self):
        from twisted.logger import globalLogPublisher

        from securechatd import tls
        from securechatd.certs import ensure_dev_certs
        from securechatd.server.connection import AdmittingTLSFactory

        clock = task.Clock()
        hub = make_hub(self, clock=clock)
        certs = self.mktemp()
        ensure_dev_certs(certs, wall_now())
        factory = AdmittingTLSFactory(tls.server_options(certs), False, ChatFactory(hub, clock, LIMITS))
        logged = []
        observer = lambda event: logged.append(event.get("why"))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        protocol = factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 40000))
        protocol.makeConnection(transport)
        clock.advance(LIMITS.ping_after)  # a ping now would stall in TLS's buffer
        self.assertFalse(transport.disconnecting)
        clock.advance(LIMITS.login_deadline - LIMITS.ping_after)
        self.assertTrue(transport.disconnecting)
        self.assertIn("the TLS handshake did not finish within 60 s", logged)
