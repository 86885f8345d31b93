"""Envelopes: a body encrypted once under a fresh key K, wrapped per device (docs/E2EE.md, "Encrypted messages").

The header commits to K (`kc`), so a sender cannot wrap different keys for
different recipients and show them different plaintexts of one body. Each
wrap is bound to the header and to its recipient device through its
context, so a wrap replayed into another conversation, under another header
or to another device does not decrypt. In attestable mode the sender's
device also signs the header and body (`sign_message`), so a message is
non-repudiable; in deniable mode nothing is signed and the pairwise wraps
alone authenticate it. This module never touches a session itself: `seal`
and `unseal` call the wrap and unwrap functions they are given (in the
client, a Session's `encrypt` and `decrypt`).
"""

import hmac
import os
from dataclasses import dataclass
from hashlib import sha256

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from securechatd.e2ee.chain import HASH_BYTES
from securechatd.e2ee.encoding import Malformed, dec, digest, enc
from securechatd.e2ee.keys import DEVICE_ID_BYTES, SIGNATURE_BYTES
from securechatd.e2ee.transcript import genesis

SUITE = "securechatd-e2ee-v1"
HEADER_LABEL = "securechatd/header/v1"
WRAP_LABEL = "securechatd/wrap/v1"
MESSAGE_SIG_LABEL = "securechatd/message-sig/v1"
BODY_LABEL = "securechatd/message-body/v1"
ATTESTABLE, DENIABLE = "attestable", "deniable"
MODES = (ATTESTABLE, DENIABLE)
KC_LABEL = b"securechatd/kc/v1"
KEY_BYTES = 32
NONCE = bytes(12)  # K encrypts one body only
FIRST_BUCKET = 256
U64 = 1 << 64


class EnvelopeError(ValueError):
    """An envelope whose wrap decrypted but which fails a later step; the subclass says which."""


class KeyCommitmentMismatch(EnvelopeError):
    """The wrapped key is not the one the header commits to: the sender showed recipients different keys."""


class BadBody(EnvelopeError):
    """The body does not decrypt under the key and header: it was altered."""


class BadPadding(EnvelopeError):
    """The body decrypts but is not padded to a size bucket as the format requires."""


class MessageSignatureError(ValueError):
    """An envelope whose signature does not fit its header's mode; the subclass says how."""


class Unsigned(MessageSignatureError):
    """An attestable message without a signature: the sender (or the server) left it out."""


class BadMessageSignature(MessageSignatureError):
    """The signature is not the sender device's over this header and body (or a deniable message carries one)."""


def _number(raw):
    return int.from_bytes(raw, "big")


@dataclass(frozen=True)
class Header:
    """The header fields in the order of docs/E2EE.md; `suite` is fixed.

    `prev_n` and `prev_e` are the chain head the sender had verified when it
    sent (n and e_n; 0 and the genesis before any), so the first message to
    cross a fork reveals it.
    """

    conversation: int
    members: bytes
    sender: str
    sender_device: bytes
    counter: int
    client_time: int
    mode: str
    prev_n: int
    prev_e: bytes
    kc: bytes

    def __post_init__(self):
        lengths = (len(self.members), len(self.sender_device), len(self.prev_e), len(self.kc))
        if lengths != (HASH_BYTES, DEVICE_ID_BYTES, HASH_BYTES, HASH_BYTES):
            raise Malformed("a header field has the wrong length")
        if not (0 <= self.conversation < U64 and 0 <= self.counter < U64) or not (
            0 <= self.client_time < U64 and 0 <= self.prev_n < U64
        ):
            raise Malformed("a header number does not fit 8 bytes")
        if self.mode not in MODES:
            raise Malformed(f"unknown message mode {self.mode[:16]!r}")

    def fields(self):
        return [
            SUITE,
            self.conversation,
            self.members,
            self.sender,
            self.sender_device,
            self.counter,
            self.client_time,
            self.mode,
            self.prev_n,
            self.prev_e,
            self.kc,
        ]

    def to_bytes(self):
        return enc(self.fields())

    def digest(self):
        """H("securechatd/header/v1", header fields): the body's associated data, and part of every wrap's context."""
        return digest(HEADER_LABEL, self.fields())

    @classmethod
    def from_bytes(cls, data):
        """The header `data` encodes; Malformed if its shape is wrong."""
        suite, conversation, members, sender, sender_device, counter, client_time, mode, prev_n, prev_e, kc = dec(data, 11)
        if suite != SUITE.encode("ascii"):
            raise Malformed("not a header of suite " + SUITE)
        if (len(conversation), len(counter), len(client_time), len(prev_n)) != (8, 8, 8, 8):
            raise Malformed("a header number is not 8 bytes")
        try:
            sender, mode = sender.decode("utf-8"), mode.decode("ascii")
        except UnicodeDecodeError:
            raise Malformed("a header's sender is not UTF-8 (or its mode not ASCII)")
        return cls(
            _number(conversation), members, sender, sender_device, _number(counter), _number(client_time), mode,
            _number(prev_n), prev_e, kc,
        )


@dataclass(frozen=True)
class Envelope:
    """What a sender uploads: the header and body once, a wrap per recipient device id, the signature (attestable)."""

    header: bytes
    body: bytes
    wraps: dict
    signature: bytes = b""


