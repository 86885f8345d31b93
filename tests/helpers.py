"""Shared test fixtures: real SQLite without threads, fast bcrypt, in-memory connections."""

import os
import re
import sys
from dataclasses import replace
from datetime import datetime, timezone

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.enterprise import adbapi
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test import iosim

import securechatd
from securechatd import commands, tap
from securechatd.client.library import ChatClient
from securechatd.config import Settings
from securechatd.tls import client_options
from securechatd.server.passwords import PasswordHasher
from securechatd.server.connection import ChatProtocol, ConnectionLimits
from securechatd.store import Store
from securechatd.store.migrations import upgrade
from securechatd.store.dialect import connect, open_pool

def wall_now():
    """The real reactor's time as a UTC datetime: for certificates that real TLS checks against the real clock."""
    from twisted.internet import reactor

    return datetime.fromtimestamp(reactor.seconds(), timezone.utc)


# bcrypt's minimum cost: the rules are the same, the tests are 250x faster.
TEST_COST = 4


class _NoThreadsReactor:
    """What adbapi asks of a reactor, for a pool that never starts threads."""

    def callWhenRunning(self, f, *args, **kw):
        return None

    def addSystemEventTrigger(self, *args, **kw):
        return None

    def removeSystemEventTrigger(self, trigger):
        pass


class SyncPool(adbapi.ConnectionPool):
    """adbapi's real pool and transactions over real SQLite, run at once on this thread.

    Results are ready as soon as a call returns, so tests driven by iosim and
    task.Clock stay deterministic (Synapse tests its stores the same way).
    """

    def runInteraction(self, interaction, *args, **kw):
        return defer.maybeDeferred(self._runInteraction, interaction, *args, **kw)

    def runWithConnection(self, function, *args, **kw):
        return defer.maybeDeferred(self._runWithConnection, function, *args, **kw)


def make_store(testcase, path=None, busy_timeout=5.0):
    """A migrated Store on a fresh SQLite file, closed at the end of the test."""
    path = path or testcase.mktemp() + ".sqlite"
    connection = connect(path)
    upgrade(connection, path, 0)
    connection.close()
    store = Store(
        open_pool(path, busy_timeout=busy_timeout, reactor=_NoThreadsReactor(), pool_class=SyncPool)
    )
    testcase.addCleanup(store.close)
    return store


def run_now(f, *args):
    return defer.maybeDeferred(f, *args)


# The version 1 tests run with plaintext conversations allowed, as docs/PROTOCOL.md's
# "Version 2" promises them byte for byte; the daemon's default (refused) is tested on its own.
# So is presence: version 1 showed everyone's (issue 13 shows it to contacts by default).
V1 = {"plaintext": "allowed", "presence_scope": "everyone", "invitations": "off"}


def make_hub(testcase, clock=None, store=None, **changes):
    """Every service of the daemon (as tap.make_hub wires them) over one real SQLite file, driven by `clock`.

    `changes` are Settings fields; a test address may register 100 accounts;
    plaintext conversations are allowed unless `plaintext="refused"`.
    """
    settings = replace(
        Settings(), **{"registrations_per_address": 100, "registration_exempt": (), **V1, **changes}
    )
    return tap.make_hub(
        settings,
        store or make_store(testcase),
        PasswordHasher(TEST_COST, run_now),
        clock or task.Clock(),
        Ed25519PrivateKey.from_private_bytes(bytes(range(32))),  # (a fixed server key: tests are repeatable)
    )


class RecordingClient(amp.AMP):
    """A client that records every server push and answers it (its acknowledgement)."""

    def __init__(self, connection):
        super().__init__()
        self.connection = connection

    def locateResponder(self, name):
        command = PUSHES.get(name)
        if command is None:
            return super().locateResponder(name)
        connection = self.connection

        def respond(box):
            arguments = command.parseArguments(box, self)
            connection.pushes.append((name.decode(), arguments))
            answer = defer.Deferred()
            if command is commands.Ping:
                answer.callback({"server_time": EPOCH})
            elif connection.answering or command not in (commands.Deliver, commands.DeliverEncrypted):
                answer.callback({})
            else:
                connection.unanswered.append(answer)
            return answer.addCallback(lambda result: command.makeResponse(result, self))

        return respond


