"""A device's keys: its Ed25519 signing key, its X25519 key, its prekeys (docs/E2EE.md, "Devices", "Prekeys").

Pure values: generating, signing and (de)serialising, never storing. The
private records to_bytes() returns go into the device file, which its
writer saves atomically (docs/E2EE.md, "Devices").
"""

import hmac
from dataclasses import dataclass, field as dataclass_field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from securechatd.e2ee.encoding import Malformed, dec, digest, enc, sign, verify

DEVICE_ID_BYTES = 16
KEY_BYTES = 32
SIGNATURE_BYTES = 64
PREKEY_ID_BYTES = 4
MAX_PREKEY_ID = (1 << 8 * PREKEY_ID_BYTES) - 1  # id 0 means "no prekey" (opk_id in a first message)
DEVICE_RECORD = b"securechatd/device/v1"
PREKEY_RECORD = b"securechatd/prekey/v1"
SPK_LABEL = "securechatd/spk/v1"


class LowOrderKey(ValueError):
    """An X25519 exchange came out all zero: the peer's public key is a low-order point."""


class BadPrekeySignature(ValueError):
    """A signed prekey whose signature is not its device's over [user, device, spk_id, spk_pub]."""


def device_id(sig_pub):
    """The 16-byte id of the device whose Ed25519 public key is `sig_pub` (raw 32 bytes)."""
    return digest("securechatd/device-id/v1", [sig_pub])[:DEVICE_ID_BYTES]


def dh(private, public_bytes):
    """X25519(private, public_bytes), refusing the all-zero output a low-order point gives (RFC 7748 §6.1).

    Every DH of X3DH and the ratchet goes through here, so none can be forced
    to a value an attacker knows.
    """
    if len(public_bytes) != KEY_BYTES:
        raise Malformed("an X25519 public key is not 32 bytes")
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(public_bytes))
    except ValueError:  # OpenSSL refuses the all-zero output itself; other backends may not
        shared = bytes(KEY_BYTES)
    if hmac.compare_digest(shared, bytes(KEY_BYTES)):
        raise LowOrderKey("the X25519 shared secret is all zero: the public key is a low-order point")
    return shared


def spk_fields(user, device, spk_id, spk_pub):
    """What spk_signature signs (docs/E2EE.md, "Prekeys"): spk_id is 4 bytes there, not 8."""
    return [user, device, spk_id.to_bytes(PREKEY_ID_BYTES, "big"), spk_pub]


def _record(data, label, count):
    """The fields after the version label of a private record; Malformed if it is not one."""
    fields = dec(data, count + 1)
    if fields[0] != label:
        raise Malformed(f"not a {label.decode('ascii')} record")
    return fields[1:]


def _prekey_id(raw):
    if len(raw) != PREKEY_ID_BYTES or raw == bytes(PREKEY_ID_BYTES):
        raise Malformed("a prekey id is not 4 bytes from 1 up")
    return int.from_bytes(raw, "big")


def _private(cls, raw):
    if len(raw) != KEY_BYTES:
        raise Malformed("a private key is not 32 bytes")
    return cls.from_private_bytes(raw)


@dataclass(frozen=True)
class DeviceKeys:
    """A device's public identity, as its chain's add link lists it; the id is checked against the key."""

    user: str
    device: bytes
    sig_pub: bytes
    dh_pub: bytes

    def __post_init__(self):
        if len(self.sig_pub) != KEY_BYTES or len(self.dh_pub) != KEY_BYTES:
            raise Malformed("a device key is not 32 bytes")
        if device_id(self.sig_pub) != self.device:
            raise Malformed("a device id does not match its key")

    def verify(self, signature, label, fields):
        """True if `signature` is this device's over the label and fields."""
        return verify(Ed25519PublicKey.from_public_bytes(self.sig_pub), signature, label, fields)


