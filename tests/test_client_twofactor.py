"""Two-factor login and sessions in the client library, against the real daemon over TLS on 127.0.0.1.

The daemon's clock is the real one, so codes are computed with securechatd.totp from reactor.seconds().
A code is accepted once per 30-second step (and only for a step above the last accepted), so each test
uses the current step, the next one, and recovery codes.
"""

import base64
import os

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial import unittest

from securechatd import commands, totp
from tests.helpers import chat_client, start_daemon
from tests.test_client import PASSWORD


def secret_bytes(secret):
    """The raw TOTP secret of BeginTwoFactor's base32 text."""
    return base64.b32decode(secret + "=" * (-len(secret) % 8))


def code_at(secret, offset=0):
    return totp.code(secret_bytes(secret), reactor.seconds() + offset)


def wrong_code(secret):
    """A code of the secret far from now: never accepted (its step is outside the window)."""
    return code_at(secret, 3600 * 24)


class DaemonClientCase(unittest.TestCase):
    """The real daemon in this process (`settings`: more of its settings) and ChatClients of it."""

    settings = {}

    def setUp(self):
        self.port, self.ca, self.hub = start_daemon(self, reactor, plaintext="refused", **self.settings)
        self.base = os.path.abspath(self.mktemp())

    def make_client(self, install=None, **options):
        """A ChatClient; `install` names its installation (its own state directory), None: none kept."""
        return chat_client(self, reactor, self.port, self.ca, install, self.base, **options)


class TwoFactorClientTests(DaemonClientCase):

    @inlineCallbacks
    def enrolled(self, username="alice", install="laptop"):
        """A client of a new user logged in bound to its device, with two-factor login on: (client, secret, codes)."""
        client = self.make_client(install)
        yield client.connect()
        yield client.register(username, PASSWORD)
        yield client.login(username, PASSWORD)
        self.assertTrue(client._bound)
        status = yield client.two_factor_status()
        self.assertFalse(status["enabled"])
        secret, uri = yield client.begin_two_factor()
        self.assertTrue(uri.startswith("otpauth://totp/"), uri)
        self.assertIn(f"secret={secret}", uri)
        codes = yield client.confirm_two_factor(code_at(secret), PASSWORD)  # a signed action of the device
        self.assertEqual(len(codes), 10)
        status = yield client.two_factor_status()
        self.assertEqual((status["enabled"], status["recovery_codes_left"]), (True, 10))
        return client, secret, codes

    @inlineCallbacks
    def test_login_with_code_wrong_code_and_recovery_code(self):
        laptop, secret, codes = yield self.enrolled()
        yield laptop.close()

        # the same installation again (its device), the second factor from the app's callable
        again = self.make_client("laptop")
        yield again.connect()
        with self.assertRaises(commands.SecondFactorRequired):  # no code and nobody to ask
            yield again.login("alice", PASSWORD)
        with self.assertRaises(commands.BadCredentials) as wrong:
            yield again.login("alice", PASSWORD, code=wrong_code(secret))
        self.assertEqual(str(wrong.exception), commands.SECOND_FACTOR_TEXT)
        asked = []
        again.second_factor = lambda username: asked.append(username) or code_at(secret, 30)
        login = yield again.login("alice", PASSWORD)
        self.assertEqual((login.username, asked), ("alice", ["alice"]))
        self.assertTrue(again._bound)
        yield again.close()

        # a recovery code, given up front, on a client of no device; it works once
        plain = self.make_client()
        yield plain.connect()
        yield plain.login("alice", PASSWORD, code=codes[0].upper())
        status = yield plain.two_factor_status()
        self.assertEqual(status["recovery_codes_left"], 9)
        yield plain.logout()
        with self.assertRaises(commands.BadCredentials):
            yield plain.login("alice", PASSWORD, code=codes[0])

    @inlineCallbacks
    def test_a_wrong_password_with_a_right_code_is_refused(self):
        laptop, secret, codes = yield self.enrolled()
        plain = self.make_client()
        yield plain.connect()
        with self.assertRaises(commands.BadCredentials):
            yield plain.login("alice", "not the password at all", code=codes[1])
        yield plain.login("alice", PASSWORD, code=codes[1])  # (the code was not spent)

    @inlineCallbacks
    def test_new_recovery_codes_and_disable(self):
        laptop, secret, codes = yield self.enrolled()
        with self.assertRaises(commands.BadCredentials):
            yield laptop.new_recovery_codes(wrong_code(secret))
        fresh = yield laptop.new_recovery_codes(codes[0])  # signed by the device
        self.assertEqual(len(fresh), 10)
        self.assertFalse(set(fresh) & set(codes))
        yield laptop.disable_two_factor(fresh[0])
        status = yield laptop.two_factor_status()
        self.assertFalse(status["enabled"])
        plain = self.make_client()
        yield plain.connect()
        yield plain.login("alice", PASSWORD)  # no second factor now

    @inlineCallbacks
    def test_enrolment_from_a_session_of_no_device(self):
        plain = self.make_client()
        yield plain.connect()
        yield plain.register("bob", PASSWORD)
        yield plain.login("bob", PASSWORD)
        secret, _ = yield plain.begin_two_factor()
        with self.assertRaises(commands.BadCredentials):
            yield plain.confirm_two_factor(wrong_code(secret), PASSWORD)
        with self.assertRaises(commands.BadCredentials) as wrong:  # (a right code, a wrong password)
            yield plain.confirm_two_factor(code_at(secret), "not the password at all")
        self.assertEqual(str(wrong.exception), commands.BAD_CREDENTIALS_TEXT)
        codes = yield plain.confirm_two_factor(code_at(secret), PASSWORD)  # nothing to sign: no device
        self.assertEqual(len(codes), 10)
        other = self.make_client()
        yield other.connect()
        yield other.login("bob", PASSWORD, code=code_at(secret, 30))


