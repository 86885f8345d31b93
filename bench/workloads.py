"""The workloads: each sets up a target, measures one phase and returns its figures.

They mirror xmpp_load.py's login (A), pairs (B), muc (C) and idle (D), plus
some the peer had no counterpart for: logins during message traffic
(storm), a large offline backlog flushed at login (offline), and hostile or
unlucky conditions in their own modules: attacks (attacks.py), flooders
beside a canary (flood.py), kill -9 rounds (killloop.py). `direct` and
`fanout` also run in end-to-end encrypted conversations (`--encrypted`,
encrypted.py). Set-up (accounts, set-up logins, devices, conversations,
sealing) is never timed.
"""

import os
import time

from twisted.internet import defer
from twisted.internet.task import LoopingCall

from bench.clients import close_all, connect, error_code, login, login_many, sleep, wind_down
from bench.daemon import PASSWORD, memory_kb
from bench.measure import Meter, RssSampler, latency_figures
from bench.attacks import attacks
from bench.flood import flood
from bench.killloop import killloop
from bench.traffic import Traffic
from securechatd import commands

SETUP_CONCURRENCY = 100


def e2ee():
    """bench.encrypted, imported only by encrypted runs: older trees measured as a "before" have no e2ee package."""
    from bench import encrypted

    return encrypted


def names(prefix, count):
    """Account names; each workload has its own prefix, so runs on a reused server do not mix."""
    return [f"{prefix}{i}" for i in range(count)]


async def wait_until(reactor, condition, timeout, what):
    """Poll `condition` every 50 ms; RuntimeError after `timeout` seconds."""
    for _ in range(int(timeout / 0.05) + 1):
        if condition():
            return
        await sleep(reactor, 0.05)
    raise RuntimeError(f"timed out waiting for {what}")


async def prepare(reactor, target, users, tokens):
    """Accounts for `users` (with resume tokens if asked), then a running daemon."""
    seeded = await target.seed(reactor, users, tokens)
    await target.start(reactor)
    return seeded


async def setup_logins(reactor, target, users, tokens, devices=None):
    """Log every user in (not timed), bound to their device if `devices` ({user: keys.Device}); failures abort."""
    ids = {user: device.id.hex() for user, device in devices.items()} if devices else None
    clients, _, errors = await login_many(
        reactor, target, users, SETUP_CONCURRENCY, PASSWORD, tokens, devices=ids
    )
    if errors:
        await close_all(reactor, list(clients.values()))
        raise RuntimeError(f"set-up logins failed: {dict(errors)}")
    return clients


async def pair_up(clients, users, encrypt=False):
    """Pairs 0-1, 2-3, ... and their direct conversations: ({user: partner}, {user: id})."""
    partner = {user: users[i ^ 1] for i, user in enumerate(users)}
    flag = {"encrypted": True} if encrypt else {}
    created = await defer.gatherResults(
        [
            clients[users[i]].callRemote(commands.CreateConversation, members=[users[i + 1]], **flag)
            for i in range(0, len(users), 2)
        ]
    )
    conversation = {}
    for i, answer in zip(range(0, len(users), 2), created):
        conversation[users[i]] = conversation[users[i + 1]] = answer["conversation_id"]
    return partner, conversation


def traffic_figures(traffic, figures):
    return dict(
        sent=sum(traffic.sent.values()),
        delivered=traffic.delivered,
        expected=traffic.expected_deliveries,
        send_errors=dict(traffic.errors),
        **latency_figures(traffic.latencies),
        **latency_figures(traffic.answer_latencies, "answer_"),
        **figures,
    )


async def run_traffic(reactor, traffic, timeout):
    """Closed-loop traffic until every message is delivered and answered, or `timeout`."""
    timer = reactor.callLater(timeout, lambda: traffic.done.called or traffic.done.callback("timeout"))
    traffic.start()
    outcome = await traffic.done
    if timer.active():
        timer.cancel()
    return outcome == "timeout"


async def logins(reactor, target, p):
    """A: N logins, C in flight; latency from TCP connect to the Login (or Resume) answer."""
    users = names("login", p.n)
    tokens = await prepare(reactor, target, users, p.resume)
    if not p.resume:
        tokens = {}
    concurrency = p.concurrency or p.n
    meter = Meter(target.pid)
    meter.start()
    clients, latencies, errors = await login_many(reactor, target, users, concurrency, PASSWORD, tokens)
    figures = meter.stop(len(clients))
    await close_all(reactor, list(clients.values()))
    return dict(
        n=p.n,
        concurrency=concurrency,
        method="resume" if p.resume else "password",
        ok=len(clients),
        errors=dict(errors),
        logins_per_s=round(len(clients) / figures["wall_s"], 1),
        **latency_figures(latencies),
        **figures,
    )


