"""Conversations: who belongs to which, creating, joining and leaving them.

Every conversation access goes through `member_of`, which answers
NO_SUCH_CONVERSATION alike for an id that does not exist and for one the
caller does not belong to, so ids reveal nothing. Conversations in use are
cached (members, last seq, latest membership state); the database stays the
truth and every change goes through this service.

A conversation is plaintext or end-to-end encrypted for life. An encrypted
one changes members only with a signed membership state (docs/E2EE.md,
"Membership"): its creator publishes epoch 1, and each AddMembers and
LeaveConversation carries the state after the change, checked by
server/membership.py and recorded in the transaction that changes the members.

Invitations ([privacy] invitations = on). Adding someone to a group who is
a stranger to the adder (not someone who shares a conversation with them of
their own accord, store/privacy.py) invites them instead: they are told
(Invited) and become a member only by accepting, so nobody is put in a
group, or streams their presence to it, without consent. In a plaintext
group acceptance is membership at once. In an encrypted group membership
is a signed state by a member device, which the invitee (not a member of
the state before) cannot make: an accepted invitation waits, the members
are told (InvitationAccepted), and any member's device completes it with
AddMembers and the signed state, as for anyone else it adds. Direct
conversations are never invitations: opening one is how people first reach
each other, and it shows a stranger's presence only once they write back.
"""

from twisted.internet.defer import Deferred, succeed

from securechatd import commands
from securechatd.commands import (
    InvalidArgument,
    InvitationRequired,
    NO_SUCH_CONVERSATION_TEXT,
    NoSuchConversation,
    NoSuchUser,
    NotAllowed,
)
from securechatd.e2ee.membership import MAX_TITLE_BYTES
from securechatd.server.accounts import existing_name
from securechatd.server.membership import MOVED_ON
from securechatd.server.policy import check_id, deferred, take_action
from securechatd.records import Conversation
from securechatd.store.privacy import Invitation

LISTING_PAGE = 100  # conversations per ListConversations page (cut further to fit one AMP value)
MEMBERSHIP_PAGE = 100  # states per GetMembership page (cut further to fit one AMP value)
INVITATIONS_PAGE = 100  # invitations per ListInvitations page (cut further to fit one AMP value)
PLAINTEXT_REFUSED = "This server refuses plaintext conversations: create it end-to-end encrypted."


def _usernames(names):
    """Normalized, de-duplicated user names (NO_SUCH_USER for a malformed one)."""
    return list(dict.fromkeys(existing_name(name) for name in names))


