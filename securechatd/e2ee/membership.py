"""Membership of an encrypted conversation: signed, hash-linked states (docs/E2EE.md, "Membership").

Who a message is encrypted to, and whom it is accepted from, comes from
these states, never from the server's member list: a member the server adds
on its own has no state a member signed, so no client encrypts to them. A
state's wire form is enc(fields + [signature]); `State` parses and
re-encodes it. `MembershipState` is what a client has verified so far; every
rule that fails raises its own MembershipError subclass, naming the epoch.

A conversation's mode (attestable or deniable) is set by signed `ModeEvent`s,
hash-linked among themselves and each made under a membership state its
actor is a member of; before the first, a conversation is attestable.
"""

import re
from dataclasses import dataclass, replace
from types import MappingProxyType

from securechatd.e2ee.chain import HASH_BYTES, ZERO_HASH
from securechatd.e2ee.encoding import Malformed, dec, digest, enc, field
from securechatd.e2ee.envelope import ATTESTABLE, MODES
from securechatd.e2ee.keys import DEVICE_ID_BYTES, SIGNATURE_BYTES

OPS = ("create", "add", "leave")
KINDS = ("direct", "group")
MAX_TITLE_BYTES = 200
MAX_MEMBERS = 1000  # the most any server allows (max_members): a state always fits one AMP value
SIGN_LABEL = "securechatd/membership/v1"
HASH_LABEL = "securechatd/membership-hash/v1"
MODE_SIGN_LABEL = "securechatd/mode/v1"
MODE_HASH_LABEL = "securechatd/mode-hash/v1"
DEFAULT_MODE = ATTESTABLE  # before a conversation's first mode event
_USER_NAME = re.compile(r"[a-z][a-z0-9_.-]{2,31}\Z")  # the stored form of docs/PROTOCOL.md's user names


def is_user_name(name):
    """True if `name` is a user name in its stored form: 3 to 32 of a-z, 0-9, '_', '.', '-', from a letter."""
    return isinstance(name, str) and _USER_NAME.match(name) is not None


@dataclass(frozen=True)
class State:
    """One membership state: the fields of docs/E2EE.md in order, `members` sorted, and the actor device's signature."""

    conversation: int
    epoch: int
    prev: bytes
    op: str
    kind: str
    title: str
    members: tuple
    actor: str
    actor_device: bytes
    signature: bytes = b""

    def __post_init__(self):
        object.__setattr__(self, "members", tuple(self.members))  # hashable and comparable, whatever was passed

    def fields(self):
        """The signed fields, in the order of docs/E2EE.md; the members are one field, enc(names)."""
        return [
            self.conversation,
            self.epoch,
            self.prev,
            self.op,
            self.kind,
            self.title,
            enc(self.members),
            self.actor,
            self.actor_device,
        ]

    def to_bytes(self):
        return enc(self.fields() + [self.signature])

    def hash(self):
        """What the next state's prev and a message header's `members` field name this state by."""
        return digest(HASH_LABEL, self.fields() + [self.signature])

    def check(self):
        """Malformed unless every field has the shape docs/E2EE.md gives it (rules between states: MembershipState)."""
        if not (0 <= self.conversation < 1 << 64 and 0 <= self.epoch < 1 << 64):
            raise Malformed("a membership state's conversation or epoch does not fit 8 bytes")
        lengths = (len(self.prev), len(self.actor_device), len(self.signature))
        if lengths != (HASH_BYTES, DEVICE_ID_BYTES, SIGNATURE_BYTES):
            raise Malformed("a membership state field has the wrong length")
        if self.op not in OPS or self.kind not in KINDS:
            raise Malformed(f"unknown membership op or kind {self.op[:16]!r}, {self.kind[:16]!r}")
        if len(field(self.title)) > MAX_TITLE_BYTES:
            raise Malformed(f"a conversation title is longer than {MAX_TITLE_BYTES} bytes")
        if not all(map(is_user_name, self.members + (self.actor,))):
            raise Malformed("a member or actor is not a user name")
        if list(self.members) != sorted(set(self.members)) or len(self.members) > MAX_MEMBERS:
            raise Malformed(f"the members are not sorted, not unique or more than {MAX_MEMBERS}")
        if self.kind == "direct" and (len(self.members) != 2 or self.title):
            raise Malformed("a direct conversation has exactly two members and no title")

    @classmethod
    def from_bytes(cls, data):
        """The state `data` encodes; Malformed if its shape is wrong (the signature is not checked here)."""
        conversation, epoch, prev, op, kind, title, members, actor, actor_device, signature = dec(data, 10)
        if len(conversation) != 8 or len(epoch) != 8:
            raise Malformed("a membership state number is not 8 bytes")
        try:
            op, kind, names = op.decode("ascii"), kind.decode("ascii"), [name.decode("ascii") for name in dec(members)]
            title, actor = title.decode("utf-8"), actor.decode("utf-8")
        except UnicodeDecodeError:
            raise Malformed("a text field of a membership state is not UTF-8 (or a name, op or kind not ASCII)")
        conversation, epoch = int.from_bytes(conversation, "big"), int.from_bytes(epoch, "big")
        state = cls(conversation, epoch, prev, op, kind, title, names, actor, actor_device, signature)
        state.check()
        return state


