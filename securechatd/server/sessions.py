"""Logged-in sessions: what services may tell a client, the realm that makes sessions, who is online.

A session is the avatar of one logged-in connection. Services speak to it
in domain terms (IChatClient); the connection layer alone turns that into
AMP. The registry is the daemon's view of who is online, by user, and owns
the one fan-out every service uses.
"""

import uuid

from twisted.cred.portal import IRealm
from twisted.internet.defer import succeed
from twisted.logger import Logger
from zope.interface import Interface, implementer

from securechatd.commands import NotAllowed

log = Logger()


class IChatSession(Interface):
    """The avatar interface: a logged-in user on one connection."""


class IChatClient(Interface):
    """What services may tell one logged-in client (the realm's `mind`).

    Implemented once, by the connection (server/connection.py). Each push
    returns a Deferred firing True once the client answered it and False if
    it did not (an error answer, the connection went); it never fails.
    """

    def deliver(message):
        """A new records.Message of one of the user's conversations."""

    def deliver_encrypted(message, wrap):
        """A new records.EncryptedMessage of one of the user's encrypted conversations, with
        `wrap`, the one for the device this session is bound to (its others are not sent)."""

    def receipt(receipt):
        """A records.Receipt: someone has delivered or read a conversation up to a seq."""

    def mode_changed(conversation_id):
        """A member published a mode event of an encrypted conversation: its chain is to be fetched again."""

    def devices_changed(username):
        """`username` (a contact, or the user) added or revoked a device: their chain is to be fetched again."""

    def transcript_signed(conversation_id, username, head):
        """A member's device signed a transcript head (bytes) of an encrypted conversation."""

    def presence_changed(presence):
        """A records.Presence of a contact."""

    def conversation_changed(conversation):
        """The user was added to a records.Conversation, or its members changed."""

    def session_ended(reason):
        """The server ended this session (e.g. a password change elsewhere); closes the connection."""


class IInvitationClient(Interface):
    """What services may tell a logged-in client of invitations (issue 13); the connection implements it too."""

    def invited(invitation):
        """The user was invited to a group: a store.privacy.Invitation."""

    def invitation_accepted(conversation_id, username):
        """`username` accepted an invitation to an encrypted group the user is a member of."""


@implementer(IChatSession)
class Session:
    """One user logged in on one connection; `client` is that connection's IChatClient."""

    def __init__(self, registry, username, client, client_name, started):
        self.registry = registry
        self.username = username
        self.session_id = uuid.uuid4().hex
        self.client = client
        self.client_name = client_name
        self.started = started
        self.status = "online"
        self.note = None
        self.status_changed = started
        self.outbox = None  # set by the hub when the session starts
        self.address = None  # the client's IP address, and the device the session is bound to
        self.device_id = None  # (32 hex digits; None: a session of version 1, bound to no device)
        self.generation = None  # the account's credential generation when it logged in
        self.last_active = started  # when its client last sent a command (ListSessions)
        self.appear_offline = False  # the user chose to appear offline to everyone (SetPrivacy)

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
        self.removed = []  # callables told of each session as it leaves (e.g. to note when it was last active)

    def add(self, session):
        self._by_user.setdefault(session.username, {})[session.session_id] = session

    def activate(self, session):
        if session.session_id in self._by_user.get(session.username, {}):
            self._online.setdefault(session.username, {})[session.session_id] = session

    def remove(self, session):
        present = session.session_id in self._by_user.get(session.username, {})
        for table in (self._by_user, self._online):
            sessions = table.get(session.username, {})
            if sessions.pop(session.session_id, None) is not None and not sessions:
                del table[session.username]
        if present:
            for told in self.removed:
                told(session)

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

    def logged_in_users(self):
        """Users with a session, online or still logging in."""
        return set(self._by_user)

    def tell(self, usernames, push, exclude=None, devices_only=False):
        """Call `push(session.client)` for every online session of `usernames` but `exclude`
        (with `devices_only`, of those bound to a device: a push of encrypted conversations).

        The one fan-out of the daemon, with one error policy: a push that
        raises is logged and counts as unanswered, and the others go on, so
        one broken client never breaks a broadcast. Returns {username:
        [Deferred of answered]} for the users who have an online session.
        """
        told = {}
        for name in usernames:
            sessions = self._online.get(name)
            if not sessions:
                continue
            answers = told[name] = []
            for session in list(sessions.values()):
                if session is exclude or (devices_only and session.device_id is None):
                    continue
                try:
                    answers.append(push(session.client))
                except Exception:
                    log.failure("a push to {session} failed", session=session)
                    answers.append(succeed(False))
        return told


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
        client, client_name = mind
        self.check_limit(avatarId)
        session = Session(self.registry, avatarId, client, client_name, self._clock.seconds())
        self.registry.add(session)
        return IChatSession, session, session.end
