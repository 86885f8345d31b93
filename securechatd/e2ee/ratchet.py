"""The Double Ratchet (docs/E2EE.md, "Double Ratchet"), following Signal's specification step by step.

`Ratchet` holds one session's state; `encrypt` is RatchetEncrypt, `decrypt`
is RatchetDecrypt with TrySkippedMessageKeys, SkipMessageKeys and DHRatchet.
Decryption works on a copy and keeps it only if the message authenticates,
as the specification asks: a forged, corrupted or replayed message leaves
the state as it was. The state round-trips through `to_bytes` so it can be
saved in the same atomic write as the message that advanced it.
"""

import hmac
import struct
from dataclasses import dataclass, field, replace
from hashlib import sha256

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from securechatd.e2ee.encoding import Malformed, dec, enc
from securechatd.e2ee.keys import dh

RATCHET_INFO = b"securechatd-ratchet-v1"
MESSAGE_INFO = b"securechatd-message-v1"
STATE_VERSION = b"securechatd-ratchet-state-v1"
HEADER_BYTES = 40  # dh_pub (32) | pn (4) | n (4)
MAX_SKIP = 1000  # a message further ahead than this in its chain is refused; at most this many keys are kept
KEPT_CHAINS = 5  # earlier receiving ratchet keys remembered, so a replay from them is a duplicate (libsignal keeps 5)
_SKIPPED = struct.Struct(">32sI32s")  # one skipped message key in the saved state: dh_pub, n, mk


class RatchetError(ValueError):
    """A ratchet message that cannot be decrypted (or sent); the subclass says why. The state is unchanged."""


class DuplicateMessage(RatchetError):
    """A message already decrypted (or one whose key was already given up): never decrypted twice."""


class TooManySkipped(RatchetError):
    """A message more than MAX_SKIP messages ahead of its chain: refused before deriving any key."""


class BadMessage(RatchetError):
    """The message does not authenticate: corrupted, forged, or bound to another context."""


def kdf_rk(rk, dh_out):
    """KDF_RK: the next root key and a new chain key."""
    out = HKDF(hashes.SHA256(), 64, rk, RATCHET_INFO).derive(dh_out)
    return out[:32], out[32:]


def kdf_ck(ck):
    """KDF_CK: the next chain key and this step's message key."""
    return hmac.digest(ck, b"\x02", sha256), hmac.digest(ck, b"\x01", sha256)


def _aead(mk):
    out = HKDF(hashes.SHA256(), 44, bytes(32), MESSAGE_INFO).derive(mk)
    return ChaCha20Poly1305(out[:32]), out[32:]


def _encrypt(mk, plaintext, associated):
    aead, nonce = _aead(mk)
    return aead.encrypt(nonce, plaintext, associated)


def _decrypt(mk, ciphertext, associated):
    aead, nonce = _aead(mk)
    try:
        return aead.decrypt(nonce, ciphertext, associated)
    except InvalidTag:
        raise BadMessage("the message does not authenticate")


def make_header(dh_pub, pn, n):
    return dh_pub + struct.pack(">II", pn, n)


def parse_header(header):
    """(dh_pub, pn, n) of a 40-byte ratchet header."""
    if len(header) != HEADER_BYTES:
        raise Malformed("a ratchet header is not 40 bytes")
    pn, n = struct.unpack_from(">II", header, 32)
    return header[:32], pn, n