class MembershipError(ValueError):
    """A state that breaks a rule of docs/E2EE.md "Membership"; `epoch` is its place, the message names the rule."""

    def __init__(self, epoch, reason):
        super().__init__(f"membership state {epoch}: {reason}")
        self.epoch = epoch


class WrongConversation(MembershipError):
    """The state belongs to another conversation."""


class Gap(MembershipError):
    """The state is not the next one: epochs run on from 1, or from the last state verified, without a hole."""


class Fork(MembershipError):
    """The states do not extend what was seen: a prev not the hash before it, a seen state rewritten or gone."""


class BadFirstState(MembershipError):
    """Epoch 1 must be a create whose actor is one of its members."""


class Recreated(MembershipError):
    """A create after epoch 1: a conversation is created once."""


class KindChanged(MembershipError):
    """A later state changes the conversation's kind."""


class TitleChanged(MembershipError):
    """A later state changes the conversation's title (no op of v1 changes it)."""


class NotAMember(MembershipError):
    """The actor of an add or leave was not a member of the state before: only members change membership."""


class BadAdd(MembershipError):
    """An add whose members are not the ones before plus at least one new name."""


class BadLeave(MembershipError):
    """A leave whose members are not the ones before without the actor."""


class UnknownActorDevice(MembershipError):
    """The actor device is not a current device of the actor's verified chain (never added, revoked, chain unknown)."""


class BadSignature(MembershipError):
    """The signature is not the actor device's over the state's fields."""


class MembershipState:
    """A conversation's membership as far as verified: the latest state, its members, and each verified state's members.

    Immutable: extend() returns a new value and leaves this one as it was, so
    a batch that fails part-way changes nothing. `latest` may be a state this
    code verified before (its checks are not repeated): the state then
    continues from it, knowing no earlier state. `verified` maps the hash of
    each state verified to its members (extend's own argument).
    """

    def __init__(self, conversation, latest=None, verified=None):
        self.conversation = conversation
        self.latest = latest
        self.epoch = latest.epoch if latest else 0
        self.head = latest.hash() if latest else ZERO_HASH
        self.members = frozenset(latest.members) if latest else frozenset()
        self.kind = latest.kind if latest else None
        self.title = latest.title if latest else None
        if verified is None:
            verified = {self.head: self.members} if latest else {}
        self.verified = MappingProxyType(verified)

    def __repr__(self):
        return f"<MembershipState {self.conversation} epoch={self.epoch} members={len(self.members)}>"

    @property
    def seen(self):
        """(epoch, hash) of the latest state verified: what a client records to check the next fetch against."""
        return self.epoch, self.head

    @property
    def members_hash(self):
        """The `members` field of the header of a message sent now: the latest state's hash."""
        if self.latest is None:
            raise ValueError(f"no membership state of conversation {self.conversation} is verified yet")
        return self.head

    def members_at(self, state_hash):
        """The members of the verified state whose hash is `state_hash`; None if no state verified here has it."""
        return self.verified.get(state_hash)

    def is_member_at(self, state_hash, user):
        """True if `user` is a member of the verified state `state_hash`: only then is a message naming it accepted."""
        return user in (self.members_at(state_hash) or ())

    def extend(self, states, device_lookup, history_lookup=None):
        """The membership after `states`, which follow on from this one; else the error of the first that fails.

        device_lookup(user, device_id) gives the DeviceKeys of a current device
        of the user's verified chain, or None (see chain_lookup). The last of
        `states` must be signed by a current device; the ones before it may be
        checked with `history_lookup`, which also knows devices revoked since
        (chain_lookup(..., former=True)): a later state signed by a current
        device, hash-linked to them, vouches for them. So a member added after
        a device was revoked can still verify what it signed before.
        """
        return self._extend(states, device_lookup, 0, history_lookup)

    def _extend(self, states, device_lookup, seen_epoch, history_lookup=None):
        """extend(), taking states up to `seen_epoch` (checked when first seen) without their device and signature."""
        latest, verified = self.latest, dict(self.verified)
        states = list(states)
        for index, state in enumerate(states):
            lookup = device_lookup if history_lookup is None or index == len(states) - 1 else history_lookup
            self._check(state, latest, lookup if state.epoch > seen_epoch else None)
            latest = state
            verified[state.hash()] = frozenset(state.members)
        return MembershipState(self.conversation, latest, verified)

    def _check(self, state, latest, device_lookup):
        """Raise the error of the first rule `state` breaks as the state after `latest` (None: before epoch 1)."""
        state.check()
        at, head = (latest.epoch + 1, latest.hash()) if latest else (1, ZERO_HASH)
        if state.conversation != self.conversation:
            raise WrongConversation(at, f"it is conversation {state.conversation}'s, not {self.conversation}'s")
        if state.epoch != at:
            raise Gap(at, f"state {state.epoch} came where state {at} belongs")
        if state.prev != head:
            raise Fork(at, f"its prev is not the hash of state {at - 1}" if latest else "epoch 1's prev is not zero")
        if latest is None:
            if state.op != "create" or state.actor not in state.members:
                raise BadFirstState(at, "epoch 1 must be a create by one of its members")
        else:
            if state.op == "create":
                raise Recreated(at, "a conversation is created once, at epoch 1")
            if state.kind != latest.kind:
                raise KindChanged(at, f"the kind changed from {latest.kind} to {state.kind}")
            if state.title != latest.title:
                raise TitleChanged(at, "the title changed")
            before, after = set(latest.members), set(state.members)
            if state.actor not in before:
                raise NotAMember(at, f"{state.actor!r} was not a member of state {at - 1}")
            if state.op == "add" and not after > before:
                raise BadAdd(at, "an add must keep every member and add at least one name")
            if state.op == "leave" and after != before - {state.actor}:
                raise BadLeave(at, f"a leave must remove {state.actor!r} and no one else")
        if device_lookup is not None:
            keys = device_lookup(state.actor, state.actor_device)
            if keys is None or (keys.user, keys.device) != (state.actor, state.actor_device):
                raise UnknownActorDevice(at, f"{state.actor_device.hex()} is not a current device of {state.actor!r}")
            if not keys.verify(state.signature, SIGN_LABEL, state.fields()):
                raise BadSignature(at, f"the signature is not {state.actor_device.hex()}'s")


