"""A conversation's hash chain, the server's signed heads and receipts, transcript heads, the export bundle.

docs/E2EE.md, "Verifiable conversations", is the specification. The server
links every message and membership or mode event of an encrypted
conversation into one chain (`Link`, `next_hash`) and signs heads of it
(`Head`) with its own Ed25519 key; a `Receipt` is one signed head and the
links it covers. Because e_n commits to every link before it, two validly
signed heads that disagree are portable proof the server lied
(`Equivocation`). A `TranscriptHead` is a reader's device signing the chain
as it saw it. Pure functions over bytes: every time is a parameter.
"""

import json
from dataclasses import dataclass
from types import MappingProxyType

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from securechatd.e2ee.chain import HASH_BYTES
from securechatd.e2ee.encoding import Malformed, dec, digest, enc, sign, verify
from securechatd.e2ee.keys import DEVICE_ID_BYTES, KEY_BYTES, SIGNATURE_BYTES
from securechatd.e2ee.merkle import batch_proofs, leaf_hash, verify_inclusion

GENESIS_LABEL = "securechatd/chain-genesis/v1"
CHAIN_LABEL = "securechatd/chain/v1"
ITEM_LABEL = "securechatd/envelope-item/v1"
HEAD_LABEL = "securechatd/server-heads/v1"
KEY_ID_LABEL = "securechatd/server-key-id/v1"
TH_LABEL = "securechatd/transcript-head/v1"
EXPORT_LABEL = "securechatd/export/v1"
CONTENTS_LABEL = "securechatd/export-contents/v1"
BUNDLE_FORMAT = "securechatd-bundle/v1"

MESSAGE, MEMBERSHIP, MODE = "message", "membership", "mode"
KINDS = (MESSAGE, MEMBERSHIP, MODE)  # each kind numbers its links 1, 2, 3, ...: seq, epoch, mode event number
KEY_ID_BYTES = 16
U64 = 1 << 64
MAX_PATH = 64  # a batch of heads has fewer than 2**64 leaves
MAX_JSON_INT = (1 << 53) - 1  # I-JSON (RFC 7493): what every JSON parser reads exactly


def _u64(*values):
    if not all(isinstance(value, int) and 0 <= value < U64 for value in values):
        raise Malformed("a number does not fit 8 bytes")


def _numbers(*raw):
    if any(len(value) != 8 for value in raw):
        raise Malformed("a number is not 8 bytes")
    return [int.from_bytes(value, "big") for value in raw]


class TranscriptError(ValueError):
    """A chain link, head or transcript head that breaks a rule; `n` is the chain position, the message says which."""

    def __init__(self, n, reason):
        super().__init__(f"chain link {n}: {reason}")
        self.n = n


class WrongConversation(TranscriptError):
    """The link or head belongs to another conversation."""


class Gap(TranscriptError):
    """A link is not the next one: n, or the seq, epoch or mode number of its kind, skips or repeats."""


class HeadMismatch(TranscriptError):
    """Recomputing the chain does not give the signed head's e_n: a wrong previous e, or a changed or missing link."""


class BadHeadSignature(TranscriptError):
    """The head is not signed by the server key it is checked with."""


class ForkDetected(TranscriptError):
    """A sender's (prev_n, prev_e), or a reader's transcript head, names a chain other than ours: the server forked it."""


class BadTranscriptSignature(TranscriptError):
    """The transcript head is not signed by the device it names."""


def genesis(conversation):
    """e_0 = H("securechatd/chain-genesis/v1", [conversation]): the head of a chain with no link yet."""
    _u64(conversation)
    return digest(GENESIS_LABEL, [conversation])


def message_item(header, body, signature=b""):
    """A message link's item hash: H(label, [header, body, signature]). Wraps differ per device, so they are left out."""
    return digest(ITEM_LABEL, [header, body, signature])


