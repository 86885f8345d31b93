"""SQL for accounts, resume tokens and the sessions they stand for."""

from collections import namedtuple

from securechatd.store import dialect
from securechatd.store.account_log import append_event, nonce_used
from securechatd.store.base import LIVE, MAX_NAMES, USER_ID, StoreBase, limited, placeholders, user_id

# generation: 1 for a new account, +1 at every password change and when two-factor
# login is switched on (a login checked against one generation cannot be given a
# token after the next); two_factor: two-factor login is on
Credentials = namedtuple("Credentials", "user_id username password_hash generation two_factor", defaults=(False,))
# A session that may come back (it holds a resume token): what the user sees of it in ListSessions.
Resumable = namedtuple("Resumable", "session_id device_id client_name address started last_active")


def revoke_tokens(txn, uid, keep_session=None):
    """Delete the resume tokens of user `uid`, but the one of session `keep_session` (None: all)."""
    txn.execute(
        "DELETE FROM resume_tokens WHERE user_id = ? AND (? IS NULL OR session_id <> ?)",
        (uid, keep_session, keep_session),
    )


class AccountStore(StoreBase):
    def create_user(self, username, password_hash, now, invite_hash=None):
        """Deferred: True if created; False if the name is taken or the invitation is not (any more) valid.

        With `invite_hash`, the invitation is spent in the same transaction.
        """
        return self._write("create_user", self._create_user_txn, username, password_hash, now, invite_hash)

    @staticmethod
    def _create_user_txn(txn, username, password_hash, now, invite_hash):
        uid = dialect.insert(  # a deleted account keeps its name: ON CONFLICT covers it too
            txn,
            "INSERT INTO users (username, password_hash, created_at, password_changed_at)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (username) DO NOTHING",
            (username, password_hash, now, now),
        )
        if uid is None:
            return False
        if invite_hash is not None:
            txn.execute(
                "UPDATE invites SET used_by = ?, used_at = ?"
                " WHERE token_hash = ? AND used_at IS NULL AND expires_at > ?",
                (username, now, invite_hash, now),
            )
            if txn.rowcount != 1:
                txn.execute("DELETE FROM users WHERE id = ?", (uid,))
                return False
        return True

    def add_invite(self, token_hash, now, expires_at):
        """Deferred: record a single-use registration invitation."""
        return self._write("add_invite", self._add_invite_txn, token_hash, now, expires_at)

    @staticmethod
    def _add_invite_txn(txn, token_hash, now, expires_at):
        txn.execute(
            "INSERT INTO invites (token_hash, created_at, expires_at) VALUES (?, ?, ?)",
            (token_hash, now, expires_at),
        )

    def invite_valid(self, token_hash, now):
        """Deferred: True if the invitation exists, is unused and unexpired."""
        return self._read("invite_valid", self._invite_valid_txn, token_hash, now)

    @staticmethod
    def _invite_valid_txn(txn, token_hash, now):
        txn.execute(
            "SELECT 1 FROM invites WHERE token_hash = ? AND used_at IS NULL AND expires_at > ?",
            (token_hash, now),
        )
        return txn.fetchone() is not None

    def generations(self, usernames):
        """Deferred {username: credential generation} of those of `usernames` that are live accounts.

        For the session check: a name missing from the answer was deleted, a
        generation that moved on had its password changed (securechatd-admin too).
        """
        return self._read("generations", self._generations_txn, list(usernames))

    @staticmethod
    def _generations_txn(txn, usernames):
        found = {}
        for start in range(0, len(usernames), MAX_NAMES):
            chunk = usernames[start : start + MAX_NAMES]
            txn.execute(
                f"SELECT username, generation FROM users WHERE username IN {placeholders(chunk)} AND {LIVE}", chunk
            )
            found.update(txn.fetchall())
        return found

    def get_credentials(self, username):
        """Deferred: Credentials, or None for an unknown user."""
        return self._read("get_credentials", self._get_credentials_txn, username)

    @staticmethod
    def _get_credentials_txn(txn, username):
        txn.execute(
            "SELECT id, username, password_hash, generation,"
            " EXISTS (SELECT 1 FROM two_factor t WHERE t.user_id = users.id AND t.enabled = 1)"
            f" FROM users WHERE username = ? AND {LIVE}",
            (username,),
        )
        row = txn.fetchone()
        return Credentials(*row[:4], bool(row[4])) if row else None

    def set_password(self, username, password_hash, now, keep_session=None):
        """Deferred: True if the user exists (and is not deleted): then their credential
        generation moves on and every resume token but `keep_session`'s is revoked."""
        return self._write("set_password", self._set_password_txn, username, password_hash, now, keep_session)

    @staticmethod
    def _set_password_txn(txn, username, password_hash, now, keep_session):
        txn.execute(
            "UPDATE users SET password_hash = ?, password_changed_at = ?, generation = generation + 1"
            f" WHERE username = ? AND {LIVE} RETURNING id",
            (password_hash, now, username),
        )
        row = txn.fetchone()
        if row is None:
            return False
        revoke_tokens(txn, row[0], keep_session)
        return True

    def rehash_password(self, username, old_hash, new_hash):
        """Deferred: store a re-costed hash unless the password changed meanwhile."""
        return self._write("rehash_password", self._rehash_password_txn, username, old_hash, new_hash)

    @staticmethod
    def _rehash_password_txn(txn, username, old_hash, new_hash):
        txn.execute(
            f"UPDATE users SET password_hash = ? WHERE username = ? AND password_hash = ? AND {LIVE}",
            (new_hash, username, old_hash),
        )

    def delete_user(self, username, now):
        """Deferred: True if the user existed. They lose their password, tokens, conversations,
        device chain and prekeys, and the wraps waiting for their devices.

        The row (and so the name) stays, with `deleted_at`: a new account with the
        same name would otherwise inherit everything addressed to the old one.
        """
        return self._write("delete_user", self._delete_user_txn, username, now)

    @staticmethod
    def _delete_user_txn(txn, username, now):
        txn.execute(
            f"UPDATE users SET deleted_at = ?, password_hash = '' WHERE username = ? AND {LIVE} RETURNING id",
            (now, username),
        )
        row = txn.fetchone()
        if row is None:
            return False
        for table, column in (
            ("resume_tokens", "user_id"),
            ("members", "user_id"),
            ("pending_receipts", "recipient_id"),
            ("wraps", "user_id"),  # encrypted messages for their devices, and what they staged or sent
            ("staged_wraps", "user_id"),
            ("one_time_prekeys", "user_id"),  # the key directory: nobody can fetch a deleted user's keys
            ("signed_prekeys", "user_id"),
            ("devices", "user_id"),
            ("chain_links", "user_id"),
            ("two_factor", "user_id"),  # (the account log stays: it is append-only)
            ("recovery_codes", "user_id"),
            ("invitations", "user_id"),
        ):
            txn.execute(f"DELETE FROM {table} WHERE {column} = ?", row)
        return True

    def list_users(self, prefix="", limit=None):
        """Deferred: registered user names starting with `prefix`, sorted."""
        return self._read("list_users", self._list_users_txn, prefix, limit)

    @staticmethod
    def _list_users_txn(txn, prefix, limit):
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        clause, arguments = limited(limit)
        txn.execute(
            f"SELECT username FROM users WHERE username LIKE ? ESCAPE '\\' AND {LIVE}"
            f" ORDER BY username{clause}",
            (escaped + "%", *arguments),
        )
        return [row[0] for row in txn.fetchall()]

    def add_resume_token(self, username, session_id, token_hash, now, expires_at, generation=None):
        """Deferred: True if the session's token was recorded (replacing its previous one).

        False if the password changed since `generation` (Credentials.generation
        when the login was checked; None: do not check): a login that raced a
        password change gets no token, so it cannot outlive the change.
        """
        return self._write(
            "add_resume_token",
            self._add_resume_token_txn,
            username,
            session_id,
            token_hash,
            now,
            expires_at,
            generation,
        )

    @staticmethod
    def _add_resume_token_txn(txn, username, session_id, token_hash, now, expires_at, generation):
        txn.execute(
            f"SELECT id FROM users WHERE username = ? AND {LIVE} AND (? IS NULL OR generation = ?)",
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
        return self._write("consume_resume_token", self._consume_resume_token_txn, username, token_hash, now)

    @staticmethod
    def _consume_resume_token_txn(txn, username, token_hash, now):
        txn.execute(
            "DELETE FROM resume_tokens WHERE token_hash = ? AND expires_at > ?"
            f" AND user_id = ({USER_ID})",
            (token_hash, now, username),
        )
        if txn.rowcount != 1:
            return None
        txn.execute(f"SELECT generation FROM users WHERE username = ? AND {LIVE}", (username,))
        return txn.fetchone()[0]

    def revoke_resume_token(self, username, session_id):
        """Deferred: forget the token of one session (at logout)."""
        return self._write("revoke_resume_token", self._revoke_resume_token_txn, username, session_id)

    @staticmethod
    def _revoke_resume_token_txn(txn, username, session_id):
        txn.execute(
            "DELETE FROM resume_tokens WHERE session_id = ?"
            f" AND user_id = ({USER_ID})",
            (session_id, username),
        )

    # -- sessions under the user's control ---------------------------------------------

    def session_started(self, username, session_id, client_name, address, event, now):
        """Deferred: note what the session's client said it was and where it is (its resume token's
        row, for ListSessions once it is gone) and log `event` (its login): (its Logged leaf, the
        user's appear_offline); None if there is no such user."""
        return self._write(
            "session_started", self._session_started_txn, username, session_id, client_name, address, event, now
        )

    @staticmethod
    def _session_started_txn(txn, username, session_id, client_name, address, event, now):
        uid = user_id(txn, username)
        if uid is None:
            return None
        txn.execute(
            "UPDATE resume_tokens SET client_name = ?, address = ?, last_active = ?"
            " WHERE user_id = ? AND session_id = ?",
            (client_name, address, now, uid, session_id),
        )
        txn.execute("SELECT appear_offline FROM users WHERE id = ?", (uid,))
        (appear_offline,) = txn.fetchone()
        return append_event(txn, uid, username, event, now), bool(appear_offline)

    def session_left(self, username, session_id, last_active):
        """Deferred: the session's connection went at `last_active`; its resume token (if any) remembers it."""
        return self._write("session_left", self._session_left_txn, username, session_id, last_active)

    @staticmethod
    def _session_left_txn(txn, username, session_id, last_active):
        txn.execute(
            f"UPDATE resume_tokens SET last_active = ? WHERE session_id = ? AND user_id = ({USER_ID})",
            (last_active, session_id, username),
        )

    def resumable_sessions(self, username, now):
        """Deferred: [Resumable] of the user's unexpired resume tokens, oldest first."""
        return self._read("resumable_sessions", self._resumable_txn, username, now)

    @staticmethod
    def _resumable_txn(txn, username, now):
        txn.execute(
            "SELECT session_id, device_id, client_name, address, created_at, COALESCE(last_active, created_at)"
            f" FROM resume_tokens WHERE user_id = ({USER_ID}) AND expires_at > ? ORDER BY created_at, session_id",
            (username, now),
        )
        return [Resumable(*row) for row in txn.fetchall()]

    def end_sessions(self, username, session_ids, keep_session, event, now, must_find=False):
        """Deferred: revoke the resume tokens of `session_ids` (None: of every session but
        `keep_session`) and log `event`: ([session ids whose tokens were revoked], Logged); None if
        there is no such user, or (with `must_find`) no such token; "replayed" for a signed action
        seen before."""
        return self._write(
            "end_sessions", self._end_sessions_txn, username, session_ids, keep_session, event, now, must_find
        )

    @staticmethod
    def _end_sessions_txn(txn, username, session_ids, keep_session, event, now, must_find):
        uid = user_id(txn, username)
        if uid is None:
            return None
        if nonce_used(txn, uid, event.action):
            return "replayed"
        if session_ids is None:
            txn.execute(
                "DELETE FROM resume_tokens WHERE user_id = ? AND (? IS NULL OR session_id <> ?) RETURNING session_id",
                (uid, keep_session, keep_session),
            )
        else:
            txn.execute(
                f"DELETE FROM resume_tokens WHERE user_id = ? AND session_id IN {placeholders(session_ids)}"
                " RETURNING session_id",
                (uid, *session_ids),
            )
        ended = [session_id for (session_id,) in txn.fetchall()]
        if must_find and not ended:
            return None
        return ended, append_event(txn, uid, username, event, now)

    def change_password(self, username, password_hash, now, keep_session, event):
        """Deferred: as set_password, and log `event` in the same transaction: its Logged leaf;
        None if there is no such user; "replayed" (nothing changed) for a signed action seen before."""
        return self._write(
            "change_password", self._change_password_txn, username, password_hash, now, keep_session, event
        )

    @classmethod
    def _change_password_txn(cls, txn, username, password_hash, now, keep_session, event):
        uid = user_id(txn, username)
        if uid is None:
            return None
        if nonce_used(txn, uid, event.action):
            return "replayed"
        if not cls._set_password_txn(txn, username, password_hash, now, keep_session):
            return None
        return append_event(txn, uid, username, event, now)
