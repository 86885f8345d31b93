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

End-to-end encryption (docs/E2EE.md) happens inside, when the client has a
`state_directory`: there it keeps this installation's device of the user
(`<user>.device`, client/device_file.py). At the first login it makes the
device and starts the user's device chain with it, or, if the user has
devices already, waits to be added by one of them (link_request() here,
link_new_device() there); it logs in bound to the device, keeps its prekeys
(100 one-time prekeys, refilled below 25; the signed prekey rotated weekly),
and for encrypted conversations sends and receives plain text as for any
other: keys, sessions, chains and signed membership states are checked and
kept by client/crypto.py. A message that cannot be decrypted is still
handed to on_deliver, with body None and `problem` saying why, and raises
on_alarm. Seqs of an encrypted conversation this device was not pushed are
looked up in its history; messages the server dropped raise the alarm
`gap` (docs/E2EE.md, "Gaps in seq"). See ChatClient's docstring for the
callbacks and methods.
"""

import hashlib
import os
import random
import re
import uuid
from collections import deque
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from OpenSSL import SSL
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionClosed
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from securechatd import commands
from securechatd.accountlog import ACTION_LABEL, NONCE_BYTES, action_fields
from securechatd.commands import (
    BadCredentials,
    InvitationRequired,
    MessageTooLarge,
    NoSuchDevice,
    NotAllowed,
    SecondFactorRequired,
)
from securechatd.client.account_log import AccountLogCheck
from securechatd.client.crypto import (  # noqa: F401 (DeviceInfo, LinkError: for apps)
    Alarm,
    DeviceInfo,
    EncryptionUnavailable,
    EndToEnd,
    LinkError,
    Problem,
    Undecryptable,
)
from securechatd.client.device_file import DeviceFileError
from securechatd.client.seen import SeenMessages
from securechatd.e2ee.membership import MembershipError, is_user_name
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
    max_message_bytes: int | None = None  # the server's limit on a body (None: an older server did not say)


@dataclass(frozen=True)
class Sent:
    message_id: int
    seq: int
    sent_at: datetime
    client_msg_id: str = ""
    unreached: tuple = ()  # (encrypted) device ids of members' devices it could not be encrypted for (no prekeys)
    mode: str | None = None  # (encrypted) attestable (signed) or deniable
    n: int | None = None  # (encrypted) its link in the conversation's chain, from the server's receipt
    chain: str | None = None  # (encrypted) "verified", "unchecked" or "broken": see Message


@dataclass(frozen=True)
class Message:
    """A message, pushed (Deliver, DeliverEncrypted) or read back (History, HistoryEncrypted).

    An encrypted message that could not be decrypted has body None and
    `problem` naming the step that failed (a crypto.Problem value), with
    `problem_detail` saying more; it was reported to on_alarm too.

    An encrypted message also says what the conversation's chain says of
    it (client/transcripts.py): `mode` (attestable: its sender's device
    signed it; deniable: not), `n` its link in the chain, and `chain`:
    "verified" (every check passed), "unchecked" (nothing failed, but not
    all could be checked: no link came, or the server keeps no chains) or
    "broken" (`chain_problems` names the alarms raised: the message is shown
    all the same).
    """

    message_id: int
    seq: int
    sender: str
    body: str | None
    sent_at: datetime
    conversation_id: int = 0
    encrypted: bool = False
    sender_device: str | None = None
    problem: str | None = None
    problem_detail: str | None = None
    mode: str | None = None
    n: int | None = None
    chain: str | None = None
    chain_problems: tuple = ()  # alarm kinds


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
    encrypted: bool | None = None  # as the server says; the library holds the signed member list (members())


@dataclass(frozen=True)
class Presence:
    username: str
    status: str
    note: str | None = None
    last_seen: datetime | None = None
    at: datetime | None = None


@dataclass(frozen=True)
class Invitation:
    """An invitation of the user to a group (ListInvitations, the Invited push), answered with
    answer_invitation(); `accepted`: accepted, waiting for a member's signed state (encrypted groups)."""

    conversation_id: int
    kind: str
    inviter: str
    title: str | None = None
    invited_at: datetime | None = None  # (the Invited push does not say: it is now)
    accepted: bool = False
    encrypted: bool | None = None


@dataclass(frozen=True)
class GroupInvitation:
    """Someone invited to a group the user belongs to (GetInvitations)."""

    username: str
    inviter: str
    invited_at: datetime
    accepted: bool  # accepted, waiting for a member's signed state (encrypted groups)


@dataclass(frozen=True)
class Privacy:
    """The user's own privacy settings (SetPrivacy); who sees presence at all is the operator's setting."""

    hide_last_seen: bool
    appear_offline: bool


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


class MalformedAnswer(Exception):
    """The server answered what no securechatd server sends (a session id that is not 32 hex digits):
    refused rather than shown or sent back."""


class RefusedAtTLS(ConnectionClosed):
    """The server ended the connection with a TLS alert after the handshake: it refused this client's
    certificate (none given where one is required, another CA's, expired). `alert` is OpenSSL's text."""

    def __init__(self, alert):
        super().__init__(f"The server refused the connection at TLS ({alert}).")
        self.alert = alert


_SESSION_ID = re.compile(r"[0-9a-f]{32}\Z")


def _checked_sessions(rows):
    """ListSessions' rows, each session id the 32 lower-case hex digits EndSession takes, or MalformedAnswer."""
    for row in rows:
        if not _SESSION_ID.match(row["session_id"]):
            raise MalformedAnswer("The server listed a session whose id is not 32 hex digits.")
    return list(rows)


def _refused_at_tls(reason):
    """A connection lost to a TLS alert (the failure of every call on it) as RefusedAtTLS; others as they are."""
    if not reason.check(SSL.Error):
        return reason
    args = reason.value.args
    errors = args[0] if args and isinstance(args[0], list) else []  # OpenSSL's (library, function, reason)
    return Failure(RefusedAtTLS("; ".join(str(entry[-1]) for entry in errors if entry) or str(reason.value)))


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
        else:  # (with TLS 1.3 the server checks a client certificate after the client's handshake is done)
            reason = _refused_at_tls(reason)
            if reason.check(RefusedAtTLS):  # the certificate would be refused again: no reconnecting, nothing
                self.client.reconnect = False  # waits for one (set before the calls on this connection fail)
        super().connectionLost(reason)
        self.client._connection_lost(self, reason)
        self.closed.callback(None)

    @commands.Deliver.responder
    def deliver(self, **message):
        return self.client._deliver(_record(Message, message)).addCallback(lambda _: {})

    @commands.DeliverEncrypted.responder
    def deliver_encrypted(self, **message):
        return self.client._deliver_encrypted(message).addCallbacks(lambda _: {}, self._unanswerable)

    @staticmethod
    def _unanswerable(failure):
        """A push that could not be handled because the connection is gone is not answered (it comes again)."""
        if failure.check(ConnectionClosed):
            return Deferred()
        return failure

    @commands.DevicesChanged.responder
    def devices_changed(self, username):
        self.client._devices_changed(username)
        return {}

    @commands.TranscriptSigned.responder
    def transcript_signed(self, conversation_id, username, head):
        return self.client._transcript_signed(conversation_id, username, head).addCallback(lambda _: {})

    @commands.Receipt.responder
    def receipt(self, **receipt):
        self.client.on_receipt(_record(Receipt, receipt))
        return {}

    @commands.PresenceChanged.responder
    def presence_changed(self, **presence):
        self.client.on_presence(_record(Presence, presence))
        return {}

    @commands.ModeChanged.responder
    def mode_changed(self, conversation_id):
        if self.client.e2ee is not None:  # the chain is fetched (and the new mode seen) before the next message
            self.client.e2ee.moved(conversation_id)
        return {}

    @commands.ConversationUpdated.responder
    def conversation_updated(self, members, **conversation):
        self.client._conversation_updated(_record(Conversation, dict(conversation, members=tuple(members))))
        return {}

    @commands.Invited.responder
    def invited(self, **invitation):
        self.client.on_invited(_record(Invitation, invitation))
        return {}

    @commands.InvitationAccepted.responder
    def invitation_accepted(self, conversation_id, username):
        self.client._invitation_accepted(conversation_id, username)
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


