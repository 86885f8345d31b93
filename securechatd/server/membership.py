"""Signed membership states of encrypted conversations, as the server checks them.

Who is in an encrypted conversation is decided by the signed, hash-linked
states of docs/E2EE.md ("Membership"), which every client verifies; the
server checks them too (defence in depth), so that an honest server never
stores a state a client would refuse and a buggy client or a stranger cannot
break a conversation's membership: each state's shape, its place (epoch and
prev), its actor (the caller, on the device its session is bound to, a
current device of the caller's chain), its op and kind, its member set (the
server's own change: the names added, or the caller removed) and the actor
device's signature, checked off the reactor thread by the injected runner.

A state that passes is recorded in the transaction that makes the member
change (server/conversations.py), which checks its place again.
"""

from securechatd.commands import BadSignature, InvalidArgument, NoSuchDevice, NotAllowed, NoSuchUser
from securechatd.e2ee.chain import ZERO_HASH
from securechatd.e2ee.encoding import Malformed
from securechatd.e2ee.membership import SIGN_LABEL, State
from securechatd.server.keys import signed_by
from securechatd.store.messaging import NewState

MOVED_ON = "The membership of this conversation changed; fetch it (GetMembership) and sign the change again."
NO_MEMBERSHIP = "This conversation has no membership state yet: its creator publishes epoch 1 (PublishMembership)."


def parse_state(data):
    """The e2ee.membership.State `data` encodes (its shape checked), or INVALID_ARGUMENT saying why not."""
    try:
        return State.from_bytes(data)
    except Malformed as problem:
        raise InvalidArgument(f"Not a membership state: {problem}.")


def _current(device):
    return device is not None and device.revoked_seq is None


class MembershipChecker:
    """Checks a membership state a member sends with a change of an encrypted conversation."""

    def __init__(self, store, run_in_thread):
        self.store = store
        self._run = run_in_thread

    async def previous(self, conversation):
        """The conversation's latest State (NOT_ALLOWED if it has none yet)."""
        if not conversation.epoch:
            raise NotAllowed(NO_MEMBERSHIP)
        data = await self.store.latest_membership(conversation.id)
        if data is None:  # (recorded with the epoch it names, in one transaction)
            raise NotAllowed(NO_MEMBERSHIP)
        return State.from_bytes(data)

    async def check(self, session, conversation, data, op, members, previous=None):
        """The NewState to record for `data`, the state after `op` leaves the conversation with `members`.

        `conversation` is the Conversation as the caller's change found it,
        `previous` its latest State (None for `create`). Raises the coded
        error of the first check that fails, in the order of docs/PROTOCOL.md.
        """
        if session.device_id is None:
            raise NotAllowed(
                "This conversation is end-to-end encrypted: log in with your device_id to change its membership."
            )
        state = parse_state(data)
        if state.conversation != conversation.id:
            raise InvalidArgument(
                "This membership state is another conversation's than the one it is sent to."
            )
        if state.actor != session.username:
            raise NotAllowed("The actor of a membership state you send must be you.")
        if state.actor_device.hex() != session.device_id:
            raise NotAllowed("The actor device of a membership state must be the device this session is bound to.")
        if state.op != op:
            raise NotAllowed(f"This change takes a membership state whose op is {op!r}, not {state.op!r}.")
        if previous is None and conversation.epoch:
            raise NotAllowed(MOVED_ON)
        epoch, prev = (previous.epoch + 1, previous.hash()) if previous is not None else (1, ZERO_HASH)
        if state.epoch != epoch or state.prev != prev:
            raise NotAllowed(MOVED_ON)
        if state.kind != conversation.kind or state.title != (conversation.title or ""):
            raise NotAllowed("A membership state keeps the conversation's kind and title.")
        if state.members != tuple(sorted(members)):
            raise NotAllowed("The members of this state are not the conversation's members after this change.")
        chain = await self.store.chain_state(session.username, [session.device_id])
        if chain is None:
            raise NoSuchUser("Your account no longer exists.")
        device = chain.devices.get(session.device_id)
        if not _current(device):
            raise NoSuchDevice(f"Device {session.device_id} is not a current device of your chain.")
        if not await self._run(signed_by, device.sig_pub, state.signature, SIGN_LABEL, state.fields()):
            raise BadSignature("The membership state's signature does not check with its actor device's key.")
        return NewState(state.epoch, state.prev, state.hash(), data)
