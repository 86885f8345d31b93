"""Runs store functions in transactions on the pool's database thread."""

import sqlite3


class StoreError(Exception):
    """The database could not do it (full, locked, read-only, ...); nothing was changed."""


def _translate(failure):
    failure.trap(sqlite3.Error)
    raise StoreError(failure.getErrorMessage())


def user_id(txn, username):
    """The id of `username`, or None."""
    txn.execute("SELECT id FROM users WHERE username = ?", (username,))
    row = txn.fetchone()
    return row[0] if row else None


def _in_transaction(txn, begin, function, args):
    txn.execute(begin)
    return function(txn, *args)


class StoreBase:
    """Async methods of the store call `_write` or `_read` with a `_..._txn` function."""

    def __init__(self, pool):
        self._pool = pool

    def _write(self, function, *args):
        """Run `function(txn, *args)` holding the write lock from the start."""
        return self._pool.runInteraction(_in_transaction, "BEGIN IMMEDIATE", function, args).addErrback(
            _translate
        )

    def _read(self, function, *args):
        """Run `function(txn, *args)` in a consistent read transaction."""
        return self._pool.runInteraction(_in_transaction, "BEGIN", function, args).addErrback(_translate)

    def close(self):
        self._pool.close()
