"""The `flood` workload: logged-in users who send far faster than the message rate limit.

The daemon keeps its default message limits (KEEP_DEFAULT in __main__.py:
burst 30, 10 per second per user); every other limit is raised as usual.
A canary pair exchanges messages at a fixed rate the whole time, while
phases of `duration` seconds each bring 0, 1, 5, ... flooders (new users
each phase, so no phase starts with a spent token bucket). A flooder
pipelines pre-encoded SendMessage boxes into a conversation with an offline
user as fast as its connection takes them, keeping at most `outstanding`
unanswered: the cap bounds the generator, not the daemon (a daemon that
stops reading simply leaves them unanswered). Per phase: the canary's
send -> Deliver latency, the daemon's CPU, and what the flooders' commands
got: stored, refused RATE_LIMITED, another error, or no answer at all.
"""

import os
import time
from collections import Counter

from twisted.internet.task import LoopingCall

from bench.clients import BenchClient, login_many, sleep, wind_down
from bench.daemon import PASSWORD
from bench.measure import Meter, latency_figures
from bench.traffic import Traffic
from securechatd import commands

SINK = "floodsink"  # never logs in: what the flooders get stored waits for it
END = b"\x00\x00"


def _pair(key, value):
    return len(key).to_bytes(2, "big") + key + len(value).to_bytes(2, "big") + value


class Flooder(BenchClient):
    """A logged-in connection that writes SendMessage boxes whenever answers free room.

    Its tags ("flood-N") are not hexadecimal, so they never meet AMP's own;
    their answers are counted here and never reach AMP's request table.
    """

    def __init__(self):
        super().__init__()
        self.flooding = False
        self.sent = self.stored = self.refused = 0
        self.errors = Counter()

    def start_flood(self, conversation_id, outstanding):
        self._head = _pair(b"_command", b"SendMessage") + _pair(b"conversation_id", b"%d" % conversation_id)
        self._tail = _pair(b"body", b"flood") + END
        self._run = os.urandom(4).hex().encode()  # (sender, client_msg_id) is an idempotency key
        self.cap = outstanding
        self.flooding = True
        self._refill()

    def stop_flood(self):
        self.flooding = False

    @property
    def answered(self):
        return self.stored + self.refused + sum(self.errors.values())

    def _refill(self):
        if not self.flooding:
            return
        room = self.cap - (self.sent - self.answered)
        if room <= 0 or self.lost:
            return
        boxes = []
        for n in range(self.sent, self.sent + room):
            tag = b"flood-%d" % n
            boxes.append(self._head + _pair(b"_ask", tag) + _pair(b"client_msg_id", self._run + tag) + self._tail)
        self.sent += room
        self.transport.write(b"".join(boxes))

    def ampBoxReceived(self, box):
        tag = box.get(b"_answer") or box.get(b"_error")
        if tag is None or not tag.startswith(b"flood-"):
            return super().ampBoxReceived(box)
        if b"_answer" in box:
            self.stored += 1
        elif box.get(b"_error_code") == b"RATE_LIMITED":
            self.refused += 1
        else:
            self.errors[box.get(b"_error_code", b"?").decode()] += 1

    def dataReceived(self, data):
        super().dataReceived(data)
        self._refill()


def _pauses_logged(target):
    """How often the daemon logged a refusal pause (None for a daemon we did not start)."""
    path = getattr(target, "log_path", None)
    if path is None:
        return None
    with open(path, errors="replace") as f:
        return sum("commands refused in a row" in line for line in f)


async def flood(reactor, target, p):
    canary = ["canary0", "canary1"]
    phase_users = [[f"flood{phase}x{i}" for i in range(count)] for phase, count in enumerate(p.flooders)]
    everyone = [user for users in phase_users for user in users]
    await target.seed(reactor, [SINK], False)
    tokens = await target.seed(reactor, canary + everyone, True)
    await target.start(reactor)
    clients, _, errors = await login_many(reactor, target, canary, 2, PASSWORD, tokens)
    flooders, _, flooder_errors = await login_many(reactor, target, everyone, 20, PASSWORD, tokens, Flooder)
    errors.update(flooder_errors)
    timers, starts, phases = [], [], []
    try:
        if errors:
            raise RuntimeError(f"set-up logins failed: {dict(errors)}")
        created = await clients[canary[0]].callRemote(commands.CreateConversation, members=[canary[1]])
        conversation = {user: created["conversation_id"] for user in canary}
        sink_conversation = {}
        for user, client in flooders.items():
            answer = await client.callRemote(commands.CreateConversation, members=[SINK])
            sink_conversation[user] = answer["conversation_id"]
        traffic = Traffic(clients, conversation, dict(zip(canary, reversed(canary))), 1, None, p.window, closed_loop=False)
        skipped = []
        for i, user in enumerate(canary):
            timer = LoopingCall(lambda u=user: traffic.send_if_room(u) or skipped.append(time.perf_counter()))
            timer.clock = reactor
            timers.append(timer)
            starts.append(reactor.callLater(i / (p.rate * len(canary)), timer.start, 1.0 / p.rate))
        await sleep(reactor, 1.0)  # the canary settles
        for users in phase_users:
            active = [flooders[user] for user in users]
            meter = Meter(target.pid)
            meter.start()
            started = time.perf_counter()
            for user, client in zip(users, active):
                client.start_flood(sink_conversation[user], p.outstanding)
            await sleep(reactor, p.duration)
            for client in active:
                client.stop_flood()
            ended = time.perf_counter()
            figures = meter.stop(0)
            for client in active:
                if client.transport is not None:
                    client.transport.abortConnection()  # unanswered commands may wait in a paused socket
            phases.append((len(users), started, ended, figures, active))
            await sleep(reactor, 1.0)  # what the daemon still had to read is not the next phase's
    finally:
        await wind_down(reactor, starts, timers, list(clients.values()) + list(flooders.values()))

    def phase(count, start, end, figures, active):
        latencies = [lat for sent, lat in zip(traffic.send_times, traffic.latencies) if start <= sent < end]
        sent = sum(c.sent for c in active)
        stored = sum(c.stored for c in active)
        refused = sum(c.refused for c in active)
        other = sum((c.errors for c in active), Counter())
        return dict(
            flooders=count,
            canary_delivered=len(latencies),
            canary_skipped_sends=sum(1 for t in skipped if start <= t < end),
            **{f"canary_{key}": value for key, value in latency_figures(latencies).items()},
            flood_sent=sent,
            flood_stored=stored,
            flood_refused=refused,
            flood_other_errors=dict(other),
            flood_unanswered=sent - stored - refused - sum(other.values()),
            flood_answers_per_s=round((stored + refused + sum(other.values())) / figures["wall_s"], 1),
            **{k: v for k, v in figures.items() if k != "per_server_cpu_s"},
        )

    results = [phase(*entry) for entry in phases]
    return dict(
        flooders=list(p.flooders),
        duration_s=p.duration,
        outstanding_cap=p.outstanding,
        canary_rate_per_sender=p.rate,
        canary_window=p.window,
        message_limits="the daemon's defaults (message_burst, message_rate)",
        canary_send_errors=dict(traffic.errors),
        refusal_pauses_logged=_pauses_logged(target),
        **{f"server_cpu_util_{r['flooders']}": r["server_cpu_util"] for r in results if "server_cpu_util" in r},
        **{f"canary_p99_ms_{r['flooders']}": r["canary_p99_ms"] for r in results},
        **{f"flood_refused_{r['flooders']}": r["flood_refused"] for r in results},
        phases=results,
    )