@dataclass(frozen=True)
class Link:
    """Chain position `n`: a message (number = seq), membership state (epoch) or mode event, by its item hash."""

    conversation: int
    n: int
    server_time: int  # milliseconds since the epoch, the server's clock when it placed the item
    kind: str
    number: int
    item: bytes

    def fields(self):
        return [self.conversation, self.n, self.server_time, self.kind, self.number, self.item]

    def to_bytes(self):
        return enc(self.fields())

    def check(self):
        """Malformed unless each field has its shape (its place in the chain is Position's to check)."""
        _u64(self.conversation, self.n, self.server_time, self.number)
        if self.n < 1 or self.number < 1:
            raise Malformed("a chain link's n and number start at 1")
        if self.kind not in KINDS:
            raise Malformed(f"unknown chain link kind {self.kind[:16]!r}")
        if len(self.item) != HASH_BYTES:
            raise Malformed("a chain link's item hash is not 32 bytes")

    @classmethod
    def from_bytes(cls, data):
        conversation, n, server_time, kind, number, item = dec(data, 6)
        conversation, n, server_time, number = _numbers(conversation, n, server_time, number)
        try:
            kind = kind.decode("ascii")
        except UnicodeDecodeError:
            raise Malformed("a chain link's kind is not ASCII")
        link = cls(conversation, n, server_time, kind, number, item)
        link.check()
        return link


def next_hash(prev, link):
    """e_n = H("securechatd/chain/v1", [conversation, e_{n-1}, n, server_time, kind, number, item])."""
    return digest(CHAIN_LABEL, [link.conversation, prev, link.n, link.server_time, link.kind, link.number, link.item])


class Position:
    """How far a conversation's chain is verified: n, e_n and the last number of each kind. Immutable.

    Position(conversation) is the genesis; extend() checks that links follow
    on without a hole (in n and in each kind's numbering) and returns the
    position after each, so a batch that fails part-way changes nothing.
    """

    def __init__(self, conversation, n=0, e=None, numbers=None):
        self.conversation = conversation
        self.n = n
        self.e = genesis(conversation) if e is None else e
        self.numbers = MappingProxyType(dict.fromkeys(KINDS, 0) | dict(numbers or {}))

    def __repr__(self):
        return f"<Position {self.conversation} n={self.n}>"

    def after(self, link):
        """The position after `link`; WrongConversation or Gap if it is not the next link here."""
        link.check()
        if link.conversation != self.conversation:
            raise WrongConversation(link.n, f"it is conversation {link.conversation}'s, not {self.conversation}'s")
        if link.n != self.n + 1:
            raise Gap(self.n + 1, f"link {link.n} came where link {self.n + 1} belongs")
        expected = self.numbers[link.kind] + 1
        if link.number != expected:
            raise Gap(link.n, f"{link.kind} {link.number} came where {link.kind} {expected} belongs")
        return Position(self.conversation, link.n, next_hash(self.e, link), {**self.numbers, link.kind: link.number})

    def extend(self, links):
        """The positions after each of `links`, in order (the last is the new head)."""
        positions, position = [], self
        for link in links:
            position = position.after(link)
            positions.append(position)
        return positions


def check_sender_view(prev_n, prev_e, n, e_at):
    """Check a header's view of the chain (prev_n, prev_e) against ours, for the message at link n.

    `e_at(k)` is our e_k, or None where we hold none (then nothing can be
    checked: False). True if it matches; ForkDetected if the sender claims
    to have seen its own link or later, or saw another e at prev_n.
    """
    if prev_n >= n:
        raise ForkDetected(n, f"its sender claims to have seen link {prev_n} before it was placed at {n}")
    ours = e_at(prev_n)
    if ours is None:
        return False
    if ours != prev_e:
        raise ForkDetected(n, f"its sender saw another e at link {prev_n} than this device: the chain was forked")
    return True


def _public(server_key):
    if len(server_key) != KEY_BYTES:
        raise Malformed("a server key is not 32 bytes")
    return Ed25519PublicKey.from_public_bytes(server_key)


