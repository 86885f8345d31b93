"""The account log's formats (securechatd/accountlog.py): golden vectors checked by hand, and what a client catches.

golden_account_log.json was made once by accountlog.py and merkle.py from
fixed keys and salts; here every hash, leaf and signed input is recomputed
with hashlib and struct alone, and every signature checked with
cryptography alone. Then each way a server could rewrite, drop, reorder or
fork a log is shown to fail its own check.
"""

import hashlib
import json
import os
import struct
from dataclasses import replace

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from twisted.trial import unittest

from securechatd import accountlog
from securechatd.e2ee import merkle
from securechatd.accountlog import (
    BadAction,
    BadTreeHead,
    BrokenChain,
    Entry,
    Event,
    Inconsistent,
    NotIncluded,
    check_entries,
    check_tree_head,
    proof_bytes,
)
from securechatd.e2ee.encoding import Malformed

with open(os.path.join(os.path.dirname(__file__), "vectors", "golden_account_log.json")) as f:
    GOLDEN = json.load(f)


def x(value):
    return bytes.fromhex(value)


def enc(fields):
    """docs/E2EE.md's encoding, written again: 4-byte length, then the bytes (ints as 8 bytes)."""
    out = b""
    for value in fields:
        data = value.encode() if isinstance(value, str) else struct.pack(">Q", value) if isinstance(value, int) else value
        out += struct.pack(">I", len(data)) + data
    return out


SERVER = Ed25519PublicKey.from_public_bytes(x(GOLDEN["server_public_key"]))
DEVICE = Ed25519PublicKey.from_public_bytes(x(GOLDEN["device_public_key"]))
DEVICE_ID = x(GOLDEN["device_id"])
ALICE = [x(event["bytes"]) for event in GOLDEN["alice"]]
LEAVES = [x(GOLDEN["alice"][0]["leaf"]), x(GOLDEN["alice"][1]["leaf"]), x(GOLDEN["bob"]["leaf"]), x(GOLDEN["alice"][2]["leaf"])]
TREE = merkle.Tree(LEAVES)
HEAD_4 = accountlog.parse_head(x(GOLDEN["head_4"]))
HEAD_2 = accountlog.parse_head(x(GOLDEN["head_2"]))


def entries(events=ALICE, indexes=(0, 1, 3), size=4):
    return [Entry(event, index, proof_bytes(TREE.inclusion_proof(index, size))) for event, index in zip(events, indexes)]


def device_key(device):
    return DEVICE if device == DEVICE_ID else None