def verify_membership(conversation, states, device_lookup, seen=None, history_lookup=None):
    """The membership of `conversation` from all its states, in order, from epoch 1.

    `seen` is the (epoch, hash) this client verified last: Fork if `states`
    do not contain that state (rewritten, or cut short). The states up to it
    were checked when first seen and the hash links prove they are the same,
    so their signatures are not checked again: a device revoked since then
    does not undo them.
    """
    states = list(states)
    seen_epoch, seen_hash = seen or (0, ZERO_HASH)
    if len(states) < seen_epoch:
        raise Fork(len(states) + 1, f"the states end before state {seen_epoch}, which was seen")
    if seen_epoch and states[seen_epoch - 1].hash() != seen_hash:  # _extend checks that states[i] is state i + 1
        raise Fork(seen_epoch, "it is not the state seen before with this epoch")
    return MembershipState(conversation)._extend(states, device_lookup, seen_epoch, history_lookup)


def chain_lookup(chains, former=False):
    """A device_lookup over verified chains ({user: chain.ChainState}): a current device's DeviceKeys, else None.

    With `former`, a device revoked since is found too (a history_lookup).
    """

    def lookup(user, device_id):
        chain_state = chains.get(user)
        if chain_state is None:
            return None
        device = chain_state.devices.get(device_id) or (chain_state.former.get(device_id) if former else None)
        return device.keys if device is not None else None

    return lookup


def sign_state(state, device):
    """`state` with the signature of `device` (a keys.Device), the actor device it names."""
    if (device.user, device.id) != (state.actor, state.actor_device):
        raise ValueError("a membership state is signed by the actor device it names")
    return replace(state, signature=device.sign(SIGN_LABEL, state.fields()))


def _signed(state, device):
    """`state` signed by `device`, then checked for shape, so a builder never hands out a malformed state."""
    state = sign_state(state, device)
    state.check()
    return state


def create(conversation, kind, title, members, actor_device):
    """Epoch 1 of `conversation`, signed by `actor_device`, whose user is made a member (as CreateConversation does)."""
    names = sorted(set(members) | {actor_device.user})
    state = State(conversation, 1, ZERO_HASH, "create", kind, title, names, actor_device.user, actor_device.id)
    return _signed(state, actor_device)


def add(previous_state, names, actor_device):
    """The state after `previous_state` (a State) with `names` added, signed by `actor_device`, a member's device."""
    members = sorted(set(previous_state.members) | set(names))
    return _next(previous_state, "add", members, actor_device)


def leave(previous_state, actor_device):
    """The state after `previous_state` without `actor_device`'s user, signed by that device."""
    members = [name for name in previous_state.members if name != actor_device.user]
    return _next(previous_state, "leave", members, actor_device)


