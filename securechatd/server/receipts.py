"""Acknowledgements, read marks and receipts.

A member's delivered and read marks say "every message of this conversation
up to seq". Outboxes (server/delivery.py) report answered Delivers here;
MarkRead moves the read mark. A mark that moves sends one coalesced Receipt
to the senders it newly covers (kept in the database for those offline, and
for pushes that go unanswered).
"""

from twisted.internet.defer import gatherResults
from twisted.logger import Logger

from securechatd.commands import InvalidArgument
from securechatd.records import Receipt
from securechatd.server.policy import deferred

log = Logger()

RECEIPTS_PAGE = 100  # rows of GetReceipts per page (cut further to fit one AMP value)


class ReceiptService:
    def __init__(self, store, conversations, registry, clock):
        self.store = store
        self.conversations = conversations
        self.registry = registry
        self.clock = clock
        self._delivered = {}  # (conversation_id, username) -> seq answered, not yet moved
        self._flush = None

    @deferred
    async def mark_read(self, session, conversation_id, seq, private):
        if seq < 0:
            raise InvalidArgument("seq must not be negative.")
        conversation = await self.conversations.member_of(conversation_id, session.username)
        last_seq = self.conversations.cached(conversation.id).last_seq
        receipt = await self._move(conversation.id, session.username, "read", min(seq, last_seq), private)
        if receipt is not None:  # the user's other devices agree on what is unread
            self.registry.tell([session.username], lambda client: client.receipt(receipt), exclude=session)

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
                keeping += self.send(move.senders, receipt)
            if move.state == state:
                moved = receipt
        if not keeping:
            return moved
        kept = gatherResults(keeping, consumeErrors=True)
        return kept.addCallbacks(lambda _: moved, lambda failure: failure.value.subFailure)

    def send(self, recipients, receipt):
        """Push `receipt` to every session of `recipients`; keep it for those offline.

        A push that is not answered (the connection drops first) keeps it too,
        for the next login. Returns [Deferred of keeping it] if anyone was offline, else [].
        """
        told = self.registry.tell(recipients, lambda client: client.receipt(receipt))
        for recipient, answers in told.items():
            for answered in answers:
                answered.addCallback(self._keep_unless_answered, recipient, receipt)
        offline = [recipient for recipient in recipients if recipient not in told]
        return [self.store.save_pending_receipt(offline, receipt)] if offline else []

    def _keep_unless_answered(self, answered, recipient, receipt):
        if not answered:
            kept = self.store.save_pending_receipt([recipient], receipt)
            kept.addErrback(lambda failure: log.failure("receipt for {user}", failure, user=recipient))

    @deferred
    async def push_pending(self, session):
        """At login, after the pending messages: the receipts that came while away."""
        for receipt in await self.store.take_pending_receipts(session.username):
            answered = session.client.receipt(receipt)
            answered.addCallback(self._keep_unless_answered, session.username, receipt)

    @deferred
    async def receipts(self, session, conversation_id, message_id, after=None):
        """(rows (username, delivered_at, read_at) by name after `after`, has_more)."""
        conversation = await self.conversations.member_of(conversation_id, session.username)
        message = await self.store.message(message_id)
        if message is None or message.conversation_id != conversation.id:
            raise InvalidArgument(f"There is no message {message_id} in this conversation.")
        rows = await self.store.receipts(message, after, RECEIPTS_PAGE + 1)
        return rows[:RECEIPTS_PAGE], len(rows) > RECEIPTS_PAGE
