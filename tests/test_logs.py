"""No password or message body a test uses reaches a log: tests/__init__.py watches every event.

The watch is a log observer for the whole run, so it works in any order and
under `trial -j N`; these tests check that it catches what it must, and run
the daemon's services through a session that would leak if anything did.
"""

from twisted.internet import task
from twisted.logger import Logger
from twisted.python import log as legacy_log
from twisted.python.failure import Failure
from twisted.trial import reporter, unittest

from securechatd import commands
from tests import SECRETS, WATCH, SecretInLog
from tests.helpers import Connection, make_hub

PASSWORD, BODY = SECRETS[0], SECRETS[-1]


def run_alone(body):
    """Run `body(testcase)` as a test of its own; its TestResult."""

    class Alone(unittest.SynchronousTestCase):
        def test(self):
            body(self)

    result = reporter.TestResult()
    Alone("test").run(result)
    return result


class SecretWatchTests(unittest.TestCase):
    def assertCaught(self, result, where):
        leaks = [failure for _, failure in result.errors if failure.check(SecretInLog)]
        self.assertEqual(len(leaks), 1, result.errors)
        message = leaks[0].getErrorMessage()
        self.assertIn(f"in a log event of {where}", message)
        for secret in SECRETS:
            self.assertNotIn(secret, message)
        return message

    def test_a_secret_in_the_text_fails_the_test_that_logged_it(self):
        log = Logger(namespace="securechatd.example")
        result = run_alone(lambda test: log.info("login {user} with {password}", user="bob", password=PASSWORD))
        message = self.assertCaught(result, "securechatd.example")
        self.assertIn("login bob with <SECRETS[0]>", message)
        self.assertFalse(result.wasSuccessful())

    def test_a_secret_in_a_field_the_format_leaves_out(self):
        log = Logger(namespace="securechatd.example")
        result = run_alone(lambda test: log.info("message stored", body=BODY))
        self.assertIn("message stored", self.assertCaught(result, "securechatd.example"))

    def test_a_secret_in_a_failure(self):
        log = Logger(namespace="securechatd.example")
        result = run_alone(lambda test: log.failure("sending failed", Failure(ValueError(f"bad body {BODY!r}"))))
        self.assertCaught(result, "securechatd.example")
        self.assertTrue([failure for _, failure in result.errors if failure.check(ValueError)])

    def test_a_secret_through_the_legacy_log(self):
        result = run_alone(lambda test: legacy_log.msg("password", PASSWORD))
        self.assertCaught(result, "log_legacy")

    def test_clean_events_pass(self):
        checked = WATCH.checked
        result = run_alone(lambda test: Logger(namespace="securechatd.example").info("login {user}", user="bob"))
        self.assertTrue(result.wasSuccessful(), result.errors)
        self.assertGreater(WATCH.checked, checked)

    def test_the_daemons_services_log_no_secret(self):
        """Registration, a failed and a good login, a message: each event passes the watch (or this test errs)."""
        checked = WATCH.checked
        hub = make_hub(self, clock=task.Clock())
        conn = Connection(hub)
        self.successResultOf(conn.call(commands.Register, username="zed", password=PASSWORD))
        self.failureResultOf(conn.call(commands.Login, username="zed", password="wrong " + PASSWORD))
        self.successResultOf(conn.call(commands.Register, username="zoe", password=PASSWORD))
        self.successResultOf(conn.call(commands.Login, username="zed", password=PASSWORD))
        created = self.successResultOf(conn.call(commands.CreateConversation, members=["zoe"]))
        self.successResultOf(
            conn.call(commands.SendMessage, conversation_id=created["conversation_id"], client_msg_id="1", body=BODY)
        )
        self.assertGreater(WATCH.checked, checked)  # the log did get this test's events


class TwoFactorLogTests(unittest.TestCase):
    """(issue 13) No TOTP secret, recovery code or code a user typed reaches any log: each is watched while
    enrolment, logins with a code, a wrong code, a recovery code and new recovery codes run."""

    def watch(self, *secrets):
        WATCH.watch(*secrets)
        self.addCleanup(WATCH.forget, *secrets)

    @staticmethod
    def later(clock, conn):
        """A minute on, `conn` kept alive (it answers the server's pings)."""
        for _ in range(6):
            clock.advance(10)
            conn.pump.flush()

    def test_a_watched_secret_is_caught(self):
        self.watch("k7qm-2xfa-ve4n", "123456")
        log = Logger(namespace="securechatd.example")
        result = run_alone(lambda test: log.info("recovery code {code} used", code="k7qm-2xfa-ve4n"))
        self.assertIn("recovery code <a secret watched> used", SecretWatchTests.assertCaught(self, result, "securechatd.example"))
        result = run_alone(lambda test: log.info("typed {code}", code="123456"))
        SecretWatchTests.assertCaught(self, result, "securechatd.example")
        self.assertTrue(run_alone(lambda test: log.info("port {port}", port="1234567")).wasSuccessful())  # (whole words only)

    def test_two_factor_logs_no_secret_and_no_code(self):
        import base64
        from urllib.parse import parse_qs, urlparse

        from securechatd import totp

        checked = WATCH.checked
        clock = task.Clock()
        clock.advance(1_700_000_000)
        hub = make_hub(self, clock=clock)
        conn = Connection(hub)
        self.successResultOf(conn.call(commands.Register, username="zed", password=PASSWORD))
        self.successResultOf(conn.call(commands.Login, username="zed", password=PASSWORD))
        begun = self.successResultOf(conn.call(commands.BeginTwoFactor))
        secret = base64.b32decode(begun["secret"])
        self.watch(begun["secret"], parse_qs(urlparse(begun["uri"]).query)["secret"][0], begun["uri"], secret.hex())
        wrong = "000000" if totp.code(secret, clock.seconds()) != "000000" else "111111"
        self.watch(wrong)
        self.failureResultOf(conn.call(commands.ConfirmTwoFactor, code=wrong, password=PASSWORD), commands.BadCredentials)
        code = totp.code(secret, clock.seconds())
        self.watch(code, "wrong " + PASSWORD)
        self.failureResultOf(conn.call(commands.ConfirmTwoFactor, code=code, password="wrong " + PASSWORD), commands.BadCredentials)
        codes = self.successResultOf(conn.call(commands.ConfirmTwoFactor, code=code, password=PASSWORD))["recovery_codes"]
        self.watch(*codes, *(c.replace("-", "") for c in codes))
        for typed in (totp.code(secret, clock.seconds() + 60), wrong, codes[0]):
            self.later(clock, conn)
            self.watch(typed)
            other = Connection(hub)
            self.failureResultOf(other.call(commands.Login, username="zed", password=PASSWORD), commands.SecondFactorRequired)
            other.call(commands.SecondFactor, code=typed).addErrback(lambda failure: None)  # (right or wrong)
        self.later(clock, conn)
        code = totp.code(secret, clock.seconds())
        self.watch(code)
        new = self.successResultOf(conn.call(commands.NewRecoveryCodes, code=code))["recovery_codes"]
        self.watch(*new)
        self.assertGreater(WATCH.checked, checked + 10)  # (the log did get this test's events)