class GoldenTests(unittest.SynchronousTestCase):
    def test_events_by_hand(self):
        prev = bytes(32)
        for vector in GOLDEN["alice"]:
            event = Event.from_bytes(x(vector["bytes"]))
            self.assertEqual((event.user, event.seq, event.kind, event.prev), ("alice", vector["seq"], vector["kind"], prev))
            self.assertEqual(event.to_bytes(), x(vector["bytes"]))
            fields = [
                "alice", vector["seq"], prev, vector["time_ms"], vector["kind"], vector["address"], vector["session"],
                DEVICE_ID, vector["target"], x(vector["salt"]),
                b"" if vector["action"] is None else enc(
                    [vector["action"]["time_ms"], x(vector["action"]["nonce"]), x(vector["action"]["signature"])]
                ),
            ]
            self.assertEqual(enc(fields), x(vector["bytes"]))
            digest = hashlib.sha256(GOLDEN["labels"]["event"].encode() + enc(fields)).digest()
            self.assertEqual(digest, x(vector["hash"]))
            entry = GOLDEN["labels"]["leaf"].encode() + enc(["alice", vector["seq"], digest])
            self.assertEqual(entry, x(vector["leaf_entry"]))
            self.assertEqual(hashlib.sha256(b"\x00" + entry).digest(), x(vector["leaf"]))
            prev = digest

    def test_action_signatures_by_hand(self):
        for vector in GOLDEN["alice"]:
            if vector["action"] is None:
                continue
            action = vector["action"]
            signed = GOLDEN["labels"]["action"].encode() + enc(
                ["alice", DEVICE_ID, vector["kind"], vector["target"], action["time_ms"], x(action["nonce"])]
            )
            self.assertEqual(signed, x(action["signed_input"]))
            DEVICE.verify(x(action["signature"]), signed)  # raises if not
            private = Ed25519PrivateKey.from_private_bytes(x(GOLDEN["device_private_key"]))
            self.assertEqual(private.sign(signed), x(action["signature"]))  # (Ed25519 is deterministic)

    def test_tree_heads_by_hand(self):
        leaves = [hashlib.sha256(b"\x00" + x(v["leaf_entry"])).digest() for v in GOLDEN["alice"][:2]]
        root_2 = hashlib.sha256(b"\x01" + leaves[0] + leaves[1]).digest()
        self.assertEqual(root_2, x(GOLDEN["root_2"]))
        pair = hashlib.sha256(b"\x01" + x(GOLDEN["bob"]["leaf"]) + x(GOLDEN["alice"][2]["leaf"])).digest()
        self.assertEqual(hashlib.sha256(b"\x01" + root_2 + pair).digest(), x(GOLDEN["root_4"]))
        for name, size, root in (("head_2", 2, root_2), ("head_4", 4, x(GOLDEN["root_4"]))):
            head = x(GOLDEN[name])
            length = struct.unpack(">I", head[:4])[0]
            self.assertEqual(struct.unpack(">Q", head[4 : 4 + length])[0], size)
            parsed = accountlog.parse_head(head)
            self.assertEqual(parsed.root, root)
            signed = GOLDEN["labels"]["tree_head"].encode() + enc([size, root, parsed.timestamp_ms])
            SERVER.verify(parsed.signature, signed)

    def test_proofs(self):
        vector = GOLDEN["inclusion_alice_3_in_4"]
        self.assertEqual([p.hex() for p in TREE.inclusion_proof(3, 4)], vector["proof"])
        self.assertEqual([x(p) for p in vector["proof"]], [LEAVES[2], hashlib.sha256(b"\x01" + LEAVES[0] + LEAVES[1]).digest()])
        self.assertEqual([p.hex() for p in TREE.consistency_proof(2, 4)], GOLDEN["consistency_2_4"])

    def test_the_code_builds_the_same(self):
        """accountlog.new_event, with the vector's salt, makes the vector's bytes."""
        vector = GOLDEN["alice"][2]
        action = accountlog.Action(vector["action"]["time_ms"], x(vector["action"]["nonce"]), x(vector["action"]["signature"]))
        event = accountlog.new_event(
            "alice", 3, x(GOLDEN["alice"][1]["hash"]), vector["time_ms"] / 1000, "session_end", vector["address"],
            vector["session"], DEVICE_ID, vector["target"], action, salt=x(vector["salt"]),
        )
        self.assertEqual(event.to_bytes().hex(), vector["bytes"])


