"""Two-factor login through the real protocol, in memory, on a task.Clock (docs/PROTOCOL.md, "Account security").

Enrolment and its abandonment, the login's second step and its deadline,
the ±1 step window at its edges, steps and recovery codes used once, the
throttle across password and code failures, a wrong password that looks
like a right one until the code, Resume without a code, the operator's
"required" setting, and bad input of each kind.
"""

import base64
import re

from twisted.internet import task
from twisted.trial import unittest

from securechatd import commands, secretbox, totp
from securechatd.e2ee import chain, keys
from securechatd.commands import (
    NoSuchDevice,
    SECOND_FACTOR_TEXT,
    AlreadyAuthenticated,
    AuthRequired,
    BadCredentials,
    EnrolmentRequired,
    InvalidArgument,
    NotAllowed,
    RateLimited,
    SecondFactorRequired,
)
from tests.helpers import Connection, make_hub

PASSWORD = "correct horse battery"
START = 1_700_000_010  # (10 s into a 30 s step)


class TwoFactorTestCase(unittest.TestCase):
    settings = {}

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(START)
        self.hub = make_hub(self, clock=self.clock, **self.settings)
        self.conn = Connection(self.hub)
        self.ok(self.conn, commands.Register, username="alice", password=PASSWORD)

    def ok(self, conn, command, **arguments):
        return self.successResultOf(conn.call(command, **arguments))

    def error(self, conn, error, command, **arguments):
        return str(self.failureResultOf(conn.call(command, **arguments), error).value)

    def login(self, conn=None, password=PASSWORD, **arguments):
        return (conn or self.conn).call(commands.Login, username="alice", password=password, **arguments)

    def enrol(self, conn=None):
        """Switch two-factor login on from a logged-in `conn`: (secret bytes, recovery codes)."""
        conn = conn or self.conn
        secret = base64.b32decode(self.ok(conn, commands.BeginTwoFactor)["secret"])
        codes = self.ok(conn, commands.ConfirmTwoFactor, password=PASSWORD, code=self.code(secret))["recovery_codes"]
        return secret, codes

    def code(self, secret, steps=0):
        return totp.code(secret, self.clock.seconds() + steps * totp.TIME_STEP)

    def next_step(self):
        self.clock.advance(totp.TIME_STEP)

    def enrolled(self):
        """alice with two-factor login on, logged out, on a fresh connection, two steps later (so the
        step before is not the enrolment's, which is spent): (secret, codes)."""
        self.ok(self.conn, commands.Login, username="alice", password=PASSWORD)
        secret, codes = self.enrol()
        self.ok(self.conn, commands.Logout)
        self.next_step()
        self.next_step()
        self.conn = Connection(self.hub)
        return secret, codes

    def pending(self, conn=None, password=PASSWORD):
        """A Login that waits for its second factor: the description of SECOND_FACTOR_REQUIRED."""
        return str(self.failureResultOf(self.login(conn, password), SecondFactorRequired).value)


