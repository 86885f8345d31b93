"""securechatd-admin's account security: `certs --client USER` in-process, `2fa USER [--disable]` as the installed command."""

import json
import os
import sqlite3
import stat

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.trial import unittest

from securechatd import accountlog
from securechatd.store.dialect import connect
from securechatd.store.migrations import upgrade
import tests.test_admin as admin_tests
from tests.test_admin import ONE_ERROR_LINE, CertsCase


class ClientCertTests(CertsCase):
    def test_a_client_certificate_for_an_account(self):
        self.assertEqual(self.run_admin("certs", "--dir", self.dir, "--hostname", "localhost")[0], 0)
        status, out, err = self.run_admin("certs", "--dir", self.dir, "--client", "Alice")
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(out.splitlines(), [f"wrote {self.dir}/alice.pem", f"wrote {self.dir}/alice.key"])
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.dir, "alice.key")).st_mode), 0o600)
        with open(os.path.join(self.dir, "alice.pem"), "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        with open(os.path.join(self.dir, "ca.pem"), "rb") as f:
            ca = x509.load_pem_x509_certificate(f.read())
        self.assertEqual(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, "alice")
        self.assertEqual(list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value), [ExtendedKeyUsageOID.CLIENT_AUTH])
        self.assertEqual(cert.issuer, ca.subject)
        ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
        before = open(os.path.join(self.dir, "alice.key"), "rb").read()
        status, out, err = self.run_admin("certs", "--dir", self.dir, "--client", "alice")
        self.assertEqual(status, 1)
        self.assertRegex(err, ONE_ERROR_LINE)
        self.assertIn("already exists", err)
        self.assertEqual(open(os.path.join(self.dir, "alice.key"), "rb").read(), before)

    def test_bad_requests(self):
        status, _, err = self.run_admin("certs", "--dir", self.dir, "--client", "alice")
        self.assertEqual(status, 1)
        self.assertIn("cannot read the CA", err)
        self.assertRegex(err, ONE_ERROR_LINE)
        for argv in (("--client", "al"), ("--client", "alice", "--hostname", "localhost")):
            self.stderr.truncate(0)
            status, out, err = self.run_admin("certs", "--dir", self.dir, *argv)
            self.assertEqual((status, out), (1, ""))
            self.assertNotIn("Traceback", err)


class TwoFactorAdminTests(unittest.TestCase):
    """As test_admin's account commands: the installed command, importing this tree."""

    setUp = admin_tests.AccountCommandTests.setUp
    admin = admin_tests.AccountCommandTests.admin
    assertOneLineError = admin_tests.AccountCommandTests.assertOneLineError

    def alice_with_two_factor(self):
        connection = connect(self.database)
        try:
            upgrade(connection, self.database, 0)
            connection.execute(
                "INSERT INTO users (username, password_hash, created_at, password_changed_at) VALUES ('alice', 'x', 1, 1)"
            )
            connection.execute("INSERT INTO two_factor (user_id, sealed, enabled, last_step, changed_at) SELECT id, x'00', 1, 5, 1 FROM users")
            connection.execute("INSERT INTO recovery_codes (user_id, code_hash) SELECT id, x'01' FROM users")
        finally:
            connection.close()

    def test_show_and_switch_off(self):
        self.alice_with_two_factor()
        self.assertEqual(self.admin("2fa", "alice").stdout, "two-factor login on for alice, 1 recovery codes left\n")
        result = self.admin("2fa", "Alice", "--disable")
        self.assertEqual(result.returncode, 0, result)
        self.assertIn("switched off for alice", result.stdout)
        self.assertEqual(self.admin("2fa", "alice").stdout, "two-factor login off for alice\n")
        db = sqlite3.connect(self.database)
        self.addCleanup(db.close)
        self.assertEqual(db.execute("SELECT COUNT(*) FROM two_factor").fetchone(), (0,))
        self.assertEqual(db.execute("SELECT COUNT(*) FROM recovery_codes").fetchone(), (0,))
        [(data,)] = db.execute("SELECT event FROM account_events").fetchall()
        event = accountlog.Event.from_bytes(data)
        self.assertEqual((event.user, event.seq, event.kind, event.target), ("alice", 1, "second_factor_off", "admin"))
        self.assertOneLineError(self.admin("2fa", "alice", "--disable"), "not on")
        self.assertOneLineError(self.admin("2fa", "nobody", "--disable"), "no such user")

    def test_the_audit_log_says_so(self):
        self.alice_with_two_factor()
        audit = os.path.join(self.dir, "audit.jsonl")
        with open(self.config, "a") as f:
            f.write(f"\n[logging]\naudit_log = {audit}\n")
        self.assertEqual(self.admin("2fa", "--disable", "alice").returncode, 0)
        [line] = open(audit).read().splitlines()
        record = json.loads(line)
        self.assertEqual((record["event"], record["target"], record["method"]), ("admin_2fa_disable", "alice", "admin"))

    def test_passwd_is_an_account_event(self):
        self.alice_with_two_factor()
        self.assertEqual(self.admin("passwd", "alice", input="a fresh password\n").returncode, 0)
        db = sqlite3.connect(self.database)
        self.addCleanup(db.close)
        [(data,)] = db.execute("SELECT event FROM account_events").fetchall()
        self.assertEqual(accountlog.Event.from_bytes(data).kind, "password_change")
