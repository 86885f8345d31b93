"""The conversation chain, server heads, receipts, equivocation, transcript heads, mode events and the export bundle.

Golden vectors (tests/vectors/golden_transcript.json and golden_bundle.json)
are rebuilt from fixed seeds and checked by hand with hashlib and
cryptography alone; each rule fails with its own exception; any byte
changed in a receipt, a transcript head or the bundle is caught.
`check_bundle` below follows docs/E2EE.md "Verifying a bundle" step by step.
"""

import hashlib
import json
import os
import struct
from dataclasses import replace

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from twisted.trial import unittest

from securechatd.e2ee import chain, encoding, envelope, membership, transcript
from securechatd.e2ee.encoding import Malformed, enc
from securechatd.e2ee import keys as device_keys
from securechatd.e2ee.envelope import ATTESTABLE, DENIABLE, Header, check_signature, open_body
from securechatd.e2ee.membership import (
    BadModeSignature,
    ModeActorNotMember,
    ModeEvent,
    ModeOutOfPlace,
    ModeUnchanged,
    State,
    chain_lookup,
    set_mode,
    verify_membership,
    verify_modes,
)
from securechatd.e2ee.transcript import (
    BadHeadSignature,
    BadTranscriptSignature,
    Equivocation,
    ForkDetected,
    Gap,
    Head,
    HeadMismatch,
    Link,
    Position,
    Receipt,
    TranscriptError,
    TranscriptHead,
    WrongConversation,
    build_bundle,
    check_receipt,
    check_sender_view,
    check_transcript_head,
    equivocation,
    genesis,
    message_item,
    next_hash,
    read_bundle,
    sign_head,
    sign_heads,
    sign_transcript_head,
)
from tests.test_e2ee_membership import BOB, GOLDEN as GOLDEN_MEMBERSHIP, GOLDEN_CHAIN, PHONE, x
from tests.test_e2ee_ratchet import flipped

VECTORS = os.path.join(os.path.dirname(__file__), "vectors")
CONVERSATION = GOLDEN_MEMBERSHIP["conversation"]  # 7: created by alice's phone with bob; bob adds carol
T0 = 1_700_000_000_000
SERVER = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"server/sig").digest())
SERVER_KEY = SERVER.public_key().public_bytes_raw()
TEXTS = {1: "Shall we ship on Friday?", 2: "Yes: Friday, 10:00.", 3: "Off the record: I'd rather Monday."}


def length(data):
    return struct.pack(">I", len(data)) + data


def u64(value):
    return length(struct.pack(">Q", value))


def fixed_key(seq):
    return hashlib.sha256(f"golden/K/{seq}".encode()).digest()


def load(name):
    with open(os.path.join(VECTORS, name), encoding="utf-8") as f:
        return json.load(f)