class EnrolmentTests(TwoFactorTestCase):
    def setUp(self):
        super().setUp()
        self.ok(self.conn, commands.Login, username="alice", password=PASSWORD)

    def status(self):
        return self.ok(self.conn, commands.TwoFactorStatus)

    def test_on_only_after_a_right_code(self):
        begun = self.ok(self.conn, commands.BeginTwoFactor)
        secret = base64.b32decode(begun["secret"])
        self.assertEqual(len(secret) * 8, 160)
        self.assertEqual(begun["uri"], totp.provisioning_uri(secret, "alice"))
        self.assertTrue(begun["uri"].startswith("otpauth://totp/securechatd:alice?"))
        self.assertEqual(self.status(), {"enabled": False, "required": False, "recovery_codes_left": 0})
        self.assertIn("not right", self.error(self.conn, BadCredentials, commands.ConfirmTwoFactor, password=PASSWORD, code="000000"))
        self.assertFalse(self.status()["enabled"])
        codes = self.ok(self.conn, commands.ConfirmTwoFactor, password=PASSWORD, code=self.code(secret))["recovery_codes"]
        self.assertEqual(len(set(codes)), 10)
        for code in codes:
            self.assertRegex(code, r"\A[a-z2-7]{4}-[a-z2-7]{4}-[a-z2-7]{4}\Z")
        self.assertEqual(self.status(), {"enabled": True, "required": False, "recovery_codes_left": 10})

    def test_the_issuer_apps_show_is_the_servers_setting(self):
        hub = make_hub(self, clock=self.clock, store=self.hub.store, totp_issuer="Example Corp chat")
        conn = Connection(hub)
        self.ok(conn, commands.Login, username="alice", password=PASSWORD)
        uri = self.ok(conn, commands.BeginTwoFactor)["uri"]
        self.assertTrue(uri.startswith("otpauth://totp/Example%20Corp%20chat:alice?"), uri)
        self.assertIn("issuer=Example+Corp+chat", uri)

    def test_abandoned_halfway_it_stays_off(self):
        self.ok(self.conn, commands.BeginTwoFactor)
        self.ok(self.conn, commands.Logout)
        self.ok(self.conn, commands.Login, username="alice", password=PASSWORD)  # no second step
        self.assertFalse(self.status()["enabled"])

    def test_beginning_again_replaces_the_secret(self):
        first = base64.b32decode(self.ok(self.conn, commands.BeginTwoFactor)["secret"])
        second = base64.b32decode(self.ok(self.conn, commands.BeginTwoFactor)["secret"])
        self.assertNotEqual(first, second)
        self.error(self.conn, BadCredentials, commands.ConfirmTwoFactor, password=PASSWORD, code=self.code(first))
        self.ok(self.conn, commands.ConfirmTwoFactor, password=PASSWORD, code=self.code(second))

    def test_confirm_without_beginning(self):
        self.error(self.conn, NotAllowed, commands.ConfirmTwoFactor, password=PASSWORD, code="123456")

    def test_beginning_while_on_is_refused(self):
        self.enrol()
        self.assertIn("DisableTwoFactor", self.error(self.conn, NotAllowed, commands.BeginTwoFactor))
        self.error(self.conn, NotAllowed, commands.ConfirmTwoFactor, password=PASSWORD, code="123456")

    def test_the_secret_is_sealed_in_the_database(self):
        secret, _ = self.enrol()
        state = self.successResultOf(self.hub.store.two_factor("alice"))
        self.assertNotIn(secret, state.sealed)
        self.assertEqual(secretbox.unseal(self.hub.accounts.two_factor.key, "alice", state.sealed), secret)
        with self.assertRaises(secretbox.Unsealable):  # bound to the user: another row's is no use
            secretbox.unseal(self.hub.accounts.two_factor.key, "bob", state.sealed)

    def test_enabling_ends_the_other_sessions_and_their_tokens(self):
        other = Connection(self.hub)
        token = self.ok(other, commands.Login, username="alice", password=PASSWORD)["resume_token"]
        mine = self.conn  # (this session keeps its own)
        self.enrol()
        other.pump.flush()
        self.assertTrue(other.server.lost)
        self.assertEqual(len(self.hub.accounts.registry.sessions_of("alice")), 1)
        self.error(Connection(self.hub), BadCredentials, commands.Resume, username="alice", resume_token=token)
        self.ok(mine, commands.Ping)
        self.assertTrue(self.status()["enabled"])

    def test_a_code_too_long(self):
        self.ok(self.conn, commands.BeginTwoFactor)
        self.error(self.conn, InvalidArgument, commands.ConfirmTwoFactor, password=PASSWORD, code="1" * 65)

    def test_needs_a_session(self):
        conn = Connection(self.hub)
        for command, arguments in (
            (commands.BeginTwoFactor, {}),
            (commands.ConfirmTwoFactor, {"code": "123456", "password": PASSWORD}),
            (commands.DisableTwoFactor, {"code": "123456"}),
            (commands.NewRecoveryCodes, {"code": "123456"}),
            (commands.TwoFactorStatus, {}),
        ):
            self.assertEqual(self.error(conn, AuthRequired, command, **arguments), "Log in first.")


