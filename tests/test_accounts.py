"""The account commands of PROTOCOL.md through the real protocol, in memory (iosim)."""

from twisted.internet import defer, task
from twisted.protocols import amp
from twisted.trial import unittest

from securechatd import commands
from securechatd.commands import (
    AlreadyAuthenticated,
    AuthRequired,
    BadCredentials,
    InvalidArgument,
    InvalidUsername,
    NotAllowed,
    RateLimited,
    UsernameTaken,
    WeakPassword,
)
from securechatd.store.base import StoreError
from tests.helpers import Connection, make_hub

PASSWORD = "correct horse battery"


class AccountCommandTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.hub = make_hub(self, clock=self.clock)
        self.accounts = self.hub.accounts
        self.conn = Connection(self.hub)

    def register(self, username="alice", password=PASSWORD, conn=None):
        return self.successResultOf(
            (conn or self.conn).call(commands.Register, username=username, password=password)
        )

    def login(self, username="alice", password=PASSWORD, conn=None, **kw):
        return (conn or self.conn).call(commands.Login, username=username, password=password, **kw)

    def assertFails(self, deferred, error):
        failure = self.failureResultOf(deferred, error)
        return str(failure.value)

    # -- Register ---------------------------------------------------------------

    def test_register_stores_lower_case(self):
        self.assertEqual(self.register("Alice.B-1"), {"username": "alice.b-1"})
        self.assertEqual(self.accounts.registry.online_users(), set())
        self.successResultOf(self.login("ALICE.b-1"))

    def test_register_taken_case_insensitively(self):
        self.register("alice")
        text = self.assertFails(
            self.conn.call(commands.Register, username="ALICE", password=PASSWORD), UsernameTaken
        )
        self.assertIn("alice", text)

    def test_register_bad_usernames(self):
        for bad in ["al", "a" * 33, "1alice", "_alice", "al ice", "al!ce", "ålice", "", "alıce"]:
            self.assertFails(
                self.conn.call(commands.Register, username=bad, password=PASSWORD), InvalidUsername
            )
        self.assertEqual(self.successResultOf(self.accounts.store.list_users()), [])

    def test_register_weak_passwords(self):
        for bad in ["short", "", "x" * 1025]:
            self.assertFails(
                self.conn.call(commands.Register, username="alice", password=bad), WeakPassword
            )
        self.assertEqual(self.successResultOf(self.accounts.store.list_users()), [])

    def test_password_limits_are_inclusive(self):
        self.register("alice", "x" * 8)
        self.register("bob", "é" * 1024)
        self.successResultOf(self.login("bob", "é" * 1024))

    def test_registration_rate_per_address(self):
        hub = make_hub(self, clock=self.clock, registrations_per_address=1)
        conn = Connection(hub, address="10.0.0.7")
        self.register("alice", conn=conn)
        text = self.assertFails(
            conn.call(commands.Register, username="bob", password=PASSWORD), RateLimited
        )
        self.assertIn("retry in 600 seconds", text)
        other = Connection(hub, address="10.0.0.8")
        self.register("carol", conn=other)
        self.clock.advance(600)  # (the idle connection was dropped meanwhile)
        self.register("bob", conn=Connection(hub, address="10.0.0.7"))

    def test_registration_exempt_address(self):
        hub = make_hub(
            self, clock=self.clock, registrations_per_address=1, registration_exempt=("10.0.0.1",)
        )
        conn = Connection(hub, address="10.0.0.1")
        self.register("alice", conn=conn)
        self.register("bob", conn=conn)

    def test_register_after_login_refused(self):
        self.register()
        self.successResultOf(self.login())
        self.assertFails(
            self.conn.call(commands.Register, username="bob", password=PASSWORD),
            AlreadyAuthenticated,
        )

    # -- Login --------------------------------------------------------------------

    def test_login_answer(self):
        self.register()
        answer = self.successResultOf(self.login(client_name="laptop"))
        self.assertEqual(answer["username"], "alice")
        self.assertEqual(answer["server_time"].timestamp(), 1_700_000_000)
        self.assertEqual(len(answer["session_id"]), 32)
        self.assertGreaterEqual(len(answer["resume_token"]), 43)
        [session] = self.accounts.registry.sessions_of("alice")
        self.assertEqual((session.session_id, session.client_name), (answer["session_id"], "laptop"))

    def test_wrong_password_and_unknown_user_look_the_same(self):
        self.register()
        wrong = self.assertFails(self.login(password="not the password"), BadCredentials)
        unknown = self.assertFails(self.login(username="mallory"), BadCredentials)
        self.assertEqual(wrong, unknown)
        self.assertNotIn("alice", wrong)

    def test_unknown_user_still_spends_a_bcrypt_check(self):
        checked = []
        original = self.accounts.hasher._verify
        self.accounts.hasher._verify = lambda p, h: checked.append(h) or original(p, h)
        self.assertFails(self.login(username="mallory"), BadCredentials)
        self.assertEqual(checked, [None])

    def test_long_password_refused_without_hashing(self):
        self.register()
        self.accounts.hasher._verify = lambda p, h: self.fail("hashed an over-long password")
        self.assertFails(self.login(password="x" * 1025), BadCredentials)

    def test_passwords_differing_after_72_bytes(self):
        base = "p" * 72
        self.register("alice", base + "A")
        self.assertFails(self.login("alice", base + "B"), BadCredentials)
        self.successResultOf(self.login("alice", base + "A"))

    def test_login_rehashes_at_a_new_cost(self):
        self.register()
        before = self.successResultOf(self.accounts.store.get_credentials("alice")).password_hash
        self.accounts.hasher.cost += 1
        self.successResultOf(self.login())
        after = self.successResultOf(self.accounts.store.get_credentials("alice")).password_hash
        self.assertNotEqual(before, after)
        self.assertTrue(after.startswith(f"$2b$0{self.accounts.hasher.cost}$"))
        self.successResultOf(self.login(conn=Connection(self.hub)))

    def test_ipv4_mapped_addresses_count_as_ipv4(self):
        hub = make_hub(
            self, clock=self.clock, registrations_per_address=1, registration_exempt=("127.0.0.1",)
        )
        for name in ("alice", "bob"):
            conn = Connection(hub, address="::ffff:127.0.0.1", ipv6=True)
            self.register(name, conn=conn)

    def test_double_login_refused(self):
        self.register()
        self.successResultOf(self.login())
        self.assertFails(self.login(), AlreadyAuthenticated)

    def test_session_limit(self):
        hub = make_hub(self, clock=self.clock, max_sessions=2)
        first = Connection(hub)
        self.register(conn=first)
        self.successResultOf(self.login(conn=first))
        self.successResultOf(self.login(conn=Connection(hub)))
        third = Connection(hub)
        self.assertIn("at most 2", self.assertFails(self.login(conn=third), NotAllowed))
        first.drop()
        self.successResultOf(self.login(conn=third))

    def test_disconnect_ends_session(self):
        self.register()
        self.successResultOf(self.login())
        self.conn.drop()
        self.assertEqual(self.accounts.registry.sessions_of("alice"), [])

    # -- commands before login ----------------------------------------------------

    def test_ping_before_login(self):
        answer = self.successResultOf(self.conn.call(commands.Ping))
        self.assertEqual(answer["server_time"].timestamp(), 1_700_000_000)

    def test_commands_need_login(self):
        self.assertFails(self.conn.call(commands.Logout), AuthRequired)
        self.assertFails(
            self.conn.call(commands.ChangePassword, old_password=PASSWORD, new_password=PASSWORD),
            AuthRequired,
        )

    # -- Logout -------------------------------------------------------------------

    def test_logout_keeps_connection_and_revokes_token(self):
        self.register()
        token = self.successResultOf(self.login())["resume_token"]
        self.successResultOf(self.conn.call(commands.Logout))
        self.assertEqual(self.accounts.registry.sessions_of("alice"), [])
        self.assertFails(self.conn.call(commands.Logout), AuthRequired)
        self.assertFails(
            self.conn.call(commands.Resume, username="alice", resume_token=token), BadCredentials
        )
        self.successResultOf(self.login())

    # -- Resume -------------------------------------------------------------------

    def test_resume_is_single_use(self):
        self.register()
        first = self.successResultOf(self.login())
        self.conn.drop()
        again = Connection(self.hub)
        resumed = self.successResultOf(
            again.call(commands.Resume, username="alice", resume_token=first["resume_token"])
        )
        self.assertEqual(resumed["username"], "alice")
        self.assertNotEqual(resumed["resume_token"], first["resume_token"])
        self.assertNotEqual(resumed["session_id"], first["session_id"])
        third = Connection(self.hub)
        self.assertFails(
            third.call(commands.Resume, username="alice", resume_token=first["resume_token"]),
            BadCredentials,
        )
        self.successResultOf(
            third.call(commands.Resume, username="alice", resume_token=resumed["resume_token"])
        )

    def test_resume_costs_no_bcrypt(self):
        self.register()
        token = self.successResultOf(self.login())["resume_token"]
        self.accounts.hasher._verify = lambda p, h: self.fail("Resume ran bcrypt")
        self.successResultOf(
            Connection(self.hub).call(commands.Resume, username="alice", resume_token=token)
        )

    def test_resume_token_expires(self):
        self.register()
        token = self.successResultOf(self.login())["resume_token"]
        self.clock.advance(30 * 86400)
        self.assertFails(
            Connection(self.hub).call(commands.Resume, username="alice", resume_token=token),
            BadCredentials,
        )

    def test_resume_token_of_another_user(self):
        self.register("alice")
        self.register("bob")
        token = self.successResultOf(self.login("alice"))["resume_token"]
        conn = Connection(self.hub)
        self.assertFails(
            conn.call(commands.Resume, username="bob", resume_token=token), BadCredentials
        )
        self.assertFails(
            conn.call(commands.Resume, username="no such!", resume_token=token), BadCredentials
        )
        # the failed attempts did not spend alice's token
        self.successResultOf(conn.call(commands.Resume, username="ALICE", resume_token=token))

    # -- ChangePassword -----------------------------------------------------------

    def test_change_password_ends_other_sessions(self):
        self.register()
        mine = self.successResultOf(self.login())
        other = Connection(self.hub)
        theirs = self.successResultOf(self.login(conn=other))
        self.successResultOf(
            self.conn.call(
                commands.ChangePassword, old_password=PASSWORD, new_password="a new password"
            )
        )
        other.pump.flush()
        self.assertTrue(other.server.lost)
        self.assertEqual(
            [s.session_id for s in self.accounts.registry.sessions_of("alice")], [mine["session_id"]]
        )
        fresh = Connection(self.hub)
        self.assertFails(
            fresh.call(commands.Resume, username="alice", resume_token=theirs["resume_token"]),
            BadCredentials,
        )
        self.successResultOf(
            fresh.call(commands.Resume, username="alice", resume_token=mine["resume_token"])
        )
        self.assertFails(self.login(conn=Connection(self.hub)), BadCredentials)
        self.successResultOf(self.login(password="a new password", conn=Connection(self.hub)))

    def test_change_password_wrong_old(self):
        self.register()
        self.successResultOf(self.login())
        self.assertFails(
            self.conn.call(commands.ChangePassword, old_password="wrong password", new_password="a new password"),
            BadCredentials,
        )
        self.successResultOf(self.login(conn=Connection(self.hub)))

    def test_change_password_weak_new(self):
        self.register()
        self.successResultOf(self.login())
        self.assertFails(
            self.conn.call(commands.ChangePassword, old_password=PASSWORD, new_password="short"),
            WeakPassword,
        )

    # -- throttling ---------------------------------------------------------------

    def test_account_delay_after_five_failures(self):
        self.register()
        for _ in range(5):
            self.assertFails(self.login(password="wrong password"), BadCredentials)
        text = self.assertFails(self.login(), RateLimited)
        self.assertIn("retry in 1 second", text)
        self.clock.advance(1)
        self.assertFails(self.login(password="wrong password"), BadCredentials)
        self.assertIn("retry in 2 seconds", self.assertFails(self.login(), RateLimited))
        self.clock.advance(2)
        self.successResultOf(self.login())

    def test_address_block_after_twenty_failures(self):
        self.register()
        for i in range(20):
            self.assertFails(self.login(username=f"user{i}", password="wrong password"), BadCredentials)
        text = self.assertFails(self.login(), RateLimited)
        self.assertIn("your address", text)
        self.successResultOf(self.login(conn=Connection(self.hub, address="10.9.9.9")))
        self.clock.advance(3600)
        self.successResultOf(self.login(conn=Connection(self.hub)))

    # -- malformed arguments ------------------------------------------------------

    def test_malformed_arguments_answer_invalid_argument(self):
        class LoginWithoutPassword(amp.Command):
            commandName = b"Login"
            arguments = [(b"username", amp.Unicode())]
            errors = commands.ERRORS

        class LoginInBytes(amp.Command):
            commandName = b"Login"
            arguments = [(b"username", amp.String()), (b"password", amp.String())]
            errors = commands.ERRORS

        self.register()
        self.assertFails(self.conn.call(LoginWithoutPassword, username="alice"), InvalidArgument)
        self.assertFails(
            self.conn.call(LoginInBytes, username=b"\xff\xfe", password=b"x" * 10), InvalidArgument
        )
        self.assertFalse(self.conn.client.transport.disconnecting)
        self.successResultOf(self.login())

    def test_unknown_command_keeps_connection(self):
        class Shout(amp.Command):
            commandName = b"Shout"

        self.failureResultOf(self.conn.call(Shout), amp.UnhandledCommand)
        self.successResultOf(self.conn.call(commands.Ping))


