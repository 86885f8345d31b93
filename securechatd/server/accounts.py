"""Accounts: registration, password and token logins, logout, password changes.

Authentication goes through a twisted.cred Portal: a bcrypt/SQLite password
checker and a resume-token checker feed the ChatRealm, so another checker
can be plugged in without touching the protocol.
"""

import re
import secrets

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials, IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import Attribute, implementer

from securechatd.commands import (
    BAD_CREDENTIALS_TEXT,
    BadCredentials,
    InvalidArgument,
    InvalidUsername,
    NoSuchDevice,
    NoSuchUser,
    NotAllowed,
    RateLimited,
    UsernameTaken,
)
from securechatd.e2ee.membership import is_user_name  # (the one user-name rule: states carry names too)
from securechatd.server import passwords
from securechatd.server.passwords import token_hash
from securechatd.server.policy import deferred
from securechatd.server.sessions import ChatRealm, IChatSession, SessionRegistry
from securechatd.server.throttle import address_key, retry_text

log = Logger()
security = Logger(namespace="securechatd.security")

_DEVICE_ID = re.compile(r"[0-9a-f]{32}\Z")


def normalize_username(username):
    """The stored, lower-case form of `username`, or InvalidUsername."""
    lowered = username.lower()
    if not (username.isascii() and is_user_name(lowered)):
        raise InvalidUsername(
            "Usernames are 3 to 32 characters of a-z, 0-9, '_', '.' and '-',"
            " starting with a letter."
        )
    return lowered


def existing_name(username):
    """`username` normalized for lookup; a malformed name cannot exist: NO_SUCH_USER."""
    try:
        return normalize_username(username)
    except InvalidUsername:
        raise NoSuchUser(f"There is no user {username[:40]!r}.")


def check_device_id(device_id):
    """`device_id` if it is 32 lower-case hex digits (docs/E2EE.md: one spelling per device), else INVALID_ARGUMENT."""
    if not _DEVICE_ID.match(device_id):
        raise InvalidArgument("A device_id is 32 lower-case hex digits.")
    return device_id


class IResumeToken(ICredentials):
    """A user name and the single-use token a previous login handed out."""

    username = Attribute("the user name")
    token = Attribute("the resume token")


@implementer(IResumeToken)
class ResumeToken:
    def __init__(self, username, token):
        self.username = username
        self.token = token

    def __repr__(self):
        return f"<ResumeToken for {self.username}>"