EPOCH = datetime.fromtimestamp(0, timezone.utc)
PUSHES = {
    command.commandName: command
    for command in (
        commands.Deliver,
        commands.DeliverEncrypted,
        commands.Receipt,
        commands.PresenceChanged,
        commands.ConversationUpdated,
        commands.TranscriptSigned,
        commands.DevicesChanged,
        commands.ModeChanged,
        commands.Invited,
        commands.InvitationAccepted,
    )
}
PUSHES[commands.Ping.commandName] = commands.Ping


LIMITS = ConnectionLimits.from_settings(Settings())


def settle(clock, conns, turns=3):
    """Let pushes scheduled for the next reactor turns go out and be answered, over in-memory connections."""
    for _ in range(turns):
        clock.advance(0)
        for conn in conns:
            conn.pump.flush()


class Connection:
    """A client AMP connection to a server ChatProtocol, pumped in memory.

    Pushes from the server land in `self.pushes` as (command name, arguments);
    the client answers them at once, except Delivers and DeliverEncrypteds when
    `answering` is False: those wait in `self.unanswered` for the test to answer.
    """

    def __init__(self, hub, address="10.0.0.1", ipv6=False, answering=True, limits=None):
        peer = (IPv6Address if ipv6 else IPv4Address)("TCP", address, 40000)
        self.pushes = []
        self.unanswered = []
        self.answering = answering
        self.client, self.server, self.pump = iosim.connectedServerAndClient(
            lambda: ChatProtocol(hub, hub.clock, limits or LIMITS),
            lambda: RecordingClient(self),
            serverTransportFactory=lambda protocol: iosim.FakeTransport(
                protocol, True, peerAddress=peer
            ),
        )

    def call(self, command, **arguments):
        """Send a command, deliver everything, return a Deferred of its answer.

        The outcome is captured before pumping: AMP drops the connection over
        an error that has no errback by the time it arrives.
        """
        outcome = []
        self.client.callRemote(command, **arguments).addBoth(outcome.append)
        self.pump.flush()
        if not outcome:
            return defer.Deferred()
        if isinstance(outcome[0], Failure):
            return defer.fail(outcome[0])
        return defer.succeed(outcome[0])

    def drop(self):
        self.client.transport.loseConnection()
        self.pump.flush()


def tls_connect(reactor, port, ca_path, hostname="localhost", protocol=None, **certificate):
    """A real TLS connection to 127.0.0.1:`port`, verifying `hostname` against the CA (`certificate`: the
    client_cert and client_key files to present, if any)."""
    endpoint = wrapClientTLS(
        client_options(ca_path, hostname, **certificate), TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10)
    )
    return connectProtocol(endpoint, protocol or amp.AMP())


def when_lost(protocol):
    """A Deferred that fires when `protocol`'s connection is closed."""
    lost = defer.Deferred()
    original = protocol.connectionLost

    def connectionLost(reason):
        original(reason)
        lost.callback(None)

    protocol.connectionLost = connectionLost
    return lost


@defer.inlineCallbacks
def connected_client(testcase, reactor, port, ca_path, hostname="localhost", **certificate):
    """tls_connect, closed (and waited for) at the end of the test."""
    client = yield tls_connect(reactor, port, ca_path, hostname, **certificate)
    lost = when_lost(client)

    def close():
        if not lost.called:
            client.transport.loseConnection()
        return lost

    testcase.addCleanup(close)
    return client


def chat_client(testcase, reactor, port, ca, install=None, base=None, **options):
    """A ChatClient of the daemon at 127.0.0.1:`port`, closed at the end of the test; `install` names its
    installation (client_name, and its state directory under `base`), None: none kept."""
    client = ChatClient(
        "127.0.0.1",
        port,
        ca,
        hostname="localhost",
        reactor=reactor,
        client_name=install or "plain",
        state_directory=os.path.join(base, install) if install else None,
        **options,
    )
    testcase.addCleanup(client.close)
    return client