class ConversationService:
    def __init__(
        self, store, registry, clock, actions, max_members, checker=None, plaintext_allowed=True, invitations=False
    ):
        self.invitations_on = invitations  # [privacy] invitations = on: strangers are invited, not added
        self.store = store
        self.registry = registry
        self.clock = clock
        self.actions = actions  # the TokenBucket shared with presence changes
        self.max_members = max_members
        self.checker = checker  # a membership.MembershipChecker: encrypted conversations' states
        self.plaintext_allowed = plaintext_allowed  # [messages] plaintext = allowed
        self._cache = {}

    async def get(self, conversation_id):
        """The Conversation (members, last_seq), or None."""
        conversation = self._cache.get(conversation_id)
        if conversation is None:
            conversation = await self.store.conversation(conversation_id)
            if conversation is not None:
                conversation = self._cache.setdefault(conversation_id, conversation)
        return conversation

    def member_of(self, conversation_id, username):
        """Deferred: the Conversation if `username` belongs to it, else NO_SUCH_CONVERSATION."""
        conversation = self.loaded_member(conversation_id, username)
        if conversation is not None:
            return succeed(conversation)
        loaded = Deferred.fromCoroutine(self.get(conversation_id))
        return loaded.addCallback(self._only_member, conversation_id, username)

    def loaded_member(self, conversation_id, username):
        """As `member_of` without waiting: None if the conversation is not loaded yet.

        (Every message passes here; on a cache hit it costs no Deferred at all.)
        """
        conversation = self._cache.get(check_id(conversation_id))
        return conversation and self._only_member(conversation, conversation_id, username)

    @staticmethod
    def _only_member(conversation, conversation_id, username):
        if conversation is None or username not in conversation.members:
            raise NoSuchConversation(NO_SUCH_CONVERSATION_TEXT)
        return conversation

    def cached(self, conversation_id):
        """The current state of a conversation `get` or `member_of` has loaded."""
        return self._cache[conversation_id]

    def committed(self, conversation_id, seq):
        """A message took `seq`: keep the cached last seq current."""
        conversation = self._cache.get(conversation_id)
        if conversation is not None and seq > conversation.last_seq:
            self._cache[conversation_id] = conversation._replace(last_seq=seq)

    def _update(self, conversation):
        self._cache[conversation.id] = conversation
        return conversation

    async def _existing(self, names):
        missing = set(names) - await self.store.existing_users(names)
        if missing:
            raise NoSuchUser(f"There is no user {sorted(missing)[0]}.")

    def _check_size(self, count):
        if count > self.max_members:
            raise InvalidArgument(f"A conversation has at most {self.max_members} members.")

    async def _strangers(self, session, names):
        """Those of `names` a group adds by invitation: strangers to the caller (with invitations on)."""
        if not (self.invitations_on and names):
            return []
        consenting = await self.store.consenting(session.username, names)
        return [name for name in names if name not in consenting]

    @deferred
    async def create(self, session, members, title, encrypted=None):
        """(Conversation, created, [invited]): the pair's direct conversation, or a new group.

        `encrypted` None: encrypted unless plaintext is allowed. A pair has one
        direct conversation of each kind (plaintext, encrypted). A group's
        strangers are invited, not added (invitations on): GetInvitations
        lists them, and the group's members are the others.
        """
        if encrypted is None:
            encrypted = not self.plaintext_allowed
        elif not encrypted and not self.plaintext_allowed:
            raise NotAllowed(PLAINTEXT_REFUSED)
        others = [name for name in _usernames(members) if name != session.username]
        if not others:
            raise InvalidArgument("Name at least one other member.")
        self._check_size(len(others) + 1)
        if title is not None:
            title = title.strip()
            if not 0 < len(title) <= commands.MAX_TITLE:
                raise InvalidArgument(f"A title is 1 to {commands.MAX_TITLE} characters.")
            if encrypted and len(title.encode("utf-8")) > MAX_TITLE_BYTES:  # (a membership state's limit)
                raise InvalidArgument(
                    f"The title of an encrypted conversation is at most {MAX_TITLE_BYTES} bytes of UTF-8."
                )
        take_action(self.actions, session)
        await self._existing(others)
        now = self.clock.seconds()
        invited = []
        if len(others) == 1 and title is None:
            conversation, created = await self.store.direct_conversation(session.username, others[0], now, encrypted)
        else:
            strangers = await self._strangers(session, others)
            members = [session.username, *(name for name in others if name not in strangers)]
            group = await self.store.create_group(members, title, now, encrypted)
            conversation, created = group, True
            invited = await self._invite(session, group, strangers)
        self._update(conversation)
        if created:
            self.announce(conversation, conversation.members, origin=session)
        return conversation, created, invited

    @staticmethod
    def _membership_argument(conversation, membership, command):
        if conversation.encrypted and membership is None:
            raise NotAllowed(
                f"This conversation is end-to-end encrypted; {command} needs the signed membership state"
                " after the change (membership)."
            )
        if membership is not None and not conversation.encrypted:
            raise InvalidArgument("membership is for encrypted conversations only.")

    async def _previous_state(self, session, conversation):
        """The encrypted conversation's latest membership State, of which the caller must be a member."""
        previous = await self.checker.previous(conversation)
        if session.username not in previous.members:
            raise NotAllowed("You are not a member of this conversation's latest membership state.")
        return previous

    @deferred
    async def add_members(self, session, conversation_id, members, membership=None):
        """Add `members` to a group; those of them invited instead (strangers, invited now or before)."""
        conversation = await self.member_of(conversation_id, session.username)
        if conversation.kind == "direct":
            raise NotAllowed("Members cannot be added to a direct conversation; create a group.")
        self._membership_argument(conversation, membership, "AddMembers")
        if not members:
            raise InvalidArgument("Name at least one member to add.")
        names = [name for name in _usernames(members) if name not in conversation.members]
        self._check_size(len(conversation.members) + len(names))
        take_action(self.actions, session)
        state = previous = None
        if conversation.encrypted:
            previous = await self._previous_state(session, conversation)
            names = [name for name in names if name not in previous.members]
            if not names:
                raise NotAllowed("Everyone named is a member already: there is no change to sign.")
        if not names:
            return []
        await self._existing(names)
        strangers = await self._strangers(session, names)
        if strangers:
            strangers = sorted(set(strangers) - await self.store.accepted_invitations(conversation.id, strangers))
        if strangers and conversation.encrypted:
            raise InvitationRequired(
                f"{', '.join(strangers)} {'share' if len(strangers) > 1 else 'shares'} no conversation with you:"
                " invite them (InviteMembers); once they accept, a member adds them with the signed state."
            )
        await self._invite(session, conversation, strangers)
        names = [name for name in names if name not in strangers]
        if not names:
            return strangers
        if previous is not None:
            after = set(previous.members) | set(names)
            state = await self.checker.check(session, conversation, membership, "add", after, previous)
        updated = await self.store.add_members(conversation.id, names, self.clock.seconds(), state)
        if updated is None:
            raise NotAllowed(MOVED_ON)
        await self.store.drop_invitations(conversation.id, names)
        self._update(updated)
        self.announce(updated, updated.members, origin=session, joined=names)
        return strangers

    @deferred
    async def leave(self, session, conversation_id, membership=None):
        conversation = await self.member_of(conversation_id, session.username)
        if conversation.kind == "direct":
            raise NotAllowed("A direct conversation cannot be left.")
        self._membership_argument(conversation, membership, "LeaveConversation")
        take_action(self.actions, session)
        state = None
        if conversation.encrypted:
            previous = await self._previous_state(session, conversation)
            after = set(previous.members) - {session.username}
            state = await self.checker.check(session, conversation, membership, "leave", after, previous)
        updated = await self.store.remove_member(conversation.id, session.username, self.clock.seconds(), state)
        if updated is None:
            raise NotAllowed(MOVED_ON)
        self._update(updated)
        for own in self.registry.sessions_of(session.username):
            if own.outbox is not None:
                own.outbox.left(conversation.id)
        self.announce(updated, (*updated.members, session.username), origin=session, joined=())

    @staticmethod
    def check_writable(conversation):
        """NOT_ALLOWED for a direct conversation whose other account was deleted: no one would read it."""
        if conversation.kind == "direct" and len(conversation.members) < 2:
            raise NotAllowed("The other person's account was deleted; this conversation takes no more messages.")

    def member_deleted(self, username):
        """The account of `username` was deleted (its memberships with it): tell the others in loaded conversations."""
        for conversation in list(self._cache.values()):
            if username in conversation.members:
                members = tuple(name for name in conversation.members if name != username)
                updated = self._update(conversation._replace(members=members))
                self.announce(updated, members, joined=())

    def announce(self, conversation, usernames, origin=None, joined=None):
        """Tell every session of `usernames` but `origin` of the conversation's new state.

        New members' sessions (all members, for a new conversation) start
        receiving its messages from now on.
        """
        joined = conversation.members if joined is None else joined
        for name in joined:
            for session in self.registry.sessions_of(name):
                if session.outbox is not None:
                    session.outbox.joined(conversation.id, conversation.last_seq, conversation.encrypted)
        self.registry.tell(usernames, lambda client: client.conversation_changed(conversation), exclude=origin)

    @deferred
    async def listing(self, session, after_id):
        """([(Conversation, unread)] of the caller with ids above `after_id`, by id; has_more)."""
        rows = await self.store.conversations_of(session.username, after_id, LISTING_PAGE + 1)
        return rows[:LISTING_PAGE], len(rows) > LISTING_PAGE

    # -- membership states of encrypted conversations ---------------------------------

    async def _encrypted(self, session, conversation_id):
        conversation = await self.member_of(conversation_id, session.username)
        if not conversation.encrypted:
            raise NotAllowed("This conversation is not end-to-end encrypted: it has no membership states.")
        return conversation

    @deferred
    async def publish_membership(self, session, conversation_id, data):
        """Record `data`, epoch 1 of the encrypted conversation's membership, signed by the caller: its epoch."""
        conversation = await self._encrypted(session, conversation_id)
        take_action(self.actions, session)
        state = await self.checker.check(session, conversation, data, "create", conversation.members)
        updated = await self.store.publish_membership(conversation.id, state, self.clock.seconds())
        if updated is None:
            raise NotAllowed(MOVED_ON)
        self._update(updated)
        return state.epoch

    @deferred
    async def membership_states(self, session, conversation_id, after_epoch):
        """([state bytes] after epoch `after_epoch` (None: from the first), in order; has_more)."""
        after_epoch = after_epoch or 0
        if after_epoch < 0:
            raise InvalidArgument("after_epoch must be 0 or more.")
        conversation = await self._encrypted(session, conversation_id)
        return await self.store.membership_states(conversation.id, after_epoch, MEMBERSHIP_PAGE)

    # -- invitations (issue 13) -----------------------------------------------------------

    async def _invite(self, session, conversation, names):
        """Invite `names` (existing users, not members) to the group: those newly invited, who are told."""
        if not names:
            return []
        invited = await self.store.invite(conversation.id, session.username, names, self.clock.seconds())
        invitation = Invitation(
            conversation.id, conversation.kind, conversation.title, session.username, self.clock.seconds(), False,
            conversation.encrypted,
        )
        self.registry.tell(invited, lambda client: client.invited(invitation))
        return invited

    @deferred
    async def invite(self, session, conversation_id, members):
        """InviteMembers: invite `members` to a group the caller belongs to; the names newly invited."""
        conversation = await self.member_of(conversation_id, session.username)
        if conversation.kind == "direct":
            raise NotAllowed("Nobody can be invited to a direct conversation; create a group.")
        if not members:
            raise InvalidArgument("Name at least one person to invite.")
        names = [name for name in _usernames(members) if name not in conversation.members]
        self._check_size(len(conversation.members) + len(names))
        take_action(self.actions, session)
        await self._existing(names)
        return await self._invite(session, conversation, names)

    @deferred
    async def group_invitations(self, session, conversation_id):
        """([(username, inviter, invited_at, accepted)] to a group of the caller's, oldest first; has_more)."""
        conversation = await self.member_of(conversation_id, session.username)
        rows = await self.store.group_invitations(conversation.id, INVITATIONS_PAGE + 1)
        return rows[:INVITATIONS_PAGE], len(rows) > INVITATIONS_PAGE

    @deferred
    async def invitations(self, session):
        """([Invitation] of the caller, oldest first; has_more)."""
        rows = await self.store.invitations_of(session.username, INVITATIONS_PAGE + 1)
        return rows[:INVITATIONS_PAGE], len(rows) > INVITATIONS_PAGE

    @deferred
    async def answer_invitation(self, session, conversation_id, accept):
        """Accept or decline an invitation: True if the caller is now a member.

        Declining tells nobody. Accepting a plaintext group makes the caller a
        member at once; accepting an encrypted one waits for a member's signed
        state (the members are told, InvitationAccepted).
        """
        check_id(conversation_id)
        take_action(self.actions, session)
        conversation = await self.get(conversation_id)
        if conversation is None:
            raise NoSuchConversation(NO_SUCH_CONVERSATION_TEXT)
        join = not conversation.encrypted
        if accept and join:
            self._check_size(len(conversation.members) + 1)
        outcome = await self.store.answer_invitation(
            conversation.id, session.username, accept, join, self.clock.seconds()
        )
        if outcome is None:
            raise NoSuchConversation(NO_SUCH_CONVERSATION_TEXT)  # (no invitation: as if there were no group)
        if outcome == "accepted":
            self.registry.tell(
                conversation.members, lambda client: client.invitation_accepted(conversation.id, session.username)
            )
        if not isinstance(outcome, Conversation):
            return False
        self._update(outcome)
        self.announce(outcome, outcome.members, joined=[session.username])
        return True