@dataclass(repr=False, eq=False)
class Ratchet:
    """One Double Ratchet session's state, named as in Signal's specification."""

    dhs: X25519PrivateKey
    dhr: bytes | None
    rk: bytes
    cks: bytes | None = None
    ckr: bytes | None = None
    ns: int = 0
    nr: int = 0
    pn: int = 0
    skipped: dict = field(default_factory=dict)  # (dh_pub, n) -> mk, oldest first
    previous: tuple = ()  # earlier receiving ratchet keys, newest last

    @classmethod
    def alice(cls, sk, bob_ratchet_pub, dhs=None):
        """RatchetInitAlice: Bob's signed prekey is his first ratchet key; `dhs` fixes ours for golden vectors."""
        dhs = dhs or X25519PrivateKey.generate()
        rk, cks = kdf_rk(sk, dh(dhs, bob_ratchet_pub))
        return cls(dhs, bob_ratchet_pub, rk, cks)

    @classmethod
    def bob(cls, sk, spk_private):
        """RatchetInitBob: our signed prekey's key pair is our first ratchet key pair."""
        return cls(spk_private, None, sk)

    def knows(self, dh_pub):
        """Whether a message under ratchet key `dh_pub` belongs to a chain this state has received on."""
        return dh_pub == self.dhr or dh_pub in self.previous or any(key[0] == dh_pub for key in self.skipped)

    def encrypt(self, plaintext, ad, context):
        """RatchetEncrypt: (40-byte header, ciphertext); the AEAD binds AD, the header and the context."""
        if self.cks is None:
            raise RatchetError("no sending chain yet: a responder sends only after receiving")
        self.cks, mk = kdf_ck(self.cks)
        header = make_header(self.dhs.public_key().public_bytes_raw(), self.pn, self.ns)
        self.ns += 1
        return header, _encrypt(mk, plaintext, ad + header + context)

    def decrypt(self, header, ciphertext, ad, context, check=None, new_key=X25519PrivateKey.generate):
        """RatchetDecrypt on a copy, kept only on success.

        `check(plaintext)`, if given, runs before the copy is kept: what it
        returns is returned, what it raises leaves the state as it was (so a
        wrap whose envelope fails can be decrypted again when it comes back
        whole). `new_key` makes DHRatchet's key pair (fixed in golden vectors).
        """
        trial = replace(self, skipped=dict(self.skipped))
        plaintext = trial._decrypt(header, ciphertext, ad + header + context, new_key)
        result = plaintext if check is None else check(plaintext)
        self.__dict__.update(trial.__dict__)
        return result

    def _decrypt(self, header, ciphertext, associated, new_key):
        dh_pub, pn, n = parse_header(header)
        mk = self.skipped.pop((dh_pub, n), None)  # TrySkippedMessageKeys
        if mk is not None:
            return _decrypt(mk, ciphertext, associated)
        if dh_pub in self.previous or (dh_pub == self.dhr and n < self.nr):
            raise DuplicateMessage(f"message {n} of this chain was already decrypted or given up")
        if dh_pub != self.dhr:
            self._skip(pn)
            self._dh_ratchet(dh_pub, new_key())
        if self.ckr is None:  # Alice's state before Bob's first message: his signed prekey never sends
            raise BadMessage("a message under a ratchet key that has no receiving chain")
        self._skip(n)
        self.ckr, mk = kdf_ck(self.ckr)
        self.nr += 1
        plaintext = _decrypt(mk, ciphertext, associated)
        for key in list(self.skipped)[: max(0, len(self.skipped) - MAX_SKIP)]:
            del self.skipped[key]  # the oldest skipped keys go first (Signal, 8.4)
        return plaintext

    def _skip(self, until):
        """SkipMessageKeys: keep the keys of the messages before `until` in the receiving chain."""
        if self.nr + MAX_SKIP < until:
            raise TooManySkipped(f"message {until} is more than {MAX_SKIP} ahead of message {self.nr}")
        if self.ckr is not None:
            while self.nr < until:
                self.ckr, mk = kdf_ck(self.ckr)
                self.skipped[(self.dhr, self.nr)] = mk
                self.nr += 1

    def _dh_ratchet(self, dh_pub, dhs):
        """DHRatchet: a new receiving chain from the peer's new key, then a new sending chain from ours."""
        if self.dhr is not None:
            self.previous = (self.previous + (self.dhr,))[-KEPT_CHAINS:]
        self.pn, self.ns, self.nr = self.ns, 0, 0
        self.dhr = dh_pub
        self.rk, self.ckr = kdf_rk(self.rk, dh(self.dhs, self.dhr))
        self.dhs = dhs
        self.rk, self.cks = kdf_rk(self.rk, dh(self.dhs, self.dhr))

    def to_bytes(self):
        """The state, versioned and enc()-encoded (it holds private keys: store it as such)."""
        skipped = b"".join(_SKIPPED.pack(dh_pub, n, mk) for (dh_pub, n), mk in self.skipped.items())
        return enc([
            STATE_VERSION,
            self.dhs.private_bytes_raw(),
            self.dhr or b"",
            self.rk,
            self.cks or b"",
            self.ckr or b"",
            self.ns,
            self.nr,
            self.pn,
            skipped,
            b"".join(self.previous),
        ])

    @classmethod
    def from_bytes(cls, data):
        """The state `to_bytes` saved; Malformed if it is not one."""
        fields = dec(data, 11)
        version, dhs, dhr, rk, cks, ckr, ns, nr, pn, skipped, previous = fields
        if version != STATE_VERSION:
            raise Malformed("not a ratchet state of this version")
        if (
            len(dhs) != 32
            or len(rk) != 32
            or any(len(value) not in (0, 32) for value in (dhr, cks, ckr))
            or any(len(value) != 8 for value in (ns, nr, pn))
            or len(skipped) % _SKIPPED.size
            or len(previous) % 32
        ):
            raise Malformed("a ratchet state field has the wrong length")
        return cls(
            X25519PrivateKey.from_private_bytes(dhs),
            dhr or None,
            rk,
            cks or None,
            ckr or None,
            *(int.from_bytes(value, "big") for value in (ns, nr, pn)),
            {(dh_pub, n): mk for dh_pub, n, mk in _SKIPPED.iter_unpack(skipped)},
            tuple(previous[at : at + 32] for at in range(0, len(previous), 32)),
        )
