"""SQL for two-factor login: each user's sealed TOTP secret, its last accepted step, its recovery codes.

The secret is stored as sealed by the service (securechatd/secretbox.py);
the store never sees it in the clear. Everything that must happen at most
once is one conditional statement: a time step is accepted only above the
last one (compare and set), a recovery code only by the DELETE that spends
it, an enrolment only for the secret its code was checked against. Each
change is logged (store/account_log.py) in its own transaction.
"""

from collections import namedtuple

from securechatd.store import dialect
from securechatd.store.account_log import append_event, nonce_used
from securechatd.store.accounts import revoke_tokens
from securechatd.store.base import USER_ID, StoreBase, StoreError, user_id

# enabled: switched on (False: an enrolment not confirmed yet); recovery_left: unused recovery codes;
# has_code: the recovery code asked about is one of them
TwoFactorState = namedtuple("TwoFactorState", "enabled sealed last_step recovery_left has_code")


def two_factor_users(path, busy_timeout):
    """How many users of the database at `path` have two-factor login on: read at start-up, before
    the daemon loads the key their secrets are sealed under (StoreError if it cannot be read)."""
    try:
        connection = dialect.connect(path, busy_timeout=busy_timeout)
        try:
            return connection.execute("SELECT COUNT(*) FROM two_factor WHERE enabled = 1").fetchone()[0]
        finally:
            connection.close()
    except dialect.Error as problem:
        raise StoreError(f"database {path}: {problem}") from problem


