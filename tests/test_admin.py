"""`securechatd-admin`: certificates in-process, accounts as the installed command.

The account commands run under task.react, which starts and stops the global
reactor; trial's reactor is already running, so they are run as the operator
runs them: the installed console script, in a subprocess.
"""

import io
import ipaddress
import os
import re
import sqlite3
import stat
import subprocess
import sys

from cryptography import x509
from twisted.internet import defer
from twisted.trial import unittest

import securechatd
from securechatd import admin
from securechatd.e2ee import transcript
from securechatd.server.chain import load_server_key
from securechatd.server.passwords import PasswordHasher
from securechatd.store.dialect import connect
from securechatd.store.migrations import LATEST, upgrade

ADMIN = os.path.join(os.path.dirname(sys.executable), "securechatd-admin")
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(securechatd.__file__)))
FILES = ("ca.pem", "ca.key", "server.pem", "server.key")
PASSWORD = "correct horse battery"
ONE_ERROR_LINE = re.compile(r"securechatd-admin: [^\n]+\n\Z")


def snapshot(directory):
    result = {}
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            result[name] = f.read()
    return result


def verify(password, hashed):
    """Whether `password` matches a stored hash, checked the way the daemon checks it."""
    outcome = []
    PasswordHasher(4, defer.maybeDeferred).verify(password, hashed).addBoth(outcome.append)
    return outcome[0]


class CertsCase(unittest.TestCase):
    """`certs` writes files into `self.dir` and returns; it runs in-process."""

    def setUp(self):
        self.dir = os.path.join(self.mktemp(), "certs")
        self.stderr = io.StringIO()
        self.patch(admin.sys, "stderr", self.stderr)

    def run_admin(self, *argv):
        out = io.StringIO()
        status = admin.run(list(argv), out)
        return status, out.getvalue(), self.stderr.getvalue()


class CertsTests(CertsCase):

    def certs(self, *extra):
        return self.run_admin(
            "certs", "--dir", self.dir, "--hostname", "chat.example.org", "--ip", "192.0.2.1", *extra
        )

    def assertOneLineError(self, result, *fragments):
        status, out, err = result
        self.assertEqual(status, 1)
        self.assertEqual(out, "")
        self.assertRegex(err, ONE_ERROR_LINE)
        for fragment in fragments:
            self.assertIn(fragment, err)
        self.assertNotIn("Traceback", err)

    def test_writes_certificates(self):
        status, out, err = self.certs()
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(out, "".join(f"wrote {os.path.join(self.dir, name)}\n" for name in FILES))
        self.assertEqual(sorted(os.listdir(self.dir)), sorted(FILES))
        for name in ("ca.key", "server.key"):
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.dir, name)).st_mode), 0o600, name)

        with open(os.path.join(self.dir, "server.pem"), "rb") as f:
            server = x509.load_pem_x509_certificate(f.read())
        with open(os.path.join(self.dir, "ca.pem"), "rb") as f:
            ca = x509.load_pem_x509_certificate(f.read())
        names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(names.get_values_for_type(x509.DNSName), ["chat.example.org"])
        self.assertEqual(names.get_values_for_type(x509.IPAddress), [ipaddress.ip_address("192.0.2.1")])
        self.assertEqual(server.issuer, ca.subject)
        server.verify_directly_issued_by(ca)

    def test_several_names(self):
        status, _, _ = self.run_admin(
            "certs", "--dir", self.dir, "--hostname", "chat.example.org", "--hostname", "chat",
            "--ip", "192.0.2.1", "--ip", "2001:db8::1",
        )
        self.assertEqual(status, 0)
        with open(os.path.join(self.dir, "server.pem"), "rb") as f:
            names = x509.load_pem_x509_certificate(f.read()).extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value
        self.assertEqual(names.get_values_for_type(x509.DNSName), ["chat.example.org", "chat"])
        self.assertEqual(
            names.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("2001:db8::1")],
        )

    def test_never_overwrites(self):
        self.assertEqual(self.certs()[0], 0)
        before = snapshot(self.dir)
        self.stderr.truncate(0)
        self.stderr.seek(0)
        self.assertOneLineError(self.certs(), "already exists")
        self.assertEqual(snapshot(self.dir), before)

    def test_never_overwrites_a_single_existing_file(self):
        os.makedirs(self.dir)
        with open(os.path.join(self.dir, "server.key"), "wb") as f:
            f.write(b"a real key")
        self.assertOneLineError(self.certs(), "server.key")
        self.assertEqual(snapshot(self.dir), {"server.key": b"a real key"})

    def test_hostname_required(self):
        self.assertOneLineError(self.run_admin("certs", "--dir", self.dir), "--hostname")
        self.assertFalse(os.path.exists(self.dir))

    def test_bad_ip(self):
        result = self.run_admin(
            "certs", "--dir", self.dir, "--hostname", "chat.example.org", "--ip", "192.0.2.300"
        )
        self.assertOneLineError(result, "192.0.2.300")
        self.assertFalse(os.path.exists(self.dir))

    def test_empty_hostname(self):
        result = self.run_admin("certs", "--dir", self.dir, "--hostname", "")
        self.assertOneLineError(result)
        self.assertFalse(os.path.exists(os.path.join(self.dir, "ca.pem")))

    def test_bad_and_long_hostnames(self):
        self.assertOneLineError(
            self.run_admin("certs", "--dir", self.dir, "--hostname", "bad name!"), "bad name!"
        )
        long_name = ".".join(["a" * 60] * 3)
        self.assertEqual(self.run_admin("certs", "--dir", self.dir, "--hostname", long_name)[0], 0)

    def test_no_command(self):
        self.assertOneLineError(self.run_admin(), "command")

    def test_unknown_command(self):
        self.assertOneLineError(self.run_admin("frobnicate"), "frobnicate")

    def test_missing_config_file(self):
        missing = os.path.join(self.mktemp(), "nope.ini")
        self.assertOneLineError(self.run_admin("--config", missing, "users"), "nope.ini")


