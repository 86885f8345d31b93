"""Database faults: a full disk or a lock answers a clear error, stores nothing half, and passes."""

from twisted.internet import task
from twisted.trial import unittest

from securechatd import commands
from securechatd.commands import ServiceUnavailable
from securechatd.store.dialect import connect
from tests.helpers import Connection, make_hub, make_store

PASSWORD = "correct horse battery"


class DatabaseFaultTests(unittest.TestCase):
    def setUp(self):
        self.path = self.mktemp() + ".sqlite"
        self.clock = task.Clock()
        self.hub = make_hub(self, clock=self.clock, store=make_store(self, self.path, busy_timeout=0.05))
        self.alice, self.bob = Connection(self.hub), Connection(self.hub)
        for conn, name in ((self.alice, "alice"), (self.bob, "bob")):
            self.successResultOf(conn.call(commands.Register, username=name, password=PASSWORD))
            self.successResultOf(conn.call(commands.Login, username=name, password=PASSWORD))
        self.conversation = self.successResultOf(
            self.alice.call(commands.CreateConversation, members=["bob"])
        )["conversation_id"]
        self.clock.advance(0)
        self.sent = 0

    def send(self, body):
        self.sent += 1
        return self.alice.call(
            commands.SendMessage, conversation_id=self.conversation, client_msg_id=f"m{self.sent}", body=body
        )

    def the_pool_connection(self):
        """The store's own sqlite3 connection (to change its limits as a full disk would)."""
        [connection] = self.hub.store._pool.connections.values()
        return connection

    def stored_bodies(self):
        with connect(self.path) as db:
            return [body for (body,) in db.execute("SELECT body FROM messages ORDER BY seq")]

    def integrity(self):
        with connect(self.path) as db:
            return db.execute("PRAGMA integrity_check").fetchone()[0]

    def test_disk_full(self):
        self.successResultOf(self.send("before"))
        connection = self.the_pool_connection()
        connection.execute("VACUUM")  # (no free pages left by the migrations' dropped tables)
        (pages,) = connection.execute("PRAGMA page_count").fetchone()
        connection.execute(f"PRAGMA max_page_count = {pages}")
        failure = self.failureResultOf(self.send("y" * 16_000), ServiceUnavailable)
        self.assertIn("try again later", str(failure.value))
        self.assertNotIn("disk", str(failure.value))  # no database internals in the answer
        self.successResultOf(self.alice.call(commands.Ping))  # the connection carries on
        connection.execute("PRAGMA max_page_count = 1073741823")  # space again
        answer = self.successResultOf(self.send("after"))
        self.assertEqual(answer["seq"], 2)
        self.assertEqual(self.stored_bodies(), ["before", "after"])
        self.assertEqual(self.integrity(), "ok")
        self.bob.pump.flush()
        self.assertEqual(
            [p["body"] for name, p in self.bob.pushes if name == "Deliver"], ["before", "after"]
        )

    def test_database_locked(self):
        other = connect(self.path)
        self.addCleanup(other.close)
        other.execute("BEGIN EXCLUSIVE")
        self.failureResultOf(self.send("while locked"), ServiceUnavailable)
        self.failureResultOf(
            self.bob.call(commands.MarkRead, conversation_id=self.conversation, seq=1), ServiceUnavailable
        )
        other.execute("ROLLBACK")
        self.assertEqual(self.successResultOf(self.send("unlocked"))["seq"], 1)
        self.assertEqual(self.stored_bodies(), ["unlocked"])
        self.assertEqual(self.integrity(), "ok")
