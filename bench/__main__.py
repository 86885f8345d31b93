"""`python -m bench WORKLOAD [options]`: one JSON line per measurement on stdout.

Workloads: logins, direct, fanout, idle, storm, offline, or all (each once,
with the parameters of the peer baseline); attacks, flood and killloop
(hostile clients, flooders beside a canary, kill -9 rounds) run only when
named. direct and fanout take --encrypted (end-to-end encrypted
conversations). client-crypto is the client's own cost of sealing and opening
messages, with no daemon and no network (its own options: client-crypto
--help); library is the daemon's cost per message sent and received by the
real client library (ChatClient) in an encrypted group (--plaintext: a plaintext one). By default each measurement
starts its own fresh daemon and stops it afterwards; `--server HOST:PORT
--ca FILE --pid PID` measures a running one instead.
"""

import argparse
import copy
import json
import os
import platform
import statistics
import sys
from datetime import datetime, timezone

from twisted.internet import epollreactor

epollreactor.install()

import twisted  # noqa: E402

from bench.daemon import Daemon, Existing, raise_open_files, raised_limits, source_info  # noqa: E402
from bench.workloads import WORKLOADS as _WORKLOADS  # noqa: E402


async def library(reactor, target, params):
    """bench/library.py, imported only when run (it needs this tree's client library)."""
    from bench.library import library

    return await library(reactor, target, params)


WORKLOADS = {**_WORKLOADS, "library": library}

# Per workload: the defaults of the options it uses.
DEFAULTS = {
    "logins": dict(n=100, concurrency=0),
    "direct": dict(n=100, m=100, window=8, encrypted=False),
    "fanout": dict(k=20, senders=0, m=100, window=8, encrypted=False),
    "idle": dict(c=1000, concurrency=100, hold=3.0),
    "storm": dict(n=20, logins=100, concurrency=0, rate=10.0, duration=5.0),
    "offline": dict(p=100_000, pipeline=32, timeout=600.0),
    "attacks": dict(),
    "flood": dict(flooders=(0, 1, 5), duration=10.0, rate=10.0, window=8, outstanding=4096),
    "killloop": dict(rounds=40, n=300, window=32, duration=3.0, seed=1, both_ways=False),
    "library": dict(k=3, m=20, warm=1, plaintext=False),
}
# Workloads that measure a limit themselves: these settings keep the daemon's default.
KEEP_DEFAULT = {"flood": ("message_burst", "message_rate")}
COMMON = dict(timeout=100.0, resume=False)

# `all`: the measurements of the issue, in order.
ALL = [
    ("direct", dict(n=100, m=100, window=8)),
    ("direct", dict(n=100, m=1000, window=8)),
    ("direct", dict(n=100, m=100, window=1)),
    ("fanout", dict(k=20, m=100, window=8)),
    ("idle", dict(c=1000)),
    ("logins", dict(n=100)),
    ("logins", dict(n=300, concurrency=20, resume=True)),
    ("storm", dict()),
    ("offline", dict(p=100_000)),
]

SEEDED = (
    "accounts (one shared bcrypt hash at the daemon's cost) and resume tokens written into a"
    " new database with securechatd's store before the daemon started; set-up logins use Resume"
)
REGISTERED = "accounts registered over the wire; set-up logins use resume tokens from one password login each"


def parser():
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workload", choices=[*WORKLOADS, "all", "client-crypto"])
    p.add_argument("-n", type=int, help="users (logins 100, direct 100, storm: load users 20, killloop 300)")
    p.add_argument("-m", type=int, help="messages per sender (direct, fanout: 100; library 20)")
    p.add_argument("-k", type=int, help="fanout: group members (20); library: users (3)")
    p.add_argument("--senders", type=int, help="fanout: senders (0 = all k)")
    p.add_argument("-c", type=int, help="idle: connections (1000)")
    p.add_argument("-p", type=int, help="offline: pending messages (100000)")
    p.add_argument("-w", "--window", type=int, help="messages outstanding per sender (8; killloop 32; flood: the canary's)")
    p.add_argument("--concurrency", type=int,
                   help="logins in flight (logins, storm: 0 = all at once; idle: 100)")
    p.add_argument("--resume", action="store_true", default=None, help="logins: Resume tokens, not passwords")
    p.add_argument("--encrypted", action="store_true", default=None,
                   help="direct, fanout: end-to-end encrypted conversations (devices, SendEncrypted of envelopes"
                   " sealed in set-up, DeliverEncrypted)")
    p.add_argument("--plaintext", action="store_true", default=None,
                   help="library: a plaintext group (SendMessage, Deliver), the encrypted figures' baseline")
    p.add_argument("--warm", type=int, help="library: messages each user sends before the measured phase (1)")
    p.add_argument("--hold", type=float, help="idle: seconds before the second RSS reading (3)")
    p.add_argument("--logins", type=int, help="storm: password logins during traffic (100)")
    p.add_argument("--rate", type=float, help="storm, flood: messages per second per sender (10)")
    p.add_argument("--duration", type=float,
                   help="storm: seconds of traffic before the storm (5); flood: seconds per phase (10);"
                   " killloop: most seconds of traffic before a kill (3)")
    p.add_argument("--flooders", type=counts,
                   help="flood: flooding connections per phase, comma-separated (0,1,5)")
    p.add_argument("--outstanding", type=int, help="flood: unanswered commands per flooder at most (4096)")
    p.add_argument("--rounds", type=int, help="killloop: kill -9 rounds (40)")
    p.add_argument("--seed", type=int, help="killloop: seed of the kill times (1)")
    p.add_argument("--both-ways", action="store_true", default=None,
                   help="killloop: both users of a pair send (default: one sends, one answers)")
    p.add_argument("--pipeline", type=int, help="offline: set-up sends in flight (32)")
    p.add_argument("--timeout", type=float, help="measured-phase limit in s (100; offline 600)")
    p.add_argument("--bcrypt-cost", type=int, default=12, help="the fresh daemon's bcrypt cost (12)")
    p.add_argument("--repeat", type=int, default=1, help="measure N times, a fresh daemon each (+ a median line)")
    p.add_argument("--server", metavar="HOST:PORT", help="measure this running daemon instead")
    p.add_argument("--ca", help="with --server: the CA file that signed its certificate")
    p.add_argument("--pid", type=int, help="with --server: its PID (for CPU and RSS)")
    return p


