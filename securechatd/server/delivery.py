"""Per-session delivery: the database is the queue, the session holds a small window.

An Outbox pushes `Deliver`s to one session, at most `window` unanswered at a
time, in seq order per conversation. A message committed while the session
is caught up in that conversation and has room is pushed straight from
memory; otherwise the conversation is marked *behind* and the messages are
read back from the database as answers free the window. So a slow or stalled
client costs a few integers per conversation, never a growing queue.

The answers are the acknowledgements: the user's delivered mark moves to
the highest seq below which this session has had every message answered.
A Deliver left unanswered when the connection drops was never marked, so
the next login pushes it again.

Encrypted conversations are delivered per device: a session bound to device
d is pushed `DeliverEncrypted`, with d's wrap only, for each message that has
a wrap for d, in seq order, through the same window; what is pending for d
is the wraps the database still holds for it, so a device that was offline
gets them at its next login, whatever the user's other devices answered.
An answer deletes d's wraps up to there (`acks.acknowledged`) and moves the
user's delivered mark as for any message. A session bound to no device gets
nothing of encrypted conversations.
"""

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from securechatd.store.base import StoreError

log = Logger()


class Outbox:
    """The delivery state of one session.

    next_seq[c]   the next seq of conversation c this session has to see
    behind        conversations whose next messages must be read from the database
    outstanding[c] seqs pushed to this session in c and not (successfully) answered
    own_from[c]   copies of the user's own messages are owed from this seq on
                  (those sent while the session was online); older own messages
                  are not pending for their sender
    encrypted     the encrypted conversations among them (only for a session bound to a device)
    """

    RETRY = 1.0  # seconds before reading again after a database error

    def __init__(self, session, store, marks, window, max_pending, clock, on_caught_up=None, acks=None):
        self.session = session
        self.clock = clock
        self.store = store
        self.marks = marks  # .delivered(username, conversation_id, seq): moves the mark (server/receipts.py)
        self.acks = acks  # .acknowledged(username, device_id, conversation_id, seq): server/encrypted.py
        self.device = session.device_id  # None: a session bound to no device
        self.window = window
        self.max_pending = max_pending
        self.on_caught_up = on_caught_up
        self.next_seq = {}
        self.own_from = {}
        self.encrypted = set()
        self.behind = {}  # an ordered set: round-robin over conversations
        self.outstanding = {}
        self.sent_here = {}  # id -> conversation of messages this session sent itself
        self.in_flight = 0
        self.closed = False
        self._ready = False
        self._pumping = False

    async def start(self):
        """Find where delivery stands for each conversation, then push what is pending."""
        for membership in await self.store.memberships(self.session.username, self.device):
            conversation = membership.conversation_id
            if membership.encrypted:
                self._start_encrypted(membership)
                continue
            # a member back after more than max_pending messages gets the newest ones pushed;
            # the older are in History (and count as delivered once the newer are answered)
            first = max(membership.delivered_seq, membership.last_seq - self.max_pending) + 1
            self.next_seq.setdefault(conversation, first)
            self.own_from.setdefault(conversation, membership.last_seq + 1)
            if membership.last_seq > membership.delivered_seq:
                self.behind[conversation] = None
        self._ready = True
        await self.pump()

    def _start_encrypted(self, membership):
        """Where delivery of an encrypted conversation stands for this session's device: its wraps."""
        if self.device is None:
            return
        conversation = membership.conversation_id
        self.encrypted.add(conversation)
        if membership.first_wrap is None:
            self.next_seq.setdefault(conversation, membership.last_seq + 1)
        else:
            self.next_seq.setdefault(conversation, membership.first_wrap)
            self.behind[conversation] = None

    def joined(self, conversation_id, last_seq, encrypted=False):
        """The user joined a conversation: everything after `last_seq` is for them."""
        if encrypted:
            if self.device is None:
                return
            self.encrypted.add(conversation_id)
        self.next_seq.setdefault(conversation_id, last_seq + 1)
        self.own_from.setdefault(conversation_id, last_seq + 1)

    def left(self, conversation_id):
        for table in (self.next_seq, self.own_from, self.behind, self.outstanding):
            table.pop(conversation_id, None)
        self.encrypted.discard(conversation_id)
        self.sent_here = {i: c for i, c in self.sent_here.items() if c != conversation_id}

    def message_committed(self, message, origin):
        """A new message in a conversation of this user; `origin` is the sending session."""
        conversation = message.conversation_id
        if self.closed:
            return
        if origin is self.session:
            self.sent_here[message.id] = conversation
        if conversation not in self.next_seq and self._ready:
            return  # not (yet) a conversation of this session's user
        if message.sender == self.session.username:
            self.own_from.setdefault(conversation, message.seq)
            self.own_from[conversation] = min(self.own_from[conversation], message.seq)
        caught_up = (
            self._ready
            and conversation not in self.behind
            and self.next_seq[conversation] == message.seq
        )
        if caught_up and (origin is self.session or self.in_flight < self.window):
            self._push(message)
            return
        self.behind[conversation] = None  # (read back from the database, in order, when there is room)

    def envelope_committed(self, message, origin):
        """A new EncryptedMessage (with every device's wrap) in a conversation of this user."""
        if self.closed or self.device is None:
            return
        conversation = message.conversation_id
        if conversation not in self.next_seq and self._ready:
            return  # not (yet) a conversation of this session's user
        self.encrypted.add(conversation)
        caught_up = (
            self._ready
            and conversation not in self.behind
            and self.next_seq[conversation] == message.seq
        )
        if self.device not in message.wraps or origin is self.session:
            if caught_up:
                self.next_seq[conversation] = message.seq + 1  # nothing for this device: past it
            return
        if caught_up and self.in_flight < self.window:
            self._push(message)
            return
        self.behind[conversation] = None
        if self.in_flight < self.window:  # (no answer may come to start the pump: own messages have no wrap here)
            self._start_pump()

    def _owed(self, message):
        if self.sent_here.pop(message.id, None) is not None:
            return False
        return (
            message.sender != self.session.username
            or message.seq >= self.own_from.get(message.conversation_id, 0)
        )

    def _push(self, message):
        conversation = message.conversation_id
        self.next_seq[conversation] = message.seq + 1
        if conversation in self.encrypted:
            answered = self.session.client.deliver_encrypted(message, message.wraps[self.device])
        elif not self._owed(message):
            return
        else:
            answered = self.session.client.deliver(message)
        self.in_flight += 1
        pending = self.outstanding.get(conversation)
        if pending is None:
            pending = self.outstanding[conversation] = set()
        pending.add(message.seq)
        answered.addCallback(self._answered, message)

    def _answered(self, ok, message):
        self.in_flight -= 1
        if self.closed:
            return
        conversation = message.conversation_id
        pending = self.outstanding.get(conversation)
        if not ok:
            # refused (or the connection went): the mark cannot pass it, so end the
            # session; the client logs in again and gets it, and what follows, again
            self.close()
            self.session.client.session_ended("a delivery was not acknowledged")
            return
        if pending is not None:
            pending.discard(message.seq)
            mark = (min(pending) if pending else self.next_seq[conversation]) - 1
            if message.sender != self.session.username:
                self.marks.delivered(self.session.username, conversation, mark)
            if conversation in self.encrypted:
                self.acks.acknowledged(self.session.username, self.device, conversation, mark)
        if self.in_flight <= self.window // 2:  # refill half a window per read, not one message
            self._start_pump()

    def _start_pump(self):
        if not self._pumping and self.behind:
            Deferred.fromCoroutine(self.pump()).addErrback(
                lambda failure: log.failure("delivery to {session} failed", failure, session=self.session)
            )

    async def pump(self):
        """Read what `behind` conversations hold from the database, within the window."""
        if self._pumping or not self._ready:
            return
        self._pumping = True
        try:
            while self.behind and self.in_flight < self.window and not self.closed:
                conversation = next(iter(self.behind))
                del self.behind[conversation]
                wanted = self.window - self.in_flight
                try:
                    if conversation in self.encrypted:
                        messages = await self.store.envelopes_for_device(
                            conversation, self.session.username, self.device, self.next_seq.get(conversation, 1), wanted
                        )
                    else:
                        messages = await self.store.messages_from(
                            conversation, self.next_seq.get(conversation, 1), wanted
                        )
                except StoreError as problem:
                    self.behind[conversation] = None  # still to do: try again shortly
                    log.warn("delivery to {session} waits: {problem}", session=self.session, problem=problem)
                    self.clock.callLater(self.RETRY, self._start_pump)
                    return
                if conversation not in self.next_seq:
                    continue  # left while we were reading
                for message in messages:
                    if message.seq >= self.next_seq[conversation]:  # not pushed live meanwhile
                        self._push(message)
                if len(messages) == wanted:
                    self.behind[conversation] = None  # more to read: back of the round
        finally:
            self._pumping = False
        if not self.behind and self.on_caught_up is not None and not self.closed:
            caught_up, self.on_caught_up = self.on_caught_up, None
            caught_up()

    def close(self):
        """The session ended: stop pushing; unanswered Delivers are pushed again next login."""
        self.closed = True
