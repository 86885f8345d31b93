"""Device chains: building links, the golden chain, every rule of docs/E2EE.md "Device chain", and safety numbers.

Each rule has a test asserting the ChainError subclass that names it; any
byte flipped in a valid link makes parsing or verification fail.
"""

import hashlib
import json
import os
import struct
from dataclasses import replace

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from securechatd.e2ee import chain, safety
from securechatd.e2ee.chain import (
    BadCountersignature,
    BadFirstLink,
    BadSignature,
    ChainError,
    ChainState,
    DuplicateDevice,
    Fork,
    Gap,
    Link,
    Readded,
    RevokedSigner,
    UnknownDevice,
    UnknownSigner,
    WrongUser,
    ZERO_HASH,
    verify_chain,
)
from securechatd.e2ee.encoding import Malformed
from securechatd.e2ee.keys import Device

VECTORS = os.path.join(os.path.dirname(__file__), "vectors")
with open(os.path.join(VECTORS, "golden_chain.json")) as f:
    GOLDEN = json.load(f)
with open(os.path.join(VECTORS, "golden_keys.json")) as f:
    GOLDEN_SAFETY = json.load(f)["safety_number"]
GOLDEN_LINKS = [Link.from_bytes(bytes.fromhex(link["bytes"])) for link in GOLDEN["links"]]


def x(value):
    return bytes.fromhex(value)


def length(data):
    return struct.pack(">I", len(data)) + data


def golden_device(index):
    d = GOLDEN["devices"][index]
    return Device(d["user"], Ed25519PrivateKey.from_private_bytes(x(d["sig_private"])), X25519PrivateKey.from_private_bytes(x(d["dh_private"])))


class GoldenChainTests(unittest.TestCase):
    def test_rebuilt_from_the_seeds(self):
        laptop, phone = golden_device(0), golden_device(1)
        state = ChainState("alice")
        builders = (
            lambda s: chain.first(laptop, "laptop"),
            lambda s: chain.add(s, laptop, phone, "phone"),
            lambda s: chain.revoke(s, phone, laptop.id),
        )
        for build, golden in zip(builders, GOLDEN["links"]):
            link = build(state)
            self.assertEqual((link.to_bytes().hex(), link.hash().hex()), (golden["bytes"], golden["hash"]))
            state = state.extend([link])

    def test_verified(self):
        state = verify_chain("alice", GOLDEN_LINKS)
        final = GOLDEN["final"]
        self.assertEqual(state.seen, (final["seq"], x(final["head"])))
        self.assertEqual({d.hex(): v.name for d, v in state.devices.items()}, final["devices"])
        self.assertEqual(sorted(d.hex() for d in state.revoked), final["revoked"])
        phone = GOLDEN["devices"][1]
        self.assertEqual(state.devices[x(phone["device_id"])].keys, golden_device(1).keys)

    def test_link_hashes_by_hand(self):
        """hash = SHA-256("securechatd/chain-hash/v1" ‖ the link's bytes), and each prev is the hash before it."""
        prev = ZERO_HASH
        for golden in GOLDEN["links"]:
            data = x(golden["bytes"])
            self.assertEqual(hashlib.sha256(b"securechatd/chain-hash/v1" + data).hexdigest(), golden["hash"])
            self.assertEqual(data[:25], length(b"alice") + length(struct.pack(">Q", golden["seq"])) + struct.pack(">I", 32))
            self.assertEqual(data[25:57], prev)
            prev = x(golden["hash"])

    def test_first_link_by_hand(self):
        """Link 1's bytes field by field from docs/E2EE.md's table, and both its signatures by its own key."""
        laptop = GOLDEN["devices"][0]
        device, sig_pub = x(laptop["device_id"]), x(laptop["sig_pub"])
        fields = [b"alice", struct.pack(">Q", 1), bytes(32), b"add", device, sig_pub, x(laptop["dh_pub"]), b"laptop", device]
        signed = b"".join(map(length, fields))
        data = x(GOLDEN["links"][0]["bytes"])
        self.assertTrue(data.startswith(signed))
        signature, countersignature = data[len(signed) + 4 : len(signed) + 68], data[len(signed) + 72 :]
        self.assertEqual(data, signed + length(signature) + length(countersignature))
        key = Ed25519PublicKey.from_public_bytes(sig_pub)
        key.verify(signature, b"securechatd/chain-link/v1" + signed)
        key.verify(countersignature, b"securechatd/chain-countersign/v1" + signed)


