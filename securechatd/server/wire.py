"""Domain records as AMP boxes: the one place where the services' words meet the wire.

The connection (server/connection.py) encodes its pushes here and the
responders (server/protocol.py) shape their answers here; no service
imports AMP. A push shared by many recipients (a group message's Deliver,
a Receipt, a presence change) is encoded once and cached, so a fan-out
adds only each connection's tag.
"""

from datetime import datetime, timezone
from functools import cache, lru_cache

from twisted.protocols import amp

from securechatd import commands
from securechatd.server.framing import VALUE_LIMIT, encode, encode_arguments


def utc(seconds):
    """Seconds since the epoch as the UTC datetime amp.DateTime sends."""
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


# -- pushes ---------------------------------------------------------------------------


@lru_cache(maxsize=1024)
def deliver_box(message):
    return encode_arguments(commands.Deliver, message_item(message, conversation_id=message.conversation_id))


def deliver_encrypted_box(message, wrap):
    """DeliverEncrypted of `message` with one device's `wrap`: what all devices share is encoded once."""
    shared = _envelope_box(
        message.id,
        message.conversation_id,
        message.seq,
        message.sender,
        message.sender_device,
        message.sent_at,
        message.header,
        message.body,
        message.signature,
        message.link and message.link.data,
        message.link and message.link.receipt,
    )
    return shared if wrap is None else shared + encode([(b"wrap", wrap)])


@lru_cache(maxsize=256)
def _envelope_box(
    message_id, conversation_id, seq, sender, sender_device, sent_at, header, body, signature, link, receipt
):
    item = {
        "message_id": message_id,
        "conversation_id": conversation_id,
        "seq": seq,
        "sender": sender,
        "sender_device": sender_device,
        "sent_at": utc(sent_at),
        "header": header,
        "body": body,
        "signature": signature or None,
        "link": link,
        "receipt": receipt,
    }
    return encode_arguments(commands.DeliverEncrypted, item)


@lru_cache(maxsize=256)
def receipt_box(receipt):
    return encode_arguments(
        commands.Receipt,
        {
            "conversation_id": receipt.conversation_id,
            "username": receipt.reader,
            "state": receipt.state,
            "seq": receipt.seq,
            "at": utc(receipt.at),
        },
    )


@lru_cache(maxsize=256)
def presence_box(presence):
    return encode_arguments(
        commands.PresenceChanged,
        {"username": presence.username, "status": presence.status, "note": presence.note, "at": utc(presence.at)},
    )


@lru_cache(maxsize=256)
def conversation_box(conversation):
    return encode_arguments(commands.ConversationUpdated, conversation_item(conversation))


# -- answers --------------------------------------------------------------------------


def conversation_item(conversation, **extra):
    """A conversation's arguments; `encrypted` only for an encrypted one, so a plaintext one is as in version 1."""
    return {
        "conversation_id": conversation.id,
        "kind": conversation.kind,
        "title": conversation.title,
        "members": list(conversation.members),
        "encrypted": True if conversation.encrypted else None,
        **extra,
    }


def message_item(message, **extra):
    return {
        "message_id": message.id,
        "seq": message.seq,
        "sender": message.sender,
        "body": message.body,
        "sent_at": utc(message.sent_at),
        **extra,
    }


def envelope_item(message):
    """A HistoryEncrypted item: the EncryptedMessage with the reading device's wrap, if it still has one."""
    [wrap] = message.wraps.values() or [None]
    return {
        "message_id": message.id,
        "seq": message.seq,
        "sender": message.sender,
        "sender_device": message.sender_device,
        "sent_at": utc(message.sent_at),
        "header": message.header,
        "body": message.body,
        "wrap": wrap,
        "signature": message.signature or None,
        "link": message.link and message.link.data,
    }


def sent_encrypted_answer(message):
    """SendEncrypted's answer: the message's place, its receipt (none for a resend), and who has a device
    it was not wrapped for (absent when nobody has)."""
    return {
        "message_id": message.id,
        "seq": message.seq,
        "sent_at": utc(message.sent_at),
        "receipt": message.link and message.link.receipt,
        "missing": list(message.left_out) or None,
    }


@lru_cache(maxsize=256)
def mode_changed_box(conversation_id):
    return encode_arguments(commands.ModeChanged, {"conversation_id": conversation_id})


@lru_cache(maxsize=256)
def devices_changed_box(username):
    return encode_arguments(commands.DevicesChanged, {"username": username})


