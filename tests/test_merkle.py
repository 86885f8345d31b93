"""RFC 9162 Merkle trees: reference values, the reference verifier's probes, properties, costs, signed tree heads.

The reference values (tests/vectors/rfc9162_tree.json, rfc9162_probes.json)
are transparency-dev/merkle's, copied as values (sources inside each file);
none was produced by the code under test. golden_tree_head.json was made by
merkle.py once and is checked here by hand.
"""

import hashlib
import json
import math
import os

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from securechatd.e2ee import merkle
from securechatd.e2ee.encoding import sign
from securechatd.e2ee.merkle import Tree, TreeHead, verify_consistency, verify_inclusion

VECTORS = os.path.join(os.path.dirname(__file__), "vectors")


def load(name):
    with open(os.path.join(VECTORS, name)) as f:
        return json.load(f)


def x(value):
    return bytes.fromhex(value)


REFERENCE = load("rfc9162_tree.json")
PROBES = load("rfc9162_probes.json")
GOLDEN_HEAD = load("golden_tree_head.json")
ENTRIES = [x(leaf) for leaf in REFERENCE["leaves"]]

# The one probe we refuse and the reference accepts: equal sizes and equal
# "roots" that are the 16-byte text "don't care 2"; a root is 32 bytes here.
STRICTER = {"consistency/additional/sizes-are-equal-one-and-proof-is-empty.json"}

MAX_SIZE = 300
LEAVES = [merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(MAX_SIZE)]
BIG = Tree(LEAVES)  # proofs for past sizes come from here


def naive_mth(leaves):
    """RFC 9162 §2.1.1 word for word, over leaf hashes: the test's own second implementation of the root."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return hashlib.sha256(b"\x01" + naive_mth(leaves[:k]) + naive_mth(leaves[k:])).digest()


def flips(hashes):
    """Every copy of `hashes` with one byte changed."""
    for i, value in enumerate(hashes):
        for at in range(len(value)):
            changed = bytearray(value)
            changed[at] ^= 0x01
            yield hashes[:i] + [bytes(changed)] + hashes[i + 1 :]


class ReferenceTreeTests(unittest.SynchronousTestCase):
    """The eight-leaf tree of RFC 6962 and transparency-dev/merkle: every node, root and published proof."""

    def test_empty(self):
        self.assertEqual(merkle.EMPTY_ROOT.hex(), REFERENCE["roots"][0])
        self.assertEqual(merkle.mth([]), merkle.EMPTY_ROOT)
        self.assertEqual(Tree().root(), merkle.EMPTY_ROOT)

    def test_leaf_hashes(self):
        self.assertEqual([merkle.leaf_hash(entry).hex() for entry in ENTRIES], REFERENCE["node_hashes"][0])

    def test_node_hashes(self):
        """Each complete subtree, as the MTH of its entries and as the node hash of its two halves."""
        levels = REFERENCE["node_hashes"]
        for level in range(1, len(levels)):
            width = 1 << level
            for i, expected in enumerate(levels[level]):
                self.assertEqual(merkle.mth(ENTRIES[i * width : (i + 1) * width]).hex(), expected)
                self.assertEqual(merkle.node_hash(x(levels[level - 1][2 * i]), x(levels[level - 1][2 * i + 1])).hex(), expected)

    def test_roots(self):
        for size, expected in enumerate(REFERENCE["roots"]):
            self.assertEqual(merkle.mth(ENTRIES[:size]).hex(), expected)

    def test_roots_while_growing(self):
        """Appended one at a time, the tree knows its root at every size and at every size before."""
        tree = Tree()
        for index, entry in enumerate(ENTRIES):
            self.assertEqual(tree.append(merkle.leaf_hash(entry)), index)
            self.assertEqual(tree.size, index + 1)
            self.assertEqual([tree.root(size).hex() for size in range(index + 2)], REFERENCE["roots"][: index + 2])
        self.assertEqual(tree.root().hex(), REFERENCE["roots"][8])

    def test_inclusion_proofs(self):
        tree = Tree(merkle.leaf_hash(entry) for entry in ENTRIES)
        for case in REFERENCE["inclusion"]:
            index, size = case["leaf_index"], case["tree_size"]
            proof = tree.inclusion_proof(index, size)
            self.assertEqual([p.hex() for p in proof], case["proof"], case)
            self.assertTrue(verify_inclusion(merkle.leaf_hash(ENTRIES[index]), index, size, proof, x(REFERENCE["roots"][size])))

    def test_batch_proofs(self):
        """The whole tree at once: the reference root and the reference proofs of the eight-leaf tree."""
        root, paths = merkle.batch_proofs([merkle.leaf_hash(entry) for entry in ENTRIES])
        self.assertEqual(root.hex(), REFERENCE["roots"][8])
        for case in REFERENCE["inclusion"]:
            if case["tree_size"] == 8:
                self.assertEqual([p.hex() for p in paths[case["leaf_index"]]], case["proof"], case)
        self.assertEqual(merkle.batch_proofs([]), (merkle.EMPTY_ROOT, []))

    def test_consistency_proofs(self):
        tree = Tree(merkle.leaf_hash(entry) for entry in ENTRIES)
        for case in REFERENCE["consistency"]:
            first, second = case["first"], case["second"]
            proof = tree.consistency_proof(first, second)
            self.assertEqual([p.hex() for p in proof], case["proof"], case)
            self.assertTrue(verify_consistency(first, second, x(REFERENCE["roots"][first]), x(REFERENCE["roots"][second]), proof))


class ProbeTests(unittest.SynchronousTestCase):
    """transparency-dev/merkle's probes: the published proofs, and each changed in one way that must fail."""

    def test_inclusion(self):
        self.assertEqual(len(PROBES["inclusion"]), 98)
        for probe in PROBES["inclusion"]:
            proof = [x(p) for p in probe["proof"]]
            result = verify_inclusion(x(probe["leaf_hash"]), probe["leaf_index"], probe["tree_size"], proof, x(probe["root"]))
            self.assertEqual(result, probe["valid"], probe["file"])

    def test_consistency(self):
        self.assertEqual(len(PROBES["consistency"]), 98)
        for probe in PROBES["consistency"]:
            proof = [x(p) for p in probe["proof"]]
            result = verify_consistency(probe["first"], probe["second"], x(probe["first_root"]), x(probe["second_root"]), proof)
            self.assertEqual(result, probe["valid"] and probe["file"] not in STRICTER, probe["file"])

    def test_stricter_only_about_the_hash_length(self):
        """With 32-byte equal roots, the probe we refuse passes."""
        (probe,) = [p for p in PROBES["consistency"] if p["file"] in STRICTER]
        self.assertNotEqual(len(x(probe["first_root"])), 32)
        root = x(REFERENCE["roots"][1])
        self.assertTrue(verify_consistency(probe["first"], probe["second"], root, root, []))