def _next(previous, op, members, actor_device):
    """The state after `previous` with `op` and `members`: same conversation, kind and title, linked by its hash."""
    state = replace(previous, epoch=previous.epoch + 1, prev=previous.hash(), op=op, members=members)
    return _signed(replace(state, actor=actor_device.user, actor_device=actor_device.id), actor_device)


# -- modes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModeEvent:
    """A signed choice of mode: event `number` (1, 2, ...) of a conversation, made under membership state `members`."""

    conversation: int
    number: int
    prev: bytes  # the hash of event number - 1; 32 zero bytes for event 1
    mode: str
    members: bytes  # the hash of the membership state the actor acts under
    actor: str
    actor_device: bytes
    signature: bytes = b""

    def fields(self):
        return [self.conversation, self.number, self.prev, self.mode, self.members, self.actor, self.actor_device]

    def to_bytes(self):
        return enc(self.fields() + [self.signature])

    def hash(self):
        """What the next event's prev and its chain link name this event by."""
        return digest(MODE_HASH_LABEL, self.fields() + [self.signature])

    def check(self):
        if not (0 <= self.conversation < 1 << 64 and 1 <= self.number < 1 << 64):
            raise Malformed("a mode event's conversation or number does not fit 8 bytes")
        lengths = (len(self.prev), len(self.members), len(self.actor_device), len(self.signature))
        if lengths != (HASH_BYTES, HASH_BYTES, DEVICE_ID_BYTES, SIGNATURE_BYTES):
            raise Malformed("a mode event field has the wrong length")
        if self.mode not in MODES or not is_user_name(self.actor):
            raise Malformed(f"unknown mode {self.mode[:16]!r}, or an actor that is not a user name")

    @classmethod
    def from_bytes(cls, data):
        conversation, number, prev, mode, members, actor, actor_device, signature = dec(data, 8)
        if len(conversation) != 8 or len(number) != 8:
            raise Malformed("a mode event number is not 8 bytes")
        try:
            mode, actor = mode.decode("ascii"), actor.decode("ascii")
        except UnicodeDecodeError:
            raise Malformed("a mode event's mode or actor is not ASCII")
        conversation, number = int.from_bytes(conversation, "big"), int.from_bytes(number, "big")
        event = cls(conversation, number, prev, mode, members, actor, actor_device, signature)
        event.check()
        return event


class ModeError(ValueError):
    """A mode event that breaks a rule of docs/E2EE.md "Modes"; `number` is its place, the message names the rule."""

    def __init__(self, number, reason):
        super().__init__(f"mode event {number}: {reason}")
        self.number = number


class ModeOutOfPlace(ModeError):
    """Not the next event of this conversation: another conversation, a number not next, a prev not the last hash."""


class ModeUnchanged(ModeError):
    """An event after the first that sets the mode already in force."""


class ModeActorNotMember(ModeError):
    """The actor is not a member of the membership state the event names (or that state is not verified)."""


class BadModeSignature(ModeError):
    """The actor device is not a current device of the actor's chain, or did not sign the event."""


def verify_modes(conversation, events, members, device_lookup):
    """The mode each of `events` (from event 1, in order) sets, or the ModeError of the first that fails.

    `members` is the verified MembershipState (the event's state must be
    one it verified); device_lookup as for MembershipState.extend.
    """
    modes, prev = [], ZERO_HASH
    for number, event in enumerate(events, 1):
        event.check()
        if (event.conversation, event.number, event.prev) != (conversation, number, prev):
            raise ModeOutOfPlace(number, f"it is not event {number} of conversation {conversation} after the last one")
        if modes and event.mode == modes[-1]:
            raise ModeUnchanged(number, f"the conversation is {event.mode} already")
        if not members.is_member_at(event.members, event.actor):
            raise ModeActorNotMember(number, f"{event.actor!r} is not a member of the state it names")
        keys = device_lookup(event.actor, event.actor_device)
        if keys is None or (keys.user, keys.device) != (event.actor, event.actor_device):
            raise BadModeSignature(number, f"{event.actor_device.hex()} is not a current device of {event.actor!r}")
        if not keys.verify(event.signature, MODE_SIGN_LABEL, event.fields()):
            raise BadModeSignature(number, f"the signature is not {event.actor_device.hex()}'s")
        modes.append(event.mode)
        prev = event.hash()
    return modes


def set_mode(previous, conversation, mode, members, actor_device):
    """The mode event after `previous` (a ModeEvent, or None for the first) setting `mode`, signed by `actor_device`.

    `members` is the hash of the latest membership state the actor verified.
    """
    number, prev = (previous.number + 1, previous.hash()) if previous is not None else (1, ZERO_HASH)
    event = ModeEvent(conversation, number, prev, mode, members, actor_device.user, actor_device.id)
    event = replace(event, signature=actor_device.sign(MODE_SIGN_LABEL, event.fields()))
    event.check()
    return event
