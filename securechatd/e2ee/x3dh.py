"""X3DH: the shared secret and associated data a pairwise session starts from (docs/E2EE.md, "X3DH").

Signal's X3DH with X25519, HKDF-SHA-256 and Ed25519-signed prekeys (we
have no XEdDSA, so a device's DH key and its signing key are separate).
Alice (`initiate`) takes Bob's prekey bundle; Bob (`respond`) takes what her
first message carries. Each device is a `keys.DeviceKeys` (user, device id,
sig_pub, dh_pub = its identity key IK) taken from the verified device
chains, never from the server's bundle alone: the server could substitute
its own keys.
"""

from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from securechatd.e2ee.encoding import enc
from securechatd.e2ee.keys import DeviceKeys, check_signed_prekey, dh

INFO = b"securechatd-x3dh-v1"
F = b"\xff" * 32  # Signal's separation of the DH input from XEdDSA's
SALT = bytes(32)


@dataclass(frozen=True)
class Bundle:
    """A device's prekey bundle; `opk_id` 0 means no one-time prekey was left (their ids start at 1)."""

    keys: DeviceKeys  # from the device's verified chain
    spk_id: int
    spk_pub: bytes
    spk_signature: bytes
    opk_id: int = 0
    opk_pub: bytes = b""


@dataclass(frozen=True, repr=False)
class Agreement:
    """What X3DH gives a session: SK and AD, and for Alice what her first message carries."""

    sk: bytes
    ad: bytes
    ek: bytes = b""
    spk_id: int = 0
    opk_id: int = 0


def associated_data(alice, bob):
    """AD = enc(user_A, device_A, IK_A, user_B, device_B, IK_B): both ends of the session, bound."""
    return enc([alice.user, alice.device, alice.dh_pub, bob.user, bob.device, bob.dh_pub])


def _sk(outputs):
    return HKDF(hashes.SHA256(), 32, SALT, INFO).derive(F + b"".join(outputs))


def initiate(me, identity, bundle, ephemeral=None):
    """Alice's side: refuse a badly signed prekey, then SK, AD and her first message's prefix.

    `me` is our DeviceKeys and `identity` its dh private key; `ephemeral`
    fixes EK_A for golden vectors (by default it is fresh).
    """
    check_signed_prekey(bundle.keys, bundle.spk_id, bundle.spk_pub, bundle.spk_signature)
    ek = ephemeral or X25519PrivateKey.generate()
    outputs = [dh(identity, bundle.spk_pub), dh(ek, bundle.keys.dh_pub), dh(ek, bundle.spk_pub)]
    if bundle.opk_id:
        outputs.append(dh(ek, bundle.opk_pub))
    ek_pub = ek.public_key().public_bytes_raw()
    return Agreement(_sk(outputs), associated_data(me, bundle.keys), ek_pub, bundle.spk_id, bundle.opk_id)


def respond(me, identity, peer, ek, spk_private, opk_private=None):
    """Bob's side: SK and AD from Alice's DeviceKeys (from her chain) and the EK her first message carries."""
    outputs = [dh(spk_private, peer.dh_pub), dh(identity, ek), dh(spk_private, ek)]
    if opk_private is not None:
        outputs.append(dh(opk_private, ek))
    return Agreement(_sk(outputs), associated_data(peer, me))