def check_signed_prekey(keys, spk_id, spk_pub, spk_signature):
    """BadPrekeySignature unless the device `keys` (DeviceKeys, from its chain) signed spk_pub as its prekey `spk_id`."""
    if not keys.verify(spk_signature, SPK_LABEL, spk_fields(keys.user, keys.device, spk_id, spk_pub)):
        raise BadPrekeySignature(f"signed prekey {spk_id} of device {keys.device.hex()} has a bad signature")


@dataclass(frozen=True)
class Prekey:
    """A prekey this device holds the private half of: signed (spk) if `signature` is set, else one-time (opk)."""

    id: int
    private: X25519PrivateKey = dataclass_field(repr=False)
    signature: bytes = b""

    @property
    def public(self):
        return self.private.public_key().public_bytes_raw()

    def to_bytes(self):
        """The private record for the device file."""
        return enc([PREKEY_RECORD, self.id.to_bytes(PREKEY_ID_BYTES, "big"), self.private.private_bytes_raw(), self.signature])

    @classmethod
    def from_bytes(cls, data):
        raw_id, private, signature = _record(data, PREKEY_RECORD, 3)
        if len(signature) not in (0, SIGNATURE_BYTES):
            raise Malformed("a prekey signature is not 64 bytes")
        return cls(_prekey_id(raw_id), _private(X25519PrivateKey, private), signature)


class Device:
    """This device's private keys, and the counter its prekey ids come from (unique per device).

    Mutable only in that counter: save the device file after new prekeys are
    made and before they are uploaded, or an id could be handed out twice.
    """

    def __init__(self, user, sig_private, dh_private, next_prekey_id=1):
        self.user = user
        self.sig_private = sig_private
        self.dh_private = dh_private
        self.next_prekey_id = next_prekey_id
        sig_pub = sig_private.public_key().public_bytes_raw()
        self.keys = DeviceKeys(user, device_id(sig_pub), sig_pub, dh_private.public_key().public_bytes_raw())
        self.id = self.keys.device

    def __repr__(self):  # never the private keys
        return f"<Device {self.user} {self.id.hex()}>"

    @classmethod
    def generate(cls, user):
        return cls(user, Ed25519PrivateKey.generate(), X25519PrivateKey.generate())

    def sign(self, label, fields):
        return sign(self.sig_private, label, fields)

    def signed_prekey(self, spk_id, private):
        """`private` as this device's signed prekey `spk_id`, with its spk_signature."""
        spk_pub = private.public_key().public_bytes_raw()
        return Prekey(spk_id, private, self.sign(SPK_LABEL, spk_fields(self.user, self.id, spk_id, spk_pub)))

    def new_signed_prekey(self):
        return self.signed_prekey(self._prekey_ids(1)[0], X25519PrivateKey.generate())

    def new_one_time_prekeys(self, count):
        return [Prekey(prekey_id, X25519PrivateKey.generate()) for prekey_id in self._prekey_ids(count)]

    def _prekey_ids(self, count):
        first = self.next_prekey_id
        if first + count > MAX_PREKEY_ID:  # next_prekey_id must still fit its 4 bytes
            raise OverflowError("this device has used up its prekey ids")
        self.next_prekey_id = first + count
        return range(first, first + count)

    def to_bytes(self):
        """The private record for the device file: enc(label, user, sig private, dh private, next prekey id)."""
        return enc(
            [
                DEVICE_RECORD,
                self.user,
                self.sig_private.private_bytes_raw(),
                self.dh_private.private_bytes_raw(),
                self.next_prekey_id.to_bytes(PREKEY_ID_BYTES, "big"),
            ]
        )

    @classmethod
    def from_bytes(cls, data):
        user, sig, dh_key, next_id = _record(data, DEVICE_RECORD, 4)
        try:
            user = user.decode("utf-8")
        except UnicodeDecodeError:
            raise Malformed("a device record's user is not UTF-8")
        return cls(user, _private(Ed25519PrivateKey, sig), _private(X25519PrivateKey, dh_key), _prekey_id(next_id))
