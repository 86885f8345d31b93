"""The `killloop` workload: kill -9 under message load, restart, and count what is pushed twice.

PROTOCOL.md: a Deliver answered before a crash is not pushed again, except
within a short window before the kill (its acknowledgement was not yet
committed). Each round: N users in pairs log in (Resume), receive what was
pending, and run closed-loop traffic as in `direct`: in each pair one user
sends with W messages outstanding (by default 32, the most a connection may
have in flight, so that many message writes queue up at the database) and
the other answers every Deliver at once (`--both-ways`: both send, as in
`direct`). After a random time (uniform between half of `duration` and
`duration`, from a seeded generator, so two trees get the same schedule)
the daemon is killed with SIGKILL and restarted on the same database. A
Deliver that arrives after the restart for a message the recipient had
already answered before the kill is a *repeat*; its age is how long before
the kill that answer was given (the generator's clock, at the moment its
Deliver handler returned the answer).
"""

import random
import time

from twisted.internet import defer
from twisted.internet.task import deferLater

from bench.clients import BenchClient, close_all, login_many
from bench.daemon import PASSWORD
from bench.measure import pct
from bench.traffic import Traffic
from securechatd import commands

SETUP_CONCURRENCY = 100

QUIET = 1.0  # seconds without a Deliver after the logins: the pending messages are all pushed
FLUSH_LIMIT = 60.0  # seconds: a flush that takes longer fails the run
AGE_BUCKETS = (0.05, 0.1, 0.2, 0.5, 1.0)  # seconds before the kill


async def _sleep(reactor, seconds):
    await deferLater(reactor, seconds, lambda: None)


async def _login_and_flush(reactor, target, users, tokens, answered, kill_time):
    """Log everyone in and take the pending Delivers; (clients, repeat ages in s, Delivers received)."""
    ages, received, last = [], [0], [time.perf_counter()]

    def pending(client, box):
        received[0] += 1
        last[0] = time.perf_counter()
        answered_at = answered.get((client.user, int(box[b"message_id"])))
        if answered_at is not None:
            ages.append(kill_time - answered_at)

    def counting():
        client = BenchClient()
        client.on_deliver = pending  # from the start: a user's pushes begin before the others are in
        return client

    clients, _, errors = await login_many(reactor, target, users, SETUP_CONCURRENCY, PASSWORD, tokens, counting)
    if errors:
        await close_all(reactor, list(clients.values()))
        raise RuntimeError(f"logins after a restart failed: {dict(errors)}")
    last[0] = time.perf_counter()
    deadline = last[0] + FLUSH_LIMIT
    while time.perf_counter() - last[0] < QUIET:
        if time.perf_counter() > deadline:
            raise RuntimeError("the pending messages were still arriving after 60 s")
        await _sleep(reactor, 0.1)
    return clients, ages, received[0]


def _age_figures(ages):
    figures = {"repeats": len(ages)}
    for bucket in AGE_BUCKETS:
        figures[f"repeats_answered_over_{int(bucket * 1000)}ms_before"] = sum(age > bucket for age in ages)
    figures.update(repeat_age_p50_ms=pct(ages, 50), repeat_age_p99_ms=pct(ages, 99), repeat_age_max_ms=pct(ages, 100))
    return figures


async def killloop(reactor, target, p):
    if not target.fresh:
        raise ValueError("killloop kills the daemon: it needs a fresh one (no --server)")
    n = p.n - p.n % 2
    users = [f"kill{i}" for i in range(n)]
    tokens = await target.seed(reactor, users, True)
    await target.start(reactor)
    schedule = random.Random(p.seed)
    clients, _, errors = await login_many(reactor, target, users, SETUP_CONCURRENCY, PASSWORD, tokens)
    if errors:
        await close_all(reactor, list(clients.values()))
        raise RuntimeError(f"set-up logins failed: {dict(errors)}")
    partner = {user: users[i ^ 1] for i, user in enumerate(users)}
    created = await defer.gatherResults(
        [clients[users[i]].callRemote(commands.CreateConversation, members=[users[i + 1]]) for i in range(0, n, 2)]
    )
    # one way: kill0 -> kill1, kill2 -> kill3, ...; a recipient only answers, so nothing it
    # sends waits in its connection ahead of its acknowledgements
    conversation = {user: created[i // 2]["conversation_id"] for i, user in enumerate(users) if p.both_ways or i % 2 == 0}
    rounds, all_ages = [], []
    for round_ in range(p.rounds):
        answered = {}  # (recipient, message_id) -> when its Deliver was answered

        traffic = Traffic(clients, conversation, {s: partner[s] for s in conversation}, 1, 10**9, p.window)

        def delivered(client, box, traffic=traffic, answered=answered):
            answered[(client.user, int(box[b"message_id"]))] = time.perf_counter()
            traffic._delivered(client, box)

        for client in clients.values():
            client.on_deliver = delivered
        run_for = schedule.uniform(p.duration / 2, p.duration)
        traffic.start()
        await _sleep(reactor, run_for)
        for client in clients.values():
            client.on_deliver = None  # what is answered from now on was answered after the kill
        kill_time = time.perf_counter()
        await target.kill9(reactor)
        for client in clients.values():
            if client.transport is not None:
                client.transport.abortConnection()
        await close_all(reactor, list(clients.values()))
        answered_total = len(answered)
        answered_last = {
            f"answered_in_last_{int(bucket * 1000)}ms": sum(kill_time - t <= bucket for t in answered.values())
            for bucket in (0.1, 0.5)
        }
        await target.start(reactor)
        clients, ages, pushed = await _login_and_flush(reactor, target, users, tokens, answered, kill_time)
        all_ages += ages
        rounds.append(
            dict(
                round=round_,
                traffic_s=round(run_for, 3),
                delivered_before_kill=answered_total,
                **answered_last,
                pushed_after_restart=pushed,
                **_age_figures(ages),
            )
        )
    await close_all(reactor, list(clients.values()))
    return dict(
        rounds=p.rounds,
        n=n,
        window=p.window,
        senders="both users of a pair" if p.both_ways else "one user of each pair",
        kill_after_s=[p.duration / 2, p.duration],
        seed=p.seed,
        **_age_figures(all_ages),
        rounds_with_repeats=sum(1 for r in rounds if r["repeats"]),
        delivered_before_kills=sum(r["delivered_before_kill"] for r in rounds),
        per_round=rounds,
    )
