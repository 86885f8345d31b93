"""Device chains: the signed, hash-linked list of a user's devices (docs/E2EE.md, "Device chain").

A link's wire form is enc(fields + [signature, countersignature]); `Link`
parses and re-encodes it. The server stores links after checking their
shape and their place in the chain; clients check everything, signatures
included, against what they saw before.
"""

from dataclasses import dataclass

from securechatd.e2ee.encoding import Malformed, dec, digest, enc, field

OPS = ("add", "revoke", "name")
DEVICE_ID_BYTES = 16
KEY_BYTES = 32
HASH_BYTES = 32
MAX_NAME_BYTES = 64
ZERO_HASH = bytes(HASH_BYTES)


def device_id(sig_pub):
    """The 16-byte id of the device whose Ed25519 public key is `sig_pub` (raw 32 bytes)."""
    return digest("securechatd/device-id/v1", [sig_pub])[:DEVICE_ID_BYTES]


@dataclass(frozen=True)
class Link:
    user: str
    seq: int
    prev: bytes
    op: str
    device: bytes
    sig_pub: bytes
    dh_pub: bytes
    name: str
    signer: bytes
    signature: bytes = b""
    countersignature: bytes = b""

    def fields(self):
        """The signed fields, in the order of docs/E2EE.md."""
        return [
            self.user,
            self.seq,
            self.prev,
            self.op,
            self.device,
            self.sig_pub,
            self.dh_pub,
            self.name,
            self.signer,
        ]

    def to_bytes(self):
        return enc(self.fields() + [self.signature, self.countersignature])

    def hash(self):
        return digest("securechatd/chain-hash/v1", self.fields() + [self.signature, self.countersignature])

    @classmethod
    def from_bytes(cls, data):
        """The link `data` encodes; Malformed if its shape is wrong (signatures are not checked here)."""
        (user, seq, prev, op, device, sig_pub, dh_pub, name, signer, signature, countersignature) = dec(data, 11)
        try:
            user, op, name = user.decode("utf-8"), op.decode("ascii"), name.decode("utf-8")
        except UnicodeDecodeError:
            raise Malformed("a text field of a chain link is not UTF-8")
        if len(seq) != 8 or len(prev) != HASH_BYTES or len(device) != DEVICE_ID_BYTES or len(signer) != DEVICE_ID_BYTES:
            raise Malformed("a chain link field has the wrong length")
        if op not in OPS:
            raise Malformed(f"unknown chain link op {op[:16]!r}")
        keys = (len(sig_pub), len(dh_pub))
        if keys != ((KEY_BYTES, KEY_BYTES) if op == "add" else (0, 0)):
            raise Malformed("a chain link's keys do not fit its op")
        if op == "add" and device_id(sig_pub) != device:
            raise Malformed("a chain link's device id does not match its key")
        if len(field(name)) > MAX_NAME_BYTES or (op == "revoke" and name):
            raise Malformed("a chain link's name is too long or out of place")
        if len(signature) != 64 or len(countersignature) != (64 if op == "add" else 0):
            raise Malformed("a chain link's signatures have the wrong length")
        return cls(user, int.from_bytes(seq, "big"), prev, op, device, sig_pub, dh_pub, name, signer, signature, countersignature)