@lru_cache(maxsize=256)
def transcript_signed_box(conversation_id, username, head):
    return encode_arguments(
        commands.TranscriptSigned, {"conversation_id": conversation_id, "username": username, "head": head}
    )


def receipt_item(username, delivered_at, read_at):
    return {
        "username": username,
        "delivered_at": None if delivered_at is None else utc(delivered_at),
        "read_at": None if read_at is None else utc(read_at),
    }


def bundle_answer(bundle):
    """ClaimPrekeyBundle's answer for a store.keys.PrekeyBundle."""
    return {
        "spk_id": bundle.spk_id,
        "spk_pub": bundle.spk_pub,
        "spk_signature": bundle.spk_signature,
        "opk_id": bundle.opk_id,
        "opk_pub": bundle.opk_pub,
        "sig_pub": bundle.device.sig_pub,
        "dh_pub": bundle.device.dh_pub,
    }


def devices_answer(devices, sessions, this_session):
    """ListDevices' answer: the caller's current devices and sessions, each list cut to fit one AMP value."""
    device_items = [
        {"device_id": device.device_id, "name": device.name, "added_seq": device.added_seq} for device in devices
    ]
    session_items = [
        {
            "device_id": session.device_id,
            "client_name": session.client_name,
            "address": session.address,
            "since": utc(session.started),
            "this_session": session is this_session,
        }
        for session in sorted(sessions, key=lambda session: session.started)
    ]
    answer = page(commands.ListDevices, "devices", device_items, False)
    sessions_page = page(commands.ListDevices, "sessions", session_items, False)
    answer["sessions"] = sessions_page["sessions"]
    answer["has_more"] = answer["has_more"] or sessions_page["has_more"]
    return answer


@cache
def list_spec(command, name):
    """The item arguments of `command`'s AmpList answer `name`."""
    return dict(command.response)[name.encode("ascii")].subargs


def fit(items, spec):
    """The longest prefix of `items` whose AmpList encoding fits one AMP value (65,535 bytes)."""
    encoder = amp.AmpList(spec)
    size = 0
    for count, item in enumerate(items):
        size += len(encoder.toStringProto([item], None))
        if size > VALUE_LIMIT:
            return items[:count]
    return items


def strings_page(items, has_more, name):
    """{name: the longest prefix of the byte strings `items` whose ListOf(String) fits one AMP value, "has_more"}."""
    encoder = amp.ListOf(amp.String())
    size, fitting = 0, items
    for count, item in enumerate(items):
        size += len(encoder.toStringProto([item], None))
        if size > VALUE_LIMIT:
            fitting = items[:count]
            break
    return {name: fitting, "has_more": has_more or len(fitting) < len(items)}


def page(command, name, items, has_more):
    """The answer {name: items that fit, "has_more": ...}: a page cut short says there is more."""
    fitting = fit(items, list_spec(command, name))
    return {name: fitting, "has_more": has_more or len(fitting) < len(items)}


# -- account security (issue 13) ----------------------------------------------------------


def sessions_answer(result):
    """ListSessions' answer for SecurityService.sessions: the caller's sessions, cut to fit one AMP value."""
    rows, has_more = result
    items = [
        {
            "session_id": session_id,
            "device_id": device_id,
            "client_name": client_name,
            "address": address,
            "since": utc(since),
            "last_active": utc(last_active),
            "online": online,
            "this_session": this_session,
        }
        for session_id, device_id, client_name, address, since, last_active, online, this_session in rows
    ]
    return page(commands.ListSessions, "sessions", items, has_more)


def account_log_answer(entries, head, consistency, has_more):
    """GetAccountLog's answer: the events with their proofs (cut to fit one AMP value), the head, the
    consistency proof."""
    items = [{"event": event, "leaf_index": index, "proof": proof} for event, index, proof in entries]
    answer = page(commands.GetAccountLog, "events", items, has_more)
    answer.update(tree_head=head, consistency=consistency)
    return answer


def invitation_item(invitation):
    return {
        "conversation_id": invitation.conversation_id,
        "kind": invitation.kind,
        "title": invitation.title,
        "inviter": invitation.inviter,
        "invited_at": utc(invitation.invited_at),
        "accepted": invitation.accepted,
        "encrypted": True if invitation.encrypted else None,
    }


def invited_box(invitation):
    item = invitation_item(invitation)
    names = ("conversation_id", "kind", "title", "inviter", "encrypted")
    return encode_arguments(commands.Invited, {name: item[name] for name in names})


def invitation_accepted_box(conversation_id, username):
    return encode_arguments(commands.InvitationAccepted, {"conversation_id": conversation_id, "username": username})
