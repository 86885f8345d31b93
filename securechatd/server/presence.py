"""Presence: each session's status, the user's combined status, and who sees or hears of it.

A user's status is the most available of their sessions that are not
invisible (online, then busy, then away); with none, or when they chose to
appear offline to everyone (SetPrivacy), they are offline to everyone else.
`last_seen` is when they were last visible, unless they hide it.

Who sees it ([privacy] presence): `contacts` (the default), only the people
the user shares a conversation with of their own accord (store/privacy.py);
to anyone else they are offline with no note and no last seen, exactly as
someone offline who hides it, so a stranger learns nothing, not even that
anything is hidden. Changes are pushed to those same contacts. `everyone`:
any logged-in user sees it, and changes go to everyone who shares a
conversation with the user, as in version 1.
"""

from twisted.logger import Logger

from securechatd import commands
from securechatd.commands import InvalidArgument, NoSuchUser
from securechatd.records import Presence
from securechatd.server.accounts import existing_name
from securechatd.server.policy import check_limit, deferred, take, take_action

log = Logger()

VISIBLE = ("online", "busy", "away")  # most available first


def combined(sessions, own=False):
    """(status, note) of a user with these sessions: offline if the user appears offline, except to
    themselves (`own`)."""
    visible = [s for s in sessions if s.status in VISIBLE and (own or not s.appear_offline)]
    if not visible:
        return "offline", None
    best = min(visible, key=lambda s: (VISIBLE.index(s.status), -s.status_changed))
    return best.status, best.note


class PresenceService:
    def __init__(self, store, registry, clock, actions, searches, scope="contacts", directory_prefix=0):
        self.store = store
        self.registry = registry
        self.clock = clock
        self.actions = actions  # the TokenBucket shared with membership changes
        self.scope = scope  # [privacy] presence: "contacts" or "everyone"
        self.directory_prefix = directory_prefix  # [privacy] directory_prefix: ListUsers' shortest prefix
        self.searches = searches  # the TokenBucket of ListUsers per user: the directory cannot be paged through fast

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
        if self.scope == "contacts":
            audience = await self.store.audience(presence.username)
        else:
            audience = await self.store.contacts_of(presence.username)
        self.registry.tell(audience, lambda client: client.presence_changed(presence))

    def _seen_by(self, viewer, name, view):
        """(status, note, last_seen or None) of `name` as `viewer` may see them (`view`: a PresenceView)."""
        if name == viewer:
            status, note = combined(self.registry.sessions_of(name), own=True)
        elif self.scope == "contacts" and not view.consents:
            return "offline", None, None
        else:
            status, note = self.status_of(name)
        hidden = view.hide_last_seen and name != viewer
        return status, note, view.last_seen if status == "offline" and not hidden else None

    @deferred
    async def get(self, session, usernames):
        """[(username, status, note, last_seen or None)]; NO_SUCH_USER if one is not registered.

        Asking about anyone one shares no conversation with is a search of the
        directory (look_up).
        """
        if not 1 <= len(usernames) <= commands.MAX_PRESENCE_NAMES:
            raise InvalidArgument(f"Ask for 1 to {commands.MAX_PRESENCE_NAMES} users at a time.")
        names = [existing_name(name) for name in usernames]
        views = await self.look_up(session, names)
        rows = []
        for name in names:
            if name not in views:
                raise NoSuchUser(f"There is no user {name}.")
            rows.append((name, *self._seen_by(session.username, name, views[name])))
        return rows

    async def look_up(self, session, names):
        """{name: PresenceView} of those of `names` that exist (for the caller); a directory search of the
        caller's unless the caller shares a conversation with each (what answers NO_SUCH_USER tells who
        exists; a client fetches its conversations' members' chains whenever they change)."""
        views = await self.store.presence_view(session.username, set(names))
        if any(name != session.username and not (name in views and views[name].shared) for name in names):
            self._search(session)
        return views

    def _search(self, session):
        take(self.searches, session.username, "Too many searches of the directory")

    @deferred
    async def list_users(self, session, prefix, limit):
        """[(username, status)] of registered users whose names start with `prefix`, by name."""
        limit = check_limit(limit, commands.USERS_LIMIT)
        prefix = (prefix or "").lower()
        if len(prefix) < self.directory_prefix:
            raise InvalidArgument(f"Give at least the first {self.directory_prefix} characters of a name (prefix).")
        self._search(session)
        names = await self.store.list_users(prefix, limit)
        views = await self.store.presence_view(session.username, names)
        return [(name, self._seen_by(session.username, name, views[name])[0]) for name in names if name in views]

    @deferred
    async def set_privacy(self, session, hide_last_seen, appear_offline):
        """Set the caller's choices (None: unchanged): (hide_last_seen, appear_offline) after.

        Appearing offline (or no longer) is a presence change like any other:
        the user's contacts hear "offline" (or their status) at once.
        """
        if appear_offline is not None:
            take_action(self.actions, session)
        flags = await self.store.set_privacy(session.username, hide_last_seen, appear_offline)
        if flags is None:
            raise NoSuchUser("Your account no longer exists.")
        before = self.status_of(session.username)
        for own in self.registry.all_sessions_of(session.username):
            own.appear_offline = flags[1]
        self._changed(session.username, before)
        return flags