@implementer(ICredentialsChecker)
class PasswordChecker:
    """bcrypt hashes in SQLite; an unknown user costs the same as a wrong password."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, store, hasher):
        self._store = store
        self._hasher = hasher

    async def _check(self, credentials):
        found = await self._store.get_credentials(credentials.username)
        stored = found.password_hash if found else None
        if not await self._hasher.verify(credentials.password, stored):
            raise UnauthorizedLogin()
        credentials.generation = found.generation
        if self._hasher.needs_rehash(stored):
            rehashed = await self._hasher.hash(credentials.password)
            await self._store.rehash_password(found.username, stored, rehashed)
        return found.username

    def requestAvatarId(self, credentials):
        return Deferred.fromCoroutine(self._check(credentials))


@implementer(ICredentialsChecker)
class ResumeTokenChecker:
    """Spends a stored resume token: no bcrypt, so reconnect storms are cheap."""

    credentialInterfaces = (IResumeToken,)

    def __init__(self, store, clock):
        self._store = store
        self._clock = clock

    async def _check(self, credentials):
        generation = await self._store.consume_resume_token(
            credentials.username, token_hash(credentials.token), self._clock.seconds()
        )
        if generation is None:
            raise UnauthorizedLogin()
        credentials.generation = generation
        return credentials.username

    def requestAvatarId(self, credentials):
        return Deferred.fromCoroutine(self._check(credentials))


class AccountService:
    """The account rules of PROTOCOL.md, for the protocol to call.

    `address` is the client's IP address, for throttling and the security log.
    `connection` is the realm's mind: told when the server ends the session.
    """

    def __init__(
        self,
        store,
        hasher,
        clock,
        throttle,
        registrations,
        registration_exempt,
        max_sessions,
        token_lifetime,
        registration_open,
    ):
        self.store = store
        self.hasher = hasher
        self.clock = clock
        self.throttle = throttle
        self.registrations = registrations
        self.registration_exempt = frozenset(registration_exempt)
        self.token_lifetime = token_lifetime
        self.registration_open = registration_open
        self.registry = SessionRegistry()
        self.realm = ChatRealm(self.registry, clock, max_sessions)
        self.portal = Portal(
            self.realm,
            [PasswordChecker(store, hasher), ResumeTokenChecker(store, clock)],
        )

    @deferred
    async def register(self, username, password, address, invite=None):
        """Create an account; with registration closed, only with a valid invitation."""
        username = normalize_username(username)
        passwords.check_rule(password)
        invite_hash = None
        if not self.registration_open:
            invite_hash = token_hash(invite or "")
            if not invite or not await self.store.invite_valid(invite_hash, self.clock.seconds()):
                self._register_refused(address, "no valid invitation", "register_refused")
                raise NotAllowed("Registration here needs a valid invitation.")
        elif address not in self.registration_exempt:
            wait = self.registrations.retry_after(address_key(address))
            if wait:
                self._register_refused(address, "rate limit", "register_throttled")
                raise RateLimited(f"Too many registrations from your address; {retry_text(wait)}.")
            self.registrations.record(address_key(address))  # at once: concurrent attempts count too
        if await self.store.get_credentials(username) is not None:
            raise UsernameTaken(f"The username {username} is taken.")
        hashed = await self.hasher.hash(password)
        if not await self.store.create_user(username, hashed, self.clock.seconds(), invite_hash):
            if invite_hash is not None and not await self.store.invite_valid(invite_hash, self.clock.seconds()):
                raise NotAllowed("Registration here needs a valid invitation.")
            raise UsernameTaken(f"The username {username} is taken.")
        security.info(
            "registered {username} from {address}",
            username=username,
            address=address,
            method="invitation" if invite_hash else "open",
            security_event="register",
        )
        return username

    def _register_refused(self, address, reason, event):
        security.warn(
            "registration refused for {address}: {reason}",
            address=address,
            reason=reason,
            security_event=event,
        )

    @deferred
    async def login(self, username, password, client_name, address, connection, device_id=None):
        """(session, resume token) for a right password, else BadCredentials.

        With `device_id` the session is bound to that device (see _issue_token).
        """
        username = normalize_username(username)
        if device_id is not None:
            check_device_id(device_id)

        self.realm.check_limit(username)
        credentials = UsernamePassword(username, password)

        async def verify():
            if not passwords.MIN_LENGTH <= len(password) <= passwords.MAX_LENGTH:
                raise UnauthorizedLogin()  # no hashing for what can never be right
            return await self._portal_login(credentials, client_name, connection)

        session = await self._attempt(username, address, "password", verify)
        return session, await self._logged_in(session, credentials, address, "password", device_id)

    @deferred
    async def resume(self, username, token, client_name, address, connection, device_id=None):
        """(session, new resume token) for a valid token, else BadCredentials; `device_id` as for login."""
        if device_id is not None:
            check_device_id(device_id)
        try:
            name = normalize_username(username)
        except InvalidUsername:
            name = None

        if name is not None:
            self.realm.check_limit(name)  # before the token is spent
        credentials = ResumeToken(name, token)

        async def verify():
            if name is None:
                raise UnauthorizedLogin()
            return await self._portal_login(credentials, client_name, connection)

        # an unguessable token: concurrent resumes (a reconnect storm) are not guesses
        session = await self._attempt(name or username[:64], address, "token", verify, count_pending=False)
        return session, await self._logged_in(session, credentials, address, "token", device_id)

    async def _portal_login(self, credentials, client_name, connection):
        _, session, _ = await self.portal.login(credentials, (connection, client_name), IChatSession)
        session.generation = credentials.generation  # (what check_sessions compares with the database)
        return session

    async def _attempt(self, username, address, method, verify, count_pending=True):
        """Run `verify()` as one throttled attempt: UnauthorizedLogin becomes BAD_CREDENTIALS."""
        try:
            self.throttle.begin(username, address_key(address), count_pending)
        except RateLimited as limited:
            security.warn(
                "login refused for {username} from {address}: {reason}",
                username=username,
                address=address,
                reason=str(limited),
                security_event="login_throttled",
            )
            raise
        outcome = None
        try:
            result = await verify()
            outcome = True
            return result
        except UnauthorizedLogin:
            outcome = False
            security.warn(
                "login failed for {username} from {address} by {method}",
                username=username,
                address=address,
                method=method,
                security_event="login_failed",
            )
            raise BadCredentials(BAD_CREDENTIALS_TEXT)
        finally:
            self.throttle.end(username, address_key(address), outcome)

    async def _logged_in(self, session, credentials, address, method, device_id):
        # (before any wait: a revoke of the device meanwhile finds the session and ends it)
        session.address, session.device_id = address, device_id
        try:
            token = await self._issue_token(session, credentials.generation)
        except BaseException:
            session.end()  # never leave a session that will not be answered
            raise
        if token is None:  # the password changed while this login was being checked
            session.end()
            raise BadCredentials(BAD_CREDENTIALS_TEXT)
        security.info(
            "login {username} from {address} by {method}",
            username=session.username,
            address=address,
            method=method,
            client_name=session.client_name,
            session_id=session.session_id,
            device_id=session.device_id,
            security_event="login",
        )
        return token

    async def _issue_token(self, session, generation):
        """A new resume token for `session`, or None if the credentials changed meanwhile.

        A session bound to a device gets one only if it may bind to it: a
        current device of the user's chain, or any device while the user has
        no chain. The store checks that in the token's transaction, so a
        revoke cannot slip between the check and the token.
        """
        token = secrets.token_urlsafe(32)
        now = self.clock.seconds()
        recording = (session.username, session.session_id, token_hash(token), now, now + self.token_lifetime, generation)
        if session.device_id is None:
            return token if await self.store.add_resume_token(*recording) else None
        outcome = await self.store.add_device_resume_token(*recording, session.device_id)
        if outcome == "revoked":
            self._device_refused(session, "revoked")
            raise NotAllowed("This device was revoked: it cannot log in as one of your devices again.")
        if outcome == "unknown":
            self._device_refused(session, "not in the chain")
            raise NoSuchDevice(
                "This device is not in your device chain: add it from one of your devices first,"
                " or log in without device_id."
            )
        return token if outcome == "recorded" else None

    def _device_refused(self, session, reason):
        security.warn(
            "login refused for {username} on device {target}: {reason}",
            username=session.username,
            address=session.address,
            target=session.device_id,
            reason=reason,
            security_event="login_device_refused",
        )

    @deferred
    async def logout(self, session):
        """Revoke the session's resume token, then end it."""
        await self.store.revoke_resume_token(session.username, session.session_id)
        session.end()
        security.info(
            "logout {username}",
            username=session.username,
            session_id=session.session_id,
            security_event="logout",
        )

    @deferred
    async def check_sessions(self):
        """End the sessions of accounts deleted, or whose password changed, behind the daemon's back.

        securechatd-admin deluser and passwd write the database from another
        process; this compares every logged-in user with it (one statement per
        1,000 users). Returns the names of the deleted users found.
        """
        names = self.registry.logged_in_users()
        if not names:
            return []
        live = await self.store.generations(sorted(names))
        deleted = []
        for name in names:
            generation = live.get(name)
            if generation is None:
                deleted.append(name)
                why = "Your account was deleted by an administrator."
            else:
                why = "Your password was changed by an administrator; log in again."
            for session in self.registry.all_sessions_of(name):
                if generation is None or session.generation not in (None, generation):
                    session.end()
                    session.client.session_ended(why)
                    security.info(
                        "session of {username} ended: {reason}",
                        username=name,
                        session_id=session.session_id,
                        reason="account deleted" if generation is None else "password changed",
                        security_event="session_end",
                    )
        return deleted

    @deferred
    async def change_password(self, session, old_password, new_password, address):
        """Replace the password, then end the user's other sessions and their tokens."""
        passwords.check_rule(new_password)

        async def verify():
            found = await self.store.get_credentials(session.username)
            if len(old_password) > passwords.MAX_LENGTH or not await self.hasher.verify(
                old_password, found.password_hash if found else None
            ):
                raise UnauthorizedLogin()

        await self._attempt(session.username, address, "password change", verify)
        hashed = await self.hasher.hash(new_password)
        await self.store.set_password(
            session.username, hashed, self.clock.seconds(), keep_session=session.session_id
        )
        changed = await self.store.get_credentials(session.username)
        if changed is not None:
            session.generation = changed.generation
        ended = [s for s in self.registry.all_sessions_of(session.username) if s is not session]
        for other in ended:
            other.end()
            other.client.session_ended("Your password was changed in another session.")
        security.info(
            "password changed for {username} from {address}; {count} other sessions ended",
            username=session.username,
            address=address,
            count=len(ended),
            security_event="password_changed",
        )