async def direct(reactor, target, p):
    """B: N users in pairs 0-1, 2-3, ..., each sends M to its partner, window W (--encrypted: see encrypted.py)."""
    n = p.n - p.n % 2
    users = names("edirect" if p.encrypted else "direct", n)
    tokens = await prepare(reactor, target, users, True)
    encrypted = e2ee() if p.encrypted else None
    devices = encrypted.make_devices(users) if p.encrypted else None
    clients = await setup_logins(reactor, target, users, tokens, devices)
    extra = {}
    try:
        if p.encrypted:
            await encrypted.publish_chains(clients, devices)
        partner, conversation = await pair_up(clients, users, p.encrypted)
        if p.encrypted:
            members = {}
            for creator in users[::2]:
                members[conversation[creator]] = await encrypted.publish_epoch1(
                    clients[creator], conversation[creator], "direct", "", [partner[creator]], devices[creator]
                )
            run_id = os.urandom(4).hex()
            prepared = {
                user: encrypted.preseal(
                    devices[user], conversation[user], members[conversation[user]],
                    [devices[partner[user]].id], p.m, run_id, reactor.seconds(),
                )
                for user in users
            }
            extra = encrypted.envelope_figures(prepared, 1)
            traffic = encrypted.EncryptedTraffic(clients, conversation, partner, 1, p.m, p.window, prepared)
        else:
            traffic = Traffic(clients, conversation, partner, 1, p.m, p.window)
        await sleep(reactor, 1.0)
        meter = Meter(target.pid)
        meter.start()
        timed_out = await run_traffic(reactor, traffic, p.timeout)
        figures = meter.stop(traffic.delivered)
    finally:
        await close_all(reactor, list(clients.values()))
    return dict(
        n=n,
        m=p.m,
        window=p.window,
        encrypted=p.encrypted,
        persisted=True,
        timed_out=timed_out,
        msgs_per_s=round(traffic.delivered / figures["wall_s"], 1),
        receipts_received=sum(c.pushes[b"Receipt"] for c in clients.values()),
        **pushes(clients, p.encrypted),
        **extra,
        **traffic_figures(traffic, figures),
    )


def pushes(clients, encrypt):
    """How many messages came as DeliverEncrypted (encrypted runs) and as plaintext Deliver (which must be none)."""
    if not encrypt:
        return {}
    return dict(
        deliver_encrypted_received=sum(c.pushes[b"DeliverEncrypted"] for c in clients.values()),
        plaintext_deliver_received=sum(c.pushes[b"Deliver"] for c in clients.values()),
    )


async def fanout(reactor, target, p):
    """C: a group of K members; S of them send M each, window W; K-1 copies per message."""
    if p.k < 2:
        raise ValueError("fanout needs k >= 2")
    users = names("efanout" if p.encrypted else "fanout", p.k)
    senders = users[: p.senders or p.k]
    tokens = await prepare(reactor, target, users, True)
    encrypted = e2ee() if p.encrypted else None
    devices = encrypted.make_devices(users) if p.encrypted else None
    clients = await setup_logins(reactor, target, users, tokens, devices)
    extra = {}
    try:
        if p.encrypted:
            await encrypted.publish_chains(clients, devices)
        flag = {"encrypted": True} if p.encrypted else {}
        answer = await clients[users[0]].callRemote(
            commands.CreateConversation, members=users[1:], title="bench", **flag
        )
        await wait_until(
            reactor,
            lambda: all(clients[u].pushes[b"ConversationUpdated"] for u in users[1:]),
            30,
            "every member to see the group",
        )
        conversation = {s: answer["conversation_id"] for s in senders}
        observer = {s: users[(i + 1) % p.k] for i, s in enumerate(senders)}
        if p.encrypted:
            group = answer["conversation_id"]
            members = await encrypted.publish_epoch1(
                clients[users[0]], group, "group", "bench", users[1:], devices[users[0]]
            )
            run_id = os.urandom(4).hex()
            prepared = {
                s: encrypted.preseal(
                    devices[s], group, members, [devices[u].id for u in users if u != s], p.m, run_id,
                    reactor.seconds(),
                )
                for s in senders
            }
            extra = encrypted.envelope_figures(prepared, p.k - 1)
            traffic = encrypted.EncryptedTraffic(clients, conversation, observer, p.k - 1, p.m, p.window, prepared)
        else:
            traffic = Traffic(clients, conversation, observer, p.k - 1, p.m, p.window)
        await sleep(reactor, 0.5)
        meter = Meter(target.pid)
        meter.start()
        timed_out = await run_traffic(reactor, traffic, p.timeout)
        figures = meter.stop(traffic.delivered + traffic.answered)
    finally:
        await close_all(reactor, list(clients.values()))
    room_messages = sum(traffic.sent.values())
    result = dict(
        k=p.k,
        senders=len(senders),
        m=p.m,
        window=p.window,
        encrypted=p.encrypted,
        persisted=True,
        pacing=(
            "each sender keeps W messages outstanding; one is released when the next member"
            " (sender i -> member i+1) receives it; the server sends no echo to the sending"
            " session, so per_server_cpu_s counts deliveries + SendMessage (SendEncrypted) answers"
            " (where Prosody counts deliveries + echoes)"
        ),
        timed_out=timed_out,
        room_msgs_per_s=round(room_messages / figures["wall_s"], 1),
        deliveries_per_s=round(traffic.delivered / figures["wall_s"], 1),
        receipts_received=sum(c.pushes[b"Receipt"] for c in clients.values()),
        **pushes(clients, p.encrypted),
        **extra,
        **traffic_figures(traffic, figures),
    )
    if figures.get("server_cpu_s"):
        result["deliveries_per_server_cpu_s"] = round(traffic.delivered / figures["server_cpu_s"], 1)
    return result