@dataclass(frozen=True)
class Head:
    """The server's signed word that a conversation's chain is at (n, e_n).

    The server signs each batch of heads once: the RFC 9162 Merkle root of
    their leaves enc([conversation, n, e]), as sign(server key,
    "securechatd/server-heads/v1", [size, root]). A Head carries its leaf's
    index in the batch, the batch's size and root, the inclusion path, and
    that signature; one signature covers every conversation a batch touched.
    """

    conversation: int
    n: int
    e: bytes
    index: int = 0
    size: int = 1
    root: bytes = b""
    path: tuple = ()
    signature: bytes = b""

    def __post_init__(self):
        object.__setattr__(self, "path", tuple(self.path))

    def fields(self):
        return [self.conversation, self.n, self.e]

    def leaf(self):
        return leaf_hash(enc(self.fields()))

    def to_bytes(self):
        return _head_bytes(self.conversation, self.n, self.e, self.index, self.size, self.root, self.path, self.signature)

    def check(self):
        _u64(self.conversation, self.n, self.index, self.size)
        if not self.index < self.size or len(self.path) > MAX_PATH:
            raise Malformed("a signed head's place in its batch is impossible")
        hashes = (self.e, self.root, *self.path)
        if any(len(value) != HASH_BYTES for value in hashes) or len(self.signature) != SIGNATURE_BYTES:
            raise Malformed("a signed head's e, root, path or signature has the wrong length")

    def verify(self, server_key):
        """BadHeadSignature unless this head is in a batch the server key `server_key` (raw 32 bytes) signed."""
        if not verify_inclusion(self.leaf(), self.index, self.size, list(self.path), self.root):
            raise BadHeadSignature(self.n, "the head is not in the batch of heads its signature covers")
        if not verify(_public(server_key), self.signature, HEAD_LABEL, [self.size, self.root]):
            raise BadHeadSignature(self.n, "the head's signature is not the server key's")

    @classmethod
    def from_bytes(cls, data):
        conversation, n, e, index, size, root, path, signature = dec(data, 8)
        head = cls(*_numbers(conversation, n), e, *_numbers(index, size), root, dec(path), signature)
        head.check()
        return head


def _head_bytes(conversation, n, e, index, size, root, path, signature):
    return enc([conversation, n, e, index, size, root, enc(list(path)), signature])


def signed_heads(server_private, heads):
    """[Head.to_bytes()] for the batch [(conversation, n, e)], all under one signature of the server's
    Ed25519 key. (The daemon signs every batch of links: bytes straight away, no Head objects.)"""
    root, paths = batch_proofs([leaf_hash(enc(head)) for head in heads])
    size = len(heads)
    signature = sign(server_private, HEAD_LABEL, [size, root])
    return [
        _head_bytes(conversation, n, e, index, size, root, path, signature)
        for index, ((conversation, n, e), path) in enumerate(zip(heads, paths))
    ]


def sign_heads(server_private, heads):
    """[Head] for the batch [(conversation, n, e)], all under one signature of the server's Ed25519 key."""
    return [Head.from_bytes(data) for data in signed_heads(server_private, heads)]


def sign_head(server_private, conversation, n, e):
    """The head (conversation, n, e) signed alone (a batch of one)."""
    [head] = sign_heads(server_private, [(conversation, n, e)])
    return head


@dataclass(frozen=True)
class Receipt:
    """What the server returns for link m: links m..h and its signed head at h (one signature may cover a batch)."""

    links: tuple
    head: Head

    def __post_init__(self):
        object.__setattr__(self, "links", tuple(self.links))

    def to_bytes(self):
        """enc([head bytes, link m bytes, ..., link h bytes])."""
        return enc([self.head.to_bytes()] + [link.to_bytes() for link in self.links])

    @classmethod
    def from_bytes(cls, data):
        fields = dec(data)
        if len(fields) < 2:
            raise Malformed("a receipt has a head and at least one link")
        return cls([Link.from_bytes(link) for link in fields[1:]], Head.from_bytes(fields[0]))


def receipt_bytes(head, links):
    """Receipt(...).to_bytes() from the bytes of a signed head and of links m..h, as a server stores them."""
    return enc([head, *links])


def check_receipt(receipt, before, server_key):
    """The Positions after each of the receipt's links, once its head is checked against them.

    `before` is our Position at link m - 1 (the genesis position for m = 1).
    Errors, in the order checked: BadHeadSignature, WrongConversation, Gap
    (also for a head not at the last link), HeadMismatch.
    """
    head = receipt.head
    head.verify(server_key)
    if head.conversation != before.conversation:
        raise WrongConversation(head.n, f"the head is conversation {head.conversation}'s")
    positions = before.extend(receipt.links)
    last = positions[-1] if positions else before
    if head.n != last.n:
        raise Gap(head.n, f"the head is at {head.n}, the links end at {last.n}")
    if head.e != last.e:
        raise HeadMismatch(head.n, "the links recompute to another e than the server signed")
    return positions


