"""One client connection and its limits; the factory that admits connections.

Whatever a connection does, it can only cost the server a bounded amount:
boxes are size-limited (server/framing.py), a connection must log in within
a deadline, few commands may be in flight at once (beyond that its reads are
paused), a client that stops reading is dropped once its unread output passes
a limit or a write stalls too long, and silent connections are pinged, then
dropped. Everything it sent and was acknowledged stays stored.
"""

import ipaddress
from collections import deque
from dataclasses import dataclass, replace

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionClosed, ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory
from twisted.internet.interfaces import IHandshakeListener, IPushProducer, ISSLTransport
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from securechatd import commands, tls
from securechatd.commands import RateLimited
from securechatd.server import wire
from securechatd.server.framing import END, BoundedBoxProtocol, BoxLimits, encode
from securechatd.server.keepalive import KeepAlive
from securechatd.server.protocol import ChatLocator
from securechatd.server.sessions import IChatClient, IInvitationClient
from securechatd.server.throttle import address_key

log = Logger()


@dataclass(frozen=True)
class ConnectionLimits:
    """The per-connection limits of the [connections] settings."""

    login_deadline: float
    unauthenticated_per_address: int
    max_connections: int
    commands_in_flight: int
    max_unread_output: int
    write_stall: float
    ping_after: float
    drop_after: float
    box_before_login: BoxLimits
    box_after_login: BoxLimits
    max_unanswered: int
    refusals_before_pause: int
    refusal_pause: float

    @classmethod
    def from_settings(cls, settings, **changes):
        limits = cls(
            login_deadline=settings.login_deadline,
            unauthenticated_per_address=settings.unauthenticated_per_address,
            max_connections=settings.max_connections,
            commands_in_flight=settings.commands_in_flight,
            max_unread_output=settings.max_unread_output,
            write_stall=settings.write_stall,
            ping_after=settings.ping_after,
            drop_after=settings.drop_after,
            box_before_login=BoxLimits(settings.box_bytes_before_login, settings.box_keys_before_login),
            box_after_login=BoxLimits(settings.box_bytes, settings.box_keys),
            max_unanswered=settings.max_unanswered_pushes,
            refusals_before_pause=settings.refusals_before_pause,
            refusal_pause=settings.refusal_pause,
        )
        return replace(limits, **changes)


def peer_address(address):
    """The client's IP address as text; IPv4 clients of a dual-stack socket as plain IPv4."""
    host = getattr(address, "host", None)
    try:
        parsed = ipaddress.ip_address(host)
    except (TypeError, ValueError):
        return host
    return str(getattr(parsed, "ipv4_mapped", None) or parsed)


@implementer(IPushProducer)
class _OutputWatch:
    """Registered with the transport, which pauses it when the client stops reading."""

    def __init__(self, connection):
        self.connection = connection

    def pauseProducing(self):
        self.connection.output_blocked()

    def resumeProducing(self):
        self.connection.output_flowing()

    def stopProducing(self):
        pass


