"""The store on real SQLite files: pragmas, migrations, account SQL, transactions, batches."""

import os
import sqlite3
import stat
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.trial import unittest

from securechatd.records import Conversation, MarkMove, Stored
from securechatd.store import MigrationError, Store, StoreError, base, dialect, migrations, prepare_database
from securechatd.store.accounts import Credentials
from securechatd.store.dialect import connect, open_pool
from securechatd.store.migrations import LATEST, upgrade
from tests.helpers import SyncPool, _NoThreadsReactor, make_store

NOW = 1_700_000_000.0
DAY = 86400.0


def plain(path):
    """An independent connection to `path`, with none of the store's settings."""
    return sqlite3.connect(path, isolation_level=None, timeout=0)


def schema(path):
    """Every table and index of the database, as SQLite records them."""
    db = plain(path)
    try:
        return db.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"
        ).fetchall()
    finally:
        db.close()


def recorded_versions(db):
    return [row[0] for row in db.execute("SELECT version FROM schema_version ORDER BY version")]


def dump(path):
    db = plain(path)
    try:
        return list(db.iterdump())
    finally:
        db.close()


# Representative data valid at each schema version: (insert, check).
# `check` must hold both on a database just migrated from that version and
# on the backup of it. Add an entry with every new migration.


def _insert_v1(db):
    db.execute(
        "INSERT INTO users (username, password_hash, created_at, password_changed_at)"
        " VALUES ('alice', '$2b$10$v1hash', 1.5, 2.5), ('bob', '$2b$10$bobhash', 3.0, 3.0)"
    )


def _check_v1(testcase, db):
    testcase.assertEqual(
        db.execute(
            "SELECT username, password_hash, created_at, password_changed_at FROM users"
            " WHERE username IN ('alice', 'bob') ORDER BY id"
        ).fetchall(),
        [("alice", "$2b$10$v1hash", 1.5, 2.5), ("bob", "$2b$10$bobhash", 3.0, 3.0)],
    )


def _insert_v2(db):
    _insert_v1(db)
    db.execute(
        "INSERT INTO resume_tokens (token_hash, user_id, session_id, created_at, expires_at)"
        " SELECT 'tokenhash', id, 'session-1', 4.0, 5.0 FROM users WHERE username = 'alice'"
    )


def _check_v2(testcase, db):
    _check_v1(testcase, db)
    testcase.assertEqual(
        db.execute(
            "SELECT t.token_hash, u.username, t.session_id, t.created_at, t.expires_at"
            " FROM resume_tokens AS t JOIN users AS u ON u.id = t.user_id"
        ).fetchall(),
        [("tokenhash", "alice", "session-1", 4.0, 5.0)],
    )


def _insert_v3(db):
    _insert_v2(db)
    db.executescript(
        """
        UPDATE users SET last_seen = 6.0 WHERE username = 'bob';
        INSERT INTO conversations (id, kind, direct_pair, created_at, last_seq)
            VALUES (1, 'direct', 'alice' || char(10) || 'bob', 7.0, 1);
        INSERT INTO members (conversation_id, user_id, joined_at, delivered_seq, read_seq)
            SELECT 1, id, 7.0, 0, 0 FROM users;
        INSERT INTO messages (conversation_id, seq, sender_id, sender, client_msg_id, body, sent_at)
            SELECT 1, 1, id, 'alice', 'c1', 'hi bob', 8.0 FROM users WHERE username = 'alice';
        INSERT INTO mark_events (conversation_id, user_id, state, seq, at)
            SELECT 1, id, 'delivered', 1, 9.0 FROM users WHERE username = 'bob';
        INSERT INTO pending_receipts (recipient_id, conversation_id, reader_id, state, seq, at)
            SELECT a.id, 1, b.id, 'delivered', 1, 9.0 FROM users a, users b
            WHERE a.username = 'alice' AND b.username = 'bob';
        """
    )


def _check_v3(testcase, db):
    _check_v2(testcase, db)
    testcase.assertEqual(
        db.execute(
            "SELECT c.kind, m.seq, m.sender, m.body, c.last_seq FROM messages m"
            " JOIN conversations c ON c.id = m.conversation_id WHERE c.id = 1"
        ).fetchall(),
        [("direct", 1, "alice", "hi bob", 1)],
    )
    testcase.assertEqual(db.execute("SELECT COUNT(*) FROM members WHERE conversation_id = 1").fetchone(), (2,))
    testcase.assertEqual(db.execute("SELECT seq, at FROM mark_events").fetchall(), [(1, 9.0)])
    testcase.assertEqual(db.execute("SELECT COUNT(*) FROM pending_receipts").fetchone(), (1,))
    testcase.assertEqual(
        db.execute("SELECT last_seen FROM users WHERE username = 'bob'").fetchone(), (6.0,)
    )


def _insert_v4(db):
    _insert_v3(db)
    db.executescript(
        """
        INSERT INTO invites (token_hash, created_at, expires_at, used_by, used_at)
            VALUES ('invitehash', 10.0, 11.0, 'bob', 10.5);
        INSERT INTO users (username, password_hash, created_at, password_changed_at)
            VALUES ('dave', '!deleted', 12.0, 12.0);
        """
    )


def _check_v4(testcase, db):
    _check_v3(testcase, db)
    testcase.assertEqual(
        db.execute("SELECT token_hash, created_at, expires_at, used_by, used_at FROM invites").fetchall(),
        [("invitehash", 10.0, 11.0, "bob", 10.5)],
    )
    testcase.assertEqual(
        db.execute("SELECT created_at FROM users WHERE username = 'dave'").fetchall(), [(12.0,)]
    )


def _insert_v5(db):
    _insert_v4(db)
    db.executescript(
        """
        UPDATE users SET generation = 3 WHERE username = 'alice';
        INSERT INTO users (username, password_hash, created_at, password_changed_at, deleted_at)
            VALUES ('erin', '', 13.0, 13.0, 14.0);
        """
    )


def _check_v5(testcase, db):
    _check_v4(testcase, db)
    testcase.assertEqual(
        db.execute(
            "SELECT username, generation, deleted_at FROM users WHERE username IN ('alice', 'erin') ORDER BY id"
        ).fetchall(),
        [("alice", 3, None), ("erin", 1, 14.0)],
    )


def _insert_v6(db):
    _insert_v5(db)
    db.executescript(
        """
        INSERT INTO chain_links (user_id, seq, hash, link, published_at)
            SELECT id, 1, x'01', x'0203', 15.0 FROM users WHERE username = 'alice';
        INSERT INTO devices (user_id, device_id, sig_pub, dh_pub, name, added_seq)
            SELECT id, 'aa', x'04', x'05', 'laptop', 1 FROM users WHERE username = 'alice';
        INSERT INTO signed_prekeys (user_id, device_id, spk_id, spk_pub, signature, uploaded_at)
            SELECT id, 'aa', 7, x'06', x'07', 16.0 FROM users WHERE username = 'alice';
        INSERT INTO one_time_prekeys (user_id, device_id, opk_id, opk_pub, uploaded_at)
            SELECT id, 'aa', 8, x'08', 17.0 FROM users WHERE username = 'alice';
        UPDATE resume_tokens SET device_id = 'aa';
        """
    )


def _check_v6(testcase, db):
    _check_v5(testcase, db)
    testcase.assertEqual(
        db.execute(
            "SELECT c.seq, c.hash, c.link, d.device_id, d.name, d.revoked_seq, s.spk_id, o.opk_id, t.device_id"
            " FROM chain_links c JOIN devices d ON d.user_id = c.user_id"
            " JOIN signed_prekeys s ON s.user_id = d.user_id JOIN one_time_prekeys o ON o.user_id = d.user_id"
            " JOIN resume_tokens t ON t.user_id = d.user_id"
        ).fetchall(),
        [(1, b"\x01", b"\x02\x03", "aa", "laptop", None, 7, 8, "aa")],
    )
    # (after version 7, the conversations of version 3 are plaintext, with no membership yet)
    columns = {row[1] for row in db.execute("PRAGMA table_info(conversations)")}
    if "encrypted" in columns:
        testcase.assertEqual(
            db.execute("SELECT encrypted, epoch, members_hash FROM conversations WHERE id = 1").fetchall(),
            [(0, 0, None)],
        )


