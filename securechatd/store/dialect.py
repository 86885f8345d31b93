"""SQLite: the one module that knows the driver, its pragmas, its transactions and its errors.

Every statement elsewhere in store/ is written in the subset SQLite and
PostgreSQL share (`?` placeholders aside); what differs between engines is
here, so a PostgreSQL store needs a second module like this one and a second
folder of migrations (`schema/<NAME>/`), not a rewrite of store/.

A single connection (cp_min = cp_max = 1) serialises every statement on one
thread: several connections to one SQLite file give "database is locked"
errors and wrong last-insert ids. Autocommit mode lets each interaction
open its own transaction (BEGIN_WRITE for writes), so nothing is ever
half-written and concurrent writers (securechatd-admin) queue on the busy
timeout instead of failing.
"""

import os
import sqlite3

from twisted.enterprise import adbapi

NAME = "sqlite"  # the folder of this engine's migrations under store/schema/

Error = sqlite3.Error  # everything the driver raises for a database problem

# Take the write lock at BEGIN: a writer that waited for it can then not fail
# half-way for a lock another writer holds (SQLite's deferred BEGIN would).
BEGIN_WRITE = "BEGIN IMMEDIATE"
BEGIN_READ = "BEGIN"

# durability setting -> PRAGMA synchronous. In WAL mode NORMAL keeps every
# committed transaction through a crash of the process (kill -9); FULL also
# syncs the WAL on each commit, which keeps it through a power loss.
SYNCHRONOUS = {"normal": "NORMAL", "full": "FULL"}


class _Cursor(sqlite3.Cursor):
    """A cursor that also carries `links`: the conversations' chain links its transaction appended
    (store/links.py), which are signed before it commits."""

    def __init__(self, connection):
        super().__init__(connection)
        self.links = []


class _Connection(sqlite3.Connection):
    def cursor(self, factory=_Cursor):
        return super().cursor(factory)


def configure(connection, durability="normal", busy_timeout=5.0):
    """Switch on WAL, foreign keys, the busy timeout and the durability level."""
    connection.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute(f"PRAGMA synchronous = {SYNCHRONOUS[durability]}")
    connection.execute("PRAGMA foreign_keys = ON")


def connect(path, durability="normal", busy_timeout=5.0):
    """A configured connection for synchronous use (start-up, admin CLI).

    A new database file is created 0600 first, like the keys and the audit
    log: SQLite gives its -wal and -shm files the database file's mode.
    """
    if path != ":memory:" and not os.path.exists(path):
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False, factory=_Connection)
    configure(connection, durability, busy_timeout)
    return connection


def open_pool(path, durability="normal", busy_timeout=5.0, reactor=None, pool_class=adbapi.ConnectionPool):
    """The daemon's adbapi pool: one connection, on one thread."""
    return pool_class(
        "sqlite3",
        path,
        isolation_level=None,
        check_same_thread=False,
        factory=_Connection,
        cp_min=1,
        cp_max=1,
        cp_noisy=False,
        cp_openfun=lambda connection: configure(connection, durability, busy_timeout),
        cp_reactor=reactor,
    )


def insert(cursor, statement, arguments):
    """Run an INSERT of one row; the new row's id, or None if it inserted nothing (ON CONFLICT DO NOTHING).

    (lastrowid where another engine would add RETURNING id: here that costs twice the time.)
    """
    cursor.execute(statement, arguments)
    return cursor.lastrowid if cursor.rowcount == 1 else None


def rollback(connection):
    """Roll back the open transaction, unless the error that stopped it already did (a full disk)."""
    if connection.in_transaction:
        connection.execute("ROLLBACK")


def statements(script):
    """The statements of an SQL script, cut where SQLite's own parser says each one ends.

    (A `;` inside a string, a comment or a trigger body does not end one.)
    """
    start = 0
    for end, character in enumerate(script):
        if character == ";" and sqlite3.complete_statement(script[start : end + 1]):
            yield script[start : end + 1]
            start = end + 1
    if script[start:].strip():
        yield script[start:]  # the last one needs no `;`; an unfinished one fails when run


def backup(connection, path):
    """Copy the whole database of `connection` into the (empty) file `path`."""
    copy = sqlite3.connect(path)
    try:
        connection.backup(copy)
    finally:
        copy.close()
