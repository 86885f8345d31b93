"""Encrypted messages: staging wraps, sending, history, and each device's acknowledgements.

"What happens when Alice sends an encrypted message" starts at
`EncryptedService.send`: the session must be bound to a device; the header
is parsed (docs/E2EE.md, "Encrypted messages") and must name this
conversation, the caller and the session's device; then the store checks,
in the transaction that commits the message, that the header was made under
the conversation's latest membership state, that its counter moves on, and
that every wrap (those staged with StageWraps and those sent) goes to a
current device of a current member. The header and body are stored once and
one wrap per device, the message's chain link with its signed receipt
(store/links.py); the answer carries the receipt and names the members with
a current device the message has no wrap for (`missing`: their client
fetches their chains again). Each member's Outbox (server/delivery.py) then pushes
`DeliverEncrypted` to the sessions bound to a device that has a wrap, each
with its own wrap only. A device's answer is its acknowledgement: its wraps
up to there are deleted (`acknowledged`), and the user's delivered mark
moves as for any message (server/receipts.py).

The server never reads a body: it checks sizes (a padded body is a size
bucket plus the 16-byte tag) and where the bytes go, not what they say.
"""

from twisted.logger import Logger

from securechatd import commands
from securechatd.commands import (
    InvalidArgument,
    MailboxFull,
    MessageTooLarge,
    NO_SUCH_CONVERSATION_TEXT,
    NoSuchConversation,
    NoSuchDevice,
    NotAllowed,
)
from securechatd.e2ee.encoding import Malformed
from securechatd.e2ee.envelope import FIRST_BUCKET, Header
from securechatd.e2ee.keys import SIGNATURE_BYTES
from securechatd.server.accounts import check_device_id
from securechatd.server.policy import check_limit, deferred, take
from securechatd.store.encrypted import NewEnvelope

log = Logger()

WRAP_BYTES = (89, 129)  # a ratchet message's wrap, and a first message's (with X3DH)
TAG_BYTES = 16  # ChaCha20-Poly1305's tag, after the padded body
ACK_FLUSH = 1.0  # seconds: acknowledged wraps are deleted this often
MAX_STAGED_MESSAGES = 4  # messages one user stages wraps for at once; staging a fifth forgets the oldest
NOT_BOUND = "This conversation is end-to-end encrypted: log in with your device_id to {what}."
PLAINTEXT = "This conversation is not end-to-end encrypted: use SendMessage and History."
STALE = (
    "This message was encrypted under an earlier membership state: the membership changed; fetch it"
    " (GetMembership) and send again."
)


def body_limit(max_message_bytes):
    """The largest encrypted body: the padding bucket of `max_message_bytes` of plaintext, plus the tag."""
    size = FIRST_BUCKET
    while size <= max_message_bytes:
        size *= 2
    return size + TAG_BYTES


def _is_padded_size(length):
    """True if `length` is a size bucket (256, 512, 1024, ... bytes) plus the tag, as every body is."""
    bucket = length - TAG_BYTES
    return bucket >= FIRST_BUCKET and not bucket & (bucket - 1)


