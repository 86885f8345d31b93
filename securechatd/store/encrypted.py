"""SQL for encrypted conversations: membership states, envelopes, wraps per device, staged wraps.

The server keeps what it cannot read as opaque bytes: each signed
membership state as published, each message's header and body once (in its
`messages` row, beside its seq, sender, sending device, client_msg_id, time
and header counter, with an empty plaintext body), and one wrap per
recipient device until that device acknowledges it.
A message is stored with every check that depends on the database made in
its own transaction, so what the service checked cannot change before the
commit: the sender is a member and the membership is the one its header
names, the counter moves forward, and every wrap goes to a current device
of a current member.
"""

from collections import namedtuple

from securechatd.e2ee.transcript import message_item
from securechatd.records import ChainLink, EncryptedMessage
from securechatd.store import dialect
from securechatd.store.base import LIVE, USER_ID, StoreBase, blobs_page, user_id
from securechatd.store.links import NEXT_LINK_RETURNING, NEXT_LINK_SET, append_link, receipts
from securechatd.store.messaging import OWN_MESSAGE_MARKS, conversation_row, record_state

# a message checked by the service, as the store keeps it: `counter` is the header's 8
# bytes (compared bytewise), `wraps` {device_id: wrap} as sent, `staged` how many wraps
# the sender says it staged (None: not said), `signature` the sender device's (b"": none)
NewEnvelope = namedtuple(
    "NewEnvelope",
    "conversation_id sender sender_device client_msg_id header body counter members_hash wraps staged signature",
)

_ENVELOPE_COLUMNS = (
    "m.id, m.conversation_id, m.seq, m.sender, m.sender_device, m.sent_at, m.header, m.sealed, m.signature,"
    " m.link_n, l.e, l.link"
)
_LINK = "LEFT JOIN links l ON l.conversation_id = m.conversation_id AND l.n = m.link_n"


def _envelope(row, wraps, receipt=None):
    message_id, conversation_id, seq, sender, sender_device, sent_at, header, body, signature, n, e, link = row
    return EncryptedMessage(
        message_id,
        conversation_id,
        seq,
        sender,
        sender_device,
        sent_at,
        bytes(header),
        bytes(body),
        wraps,
        bytes(signature or b""),
        None if n is None else ChainLink(conversation_id, n, bytes(e), bytes(link), receipt),
    )


def _sent(txn, uid, client_msg_id):
    """The EncryptedMessage stored for (sender, client_msg_id), with its link and receipt (no header, body,
    wraps or signature; nothing of them if plaintext), or None."""
    txn.execute(
        "SELECT m.id, m.conversation_id, m.seq, m.sender, m.sender_device, m.sent_at, m.link_n, l.e, l.link"
        f" FROM messages m {_LINK} WHERE m.sender_id = ? AND m.client_msg_id = ?",
        (uid, client_msg_id),
    )
    row = txn.fetchone()
    if row is None:
        return None
    *fields, n, e, link = row
    if n is None:
        return EncryptedMessage(*fields, None, None, {})
    found = receipts(txn, fields[1], [n])
    return EncryptedMessage(*fields, None, None, {}, b"", ChainLink(fields[1], n, bytes(e), bytes(link), found.get(n)))


def _staged(txn, uid, client_msg_id, fresh_after):
    """[(device_id, wrap, conversation_id)] staged for (sender, client_msg_id) since `fresh_after`."""
    txn.execute(
        "SELECT device_id, wrap, conversation_id FROM staged_wraps"
        " WHERE user_id = ? AND client_msg_id = ? AND staged_at >= ? ORDER BY device_id",
        (uid, client_msg_id, fresh_after),
    )
    return [(device_id, bytes(wrap), conversation_id) for device_id, wrap, conversation_id in txn.fetchall()]


def _member_devices(txn, conversation_id):
    """{device_id: {user id: user name}} of every current device of the conversation's current members."""
    txn.execute(
        "SELECT d.device_id, d.user_id, u.username FROM members m JOIN devices d ON d.user_id = m.user_id"
        f" JOIN users u ON u.id = m.user_id WHERE m.conversation_id = ? AND d.revoked_seq IS NULL AND {LIVE}",
        (conversation_id,),
    )
    devices = {}
    for device_id, uid, username in txn.fetchall():
        devices.setdefault(device_id, {})[uid] = username
    return devices