class LoginTests(TwoFactorTestCase):
    def setUp(self):
        super().setUp()
        self.secret, self.codes = self.enrolled()

    def test_password_then_code(self):
        self.assertIn("SecondFactor", self.pending())
        self.assertEqual(self.hub.accounts.registry.sessions_of("alice"), [])  # not a session yet
        answer = self.ok(self.conn, commands.SecondFactor, code=self.code(self.secret))
        self.assertEqual(answer["username"], "alice")
        self.assertEqual(len(answer["session_id"]), 32)
        [session] = self.hub.accounts.registry.sessions_of("alice")
        self.assertEqual(session.session_id, answer["session_id"])
        self.ok(self.conn, commands.ListConversations)

    def test_a_code_with_spaces_as_apps_show_it(self):
        self.pending()
        code = self.code(self.secret)
        self.ok(self.conn, commands.SecondFactor, code=f" {code[:3]} {code[3:]} ")

    def test_a_wrong_password_looks_like_a_right_one_until_the_code(self):
        right = self.pending()
        wrong_conn = Connection(self.hub)
        wrong = self.pending(wrong_conn, password="not the password")
        self.assertEqual(right, wrong)
        # the right code after the wrong password: refused as a wrong code is, and the step is not spent
        code = self.code(self.secret)
        refused_wrong = self.error(wrong_conn, BadCredentials, commands.SecondFactor, code=code)
        other = Connection(self.hub)
        self.pending(other)
        refused_code = self.error(other, BadCredentials, commands.SecondFactor, code="000000" if code != "000000" else "111111")
        self.assertEqual(refused_wrong, refused_code)
        self.assertEqual(refused_wrong, SECOND_FACTOR_TEXT)
        self.ok(self.conn, commands.SecondFactor, code=code)

    def test_the_window_is_one_step_either_side(self):
        for steps in (-1, 1):
            conn = Connection(self.hub)
            self.pending(conn)
            self.ok(conn, commands.SecondFactor, code=self.code(self.secret, steps))
            self.clock.advance(3 * totp.TIME_STEP)  # (past the step just used)
        for steps in (-2, 2):
            conn = Connection(self.hub)
            self.pending(conn)
            self.error(conn, BadCredentials, commands.SecondFactor, code=self.code(self.secret, steps))

    def test_the_window_edges_in_seconds(self):
        """At the last second of a step, its code and the next step's pass; two steps back does not."""
        self.clock.advance(totp.TIME_STEP - self.clock.seconds() % totp.TIME_STEP - 0.001)
        code_now = self.code(self.secret)
        self.pending()
        self.clock.advance(0.002)  # the next step begins while the code is typed
        self.ok(self.conn, commands.SecondFactor, code=code_now)
        conn = Connection(self.hub)
        self.pending(conn)
        self.error(conn, BadCredentials, commands.SecondFactor, code=self.code(self.secret, -2))

    def test_a_step_is_accepted_once(self):
        code = self.code(self.secret)
        self.pending()
        self.ok(self.conn, commands.SecondFactor, code=code)
        again = Connection(self.hub)
        self.pending(again)
        self.error(again, BadCredentials, commands.SecondFactor, code=code)  # the same step, reused
        self.next_step()
        third = Connection(self.hub)
        self.pending(third)
        self.ok(third, commands.SecondFactor, code=self.code(self.secret))

    def test_no_older_step_once_a_newer_was_accepted(self):
        self.pending()
        self.ok(self.conn, commands.SecondFactor, code=self.code(self.secret, 1))
        conn = Connection(self.hub)
        self.pending(conn)
        self.error(conn, BadCredentials, commands.SecondFactor, code=self.code(self.secret))

    def test_one_code_per_login(self):
        self.pending()
        self.error(self.conn, BadCredentials, commands.SecondFactor, code="000001")
        self.error(self.conn, AuthRequired, commands.SecondFactor, code=self.code(self.secret))
        self.pending()  # a new login may try again
        self.ok(self.conn, commands.SecondFactor, code=self.code(self.secret))

    def test_the_pending_state_has_its_own_deadline(self):
        self.pending()
        self.clock.advance(self.hub.accounts.timeouts[False] - 1)
        self.assertFalse(self.conn.server.lost)
        self.clock.advance(1)
        self.conn.pump.flush()
        self.assertTrue(self.conn.server.lost)
        self.assertEqual(self.hub.accounts.registry.sessions_of("alice"), [])

    def test_it_outlasts_the_connection_login_deadline(self):
        """The connection's own login deadline (60 s from connecting) gives way to the second step's."""
        self.clock.advance(59)
        self.pending()
        self.clock.advance(30)
        self.conn.pump.flush()
        self.assertFalse(self.conn.server.lost)
        self.ok(self.conn, commands.SecondFactor, code=self.code(self.secret))

    def test_only_the_code_logout_and_ping_meanwhile(self):
        self.pending()
        waits = self.error(self.conn, AuthRequired, commands.ListConversations)
        self.assertIn("SecondFactor", waits)
        self.error(self.conn, AuthRequired, commands.SendMessage, conversation_id=1, client_msg_id="x", body="hi")
        self.error(self.conn, AuthRequired, commands.BeginTwoFactor)
        self.error(self.conn, AlreadyAuthenticated, commands.Login, username="alice", password=PASSWORD)
        self.error(self.conn, AlreadyAuthenticated, commands.Resume, username="alice", resume_token="x")
        self.ok(self.conn, commands.Ping)
        self.ok(self.conn, commands.Logout)  # gives the login up
        self.error(self.conn, AuthRequired, commands.SecondFactor, code=self.code(self.secret))
        self.pending()

    def test_bad_input(self):
        self.error(self.conn, AuthRequired, commands.SecondFactor, code="123456")  # no login waits
        self.pending()
        self.error(self.conn, InvalidArgument, commands.SecondFactor, code="1" * 65)  # still waits
        for typed in ("", "12345", "١٢٣٤٥٦"):  # (each a failed login: the throttle allows a few)
            conn = Connection(self.hub)
            self.pending(conn)
            self.error(conn, BadCredentials, commands.SecondFactor, code=typed)
        self.ok(self.conn, commands.SecondFactor, code=self.code(self.secret))
        self.error(self.conn, AlreadyAuthenticated, commands.SecondFactor, code="123456")

    def test_resume_does_not_ask_for_the_code(self):
        self.pending()
        token = self.ok(self.conn, commands.SecondFactor, code=self.code(self.secret))["resume_token"]
        conn = Connection(self.hub)
        self.ok(conn, commands.Resume, username="alice", resume_token=token)

    def test_a_recovery_code_is_used_once(self):
        self.pending()
        typed = " " + self.codes[0].upper().replace("-", " ") + " "  # as a person may type it
        self.ok(self.conn, commands.SecondFactor, code=typed)
        self.assertEqual(self.ok(self.conn, commands.TwoFactorStatus)["recovery_codes_left"], 9)
        again = Connection(self.hub)
        self.pending(again)
        self.error(again, BadCredentials, commands.SecondFactor, code=self.codes[0])

    def test_a_recovery_code_after_a_wrong_password_is_not_spent(self):
        wrong = Connection(self.hub)
        self.pending(wrong, password="not the password")
        self.error(wrong, BadCredentials, commands.SecondFactor, code=self.codes[1])
        self.pending()
        self.ok(self.conn, commands.SecondFactor, code=self.codes[1])

    def test_new_recovery_codes_revoke_the_old(self):
        self.pending()
        self.ok(self.conn, commands.SecondFactor, code=self.code(self.secret))
        self.error(self.conn, BadCredentials, commands.NewRecoveryCodes, code="000000")
        self.next_step()
        new = self.ok(self.conn, commands.NewRecoveryCodes, code=self.code(self.secret))["recovery_codes"]
        self.assertFalse(set(new) & set(self.codes))
        old = Connection(self.hub)
        self.pending(old)
        self.error(old, BadCredentials, commands.SecondFactor, code=self.codes[2])
        fresh = Connection(self.hub)
        self.pending(fresh)
        self.ok(fresh, commands.SecondFactor, code=new[0])

    def test_switching_off_takes_a_code(self):
        self.pending()
        self.ok(self.conn, commands.SecondFactor, code=self.code(self.secret))
        self.error(self.conn, BadCredentials, commands.DisableTwoFactor, code=self.code(self.secret))  # (its step is spent)
        self.ok(self.conn, commands.DisableTwoFactor, code=self.codes[3])  # a recovery code will do
        self.assertFalse(self.ok(self.conn, commands.TwoFactorStatus)["enabled"])
        self.ok(Connection(self.hub), commands.Login, username="alice", password=PASSWORD)  # no second step
        self.error(self.conn, NotAllowed, commands.DisableTwoFactor, code=self.codes[4])

    def test_a_device_not_in_the_chain_does_not_spend_the_code(self):
        """Logging in bound to a device the chain does not list is refused before the code is used,
        so the same code then logs in without the device (a new installation not yet added)."""
        laptop = keys.Device.generate("alice")
        bound = Connection(self.hub)
        self.failureResultOf(bound.call(commands.Login, username="alice", password=PASSWORD, device_id=laptop.id.hex()))
        self.ok(bound, commands.SecondFactor, code=self.code(self.secret))
        self.ok(bound, commands.PublishChainLink, link=chain.first(laptop, "laptop").to_bytes())
        self.next_step()
        phone = keys.Device.generate("alice")
        code = self.code(self.secret)
        self.failureResultOf(self.login(device_id=phone.id.hex()), SecondFactorRequired)
        self.assertIn("not in your device chain", self.error(self.conn, NoSuchDevice, commands.SecondFactor, code=code))
        again = Connection(self.hub)
        self.failureResultOf(self.login(again), SecondFactorRequired)
        self.assertEqual(self.ok(again, commands.SecondFactor, code=code)["username"], "alice")

    def test_an_unknown_user_is_still_a_wrong_password(self):
        conn = Connection(self.hub)
        text = self.error(conn, BadCredentials, commands.Login, username="mallory", password=PASSWORD)
        self.assertEqual(text, commands.BAD_CREDENTIALS_TEXT)


