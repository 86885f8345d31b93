"""The daemon as twistd builds it: options, start-up checks, and real TLS on 127.0.0.1."""

import dataclasses
import os
import sqlite3
import stat
import threading

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectionClosed
from twisted.internet.threads import deferToThreadPool
from twisted.python import usage
from twisted.trial import unittest
from OpenSSL.SSL import Error as TLSError

from securechatd import commands, config, tap
from securechatd.certs import write_certs
from securechatd.commands import BadCredentials
from securechatd.server.services import ThreadPoolService
from securechatd.store.migrations import LATEST
from tests.helpers import connected_client, when_lost, wall_now

PASSWORD = "correct horse battery"


def capture_stderr(testcase):
    """The lines tap writes to stderr during the test."""
    lines = []
    testcase.patch(tap.sys, "stderr", type("Stderr", (), {"write": lambda self, s: lines.append(s)})())
    return lines


def parse(argv):
    options = tap.Options()
    options.parseOptions(argv)
    return options


class OptionsTests(unittest.TestCase):
    """A bad option or value is a UsageError naming it: twistd prints it with the usage, status 1."""

    def assertStops(self, argv, *expected):
        with self.assertRaises(usage.UsageError) as stopped:
            parse(argv)
        line = str(stopped.exception)
        self.assertNotIn("\n", line)
        for text in expected:
            self.assertIn(text, line)

    def test_defaults(self):
        self.assertEqual(parse([])["settings"], config.Settings())

    def test_command_line_wins_over_config(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[server]\nport = 6000\ninterface = ::\n[database]\npath = from-config.sqlite\n")
        settings = parse(["--config", path, "--port", "7000", "--database", "cli.sqlite"])["settings"]
        self.assertEqual((settings.port, settings.interface, settings.database), (7000, "::", "cli.sqlite"))

    def test_bad_port(self):
        self.assertStops(["--port", "http"], "--port", "'http'")
        self.assertStops(["--port", "70000"], "--port", "65535")

    def test_bad_interface(self):
        self.assertStops(["--interface", "localhost"], "--interface", "IP address")

    def test_unknown_option(self):
        self.assertStops(["--prot", "5"], "prot")

    def test_bad_config_value(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[accounts]\nbcrypt_cost = 8\n")
        self.assertStops(["--config", path], "[accounts] bcrypt_cost", "from 10 to 20", "'8'")

    def test_missing_config_file(self):
        self.assertStops(["--config", "/nonexistent/securechatd.ini"], "/nonexistent/securechatd.ini")


class DaemonTests(unittest.TestCase):
    """makeService's daemon on 127.0.0.1:0, spoken to over real TLS sockets."""

    def setUp(self):
        base = self.mktemp()
        os.makedirs(base)
        self.certs = os.path.join(base, "certs")
        self.settings = config.Settings(
            port=0, certs=self.certs, database=os.path.join(base, "chat.sqlite"), bcrypt_cost=10
        )

    def start(self):
        self.daemon = daemon = tap.build(self.settings, reactor)
        daemon.startService()
        self.addCleanup(lambda: daemon.running and daemon.stopService())
        return self.daemon.getServiceNamed("listener").port.getHost().port

    def connect(self, port, hostname="localhost", ca=None):
        ca = ca or os.path.join(self.certs, "ca.pem")
        return connected_client(self, reactor, port, ca, hostname)

    def test_sessions_are_checked_against_the_database_on_the_settings_period(self):
        from twisted.application.internet import TimerService

        self.settings = dataclasses.replace(self.settings, session_check=7.5)
        self.start()
        [checks] = [s for s in self.daemon if isinstance(s, TimerService)]
        self.assertEqual((checks.step, checks.clock), (7.5, reactor))

    def test_first_run_creates_dev_certificates(self):
        self.start()
        for name in ("ca.key", "server.key"):
            mode = stat.S_IMODE(os.stat(os.path.join(self.certs, name)).st_mode)
            self.assertEqual(mode, 0o600, name)
        with open(os.path.join(self.certs, "server.pem"), "rb") as f:
            before = f.read()
        self.start()  # a second start keeps what is there
        with open(os.path.join(self.certs, "server.pem"), "rb") as f:
            self.assertEqual(f.read(), before)

    @inlineCallbacks
    def test_bcrypt_threads_run_at_hash_nice(self):
        self.settings = dataclasses.replace(self.settings, hash_nice=3)
        self.start()
        [pool] = [service.pool for service in self.daemon if isinstance(service, ThreadPoolService)]

        def niceness():
            return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

        self.assertEqual((yield deferToThreadPool(reactor, pool, niceness)), min(19, niceness() + 3))

    @inlineCallbacks
    def test_accounts_over_tls(self):
        port = self.start()
        alice = yield self.connect(port)
        answer = yield alice.callRemote(commands.Register, username="Alice", password=PASSWORD)
        self.assertEqual(answer["username"], "alice")
        with self.assertRaises(BadCredentials):
            yield alice.callRemote(commands.Login, username="alice", password="wrong password")
        login = yield alice.callRemote(commands.Login, username="alice", password=PASSWORD)
        yield alice.callRemote(commands.Ping)

        laptop = yield self.connect(port, hostname="127.0.0.1")
        resumed = yield laptop.callRemote(
            commands.Resume, username="alice", resume_token=login["resume_token"], client_name="laptop"
        )
        self.assertEqual(resumed["username"], "alice")
        lost = when_lost(alice)
        yield laptop.callRemote(
            commands.ChangePassword, old_password=PASSWORD, new_password="another password"
        )
        yield lost  # the other session's connection was closed
        yield laptop.callRemote(commands.Logout)
        yield laptop.callRemote(commands.Login, username="alice", password="another password")

    @inlineCallbacks
    def test_untrusted_server_refused_before_sending(self):
        port = self.start()
        other = self.mktemp()
        write_certs(other, ["localhost"], ["127.0.0.1"], now=wall_now())
        with self.assertRaises((TLSError, ConnectionClosed)):
            client = yield self.connect(port, ca=os.path.join(other, "ca.pem"))
            yield client.callRemote(commands.Ping)

    @inlineCallbacks
    def test_wrong_hostname_refused(self):
        port = self.start()
        with self.assertRaises(Exception) as refused:
            client = yield self.connect(port, hostname="chat.example.org")
            yield client.callRemote(commands.Ping)
        self.assertNotIsInstance(refused.exception, commands.ChatError)

    @inlineCallbacks
    def test_listen_endpoint_instead_of_port(self):
        self.settings = config.Settings(
            listen="tcp:0:interface=127.0.0.1", port=1, certs=self.certs, database=self.settings.database
        )
        port = self.start()
        client = yield self.connect(port)
        answer = yield client.callRemote(commands.Ping)
        self.assertIn("server_time", answer)

    def test_bad_listen_endpoint_is_one_line(self):
        self.settings = config.Settings(listen="carrier-pigeon:7", certs=self.certs)
        options = {"settings": self.settings}
        stderr = capture_stderr(self)
        self.assertRaises(SystemExit, tap.makeService, options, reactor)
        [line] = stderr
        self.assertIn("[server] listen (--listen): 'carrier-pigeon:7'", line)

    @inlineCallbacks
    def test_stop_answers_commands_in_flight_then_closes(self):
        port = self.start()
        idle = yield self.connect(port)
        busy = yield self.connect(port)
        yield busy.callRemote(commands.Register, username="alice", password=PASSWORD)
        idle_lost, busy_lost = when_lost(idle), when_lost(busy)
        hub = self.daemon.getServiceNamed("listener").factory.wrappedFactory.hub
        hashing, run = Deferred(), hub.accounts.hasher._run
        hub.accounts.hasher._run = lambda *job: hashing.callback(None) or run(*job)
        login = busy.callRemote(commands.Login, username="alice", password=PASSWORD)
        yield hashing  # the Login is in flight on the server
        stopped = self.daemon.stopService()
        answer = yield login
        self.assertEqual(answer["username"], "alice")
        yield idle_lost
        yield busy_lost
        yield stopped
        self.assertFalse(self.daemon.getServiceNamed("listener").running)

    def test_database_is_migrated_and_durable(self):
        self.start()
        with sqlite3.connect(self.settings.database) as db:
            self.assertEqual(db.execute("PRAGMA journal_mode").fetchone()[0], "wal")
            self.assertEqual(db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0], LATEST)