@dataclass(frozen=True)
class Equivocation:
    """Portable proof the server signed two histories of one conversation.

    `first` and `second` are validly signed heads with first.n <= second.n.
    At equal n they differ in e. Otherwise `links` (first.n + 1 .. second.n)
    recompute from `fork` to second.e, so second commits to `fork` as e at
    first.n (SHA-256 is collision resistant), and `fork` is not first.e.
    """

    first: Head
    second: Head
    fork: bytes = b""
    links: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "links", tuple(self.links))

    def to_bytes(self):
        return enc([self.first.to_bytes(), self.second.to_bytes(), self.fork] + [link.to_bytes() for link in self.links])

    @classmethod
    def from_bytes(cls, data):
        fields = dec(data)
        if len(fields) < 3:
            raise Malformed("an equivocation proof has two heads and a fork")
        return cls(Head.from_bytes(fields[0]), Head.from_bytes(fields[1]), fields[2], [Link.from_bytes(f) for f in fields[3:]])

    def proves(self, server_key):
        """True if this is proof that the key `server_key` signed two different histories (never raises for a bad one)."""
        first, second = self.first, self.second
        try:
            first.verify(server_key)
            second.verify(server_key)
            if first.conversation != second.conversation or first.n > second.n:
                return False
            if first.n == second.n:
                return first.e != second.e and not self.links
            if len(self.fork) != HASH_BYTES or self.fork == first.e or len(self.links) != second.n - first.n:
                return False
            e = self.fork
            for n, link in enumerate(self.links, first.n + 1):  # each kind's numbering is not known here, nor needed
                link.check()
                if (link.conversation, link.n) != (first.conversation, n):
                    return False
                e = next_hash(e, link)
            return e == second.e
        except (TranscriptError, Malformed):
            return False


def equivocation(first, second, server_key):
    """The Equivocation proof two signed heads at one n make, or None if they do not prove one."""
    first, second = sorted((first, second), key=lambda head: head.n)
    proof = Equivocation(first, second)
    return proof if proof.proves(server_key) else None


def server_key_id(server_key):
    """The server key's id: the first 16 bytes of H("securechatd/server-key-id/v1", [key]), 32 lower-case hex digits."""
    _public(server_key)
    return digest(KEY_ID_LABEL, [server_key])[:KEY_ID_BYTES].hex()


def readable_key_id(key_id):
    """A key id as 8 groups of 4 hex digits, to read aloud or compare by eye."""
    return " ".join(key_id[at : at + 4] for at in range(0, len(key_id), 4))


def parse_key_id(text):
    """The key id in `text` (either form; spaces, ':' and '-' ignored, any case); ValueError if it is not one."""
    key_id = "".join(char for char in text if char not in " :-").lower()
    if len(key_id) != 2 * KEY_ID_BYTES or any(char not in "0123456789abcdef" for char in key_id):
        raise ValueError(f"not a server key id: {text[:80]!r}")
    return key_id


@dataclass(frozen=True)
class TranscriptHead:
    """A reader's signed view: the chain up to n (e_n), the membership state then, when and by which device."""

    conversation: int
    n: int
    e: bytes
    members: bytes  # the hash of the membership state in force at link n
    time: int  # milliseconds since the epoch, the signer's clock
    user: str
    device: bytes
    signature: bytes = b""

    def fields(self):
        return [self.conversation, self.n, self.e, self.members, self.time, self.user, self.device]

    def to_bytes(self):
        return enc(self.fields() + [self.signature])

    def check(self):
        _u64(self.conversation, self.n, self.time)
        lengths = (len(self.e), len(self.members), len(self.device), len(self.signature))
        if lengths != (HASH_BYTES, HASH_BYTES, DEVICE_ID_BYTES, SIGNATURE_BYTES):
            raise Malformed("a transcript head field has the wrong length")

    @classmethod
    def from_bytes(cls, data):
        conversation, n, e, members, time, user, device, signature = dec(data, 8)
        conversation, n, time = _numbers(conversation, n, time)
        try:
            user = user.decode("utf-8")
        except UnicodeDecodeError:
            raise Malformed("a transcript head's user is not UTF-8")
        head = cls(conversation, n, e, members, time, user, device, signature)
        head.check()
        return head


