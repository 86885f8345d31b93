"""
Tests for the systemd units in conf/: securechatd.service and .socket.

Three kinds of check:

  - what users rely on, read straight from the unit files (ExecStart,
    Restart=, the service user, the socket's port, ...): no tools needed;
  - C{systemd-analyze verify}: systemd's own parser and loader accept the
    units without a single warning;
  - C{systemd-analyze security --offline=true}: the sandbox keeps the
    service's overall exposure at or below L{MAX_EXPOSURE};
  - the unit's system call filter (L{SyscallFilterTests}), worked out from
    its SystemCallFilter= lines with the sets as C{systemd-analyze
    syscall-filter} prints them, allows every call the daemon makes --
    above all setpriority(), without which hash_nice cannot work -- and no
    other call of @resources or @privileged.

The last three run only where C{systemd-analyze} is installed.

C{verify} checks that ExecStart's program exists and is executable, and
/opt/securechatd/bin/twistd does not exist on a test machine.  Rather than
filtering that message out (and with it, perhaps, a real problem), each
check builds a small file system root in a temporary directory -- the units
under etc/systemd/system, an executable stub at ExecStart's path, stub
targets for the default dependencies -- and runs C{systemd-analyze
--root=<that directory>}.  This also keeps the host's own units (a deployed,
older securechatd.service for instance) out of the picture.

C{verify} reports most mistakes (a misspelt directive, a value it cannot
parse) as a warning and still exits 0, so a unit passes only if C{verify}
exits 0 and prints nothing.  The L{VerifyTests} below that break a copy of a
unit on purpose prove that this catches such mistakes.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

from twisted.trial.unittest import SkipTest, TestCase

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
SERVICE = "securechatd.service"
SOCKET = "securechatd.socket"

# The score `systemd-analyze security` gives this unit must not exceed this
# (0.0 = fully sandboxed, 10.0 = not at all; Debian's prosody.service: 9.2).
# systemd 252 rates the unit 1.2 (exactly 1.143, which it rounds up): 1.1
# (1.032) before setpriority was allowed for hash_nice.  Its @resources check
# is all or nothing -- allowing any one call of the set costs 9 of 10 at
# weight 700, i.e. +0.11 -- and no other check can honestly give that back
# (see the unit's comments).
MAX_EXPOSURE = 1.2

# The system calls securechatd.server.passwords.lower_thread_priority makes to
# put a bcrypt thread hash_nice steps nicer: threading.get_native_id() is
# gettid(), os.getpriority() and os.setpriority() are getpriority() and
# setpriority() on that thread id.  SyscallFilterTests.test_traceHashNice
# checks this list against what the code really calls, with strace.
HASH_NICE_SYSCALLS = ("gettid", "getpriority", "setpriority")

STRACE = shutil.which("strace")

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
NO_SYSTEMD_ANALYZE = "systemd-analyze is not installed (it comes with systemd)"

# Targets that the units' default and explicit dependencies name.  Only
# sysinit.target (Requires= of every service and socket with default
# dependencies) must exist for verify to succeed; the others are stubbed too
# so that no version of systemd goes looking for them.
STUB_TARGETS = (
    "sysinit.target",
    "basic.target",
    "shutdown.target",
    "sockets.target",
    "network.target",
    "network-online.target",
    "multi-user.target",
)

# The drop-in that securechatd.service's comments give for socket activation.
SOCKET_ACTIVATION_DROPIN = """\
[Unit]
Requires=securechatd.socket
After=securechatd.socket
[Service]
ExecStart=
ExecStart=/opt/securechatd/bin/twistd --nodaemon --pidfile= securechatd \
--config /etc/securechatd/securechatd.ini --listen systemd:domain=INET6:index=0
"""


def read_conf(name):
    with open(os.path.join(CONF, name), encoding="utf-8") as f:
        return f.read()


def parse_unit(text):
    """
    Parse unit file text into {(section, key): [value, ...]}, in order.

    Enough of systemd's syntax for these tests: sections, comments (# and
    ;), key=value with surrounding blanks stripped, and lines continued
    with a trailing backslash.
    """
    entries = {}
    section = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"not a key=value line: {line!r}")
        entries.setdefault((section, key.strip()), []).append(value.strip())
    return entries


def effective(values):
    """The values left after systemd's rule that an empty assignment resets."""
    result = []
    for value in values:
        if value:
            result.append(value)
        else:
            result = []
    return result