class History:
    """Conversation 7 as the server would chain it (docs/E2EE.md, the golden bundle's story).

    1 epoch 1 (alice creates with bob), 2 mode 1 attestable (alice), 3 seq 1
    alice, 4 seq 2 bob, [head at 4; alice's and bob's transcript heads at 4],
    5 epoch 2 (bob adds carol), 6 mode 2 deniable (bob), 7 seq 3 bob
    (deniable), [head at 7]. Bob exports, disclosing seqs 1 and 3. With
    `forked`, bob sent seq 2 having seen another link 3 (a fork).
    """

    def __init__(self, forked=False):
        self.states = [State.from_bytes(x(state["bytes"])) for state in GOLDEN_MEMBERSHIP["states"][:2]]
        self.chains = {
            "alice": [chain.Link.from_bytes(x(link["bytes"])) for link in GOLDEN_CHAIN["links"]],
            "bob": [chain.first(BOB, "phone")],
        }
        self.position = Position(CONVERSATION)
        self.positions = [self.position]  # index n: the position after link n
        self.links, self.modes, self.envelopes, self.keys = [], [], [], {}
        self.membership(1)
        self.mode(ATTESTABLE, PHONE)
        self.message(1, PHONE, 1, ATTESTABLE)
        self.message(2, BOB, 1, ATTESTABLE, (3, bytes(32)) if forked else None)
        self.heads = [sign_head(SERVER, CONVERSATION, 4, self.position.e)]
        self.transcript_heads = [
            sign_transcript_head(device, CONVERSATION, 4, self.position.e, self.states[0].hash(), T0 + 5000 + i)
            for i, device in enumerate((PHONE, BOB))
        ]
        self.membership(2)
        self.mode(DENIABLE, BOB)
        self.message(3, BOB, 2, DENIABLE)
        self.heads.append(sign_head(SERVER, CONVERSATION, 7, self.position.e))

    def place(self, kind, number, item):
        n = self.position.n + 1
        link = Link(CONVERSATION, n, T0 + 1000 * n, kind, number, item)
        self.position = self.position.after(link)
        self.positions.append(self.position)
        self.links.append(link)
        return link

    def membership(self, epoch):
        self.state = self.states[epoch - 1]
        self.place(transcript.MEMBERSHIP, epoch, self.state.hash())

    def mode(self, mode, device):
        event = set_mode(self.modes[-1] if self.modes else None, CONVERSATION, mode, self.state.hash(), device)
        self.modes.append(event)
        self.place(transcript.MODE, event.number, event.hash())

    def message(self, seq, device, counter, mode, prev=None):
        key = self.keys[seq] = fixed_key(seq)
        sealed = envelope.seal(
            TEXTS[seq].encode(), CONVERSATION, self.state.hash(), device.user, device.id, counter,
            T0 + 1000 * (self.position.n + 1) - 300, [], None, key, mode=mode,
            prev=prev or (self.position.n, self.position.e), signer=device,
        )
        self.envelopes.append((seq, sealed.header, sealed.body, sealed.signature))
        self.place(transcript.MESSAGE, seq, message_item(sealed.header, sealed.body, sealed.signature))

    def bundle(self, disclose=(1, 3), exporter=BOB, time=T0 + 60_000):
        envelopes = {seq: (header, body) for seq, header, body, _ in self.envelopes}
        return build_bundle(
            CONVERSATION,
            SERVER_KEY,
            {user: [link.to_bytes() for link in links] for user, links in self.chains.items()},
            [state.to_bytes() for state in self.states],
            [event.to_bytes() for event in self.modes],
            [link.to_bytes() for link in self.links],
            [head.to_bytes() for head in self.heads],
            self.envelopes,
            [head.to_bytes() for head in self.transcript_heads],
            [(seq, self.keys[seq], open_body(Header.from_bytes(envelopes[seq][0]), envelopes[seq][1], self.keys[seq]))
             for seq in disclose],
            exporter,
            time,
        )

    def receipt(self, m, head):
        return Receipt(self.links[m - 1 : head.n], head)


def golden():
    """The golden pieces of docs/E2EE.md "Verifiable conversations", from the seeds above."""
    history = History()
    forked = Link(CONVERSATION, 4, T0 + 4000, transcript.MESSAGE, 2, bytes(32))  # another seq 2, shown to someone else
    lie = sign_head(SERVER, CONVERSATION, 4, next_hash(history.positions[3].e, forked))
    seq1 = history.envelopes[0]
    return {
        "about": "docs/E2EE.md, Verifiable conversations: conversation 7 of golden_membership.json chained by a server"
        " whose Ed25519 private key is SHA-256('server/sig'); see tests/test_transcript.py History",
        "conversation": CONVERSATION,
        "server": {
            "private": SERVER.private_bytes_raw().hex(),
            "public": SERVER_KEY.hex(),
            "key_id": transcript.server_key_id(SERVER_KEY),
            "readable": transcript.readable_key_id(transcript.server_key_id(SERVER_KEY)),
        },
        "e0": genesis(CONVERSATION).hex(),
        "links": [
            {"bytes": link.to_bytes().hex(), "e": history.positions[link.n].e.hex()} for link in history.links
        ],
        "modes": [{"bytes": event.to_bytes().hex(), "hash": event.hash().hex()} for event in history.modes],
        "message_1": {
            "header": seq1[1].hex(), "body": seq1[2].hex(), "signature": seq1[3].hex(), "key": fixed_key(1).hex(),
            "item": message_item(*seq1[1:]).hex(),
        },
        "heads": [head.to_bytes().hex() for head in history.heads],
        "batch": [  # two conversations' heads signed together: one root, one signature
            head.to_bytes().hex()
            for head in sign_heads(SERVER, [(CONVERSATION, 7, history.positions[7].e), (CONVERSATION + 1, 1, bytes(32))])
        ],
        "receipt_3": history.receipt(3, history.heads[0]).to_bytes().hex(),
        "equivocation": equivocation(history.heads[0], lie, SERVER_KEY).to_bytes().hex(),
        "transcript_heads": [head.to_bytes().hex() for head in history.transcript_heads],
    }


class Replay(TranscriptError):
    """A counter not above the last one of its sender device."""


class OutOfPlace(TranscriptError):
    """An item whose rule ties it to the chain fails: mode, membership state, seq, position or signer."""


