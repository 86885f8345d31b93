"""The pairwise session with one peer device: X3DH then the Double Ratchet, behind one interface.

This is what the client library calls (docs/E2EE.md, "Encrypted messages" →
Wrap): `initiate` from a prekey bundle or `accept` a first message, then
`encrypt` and `decrypt` wraps, and save the session with `to_bytes` in the
same atomic write as the message that changed it. Every method that fails
leaves the session as it was.

Like libsignal, a session keeps a few earlier states besides the current
one: when two devices start sessions with each other at the same time, each
accepts the other's and still decrypts what was sent under its own, and the
two converge on whichever state last decrypted a message.
"""

import struct
from dataclasses import dataclass
from typing import NamedTuple

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from securechatd.e2ee import x3dh
from securechatd.e2ee.encoding import Malformed, dec, enc
from securechatd.e2ee.keys import LowOrderKey
from securechatd.e2ee.ratchet import HEADER_BYTES, Ratchet, RatchetError

RATCHET_MESSAGE = 1
FIRST_MESSAGE = 2  # carries the X3DH prefix, until the peer has answered
PREFIX = struct.Struct(">32sII")  # EK_A, spk_id, opk_id
TAG_BYTES = 16
SESSION_VERSION = b"securechatd-session-v1"
ARCHIVED = 4  # earlier states kept beside the current one


class NoSession(RatchetError):
    """A ratchet message (type 1) from a device we have no session with, or encrypting before one exists."""


class NewSession(RatchetError):
    """A first message (type 2) of a session we do not have: give it to `Session.accept`."""


class UnknownPrekey(ValueError):
    """A first message names a prekey we do not hold (rotated out, or a one-time prekey already used)."""


class Accepted(NamedTuple):
    """A first message accepted: its plaintext, and the one-time prekey it used (0: none) for the caller to delete."""

    plaintext: bytes
    opk_id: int


@dataclass(repr=False, eq=False)
class _State:
    ratchet: Ratchet
    ad: bytes
    origin: bytes  # the X3DH prefix the state began with: EK_A | spk_id | opk_id
    pending: bool  # Alice's, until Bob answers: her wraps repeat the prefix


def parse_wrap(wrap):
    """(type, X3DH prefix or b"", ratchet header, ciphertext) of a wrap; Malformed if it has no such shape."""
    kind = wrap[:1]
    if kind == bytes([RATCHET_MESSAGE]):
        at = 1
    elif kind == bytes([FIRST_MESSAGE]):
        at = 1 + PREFIX.size
    else:
        raise Malformed("a wrap of an unknown type")
    if len(wrap) < at + HEADER_BYTES + TAG_BYTES:
        raise Malformed("a wrap is cut short")
    return wrap[0], wrap[1:at], wrap[at : at + HEADER_BYTES], wrap[at + HEADER_BYTES :]