def _insert_v7(db):
    _insert_v6(db)
    db.executescript(
        """
        INSERT INTO devices (user_id, device_id, sig_pub, dh_pub, name, added_seq)
            SELECT id, 'bb', x'09', x'0a', 'phone', 1 FROM users WHERE username = 'bob';
        INSERT INTO conversations (id, kind, title, created_at, last_seq, encrypted, epoch, members_hash)
            VALUES (2, 'group', 'ops', 20.0, 2, 1, 1, x'aa');
        INSERT INTO members (conversation_id, user_id, joined_at, delivered_seq, read_seq)
            SELECT 2, id, 20.0, 0, 0 FROM users WHERE username IN ('alice', 'bob');
        INSERT INTO membership_states (conversation_id, epoch, hash, state, published_at) VALUES (2, 1, x'aa', x'ab', 20.0);
        INSERT INTO messages (id, conversation_id, seq, sender_id, sender, client_msg_id, body, sent_at)
            SELECT 100 + n, 2, n, id, 'alice', 'e' || n, '', 21.0 FROM users, (SELECT 1 AS n UNION SELECT 2)
            WHERE username = 'alice';
        INSERT INTO envelopes (message_id, sender_device, header, body) VALUES (101, 'aa', x'11', x'12'), (102, 'aa', x'21', x'22');
        INSERT INTO wraps (user_id, device_id, conversation_id, seq, message_id, wrap)
            SELECT id, 'bb', 2, 2, 102, x'23' FROM users WHERE username = 'bob';
        INSERT INTO sender_counters (conversation_id, user_id, device_id, counter)
            SELECT 2, id, 'aa', x'0000000000000002' FROM users WHERE username = 'alice';
        """
    )


def _check_v7(testcase, db):
    _check_v6(testcase, db)
    columns = {row[1] for row in db.execute("PRAGMA table_info(messages)")}
    if "sealed" in columns:  # after version 8 an envelope is its messages row ...
        envelopes = "SELECT seq, sender, body, sender_device, header, sealed FROM messages WHERE conversation_id = 2"
        counters = "SELECT counter FROM messages WHERE counter IS NOT NULL"  # ... the highest counter on the newest
    else:  # (the backup, as version 7 kept it)
        envelopes = (
            "SELECT m.seq, m.sender, m.body, e.sender_device, e.header, e.body"
            " FROM messages m JOIN envelopes e ON e.message_id = m.id"
        )
        counters = "SELECT counter FROM sender_counters"
    testcase.assertEqual(
        db.execute(envelopes + " ORDER BY seq").fetchall(),
        [(1, "alice", "", "aa", b"\x11", b"\x12"), (2, "alice", "", "aa", b"\x21", b"\x22")],
    )
    testcase.assertEqual(db.execute(counters).fetchall(), [(b"\0" * 7 + b"\x02",)])
    testcase.assertEqual(
        db.execute("SELECT device_id, seq, message_id, wrap FROM wraps").fetchall(), [("bb", 2, 102, b"\x23")]
    )


def _insert_v8(db):
    _insert_v6(db)
    db.executescript(
        """
        INSERT INTO conversations (id, kind, title, created_at, last_seq, encrypted, epoch, members_hash)
            VALUES (3, 'group', 'chat', 30.0, 1, 1, 1, x'cc');
        INSERT INTO members (conversation_id, user_id, joined_at, delivered_seq, read_seq)
            SELECT 3, id, 30.0, 0, 0 FROM users WHERE username = 'alice';
        INSERT INTO messages (id, conversation_id, seq, sender_id, sender, client_msg_id, body, sent_at,
                              sender_device, header, sealed, counter)
            SELECT 200, 3, 1, id, 'alice', 'x1', '', 31.0, 'aa', x'31', x'32', x'0000000000000001'
            FROM users WHERE username = 'alice';
        """
    )


def _check_v8(testcase, db):
    _check_v6(testcase, db)
    testcase.assertEqual(
        db.execute("SELECT seq, sender_device, header, sealed, counter FROM messages WHERE conversation_id = 3").fetchall(),
        [(1, "aa", b"\x31", b"\x32", b"\0" * 7 + b"\x01")],
    )
    columns = {row[1] for row in db.execute("PRAGMA table_info(conversations)")}
    if "chain_n" in columns:  # (after version 9: the chain starts with the next link)
        testcase.assertEqual(db.execute("SELECT chain_n FROM conversations WHERE id = 3").fetchone(), (0,))
        testcase.assertEqual(db.execute("SELECT link_n, signature FROM messages WHERE id = 200").fetchone(), (None, None))


def _insert_v9(db):
    _insert_v8(db)
    db.executescript(
        """
        INSERT INTO conversations (id, kind, title, created_at, last_seq, encrypted, epoch, members_hash, chain_n)
            VALUES (4, 'group', 'log', 40.0, 1, 1, 1, x'dd', 1);
        INSERT INTO members (conversation_id, user_id, joined_at, delivered_seq, read_seq)
            SELECT 4, id, 40.0, 0, 0 FROM users WHERE username = 'alice';
        INSERT INTO messages (id, conversation_id, seq, sender_id, sender, client_msg_id, body, sent_at,
                              sender_device, header, sealed, counter, link_n, signature)
            SELECT 300, 4, 1, id, 'alice', 'y1', '', 41.0, 'aa', x'45', x'46', x'0000000000000001', 1, x'43'
            FROM users WHERE username = 'alice';
        INSERT INTO links (conversation_id, n, e, link) VALUES (4, 1, x'41', x'42');
        INSERT INTO heads (conversation_id, n, head) VALUES (4, 1, x'44');
        """
    )


def _check_v9(testcase, db):
    _check_v8(testcase, db)
    testcase.assertEqual(
        db.execute("SELECT l.e, l.link, h.head, m.signature FROM links l JOIN heads h USING (conversation_id, n)"
                   " JOIN messages m ON m.link_n = l.n AND m.conversation_id = l.conversation_id").fetchall(),
        [(b"\x41", b"\x42", b"\x44", b"\x43")],
    )
    columns = {row[1] for row in db.execute("PRAGMA table_info(users)")}
    if "appear_offline" in columns:  # (after version 10: no one hides anything, no one has a second factor yet)
        testcase.assertEqual(
            db.execute("SELECT DISTINCT hide_last_seen, appear_offline FROM users").fetchall(), [(0, 0)]
        )
        testcase.assertEqual(
            db.execute("SELECT client_name, address, last_active FROM resume_tokens").fetchall(), [(None, None, None)]
        )
        for table in ("two_factor", "recovery_codes", "account_events", "invitations"):
            testcase.assertEqual(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone(), (0,), table)


SAMPLES = {
    1: (_insert_v1, _check_v1),
    2: (_insert_v2, _check_v2),
    3: (_insert_v3, _check_v3),
    4: (_insert_v4, _check_v4),
    5: (_insert_v5, _check_v5),
    6: (_insert_v6, _check_v6),
    7: (_insert_v7, _check_v7),
    8: (_insert_v8, _check_v8),
    9: (_insert_v9, _check_v9),
}


