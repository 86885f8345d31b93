"""SQL for conversations, members, messages, read/delivered marks and presence times.

Each conversation numbers its messages 1, 2, 3, ... (`seq`); `last_seq` on
the conversation row is bumped in the same transaction that inserts the
message, so numbers follow commit order. A member's `delivered_seq` and
`read_seq` are marks: every message up to them is delivered/read.
`mark_events` records when each mark moved (for GetReceipts), and
`pending_receipts` holds, per sender, the newest receipts they have not seen.
"""

from collections import namedtuple

from securechatd.records import Conversation, MarkMove, Membership, Message, Receipt, Stored
from securechatd.store import dialect
from securechatd.store.base import LIVE, USER_ID, StoreBase, limited, placeholders, user_id
from securechatd.store.links import next_link

# a signed membership state checked by the service, as the store keeps it (`data`: its bytes)
NewState = namedtuple("NewState", "epoch prev hash data")

_MESSAGE_COLUMNS = "id, conversation_id, seq, sender, body, sent_at"
_CONVERSATION_COLUMNS = "id, kind, title, last_seq, encrypted, epoch, members_hash"
_SENDER_ID = f"SELECT id FROM users WHERE username = :sender AND {LIVE}"
# The sender has their own message :seq: a mark right behind it moves past it, so it is
# neither pending nor unread for them (a mark further behind stays).
OWN_MESSAGE_MARKS = (
    "UPDATE members SET"
    " delivered_seq = CASE WHEN delivered_seq = :before THEN :seq ELSE delivered_seq END,"
    " read_seq = CASE WHEN read_seq = :before THEN :seq ELSE read_seq END"
    f" WHERE conversation_id = :c AND user_id = ({_SENDER_ID})"
    " AND (delivered_seq = :before OR read_seq = :before)"
)


def _live(txn, column, usernames):
    """{username: column} for those of `usernames` (at most MAX_NAMES) that exist, in one statement."""
    if not usernames:
        return {}
    usernames = list(usernames)
    txn.execute(
        f"SELECT username, {column} FROM users WHERE username IN {placeholders(usernames)} AND {LIVE}",
        usernames,
    )
    return dict(txn.fetchall())


def _resent(txn, sender, client_msg_id):
    """Stored(the first message, not new) for a resent (sender, client_msg_id); else None."""
    txn.execute(
        f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE sender_id = ({USER_ID}) AND client_msg_id = ?",
        (sender, client_msg_id),
    )
    row = txn.fetchone()
    return Stored(Message(*row), False) if row is not None else None


def _members(txn, which, arguments):
    """{conversation_id: (member names, sorted)} of the conversations `which` (an SQL condition on m)."""
    txn.execute(
        "SELECT m.conversation_id, u.username FROM members m JOIN users u ON u.id = m.user_id"
        f" WHERE {which} ORDER BY m.conversation_id, u.username",
        arguments,
    )
    members = {}
    for conversation_id, name in txn.fetchall():
        members.setdefault(conversation_id, []).append(name)
    return {conversation_id: tuple(names) for conversation_id, names in members.items()}


def _is_member(txn, conversation_id, username):
    txn.execute(
        f"SELECT 1 FROM members WHERE conversation_id = ? AND user_id = ({USER_ID})", (conversation_id, username)
    )
    return txn.fetchone() is not None


def _conversation_record(row, members):
    """The Conversation of a row of _CONVERSATION_COLUMNS."""
    conversation_id, kind, title, last_seq, encrypted, epoch, members_hash = row
    if members_hash is not None:
        members_hash = bytes(members_hash)
    return Conversation(conversation_id, kind, title, members, last_seq, bool(encrypted), epoch, members_hash)


