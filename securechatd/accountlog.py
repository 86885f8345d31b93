"""The account log's byte formats, and the checks a client makes of what the server shows it.

Each user's security events (logins and failures, second-factor changes,
recovery-code use, password changes, device adds and revokes, sessions
ended) form a hash chain: event n names the hash of event n-1, so no event
can be dropped, reordered or rewritten without breaking it. Each event's
chain head (user, n, hash) is then a leaf of one append-only RFC 9162 tree
(merkle.py) whose heads the server signs, so it cannot show a user two
histories without signing two tree heads that no consistency proof joins.
A salt in every event keeps its hash unguessable, so the proofs one user
gets say nothing of anyone else's events. Events a device starts carry
that device's signature over the action (ACTION_LABEL), which the server
cannot make. Every format is enc() fields after a label, as in docs/E2EE.md;
docs/PROTOCOL.md ("Account log") gives them byte by byte.

Pure functions over bytes: the server builds events with them, clients and
tests verify with them.
"""

import os
from dataclasses import dataclass, replace

from securechatd.e2ee import merkle
from securechatd.e2ee.encoding import Malformed, dec, digest, enc, labelled, sign, verify
from securechatd.e2ee.merkle import HASH_SIZE, TreeHead

EVENT_LABEL = "securechatd/account-event/v1"
LEAF_LABEL = "securechatd/account-leaf/v1"
ACTION_LABEL = "securechatd/account-action/v1"
ZERO_HASH = bytes(HASH_SIZE)  # the prev of a user's first event
SALT_BYTES = 16
NONCE_BYTES = 16
DEVICE_BYTES = 16
SIGNATURE_BYTES = 64
ACTION_WINDOW = 300  # seconds a signed action's time may differ from the server's clock

# What a device starts, and signs (the event's kind is the action's).
DEVICE_ACTIONS = (
    "session_end",
    "sessions_end_others",
    "second_factor_on",
    "second_factor_off",
    "recovery_codes_new",
    "password_change",
)
KINDS = DEVICE_ACTIONS + ("login", "login_failed", "recovery_code_used", "device_add", "device_revoke")


class LogError(Exception):
    """What the server showed is not a log it could have kept honestly; the text says where."""


class BrokenChain(LogError):
    """A user's events do not follow each other: one was dropped, reordered or rewritten."""


class BadTreeHead(LogError):
    """A tree head the server key did not sign, or a malformed one."""


class NotIncluded(LogError):
    """An event's chain head is not in the signed tree at the place the server named."""


class Inconsistent(LogError):
    """The signed tree does not extend the one seen before: the log was rewritten or forked."""


class BadAction(LogError):
    """An event a device started whose signature does not check with that device's key."""


@dataclass(frozen=True)
class Action:
    """A device's signature over an action it asked for: when (its clock, ms), a nonce, the signature."""

    time_ms: int
    nonce: bytes
    signature: bytes

    def to_bytes(self):
        return enc([self.time_ms, self.nonce, self.signature])

    @classmethod
    def from_bytes(cls, data):
        time_ms, nonce, signature = dec(data, 3)
        if len(time_ms) != 8 or len(nonce) != NONCE_BYTES or len(signature) != SIGNATURE_BYTES:
            raise Malformed("an action is an 8-byte time, a 16-byte nonce and a 64-byte signature")
        return cls(int.from_bytes(time_ms, "big"), nonce, signature)


def action_fields(user, device, kind, target, time_ms, nonce):
    """What a device signs (after ACTION_LABEL) to start `kind` on `target` (e.g. a session id)."""
    return [user, device, kind, target, time_ms, nonce]


def sign_action(private_key, user, device, kind, target, time_ms, nonce):
    """The device's Ed25519 signature over an action (`device`: its 16-byte id)."""
    return sign(private_key, ACTION_LABEL, action_fields(user, device, kind, target, time_ms, nonce))


