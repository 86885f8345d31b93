"""Sessions under the user's control and the tamper-evident account log, through the real protocol in memory.

The log is read the way a client reads it: GetAccountLog's answer checked
with securechatd/accountlog.py against the server key, keeping the last
tree head; then the stored events are rewritten, dropped and reordered and
the tree forked, and each is caught. Device-signed actions are made with
cryptography directly, as a client would.
"""

import base64
import os
import sqlite3

from twisted.internet import task
from twisted.trial import unittest

from securechatd import accountlog, commands, totp
from securechatd.accountlog import ACTION_LABEL, Entry, Event, Known, check_entries, check_tree_head
from securechatd.commands import (
    AuthRequired,
    BadCredentials,
    BadSignature,
    InvalidArgument,
    NoSuchDevice,
    NoSuchSession,
    NotAllowed,
)
from securechatd.e2ee.encoding import sign
from securechatd.server.account_log import AccountLog
from securechatd.store.account_log import Logged
from securechatd.store.account_log import NewEvent
from tests.helpers import Connection, make_hub, settle
from tests.test_keys import Chain, Device

PASSWORD = "correct horse battery"
NOW = 1_700_000_000


def entries(answer):
    return [Entry(item["event"], item["leaf_index"], item["proof"]) for item in answer["events"]]


# A forger that deletes an event renumbers the leaves after it, so the server's tree has no hole
# (leaves are appended in row order).
CLOSE_GAPS = (
    ("UPDATE account_events SET leaf_index = -1 - (SELECT COUNT(*) FROM account_events e WHERE e.rowid < account_events.rowid)", ()),
    ("UPDATE account_events SET leaf_index = -1 - leaf_index", ()),
)

class Client:
    """What a client keeps of its account log: the last event and tree head it verified."""

    def __init__(self, testcase, conn, user, device_keys=None):
        self.testcase = testcase
        self.conn = conn
        self.user = user
        self.known = Known()
        self.device_keys = device_keys or {}
        self.events = []

    def fetch(self):
        """Everything new, checked: the new Events."""
        new = []
        while True:
            asked = self.conn.call(
                commands.GetAccountLog,
                after_seq=self.known.seq,
                tree_size=self.known.head.size if self.known.head else None,
            )
            failures = []
            asked.addErrback(lambda failure: failures.append(failure.trap(InvalidArgument)) and None)
            if failures:  # the server's log is smaller than one it showed before: it lost or dropped leaves
                raise accountlog.Inconsistent("the log is smaller than the tree head seen before")
            answer = self.testcase.successResultOf(asked)
            head = check_tree_head(self.testcase.server_key, answer["tree_head"], self.known.head, answer["consistency"])
            self.known = check_entries(self.user, entries(answer), head, self.known, self.device_keys.get)
            new += [Event.from_bytes(item["event"]) for item in answer["events"]]
            if not answer["has_more"]:
                self.events += new
                return new


