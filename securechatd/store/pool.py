"""Opening SQLite: the one place that knows the driver, its pragmas and its pool.

A single connection (cp_min = cp_max = 1) serialises every statement on one
thread: several connections to one SQLite file give "database is locked"
errors and wrong last-insert ids. Autocommit mode lets each interaction
open its own transaction (BEGIN IMMEDIATE for writes), so nothing is ever
half-written and concurrent writers (securechatd-admin) queue on the busy
timeout instead of failing.
"""

import sqlite3

from twisted.enterprise import adbapi

# durability setting -> PRAGMA synchronous. In WAL mode NORMAL keeps every
# committed transaction through a crash of the process (kill -9); FULL also
# syncs the WAL on each commit, which keeps it through a power loss.
SYNCHRONOUS = {"normal": "NORMAL", "full": "FULL"}


def configure(connection, durability="normal", busy_timeout=5.0):
    """Switch on WAL, foreign keys, the busy timeout and the durability level."""
    connection.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute(f"PRAGMA synchronous = {SYNCHRONOUS[durability]}")
    connection.execute("PRAGMA foreign_keys = ON")


def connect(path, durability="normal", busy_timeout=5.0):
    """A configured connection for synchronous use (start-up, admin CLI)."""
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    configure(connection, durability, busy_timeout)
    return connection


def open_pool(path, durability="normal", busy_timeout=5.0, reactor=None, pool_class=adbapi.ConnectionPool):
    """The daemon's adbapi pool: one connection, on one thread."""
    return pool_class(
        "sqlite3",
        path,
        isolation_level=None,
        check_same_thread=False,
        cp_min=1,
        cp_max=1,
        cp_noisy=False,
        cp_openfun=lambda connection: configure(connection, durability, busy_timeout),
        cp_reactor=reactor,
    )
