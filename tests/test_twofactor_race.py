"""Commands sent one behind another during a login's second step: each login gets one try.

A client may send several commands before the first is answered (32 in
flight); the second step awaits the store, so without care every code
pipelined behind the first would be checked against the same login.
"""

import base64

from twisted.internet.defer import Deferred

from securechatd import commands
from securechatd.commands import (
    AuthRequired,
    BadCredentials,
    EnrolmentRequired,
    NoSuchDevice,
    NotAllowed,
    RateLimited,
    SecondFactorRequired,
    ServiceUnavailable,
)
from securechatd.e2ee import chain, keys
from securechatd.store.base import StoreError
from tests.helpers import Connection
from tests.test_twofactor import TwoFactorTestCase


class PipelinedCase(TwoFactorTestCase):
    def gate(self, name):
        """Hold every call of the store's `name` (the real one) until released: the list of those held."""
        gates, real = [], getattr(self.hub.store, name)

        def gated(*arguments):
            gate = Deferred()
            gates.append(gate)
            return gate.addCallback(lambda _: real(*arguments))

        self.patch(self.hub.store, name, gated)
        return gates

    def pipelined(self, command, arguments):
        """Send `command` once with each of `arguments` (dicts) without waiting for an answer: the list each
        answer (or Failure) lands in, in the order sent."""
        answers = [None] * len(arguments)
        for index, sent in enumerate(arguments):
            called = self.conn.client.callRemote(command, **sent)
            called.addBoth(lambda answer, i=index: answers.__setitem__(i, answer))
        self.conn.pump.flush()
        return answers

    def release(self, gates):
        for gate in gates:
            gate.callback(None)
        self.conn.pump.flush()


class SecondFactorTests(PipelinedCase):
    def setUp(self):
        super().setUp()
        self.secret, self.codes = self.enrolled()

    def bound_device(self):
        """A device of alice's chain (published from a session that passed its code): its id, hex."""
        laptop = keys.Device.generate("alice")
        conn = Connection(self.hub)
        self.pending(conn)
        self.ok(conn, commands.SecondFactor, code=self.code(self.secret))
        self.ok(conn, commands.PublishChainLink, link=chain.first(laptop, "laptop").to_bytes())
        self.ok(conn, commands.Logout)
        self.next_step()
        return laptop.id.hex()

    def test_codes_sent_one_behind_another_are_one_try(self):
        """Codes pipelined while the first one's device check is under way are refused unchecked."""
        device_id = self.bound_device()
        gates = self.gate("device_binding")
        self.failureResultOf(self.login(device_id=device_id), SecondFactorRequired)
        answers = self.pipelined(commands.SecondFactor, [{"code": f"{n:06d}"} for n in range(1, 31)])
        self.assertEqual(len(gates), 1)  # only the first code got as far as the device check
        self.release(gates)
        answers[0].trap(BadCredentials)
        for refused in answers[1:]:
            refused.trap(AuthRequired)
            self.assertIn("No login waits", refused.getErrorMessage())

    def test_right_codes_sent_at_once_make_one_session(self):
        """A right code and two recovery codes sent at once: one session, and the recovery codes unspent."""
        device_id = self.bound_device()
        gates = self.gate("device_binding")
        self.failureResultOf(self.login(device_id=device_id), SecondFactorRequired)
        code, [recovery, other, *_] = self.code(self.secret), self.codes
        answers = self.pipelined(commands.SecondFactor, [{"code": typed} for typed in (code, recovery, other)])
        self.release(gates)
        self.assertEqual(answers[0]["username"], "alice")
        for refused in answers[1:]:
            refused.trap(AuthRequired)
        self.assertEqual(len(self.hub.accounts.registry.sessions_of("alice")), 1)
        for typed in (recovery, other):
            conn = Connection(self.hub)
            self.pending(conn)
            self.assertEqual(self.ok(conn, commands.SecondFactor, code=typed)["username"], "alice")


    def test_a_store_error_in_the_device_check_holds_nothing(self):
        """A device check that fails (the database busy) ends the attempt as neither right nor wrong: five of
        them do not leave the account refused as if five logins were still under way."""
        device_id = self.bound_device()
        gates = self.gate("device_binding")
        for _ in range(5):
            self.conn = Connection(self.hub)
            self.failureResultOf(self.login(device_id=device_id), SecondFactorRequired)
            answers = self.pipelined(commands.SecondFactor, [{"code": self.code(self.secret)}])
            gates.pop().errback(StoreError("device_binding: database is locked"))
            self.conn.pump.flush()
            answers[0].trap(ServiceUnavailable)
        self.conn = Connection(self.hub)
        self.failureResultOf(self.login(), SecondFactorRequired)  # not RATE_LIMITED

    def test_logout_waits_for_the_second_steps_answer(self):
        """A Logout sent behind a code being checked is refused: the code's answer may log the connection in,
        and a Login after the Logout would have given the connection a second session."""
        device_id = self.bound_device()
        gates = self.gate("device_binding")
        self.failureResultOf(self.login(device_id=device_id), SecondFactorRequired)
        answers = self.pipelined(commands.SecondFactor, [{"code": self.code(self.secret)}])
        refused = self.error(self.conn, NotAllowed, commands.Logout)
        self.assertIn("wait for its answer", refused)
        self.release(gates)
        self.assertEqual(answers[0]["username"], "alice")
        self.ok(self.conn, commands.Logout)  # (now a plain logout)
        self.assertEqual(self.hub.accounts.registry.sessions_of("alice"), [])

    def test_a_refused_device_is_a_failed_login_whatever_the_password(self):
        """Else anyone could fill a 2FA user's account log with device refusals, bcrypt for free."""
        self.bound_device()
        for _ in range(5):
            self.conn = Connection(self.hub)
            self.failureResultOf(
                self.login(password="not the password", device_id=keys.Device.generate("alice").id.hex()),
                SecondFactorRequired,
            )
            self.error(self.conn, NoSuchDevice, commands.SecondFactor, code="123456")
        self.failureResultOf(self.login(Connection(self.hub)), RateLimited)


    def test_a_new_installation_with_the_right_password_is_no_failure(self):
        """A new installation tries its device first (not yet in the chain), then logs in unbound: with the
        right password that is not a failed login, however often it happens before a device adds it."""
        self.bound_device()
        for _ in range(6):
            self.conn = Connection(self.hub)
            self.failureResultOf(
                self.login(device_id=keys.Device.generate("alice").id.hex()), SecondFactorRequired
            )
            self.error(self.conn, NoSuchDevice, commands.SecondFactor, code="123456")
        self.failureResultOf(self.login(Connection(self.hub)), SecondFactorRequired)  # not RATE_LIMITED


class EnrolmentTests(PipelinedCase):
    settings = {"two_factor": "required"}

    def test_two_enrolment_codes_sent_at_once_log_in_once(self):
        self.failureResultOf(self.login(), EnrolmentRequired)
        secret = base64.b32decode(self.ok(self.conn, commands.BeginTwoFactor)["secret"])
        gates = self.gate("enable_two_factor")
        answers = self.pipelined(commands.ConfirmTwoFactor, [{"code": self.code(secret)}] * 2)
        answers[1].trap(NotAllowed)
        self.assertIn("being checked", answers[1].getErrorMessage())
        self.release(gates)
        self.assertEqual(answers[0]["username"], "alice")
        self.assertEqual(len(self.hub.accounts.registry.sessions_of("alice")), 1)