async def idle(reactor, target, p):
    """D: RSS of a fresh daemon before and after C logged-in connections that set presence."""
    users = names("idle", p.c)
    tokens = await prepare(reactor, target, users, True)
    await sleep(reactor, 1.0)
    rss_before = memory_kb(target.pid) if target.pid else None
    meter = Meter(target.pid)
    meter.start()
    clients, latencies, errors = await login_many(reactor, target, users, p.concurrency, PASSWORD, tokens)
    figures = meter.stop(len(clients))
    try:
        await defer.gatherResults(
            [c.callRemote(commands.SetPresence, status="online") for c in clients.values()]
        )
        await sleep(reactor, p.hold)
        rss_after = memory_kb(target.pid) if target.pid else None
    finally:
        await close_all(reactor, list(clients.values()))
    per_connection = None
    if rss_before is not None and clients:
        per_connection = round((rss_after - rss_before) / len(clients), 2)
    return dict(
        c=p.c,
        concurrency=p.concurrency,
        hold_s=p.hold,
        login_method="resume",
        connected=len(clients),
        errors=dict(errors),
        server_rss_before_kb=rss_before,
        server_rss_after_kb=rss_after,
        rss_per_conn_kb=per_connection,
        connect_logins_per_s=round(len(clients) / figures["wall_s"], 1),
        **latency_figures(latencies),
        **figures,
    )


async def storm(reactor, target, p):
    """Light 1:1 traffic at a fixed rate, alone and then while password logins hammer bcrypt."""
    load_users = names("storm", p.n - p.n % 2)
    storm_users = names("stormlogin", p.logins)
    await target.seed(reactor, storm_users, False)
    tokens = await prepare(reactor, target, load_users, True)
    clients = await setup_logins(reactor, target, load_users, tokens)
    storm_clients = {}
    timers, starts = [], []
    try:
        partner, conversation = await pair_up(clients, load_users)
        await sleep(reactor, 1.0)
        traffic = Traffic(clients, conversation, partner, 1, None, 1, closed_loop=False)
        skipped = []
        for i, user in enumerate(load_users):
            timer = LoopingCall(lambda u=user: traffic.send_if_room(u) or skipped.append(time.perf_counter()))
            timer.clock = reactor
            timers.append(timer)
            starts.append(reactor.callLater(i / (p.rate * len(load_users)), timer.start, 1.0 / p.rate))
        quiet = Meter(target.pid)
        quiet.start()
        quiet_start = time.perf_counter()
        await sleep(reactor, p.duration)
        quiet_figures = quiet.stop(0)
        storm_meter = Meter(target.pid)
        storm_meter.start()
        storm_start = time.perf_counter()
        storm_clients, login_latencies, errors = await login_many(
            reactor, target, storm_users, p.concurrency or p.logins, PASSWORD, {}
        )
        storm_figures = storm_meter.stop(len(storm_clients))
        storm_end = time.perf_counter()
    finally:
        await wind_down(reactor, starts, timers, list(clients.values()) + list(storm_clients.values()))

    def phase(start, end, figures):
        latencies = [lat for sent, lat in zip(traffic.send_times, traffic.latencies) if start <= sent < end]
        return dict(
            delivered=len(latencies),
            msgs_per_s=round(len(latencies) / (end - start), 1),
            skipped_sends=sum(1 for t in skipped if start <= t < end),
            **latency_figures(latencies),
            **{k: v for k, v in figures.items() if k != "per_server_cpu_s"},
        )

    quiet_phase = phase(quiet_start, storm_start, quiet_figures)
    storm_phase = phase(storm_start, storm_end, storm_figures)
    storm_phase.update(
        logins=p.logins,
        ok=len(storm_clients),
        errors=dict(errors),
        logins_per_s=round(len(storm_clients) / storm_figures["wall_s"], 1),
        **latency_figures(login_latencies, "login_"),
    )
    return dict(
        n=len(load_users),
        window=1,
        rate_per_sender=p.rate,
        persisted=True,
        storm_login_method="password",
        p99_ms_without_storm=quiet_phase["p99_ms"],
        p99_ms_with_storm=storm_phase["p99_ms"],
        send_errors=dict(traffic.errors),
        without_storm=quiet_phase,
        with_storm=storm_phase,
    )