def check_bundle(data, server_key=None):
    """docs/E2EE.md "Verifying a bundle", steps 1-11: the report, or the exception of the first check that fails."""
    bundle = read_bundle(data)  # 1
    unhex, conversation = transcript.unhex, bundle["conversation"]
    server = unhex(bundle["server_key"])  # 2
    if server_key is not None and server != server_key:
        raise OutOfPlace(0, "the bundle's server key is not the one given")
    chains = {
        user: chain.verify_chain(user, [chain.Link.from_bytes(unhex(link)) for link in links])
        for user, links in bundle["device_chains"].items()
    }  # 3
    lookup = chain_lookup(chains, former=True)
    states = [State.from_bytes(unhex(state)) for state in bundle["membership"]]  # 4
    members = verify_membership(conversation, states, lookup, history_lookup=lookup)
    events = [ModeEvent.from_bytes(unhex(event)) for event in bundle["modes"]]  # 5
    verify_modes(conversation, events, members, lookup)
    links = [Link.from_bytes(unhex(link)) for link in bundle["links"]]  # 6
    positions = [Position(conversation)] + Position(conversation).extend(links)
    counts = positions[-1].numbers
    if (counts["message"], counts["membership"], counts["mode"]) != (len(bundle["envelopes"]), len(states), len(events)):
        raise Gap(len(links), "the chain's links and the bundle's items differ in number")
    state_at, mode_at, placed = [None], [membership.DEFAULT_MODE], {}  # index n: in force after link n
    envelopes = iter(bundle["envelopes"])
    for link in links:
        if link.kind == transcript.MEMBERSHIP:
            item = states[link.number - 1].hash()
            placed[item] = link.n
        elif link.kind == transcript.MODE:
            event = events[link.number - 1]
            item = event.hash()
            if placed.get(event.members, link.n) >= link.n:
                raise OutOfPlace(link.n, "a mode event names a membership state not on the chain before it")
        else:
            sent = next(envelopes)
            item = message_item(unhex(sent["header"]), unhex(sent["body"]), unhex(sent["signature"]))
        if link.item != item:
            raise HeadMismatch(link.n, "the link's item hash is not its item's")
        state_at.append(states[link.number - 1] if link.kind == transcript.MEMBERSHIP else state_at[-1])
        mode_at.append(events[link.number - 1].mode if link.kind == transcript.MODE else mode_at[-1])
    heads = [Head.from_bytes(unhex(head)) for head in bundle["heads"]]  # 7
    if not heads or heads[-1].n != len(links) or [head.n for head in heads] != sorted({head.n for head in heads}):
        raise Gap(len(links), "the heads do not run up to the last link in increasing n")
    for head in heads:
        head.verify(server)
        if head.conversation != conversation or head.n < 1 or head.e != positions[head.n].e:
            raise HeadMismatch(head.n, "the server signed another e here")
    messages = [link for link in links if link.kind == transcript.MESSAGE]
    counters, report = {}, []
    for link, sent in zip(messages, bundle["envelopes"]):  # 8
        header, body = Header.from_bytes(unhex(sent["header"])), unhex(sent["body"])
        if (header.conversation, sent["seq"]) != (conversation, link.number):
            raise OutOfPlace(link.n, "the envelope is another conversation's or seq's")
        keys = lookup(header.sender, header.sender_device)
        if keys is None:
            raise OutOfPlace(link.n, "its sender device is in no chain of the bundle")
        check_sender_view(header.prev_n, header.prev_e, link.n, lambda k: positions[k].e)
        if header.mode != mode_at[header.prev_n]:
            raise OutOfPlace(link.n, "its mode is not the one in force at its sender's view")
        if placed.get(header.members, link.n) >= link.n or not members.is_member_at(header.members, header.sender):
            raise OutOfPlace(link.n, "its membership state is not on the chain before it, or does not list its sender")
        if header.sender not in state_at[link.n].members:
            raise OutOfPlace(link.n, f"{header.sender} was not a member where the server placed it")
        check_signature(header, body, unhex(sent["signature"]), keys)
        device = (header.sender, header.sender_device)
        if header.counter <= counters.get(device, 0):
            raise Replay(link.n, f"counter {header.counter} is not above the last of its device")
        counters[device] = header.counter
        report.append((link.number, header.sender, header.mode))
    read = []
    for raw in bundle["transcript_heads"]:  # 9
        head = TranscriptHead.from_bytes(unhex(raw))
        if head.conversation != conversation or not 1 <= head.n <= len(links) or mode_at[head.n] != ATTESTABLE:
            raise OutOfPlace(head.n, "a transcript head of another conversation, beyond the chain or in deniable mode")
        keys = lookup(head.user, head.device)
        if keys is None:
            raise OutOfPlace(head.n, "a transcript head's device is in no chain of the bundle")
        check_transcript_head(head, keys, positions[head.n].e)
        if head.members != state_at[head.n].hash() or head.user not in state_at[head.n].members:
            raise OutOfPlace(head.n, "a transcript head names another membership state, or one without its signer")
        read.append((head.user, head.n))
    by_seq = {link.number: sent for link, sent in zip(messages, bundle["envelopes"])}
    disclosed = []
    for item in bundle["disclosed"]:  # 10
        if item["seq"] not in by_seq or disclosed and item["seq"] <= disclosed[-1]:
            raise OutOfPlace(0, "disclosures are not of messages of the bundle in increasing seq")
        sent = by_seq[item["seq"]]
        plaintext = open_body(Header.from_bytes(unhex(sent["header"])), unhex(sent["body"]), unhex(item["key"]))
        if plaintext != item["plaintext"].encode("utf-8"):
            raise envelope.BadBody("the disclosed plaintext is not the body's")
        disclosed.append(item["seq"])
    export = bundle["export"]  # 11
    keys = chain_lookup(chains)(export["user"], unhex(export["device"]))
    if keys is None or not any(export["user"] in state.members for state in states):
        raise OutOfPlace(0, "the exporter is not a member with a current device in the bundle")
    if not transcript.check_export(bundle, keys):
        raise BadTranscriptSignature(0, "the export seal does not check")
    return {"messages": report, "read": read, "disclosed": disclosed, "exporter": export["user"]}


