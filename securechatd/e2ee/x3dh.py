"""X3DH: the shared secret and associated data a pairwise session starts from (docs/E2EE.md, "X3DH").

Signal's X3DH with X25519, HKDF-SHA-256 and Ed25519-signed prekeys (we
have no XEdDSA, so a device's DH key and its signing key are separate).
Alice (`initiate`) takes Bob's prekey bundle; Bob (`respond`) takes what her
first message carries. The identity keys (`ik`, a device's `dh_pub`) and
Bob's `sig_pub` must come from the verified device chains, never from the
server's bundle alone: the server could substitute its own.
"""

import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from securechatd.e2ee.chain import DEVICE_ID_BYTES, KEY_BYTES, device_id
from securechatd.e2ee.encoding import Malformed, enc, verify

INFO = b"securechatd-x3dh-v1"
F = b"\xff" * 32  # Signal's domain separation of the DH input from XEdDSA
SALT = bytes(32)
SPK_LABEL = "securechatd/spk/v1"


class X3DHError(ValueError):
    """A key agreement that must not go ahead; the subclass says why."""


class BadPrekeySignature(X3DHError):
    """The signed prekey is not signed by the device's key (or the device id is not that key's)."""


class LowOrderPoint(X3DHError):
    """A public key gave an all-zero DH output: it is a low-order point, chosen to fix the secret."""


class UnknownPrekey(X3DHError):
    """A first message names a prekey we do not hold (rotated out, or a one-time prekey already used)."""


def dh(private, public_bytes):
    """X25519 of our private key and a raw public key, refusing an all-zero output.

    Written here before e2ee/keys.py had its own; fold the two together.
    """
    try:
        public = X25519PublicKey.from_public_bytes(public_bytes)
    except ValueError:
        raise Malformed("an X25519 public key is not 32 bytes")
    try:
        shared = private.exchange(public)
    except ValueError:  # OpenSSL refuses the all-zero output itself
        raise LowOrderPoint("an X25519 exchange gave the all-zero output")
    if not any(shared):  # and so do we, whatever the backend does
        raise LowOrderPoint("an X25519 exchange gave the all-zero output")
    return shared


def raw_public(private):
    """The raw 32 bytes of an X25519 private key's public half."""
    return private.public_key().public_bytes_raw()


def prekey_id(number):
    """A prekey id as its 4 bytes, the form it is signed and sent in."""
    return struct.pack(">I", number)


@dataclass(frozen=True)
class Me:
    """Our device: who we are and our identity (dh) private key."""

    user: str
    device: bytes
    identity: X25519PrivateKey

    def __repr__(self):
        return f"Me({self.user!r}, {self.device.hex()})"  # never the private key

    @property
    def ik(self):
        return raw_public(self.identity)


@dataclass(frozen=True)
class Peer:
    """Another device as its verified chain lists it: user, device id, identity (dh) public key."""

    user: str
    device: bytes
    ik: bytes


@dataclass(frozen=True)
class Bundle:
    """A device's prekey bundle; `opk_id` 0 means none was left (one-time prekey ids start at 1)."""

    peer: Peer
    sig_pub: bytes
    spk_id: int
    spk_pub: bytes
    spk_signature: bytes
    opk_id: int = 0
    opk_pub: bytes = b""


@dataclass(frozen=True, repr=False)
class Agreement:
    """What X3DH gives a session: the secret, the associated data, and (for Alice) her first message's prefix."""

    sk: bytes
    ad: bytes
    ek: bytes = b""
    spk_id: int = 0
    opk_id: int = 0


def check_spk(bundle):
    """Raise BadPrekeySignature unless the bundle's signed prekey is signed by its device's key."""
    peer = bundle.peer
    if len(bundle.sig_pub) != KEY_BYTES or len(peer.device) != DEVICE_ID_BYTES:
        raise Malformed("a bundle's signing key or device id has the wrong length")
    if device_id(bundle.sig_pub) != peer.device:
        raise BadPrekeySignature("the bundle's signing key is not its device's")
    key = Ed25519PublicKey.from_public_bytes(bundle.sig_pub)
    fields = [peer.user, peer.device, prekey_id(bundle.spk_id), bundle.spk_pub]
    if not verify(key, bundle.spk_signature, SPK_LABEL, fields):
        raise BadPrekeySignature("the signed prekey's signature does not check")


def _kdf(outputs):
    return HKDF(hashes.SHA256(), 32, SALT, INFO).derive(F + b"".join(outputs))


def associated_data(alice, bob):
    """AD = enc(user_A, device_A, IK_A, user_B, device_B, IK_B): both ends of the session, bound."""
    return enc([alice.user, alice.device, alice.ik, bob.user, bob.device, bob.ik])


def initiate(me, bundle, ephemeral=None):
    """Alice's side: check the bundle, then SK and AD and what her first message carries.

    `ephemeral` fixes EK_A for golden vectors; by default it is fresh.
    """
    check_spk(bundle)
    ek = ephemeral or X25519PrivateKey.generate()
    outputs = [dh(me.identity, bundle.spk_pub), dh(ek, bundle.peer.ik), dh(ek, bundle.spk_pub)]
    if bundle.opk_id:
        outputs.append(dh(ek, bundle.opk_pub))
    ad = associated_data(me, bundle.peer)
    return Agreement(_kdf(outputs), ad, raw_public(ek), bundle.spk_id, bundle.opk_id)


def respond(me, peer, ek, spk_private, opk_private=None):
    """Bob's side: SK and AD from Alice's identity (from her chain) and the EK her first message carries."""
    outputs = [dh(spk_private, peer.ik), dh(me.identity, ek), dh(spk_private, ek)]
    if opk_private is not None:
        outputs.append(dh(opk_private, ek))
    return Agreement(_kdf(outputs), associated_data(peer, me))