class ClientCheckTests(unittest.SynchronousTestCase):
    """What a client that kept the last tree head it saw catches."""

    def test_an_honest_log_checks(self):
        head = check_tree_head(SERVER, x(GOLDEN["head_2"]))
        known = check_entries("alice", entries(ALICE[:2], (0, 1), 2), head, device_key=device_key)
        self.assertEqual((known.seq, known.hash), (2, x(GOLDEN["alice"][1]["hash"])))
        head = check_tree_head(SERVER, x(GOLDEN["head_4"]), known.head, proof_bytes([x(p) for p in GOLDEN["consistency_2_4"]]))
        known = check_entries("alice", entries(ALICE[2:], (3,)), head, known, device_key)
        self.assertEqual((known.seq, known.head.size), (3, 4))

    def test_a_rewritten_event(self):
        event = Event.from_bytes(ALICE[1])
        rewritten = replace(event, address="203.0.113.9").to_bytes()
        with self.assertRaises(NotIncluded):  # its leaf is not the tree's
            check_entries("alice", entries([ALICE[0], rewritten, ALICE[2]]), HEAD_4)
        # a server that also put the rewritten event's leaf in its tree: the next event's prev no longer names it
        tree = merkle.Tree([LEAVES[0], Event.from_bytes(rewritten).leaf(), *LEAVES[2:]])
        key = Ed25519PrivateKey.from_private_bytes(x(GOLDEN["server_private_key"]))
        head = merkle.sign_tree_head(key, 4, tree.root(), 1)
        rebuilt = [Entry(e, i, proof_bytes(tree.inclusion_proof(i, 4))) for e, i in zip([ALICE[0], rewritten, ALICE[2]], (0, 1, 3))]
        with self.assertRaises(BrokenChain):
            check_entries("alice", rebuilt, head)

    def test_a_dropped_event(self):
        with self.assertRaises(BrokenChain):
            check_entries("alice", entries([ALICE[0], ALICE[2]], (0, 3)), HEAD_4)

    def test_reordered_events(self):
        with self.assertRaises(BrokenChain):
            check_entries("alice", entries([ALICE[1], ALICE[0], ALICE[2]], (1, 0, 3)), HEAD_4)

    def test_anothers_event(self):
        bob = Entry(x(GOLDEN["bob"]["bytes"]), 2, proof_bytes(TREE.inclusion_proof(2, 4)))
        with self.assertRaises(BrokenChain):
            check_entries("alice", [bob], HEAD_4)

    def test_a_wrong_leaf_index(self):
        with self.assertRaises(NotIncluded):
            check_entries("alice", [Entry(ALICE[0], 1, proof_bytes(TREE.inclusion_proof(1, 4)))], HEAD_4)

    def test_a_forked_tree(self):
        """A server that rewrote an old event and rebuilt its tree signs a head no consistency proof joins."""
        rewritten = replace(Event.from_bytes(ALICE[0]), target="password").leaf()
        forked = merkle.Tree([rewritten, *LEAVES[1:]])
        key = Ed25519PrivateKey.from_private_bytes(x(GOLDEN["server_private_key"]))
        head = merkle.sign_tree_head(key, 4, forked.root(), 1)
        proof = proof_bytes(forked.consistency_proof(2, 4))
        with self.assertRaises(Inconsistent):
            check_tree_head(SERVER, accountlog.head_bytes(head), HEAD_2, proof)
        with self.assertRaises(Inconsistent):  # nor does the honest proof
            check_tree_head(SERVER, accountlog.head_bytes(head), HEAD_2, proof_bytes([x(p) for p in GOLDEN["consistency_2_4"]]))

    def test_a_smaller_tree_than_seen(self):
        with self.assertRaises(Inconsistent):
            check_tree_head(SERVER, x(GOLDEN["head_2"]), HEAD_4, b"")

    def test_a_head_the_server_key_did_not_sign(self):
        other = Ed25519PrivateKey.generate()
        head = merkle.sign_tree_head(other, 4, HEAD_4.root, HEAD_4.timestamp_ms)
        with self.assertRaises(BadTreeHead):
            check_tree_head(SERVER, accountlog.head_bytes(head))
        with self.assertRaises(BadTreeHead):
            check_tree_head(SERVER, x(GOLDEN["head_4"])[:-1])

    def test_a_forged_device_action(self):
        """The server cannot make a device's action: a changed target, or an unsigned one, fails."""
        event = Event.from_bytes(ALICE[2])
        forged = replace(event, target="9" * 32)
        tree = merkle.Tree([*LEAVES[:3], forged.leaf()])
        key = Ed25519PrivateKey.from_private_bytes(x(GOLDEN["server_private_key"]))
        head = merkle.sign_tree_head(key, 4, tree.root(), 1)
        forged_entries = [Entry(ALICE[0], 0, b""), Entry(ALICE[1], 1, b""), Entry(forged.to_bytes(), 3, b"")]
        forged_entries = [replace(e, proof=proof_bytes(tree.inclusion_proof(e.leaf_index, 4))) for e in forged_entries]
        with self.assertRaises(BadAction):
            check_entries("alice", forged_entries, head, device_key=device_key)
        unsigned = replace(event, action=None)
        tree = merkle.Tree([*LEAVES[:3], unsigned.leaf()])
        head = merkle.sign_tree_head(key, 4, tree.root(), 1)
        unsigned_entries = [replace(e, proof=proof_bytes(tree.inclusion_proof(e.leaf_index, 4))) for e in forged_entries[:2]]
        unsigned_entries.append(Entry(unsigned.to_bytes(), 3, proof_bytes(tree.inclusion_proof(3, 4))))
        with self.assertRaises(BadAction):
            check_entries("alice", unsigned_entries, head, device_key=device_key)

    def test_malformed(self):
        for bad in (b"", ALICE[0][:-1], ALICE[0] + b"\x00"):
            with self.assertRaises(Malformed):
                Event.from_bytes(bad)
            with self.assertRaises(BrokenChain):
                check_entries("alice", [Entry(bad, 0, b"")], HEAD_4)
        with self.assertRaises(NotIncluded):
            check_entries("alice", [Entry(ALICE[0], 0, b"\x00" * 31)], HEAD_4)
