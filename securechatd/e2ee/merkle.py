"""RFC 9162 (Certificate Transparency 2.0) Merkle trees, and the tree heads the server signs.

The account log puts each user's event-chain head into one append-only tree;
a client keeps the last signed tree head it saw, checks its events with
inclusion proofs and the log's history with consistency proofs, so a rewrite
of history shows. Written from the RFC's definitions (§2.1.1 to §2.1.4.2);
hashes are SHA-256 with the RFC's 0x00 leaf and 0x01 node prefixes, so a leaf
can never pass for a node.
"""

import hashlib
from dataclasses import dataclass, replace

from securechatd.e2ee.encoding import sign, verify

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()  # MTH({})
TREE_HEAD_LABEL = "securechatd/tree-head/v1"


def leaf_hash(entry):
    """MTH({d}) = SHA-256(0x00 || d)."""
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left, right):
    """SHA-256(0x01 || left || right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def mth(entries):
    """The Merkle Tree Hash of a list of entries (RFC 9162 §2.1.1)."""
    return Tree(leaf_hash(entry) for entry in entries).root()


def batch_proofs(leaf_hashes):
    """(root, [PATH(i, D[n]) for every leaf i]) of a whole tree at once, as a batch of signed heads needs.

    Built level by level, the last node of an odd level carried up as it
    is, which gives the RFC's tree (its left subtree is always the largest
    power of two): about 2n hashes in all and no recursion, where n calls of
    Tree.inclusion_proof would recurse log n deep each.
    """
    levels = [list(leaf_hashes)]
    while len(levels[-1]) > 1:
        below = levels[-1]
        above = [node_hash(below[i], below[i + 1]) for i in range(0, len(below) - 1, 2)]
        if len(below) % 2:
            above.append(below[-1])
        levels.append(above)
    paths = []
    for index in range(len(levels[0])):
        path = []
        for level in levels[:-1]:
            if index ^ 1 < len(level):
                path.append(level[index ^ 1])
            index >>= 1
        paths.append(path)
    return (levels[-1][0] if levels[0] else EMPTY_ROOT), paths


class Tree:
    """An append-only tree of leaf hashes that answers for its current size and any earlier one.

    It keeps the hash of every complete subtree of 2**h leaves starting at a
    multiple of 2**h: about 2n hashes, some 13 MB for 100,000 leaves, built
    in a fraction of a second. Only subtrees on the right edge of a tree are
    incomplete, and a proof's path crosses that edge at most once, so an
    append costs one hash amortised and a root or an inclusion or
    consistency proof O(log n) hashes (at most 17 for 100,000 leaves), for
    the current size or any past one.
    """

    def __init__(self, leaf_hashes=()):
        self._levels = [[]]  # _levels[h][i]: the hash of leaves [i * 2**h, (i + 1) * 2**h)
        for leaf in leaf_hashes:
            self.append(leaf)

    @property
    def size(self):
        return len(self._levels[0])

    def append(self, leaf):
        """Add a leaf hash (see leaf_hash) and return its index."""
        if not isinstance(leaf, bytes) or len(leaf) != HASH_SIZE:
            raise ValueError("a leaf is a 32-byte leaf hash")
        index = self.size
        self._levels[0].append(leaf)
        level = 0
        while len(self._levels[level]) % 2 == 0:  # a subtree of 2**(level + 1) leaves is now complete
            pair = self._levels[level][-2:]
            level += 1
            if level == len(self._levels):
                self._levels.append([])
            self._levels[level].append(node_hash(*pair))
        return index

    def root(self, size=None):
        """MTH of the first `size` leaves (all of them by default)."""
        size = self._past(size)
        return EMPTY_ROOT if size == 0 else self._hash(0, size)

    def inclusion_proof(self, index, size=None):
        """PATH(index, D[size]) (RFC 9162 §2.1.3.1): the audit path of one leaf in the tree of `size` leaves."""
        size = self._past(size)
        if not 0 <= index < size:
            raise ValueError(f"no leaf {index} in a tree of {size}")
        return self._path(index, 0, size)

    def consistency_proof(self, first, second=None):
        """PROOF(first, D[second]) (RFC 9162 §2.1.4.1): the tree of `first` leaves is a prefix of the tree of `second`."""
        second = self._past(second)
        if not 0 < first <= second:
            raise ValueError(f"no consistency proof from {first} to {second} leaves")
        return self._subproof(first, 0, second, True)

    def _past(self, size):
        if size is None:
            return self.size
        if not 0 <= size <= self.size:
            raise ValueError(f"the tree has {self.size} leaves, not {size}")
        return size

    def _hash(self, start, end):
        """MTH(D[start:end]), for the ranges the recursions reach: `start` is a multiple of the smallest power of two >= end - start."""
        count = end - start
        if count & (count - 1) == 0:  # a power of two: a stored subtree
            level = count.bit_length() - 1
            return self._levels[level][start >> level]
        split = start + _split(count)
        return node_hash(self._hash(start, split), self._hash(split, end))

    def _path(self, index, start, end):
        """PATH for the leaf at `index` within D[start:end] (indexes count from the tree's first leaf)."""
        if end - start == 1:
            return []
        split = start + _split(end - start)
        if index < split:
            return self._path(index, start, split) + [self._hash(split, end)]
        return self._path(index, split, end) + [self._hash(start, split)]

    def _subproof(self, first, start, end, whole):
        """SUBPROOF for the first tree D[0:first] within D[start:end]; `whole` is the RFC's b, true while D[start:first] is all of it."""
        if first == end:
            return [] if whole else [self._hash(start, end)]
        split = start + _split(end - start)
        if first <= split:
            return self._subproof(first, start, split, whole) + [self._hash(split, end)]
        return self._subproof(first, split, end, False) + [self._hash(start, split)]

def verify_inclusion(leaf, index, size, proof, root):
    """True if `proof` shows the leaf hash `leaf` at `index` of the tree of `size` leaves whose root is `root` (§2.1.3.2).

    The proof alone does not bind the size (one made for 5 leaves can pass for
    6 with the same root): take `size` and `root` from one verified tree head.
    """
    if not (0 <= index < size and _are_hashes([leaf, root, *proof])):
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while fn and not fn & 1:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and r == root


def verify_consistency(first, second, first_root, second_root, proof):
    """True if `proof` shows the tree (`first`, `first_root`) is a prefix of (`second`, `second_root`) (§2.1.4.2).

    Equal sizes need equal roots and an empty proof; every hash must be 32
    bytes; a first size of 0 is refused, as there is nothing to prove: a
    client that has seen no tree head trusts the first one it verifies.
    """
    if not (0 < first <= second and _are_hashes([first_root, second_root, *proof])):
        return False
    if first == second:
        return not proof and first_root == second_root
    if not proof:
        return False
    path = list(proof)
    if first & (first - 1) == 0:
        path.insert(0, first_root)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while fn and not fn & 1:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and fr == first_root and sr == second_root


@dataclass(frozen=True)
class TreeHead:
    """A signed tree head: the log had `size` leaves with this root at `timestamp_ms` (ms since the epoch)."""

    size: int
    root: bytes
    timestamp_ms: int
    signature: bytes

    def fields(self):
        """What the signature covers, after TREE_HEAD_LABEL."""
        return [self.size, self.root, self.timestamp_ms]


def sign_tree_head(private_key, size, root, timestamp_ms):
    """The server's Ed25519 signature over the label and (size, root, timestamp_ms); the time is passed in."""
    if not (_is_u64(size) and _is_u64(timestamp_ms) and _are_hashes([root])):
        raise ValueError("a tree head is two 64-bit unsigned integers and a 32-byte root")
    unsigned = TreeHead(size, root, timestamp_ms, b"")
    return replace(unsigned, signature=sign(private_key, TREE_HEAD_LABEL, unsigned.fields()))


def verify_tree_head(public_key, head):
    """True if `head` carries `public_key`'s signature over its fields (never raises for a malformed one)."""
    if not (_is_u64(head.size) and _is_u64(head.timestamp_ms) and _are_hashes([head.root]) and isinstance(head.signature, bytes)):
        return False
    return verify(public_key, head.signature, TREE_HEAD_LABEL, head.fields())


def _split(count):
    """The largest power of two smaller than `count` (count >= 2): the RFC's k."""
    return 1 << ((count - 1).bit_length() - 1)


def _are_hashes(values):
    """Whether every value is 32 bytes: anything else is malformed, and would otherwise pass where leaf == root."""
    return all(isinstance(value, bytes) and len(value) == HASH_SIZE for value in values)


def _is_u64(value):
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 64
