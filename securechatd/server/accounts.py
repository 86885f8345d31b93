"""Accounts: registration, password and token logins and their second step, logout, password changes.

Authentication goes through a twisted.cred Portal: a bcrypt/SQLite password
checker, a resume-token checker and the checker of a login that passed its
second factor feed the ChatRealm, so another checker can be plugged in
without touching the protocol.

Two-factor login (docs/PROTOCOL.md, "Account security"). For an account
with it on, Login answers SECOND_FACTOR_REQUIRED whether the password was
right or wrong: the connection then holds a PendingLogin, not a session,
and the code decides. A wrong password gets exactly the same answer, the
same wait and the same code check, spending nothing, and fails at the code
(BAD_CREDENTIALS, the same text as a wrong code). The whole login (password
and code) is one throttled attempt, still in flight while the code is
awaited; one that never gets its code counts as failed whatever the
password was, so not even the throttle tells. What an unauthenticated
caller does learn is that a named account has two-factor login on (as
Register's USERNAME_TAKEN tells that a name exists); unknown names and
accounts without it answer BAD_CREDENTIALS alike, as before.
"""

import re
import secrets

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials, IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import Attribute, implementer

from securechatd.commands import (
    BAD_CREDENTIALS_TEXT,
    AuthRequired,
    BadCredentials,
    InvalidArgument,
    InvalidUsername,
    NoSuchDevice,
    NoSuchUser,
    NotAllowed,
    RateLimited,
    SECOND_FACTOR_TEXT,
    UsernameTaken,
)
from securechatd.e2ee.membership import is_user_name  # (the one user-name rule: states carry names too)
from securechatd.server import passwords
from securechatd.server.account_log import REPLAYED
from securechatd.server.passwords import token_hash
from securechatd.server.policy import deferred
from securechatd.server.sessions import ChatRealm, IChatSession, SessionRegistry
from securechatd.server.throttle import address_key, retry_text
from securechatd.server.twofactor import WRONG_CODE, check_code_argument
from securechatd.store.account_log import NewEvent

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


class SecondFactorNeeded(Exception):
    """Raised by a checker, through the Portal, for a login that must give its second factor (or enrol) first.

    `right`: whether the password was right, which no answer tells before
    the code is given; `enrol`: two-factor login is required and the
    account has none yet.
    """

    def __init__(self, username, generation, right=True, enrol=False, rehash=None):
        super().__init__(username)
        self.username = username
        self.generation = generation
        self.right = right
        self.enrol = enrol
        self.rehash = rehash  # (stored hash, password) to re-cost once the login completes, or None

    def __repr__(self):
        return f"<SecondFactorNeeded {self.username}>"


class IPendingLogin(ICredentials):
    """A login that gave its password and then its second factor (or enrolled): `passed` says it did."""

    username = Attribute("the user name")
    passed = Attribute("True once the second step succeeded")


@implementer(IPendingLogin)
class PendingLogin:
    """A login waiting for its second factor (`enrol` False) or, two-factor login being required, an enrolment.

    The connection holds it in place of a session: only SecondFactor (or
    BeginTwoFactor and ConfirmTwoFactor, to enrol), Logout and Ping work,
    until `deadline`. It holds its Login's throttled attempt, still open,
    and whether the password was right, which nothing tells before the code.
    """

    passed = False
    over = False  # its second step was tried, or it was abandoned: the connection forgets it
    confirming = False  # an enrolment's code is being checked

    def __init__(self, needed, attempt, client_name, address, device_id, deadline):
        self.username = needed.username
        self.generation = needed.generation
        self.right = needed.right
        self.enrol = needed.enrol
        self.rehash = needed.rehash
        self.attempt = attempt
        self.client_name = client_name
        self.address = address
        self.device_id = device_id
        self.deadline = deadline

    def __repr__(self):
        return f"<PendingLogin {self.username} {'enrolment' if self.enrol else 'second factor'}>"


@implementer(ICredentialsChecker)
class PasswordChecker:
    """bcrypt hashes in SQLite; an unknown user costs the same as a wrong password.

    An account with two-factor login on (or, `required`, one that must
    enrol) raises SecondFactorNeeded instead of logging in, right password
    or wrong, after the same bcrypt check and before any other work.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, store, hasher, required=False):
        self._store = store
        self._hasher = hasher
        self._required = required

    async def _check(self, credentials):
        found = await self._store.get_credentials(credentials.username)
        stored = found.password_hash if found else None
        right = await self._hasher.verify(credentials.password, stored)
        rehash = (stored, credentials.password) if right and self._hasher.needs_rehash(stored) else None
        if found is not None and found.two_factor:
            raise SecondFactorNeeded(found.username, found.generation, right, rehash=rehash)  # (re-costed later)
        if not right:
            raise UnauthorizedLogin()
        credentials.generation = found.generation
        await rehashed(self._store, self._hasher, found.username, rehash)
        if self._required:
            raise SecondFactorNeeded(found.username, found.generation, enrol=True)
        return found.username

    def requestAvatarId(self, credentials):
        return Deferred.fromCoroutine(self._check(credentials))


async def rehashed(store, hasher, username, rehash):
    """Store the password of `rehash` (stored hash, password) at the hasher's cost, if asked to."""
    if rehash is not None:
        stored, password = rehash
        await store.rehash_password(username, stored, await hasher.hash(password))


