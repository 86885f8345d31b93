"""ChatClient: the securechatd client library for any Twisted program.

It connects over TLS (the CA file and host name are verified before
anything is sent), calls every command of the protocol as a method
returning a Deferred of typed results (failures are the typed errors of
securechatd.commands), and hands server pushes to callbacks. A `Deliver` is
acknowledged only after `on_deliver` has handled it.

When the connection drops it reconnects with backoff, logs in again with
its resume token (or, if the application let it keep one, the password),
and resends every SendMessage that had no answer with the same
client_msg_id; the server drops duplicates, so nothing is lost or doubled.
"""

import os
import random
import uuid
from dataclasses import dataclass, fields
from datetime import datetime, timezone

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionClosed
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp
from zope.interface import implementer

from securechatd import commands
from securechatd.commands import BadCredentials
from securechatd.client.seen import SeenMessages
from securechatd.tls import client_options

log = Logger()


def _record(cls, values):
    """A dataclass from an AMP dict, ignoring keys it does not know (newer servers)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


@dataclass(frozen=True)
class LoggedIn:
    username: str
    session_id: str
    server_time: datetime
    resume_token: str


@dataclass(frozen=True)
class Sent:
    message_id: int
    seq: int
    sent_at: datetime
    client_msg_id: str = ""


@dataclass(frozen=True)
class Message:
    """A message, pushed (Deliver) or read back (History)."""

    message_id: int
    seq: int
    sender: str
    body: str
    sent_at: datetime
    conversation_id: int = 0


@dataclass(frozen=True)
class HistoryPage:
    messages: tuple
    has_more: bool


@dataclass(frozen=True)
class Conversation:
    conversation_id: int
    kind: str
    members: tuple
    title: str | None = None
    last_seq: int = 0
    unread: int = 0


@dataclass(frozen=True)
class Presence:
    username: str
    status: str
    note: str | None = None
    last_seen: datetime | None = None
    at: datetime | None = None


@dataclass(frozen=True)
class Receipt:
    conversation_id: int
    username: str
    state: str
    seq: int
    at: datetime


@dataclass(frozen=True)
class ReceiptRow:
    username: str
    delivered_at: datetime | None = None
    read_at: datetime | None = None


class TLSHandshakeFailed(Exception):
    """The server could not be verified (wrong CA, host name or an expired certificate)."""


@implementer(IHandshakeListener)
class ClientProtocol(amp.AMP):
    """One connection: answers the server's pushes by calling the client's callbacks."""

    def __init__(self, client):
        super().__init__()
        self.client = client
        self.handshake = Deferred()
        self.closed = Deferred()

    def handshakeCompleted(self):
        self.handshake.callback(self)

    def connectionLost(self, reason):
        if not self.handshake.called:
            self.handshake.errback(TLSHandshakeFailed(reason.getErrorMessage()))
        super().connectionLost(reason)
        self.client._connection_lost(self, reason)
        self.closed.callback(None)

    @commands.Deliver.responder
    def deliver(self, **message):
        return self.client._deliver(_record(Message, message)).addCallback(lambda _: {})

    @commands.Receipt.responder
    def receipt(self, **receipt):
        self.client.on_receipt(_record(Receipt, receipt))
        return {}

    @commands.PresenceChanged.responder
    def presence_changed(self, **presence):
        self.client.on_presence(_record(Presence, presence))
        return {}

    @commands.ConversationUpdated.responder
    def conversation_updated(self, members, **conversation):
        self.client.on_conversation(_record(Conversation, dict(conversation, members=tuple(members))))
        return {}

    @commands.Ping.responder
    def ping(self):
        return {"server_time": datetime.fromtimestamp(self.client.reactor.seconds(), timezone.utc)}


class _Factory(Factory):
    noisy = False

    def __init__(self, client):
        self.client = client

    def buildProtocol(self, addr):
        return ClientProtocol(self.client)


class ChatClient:
    """A logged-in (or not yet) connection to securechatd that survives reconnects.

    Set the callbacks you need: on_deliver(Message) (may return a Deferred:
    the message is acknowledged when it fires), on_receipt(Receipt),
    on_presence(Presence), on_conversation(Conversation),
    on_disconnected(reason), on_reconnected(LoggedIn), on_logged_out(reason).
    """

    def __init__(
        self, host, port, ca_path, *, hostname=None, client_name=None, reactor=None, reconnect=True, state_directory=None
    ):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.client_name = client_name
        self.reconnect = reconnect
        self._endpoint = wrapClientTLS(
            client_options(ca_path, hostname or host), HostnameEndpoint(reactor, host, port, timeout=10)
        )
        self.state_directory = state_directory  # where this installation keeps what it has seen, per user
        self.seen = SeenMessages()
        self._save = None
        self.username = None
        self.resume_token = None
        self._password = None
        self._unanswered = {}  # client_msg_id -> (conversation_id, body, Deferred)
        self._in_flight = set()  # client_msg_ids sent on the current connection
        self._current = None  # the latest connection, ready or not
        self._protocol = None  # the current connection, once verified (and logged in again)
        self._waiting = []  # Deferreds of calls made while disconnected
        self._retry = None
        self._delay = self.INITIAL_DELAY
        self._closed = False
        self.on_deliver = lambda message: None
        self.on_receipt = lambda receipt: None
        self.on_presence = lambda presence: None
        self.on_conversation = lambda conversation: None
        self.on_disconnected = lambda reason: None
        self.on_reconnected = lambda login: None
        self.on_logged_out = lambda reason: None

    INITIAL_DELAY = 0.5
    MAX_DELAY = 30.0

    # -- connection ------------------------------------------------------------

    def connect(self):
        """Deferred: connected and the server verified; fails (TLSHandshakeFailed, ...) at once."""
        return Deferred.fromCoroutine(self._dial(first=True)).addCallback(lambda _: self)

    async def _dial(self, first=False):
        protocol = self._current = await self._endpoint.connect(_Factory(self))
        await protocol.handshake
        login = None
        if not first and self.username is not None:
            login = await self._log_in_again(protocol)
        if self._closed:
            protocol.transport.loseConnection()
            raise ConnectionClosed("The client was closed.")
        self._protocol, self._delay = protocol, self.INITIAL_DELAY
        if login is not None:
            self.on_reconnected(login)
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.callback(protocol)
        for client_msg_id in list(self._unanswered):
            self._send(protocol, client_msg_id)
        return protocol

    def _redial(self):
        self._retry = None
        dialled = Deferred.fromCoroutine(self._dial())
        dialled.addErrback(lambda failure: self._schedule_redial())

    def _schedule_redial(self):
        if self._closed or not self.reconnect or self._retry is not None:
            return
        self._retry = self.reactor.callLater(self._delay * random.uniform(0.8, 1.2), self._redial)
        self._delay = min(self._delay * 2, self.MAX_DELAY)

    async def _log_in_again(self, protocol):
        arguments = {"username": self.username}
        if self.client_name is not None:
            arguments["client_name"] = self.client_name
        try:
            answer = await protocol.callRemote(commands.Resume, resume_token=self.resume_token, **arguments)
        except BadCredentials:
            if self._password is None:
                self.username = self.resume_token = None
                self.on_logged_out("The session could not be resumed; log in again.")
                return None
            answer = await protocol.callRemote(commands.Login, password=self._password, **arguments)
        return self._logged_in(answer)

    def _connection_lost(self, protocol, reason):
        if protocol is self._protocol:
            self._protocol = None
            self.on_disconnected(reason)
            self._schedule_redial()

    def _connected(self):
        """The ready protocol: at once if there is one, else when the connection is back."""
        if self._protocol is not None:
            return succeed(self._protocol)
        if self._closed or not self.reconnect:
            return fail(ConnectionClosed("Not connected to the server."))
        waiting = Deferred()
        self._waiting.append(waiting)
        return waiting

    def close(self):
        """Disconnect for good; Deferred firing when closed."""
        self._closed = True
        if self._save is not None:
            self._save.cancel()
            self._save_seen()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        failed = ConnectionClosed("The client was closed.")
        for _, _, answer in self._unanswered.values():
            answer.errback(failed)
        self._unanswered.clear()
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.errback(failed)
        protocol, self._protocol = self._current, None
        if protocol is None or protocol.transport is None:
            return succeed(None)
        closed = protocol.closed
        protocol.transport.loseConnection()
        return closed

    def call(self, command, **arguments):
        """Deferred of the answer dict to `command`, once connected."""
        return self._connected().addCallback(lambda protocol: protocol.callRemote(command, **arguments))

    # -- accounts --------------------------------------------------------------

    def register(self, username, password):
        return self.call(commands.Register, username=username, password=password).addCallback(
            lambda answer: answer["username"]
        )

    def _logged_in(self, answer):
        login = _record(LoggedIn, answer)
        if login.username != self.username:
            path = None
            if self.state_directory is not None:
                path = os.path.join(self.state_directory, f"{login.username}.seen.json")
            self.seen = SeenMessages(path)
        self.username, self.resume_token = login.username, login.resume_token
        return login

    SAVE_AFTER = 1.0  # seconds: what was seen is written at most this often

    def _deliver(self, message):
        """Hand a pushed message to on_deliver once: a repeat (delivery is at least once) is only acknowledged."""
        if not self.seen.is_new(message.conversation_id, message.seq):
            return succeed(None)
        delivered = maybeDeferred(self.on_deliver, message)
        return delivered.addCallback(self._handed_over, message)

    def _handed_over(self, result, message):
        self.seen.handed_over(message.conversation_id, message.seq)
        if self._closed:  # (a push that arrived while closing)
            self.seen.save()
        elif self._save is None:
            self._save = self.reactor.callLater(self.SAVE_AFTER, self._save_seen)
        return result

    def _save_seen(self):
        self._save = None
        self.seen.save()

    def login(self, username, password, remember_password=False):
        """Deferred LoggedIn; `remember_password` keeps it in memory to log in again if a resume fails."""
        arguments = {"username": username, "password": password}
        if self.client_name is not None:
            arguments["client_name"] = self.client_name

        def logged_in(answer):
            self._password = password if remember_password else None
            return self._logged_in(answer)

        return self.call(commands.Login, **arguments).addCallback(logged_in)

    def resume(self, username, resume_token):
        arguments = {"username": username, "resume_token": resume_token}
        if self.client_name is not None:
            arguments["client_name"] = self.client_name
        return self.call(commands.Resume, **arguments).addCallback(self._logged_in)

    def logout(self):
        def logged_out(_):
            self.username = self.resume_token = self._password = None

        return self.call(commands.Logout).addCallback(logged_out)

    def change_password(self, old_password, new_password):
        changed = self.call(commands.ChangePassword, old_password=old_password, new_password=new_password)

        def remember(_):
            if self._password is not None:
                self._password = new_password

        return changed.addCallback(remember)

    def ping(self):
        return self.call(commands.Ping).addCallback(lambda answer: answer["server_time"])

    # -- presence and users ----------------------------------------------------

    def set_presence(self, status, note=None):
        return self.call(commands.SetPresence, status=status, note=note).addCallback(lambda _: None)

    def get_presence(self, usernames):
        return self.call(commands.GetPresence, usernames=list(usernames)).addCallback(
            lambda answer: [_record(Presence, row) for row in answer["presence"]]
        )

    def list_users(self, prefix=None, limit=None):
        """Deferred [(username, status)]."""
        return self.call(commands.ListUsers, prefix=prefix, limit=limit).addCallback(
            lambda answer: [(row["username"], row["status"]) for row in answer["users"]]
        )

    # -- conversations ---------------------------------------------------------

    def create_conversation(self, members, title=None):
        """Deferred (conversation_id, created)."""
        return self.call(commands.CreateConversation, members=list(members), title=title).addCallback(
            lambda answer: (answer["conversation_id"], answer["created"])
        )

    async def _all_conversations(self):
        conversations, after = [], None
        while True:
            page = await self.call(commands.ListConversations, after_id=after)
            conversations += [
                _record(Conversation, dict(row, members=tuple(row["members"])))
                for row in page["conversations"]
            ]
            if not page.get("has_more") or not page["conversations"]:
                return conversations
            after = conversations[-1].conversation_id

    def list_conversations(self):
        """Deferred [Conversation], every page of them."""
        return Deferred.fromCoroutine(self._all_conversations())

    def add_members(self, conversation_id, members):
        return self.call(commands.AddMembers, conversation_id=conversation_id, members=list(members)).addCallback(
            lambda _: None
        )

    def leave_conversation(self, conversation_id):
        return self.call(commands.LeaveConversation, conversation_id=conversation_id).addCallback(lambda _: None)

    # -- messages --------------------------------------------------------------

    def send_message(self, conversation_id, body, client_msg_id=None):
        """Deferred Sent, answered once committed; resent across reconnects until answered."""
        client_msg_id = client_msg_id or uuid.uuid4().hex
        answer = Deferred()
        self._unanswered[client_msg_id] = (conversation_id, body, answer)
        self._connected().addCallback(self._send, client_msg_id)
        return answer

    def _send(self, protocol, client_msg_id):
        """Send (or resend) one message unless it is on its way already."""
        if client_msg_id not in self._unanswered or client_msg_id in self._in_flight:
            return
        self._in_flight.add(client_msg_id)
        conversation_id, body, _ = self._unanswered[client_msg_id]
        sent = protocol.callRemote(
            commands.SendMessage, conversation_id=conversation_id, client_msg_id=client_msg_id, body=body
        )
        sent.addCallbacks(self._answered, self._not_answered, (client_msg_id,), None, (client_msg_id,))

    def _answered(self, answer, client_msg_id):
        self._in_flight.discard(client_msg_id)
        pending = self._unanswered.pop(client_msg_id, None)
        if pending is not None:
            pending[2].callback(_record(Sent, dict(answer, client_msg_id=client_msg_id)))

    def _not_answered(self, failure, client_msg_id):
        self._in_flight.discard(client_msg_id)
        if failure.check(ConnectionClosed) and self.reconnect and not self._closed:
            return  # resent when the connection is back
        pending = self._unanswered.pop(client_msg_id, None)
        if pending is not None:
            pending[2].errback(failure)

    def history(self, conversation_id, before_seq=None, limit=None):
        page = self.call(commands.History, conversation_id=conversation_id, before_seq=before_seq, limit=limit)
        return page.addCallback(
            lambda answer: HistoryPage(
                tuple(_record(Message, dict(row, conversation_id=conversation_id)) for row in answer["messages"]),
                answer["has_more"],
            )
        )

    def mark_read(self, conversation_id, seq, private=False):
        return self.call(commands.MarkRead, conversation_id=conversation_id, seq=seq, private=private).addCallback(
            lambda _: None
        )

    def get_receipts(self, conversation_id, message_id):
        return self.call(commands.GetReceipts, conversation_id=conversation_id, message_id=message_id).addCallback(
            lambda answer: [_record(ReceiptRow, row) for row in answer["receipts"]]
        )