class RaceTests(unittest.TestCase):
    """Logins whose checks overlap other changes."""

    def setUp(self):
        self.clock = task.Clock()
        self.hub = make_hub(self, clock=self.clock)
        self.accounts = self.hub.accounts
        conn = Connection(self.hub)
        self.successResultOf(conn.call(commands.Register, username="alice", password=PASSWORD))

    def hold_hashing(self):
        """Make bcrypt checks wait until the returned list's Deferreds are fired."""
        held = []
        run = self.accounts.hasher._run

        def hold(f, *args):
            waiting = defer.Deferred()
            held.append(waiting)
            return waiting.addCallback(lambda _: f(*args))

        self.accounts.hasher._run = hold
        return held, run

    def test_login_racing_a_password_change_gets_nothing(self):
        victim = Connection(self.hub)
        self.successResultOf(victim.call(commands.Login, username="alice", password=PASSWORD))
        held, run = self.hold_hashing()
        attacker = Connection(self.hub)
        outcome = []
        attacker.client.callRemote(commands.Login, username="alice", password=PASSWORD).addBoth(outcome.append)
        attacker.pump.flush()  # its bcrypt check is held
        self.accounts.hasher._run = run
        self.successResultOf(
            victim.call(commands.ChangePassword, old_password=PASSWORD, new_password="a fresh password")
        )
        held[0].callback(None)  # the old password checks out against what was read before
        attacker.pump.flush()
        self.assertTrue(outcome[0].check(BadCredentials), outcome)
        self.assertEqual(len(self.hub.registry.sessions_of("alice")), 1)
        self.assertEqual(self.hub.registry.count("alice"), 1)

    def test_failed_token_write_leaves_no_session(self):
        original = self.accounts.store.add_resume_token
        self.accounts.store.add_resume_token = lambda *a: defer.fail(StoreError("database is locked"))
        for _ in range(12):
            self.failureResultOf(
                Connection(self.hub).call(commands.Login, username="alice", password=PASSWORD),
                commands.ServiceUnavailable,
            )
        self.flushLoggedErrors(StoreError)
        self.accounts.store.add_resume_token = original
        self.assertEqual(self.hub.registry.count("alice"), 0)
        self.successResultOf(Connection(self.hub).call(commands.Login, username="alice", password=PASSWORD))

    def test_resume_over_the_session_limit_keeps_its_token(self):
        self.accounts.realm.max_sessions = 1
        first = Connection(self.hub)
        token = self.successResultOf(first.call(commands.Login, username="alice", password=PASSWORD))["resume_token"]
        second = Connection(self.hub)
        self.failureResultOf(second.call(commands.Resume, username="alice", resume_token=token), NotAllowed)
        first.drop()
        self.successResultOf(second.call(commands.Resume, username="alice", resume_token=token))

    def test_concurrent_resumes_are_not_guesses(self):
        tokens = []
        for _ in range(8):
            conn = Connection(self.hub)
            tokens.append(self.successResultOf(conn.call(commands.Login, username="alice", password=PASSWORD))["resume_token"])
            conn.drop()
        held = []
        self.accounts.store.consume_resume_token = lambda *a: held.append(a) or defer.Deferred()
        calls = [Connection(self.hub).call(commands.Resume, username="alice", resume_token=t) for t in tokens]
        self.assertEqual(len(held), 8)  # none refused as too many attempts in flight
        for call in calls:
            self.assertNoResult(call)

    def test_logout_puts_the_login_deadline_back(self):
        conn = Connection(self.hub)
        self.successResultOf(conn.call(commands.Login, username="alice", password=PASSWORD))
        self.successResultOf(conn.call(commands.Logout))
        for _ in range(3):
            self.clock.advance(20)
            conn.pump.flush()
        self.assertTrue(conn.server.lost)

    def test_ipv6_neighbours_share_the_address_block(self):
        for i in range(20):
            conn = Connection(self.hub, address=f"2001:db8::{i + 1:x}", ipv6=True)
            self.failureResultOf(conn.call(commands.Login, username=f"user{i}", password="wrong guess"), BadCredentials)
        conn = Connection(self.hub, address="2001:db8::ffff", ipv6=True)
        self.failureResultOf(conn.call(commands.Login, username="bob", password=PASSWORD), RateLimited)