class ConnectTests(unittest.TestCase):
    def pragma(self, db, name):
        return db.execute(f"PRAGMA {name}").fetchone()[0]

    def test_normal_durability(self):
        db = connect(self.mktemp(), "normal", busy_timeout=2.5)
        self.addCleanup(db.close)
        self.assertEqual(self.pragma(db, "journal_mode"), "wal")
        self.assertEqual(self.pragma(db, "foreign_keys"), 1)
        self.assertEqual(self.pragma(db, "synchronous"), 1)  # NORMAL
        self.assertEqual(self.pragma(db, "busy_timeout"), 2500)

    def test_full_durability(self):
        db = connect(self.mktemp(), "full", busy_timeout=7)
        self.addCleanup(db.close)
        self.assertEqual(self.pragma(db, "journal_mode"), "wal")
        self.assertEqual(self.pragma(db, "foreign_keys"), 1)
        self.assertEqual(self.pragma(db, "synchronous"), 2)  # FULL
        self.assertEqual(self.pragma(db, "busy_timeout"), 7000)

    def test_autocommit(self):
        """Statements outside an explicit transaction are committed at once."""
        path = self.mktemp()
        db = connect(path)
        self.addCleanup(db.close)
        db.execute("CREATE TABLE t (x)")
        db.execute("INSERT INTO t VALUES (1)")
        self.assertFalse(db.in_transaction)
        other = plain(path)
        self.addCleanup(other.close)
        self.assertEqual(other.execute("SELECT x FROM t").fetchall(), [(1,)])

    def test_pool_connections_are_configured(self):
        """The daemon's pool applies the same settings to its connection."""
        pool = open_pool(
            self.mktemp(), "full", 3, reactor=_NoThreadsReactor(), pool_class=SyncPool
        )
        self.addCleanup(pool.close)

        def pragmas(txn):
            return [
                txn.execute(f"PRAGMA {name}").fetchone()[0]
                for name in ("journal_mode", "foreign_keys", "synchronous", "busy_timeout")
            ]

        self.assertEqual(self.successResultOf(pool.runInteraction(pragmas)), ["wal", 1, 2, 3000])


class MigrationTests(unittest.TestCase):
    def setUp(self):
        self.path = self.mktemp() + ".sqlite"

    def open(self, path=None):
        db = connect(path or self.path)
        self.addCleanup(db.close)
        return db

    def test_from_empty_file(self):
        db = self.open()
        self.assertEqual(upgrade(db, self.path, NOW), list(range(1, LATEST + 1)))
        self.assertEqual(recorded_versions(db), list(range(1, LATEST + 1)))
        self.assertEqual(
            db.execute("SELECT version, description, applied_at FROM schema_version").fetchall(),
            [(number, description, NOW) for number, description, _ in migrations.MIGRATIONS],
        )
        # Nothing to back up in a new database.
        self.assertEqual(
            [name for name in os.listdir(os.path.dirname(os.path.abspath(self.path))) if ".before-v" in name],
            [],
        )

    def test_second_upgrade_applies_nothing(self):
        db = self.open()
        upgrade(db, self.path, NOW)
        before = dump(self.path)
        self.assertEqual(upgrade(db, self.path, NOW + 1), [])
        self.assertEqual(dump(self.path), before)
        self.assertEqual(recorded_versions(db), list(range(1, LATEST + 1)))
        self.assertFalse(os.path.exists(f"{self.path}.before-v{LATEST}"))

    def test_versions_are_numbered_in_order(self):
        self.assertEqual(
            [number for number, _, _ in migrations.MIGRATIONS], list(range(1, LATEST + 1))
        )

    def test_every_earlier_version_has_sample_data(self):
        """A new migration must come with data to test the upgrade from the previous one."""
        self.assertTrue(set(range(1, LATEST)) <= set(SAMPLES), sorted(SAMPLES))

    def test_from_every_earlier_version(self):
        fresh = self.mktemp() + ".sqlite"
        db = self.open(fresh)
        upgrade(db, fresh, NOW)
        latest_schema = schema(fresh)

        for version in range(1, LATEST):
            path = self.mktemp() + f"-v{version}.sqlite"
            db = self.open(path)
            self.assertEqual(upgrade(db, path, NOW, target=version), list(range(1, version + 1)))
            self.assertEqual(recorded_versions(db), list(range(1, version + 1)))
            insert, check = SAMPLES[version]
            insert(db)

            self.assertEqual(upgrade(db, path, NOW + 1), list(range(version + 1, LATEST + 1)))

            # The data is intact and the schema is the one a new install gets.
            check(self, db)
            self.assertEqual(recorded_versions(db), list(range(1, LATEST + 1)))
            self.assertEqual(schema(path), latest_schema)
            self.assertEqual(db.execute("PRAGMA foreign_key_check").fetchall(), [])
            self.assertEqual(db.execute("PRAGMA integrity_check").fetchone(), ("ok",))

            # The backup is private and holds the database as it was.
            backup = f"{path}.before-v{version}"
            self.assertEqual(stat.S_IMODE(os.stat(backup).st_mode), 0o600, backup)
            old = plain(backup)
            self.addCleanup(old.close)
            self.assertEqual(recorded_versions(old), list(range(1, version + 1)))
            check(self, old)

    def test_upgraded_database_works_with_the_store(self):
        """Data from version 1 is usable through the store after the upgrade."""
        db = self.open()
        upgrade(db, self.path, NOW, target=1)
        _insert_v1(db)
        upgrade(db, self.path, NOW)
        db.close()
        store = make_store(self, self.path)
        self.assertEqual(
            self.successResultOf(store.get_credentials("alice")).password_hash, "$2b$10$v1hash"
        )
        self.assertTrue(self.successResultOf(store.create_user("carol", "h", NOW)))
        self.assertEqual(self.successResultOf(store.list_users()), ["alice", "bob", "carol"])

    def test_newer_database_refused_and_unchanged(self):
        db = self.open()
        upgrade(db, self.path, NOW)
        _insert_v1(db)
        db.execute(
            "INSERT INTO schema_version (version, description, applied_at) VALUES (?, 'future', ?)",
            (LATEST + 1, NOW),
        )
        before = dump(self.path)

        error = self.assertRaises(MigrationError, upgrade, db, self.path, NOW + 1)
        self.assertIn(str(LATEST + 1), str(error))
        self.assertEqual(dump(self.path), before)
        self.assertEqual(
            [name for name in os.listdir(os.path.dirname(os.path.abspath(self.path))) if ".before-v" in name],
            [],
        )
        # It is refused every time, whatever the target.
        self.assertRaises(MigrationError, upgrade, db, self.path, NOW + 1, target=1)
        self.assertEqual(dump(self.path), before)

    def test_failing_migration_rolls_back(self):
        bad = LATEST + 1
        self.patch(
            migrations,
            "MIGRATIONS",
            migrations.MIGRATIONS
            + [
                (
                    bad,
                    "broken",
                    """
                    CREATE TABLE half_done (x INTEGER);
                    INSERT INTO half_done VALUES (1);
                    UPDATE users SET password_hash = 'clobbered';
                    INSERT INTO no_such_table VALUES (1);
                    """,
                )
            ],
        )
        self.patch(migrations, "LATEST", bad)
        db = self.open()
        upgrade(db, self.path, NOW, target=LATEST)
        _insert_v1(db)
        before = dump(self.path)

        self.assertRaises(sqlite3.OperationalError, upgrade, db, self.path, NOW + 1, target=bad)

        self.assertFalse(db.in_transaction)
        self.assertEqual(recorded_versions(db), list(range(1, LATEST + 1)))
        self.assertEqual(dump(self.path), before)
        self.assertEqual(
            db.execute("SELECT name FROM sqlite_master WHERE name = 'half_done'").fetchall(), []
        )
        _check_v1(self, db)
        # The copy made before trying is there, and the database is still usable.
        self.assertTrue(os.path.exists(f"{self.path}.before-v{LATEST}"))
        db.execute("INSERT INTO schema_version VALUES (99, 'still writable', 0)")

    def test_failure_in_second_migration_keeps_the_first(self):
        """Each migration is its own transaction: those before a failure stay applied."""
        base = LATEST
        self.patch(
            migrations,
            "MIGRATIONS",
            migrations.MIGRATIONS
            + [
                (base + 1, "good", "CREATE TABLE good_one (x INTEGER)"),
                (base + 2, "bad", "CREATE TABLE bad_one (x INTEGER); SELECT * FROM nowhere"),
            ],
        )
        self.patch(migrations, "LATEST", base + 2)
        db = self.open()
        self.assertRaises(sqlite3.OperationalError, upgrade, db, self.path, NOW, target=base + 2)
        self.assertEqual(recorded_versions(db), list(range(1, base + 2)))
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        self.assertIn("good_one", tables)
        self.assertNotIn("bad_one", tables)


    def test_deleted_accounts_and_generations_from_version_4(self):
        """'!deleted' hashes become deleted_at (the upgrade's time: the deletion's was not kept)."""
        db = self.open()
        upgrade(db, self.path, NOW, target=4)
        _insert_v4(db)
        self.assertEqual(upgrade(db, self.path, NOW + 1, target=5), [5])
        self.assertEqual(
            db.execute("SELECT username, password_hash, deleted_at, generation FROM users ORDER BY id").fetchall(),
            [("alice", "$2b$10$v1hash", None, 1), ("bob", "$2b$10$bobhash", None, 1), ("dave", "", NOW + 1, 1)],
        )
        db.close()
        store = make_store(self, self.path)
        self.assertEqual(self.successResultOf(store.list_users()), ["alice", "bob"])
        self.assertIsNone(self.successResultOf(store.get_credentials("dave")))
        self.assertFalse(self.successResultOf(store.set_password("dave", "$2b$10$back", NOW + 2)))
        self.assertFalse(self.successResultOf(store.create_user("dave", "$2b$10$new", NOW + 2)))
        self.assertEqual(self.successResultOf(store.existing_users(["alice", "dave"])), {"alice"})
        self.assertEqual(self.successResultOf(store.get_credentials("alice")).generation, 1)

    def write_migrations(self, files):
        folder = Path(self.mktemp())
        folder.mkdir()
        for name, text in files.items():
            (folder / name).write_text(text)
        return folder

    def test_migration_files_numbered_from_one_without_gaps(self):
        folder = self.write_migrations({"0001_a.sql": "CREATE TABLE a (x)", "0002_b_c.sql": "CREATE TABLE b (x)"})
        self.assertEqual(
            migrations.load(folder), [(1, "a", "CREATE TABLE a (x)"), (2, "b c", "CREATE TABLE b (x)")]
        )
        gap = self.write_migrations({"0001_a.sql": "", "0003_c.sql": ""})
        self.assertIn("not numbered 1 to 2", str(self.assertRaises(MigrationError, migrations.load, gap)))
        stray = self.write_migrations({"0001_a.sql": "", "2_b.sql": ""})
        self.assertIn("2_b.sql", str(self.assertRaises(MigrationError, migrations.load, stray)))

    def test_a_script_is_cut_where_sqlite_ends_a_statement(self):
        script = (
            "-- a comment; with a semicolon\n"
            "CREATE TABLE t (x TEXT DEFAULT 'a;b');\n"
            "CREATE TRIGGER t_log AFTER INSERT ON t BEGIN INSERT INTO t VALUES ('c;d'); END;"
            "INSERT INTO t VALUES (';')\n"
        )
        self.assertEqual(
            list(dialect.statements(script)),
            [
                "-- a comment; with a semicolon\nCREATE TABLE t (x TEXT DEFAULT 'a;b');",
                "\nCREATE TRIGGER t_log AFTER INSERT ON t BEGIN INSERT INTO t VALUES ('c;d'); END;",
                "INSERT INTO t VALUES (';')\n",
            ],
        )

    def test_prepare_database(self):
        self.assertEqual(prepare_database(self.path, "normal", 1.0, NOW), list(range(1, LATEST + 1)))
        self.assertEqual(prepare_database(self.path, "normal", 1.0, NOW + 1), [])
        self.assertEqual(recorded_versions(self.open()), list(range(1, LATEST + 1)))

    def test_prepare_database_raises_only_migration_errors(self):
        """Whatever goes wrong (driver, file system, schema), the caller gets one kind of error naming the file."""
        directory = self.mktemp()
        os.makedirs(directory)
        not_a_database = self.mktemp()
        with open(not_a_database, "wb") as f:
            f.write(b"this is not a database file, but it is long enough to look at" * 100)
        for path, reason in ((directory, "unable to open"), (not_a_database, "not a database")):
            error = self.assertRaises(MigrationError, prepare_database, path, "normal", 1.0, NOW)
            self.assertIn(path, str(error))
            self.assertIn(reason, str(error))

    def test_prepare_database_reports_a_failed_backup(self):
        db = self.open()
        upgrade(db, self.path, NOW, target=LATEST - 1)
        _insert_v1(db)
        os.symlink("nowhere", f"{self.path}.before-v{LATEST - 1}")  # "absent", yet cannot be created
        error = self.assertRaises(MigrationError, prepare_database, self.path, "normal", 1.0, NOW)
        self.assertIn("File exists", str(error))
        self.assertEqual(recorded_versions(db), list(range(1, LATEST)))  # no upgrade without its backup

    def test_prepare_database_refuses_a_newer_schema(self):
        prepare_database(self.path, "normal", 1.0, NOW)
        self.open().execute("INSERT INTO schema_version VALUES (?, 'future', 0)", (LATEST + 1,))
        error = self.assertRaises(MigrationError, prepare_database, self.path, "normal", 1.0, NOW)
        self.assertIn(str(LATEST + 1), str(error))


