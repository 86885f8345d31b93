"""The `attacks` workload: what hostile clients cost the daemon's memory.

Three peers from the hardening issue, each against a fresh daemon's RSS:
a never-ending box streamed before login, 10,000 pipelined Pings whose
answers are never read, and a logged-in user who stops reading while
messages keep coming for them. Each reports the daemon's peak RSS growth
and whether (and after how long) the connection was dropped.
"""

import struct
import time

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall, deferLater

from bench.clients import close_all, login_many
from bench.daemon import PASSWORD, memory_kb
from securechatd import commands
from securechatd.tls import client_options


def _pair(key, value):
    return struct.pack("!H", len(key)) + key + struct.pack("!H", len(value)) + value


class RawPeer(Protocol):
    """A TLS peer that writes what it is told and records when it was dropped."""

    def __init__(self):
        self.closed = defer.Deferred()

    def connectionLost(self, reason):
        self.closed.callback(time.perf_counter())


async def _raw(reactor, target):
    endpoint = wrapClientTLS(
        client_options(target.ca, "localhost"), TCP4ClientEndpoint(reactor, target.host, target.port)
    )
    return await connectProtocol(endpoint, RawPeer())


class PeakRss:
    def __init__(self, pid):
        self.pid, self.start, self.peak = pid, memory_kb(pid), memory_kb(pid)
        self._loop = LoopingCall(self._sample)
        self._loop.start(0.05)

    def _sample(self):
        self.peak = max(self.peak, memory_kb(self.pid))

    def stop(self):
        self._loop.stop()
        return {"rss_start_kb": self.start, "rss_growth_kb": self.peak - self.start}


async def _until_closed(reactor, peer, seconds):
    timeout = deferLater(reactor, seconds, lambda: None)
    done = await defer.DeferredList([peer.closed, timeout], fireOnOneCallback=True, consumeErrors=True)
    if not timeout.called:
        timeout.cancel()
    return done[1] == 0


async def endless_box(reactor, target, megabytes=50):
    """Stream unique key/value pairs with no box end, 64 KiB at a time, until dropped."""
    rss, peer = PeakRss(target.pid), await _raw(reactor, target)
    started, sent, chunk = time.perf_counter(), 0, 0
    while not peer.closed.called and sent < megabytes << 20:
        data = b"".join(_pair(b"k%d" % (chunk * 300 + i), b"v" * 200) for i in range(300))
        peer.transport.write(data)
        sent, chunk = sent + len(data), chunk + 1
        await deferLater(reactor, 0, lambda: None)
    dropped = await _until_closed(reactor, peer, 10)
    if not dropped:
        peer.transport.abortConnection()
    return {"dropped": dropped, "bytes_written": sent, "seconds": round(time.perf_counter() - started, 2), **rss.stop()}


async def pipelined_pings(reactor, target, count=10_000):
    """10,000 Pings sent at once, answers never read: the daemon must drop us, not buffer."""
    rss, peer = PeakRss(target.pid), await _raw(reactor, target)
    peer.transport.pauseProducing()  # read nothing: the server's answers back up
    started = time.perf_counter()
    for i in range(count):
        peer.transport.write(_pair(b"_command", b"Ping") + _pair(b"_ask", b"%d" % i) + b"\x00\x00")
    dropped = await _until_closed(reactor, peer, 30)
    if not dropped:
        peer.transport.abortConnection()
    return {"dropped": dropped, "pings": count, "seconds": round(time.perf_counter() - started, 2), **rss.stop()}


async def stalled_reader(reactor, target, tokens, messages=2000):
    """A logged-in user stops reading while another sends them `messages`."""
    clients, _, errors = await login_many(reactor, target, ["attacker", "sender"], 2, PASSWORD, tokens)
    reader, sender = clients["attacker"], clients["sender"]
    created = await sender.callRemote(commands.CreateConversation, members=["attacker"])
    reader.transport.pauseProducing()
    rss, started = PeakRss(target.pid), time.perf_counter()
    for i in range(messages):
        await sender.callRemote(
            commands.SendMessage,
            conversation_id=created["conversation_id"],
            client_msg_id=f"stall-{i}",
            body="x" * 1000,
        )
    figures = {"messages": messages, "seconds": round(time.perf_counter() - started, 2), **rss.stop()}
    reader.transport.resumeProducing()
    await close_all(reactor, [reader, sender])
    return figures


async def attacks(reactor, target, p):
    tokens = await target.seed(reactor, ["attacker", "sender"], True)
    await target.start(reactor)
    return {
        "endless_box_before_login": await endless_box(reactor, target),
        "pipelined_pings_unread": await pipelined_pings(reactor, target),
        "stalled_reader": await stalled_reader(reactor, target, tokens),
    }