class SignedPasswordChangeTests(DaemonClientCase):
    @inlineCallbacks
    def test_a_bound_session_signs_its_password_change(self):
        from securechatd.accountlog import Event

        client = self.make_client("laptop")
        yield client.connect()
        yield client.register("alice", PASSWORD)
        yield client.login("alice", PASSWORD)
        yield client.change_password(PASSWORD, PASSWORD + " again")
        answer = yield client.call(commands.GetAccountLog)
        events = [Event.from_bytes(entry["event"]) for entry in answer["events"]]
        [change] = [event for event in events if event.kind == "password_change"]
        self.assertEqual(change.device.hex(), client.device_id)
        self.assertIsNotNone(change.action)


class SessionClientTests(DaemonClientCase):
    @inlineCallbacks
    def logged_in(self, install, register=False):
        client = self.make_client(None if install == "plain" else install, reconnect=False)
        yield client.connect()
        if register:
            yield client.register("alice", PASSWORD)
        client.session = (yield client.login("alice", PASSWORD)).session_id
        return client

    @inlineCallbacks
    def test_list_and_end_sessions(self):
        laptop = yield self.logged_in("laptop", register=True)
        phone = yield self.logged_in("plain")
        tablet = yield self.logged_in("plain")
        lost = Deferred()
        phone.on_disconnected = lambda reason: lost.callback(None) if not lost.called else None
        sessions = yield laptop.list_sessions()
        self.assertEqual(len(sessions), 3)
        [mine] = [s for s in sessions if s["this_session"]]
        self.assertEqual(mine["device_id"], laptop.device_id)
        self.assertEqual(mine["client_name"], "laptop")
        self.assertTrue(all(s["online"] for s in sessions))
        [phone_session] = [s for s in sessions if s["session_id"] == phone.session]
        with self.assertRaises(commands.NoSuchSession):
            yield laptop.end_session("0" * 32)
        yield laptop.end_session(phone_session["session_id"])  # a signed action of the laptop's device
        sessions = yield laptop.list_sessions()
        self.assertEqual(len(sessions), 2)
        self.assertNotIn(phone.session, [s["session_id"] for s in sessions])
        yield lost
        ended = yield tablet.end_other_sessions()  # from a session of no device: nothing to sign
        self.assertGreaterEqual(ended, 1)
        sessions = yield tablet.list_sessions()
        self.assertEqual([s["session_id"] for s in sessions], [tablet.session])


class RequiredLaterTests(DaemonClientCase):
    @inlineCallbacks
    def test_a_resume_the_server_answers_with_an_enrolment_logs_out(self):
        """The operator requires two-factor login while a client without it is connected: its next Resume
        answers ENROLMENT_REQUIRED, and the client says so once instead of retrying a spent token."""
        client = self.make_client()
        yield client.connect()
        yield client.register("alice", PASSWORD)
        yield client.login("alice", PASSWORD)
        logged_out = Deferred()
        client.on_logged_out = logged_out.callback
        for checker in self.hub.accounts.portal.checkers.values():  # (two_factor = required, from now on)
            if hasattr(checker, "_required"):
                checker._required = True
        self.hub.accounts.registry.sessions_of("alice")[0].client.transport.abortConnection()
        reason = yield logged_out.addTimeout(10, reactor)
        self.assertIn("requires two-factor login", reason)
        self.assertIsNone(client.username)
        with self.assertRaises(commands.EnrolmentRequired):  # (a login again is asked to enrol, not refused)
            yield client.login("alice", PASSWORD)


