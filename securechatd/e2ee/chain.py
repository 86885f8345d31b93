"""Device chains: the signed, hash-linked list of a user's devices (docs/E2EE.md, "Device chain").

A link's wire form is enc(fields + [signature, countersignature]); `Link`
parses and re-encodes it. The server stores links after checking their
shape and their place in the chain; clients check everything, signatures
included, against what they saw before (`ChainState`). Every rule that
fails raises its own ChainError subclass, naming the link and why.
"""

from dataclasses import dataclass, replace
from types import MappingProxyType

from securechatd.e2ee.encoding import Malformed, dec, digest, enc, field
from securechatd.e2ee.keys import DEVICE_ID_BYTES, KEY_BYTES, SIGNATURE_BYTES, DeviceKeys, device_id

# KEY_BYTES and device_id are keys.py's (DeviceKeys checks them), imported here so that they stay
# importable from chain, where the link format first defined them and the server imports them.

OPS = ("add", "revoke", "name")
HASH_BYTES = 32
MAX_NAME_BYTES = 64
ZERO_HASH = bytes(HASH_BYTES)
LINK_LABEL = "securechatd/chain-link/v1"
COUNTERSIGN_LABEL = "securechatd/chain-countersign/v1"


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

    def keys(self):
        """The keys an add link lists (Malformed if its id does not match its key)."""
        return DeviceKeys(self.user, self.device, self.sig_pub, self.dh_pub)

    def check(self):
        """Malformed unless every field has the shape docs/E2EE.md gives it (signatures are ChainState's to check)."""
        if not 0 <= self.seq < 1 << 64:
            raise Malformed("a chain link's seq does not fit 8 bytes")
        if len(self.prev) != HASH_BYTES or len(self.device) != DEVICE_ID_BYTES or len(self.signer) != DEVICE_ID_BYTES:
            raise Malformed("a chain link field has the wrong length")
        if self.op not in OPS:
            raise Malformed(f"unknown chain link op {self.op[:16]!r}")
        if self.op == "add":
            self.keys()
        elif self.sig_pub or self.dh_pub:
            raise Malformed("a chain link's keys do not fit its op")
        if len(field(self.name)) > MAX_NAME_BYTES or (self.op == "revoke" and self.name):
            raise Malformed("a chain link's name is too long or out of place")
        if len(self.signature) != SIGNATURE_BYTES or len(self.countersignature) != (SIGNATURE_BYTES if self.op == "add" else 0):
            raise Malformed("a chain link's signatures have the wrong length")

    @classmethod
    def from_bytes(cls, data):
        """The link `data` encodes; Malformed if its shape is wrong (signatures are not checked here)."""
        (user, seq, prev, op, device, sig_pub, dh_pub, name, signer, signature, countersignature) = dec(data, 11)
        try:
            user, op, name = user.decode("utf-8"), op.decode("ascii"), name.decode("utf-8")
        except UnicodeDecodeError:
            raise Malformed("a text field of a chain link is not UTF-8")
        if len(seq) != 8:
            raise Malformed("a chain link field has the wrong length")
        link = cls(user, int.from_bytes(seq, "big"), prev, op, device, sig_pub, dh_pub, name, signer, signature, countersignature)
        link.check()
        return link


class ChainError(ValueError):
    """A link that breaks a rule of the device chain; `seq` is the link's place, the message says which rule."""

    def __init__(self, seq, reason):
        super().__init__(f"device chain link {seq}: {reason}")
        self.seq = seq


class WrongUser(ChainError):
    """The link belongs to another user's chain."""


class Gap(ChainError):
    """The link is not the next one: seq must run on from 1, or from the last link seen, without a hole."""


class Fork(ChainError):
    """The chain does not extend what was seen: a prev that is not the hash of the link before, or a seen link rewritten or gone."""


class BadFirstLink(ChainError):
    """Link 1 must add a device and be signed by that device (trust on first use)."""


class UnknownSigner(ChainError):
    """The signer was never added to this chain."""


class RevokedSigner(ChainError):
    """The signer was revoked by an earlier link."""


class BadSignature(ChainError):
    """The signature is not the signer's over the link's fields."""


class BadCountersignature(ChainError):
    """An add's countersignature is not the new device's: nobody may list a key they do not hold."""


class Readded(ChainError):
    """An add of a device revoked earlier: a revoked device is never added again."""


class DuplicateDevice(ChainError):
    """An add of a device that is already in the chain."""


class UnknownDevice(ChainError):
    """A revoke or name of a device that is not in the chain now (never added, or revoked)."""


@dataclass(frozen=True)
class ChainDevice:
    """A current device of a user, as the chain lists it."""

    keys: DeviceKeys
    name: str


