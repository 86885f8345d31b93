"""The server under test: a fresh `twistd securechatd` per measurement, or one already running.

The peer baseline found that a server's history (earlier runs, connection
churn) changes its figures, so by default every measurement gets a new
daemon process on a new database in a temporary directory, with limits
raised so that only the workload, not a rate limit, decides the pace. The
daemon (the venv's twistd) runs this source tree's securechatd, put first
on its PYTHONPATH, so a measurement is always of the code beside it; the
JSON records the commit and whether the tree had uncommitted changes.
"""

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile

from twisted.internet.task import deferLater

from bench import clients
from securechatd.config import SCHEMA

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PASSWORD = "bench-pass-123"
LISTENING = re.compile(r"securechatd listening on .*port=(\d+)")
PROBLEM = re.compile(r"#(warn|error|critical)\]|Traceback|Unhandled")
DEV_CERT_WARNING = "Created DEVELOPMENT certificates"

# Every client of the bench comes from 127.0.0.1, so the per-address and
# per-user limits meant for the open network are lifted (address_login_failures
# too: logins still being checked count against it, so by default only 20 can
# be in flight from one address).
RAISED_LIMITS = {
    "limits": {
        "message_burst": 1000000,
        "message_rate": 1000000,
        "action_burst": 1000000,
        "action_rate": 1000000,
        "address_login_failures": 1000000,
        "registration_exempt": "127.0.0.1 ::1",
    },
    "connections": {"unauthenticated_per_address": 100000, "max_connections": 100000},
    "messages": {"plaintext": "allowed"},  # the bench is a version 1 client (SendMessage)
    "privacy": {"invitations": "off"},  # (and adds people to groups without invitations)
}


def raised_limits(keep_default=()):
    """RAISED_LIMITS without the settings named in `keep_default`: those keep the daemon's own default.

    (The `flood` workload measures the default message rate limit itself.)
    """
    return {
        section: {key: value for key, value in settings.items() if key not in keep_default}
        for section, settings in RAISED_LIMITS.items()
    }


def known(limits):
    """`limits` without the settings this tree's securechatd does not know.

    (An older tree, measured as the "before" of a change, refuses a setting
    added since, such as [messages] plaintext.)
    """
    names = {(section, key) for section, key, _ in SCHEMA.values()}
    kept = {
        section: {key: value for key, value in settings.items() if (section, key) in names}
        for section, settings in limits.items()
    }
    return {section: settings for section, settings in kept.items() if settings}


def config_text(bcrypt_cost, limits=RAISED_LIMITS):
    sections = {
        "server": {"port": 0, "shutdown_grace": 2},
        "database": {"path": "securechatd.sqlite"},
        "accounts": {"bcrypt_cost": bcrypt_cost},
        **limits,
    }
    return "".join(
        f"[{section}]\n" + "".join(f"{key} = {value}\n" for key, value in settings.items())
        for section, settings in sections.items()
    )


def cpu_seconds(pid):
    """utime + stime of `pid` in seconds (/proc/PID/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_kb(pid, field="VmRSS"):
    """A figure of /proc/PID/status in KiB (VmRSS now, VmHWM the peak so far)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def listen_overflows():
    """The host's count of connections dropped by full listen queues (TcpExt ListenOverflows).

    A client whose SYN is dropped retries after about a second, which shows
    up as a login latency just over 1 s. Host-wide: other programs count too.
    """
    with open("/proc/net/netstat") as f:
        lines = [line.split() for line in f if line.startswith("TcpExt:")]
    return int(dict(zip(lines[0], lines[1]))["ListenOverflows"])


