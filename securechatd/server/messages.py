"""Messages: sending, history, read marks and receipts.

"What happens when Alice sends a message" starts at `MessageService.send`:
check membership, commit (which numbers the message), then hand it to every
online session of every member (server/delivery.py). Receipts are coalesced
marks: one `Receipt` covers every message of the conversation up to its seq.
"""

from functools import lru_cache

from twisted.internet.defer import gatherResults
from twisted.logger import Logger
from twisted.protocols import amp

from securechatd import commands
from securechatd.commands import InvalidArgument, MessageTooLarge, NoSuchConversation, RateLimited
from securechatd.server.accounts import utc
from securechatd.server.framing import encode_arguments
from securechatd.server.throttle import TokenBucket, retry_text
from securechatd.records import Receipt

log = Logger()

MAX_CLIENT_MSG_ID = 64
AMP_VALUE_LIMIT = 0xFFFF


def page_within_limit(items, spec):
    """The longest prefix of `items` whose AmpList encoding fits one AMP value."""
    encoder = amp.AmpList(spec)
    size = 0
    for count, item in enumerate(items):
        size += len(encoder.toStringProto([item], None))
        if size > AMP_VALUE_LIMIT:
            return items[:count]
    return items


def check_limit(limit, default, maximum):
    if limit is None:
        return default
    if not 1 <= limit <= maximum:
        raise InvalidArgument(f"limit must be from 1 to {maximum}.")
    return limit


@lru_cache(maxsize=256)
def receipt_box(receipt):
    """A Receipt push, encoded once for all the sessions it goes to."""
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


HISTORY_ITEM = dict(commands.History.response)[b"messages"].subargs
RECEIPT_ITEM = dict(commands.GetReceipts.response)[b"receipts"].subargs