class Chain(unittest.TestCase):
    """A user with a laptop (link 1) and devices to add, revoke and sign with."""

    def setUp(self):
        self.laptop, self.phone, self.tablet = (Device.generate("alice") for _ in range(3))
        self.one = chain.first(self.laptop, "laptop")
        self.state = ChainState("alice").extend([self.one])

    def assertBreaks(self, error, state, links):
        """extend() raises `error` (exactly, not a sibling rule) and leaves `state` as it was."""
        before = (state.seen, dict(state.devices), state.revoked)
        raised = self.assertRaises(ChainError, state.extend, links)
        self.assertIs(type(raised), error, str(raised))
        self.assertEqual((state.seen, dict(state.devices), state.revoked), before)
        return raised


class BuildingTests(Chain):
    def test_first_link(self):
        self.assertEqual((self.one.seq, self.one.prev, self.one.op, self.one.signer), (1, ZERO_HASH, "add", self.laptop.id))
        self.assertEqual(self.state.seen, (1, self.one.hash()))
        self.assertEqual(dict(self.state.devices), {self.laptop.id: chain.ChainDevice(self.laptop.keys, "laptop")})

    def test_add_rename_revoke(self):
        state = self.state.extend([chain.add(self.state, self.laptop, self.phone, "phone")])
        state = state.extend([chain.rename(state, self.phone, self.laptop.id, "old laptop")])
        self.assertEqual({d: v.name for d, v in state.devices.items()}, {self.laptop.id: "old laptop", self.phone.id: "phone"})
        state = state.extend([chain.revoke(state, self.laptop, self.laptop.id)])  # a device may revoke itself
        self.assertEqual((list(state.devices), state.revoked, state.seq), ([self.phone.id], {self.laptop.id}, 4))

        def change():
            state.devices[self.tablet.id] = None

        self.assertRaises(TypeError, change)

    def test_add_signed_on_two_machines_in_either_order(self):
        draft = chain.draft_add(self.state, self.phone.keys, "phone", self.laptop.id)
        one = chain.sign_link(chain.countersign_link(draft, self.phone), self.laptop)
        two = chain.countersign_link(chain.sign_link(draft, self.laptop), self.phone)
        self.assertEqual(one, two)
        self.assertEqual(one, chain.add(self.state, self.laptop, self.phone, "phone"))
        self.state.extend([Link.from_bytes(one.to_bytes())])

    def test_only_the_named_devices_sign(self):
        draft = chain.draft_add(self.state, self.phone.keys, "phone", self.laptop.id)
        self.assertRaises(ValueError, chain.sign_link, draft, self.phone)
        self.assertRaises(ValueError, chain.countersign_link, draft, self.laptop)
        self.assertRaises(ValueError, chain.countersign_link, chain.revoke(self.state, self.laptop, self.laptop.id), self.laptop)

    def test_incremental_is_the_same_as_at_once(self):
        links, state = [self.one], self.state
        for build in (
            lambda s: chain.add(s, self.laptop, self.phone, "phone"),
            lambda s: chain.add(s, self.phone, self.tablet, "tablet"),
            lambda s: chain.revoke(s, self.tablet, self.laptop.id),
            lambda s: chain.rename(s, self.tablet, self.phone.id, "old phone"),
        ):
            links.append(build(state))
            state = state.extend(links[-1:])
        at_once = verify_chain("alice", [Link.from_bytes(link.to_bytes()) for link in links])
        from_seen = verify_chain("alice", links[:2]).extend(links[2:])
        for other in (at_once, from_seen):
            self.assertEqual((other.seen, dict(other.devices), other.revoked), (state.seen, dict(state.devices), state.revoked))

    def test_seen_link_present(self):
        links = [self.one, chain.add(self.state, self.laptop, self.phone, "phone")]
        for seen in ((1, self.one.hash()), (2, links[1].hash())):
            self.assertEqual(verify_chain("alice", links, seen=seen).seq, 2)


