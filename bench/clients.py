"""Lean AMP-over-TLS clients, all in the generator's one reactor.

The generator shares the machine's two cores with the daemon, so its
clients do as little as possible: pushes are answered at once from the raw
box (no argument parsing, no callbacks beyond a counter), and messages are
sent with `callRemoteString`. Logins use the typed commands, so a refusal
arrives as its error code.
"""

import time
from collections import Counter
from datetime import datetime, timezone

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.task import deferLater
from twisted.protocols import amp
from twisted.python.failure import Failure

from securechatd import commands
from securechatd.tls import client_options

CALL_TIMEOUT = 120  # seconds: no login or set-up call may hang a run
_SERVER_TIME = amp.DateTime().toString(datetime.fromtimestamp(0, timezone.utc))
_TLS = {}


def error_code(failure):
    """A short name for why a call failed: the AMP error code, else the exception type."""
    value = failure.value
    code = getattr(value, "code", None) or getattr(value, "errorCode", None)
    if isinstance(code, bytes):
        return code.decode()
    return type(value).__name__


class BenchClient(amp.AMP):
    """One connection. Answers every push at once; `on_deliver(client, box)` sees Delivers and DeliverEncrypteds."""

    def __init__(self):
        super().__init__()
        self.user = None
        self.lost = False
        self.on_deliver = None
        self.pushes = Counter()
        self.closed = defer.Deferred()
        self._responders = {
            b"Deliver": self._deliver,
            b"DeliverEncrypted": self._deliver_encrypted,
            b"Receipt": self._acknowledge,
            b"PresenceChanged": self._acknowledge,
            b"ConversationUpdated": self._acknowledge,
            b"Ping": self._ping,
        }

    def locateResponder(self, name):
        return self._responders.get(name)

    def _deliver(self, box):
        self.pushes[b"Deliver"] += 1
        if self.on_deliver is not None:
            self.on_deliver(self, box)
        return amp.AmpBox()

    def _deliver_encrypted(self, box):
        self.pushes[b"DeliverEncrypted"] += 1
        if self.on_deliver is not None:
            self.on_deliver(self, box)
        return amp.AmpBox()

    def _acknowledge(self, box):
        self.pushes[box[amp.COMMAND]] += 1
        return amp.AmpBox()

    def _ping(self, box):
        self.pushes[b"Ping"] += 1
        return amp.AmpBox(server_time=_SERVER_TIME)

    def send_message(self, conversation_id, client_msg_id, body):
        """SendMessage from pre-encoded bytes; Deferred of the raw answer box."""
        return self.callRemoteString(
            b"SendMessage", True, conversation_id=conversation_id,
            client_msg_id=client_msg_id, body=body,
        )

    def connectionLost(self, reason):
        self.lost = True  # before AMP fails the calls in flight, whose errbacks may look
        super().connectionLost(reason)
        self.closed.callback(None)


def connect(reactor, target, protocol=BenchClient):
    """Deferred BenchClient (or `protocol`), TCP-connected; its first commands wait for the TLS handshake."""
    if target.ca not in _TLS:
        _TLS[target.ca] = client_options(target.ca, "localhost")
    endpoint = wrapClientTLS(
        _TLS[target.ca], TCP4ClientEndpoint(reactor, target.host, target.port, timeout=30)
    )
    return connectProtocol(endpoint, protocol())


async def login(reactor, client, user, password, tokens, device_id=None):
    """Log `client` in as `user`: Resume if tokens holds one (and keep the new one), else Login.

    With `device_id` (32 hex digits) the session is bound to that device.
    """
    bound = {} if device_id is None else {"device_id": device_id}
    if tokens.get(user):
        call = client.callRemote(commands.Resume, username=user, resume_token=tokens[user], **bound)
    else:
        call = client.callRemote(commands.Login, username=user, password=password, **bound)
    answer = await call.addTimeout(CALL_TIMEOUT, reactor)
    tokens[user] = answer["resume_token"]
    client.user = user
    return answer


async def login_many(reactor, target, users, concurrency, password, tokens, protocol=BenchClient, devices=None):
    """Log users in with at most `concurrency` in flight (`devices`: {user: device id} to bind sessions to).

    Returns ({user: client}, latencies in s from connect start to the
    login answer, Counter of error codes). Failed connections are closed.
    """
    semaphore = defer.DeferredSemaphore(max(1, concurrency))
    logged_in, latencies, errors = {}, [], Counter()

    async def one(user):
        started = time.perf_counter()
        client = None
        try:
            client = await connect(reactor, target, protocol)
            await login(reactor, client, user, password, tokens, (devices or {}).get(user))
        except Exception:
            errors[error_code(Failure())] += 1
            if client is not None:
                client.transport.loseConnection()
            return
        latencies.append(time.perf_counter() - started)
        logged_in[user] = client

    await defer.DeferredList(
        [semaphore.run(lambda u=user: defer.Deferred.fromCoroutine(one(u))) for user in users]
    )
    return logged_in, latencies, errors


def sleep(reactor, seconds):
    return deferLater(reactor, seconds, lambda: None)


async def wind_down(reactor, starts, timers, clients):
    """The end of a paced workload: no more sends start, the last messages arrive, every client closes."""
    for start in starts:
        if start.active():
            start.cancel()
    for timer in timers:
        if timer.running:
            timer.stop()
    await sleep(reactor, 0.5)
    await close_all(reactor, clients)


async def close_all(reactor, clients, timeout=10):
    """Close every connection and wait (at most `timeout` s) until they are gone.

    It first lets the reactor turn once: when called from a Deliver handler
    (the last message arrived) the answer to that Deliver, its
    acknowledgement, is written only after the handler returns.
    """
    await deferLater(reactor, 0, lambda: None)
    for client in clients:
        if client.transport is not None:
            client.transport.loseConnection()
    closing = defer.DeferredList([client.closed for client in clients])
    await closing.addTimeout(timeout, reactor).addErrback(lambda _: None)


async def register(reactor, target, users, password, want_tokens, concurrency=20):
    """Register `users` over the wire (USERNAME_TAKEN counts as done); {user: token or None}.

    With `want_tokens`, each user logs in once with the password for a resume token.
    """
    semaphore = defer.DeferredSemaphore(concurrency)
    tokens = {}

    async def one(user):
        client = await connect(reactor, target)
        try:
            try:
                await client.callRemote(commands.Register, username=user, password=password)
            except commands.UsernameTaken:
                pass
            if want_tokens:
                await login(reactor, client, user, password, tokens)
        finally:
            client.transport.loseConnection()

    await defer.gatherResults(
        [semaphore.run(lambda u=user: defer.Deferred.fromCoroutine(one(u))) for user in users]
    )
    return {user: tokens.get(user) for user in users}