@implementer(ICredentialsChecker)
class ResumeTokenChecker:
    """Spends a stored resume token: no bcrypt, so reconnect storms are cheap.

    A token was only ever issued to a login that passed its second factor
    (switching two-factor login on revokes the others), so it needs none;
    with two-factor login `required`, an account that has none must enrol.
    """

    credentialInterfaces = (IResumeToken,)

    def __init__(self, store, clock, required=False):
        self._store = store
        self._clock = clock
        self._required = required

    async def _check(self, credentials):
        generation = await self._store.consume_resume_token(
            credentials.username, token_hash(credentials.token), self._clock.seconds()
        )
        if generation is None:
            raise UnauthorizedLogin()
        credentials.generation = generation
        if self._required:
            found = await self._store.get_credentials(credentials.username)
            if found is not None and not found.two_factor:
                raise SecondFactorNeeded(found.username, generation, enrol=True)
        return credentials.username

    def requestAvatarId(self, credentials):
        return Deferred.fromCoroutine(self._check(credentials))


@implementer(ICredentialsChecker)
class PendingLoginChecker:
    """A PendingLogin is a user once its second step passed (AccountService checked the code)."""

    credentialInterfaces = (IPendingLogin,)

    def requestAvatarId(self, credentials):
        return succeed(credentials.username) if credentials.passed else fail(UnauthorizedLogin())


class Attempt:
    """One throttled login attempt, from LoginThrottle.begin to its one end, however many steps it takes."""

    done = False

    def __init__(self, service, username, address, method, count_pending=True):
        self.service = service
        self.username = username
        self.address = address
        self.method = method
        try:
            service.throttle.begin(username, address_key(address), count_pending)
        except RateLimited as limited:
            security.warn(
                "login refused for {username} from {address}: {reason}",
                username=username,
                address=address,
                reason=str(limited),
                security_event="login_throttled",
            )
            raise

    def end(self, outcome, reason=None):
        """True (right), False (wrong: a failure, logged; `reason` what was wrong) or None (neither); once."""
        if self.done:
            return
        self.done = True
        self.service.throttle.end(self.username, address_key(self.address), outcome)
        if outcome is False:
            security.warn(
                "login failed for {username} from {address} by {method}",
                username=self.username,
                address=self.address,
                method=self.method,
                reason=reason,
                security_event="login_failed",
            )
            self.service.login_failed(self.username, self.address, reason or self.method)


MAX_CLIENT_NAME = 64  # characters of a Login's client_name kept (version 1 set no limit: longer is cut)
DEVICE_REFUSED = {"revoked": "revoked", "unknown": "not in the chain"}  # a store's refusal of a device: why


def _refuse_device(refused):
    """Raise why a login cannot bind to its device (a DEVICE_REFUSED key)."""
    if refused == "revoked":
        raise NotAllowed("This device was revoked: it cannot log in as one of your devices again.")
    raise NoSuchDevice(
        "This device is not in your device chain: add it from one of your devices first, or log in without device_id."
    )


