"""Two-factor login and sessions as people run them: `securechat --batch` processes against `twistd -n securechatd`.

The daemon runs on the real clock, so codes are computed with securechatd.totp from the same clock
(reactor.seconds()). A code works once per 30-second step: the enrolment uses this step's, the login the
next step's, and later logins recovery codes.
"""

import os

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from securechatd.certs import write_certs
from tests.helpers import SECURECHAT, environment, spawn_daemon, wall_now
from tests.test_client_twofactor import code_at, wrong_code
from tests.test_securechat import TIMEOUT, ClientProcess

PASSWORD = "correct horse battery"


class SecurechatCase(unittest.TestCase):
    """A daemon of its own (`accounts`: more of its [accounts] section) and `securechat --batch` processes."""

    accounts = ""  # more of the daemon's [accounts] section

    @inlineCallbacks
    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        config = os.path.join(self.directory, "securechatd.ini")
        with open(config, "w") as f:
            f.write(f"[server]\nport = 0\n[accounts]\nbcrypt_cost = 10\n{self.accounts}")
        write_certs(os.path.join(self.directory, "certs"), ["localhost"], now=wall_now())
        _, self.daemon = spawn_daemon(self, reactor, config, self.directory)
        self.port = yield self.daemon.listening

    def securechat(self, keys, installation="alice", close_stdin=False):
        client = ClientProcess(keys, close_stdin=close_stdin)
        home = os.path.join(self.directory, installation)
        os.makedirs(home, exist_ok=True)
        process = reactor.spawnProcess(
            client,
            SECURECHAT,
            [SECURECHAT, "--host", "localhost", "--port", str(self.port), "--ca", "certs/ca.pem", "--batch"],
            env=dict(environment(), XDG_DATA_HOME=home, SECURECHAT_PASSWORD=PASSWORD),
            path=self.directory,
        )

        def stop():
            if not client.ended.called:
                process.signalProcess("KILL")
            return client.ended

        self.addCleanup(stop)
        return client

    def events(self, client, kind, **fields):
        return [r for r in client.records() if r["event"] == kind and all(r.get(k) == v for k, v in fields.items())]

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
