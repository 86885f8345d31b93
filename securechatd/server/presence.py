"""Presence: each session's status, the user's combined status, and who hears of changes.

A user's status is the most available of their sessions that are not
invisible (online, then busy, then away); with none, they are offline to
everyone else. Changes are pushed to the sessions of every user who shares a
conversation with them. `last_seen` is when they were last visible.
"""

from twisted.logger import Logger

from securechatd import commands
from securechatd.commands import InvalidArgument, NoSuchUser
from securechatd.records import Presence
from securechatd.server.accounts import existing_name
from securechatd.server.policy import check_limit, deferred, take_action

log = Logger()

VISIBLE = ("online", "busy", "away")  # most available first


def combined(sessions):
    """(status, note) of a user with these sessions."""
    visible = [s for s in sessions if s.status in VISIBLE]
    if not visible:
        return "offline", None
    best = min(visible, key=lambda s: (VISIBLE.index(s.status), -s.status_changed))
    return best.status, best.note


class PresenceService:
    def __init__(self, store, registry, clock, actions):
        self.store = store
        self.registry = registry
        self.clock = clock
        self.actions = actions  # the TokenBucket shared with membership changes

    def status_of(self, username):
        return combined(self.registry.sessions_of(username))

    def session_started(self, session, before):
        """`before` is the user's (status, note) before this session joined the registry."""
        self._changed(session.username, before)

    def session_ended(self, session):
        """Call after the session left the registry."""
        remaining = self.registry.sessions_of(session.username)
        before = combined([*remaining, session])
        self._changed(session.username, before)

    @staticmethod
    def check(status, note):
        """INVALID_ARGUMENT for a status word or note a session cannot have."""
        if status not in commands.STATUSES:
            raise InvalidArgument(f"status must be one of {', '.join(commands.STATUSES)}.")
        if note is not None and len(note.encode("utf-8")) > commands.MAX_NOTE_BYTES:
            raise InvalidArgument(f"A note is at most {commands.MAX_NOTE_BYTES} bytes of UTF-8.")

    @deferred
    async def set_status(self, session, status, note):
        self.check(status, note)
        take_action(self.actions, session)
        before = self.status_of(session.username)
        session.status, session.note = status, note
        session.status_changed = self.clock.seconds()
        self._changed(session.username, before)

    def _changed(self, username, before):
        after = self.status_of(username)
        if after == before:
            return
        now = self.clock.seconds()
        if after[0] == "offline" or before[0] == "offline":
            # last seen: the moment a visible user stopped, or started, being visible
            seen = self.store.set_last_seen(username, now)
            seen.addErrback(lambda failure: log.failure("last seen of {user}", failure, user=username))
        notified = self._notify(Presence(username, *after, now))
        notified.addErrback(lambda failure: log.failure("presence of {user}", failure, user=username))

    @deferred
    async def _notify(self, presence):
        contacts = await self.store.contacts_of(presence.username)
        self.registry.tell(contacts, lambda client: client.presence_changed(presence))

    @deferred
    async def get(self, session, usernames):
        """[(username, status, note, last_seen or None)]; NO_SUCH_USER if one is not registered."""
        if not 1 <= len(usernames) <= commands.MAX_PRESENCE_NAMES:
            raise InvalidArgument(f"Ask for 1 to {commands.MAX_PRESENCE_NAMES} users at a time.")
        names = [existing_name(name) for name in usernames]
        seen = await self.store.last_seen(names)
        rows = []
        for name in names:
            if name not in seen:
                raise NoSuchUser(f"There is no user {name}.")
            status, note = self.status_of(name)
            rows.append((name, status, note, seen[name] if status == "offline" else None))
        return rows

    @deferred
    async def list_users(self, session, prefix, limit):
        """[(username, status)] of registered users whose names start with `prefix`, by name."""
        limit = check_limit(limit, commands.USERS_LIMIT)
        names = await self.store.list_users((prefix or "").lower(), limit)
        return [(name, self.status_of(name)[0]) for name in names]