class StoreTestCase(unittest.TestCase):
    def setUp(self):
        self.path = self.mktemp() + ".sqlite"
        self.store = make_store(self, self.path)

    def ok(self, deferred):
        return self.successResultOf(deferred)

    def sql(self, query, *args):
        """What an independent connection sees: only committed data."""
        db = plain(self.path)
        try:
            return db.execute(query, args).fetchall()
        finally:
            db.close()

    def add_user(self, name, password_hash=None):
        self.assertTrue(self.ok(self.store.create_user(name, password_hash or f"hash-{name}", NOW)))


class AccountStoreTests(StoreTestCase):
    def tokens(self):
        return self.sql(
            "SELECT username, session_id, token_hash FROM resume_tokens"
            " JOIN users ON users.id = user_id ORDER BY username, session_id"
        )

    # -- users -------------------------------------------------------------------

    def test_create_and_get_credentials(self):
        self.assertTrue(self.ok(self.store.create_user("alice", "$2b$12$first", NOW)))
        credentials = self.ok(self.store.get_credentials("alice"))
        self.assertIsInstance(credentials, Credentials)
        self.assertEqual(
            (credentials.username, credentials.password_hash, credentials.generation), ("alice", "$2b$12$first", 1)
        )
        self.assertEqual(
            self.sql("SELECT id, created_at, password_changed_at FROM users WHERE username = 'alice'"),
            [(credentials.user_id, NOW, NOW)],
        )

    def test_get_credentials_unknown(self):
        self.assertIsNone(self.ok(self.store.get_credentials("nobody")))

    def test_create_duplicate_keeps_first(self):
        self.assertTrue(self.ok(self.store.create_user("alice", "first-hash", NOW)))
        self.assertFalse(self.ok(self.store.create_user("alice", "second-hash", NOW + 5)))
        self.assertEqual(
            self.sql("SELECT password_hash, created_at FROM users WHERE username = 'alice'"),
            [("first-hash", NOW)],
        )
        # The failed attempt did not leave the connection inside a transaction.
        self.assertTrue(self.ok(self.store.create_user("bob", "bob-hash", NOW)))

    def test_set_password(self):
        self.add_user("alice", "old")
        self.add_user("bob", "bobs")
        self.assertTrue(self.ok(self.store.set_password("alice", "new", NOW + 10)))
        self.assertEqual(
            self.sql("SELECT username, password_hash, created_at, password_changed_at FROM users ORDER BY username"),
            [("alice", "new", NOW, NOW + 10), ("bob", "bobs", NOW, NOW)],
        )

    def test_each_password_change_is_a_new_generation(self):
        """Even two changes within one clock tick: a token checked against the first is refused."""
        self.add_user("alice", "old")
        self.ok(self.store.set_password("alice", "new", NOW + 1))
        first = self.ok(self.store.get_credentials("alice")).generation
        self.ok(self.store.set_password("alice", "newer", NOW + 1))
        second = self.ok(self.store.get_credentials("alice")).generation
        self.assertEqual((first, second), (2, 3))
        self.assertFalse(self.ok(self.store.add_resume_token("alice", "s1", "stale", NOW + 1, NOW + DAY, first)))
        self.assertTrue(self.ok(self.store.add_resume_token("alice", "s1", "fresh", NOW + 1, NOW + DAY, second)))
        self.assertEqual(self.ok(self.store.consume_resume_token("alice", "fresh", NOW + 2)), 3)
        self.assertEqual(self.tokens(), [])

    def test_set_password_of_a_deleted_user_fails_and_keeps_it_deleted(self):
        self.add_user("alice", "old")
        self.ok(self.store.delete_user("alice", NOW + 5))
        self.assertFalse(self.ok(self.store.set_password("alice", "$2b$10$revived", NOW + 10)))
        self.assertIsNone(self.ok(self.store.get_credentials("alice")))
        self.assertEqual(self.ok(self.store.list_users()), [])
        self.assertEqual(
            self.sql("SELECT password_hash, deleted_at, generation, password_changed_at FROM users"),
            [("", NOW + 5, 1, NOW)],
        )

    def test_a_deleted_user_is_no_one(self):
        """Every lookup by name treats a deleted account as absent."""
        self.add_user("alice", "$2b$10$old")
        self.add_user("bob")
        group = self.ok(self.store.create_group(["alice", "bob"], "g", NOW))
        self.ok(self.store.set_last_seen("alice", NOW))
        self.ok(self.store.delete_user("alice", NOW + 1))
        self.ok(self.store.rehash_password("alice", "", "$2b$12$rehashed"))
        self.ok(self.store.set_last_seen("alice", NOW + 2))
        self.assertEqual(self.sql("SELECT password_hash, last_seen FROM users WHERE username = 'alice'"), [("", NOW)])
        self.assertFalse(self.ok(self.store.add_resume_token("alice", "s1", "t", NOW, NOW + DAY)))
        self.assertEqual(self.ok(self.store.existing_users(["alice", "bob"])), {"bob"})
        self.assertEqual(self.ok(self.store.last_seen(["alice", "bob"])), {"bob": None})
        self.assertEqual(self.ok(self.store.add_members(group.id, ["alice"], NOW)).members, ("bob",))
        self.assertIsNone(self.ok(self.store.add_message(group.id, "alice", "m1", "hi", NOW, 10_000)))
        self.assertEqual(self.ok(self.store.direct_conversation("alice", "bob", NOW))[0].members, ("bob",))

    def test_set_password_unknown_user(self):
        self.assertFalse(self.ok(self.store.set_password("nobody", "new", NOW)))
        self.assertEqual(self.sql("SELECT * FROM users"), [])

    def test_set_password_revokes_every_token(self):
        self.add_user("alice")
        self.add_user("bob")
        for session in ("s1", "s2"):
            self.ok(self.store.add_resume_token("alice", session, f"alice-{session}", NOW, NOW + DAY))
        self.ok(self.store.add_resume_token("bob", "s1", "bob-s1", NOW, NOW + DAY))
        self.ok(self.store.set_password("alice", "new", NOW + 1))
        self.assertEqual(self.tokens(), [("bob", "s1", "bob-s1")])

    def test_set_password_keeps_one_session(self):
        self.add_user("alice")
        self.add_user("bob")
        for session in ("s1", "s2", "s3"):
            self.ok(self.store.add_resume_token("alice", session, f"alice-{session}", NOW, NOW + DAY))
        self.ok(self.store.add_resume_token("bob", "s2", "bob-s2", NOW, NOW + DAY))
        self.assertTrue(self.ok(self.store.set_password("alice", "new", NOW + 1, keep_session="s2")))
        self.assertEqual(self.tokens(), [("alice", "s2", "alice-s2"), ("bob", "s2", "bob-s2")])
        self.assertFalse(self.ok(self.store.consume_resume_token("alice", "alice-s1", NOW + 2)))
        self.assertTrue(self.ok(self.store.consume_resume_token("alice", "alice-s2", NOW + 2)))

    def test_rehash_password(self):
        self.add_user("alice", "$2b$10$old")
        self.ok(self.store.add_resume_token("alice", "s1", "t1", NOW, NOW + DAY))
        self.ok(self.store.rehash_password("alice", "$2b$10$old", "$2b$12$new"))
        self.assertEqual(
            self.sql("SELECT password_hash, password_changed_at FROM users"), [("$2b$12$new", NOW)]
        )
        # A re-cost is not a password change: sessions carry on.
        self.assertEqual(self.tokens(), [("alice", "s1", "t1")])

    def test_rehash_after_password_change_is_ignored(self):
        self.add_user("alice", "$2b$10$old")
        self.ok(self.store.set_password("alice", "$2b$10$changed", NOW + 1))
        self.ok(self.store.rehash_password("alice", "$2b$10$old", "$2b$12$rehashed-old"))
        self.assertEqual(self.sql("SELECT password_hash FROM users"), [("$2b$10$changed",)])

    def test_delete_user(self):
        self.add_user("alice")
        self.add_user("bob")
        self.assertTrue(self.ok(self.store.delete_user("alice", NOW + 5)))
        self.assertIsNone(self.ok(self.store.get_credentials("alice")))
        self.assertEqual(self.ok(self.store.list_users()), ["bob"])
        self.assertFalse(self.ok(self.store.delete_user("alice", NOW + 6)))
        self.assertFalse(self.ok(self.store.delete_user("nobody", NOW + 6)))
        self.assertEqual(
            self.sql("SELECT username, password_hash, deleted_at FROM users ORDER BY username"),
            [("alice", "", NOW + 5), ("bob", "hash-bob", None)],
        )

    def test_delete_user_cascades_tokens(self):
        self.add_user("alice")
        self.add_user("bob")
        self.ok(self.store.add_resume_token("alice", "s1", "alice-1", NOW, NOW + DAY))
        self.ok(self.store.add_resume_token("alice", "s2", "alice-2", NOW, NOW + DAY))
        self.ok(self.store.add_resume_token("bob", "s1", "bob-1", NOW, NOW + DAY))
        self.ok(self.store.delete_user("alice", NOW))
        self.assertEqual(self.sql("SELECT token_hash FROM resume_tokens"), [("bob-1",)])
        self.assertFalse(self.ok(self.store.consume_resume_token("alice", "alice-1", NOW + 1)))
        # the name stays reserved: a new account would inherit what was the old one's
        self.assertFalse(self.ok(self.store.create_user("alice", "$2b$10$new", NOW)))

    def test_list_users_sorted(self):
        for name in ("carol", "alice", "bob", "alan"):
            self.add_user(name)
        self.assertEqual(self.ok(self.store.list_users()), ["alan", "alice", "bob", "carol"])
        self.assertEqual(self.ok(self.store.list_users("al")), ["alan", "alice"])
        self.assertEqual(self.ok(self.store.list_users("alice")), ["alice"])
        self.assertEqual(self.ok(self.store.list_users("zed")), [])

    def test_list_users_wildcards_are_literal(self):
        for name in ("a_b", "axb", "a%c", "abc", "a\\d", "aad"):
            self.add_user(name)
        self.assertEqual(self.ok(self.store.list_users("a_")), ["a_b"])
        self.assertEqual(self.ok(self.store.list_users("a%")), ["a%c"])
        self.assertEqual(self.ok(self.store.list_users("a\\")), ["a\\d"])
        self.assertEqual(self.ok(self.store.list_users("_")), [])
        self.assertEqual(self.ok(self.store.list_users("%")), [])

    def test_list_users_limit(self):
        for name in ("dave", "carol", "alice", "bob", "erin"):
            self.add_user(name)
        self.assertEqual(self.ok(self.store.list_users(limit=2)), ["alice", "bob"])
        self.assertEqual(self.ok(self.store.list_users(limit=0)), [])
        self.assertEqual(self.ok(self.store.list_users(limit=10)), ["alice", "bob", "carol", "dave", "erin"])
        self.assertEqual(self.ok(self.store.list_users("", 3)), ["alice", "bob", "carol"])

    # -- resume tokens ---------------------------------------------------------------

    def test_token_single_use(self):
        self.add_user("alice")
        self.ok(self.store.add_resume_token("alice", "s1", "token", NOW, NOW + DAY))
        self.assertTrue(self.ok(self.store.consume_resume_token("alice", "token", NOW + 1)))
        self.assertFalse(self.ok(self.store.consume_resume_token("alice", "token", NOW + 2)))
        self.assertEqual(self.tokens(), [])

    def test_unknown_token(self):
        self.add_user("alice")
        self.ok(self.store.add_resume_token("alice", "s1", "token", NOW, NOW + DAY))
        self.assertFalse(self.ok(self.store.consume_resume_token("alice", "other", NOW + 1)))
        self.assertFalse(self.ok(self.store.consume_resume_token("nobody", "token", NOW + 1)))
        self.assertEqual(self.tokens(), [("alice", "s1", "token")])

    def test_expired_token_refused(self):
        self.add_user("alice")
        self.ok(self.store.add_resume_token("alice", "s1", "expiring", NOW, NOW + DAY))
        self.ok(self.store.add_resume_token("alice", "s2", "valid", NOW, NOW + DAY + 1))
        # Expiry is exclusive: at expires_at the token is dead.
        self.assertFalse(self.ok(self.store.consume_resume_token("alice", "expiring", NOW + DAY)))
        self.assertFalse(self.ok(self.store.consume_resume_token("alice", "expiring", NOW + 2 * DAY)))
        self.assertTrue(self.ok(self.store.consume_resume_token("alice", "valid", NOW + DAY)))

    def test_token_bound_to_its_user(self):
        self.add_user("alice")
        self.add_user("mallory")
        self.ok(self.store.add_resume_token("alice", "s1", "alices-token", NOW, NOW + DAY))
        self.assertFalse(self.ok(self.store.consume_resume_token("mallory", "alices-token", NOW + 1)))
        # The failed attempt did not spend it.
        self.assertEqual(self.tokens(), [("alice", "s1", "alices-token")])
        self.assertTrue(self.ok(self.store.consume_resume_token("alice", "alices-token", NOW + 2)))

    def test_new_token_replaces_the_sessions_previous_one(self):
        self.add_user("alice")
        self.ok(self.store.add_resume_token("alice", "s1", "first", NOW, NOW + DAY))
        self.ok(self.store.add_resume_token("alice", "s2", "other-session", NOW, NOW + DAY))
        self.ok(self.store.add_resume_token("alice", "s1", "second", NOW + 1, NOW + DAY))
        self.assertEqual(self.tokens(), [("alice", "s1", "second"), ("alice", "s2", "other-session")])
        self.assertFalse(self.ok(self.store.consume_resume_token("alice", "first", NOW + 2)))

    def test_adding_a_token_purges_expired_ones(self):
        self.add_user("alice")
        self.add_user("bob")
        self.ok(self.store.add_resume_token("bob", "old", "stale", NOW, NOW + 10))
        self.ok(self.store.add_resume_token("alice", "s1", "fresh", NOW + 20, NOW + DAY))
        self.assertEqual(self.tokens(), [("alice", "s1", "fresh")])

    def test_token_for_unknown_user_not_stored(self):
        self.ok(self.store.add_resume_token("nobody", "s1", "token", NOW, NOW + DAY))
        self.assertEqual(self.sql("SELECT * FROM resume_tokens"), [])

    def test_revoke_token(self):
        self.add_user("alice")
        self.add_user("bob")
        self.ok(self.store.add_resume_token("alice", "s1", "alice-1", NOW, NOW + DAY))
        self.ok(self.store.add_resume_token("alice", "s2", "alice-2", NOW, NOW + DAY))
        self.ok(self.store.add_resume_token("bob", "s1", "bob-1", NOW, NOW + DAY))
        self.ok(self.store.revoke_resume_token("alice", "s1"))
        self.assertEqual(self.tokens(), [("alice", "s2", "alice-2"), ("bob", "s1", "bob-1")])
        self.assertFalse(self.ok(self.store.consume_resume_token("alice", "alice-1", NOW + 1)))


