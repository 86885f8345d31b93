"""Logged-in sessions: the cred realm that creates them and the registry of live ones.

A session is the avatar of one logged-in connection. The registry is the
daemon's view of who is online, by user; presence and delivery build on it.
"""

import uuid

from twisted.cred.portal import IRealm
from twisted.internet.error import ConnectionClosed, ConnectionDone, ConnectionLost
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from securechatd.commands import NotAllowed
from securechatd.server.framing import encode_arguments

log = Logger()

MAX_UNANSWERED = 1000  # pushes (receipts, presence, ...) a client may leave unanswered


class IChatSession(Interface):
    """The avatar interface: a logged-in user on one connection."""


class IConnection(Interface):
    """What a session needs of its connection (the realm's `mind`)."""

    def session_ended(reason):
        """The server ended this session (e.g. a password change elsewhere)."""

    def refuse(why):
        """Drop the connection now: the client broke a limit."""

    def send_command(encoded):
        """Send a command box made by framing.encode_arguments; a Deferred of the answer."""


@implementer(IChatSession)
class Session:
    """One user logged in on one connection."""

    def __init__(self, registry, username, connection, client_name, started):
        self.registry = registry
        self.username = username
        self.session_id = uuid.uuid4().hex
        self.connection = connection
        self.client_name = client_name
        self.started = started
        self.status = "online"
        self.note = None
        self.status_changed = started
        self.outbox = None  # set by the delivery service when the session starts
        self.unanswered = 0  # pushes sent and not answered yet

    def push(self, command, **arguments):
        """Send a server-to-client command: a Deferred firing True once answered, else False.

        It never fails: a connection that went away or a client that answered
        with an error is logged, so one broken client never breaks a fan-out.
        """
        return self.push_encoded(command, encode_arguments(command, arguments))

    def push_encoded(self, command, encoded):
        """As `push`, with the arguments already encoded (shared by every recipient)."""
        return self._sent(self.connection.send_command(encoded), command)

    def _sent(self, pushed, command):
        """Count the push until it is answered; a client that answers none is dropped."""
        self.unanswered += 1
        if self.unanswered > MAX_UNANSWERED:
            self.connection.refuse(f"{MAX_UNANSWERED} pushes left unanswered")
        return pushed.addBoth(self._answered, command)

    def _answered(self, result, command):
        self.unanswered -= 1
        if not isinstance(result, Failure):
            return True
        if not result.check(ConnectionDone, ConnectionLost, ConnectionClosed):
            log.info(
                "{session} did not take {command}: {problem}",
                session=self,
                command=command.commandName.decode(),
                problem=result.getErrorMessage(),
            )
        return False

    def __repr__(self):
        return f"<Session {self.username} {self.session_id[:8]}>"

    def end(self):
        """Forget this session; idempotent."""
        self.registry.remove(self)


class SessionRegistry:
    """The live sessions of every user.

    A session counts against the session limit from the moment its login is
    accepted, but is *online* (gets pushes, shows in presence) only once its
    Login answer is on its way: nothing may reach a client before that answer.
    """

    def __init__(self):
        self._by_user = {}  # username -> {session_id: Session}, online or not yet
        self._online = {}  # username -> {session_id: Session}

    def add(self, session):
        self._by_user.setdefault(session.username, {})[session.session_id] = session

    def activate(self, session):
        if session.session_id in self._by_user.get(session.username, {}):
            self._online.setdefault(session.username, {})[session.session_id] = session

    def remove(self, session):
        for table in (self._by_user, self._online):
            sessions = table.get(session.username, {})
            if sessions.pop(session.session_id, None) is not None and not sessions:
                del table[session.username]

    def count(self, username):
        """Sessions of `username`, online or still logging in."""
        return len(self._by_user.get(username, ()))

    def all_sessions_of(self, username):
        """Every session of `username`, online or still logging in."""
        return list(self._by_user.get(username, {}).values())

    def sessions_of(self, username):
        """The online sessions of `username`."""
        return list(self._online.get(username, {}).values())

    def online_users(self):
        return set(self._online)


@implementer(IRealm)
class ChatRealm:
    """Turns an authenticated user name into a live Session, within the session limit."""

    def __init__(self, registry, clock, max_sessions):
        self.registry = registry
        self._clock = clock
        self.max_sessions = max_sessions

    def check_limit(self, username):
        """NOT_ALLOWED if `username` has all the sessions allowed (also checked before costly work)."""
        if self.registry.count(username) >= self.max_sessions:
            raise NotAllowed(f"Too many sessions: at most {self.max_sessions} logins per user at once.")

    def requestAvatar(self, avatarId, mind, *interfaces):
        if IChatSession not in interfaces:
            raise NotImplementedError("securechatd only has IChatSession avatars")
        connection, client_name = mind
        self.check_limit(avatarId)
        session = Session(self.registry, avatarId, connection, client_name, self._clock.seconds())
        self.registry.add(session)
        return IChatSession, session, session.end