def conversation_row(txn, conversation_id):
    """The Conversation `conversation_id` (with its members), or None."""
    txn.execute(f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE id = ?", (conversation_id,))
    row = txn.fetchone()
    if row is None:
        return None
    members = _members(txn, "m.conversation_id = ?", (conversation_id,)).get(conversation_id, ())
    return _conversation_record(row, members)


def record_state(txn, conversation_id, state, now):
    """Record the NewState `state` as the encrypted conversation's latest membership, if it
    follows the one recorded (epoch - 1, with hash prev); False (and nothing changed) if not."""
    txn.execute(
        "UPDATE conversations SET epoch = ?, members_hash = ? WHERE id = ? AND encrypted = 1"
        " AND epoch = ? AND (epoch = 0 OR members_hash = ?)",
        (state.epoch, state.hash, conversation_id, state.epoch - 1, state.prev),
    )
    if txn.rowcount != 1:
        return False
    txn.execute(
        "INSERT INTO membership_states (conversation_id, epoch, hash, state, published_at) VALUES (?, ?, ?, ?, ?)",
        (conversation_id, state.epoch, state.hash, state.data, now),
    )
    next_link(txn, conversation_id, "membership", state.epoch, state.hash, now)
    return True


def _add_members(txn, conversation_id, usernames, now, last_seq):
    """Members join at the current end: they owe no delivery of, and have not to read, older messages.

    Unknown or deleted names are left out; members already there are kept as they are.
    """
    if not usernames:
        return
    usernames = list(usernames)
    txn.execute(
        "INSERT INTO members (conversation_id, user_id, joined_at, delivered_seq, read_seq)"
        f" SELECT ?, id, ?, ?, ? FROM users WHERE username IN {placeholders(usernames)} AND {LIVE}"
        " ON CONFLICT DO NOTHING",
        (conversation_id, now, last_seq, last_seq, *usernames),
    )


class MessagingStore(StoreBase):
    # -- users ---------------------------------------------------------------------

    def existing_users(self, usernames):
        """Deferred: the subset of `usernames` that are registered."""
        return self._read("existing_users", self._existing_users_txn, usernames)

    @staticmethod
    def _existing_users_txn(txn, usernames):
        return set(_live(txn, "id", usernames))

    def last_seen(self, usernames):
        """Deferred: {username: last_seen or None} for the registered ones."""
        return self._read("last_seen", _live, "last_seen", usernames)

    def set_last_seen(self, username, at):
        """Deferred: record when `username` was last visible."""
        return self._write("set_last_seen", self._set_last_seen_txn, username, at)

    @staticmethod
    def _set_last_seen_txn(txn, username, at):
        txn.execute(f"UPDATE users SET last_seen = ? WHERE username = ? AND {LIVE}", (at, username))

    def contacts_of(self, username):
        """Deferred: every other user who shares a conversation with `username`."""
        return self._read("contacts_of", self._contacts_txn, username)

    @staticmethod
    def _contacts_txn(txn, username):
        txn.execute(
            "SELECT DISTINCT u.username FROM members mine"
            " JOIN members theirs ON theirs.conversation_id = mine.conversation_id"
            " JOIN users u ON u.id = theirs.user_id"
            f" WHERE mine.user_id = ({USER_ID}) AND u.username != ?",
            (username, username),
        )
        return {name for (name,) in txn.fetchall()}

    # -- conversations -------------------------------------------------------------

    def conversation(self, conversation_id):
        """Deferred: the Conversation, or None."""
        return self._read("conversation", conversation_row, conversation_id)

    def direct_conversation(self, a, b, now, encrypted=False):
        """Deferred: (Conversation, created) for the one direct conversation of users a and b.

        A pair has at most one plaintext and one encrypted direct conversation.
        """
        return self._write("direct_conversation", self._direct_txn, a, b, now, encrypted)

    @staticmethod
    def _direct_txn(txn, a, b, now, encrypted):
        pair = "\n".join(sorted((a, b)))
        if encrypted:
            pair = "encrypted:" + pair  # (no user name holds a ':')
        txn.execute("SELECT id FROM conversations WHERE direct_pair = ?", (pair,))
        row = txn.fetchone()
        if row is not None:
            return conversation_row(txn, row[0]), False
        conversation_id = dialect.insert(
            txn,
            "INSERT INTO conversations (kind, direct_pair, created_at, encrypted) VALUES ('direct', ?, ?, ?)",
            (pair, now, int(encrypted)),
        )
        _add_members(txn, conversation_id, (a, b), now, 0)
        return conversation_row(txn, conversation_id), True

    def create_group(self, usernames, title, now, encrypted=False):
        """Deferred: the new group Conversation of `usernames`."""
        return self._write("create_group", self._group_txn, usernames, title, now, encrypted)

    @staticmethod
    def _group_txn(txn, usernames, title, now, encrypted):
        conversation_id = dialect.insert(
            txn,
            "INSERT INTO conversations (kind, title, created_at, encrypted) VALUES ('group', ?, ?, ?)",
            (title, now, int(encrypted)),
        )
        _add_members(txn, conversation_id, usernames, now, 0)
        return conversation_row(txn, conversation_id)

    def add_members(self, conversation_id, usernames, now, state=None):
        """Deferred: the Conversation after adding `usernames` (existing members are kept as they are).

        With `state` (a NewState: an encrypted conversation's signed membership
        after the change) the state is recorded in the same transaction, if the
        conversation's membership is still at state.epoch - 1 with hash
        state.prev; else nothing changes and the answer is None.
        """
        return self._write("add_members", self._add_members_txn, conversation_id, usernames, now, state)

    @staticmethod
    def _add_members_txn(txn, conversation_id, usernames, now, state):
        if state is not None and not record_state(txn, conversation_id, state, now):
            return None
        txn.execute("SELECT last_seq FROM conversations WHERE id = ?", (conversation_id,))
        (last_seq,) = txn.fetchone()
        _add_members(txn, conversation_id, usernames, now, last_seq)
        return conversation_row(txn, conversation_id)

    def remove_member(self, conversation_id, username, now=None, state=None):
        """Deferred: the Conversation after `username` left; with `state`, as add_members."""
        return self._write("remove_member", self._remove_member_txn, conversation_id, username, now, state)

    @staticmethod
    def _remove_member_txn(txn, conversation_id, username, now, state):
        if state is not None and not record_state(txn, conversation_id, state, now):
            return None
        txn.execute(
            f"DELETE FROM members WHERE conversation_id = ? AND user_id = ({USER_ID})",
            (conversation_id, username),
        )
        return conversation_row(txn, conversation_id)

    def conversations_of(self, username, after_id=None, limit=None):
        """Deferred: [(Conversation, unread)] of `username`'s conversations with ids above
        `after_id` (None: all), at most `limit` (None: all) of them, by id.

        Two statements, however many conversations: one for the page and its
        unread counts, one for the members of every conversation in it.
        """
        return self._read("conversations_of", self._conversations_of_txn, username, after_id, limit)

    @staticmethod
    def _conversations_of_txn(txn, username, after_id, limit):
        after_id = 0 if after_id is None else after_id  # (ids start at 1)
        clause, arguments = limited(limit)
        txn.execute(
            "SELECT c.id, c.kind, c.title, c.last_seq, c.encrypted, c.epoch, c.members_hash,"
            " (SELECT COUNT(*) FROM messages x WHERE x.conversation_id = c.id AND x.seq > m.read_seq"
            "  AND (x.sender_id IS NULL OR x.sender_id <> m.user_id))"
            " FROM members m JOIN conversations c ON c.id = m.conversation_id"
            f" WHERE m.user_id = ({USER_ID}) AND m.conversation_id > ?"
            f" ORDER BY m.conversation_id{clause}",
            (username, after_id, *arguments),
        )
        rows = txn.fetchall()
        if not rows:
            return []
        members = _members(
            txn,
            "m.conversation_id IN (SELECT conversation_id FROM members"
            f" WHERE user_id = ({USER_ID}) AND conversation_id > ? AND conversation_id <= ?)",
            (username, after_id, rows[-1][0]),
        )
        return [(_conversation_record(row[:-1], members.get(row[0], ())), row[-1]) for row in rows]

    def memberships(self, username, device_id=None):
        """Deferred: [Membership] of `username`: where delivery to them stands.

        With `device_id`, each encrypted conversation's `first_wrap` is the
        lowest seq of a wrap waiting for that device (None: none).
        """
        return self._read("memberships", self._memberships_txn, username, device_id)

    @staticmethod
    def _memberships_txn(txn, username, device_id):
        txn.execute(
            "SELECT m.conversation_id, m.delivered_seq, m.read_seq, c.last_seq, c.encrypted,"
            " CASE WHEN c.encrypted = 1 THEN (SELECT MIN(w.seq) FROM wraps w WHERE w.user_id = m.user_id"
            "  AND w.device_id = ? AND w.conversation_id = m.conversation_id) END"
            " FROM members m JOIN conversations c ON c.id = m.conversation_id"
            f" WHERE m.user_id = ({USER_ID})",
            (device_id, username),
        )
        return [
            Membership(conversation, delivered, read, last, bool(encrypted), first_wrap)
            for conversation, delivered, read, last, encrypted, first_wrap in txn.fetchall()
        ]

    # -- messages ------------------------------------------------------------------

    def add_message(self, conversation_id, sender, client_msg_id, body, now, max_pending):
        """Deferred: Stored(message, new); a repeated (sender, client_msg_id) returns the first message.

        None if the sender is not (any more) a member: checked in the same
        transaction. Stored(None, False) if it is a direct conversation whose
        other member has `max_pending` messages of it waiting (not yet delivered).
        """
        return self._write(
            "add_message", self._add_message_txn, conversation_id, sender, client_msg_id, body, now, max_pending
        )

    @staticmethod
    def _add_message_txn(txn, conversation_id, sender, client_msg_id, body, now, max_pending):
        # This runs for every message, so a new message costs three statements (the
        # sender's id looked up inside each); a resend costs more.
        txn.execute(
            "UPDATE conversations SET last_seq = last_seq + 1 WHERE id = :c AND EXISTS"
            f" (SELECT 1 FROM members WHERE conversation_id = :c AND user_id = ({_SENDER_ID}))"
            " AND (kind = 'group' OR NOT EXISTS (SELECT 1 FROM members WHERE conversation_id = :c"
            f" AND user_id != ({_SENDER_ID}) AND delivered_seq <= conversations.last_seq - :cap))"
            " RETURNING last_seq",
            {"c": conversation_id, "sender": sender, "cap": max_pending},
        )
        row = txn.fetchone()
        if row is None:  # not (any more) a member, or the recipient's backlog is full
            resent = _resent(txn, sender, client_msg_id)
            if resent is None and _is_member(txn, conversation_id, sender):
                return Stored(None, False)
            return resent
        seq = row[0]
        message_id = dialect.insert(
            txn,
            "INSERT INTO messages (conversation_id, seq, sender_id, sender, client_msg_id, body, sent_at)"
            f" VALUES (?, ?, ({USER_ID}), ?, ?, ?, ?)"
            " ON CONFLICT (sender_id, client_msg_id) DO NOTHING",
            (conversation_id, seq, sender, sender, client_msg_id, body, now),
        )
        if message_id is None:  # a resend: give the number back, answer with the stored message
            txn.execute("UPDATE conversations SET last_seq = last_seq - 1 WHERE id = ?", (conversation_id,))
            return _resent(txn, sender, client_msg_id)
        txn.execute(OWN_MESSAGE_MARKS, {"c": conversation_id, "sender": sender, "seq": seq, "before": seq - 1})
        return Stored(Message(message_id, conversation_id, seq, sender, body, now), True)

    def messages_from(self, conversation_id, first_seq, limit):
        """Deferred: up to `limit` Messages with seq >= first_seq, in seq order."""
        return self._read("messages_from", self._messages_from_txn, conversation_id, first_seq, limit)

    @staticmethod
    def _messages_from_txn(txn, conversation_id, first_seq, limit):
        txn.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? AND seq >= ?"
            " ORDER BY seq LIMIT ?",
            (conversation_id, first_seq, limit),
        )
        return [Message(*row) for row in txn.fetchall()]

    def messages_before(self, conversation_id, before_seq, limit):
        """Deferred: the newest `limit` Messages with seq < before_seq (None: all), newest first."""
        return self._read("messages_before", self._messages_before_txn, conversation_id, before_seq, limit)

    @staticmethod
    def _messages_before_txn(txn, conversation_id, before_seq, limit):
        txn.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? AND seq < ?"
            " ORDER BY seq DESC LIMIT ?",
            (conversation_id, before_seq if before_seq is not None else 2**62, limit),
        )
        return [Message(*row) for row in txn.fetchall()]

    def message(self, message_id):
        """Deferred: the Message, or None."""
        return self._read("message", self._message_txn, message_id)

    @staticmethod
    def _message_txn(txn, message_id):
        txn.execute(f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ?", (message_id,))
        row = txn.fetchone()
        return Message(*row) if row else None

    # -- marks and receipts --------------------------------------------------------

    def move_mark(self, conversation_id, username, state, seq, now):
        """Deferred: [MarkMove] for each mark that moved forward to `seq` (never backwards).

        Moving the read mark moves the delivered mark with it (read implies
        delivered): then both moves are listed, delivered first. Each names the
        senders of the messages it newly covers.
        """
        return self._write_first("move_mark", self._move_mark_txn, conversation_id, username, state, seq, now)

    @staticmethod
    def _move_mark_txn(txn, conversation_id, username, state, seq, now):
        txn.execute(
            "SELECT user_id, delivered_seq, read_seq FROM members"
            f" WHERE conversation_id = ? AND user_id = ({USER_ID})",
            (conversation_id, username),
        )
        row = txn.fetchone()
        if row is None:
            return []
        uid = row[0]
        marks = dict(zip(("delivered", "read"), row[1:]))
        moves = []
        for moved in ("delivered", "read") if state == "read" else ("delivered",):
            old = marks[moved]
            if seq <= old:
                continue
            txn.execute(
                f"UPDATE members SET {moved}_seq = ? WHERE conversation_id = ? AND user_id = ?",
                (seq, conversation_id, uid),
            )
            txn.execute(
                "INSERT INTO mark_events (conversation_id, user_id, state, seq, at) VALUES (?, ?, ?, ?, ?)",
                (conversation_id, uid, moved, seq, now),
            )
            txn.execute(  # senders still in the conversation: who left hears nothing more of it
                "SELECT DISTINCT m.sender FROM messages m JOIN members b"
                " ON b.conversation_id = m.conversation_id AND b.user_id = m.sender_id"
                " WHERE m.conversation_id = ? AND m.seq > ? AND m.seq <= ? AND m.sender_id != ?",
                (conversation_id, old, seq, uid),
            )
            moves.append(MarkMove(moved, old, seq, tuple(name for (name,) in txn.fetchall())))
        return moves

    def receipts(self, message, after=None, limit=None):
        """Deferred: [(username, delivered_at, read_at)] for each member but the sender, by name,
        names above `after` (None: all), at most `limit` (None: all) of them. One statement.

        A time is when the member's mark first reached the message (reading delivers too).
        """
        return self._read("receipts", self._receipts_txn, message, after, limit)

    @staticmethod
    def _receipts_txn(txn, message, after, limit):
        clause, arguments = limited(limit)
        txn.execute(
            "SELECT u.username,"
            " (SELECT MIN(e.at) FROM mark_events e WHERE e.conversation_id = m.conversation_id"
            "  AND e.user_id = m.user_id AND e.state IN ('delivered', 'read') AND e.seq >= ?),"
            " (SELECT MIN(e.at) FROM mark_events e WHERE e.conversation_id = m.conversation_id"
            "  AND e.user_id = m.user_id AND e.state = 'read' AND e.seq >= ?)"
            " FROM members m JOIN users u ON u.id = m.user_id"
            " WHERE m.conversation_id = ? AND u.username <> ? AND u.username > ?"
            f" ORDER BY u.username{clause}",
            # ('' sorts before every name)
            (message.seq, message.seq, message.conversation_id, message.sender, after or "", *arguments),
        )
        return txn.fetchall()

    def save_pending_receipt(self, recipients, receipt):
        """Deferred: keep `receipt` for each offline recipient (only the newest per reader and state)."""
        return self._write("save_pending_receipt", self._save_pending_txn, recipients, receipt)

    @staticmethod
    def _save_pending_txn(txn, recipients, receipt):
        recipients = list(recipients)
        if not recipients:
            return
        txn.execute(
            "INSERT INTO pending_receipts (recipient_id, conversation_id, reader_id, state, seq, at)"
            f" SELECT users.id, ?, reader.id, ?, ?, ? FROM users, ({USER_ID}) reader"
            f" WHERE users.username IN {placeholders(recipients)} AND {LIVE}"
            " ON CONFLICT (recipient_id, conversation_id, reader_id, state) DO UPDATE SET"
            " seq = CASE WHEN excluded.seq > pending_receipts.seq THEN excluded.seq ELSE pending_receipts.seq END,"
            " at = excluded.at",
            (receipt.conversation_id, receipt.state, receipt.seq, receipt.at, receipt.reader, *recipients),
        )

    def take_pending_receipts(self, username):
        """Deferred: [Receipt] kept for `username`, now forgotten."""
        return self._write("take_pending_receipts", self._take_pending_txn, username)

    @staticmethod
    def _take_pending_txn(txn, username):
        uid = user_id(txn, username)
        txn.execute(
            "SELECT p.conversation_id, u.username, p.state, p.seq, p.at FROM pending_receipts p"
            " JOIN users u ON u.id = p.reader_id WHERE p.recipient_id = ?"
            " ORDER BY p.conversation_id, p.state, p.seq",
            (uid,),
        )
        receipts = [Receipt(*row) for row in txn.fetchall()]
        txn.execute("DELETE FROM pending_receipts WHERE recipient_id = ?", (uid,))
        return receipts
