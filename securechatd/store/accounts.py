"""SQL for accounts and resume tokens."""

from collections import namedtuple

from securechatd.store.base import USER_ID, StoreBase, user_id

Credentials = namedtuple("Credentials", "user_id username password_hash generation")
DELETED = "!deleted"  # the password hash of a deleted account: matches no password


class AccountStore(StoreBase):
    def create_user(self, username, password_hash, now, invite_hash=None):
        """Deferred: True if created; False if the name is taken or the invitation is not (any more) valid.

        With `invite_hash`, the invitation is spent in the same transaction.
        """
        return self._write(self._create_user_txn, username, password_hash, now, invite_hash)

    @staticmethod
    def _create_user_txn(txn, username, password_hash, now, invite_hash):
        txn.execute(
            "INSERT INTO users (username, password_hash, created_at, password_changed_at)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (username) DO NOTHING",
            (username, password_hash, now, now),
        )
        if txn.rowcount != 1:
            return False
        if invite_hash is not None:
            txn.execute(
                "UPDATE invites SET used_by = ?, used_at = ?"
                " WHERE token_hash = ? AND used_at IS NULL AND expires_at > ?",
                (username, now, invite_hash, now),
            )
            if txn.rowcount != 1:
                txn.execute("DELETE FROM users WHERE username = ?", (username,))
                return False
        return True

    def add_invite(self, token_hash, now, expires_at):
        """Deferred: record a single-use registration invitation."""
        return self._write(self._add_invite_txn, token_hash, now, expires_at)

    @staticmethod
    def _add_invite_txn(txn, token_hash, now, expires_at):
        txn.execute(
            "INSERT INTO invites (token_hash, created_at, expires_at) VALUES (?, ?, ?)",
            (token_hash, now, expires_at),
        )

    def invite_valid(self, token_hash, now):
        """Deferred: True if the invitation exists, is unused and unexpired."""
        return self._read(self._invite_valid_txn, token_hash, now)

    @staticmethod
    def _invite_valid_txn(txn, token_hash, now):
        txn.execute(
            "SELECT 1 FROM invites WHERE token_hash = ? AND used_at IS NULL AND expires_at > ?",
            (token_hash, now),
        )
        return txn.fetchone() is not None

    def get_credentials(self, username):
        """Deferred: Credentials, or None for an unknown user."""
        return self._read(self._get_credentials_txn, username)

    @staticmethod
    def _get_credentials_txn(txn, username):
        txn.execute(
            "SELECT id, username, password_hash, password_changed_at FROM users"
            " WHERE username = ? AND password_hash != ?",
            (username, DELETED),
        )
        row = txn.fetchone()
        return Credentials(*row) if row else None

    def set_password(self, username, password_hash, now, keep_session=None):
        """Deferred: True if the user exists. Revokes every resume token but `keep_session`'s."""
        return self._write(self._set_password_txn, username, password_hash, now, keep_session)

    @staticmethod
    def _set_password_txn(txn, username, password_hash, now, keep_session):
        uid = user_id(txn, username)
        if uid is None:
            return False
        txn.execute(  # strictly later, even within one clock tick: it is the credential generation
            "UPDATE users SET password_hash = ?, password_changed_at = MAX(?, password_changed_at + 1e-6)"
            " WHERE id = ?",
            (password_hash, now, uid),
        )
        txn.execute(
            "DELETE FROM resume_tokens WHERE user_id = ? AND session_id IS NOT ?",
            (uid, keep_session),
        )
        return True

    def rehash_password(self, username, old_hash, new_hash):
        """Deferred: store a re-costed hash unless the password changed meanwhile."""
        return self._write(self._rehash_password_txn, username, old_hash, new_hash)

    @staticmethod
    def _rehash_password_txn(txn, username, old_hash, new_hash):
        txn.execute(
            "UPDATE users SET password_hash = ? WHERE username = ? AND password_hash = ?",
            (new_hash, username, old_hash),
        )

    def delete_user(self, username):
        """Deferred: True if the user existed. They lose their password, tokens and conversations.

        The row (and so the name) stays, marked deleted: a new account with the
        same name would otherwise inherit everything addressed to the old one.
        """
        return self._write(self._delete_user_txn, username)

    @staticmethod
    def _delete_user_txn(txn, username):
        txn.execute(
            "UPDATE users SET password_hash = ? WHERE username = ? AND password_hash != ?",
            (DELETED, username, DELETED),
        )
        if txn.rowcount == 0:
            return False
        uid = user_id(txn, username)
        for table, column in (
            ("resume_tokens", "user_id"),
            ("members", "user_id"),
            ("pending_receipts", "recipient_id"),
        ):
            txn.execute(f"DELETE FROM {table} WHERE {column} = ?", (uid,))
        return True

    def list_users(self, prefix="", limit=None):
        """Deferred: registered user names starting with `prefix`, sorted."""
        return self._read(self._list_users_txn, prefix, limit)

    @staticmethod
    def _list_users_txn(txn, prefix, limit):
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        txn.execute(
            "SELECT username FROM users WHERE username LIKE ? ESCAPE '\\' AND password_hash != ?"
            " ORDER BY username LIMIT ?",
            (escaped + "%", DELETED, -1 if limit is None else limit),
        )
        return [row[0] for row in txn.fetchall()]

    def add_resume_token(self, username, session_id, token_hash, now, expires_at, generation=None):
        """Deferred: True if the session's token was recorded (replacing its previous one).

        False if the password changed since `generation` (its password_changed_at
        when the login was checked; None: do not check): a login that raced a
        password change gets no token, so it cannot outlive the change.
        """
        return self._write(
            self._add_resume_token_txn, username, session_id, token_hash, now, expires_at, generation
        )

    @staticmethod
    def _add_resume_token_txn(txn, username, session_id, token_hash, now, expires_at, generation):
        txn.execute(
            "SELECT id FROM users WHERE username = ? AND (? IS NULL OR password_changed_at = ?)",
            (username, generation, generation),
        )
        row = txn.fetchone()
        if row is None:
            return False
        (uid,) = row
        txn.execute("DELETE FROM resume_tokens WHERE expires_at <= ?", (now,))
        txn.execute(
            "DELETE FROM resume_tokens WHERE user_id = ? AND session_id = ?", (uid, session_id)
        )
        txn.execute(
            "INSERT INTO resume_tokens (token_hash, user_id, session_id, created_at, expires_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (token_hash, uid, session_id, now, expires_at),
        )
        return True

    def consume_resume_token(self, username, token_hash, now):
        """Deferred: the user's credential generation if they held this unexpired token (now spent), else None."""
        return self._write(self._consume_resume_token_txn, username, token_hash, now)

    @staticmethod
    def _consume_resume_token_txn(txn, username, token_hash, now):
        txn.execute(
            "DELETE FROM resume_tokens WHERE token_hash = ? AND expires_at > ?"
            f" AND user_id = ({USER_ID})",
            (token_hash, now, username),
        )
        if txn.rowcount != 1:
            return None
        txn.execute("SELECT password_changed_at FROM users WHERE username = ?", (username,))
        return txn.fetchone()[0]

    def revoke_resume_token(self, username, session_id):
        """Deferred: forget the token of one session (at logout)."""
        return self._write(self._revoke_resume_token_txn, username, session_id)

    @staticmethod
    def _revoke_resume_token_txn(txn, username, session_id):
        txn.execute(
            "DELETE FROM resume_tokens WHERE session_id = ?"
            f" AND user_id = ({USER_ID})",
            (session_id, username),
        )
