"""Runs named store functions in transactions on the pool's database thread, in batches.

Every store call has a name (its public method's) and joins a queue. Whenever
the database thread is free, the next batch of queued calls runs in one
transaction and each caller's Deferred fires after its COMMIT, so nothing is
answered before it is durable. Under load, calls that arrive while a batch
is running ride in a later one: one thread hand-off and one commit for many
messages and marks, instead of one each. With no load a call runs at once,
alone. If any call in a batch fails, the batch is rolled back and its calls
are run again one by one (before anything else), so one bad call fails only
itself. A database error is raised as a StoreError that starts with the
name of the call that met it ("add_message: database or disk is full"); a
failed batch is logged with it.

Acknowledgements first. Mark moves (`_write_first`: a recipient saying
"delivered" or "read") wait in a lane of their own. Each batch takes every
waiting mark move first, then other calls in arrival order, and holds at most
MAX_BATCH calls. The guarantee: a mark move is committed, and its Deferred
fired, by the end of the first batch that starts after it is queued (at once,
if none is running), unless MAX_BATCH or more mark moves were waiting ahead
of it or a batch fails meanwhile. So it waits for at most the batch running
when it was queued and its own, two batches of at most MAX_BATCH calls each,
however many messages are queued. A failed batch first re-runs its calls,
at most MAX_BATCH, one transaction each.
"""

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from securechatd.store import dialect

log = Logger()

# Calls per batch (transaction). Bounds how long a mark move can wait: a batch
# of 256 new messages takes about 4 ms of database time (15 us each, measured),
# and its thread hand-off and commit are still shared by 256 calls.
MAX_BATCH = 256

MAX_NAMES = 1000  # names in one IN list (SQLite binds up to 32,766 values a statement)

LIVE = "deleted_at IS NULL"  # the one test for an account that exists: every lookup of users has it
USER_ID = f"SELECT id FROM users WHERE username = ? AND {LIVE}"  # also a subquery in other statements


class StoreError(Exception):
    """The database could not do it (full, locked, read-only, ...); nothing was changed."""


def user_id(txn, username):
    """The id of the live user `username`, or None."""
    txn.execute(USER_ID, (username,))
    row = txn.fetchone()
    return row[0] if row else None


def placeholders(values):
    """"(?, ?, ...)" for an IN list of `values`: one statement for up to MAX_NAMES of them."""
    if not 0 < len(values) <= MAX_NAMES:
        raise ValueError(f"an IN list of {len(values)} values (1 to {MAX_NAMES} allowed)")
    return "(" + ", ".join("?" * len(values)) + ")"


def blobs_page(txn, statement, arguments, limit):
    """([bytes of the first column] of at most `limit` rows, has_more) of `statement`, which ends in
    "LIMIT ?" and takes `limit` + 1 as its last argument (one row more says whether there are more)."""
    txn.execute(statement, (*arguments, limit + 1))
    rows = [bytes(row[0]) for row in txn.fetchall()]
    return rows[:limit], len(rows) > limit


def limited(limit):
    """(clause, arguments) for an optional LIMIT: `LIMIT -1` means "all" in SQLite only."""
    return ("", ()) if limit is None else (" LIMIT ?", (limit,))


def _nothing(txn):
    pass


def _describe(batch):
    return batch[0][0] if len(batch) == 1 else f"a batch of {len(batch)} calls"


def _failed(where, problem):
    """The StoreError for a database `problem`, named for where it happened."""
    return StoreError(f"{where}: {problem}")


def _run_batch(connection, batch, finish):
    # (the pool commits, or rolls back; a plain cursor is what adbapi's Transaction wraps)
    cursor = connection.cursor()
    where = _describe(batch)
    try:
        writes = any(writing for _, _, _, writing, _ in batch)
        cursor.execute(dialect.BEGIN_WRITE if writes else dialect.BEGIN_READ)
        results = []
        for where, function, args, _, _ in batch:
            results.append(function(cursor, *args))
        if writes:
            where = "the end of " + _describe(batch)
            finish(cursor)
        return results
    except dialect.Error as problem:
        raise _failed(where, problem) from problem


class StoreBase:
    """Async methods of the store call `_write`, `_write_first` or `_read` with a name and a `_..._txn` function."""

    def __init__(self, pool):
        self._pool = pool
        self._first = []  # (name, function, args, writing, Deferred): mark moves waiting
        self._queue = []  # every other call waiting, in arrival order
        self._retry = []  # the calls of a failed batch, to run one by one before anything else
        self._running = False
        self._closed = False

    def _write(self, name, function, *args):
        """Deferred result of `function(txn, *args)` in a transaction holding the write lock."""
        return self._submit(self._queue, name, function, args, True)

    def _write_first(self, name, function, *args):
        """Like `_write`, but ahead of every queued call not itself first (see the module's docstring)."""
        return self._submit(self._first, name, function, args, True)

    def _read(self, name, function, *args):
        """Deferred result of `function(txn, *args)` in a consistent read transaction."""
        return self._submit(self._queue, name, function, args, False)

    def _submit(self, lane, name, function, args, writing):
        if self._closed:
            return fail(StoreError(f"{name}: the database is closed"))
        result = Deferred()
        lane.append((name, function, args, writing, result))
        if not self._running:
            self._run_next()
        return result

    def _run_next(self):
        if self._retry:
            batch = [self._retry.pop(0)]
        else:
            batch = self._first[:MAX_BATCH]
            del self._first[:MAX_BATCH]
            room = MAX_BATCH - len(batch)
            batch += self._queue[:room]
            del self._queue[:room]
        self._running = bool(batch)
        if batch:
            ran = self._pool.runWithConnection(_run_batch, batch, self._finish_batch)
            ran.addBoth(self._batch_done, batch)

    def _batch_done(self, outcome, batch):
        if isinstance(outcome, Failure) and len(batch) > 1:
            log.warn(
                "{batch} failed ({error}); running them one by one",
                batch=_describe(batch),
                error=outcome.getErrorMessage(),
            )
            self._retry = batch  # only the bad call fails
        elif isinstance(outcome, Failure):
            [(name, _, _, _, result)] = batch
            if outcome.check(dialect.Error):  # from the pool itself: connecting, COMMIT
                outcome = Failure(_failed(name, outcome.value))
            result.errback(outcome)
        else:
            for (_, _, _, _, result), value in zip(batch, outcome):
                result.callback(value)
        self._run_next()

    def _finish_batch(self, txn):
        """Called on the database thread in each writing batch's transaction, after its calls, before
        its COMMIT (LinkStore signs the chain links they appended)."""

    def flush(self):
        """Deferred firing once the queue is empty, including calls queued by earlier results."""
        return Deferred.fromCoroutine(self._flush())

    async def _flush(self):
        while self._running:
            await self._read("flush", _nothing)  # after every call queued before it ...
            if not (self._first or self._queue or self._retry):  # ... so their results have queued what they will
                return

    def close(self):
        """Close the pool; later calls fail at once instead of waiting for ever."""
        if not self._closed:
            self._closed = True
            self._pool.close()