class AccountService:
    """The account rules of PROTOCOL.md, for the protocol to call.

    `address` is the client's IP address, for throttling and the security log.
    `connection` is the realm's mind: told when the server ends the session.
    `certificate` is the account name of the connection's client certificate
    (mutual TLS), or None.
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
        log,
        two_factor,
        actions,
        second_factor_timeout=60.0,
        enrolment_timeout=600.0,
    ):
        self.store = store
        self.hasher = hasher
        self.clock = clock
        self.throttle = throttle
        self.registrations = registrations
        self.registration_exempt = frozenset(registration_exempt)
        self.token_lifetime = token_lifetime
        self.registration_open = registration_open
        self.log = log  # the AccountLog (server/account_log.py)
        self.two_factor = two_factor  # server/twofactor.py
        self.actions = actions  # device-signed actions (server/actions.py)
        self.timeouts = {False: second_factor_timeout, True: enrolment_timeout}  # by PendingLogin.enrol
        self.registry = SessionRegistry()
        self.registry.removed.append(self._session_left)
        self.realm = ChatRealm(self.registry, clock, max_sessions)
        required = two_factor.required
        self.portal = Portal(
            self.realm,
            [
                PasswordChecker(store, hasher, required),
                ResumeTokenChecker(store, clock, required),
                PendingLoginChecker(),
            ],
        )

    @deferred
    async def register(self, username, password, address, invite=None, certificate=None):
        """Create an account; with registration closed, only with a valid invitation; on a connection with a
        client certificate, only the account the certificate names (no one takes a name issued to another)."""
        username = normalize_username(username)
        self._check_certificate(certificate, username, address)
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
    async def login(self, username, password, client_name, address, connection, device_id=None, certificate=None):
        """(session, resume token) for a right password, else BadCredentials; or a PendingLogin
        for an account that gives a second factor (or must enrol) first.

        With `device_id` the session is bound to that device (see _issue_token).
        """
        username = normalize_username(username)
        if device_id is not None:
            check_device_id(device_id)
        self._check_certificate(certificate, username, address)
        self.realm.check_limit(username)
        credentials = UsernamePassword(username, password)

        async def verify():
            if not passwords.MIN_LENGTH <= len(password) <= passwords.MAX_LENGTH:
                raise UnauthorizedLogin()  # no hashing for what can never be right
            return await self._portal_login(credentials, client_name, connection)

        attempt = Attempt(self, username, address, "password")
        try:
            session = await self._attempt(attempt, verify)
        except SecondFactorNeeded as needed:
            return self._pending(needed, attempt, client_name, address, device_id)
        return session, await self._logged_in(session, credentials.generation, address, "password", device_id)

    @deferred
    async def resume(self, username, token, client_name, address, connection, device_id=None, certificate=None):
        """(session, new resume token) for a valid token, else BadCredentials; `device_id` as for login.

        A PendingLogin (an enrolment) when two-factor login is required and the account has none.
        """
        if device_id is not None:
            check_device_id(device_id)
        try:
            name = normalize_username(username)
        except InvalidUsername:
            name = None
        if name is not None:
            self._check_certificate(certificate, name, address)
            self.realm.check_limit(name)  # before the token is spent
        credentials = ResumeToken(name, token)

        async def verify():
            if name is None:
                raise UnauthorizedLogin()
            return await self._portal_login(credentials, client_name, connection)

        # an unguessable token: concurrent resumes (a reconnect storm) are not guesses
        attempt = Attempt(self, name or username[:64], address, "token", count_pending=False)
        try:
            session = await self._attempt(attempt, verify)
        except SecondFactorNeeded as needed:
            return self._pending(needed, attempt, client_name, address, device_id)
        return session, await self._logged_in(session, credentials.generation, address, "token", device_id)

    async def _portal_login(self, credentials, client_name, connection):
        client_name = client_name and client_name[:MAX_CLIENT_NAME]  # (what ListSessions shows: a page holds 100)
        _, session, _ = await self.portal.login(credentials, (connection, client_name), IChatSession)
        session.generation = credentials.generation  # (what check_sessions compares with the database)
        return session

    @staticmethod
    async def _attempt(attempt, verify, text=BAD_CREDENTIALS_TEXT):
        """Run `verify()` as `attempt`: UnauthorizedLogin becomes BAD_CREDENTIALS (`text`).

        SecondFactorNeeded leaves the attempt open: the caller decides how it ends.
        """
        try:
            result = await verify()
        except SecondFactorNeeded:
            raise
        except UnauthorizedLogin:
            attempt.end(False)
            raise BadCredentials(text)
        except BaseException:
            attempt.end(None)
            raise
        attempt.end(True)
        return result

    # -- the second step of a login ----------------------------------------------------

    def _pending(self, needed, attempt, client_name, address, device_id):
        """The PendingLogin of a login that gives its second factor (or enrols) next.

        A login waiting for its code keeps its attempt open: how it ends
        (code right, wrong, never given) is how the attempt ends. One that
        must enrol had the right password, and its answer says so (there is
        no second factor to hide it behind): that attempt succeeded.
        """
        if needed.enrol:
            attempt.end(True)
        pending = PendingLogin(
            needed, attempt, client_name, address, device_id, self.clock.seconds() + self.timeouts[needed.enrol]
        )
        security.info(
            "login of {username} from {address} waits for {what}",
            username=needed.username,
            address=address,
            what="an enrolment in two-factor login" if needed.enrol else "its second factor",
            security_event="login_enrolment" if needed.enrol else "login_second_factor",
        )
        return pending

    def timeout(self, pending):
        """Seconds `pending` may wait for its second step."""
        return self.timeouts[pending.enrol]

    @deferred
    async def second_factor(self, pending, code, connection):
        """(session, resume token) for the right code of a PendingLogin whose password was right.

        One code per login: a wrong code, a wrong password (the same answer)
        or a code too late ends it with BAD_CREDENTIALS; log in again. The
        login is over before anything is awaited, so codes sent one behind
        another find no login waiting (AUTH_REQUIRED), never a second try.
        """
        check_code_argument(code)  # (the login still waits)
        if pending.enrol:
            raise NotAllowed("This server requires two-factor login: enrol first (BeginTwoFactor, ConfirmTwoFactor).")
        pending.over = True
        try:
            if pending.device_id is not None:  # a device the session could not bind to must not spend the code
                refused = await self.store.device_binding(pending.username, pending.device_id)
                if refused:  # (before the code: a failure unless it is a new installation of the right password)
                    if pending.right and refused == "unknown":
                        pending.attempt.end(None)  # (it logs in again unbound, until a device of the user adds it)
                    else:
                        pending.attempt.end(False, f"device {DEVICE_REFUSED[refused]}" if pending.right else "password")
                    _refuse_device(refused)
            if self.clock.seconds() >= pending.deadline:
                pending.attempt.end(False, "second factor too late")
                raise BadCredentials(SECOND_FACTOR_TEXT)
            # a wrong password does the same work and spends nothing
            method = await self.two_factor.verify(pending.username, code, pending.address, commit=pending.right)
        except BaseException:
            pending.attempt.end(None)  # (unless it ended above: a store error must not hold the throttle)
            raise
        if method is None or not pending.right:
            pending.attempt.end(False, "code" if pending.right else "password")
            raise BadCredentials(SECOND_FACTOR_TEXT)
        return await self._passed(pending, connection, method)

    async def _passed(self, pending, connection, method):
        """The PendingLogin passed its second step: its session and resume token."""
        pending.passed = True
        try:
            session = await self._portal_login(pending, pending.client_name, connection)
        except BaseException:
            pending.attempt.end(None)
            raise
        pending.attempt.end(True)
        await rehashed(self.store, self.hasher, pending.username, pending.rehash)
        pending.rehash = None
        return session, await self._logged_in(session, pending.generation, pending.address, method, pending.device_id)

    @deferred
    async def begin_enrolment(self, pending):
        """BeginTwoFactor for a PendingLogin that must enrol: (secret, URI)."""
        if not pending.enrol:
            raise AuthRequired("Give your second factor first (SecondFactor), or Logout.")
        return await self.two_factor.begin(pending.username)

    @deferred
    async def confirm_enrolment(self, pending, code, connection):
        """ConfirmTwoFactor for a PendingLogin that must enrol: (recovery codes, session, resume token)."""
        if not pending.enrol:
            raise AuthRequired("Give your second factor first (SecondFactor), or Logout.")
        if self.clock.seconds() >= pending.deadline:
            raise NotAllowed("This login waited too long for its enrolment: log in again.")
        if pending.confirming:  # (two right codes sent at once would log the connection in twice)
            raise NotAllowed("An enrolment code of this login is being checked: wait for its answer.")
        event = NewEvent("second_factor_on", pending.address, target="at login")
        def confirm():
            return self.two_factor.confirm(pending.username, code, None, event)

        pending.confirming = True
        try:
            codes, generation = await self.throttled_code(pending.username, pending.address, "enrolment code", confirm)
        finally:
            pending.confirming = False
        pending.over = True
        pending.generation = generation
        pending.attempt = _Done()
        session, token = await self._passed(pending, connection, "password")
        return codes, session, token

    def abandon(self, pending, why):
        """The connection gave up `pending` (logged out, went, too slow): a failed attempt, whatever the password."""
        if not pending.over:
            pending.over = True
            pending.attempt.end(False, why if pending.right else "password")  # (the account log tells its owner)

    @deferred
    async def throttled(self, username, address, method, verify, text=None):
        """Run `verify()` (UnauthorizedLogin: wrong) as one throttled attempt for a code or password
        check of a logged-in user: a wrong one counts toward the login throttles."""
        attempt = Attempt(self, username, address, method)
        return await self._attempt(attempt, verify, text or BAD_CREDENTIALS_TEXT)

    @deferred
    async def throttled_code(self, username, address, method, run):
        """As `throttled`, for `run()`, a code check that raises BAD_CREDENTIALS for a wrong code."""

        async def verify():
            try:
                return await run()
            except BadCredentials:
                raise UnauthorizedLogin()

        return await self.throttled(username, address, method, verify, WRONG_CODE)

    async def _logged_in(self, session, generation, address, method, device_id):
        # (before any wait: a revoke of the device meanwhile finds the session and ends it)
        session.address, session.device_id = address, device_id
        try:
            token = await self._issue_token(session, generation)
            if token is None:  # the credentials changed while this login was being checked
                raise BadCredentials(BAD_CREDENTIALS_TEXT)
            event = NewEvent("login", address, session.session_id, bytes.fromhex(device_id or ""), method)
            started = await self.store.session_started(
                session.username, session.session_id, session.client_name, address, event, self.clock.seconds()
            )
        except BaseException:
            session.end()  # never leave a session that will not be answered
            raise
        if started is not None:
            logged, session.appear_offline = started
            self.log.added(logged)
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
        if outcome in DEVICE_REFUSED:
            self._device_refused(session, DEVICE_REFUSED[outcome])
            _refuse_device(outcome)
        return token if outcome == "recorded" else None

    def _device_refused(self, session, reason):
        """Tell the operator's security log and the user's account log (a revoked laptop trying is news to them):
        a session that proved its credentials, so nobody else can fill that log."""
        security.warn(
            "login refused for {username} on device {target}: {reason}",
            username=session.username,
            address=session.address,
            target=session.device_id,
            reason=reason,
            security_event="login_device_refused",
        )
        self.login_failed(session.username, session.address, f"device {reason}", bytes.fromhex(session.device_id))

    def login_failed(self, username, address, why, device=b""):
        """The login_failed event in `username`'s account log (the answer does not wait for it)."""
        self.log.record_quietly(username, NewEvent("login_failed", address, device=device, target=why))

    def _check_certificate(self, certificate, username, address):
        """NOT_ALLOWED if the connection's client certificate names another account than `username`: a failed
        attempt of the certificate's own account (throttled: its holder, not `username`, is held back), which
        `username`'s owner finds in their log too."""
        if certificate is not None and certificate != username:
            Attempt(self, certificate, address, "client certificate").end(False, f"used for {username}")
            self.login_failed(username, address, f"the client certificate of {certificate}")
            raise NotAllowed("This connection's client certificate is for another account.")

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
    async def check_password(self, username, password, address, what):
        """BAD_CREDENTIALS unless `password` is the user's own: bcrypt off the reactor thread (the hasher),
        one attempt of the login throttle (`what` names it), for changes a stolen session must not make."""

        async def verify():
            found = await self.store.get_credentials(username)
            if len(password) > passwords.MAX_LENGTH or not await self.hasher.verify(
                password, found.password_hash if found else None
            ):
                raise UnauthorizedLogin()

        await self.throttled(username, address, what, verify)

    @deferred
    async def change_password(self, session, old_password, new_password, address, action=(None, None, None)):
        """Replace the password, then end the user's other sessions and their tokens.

        `action`: (time, nonce, signature) of the session's device, optional
        (version 1 clients do not sign); logged in the same transaction.
        """
        passwords.check_rule(new_password)
        event = await self.actions.event(session, "password_change", "", *action, required=False)
        await self.check_password(session.username, old_password, address, "password change")
        hashed = await self.hasher.hash(new_password)
        logged = await self.store.change_password(
            session.username, hashed, self.clock.seconds(), session.session_id, event
        )
        if logged == "replayed":
            raise NotAllowed(REPLAYED)
        self.log.added(logged)
        changed = await self.store.get_credentials(session.username)
        if changed is not None:
            session.generation = changed.generation
        ended = self.end_sessions(session.username, "Your password was changed in another session.", keep=session)
        security.info(
            "password changed for {username} from {address}; {count} other sessions ended",
            username=session.username,
            address=address,
            count=len(ended),
            security_event="password_changed",
        )

    def end_sessions(self, username, reason, keep=None, session_ids=None):
        """End the live sessions of `username` (those of `session_ids`, else all) but `keep`: their connections
        close with `reason`. Returns those ended."""
        ended = [
            other
            for other in self.registry.all_sessions_of(username)
            if other is not keep and (session_ids is None or other.session_id in session_ids)
        ]
        for other in ended:
            other.end()
            other.client.session_ended(reason)
        return ended

    def _session_left(self, session):
        """A session left the registry: its resume token (if any) remembers when it was last active."""
        left = self.store.session_left(session.username, session.session_id, session.last_active)
        left.addErrback(lambda failure: log.failure("recording when {session} left", failure, session=session))


class _Done:
    """An attempt already over (an enrolment's: its codes were their own attempts)."""

    def end(self, outcome, reason=None):
        pass
