"""SQL for the account log: each user's events as a hash chain, each chain head a leaf of one tree.

An event is placed by `append_event` inside the transaction that does what
it records (a second factor switched on, a session ended, ...), so the log
never tells of something that was rolled back. Its seq follows the user's
last event and its leaf index the last leaf of all, both read in that
transaction under the write lock, so the chain and the tree only ever grow
at their ends; the service (server/account_log.py) keeps the tree itself in
memory and adds the leaves each call returns. The store hashes (bytes it
stores anyway) but never signs.
"""

from collections import namedtuple

from securechatd.accountlog import ZERO_HASH, new_event
from securechatd.store.base import StoreBase, user_id

# What the service asks to log; `device` (16 bytes) and `action` (accountlog.Action) only for a signed action.
NewEvent = namedtuple("NewEvent", "kind address session device target action", defaults=("", "", b"", "", None))
# A leaf the store appended: the service adds it to its tree.
Logged = namedtuple("Logged", "leaf_index leaf")


def nonce_used(txn, uid, action):
    """True if the signed `action` (or None) was accepted before: a replay."""
    if action is None:
        return False
    txn.execute("SELECT 1 FROM account_events WHERE user_id = ? AND nonce = ?", (uid, action.nonce))
    return txn.fetchone() is not None


def append_event(txn, uid, username, new, now):
    """Place the NewEvent `new` as `username`'s next event (user id `uid`) at `now`: its Logged leaf."""
    txn.execute("SELECT seq, hash FROM account_events WHERE user_id = ? ORDER BY seq DESC LIMIT 1", (uid,))
    row = txn.fetchone()
    seq, prev = (row[0], bytes(row[1])) if row else (0, ZERO_HASH)
    event = new_event(
        username, seq + 1, prev, now, new.kind, new.address, new.session, new.device, new.target, new.action
    )
    txn.execute("SELECT COALESCE(MAX(leaf_index), -1) + 1 FROM account_events")
    (index,) = txn.fetchone()
    leaf = event.leaf()
    txn.execute(
        "INSERT INTO account_events (user_id, seq, hash, event, leaf_index, leaf, nonce) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (uid, event.seq, event.hash(), event.to_bytes(), index, leaf, new.action and new.action.nonce),
    )
    return Logged(index, leaf)


class AccountLogStore(StoreBase):
    def record_event(self, username, new, now):
        """Deferred: the Logged leaf of `username`'s next event; None if there is no such user;
        "replayed" if its signed action was accepted before."""
        return self._write("record_event", self._record_event_txn, username, new, now)

    @staticmethod
    def _record_event_txn(txn, username, new, now):
        uid = user_id(txn, username)
        if uid is None:
            txn.execute("SELECT id FROM users WHERE username = ?", (username,))  # (a deleted account's log goes on)
            row = txn.fetchone()
            if row is None:
                return None
            uid = row[0]
        if nonce_used(txn, uid, new.action):
            return "replayed"
        return append_event(txn, uid, username, new, now)

    def account_leaves(self, first_index):
        """Deferred: [Logged] of the tree from leaf `first_index` on, in order (to bring a tree up to date)."""
        return self._read("account_leaves", self._account_leaves_txn, first_index)

    @staticmethod
    def _account_leaves_txn(txn, first_index):
        txn.execute(
            "SELECT leaf_index, leaf FROM account_events WHERE leaf_index >= ? ORDER BY leaf_index", (first_index,)
        )
        return [Logged(index, bytes(leaf)) for index, leaf in txn.fetchall()]

    def account_events(self, username, after_seq, limit):
        """Deferred: [(event bytes, leaf index)] of `username`'s events after `after_seq`, in order, at most `limit`."""
        return self._read("account_events", self._account_events_txn, username, after_seq, limit)

    @staticmethod
    def _account_events_txn(txn, username, after_seq, limit):
        txn.execute(
            "SELECT e.event, e.leaf_index FROM account_events e JOIN users u ON u.id = e.user_id"
            " WHERE u.username = ? AND e.seq > ? ORDER BY e.seq LIMIT ?",
            (username, after_seq, limit),
        )
        return [(bytes(event), index) for event, index in txn.fetchall()]