def raise_open_files():
    """Lift this process's (and so its children's) open-file limit to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def source_info():
    """The tree's commit, and whether it had uncommitted changes (what the daemon runs)."""
    def git(*arguments):
        return subprocess.run(["git", *arguments], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {"securechatd_commit": git("rev-parse", "--short", "HEAD") or None, "tree_dirty": bool(git("status", "--porcelain", "--", "securechatd"))}


def _environment():
    """The subprocesses import this tree's securechatd, whatever `pip install` left in site-packages."""
    return {**os.environ, "PYTHONPATH": REPO}


class Daemon:
    """`twistd --nodaemon securechatd` in its own temporary directory.

    `setpriv --pdeathsig KILL` makes the kernel kill it if the bench dies
    before it could stop it; every normal or interrupted exit stops it with
    SIGTERM (SIGKILL after 10 s).
    """

    live = set()  # created and not yet closed: cleaned up on any exit
    host = "127.0.0.1"

    def __init__(self, bcrypt_cost, limits=RAISED_LIMITS):
        self.bcrypt_cost = bcrypt_cost
        self.limits = limits = known(limits)  # what the JSON's raised_limits reports
        self.directory = tempfile.mkdtemp(prefix="securechatd-bench-")
        self.ca = os.path.join(self.directory, "certs", "ca.pem")
        self.log_path = os.path.join(self.directory, "daemon.log")
        self.config = os.path.join(self.directory, "securechatd.ini")
        with open(self.config, "w") as f:
            f.write(config_text(bcrypt_cost, limits))
        self.process = None
        self.port = None
        self.fresh = True
        Daemon.live.add(self)

    @property
    def pid(self):
        return self.process.pid

    async def seed(self, reactor, users, tokens=False):
        """Create `users` (and a resume token each) before start(); {user: token or None}."""
        request = {
            "database": os.path.join(self.directory, "securechatd.sqlite"),
            "cost": self.bcrypt_cost,
            "password": PASSWORD,
            "users": list(users),
            "tokens": tokens,
        }
        seeded = subprocess.run(
            [sys.executable, os.path.join(REPO, "bench", "seed.py")],
            input=json.dumps(request), capture_output=True, text=True,
            cwd=self.directory, env=_environment(), timeout=300,
        )
        if seeded.returncode:
            raise RuntimeError(f"seeding failed: {seeded.stderr[-2000:]}")
        return json.loads(seeded.stdout)

    async def start(self, reactor):
        """Start the daemon and wait (at most 60 s) for its `listening` log line."""
        twistd = os.path.join(BIN, "twistd")
        command = [twistd, "--nodaemon", "--pidfile=", "securechatd", "--config", self.config]
        setpriv = shutil.which("setpriv")
        if setpriv:
            command = [setpriv, "--pdeathsig", "KILL", "--", *command]
        start_offset = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.directory, env=_environment(),
            )
        for _ in range(1200):
            with open(self.log_path, errors="replace") as f:
                f.seek(start_offset)
                found = LISTENING.search(f.read())
            if found:
                self.port = int(found.group(1))
                return
            if self.process.poll() is not None:
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.kill_now()
        raise RuntimeError(f"the daemon did not start:\n{self.log_tail()}")

    async def restart(self, reactor):
        """A fresh process on the same database (and so the same accounts and messages)."""
        await self.stop(reactor)
        await self.start(reactor)

    async def stop(self, reactor):
        """SIGTERM, then SIGKILL if it has not exited within 10 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        for _ in range(200):
            if self.process.poll() is not None:
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.kill_now()

    async def kill9(self, reactor):
        """SIGKILL, as a crash would (no shutdown, no flush); returns once the process is gone."""
        self.process.send_signal(signal.SIGKILL)
        for _ in range(200):
            if self.process.poll() is not None:
                return
            await deferLater(reactor, 0.01, lambda: None)
        raise RuntimeError("the daemon outlived SIGKILL for 2 s")

    def kill_now(self):
        """Stop the daemon without the reactor (after it stopped, e.g. on Ctrl-C)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def close(self):
        """Remove the temporary directory (the daemon must be stopped)."""
        shutil.rmtree(self.directory, ignore_errors=True)
        Daemon.live.discard(self)

    def log_report(self):
        """Warnings, errors and tracebacks in the daemon's log: a count and a few samples."""
        problems = []
        with open(self.log_path, errors="replace") as f:
            for line in f:
                if PROBLEM.search(line) and DEV_CERT_WARNING not in line:
                    problems.append(line.strip()[:300])
        return {"problems": len(problems), "sample": problems[:5]}

    def log_tail(self, size=3000):
        with open(self.log_path, errors="replace") as f:
            return f.read()[-size:]

    @classmethod
    def kill_all(cls):
        for daemon in list(cls.live):
            daemon.kill_now()
            daemon.close()


class Existing:
    """A daemon someone else started (`--server HOST:PORT --ca FILE --pid PID`).

    Accounts are registered over the wire (an existing name counts as
    registered) and resume tokens come from one password login each; the
    process is not restarted, so its history is part of the figures.
    """

    fresh = False
    bcrypt_cost = None
    limits = None

    def __init__(self, host, port, ca, pid):
        self.host, self.port, self.ca, self.pid = host, port, ca, pid

    async def seed(self, reactor, users, tokens=False):
        return await clients.register(reactor, self, users, PASSWORD, tokens)

    async def start(self, reactor):
        pass

    restart = stop = start

    def close(self):
        pass

    def log_report(self):
        return None