class MessageStoreTests(StoreTestCase):
    def setUp(self):
        super().setUp()
        for name in ("alice", "bob", "carol"):
            self.add_user(name)
        self.group = self.ok(self.store.create_group(["alice", "bob"], "g", NOW))

    def add(self, sender, client_msg_id, body="hi"):
        return self.ok(self.store.add_message(self.group.id, sender, client_msg_id, body, NOW, 10_000))

    def test_resend_returns_the_first_and_takes_no_number(self):
        first = self.add("alice", "m1", "first")
        again = self.add("alice", "m1", "changed")
        self.assertEqual((first.new, again.new), (True, False))
        self.assertEqual(again.message, first.message)
        self.assertEqual(self.add("bob", "m1").message.seq, 2)  # ids are per sender
        self.assertEqual(self.sql("SELECT last_seq FROM conversations WHERE id = ?", self.group.id), [(2,)])
        self.assertEqual(self.sql("SELECT COUNT(*) FROM messages"), [(2,)])

    def test_only_members_send_but_a_resend_is_still_answered(self):
        stored = self.add("alice", "m1")
        self.assertIsNone(self.add("carol", "c1"))
        self.ok(self.store.remove_member(self.group.id, "alice"))
        self.assertEqual(self.add("alice", "m1"), Stored(stored.message, False))
        self.assertIsNone(self.add("alice", "m2"))
        self.assertEqual(self.sql("SELECT seq, sender FROM messages"), [(1, "alice")])

    def test_own_message_moves_marks_right_behind_it(self):
        self.add("alice", "m1")
        self.add("bob", "b1")
        self.add("alice", "m2")
        marks = self.sql(
            "SELECT u.username, delivered_seq, read_seq FROM members JOIN users u ON u.id = user_id"
            " ORDER BY u.username"
        )
        self.assertEqual(marks, [("alice", 1, 1), ("bob", 0, 0)])  # seq 3: alice was 1 behind it