class ReadBundleTests(unittest.TestCase):
    def test_deeply_nested_json_is_malformed_not_a_crash(self):
        with self.assertRaises(Malformed):
            read_bundle(b"[" * 100_000)


class GoldenTests(unittest.TestCase):
    def test_rebuilt_from_the_seeds(self):
        self.assertEqual(golden(), load("golden_transcript.json"))
        with open(os.path.join(VECTORS, "golden_bundle.json"), "rb") as f:
            self.assertEqual(History().bundle(), f.read())

    def test_the_chain_by_hand(self):
        """e_0, then each e_n = SHA-256(label ‖ enc(conversation, e_{n-1}, n, time, kind, number, item)) from the link bytes."""
        frozen = load("golden_transcript.json")
        e = hashlib.sha256(b"securechatd/chain-genesis/v1" + u64(7)).digest()
        self.assertEqual(e.hex(), frozen["e0"])
        for n, link in enumerate(frozen["links"], 1):
            fields = encoding.dec(x(link["bytes"]), 6)
            self.assertEqual(fields[:2], [struct.pack(">Q", 7), struct.pack(">Q", n)])
            e = hashlib.sha256(b"securechatd/chain/v1" + length(fields[0]) + length(e) + b"".join(map(length, fields[1:]))).digest()
            self.assertEqual(e.hex(), link["e"])
        kinds = [encoding.dec(x(link["bytes"]))[3].decode() for link in frozen["links"]]
        self.assertEqual(kinds, ["membership", "mode", "message", "message", "membership", "mode", "message"])
        message = frozen["message_1"]
        item = hashlib.sha256(
            b"securechatd/envelope-item/v1" + b"".join(length(x(message[k])) for k in ("header", "body", "signature"))
        ).digest()
        self.assertEqual(item.hex(), message["item"])
        self.assertEqual(encoding.dec(x(frozen["links"][2]["bytes"]))[5], item)

    def test_heads_and_key_id_by_hand(self):
        frozen = load("golden_transcript.json")
        public = x(frozen["server"]["public"])
        self.assertEqual(Ed25519PrivateKey.from_private_bytes(x(frozen["server"]["private"])).public_key().public_bytes_raw(), public)
        key_id = hashlib.sha256(b"securechatd/server-key-id/v1" + length(public)).hexdigest()[:32]
        self.assertEqual(frozen["server"]["key_id"], key_id)
        self.assertEqual(frozen["server"]["readable"].replace(" ", ""), key_id)
        self.assertEqual(len(frozen["server"]["readable"].split()), 8)
        for raw, n in zip(frozen["heads"], (4, 7)):  # each signed alone: a batch of one, whose root is its leaf
            conversation, number, e, index, size, root, path, signature = encoding.dec(x(raw), 8)
            self.assertEqual((conversation, number, e.hex()), (struct.pack(">Q", 7), struct.pack(">Q", n), frozen["links"][n - 1]["e"]))
            self.assertEqual((index, size, path), (struct.pack(">Q", 0), struct.pack(">Q", 1), b""))
            self.assertEqual(root, hashlib.sha256(b"\x00" + b"".join(map(length, (conversation, number, e)))).digest())
            Ed25519PublicKey.from_public_bytes(public).verify(signature, b"securechatd/server-heads/v1" + length(size) + length(root))
        first, second = (encoding.dec(x(raw), 8) for raw in frozen["batch"])
        leaves = [hashlib.sha256(b"\x00" + b"".join(map(length, fields[:3]))).digest() for fields in (first, second)]
        root = hashlib.sha256(b"\x01" + leaves[0] + leaves[1]).digest()
        index, size = (struct.pack(">Q", 0), struct.pack(">Q", 1)), struct.pack(">Q", 2)
        self.assertEqual(
            [fields[3:7] for fields in (first, second)],
            [[index[0], size, root, length(leaves[1])], [index[1], size, root, length(leaves[0])]],
        )
        self.assertEqual(first[7], second[7])  # one signature for the batch
        Ed25519PublicKey.from_public_bytes(public).verify(first[7], b"securechatd/server-heads/v1" + length(size) + length(root))
        receipt = encoding.dec(x(frozen["receipt_3"]))
        self.assertEqual(receipt, [x(frozen["heads"][0]), x(frozen["links"][2]["bytes"]), x(frozen["links"][3]["bytes"])])

    def test_transcript_heads_and_the_message_signature_by_hand(self):
        frozen = load("golden_transcript.json")
        for raw, device in zip(frozen["transcript_heads"], (PHONE, BOB)):
            fields = encoding.dec(x(raw), 8)
            self.assertEqual(fields[1:3], [struct.pack(">Q", 4), x(frozen["links"][3]["e"])])
            self.assertEqual(fields[3], x(GOLDEN_MEMBERSHIP["states"][0]["hash"]))
            self.assertEqual(fields[5:7], [device.user.encode(), device.id])
            signed = b"securechatd/transcript-head/v1" + b"".join(map(length, fields[:7]))
            Ed25519PublicKey.from_public_bytes(device.keys.sig_pub).verify(fields[7], signed)
        message = frozen["message_1"]
        header = Header.from_bytes(x(message["header"]))
        self.assertEqual((header.mode, header.prev_n, header.prev_e.hex()), ("attestable", 2, frozen["links"][1]["e"]))
        body_hash = hashlib.sha256(b"securechatd/message-body/v1" + length(x(message["body"]))).digest()
        signed = b"securechatd/message-sig/v1" + u64(7) + length(b"alice") + length(PHONE.id)
        signed += length(header.digest()) + length(body_hash)
        Ed25519PublicKey.from_public_bytes(PHONE.keys.sig_pub).verify(x(message["signature"]), signed)

    def test_the_golden_bundle_checks(self):
        with open(os.path.join(VECTORS, "golden_bundle.json"), "rb") as f:
            data = f.read()
        report = check_bundle(data, SERVER_KEY)
        self.assertEqual(
            report,
            {
                "messages": [(1, "alice", ATTESTABLE), (2, "bob", ATTESTABLE), (3, "bob", DENIABLE)],
                "read": [("alice", 4), ("bob", 4)],
                "disclosed": [1, 3],
                "exporter": "bob",
            },
        )
        bundle = json.loads(data)
        self.assertEqual([item["plaintext"] for item in bundle["disclosed"]], [TEXTS[1], TEXTS[3]])
        self.assertEqual(bundle["envelopes"][2]["signature"], "")  # deniable: no signature
        self.assertEqual(data, transcript.canonical_json(bundle))