class ThrottleTests(TwoFactorTestCase):
    """Password and code failures count toward the same login throttle, and the throttle says nothing of which."""

    def setUp(self):
        super().setUp()
        self.secret, self.codes = self.enrolled()

    def fail_once(self, wrong_password):
        conn = Connection(self.hub)
        self.pending(conn, password="not the password" if wrong_password else PASSWORD)
        self.error(conn, BadCredentials, commands.SecondFactor, code="000000")

    def test_password_and_code_failures_count_together(self):
        for wrong_password in (True, False, True, False, True):  # login_failures_before_delay = 5
            self.fail_once(wrong_password)
        text = self.error(Connection(self.hub), RateLimited, commands.Login, username="alice", password=PASSWORD)
        self.assertIn("retry in 1 second", text)
        self.clock.advance(1)
        self.pending()  # after the wait the right password and code still work
        self.ok(self.conn, commands.SecondFactor, code=self.code(self.secret))

    def test_an_abandoned_second_step_is_a_failure_whatever_the_password(self):
        for _ in range(5):
            conn = Connection(self.hub)
            self.pending(conn)  # the right password ...
            self.ok(conn, commands.Logout)  # ... given up
        self.error(Connection(self.hub), RateLimited, commands.Login, username="alice", password=PASSWORD)

    def test_logins_waiting_for_their_code_count_as_possible_failures(self):
        """As concurrent password guesses do: five waiting at once, the sixth is refused."""
        for _ in range(5):
            self.pending(Connection(self.hub), password="not the password")
        self.error(Connection(self.hub), RateLimited, commands.Login, username="alice", password="not the password")

    def test_code_guesses_in_a_session_count_too(self):
        self.pending()
        self.ok(self.conn, commands.SecondFactor, code=self.code(self.secret))
        for _ in range(5):
            self.error(self.conn, BadCredentials, commands.DisableTwoFactor, code="000000")
        self.error(self.conn, RateLimited, commands.DisableTwoFactor, code="000000")