class TwoFactorStore(StoreBase):
    def two_factor(self, username, code_hash=None):
        """Deferred: the user's TwoFactorState (`has_code`: whether `code_hash` is one of their
        recovery codes), or None if they have none (nor an enrolment begun)."""
        return self._read("two_factor", self._two_factor_txn, username, code_hash)

    @staticmethod
    def _two_factor_txn(txn, username, code_hash):
        txn.execute(
            "SELECT t.enabled, t.sealed, t.last_step,"
            " (SELECT COUNT(*) FROM recovery_codes r WHERE r.user_id = t.user_id),"
            " EXISTS (SELECT 1 FROM recovery_codes r WHERE r.user_id = t.user_id AND r.code_hash = ?)"
            f" FROM two_factor t WHERE t.user_id = ({USER_ID})",
            (code_hash, username),
        )
        row = txn.fetchone()
        return None if row is None else TwoFactorState(bool(row[0]), bytes(row[1]), row[2], row[3], bool(row[4]))

    def begin_two_factor(self, username, sealed, now):
        """Deferred: keep `sealed` as the user's enrolment to confirm ("pending"), replacing one
        begun before; "on" (nothing changed) if two-factor login is on; None: no such user."""
        return self._write("begin_two_factor", self._begin_txn, username, sealed, now)

    @staticmethod
    def _begin_txn(txn, username, sealed, now):
        uid = user_id(txn, username)
        if uid is None:
            return None
        txn.execute("SELECT enabled FROM two_factor WHERE user_id = ?", (uid,))
        row = txn.fetchone()
        if row is not None and row[0]:
            return "on"
        txn.execute(
            "INSERT INTO two_factor (user_id, sealed, enabled, last_step, changed_at) VALUES (?, ?, 0, NULL, ?)"
            " ON CONFLICT (user_id) DO UPDATE SET sealed = excluded.sealed, last_step = NULL,"
            " changed_at = excluded.changed_at",
            (uid, sealed, now),
        )
        return "pending"

    def enable_two_factor(self, username, sealed, step, code_hashes, keep_session, event, now):
        """Deferred: switch on the enrolment of `sealed` (whose code, of `step`, was right): ("enabled",
        (new credential generation, Logged)); ("moved", None) if that is not the enrolment waiting
        any more (another one began, or it is on); ("replayed", None) for a signed action seen before.

        In the same transaction: `code_hashes` become the recovery codes (any
        older ones are revoked), every resume token but `keep_session`'s is
        revoked (they were issued without a second factor), the credential
        generation moves on (a login checked before gets no token), and
        `event` (a store.account_log.NewEvent) is logged.
        """
        return self._write(
            "enable_two_factor", self._enable_txn, username, sealed, step, code_hashes, keep_session, event, now
        )

    @staticmethod
    def _enable_txn(txn, username, sealed, step, code_hashes, keep_session, event, now):
        uid = user_id(txn, username)
        if uid is None:
            return "moved", None
        if nonce_used(txn, uid, event.action):
            return "replayed", None
        txn.execute(
            "UPDATE two_factor SET enabled = 1, last_step = ?, changed_at = ?"
            " WHERE user_id = ? AND enabled = 0 AND sealed = ?",
            (step, now, uid, sealed),
        )
        if txn.rowcount != 1:
            return "moved", None
        _replace_codes(txn, uid, code_hashes)
        revoke_tokens(txn, uid, keep_session)
        txn.execute("UPDATE users SET generation = generation + 1 WHERE id = ? RETURNING generation", (uid,))
        (generation,) = txn.fetchone()
        return "enabled", (generation, append_event(txn, uid, username, event, now))

    def accept_step(self, username, step):
        """Deferred: True if `step` is above the user's last accepted step, which it now is; else False."""
        return self._write("accept_step", self._accept_step_txn, username, step)

    @staticmethod
    def _accept_step_txn(txn, username, step):
        txn.execute(
            "UPDATE two_factor SET last_step = ? WHERE enabled = 1 AND (last_step IS NULL OR last_step < ?)"
            f" AND user_id = ({USER_ID})",
            (step, step, username),
        )
        return txn.rowcount == 1

    def use_recovery_code(self, username, code_hash, event, now):
        """Deferred: spend the recovery code of `code_hash` and log `event`: its Logged leaf, or None if
        the user holds no such code (unused)."""
        return self._write("use_recovery_code", self._use_code_txn, username, code_hash, event, now)

    @staticmethod
    def _use_code_txn(txn, username, code_hash, event, now):
        uid = user_id(txn, username)
        if uid is None:
            return None
        txn.execute(
            "DELETE FROM recovery_codes WHERE user_id = ? AND code_hash = ?"
            " AND EXISTS (SELECT 1 FROM two_factor WHERE user_id = ? AND enabled = 1)",
            (uid, code_hash, uid),
        )
        if txn.rowcount != 1:
            return None
        return append_event(txn, uid, username, event, now)

    def replace_recovery_codes(self, username, code_hashes, event, now):
        """Deferred: the user's recovery codes become `code_hashes` (the old are revoked), logged:
        its Logged leaf; None if two-factor login is off; "replayed" for a signed action seen before."""
        return self._write("replace_recovery_codes", self._replace_codes_txn, username, code_hashes, event, now)

    @staticmethod
    def _replace_codes_txn(txn, username, code_hashes, event, now):
        uid = _enabled_user(txn, username)
        if uid is None:
            return None
        if nonce_used(txn, uid, event.action):
            return "replayed"
        _replace_codes(txn, uid, code_hashes)
        return append_event(txn, uid, username, event, now)

    def disable_two_factor(self, username, event, now):
        """Deferred: switch two-factor login off (secret and recovery codes deleted), logged: its
        Logged leaf; None if it was not on; "replayed" for a signed action seen before."""
        return self._write("disable_two_factor", self._disable_txn, username, event, now)

    @staticmethod
    def _disable_txn(txn, username, event, now):
        uid = _enabled_user(txn, username)
        if uid is None:
            return None
        if nonce_used(txn, uid, event.action):
            return "replayed"
        txn.execute("DELETE FROM two_factor WHERE user_id = ?", (uid,))
        txn.execute("DELETE FROM recovery_codes WHERE user_id = ?", (uid,))
        return append_event(txn, uid, username, event, now)


def _enabled_user(txn, username):
    """The id of live user `username` if their two-factor login is on, else None."""
    txn.execute(f"SELECT user_id FROM two_factor WHERE enabled = 1 AND user_id = ({USER_ID})", (username,))
    row = txn.fetchone()
    return row[0] if row else None


def _replace_codes(txn, uid, code_hashes):
    txn.execute("DELETE FROM recovery_codes WHERE user_id = ?", (uid,))
    txn.executemany("INSERT INTO recovery_codes (user_id, code_hash) VALUES (?, ?)", [(uid, h) for h in code_hashes])