def _left_out(devices, wraps, sender_device, sender_id):
    """The sorted names of members with a current device (but the sending one) that got no wrap."""
    return tuple(
        sorted(
            {
                username
                for device_id, owners in devices.items()
                if device_id not in wraps
                for uid, username in owners.items()
                if (device_id, uid) != (sender_device, sender_id)
            }
        )
    )


# Numbers an encrypted message (RETURNING its seq) only if every check of EncryptedStore.add_envelope
# that the devices (the sender's, and the recipients') do not decide passes, and nothing is staged
# for the message (nor was: stale staged wraps are deleted when it is stored): no message of the
# sender (:uid) with this client_msg_id, the conversation encrypted and its latest membership hash
# the header's, the counter above the last stored, a direct conversation's other member not
# `max_pending` behind.
_NUMBER_IF_ALL_CHECKS_PASS = (
    f"UPDATE conversations SET last_seq = last_seq + 1, {NEXT_LINK_SET}"
    " WHERE id = :c AND encrypted = 1 AND members_hash = :members_hash"
    " AND NOT EXISTS (SELECT 1 FROM messages WHERE sender_id = :uid AND client_msg_id = :client_msg_id)"
    " AND NOT EXISTS (SELECT 1 FROM messages WHERE conversation_id = :c"
    " AND sender_id = :uid AND sender_device = :device AND counter >= :counter)"
    " AND NOT EXISTS (SELECT 1 FROM staged_wraps WHERE user_id = :uid AND client_msg_id = :client_msg_id)"
    " AND (kind = 'group' OR NOT EXISTS (SELECT 1 FROM members WHERE conversation_id = :c"
    " AND user_id <> :uid AND delivered_seq <= conversations.last_seq - :cap))"
    f" RETURNING last_seq, {NEXT_LINK_RETURNING}"
)


def _add_envelope_checked(txn, e, now, max_pending, max_wraps, fresh_after):
    """EncryptedStore.add_envelope, one check at a time in the documented order."""
    uid = user_id(txn, e.sender)
    if uid is None:
        return "not member", None
    resent = _sent(txn, uid, e.client_msg_id)
    if resent is not None:
        return "resent", resent
    txn.execute(
        "SELECT c.kind, c.members_hash, c.last_seq FROM conversations c JOIN members m"
        " ON m.conversation_id = c.id AND m.user_id = ? WHERE c.id = ? AND c.encrypted = 1",
        (uid, e.conversation_id),
    )
    row = txn.fetchone()
    if row is None:
        return "not member", None
    kind, members_hash, last_seq = row
    if members_hash is None or bytes(members_hash) != e.members_hash:
        return "stale", None
    txn.execute(
        "SELECT 1 FROM devices WHERE user_id = ? AND device_id = ? AND revoked_seq IS NULL", (uid, e.sender_device)
    )
    if txn.fetchone() is None:
        return "no sender device", None
    txn.execute(
        "SELECT MAX(counter) FROM messages WHERE conversation_id = ? AND sender_id = ? AND sender_device = ?",
        (e.conversation_id, uid, e.sender_device),
    )
    (highest,) = txn.fetchone()
    if highest is not None and bytes(highest) >= e.counter:
        return "replayed", None
    staged = _staged(txn, uid, e.client_msg_id, fresh_after)
    if any(conversation != e.conversation_id for _, _, conversation in staged):
        return "staged elsewhere", None
    if e.staged is not None and e.staged != len(staged):
        return "staged", len(staged)
    wraps = {device_id: wrap for device_id, wrap, _ in staged}
    for device_id in e.wraps:
        if device_id in wraps:
            return "duplicate", device_id
    wraps.update(e.wraps)
    if len(wraps) > max_wraps:
        return "too many", len(wraps)
    recipients = _member_devices(txn, e.conversation_id)
    for device_id in wraps:
        if device_id not in recipients:
            return "no device", device_id
    if kind == "direct":
        txn.execute(
            "SELECT 1 FROM members WHERE conversation_id = ? AND user_id <> ? AND delivered_seq <= ?",
            (e.conversation_id, uid, last_seq - max_pending),
        )
        if txn.fetchone() is not None:
            return "full", None
    txn.execute(
        f"UPDATE conversations SET last_seq = last_seq + 1, {NEXT_LINK_SET} WHERE id = ?"
        f" RETURNING last_seq, {NEXT_LINK_RETURNING}",
        (e.conversation_id,),
    )
    return _store_envelope(txn, e, now, uid, txn.fetchone(), wraps, recipients, staged=True)