class Session:
    """All we hold for one peer device: the current ratchet state first, then up to ARCHIVED earlier ones."""

    def __init__(self, states=()):
        self._states = list(states)

    def __repr__(self):
        return f"<Session with {len(self._states)} state(s)>"  # never the keys

    @property
    def established(self):
        return bool(self._states)

    def _push(self, state):
        self._states = [state] + self._states[:ARCHIVED]

    def initiate(self, me, identity, bundle, new_key=X25519PrivateKey.generate):
        """Start a session from the peer's x3dh.Bundle (its spk signature checked).

        `me` is our keys.DeviceKeys, `identity` our dh private key; `new_key`
        makes EK_A, then our first ratchet key (fixed in golden vectors).
        """
        agreement = x3dh.initiate(me, identity, bundle, new_key())
        ratchet = Ratchet.alice(agreement.sk, bundle.spk_pub, new_key())
        origin = PREFIX.pack(agreement.ek, agreement.spk_id, agreement.opk_id)
        self._push(_State(ratchet, agreement.ad, origin, True))

    def accept(
        self, me, identity, peer, wrap, context, spk_private, opk_private, check=None, new_key=X25519PrivateKey.generate
    ):
        """Take a first message that `decrypt` refused with NewSession; `peer` is the sender's DeviceKeys (its chain's).

        `spk_private(id)` and `opk_private(id)` return our prekeys' private keys,
        or None for ids we do not hold; the caller deletes the one-time prekey
        `Accepted.opk_id` in the same write that saves this session. `check`
        is as for `decrypt`.
        """
        kind, prefix, header, ciphertext = parse_wrap(wrap)
        if kind != FIRST_MESSAGE:
            raise NoSession("a ratchet message for a session we do not have")
        ek, spk_id, opk_id = PREFIX.unpack(prefix)
        spk = spk_private(spk_id)
        opk = opk_private(opk_id) if opk_id else None
        if spk is None or (opk_id and opk is None):
            raise UnknownPrekey(f"no signed prekey {spk_id} or one-time prekey {opk_id}")
        agreement = x3dh.respond(me, identity, peer, ek, spk, opk)
        state = _State(Ratchet.bob(agreement.sk, spk), agreement.ad, prefix, False)
        result = state.ratchet.decrypt(header, ciphertext, state.ad, context, check, new_key)
        self._push(state)
        return Accepted(result, opk_id)

    def encrypt(self, plaintext, context):
        """A wrap of `plaintext` bound to `context`: type 2 until the peer has answered, type 1 after."""
        if not self._states:
            raise NoSession("no session with this device yet: initiate one from its bundle")
        state = self._states[0]
        header, ciphertext = state.ratchet.encrypt(plaintext, state.ad, context)
        if state.pending:
            return bytes([FIRST_MESSAGE]) + state.origin + header + ciphertext
        return bytes([RATCHET_MESSAGE]) + header + ciphertext

    def decrypt(self, wrap, context, check=None, new_key=X25519PrivateKey.generate):
        """The plaintext of a wrap bound to `context`; the state that decrypts it becomes the current one.

        `check(plaintext)`, if given, runs before anything changes: what it
        returns is returned instead of the plaintext, what it raises leaves the
        session as it was. A state that has received on the wrap's ratchet key
        decides alone (so a duplicate is reported as one); a new ratchet key is
        tried on every state, and if none decrypts, the current state's error
        is raised.
        """
        kind, prefix, header, ciphertext = parse_wrap(wrap)
        states = [state for state in self._states if kind == RATCHET_MESSAGE or state.origin == prefix]
        if not states:
            raise (NewSession if kind == FIRST_MESSAGE else NoSession)("no session state for this wrap")
        known = [state for state in states if state.ratchet.knows(header[:32])]
        errors = []
        for state in known[:1] or states:
            try:
                result = state.ratchet.decrypt(header, ciphertext, state.ad, context, check, new_key)
            except (RatchetError, LowOrderKey) as error:  # not check's errors: those are final
                errors.append(error)
                continue
            state.pending = False
            self._states.remove(state)
            self._states.insert(0, state)
            return result
        raise errors[0]

    def to_bytes(self):
        """The session, versioned and enc()-encoded (it holds private keys: store it as such)."""
        return enc(
            [SESSION_VERSION]
            + [enc([s.ratchet.to_bytes(), s.ad, s.origin, b"\x01" if s.pending else b""]) for s in self._states]
        )

    @classmethod
    def from_bytes(cls, data):
        """The session `to_bytes` saved; Malformed if it is not one."""
        version, *states = dec(data) or [b""]
        if version != SESSION_VERSION or len(states) > ARCHIVED + 1:
            raise Malformed("not a session of this version")
        parsed = []
        for encoded in states:
            ratchet, ad, origin, pending = dec(encoded, 4)
            if len(origin) != PREFIX.size or pending not in (b"", b"\x01"):
                raise Malformed("a session state field has the wrong length")
            parsed.append(_State(Ratchet.from_bytes(ratchet), ad, origin, pending == b"\x01"))
        return cls(parsed)