@implementer(IChatClient, IInvitationClient, IHandshakeListener)
class ChatProtocol(BoundedBoxProtocol):
    """One client connection: its commands, its limits, and the pushes services send its session."""

    lost = False
    draining = False
    authenticated = False
    address = None
    limit_key = None  # what the per-address limits count this connection under
    keepalive = None
    handshake_done = True  # False from the start of a TLS connection until its handshake completes
    _deadline = None
    _stall = None
    _writes_paused = False
    _refusal_pause = None
    certificate_name = None  # the account named by the client's verified certificate (mutual TLS), or None

    def __init__(self, hub, clock, limits, factory=None):
        self.locator = ChatLocator(self, hub, clock)
        self.clock = clock
        self.limits = limits
        self.factory = factory
        self.in_flight = 0
        self.unread_output = 0
        self.unanswered = 0  # pushes sent and not answered yet
        self.refusals = 0  # RATE_LIMITED answers in a row
        self._waiting_commands = deque()  # commands read while commands_in_flight were running
        self._read_pauses = set()  # why reads are paused: "in flight", "refused", "draining"
        super().__init__(locator=self.locator)

    def box_limits(self):
        if self.locator.session is None:
            return self.limits.box_before_login
        return self.limits.box_after_login

    def makeConnection(self, transport):
        # Skips AMP.makeConnection's info line per connection: noise at scale;
        # the security log records what matters (logins and failures).
        self.address = peer_address(transport.getPeer())
        self.handshake_done = not ISSLTransport.providedBy(transport)
        no_delay = getattr(transport, "setTcpNoDelay", None)
        if no_delay is not None:
            # Small answers must not wait for the client's delayed ACK (Nagle): with TLS 1.3
            # session tickets outstanding, that held every first answer back ~40 ms.
            no_delay(True)
        amp.BinaryBoxProtocol.makeConnection(self, transport)
        transport.registerProducer(_OutputWatch(self), True)
        self.keepalive = KeepAlive(
            self.clock, self._ping, self._silent, self.limits.ping_after, self.limits.drop_after
        )
        self._deadline = self.clock.callLater(self.limits.login_deadline, self._too_slow)

    def handshakeCompleted(self):
        self.handshake_done = True
        self.certificate_name = tls.peer_account(self.transport)  # (mutual TLS: the account it may log in as)

    # -- the client's side ---------------------------------------------------

    def dataReceived(self, data):
        self.keepalive.heard()
        super().dataReceived(data)

    def _commandReceived(self, box):
        """Run a command now, or once one in flight is done; answers to our pushes are read meanwhile.

        With `commands_in_flight` running, as many more wait here, so the
        client's acknowledgements behind its own commands are still read (and
        written ahead of new messages); only then is the connection not read.
        """
        if self.in_flight >= self.limits.commands_in_flight:
            self._waiting_commands.append(box)
            if len(self._waiting_commands) >= self.limits.commands_in_flight:
                self._pause_reads("in flight")
            return
        self._run(box)

    def _run(self, box):
        """Run a command (server/protocol.py) and answer it once it is done, in order of completion."""
        ask, name = box.get(amp.ASK), box[amp.COMMAND]
        self.command_started()
        if self.locator.session is not None:
            self.locator.session.last_active = self.clock.seconds()  # (ListSessions shows it)
        try:
            answer = self.locator.run(name, box)
        except Exception:
            self._reply(Failure(), ask, name)
            return
        if isinstance(answer, Deferred):
            answer.addBoth(self._reply, ask, name)
        else:
            self._reply(answer, ask, name)

    def _reply(self, outcome, ask, name):
        """Answer with `outcome`: an answer box, or a Failure answered as a coded error."""
        self.command_finished()
        tag = amp.ANSWER
        if not isinstance(outcome, Failure):
            self.refusals = 0
            try:
                answer = encode(outcome.items())
            except amp.TooLong:  # (answers are paged to fit one AMP value: a bug)
                outcome = Failure()
        if isinstance(outcome, Failure):
            tag = amp.ERROR
            if outcome.check(RateLimited):
                self._refused()
            code, description = self.locator.error_of(outcome, name)  # (logs undeclared ones)
            if isinstance(description, str):
                description = description.encode("utf-8", "replace")
            answer = encode([(amp.ERROR_CODE, code), (amp.ERROR_DESCRIPTION, description)])
        if ask is None:  # the client asked for no answer
            return
        try:
            self.write(answer + encode([(tag, ask)]) + END)
        except ConnectionLost:
            pass  # the answer has no one to go to

    # -- reading less ------------------------------------------------------------

    def _pause_reads(self, why):
        if not self._read_pauses and self.transport is not None:
            self.transport.pauseProducing()
        self._read_pauses.add(why)

    def _resume_reads(self, why):
        if why in self._read_pauses:
            self._read_pauses.discard(why)
            if not self._read_pauses and self.transport is not None and not self.lost:
                self.transport.resumeProducing()

    def command_started(self):
        self.in_flight += 1

    def command_finished(self):
        self.in_flight -= 1
        if self.draining:
            if not self.in_flight:
                self.clock.callLater(0, self.close)  # once this answer is written
            return
        while self._waiting_commands and self.in_flight < self.limits.commands_in_flight and not self.lost:
            self._run(self._waiting_commands.popleft())
        if len(self._waiting_commands) < self.limits.commands_in_flight:
            self._resume_reads("in flight")

    def _refused(self):
        """A client that keeps sending what it was told to wait with is not read for a while.

        (Answering RATE_LIMITED is cheap, but not free: one flooding connection
        kept a core busy. Paused, it costs nothing until the pause ends.)
        """
        self.refusals += 1
        if self.refusals >= self.limits.refusals_before_pause and self._refusal_pause is None:
            log.warn(
                "not reading from {peer} for {pause:.0f} s: {count} commands refused in a row",
                peer=self.address,
                pause=self.limits.refusal_pause,
                count=self.refusals,
            )
            self.refusals = 0
            self._pause_reads("refused")
            self._refusal_pause = self.clock.callLater(self.limits.refusal_pause, self._refusal_pause_over)

    def _refusal_pause_over(self):
        self._refusal_pause = None
        self._resume_reads("refused")

    # -- logging in ----------------------------------------------------------------

    def logged_in(self):
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        if self.factory is not None:
            self.factory.authenticated(self)

    def logged_out(self):
        """Not logged in any more: the login deadline and the per-address count apply again."""
        self._deadline = self.clock.callLater(self.limits.login_deadline, self._too_slow)
        if self.factory is not None:
            self.factory.unauthenticated_again(self)

    def awaiting_second_factor(self, timeout):
        """A login waits for its second step (or enrolment): it has `timeout` seconds, whatever was left."""
        self._restart_deadline(timeout, f"the second step of a login was not taken within {timeout:.0f} s")

    def second_step_over(self):
        """That login's second step failed: the connection has the login deadline again to log in."""
        self._restart_deadline(self.limits.login_deadline, None)

    def _restart_deadline(self, seconds, reason):
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        if reason is None:
            self._deadline = self.clock.callLater(seconds, self._too_slow)
        else:
            self._deadline = self.clock.callLater(seconds, self.refuse, reason)

    def _too_slow(self):
        self._deadline = None
        if not self.handshake_done:
            self.refuse(f"the TLS handshake did not finish within {self.limits.login_deadline:.0f} s")
        else:
            self.refuse(f"not logged in within {self.limits.login_deadline:.0f} s")

    def _ping(self):
        if self.handshake_done:  # (before it, a ping would only wait in TLS's buffer)
            self.callRemote(commands.Ping).addErrback(lambda _: None)  # any answer is a sign of life

    def _silent(self):
        self.refuse(f"silent for {self.limits.drop_after:.0f} s")

    # -- pushes: IChatClient ---------------------------------------------------------

    def deliver(self, message):
        return self._push(commands.Deliver, wire.deliver_box(message))

    def deliver_encrypted(self, message, wrap):
        return self._push(commands.DeliverEncrypted, wire.deliver_encrypted_box(message, wrap))

    def receipt(self, receipt):
        return self._push(commands.Receipt, wire.receipt_box(receipt))

    def mode_changed(self, conversation_id):
        return self._push(commands.ModeChanged, wire.mode_changed_box(conversation_id))

    def devices_changed(self, username):
        return self._push(commands.DevicesChanged, wire.devices_changed_box(username))

    def transcript_signed(self, conversation_id, username, head):
        return self._push(commands.TranscriptSigned, wire.transcript_signed_box(conversation_id, username, head))

    def presence_changed(self, presence):
        return self._push(commands.PresenceChanged, wire.presence_box(presence))

    def conversation_changed(self, conversation):
        return self._push(commands.ConversationUpdated, wire.conversation_box(conversation))

    def invited(self, invitation):
        return self._push(commands.Invited, wire.invited_box(invitation))

    def invitation_accepted(self, conversation_id, username):
        return self._push(commands.InvitationAccepted, wire.invitation_accepted_box(conversation_id, username))

    def _push(self, command, encoded):
        """Send a push: a Deferred firing True once answered, else False; it never fails.

        A client that leaves too many unanswered is dropped; one that answers
        with an error is logged, so one broken client never breaks a fan-out.
        """
        self.unanswered += 1
        if self.unanswered > self.limits.max_unanswered:
            self.refuse(f"{self.limits.max_unanswered} pushes left unanswered")
        return self.send_command(encoded).addBoth(self._push_answered, command)

    def _push_answered(self, result, command):
        self.unanswered -= 1
        if not isinstance(result, Failure):
            return True
        if not result.check(ConnectionDone, ConnectionLost, ConnectionClosed):
            log.info(
                "{session} did not take {command}: {problem}",
                session=self.locator.session,
                command=command.commandName.decode(),
                problem=result.getErrorMessage(),
            )
        return False

    # -- our side: output the client does not read ------------------------------

    def write(self, data):
        if self._writes_paused:
            self.unread_output += len(data)
            if self.unread_output > self.limits.max_unread_output:
                self.refuse(f"more than {self.limits.max_unread_output} bytes of output unread")
                return
        super().write(data)

    def output_blocked(self):
        """The transport's buffer is full: the client is not reading."""
        self._writes_paused = True
        if self._stall is None:
            self._stall = self.clock.callLater(self.limits.write_stall, self._stalled)

    def output_flowing(self):
        self._writes_paused = False
        self.unread_output = 0
        if self._stall is not None and self._stall.active():
            self._stall.cancel()
        self._stall = None

    def _stalled(self):
        self._stall = None
        if not self.handshake_done:
            self.refuse(f"the TLS handshake stalled for {self.limits.write_stall:.0f} s")
        else:
            self.refuse(f"a write stalled for {self.limits.write_stall:.0f} s")

    # -- ending --------------------------------------------------------------------

    def session_ended(self, reason):
        session = self.locator.end_session()
        log.info("ended {session}: {reason}", session=session, reason=reason)
        self.close()

    def close(self):
        """Close cleanly after what is written so far, parsing nothing more."""
        if self.transport is None or self.lost:
            return
        self.refused = self.refused or "closing"
        self.transport.unregisterProducer()  # else TLS waits for it before closing
        if self._read_pauses:  # TLS must read the client's close_notify to finish
            self._read_pauses.clear()
            self.transport.resumeProducing()
        self.transport.loseConnection()

    def drain(self):
        """The server is stopping: read no more commands, close once those in flight are answered."""
        self.draining = True
        if self.transport is None:
            return
        self._pause_reads("draining")
        if not self.in_flight:
            self.close()

    def connectionLost(self, reason):
        self.lost = True
        for timer in (self._deadline, self._stall, self._refusal_pause):
            if timer is not None and timer.active():
                timer.cancel()
        if self.keepalive is not None:
            self.keepalive.stop()
        self.locator.end_session()
        if self.factory is not None:
            self.factory.gone(self)
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None