class TransactionTests(unittest.TestCase):
    """Durable before acknowledged, and nothing half-written."""

    def setUp(self):
        self.path = self.mktemp() + ".sqlite"
        self.store = make_store(self, self.path)

    def other(self):
        db = plain(self.path)
        self.addCleanup(db.close)
        return db

    def test_acknowledged_write_is_committed(self):
        self.assertTrue(self.successResultOf(self.store.create_user("alice", "h", NOW)))
        self.successResultOf(self.store.add_resume_token("alice", "s1", "t1", NOW, NOW + DAY))
        other = self.other()
        self.assertEqual(other.execute("SELECT username FROM users").fetchall(), [("alice",)])
        self.assertEqual(other.execute("SELECT token_hash FROM resume_tokens").fetchall(), [("t1",)])
        # No transaction is left open holding the write lock.
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")

    def test_failing_interaction_writes_nothing(self):
        class Boom(Exception):
            pass

        def half(txn):
            txn.execute(
                "INSERT INTO users (username, password_hash, created_at, password_changed_at)"
                " VALUES ('ghost', 'h', 0, 0)"
            )
            raise Boom()

        self.failureResultOf(self.store._write("half", half), Boom)
        self.assertEqual(self.other().execute("SELECT * FROM users").fetchall(), [])
        self.assertIsNone(self.successResultOf(self.store.get_credentials("ghost")))
        # The store carries on.
        self.assertTrue(self.successResultOf(self.store.create_user("alice", "h", NOW)))
        self.assertEqual(self.other().execute("SELECT username FROM users").fetchall(), [("alice",)])

    def test_failing_statement_undoes_earlier_ones(self):
        """A constraint failure half-way through a write undoes its first statements."""
        self.successResultOf(self.store.create_user("alice", "h", NOW))
        self.successResultOf(self.store.create_user("bob", "h", NOW))
        self.successResultOf(self.store.add_resume_token("alice", "s1", "taken", NOW, NOW + DAY))
        self.successResultOf(self.store.add_resume_token("bob", "s1", "bob-1", NOW, NOW + DAY))
        # bob's session s1 token would be deleted, then the insert collides with alice's token.
        self.failureResultOf(
            self.store.add_resume_token("bob", "s1", "taken", NOW + 1, NOW + DAY), StoreError
        )
        self.assertEqual(
            self.other().execute("SELECT token_hash FROM resume_tokens ORDER BY token_hash").fetchall(),
            [("bob-1",), ("taken",)],
        )

    def test_write_takes_the_write_lock_at_once(self):
        """BEGIN IMMEDIATE: another writer is locked out before the first statement."""
        other = self.other()
        seen = []

        def probe(txn):
            try:
                other.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:
                seen.append(str(e))
            else:
                other.execute("ROLLBACK")
                seen.append("another writer got the lock")
            return "done"

        self.assertEqual(self.successResultOf(self.store._write("probe", probe)), "done")
        self.assertEqual(seen, ["database is locked"])

    def test_read_is_a_consistent_snapshot(self):
        self.successResultOf(self.store.create_user("alice", "h", NOW))
        other = self.other()

        def count_twice(txn):
            (first,) = txn.execute("SELECT COUNT(*) FROM users").fetchone()
            # A read does not hold the write lock...
            other.execute(
                "INSERT INTO users (username, password_hash, created_at, password_changed_at)"
                " VALUES ('bob', 'h', 0, 0)"
            )
            # ...and sees one state of the database throughout.
            (second,) = txn.execute("SELECT COUNT(*) FROM users").fetchone()
            return first, second

        self.assertEqual(self.successResultOf(self.store._read("count_twice", count_twice)), (1, 1))
        self.assertEqual(self.successResultOf(self.store.list_users()), ["alice", "bob"])

    def test_a_database_that_cannot_be_opened_names_the_call(self):
        directory = self.mktemp()
        os.makedirs(directory)
        store = Store(open_pool(directory, reactor=_NoThreadsReactor(), pool_class=SyncPool))
        self.addCleanup(store.close)
        failure = self.failureResultOf(store.list_users(), StoreError)
        self.assertEqual(str(failure.value), "list_users: unable to open database file")

    def test_busy_database_fails_the_write_cleanly(self):
        """A write that cannot get the lock fails (after the busy timeout) without effect."""
        store = Store(
            open_pool(self.path, busy_timeout=0.001, reactor=_NoThreadsReactor(), pool_class=SyncPool)
        )
        self.addCleanup(store.close)
        other = self.other()
        other.execute("BEGIN IMMEDIATE")
        failure = self.failureResultOf(store.create_user("alice", "h", NOW), StoreError)
        self.assertEqual(str(failure.value), "create_user: database is locked")
        other.execute("ROLLBACK")
        self.assertTrue(self.successResultOf(store.create_user("alice", "h", NOW)))
        self.assertEqual(other.execute("SELECT username FROM users").fetchall(), [("alice",)])


