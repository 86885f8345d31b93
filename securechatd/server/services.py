"""Twisted services that own the daemon's resources and release them on stop."""

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import deferLater
from twisted.internet.error import CannotListenError
from twisted.logger import Logger, globalLogPublisher

from securechatd.audit import AuditLog

log = Logger()


class SequentialMultiService(MultiService):
    """Stops its children one after another, last added first, each waited for.

    (MultiService stops them all at once, which would close the database
    while connections are still finishing their commands.)
    """

    def stopService(self):
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_children())

    async def _stop_children(self):
        for child in reversed(list(self)):
            await maybeDeferred(child.stopService)


class AuditLogService(Service):
    """Writes security events to the audit log while the daemon runs."""

    def __init__(self, path, publisher=None):
        self.publisher = publisher or globalLogPublisher
        self.observer = AuditLog(path)  # opened now: a bad path stops start-up with one line

    def startService(self):
        super().startService()
        self.publisher.addObserver(self.observer)

    def stopService(self):
        super().stopService()
        self.publisher.removeObserver(self.observer)
        self.observer.close()


class ThreadPoolService(Service):
    """Runs a thread pool (bcrypt's) for as long as the daemon runs."""

    def __init__(self, pool):
        self.pool = pool

    def startService(self):
        super().startService()
        self.pool.start()

    def stopService(self):
        super().stopService()
        self.pool.stop()


class StoreService(Service):
    """Closes the database pool when the daemon stops, after every queued write.

    `before_close` are called first: services that gather writes for a while
    (EncryptedService's acknowledged wraps) queue what they hold.
    """

    def __init__(self, store, clock, before_close=()):
        self.store = store
        self.clock = clock
        self.before_close = before_close

    def stopService(self):
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self):
        # writes queued for the next turn (delivered marks, last-seen times) or held for later first
        await deferLater(self.clock, 0, lambda: None)
        for queue_what_is_held in self.before_close:
            queue_what_is_held()
        await self.store.flush()
        self.store.close()


class ListenerService(Service):
    """Listens on an endpoint; a port that cannot be bound stops start-up with one line.

    "listening on" is logged once the reactor runs, when twistd's signal
    handlers are in place: a supervisor (or a test) that sends SIGTERM as soon
    as it reads the line gets a clean stop, never a process ended by the signal.
    """

    port = None
    _listened = False

    def __init__(self, endpoint, factory, where, reactor, grace=10.0):
        self.endpoint = endpoint
        self.factory = factory
        self.where = where
        self.reactor = reactor
        self.grace = grace

    def privilegedStartService(self):
        """Bind before twistd drops privileges, so ports below 1024 work."""
        super().privilegedStartService()
        self._listen()

    def _listen(self):
        self._listened = True
        listening = self.endpoint.listen(self.factory)
        failures = []
        listening.addCallbacks(self._listening, failures.append)
        if failures:
            problem = failures[0].value
            if failures[0].check(CannotListenError):
                problem = problem.socketError
            raise SystemExit(f"securechatd: cannot listen on {self.where}: {problem}")

    def _listening(self, port):
        self.port = port
        self.reactor.callWhenRunning(log.info, "securechatd listening on {address}", address=port.getHost())

    def startService(self):
        if not self._listened:
            self._listen()
        super().startService()

    def stopService(self):
        """Stop accepting, then let every connection finish (within the grace time)."""
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self):
        if self.port is not None:
            port, self.port = self.port, None
            await port.stopListening()
        await self.factory.wrappedFactory.drain(self.grace)
