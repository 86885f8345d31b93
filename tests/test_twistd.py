"""`twistd -n securechatd` run as a subprocess the way a user runs it, on the tree under test.

CodeUnderTestTests proves that child processes run the tree these tests
import, not the copy `pip install .` left in site-packages.
"""

import os
import shutil
import stat
import subprocess
import sys

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

import securechatd
from securechatd import commands
from tests.helpers import SECURECHAT, SOURCE_ROOT, connected_client, environment, make_store, spawn_daemon, twistd
from tests.test_totp_key import enable_two_factor

PASSWORD = "correct horse battery"
NOW = 1_700_000_000


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
            twistd("--nodaemon", "--pidfile=", "securechatd", "--config", self.config, *arguments),
            capture_output=True,
            text=True,
            timeout=60,
            env=environment(),
            cwd=self.directory,
        )

    def test_twistd_lists_the_plugin(self):
        listing = subprocess.run(twistd("--help"), capture_output=True, text=True, timeout=60, env=environment())
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

    @inlineCallbacks
    def test_sigterm_as_soon_as_it_listens_is_a_clean_stop(self):
        """The "listening" line comes once twistd handles SIGTERM (it once came before, and the signal killed it)."""
        for _ in range(3):
            process, daemon = self.spawn()
            yield daemon.listening
            process.signalProcess("TERM")
            self.assertEqual((yield daemon.ended), (0, None))

    def test_bad_setting_is_one_line(self):
        with open(self.config, "a") as f:
            f.write("[database]\ndurability = sometimes\n")
        ran = self.run_twistd()
        self.assertEqual(ran.returncode, 1)
        self.assertIn("--database=", ran.stdout)  # twistd shows the options with the problem
        self.assertTrue(
            ran.stdout.rstrip().endswith(
                f"{self.config}: [database] durability: must be one of normal, full, not 'sometimes'"
            ),
            ran.stdout,
        )
        self.assertNotIn("Traceback", ran.stdout + ran.stderr)

    def two_factor_database(self, enabled):
        """The daemon's database with alice's TOTP secret sealed under a key on no disk: on if `enabled`,
        else an enrolment begun only. The path of the TOTP key the daemon looks for."""
        store = make_store(self, os.path.join(self.directory, "securechatd.sqlite"))
        self.successResultOf(store.create_user("alice", "a bcrypt hash", NOW))
        key = os.urandom(32)
        if enabled:
            enable_two_factor(self, store, "alice", key, NOW)
        else:
            self.successResultOf(store.begin_two_factor("alice", b"sealed under the lost key", NOW))
        store.close()
        return os.path.join(self.directory, "certs", "totp.key")

    def test_a_lost_totp_key_stops_start_up_with_one_line(self):
        key = self.two_factor_database(enabled=True)
        ran = self.run_twistd()
        self.assertEqual(ran.returncode, 1)
        output = ran.stdout + ran.stderr
        told = [line for line in output.splitlines() if "totp.key" in line]
        self.assertEqual(len(told), 1, output)
        self.assertTrue(told[0].startswith("securechatd: the TOTP key certs/totp.key is missing"), told[0])
        for words in ("(1 users)", "restore it from its backup", "[accounts] totp_key", "2fa USER --disable"):
            self.assertIn(words, told[0])
        self.assertNotIn("Traceback", output)
        self.assertFalse(os.path.exists(key))  # nothing made: no new key, nor the signing key after it
        self.assertFalse(os.path.exists(os.path.join(self.directory, "certs", "signing.key")))

    @inlineCallbacks
    def test_a_first_start_makes_the_totp_key(self):
        """An enrolment begun but never switched on protects nobody: it does not hold the key back."""
        key = self.two_factor_database(enabled=False)
        process, daemon = self.spawn()
        yield daemon.listening
        self.assertEqual(stat.S_IMODE(os.stat(key).st_mode), 0o600)
        self.assertEqual(os.path.getsize(key), 32)
        process.signalProcess("TERM")
        yield daemon.ended

    @inlineCallbacks
    def test_port_in_use_is_one_line(self):
        _, first = self.spawn()
        port = yield first.listening
        ran = self.run_twistd("--port", str(port))
        self.assertNotEqual(ran.returncode, 0)
        self.assertIn(f"cannot listen on 127.0.0.1 port {port}", ran.stdout + ran.stderr)
        self.assertNotIn("Traceback", ran.stdout + ran.stderr)


CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPORTED_FROM = 'import sys\nsys.stderr.write(f"securechatd imported from {__file__}\\n")\n'


class CodeUnderTestTests(unittest.TestCase):
    """Child processes run the tree these tests import, never the copy installed in site-packages.

    A changed copy of the tree stands for the code under test: what the
    children do shows which securechatd and which twistd plugin they loaded.
    """

    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def tree(self):
        """A copy of the tree under test (securechatd and twisted/plugins) whose securechatd reports its file."""
        root = os.path.abspath(self.mktemp())
        ignore = shutil.ignore_patterns("__pycache__", "dropin.cache")
        for part in ("securechatd", os.path.join("twisted", "plugins")):
            shutil.copytree(os.path.join(SOURCE_ROOT, part), os.path.join(root, part), ignore=ignore)
        self.change(root, "securechatd/__init__.py", append=IMPORTED_FROM)
        return root

    def change(self, root, path, append="", old=None, new=None):
        path = os.path.join(root, *path.split("/"))
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if old is not None:
            self.assertIn(old, text)
            text = text.replace(old, new)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text + append)

    def test_the_tests_import_the_checkout(self):
        self.assertEqual(SOURCE_ROOT, CHECKOUT)
        ran = subprocess.run(
            [sys.executable, "-c", "import securechatd; print(securechatd.__file__)"],
            capture_output=True, text=True, timeout=60, env=environment(), cwd=self.directory,
        )
        self.assertEqual(ran.stdout, os.path.join(CHECKOUT, "securechatd", "__init__.py") + "\n")
        self.assertEqual(os.path.abspath(securechatd.__file__), os.path.join(CHECKOUT, "securechatd", "__init__.py"))

    @inlineCallbacks
    def test_the_daemon_runs_the_trees_makeService(self):
        root = self.tree()
        self.change(root, "securechatd/tap.py", append='\n\ndef makeService(options):\n    raise RuntimeError("the broken makeService under test")\n')
        config = os.path.join(self.directory, "securechatd.ini")
        with open(config, "w") as f:
            f.write("[server]\nport = 0\n")
        _, daemon = spawn_daemon(self, reactor, config, self.directory, root=root)
        failure = yield self.assertFailure(daemon.listening, RuntimeError)
        self.assertIn("securechatd imported from " + os.path.join(root, "securechatd", "__init__.py"), str(failure))
        self.assertIn("RuntimeError: the broken makeService under test", str(failure))

    def test_twistd_finds_the_trees_plugin(self):
        root = self.tree()
        self.change(root, "twisted/plugins/securechatd_plugin.py", old='"A secure chat daemon', new='"The plugin under test')
        listing = subprocess.run(
            twistd("--help", root=root), capture_output=True, text=True, timeout=60, env=environment(root), cwd=self.directory
        )
        self.assertIn("The plugin under test", listing.stdout)

    def test_the_client_runs_the_tree(self):
        root = self.tree()
        ran = subprocess.run(
            [SECURECHAT, "--help"], capture_output=True, text=True, timeout=60, env=environment(root), cwd=self.directory
        )
        self.assertEqual(ran.returncode, 0, ran.stderr)
        self.assertIn("securechatd imported from " + os.path.join(root, "securechatd", "__init__.py"), ran.stderr)
