"""Two-factor login and sessions as people run them: `securechat --batch` processes against `twistd -n securechatd`.

The daemon runs on the real clock, so codes are computed with securechatd.totp from the same clock
(reactor.seconds()). A code works once per 30-second step: the enrolment uses this step's, the login the
next step's, and later logins recovery codes.
"""


from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks

from tests.test_client_twofactor import code_at, wrong_code
from tests.test_securechat import TIMEOUT, BatchDaemonCase



class SecurechatCase(BatchDaemonCase):
    """A daemon of its own (`accounts`: more of its [accounts] section) and `securechat --batch` processes."""

    accounts = ""  # more of the daemon's [accounts] section

    def more_config(self):
        return self.accounts

    def answered(self, client, command, **fields):
        return client.when(lambda: self.events(client, "answer", command=command, **fields))

    @inlineCallbacks
    def ended(self, client, status=0):
        code = yield client.ended.addTimeout(TIMEOUT, reactor)
        self.assertEqual(code, status, (client.out, client.err))



class TwoFactorSecurechatTests(SecurechatCase):
    @inlineCallbacks
    def test_enrol_then_log_in_with_a_code_a_wrong_code_and_a_recovery_code(self):
        alice = self.securechat("/register alice\n/2fa enrol\n")
        yield self.answered(alice, "2fa", action="enrol")
        [enrol] = self.events(alice, "answer", command="2fa", action="enrol")
        secret = enrol["secret"]
        self.assertTrue(enrol["uri"].startswith("otpauth://totp/"))
        alice.transport.write(f"/2fa confirm {code_at(secret)}\n/2fa\n/quit\n".encode())
        yield self.ended(alice)
        [confirmed] = self.events(alice, "answer", command="2fa", action="confirm")
        recovery = confirmed["recovery_codes"]
        self.assertEqual(len(recovery), 10)
        [status] = self.events(alice, "answer", command="2fa", action="status")
        self.assertEqual((status["enabled"], status["recovery_codes_left"]), (True, 10))

        # a wrong code: the login fails, clearly, and --batch stops
        wrong = self.securechat(f"/login alice {wrong_code(secret)}\n", close_stdin=True)
        yield self.ended(wrong, 1)
        [error] = self.events(wrong, "error", command="login")
        self.assertEqual(error["code"], "BAD_CREDENTIALS")
        self.assertIn("code", error["message"])

        # the right code, as the next input line (as a password is)
        right = self.securechat(f"/login alice\n{code_at(secret, 30)}\n/quit\n", close_stdin=True)
        yield self.ended(right)
        self.assertEqual(len(self.events(right, "answer", command="login", username="alice")), 1)

        # a recovery code on the /login line; it works once
        saved = self.securechat(f"/login alice {recovery[0]}\n/2fa\n/quit\n")
        yield self.ended(saved)
        [status] = self.events(saved, "answer", command="2fa", action="status")
        self.assertEqual(status["recovery_codes_left"], 9)
        again = self.securechat(f"/login alice {recovery[0]}\n", close_stdin=True)
        yield self.ended(again, 1)
        self.assertEqual(self.events(again, "error", command="login")[0]["code"], "BAD_CREDENTIALS")

    @inlineCallbacks
    def test_confirm_asks_the_password_as_the_next_line(self):
        """Never on the command line: without SECURECHAT_PASSWORD, --batch reads it after /2fa confirm CODE."""
        alice = self.securechat("/register alice\n/2fa enrol\n/quit\n")
        yield self.ended(alice)
        [enrol] = self.events(alice, "answer", command="2fa", action="enrol")
        login = f"/login alice\n{self.PASSWORD}\n"
        wrong = self.securechat(f"{login}/2fa confirm {code_at(enrol['secret'])}\nnot the password\n", password=False)
        yield self.ended(wrong, 1)
        [error] = self.events(wrong, "error", command="2fa")
        self.assertEqual(error["code"], "BAD_CREDENTIALS")
        right = self.securechat(
            f"{login}/2fa confirm {code_at(enrol['secret'])}\n{self.PASSWORD}\n/2fa\n/quit\n", password=False
        )
        yield self.ended(right)
        self.assertEqual(len(self.events(right, "answer", command="2fa", action="confirm")[0]["recovery_codes"]), 10)
        [status] = self.events(right, "answer", command="2fa", action="status")
        self.assertTrue(status["enabled"])
        for run in (wrong, right):
            self.assertNotIn(self.PASSWORD.encode(), run.out + run.err)
            self.assertNotIn(b"not the password", run.out + run.err)

    @inlineCallbacks
    def test_list_and_end_a_session_from_another_session(self):
        first = self.securechat("/register alice\n")
        yield self.answered(first, "login")
        second = self.securechat("/login alice\n/sessions\n", installation="alice-phone")
        yield self.answered(second, "sessions")
        [listed] = self.events(second, "answer", command="sessions")
        online = [s for s in listed["sessions"] if s["online"]]
        self.assertEqual(len(online), 2)
        [other] = [s for s in online if not s["this_session"]]
        second.transport.write(f"/endsession {other['session_id'][:8]}\n/sessions\n/endsessions\n/quit\n".encode())
        yield self.ended(second)
        self.assertEqual(self.events(second, "answer", command="endsession")[0]["session_id"], other["session_id"])
        after = self.events(second, "answer", command="sessions")[1]["sessions"]
        self.assertNotIn(other["session_id"], [s["session_id"] for s in after])
        [ended] = self.events(second, "answer", command="endsessions")
        self.assertEqual(ended["ended"], 0)  # (the only other session was ended already)


class RequiredTwoFactorSecurechatTests(SecurechatCase):
    accounts = "two_factor = required\n"

    @inlineCallbacks
    def test_the_first_login_enrols(self):
        alice = self.securechat("/register alice\n")
        yield alice.when(lambda: self.events(alice, "enrol"))
        [enrol] = self.events(alice, "enrol")
        self.assertEqual(enrol["username"], "alice")
        alice.transport.write(f"{code_at(enrol['secret'])}\n/2fa\n/quit\n".encode())
        yield self.ended(alice)
        [codes] = self.events(alice, "recovery_codes")
        self.assertEqual(len(codes["recovery_codes"]), 10)
        self.assertEqual(len(self.events(alice, "answer", command="login", username="alice")), 1)
        [status] = self.events(alice, "answer", command="2fa", action="status")
        self.assertEqual((status["enabled"], status["required"]), (True, True))