class EncryptedService:
    def __init__(
        self,
        store,
        conversations,
        registry,
        clock,
        rate,
        max_message_bytes,
        max_pending,
        max_devices,
        staging_timeout,
    ):
        self.store = store
        self.conversations = conversations
        self.registry = registry
        self.clock = clock
        self.rate = rate  # the TokenBucket per sender that SendMessage uses
        self.max_body = body_limit(max_message_bytes)
        self.max_pending = max_pending  # as for SendMessage: a direct conversation's backlog for its recipient
        self.max_devices = max_devices  # wraps per message, staged and sent together
        self.staging_timeout = staging_timeout
        self._acknowledged = {}  # (username, device_id, conversation_id) -> seq answered, wraps not yet deleted
        self._flush = None

    # -- the checks every command here makes ----------------------------------------------

    @staticmethod
    def _device(session, what):
        """The session's device (32 hex digits); NOT_ALLOWED for a session bound to none."""
        if session.device_id is None:
            raise NotAllowed(NOT_BOUND.format(what=what))
        return session.device_id

    @staticmethod
    def _check_client_msg_id(client_msg_id):
        if not 1 <= len(client_msg_id) <= commands.MAX_CLIENT_MSG_ID:
            raise InvalidArgument(f"client_msg_id must be 1 to {commands.MAX_CLIENT_MSG_ID} characters.")

    def _wraps(self, session, wraps):
        """{device_id: wrap} of the (device_id, wrap) pairs sent: each id once, each wrap 89 or 129 bytes."""
        checked = {}
        for device_id, wrap in wraps:
            check_device_id(device_id)
            if device_id in checked:
                raise InvalidArgument(f"Device {device_id} has two wraps: a device has one wrap per message.")
            if len(wrap) not in WRAP_BYTES:
                raise InvalidArgument(f"A wrap is {WRAP_BYTES[0]} or {WRAP_BYTES[1]} bytes, not {len(wrap)}.")
            if device_id == session.device_id:
                raise InvalidArgument("No wrap for the sending device: it has the message already.")
            checked[device_id] = wrap
        if len(checked) > self.max_devices:
            raise InvalidArgument(f"A message is wrapped for at most {self.max_devices} devices.")
        return checked

    async def _conversation(self, session, conversation_id):
        """The caller's encrypted Conversation (NOT_ALLOWED for a plaintext one)."""
        conversation = await self.conversations.member_of(conversation_id, session.username)
        if not conversation.encrypted:
            raise NotAllowed(PLAINTEXT)
        return conversation

    def _take(self, session):
        take(self.rate, session.username, "Too many messages")

    # -- staging and sending ---------------------------------------------------------------

    @deferred
    async def stage(self, session, conversation_id, client_msg_id, wraps):
        """Keep `wraps` [(device_id, wrap)] for the message `client_msg_id` about to be sent: how many it holds."""
        self._check_client_msg_id(client_msg_id)
        wraps = self._wraps(session, wraps)
        if not wraps:
            raise InvalidArgument("Stage at least one wrap.")
        conversation = await self._conversation(session, conversation_id)
        self._device(session, "send to it")
        self._take(session)
        now = self.clock.seconds()
        outcome, value = await self.store.stage_wraps(
            session.username,
            client_msg_id,
            conversation.id,
            wraps,
            now,
            now - self.staging_timeout,
            self.max_devices,
            MAX_STAGED_MESSAGES,
        )
        if outcome == "sent":
            raise InvalidArgument("The message with this client_msg_id was sent already.")
        if outcome == "elsewhere":
            raise InvalidArgument("Wraps for this client_msg_id are staged for another conversation.")
        if outcome == "too many":
            raise InvalidArgument(f"A message is wrapped for at most {self.max_devices} devices, not {value}.")
        return value

    def send(self, session, conversation_id, client_msg_id, header, body, wraps, staged=None, signature=None):
        """Deferred: the stored EncryptedMessage (a resend: the first one, stored and delivered once), once committed.

        (Callbacks, not a coroutine, as MessageService.send: this runs for every message.)
        """
        self._check_client_msg_id(client_msg_id)
        try:
            parsed = Header.from_bytes(header)
        except Malformed as problem:
            raise InvalidArgument(f"Not a message header: {problem}.")
        if len(body) > self.max_body:
            raise MessageTooLarge(f"An encrypted body is at most {self.max_body} bytes.")
        if not _is_padded_size(len(body)):
            raise InvalidArgument("An encrypted body is a padding bucket (256, 512, ... bytes) plus 16.")
        wraps = self._wraps(session, wraps)
        if staged is not None and staged < 0:
            raise InvalidArgument("staged must be 0 or more.")
        if signature and len(signature) != SIGNATURE_BYTES:
            raise InvalidArgument(f"A message signature is {SIGNATURE_BYTES} bytes.")
        arguments = (session, client_msg_id, parsed, header, body, wraps, staged, signature or b"")
        conversation = self.conversations.loaded_member(conversation_id, session.username)
        if conversation is None:  # not loaded yet
            return self.conversations.member_of(conversation_id, session.username).addCallback(self._store, *arguments)
        return self._store(conversation, *arguments)

    def _store(self, conversation, session, client_msg_id, parsed, header, body, wraps, staged, signature):
        if not conversation.encrypted:
            raise NotAllowed(PLAINTEXT)
        self.conversations.check_writable(conversation)
        device = self._device(session, "send to it")
        if parsed.conversation != conversation.id:
            raise InvalidArgument("The header names another conversation than the one it is sent to.")
        if parsed.sender != session.username:
            raise NotAllowed("The sender of a header you send must be you.")
        if parsed.sender_device.hex() != device:
            raise NotAllowed("The sender device of a header must be the device this session is bound to.")
        self._take(session)
        envelope = NewEnvelope(
            conversation.id,
            session.username,
            device,
            client_msg_id,
            header,
            body,
            parsed.counter.to_bytes(8, "big"),
            parsed.members,
            wraps,
            staged,
            signature,
        )
        now = self.clock.seconds()
        stored = self.store.add_envelope(envelope, now, self.max_pending, self.max_devices, now - self.staging_timeout)
        return stored.addCallback(self._stored, session, staged)

    def _stored(self, result, session, staged):
        outcome, value = result
        if outcome == "stored":  # (with its link's receipt: signed before it was committed)
            self.conversations.committed(value.conversation_id, value.seq)
            self._fan_out(value, session)
            return value
        if outcome in ("resent", "full"):
            self.rate.refund(session.username)  # stored nothing: cost nothing (as SendMessage)
        if outcome == "resent":
            return value
        raise self._refusal(outcome, value, staged)

    def _refusal(self, outcome, value, staged):
        if outcome == "not member":  # left while this was on its way
            return NoSuchConversation(NO_SUCH_CONVERSATION_TEXT)
        if outcome == "stale":
            return NotAllowed(STALE)
        if outcome == "no sender device":
            return NoSuchDevice("This device is not a current device of your chain: publish its link first.")
        if outcome == "replayed":
            return InvalidArgument(
                "The header's counter is not above the last one this device sent here: replayed or out of order."
            )
        if outcome == "staged elsewhere":
            return InvalidArgument("Wraps for this client_msg_id are staged for another conversation.")
        if outcome == "staged":
            return InvalidArgument(f"{value} wraps are staged for this message, not {staged}: stage them again.")
        if outcome == "duplicate":
            return InvalidArgument(f"Device {value} has a staged wrap and another in this command.")
        if outcome == "too many":
            return InvalidArgument(f"A message is wrapped for at most {self.max_devices} devices, not {value}.")
        if outcome == "no device":
            return NoSuchDevice(f"{value} is not a current device of a member of this conversation.")
        return MailboxFull(
            f"{self.max_pending} messages are waiting for the other member of this conversation;"
            " send again once they have received them."
        )

    def _fan_out(self, message, origin):
        """Every online session bound to a device takes the new message into its Outbox (which keeps only its wrap)."""
        for member in self.conversations.cached(message.conversation_id).members:
            for session in self.registry.sessions_of(member):
                if session.outbox is not None and session.device_id is not None:
                    session.outbox.envelope_committed(message, origin)

    # -- reading ---------------------------------------------------------------------------

    @deferred
    async def history(self, session, conversation_id, before_seq, limit):
        """(EncryptedMessages newest first, each with this device's wrap while it has one; has_more)."""
        limit = check_limit(limit, commands.HISTORY_LIMIT)
        if before_seq is not None and before_seq < 1:
            raise InvalidArgument("before_seq must be a positive number.")
        conversation = await self._conversation(session, conversation_id)
        device = self._device(session, "read it")
        newest_first = await self.store.envelopes_before(
            conversation.id, session.username, device, before_seq, limit + 1
        )
        return newest_first[:limit], len(newest_first) > limit

    # -- acknowledgements ----------------------------------------------------------------------

    def acknowledged(self, username, device_id, conversation_id, seq):
        """A session bound to `device_id` answered every DeliverEncrypted of the conversation up to `seq`
        (called by Outboxes): the device's wraps up to there are deleted, all devices' in one store
        call every ACK_FLUSH seconds. (A wrap outliving its acknowledgement costs nothing but a
        repeated push after a crash, which the client recognises as the same message.)"""
        key = (username, device_id, conversation_id)
        if seq > self._acknowledged.get(key, 0):
            self._acknowledged[key] = seq
        if self._flush is None:
            self._flush = self.clock.callLater(ACK_FLUSH, self._delete_acknowledged)

    def flush_acknowledged(self):
        """Queue the deletion of every acknowledged wrap now (as the daemon stops)."""
        if self._flush is not None:
            self._flush.cancel()
            self._delete_acknowledged()

    def _delete_acknowledged(self):
        self._flush = None
        acknowledged, self._acknowledged = self._acknowledged, {}
        deleted = self.store.delete_wraps([(*key, seq) for key, seq in acknowledged.items()])
        deleted.addErrback(lambda failure: log.failure("deleting acknowledged wraps", failure))