class ChainTests(unittest.TestCase):
    def setUp(self):
        self.history = History()
        self.head = self.history.heads[0]

    def test_a_receipt_checks_from_the_position_before_it(self):
        positions = check_receipt(self.history.receipt(3, self.head), self.history.positions[2], SERVER_KEY)
        self.assertEqual([p.n for p in positions], [3, 4])
        self.assertEqual(positions[-1].e, self.head.e)
        self.assertEqual(positions[-1].numbers, {"message": 2, "membership": 1, "mode": 1})
        receipt = Receipt.from_bytes(self.history.receipt(1, self.head).to_bytes())
        self.assertEqual(check_receipt(receipt, Position(CONVERSATION), SERVER_KEY)[-1].e, self.head.e)

    def test_a_wrong_previous_e_fails(self):
        before = self.history.positions[2]
        wrong = Position(CONVERSATION, 2, bytes(32), before.numbers)
        self.assertRaises(HeadMismatch, check_receipt, self.history.receipt(3, self.head), wrong, SERVER_KEY)

    def test_a_gap_fails(self):
        receipt = self.history.receipt(3, self.head)
        self.assertRaises(Gap, check_receipt, receipt, self.history.positions[1], SERVER_KEY)  # link 2 missing
        dropped = Receipt(receipt.links[:1], self.head)  # the head is past the links
        self.assertRaises(Gap, check_receipt, dropped, self.history.positions[2], SERVER_KEY)
        renumbered = replace(receipt.links[1], number=3)  # seq 2 shown as seq 3
        self.assertRaises(Gap, check_receipt, Receipt([receipt.links[0], renumbered], self.head), self.history.positions[2], SERVER_KEY)

    def test_a_bad_signature_fails(self):
        receipt = self.history.receipt(3, self.head)
        forged = Receipt(receipt.links, replace(self.head, signature=flipped(self.head.signature, 10)))
        self.assertRaises(BadHeadSignature, check_receipt, forged, self.history.positions[2], SERVER_KEY)
        other = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
        self.assertRaises(BadHeadSignature, check_receipt, receipt, self.history.positions[2], other)

    def test_another_conversation_fails(self):
        receipt = self.history.receipt(3, self.head)
        self.assertRaises(WrongConversation, check_receipt, receipt, Position(8, 2, self.history.positions[2].e), SERVER_KEY)

    def test_every_tampered_byte_fails(self):
        data = self.history.receipt(3, self.head).to_bytes()
        for at in range(len(data)):
            with self.assertRaises((Malformed, TranscriptError), msg=f"byte {at}"):
                check_receipt(Receipt.from_bytes(flipped(data, at)), self.history.positions[2], SERVER_KEY)

    def test_links_round_trip_and_refuse_other_shapes(self):
        for link in self.history.links:
            self.assertEqual(Link.from_bytes(link.to_bytes()), link)
        fields = self.history.links[0].fields()
        for at, value in ((0, bytes(7)), (1, struct.pack(">Q", 0)), (3, "note"), (4, struct.pack(">Q", 0)), (5, bytes(31))):
            self.assertRaises(Malformed, Link.from_bytes, enc(fields[:at] + [value] + fields[at + 1 :]))
        self.assertRaises(Malformed, Link.from_bytes, enc(fields[:-1]))
        self.assertRaises(Malformed, Head.from_bytes, enc(self.head.fields()))
        self.assertRaises(Malformed, Receipt.from_bytes, enc([self.head.to_bytes()]))

    def test_the_sender_view_detects_a_fork(self):
        e_at = lambda k: self.history.positions[k].e if k <= 4 else None  # noqa: E731
        self.assertTrue(check_sender_view(2, self.history.positions[2].e, 3, e_at))
        self.assertFalse(check_sender_view(5, bytes(32), 7, e_at))  # beyond what this device holds: unchecked
        self.assertRaises(ForkDetected, check_sender_view, 2, bytes(32), 3, e_at)
        self.assertRaises(ForkDetected, check_sender_view, 3, self.history.positions[3].e, 3, e_at)


