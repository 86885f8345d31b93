"""The client's account-log check (securechatd/client/account_log.py) against the real daemon's services.

A real hub over a real SQLite file, read through the real protocol in
memory; then the stored events are rewritten, dropped and reordered and the
tree forked and cut, in the database itself, and the daemon's log rebuilt
from it as at a restart. Each case is named by the client's check, and
again, in the same words, by securechatd-verify-log on the file it exports.
"""

import io
import json
import os
import sqlite3
import stat
from dataclasses import replace

from twisted.internet.defer import Deferred

from securechatd import commands
from securechatd.accountlog import Event
from securechatd.client.account_log import AccountLogCheck
from securechatd.server.account_log import AccountLog
from securechatd import verify_log
from securechatd.verify_log import Row
from tests.helpers import Connection, run_now
from tests.test_account_security import CLOSE_GAPS, SecurityTestCase

SEEN = "2023-11-14 22:13:20 UTC"  # NOW: when the daemon signed the first tree head


class LogCase(SecurityTestCase):
    """alice with four logins, bob with three (a tree of 7 leaves), a never-logged-in carol, a client check of alice's."""

    def setUp(self):
        super().setUp()
        self.ok(Connection(self.hub), commands.Register, username="carol", password="correct horse battery")
        self.conn = self.connect()
        for _ in range(3):
            self.connect("bob")
            self.connect()
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.state = os.path.join(self.directory, "alice.account-log")
        self.server_key_bytes = self.server_key.public_bytes_raw()
        self.db = self.hub.store._pool.connargs[0]

    def checker(self):
        return AccountLogCheck(self.state, self.server_key_bytes, "alice", run=run_now)

    def check(self, checker=None):
        return self.successResultOf((checker or self.checker()).check(self.conn.call))

    def verify(self, checker, *arguments):
        """securechatd-verify-log (in process) on what `checker` exports: (status, stdout, stderr)."""
        path = os.path.join(self.directory, "export.json")
        checker.export(path)
        out, err = io.StringIO(), io.StringIO()
        return verify_log.main([path, "--server-key", self.server_key_bytes.hex(), *arguments], out, err), out.getvalue(), err.getvalue()

    def sql(self, *statements):
        """Change the database behind the daemon's back, then restart its account log over it."""
        db = sqlite3.connect(self.db, isolation_level=None)
        try:
            for statement in statements:
                db.execute(*statement)
        finally:
            db.close()
        log = self.hub.account_log
        self.hub.account_log = self.hub.security.log = AccountLog(self.hub.store, self.clock, log.key, log._run)

    def alice(self, seq):
        """(row id, event bytes) of alice's stored event `seq`."""
        db = sqlite3.connect(self.db)
        try:
            return db.execute(
                "SELECT rowid, event FROM account_events WHERE seq = ? AND user_id = (SELECT id FROM users WHERE username = 'alice')",
                (seq,),
            ).fetchone()
        finally:
            db.close()