class RuleTests(Chain):
    """One test per rule; each asserts the error class that names it."""

    def test_wrong_user(self):
        bob = Device.generate("bob")
        self.assertBreaks(WrongUser, ChainState("alice"), [chain.first(bob, "")])
        link = chain.add(self.state, self.laptop, self.phone, "phone")
        self.assertBreaks(WrongUser, self.state, [chain.sign_link(replace(link, user="bob"), self.laptop)])

    def test_gap(self):
        two = chain.add(self.state, self.laptop, self.phone, "phone")
        state = self.state.extend([two])
        three = chain.add(state, self.phone, self.tablet, "tablet")
        error = self.assertBreaks(Gap, self.state, [three])
        self.assertIn("link 3 came where link 2 belongs", str(error))
        self.assertBreaks(Gap, state, [two])  # a link already taken in
        self.assertBreaks(Gap, ChainState("alice"), [two])

    def test_fork_prev_not_the_hash_before(self):
        state = self.state.extend([chain.add(self.state, self.laptop, self.phone, "phone")])
        other = self.state.extend([chain.add(self.state, self.laptop, self.tablet, "tablet")])
        self.assertBreaks(Fork, state, [chain.rename(other, self.laptop, self.laptop.id, "x")])
        self.assertBreaks(Fork, ChainState("alice"), [chain.sign_link(replace(self.one, prev=bytes([1]) * 32), self.laptop)])

    def test_fork_against_what_was_seen(self):
        """A chain rewritten under a seen link, or cut short of it, is a fork alarm."""
        two = chain.add(self.state, self.laptop, self.phone, "phone")
        rewritten = chain.add(self.state, self.laptop, self.tablet, "tablet")
        self.assertRaises(Fork, verify_chain, "alice", [self.one, rewritten], seen=(2, two.hash()))
        error = self.assertRaises(Fork, verify_chain, "alice", [self.one], seen=(2, two.hash()))
        self.assertIn("ends before link 2", str(error))
        other_first = chain.first(self.phone, "phone")
        self.assertRaises(Fork, verify_chain, "alice", [other_first], seen=(1, self.one.hash()))

    def test_first_link_must_add_its_own_signer(self):
        empty = ChainState("alice")
        signed_by_other = chain.sign_link(chain.countersign_link(chain.draft_add(empty, self.phone.keys, "phone", self.laptop.id), self.phone), self.laptop)
        self.assertBreaks(BadFirstLink, empty, [signed_by_other])
        self.assertBreaks(BadFirstLink, empty, [chain.revoke(empty, self.laptop, self.laptop.id)])
        self.assertBreaks(BadFirstLink, empty, [chain.rename(empty, self.laptop, self.laptop.id, "x")])

    def test_unknown_signer(self):
        self.assertBreaks(UnknownSigner, self.state, [chain.add(self.state, self.tablet, self.phone, "phone")])
        self.assertBreaks(UnknownSigner, self.state, [chain.revoke(self.state, self.tablet, self.laptop.id)])

    def test_revoked_signer(self):
        state = self.state.extend([chain.add(self.state, self.laptop, self.phone, "phone")])
        state = state.extend([chain.revoke(state, self.phone, self.laptop.id)])
        self.assertBreaks(RevokedSigner, state, [chain.rename(state, self.laptop, self.phone.id, "mine now")])
        self.assertBreaks(RevokedSigner, state, [chain.add(state, self.laptop, self.tablet, "tablet")])

    def test_bad_signature(self):
        link = chain.add(self.state, self.laptop, self.phone, "phone")
        by_other = replace(link, signature=self.phone.sign(chain.LINK_LABEL, link.fields()))
        self.assertBreaks(BadSignature, self.state, [by_other])
        other_label = replace(link, signature=self.laptop.sign(chain.COUNTERSIGN_LABEL, link.fields()))
        self.assertBreaks(BadSignature, self.state, [other_label])
        self.assertBreaks(BadSignature, self.state, [replace(link, name="phone!")])
        self.assertBreaks(BadSignature, ChainState("alice"), [replace(self.one, signature=bytes(64))])

    def test_bad_countersignature(self):
        """Nobody can list a key they do not hold: an add the new device did not countersign fails."""
        link = chain.add(self.state, self.laptop, self.phone, "phone")
        for countersignature in (
            bytes(64),
            self.laptop.sign(chain.COUNTERSIGN_LABEL, link.fields()),
            self.phone.sign(chain.LINK_LABEL, link.fields()),
        ):
            self.assertBreaks(BadCountersignature, self.state, [replace(link, countersignature=countersignature)])

    def test_revoked_device_never_added_again(self):
        state = self.state.extend([chain.add(self.state, self.laptop, self.phone, "phone")])
        state = state.extend([chain.revoke(state, self.laptop, self.phone.id)])
        self.assertBreaks(Readded, state, [chain.add(state, self.laptop, self.phone, "phone again")])

    def test_duplicate_add(self):
        self.assertBreaks(DuplicateDevice, self.state, [chain.add(self.state, self.laptop, self.laptop, "again")])

    def test_revoke_or_name_only_a_current_device(self):
        self.assertBreaks(UnknownDevice, self.state, [chain.revoke(self.state, self.laptop, self.phone.id)])
        self.assertBreaks(UnknownDevice, self.state, [chain.rename(self.state, self.laptop, self.phone.id, "x")])
        state = self.state.extend([chain.add(self.state, self.laptop, self.phone, "phone")])
        state = state.extend([chain.revoke(state, self.laptop, self.phone.id)])
        self.assertBreaks(UnknownDevice, state, [chain.revoke(state, self.laptop, self.phone.id)])
        self.assertBreaks(UnknownDevice, state, [chain.rename(state, self.laptop, self.phone.id, "x")])

    def test_a_bad_link_in_a_batch_changes_nothing(self):
        two = chain.add(self.state, self.laptop, self.phone, "phone")
        three = chain.revoke(self.state.extend([two]), self.tablet, self.laptop.id)
        error = self.assertBreaks(UnknownSigner, self.state, [two, three])
        self.assertEqual(error.seq, 3)

    def test_malformed_link(self):
        link = chain.add(self.state, self.laptop, self.phone, "phone")
        for bad in (replace(link, name="x" * 65), replace(link, op="delete"), replace(link, device=self.tablet.id), replace(link, countersignature=b"")):
            self.assertRaises(Malformed, self.state.extend, [bad])
            self.assertRaises(Malformed, Link.from_bytes, bad.to_bytes())
        revoke = chain.revoke(self.state, self.laptop, self.laptop.id)
        for bad in (replace(link, seq=-1), replace(link, seq=1 << 64), replace(link, prev=b""), replace(revoke, dh_pub=self.phone.keys.dh_pub)):
            self.assertRaises(Malformed, self.state.extend, [bad])