def one(entries, section, key):
    """The single effective value of section/key, or None if unset."""
    values = effective(entries.get((section, key), []))
    if len(values) > 1:
        raise AssertionError(f"[{section}] {key}= is set {len(values)} times: {values}")
    return values[0] if values else None


def exec_start_argv(entries):
    """ExecStart= split into argv, its path prefix (-, @, :, +, !) removed."""
    line = one(entries, "Service", "ExecStart")
    if line is None:
        raise AssertionError("securechatd.service has no ExecStart=")
    argv = shlex.split(line)
    argv[0] = argv[0].lstrip("-@:+!")
    return argv


def seconds(value):
    """A systemd time span such as '20', '20s', '1min 30s' as seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    total = 0
    for number, unit in re.findall(r"(\d+)\s*([a-z]*)", value):
        total += int(number) * units[unit]
    return total


def nice_ceiling(value):
    """
    The lowest nice value (highest priority) that LimitNICE=value lets an
    unprivileged thread set itself to: "+N"/"-N" is that nice value, a bare
    number the raw RLIMIT_NICE r, which allows nice 20 - r (so 0 and 1 both
    allow only 19 and up: no thread may lower its nice value).  For
    "soft:hard" the hard limit counts: the daemon may raise its soft limit
    to it.
    """
    value = value.split(":")[-1]
    if value[0] in "+-":
        return int(value)
    if value == "infinity":
        return -20
    return min(19, max(-20, 20 - int(value)))


def parse_syscall_sets(text):
    """
    Parse the output of C{systemd-analyze syscall-filter} into
    {"@set": [member, ...]}; a member is a system call or another "@set".
    """
    sets = {}
    members = None
    for line in text.splitlines():
        if line.startswith("@"):
            members = sets.setdefault(line.split()[0], [])
        elif line.strip() and not line.strip().startswith("#"):
            if members is None or not line[0].isspace():
                raise ValueError(f"unexpected line in syscall-filter output: {line!r}")
            members.append(line.split()[0])
    return sets


def expand_syscalls(items, sets):
    """The system calls that a list of names and @sets stands for."""
    calls = set()
    for item in items:
        if item.startswith("@"):
            calls |= expand_syscalls(sets[item], sets)
        else:
            calls.add(item)
    return calls


class SyscallFilter:
    """
    The filter that a unit's SystemCallFilter= lines install, as systemd
    builds it (systemd.exec(5)): the first non-empty line decides the kind
    -- without "~" an allow list (which starts with @default), with "~" a
    deny list -- and every later line adds its calls to that list if it is
    of the same kind or removes them if it is of the other; an empty line
    resets.  An entry may carry ":errno", which does not matter here.

    Only SystemCallFilter= is modelled.  Other settings add filters of their
    own for calls or arguments the daemon does not use (RestrictNamespaces=:
    clone/unshare with namespace flags; RestrictRealtime=: realtime policies
    in sched_setscheduler; RestrictAddressFamilies=: socket families;
    LockPersonality=, RestrictSUIDSGID=, ProtectClock=, ProtectHostname=,
    ProtectKernelLogs=, PrivateDevices=, ProtectKernelModules=).
    """

    def __init__(self, values, sets):
        self.allowList = None
        self.names = set()
        for value in values:
            if not value:
                self.allowList = None
                self.names = set()
                continue
            invert = value.startswith("~")
            items = [item.split(":")[0] for item in value.lstrip("~").split()]
            if self.allowList is None:
                self.allowList = not invert
                if self.allowList:
                    self.names |= expand_syscalls(["@default"], sets)
            calls = expand_syscalls(items, sets)
            if invert == self.allowList:
                self.names -= calls
            else:
                self.names |= calls

    def allows(self, call):
        if self.allowList is None:
            return True
        return (call in self.names) == self.allowList

    def allowed(self, calls):
        """The members of calls that the filter lets through."""
        return {call for call in calls if self.allows(call)}


class UnitContentTests(TestCase):
    """
    The facts about the units that users and operators rely on.
    """

    def setUp(self):
        self.service = parse_unit(read_conf(SERVICE))
        self.socket = parse_unit(read_conf(SOCKET))

    def test_execStartRunsTwistdInForeground(self):
        """
        The service runs C{twistd --nodaemon --pidfile= securechatd
        --config <file>} from the venv: in the foreground so that systemd
        supervises it (and socket activation's LISTEN_PID matches), with no
        pid file, and with the configuration in /etc/securechatd.
        """
        argv = exec_start_argv(self.service)
        self.assertEqual(argv[0], "/opt/securechatd/bin/twistd")
        self.assertEqual(
            argv[1:5], ["--nodaemon", "--pidfile=", "securechatd", "--config"]
        )
        self.assertEqual(argv[5:], ["/etc/securechatd/securechatd.ini"])

    def test_restartOnFailure(self):
        """
        A crash (non-zero exit, signal, timeout) restarts the daemon; a
        clean stop does not.
        """
        self.assertEqual(one(self.service, "Service", "Restart"), "on-failure")

    def test_unprivilegedUser(self):
        """
        The daemon runs as its own user and group, never as root.
        """
        user = one(self.service, "Service", "User")
        group = one(self.service, "Service", "Group")
        self.assertEqual(user, "securechatd")
        self.assertEqual(group, "securechatd")
        self.assertNotIn(user, ("root", "0"))
        self.assertNotIn(group, ("root", "0"))

    def test_noCapabilities(self):
        """
        The daemon listens on a port above 1024 and needs no capability.
        """
        self.assertEqual(self.service[("Service", "CapabilityBoundingSet")], [""])
        self.assertEqual(
            effective(self.service.get(("Service", "AmbientCapabilities"), [])), []
        )

    def test_directories(self):
        """
        Configuration in /etc/securechatd; state in /var/lib/securechatd,
        which is also the working directory; new files private.
        """
        self.assertEqual(
            one(self.service, "Service", "ConfigurationDirectory"), "securechatd"
        )
        self.assertEqual(one(self.service, "Service", "StateDirectory"), "securechatd")
        self.assertEqual(
            one(self.service, "Service", "WorkingDirectory"), "/var/lib/securechatd"
        )
        self.assertEqual(one(self.service, "Service", "UMask"), "0077")

    def test_gracefulStop(self):
        """
        systemd stops the daemon with SIGTERM and waits longer than the
        daemon's 10 s shutdown grace before killing it.
        """
        self.assertIn(one(self.service, "Service", "KillSignal"), (None, "SIGTERM", "TERM"))
        timeout = one(self.service, "Service", "TimeoutStopSec")
        self.assertIsNotNone(timeout)
        self.assertGreater(seconds(timeout), 10)

    def test_manyFileDescriptors(self):
        """
        Each client is a socket: the descriptor limit is far above the
        usual 1024.
        """
        limit = one(self.service, "Service", "LimitNOFILE")
        self.assertGreaterEqual(int(limit.split(":")[-1]), 65536)

    def test_priorityCannotBeRaised(self):
        """
        The system call filter lets the daemon call setpriority() (for
        hash_nice), but no thread of it can run above normal priority: it
        has no CAP_SYS_NICE (an empty bounding set) and LimitNICE= pins
        RLIMIT_NICE, whatever the host's DefaultLimitNICE= says, so that an
        unprivileged setpriority() can only make a thread nicer.  No
        realtime scheduling either.
        """
        self.assertEqual(self.service[("Service", "CapabilityBoundingSet")], [""])
        limit = one(self.service, "Service", "LimitNICE")
        self.assertIsNotNone(limit, "LimitNICE= is not set")
        self.assertGreaterEqual(nice_ceiling(limit), 0)
        self.assertEqual(one(self.service, "Service", "RestrictRealtime"), "yes")

    def test_niceCeiling(self):
        self.assertEqual(nice_ceiling("0"), 19)
        self.assertEqual(nice_ceiling("1"), 19)
        self.assertEqual(nice_ceiling("20"), 0)
        self.assertEqual(nice_ceiling("40"), -20)
        self.assertEqual(nice_ceiling("+0"), 0)
        self.assertEqual(nice_ceiling("-5"), -5)
        self.assertEqual(nice_ceiling("0:30"), -10)
        self.assertEqual(nice_ceiling("infinity"), -20)

    def test_noMemoryDenyWriteExecute(self):
        """
        MemoryDenyWriteExecute=yes must stay off: pyOpenSSL's callbacks
        (which Twisted's CertificateOptions always installs, for ALPN) are
        cffi ffi.callback()s, which need a writable and executable page, so
        the daemon could not even build its TLS context.
        """
        self.assertNotIn(
            one(self.service, "Service", "MemoryDenyWriteExecute"),
            ("yes", "true", "on", "1"),
        )

    def test_serviceInstall(self):
        self.assertEqual(
            self.service[("Install", "WantedBy")], ["multi-user.target"]
        )

    def test_socket(self):
        """
        The socket unit listens on port 5599 (both IP versions, one
        dual-stack socket: domain=INET6 in the daemon's endpoint) and is
        started by sockets.target once enabled.
        """
        self.assertEqual(one(self.socket, "Socket", "ListenStream"), "5599")
        self.assertEqual(one(self.socket, "Socket", "BindIPv6Only"), "both")
        self.assertIn(one(self.socket, "Socket", "Accept"), (None, "no", "false"))
        self.assertEqual(self.socket[("Install", "WantedBy")], ["sockets.target"])


class AnalyzeMixin:
    """
    Run systemd-analyze on the units inside a temporary file system root.
    """

    if SYSTEMD_ANALYZE is None:
        skip = NO_SYSTEMD_ANALYZE

    def analyze(self, *args):
        env = dict(os.environ, SYSTEMD_COLORS="0", SYSTEMD_PAGER="cat", LC_ALL="C")
        return subprocess.run(
            [SYSTEMD_ANALYZE, *args],
            timeout=60,
            capture_output=True,
            text=True,
            env=env,
        )

    def makeRoot(self, units=None, dropins=None, stubExecutable=True):
        """
        Build a file system root holding the units, and return (root, the
        paths of the units inside it).

        @param units: {unit name: text}; by default both units from conf/.
        @param dropins: {unit name: drop-in text} installed as
            etc/systemd/system/<unit>.d/test.conf.
        @param stubExecutable: whether to create an executable stub at the
            path of securechatd.service's ExecStart= program.
        """
        if units is None:
            units = {SERVICE: read_conf(SERVICE), SOCKET: read_conf(SOCKET)}
        root = os.path.abspath(self.mktemp())
        unitdir = os.path.join(root, "etc", "systemd", "system")
        os.makedirs(unitdir)
        paths = []
        for name, text in units.items():
            path = os.path.join(unitdir, name)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            paths.append(path)
        for name in STUB_TARGETS:
            if name not in units:
                with open(os.path.join(unitdir, name), "w", encoding="utf-8") as f:
                    f.write(
                        "[Unit]\n"
                        f"Description=Stub {name} for systemd-analyze verify\n"
                        "DefaultDependencies=no\n"
                    )
        for name, text in (dropins or {}).items():
            os.makedirs(os.path.join(unitdir, name + ".d"))
            with open(os.path.join(unitdir, name + ".d", "test.conf"), "w") as f:
                f.write(text)
        if stubExecutable and SERVICE in units:
            program = exec_start_argv(parse_unit(units[SERVICE]))[0]
            stub = os.path.join(root, program.lstrip("/"))
            os.makedirs(os.path.dirname(stub))
            with open(stub, "w") as f:
                f.write("#!/bin/sh\nexit 0\n")
            os.chmod(stub, 0o755)
        return root, paths

    def verify(self, root, paths):
        """
        Run systemd-analyze verify; return (exit code, all it printed).
        """
        result = self.analyze("verify", f"--root={root}", "--man=no", *paths)
        return result.returncode, (result.stdout + result.stderr).strip()

    def assertVerifies(self, root, paths):
        code, output = self.verify(root, paths)
        if code != 0 or output:
            self.fail(
                f"systemd-analyze verify exited {code} and said:\n{output}"
            )

    def assertDoesNotVerify(self, root, paths, expected):
        """
        verify exits non-zero or prints something, and what it prints
        contains expected.
        """
        code, output = self.verify(root, paths)
        self.assertTrue(
            code != 0 or output, "systemd-analyze verify accepted a broken unit"
        )
        self.assertIn(expected, output)


class VerifyTests(AnalyzeMixin, TestCase):
    """
    systemd-analyze verify accepts both units without a warning, and would
    notice if they were broken.
    """

    def test_unitsVerify(self):
        self.assertVerifies(*self.makeRoot())

    def test_socketActivationDropIn(self):
        """
        The service with the socket-activation drop-in documented in its
        comments verifies too.
        """
        self.assertVerifies(
            *self.makeRoot(dropins={SERVICE: SOCKET_ACTIVATION_DROPIN})
        )

    def test_badValueIsCaught(self):
        """
        A value systemd cannot parse is only a warning for verify (exit 0),
        which these tests treat as a failure.
        """
        broken = read_conf(SERVICE).replace(
            "\nRestart=on-failure\n", "\nRestart=sometimes\n"
        )
        self.assertNotEqual(broken, read_conf(SERVICE))
        root, paths = self.makeRoot(units={SERVICE: broken})
        self.assertDoesNotVerify(root, paths, "sometimes")

    def test_misspeltDirectiveIsCaught(self):
        broken = read_conf(SERVICE).replace(
            "\nProtectSystem=strict\n", "\nProtectSytem=strict\n"
        )
        self.assertNotEqual(broken, read_conf(SERVICE))
        root, paths = self.makeRoot(units={SERVICE: broken})
        self.assertDoesNotVerify(root, paths, "ProtectSytem")

    def test_brokenSocketIsCaught(self):
        broken = read_conf(SOCKET).replace(
            "\nBindIPv6Only=both\n", "\nBindIPv6Only=bothh\n"
        )
        self.assertNotEqual(broken, read_conf(SOCKET))
        root, paths = self.makeRoot(
            units={SERVICE: read_conf(SERVICE), SOCKET: broken}
        )
        self.assertDoesNotVerify(root, paths, "bothh")

    def test_missingExecutableIsCaught(self):
        """
        Without the stub, verify does check ExecStart's program (inside the
        temporary root) and complains: the stub is what satisfies it, not a
        filter.
        """
        root, paths = self.makeRoot(stubExecutable=False)
        self.assertDoesNotVerify(root, paths, "/opt/securechatd/bin/twistd")


class SecurityTests(AnalyzeMixin, TestCase):
    """
    systemd-analyze security rates the service's sandbox.
    """

    def test_exposure(self):
        """
        The overall exposure level is at most L{MAX_EXPOSURE}.
        """
        root, paths = self.makeRoot(units={SERVICE: read_conf(SERVICE)})
        result = self.analyze(
            "security", "--offline=true", f"--root={root}", "--no-pager", paths[0]
        )
        output = result.stdout + result.stderr
        if re.search(r"(unrecognized|unknown) option", output, re.IGNORECASE):
            raise SkipTest(
                "this systemd-analyze has no 'security --offline' (systemd >= 250)"
            )
        match = re.search(
            r"Overall exposure level for securechatd\.service:\s*(\d+(?:\.\d+)?)",
            output,
        )
        if match is None:
            self.fail(
                f"no overall exposure level in (exit {result.returncode}):\n{output}"
            )
        exposure = float(match.group(1))
        # Checks the unit fails are marked "✗" (UTF-8 locale) or "-" (LC_ALL=C,
        # set above, where systemd falls back to ASCII).
        exposed = "\n".join(
            line.rstrip()
            for line in result.stdout.splitlines()
            if line.startswith(("✗ ", "- "))
        )
        self.assertLessEqual(
            exposure,
            MAX_EXPOSURE,
            f"exposure {exposure} > {MAX_EXPOSURE}; exposed:\n{exposed}",
        )


# Run under strace by SyscallFilterTests.test_traceHashNice: one hash_nice
# thread (the daemon's default, 10) runs one job that reports its nice value.
TRACE_HASH_NICE = """\
import os, sys, threading
from securechatd.server import passwords

print(os.path.abspath(passwords.__file__))
print(os.getpriority(os.PRIO_PROCESS, 0))
pool = passwords.HashThreadPool(10, minthreads=0, maxthreads=1)
seen = []
done = threading.Event()

def job():
    seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
    done.set()

pool.start()
pool.callInThread(job)
done.wait(60)
pool.stop()
print(seen[0] if seen else None)
"""


class SyscallFilterTests(AnalyzeMixin, TestCase):
    """
    The unit's SystemCallFilter= lets through every call the daemon makes,
    in particular the ones hash_nice needs, and keeps the rest of
    @resources and all of @privileged out.

    The filter is worked out by L{SyscallFilter} from the unit's lines and
    the sets as this machine's C{systemd-analyze syscall-filter} prints them
    (so a systemd that moves a call between sets is noticed);
    L{test_systemdAgrees} checks that model against systemd's own reading
    of the unit.
    """

    _sets = None

    def setUp(self):
        if SyscallFilterTests._sets is None:
            result = self.analyze("syscall-filter", "--no-pager")
            if result.returncode != 0:
                self.fail(f"systemd-analyze syscall-filter failed:\n{result.stderr}")
            SyscallFilterTests._sets = parse_syscall_sets(result.stdout)
        self.sets = SyscallFilterTests._sets
        self.service = parse_unit(read_conf(SERVICE))
        self.filter = SyscallFilter(
            self.service.get(("Service", "SystemCallFilter"), []), self.sets
        )

    def expand(self, *items):
        return expand_syscalls(items, self.sets)

    def test_parseSyscallSets(self):
        """
        The parser finds the sets and their members, nested sets included.
        """
        self.assertIn("setpriority", self.sets["@resources"])
        self.assertIn("@default", self.sets["@system-service"])
        self.assertIn("@resources", self.sets["@system-service"])
        self.assertIn("setrlimit", self.expand("@system-service"))

    def test_filterSemantics(self):
        """
        L{SyscallFilter} follows systemd.exec(5): the first line decides
        allow or deny list, later lines add to or remove from it, an empty
        line resets.
        """
        f = SyscallFilter(["@system-service", "~@resources", "setpriority"], self.sets)
        self.assertTrue(f.allowList)
        self.assertEqual(f.allowed(self.expand("@resources")), {"setpriority"})
        self.assertTrue(f.allows("gettid"))  # @default comes with an allow list
        f = SyscallFilter(["~@resources", "setrlimit"], self.sets)
        self.assertFalse(f.allowList)
        self.assertEqual(
            f.allowed(self.expand("@resources")), {"setrlimit"}
        )
        self.assertTrue(f.allows("mount"))
        f = SyscallFilter(["@system-service", "", "~setpriority:EPERM"], self.sets)
        self.assertFalse(f.allows("setpriority"))
        self.assertTrue(f.allows("setrlimit"))

    def test_allowList(self):
        """
        The unit's filter is an allow list: a call nobody thought of is
        refused.
        """
        self.assertIs(self.filter.allowList, True)
        self.assertFalse(self.filter.allows("a_call_that_does_not_exist"))

    def test_hashNiceAllowed(self):
        """
        Every call hash_nice makes is let through, so the bcrypt threads
        really become nicer than the reactor thread under the unit.
        """
        self.assertEqual(
            sorted(set(HASH_NICE_SYSCALLS) - self.filter.allowed(HASH_NICE_SYSCALLS)),
            [],
        )

    def test_restOfResourcesDenied(self):
        """
        Of @resources only setpriority() is allowed: no setrlimit(),
        scheduler policy or CPU affinity changes, memory policies or I/O
        priorities.
        """
        self.assertEqual(
            self.filter.allowed(self.expand("@resources")), {"setpriority"}
        )
        for call in (
            "setrlimit",
            "nice",
            "sched_setaffinity",
            "sched_setscheduler",
            "sched_setattr",
            "sched_setparam",
            "ioprio_set",
            "set_mempolicy",
        ):
            self.assertFalse(self.filter.allows(call), call)

    def test_privilegedDenied(self):
        self.assertEqual(self.filter.allowed(self.expand("@privileged")), set())

    def securityChecks(self, dropins=None):
        """
        {"@set": (good, offending call or None)} for every
        C{SystemCallFilter=~@set} check of C{systemd-analyze security}.
        """
        root, paths = self.makeRoot(units={SERVICE: read_conf(SERVICE)}, dropins=dropins)
        result = self.analyze(
            "security", "--offline=true", f"--root={root}", "--no-pager",
            "--json=short", paths[0],
        )
        if result.returncode != 0 or not result.stdout.startswith("["):
            raise SkipTest(
                "this systemd-analyze has no 'security --offline --json' "
                f"(systemd >= 250): {result.stderr.strip()}"
            )
        checks = {}
        for entry in json.loads(result.stdout):
            name = entry["name"]
            if name.startswith("SystemCallFilter=~@"):
                offender = re.search(r"\(e\.g\. (\S+) is allowed\)", entry["description"])
                checks[name.partition("~")[2]] = (
                    entry["set"],
                    offender.group(1) if offender else None,
                )
        self.assertIn("@resources", checks)
        return checks

    def test_systemdAgrees(self):
        """
        systemd reads the unit's filter as L{SyscallFilter} does.  For each
        set that C{systemd-analyze security} rates, it finds a call of the
        set allowed exactly when the model does, and names one the model
        allows.  And once the calls the model allows from those sets are
        removed again (a drop-in), systemd finds none of the sets allowed:
        nothing else in them gets through.
        """
        checks = self.securityChecks()
        leaked = set()
        for name, (good, offender) in checks.items():
            allowed = self.filter.allowed(self.expand(name))
            leaked |= allowed
            self.assertEqual(good, not allowed, (name, allowed, offender))
            if offender is not None:
                self.assertIn(offender, allowed, name)
        if leaked:
            checks = self.securityChecks(
                dropins={SERVICE: "[Service]\nSystemCallFilter=~%s\n" % " ".join(sorted(leaked))}
            )
        self.assertEqual(
            [name for name, (good, _) in checks.items() if not good], []
        )

    def test_traceHashNice(self):
        """
        Run the hash_nice code (L{HashThreadPool} with the default nice, 10)
        under C{strace -f}: the job's thread is 10 steps nicer than the
        process, the calls in L{HASH_NICE_SYSCALLS} are among those made,
        and the unit's filter allows every call the process made, from
        interpreter start to exit.
        """
        if not sys.platform.startswith("linux"):
            raise SkipTest("per-thread niceness (hash_nice) is Linux only")
        if STRACE is None:
            raise SkipTest("strace is not installed")
        probe = subprocess.run(
            [STRACE, "-qq", "-o", os.devnull, "true"], capture_output=True, timeout=60
        )
        if probe.returncode != 0:
            raise SkipTest(f"strace cannot trace here: {probe.stderr.decode().strip()}")
        top = os.path.dirname(CONF)
        trace = os.path.abspath(self.mktemp())
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [top] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        )
        result = subprocess.run(
            [STRACE, "-f", "-qq", "-o", trace, sys.executable, "-c", TRACE_HASH_NICE],
            cwd=top,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        module, base, niced = result.stdout.split()
        self.assertTrue(
            module.startswith(os.path.join(top, "securechatd") + os.sep), module
        )
        self.assertEqual(int(niced), min(19, int(base) + 10))
        with open(trace) as f:
            calls = {
                match.group(1)
                for match in re.finditer(r"^\d+\s+([a-z_][a-z0-9_]*)\(", f.read(), re.M)
            }
        self.assertIn("execve", calls)  # the trace is a trace
        self.assertEqual(sorted(set(HASH_NICE_SYSCALLS) - calls), [])
        self.assertEqual(sorted(calls - self.filter.allowed(calls)), [])
