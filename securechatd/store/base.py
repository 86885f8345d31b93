"""Runs store functions in transactions on the pool's database thread, in batches.

Every store call joins one queue. Whenever the database thread is free, all
queued calls run together in one transaction and each caller's Deferred fires
after its COMMIT, so nothing is answered before it is durable. Under load,
calls that arrive while a batch is running ride in the next one: one thread
hand-off and one commit for many messages and marks, instead of one each.
With no load a call runs at once, alone. If any call in a batch fails, the
batch is rolled back and its calls are run again one by one, so one bad call
fails only itself.
"""

import sqlite3

from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure


class StoreError(Exception):
    """The database could not do it (full, locked, read-only, ...); nothing was changed."""


USER_ID = "SELECT id FROM users WHERE username = ?"  # also a subquery in other statements


def user_id(txn, username):
    """The id of `username`, or None."""
    txn.execute(USER_ID, (username,))
    row = txn.fetchone()
    return row[0] if row else None


def _nothing(txn):
    pass


def _run_batch(connection, batch):
    # (the pool commits, or rolls back; a plain cursor is what adbapi's Transaction wraps)
    cursor = connection.cursor()
    writes = any(writing for _, _, writing, _ in batch)
    cursor.execute("BEGIN IMMEDIATE" if writes else "BEGIN")
    return [function(cursor, *args) for function, args, _, _ in batch]


class StoreBase:
    """Async methods of the store call `_write` or `_read` with a `_..._txn` function."""

    def __init__(self, pool):
        self._pool = pool
        self._queue = []  # (function, args, writing, Deferred) waiting for the next batch
        self._running = False
        self._alone = 0  # calls of a failed batch still to run one by one
        self._closed = False

    def _write(self, function, *args):
        """Deferred result of `function(txn, *args)` in a transaction holding the write lock."""
        return self._submit(function, args, True)

    def _read(self, function, *args):
        """Deferred result of `function(txn, *args)` in a consistent read transaction."""
        return self._submit(function, args, False)

    def _submit(self, function, args, writing):
        if self._closed:
            return fail(StoreError("the database is closed"))
        result = Deferred()
        self._queue.append((function, args, writing, result))
        if not self._running:
            self._run_next()
        return result

    def _run_next(self):
        if not self._queue:
            self._running = False
            return
        self._running = True
        if self._alone:
            self._alone -= 1
            batch, self._queue = self._queue[:1], self._queue[1:]
        else:
            batch, self._queue = self._queue, []
        ran = self._pool.runWithConnection(_run_batch, batch)
        ran.addBoth(self._batch_done, batch)

    def _batch_done(self, outcome, batch):
        if isinstance(outcome, Failure) and len(batch) > 1:
            self._queue[:0] = batch  # again, one by one: only the bad call fails
            self._alone = len(batch)
        elif isinstance(outcome, Failure):
            [(_, _, _, result)] = batch
            result.errback(_translated(outcome))
        else:
            for (_, _, _, result), value in zip(batch, outcome):
                result.callback(value)
        self._run_next()

    def flush(self):
        """Deferred firing once the queue is empty, including calls queued by earlier results."""
        return Deferred.fromCoroutine(self._flush())

    async def _flush(self):
        while self._running:
            await self._submit(_nothing, (), False)  # the last call in its batch ...
            if not self._queue:  # ... so all earlier results have queued what they will
                return

    def close(self):
        """Close the pool; later calls fail at once instead of waiting for ever."""
        if not self._closed:
            self._closed = True
            self._pool.close()


def _translated(failure):
    if failure.check(sqlite3.Error):
        return Failure(StoreError(failure.getErrorMessage()))
    return failure