class FlippedByteTests(unittest.TestCase):
    """Any byte of a valid link changed: parsing (Malformed) or verification (a ChainError) fails at that link."""

    def assertRefused(self, index, position, mask):
        data = bytearray(GOLDEN_LINKS[index].to_bytes())
        data[position] ^= mask
        try:
            link = Link.from_bytes(bytes(data))
        except Malformed:
            return
        self.assertRaises(ChainError, ChainState("alice").extend(GOLDEN_LINKS[:index]).extend, [link])

    def test_every_byte(self):
        for index, link in enumerate(GOLDEN_LINKS):
            for position in range(len(link.to_bytes())):
                self.assertRefused(index, position, 0x01)

    @settings(max_examples=300, deadline=None)
    @given(st.data())
    def test_any_change(self, data):
        index = data.draw(st.integers(0, len(GOLDEN_LINKS) - 1))
        position = data.draw(st.integers(0, len(GOLDEN_LINKS[index].to_bytes()) - 1))
        self.assertRefused(index, position, data.draw(st.integers(1, 255)))


class SafetyNumberTests(unittest.TestCase):
    def test_golden(self):
        users = GOLDEN_SAFETY["users"]
        for user in users:
            self.assertEqual(safety.fingerprint(user["user"], [x(k) for k in user["sig_pubs"]]), user["fingerprint"])
        alice = verify_chain("alice", GOLDEN_LINKS)  # the golden chain: only the phone is left
        self.assertEqual([d.keys.sig_pub.hex() for d in alice.devices.values()], users[0]["sig_pubs"])
        bob = Device("bob", Ed25519PrivateKey.from_private_bytes(x(users[1]["sig_privates"][0])), X25519PrivateKey.from_private_bytes(x(users[1]["dh_private"])))
        self.assertEqual(bob.keys.sig_pub.hex(), users[1]["sig_pubs"][0])
        self.assertEqual(safety.safety_number(alice, verify_chain("bob", [chain.first(bob, "")])), GOLDEN_SAFETY["number"])
        digits = "".join(sorted(user["fingerprint"] for user in users))  # by hand: sorted, in groups of 5
        self.assertEqual(GOLDEN_SAFETY["number"], " ".join(digits[at : at + 5] for at in range(0, 60, 5)))

    def test_fingerprint_by_hand(self):
        """SHA-512 5200 times over "securechatd/safety/v1" ‖ enc([user, K]) then ‖ K; 6 × (5 bytes mod 100000)."""
        user = GOLDEN_SAFETY["users"][1]
        keys = b"".join(length(x(k)) for k in sorted(user["sig_pubs"]))
        value = b"securechatd/safety/v1" + length(user["user"].encode()) + length(keys)
        for _ in range(5200):
            value = hashlib.sha512(value + keys).digest()
        self.assertEqual("".join("%05d" % (int.from_bytes(value[i : i + 5], "big") % 100000) for i in range(0, 30, 5)), user["fingerprint"])

    def test_same_both_ways_and_changes_with_the_devices(self):
        alice, bob, phone = Device.generate("alice"), Device.generate("bob"), Device.generate("alice")
        a = ChainState("alice").extend([chain.first(alice, "laptop")])
        b = ChainState("bob").extend([chain.first(bob, "")])
        number = safety.safety_number(a, b)
        self.assertEqual(number, safety.safety_number(b, a))
        self.assertRegex(number, r"^\d{5}( \d{5}){11}$")
        renamed = a.extend([chain.rename(a, alice, alice.id, "desk")])
        self.assertEqual(safety.safety_number(renamed, b), number)  # names are not keys
        added = a.extend([chain.add(a, alice, phone, "phone")])
        self.assertNotEqual(safety.safety_number(added, b), number)
        self.assertNotEqual(safety.fingerprint("alice", [alice.keys.sig_pub]), safety.fingerprint("alicf", [alice.keys.sig_pub]))
        self.assertEqual(safety.fingerprint("alice", [alice.keys.sig_pub, phone.keys.sig_pub]), safety.fingerprint("alice", [phone.keys.sig_pub, alice.keys.sig_pub]))

    def test_no_devices(self):
        self.assertRaises(ValueError, safety.fingerprint, "alice", [])
