"""Envelopes: a body encrypted once under a fresh key K, wrapped per device (docs/E2EE.md, "Encrypted messages").

The header commits to K (`kc`), so a sender cannot wrap different keys for
different recipients and show them different plaintexts of one body. Each
wrap is bound to the header and to its recipient device through its
context, so a wrap replayed into another conversation, under another header
or to another device does not decrypt. This module never touches a session
itself: `seal` and `unseal` call the wrap and unwrap functions they are
given (in the client, a Session's `encrypt` and `decrypt`).
"""

import hmac
import os
from dataclasses import dataclass
from hashlib import sha256

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from securechatd.e2ee.chain import HASH_BYTES
from securechatd.e2ee.encoding import Malformed, dec, digest, enc
from securechatd.e2ee.keys import DEVICE_ID_BYTES

SUITE = "securechatd-e2ee-v1"
HEADER_LABEL = "securechatd/header/v1"
WRAP_LABEL = "securechatd/wrap/v1"
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


def _number(raw):
    return int.from_bytes(raw, "big")


@dataclass(frozen=True)
class Header:
    """The header fields in the order of docs/E2EE.md; `suite` is fixed."""

    conversation: int
    members: bytes
    sender: str
    sender_device: bytes
    counter: int
    client_time: int
    kc: bytes

    def __post_init__(self):
        if len(self.members) != HASH_BYTES or len(self.sender_device) != DEVICE_ID_BYTES or len(self.kc) != HASH_BYTES:
            raise Malformed("a header field has the wrong length")
        if not all(0 <= value < U64 for value in (self.conversation, self.counter, self.client_time)):
            raise Malformed("a header number does not fit 8 bytes")

    def fields(self):
        return [
            SUITE,
            self.conversation,
            self.members,
            self.sender,
            self.sender_device,
            self.counter,
            self.client_time,
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
        suite, conversation, members, sender, sender_device, counter, client_time, kc = dec(data, 8)
        if suite != SUITE.encode("ascii"):
            raise Malformed("not a header of suite " + SUITE)
        if any(len(value) != 8 for value in (conversation, counter, client_time)):
            raise Malformed("a header number is not 8 bytes")
        try:
            sender = sender.decode("utf-8")
        except UnicodeDecodeError:
            raise Malformed("a header's sender is not UTF-8")
        conversation, counter, client_time = map(_number, (conversation, counter, client_time))
        return cls(conversation, members, sender, sender_device, counter, client_time, kc)


@dataclass(frozen=True)
class Envelope:
    """What a sender uploads: the header and body once, and a wrap per recipient device id."""

    header: bytes
    body: bytes
    wraps: dict


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


def seal(plaintext, conversation, members, sender, sender_device, counter, client_time, recipients, wrap, key=None):
    """The envelope of `plaintext` for the `recipients` device ids.

    `wrap(device, key, context)` returns that device's wrap of the key (in
    the client, its Session's encrypt). `key` fixes K for golden vectors; by
    default it is fresh.
    """
    key = key or os.urandom(KEY_BYTES)
    header = Header(conversation, members, sender, sender_device, counter, client_time, commitment(key))
    body = ChaCha20Poly1305(key).encrypt(NONCE, pad(plaintext), header.digest())
    wraps = {device: wrap(device, key, wrap_context(header, device)) for device in recipients}
    return Envelope(header.to_bytes(), body, wraps)


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