def sign_transcript_head(device, conversation, n, e, members, time):
    """The transcript head of `device` (a keys.Device) over the chain up to (n, e) and the membership state `members`."""
    fields = [conversation, n, e, members, time, device.user, device.id]
    head = TranscriptHead(*fields, device.sign(TH_LABEL, fields))
    head.check()
    return head


def check_transcript_head(head, keys, e=None):
    """Check a transcript head against its signer's DeviceKeys (from the signer's verified chain), and our e_n if given.

    BadTranscriptSignature if `keys` is not the device it names or did not
    sign it; ForkDetected if the reader signed another e at n than `e`.
    """
    if (keys.user, keys.device) != (head.user, head.device) or not keys.verify(head.signature, TH_LABEL, head.fields()):
        raise BadTranscriptSignature(head.n, f"it is not signed by {head.user}'s device {head.device.hex()}")
    if e is not None and e != head.e:
        raise ForkDetected(head.n, f"{head.user} signed another e at link {head.n} than this device has: a fork")


# -- the export bundle (docs/E2EE.md, "Export bundle") --------------------------------------

_HEX_DIGITS = frozenset("0123456789abcdef")
_ENVELOPE_KEYS = {"seq": int, "header": bytes, "body": bytes, "signature": bytes}
_DISCLOSED_KEYS = {"seq": int, "key": bytes, "plaintext": str}
_EXPORT_KEYS = {"user": str, "device": bytes, "time": int, "signature": bytes}
_BUNDLE_KEYS = {
    "format": str, "conversation": int, "server_key": bytes, "device_chains": dict, "membership": list, "modes": list,
    "links": list, "heads": list, "envelopes": list, "transcript_heads": list, "disclosed": list, "export": dict,
}


def unhex(text):
    """The bytes of lower-case hex `text` (Malformed otherwise: one value, one spelling)."""
    if not isinstance(text, str) or len(text) % 2 or not _HEX_DIGITS.issuperset(text):
        raise Malformed("a bundle value is not lower-case hex")
    return bytes.fromhex(text)


def canonical_json(value):
    """The bundle's bytes: RFC 8785 (JCS) for its values (ASCII keys, integers, strings), then one LF."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def _shaped(value, shape, where):
    """Malformed unless `value` is an object with exactly `shape`'s keys, each of its type (bytes: hex text)."""
    if not isinstance(value, dict) or set(value) != set(shape):
        raise Malformed(f"{where} does not have exactly the members {sorted(shape)}")
    for key, kind in shape.items():
        item = value[key]
        if kind is bytes:
            unhex(item)
        elif kind is int:
            if type(item) is not int or not 0 <= item <= MAX_JSON_INT:
                raise Malformed(f"{where}.{key} is not an integer from 0 to 2^53 - 1")
        elif not isinstance(item, kind):
            raise Malformed(f"{where}.{key} is not a JSON {kind.__name__}")


def read_bundle(data):
    """The JSON value of bundle bytes `data`, its shape checked (nothing cryptographic): Malformed if not a bundle.

    A bundle has one spelling: `data` must be canonical_json of its value, and
    every byte string lower-case hex, so no byte of it can change unnoticed.
    """
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=_refuse)
    except (UnicodeDecodeError, ValueError, RecursionError) as problem:  # (RecursionError: "[[[[..." nested deep)
        raise Malformed(f"not a JSON text in UTF-8 ({problem})")
    _shaped(value, _BUNDLE_KEYS, "the bundle")
    if value["format"] != BUNDLE_FORMAT:
        raise Malformed(f"not a {BUNDLE_FORMAT} bundle")
    for key in ("membership", "modes", "links", "heads", "transcript_heads"):
        for item in value[key]:
            unhex(item)
    for user, links in value["device_chains"].items():
        if not isinstance(links, list):
            raise Malformed(f"device_chains.{user[:32]} is not a list")
        for link in links:
            unhex(link)
    for item in value["envelopes"]:
        _shaped(item, _ENVELOPE_KEYS, "an envelope")
    for item in value["disclosed"]:
        _shaped(item, _DISCLOSED_KEYS, "a disclosed message")
    _shaped(value["export"], _EXPORT_KEYS, "export")
    try:
        canonical = canonical_json(value)
    except UnicodeEncodeError:  # a lone surrogate, spelled as a \u escape
        raise Malformed("a bundle string is not Unicode text")
    if canonical != data:
        raise Malformed("the bundle is not in its canonical form (RFC 8785, then one LF)")
    return value