async def offline(reactor, target, p):
    """P messages wait for an offline user, who logs in: how fast they all arrive, and the RSS."""
    sender, recipient = names("offline", 2)
    tokens = await prepare(reactor, target, [sender, recipient], True)
    client = await connect(reactor, target)
    try:
        await login(reactor, client, sender, PASSWORD, tokens)
        answer = await client.callRemote(commands.CreateConversation, members=[recipient])
        setup_started = time.perf_counter()
        send_errors = await send_backlog(client, answer["conversation_id"], p.p, p.pipeline)
        setup_s = time.perf_counter() - setup_started
    finally:
        await close_all(reactor, [client])
    await target.restart(reactor)
    await sleep(reactor, 1.0)
    rss_before = memory_kb(target.pid) if target.pid else None
    received = []
    done = defer.Deferred()

    def delivered(_, box):
        received.append(int(box[b"seq"]))
        if len(received) >= p.p and not done.called:
            done.callback(None)

    sampler = RssSampler(reactor, target.pid)
    sampler.start()
    meter = Meter(target.pid)
    meter.start()
    started = time.perf_counter()
    client = await connect(reactor, target)
    client.on_deliver = delivered
    try:
        await login(reactor, client, recipient, PASSWORD, tokens)
        login_s = time.perf_counter() - started
        timer = reactor.callLater(p.timeout, lambda: done.called or done.callback("timeout"))
        timed_out = (await done) == "timeout"
        if timer.active():
            timer.cancel()
        flush_s = time.perf_counter() - started
        figures = meter.stop(len(received))
        peak = sampler.stop()
        rss_after = memory_kb(target.pid) if target.pid else None
    finally:
        sampler.stop()
        await close_all(reactor, [client])
    return dict(
        p=p.p,
        pipeline=p.pipeline,
        persisted=True,
        setup_send_s=round(setup_s, 3),
        setup_send_errors=send_errors,
        restarted_before_flush=target.fresh,
        received=len(received),
        duplicates=len(received) - len(set(received)),
        in_order=received == sorted(received),
        timed_out=timed_out,
        login_s=round(login_s, 3),
        flush_s=round(flush_s, 3),
        msgs_per_s=round(len(received) / flush_s, 1),
        server_rss_before_kb=rss_before,
        server_rss_peak_kb=peak,
        server_rss_after_kb=rss_after,
        rss_growth_kb=peak - rss_before if rss_before is not None else None,
        rss_samples=sampler.samples,
        **figures,
    )


async def send_backlog(client, conversation_id, count, pipeline):
    """Send `count` messages with `pipeline` unanswered at a time; {error code: count}."""
    finished = defer.Deferred()
    state = {"next": 0, "answered": 0}
    errors = {}
    conversation = b"%d" % conversation_id
    run_id = os.urandom(4).hex()  # (sender, client_msg_id) is an idempotency key

    def send_next():
        seq = state["next"]
        state["next"] += 1
        body = f"backlog {seq} {time.perf_counter():.9f}".encode()
        sent = client.send_message(conversation, f"{run_id}-{seq}".encode(), body)
        sent.addCallbacks(answered, failed)

    def failed(failure):
        code = error_code(failure)
        errors[code] = errors.get(code, 0) + 1
        if not client.lost:
            answered(None)
        elif not finished.called:
            finished.errback(RuntimeError(f"connection lost while sending the backlog: {errors}"))

    def answered(_):
        state["answered"] += 1
        if state["next"] < count:
            send_next()
        elif state["answered"] == count and not finished.called:
            finished.callback(None)

    for _ in range(min(pipeline, count)):
        send_next()
    await finished
    return errors


WORKLOADS = {
    "attacks": attacks,
    "logins": logins,
    "direct": direct,
    "fanout": fanout,
    "idle": idle,
    "storm": storm,
    "offline": offline,
    "flood": flood,
    "killloop": killloop,
}