class ServerKeyTests(unittest.TestCase):
    """`server-key` prints the key the daemon signs chain heads with, and its id (what GetServerKey answers)."""

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.config = os.path.join(self.dir, "securechatd.ini")
        with open(self.config, "w") as f:
            f.write(f"[server]\ncerts = {self.dir}\n")
        self.stderr = io.StringIO()
        self.patch(admin.sys, "stderr", self.stderr)

    def test_prints_the_daemons_key_and_id(self):
        key = load_server_key(os.path.join(self.dir, "signing.key"))  # as the daemon makes it at first start
        public = key.public_key().public_bytes_raw()
        out = io.StringIO()
        self.assertEqual(admin.run(["--config", self.config, "server-key"], out), 0)
        self.assertEqual(
            out.getvalue(), f"key    {public.hex()}\nkey id {transcript.readable_key_id(transcript.server_key_id(public))}\n"
        )

    def test_before_the_daemon_made_one(self):
        out = io.StringIO()
        self.assertEqual(admin.run(["--config", self.config, "server-key"], out), 1)
        self.assertIn("the daemon makes it when it first starts", self.stderr.getvalue())
        self.assertFalse(os.path.exists(os.path.join(self.dir, "signing.key")))


class AccountCommandTests(unittest.TestCase):
    """adduser, passwd, deluser and users, run as the installed command."""

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.database = os.path.join(self.dir, "chat.sqlite")
        self.config = os.path.join(self.dir, "securechatd.ini")
        with open(self.config, "w") as f:
            f.write(f"[database]\npath = {self.database}\n\n[accounts]\nbcrypt_cost = 10\n")

    def admin(self, *argv, input=""):
        # The installed script, importing the securechatd these tests import
        # (a non-editable install is otherwise a stale copy during development).
        environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        environment["PYTHONPATH"] = SOURCE_ROOT
        result = subprocess.run(
            [ADMIN, "--config", self.config, *argv],
            input=input,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.dir,
            env=environment,
        )
        for stream in (result.stdout, result.stderr):
            self.assertNotIn("Traceback", stream)
            if input.strip():
                self.assertNotIn(input.strip(), stream)
        return result

    def assertOneLineError(self, result, *fragments):
        self.assertEqual(result.returncode, 1, result)
        self.assertEqual(result.stdout, "")
        self.assertRegex(result.stderr, ONE_ERROR_LINE)
        for fragment in fragments:
            self.assertIn(fragment, result.stderr)

    def db(self):
        """A connection to the database, migrated as the daemon leaves it."""
        connection = connect(self.database)
        self.addCleanup(connection.close)
        upgrade(connection, self.database, 0)
        return connection

    def populate(self, users=(), tokens=()):
        """Insert users {name: hash} and tokens (name, session, token_hash), then close."""
        connection = connect(self.database)
        try:
            upgrade(connection, self.database, 0)
            for name, hashed in users:
                connection.execute(
                    "INSERT INTO users (username, password_hash, created_at, password_changed_at)"
                    " VALUES (?, ?, 1, 1)",
                    (name, hashed),
                )
            for name, session, token in tokens:
                connection.execute(
                    "INSERT INTO resume_tokens (token_hash, user_id, session_id, created_at, expires_at)"
                    " SELECT ?, id, ?, 1, 4e9 FROM users WHERE username = ?",
                    (token, session, name),
                )
        finally:
            connection.close()

    def users(self):
        return self.db().execute("SELECT username, password_hash FROM users ORDER BY username").fetchall()

    def deleted(self):
        return [name for (name,) in self.db().execute("SELECT username FROM users WHERE deleted_at IS NOT NULL")]

    def tokens(self):
        return self.db().execute(
            "SELECT username, token_hash FROM resume_tokens JOIN users ON users.id = user_id"
            " ORDER BY token_hash"
        ).fetchall()

    def test_invite_with_the_default_lifetime(self):
        result = self.admin("invite")
        self.assertEqual(result.returncode, 0, result)
        [invitation] = result.stdout.split()[-1:]
        self.assertGreaterEqual(len(invitation), 20)
        [(created, expires)] = self.db().execute("SELECT created_at, expires_at FROM invites").fetchall()
        self.assertEqual(expires - created, 7 * 86400)

    def test_the_database_is_private(self):
        self.admin("users")
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(self.database + suffix):
                self.assertEqual(stat.S_IMODE(os.stat(self.database + suffix).st_mode), 0o600, suffix)

    def test_adduser(self):
        result = self.admin("adduser", "Alice", input=PASSWORD + "\n")
        self.assertEqual((result.returncode, result.stdout, result.stderr), (0, "created alice\n", ""))
        [(name, hashed)] = self.users()
        self.assertEqual(name, "alice")
        self.assertTrue(hashed.startswith("$2b$10$"), hashed)
        self.assertNotIn(PASSWORD, hashed)
        self.assertTrue(verify(PASSWORD, hashed))
        self.assertFalse(verify(PASSWORD + "!", hashed))
        self.assertEqual(
            self.db().execute("SELECT MAX(version) FROM schema_version").fetchone(), (LATEST,)
        )

    def test_adduser_existing(self):
        self.populate(users=[("alice", "$2b$10$original")])
        result = self.admin("adduser", "ALICE", input="another password\n")
        self.assertOneLineError(result, "alice")
        self.assertEqual(self.users(), [("alice", "$2b$10$original")])

    def test_adduser_weak_password(self):
        result = self.admin("adduser", "alice", input="short\n")
        self.assertOneLineError(result, "8")
        self.assertEqual(self.users(), [])

    def test_bad_username(self):
        result = self.admin("adduser", "b@d name", input=PASSWORD + "\n")
        self.assertOneLineError(result, "Usernames")
        self.assertEqual(self.users(), [])

    def test_users_sorted(self):
        self.populate(users=[("carol", "h"), ("alice", "h"), ("bob", "h")])
        result = self.admin("users")
        self.assertEqual((result.returncode, result.stdout, result.stderr), (0, "alice\nbob\ncarol\n", ""))

    def test_passwd(self):
        self.populate(
            users=[("alice", "$2b$10$old"), ("bob", "$2b$10$bobs")],
            tokens=[("alice", "s1", "alice-1"), ("alice", "s2", "alice-2"), ("bob", "s1", "bob-1")],
        )
        new = "a new passphrase"
        result = self.admin("passwd", "alice", input=new + "\n")
        self.assertEqual(result.returncode, 0, result)
        self.assertEqual(result.stderr, "")
        self.assertIn("alice", result.stdout)
        users = dict(self.users())
        self.assertEqual(users["bob"], "$2b$10$bobs")
        self.assertTrue(users["alice"].startswith("$2b$10$"), users["alice"])
        self.assertTrue(verify(new, users["alice"]))
        self.assertNotIn(new, users["alice"])
        self.assertEqual(self.tokens(), [("bob", "bob-1")])

    def test_passwd_unknown_user(self):
        self.populate(users=[("alice", "$2b$10$old")])
        result = self.admin("passwd", "nobody", input="a new passphrase\n")
        self.assertOneLineError(result, "nobody")
        self.assertEqual(self.users(), [("alice", "$2b$10$old")])

    def test_deluser(self):
        self.populate(
            users=[("alice", "h"), ("bob", "h")],
            tokens=[("alice", "s1", "alice-1"), ("bob", "s1", "bob-1")],
        )
        result = self.admin("deluser", "alice")
        self.assertEqual((result.returncode, result.stdout, result.stderr), (0, "deleted alice\n", ""))
        self.assertEqual(self.users(), [("alice", ""), ("bob", "h")])  # the name stays taken
        self.assertEqual(self.deleted(), ["alice"])
        self.assertEqual(self.admin("users").stdout, "bob\n")
        self.assertEqual(self.tokens(), [("bob", "bob-1")])
        self.assertEqual(self.db().execute("SELECT COUNT(*) FROM resume_tokens").fetchone(), (1,))

    def test_passwd_of_a_deleted_user_fails_and_it_stays_deleted(self):
        self.populate(users=[("alice", "$2b$10$old"), ("bob", "h")])
        self.assertEqual(self.admin("deluser", "alice").returncode, 0)
        result = self.admin("passwd", "alice", input="a new passphrase\n")
        self.assertOneLineError(result, "no such user: alice")
        self.assertEqual(self.users(), [("alice", ""), ("bob", "h")])
        self.assertEqual(self.deleted(), ["alice"])
        self.assertEqual(self.admin("users").stdout, "bob\n")

    def test_deluser_unknown(self):
        self.populate(users=[("bob", "h")])
        result = self.admin("deluser", "alice")
        self.assertOneLineError(result, "alice")
        self.assertEqual(self.users(), [("bob", "h")])

    def test_newer_database_refused(self):
        self.populate(users=[("alice", "h")])
        connection = sqlite3.connect(self.database)
        with connection:
            connection.execute("INSERT INTO schema_version VALUES (?, 'future', 0)", (LATEST + 1,))
        connection.close()
        result = self.admin("users")
        self.assertOneLineError(result, str(LATEST + 1))
