"""The hub: the services of a running daemon and the life of each logged-in session.

A session starts when a login succeeds (its Outbox is made, presence
updated, and once the login answer is out, everything pending is pushed)
and ends exactly once, however the connection goes: logout, disconnect,
a dead connection, or the server ending it.
"""

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from securechatd.server.delivery import Outbox
from securechatd.server.policy import deferred

log = Logger()
security = Logger(namespace="securechatd.security")


class Hub:
    def __init__(
        self, accounts, conversations, messages, receipts, presence, clock, window, max_pending, encrypted=None
    ):
        self.accounts = accounts
        self.conversations = conversations
        self.messages = messages
        self.receipts = receipts
        self.presence = presence
        self.encrypted = encrypted  # encrypted messages (server/encrypted.py): it takes each device's acknowledgements
        self.registry = accounts.registry
        self.store = accounts.store
        self.clock = clock
        self.window = window  # unanswered Delivers per session
        self.max_pending = max_pending  # messages per conversation pushed to a returning session

    @deferred
    async def check_sessions(self):
        """Sessions of accounts deleted or re-passworded by securechatd-admin end; their contacts hear of a deletion."""
        for username in await self.accounts.check_sessions():
            self.conversations.member_deleted(username)

    def session_started(self, session):
        """Call as the login is answered: the session goes online; pending messages follow next turn."""
        before = self.presence.status_of(session.username)
        session.outbox = Outbox(
            session,
            self.store,
            self.receipts,
            self.window,
            self.max_pending,
            self.clock,
            on_caught_up=lambda: self._push_receipts(session),
            acks=self.encrypted,
        )
        self.registry.activate(session)
        self.presence.session_started(session, before)
        self.clock.callLater(0, self._start_delivery, session)

    def _start_delivery(self, session):
        started = Deferred.fromCoroutine(session.outbox.start())
        started.addErrback(self._delivery_failed, session)

    def _delivery_failed(self, failure, session):
        """Delivery could not start: end the session, so the client logs in again (and retries)."""
        log.failure("delivery to {session} could not start", failure, session=session)
        if not session.outbox.closed:
            session.client.session_ended("delivery could not start; log in again")

    def _push_receipts(self, session):
        pushed = self.receipts.push_pending(session)
        pushed.addErrback(lambda failure: log.failure("receipts to {session}", failure, session=session))

    def session_ended(self, session):
        """Forget `session`: stop its deliveries and tell its contacts if the user's status changed."""
        session.end()
        if session.outbox is not None and not session.outbox.closed:
            session.outbox.close()
            self.presence.session_ended(session)
            security.info(
                "session of {username} ended",
                username=session.username,
                session_id=session.session_id,
                security_event="session_end",
            )
