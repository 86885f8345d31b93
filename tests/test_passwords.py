"""Password rules and hashing: the whole password counts, bcrypt's 72 bytes do not."""

from twisted.trial import unittest

from securechatd.commands import WeakPassword
from securechatd.server import passwords
from securechatd.server.passwords import PasswordHasher
from tests.helpers import TEST_COST, run_now


class RuleTests(unittest.TestCase):
    def test_lengths(self):
        for bad in ["", "1234567", "x" * 1025]:
            self.assertRaises(WeakPassword, passwords.check_rule, bad)
        for good in ["12345678", "x" * 1024, "пароль-длинный"]:
            passwords.check_rule(good)


class HasherTests(unittest.TestCase):
    def setUp(self):
        self.hasher = PasswordHasher(TEST_COST, run_now)

    def hash(self, password):
        return self.successResultOf(self.hasher.hash(password))

    def verify(self, password, hashed):
        return self.successResultOf(self.hasher.verify(password, hashed))

    def test_round_trip(self):
        hashed = self.hash("correct horse")
        self.assertTrue(hashed.startswith(f"$2b$0{TEST_COST}$"))
        self.assertNotIn("correct horse", hashed)
        self.assertTrue(self.verify("correct horse", hashed))
        self.assertFalse(self.verify("correct horsE", hashed))

    def test_bytes_after_72_count(self):
        base = "a" * 100
        hashed = self.hash(base + "1")
        self.assertFalse(self.verify(base + "2", hashed))
        self.assertTrue(self.verify(base + "1", hashed))

    def test_multibyte_password_over_72_bytes(self):
        password = "ж" * 500  # 1000 bytes of UTF-8
        self.assertTrue(self.verify(password, self.hash(password)))
        self.assertFalse(self.verify("ж" * 499 + "з", self.hash(password)))

    def test_unicode_forms_match(self):
        composed, decomposed = "caf\u00e9 au lait", "cafe\u0301 au lait"
        self.assertTrue(self.verify(decomposed, self.hash(composed)))

    def test_no_stored_hash_never_verifies(self):
        self.assertFalse(self.verify("anything at all", None))

    def test_rehash_when_cost_changes(self):
        hashed = self.hash("correct horse")
        self.assertFalse(self.hasher.needs_rehash(hashed))
        self.assertTrue(PasswordHasher(TEST_COST + 1, run_now).needs_rehash(hashed))