class EquivocationTests(unittest.TestCase):
    def setUp(self):
        self.history = History()
        self.head = self.history.heads[0]
        self.fork = self.history.positions[3].after(Link(CONVERSATION, 4, T0, transcript.MESSAGE, 2, bytes(32)))

    def test_two_heads_at_one_n_are_proof(self):
        lie = sign_head(SERVER, CONVERSATION, 4, self.fork.e)
        proof = equivocation(lie, self.head, SERVER_KEY)
        self.assertTrue(Equivocation.from_bytes(proof.to_bytes()).proves(SERVER_KEY))
        self.assertEqual(Equivocation.from_bytes(x(load("golden_transcript.json")["equivocation"])).proves(SERVER_KEY), True)
        other = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
        self.assertFalse(proof.proves(other))
        self.assertIsNone(equivocation(self.head, self.head, SERVER_KEY))
        self.assertIsNone(equivocation(replace(lie, signature=bytes(64)), self.head, SERVER_KEY))
        self.assertIsNone(equivocation(sign_head(SERVER, 8, 4, self.fork.e), self.head, SERVER_KEY))

    def test_heads_at_different_n_with_the_links_between_are_proof(self):
        """A head at 7 whose links 5..7 start from another e_4 than the signed head at 4 commits to another history."""
        later = self.fork.extend(self.history.links[4:7])[-1]
        lie = sign_head(SERVER, CONVERSATION, 7, later.e)
        proof = Equivocation(self.head, lie, self.fork.e, self.history.links[4:7])
        self.assertTrue(Equivocation.from_bytes(proof.to_bytes()).proves(SERVER_KEY))
        honest = Equivocation(self.head, self.history.heads[1], self.head.e, self.history.links[4:7])
        self.assertFalse(honest.proves(SERVER_KEY))
        self.assertFalse(replace(proof, links=self.history.links[4:6]).proves(SERVER_KEY))
        self.assertFalse(replace(proof, fork=flipped(self.fork.e, 0)).proves(SERVER_KEY))