def counts(text):
    """"0,1,5" -> (0, 1, 5)"""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of counts: {text!r}")
    if any(value < 0 for value in values):
        raise argparse.ArgumentTypeError(f"a negative count: {text!r}")
    return values


def parameters(args, workload, overrides):
    """args with the workload's defaults where no option was given (`all`: its own parameters)."""
    params = copy.copy(args)
    for name, value in {**COMMON, **DEFAULTS[workload], **overrides}.items():
        planned = args.workload == "all" and name != "timeout"
        if planned or getattr(params, name, None) is None:
            setattr(params, name, value)
    return params


def target_for(args, workload, params):
    """A fresh daemon, or the running one named by --server."""
    if not args.server:
        return Daemon(params.bcrypt_cost, raised_limits(KEEP_DEFAULT.get(workload, ())))
    return Existing("127.0.0.1", int(args.server.rpartition(":")[2]), args.ca, args.pid)


async def measure(reactor, args, workload, params, source):
    """One measurement on its own target; the result dict (with "error" if it failed)."""
    target = target_for(args, workload, params)
    started = datetime.fromtimestamp(reactor.seconds(), timezone.utc).isoformat(timespec="seconds")
    load = round(os.getloadavg()[0], 2)  # the machine is shared: was it busy?
    try:
        result = {"workload": workload, **await WORKLOADS[workload](reactor, target, params)}
    except Exception as problem:
        result = {"workload": workload, "error": f"{type(problem).__name__}: {problem}"[:2000]}
    finally:
        await target.stop(reactor)
    result.update(
        server="securechatd",
        fresh_daemon=target.fresh,
        bcrypt_cost=target.bcrypt_cost,
        setup=result.pop("setup", None) or (SEEDED if target.fresh else REGISTERED),  # (a workload's own, if any)
        raised_limits=target.limits,
        started_at=started,
        load_average_1m_at_start=load,
        cpus=os.cpu_count(),
        **source,
        python=platform.python_version(),
        twisted=twisted.__version__,
        daemon_log=target.log_report(),
    )
    target.close()
    return result


def summary(workload, results):
    """Medians of the numeric top-level figures of repeated runs."""
    numeric = {
        key
        for r in results
        for key, value in r.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    medians = {
        key: round(statistics.median(r[key] for r in results if r.get(key) is not None), 3)
        for key in sorted(numeric)
        if any(r.get(key) is not None for r in results)
    }
    mode = {"encrypted": results[0]["encrypted"]} if "encrypted" in results[0] else {}
    return {"workload": workload, **mode, "summary": f"median of {len(results)} runs", "runs": len(results), **medians}


async def run_all(reactor, args, emit):
    """Every requested measurement; True if none failed."""
    plan = ALL if args.workload == "all" else [(args.workload, {})]
    source = source_info()
    ok = True
    for workload, overrides in plan:
        params = parameters(args, workload, overrides)
        results = []
        for _ in range(args.repeat):
            result = await measure(reactor, args, workload, params, source)
            ok = ok and "error" not in result
            results.append(result)
            emit(result)
        if args.repeat > 1:
            emit(summary(workload, [r for r in results if "error" not in r] or results))
    return ok


def emit(result):
    print(json.dumps(result), flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["client-crypto"]:
        from bench.client_crypto import main as client_crypto

        return client_crypto(argv[1:])
    args = parser().parse_args(argv)
    if args.encrypted and args.workload not in ("direct", "fanout"):
        sys.exit("bench: --encrypted is an option of direct and fanout")
    if args.server:
        host = args.server.rpartition(":")[0]
        if host not in ("127.0.0.1", "localhost"):
            sys.exit("bench: --server must be 127.0.0.1:PORT or localhost:PORT (loopback only)")
        if not args.ca:
            sys.exit("bench: --server needs --ca")
    raise_open_files()
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    outcome = []

    def finished(result):
        outcome.append(result)
        reactor.stop()

    reactor.callWhenRunning(
        lambda: Deferred.fromCoroutine(run_all(reactor, args, emit)).addBoth(finished)
    )
    try:
        reactor.run()
    finally:
        Daemon.kill_all()
    if outcome and outcome[0] is not True:
        if not isinstance(outcome[0], bool):
            print(outcome[0], file=sys.stderr)
        return 1
    return 0 if outcome else 130


if __name__ == "__main__":
    sys.exit(main())