class SecurityTestCase(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.hub = make_hub(self, clock=self.clock)
        self.server_key = self.hub.account_log.key.public_key()
        setup = Connection(self.hub)
        for name in ("alice", "bob"):
            self.ok(setup, commands.Register, username=name, password=PASSWORD)

    def ok(self, conn, command, **arguments):
        return self.successResultOf(conn.call(command, **arguments))

    def error(self, conn, error, command, **arguments):
        return str(self.failureResultOf(conn.call(command, **arguments), error).value)

    def connect(self, user="alice", address="10.0.0.1", **arguments):
        conn = Connection(self.hub, address=address)
        conn.login = self.ok(conn, commands.Login, username=user, password=PASSWORD, **arguments)
        return conn

    def bound(self, user="alice"):
        """A connection bound to a new device that starts `user`'s chain: (conn, device)."""
        device = Device()
        conn = self.connect(user, device_id=device.hex)
        chain = Chain(user)
        self.ok(conn, commands.PublishChainLink, link=chain.accepted(chain.link("add", device, device)).to_bytes())
        return conn, device

    def signed(self, device, kind, target="", user="alice", time_ms=None, nonce=None, key=None):
        """A device's action arguments, signed with cryptography and docs/PROTOCOL.md's fields."""
        time_ms = round(self.clock.seconds() * 1000) if time_ms is None else time_ms
        nonce = os.urandom(16) if nonce is None else nonce
        fields = [user, device.id, kind, target, time_ms, nonce]
        return {"action_time": time_ms, "action_nonce": nonce, "action_signature": sign(key or device.sig, ACTION_LABEL, fields)}


class SessionControlTests(SecurityTestCase):
    def test_list_my_sessions(self):
        laptop = self.connect(address="10.0.0.1", client_name="laptop")
        self.clock.advance(5)
        phone = self.connect(address="10.0.0.2", client_name="phone")
        self.clock.advance(5)
        self.ok(phone, commands.Ping)
        phone.drop()  # still resumable: its token is kept
        self.clock.advance(5)
        answer = self.ok(laptop, commands.ListSessions)
        self.assertFalse(answer["has_more"])
        rows = [
            (s["session_id"], s["client_name"], s["address"], s["since"].timestamp(), s["last_active"].timestamp(),
             s["online"], s["this_session"])
            for s in answer["sessions"]
        ]
        self.assertEqual(
            rows,
            [
                (laptop.login["session_id"], "laptop", "10.0.0.1", NOW, NOW + 15, True, True),
                (phone.login["session_id"], "phone", "10.0.0.2", NOW + 5, NOW + 10, False, False),
            ],
        )
        self.assertEqual(self.ok(self.connect("bob"), commands.ListSessions)["sessions"][0]["client_name"], None)

    def test_the_newest_sessions_come_first_and_names_are_short(self):
        """Logged-in sessions first, newest first, and a client_name kept to 64 characters: long names and many
        old sessions cannot push someone's new session off the one page ListSessions answers."""
        for n in range(12):
            self.connect(client_name=f"old {n} " + "x" * 4000).drop()  # (resumable: their tokens are kept)
            self.clock.advance(1)
        mine = self.connect(client_name="laptop")
        self.clock.advance(1)
        intruder = self.connect(address="203.0.113.9", client_name="?" * 4000)
        sessions = self.ok(mine, commands.ListSessions)["sessions"]
        self.assertEqual(
            [(s["session_id"], s["client_name"]) for s in sessions[:2]],
            [(intruder.login["session_id"], "?" * 64), (mine.login["session_id"], "laptop")],
        )
        self.assertEqual([s["client_name"][:6] for s in sessions[2:4]], ["old 11", "old 10"])

    def test_end_one_session(self):
        laptop = self.connect()
        self.clock.advance(1)
        phone = self.connect()
        self.clock.advance(1)
        tablet = self.connect()
        token = phone.login["resume_token"]
        self.ok(laptop, commands.EndSession, session_id=phone.login["session_id"])
        phone.pump.flush()
        self.assertTrue(phone.server.lost)
        self.assertFalse(tablet.server.lost)
        self.error(Connection(self.hub), BadCredentials, commands.Resume, username="alice", resume_token=token)
        ids = [s["session_id"] for s in self.ok(laptop, commands.ListSessions)["sessions"]]
        self.assertEqual(ids, [tablet.login["session_id"], laptop.login["session_id"]])  # (newest first)

    def test_end_a_session_that_is_away(self):
        """A phone that is off still holds a resume token: ending it revokes the token."""
        laptop, phone = self.connect(), self.connect()
        token = phone.login["resume_token"]
        phone.drop()
        self.ok(laptop, commands.EndSession, session_id=phone.login["session_id"])
        self.error(Connection(self.hub), BadCredentials, commands.Resume, username="alice", resume_token=token)
        self.error(laptop, NoSuchSession, commands.EndSession, session_id=phone.login["session_id"])

    def test_end_all_but_this_one(self):
        laptop, phone, tablet = self.connect(), self.connect(), self.connect()
        away = self.connect()
        away.drop()
        bob = self.connect("bob")
        self.assertEqual(self.ok(laptop, commands.EndOtherSessions), {"ended": 3})
        settle(self.clock, [phone, tablet, bob])
        self.assertTrue(phone.server.lost and tablet.server.lost)
        self.assertFalse(bob.server.lost)
        for conn in (phone, tablet, away):
            self.error(Connection(self.hub), BadCredentials, commands.Resume, username="alice", resume_token=conn.login["resume_token"])
        self.ok(Connection(self.hub), commands.Resume, username="alice", resume_token=laptop.login["resume_token"])
        self.assertEqual(self.ok(laptop, commands.EndOtherSessions), {"ended": 1})  # (the token just resumed)

    def test_bad_input(self):
        laptop = self.connect()
        bob = self.connect("bob")
        for bad in ("", "x" * 32, laptop.login["session_id"].upper(), "0" * 33):
            self.error(laptop, InvalidArgument, commands.EndSession, session_id=bad)
        self.assertIn("Logout", self.error(laptop, InvalidArgument, commands.EndSession, session_id=laptop.login["session_id"]))
        self.error(laptop, NoSuchSession, commands.EndSession, session_id="0" * 32)
        self.error(laptop, NoSuchSession, commands.EndSession, session_id=bob.login["session_id"])  # not hers
        self.assertFalse(bob.server.lost)
        conn = Connection(self.hub)
        for command, arguments in ((commands.ListSessions, {}), (commands.EndOtherSessions, {}), (commands.GetAccountLog, {})):
            self.error(conn, AuthRequired, command, **arguments)

    def test_a_bound_session_signs_what_it_ends(self):
        laptop, device = self.bound()
        phone = self.connect()
        target = phone.login["session_id"]
        self.assertIn("signs", self.error(laptop, InvalidArgument, commands.EndSession, session_id=target))
        self.error(laptop, BadSignature, commands.EndSession, session_id=target, **self.signed(device, "session_end", "0" * 32))
        self.error(laptop, BadSignature, commands.EndSession, session_id=target, **self.signed(device, "session_end", target, key=Device().sig))
        late = self.signed(device, "session_end", target, time_ms=(NOW - 301) * 1000)
        self.assertIn("clock", self.error(laptop, NotAllowed, commands.EndSession, session_id=target, **late))
        bad = self.signed(device, "session_end", target)
        bad["action_nonce"] = b"short"
        self.error(laptop, InvalidArgument, commands.EndSession, session_id=target, **bad)
        self.assertFalse(phone.server.lost)
        action = self.signed(device, "session_end", target)
        self.ok(laptop, commands.EndSession, session_id=target, **action)
        other = self.connect()
        again = dict(action)
        self.error(laptop, BadSignature, commands.EndSession, session_id=other.login["session_id"], **again)
        self.assertIn("used before", self.error(laptop, NotAllowed, commands.EndOtherSessions, **self.signed(device, "sessions_end_others", nonce=action["action_nonce"])))
        unbound = self.connect()
        self.error(unbound, InvalidArgument, commands.EndOtherSessions, **self.signed(device, "sessions_end_others"))

    def test_a_revoked_device_signs_nothing(self):
        laptop, device = self.bound()
        other = Device("phone")
        chain = Chain("alice")
        chain.accepted(chain.link("add", device, device))
        self.ok(laptop, commands.PublishChainLink, link=chain.accepted(chain.link("add", other, device)).to_bytes())
        phone = self.connect(device_id=other.hex)
        self.ok(phone, commands.PublishChainLink, link=chain.accepted(chain.link("revoke", device, other)).to_bytes())
        # laptop's session ended with the revoke; a session claiming it cannot sign
        self.hub.accounts.registry.all_sessions_of("alice")
        session = [s for s in self.hub.accounts.registry.all_sessions_of("alice") if s.device_id == other.hex][0]
        session.device_id = device.hex  # (as if bound to the revoked device)
        self.error(phone, NoSuchDevice, commands.EndOtherSessions, **self.signed(device, "sessions_end_others"))


class AccountLogTests(SecurityTestCase):
    def test_every_kind_of_event_with_proofs(self):
        self.failureResultOf(Connection(self.hub, address="10.9.9.9").call(commands.Login, username="alice", password="wrong password"), BadCredentials)
        laptop, device = self.bound()
        client = Client(self, laptop, "alice", {device.id: device.sig.public_key()})
        phone = self.connect(address="10.0.0.2")
        self.ok(laptop, commands.EndSession, session_id=phone.login["session_id"], **self.signed(device, "session_end", phone.login["session_id"]))
        begun = self.ok(laptop, commands.BeginTwoFactor)
        secret = base64.b32decode(begun["secret"])
        codes = self.ok(laptop, commands.ConfirmTwoFactor, code=totp.code(secret, self.clock.seconds()), password=PASSWORD, **self.signed(device, "second_factor_on"))["recovery_codes"]
        self.clock.advance(60)
        other = Connection(self.hub, address="10.0.0.3")
        self.failureResultOf(other.call(commands.Login, username="alice", password=PASSWORD), commands.SecondFactorRequired)
        self.ok(other, commands.SecondFactor, code=codes[0])
        self.ok(laptop, commands.NewRecoveryCodes, code=totp.code(secret, self.clock.seconds()), **self.signed(device, "recovery_codes_new"))
        self.ok(
            laptop, commands.ChangePassword, old_password=PASSWORD, new_password="a new password",
            **self.signed(device, "password_change"),
        )
        events = client.fetch()
        kinds = [(e.kind, e.target) for e in events]
        self.assertEqual(
            kinds,
            [
                ("login_failed", "password"),
                ("login", "password"),
                ("device_add", device.hex),
                ("login", "password"),
                ("session_end", phone.login["session_id"]),
                ("second_factor_on", ""),
                ("recovery_code_used", ""),
                ("login", "recovery"),
                ("recovery_codes_new", ""),
                ("password_change", ""),
            ],
        )
        self.assertEqual(events[0].address, "10.9.9.9")
        self.assertEqual(events[2].device, device.id)  # the device that signed the link
        self.assertEqual([e.device for e in events if e.action is not None], [device.id] * 4)
        for event in events:  # nothing secret in any event
            data = event.to_bytes()
            for secret_text in [begun["secret"], base64.b32encode(secret).decode(), PASSWORD, "a new password", *codes]:
                self.assertNotIn(secret_text.encode(), data)
        self.assertEqual(client.fetch(), [])  # nothing new: the head and a consistency proof still check

    def test_a_client_keeps_up_as_the_log_grows(self):
        conn = self.connect()
        client = Client(self, conn, "alice")
        self.assertEqual(len(client.fetch()), 1)
        for _ in range(3):
            self.connect("bob")  # other users' leaves grow the tree too
            self.connect()
            self.assertEqual([e.kind for e in client.fetch()], ["login"])
        self.assertEqual(client.known.head.size, 7)

    def test_pages(self):
        for _ in range(60):
            self.connect().drop()
        conn = self.connect()
        first = self.ok(conn, commands.GetAccountLog)
        self.assertEqual((len(first["events"]), first["has_more"]), (50, True))
        client = Client(self, conn, "alice")
        self.assertEqual(len(client.fetch()), 61)

    def test_bad_arguments(self):
        conn = self.connect()
        for arguments in ({"after_seq": -1}, {"tree_size": -1}, {"tree_size": 1000}):
            self.error(conn, InvalidArgument, commands.GetAccountLog, **arguments)

    def test_only_my_events(self):
        self.connect("bob")
        conn = self.connect()
        events = Client(self, conn, "alice").fetch()
        self.assertEqual({e.user for e in events}, {"alice"})

    def test_the_tree_is_rebuilt_at_start_up(self):
        conn = self.connect()
        client = Client(self, conn, "alice")
        client.fetch()
        restarted = AccountLog(self.hub.store, self.clock, self.hub.account_log.key, self.hub.account_log._run)
        self.successResultOf(restarted.sync())
        self.assertEqual(restarted.tree.root(), self.hub.account_log.tree.root())
        self.hub.account_log = self.hub.security.log = restarted
        self.connect()
        self.assertEqual([e.kind for e in client.fetch()], ["login"])

    def test_events_written_by_another_process_are_taken_in(self):
        """securechatd-admin writes the database directly: the daemon's tree takes its leaves in."""
        conn = self.connect()
        client = Client(self, conn, "alice")
        client.fetch()
        self.successResultOf(self.hub.store.record_event("alice", NewEvent("second_factor_off", target="admin"), NOW))
        self.connect("bob")  # (the daemon's next leaf comes after the one it did not see)
        self.assertEqual([(e.kind, e.target) for e in client.fetch()], [("second_factor_off", "admin")])


class TamperTests(SecurityTestCase):
    """A server (or anyone with the database) that rewrites, drops, reorders or forks is caught."""

    def setUp(self):
        super().setUp()
        self.conn = self.connect()
        for _ in range(3):
            self.connect()
            self.connect("bob")
        self.client = Client(self, self.conn, "alice")
        self.client.fetch()
        self.path = self.hub.store._pool.connargs[0]

    def tamper(self, *statements):
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            for statement, arguments in statements:
                db.execute(statement, arguments)
        finally:
            db.close()
        restarted = AccountLog(self.hub.store, self.clock, self.hub.account_log.key, self.hub.account_log._run)
        self.hub.account_log = self.hub.security.log = restarted  # (the daemon restarts over the changed database)

    def refetch_from_scratch(self):
        fresh = Client(self, self.conn, "alice")
        fresh.known = Known(head=self.client.known.head)  # a client that kept only its last tree head
        return fresh.fetch()

    def alice_event(self, seq):
        db = sqlite3.connect(self.path)
        try:
            return db.execute(
                "SELECT event FROM account_events WHERE seq = ? AND user_id = (SELECT id FROM users WHERE username = 'alice')",
                (seq,),
            ).fetchone()[0]
        finally:
            db.close()

    def test_a_rewritten_event(self):
        changed = Event.from_bytes(self.alice_event(2))
        from dataclasses import replace

        forged = replace(changed, address="203.0.113.66")
        self.tamper(
            ("UPDATE account_events SET event = ? WHERE event = ?", (forged.to_bytes(), self.alice_event(2))),
        )
        with self.assertRaises(accountlog.LogError):
            self.refetch_from_scratch()

    def test_a_rewritten_event_with_its_leaf(self):
        """The leaf rewritten too: the tree is another, and no consistency proof joins the head seen before."""
        from dataclasses import replace

        old = self.alice_event(2)
        forged = replace(Event.from_bytes(old), address="203.0.113.66")
        self.tamper(
            ("UPDATE account_events SET event = ?, hash = ?, leaf = ? WHERE event = ?", (forged.to_bytes(), forged.hash(), forged.leaf(), old)),
        )
        self.connect("bob")
        with self.assertRaises(accountlog.Inconsistent):
            self.client.fetch()

    def test_a_dropped_event(self):
        self.tamper(
            ("DELETE FROM account_events WHERE event = ?", (self.alice_event(2),)),
            *CLOSE_GAPS,
        )
        with self.assertRaises(accountlog.LogError):
            self.refetch_from_scratch()

    def test_reordered_events(self):
        two, three = self.alice_event(2), self.alice_event(3)
        self.tamper(
            ("UPDATE account_events SET event = ? WHERE event = ?", (b"swap", two)),
            ("UPDATE account_events SET event = ? WHERE event = ?", (two, three)),
            ("UPDATE account_events SET event = ? WHERE event = ?", (three, b"swap")),
        )
        with self.assertRaises(accountlog.LogError):
            self.refetch_from_scratch()

    def test_a_truncated_log(self):
        """Everything after some point gone: the tree is smaller than one the client saw."""
        self.tamper(("DELETE FROM account_events WHERE leaf_index >= 4", ()))
        self.assertIn(
            "larger than this log",
            self.error(self.conn, InvalidArgument, commands.GetAccountLog, tree_size=self.client.known.head.size),
        )

    def test_a_missing_leaf_is_not_shown_as_a_log(self):
        """A leaf gone from the middle (the database damaged, or a careless forger): the server's tree would
        stop there and every later event look never logged, so GetAccountLog says the log is damaged."""
        self.tamper(("DELETE FROM account_events WHERE leaf_index = 2", ()))
        self.connect("bob")  # (a new event: the log cannot grow past the damage either)
        text = self.error(self.conn, commands.ServiceUnavailable, commands.GetAccountLog)
        self.assertIn("account log is damaged", text)
        reads, read = [], self.hub.store.account_leaves
        self.patch(self.hub.store, "account_leaves", lambda first: reads.append(first) or read(first))
        for index in range(20, 25):  # known damaged: new events do not read the database's leaves again each time
            self.hub.account_log.added(Logged(index, b"\x00" * 32))
        self.assertEqual(reads, [])

    def test_a_forked_view(self):
        """The server shows alice a tree where another of her events is missing: the consistency proof fails."""
        self.tamper(("DELETE FROM account_events WHERE leaf_index = 2", ()), *CLOSE_GAPS)
        self.connect("bob")
        self.connect("bob")
        with self.assertRaises(accountlog.LogError):
            self.client.fetch()