class ChatFactory(Factory):
    """Makes a ChatProtocol per admitted connection, all sharing the hub."""

    noisy = False

    def __init__(self, hub, clock, limits):
        self.hub = hub
        self.clock = clock
        self.limits = limits
        self.connections = set()
        self.unauthenticated = {}  # address -> count
        self._drained = None

    def drain(self, grace):
        """Deferred firing once every connection has closed; after `grace` seconds they are cut."""
        if not self.connections:
            return succeed(None)
        log.info("closing {count} connections (at most {grace} s)", count=len(self.connections), grace=grace)
        self._drained = Deferred()
        cut = self.clock.callLater(grace, self._cut)
        for connection in list(self.connections):
            connection.drain()
        return self._drained.addBoth(lambda result: cut.cancel() if cut.active() else None)

    def _cut(self):
        for connection in list(self.connections):
            log.warn("cutting {peer}: still busy after the grace time", peer=connection.address)
            connection.transport.abortConnection()

    def admit(self, addr):
        """May one more connection from `addr` start?"""
        address = address_key(peer_address(addr))
        if len(self.connections) >= self.limits.max_connections:
            log.warn("refusing {address}: {count} connections", address=address, count=len(self.connections))
            return False
        if self.unauthenticated.get(address, 0) >= self.limits.unauthenticated_per_address:
            log.warn("refusing {address}: too many connections not logged in", address=address)
            return False
        return True

    def buildProtocol(self, addr):
        protocol = ChatProtocol(self.hub, self.clock, self.limits, self)
        address = protocol.limit_key = address_key(peer_address(addr))
        self.connections.add(protocol)
        self.unauthenticated[address] = self.unauthenticated.get(address, 0) + 1
        return protocol

    def authenticated(self, protocol):
        if not protocol.authenticated:
            protocol.authenticated = True
            self._forget_unauthenticated(protocol.limit_key)

    def unauthenticated_again(self, protocol):
        if protocol.authenticated:
            protocol.authenticated = False
            self.unauthenticated[protocol.limit_key] = self.unauthenticated.get(protocol.limit_key, 0) + 1

    def gone(self, protocol):
        self.connections.discard(protocol)
        if not protocol.authenticated:
            self._forget_unauthenticated(protocol.limit_key)
        if self._drained is not None and not self.connections and not self._drained.called:
            self._drained.callback(None)

    def _forget_unauthenticated(self, address):
        left = self.unauthenticated.get(address, 1) - 1
        if left:
            self.unauthenticated[address] = left
        else:
            self.unauthenticated.pop(address, None)


class AdmittingTLSFactory(TLSMemoryBIOFactory):
    """TLS around a ChatFactory; a connection over its limits is closed before any TLS."""

    def buildProtocol(self, addr):
        if not self.wrappedFactory.admit(addr):
            return None
        return super().buildProtocol(addr)
