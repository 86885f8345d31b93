"""Settings: the documented sample config, defaults, validation messages."""

import os
import re
from dataclasses import fields

from twisted.trial import unittest

from securechatd import config

SAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "conf", "securechatd.ini")


def write(testcase, text):
    path = testcase.mktemp()
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


class SampleConfigTests(unittest.TestCase):
    def test_every_setting_is_documented_with_its_default(self):
        """Uncommenting every `#key = value` line of the sample gives exactly the defaults."""
        with open(SAMPLE, encoding="utf-8") as f:
            sample = f.read()
        uncommented = re.sub(r"(?m)^#(\w+ =.*)$", r"\1", sample)
        documented = set(re.findall(r"(?m)^#(\w+) =", sample))
        self.assertEqual(documented, {key for _, key, _ in config.SCHEMA.values()})
        self.assertEqual(config.load(write(self, uncommented)), config.Settings())

    def test_schema_covers_every_setting(self):
        self.assertEqual(set(config.SCHEMA), {f.name for f in fields(config.Settings)})

    def test_sample_as_shipped_loads(self):
        self.assertEqual(config.load(SAMPLE), config.Settings())


class ValidationTests(unittest.TestCase):
    def assertProblem(self, text, *expected):
        with self.assertRaises(config.ConfigError) as raised:
            config.load(write(self, text))
        message = str(raised.exception)
        self.assertNotIn("\n", message)
        for part in expected:
            self.assertIn(part, message)

    def test_values(self):
        settings = config.load(
            write(
                self,
                "[server]\ninterface = ::\nport = 443\nlisten = systemd:domain=INET6:index=0\n"
                "[database]\ndurability = full\nbusy_timeout = 0.5\n"
                "[limits]\nregistration_exempt = 10.0.0.1, ::1\n",
            )
        )
        self.assertEqual(settings.interface, "::")
        self.assertEqual(settings.port, 443)
        self.assertEqual(settings.listen, "systemd:domain=INET6:index=0")
        self.assertEqual(settings.durability, "full")
        self.assertEqual(settings.busy_timeout, 0.5)
        self.assertEqual(settings.registration_exempt, ("10.0.0.1", "::1"))

    def test_unknown_setting(self):
        self.assertProblem("[server]\nprot = 1\n", "unknown setting [server] prot")

    def test_unknown_section(self):
        self.assertProblem("[sever]\nport = 1\n", "unknown setting [sever] port")

    def test_bad_numbers(self):
        self.assertProblem("[server]\nport = -1\n", "[server] port", "'-1'")
        self.assertProblem("[accounts]\nbcrypt_cost = 9\n", "[accounts] bcrypt_cost", "10 to 20")
        self.assertProblem("[accounts]\nmax_sessions = 0\n", "[accounts] max_sessions")
        self.assertProblem("[accounts]\nhash_nice = 20\n", "[accounts] hash_nice", "0 to 19")
        self.assertProblem("[database]\nbusy_timeout = soon\n", "[database] busy_timeout", "'soon'")
        self.assertProblem("[limits]\nlogin_max_delay = 0\n", "[limits] login_max_delay")

    def test_bad_choice(self):
        self.assertProblem("[database]\ndurability = fast\n", "normal, full", "'fast'")

    def test_bad_totp_issuer(self):
        for issuer in ("Example: chat", "x" * 65):
            self.assertProblem(f"[accounts]\ntotp_issuer = {issuer}\n", "[accounts] totp_issuer", "':'")

    def test_bad_address(self):
        self.assertProblem("[limits]\nregistration_exempt = localhost\n", "[limits] registration_exempt")

    def test_empty_path(self):
        self.assertProblem("[database]\npath =\n", "[database] path", "empty")

    def test_not_an_ini_file(self):
        self.assertProblem("port = 1\n", "not a valid INI file")

    def test_override_named_as_option(self):
        with self.assertRaises(config.ConfigError) as raised:
            config.load(None, {"port": "x"})
        self.assertIn("--port", str(raised.exception))

    def test_settings_are_immutable(self):
        settings = config.Settings()
        with self.assertRaises(Exception):
            settings.port = 1