class TranscriptHeadTests(unittest.TestCase):
    def setUp(self):
        self.history = History()
        self.head = self.history.transcript_heads[1]  # bob's, at 4

    def test_it_checks_with_its_device_and_our_e(self):
        self.assertEqual(TranscriptHead.from_bytes(self.head.to_bytes()), self.head)
        check_transcript_head(self.head, BOB.keys, self.history.positions[4].e)
        check_transcript_head(self.head, BOB.keys)

    def test_another_device_or_a_bad_signature_fails(self):
        self.assertRaises(BadTranscriptSignature, check_transcript_head, self.head, PHONE.keys)
        forged = replace(self.head, signature=flipped(self.head.signature, 0))
        self.assertRaises(BadTranscriptSignature, check_transcript_head, forged, BOB.keys)
        self.assertRaises(BadTranscriptSignature, check_transcript_head, replace(self.head, n=3), BOB.keys)

    def test_a_head_over_another_history_is_a_fork(self):
        self.assertRaises(ForkDetected, check_transcript_head, self.head, BOB.keys, self.history.positions[3].e)

    def test_every_tampered_byte_fails(self):
        data = self.head.to_bytes()
        for at in range(len(data)):
            with self.assertRaises((Malformed, TranscriptError), msg=f"byte {at}"):
                check_transcript_head(TranscriptHead.from_bytes(flipped(data, at)), BOB.keys, self.head.e)


class KeyIdTests(unittest.TestCase):
    def test_forms(self):
        key_id = transcript.server_key_id(SERVER_KEY)
        readable = transcript.readable_key_id(key_id)
        self.assertEqual(len(key_id), 32)
        for text in (key_id, readable, key_id.upper(), readable.replace(" ", ":")):
            self.assertEqual(transcript.parse_key_id(text), key_id)
        for bad in ("", key_id[:-1], key_id + "0", "g" * 32):
            self.assertRaises(ValueError, transcript.parse_key_id, bad)
        self.assertRaises(Malformed, transcript.server_key_id, SERVER_KEY[:31])


class ModeTests(unittest.TestCase):
    def setUp(self):
        self.history = History()
        lookup = chain_lookup({user: chain.verify_chain(user, links) for user, links in self.history.chains.items()})
        self.lookup = lookup
        self.members = verify_membership(CONVERSATION, self.history.states, lookup)

    def test_the_golden_modes(self):
        self.assertEqual(verify_modes(CONVERSATION, self.history.modes, self.members, self.lookup), [ATTESTABLE, DENIABLE])
        for event in self.history.modes:
            self.assertEqual(ModeEvent.from_bytes(event.to_bytes()), event)

    def test_each_rule(self):
        first, second = self.history.modes
        epoch1 = self.history.states[0].hash()
        cases = (
            (ModeOutOfPlace, [second]),
            (ModeOutOfPlace, [first, replace(second, prev=bytes(32))]),
            (ModeOutOfPlace, [replace(first, conversation=8)]),
            (ModeUnchanged, [first, set_mode(first, CONVERSATION, ATTESTABLE, epoch1, BOB)]),
            (BadModeSignature, [replace(first, signature=flipped(first.signature, 3))]),
            (BadModeSignature, [set_mode(None, CONVERSATION, DENIABLE, epoch1, chain_device("alice"))]),
            (ModeActorNotMember, [set_mode(None, CONVERSATION, DENIABLE, bytes(32), BOB)]),
        )
        for error, events in cases:
            self.assertRaises(error, verify_modes, CONVERSATION, events, self.members, self.lookup)
        self.assertRaises(Malformed, ModeEvent.from_bytes, enc(first.fields()))


def chain_device(user):
    """A device of `user` that is in no verified chain."""
    return device_keys.Device.generate(user)