class CheckTests(LogCase):
    def test_an_untouched_log_is_verified(self):
        report = self.check()
        self.assertEqual((report.verified, report.problem, report.tree_size), (True, None, 7))
        self.assertEqual(
            report.events,
            [Row(seq, SEEN, "login", "10.0.0.1", "", "password", "no") for seq in (1, 2, 3, 4)],
        )
        self.assertEqual(stat.S_IMODE(os.stat(self.state).st_mode), 0o600)
        with open(self.state) as f:
            state = json.load(f)
        self.assertEqual((state["user"], state["known"]["seq"]), ("alice", 4))
        self.assertEqual(os.listdir(self.directory), ["alice.account-log"])  # (no temporary file left)

    def test_a_second_check_asks_from_the_head_it_remembers(self):
        first = self.check()
        self.clock.advance(60)
        self.connect("bob")
        self.connect(address="10.0.0.9")
        asked = []

        def call(command, **arguments):
            asked.append(arguments)
            return self.conn.call(command, **arguments)

        report = self.successResultOf(self.checker().check(call))  # (a new object: what the file remembers)
        self.assertEqual((report.verified, first.tree_size, report.tree_size), (True, 7, 9))
        self.assertEqual(asked, [{"after_seq": 0, "tree_size": 7}])
        self.assertEqual(report.events[-1], Row(5, "2023-11-14 22:14:20 UTC", "login", "10.0.0.9", "", "password", "no"))
        self.assertEqual(self.check().tree_size, 9)

    def test_pages(self):
        for _ in range(60):
            self.connect().drop()
        report = self.check()
        self.assertEqual((report.verified, len(report.events), report.tree_size), (True, 64, 67))
        self.assertEqual([r.seq for r in report.events], list(range(1, 65)))
        self.assertEqual(self.check().verified, True)

    def test_device_signed_actions(self):
        laptop, device = self.bound()
        phone = self.connect()
        target = phone.login["session_id"]
        self.ok(laptop, commands.EndSession, session_id=target, **self.signed(device, "session_end", target))
        keys = {device.id: device.sig.public_key()}
        checker = AccountLogCheck(self.state, self.server_key_bytes, "alice", device_key=keys.get, run=run_now)
        report = self.check(checker)
        self.assertTrue(report.verified)
        self.assertEqual(report.events[-1][2:], ("session_end", "10.0.0.1", device.hex, target, "yes"))
        strange = AccountLogCheck(self.state + "2", self.server_key_bytes, "alice", device_key={}.get, run=run_now)
        report = self.check(strange)
        self.assertEqual(report.verified, False)
        self.assertEqual(
            report.problem, f"a device's action was forged: event 8 (session_end) is not signed by device {device.hex}"
        )

    def test_a_state_file_that_cannot_be_used(self):
        for content in (b"{", b"[]", b'{"format": "securechatd/account-log-state/v1", "user": "bob", "known": {}}'):
            with open(self.state, "wb") as f:
                f.write(content)
            report = self.check()
            self.assertEqual((report.verified, report.events), (False, []))
            self.assertTrue(report.problem.startswith(f"the account log's state file {self.state} cannot be used"))
            with open(self.state, "rb") as f:
                self.assertEqual(f.read(), content)  # left as it is

    def test_nothing_to_export_before_a_check(self):
        self.assertRaises(ValueError, self.checker().export, os.path.join(self.directory, "x"))
        self.assertFalse(os.path.exists(self.state))

    def test_a_lost_connection_fails_the_check_and_keeps_the_state(self):
        self.check()
        with open(self.state, "rb") as f:
            before = f.read()
        lost = Deferred()
        checking = self.checker().check(lambda command, **arguments: lost)
        lost.errback(ConnectionError("gone"))
        self.failureResultOf(checking, ConnectionError)
        with open(self.state, "rb") as f:
            self.assertEqual(f.read(), before)