@dataclass(eq=False)
class _Outgoing:
    """A message on its way: resent with the same client_msg_id (and, encrypted, the same envelope) until answered."""

    conversation_id: int
    body: str = field(repr=False)
    answer: Deferred = field(repr=False)
    encrypted: bool | None = None  # None: not known yet
    sealed: object = field(default=None, repr=False)  # crypto.Sealed: not encrypted again unless refused
    reseals: int = 0


class _Sequence:
    """What this device was pushed of one encrypted conversation, beyond SeenMessages' highest seq handed over.

    Gap detection (docs/E2EE.md, "Gaps in seq"): the server numbers each
    conversation's messages 1, 2, 3, … and pushes a device every one that
    has a wrap for it, in seq order. A push whose seq jumps past the highest
    handed over leaves seqs this device has not seen; those are checked
    (ChatClient._check_gap). Kept in memory only: after a restart the
    highest seq handed over (SeenMessages' file) is where checking resumes.
    """

    def __init__(self):
        self.missing = set()  # seqs below the highest handed over that were never pushed: shown if they still come
        self.own = set()  # seqs of this device's own messages (it is pushed none of them), above the highest
        self.failed = {}  # seq -> digests of pushes at that seq that could not be opened (not shown twice)

    def forget_below(self, highest):
        self.own = {seq for seq in self.own if seq > highest}
        kept = sorted(seq for seq in self.failed if seq > highest or seq in self.missing)[-MAX_FAILED_KEPT:]
        self.failed = {seq: self.failed[seq] for seq in kept}
        if len(self.missing) > MAX_GAP_CHECKED:
            self.missing = set(sorted(self.missing)[-MAX_GAP_CHECKED:])


MAX_GAP_CHECKED = 1000  # skipped seqs looked up in history at most (more: the gap alarm says so, unchecked)
MAX_FAILED_KEPT = 1000
MAX_SHOWN_KEPT = 10_000  # message ids remembered with their seq


def _push_digest(item):
    """What identifies one push of an encrypted message (a later push of the same seq with other bytes is new)."""
    parts = [str(item["message_id"]).encode(), item["header"], item["body"], item.get("wrap") or b""]
    return hashlib.sha256(b"".join(len(part).to_bytes(4, "big") + part for part in parts)).digest()


def _seq_ranges(seqs):
    """Sorted seqs as text: `4`, `4-6, 9`."""
    ranges = []
    for seq in seqs:
        if ranges and ranges[-1][1] == seq - 1:
            ranges[-1][1] = seq
        else:
            ranges.append([seq, seq])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def _strangers(refused, names):
    """Those of `names` an INVITATION_REQUIRED refusal of AddMembers names, to invite instead (docs/PROTOCOL.md,
    "Invitations": its description starts "NAME, NAME share no conversation with you")."""
    listed = re.match(r"(.+?) shares? no conversation with you:", str(refused))
    return [name for name in listed.group(1).split(", ") if name in names] if listed else []


MAX_RESEALS = 2  # times a message the server refused because the membership or a device changed is sealed again


def _owner_of_refused_device(chains, error):
    """[the user] whose device a NO_SUCH_DEVICE refusal of SendEncrypted names (its description names the
    device, docs/PROTOCOL.md), as kept chains list it; None (every chain) if that cannot be told."""
    found = re.search(r"\b[0-9a-f]{32}\b", str(error))
    owner = found and chains.owner(found.group(0))
    return [owner] if owner else None


def _seal_again(error):
    """True for a refusal of SendEncrypted after which the message is sealed again, for the members and devices now.

    (It was not stored: the membership changed since the header was made, or
    a device it was wrapped for is not a current device of a member.)
    """
    return isinstance(error, NoSuchDevice) or (isinstance(error, NotAllowed) and "membership" in str(error))
BOX_BUDGET = 60_000  # bytes of an AMP box we fill with wraps (a value holds 65,535; the server takes boxes to 66 KiB)