class GatedPool(SyncPool):
    """A real pool whose interactions finish only when the test says so (a busy database thread)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.batches = []

    def runWithConnection(self, function, *args, **kw):
        gate = Deferred()
        self.batches.append((gate, function, args, kw))
        return gate

    def finish(self):
        """Run the oldest waiting interaction now and deliver its outcome."""
        gate, function, args, kw = self.batches.pop(0)
        SyncPool.runWithConnection(self, function, *args, **kw).chainDeferred(gate)


class BatchingTests(unittest.TestCase):
    def setUp(self):
        path = self.mktemp() + ".sqlite"
        make_store(self, path)  # migrated
        self.pool = open_pool(path, reactor=_NoThreadsReactor(), pool_class=GatedPool)
        self.store = Store(self.pool)
        self.addCleanup(self.store.close)

    def test_calls_made_while_busy_share_one_transaction(self):
        first = self.store.create_user("alice", "h", NOW)
        queued = [self.store.create_user(f"user{i}", "h", NOW) for i in range(5)]
        listed = self.store.list_users()
        self.assertEqual(len(self.pool.batches), 1)
        self.pool.finish()
        self.assertTrue(self.successResultOf(first))
        self.assertNoResult(queued[0])
        self.assertEqual(len(self.pool.batches), 1)  # everything queued meanwhile: one batch
        self.pool.finish()
        self.assertEqual([self.successResultOf(d) for d in queued], [True] * 5)
        self.assertEqual(len(self.successResultOf(listed)), 6)  # the read ran after the writes before it

    def finish_all(self):
        """Run every batch to the end; their sizes."""
        sizes = []
        while self.pool.batches:
            sizes.append(len(self.pool.batches[0][2][0]))
            self.pool.finish()
        return sizes

    def test_a_mark_move_commits_before_the_messages_queued_ahead_of_it(self):
        """A recipient's acknowledgement does not wait behind a queue of incoming messages."""
        self.store.create_user("alice", "h", NOW)
        self.store.create_user("bob", "h", NOW)
        self.finish_all()
        group = self.store.create_group(["alice", "bob"], "g", NOW)
        self.finish_all()
        group = self.successResultOf(group)
        self.store.add_message(group.id, "alice", "m0", "first", NOW, 10_000)
        self.finish_all()

        self.store.add_message(group.id, "alice", "running", "x", NOW, 10_000)  # the database thread is busy
        queued = [self.store.add_message(group.id, "alice", f"q{i}", "x", NOW, 10_000) for i in range(1000)]
        moved = self.store.move_mark(group.id, "bob", "delivered", 1, NOW)  # bob acknowledges the first
        self.pool.finish()  # the batch that was running
        self.pool.finish()  # the next one
        self.assertEqual(self.successResultOf(moved), [MarkMove("delivered", 0, 1, ("alice",))])
        committed = plain(self.pool.connargs[0])
        self.addCleanup(committed.close)
        self.assertEqual(
            committed.execute("SELECT delivered_seq FROM members JOIN users ON id = user_id WHERE username = 'bob'")
            .fetchall(),
            [(1,)],
        )
        self.assertNoResult(queued[-1])
        self.assertEqual(self.finish_all(), [base.MAX_BATCH] * 2 + [1000 - 3 * base.MAX_BATCH + 1])
        self.assertEqual([self.successResultOf(d).message.seq for d in queued], list(range(3, 1003)))

    def test_a_batch_takes_mark_moves_first_then_calls_in_arrival_order(self):
        self.store.create_user("alice", "h", NOW)  # running
        self.store.create_user("bob", "h", NOW)
        self.store.move_mark(1, "alice", "read", 1, NOW)
        self.store.list_users()
        self.store.move_mark(1, "bob", "read", 1, NOW)
        self.pool.finish()
        [(_, _, (batch, _), _)] = self.pool.batches
        self.assertEqual(
            [name for name, *_ in batch], ["move_mark", "move_mark", "create_user", "list_users"]
        )

    def test_batches_are_bounded(self):
        self.store.list_users()  # running
        for i in range(2 * base.MAX_BATCH + 10):
            self.store.create_user(f"user{i}", "h", NOW)
        self.assertEqual(self.finish_all(), [1, base.MAX_BATCH, base.MAX_BATCH, 10])
        listed = self.store.list_users()
        self.finish_all()
        self.assertEqual(len(self.successResultOf(listed)), 2 * base.MAX_BATCH + 10)

    def test_a_failing_call_fails_alone_and_is_named(self):
        events = []
        self.patch(base, "log", Logger(observer=events.append))
        first = self.store.create_user("alice", "h", NOW)
        good = self.store.create_user("bob", "h", NOW)
        bad = self.store.create_user("carol", None, NOW)  # NOT NULL violated
        also_good = self.store.create_user("dave", "h", NOW)
        self.pool.finish()
        self.successResultOf(first)
        self.pool.finish()  # the batch of three fails and is rolled back ...
        for _ in range(3):  # ... then each runs alone
            self.pool.finish()
        self.assertTrue(self.successResultOf(good))
        failure = self.failureResultOf(bad, StoreError)
        self.assertEqual(str(failure.value), "create_user: NOT NULL constraint failed: users.password_hash")
        self.assertTrue(self.successResultOf(also_good))
        [event] = events
        self.assertEqual(
            event["log_format"].format(**event),
            "a batch of 3 calls failed (create_user: NOT NULL constraint failed: users.password_hash);"
            " running them one by one",
        )
        listed = self.store.list_users()
        self.pool.finish()
        self.assertEqual(self.successResultOf(listed), ["alice", "bob", "dave"])

    def test_flush_waits_for_everything_queued(self):
        first = self.store.create_user("alice", "h", NOW)
        flushed = self.store.flush()
        first.addCallback(lambda _: self.store.create_user("bob", "h", NOW))  # queued by a result
        self.pool.finish()
        self.assertNoResult(flushed)
        while self.pool.batches:
            self.pool.finish()
        self.successResultOf(flushed)
        self.store.close()
        self.failureResultOf(self.store.list_users(), StoreError)