class TamperTests(LogCase):
    """Each case breaks alice's log after her client checked it once; the client and the verifier name it."""

    def setUp(self):
        super().setUp()
        self.assertTrue(self.check().verified)

    def assertCaught(self, problem, events):
        """The client's check names `problem` after verifying `events` (seqs), keeps naming it, and so does
        securechatd-verify-log on its export; the state file still holds the head seen before."""
        with open(self.state, "rb") as f:
            before = f.read()
        checker = self.checker()
        report = self.check(checker)
        self.assertEqual((report.verified, report.problem), (False, problem))
        self.assertEqual([r.seq for r in report.events], events)
        self.assertEqual(self.check().problem, problem)
        with open(self.state, "rb") as f:
            self.assertEqual(f.read(), before)
        status, out, err = self.verify(checker)
        self.assertEqual((status, err), (1, ""))
        self.assertTrue(out.endswith(f"\nBROKEN: {problem}\n") or out == f"BROKEN: {problem}\n", out)
        return report

    def test_a_rewritten_event(self):
        rowid, data = self.alice(2)
        forged = replace(Event.from_bytes(data), address="203.0.113.66")
        self.sql(("UPDATE account_events SET event = ? WHERE rowid = ?", (forged.to_bytes(), rowid)))
        self.assertCaught("event #2 was rewritten: it is not the event the signed tree holds", [1])

    def test_a_dropped_event(self):
        """alice's second event moved to carol's account: the server still has its leaf, alice no longer sees it."""
        rowid, _ = self.alice(2)
        self.sql(("UPDATE account_events SET user_id = (SELECT id FROM users WHERE username = 'carol') WHERE rowid = ?", (rowid,)))
        self.assertCaught("event #2 is missing", [1])

    def test_the_last_events_dropped(self):
        for seq in (3, 4):
            rowid, _ = self.alice(seq)
            self.sql(("UPDATE account_events SET user_id = (SELECT id FROM users WHERE username = 'carol') WHERE rowid = ?", (rowid,)))
        self.assertCaught(f"events #3 to #4 are missing (seen in the tree head of size 7 signed {SEEN})", [1, 2])

    def test_a_rewritten_copy_appended(self):
        """The old event 4 moved to carol (its leaf stays) and a rewritten event 4 appended as a new leaf:
        the tree grows consistently, the chain and the inclusion check, but it is not the event 4 seen before."""
        rowid, data = self.alice(4)
        forged = replace(Event.from_bytes(data), address="203.0.113.66")
        self.sql(
            ("UPDATE account_events SET user_id = (SELECT id FROM users WHERE username = 'carol') WHERE rowid = ?", (rowid,)),
            (
                "INSERT INTO account_events (user_id, seq, hash, event, leaf_index, leaf)"
                " SELECT id, 4, ?, ?, 7, ? FROM users WHERE username = 'alice'",
                (forged.hash(), forged.to_bytes(), forged.leaf()),
            ),
        )
        self.assertCaught(f"event #4 was rewritten since it was seen in the tree head of size 7 signed {SEEN}", [1, 2, 3])

    def test_reordered_events(self):
        (two_id, two), (three_id, three) = self.alice(2), self.alice(3)
        self.sql(
            ("UPDATE account_events SET event = ? WHERE rowid = ?", (three, two_id)),
            ("UPDATE account_events SET event = ? WHERE rowid = ?", (two, three_id)),
        )
        self.assertCaught("the log was reordered: event #3 comes before event #2", [1])

    def test_a_forked_tree_of_the_same_size(self):
        """Event 2 rewritten with its hash and leaf: the server signs another tree of 7 leaves."""
        rowid, data = self.alice(2)
        forged = replace(Event.from_bytes(data), address="203.0.113.66")
        self.sql(
            ("UPDATE account_events SET event = ?, hash = ?, leaf = ? WHERE rowid = ?", (forged.to_bytes(), forged.hash(), forged.leaf(), rowid)),
        )
        self.assertCaught(
            f"the server's log was forked: the tree head of size 7 is not consistent with the tree head of size 7 signed {SEEN}",
            [],
        )
        self.clock.advance(60)
        self.connect("bob")  # (a larger tree does not join it either)
        self.assertEqual(
            self.check().problem,
            f"the server's log was forked: the tree head of size 8 is not consistent with the tree head of size 7 signed {SEEN}",
        )

    def test_a_forked_tree_that_rewrites_the_chain(self):
        """Event 2 rewritten with its leaf, and the events after it chained to it: a client that kept only the
        head still finds the fork; one that kept nothing sees a chain that checks (the log is tamper-evident
        to those who saw it, TRUST.md 2.8)."""
        rowid, data = self.alice(2)
        forged = replace(Event.from_bytes(data), address="203.0.113.66")
        self.sql(("UPDATE account_events SET event = ?, hash = ?, leaf = ? WHERE rowid = ?", (forged.to_bytes(), forged.hash(), forged.leaf(), rowid)))
        self.assertEqual(
            self.check().problem,
            f"the server's log was forked: the tree head of size 7 is not consistent with the tree head of size 7 signed {SEEN}",
        )
        fresh = AccountLogCheck(self.state + ".new", self.server_key_bytes, "alice", run=run_now)
        self.assertEqual(self.check(fresh).problem, "event #2 was rewritten: event #3 follows another version of it")

    def test_a_smaller_tree(self):
        """The newest leaves deleted: the server's tree is smaller than the head alice's client kept."""
        self.sql(("DELETE FROM account_events WHERE leaf_index >= 5", ()))
        self.assertCaught(f"the server's log was cut: it no longer holds the tree head of size 7 signed {SEEN}", [])

    def test_a_missing_leaf(self):
        """A row deleted and its leaf's place left empty: the server says its log is damaged (a tree stopping
        there would show every later event as never logged), to a client with or without a saved head."""
        rowid, _ = self.alice(3)
        self.sql(("DELETE FROM account_events WHERE rowid = ?", (rowid,)))
        self.failureResultOf(self.checker().check(self.conn.call), commands.ServiceUnavailable)
        os.remove(self.state)
        self.failureResultOf(self.checker().check(self.conn.call), commands.ServiceUnavailable)

    def test_a_deleted_event(self):
        """A row deleted in the middle and the leaves after it renumbered: the tree is smaller than the one seen."""
        rowid, _ = self.alice(3)
        self.sql(("DELETE FROM account_events WHERE rowid = ?", (rowid,)), *CLOSE_GAPS)
        self.assertCaught(f"the server's log was cut: it no longer holds the tree head of size 7 signed {SEEN}", [])