class ArgumentTests(unittest.SynchronousTestCase):
    def test_append_takes_leaf_hashes(self):
        for leaf in (b"", b"\x00" * 31, b"\x00" * 33, "0" * 32, None):
            self.assertRaises(ValueError, Tree().append, leaf)

    def test_inclusion_proof_arguments(self):
        tree = Tree(merkle.leaf_hash(entry) for entry in ENTRIES)
        for index, size in ((0, 0), (1, 1), (8, 8), (-1, 8), (0, 9), (8, None)):
            self.assertRaises(ValueError, tree.inclusion_proof, index, size)

    def test_consistency_proof_arguments(self):
        tree = Tree(merkle.leaf_hash(entry) for entry in ENTRIES)
        for first, second in ((0, 8), (0, 0), (5, 4), (1, 9), (9, None), (-1, 8)):
            self.assertRaises(ValueError, tree.consistency_proof, first, second)
        self.assertEqual(tree.consistency_proof(8), [])

    def test_verifiers_refuse_impossible_sizes(self):
        root = x(REFERENCE["roots"][1])
        self.assertFalse(verify_inclusion(root, 0, 0, [], root))
        self.assertFalse(verify_inclusion(root, -1, 1, [], root))
        self.assertFalse(verify_consistency(0, 0, merkle.EMPTY_ROOT, merkle.EMPTY_ROOT, []))
        self.assertFalse(verify_consistency(0, 1, merkle.EMPTY_ROOT, root, []))
        self.assertFalse(verify_consistency(2, 1, root, root, []))


