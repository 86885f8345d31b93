"""A TOTP key that is not the one the database's secrets were sealed with: a clear answer and one clear log line.

(A missing key file with secrets in the database stops start-up instead:
tests/test_twistd.py and tests/test_secretbox.py.)
"""

import base64
import os

from twisted.internet import task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from securechatd import commands, config, secretbox, totp
from securechatd.commands import SecondFactorRequired, ServiceUnavailable
from securechatd.store.account_log import NewEvent
from tests import WATCH
from tests.helpers import Connection, make_hub

PASSWORD = "correct horse battery"
NOW = 1_700_000_000


def enable_two_factor(testcase, store, username, key, now):
    """`username`'s two-factor login on, its secret sealed under `key`, straight through the store: the secret."""
    secret = totp.new_secret()
    sealed = secretbox.seal(key, username, secret)
    testcase.successResultOf(store.begin_two_factor(username, sealed, now))
    outcome, _ = testcase.successResultOf(
        store.enable_two_factor(username, sealed, 0, [], None, NewEvent("second_factor_on"), now)
    )
    testcase.assertEqual(outcome, "enabled")
    return secret


class WrongKeyTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.hub = make_hub(self, clock=self.clock)  # (its TOTP key: a new random one)
        self.successResultOf(Connection(self.hub).call(commands.Register, username="alice", password=PASSWORD))
        secret = enable_two_factor(self, self.hub.store, "alice", os.urandom(secretbox.KEY_BYTES), NOW)
        self.clock.advance(totp.TIME_STEP)
        self.code = totp.code(secret, self.clock.seconds())
        self.secret_text = base64.b32encode(secret).decode("ascii")
        WATCH.watch(self.secret_text, self.code)  # (no log event may carry them)
        self.addCleanup(WATCH.forget, self.secret_text, self.code)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def second_factor(self, password=PASSWORD):
        conn = Connection(self.hub)
        self.failureResultOf(conn.call(commands.Login, username="alice", password=password), SecondFactorRequired)
        return conn.call(commands.SecondFactor, code=self.code)

    def test_codes_answer_service_unavailable_and_the_log_says_why_once(self):
        for password in (PASSWORD, "wrong password", PASSWORD):
            failure = self.failureResultOf(self.second_factor(password), ServiceUnavailable)
            self.assertNotIn(self.code, str(failure.value))
        told = [formatEvent(e) for e in self.events if "TOTP key" in formatEvent(e)]
        self.assertEqual(len(told), 1, told)
        path = config.totp_key_path(config.Settings())
        self.assertIn(f"the TOTP key {path} does not match the database", told[0])
        self.assertIn("alice", told[0])

    def test_recovery_codes_still_work(self):
        """(They are hashes, not sealed: the way in while the right key is found.)"""
        code = "k7qm-2xfa-ve4n"
        self.successResultOf(
            self.hub.store.replace_recovery_codes(
                "alice", [totp.recovery_code_hash("alice", code)], NewEvent("recovery_codes_new"), NOW
            )
        )
        conn = Connection(self.hub)
        self.failureResultOf(conn.call(commands.Login, username="alice", password=PASSWORD), SecondFactorRequired)
        self.assertEqual(self.successResultOf(conn.call(commands.SecondFactor, code=code))["username"], "alice")