class ChainState:
    """A user's chain as far as it has been verified: its length and head hash, current and revoked devices.

    Immutable: extend() returns a new state and leaves this one as it was, so
    a chain that fails part-way changes nothing. Clients keep the links they
    verified (the state is rebuilt with verify_chain) and feed new ones to extend().
    """

    def __init__(self, user, seq=0, head=ZERO_HASH, devices=None, revoked=frozenset(), former=None):
        self.user = user
        self.seq = seq
        self.head = head
        self.devices = MappingProxyType(dict(devices or {}))
        self.revoked = frozenset(revoked)
        # revoked devices' keys: what they signed before their revocation is still theirs (membership history)
        self.former = MappingProxyType(dict(former or {}))

    def __repr__(self):
        return f"<ChainState {self.user} seq={self.seq} devices={len(self.devices)}>"

    @property
    def seen(self):
        """(seq, hash) of the last link verified: what a client records to check the next fetch against."""
        return self.seq, self.head

    def extend(self, links):
        """The state after `links`, which must follow on from this one; the ChainError of the first link that breaks a rule."""
        seq, head, devices, revoked = self.seq, self.head, dict(self.devices), set(self.revoked)
        former = dict(self.former)
        for link in links:
            self._check(link, seq, head, devices, revoked)
            if link.op == "add":
                devices[link.device] = ChainDevice(link.keys(), link.name)
            elif link.op == "name":
                devices[link.device] = replace(devices[link.device], name=link.name)
            else:
                former[link.device] = devices.pop(link.device)
                revoked.add(link.device)
            seq, head = link.seq, link.hash()
        return ChainState(self.user, seq, head, devices, revoked, former)

    def _check(self, link, seq, head, devices, revoked):
        """Raise the error of the first rule `link` breaks as link seq + 1 after a chain at (seq, head)."""
        link.check()
        at = seq + 1
        if link.user != self.user:
            raise WrongUser(at, f"it is {link.user!r}'s, not {self.user!r}'s")
        if link.seq != at:
            raise Gap(at, f"link {link.seq} came where link {at} belongs")
        if link.prev != head:
            raise Fork(at, f"its prev is not the hash of link {seq}")
        if at == 1:
            if link.op != "add" or link.signer != link.device:
                raise BadFirstLink(at, "the first link must add a device, signed by that device")
            signer = link.keys()
        elif link.signer in revoked:
            raise RevokedSigner(at, f"its signer {link.signer.hex()} was revoked")
        elif link.signer not in devices:
            raise UnknownSigner(at, f"its signer {link.signer.hex()} is not a device of {self.user!r}")
        else:
            signer = devices[link.signer].keys
        if not signer.verify(link.signature, LINK_LABEL, link.fields()):
            raise BadSignature(at, f"the signature is not {link.signer.hex()}'s")
        if link.op == "add":
            if not link.keys().verify(link.countersignature, COUNTERSIGN_LABEL, link.fields()):
                raise BadCountersignature(at, f"the countersignature is not {link.device.hex()}'s")
            if link.device in revoked:
                raise Readded(at, f"device {link.device.hex()} was revoked and cannot be added again")
            if link.device in devices:
                raise DuplicateDevice(at, f"device {link.device.hex()} is already in the chain")
        elif link.device not in devices:
            raise UnknownDevice(at, f"{link.op} of {link.device.hex()}, which is not a current device")


def verify_chain(user, links, seen=None):
    """The state of `user`'s chain from all its links, in order, from link 1.

    `seen` is the (seq, hash) last seen of this user: Fork if the chain does
    not contain that link (rewritten, or rolled back to fewer links).
    """
    links = list(links)
    state = ChainState(user).extend(links)
    seen_seq, seen_hash = seen or (0, ZERO_HASH)
    if state.seq < seen_seq:
        raise Fork(state.seq + 1, f"the chain ends before link {seen_seq}, which was seen")
    if seen_seq and links[seen_seq - 1].hash() != seen_hash:  # extend() checked that links[i] is link i + 1
        raise Fork(seen_seq, "it is not the link seen before with this seq")
    return state


def draft_add(state, keys, name, signer):
    """The unsigned add of `keys` after `state`, to be signed by device `signer` (an id) and countersigned by the new device.

    The two signatures cover the same fields, so the devices may sign in either order, on different machines.
    """
    return Link(state.user, state.seq + 1, state.head, "add", keys.device, keys.sig_pub, keys.dh_pub, name, signer)


def sign_link(link, device):
    """`link` with the signature of `device`, its signer."""
    if device.id != link.signer:
        raise ValueError("a link is signed by the device its signer field names")
    return replace(link, signature=device.sign(LINK_LABEL, link.fields()))


def countersign_link(link, device):
    """An add link with the countersignature of `device`, the device it adds."""
    if link.op != "add" or device.id != link.device:
        raise ValueError("only the device an add link adds countersigns it")
    return replace(link, countersignature=device.sign(COUNTERSIGN_LABEL, link.fields()))


def add(state, signer, new, name):
    """The add of device `new` after `state`, signed by `signer` (both held here: keys.Device objects)."""
    return sign_link(countersign_link(draft_add(state, new.keys, name, signer.id), new), signer)


def first(device, name):
    """Link 1 of `device`'s user: the device adds itself (trust on first use)."""
    return add(ChainState(device.user), device, device, name)


def revoke(state, signer, device):
    """The revoke of device id `device` after `state`, signed by `signer`."""
    return sign_link(Link(state.user, state.seq + 1, state.head, "revoke", device, b"", b"", "", signer.id), signer)


def rename(state, signer, device, name):
    """The link naming device id `device` `name` after `state`, signed by `signer`."""
    return sign_link(Link(state.user, state.seq + 1, state.head, "name", device, b"", b"", name, signer.id), signer)