class PropertyTests(unittest.SynchronousTestCase):
    """For random sizes, taken as past sizes of one larger tree: proofs verify, and nothing else does."""

    @settings(max_examples=200, deadline=None)
    @given(st.integers(0, MAX_SIZE))
    def test_root_matches_the_definition(self, size):
        self.assertEqual(BIG.root(size), naive_mth(LEAVES[:size]))

    @settings(max_examples=100, deadline=None)
    @given(st.data())
    def test_inclusion(self, data):
        size = data.draw(st.integers(1, MAX_SIZE), "size")
        index = data.draw(st.integers(0, size - 1), "index")
        leaf, root, proof = LEAVES[index], BIG.root(size), BIG.inclusion_proof(index, size)
        self.assertEqual(proof, Tree(LEAVES[:size]).inclusion_proof(index))
        self.assertTrue(verify_inclusion(leaf, index, size, proof, root))

        for changed in flips([leaf, root, *proof]):
            self.assertFalse(verify_inclusion(changed[0], index, size, changed[2:], changed[1]))
        for other in range(size):
            if other != index:
                self.assertFalse(verify_inclusion(leaf, other, size, proof, root), other)
                self.assertFalse(verify_inclusion(LEAVES[other], other, size, proof, root), other)
        for other in range(index + 1, MAX_SIZE + 1):
            if other != size:
                self.assertFalse(verify_inclusion(leaf, index, other, proof, BIG.root(other)), other)
        self.assertFalse(verify_inclusion(leaf, index, size, proof + [root], root))
        if proof:
            self.assertFalse(verify_inclusion(leaf, index, size, proof[:-1], root))

    def test_batch_proofs_are_the_trees(self):
        """Every size up to MAX_SIZE: the root and every leaf's path as Tree (the RFC's recursion) gives them."""
        for size in range(1, MAX_SIZE + 1):
            root, paths = merkle.batch_proofs(LEAVES[:size])
            self.assertEqual(root, BIG.root(size), size)
            self.assertEqual(paths, [BIG.inclusion_proof(index, size) for index in range(size)], size)

    @settings(max_examples=100, deadline=None)
    @given(st.data())
    def test_consistency(self, data):
        second = data.draw(st.integers(1, MAX_SIZE), "second")
        first = data.draw(st.integers(1, second), "first")
        first_root, second_root, proof = BIG.root(first), BIG.root(second), BIG.consistency_proof(first, second)
        self.assertEqual(proof, Tree(LEAVES[:second]).consistency_proof(first))
        self.assertTrue(verify_consistency(first, second, first_root, second_root, proof))

        for changed in flips([first_root, second_root, *proof]):
            self.assertFalse(verify_consistency(first, second, changed[0], changed[1], changed[2:]))
        for other in range(1, second + 1):
            if other != first:
                self.assertFalse(verify_consistency(other, second, BIG.root(other), second_root, proof), other)
        for other in range(first, MAX_SIZE + 1):
            if other != second:
                self.assertFalse(verify_consistency(first, other, first_root, BIG.root(other), proof), other)
        self.assertFalse(verify_consistency(first, second, first_root, second_root, proof + [second_root]))
        if proof:
            self.assertFalse(verify_consistency(first, second, first_root, second_root, proof[:-1]))

    @settings(max_examples=50, deadline=None)
    @given(st.data())
    def test_forked_history_is_caught(self, data):
        """A log that rewrote one leaf before `first` gives no consistency proof from the old head."""
        second = data.draw(st.integers(2, MAX_SIZE), "second")
        first = data.draw(st.integers(1, second - 1), "first")
        rewritten = data.draw(st.integers(0, first - 1), "rewritten")
        leaves = list(LEAVES[:second])
        leaves[rewritten] = merkle.leaf_hash(b"rewritten")
        fork = Tree(leaves)
        self.assertFalse(verify_consistency(first, second, BIG.root(first), fork.root(), fork.consistency_proof(first)))