def _refuse(name):
    raise ValueError(f"{name} is not a JSON number")


def contents_digest(bundle):
    """H("securechatd/export-contents/v1", ...) of a bundle's JSON value: every item, in order, as bytes.

    What the exporter signs, so no item can be dropped, added or moved
    (disclosures and transcript heads are not in the chain).
    """
    chains = [enc([user, enc([unhex(link) for link in links])]) for user, links in sorted(bundle["device_chains"].items())]
    envelopes = [
        enc([item["seq"], unhex(item["header"]), unhex(item["body"]), unhex(item["signature"])])
        for item in bundle["envelopes"]
    ]
    disclosed = [enc([item["seq"], unhex(item["key"]), item["plaintext"]]) for item in bundle["disclosed"]]
    return digest(
        CONTENTS_LABEL,
        [
            bundle["format"],
            bundle["conversation"],
            unhex(bundle["server_key"]),
            enc(chains),
            enc([unhex(state) for state in bundle["membership"]]),
            enc([unhex(event) for event in bundle["modes"]]),
            enc([unhex(link) for link in bundle["links"]]),
            enc([unhex(head) for head in bundle["heads"]]),
            enc(envelopes),
            enc([unhex(head) for head in bundle["transcript_heads"]]),
            enc(disclosed),
        ],
    )


def export_fields(bundle):
    """What the exporter's device signs: [conversation, user, device, time, contents digest]."""
    export = bundle["export"]
    return [bundle["conversation"], export["user"], unhex(export["device"]), export["time"], contents_digest(bundle)]


def check_export(bundle, keys):
    """True if the exporter's device `keys` (DeviceKeys, from the bundle's verified chain) sealed `bundle`."""
    export = bundle["export"]
    if (keys.user, keys.device) != (export["user"], unhex(export["device"])):
        return False
    return keys.verify(unhex(export["signature"]), EXPORT_LABEL, export_fields(bundle))


def build_bundle(conversation, server_key, device_chains, membership, modes, links, heads, envelopes,
                 transcript_heads, disclosed, exporter, time):
    """The export bundle's bytes, sealed by `exporter` (a keys.Device) at `time` (ms).

    Items are bytes (links and heads as their to_bytes()); `envelopes` are
    (seq, header, body, signature) and `disclosed` (seq, K, plaintext bytes)
    tuples, in seq order; `device_chains` maps each user to their links' bytes.
    """
    hexed = lambda items: [item.hex() for item in items]  # noqa: E731
    bundle = {
        "format": BUNDLE_FORMAT,
        "conversation": conversation,
        "server_key": server_key.hex(),
        "device_chains": {user: hexed(chain) for user, chain in device_chains.items()},
        "membership": hexed(membership),
        "modes": hexed(modes),
        "links": hexed(links),
        "heads": hexed(heads),
        "envelopes": [
            {"seq": seq, "header": header.hex(), "body": body.hex(), "signature": signature.hex()}
            for seq, header, body, signature in envelopes
        ],
        "transcript_heads": hexed(transcript_heads),
        "disclosed": [
            {"seq": seq, "key": key.hex(), "plaintext": plaintext.decode("utf-8")} for seq, key, plaintext in disclosed
        ],
        "export": {"user": exporter.user, "device": exporter.id.hex(), "time": time, "signature": ""},
    }
    bundle["export"]["signature"] = exporter.sign(EXPORT_LABEL, export_fields(bundle)).hex()
    data = canonical_json(bundle)
    read_bundle(data)  # the builder never hands out what a reader refuses (numbers beyond 2^53, say)
    return data
