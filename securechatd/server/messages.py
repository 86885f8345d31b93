"""Messages: sending and history.

"What happens when Alice sends a message" starts at `MessageService.send`:
check membership, commit (which numbers the message), then hand it to the
Outbox of every online session of every member (server/delivery.py), which
pushes it to its client. Acknowledgements and receipts are server/receipts.py.
"""

from securechatd import commands
from securechatd.commands import (
    InvalidArgument,
    MailboxFull,
    MessageTooLarge,
    NO_SUCH_CONVERSATION_TEXT,
    NoSuchConversation,
    NotAllowed,
)
from securechatd.server.policy import check_limit, deferred, take


ENCRYPTED = (
    "This conversation is end-to-end encrypted; {what} it with {command}, from a session bound to one of your devices."
)
PLAINTEXT_REFUSED = "This server no longer accepts plaintext messages; start an end-to-end encrypted conversation."


def check_body(body, max_bytes):
    """A plaintext body: not empty, within `max_bytes` of UTF-8, no control characters but newline and tab."""
    if not body:
        raise InvalidArgument("A message needs a body.")
    if len(body.encode("utf-8")) > max_bytes:
        raise MessageTooLarge(f"A message body is at most {max_bytes} bytes of UTF-8.")
    if not body.isprintable() and any(_is_control(c) for c in body):
        raise InvalidArgument("A message body may not hold control characters other than newline and tab.")


def _is_control(character):
    code = ord(character)
    return (code < 0x20 and character not in "\n\t") or 0x7F <= code < 0xA0


class MessageService:
    def __init__(self, store, conversations, registry, clock, rate, max_body, max_pending, plaintext_allowed=True):
        self.store = store
        self.conversations = conversations
        self.registry = registry
        self.clock = clock
        self.rate = rate  # TokenBucket per sender
        self.max_body = max_body
        self.max_pending = max_pending  # undelivered messages a direct conversation may hold for its recipient
        self.plaintext_allowed = plaintext_allowed  # [messages] plaintext = allowed

    # -- sending -------------------------------------------------------------------

    def send(self, session, conversation_id, client_msg_id, body):
        """Deferred: the stored Message, only once it is committed.

        (Callbacks, not a coroutine: this runs for every message, and a
        coroutine costs about as much as the rest of the work around it.)
        """
        if not 1 <= len(client_msg_id) <= commands.MAX_CLIENT_MSG_ID:
            raise InvalidArgument(f"client_msg_id must be 1 to {commands.MAX_CLIENT_MSG_ID} characters.")
        check_body(body, self.max_body)
        conversation = self.conversations.loaded_member(conversation_id, session.username)
        if conversation is None:  # not loaded yet
            checked = self.conversations.member_of(conversation_id, session.username)
            return checked.addCallback(self._store, session, client_msg_id, body)
        return self._store(conversation, session, client_msg_id, body)

    def _store(self, conversation, session, client_msg_id, body):
        if conversation.encrypted or not self.plaintext_allowed:
            self._refuse_plaintext(conversation)
        self.conversations.check_writable(conversation)
        take(self.rate, session.username, "Too many messages")
        stored = self.store.add_message(
            conversation.id, session.username, client_msg_id, body, self.clock.seconds(), self.max_pending
        )
        return stored.addCallback(self._stored, session, conversation.id)

    @staticmethod
    def _refuse_plaintext(conversation):
        if conversation.encrypted:
            raise NotAllowed(ENCRYPTED.format(what="send to", command="SendEncrypted"))
        raise NotAllowed(PLAINTEXT_REFUSED)

    def _stored(self, stored, session, conversation_id):
        if stored is None:  # left the conversation while this was on its way
            raise NoSuchConversation(NO_SUCH_CONVERSATION_TEXT)
        if stored.message is None:
            self.rate.refund(session.username)
            raise MailboxFull(
                f"{self.max_pending} messages are waiting for the other member of this conversation;"
                " send again once they have received them."
            )
        if stored.new:
            self.conversations.committed(conversation_id, stored.message.seq)
            self._fan_out(stored.message, session)
        else:
            self.rate.refund(session.username)  # a resend stores nothing: it costs nothing
        return stored.message

    def _fan_out(self, message, origin):
        """Every online session of every member takes the new message into its Outbox."""
        for member in self.conversations.cached(message.conversation_id).members:
            for session in self.registry.sessions_of(member):
                if session.outbox is not None:
                    session.outbox.message_committed(message, origin)

    # -- reading -------------------------------------------------------------------

    @deferred
    async def history(self, session, conversation_id, before_seq, limit):
        """(messages newest first, has_more): the newest `limit` before `before_seq`."""
        limit = check_limit(limit, commands.HISTORY_LIMIT)
        if before_seq is not None and before_seq < 1:
            raise InvalidArgument("before_seq must be a positive number.")
        conversation = await self.conversations.member_of(conversation_id, session.username)
        if conversation.encrypted:
            raise NotAllowed(ENCRYPTED.format(what="read", command="HistoryEncrypted"))
        newest_first = await self.store.messages_before(conversation.id, before_seq, limit + 1)
        return newest_first[:limit], len(newest_first) > limit