class RenderTests(unittest.TestCase):
    """What a person sees for the answers of /2fa, /sessions, /endsession and /endsessions, and how they parse."""

    def test_parse(self):
        from securechatd.client import ui

        self.assertEqual(ui.parse("/2fa"), ("2fa", []))
        self.assertEqual(ui.parse("/2fa confirm 123456"), ("2fa", ["confirm", "123456"]))
        self.assertEqual(ui.parse("/login alice 123456"), ("login", ["alice", "123456"]))
        self.assertEqual(ui.parse("/endsession 9b25"), ("endsession", ["9b25"]))
        with self.assertRaises(ui.UsageError):
            ui.parse("/2fa sideways")

    def test_render(self):
        from datetime import datetime, timezone

        from securechatd.client import ui

        now = datetime(2026, 11, 30, 10, 0, tzinfo=timezone.utc)
        answer = {"event": "answer", "command": "2fa"}
        status = ui.render({**answer, "action": "status", "enabled": True, "required": False,
                            "recovery_codes_left": 7}, now, timezone.utc)
        self.assertEqual(status, ["two-factor login is on; 7 recovery code(s) left"])
        off = ui.render({**answer, "action": "status", "enabled": False, "required": True,
                         "recovery_codes_left": 0}, now, timezone.utc)
        self.assertIn("requires", off[0])
        enrol = ui.render({**answer, "action": "enrol", "secret": "ABCD", "uri": "otpauth://totp/x"}, now, timezone.utc)
        self.assertIn("  secret: ABCD", enrol)
        codes = ui.render({**answer, "action": "confirm", "recovery_codes": ["aaaa-bbbb-cccc"]}, now, timezone.utc)
        self.assertIn("  aaaa-bbbb-cccc", codes)
        session = {"session_id": "9b2535c465b0486cb7e14526b5418ee4", "device_id": "7f9ff192" + "0" * 24,
                   "client_name": "laptop", "address": "127.0.0.1", "since": now, "last_active": now,
                   "online": True, "this_session": False}
        [line] = ui.render({"event": "answer", "command": "sessions", "sessions": [session]}, now, timezone.utc)
        self.assertIn("9b2535c4  laptop device 7f9ff192  from 127.0.0.1", line)
        self.assertIn("(online)", line)
        self.assertEqual(ui.render({"event": "answer", "command": "endsessions", "ended": 2}, now, timezone.utc),
                         ["ended 2 other session(s)"])
        enrol = ui.render({"event": "enrol", "username": "alice", "secret": "ABCD", "uri": "otpauth://totp/x",
                           "at": now}, now, timezone.utc)
        self.assertIn("requires two-factor login", enrol[0])
        self.assertIn("  secret: ABCD", enrol)
        self.assertEqual(enrol[-1], "then type the code it shows.")
        codes = ui.render({"event": "recovery_codes", "recovery_codes": ["aaaa-bbbb-cccc"], "at": now}, now,
                          timezone.utc)
        self.assertEqual(codes[1:], ["  aaaa-bbbb-cccc"])
        self.assertIn("recovery codes", codes[0])


class RequiredTwoFactorTests(DaemonClientCase):
    settings = {"two_factor": "required"}

    @inlineCallbacks
    def test_a_login_enrols_when_the_server_requires_it(self):
        client = self.make_client("laptop")
        yield client.connect()
        yield client.register("alice", PASSWORD)
        with self.assertRaises(commands.EnrolmentRequired):  # nobody to enrol
            yield client.login("alice", PASSWORD)
        client.enrol = lambda username, secret, uri: wrong_code(secret)
        with self.assertRaises(commands.BadCredentials):
            yield client.login("alice", PASSWORD)
        shown, codes = [], []
        client.enrol = lambda username, secret, uri: shown.append((username, uri)) or code_at(secret)
        client.on_recovery_codes = codes.extend
        login = yield client.login("alice", PASSWORD)
        self.assertEqual(login.username, "alice")
        self.assertEqual(shown[0][0], "alice")
        self.assertTrue(shown[0][1].startswith("otpauth://"))
        self.assertEqual(len(codes), 10)
        self.assertTrue(client._bound)
        status = yield client.two_factor_status()
        self.assertEqual((status["enabled"], status["required"]), (True, True))
        yield client.logout()
        yield client.login("alice", PASSWORD, code=codes[0])  # from now on a second factor