class BundleTests(unittest.TestCase):
    def setUp(self):
        self.history = History()
        with open(os.path.join(VECTORS, "golden_bundle.json"), "rb") as f:
            self.data = f.read()

    def resealed(self, change):
        """The golden bundle with `change` made to its JSON value (and, with reseal, sealed again by bob)."""
        bundle = json.loads(self.data)
        change(bundle)
        return transcript.canonical_json(bundle)

    def test_one_spelling(self):
        bundle = json.loads(self.data)
        for other in (
            json.dumps(bundle).encode(),
            self.data[:-1],
            self.data + b"\n",
            self.data.replace(b'"format"', b'"format" ', 1),
            self.resealed(lambda b: b["links"].__setitem__(0, b["links"][0].upper())),
            self.resealed(lambda b: b.__setitem__("extra", 1)),
            self.resealed(lambda b: b.__setitem__("conversation", 1 << 53)),
            self.resealed(lambda b: b["envelopes"][0].__setitem__("seq", True)),
            b"\xef\xbb\xbf" + self.data,
        ):
            self.assertRaises(Malformed, read_bundle, other)

    def test_a_removed_moved_or_added_item_breaks_the_seal_or_a_rule(self):
        def drop(key, at=-1):
            return lambda b: b[key].pop(at)

        def swap(key):
            return lambda b: b[key].reverse()

        changes = [drop("disclosed"), drop("transcript_heads"), swap("transcript_heads"), swap("disclosed"),
                   drop("heads", 0), drop("links"), drop("envelopes"), drop("modes"), drop("membership"),
                   lambda b: b["device_chains"]["alice"].pop(), lambda b: b["export"].__setitem__("time", 1),
                   lambda b: b["transcript_heads"].append(b["transcript_heads"][0])]
        for change in changes:
            self.assertRaises((Malformed, ValueError), check_bundle, self.resealed(change), SERVER_KEY)

    def test_bytes_changed_anywhere_fail(self):
        """A sample of single-byte changes (every 5th byte, one bit) all over the bundle: none passes."""
        for at in range(0, len(self.data), 5):
            with self.assertRaises((Malformed, ValueError), msg=f"byte {at}"):
                check_bundle(flipped(self.data, at), SERVER_KEY)

    def test_a_forked_or_forged_history_is_named(self):
        lie = sign_head(SERVER, CONVERSATION, 7, bytes(32))

        def forged_head(b):
            b["heads"][-1] = lie.to_bytes().hex()

        self.assertRaises(HeadMismatch, check_bundle, self.bundle_with(forged_head), SERVER_KEY)
        other = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
        self.assertRaises(OutOfPlace, check_bundle, self.data, other)  # not the server the reader trusts
        another_server = self.bundle_with(lambda b: b.__setitem__("server_key", other.hex()))
        self.assertRaises(BadHeadSignature, check_bundle, another_server)

    def bundle_with(self, change):
        """The golden bundle with `change`, sealed again by its exporter: only the rule it breaks can fail."""
        bundle = json.loads(self.data)
        change(bundle)
        bundle["export"]["signature"] = BOB.sign(transcript.EXPORT_LABEL, transcript.export_fields(bundle)).hex()
        return transcript.canonical_json(bundle)

    def test_resealed_changes_fail_with_their_rule(self):
        other_text = lambda b: b["disclosed"][0].__setitem__("plaintext", "Shall we ship on Monday?")  # noqa: E731
        wrong_key = lambda b: b["disclosed"][0].__setitem__("key", bytes(32).hex())  # noqa: E731
        self.assertRaises(envelope.BadBody, check_bundle, self.bundle_with(other_text), SERVER_KEY)
        self.assertRaises(envelope.KeyCommitmentMismatch, check_bundle, self.bundle_with(wrong_key), SERVER_KEY)
        unsigned = lambda b: b["envelopes"][0].__setitem__("signature", "")  # noqa: E731
        self.assertRaises(HeadMismatch, check_bundle, self.bundle_with(unsigned), SERVER_KEY)  # its link names the signature
        self.assertEqual(check_bundle(self.bundle_with(lambda b: None), SERVER_KEY)["exporter"], "bob")

    def test_a_replayed_envelope_is_named(self):
        """The server places alice's seq 1 again as seq 4, and signs a head over it: its counter gives it away."""
        history = self.history
        seq, header, body, signature = history.envelopes[0]
        history.envelopes.append((4, header, body, signature))
        history.keys[4] = history.keys[1]
        history.place(transcript.MESSAGE, 4, message_item(header, body, signature))
        history.heads.append(sign_head(SERVER, CONVERSATION, 8, history.position.e))
        self.assertRaises(Replay, check_bundle, history.bundle(), SERVER_KEY)

    def test_a_message_sent_across_a_fork_is_named(self):
        """Bob's seq 2 was sent having seen another link 3 than the chain the bundle (and alice) has."""
        self.assertRaises(ForkDetected, check_bundle, History(forked=True).bundle(), SERVER_KEY)


class LabelTests(unittest.TestCase):
    def test_labels_are_distinct_and_none_is_a_prefix_of_another(self):
        """labelled() puts the label before enc(fields) without a length: no label may start another."""
        labels = {
            value
            for module in (transcript, envelope, membership, chain, device_keys)
            for name, value in vars(module).items()
            if isinstance(value, str) and value.startswith("securechatd/") and value.endswith("/v1")
        }
        self.assertGreaterEqual(len(labels), 19)
        for one in labels:
            for other in labels - {one}:
                self.assertFalse(other.startswith(one), (one, other))