class RequiredTests(TwoFactorTestCase):
    """[accounts] two_factor = required: a user without it may only enrol (and Ping, Logout) to log in."""

    settings = {"two_factor": "required"}

    def test_a_user_without_it_must_enrol(self):
        text = str(self.failureResultOf(self.login(), EnrolmentRequired).value)
        self.assertIn("BeginTwoFactor", text)
        self.assertEqual(self.hub.accounts.registry.sessions_of("alice"), [])
        for command, arguments in ((commands.ListConversations, {}), (commands.GetPresence, {"usernames": ["alice"]})):
            self.assertIn("enrolment", self.error(self.conn, AuthRequired, command, **arguments))
        self.error(self.conn, NotAllowed, commands.SecondFactor, code="123456")
        self.ok(self.conn, commands.Ping)
        secret = base64.b32decode(self.ok(self.conn, commands.BeginTwoFactor)["secret"])
        self.error(self.conn, BadCredentials, commands.ConfirmTwoFactor, code="000000")
        answer = self.ok(self.conn, commands.ConfirmTwoFactor, code=self.code(secret))
        self.assertEqual(len(answer["recovery_codes"]), 10)
        self.assertEqual(answer["username"], "alice")
        self.assertTrue(answer["resume_token"])
        self.ok(self.conn, commands.ListConversations)  # logged in
        self.assertEqual(self.ok(self.conn, commands.TwoFactorStatus), {"enabled": True, "required": True, "recovery_codes_left": 10})
        self.assertIn("requires", self.error(self.conn, NotAllowed, commands.DisableTwoFactor, code=answer["recovery_codes"][0]))
        self.ok(Connection(self.hub), commands.Resume, username="alice", resume_token=answer["resume_token"])

    def test_a_wrong_password_is_still_a_wrong_password(self):
        self.failureResultOf(self.login(password="not the password"), BadCredentials)

    def test_an_old_token_of_a_user_without_it_enrols_too(self):
        hub = make_hub(self, clock=self.clock, store=self.hub.store)  # (the operator switches it on)
        conn = Connection(hub)
        token = self.ok(conn, commands.Login, username="alice", password=PASSWORD)["resume_token"]
        self.failureResultOf(Connection(self.hub).call(commands.Resume, username="alice", resume_token=token), EnrolmentRequired)

    def test_the_enrolment_has_its_deadline(self):
        self.failureResultOf(self.login(), EnrolmentRequired)
        self.clock.advance(self.hub.accounts.timeouts[True])
        self.conn.pump.flush()
        self.assertTrue(self.conn.server.lost)

    def test_logout_gives_the_enrolment_up(self):
        self.failureResultOf(self.login(), EnrolmentRequired)
        self.ok(self.conn, commands.BeginTwoFactor)
        self.ok(self.conn, commands.Logout)
        self.error(self.conn, AuthRequired, commands.BeginTwoFactor)
        self.failureResultOf(self.login(), EnrolmentRequired)


class SettingsTests(unittest.TestCase):
    def test_the_two_keys_must_differ(self):
        from securechatd import config

        with self.assertRaises(config.ConfigError) as raised:
            config.load(None, {"signing_key": "k", "totp_key": "k"})
        self.assertIn("one key, one purpose", str(raised.exception))
        self.assertNotEqual(re.sub(r"\W", "", config.totp_key_path(config.Settings())), "")


class KeyFileTests(unittest.TestCase):
    def test_the_daemon_makes_its_own_totp_key(self):
        """At first start: certs/totp.key, 32 bytes, mode 0600, another key than the signing key."""
        import os
        import stat

        from twisted.internet import reactor

        from tests.helpers import start_daemon

        _, ca, hub = start_daemon(self, reactor)
        certs = os.path.dirname(ca)
        path = os.path.join(certs, "totp.key")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path, "rb") as f:
            key = f.read()
        self.assertEqual(key, hub.accounts.two_factor.key)
        with open(os.path.join(certs, "signing.key"), "rb") as f:
            self.assertNotEqual(f.read(), key)