class MessageService:
    def __init__(self, store, conversations, registry, clock, max_body=16 * 1024, rate=None):
        self.store = store
        self.conversations = conversations
        self.registry = registry
        self.clock = clock
        self.max_body = max_body
        self.rate = rate or TokenBucket(clock, 30, 10.0)
        self._delivered = {}  # (conversation_id, username) -> seq answered, not yet moved
        self._flush = None

    # -- sending -------------------------------------------------------------------

    def send(self, session, conversation_id, client_msg_id, body):
        """Deferred: the stored Message, only once it is committed.

        (Callbacks, not a coroutine: this runs for every message, and a
        coroutine costs about as much as the rest of the work around it.)
        """
        if not 1 <= len(client_msg_id) <= MAX_CLIENT_MSG_ID:
            raise InvalidArgument(f"client_msg_id must be 1 to {MAX_CLIENT_MSG_ID} characters.")
        if not body:
            raise InvalidArgument("A message needs a body.")
        if len(body.encode("utf-8")) > self.max_body:
            raise MessageTooLarge(f"A message body is at most {self.max_body} bytes of UTF-8.")
        conversation = self.conversations.loaded_member(conversation_id, session.username)
        if conversation is None:  # not loaded yet
            checked = self.conversations.member_of(conversation_id, session.username)
            return checked.addCallback(self._store, session, client_msg_id, body)
        return self._store(conversation, session, client_msg_id, body)

    def _store(self, conversation, session, client_msg_id, body):
        wait = self.rate.take(session.username)
        if wait:
            raise RateLimited(f"Too many messages; {retry_text(wait)}.")
        stored = self.store.add_message(
            conversation.id, session.username, client_msg_id, body, self.clock.seconds()
        )
        return stored.addCallback(self._stored, session, conversation.id)

    def _stored(self, stored, session, conversation_id):
        if stored is None:  # left the conversation while this was on its way
            raise NoSuchConversation(f"There is no conversation {conversation_id} of yours.")
        if stored.new:
            self.conversations.committed(conversation_id, stored.message.seq)
            self._fan_out(stored.message, session)
        else:
            self.rate.refund(session.username)  # a resend stores nothing: it costs nothing
        return stored.message

    def _fan_out(self, message, origin):
        conversation = self.conversations.cached(message.conversation_id)
        for member in conversation.members:
            for session in self.registry.sessions_of(member):
                if session.outbox is not None:
                    session.outbox.message_committed(message, origin)

    # -- reading -------------------------------------------------------------------

    async def history(self, session, conversation_id, before_seq, limit):
        """(messages in ascending seq, has_more): the newest `limit` before `before_seq`."""
        limit = check_limit(limit, 50, 500)
        if before_seq is not None and before_seq < 1:
            raise InvalidArgument("before_seq must be a positive number.")
        conversation = await self.conversations.member_of(conversation_id, session.username)
        newest_first = await self.store.messages_before(conversation.id, before_seq, limit + 1)
        has_more = len(newest_first) > limit
        items = [
            {
                "message_id": m.id,
                "seq": m.seq,
                "sender": m.sender,
                "body": m.body,
                "sent_at": utc(m.sent_at),
            }
            for m in newest_first[:limit]
        ]
        page = page_within_limit(items, HISTORY_ITEM)
        return page[::-1], has_more or len(page) < len(items)

    async def receipts(self, session, conversation_id, message_id, after=None):
        """(rows by name after `after`, has_more): cut to fit one AMP value, like History."""
        conversation = await self.conversations.member_of(conversation_id, session.username)
        message = await self.store.message(message_id)
        if message is None or message.conversation_id != conversation.id:
            raise InvalidArgument(f"There is no message {message_id} in this conversation.")
        rows = [
            {
                "username": name,
                "delivered_at": utc(delivered) if delivered is not None else None,
                "read_at": utc(read) if read is not None else None,
            }
            for name, delivered, read in await self.store.receipts(message)
            if after is None or name > after
        ]
        page = page_within_limit(rows, RECEIPT_ITEM)
        return page, len(page) < len(rows)

    # -- marks ---------------------------------------------------------------------

    async def mark_read(self, session, conversation_id, seq, private):
        if seq < 0:
            raise InvalidArgument("seq must not be negative.")
        conversation = await self.conversations.member_of(conversation_id, session.username)
        last_seq = self.conversations.cached(conversation.id).last_seq
        receipt = await self._move(conversation.id, session.username, "read", min(seq, last_seq), private)
        if receipt is not None:
            for own in self.registry.sessions_of(session.username):
                if own is not session:
                    self._push_receipt(own, receipt)

    def delivered(self, username, conversation_id, seq):
        """A session of `username` answered every Deliver up to `seq` (called by Outboxes).

        Answers arriving in the same reactor turn move each mark once, and
        send one Receipt for all the messages they cover.
        """
        key = (conversation_id, username)
        if seq > self._delivered.get(key, 0):
            self._delivered[key] = seq
        if self._flush is None:
            self._flush = self.clock.callLater(0, self._move_delivered)

    def _move_delivered(self):
        self._flush = None
        marks, self._delivered = self._delivered, {}
        for (conversation_id, username), seq in marks.items():
            moved = self._move(conversation_id, username, "delivered", seq, False)
            moved.addErrback(lambda failure, user=username: log.failure("delivered mark of {user}", failure, user=user))

    def _move(self, conversation_id, username, state, seq, private):
        """Deferred: move a mark; the senders it newly covers get Receipts. The `state` Receipt, if it moved.

        (Callbacks, not a coroutine: under load a delivered mark moves every few messages.)
        """
        now = self.clock.seconds()
        moving = self.store.move_mark(conversation_id, username, state, seq, now)
        return moving.addCallback(self._moved, conversation_id, username, state, private, now)

    def _moved(self, moves, conversation_id, username, state, private, now):
        moved, keeping = None, []
        for move in moves:
            receipt = Receipt(conversation_id, username, move.state, move.new, now)
            if not (private and move.state == "read"):  # being delivered is never private
                keeping += self.send_receipt(move.senders, receipt)
            if move.state == state:
                moved = receipt
        if not keeping:
            return moved
        kept = gatherResults(keeping, consumeErrors=True)
        return kept.addCallbacks(lambda _: moved, lambda failure: failure.value.subFailure)

    def send_receipt(self, recipients, receipt):
        """Push `receipt` to every session of `recipients`; keep it for those offline.

        A push that is not answered (the connection drops first) keeps it too,
        for the next login. Returns [Deferred of keeping it] if anyone was offline, else [].
        """
        offline = []
        for recipient in recipients:
            sessions = self.registry.sessions_of(recipient)
            for session in sessions:
                pushed = self._push_receipt(session, receipt)
                pushed.addCallback(self._keep_unless_answered, recipient, receipt)
            if not sessions:
                offline.append(recipient)
        return [self.store.save_pending_receipt(offline, receipt)] if offline else []

    def _keep_unless_answered(self, answered, recipient, receipt):
        if not answered:
            kept = self.store.save_pending_receipt([recipient], receipt)
            kept.addErrback(lambda failure: log.failure("receipt for {user}", failure, user=recipient))

    @staticmethod
    def _push_receipt(session, receipt):
        return session.push_encoded(commands.Receipt, receipt_box(receipt))

    async def push_pending_receipts(self, session):
        """At login, after the pending messages: the receipts that came while away."""
        for receipt in await self.store.take_pending_receipts(session.username):
            pushed = self._push_receipt(session, receipt)
            pushed.addCallback(self._keep_unless_answered, session.username, receipt)
