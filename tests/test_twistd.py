"""The installed `twistd -n securechatd`, run as a subprocess the way a user runs it."""

import os
import re
import subprocess
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.trial import unittest

from securechatd import commands
from tests.helpers import connected_client

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
PASSWORD = "correct horse battery"


class DaemonProcess(ProcessProtocol):
    """Collects output; `listening` fires with the port, `ended` with (exit code, signal)."""

    def __init__(self):
        self.output = b""
        self.listening = Deferred()
        self.ended = Deferred()

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


def environment():
    """The test's environment without any path that would import the source tree."""
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


class TwistdTests(unittest.TestCase):
    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.config = os.path.join(self.directory, "securechatd.ini")
        with open(self.config, "w") as f:
            f.write("[server]\nport = 0\n[accounts]\nbcrypt_cost = 10\n")

    def spawn(self, *arguments):
        daemon = DaemonProcess()
        process = reactor.spawnProcess(
            daemon,
            TWISTD,
            [TWISTD, "--nodaemon", "--pidfile=", "securechatd", "--config", self.config, *arguments],
            env=environment(),
            path=self.directory,
        )

        def stop():
            if not daemon.ended.called:
                process.signalProcess("KILL")
            return daemon.ended

        self.addCleanup(stop)
        return process, daemon

    def run_twistd(self, *arguments):
        """Run the daemon to completion (for start-up failures)."""
        return subprocess.run(
            [TWISTD, "--nodaemon", "--pidfile=", "securechatd", "--config", self.config, *arguments],
            capture_output=True,
            text=True,
            timeout=60,
            env=environment(),
            cwd=self.directory,
        )

    def test_twistd_lists_the_plugin(self):
        listing = subprocess.run(
            [TWISTD, "--help"], capture_output=True, text=True, timeout=60, env=environment()
        )
        self.assertIn("securechatd", listing.stdout)

    @inlineCallbacks
    def test_register_login_and_clean_stop(self):
        process, daemon = self.spawn()
        port = yield daemon.listening
        self.assertIn(b"DEVELOPMENT certificates", daemon.output)
        ca = os.path.join(self.directory, "certs", "ca.pem")
        client = yield connected_client(self, reactor, port, ca)
        yield client.callRemote(commands.Register, username="alice", password=PASSWORD)
        answer = yield client.callRemote(commands.Login, username="alice", password=PASSWORD)
        self.assertEqual(answer["username"], "alice")
        process.signalProcess("TERM")
        code, killed_by = yield daemon.ended
        self.assertEqual((code, killed_by), (0, None))
        self.assertIn(b"Server Shut Down", daemon.output)
        self.assertNotIn(b"Traceback", daemon.output)
        self.assertNotIn(PASSWORD.encode(), daemon.output)
        self.assertTrue(os.path.exists(os.path.join(self.directory, "securechatd.sqlite")))

    def test_bad_setting_is_one_line(self):
        with open(self.config, "a") as f:
            f.write("[database]\ndurability = sometimes\n")
        ran = self.run_twistd()
        self.assertEqual(ran.returncode, 1)
        self.assertEqual(
            ran.stderr,
            f"securechatd: {self.config}: [database] durability: must be one of normal, full,"
            " not 'sometimes'\n",
        )

    @inlineCallbacks
    def test_port_in_use_is_one_line(self):
        _, first = self.spawn()
        port = yield first.listening
        ran = self.run_twistd("--port", str(port))
        self.assertNotEqual(ran.returncode, 0)
        self.assertIn(f"cannot listen on 127.0.0.1 port {port}", ran.stdout + ran.stderr)
        self.assertNotIn("Traceback", ran.stdout + ran.stderr)