def _store_envelope(txn, e, now, uid, numbered, wraps, recipients, staged):
    """Write the message numbered (seq, link n, e_{n-1}) = `numbered` (with its counter, signature and
    chain link) and its `wraps` (`recipients`: every current device of the members), and the sender's
    marks; delete its staged wraps if `staged`: ("stored", the EncryptedMessage)."""
    seq, n, prev_e = numbered
    link = append_link(txn, e.conversation_id, n, prev_e, "message", seq, message_item(e.header, e.body, e.signature), now)
    message_id = dialect.insert(
        txn,
        "INSERT INTO messages (conversation_id, seq, sender_id, sender, client_msg_id, body, sent_at,"
        " sender_device, header, sealed, counter, signature, link_n) VALUES (?, ?, ?, ?, ?, '', ?, ?, ?, ?, ?, ?, ?)",
        (
            e.conversation_id, seq, uid, e.sender, e.client_msg_id, now, e.sender_device, e.header, e.body,
            e.counter, e.signature or None, n,
        ),
    )
    txn.executemany(
        "INSERT INTO wraps (user_id, device_id, conversation_id, seq, message_id, wrap) VALUES (?, ?, ?, ?, ?, ?)",
        [
            (recipient, device_id, e.conversation_id, seq, message_id, wrap)
            for device_id, wrap in wraps.items()
            for recipient in recipients[device_id]
        ],
    )
    if staged:
        txn.execute("DELETE FROM staged_wraps WHERE user_id = ? AND client_msg_id = ?", (uid, e.client_msg_id))
    txn.execute(OWN_MESSAGE_MARKS, {"c": e.conversation_id, "sender": e.sender, "seq": seq, "before": seq - 1})
    message = EncryptedMessage(
        message_id, e.conversation_id, seq, e.sender, e.sender_device, now, e.header, e.body, wraps, e.signature, link,
        _left_out(recipients, wraps, e.sender_device, uid),
    )
    return "stored", message