class CostTests(unittest.SynchronousTestCase):
    """Hash counts, not times: a root or a proof costs at most log2(n) hashes, for any size of the log."""

    def count_hashes(self):
        calls = []
        real = merkle.node_hash

        def counting(left, right):
            calls.append(1)
            return real(left, right)

        self.patch(merkle, "node_hash", counting)
        return calls

    def test_append_and_proofs(self):
        size = 5000
        calls = self.count_hashes()
        tree = Tree(merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(size))
        self.assertLess(len(calls), size)  # one node per completed subtree: n - popcount(n)
        bound = math.ceil(math.log2(size))
        for index in range(0, size, 7):
            for past in (size, index + 1 + (size - index) // 3):
                del calls[:]
                tree.inclusion_proof(index, past)
                self.assertLessEqual(len(calls), bound)
                del calls[:]
                tree.consistency_proof(index + 1, past)
                self.assertLessEqual(len(calls), bound)
        del calls[:]
        tree.root()
        self.assertLess(len(calls), math.log2(size))


class TreeHeadTests(unittest.SynchronousTestCase):
    key = Ed25519PrivateKey.from_private_bytes(x(GOLDEN_HEAD["private_key"]))

    def golden(self):
        g = GOLDEN_HEAD
        return TreeHead(g["size"], x(g["root"]), g["timestamp_ms"], x(g["signature"]))

    def test_golden(self):
        g = GOLDEN_HEAD
        head = merkle.sign_tree_head(self.key, g["size"], x(g["root"]), g["timestamp_ms"])
        self.assertEqual(head, self.golden())
        self.assertEqual(self.key.public_key().public_bytes_raw().hex(), g["public_key"])
        self.assertTrue(merkle.verify_tree_head(self.key.public_key(), head))

    def test_signed_bytes_by_hand(self):
        """The label, then size, root and time, each as a 4-byte length and its bytes, integers as 8 bytes big-endian."""
        g = GOLDEN_HEAD
        signed = b"securechatd/tree-head/v1" + b"".join(
            len(f).to_bytes(4, "big") + f for f in (g["size"].to_bytes(8, "big"), x(g["root"]), g["timestamp_ms"].to_bytes(8, "big"))
        )
        self.assertEqual(signed.hex(), g["signed_bytes"])
        Ed25519PublicKey.from_public_bytes(x(g["public_key"])).verify(x(g["signature"]), signed)  # raises if not

    def test_every_field_is_covered(self):
        public, head = self.key.public_key(), self.golden()
        changed_root = bytes([head.root[0] ^ 1]) + head.root[1:]
        changed_signature = head.signature[:-1] + bytes([head.signature[-1] ^ 1])
        for changed in (
            TreeHead(head.size + 1, head.root, head.timestamp_ms, head.signature),
            TreeHead(head.size, changed_root, head.timestamp_ms, head.signature),
            TreeHead(head.size, head.root, head.timestamp_ms + 1, head.signature),
            TreeHead(head.size, head.root, head.timestamp_ms, changed_signature),
        ):
            self.assertFalse(merkle.verify_tree_head(public, changed), changed)

    def test_another_key(self):
        self.assertFalse(merkle.verify_tree_head(Ed25519PrivateKey.generate().public_key(), self.golden()))

    def test_another_label(self):
        """The same fields signed for another purpose are no tree head."""
        head = self.golden()
        other = TreeHead(head.size, head.root, head.timestamp_ms, sign(self.key, "securechatd/chain/v1", head.fields()))
        self.assertFalse(merkle.verify_tree_head(self.key.public_key(), other))

    def test_malformed_heads_refused_without_raising(self):
        head = self.golden()
        for size, root, timestamp_ms, signature in (
            (-1, head.root, head.timestamp_ms, head.signature),
            (1 << 64, head.root, head.timestamp_ms, head.signature),
            (True, head.root, head.timestamp_ms, head.signature),
            (head.size, head.root.hex(), head.timestamp_ms, head.signature),
            (head.size, head.root[:31], head.timestamp_ms, head.signature),
            (head.size, head.root, -1, head.signature),
            (head.size, head.root, 1.5, head.signature),
            (head.size, head.root, head.timestamp_ms, None),
            (head.size, head.root, head.timestamp_ms, b""),
        ):
            self.assertFalse(merkle.verify_tree_head(self.key.public_key(), TreeHead(size, root, timestamp_ms, signature)))

    def test_sign_refuses_malformed_fields(self):
        root = x(GOLDEN_HEAD["root"])
        for size, root_, timestamp_ms in ((-1, root, 0), (0, root[:31], 0), (0, root, -1), (0, root, 1.5), (1 << 64, root, 0)):
            self.assertRaises(ValueError, merkle.sign_tree_head, self.key, size, root_, timestamp_ms)