def signed_fields(header, body):
    """What an attestable message's signature covers: [conversation, sender, sender_device, H(header), H(body)].

    The body is hashed as sent (ciphertext), so anyone can check who sent an
    envelope without its key; the header commits to K (kc), so a disclosed K
    then proves the plaintext. Both are hashed once, whatever their size.
    """
    return [header.conversation, header.sender, header.sender_device, header.digest(), digest(BODY_LABEL, [body])]


def sign_message(device, header, body):
    """The signature of `device` (a keys.Device, the header's sender device) over `header` (parsed) and `body`."""
    if (device.user, device.id) != (header.sender, header.sender_device):
        raise ValueError("a message is signed by the sender device its header names")
    return device.sign(MESSAGE_SIG_LABEL, signed_fields(header, body))


def check_signature(header, body, signature, keys):
    """Check an envelope's signature against its header's mode and the sender's DeviceKeys (from its verified chain).

    Attestable: Unsigned without one, BadMessageSignature unless `keys` is
    the header's sender device and signed it. Deniable: no signature at all.
    """
    if header.mode == DENIABLE:
        if signature:
            raise BadMessageSignature("a deniable message carries a signature")
        return
    if not signature:
        raise Unsigned(f"an attestable message of {header.sender} has no signature")
    if (keys.user, keys.device) != (header.sender, header.sender_device) or len(signature) != SIGNATURE_BYTES:
        raise BadMessageSignature(f"the signature is not {header.sender}'s device {header.sender_device.hex()}'s")
    if not keys.verify(signature, MESSAGE_SIG_LABEL, signed_fields(header, body)):
        raise BadMessageSignature(f"the signature is not {header.sender}'s device {header.sender_device.hex()}'s")


def commitment(key):
    """kc = HMAC-SHA-256(K, "securechatd/kc/v1")."""
    return hmac.digest(key, KC_LABEL, sha256)


def wrap_context(header, device):
    """The context a wrap for `device` is bound to: enc("securechatd/wrap/v1", H(header), device)."""
    return enc([WRAP_LABEL, header.digest(), device])


def pad(plaintext):
    """plaintext | 0x80 | 0x00... up to the smallest bucket (256, 512, 1024, ... bytes) that holds it."""
    size = FIRST_BUCKET
    while size <= len(plaintext):
        size *= 2
    return plaintext + b"\x80" + bytes(size - len(plaintext) - 1)


def unpad(padded):
    """The plaintext `pad` padded; BadPadding if `padded` is not a bucket's size or has no 0x80 marker."""
    size = len(padded)
    if size < FIRST_BUCKET or size & (size - 1):
        raise BadPadding(f"a body of {size} bytes is not a bucket's size")
    stripped = padded.rstrip(b"\x00")
    if not stripped.endswith(b"\x80"):
        raise BadPadding("a padded body has no 0x80 marker")
    return stripped[:-1]


def seal(plaintext, conversation, members, sender, sender_device, counter, client_time, recipients, wrap, key=None,
         mode=ATTESTABLE, prev=None, signer=None):
    """The envelope of `plaintext` for the `recipients` device ids.

    `wrap(device, key, context)` returns that device's wrap of the key (in
    the client, its Session's encrypt). `key` fixes K for golden vectors; by
    default it is fresh. `prev` is the sender's chain head (n, e_n), by
    default (0, genesis). An attestable envelope is signed by `signer` (the
    sender's keys.Device); without one it goes unsigned, and receivers
    refuse it (Unsigned).
    """
    key = key or os.urandom(KEY_BYTES)
    prev_n, prev_e = prev or (0, genesis(conversation))
    header = Header(
        conversation, members, sender, sender_device, counter, client_time, mode, prev_n, prev_e, commitment(key)
    )
    body = ChaCha20Poly1305(key).encrypt(NONCE, pad(plaintext), header.digest())
    wraps = {device: wrap(device, key, wrap_context(header, device)) for device in recipients}
    signature = sign_message(signer, header, body) if signer is not None and mode == ATTESTABLE else b""
    return Envelope(header.to_bytes(), body, wraps, signature)


def open_body(header, body, key):
    """The plaintext of `body` under the unwrapped `key`, checked against the header's commitment first."""
    if len(key) != KEY_BYTES:
        raise Malformed("a wrap does not hold a 32-byte key")
    if not hmac.compare_digest(commitment(key), header.kc):
        raise KeyCommitmentMismatch("the wrapped key is not the one the header commits to")
    try:
        padded = ChaCha20Poly1305(key).decrypt(NONCE, body, header.digest())
    except InvalidTag:
        raise BadBody("the body does not decrypt under the committed key")
    return unpad(padded)


def unseal(header, body, wrap, device, unwrap):
    """Our wrap's key, then the body: what `unwrap` returns, with the plaintext in place of the key.

    `header` is the parsed Header (its sender picks the session); `device`
    is ours. `unwrap(wrap, context, check)` is a Session's `decrypt` (or
    `accept`, partially applied): it runs `check` on the key before the
    session changes, so an envelope that fails at any step leaves the
    session able to decrypt it when it comes back whole.
    """
    return unwrap(wrap, wrap_context(header, device), lambda key: open_body(header, body, key))