def start_daemon(testcase, reactor, **settings):
    """The real daemon (tap.build) on 127.0.0.1:0 in this process: (port, CA file, hub).

    Plaintext conversations are allowed unless `plaintext="refused"`.
    """
    from securechatd import config, tap

    base = testcase.mktemp()
    os.makedirs(base)
    certs_dir = os.path.join(base, "certs")
    options = dict(
        port=0,
        certs=certs_dir,
        database=os.path.join(base, "chat.sqlite"),
        bcrypt_cost=10,
        message_burst=100_000,  # tests that are not about the rate limit send freely
        **V1,
    )
    options.update(settings)
    daemon = tap.build(config.Settings(**options), reactor)
    daemon.startService()
    testcase.addCleanup(daemon.stopService)
    listener = daemon.getServiceNamed("listener")
    hub = listener.factory.wrappedFactory.hub
    return listener.port.getHost().port, os.path.join(certs_dir, "ca.pem"), hub


# -- the daemon and the client as subprocesses -----------------------------------------
#
# A child process must run the code under test, not the copy `pip install .`
# left in site-packages: the venv's console scripts find the tree's
# securechatd through PYTHONPATH (environment()), and twistd finds the tree's
# plugin through twistd() below.

# The tree whose securechatd these tests import: the code under test.
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(securechatd.__file__)))
BIN = os.path.dirname(sys.executable)
SECURECHAT = os.path.join(BIN, "securechat")

# The venv's twistd script (twisted.scripts.twistd.run), with one difference:
# twisted.plugins searches its own directory in site-packages, where pip put a
# copy of our plugin, before those on sys.path; this searches the tree's first.
_TWISTD = (
    "import sys, twisted.plugins; "
    "twisted.plugins.__path__.insert(0, sys.argv.pop(1)); "
    "sys.argv[0] = 'twistd'; "
    "from twisted.scripts.twistd import run; "
    "sys.exit(run())"
)


# What a config file of a subprocess test adds so that its version 1 client works (see V1).
V1_CONFIG = "[messages]\nplaintext = allowed\n[privacy]\npresence = everyone\ninvitations = off\n"


def twistd(*arguments, root=SOURCE_ROOT):
    """argv running twistd with `arguments`, with root/twisted/plugins first in the plugin search.

    Run it with env=environment(root), so that the plugin imports root/securechatd.
    """
    return [sys.executable, "-c", _TWISTD, os.path.join(root, "twisted", "plugins"), *arguments]


class DaemonProcess(ProcessProtocol):
    """Collects output; `listening` fires with the port, `ended` with (exit code, signal)."""

    def __init__(self):
        self.output = b""
        self.listening = defer.Deferred()
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.output += data
        found = re.search(rb"securechatd listening on .*port=(\d+)", self.output)
        if found and not self.listening.called:
            self.listening.callback(int(found.group(1)))

    errReceived = outReceived

    def processEnded(self, reason):
        if not self.listening.called:
            self.listening.errback(RuntimeError(f"daemon exited early:\n{self.output.decode()}"))
        self.ended.callback((reason.value.exitCode, reason.value.signal))


def environment(root=SOURCE_ROOT):
    """The test's environment for a child process, with `root` (the tree under test) first on PYTHONPATH."""
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    return dict(os.environ, PYTHONPATH=os.pathsep.join([root] + [path for path in paths if path and path != root]))


def spawn_daemon(testcase, reactor, config, directory, *arguments, root=SOURCE_ROOT):
    """twistd running the securechatd of `root` with `config`: (process, DaemonProcess).

    Killed in cleanup if it is still running.
    """
    daemon = DaemonProcess()
    argv = twistd("--nodaemon", "--pidfile=", "securechatd", "--config", config, *arguments, root=root)
    process = reactor.spawnProcess(daemon, argv[0], argv, env=environment(root), path=directory)

    def stop():
        if not daemon.ended.called:
            try:
                process.signalProcess("KILL")
            except ProcessExitedAlready:  # exited; its output is still being read
                pass
        return daemon.ended

    testcase.addCleanup(stop)
    return process, daemon
