"""Presence: each session's status, the user's combined status, and who hears of changes.

A user's status is the most available of their sessions that are not
invisible (online, then busy, then away); with none, they are offline to
everyone else. Changes are pushed to the sessions of every user who shares a
conversation with them. `last_seen` is when they were last visible.
"""

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from securechatd import commands
from securechatd.commands import InvalidArgument, NoSuchUser
from securechatd.server.accounts import existing_name, utc

log = Logger()

VISIBLE = ("online", "busy", "away")  # most available first
MAX_NOTE = 200  # bytes of UTF-8
MAX_NAMES = 100  # so an answer always fits one AMP value


def combined(sessions):
    """(status, note) of a user with these sessions."""
    visible = [s for s in sessions if s.status in VISIBLE]
    if not visible:
        return "offline", None
    best = min(visible, key=lambda s: (VISIBLE.index(s.status), -s.status_changed))
    return best.status, best.note


class PresenceService:
    def __init__(self, store, registry, clock):
        self.store = store
        self.registry = registry
        self.clock = clock

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

    def set_status(self, session, status, note):
        if status not in commands.STATUSES:
            raise InvalidArgument(f"status must be one of {', '.join(commands.STATUSES)}.")
        if note is not None and len(note.encode("utf-8")) > MAX_NOTE:
            raise InvalidArgument(f"A note is at most {MAX_NOTE} bytes of UTF-8.")
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
        notified = Deferred.fromCoroutine(self._notify(username, after, now))
        notified.addErrback(lambda failure: log.failure("presence of {user}", failure, user=username))

    async def _notify(self, username, status_note, now):
        status, note = status_note
        for contact in await self.store.contacts_of(username):
            for session in self.registry.sessions_of(contact):
                session.push(
                    commands.PresenceChanged, username=username, status=status, note=note, at=utc(now)
                )

    async def get(self, usernames):
        """Presence rows for `usernames`; NO_SUCH_USER if one is not registered."""
        if not 1 <= len(usernames) <= MAX_NAMES:
            raise InvalidArgument(f"Ask for 1 to {MAX_NAMES} users at a time.")
        names = [existing_name(name) for name in usernames]
        seen = await self.store.last_seen(names)
        rows = []
        for name in names:
            if name not in seen:
                raise NoSuchUser(f"There is no user {name}.")
            status, note = self.status_of(name)
            row = {"username": name, "status": status, "note": note, "last_seen": None}
            if status == "offline" and seen[name] is not None:
                row["last_seen"] = utc(seen[name])
            rows.append(row)
        return rows
