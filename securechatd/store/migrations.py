"""Numbered schema migrations, applied in order at start-up and recorded.

Each entry moves the schema from version N-1 to N. Never edit a released
migration: add the next one. Before upgrading a database that already holds
data, a copy is written beside it (`<file>.before-v<N>`), so a failed or
regretted upgrade can be undone by hand.
"""

import os
import sqlite3

MIGRATIONS = [
    (
        1,
        "users",
        """
        CREATE TABLE users (
            id INTEGER PRIMARY KEY,
            username TEXT NOT NULL UNIQUE,
            password_hash TEXT NOT NULL,
            created_at REAL NOT NULL,
            password_changed_at REAL NOT NULL
        );
        """,
    ),
    (
        2,
        "resume tokens",
        """
        CREATE TABLE resume_tokens (
            token_hash TEXT PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
            session_id TEXT NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL
        );
        CREATE INDEX resume_tokens_by_user ON resume_tokens (user_id, session_id);
        CREATE INDEX resume_tokens_by_expiry ON resume_tokens (expires_at);
        """,
    ),
    (
        3,
        "conversations, messages, receipts, presence",
        """
        ALTER TABLE users ADD COLUMN last_seen REAL;
        CREATE TABLE conversations (
            id INTEGER PRIMARY KEY,
            kind TEXT NOT NULL CHECK (kind IN ('direct', 'group')),
            title TEXT,
            direct_pair TEXT UNIQUE,
            created_at REAL NOT NULL,
            last_seq INTEGER NOT NULL DEFAULT 0
        );
        CREATE TABLE members (
            conversation_id INTEGER NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
            joined_at REAL NOT NULL,
            delivered_seq INTEGER NOT NULL,
            read_seq INTEGER NOT NULL,
            PRIMARY KEY (conversation_id, user_id)
        );
        CREATE INDEX members_by_user ON members (user_id);
        CREATE TABLE messages (
            id INTEGER PRIMARY KEY,
            conversation_id INTEGER NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            sender_id INTEGER REFERENCES users (id) ON DELETE SET NULL,
            sender TEXT NOT NULL,
            client_msg_id TEXT NOT NULL,
            body TEXT NOT NULL,
            sent_at REAL NOT NULL,
            UNIQUE (conversation_id, seq),
            UNIQUE (sender_id, client_msg_id)
        );
        CREATE TABLE mark_events (
            conversation_id INTEGER NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
            state TEXT NOT NULL CHECK (state IN ('delivered', 'read')),
            seq INTEGER NOT NULL,
            at REAL NOT NULL
        );
        CREATE INDEX mark_events_by_member ON mark_events (conversation_id, user_id, state, seq);
        CREATE TABLE pending_receipts (
            recipient_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
            conversation_id INTEGER NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            reader_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
            state TEXT NOT NULL CHECK (state IN ('delivered', 'read')),
            seq INTEGER NOT NULL,
            at REAL NOT NULL,
            PRIMARY KEY (recipient_id, conversation_id, reader_id, state)
        )
        """,
    ),
    (
        4,
        "registration invitations",
        """
        CREATE TABLE invites (
            token_hash TEXT PRIMARY KEY,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            used_by TEXT,
            used_at REAL
        )
        """,
    ),
]

LATEST = MIGRATIONS[-1][0]


class MigrationError(Exception):
    """The database cannot be brought to this version of the schema."""


def current_version(connection):
    connection.execute(
        "CREATE TABLE IF NOT EXISTS schema_version"
        " (version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at REAL NOT NULL)"
    )
    (version,) = connection.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()
    return version


def _backup(connection, path, version):
    """Copy the database beside itself before changing a schema that holds data."""
    target = f"{path}.before-v{version}"
    if path == ":memory:" or os.path.exists(target):
        return
    os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # private from the start
    copy = sqlite3.connect(target)
    try:
        connection.backup(copy)
    finally:
        copy.close()


def upgrade(connection, path, now, target=LATEST):
    """Apply every migration above the database's version, each in its own transaction.

    Returns the list of versions applied. A database newer than this code is
    refused rather than used.
    """
    version = current_version(connection)
    if version > LATEST:
        raise MigrationError(
            f"database {path} has schema version {version}, newer than this"
            f" securechatd understands ({LATEST}); upgrade securechatd"
        )
    pending = [m for m in MIGRATIONS if version < m[0] <= target]
    if pending and version > 0:
        _backup(connection, path, version)
    for number, description, script in pending:
        statements = [s.strip() for s in script.split(";") if s.strip()]
        connection.execute("BEGIN IMMEDIATE")
        try:
            for statement in statements:
                connection.execute(statement)
            connection.execute(
                "INSERT INTO schema_version (version, description, applied_at) VALUES (?, ?, ?)",
                (number, description, now),
            )
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
    return [m[0] for m in pending]
