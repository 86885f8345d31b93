"""The installed `twistd -n securechatd`, run as a subprocess the way a user runs it."""

import os
import subprocess

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from securechatd import commands
from tests.helpers import TWISTD, connected_client, environment, spawn_daemon

PASSWORD = "correct horse battery"


class TwistdTests(unittest.TestCase):
    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.config = os.path.join(self.directory, "securechatd.ini")
        with open(self.config, "w") as f:
            f.write("[server]\nport = 0\n[accounts]\nbcrypt_cost = 10\n")

    def spawn(self, *arguments):
        return spawn_daemon(self, reactor, self.config, self.directory, *arguments)
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
