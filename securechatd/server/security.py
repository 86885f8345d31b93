"""A logged-in user's account security: their second factor, their sessions, their account log.

Every change here is a security event: it is logged in the user's account
log in the transaction that makes it, signed by the session's device when
the session is bound to one (server/actions.py), and codes typed here count
toward the login throttles, as a password typed to ChangePassword does, so
a stolen session cannot guess its way to switching the second factor off.
Switching it on takes the account's password too (a Login's enrolment
just gave it): else a session resumed from a stolen token could enrol its
own authenticator, end the owner's sessions and lock them out.
"""

import re

from twisted.cred.error import UnauthorizedLogin
from twisted.logger import Logger

from securechatd.commands import InvalidArgument, NoSuchSession, NoSuchUser, NotAllowed
from securechatd.server.account_log import REPLAYED
from securechatd.server.policy import deferred
from securechatd.server.twofactor import WRONG_CODE, check_code_argument

security = Logger(namespace="securechatd.security")

_SESSION_ID = re.compile(r"[0-9a-f]{32}\Z")
SESSION_PAGE = 100  # sessions per ListSessions answer (max_sessions live ones, and tokens)


class SecurityService:
    def __init__(self, accounts, two_factor, actions, log, clock):
        self.accounts = accounts
        self.registry = accounts.registry
        self.store = accounts.store
        self.two_factor = two_factor
        self.actions = actions
        self.log = log
        self.clock = clock

    # -- the second factor -----------------------------------------------------------

    @deferred
    async def status(self, session):
        return await self.two_factor.status(session.username)

    @deferred
    async def begin(self, session):
        """(base32 secret, otpauth URI) of a new enrolment; on only once ConfirmTwoFactor gets a right code."""
        return await self.two_factor.begin(session.username)

    @deferred
    async def confirm(self, session, code, password, action, address):
        """Switch the enrolment on: the recovery codes. The user's other sessions end (they never
        gave a second factor) and lose their resume tokens; this one keeps its own. The password
        first: a stolen session (or resume token) must not lock the owner out with its own authenticator."""
        check_code_argument(code)
        event = await self.actions.event(session, "second_factor_on", "", *action)
        await self._password(session.username, password, address)

        codes, generation = await self.accounts.throttled_code(
            session.username, address, "enrolment code",
            lambda: self.two_factor.confirm(session.username, code, session.session_id, event),
        )
        session.generation = generation
        ended = self.accounts.end_sessions(
            session.username, "Two-factor login was switched on in another session: log in again.", keep=session
        )
        self._changed(session, address, "second_factor_on", f"{len(ended)} other sessions ended")
        return codes

    @deferred
    async def confirm_enrolment(self, pending, code, password, connection):
        """ConfirmTwoFactor of a login that must enrol: that of a Login just gave the password, that of
        a Resume (a token, perhaps stolen) gives it now."""
        if pending.attempt.method == "token":
            check_code_argument(code)
            await self._password(pending.username, password, pending.address)
        return await self.accounts.confirm_enrolment(pending, code, connection)

    async def _password(self, username, password, address):
        """BAD_CREDENTIALS unless `password` is the user's: bcrypt off the reactor thread (the hasher),
        one attempt of the login throttle, as ChangePassword checks it."""
        if password is None:
            raise InvalidArgument("Give your password (password) to switch two-factor login on.")
        await self.accounts.check_password(username, password, address, "password (enrolment)")

    @deferred
    async def disable(self, session, code, action, address):
        """Switch two-factor login off, with a current code or a recovery code."""
        check_code_argument(code)
        await self._enabled(session, switching_off=True)
        event = await self.actions.event(session, "second_factor_off", "", *action)
        await self._code(session, code, address)
        await self.two_factor.disable(session.username, event)
        self._changed(session, address, "second_factor_off")

    @deferred
    async def new_recovery_codes(self, session, code, action, address):
        """Ten new recovery codes for a current code or a recovery code; the old ones are revoked."""
        check_code_argument(code)
        await self._enabled(session)
        event = await self.actions.event(session, "recovery_codes_new", "", *action)
        await self._code(session, code, address)
        codes = await self.two_factor.new_recovery_codes(session.username, event)
        self._changed(session, address, "recovery_codes_new")
        return codes

    async def _enabled(self, session, switching_off=False):
        """NOT_ALLOWED unless the caller's two-factor login is on (and, to switch it off, not required)."""
        enabled, required, _ = await self.two_factor.status(session.username)
        if switching_off and required:
            raise NotAllowed("This server requires two-factor login: it cannot be switched off.")
        if not enabled:
            raise NotAllowed("Two-factor login is not on.")

    async def _code(self, session, code, address):
        async def verify():
            if await self.two_factor.verify(session.username, code, address) is None:
                raise UnauthorizedLogin()

        await self.accounts.throttled(session.username, address, "code", verify, WRONG_CODE)

    @staticmethod
    def _changed(session, address, what, detail=None):
        security.info(
            "{what} for {username} from {address}",
            what=what,
            username=session.username,
            address=address,
            session_id=session.session_id,
            reason=detail,
            security_event=what,
        )

    # -- sessions ---------------------------------------------------------------------

    @deferred
    async def sessions(self, session):
        """([(session id, device id, client name, address, since, last active, online, this one)], has_more):
        the caller's sessions logged in now, then those that may come back (a resume token), each newest
        first: a page cut short leaves out the oldest, never an intruder's new session."""
        live = {other.session_id: other for other in self.registry.sessions_of(session.username)}
        live.setdefault(session.session_id, session)
        rows = [
            (s.session_id, s.device_id, s.client_name, s.address, s.started, s.last_active, True, s is session)
            for s in live.values()
        ]
        for token in await self.store.resumable_sessions(session.username, self.clock.seconds()):
            if token.session_id not in live:
                rows.append((*token, False, False))
        rows.sort(key=lambda row: (not row[6], -row[4], row[0]))
        return rows[:SESSION_PAGE], len(rows) > SESSION_PAGE

    @deferred
    async def end_session(self, session, session_id, action, address):
        """End one of the caller's other sessions: its connection closes, its resume token is revoked."""
        if not _SESSION_ID.match(session_id):
            raise InvalidArgument("A session_id is 32 lower-case hex digits.")
        if session_id == session.session_id:
            raise InvalidArgument("That is this session: Logout ends it.")
        event = await self.actions.event(session, "session_end", session_id, *action)
        live = [s for s in self.registry.all_sessions_of(session.username) if s.session_id == session_id]
        outcome = await self.store.end_sessions(
            session.username, [session_id], None, event, self.clock.seconds(), must_find=not live
        )
        if outcome is None:
            raise NoSuchSession("You have no such session (it may have ended already).")
        self._ended(session, outcome, address, [session_id])

    @deferred
    async def end_others(self, session, action, address):
        """End every other session of the caller (and revoke their resume tokens): how many there were."""
        event = await self.actions.event(session, "sessions_end_others", "", *action)
        outcome = await self.store.end_sessions(session.username, None, session.session_id, event, self.clock.seconds())
        live = {s.session_id for s in self.registry.all_sessions_of(session.username) if s is not session}
        return len(live | set(self._ended(session, outcome, address, None)))

    def _ended(self, session, outcome, address, session_ids):
        """End the live sessions the store call `outcome` revoked (or `session_ids`); the ids revoked."""
        revoked, logged = self._outcome(outcome)
        self.log.added(logged)
        ended = self.accounts.end_sessions(
            session.username, "This session was ended from another of your sessions.", keep=session,
            session_ids=session_ids,
        )
        security.info(
            "{count} sessions of {username} ended from {address}",
            count=len(set(revoked) | {s.session_id for s in ended}),
            username=session.username,
            address=address,
            session_id=session.session_id,
            security_event="sessions_ended",
        )
        return revoked

    @staticmethod
    def _outcome(outcome):
        if outcome == "replayed":
            raise NotAllowed(REPLAYED)
        if outcome is None:
            raise NoSuchUser("Your account no longer exists.")
        return outcome

    # -- the account log ---------------------------------------------------------------

    def account_log(self, session, after_seq, tree_size):
        return self.log.page(session.username, after_seq, tree_size)
