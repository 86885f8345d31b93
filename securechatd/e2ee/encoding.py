"""The canonical encoding every signature, MAC and hash of the e2ee layer is computed over.

enc(fields) is each field as a 4-byte big-endian length and its bytes, so
two different field lists never encode alike; every use starts with its own
label (securechatd/<what>/v1), so a value made for one purpose never checks
for another (docs/E2EE.md, "Encoding").
"""

import hashlib
import struct

from cryptography.exceptions import InvalidSignature

MAX_FIELD = 1 << 24  # no field of ours comes near this: longer is malformed input


class Malformed(ValueError):
    """Bytes that do not parse as the format they claim to be."""


def field(value):
    """One field as bytes: bytes as they are, text as UTF-8, an int as 8 bytes."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, int):
        return struct.pack(">Q", value)
    raise TypeError(f"cannot encode a {type(value).__name__} field")


_U32 = struct.Struct(">I").pack
_U64 = struct.Struct(">Q").pack


def enc(fields):
    """The canonical encoding of a list of fields.

    (The daemon encodes a chain link and hashes one per message: bytes, text
    and ints take the short way; anything else, `field`.)
    """
    parts = []
    for value in fields:
        kind = type(value)
        if kind is bytes:
            data = value
        elif kind is int and 0 <= value < 1 << 64:
            data = _U64(value)
        elif kind is str:
            data = value.encode("utf-8")
        else:
            data = field(value)
        parts += (_U32(len(data)), data)
    return b"".join(parts)


_LENGTH = struct.Struct(">I").unpack_from


def dec(data, count=None):
    """The fields of enc(...) output; Malformed if it does not parse (or has not `count` fields).

    (The daemon parses every message header with it: it is kept to a few operations a field.)
    """
    fields, at, end = [], 0, len(data)
    while at < end:
        if at + 4 > end:
            raise Malformed("a field length is cut short")
        (length,) = _LENGTH(data, at)
        at += 4
        if length > MAX_FIELD or at + length > end:
            raise Malformed("a field is longer than what is left")
        fields.append(data[at : at + length])
        at += length
    if count is not None and len(fields) != count:
        raise Malformed(f"{len(fields)} fields where {count} belong")
    return fields


def labelled(label, fields):
    """What is hashed, signed or MACed: the label, then the encoded fields."""
    if not label.startswith("securechatd/") or not label.endswith("/v1"):
        raise ValueError(f"not a label of ours: {label!r}")
    return label.encode("ascii") + enc(fields)


def digest(label, fields):
    """H(label, fields): SHA-256 over the label and the encoded fields."""
    return hashlib.sha256(labelled(label, fields)).digest()


def sign(private_key, label, fields):
    """An Ed25519 signature over the label and the encoded fields."""
    return private_key.sign(labelled(label, fields))


def verify(public_key, signature, label, fields):
    """True if `signature` is `public_key`'s over the label and fields (never raises for a bad one)."""
    try:
        public_key.verify(signature, labelled(label, fields))
    except (InvalidSignature, ValueError):
        return False
    return True