@dataclass(frozen=True)
class Event:
    """One account event: the fields of docs/PROTOCOL.md in order.

    `device` is the 16-byte id of the device of the session it was done
    in (b"": a session bound to no device, or none), which signed `action`
    if it is one of DEVICE_ACTIONS (None: not signed); `session` the session
    it was done in (32 hex digits or ""); `target` what it was done to or
    how (a session id, a device id, a login method, a count), never a secret.
    """

    user: str
    seq: int
    prev: bytes
    time_ms: int
    kind: str
    address: str
    session: str
    device: bytes
    target: str
    salt: bytes
    action: Action | None = None

    def fields(self):
        return [
            self.user,
            self.seq,
            self.prev,
            self.time_ms,
            self.kind,
            self.address,
            self.session,
            self.device,
            self.target,
            self.salt,
            self.action.to_bytes() if self.action is not None else b"",
        ]

    def to_bytes(self):
        return enc(self.fields())

    def hash(self):
        """The user's chain head after this event: the next event's prev."""
        return digest(EVENT_LABEL, self.fields())

    def leaf_entry(self):
        """The entry of the Merkle log: the user's chain head (user, seq, hash)."""
        return labelled(LEAF_LABEL, [self.user, self.seq, self.hash()])

    def leaf(self):
        """The leaf hash (RFC 9162: SHA-256(0x00 || entry)) the tree holds for this event."""
        return merkle.leaf_hash(self.leaf_entry())

    def signed_fields(self):
        return action_fields(self.user, self.device, self.kind, self.target, self.action.time_ms, self.action.nonce)

    @classmethod
    def from_bytes(cls, data):
        """The Event `data` encodes; Malformed if it is not one."""
        user, seq, prev, time_ms, kind, address, session, device, target, salt, action = dec(data, 11)
        if len(seq) != 8 or len(time_ms) != 8 or len(prev) != HASH_SIZE or len(salt) != SALT_BYTES:
            raise Malformed("an event's numbers are 8 bytes, its prev 32 and its salt 16")
        if len(device) not in (0, DEVICE_BYTES):
            raise Malformed("an event's device is 16 bytes or none")
        try:
            user, kind, address, session, target = (v.decode("utf-8") for v in (user, kind, address, session, target))
        except UnicodeDecodeError:
            raise Malformed("an event's text is not UTF-8") from None
        parsed = cls(
            user,
            int.from_bytes(seq, "big"),
            prev,
            int.from_bytes(time_ms, "big"),
            kind,
            address,
            session,
            device,
            target,
            salt,
            Action.from_bytes(action) if action else None,
        )
        if parsed.action is not None and not device:
            raise Malformed("an event with a device's action names the device")
        return parsed


def new_event(user, seq, prev, now, kind, address="", session="", device=b"", target="", action=None, salt=None):
    """Event `seq` of `user` after the head `prev`, at `now` (seconds of the injected clock), with a fresh salt."""
    return Event(
        user,
        seq,
        prev,
        round(now * 1000),
        kind,
        address or "",
        session or "",
        device or b"",
        target or "",
        salt if salt is not None else os.urandom(SALT_BYTES),
        action,
    )


# -- tree heads and proofs ----------------------------------------------------------


def head_bytes(head):
    """A signed tree head on the wire: enc([size, root, timestamp_ms, signature])."""
    return enc([head.size, head.root, head.timestamp_ms, head.signature])


def parse_head(data):
    """The TreeHead of head_bytes(); Malformed if it is not one."""
    size, root, timestamp_ms, signature = dec(data, 4)
    if len(size) != 8 or len(timestamp_ms) != 8 or len(root) != HASH_SIZE or len(signature) != SIGNATURE_BYTES:
        raise Malformed("a tree head is an 8-byte size, a 32-byte root, an 8-byte time and a 64-byte signature")
    return TreeHead(int.from_bytes(size, "big"), root, int.from_bytes(timestamp_ms, "big"), signature)