class EncryptedStore(StoreBase):
    # -- membership ------------------------------------------------------------------------

    def publish_membership(self, conversation_id, state, now):
        """Deferred: the Conversation with the NewState `state` recorded as its latest membership;
        None if the membership is no longer at state.epoch - 1 with hash state.prev."""
        return self._write("publish_membership", self._publish_membership_txn, conversation_id, state, now)

    @staticmethod
    def _publish_membership_txn(txn, conversation_id, state, now):
        if not record_state(txn, conversation_id, state, now):
            return None
        return conversation_row(txn, conversation_id)

    def membership_states(self, conversation_id, after_epoch, limit):
        """Deferred: ([state bytes] with epoch > after_epoch in order, at most `limit`, has_more)."""
        return self._read("membership_states", self._membership_states_txn, conversation_id, after_epoch, limit)

    @staticmethod
    def _membership_states_txn(txn, conversation_id, after_epoch, limit):
        return blobs_page(
            txn,
            "SELECT state FROM membership_states WHERE conversation_id = ? AND epoch > ? ORDER BY epoch LIMIT ?",
            (conversation_id, after_epoch),
            limit,
        )

    def latest_membership(self, conversation_id):
        """Deferred: the bytes of the conversation's latest membership state, or None."""
        return self._read("latest_membership", self._latest_membership_txn, conversation_id)

    @staticmethod
    def _latest_membership_txn(txn, conversation_id):
        txn.execute(
            "SELECT state FROM membership_states WHERE conversation_id = ? ORDER BY epoch DESC LIMIT 1",
            (conversation_id,),
        )
        row = txn.fetchone()
        return bytes(row[0]) if row else None

    # -- staging and storing messages --------------------------------------------------------

    def stage_wraps(self, username, client_msg_id, conversation_id, wraps, now, fresh_after, max_wraps, max_messages):
        """Deferred: keep `wraps` {device_id: wrap} for the message (username, client_msg_id) of
        the conversation, replacing a device's wrap staged before. Answers (outcome, value):

        ("staged", wraps now held for the message); ("sent", None) if that message was sent
        already; ("elsewhere", None) if wraps are staged for it in another conversation;
        ("too many", count) if it would hold more than `max_wraps`. Nothing is kept then.

        Staged wraps older than `fresh_after` are forgotten (a message's wraps are all as
        old as its latest staging); a user stages for at most `max_messages` messages at
        once, the one staged longest ago being forgotten first.
        """
        return self._write(
            "stage_wraps",
            self._stage_wraps_txn,
            username,
            client_msg_id,
            conversation_id,
            dict(wraps),
            now,
            fresh_after,
            max_wraps,
            max_messages,
        )

    @staticmethod
    def _stage_wraps_txn(
        txn, username, client_msg_id, conversation_id, wraps, now, fresh_after, max_wraps, max_messages
    ):
        uid = user_id(txn, username)
        txn.execute("DELETE FROM staged_wraps WHERE staged_at < ?", (fresh_after,))
        if _sent(txn, uid, client_msg_id) is not None:
            return "sent", None
        held = _staged(txn, uid, client_msg_id, fresh_after)
        if any(conversation != conversation_id for _, _, conversation in held):
            return "elsewhere", None
        count = len({device_id for device_id, _, _ in held} | set(wraps))
        if count > max_wraps:
            return "too many", count
        if not held:  # a message not staged for yet: make room for it
            txn.execute(
                "SELECT client_msg_id FROM staged_wraps WHERE user_id = ?"
                " GROUP BY client_msg_id ORDER BY MIN(staged_at), client_msg_id",
                (uid,),
            )
            staged_for = [row[0] for row in txn.fetchall()]
            for oldest in staged_for[: max(0, len(staged_for) - max_messages + 1)]:
                txn.execute("DELETE FROM staged_wraps WHERE user_id = ? AND client_msg_id = ?", (uid, oldest))
        txn.execute(
            "UPDATE staged_wraps SET staged_at = ? WHERE user_id = ? AND client_msg_id = ?", (now, uid, client_msg_id)
        )
        txn.executemany(
            "INSERT INTO staged_wraps (user_id, client_msg_id, conversation_id, device_id, wrap, staged_at)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (user_id, client_msg_id, device_id)"
            " DO UPDATE SET wrap = excluded.wrap, staged_at = excluded.staged_at",
            [(uid, client_msg_id, conversation_id, device_id, wrap, now) for device_id, wrap in wraps.items()],
        )
        return "staged", count

    def add_envelope(self, envelope, now, max_pending, max_wraps, fresh_after):
        """Deferred: store the NewEnvelope `envelope` with its staged wraps (those staged since
        `fresh_after`), all or nothing. Answers (outcome, value), checked in this order:

        ("resent", the EncryptedMessage first stored for (sender, client_msg_id), no wraps);
        ("not member", None) the sender is not (any more) a member; ("stale", None) the
        conversation's latest membership hash is not the header's; ("no sender device", None)
        the sending device is not a current device of the sender's chain; ("replayed", None)
        the counter is not above the last stored for that device in that conversation;
        ("staged elsewhere", None) the staged wraps are another conversation's; ("staged",
        count held) not the `staged` count the sender expected; ("duplicate", device_id) a
        device has a staged wrap and one in the command; ("too many", count) more than
        `max_wraps` wraps in all; ("no device", device_id) a wrap for what is not a current
        device of a current member; ("full", None) a direct conversation whose other member
        has `max_pending` messages of it waiting; else ("stored", the new EncryptedMessage
        with every wrap, its link's receipt, and in `left_out` the members with a current
        device that got no wrap, so their sender's client can fetch their chains again).
        """
        return self._write("add_envelope", self._add_envelope_txn, envelope, now, max_pending, max_wraps, fresh_after)

    @staticmethod
    def _add_envelope_txn(txn, e, now, max_pending, max_wraps, fresh_after):
        # This runs for every encrypted message, so the common case (a new message, nothing
        # staged for it, the sending device and every wrap's device a current device of a
        # current member, every check passing) costs one statement for the members' devices, one that
        # makes every other check and numbers the message, and the rows written. Anything else
        # goes the long way, which checks one thing at a time to answer the first failing
        # check's outcome.
        if e.staged in (None, 0) and len(e.wraps) <= max_wraps:
            devices = _member_devices(txn, e.conversation_id)
            senders = [uid for uid, name in devices.get(e.sender_device, {}).items() if name == e.sender]
            if senders and all(device_id in devices for device_id in e.wraps):
                txn.execute(
                    _NUMBER_IF_ALL_CHECKS_PASS,
                    {
                        "c": e.conversation_id,
                        "uid": senders[0],
                        "client_msg_id": e.client_msg_id,
                        "members_hash": e.members_hash,
                        "device": e.sender_device,
                        "counter": e.counter,
                        "cap": max_pending,
                    },
                )
                numbered = txn.fetchone()
                if numbered is not None:
                    return _store_envelope(txn, e, now, senders[0], numbered, dict(e.wraps), devices, staged=False)
        return _add_envelope_checked(txn, e, now, max_pending, max_wraps, fresh_after)

    # -- reading and acknowledging ---------------------------------------------------------------

    def envelopes_for_device(self, conversation_id, username, device_id, first_seq, limit):
        """Deferred: up to `limit` EncryptedMessages of the conversation with seq >= first_seq that
        have a wrap for `username`'s device `device_id`, in seq order, each with that wrap only."""
        return self._read(
            "envelopes_for_device",
            self._envelopes_for_device_txn,
            conversation_id,
            username,
            device_id,
            first_seq,
            limit,
        )

    @staticmethod
    def _envelopes_for_device_txn(txn, conversation_id, username, device_id, first_seq, limit):
        txn.execute(
            f"SELECT {_ENVELOPE_COLUMNS}, w.wrap FROM wraps w JOIN messages m ON m.id = w.message_id {_LINK}"
            f" WHERE w.user_id = ({USER_ID}) AND w.device_id = ? AND w.conversation_id = ? AND w.seq >= ?"
            " ORDER BY w.seq LIMIT ?",
            (username, device_id, conversation_id, first_seq, limit),
        )
        rows = txn.fetchall()
        found = receipts(txn, conversation_id, [row[9] for row in rows if row[9] is not None])
        return [_envelope(row[:-1], {device_id: bytes(row[-1])}, found.get(row[9])) for row in rows]

    def envelopes_before(self, conversation_id, username, device_id, before_seq, limit):
        """Deferred: the newest `limit` EncryptedMessages with seq < before_seq (None: all), newest
        first, each with the wrap still held for `username`'s device `device_id` (if any)."""
        return self._read(
            "envelopes_before", self._envelopes_before_txn, conversation_id, username, device_id, before_seq, limit
        )

    @staticmethod
    def _envelopes_before_txn(txn, conversation_id, username, device_id, before_seq, limit):
        uid = user_id(txn, username)
        txn.execute(
            f"SELECT {_ENVELOPE_COLUMNS}, w.wrap FROM messages m {_LINK}"
            " LEFT JOIN wraps w ON w.user_id = ? AND w.device_id = ? AND w.conversation_id = m.conversation_id"
            " AND w.seq = m.seq"
            " WHERE m.conversation_id = ? AND m.seq < ? AND m.sealed IS NOT NULL ORDER BY m.seq DESC LIMIT ?",
            (uid, device_id, conversation_id, before_seq if before_seq is not None else 2**62, limit),
        )
        return [_envelope(row[:-1], {} if row[-1] is None else {device_id: bytes(row[-1])}) for row in txn.fetchall()]

    def delete_wraps(self, acknowledged):
        """Deferred: forget each device's wraps of a conversation up to a seq, for every
        (username, device_id, conversation_id, up_to_seq) in `acknowledged`: the devices
        have them (acknowledgements, so in the store's first lane)."""
        return self._write_first("delete_wraps", self._delete_wraps_txn, acknowledged)

    @staticmethod
    def _delete_wraps_txn(txn, acknowledged):
        txn.executemany(
            f"DELETE FROM wraps WHERE user_id = ({USER_ID}) AND device_id = ? AND conversation_id = ? AND seq <= ?",
            acknowledged,
        )