class ChatClient:
    """A logged-in (or not yet) connection to securechatd that survives reconnects.

    Set the callbacks you need: on_deliver(Message) (may return a Deferred:
    the message is acknowledged when it fires), on_receipt(Receipt),
    on_presence(Presence), on_conversation(Conversation),
    on_disconnected(reason), on_reconnected(LoggedIn), on_logged_out(reason),
    and for end-to-end encryption on_alarm(kind, user, detail) (something the
    user must know: a fork of a device chain, a member the server added on
    its own, a message that cannot be decrypted, messages the server
    dropped (`gap`), ...; kinds are the values
    of crypto.Alarm and crypto.Problem; `user` may be None) and
    on_devices_changed(user, added, removed) (hex device ids of a user whose
    devices changed since last seen). For verifiable conversations (docs/CLIENT.md):
    on_mode(conversation_id, mode, actor) when a member's signed mode event
    takes effect, and on_transcript_signed(transcripts.TranscriptSigned) when
    a member signs the transcript (reads: "read by bob, transcript verified
    up to #n").

    With a `state_directory` (and `encryption` left on) the client is one
    device of the user it logs in as; `clock` (default: the reactor) dates
    prekey rotation and message headers. `client_cert` and `client_key`
    (PEM files) present a client certificate (mutual TLS), for a server
    that requires or allows them: it names the only account this connection
    may log in as.
    """

    def __init__(
        self,
        host,
        port,
        ca_path,
        *,
        hostname=None,
        client_name=None,
        reactor=None,
        reconnect=True,
        state_directory=None,
        clock=None,
        encryption=True,
        client_cert=None,
        client_key=None,
    ):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.clock = clock or reactor
        self.client_name = client_name
        self.reconnect = reconnect
        self._endpoint = wrapClientTLS(
            client_options(ca_path, hostname or host, client_cert=client_cert, client_key=client_key),
            HostnameEndpoint(reactor, host, port, timeout=10),
        )
        self.state_directory = state_directory  # where this installation keeps what it has seen, per user
        self.encryption = encryption and state_directory is not None
        self.e2ee = None  # crypto.EndToEnd: this installation's device of the logged-in user
        self.device_problem = None  # why the device file could not be used, if it could not
        self.seen = SeenMessages()
        self._save = None
        self.username = None
        self.resume_token = None
        self._password = None
        self._presence = None  # (status, note) last set, if not plain online: restored at every reconnect
        self.max_message_bytes = None  # the server's limit on a body, from its Login answer
        self._bound = False  # the session is bound to this installation's device
        self._signer = None  # that device's keys (keys.Device), to sign account actions
        self._unanswered = {}  # client_msg_id -> _Outgoing
        self._in_flight = set()  # client_msg_ids of plaintext messages sent on the current connection
        self._queues = {}  # conversation_id -> deque of client_msg_ids of encrypted messages, sent one at a time
        self._pumping = set()
        self._encrypted = {}  # conversation_id -> the server's encrypted flag
        self._listing = None  # a ListConversations under way to learn those flags
        self._deliveries = succeed(None)  # DeliverEncrypted pushes are opened and handed over one after the other
        self._sequences = {}  # conversation_id -> _Sequence: what this device was and was not pushed (memory only)
        self._shown_at = {}  # message_id -> (conversation_id, seq) of encrypted messages read (memory only; bounded)
        self._rebinding = []  # Deferreds of complete_link() waiting for the session to be bound again
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
        self.on_alarm = lambda kind, user, detail: None
        self.on_devices_changed = lambda user, added, removed: None
        self.on_mode = lambda conversation_id, mode, actor: None
        self.on_transcript_signed = lambda signed: None
        # Invitations: on_invited(Invitation) when someone invites the user to a group;
        # on_invitation_accepted(conversation_id, username, added) when someone accepted one to an encrypted
        # group of the user's (`added`: this device added them with the signed state; else another member does).
        self.on_invited = lambda invitation: None
        self.on_invitation_accepted = lambda conversation_id, username, added: None
        # Two-factor login: second_factor(username) gives the code (a TOTP code or a recovery code; may return
        # a Deferred) when a login answers SECOND_FACTOR_REQUIRED and no code was given to login(); None: fail.
        self.second_factor = None
        # A server that requires two-factor login (ENROLMENT_REQUIRED at login): enrol(username, secret, uri)
        # gives a code of the new secret (may return a Deferred; None: fail); on_recovery_codes(codes) gets the
        # ten recovery codes the enrolment made, to show once.
        self.enrol = None
        self.on_recovery_codes = lambda codes: None

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
        for conversation_id in list(self._queues):
            self._pump(conversation_id)
        if login is not None and self.e2ee is not None:
            self._background(self._start_device(), "setting up this device again")
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

    def _login_arguments(self, username, **secret):
        arguments = {"username": username, **secret}
        if self.client_name is not None:
            arguments["client_name"] = self.client_name
        return arguments

    async def _log_in_again(self, protocol):
        device = self.e2ee.login_device(resume=True) if self.e2ee is not None else None
        arguments = self._login_arguments(self.username, resume_token=self.resume_token)
        if self._presence is not None:  # set before anyone can see the session: no flash of "online"
            arguments["status"], arguments["note"] = self._presence
        try:
            answer = await protocol.callRemote(commands.Resume, device_id=device, **arguments)
            bound = device is not None
        except commands.EnrolmentRequired:  # (the token is spent; enrolling takes a person and the password)
            await self._give_up(protocol.callRemote)  # (so the connection can log in again)
            self.username = self.resume_token = None
            self.on_logged_out("This server now requires two-factor login: log in again to switch it on.")
            return None
        except (BadCredentials, NoSuchDevice, NotAllowed) as refused:
            if isinstance(refused, NotAllowed) and device is None:
                raise
            if device is not None and not isinstance(refused, BadCredentials):
                self.e2ee.refused(refused)  # (the refused token is spent: only the password is left)
            if self._password is None:
                self.username = self.resume_token = None
                self.on_logged_out("The session could not be resumed; log in again.")
                return None
            try:
                answer, bound = await self._password_login(protocol.callRemote, self.username, self._password)
            except (SecondFactorRequired, commands.EnrolmentRequired):  # (no code to give: a person logs in)
                self.username = self.resume_token = None
                self.on_logged_out("The session could not be resumed; log in again (with your second factor).")
                return None
        return self._logged_in(answer, bound)

    async def _password_login(self, call, username, password, code=None):
        """(Login's answer, bound): bound to this installation's device if it may be, else (or if refused) not.

        `call` sends on one connection: a second factor goes on the connection of its Login.
        """
        arguments = self._login_arguments(username, password=password)
        device = self.e2ee.login_device() if self.e2ee is not None else None
        codes = [code]  # a code given up front is used once; then second_factor() is asked
        if device is not None:
            try:
                return await self._two_step_login(call, codes, device_id=device, **arguments), True
            except (NoSuchDevice, NotAllowed) as refused:
                self.e2ee.refused(refused)  # a new device of a user with devices, or revoked: log in without it
        return await self._two_step_login(call, codes, **arguments), False

    async def _two_step_login(self, call, codes, **arguments):
        """Login; if it answers SECOND_FACTOR_REQUIRED, SecondFactor with a code on the same connection.

        A wrong code (or password) fails with BAD_CREDENTIALS ("Wrong username, password or code ...").
        """
        try:
            return await call(commands.Login, **arguments)
        except commands.EnrolmentRequired:
            if self.enrol is None:
                await self._give_up(call)
                raise
            begun = await call(commands.BeginTwoFactor)
            code = await maybeDeferred(self.enrol, arguments["username"], begun["secret"], begun["uri"])
            if not code:
                await self._give_up(call)
                raise
            try:
                answer = await call(commands.ConfirmTwoFactor, code=code)  # (nothing signed: not logged in yet)
            except BadCredentials:
                await self._give_up(call)  # (the server would wait for another code; this login is over)
                raise
            self.on_recovery_codes(list(answer["recovery_codes"]))
            return answer  # (with the Login fields: the connection is logged in)
        except SecondFactorRequired:
            code = codes.pop() if codes else None
            if code is None:
                if self.second_factor is None:
                    await self._give_up(call)
                    raise
                code = await maybeDeferred(self.second_factor, arguments["username"])
            if not code:
                await self._give_up(call)
                raise
            return await call(commands.SecondFactor, code=code)

    @staticmethod
    async def _give_up(call):
        """Logout: the connection no longer holds a login waiting for its second step (so Login works again)."""
        try:
            await call(commands.Logout)
        except (commands.ChatError, ConnectionClosed):
            pass

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
        if self.e2ee is not None:
            self.e2ee.close()
        failed = ConnectionClosed("The client was closed.")
        unanswered, self._unanswered = list(self._unanswered.values()), {}
        self._queues.clear()
        for outgoing in unanswered:
            outgoing.answer.errback(failed)
        waiting, self._waiting = self._waiting, []
        for waiter in waiting + self._rebinding:
            waiter.errback(failed)
        self._rebinding = []
        protocol, self._protocol = self._current, None
        if protocol is None or protocol.transport is None:
            return succeed(None)
        closed = protocol.closed
        protocol.transport.loseConnection()
        return closed

    def call(self, command, **arguments):
        """Deferred of the answer dict to `command`, once connected."""
        return self._connected().addCallback(lambda protocol: protocol.callRemote(command, **arguments))

    def _background(self, work, what):
        """Run the coroutine `work`; a failure is logged (a lost connection only noted: redone after reconnecting)."""

        def failed(failure):
            if failure.check(ConnectionClosed):
                log.info("{what}: the connection was lost", what=what)
            else:
                log.failure(what, failure)

        return Deferred.fromCoroutine(work).addErrback(failed)

    # -- accounts --------------------------------------------------------------

    def register(self, username, password, invite=None):
        """Deferred user name; `invite` is an invitation token (securechatd-admin invite) where registration is closed."""
        registered = self.call(commands.Register, username=username, password=password, invite=invite)
        return registered.addCallback(lambda answer: answer["username"])

    def _logged_in(self, answer, bound=False):
        login = _record(LoggedIn, answer)
        if login.username != self.username:
            path = None
            if self.state_directory is not None:
                path = os.path.join(self.state_directory, f"{login.username}.seen.json")
            self.seen = SeenMessages(path)
            self._sequences, self._shown_at = {}, {}
        if login.username != self.username:
            self._presence = None  # (another user's presence is not restored for this one)
        self.username, self.resume_token = login.username, login.resume_token
        self.max_message_bytes = login.max_message_bytes
        self._bound = bound
        # the device key that signs this session's account actions (kept even if the device file is then
        # found unusable here, e.g. in use by another program: the server requires them of a bound session)
        self._signer = self.e2ee.state.device if bound and self.e2ee is not None else None
        if self.e2ee is not None:  # (a DevicesChanged, ConversationUpdated or ModeChanged may have come meanwhile)
            self.e2ee.chains.stale()
            self.e2ee.moved()
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

    def login(self, username, password, remember_password=False, code=None):
        """Deferred LoggedIn; `remember_password` keeps it in memory to log in again if a resume fails.

        For an account with two-factor login, `code` (a TOTP or recovery code) is the second factor;
        without it the client asks `second_factor(username)`. With encryption, the device is ready when
        it fires (see ChatClient).
        """
        return Deferred.fromCoroutine(self._login(username, password, remember_password, code))

    async def _login(self, username, password, remember_password, code=None):
        self._open_device(username)
        protocol = await self._connected()  # (both steps of a two-factor login on one connection)
        answer, bound = await self._password_login(protocol.callRemote, username, password, code)
        self._password = password if remember_password else None
        login = self._logged_in(answer, bound)
        await self._start_device()
        return login

    def resume(self, username, resume_token):
        return Deferred.fromCoroutine(self._resume(username, resume_token))

    async def _resume(self, username, resume_token):
        e2ee = self._open_device(username)
        device = e2ee.login_device(resume=True) if e2ee is not None else None
        arguments = self._login_arguments(username, resume_token=resume_token)
        try:
            answer = await self.call(commands.Resume, device_id=device, **arguments)
        except (NoSuchDevice, NotAllowed) as refused:
            if device is not None:
                e2ee.refused(refused)
            raise
        login = self._logged_in(answer, device is not None)
        await self._start_device()
        return login

    def logout(self):
        def logged_out(_):
            self.username = self.resume_token = self._password = None
            self._bound, self._signer = False, None
            if self.e2ee is not None:
                self.e2ee.close()
                self.e2ee = None

        return self.call(commands.Logout).addCallback(logged_out)

    def change_password(self, old_password, new_password):
        changed = self._signed_call(
            commands.ChangePassword, "password_change", old_password=old_password, new_password=new_password
        )  # (signed by the device of a bound session, so the account log names it)

        def remember(_):
            if self._password is not None:
                self._password = new_password

        return changed.addCallback(remember)

    def ping(self):
        return self.call(commands.Ping).addCallback(lambda answer: answer["server_time"])

    # -- account security: two-factor login, sessions (docs/PROTOCOL.md, "Account security") --------

    def _signed_action(self, kind, target=""):
        """The action_* arguments of `kind` on `target`: signed by this installation's device when the
        session is bound to it (the server then requires them), none for a session bound to no device."""
        device = self._signer
        if not self._bound or device is None:
            return {}
        time_ms = int(self.clock.seconds() * 1000)
        nonce = os.urandom(NONCE_BYTES)
        fields = action_fields(self.username, device.id, kind, target, time_ms, nonce)
        return {"action_time": time_ms, "action_nonce": nonce, "action_signature": device.sign(ACTION_LABEL, fields)}

    def _signed_call(self, command, kind, target="", **arguments):
        def send(protocol):
            return protocol.callRemote(command, **arguments, **self._signed_action(kind, target))

        return self._connected().addCallback(send)

    def two_factor_status(self):
        """Deferred TwoFactorStatus answer: {"enabled", "required", "recovery_codes_left"}."""
        return self.call(commands.TwoFactorStatus)

    def begin_two_factor(self):
        """Deferred (secret in base32, otpauth:// URI): a new enrolment; on only once confirm_two_factor()."""
        begun = self.call(commands.BeginTwoFactor)
        return begun.addCallback(lambda answer: (answer["secret"], answer["uri"]))

    def confirm_two_factor(self, code, password):
        """Deferred list of the ten recovery codes (shown once): two-factor login is on. `password`, the
        account's, proves this is its owner, not a session resumed from a stolen token."""
        confirmed = self._signed_call(commands.ConfirmTwoFactor, "second_factor_on", code=code, password=password)
        return confirmed.addCallback(lambda answer: list(answer["recovery_codes"]))

    def disable_two_factor(self, code):
        """Deferred: two-factor login off (`code`: a current code or a recovery code)."""
        return self._signed_call(commands.DisableTwoFactor, "second_factor_off", code=code)

    def new_recovery_codes(self, code):
        """Deferred list of ten new recovery codes; the old ones stop working."""
        renewed = self._signed_call(commands.NewRecoveryCodes, "recovery_codes_new", code=code)
        return renewed.addCallback(lambda answer: list(answer["recovery_codes"]))

    def list_sessions(self):
        """Deferred list of dicts (session_id, device_id, client_name, address, since, last_active, online,
        this_session): those logged in now, then those that may come back, each newest first."""
        return self.call(commands.ListSessions).addCallback(lambda answer: _checked_sessions(answer["sessions"]))

    def end_session(self, session_id):
        """Deferred: end another session of the user (its connection closes, its resume token is revoked)."""
        return self._signed_call(commands.EndSession, "session_end", session_id, session_id=session_id)

    def end_other_sessions(self):
        """Deferred number of sessions ended: all of the user's but this one."""
        ended = self._signed_call(commands.EndOtherSessions, "sessions_end_others")
        return ended.addCallback(lambda answer: answer["ended"])

    def check_account_log(self, export_to=None):
        """Deferred account_log.Report: the user's account log checked against the server key this device
        pinned and the tree head it saw last (kept in `<user>.account-log.json` beside the device file), the
        signed actions against the user's device chain; with `export_to`, what it read is also written there
        (0600) for securechatd-verify-log."""
        return maybeDeferred(lambda: Deferred.fromCoroutine(self._check_account_log(export_to)))

    async def _check_account_log(self, export_to):
        e2ee = self._e2ee()
        if e2ee.transcripts.key is None:
            await e2ee.transcripts.check_server_key()
        if e2ee.transcripts.key is None:
            raise EncryptionUnavailable("No server key is pinned here: this server signs no tree heads.")
        await e2ee.chains.refresh(e2ee.user)  # (the devices whose signatures the log's actions carry)

        def device_key(device_id):
            keys = e2ee.chains.history_lookup(e2ee.user, device_id)  # (revoked since: its earlier actions count)
            return Ed25519PublicKey.from_public_bytes(keys.sig_pub) if keys is not None else None

        path = os.path.join(self.state_directory, f"{e2ee.user}.account-log.json")
        checker = AccountLogCheck(path, e2ee.transcripts.key, e2ee.user, device_key)
        report = await checker.check(self.call)
        if export_to is not None:
            checker.export(export_to)
        return report

    # -- this installation's device ------------------------------------------------

    def _open_device(self, username):
        """The EndToEnd of `username` on this installation (loaded, or made in memory), or None without encryption."""
        name = username.lower()
        if not self.encryption or not is_user_name(name):
            return None
        if self.e2ee is not None:
            if self.e2ee.user == name:
                return self.e2ee
            self.e2ee.close()
            self.e2ee = None
        try:
            self.e2ee = EndToEnd.load(self, os.path.join(self.state_directory, f"{name}.device"), name)
        except DeviceFileError as problem:
            self._device_unusable(name, problem)
        return self.e2ee

    def _device_unusable(self, name, problem):
        self.device_problem = str(problem)
        self.e2ee = None
        log.warn("e2ee: {problem}", problem=self.device_problem)
        self.on_alarm(Alarm.DEVICE_FILE, name, self.device_problem)

    async def _start_device(self):
        """After a login: keep the device file for this process, then the chain and prekeys (crypto.EndToEnd.start)."""
        e2ee = self.e2ee
        if e2ee is None:
            return
        try:
            e2ee.claim()
        except DeviceFileError as problem:
            self._device_unusable(e2ee.user, problem)
            return
        try:
            rebind = await e2ee.start(self._bound)
        except ConnectionClosed:
            return  # done again after the reconnection
        except commands.ChatError as problem:  # (e.g. RATE_LIMITED): logged in all the same; again at the next login
            log.warn("e2ee: setting up device {device} failed: {problem}", device=e2ee.device_id, problem=problem)
            return
        if rebind and self.reconnect and self._protocol is not None:
            # the device was added since this session logged in unbound: log in again bound to it
            self._protocol.transport.loseConnection()
            return
        rebinding, self._rebinding = self._rebinding, []
        for waiter in rebinding:
            waiter.callback(e2ee.active and self._bound)

    def _e2ee(self):
        """The active EndToEnd, or EncryptionUnavailable saying why there is none."""
        if self.e2ee is None:
            if self.device_problem is not None:
                raise EncryptionUnavailable(self.device_problem)
            if not self.encryption:
                raise EncryptionUnavailable("This client keeps no device: give it a state_directory.")
            raise EncryptionUnavailable("Log in first.")
        return self.e2ee

    @property
    def device_id(self):
        """This installation's device id of the logged-in user (32 hex digits), or None."""
        return self.e2ee.device_id if self.e2ee is not None else None

    @property
    def encryption_problem(self):
        """Why this client cannot encrypt now, or None if it can."""
        try:
            return self._e2ee().why_not() or (None if self._bound else "This session is not bound to the device yet.")
        except EncryptionUnavailable as problem:
            return str(problem)

    def list_devices(self):
        """Deferred [DeviceInfo]: the user's current devices, from their verified chain."""
        return maybeDeferred(lambda: Deferred.fromCoroutine(self._e2ee().devices()))

    def revoke_device(self, device_id):
        """Deferred: publish the revoke of one of the user's devices (hex id); it gets nothing new from then on."""
        return maybeDeferred(lambda: Deferred.fromCoroutine(self._e2ee().revoke(device_id)))

    def rename_device(self, device_id, name):
        """Deferred: give one of the user's devices (hex id) a new name, in the signed device chain."""
        return maybeDeferred(lambda: Deferred.fromCoroutine(self._e2ee().rename(device_id, name)))

    def link_request(self, signer=None):
        """Deferred text for a new device to show; the device `signer` (hex; the only one if None) adds it.

        On the existing device, link_new_device(text) publishes the link; then
        complete_link() here (or the next login) binds this installation to
        its new device.
        """
        return maybeDeferred(lambda: Deferred.fromCoroutine(self._e2ee().link_request(signer)))

    def link_new_device(self, request):
        """Deferred (device id, name): add the new device whose link_request() text this is (on an active device)."""
        return maybeDeferred(lambda: Deferred.fromCoroutine(self._e2ee().link_new_device(request)))

    def complete_link(self):
        """Deferred True once this installation is an active device and the session bound to it (False: not added).

        Binding logs in again: on_disconnected and on_reconnected are called.
        """
        return maybeDeferred(lambda: Deferred.fromCoroutine(self._complete_link()))

    async def _complete_link(self):
        e2ee = self._e2ee()
        if e2ee.active and self._bound:
            return True
        rebinding = Deferred()
        self._rebinding.append(rebinding)
        await self._start_device()
        if not e2ee.active or not self.reconnect:
            if rebinding in self._rebinding:  # (a setup that finished may have taken it already)
                self._rebinding.remove(rebinding)
            return False
        return await rebinding

    def safety_number(self, user):
        """Deferred: the 60 digits to compare with `user` (docs/E2EE.md, "Safety numbers")."""
        return maybeDeferred(lambda: Deferred.fromCoroutine(self._e2ee().safety_number(user.lower())))

    def trust(self, user):
        """Deferred: `user`'s current devices are verified (the safety numbers matched); a change of them undoes it."""
        return maybeDeferred(lambda: Deferred.fromCoroutine(self._e2ee().trust(user.lower())))

    def is_verified(self, user):
        """True if the user trusted `user` and their devices have not changed since."""
        return self.e2ee is not None and self.e2ee.is_verified(user.lower())

    def members(self, conversation_id):
        """Deferred tuple: the members of an encrypted conversation by its latest verified signed state."""
        return maybeDeferred(lambda: Deferred.fromCoroutine(self._members(conversation_id)))

    async def _members(self, conversation_id):
        state = await self._e2ee().verified_membership(conversation_id)
        return tuple(sorted(state.members)) if state is not None else ()

    # -- presence and users ----------------------------------------------------

    def set_presence(self, status, note=None):
        """Deferred; the presence is restored by every reconnect of this client (Resume's status and note)."""

        def remember(_):
            self._presence = (status, note) if status != "online" or note is not None else None

        return self.call(commands.SetPresence, status=status, note=note).addCallback(remember)

    def get_presence(self, usernames):
        return self.call(commands.GetPresence, usernames=list(usernames)).addCallback(
            lambda answer: [_record(Presence, row) for row in answer["presence"]]
        )

    def set_privacy(self, hide_last_seen=None, appear_offline=None):
        """Deferred Privacy as it now is; None leaves a setting unchanged (both None: only read them)."""
        changed = self.call(commands.SetPrivacy, hide_last_seen=hide_last_seen, appear_offline=appear_offline)
        return changed.addCallback(lambda answer: _record(Privacy, answer))

    def list_users(self, prefix=None, limit=None):
        """Deferred [(username, status)]."""
        return self.call(commands.ListUsers, prefix=prefix, limit=limit).addCallback(
            lambda answer: [(row["username"], row["status"]) for row in answer["users"]]
        )

    # -- conversations ---------------------------------------------------------

    def create_conversation(self, members, title=None, encrypted=None):
        """Deferred (conversation_id, created).

        `encrypted` None lets the server decide (encrypted unless it allows
        plaintext). An encrypted conversation's first signed membership
        state is published before this fires.
        """
        return Deferred.fromCoroutine(self._create_conversation(list(members), title, encrypted))

    async def _create_conversation(self, members, title, encrypted):
        answer = await self.call(commands.CreateConversation, members=members, title=title, encrypted=encrypted)
        conversation_id = answer["conversation_id"]
        self._encrypted[conversation_id] = bool(answer.get("encrypted"))
        if answer.get("encrypted"):
            others = {name.lower() for name in members} - {self.username}
            kind = "direct" if len(others) == 1 and title is None else "group"
            others -= set(answer.get("invited") or ())  # strangers were invited, not added: not in the first state
            title = title.strip() if title is not None else ""
            await self._e2ee().publish_first(conversation_id, kind, title, sorted(others))
        return conversation_id, answer["created"]

    def _conversation_updated(self, conversation):
        if conversation.encrypted is not None:
            self._encrypted[conversation.conversation_id] = conversation.encrypted
        if self.e2ee is not None:  # (its membership state may have moved on)
            self.e2ee.moved(conversation.conversation_id)
        self.on_conversation(conversation)
        self._check_members(conversation)

    def _devices_changed(self, username):
        """A DevicesChanged push: the user's chain is fetched again before the next message is sealed; and
        now, if it is ours or one this device keeps, so a change is told at once (on_devices_changed)."""
        e2ee = self.e2ee
        if e2ee is None:
            return
        e2ee.chains.stale([username])
        if e2ee.active and (username == self.username or e2ee.chains.get(username) is not None):
            fetching = e2ee.devices_pushed(username)
            if fetching is not None:
                self._background(fetching, f"fetching {username}'s device chain")

    def _check_members(self, conversation):
        """An encrypted conversation's member list from the server, compared with the signed one in the background."""
        e2ee = self.e2ee
        if e2ee is None or not e2ee.active or self.username not in conversation.members:
            return
        if conversation.encrypted or e2ee.is_encrypted(conversation.conversation_id):
            self._background(
                e2ee.check_members(conversation.conversation_id, conversation.members),
                f"checking the members of conversation {conversation.conversation_id}",
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
                break
            after = conversations[-1].conversation_id
        for conversation in conversations:
            self._encrypted[conversation.conversation_id] = bool(conversation.encrypted)
            known = self.e2ee.membership(conversation.conversation_id) if self.e2ee is not None else None
            if known is not None and known.members != set(conversation.members):
                self._check_members(conversation)
        return conversations

    def list_conversations(self):
        """Deferred [Conversation], every page of them."""
        return Deferred.fromCoroutine(self._all_conversations())

    async def _is_encrypted(self, conversation_id):
        """True for an encrypted conversation: one with verified signed states is, whatever the server says now."""
        if self.e2ee is not None and self.e2ee.is_encrypted(conversation_id):
            return True
        if conversation_id not in self._encrypted:
            if self._listing is None:
                self._listing = []  # the callers waiting for the one ListConversations under way

                def listed(result):
                    waiting, self._listing = self._listing, None
                    for waiter in waiting:
                        waiter.errback(result) if isinstance(result, Failure) else waiter.callback(None)

                self.list_conversations().addBoth(listed)
            listing = Deferred()
            self._listing.append(listing)
            await listing
        return bool(self._encrypted.get(conversation_id))

    def add_members(self, conversation_id, members):
        """Deferred sorted list of those of `members` invited instead of added: people who share no conversation
        with the user, on a server with invitations on (they join once they accept)."""
        return Deferred.fromCoroutine(self._add_members(conversation_id, [name.lower() for name in members]))

    async def _add_members(self, conversation_id, names):
        if self.e2ee is None or not await self._is_encrypted(conversation_id):
            answer = await self._change_members(conversation_id, "add", names)  # (the server invites strangers itself)
            return sorted(answer.get("invited") or ())
        # A signed state cannot hold a stranger: the server names them, and they are invited instead.
        try:
            await self._change_members(conversation_id, "add", names)
            return []
        except InvitationRequired as refused:
            strangers = _strangers(refused, names)
            if not strangers:
                raise
        names = [name for name in names if name not in strangers]
        if names:
            await self._change_members(conversation_id, "add", names)
        await self.invite_members(conversation_id, strangers)
        return sorted(strangers)

    def leave_conversation(self, conversation_id):
        return Deferred.fromCoroutine(self._change_members(conversation_id, "leave", []))

    async def _change_members(self, conversation_id, op, members):
        """AddMembers or LeaveConversation; for an encrypted conversation with the signed state after the change
        (then the new state, else the server's answer)."""

        def send(membership=None):
            if op == "add":
                return self.call(
                    commands.AddMembers, conversation_id=conversation_id, members=members, membership=membership
                )
            return self.call(commands.LeaveConversation, conversation_id=conversation_id, membership=membership)

        if self.e2ee is not None and await self._is_encrypted(conversation_id):
            if op == "leave":  # a signed head over the whole transcript, while still a member
                await self._sign_quietly(conversation_id, again=True)
            return await self.e2ee.change_membership(conversation_id, op, members, send)
        return await send()

    # -- invitations (docs/PROTOCOL.md, "Invitations") -------------------------------

    def invite_members(self, conversation_id, members):
        """Deferred list of those newly invited to the group (members and those invited already are left out)."""
        invited = self.call(commands.InviteMembers, conversation_id=conversation_id, members=list(members))
        return invited.addCallback(lambda answer: list(answer["invited"]))

    def group_invitations(self, conversation_id):
        """Deferred [GroupInvitation]: who is invited to a group of the user's, oldest first."""
        listed = self.call(commands.GetInvitations, conversation_id=conversation_id)
        return listed.addCallback(lambda answer: [_record(GroupInvitation, row) for row in answer["invitations"]])

    def list_invitations(self):
        """Deferred [Invitation]: the user's invitations, oldest first."""
        listed = self.call(commands.ListInvitations)
        return listed.addCallback(lambda answer: [_record(Invitation, row) for row in answer["invitations"]])

    def answer_invitation(self, conversation_id, accept):
        """Deferred True if the user is now a member (a plaintext group accepted); False: declined, or an
        encrypted group accepted, which a member's device completes (a ConversationUpdated then comes)."""
        answered = self.call(commands.AnswerInvitation, conversation_id=conversation_id, accept=accept)
        return answered.addCallback(lambda answer: answer["joined"])

    def _invitation_accepted(self, conversation_id, username):
        self._background(
            self._complete_invitation(conversation_id, username),
            f"adding {username} to conversation {conversation_id}",
        )

    async def _complete_invitation(self, conversation_id, username):
        """Someone accepted an invitation to an encrypted group: the inviter's device adds them with the signed
        state (or, if the inviter is no longer a member, the device of the member first by name: one, not all)."""
        added = False
        e2ee = self.e2ee
        if e2ee is not None and e2ee.active:
            invitations = await self.group_invitations(conversation_id)
            inviters = [row.inviter for row in invitations if row.username == username and row.accepted]
            members = await self.members(conversation_id)
            if inviters and self.username in members:
                inviter = inviters[0]
                if inviter == self.username or (inviter not in members and self.username == min(members)):
                    added = await self._add_accepted(conversation_id, username)
        self.on_invitation_accepted(conversation_id, username, added)

    async def _add_accepted(self, conversation_id, username):
        """Add someone who accepted with the signed state: True if done, False if refused (added meanwhile)."""
        try:
            await self._change_members(conversation_id, "add", [username])
        except (commands.ChatError, MembershipError) as refused:
            log.info("{user} was not added to conversation {id}: {why}", user=username, id=conversation_id, why=refused)
            return False
        return True

    # -- messages --------------------------------------------------------------

    def send_message(self, conversation_id, body, client_msg_id=None):
        """Deferred Sent, answered once committed; resent across reconnects until answered.

        In an encrypted conversation the text is encrypted once, when its turn
        comes (messages of one conversation go one after the other), and the
        same envelope is resent; EncryptionUnavailable says why it cannot be.
        """
        if self.max_message_bytes is not None and len(body.encode("utf-8")) > self.max_message_bytes:
            # (the server's own answer, without sending: a body over 64 KiB cannot even be sent)
            return fail(MessageTooLarge(f"A message body is at most {self.max_message_bytes} bytes of UTF-8."))
        client_msg_id = client_msg_id or uuid.uuid4().hex
        answer = Deferred()
        outgoing = self._unanswered[client_msg_id] = _Outgoing(conversation_id, body, answer)
        if self.e2ee is None:
            outgoing.encrypted = False
            self._connected().addCallback(self._send, client_msg_id)
        else:
            routed = Deferred.fromCoroutine(self._route(client_msg_id, outgoing))
            routed.addErrback(lambda failure: self._failed(client_msg_id, failure))
        return answer

    async def _route(self, client_msg_id, outgoing):
        encrypted = await self._is_encrypted(outgoing.conversation_id)
        outgoing.encrypted = encrypted
        if encrypted:
            self._queues.setdefault(outgoing.conversation_id, deque()).append(client_msg_id)
            self._pump(outgoing.conversation_id)
        else:
            self._connected().addCallback(self._send, client_msg_id)

    def _send(self, protocol, client_msg_id):
        """Send (or resend) one plaintext message unless it is on its way already."""
        outgoing = self._unanswered.get(client_msg_id)
        if outgoing is None or outgoing.encrypted is not False or client_msg_id in self._in_flight:
            return
        self._in_flight.add(client_msg_id)
        sent = protocol.callRemote(
            commands.SendMessage,
            conversation_id=outgoing.conversation_id,
            client_msg_id=client_msg_id,
            body=outgoing.body,
        )
        sent.addCallbacks(self._answered, self._not_answered, (client_msg_id,), None, (client_msg_id,))

    def _answered(self, answer, client_msg_id, unreached=()):
        self._in_flight.discard(client_msg_id)
        pending = self._unanswered.pop(client_msg_id, None)
        if pending is not None:
            pending.answer.callback(_record(Sent, dict(answer, client_msg_id=client_msg_id, unreached=unreached)))

    def _not_answered(self, failure, client_msg_id):
        self._in_flight.discard(client_msg_id)
        if failure.check(ConnectionClosed) and self.reconnect and not self._closed:
            return  # resent when the connection is back
        self._failed(client_msg_id, failure)

    def _failed(self, client_msg_id, failure):
        pending = self._unanswered.pop(client_msg_id, None)
        if pending is not None:
            pending.answer.errback(failure)

    def _pump(self, conversation_id):
        """Send the encrypted messages waiting in one conversation, in order, one at a time."""
        if conversation_id in self._pumping:
            return
        self._pumping.add(conversation_id)
        pumped = Deferred.fromCoroutine(self._pump_queue(conversation_id))
        pumped.addErrback(lambda failure: log.failure("sending encrypted messages", failure))
        pumped.addBoth(lambda _: self._pumping.discard(conversation_id))

    async def _pump_queue(self, conversation_id):
        queue = self._queues.get(conversation_id)
        while queue:
            client_msg_id = queue[0]
            outgoing = self._unanswered.get(client_msg_id)
            if outgoing is None:
                queue.popleft()
                continue
            protocol = self._protocol  # (the connection this try began on: a failure is about it, or one before)
            try:
                if outgoing.sealed is None:
                    outgoing.sealed = await self._e2ee().seal_message(conversation_id, outgoing.body)
                protocol = self._protocol
                if protocol is None:
                    return  # the connection is down: _dial starts again
                answer = await self._send_sealed(protocol, client_msg_id, outgoing)
            except ConnectionClosed:
                if self.reconnect and not self._closed:
                    if self._protocol is not None and self._protocol is not protocol:
                        continue  # connected again meanwhile: send (the same envelope) now
                    return  # sent again, the same envelope, once the connection is back
                self._failed(client_msg_id, Failure())
            except Exception as refused:
                if not _seal_again(refused) or outgoing.reseals >= MAX_RESEALS:
                    self._failed(client_msg_id, Failure())
                else:  # not stored: encrypt it for the members and devices as they are now
                    log.info("sealing {id} again: {why}", id=client_msg_id, why=refused)
                    if isinstance(refused, NoSuchDevice):  # a device that is gone: fetch its owner's chain again
                        self._e2ee().chains.stale(_owner_of_refused_device(self._e2ee().chains, refused))
                    else:  # sealed under an earlier membership state: fetch it
                        self._e2ee().moved(conversation_id)
                    outgoing.reseals += 1
                    outgoing.sealed = None
                    continue
            else:
                # (ours before anything is awaited: a push of a later message checked meanwhile sees no gap here)
                self._sequences.setdefault(conversation_id, _Sequence()).own.add(answer["seq"])
                chained = {}
                if self.e2ee is not None:
                    self.e2ee.chains.stale(answer.get("missing") or ())  # a device added: seal for it next time
                    verdict = await self._sent_checked(answer, outgoing, conversation_id)
                    if verdict is not None:
                        chained = dict(mode=verdict.mode, n=verdict.n, chain=verdict.state)
                self._answered(dict(answer, **chained), client_msg_id, outgoing.sealed.unreached)
            if queue and queue[0] == client_msg_id:
                queue.popleft()
        if self._queues.get(conversation_id) is queue and not queue:
            del self._queues[conversation_id]

    async def _sent_checked(self, answer, outgoing, conversation_id):
        """Keep our message's key, and take its link and receipt into the chain: its Verdict (None if that failed:
        the chain and the membership are then fetched before the next message)."""
        verdict = None
        try:
            verdict = await self.e2ee.sent_checked(answer, outgoing.sealed, conversation_id)
        except (ConnectionClosed, commands.ChatError) as problem:  # (the message is sent: followed at the next one)
            log.info("the chain of conversation {id} is followed later: {why}", id=conversation_id, why=problem)
        except Exception:
            log.failure("following the chain of conversation {id}", Failure(), id=conversation_id)
        if verdict is None:
            self.e2ee.moved(conversation_id)
        return verdict

    async def _send_sealed(self, protocol, client_msg_id, outgoing):
        """StageWraps for the wraps beyond one box, then SendEncrypted; its answer."""
        sealed, conversation_id = outgoing.sealed, outgoing.conversation_id
        items = [{"device_id": device, "wrap": wrap} for device, wrap in sealed.wraps]
        inline, batches = split_wraps(items, BOX_BUDGET - len(sealed.header) - len(sealed.body))
        staged = None
        for batch in batches:
            try:
                answer = await protocol.callRemote(
                    commands.StageWraps, conversation_id=conversation_id, client_msg_id=client_msg_id, wraps=batch
                )
            except commands.InvalidArgument as refused:
                if "sent already" not in str(refused):
                    raise
                staged, inline = None, []  # stored before the connection dropped: ask for its answer
                break
            staged = answer["staged"]
        return await protocol.callRemote(
            commands.SendEncrypted,
            conversation_id=conversation_id,
            client_msg_id=client_msg_id,
            header=sealed.header,
            body=sealed.body,
            wraps=inline,
            staged=staged,
            signature=sealed.signature or None,
        )

    def _deliver_encrypted(self, item):
        """Open a pushed encrypted message and hand it over; pushes are handled one after the other, in order."""
        handled = Deferred()

        def run(_):
            opened = Deferred.fromCoroutine(self._open_and_deliver(item))
            opened.chainDeferred(handled)
            return opened.addErrback(lambda failure: None)  # (reported to the server in its answer)

        self._deliveries.addCallback(run)
        return handled

    async def _open_and_deliver(self, item):
        conversation_id, seq = item["conversation_id"], item["seq"]
        if self.e2ee is None:
            if not self.seen.is_new(conversation_id, seq):
                return
            reason = self.device_problem or "This client keeps no device."
            self.on_alarm(Problem.NO_DEVICE, item["sender"], reason)
            message = self._encrypted_message(conversation_id, item, None, Problem.NO_DEVICE, reason)
            await maybeDeferred(self.on_deliver, message)
            self._handed_over(None, message)
            return
        sequence = self._sequences.setdefault(conversation_id, _Sequence())
        highest = self._highest_seen(conversation_id)
        digest = _push_digest(item)
        if (seq <= highest and seq not in sequence.missing) or digest in sequence.failed.get(seq, ()):
            return  # handed over already (or this very push failed already)
        shown = self._shown_at.get(item["message_id"])
        if shown is not None and shown != (conversation_id, seq):
            # a message read before (its key is kept, so it would open again) pushed as another seq: a replay
            problem = Undecryptable(
                Problem.REPLAY, f"it was shown before as seq {shown[1]} of conversation {shown[0]}; now pushed as {seq}"
            )
            self.e2ee._alarm(
                Problem.REPLAY,
                item["sender"],
                f"message {item['message_id']} of conversation {conversation_id} cannot be read: {problem.detail}",
            )
            text = None
            verdict = None
        else:
            text, problem, verdict = await self.e2ee.open_checked(conversation_id, item)
        message = self._opened_message(conversation_id, item, text, problem, verdict)
        if problem is not None:
            # Not handed over: the seq is the server's word, and a push that cannot be opened proves nothing
            # about it; the message that really has this seq is still shown when it comes.
            sequence.failed.setdefault(seq, set()).add(digest)
            await maybeDeferred(self.on_deliver, message)
            return
        if seq > highest + 1 and highest > 0:
            await self._check_gap(conversation_id, sequence, highest, seq)
        await maybeDeferred(self.on_deliver, message)
        sequence.missing.discard(seq)
        self._shown(conversation_id, item)
        self._handed_over(None, message)
        sequence.forget_below(self._highest_seen(conversation_id))

    def _shown(self, conversation_id, item):
        """Remember which seq a message read was (a message id pushed again as another seq is a replay)."""
        self._shown_at[item["message_id"]] = (conversation_id, item["seq"])
        if len(self._shown_at) > MAX_SHOWN_KEPT:
            del self._shown_at[next(iter(self._shown_at))]

    def _highest_seen(self, conversation_id):
        """The highest seq of the conversation handed to the app (SeenMessages keeps it; 0: none)."""
        return self.seen._highest.get(conversation_id, 0)  # (seen.py has no accessor; read, never written, here)

    async def _check_gap(self, conversation_id, sequence, highest, seq):
        """The seqs between the highest handed over and `seq` that this device was not pushed: check, alarm if lost.

        They are asked of HistoryEncrypted. One the server still holds a wrap
        of for this device was due to it (held back, or dropped on the way):
        it is opened and handed over now, before `seq`. One history has with
        no wrap for this device was not encrypted for it (or its wrap was
        withheld: the two look the same). One history does not have at all
        is an alarm `gap` naming it. All of them stay awaited (`missing`): if
        a push of one still comes, it is shown, late.
        """
        skipped = set(range(highest + 1, seq)) - sequence.own - set(sequence.failed)
        if not skipped:
            return
        lowest, found, problem = min(skipped), {}, None
        if len(skipped) > MAX_GAP_CHECKED:
            problem = f"{len(skipped)} are too many to look up"
        else:
            before = seq
            try:
                while before > lowest:
                    page = await self.call(
                        commands.HistoryEncrypted,
                        conversation_id=conversation_id,
                        before_seq=before,
                        limit=min(before - lowest, 500),
                    )
                    seqs = [item["seq"] for item in page["messages"]]
                    found.update((item["seq"], item) for item in page["messages"] if item["seq"] in skipped)
                    if not seqs or not page["has_more"]:
                        break
                    before = min(seqs)
            except ConnectionClosed:
                raise  # (the push is not answered: it comes again)
            except Exception as refused:  # a refusal, or an answer that does not parse
                problem = f"the conversation's history could not be fetched to check ({refused})"
        for missing_seq in sorted(found):
            item = dict(found[missing_seq], conversation_id=conversation_id)
            if item.get("wrap") is None:
                continue
            text, opened, verdict = await self.e2ee.open_checked(conversation_id, item)
            await maybeDeferred(self.on_deliver, self._opened_message(conversation_id, item, text, opened, verdict))
            skipped.discard(missing_seq)
            if opened is not None:
                sequence.failed.setdefault(missing_seq, set()).add(_push_digest(item))
            else:
                self._shown(conversation_id, item)
        sequence.missing |= skipped
        lost = sorted(skipped - set(found))
        if lost:
            why = (
                f"{problem}: they may have been dropped"
                if problem is not None
                else "the server's history of the conversation does not have them either: they were dropped"
            )
            self.e2ee._alarm(
                Alarm.GAP,
                None,
                f"conversation {conversation_id}: seq {_seq_ranges(lost)} never reached this device"
                f" (it was pushed seq {seq} after seq {highest}); {why}",
            )

    def _opened_message(self, conversation_id, item, text, problem, verdict=None):
        return self._encrypted_message(
            conversation_id,
            item,
            text,
            problem.problem if problem is not None else None,
            problem.detail if problem is not None else None,
            verdict,
        )

    @staticmethod
    def _encrypted_message(conversation_id, item, text, problem, detail, verdict=None):
        chained = {}
        if verdict is not None:
            chained = dict(
                mode=verdict.mode,
                n=verdict.n,
                chain=verdict.state,
                chain_problems=tuple(dict.fromkeys(p.kind for p in verdict.problems)),
            )
        return Message(
            item["message_id"],
            item["seq"],
            item["sender"],
            text,
            item["sent_at"],
            conversation_id,
            encrypted=True,
            sender_device=item["sender_device"],
            problem=problem,
            problem_detail=detail,
            **chained,
        )

    def history(self, conversation_id, before_seq=None, limit=None):
        """Deferred HistoryPage; an encrypted conversation's messages are decrypted (or marked, as for on_deliver)."""
        if self.e2ee is None:
            return self._plain_history(conversation_id, before_seq, limit)
        return Deferred.fromCoroutine(self._history(conversation_id, before_seq, limit))

    async def _history(self, conversation_id, before_seq, limit):
        if not await self._is_encrypted(conversation_id):
            return await self._plain_history(conversation_id, before_seq, limit)
        page = await self.call(
            commands.HistoryEncrypted, conversation_id=conversation_id, before_seq=before_seq, limit=limit
        )
        messages = []
        for item in page["messages"]:
            text, problem, verdict = await self.e2ee.open_checked(conversation_id, dict(item, history=True))
            if problem is None:
                self._shown(conversation_id, item)
            messages.append(self._opened_message(conversation_id, item, text, problem, verdict))
        return HistoryPage(tuple(messages), page["has_more"])

    def _plain_history(self, conversation_id, before_seq, limit):
        page = self.call(commands.History, conversation_id=conversation_id, before_seq=before_seq, limit=limit)
        return page.addCallback(
            lambda answer: HistoryPage(
                tuple(_record(Message, dict(row, conversation_id=conversation_id)) for row in answer["messages"]),
                answer["has_more"],
            )
        )

    def mark_read(self, conversation_id, seq, private=False):
        """Deferred: the conversation is read up to `seq`; in an attestable encrypted one (unless `private`)
        this device also signs a transcript head over the chain it verified (SignTranscript), once per link."""
        marked = self.call(commands.MarkRead, conversation_id=conversation_id, seq=seq, private=private)
        if private:
            return marked.addCallback(lambda _: None)
        return marked.addCallback(lambda _: Deferred.fromCoroutine(self._sign_quietly(conversation_id)))

    async def _sign_quietly(self, conversation_id, again=False):
        """sign_transcript(), a failure logged but not raised: a read receipt is sent all the same."""
        e2ee = self.e2ee
        if e2ee is None or not e2ee.active or not await self._is_encrypted(conversation_id):
            return None
        try:
            return await e2ee.sign_transcript(conversation_id, again)
        except ConnectionClosed:
            return None
        except commands.ChatError as refused:  # (RATE_LIMITED, say): the next read signs again
            log.info("the transcript of conversation {id} was not signed: {why}", id=conversation_id, why=refused)
            return None
        except Exception:
            log.failure("signing the transcript of conversation {id}", Failure(), id=conversation_id)
            return None

    # -- verifiable conversations (docs/CLIENT.md) ---------------------------------------------

    def mode(self, conversation_id):
        """Deferred: "attestable" or "deniable" for an encrypted conversation (its chain fetched first), else None."""
        return Deferred.fromCoroutine(self._mode(conversation_id))

    async def _mode(self, conversation_id):
        e2ee = self.e2ee
        if e2ee is None or not e2ee.active or not await self._is_encrypted(conversation_id):
            return None
        return await e2ee.current_mode(conversation_id)

    def known_mode(self, conversation_id):
        """The mode of an encrypted conversation as last verified (no fetch), or None (not encrypted, no device)."""
        if self.e2ee is None or not self.e2ee.is_encrypted(conversation_id):
            return None
        return self.e2ee.mode(conversation_id)

    def set_mode(self, conversation_id, mode):
        """Deferred mode: sign and publish a mode event (every member sees it; signatures made are not withdrawn)."""
        return maybeDeferred(lambda: Deferred.fromCoroutine(self._e2ee().set_mode(conversation_id, mode)))

    def sign_transcript(self, conversation_id):
        """Deferred transcripts.Signed: a transcript head over the whole chain verified so far (None: deniable)."""
        return maybeDeferred(lambda: Deferred.fromCoroutine(self._e2ee().sign_transcript(conversation_id, True)))

    def export(self, conversation_id, disclose=None):
        """Deferred transcripts.Export: the conversation's bundle (docs/E2EE.md), sealed by this device.

        `disclose`: the seqs whose keys and plaintexts go in (None: every
        message this device can read). securechatd-verify checks the bytes.
        """
        return maybeDeferred(lambda: Deferred.fromCoroutine(self._e2ee().export(conversation_id, disclose)))

    def server_key_ids(self):
        """(the pinned server key's id, the id of another key the server gives now or None), readable.

        (None, None) without a device or a pinned key.
        """
        if self.e2ee is None:
            return None, None
        return self.e2ee.transcripts.key_ids()

    def accept_server_key(self):
        """Pin the key the server gives now in place of the pinned one (after comparing it out of band); True if so."""
        return self.e2ee is not None and self.e2ee.transcripts.accept_server_key()

    def _transcript_signed(self, conversation_id, username, head):
        e2ee = self.e2ee
        if e2ee is None or not e2ee.active:
            return succeed(None)
        def failed(failure):
            if failure.check(ConnectionClosed, commands.ChatError):
                log.info("a transcript head could not be checked now: {why}", why=failure.value)
            else:
                log.failure("checking a transcript head", failure)

        checked = Deferred.fromCoroutine(e2ee.transcript_signed(conversation_id, username, head))
        return checked.addCallback(self.on_transcript_signed).addErrback(failed)

    def get_receipts(self, conversation_id, message_id):
        return self.call(commands.GetReceipts, conversation_id=conversation_id, message_id=message_id).addCallback(
            lambda answer: [_record(ReceiptRow, row) for row in answer["receipts"]]
        )


def _item_size(item):
    """Bytes of one wrap item in an AmpList: per key its 2-byte length and itself, the value's; then 2 zero bytes."""
    values = [value if isinstance(value, bytes) else value.encode() for value in item.values()]
    return sum(4 + len(key) for key in item) + sum(len(value) for value in values) + 2


def split_wraps(items, inline_budget):
    """(the wrap items that fit SendEncrypted in `inline_budget` bytes, [batches for StageWraps, each within one box]).

    Items that do not fit inline are staged; nothing is split if all fit.
    """
    sizes = [_item_size(item) for item in items]
    if sum(sizes) <= min(inline_budget, BOX_BUDGET):
        return items, []
    inline, batches, batch, used = [], [], [], 0
    budget = max(min(inline_budget, BOX_BUDGET), 0)
    at = 0
    while at < len(items) and used + sizes[at] <= budget:  # the first ones go with SendEncrypted
        inline.append(items[at])
        used += sizes[at]
        at += 1
    used = 0
    for item, size in zip(items[at:], sizes[at:]):
        if batch and used + size > BOX_BUDGET:
            batches.append(batch)
            batch, used = [], 0
        batch.append(item)
        used += size
    if batch:
        batches.append(batch)
    return inline, batches