def proof_bytes(hashes):
    """A proof (inclusion or consistency) on the wire: its 32-byte hashes one after another."""
    return b"".join(hashes)


def parse_proof(data):
    if len(data) % HASH_SIZE:
        raise Malformed("a proof is a run of 32-byte hashes")
    return [data[at : at + HASH_SIZE] for at in range(0, len(data), HASH_SIZE)]


# -- what a client checks -----------------------------------------------------------


@dataclass(frozen=True)
class Known:
    """What a client keeps of its log: its last event (seq, hash) and the last tree head it verified."""

    seq: int = 0
    hash: bytes = ZERO_HASH
    head: TreeHead | None = None


@dataclass(frozen=True)
class Entry:
    """One event as GetAccountLog answers it: its bytes, its leaf's index and its inclusion proof."""

    event: bytes
    leaf_index: int
    proof: bytes


def check_tree_head(server_key, data, known_head=None, consistency=b""):
    """The TreeHead `data`, signed by `server_key` (an Ed25519 public key) and extending `known_head`.

    BadTreeHead if it is malformed or not signed; Inconsistent if it is
    smaller than the head seen before, or `consistency` does not prove the
    old tree a prefix of this one (the log was rewritten, or the server
    shows someone else another log).
    """
    try:
        head = parse_head(data)
    except Malformed as problem:
        raise BadTreeHead(f"not a tree head: {problem}")
    if not merkle.verify_tree_head(server_key, head):
        raise BadTreeHead(f"the tree head of size {head.size} is not signed by the server key")
    if known_head is not None and known_head.size > 0:
        try:
            proof = parse_proof(consistency)
        except Malformed as problem:
            raise Inconsistent(f"not a consistency proof: {problem}")
        if not merkle.verify_consistency(known_head.size, head.size, known_head.root, head.root, proof):
            raise Inconsistent(
                f"the tree of {head.size} leaves does not extend the one of {known_head.size} seen before"
            )
    return head


def check_entries(user, entries, head, known=None, device_key=None):
    """Check a page of `user`'s events against a verified tree head; the new Known.

    Each event must follow the one before it (the first follows `known`),
    be `user`'s, and have its leaf at its index of `head`'s tree. An event
    a device started must carry a signature that checks with
    `device_key(device_id_bytes)` (the device's Ed25519 public key from the
    user's verified device chain, or None if that device is unknown).
    """
    known = known or Known()
    seq, last = known.seq, known.hash
    for entry in entries:
        try:
            event = Event.from_bytes(entry.event)
        except Malformed as problem:
            raise BrokenChain(f"event after {seq} is malformed: {problem}")
        if event.user != user:
            raise BrokenChain(f"event {event.seq} is {event.user!r}'s, not {user!r}'s")
        if event.seq != seq + 1 or event.prev != last:
            raise BrokenChain(f"event {event.seq} does not follow event {seq}: dropped, reordered or rewritten")
        try:
            path = parse_proof(entry.proof)
        except Malformed as problem:
            raise NotIncluded(f"event {event.seq}: {problem}")
        if not merkle.verify_inclusion(event.leaf(), entry.leaf_index, head.size, path, head.root):
            raise NotIncluded(f"event {event.seq} is not leaf {entry.leaf_index} of the tree of {head.size}")
        if event.kind in DEVICE_ACTIONS and event.device and event.action is None:
            raise BadAction(f"event {event.seq} ({event.kind}) names device {event.device.hex()} but is not signed")
        if event.action is not None and device_key is not None:
            public = device_key(event.device)
            if public is None or not verify(public, event.action.signature, ACTION_LABEL, event.signed_fields()):
                raise BadAction(f"event {event.seq} ({event.kind}) is not signed by device {event.device.hex()}")
        seq, last = event.seq, event.hash()
    return replace(known, seq=seq, hash=last, head=head)