def statements_of(testcase, store):
    """The statements the store's connection runs from now on (not BEGIN and COMMIT): a list that grows."""
    testcase.successResultOf(store.flush())  # the pool has its connection
    [connection] = store._pool.connections.values()
    ran = []
    connection.set_trace_callback(
        lambda statement: None if statement.split()[0] in ("BEGIN", "COMMIT") else ran.append(statement)
    )
    testcase.addCleanup(connection.set_trace_callback, None)
    return ran


class CountingTestCase(StoreTestCase):
    """Pages are cut in SQL, in a fixed number of statements however much there is."""

    def setUp(self):
        super().setUp()
        for name in ("alice", "bob", "carol"):
            self.add_user(name)
        self.ran = statements_of(self, self.store)


class ConversationPagingTests(CountingTestCase):
    CONVERSATIONS = 2000

    def setUp(self):
        super().setUp()
        db = plain(self.path)
        self.addCleanup(db.close)
        ids = {name: uid for uid, name in db.execute("SELECT id, username FROM users")}
        # conversation i: alice and bob (and carol if i is even); i % 4 messages, from bob
        # then alice in turn; alice has read the first one where i % 3 == 0
        self.expected = []
        db.execute("BEGIN")
        for i in range(1, self.CONVERSATIONS + 1):
            members = ("alice", "bob", "carol") if i % 2 == 0 else ("alice", "bob")
            senders = [("bob", "alice")[seq % 2] for seq in range(1, i % 4 + 1)]
            alice_read = 1 if i % 3 == 0 and senders else 0
            db.execute(
                "INSERT INTO conversations (id, kind, title, created_at, last_seq) VALUES (?, 'group', ?, 0, ?)",
                (i, f"g{i}", len(senders)),
            )
            for name in members:
                read = alice_read if name == "alice" else 0
                db.execute(
                    "INSERT INTO members (conversation_id, user_id, joined_at, delivered_seq, read_seq)"
                    " VALUES (?, ?, 0, ?, ?)",
                    (i, ids[name], read, read),
                )
            for seq, sender in enumerate(senders, 1):
                db.execute(
                    "INSERT INTO messages (conversation_id, seq, sender_id, sender, client_msg_id, body, sent_at)"
                    " VALUES (?, ?, ?, ?, ?, 'x', 0)",
                    (i, seq, ids[sender], sender, f"{i}-{seq}"),
                )
            unread = sum(1 for seq, s in enumerate(senders, 1) if s != "alice" and seq > alice_read)
            self.expected.append((Conversation(i, "group", f"g{i}", members, len(senders)), unread))
        db.execute("COMMIT")

    def test_all_conversations_page_by_page(self):
        listed, after_id, pages = [], None, 0
        while True:
            del self.ran[:]
            page = self.ok(self.store.conversations_of("alice", after_id, 150))
            self.assertLessEqual(len(self.ran), 2, self.ran)
            if not page:
                break
            pages += 1
            listed += page
            after_id = page[-1][0].id
        self.assertEqual(pages, 14)
        self.assertEqual(listed, self.expected)

    def test_all_conversations_at_once(self):
        self.assertEqual(self.ok(self.store.conversations_of("alice")), self.expected)
        self.assertEqual(len(self.ran), 2)
        self.assertEqual(self.ok(self.store.conversations_of("alice", 1990, 5)), self.expected[1990:1995])
        self.assertEqual(self.ok(self.store.conversations_of("alice", 1998)), self.expected[1998:])
        self.assertEqual(self.ok(self.store.conversations_of("nobody")), [])

class LookupTests(CountingTestCase):
    def test_receipts_page_by_page(self):
        """Each member but the sender, by name, with when their marks first reached the message."""
        names = [f"m{i:03}" for i in range(300)]
        for name in names:
            self.add_user(name)
        group = self.ok(self.store.create_group(["alice", *names], "big", NOW))
        self.ok(self.store.add_message(group.id, "alice", "c1", "hi", NOW, 10_000))
        second = self.ok(self.store.add_message(group.id, "alice", "c2", "hi again", NOW, 10_000)).message
        expected = []
        for i, name in enumerate(names):
            if i % 3 == 1:  # delivered both, read the first only
                self.ok(self.store.move_mark(group.id, name, "read", 1, NOW + i))
                self.ok(self.store.move_mark(group.id, name, "delivered", 2, NOW + 1000 + i))
                expected.append((name, NOW + 1000 + i, None))
            elif i % 3 == 2:  # read both at once
                self.ok(self.store.move_mark(group.id, name, "read", 2, NOW + i))
                expected.append((name, NOW + i, NOW + i))
            else:
                expected.append((name, None, None))
        listed, after = [], None
        while True:
            del self.ran[:]
            page = self.ok(self.store.receipts(second, after, 64))
            self.assertLessEqual(len(self.ran), 2, self.ran)
            if not page:
                break
            listed += page
            after = page[-1][0]
        self.assertEqual(listed, expected)
        self.assertEqual(self.ok(self.store.receipts(second)), expected)
        self.assertEqual(self.ok(self.store.receipts(second, "m297")), expected[298:])

    def test_names_are_looked_up_in_one_statement(self):
        names = [f"u{i:04}" for i in range(997)]
        for name in names[:500]:
            self.add_user(name)
        self.ok(self.store.set_last_seen("u0001", NOW))
        self.ok(self.store.delete_user("u0002", NOW))
        asked = [*names, "alice", "bob", "nobody"]
        del self.ran[:]
        existing = self.ok(self.store.existing_users(asked))
        seen = self.ok(self.store.last_seen(asked))
        self.assertEqual(len(self.ran), 2, self.ran)
        self.assertEqual(existing, {"alice", "bob", *names[:500]} - {"u0002"})
        self.assertEqual(seen, {name: NOW if name == "u0001" else None for name in existing})
        del self.ran[:]
        group = self.ok(self.store.create_group(asked, "everyone", NOW))
        self.assertEqual(set(group.members), existing)
        self.assertEqual(len(self.ran), 4, self.ran)  # the conversation, its members, and reading both back

    def test_an_in_list_is_bounded(self):
        self.assertEqual(base.placeholders(["a", "b"]), "(?, ?)")
        self.assertRaises(ValueError, base.placeholders, ["a"] * (base.MAX_NAMES + 1))
        self.assertRaises(ValueError, base.placeholders, [])
