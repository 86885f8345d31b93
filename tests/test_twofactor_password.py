"""Switching two-factor login on takes the account's password (the security review of issue 13).

A session resumed from a stolen token, on an account without two-factor
login, must not enrol its own authenticator: that would end the owner's
sessions, revoke their tokens and lock them out. ConfirmTwoFactor asks for
the password as ChangePassword does (one attempt of the login throttle; a
wrong one tells nothing else), except the enrolment that finishes a Login
answered ENROLMENT_REQUIRED, which just gave it.
"""

import base64

from twisted.internet.defer import Deferred

from securechatd import commands, totp
from securechatd.commands import (
    BAD_CREDENTIALS_TEXT,
    BadCredentials,
    EnrolmentRequired,
    InvalidArgument,
    RateLimited,
)
from securechatd.server.passwords import PasswordHasher
from tests.helpers import TEST_COST, Connection, make_hub
from tests.test_twofactor import PASSWORD, TwoFactorTestCase

WRONG = "not the password"


class StolenSessionTests(TwoFactorTestCase):
    """The owner logged in on one connection; the thief resumed the owner's other session's token."""

    def setUp(self):
        super().setUp()
        self.ok(self.conn, commands.Login, username="alice", password=PASSWORD)  # the owner
        stolen = self.ok(Connection(self.hub), commands.Login, username="alice", password=PASSWORD)["resume_token"]
        self.thief = Connection(self.hub)
        self.ok(self.thief, commands.Resume, username="alice", resume_token=stolen)
        self.secret = base64.b32decode(self.ok(self.thief, commands.BeginTwoFactor)["secret"])

    def confirm(self, **arguments):
        return self.thief.call(commands.ConfirmTwoFactor, code=self.code(self.secret), **arguments)

    def assertOwnerUntouched(self):
        self.assertFalse(self.ok(self.conn, commands.TwoFactorStatus)["enabled"])
        self.ok(self.conn, commands.Ping)
        self.assertFalse(self.conn.server.lost)
        self.assertEqual(len(self.hub.accounts.registry.sessions_of("alice")), 3)

    def test_a_right_code_without_the_password_switches_nothing_on(self):
        text = str(self.failureResultOf(self.confirm(), InvalidArgument).value)
        self.assertIn("password", text)
        self.assertOwnerUntouched()

    def test_a_right_code_with_a_wrong_password_is_bad_credentials_and_nothing_more(self):
        text = str(self.failureResultOf(self.confirm(password=WRONG), BadCredentials).value)
        self.assertEqual(text, BAD_CREDENTIALS_TEXT)  # (not the wrong code's text: the code is not checked)
        self.assertOwnerUntouched()

    def test_a_wrong_password_says_nothing_of_the_enrolment(self):
        """No enrolment begun answers NOT_ALLOWED to the password's owner, BAD_CREDENTIALS to anyone else."""
        owner = Connection(self.hub)
        self.ok(owner, commands.Login, username="alice", password=PASSWORD)
        call = owner.call(commands.ConfirmTwoFactor, code="123456", password=WRONG)
        self.assertEqual(str(self.failureResultOf(call, BadCredentials).value), BAD_CREDENTIALS_TEXT)

    def test_a_wrong_password_spends_nothing(self):
        self.failureResultOf(self.confirm(password=WRONG), BadCredentials)
        self.assertEqual(len(self.ok(self.conn, commands.ConfirmTwoFactor, code=self.code(self.secret),
                                     password=PASSWORD)["recovery_codes"]), 10)

    def test_wrong_passwords_count_toward_the_login_throttle(self):
        for _ in range(5):  # login_failures_before_delay = 5
            self.failureResultOf(self.confirm(password=WRONG), BadCredentials)
        self.failureResultOf(self.confirm(password=PASSWORD), RateLimited)
        self.failureResultOf(Connection(self.hub).call(commands.Login, username="alice", password=PASSWORD), RateLimited)
        self.assertOwnerUntouched()

    def test_the_password_is_checked_off_the_reactor_thread(self):
        """By the hasher's thread runner, as ChangePassword's: here one that holds each bcrypt call."""
        held = []

        def hold(check, *arguments):
            held.append((Deferred(), check, arguments))
            return held[-1][0]

        self.hub.accounts.hasher = PasswordHasher(TEST_COST, hold)
        confirming = self.thief.client.callRemote(  # (Connection.call would wait for no answer)
            commands.ConfirmTwoFactor, code=self.code(self.secret), password=PASSWORD
        )
        self.thief.pump.flush()
        self.assertNoResult(confirming)
        [(done, check, arguments)] = held
        done.callback(check(*arguments))
        self.thief.pump.flush()
        self.assertEqual(len(self.successResultOf(confirming)["recovery_codes"]), 10)

    def test_with_the_password_it_is_on(self):
        codes = self.successResultOf(self.confirm(password=PASSWORD))["recovery_codes"]
        self.assertEqual(len(codes), 10)
        self.conn.pump.flush()
        self.assertTrue(self.conn.server.lost)  # (the owner's other sessions end, as before)


class RequiredEnrolmentTests(TwoFactorTestCase):
    """[accounts] two_factor = required: a Login's enrolment just gave the password, a Resume's gives it."""

    settings = {"two_factor": "required"}

    def resumed(self):
        """A connection whose Resume (with a token from before the setting) waits for its enrolment."""
        hub = make_hub(self, clock=self.clock, store=self.hub.store)
        token = self.ok(Connection(hub), commands.Login, username="alice", password=PASSWORD)["resume_token"]
        conn = Connection(self.hub)
        self.failureResultOf(conn.call(commands.Resume, username="alice", resume_token=token), EnrolmentRequired)
        return conn, base64.b32decode(self.ok(conn, commands.BeginTwoFactor)["secret"])

    def test_a_logins_enrolment_needs_no_password_again(self):
        self.failureResultOf(self.login(), EnrolmentRequired)
        secret = base64.b32decode(self.ok(self.conn, commands.BeginTwoFactor)["secret"])
        self.assertEqual(self.ok(self.conn, commands.ConfirmTwoFactor, code=self.code(secret))["username"], "alice")

    def test_a_resumes_enrolment_needs_the_password(self):
        conn, secret = self.resumed()
        code = self.code(secret)
        self.failureResultOf(conn.call(commands.ConfirmTwoFactor, code=code), InvalidArgument)
        wrong = conn.call(commands.ConfirmTwoFactor, code=code, password=WRONG)
        self.assertEqual(str(self.failureResultOf(wrong, BadCredentials).value), BAD_CREDENTIALS_TEXT)
        self.assertFalse(self.successResultOf(self.hub.accounts.two_factor.status("alice"))[0])
        answer = self.ok(conn, commands.ConfirmTwoFactor, code=code, password=PASSWORD)
        self.assertEqual((answer["username"], len(answer["recovery_codes"])), ("alice", 10))
        self.assertEqual(totp.code(secret, self.clock.seconds()), code)  # (the same step: the wrong try spent none)
