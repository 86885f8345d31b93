"""Membership states: building them, the golden vector, every rule of docs/E2EE.md "Membership", a server's injections.

Each rule has a test asserting the MembershipError subclass that names it;
any byte flipped in a valid state makes parsing or verification fail.
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

from securechatd.e2ee import chain, membership
from securechatd.e2ee.chain import ZERO_HASH, ChainState, Link, verify_chain
from securechatd.e2ee.encoding import Malformed, enc
from securechatd.e2ee.keys import Device
from securechatd.e2ee.membership import (
    BadAdd,
    BadFirstState,
    BadLeave,
    BadSignature,
    Fork,
    Gap,
    KindChanged,
    MembershipError,
    MembershipState,
    NotAMember,
    Recreated,
    State,
    TitleChanged,
    UnknownActorDevice,
    WrongConversation,
    chain_lookup,
    sign_state,
    verify_membership,
)

VECTORS = os.path.join(os.path.dirname(__file__), "vectors")
with open(os.path.join(VECTORS, "golden_membership.json"), encoding="utf-8") as f:
    GOLDEN = json.load(f)
with open(os.path.join(VECTORS, "golden_chain.json")) as f:
    GOLDEN_CHAIN = json.load(f)
GOLDEN_STATES = [State.from_bytes(bytes.fromhex(state["bytes"])) for state in GOLDEN["states"]]


def x(value):
    return bytes.fromhex(value)


def length(data):
    return struct.pack(">I", len(data)) + data


def device(d):
    sig = Ed25519PrivateKey.from_private_bytes(x(d["sig_private"]))
    return Device(d["user"], sig, X25519PrivateKey.from_private_bytes(x(d["dh_private"])))


PHONE, BOB = (device(d) for d in GOLDEN["devices"])
LAPTOP = device(GOLDEN_CHAIN["devices"][0])  # alice's laptop, revoked by the golden chain's last link
GOLDEN_CHAINS = {
    "alice": verify_chain("alice", [Link.from_bytes(x(link["bytes"])) for link in GOLDEN_CHAIN["links"]]),
    "bob": ChainState("bob").extend([chain.first(BOB, "")]),
}
GOLDEN_LOOKUP = chain_lookup(GOLDEN_CHAINS)


class GoldenMembershipTests(unittest.TestCase):
    def test_rebuilt_from_the_seeds(self):
        conversation = GOLDEN["conversation"]
        builders = (
            lambda s: membership.create(conversation, "group", "Pläne", ["bob"], PHONE),
            lambda s: membership.add(s.latest, ["carol"], BOB),
            lambda s: membership.leave(s.latest, PHONE),
        )
        verified = MembershipState(conversation)
        for build, golden in zip(builders, GOLDEN["states"]):
            state = build(verified)
            self.assertEqual((state.to_bytes().hex(), state.hash().hex()), (golden["bytes"], golden["hash"]))
            described = (state.epoch, state.op, state.actor, list(state.members))
            self.assertEqual(described, (golden["epoch"], golden["op"], golden["actor"], golden["members"]))
            verified = verified.extend([state], GOLDEN_LOOKUP)
            self.assertEqual(verified.members, frozenset(golden["members"]))

    def test_verified(self):
        verified = verify_membership(GOLDEN["conversation"], GOLDEN_STATES, GOLDEN_LOOKUP)
        final = GOLDEN["final"]
        self.assertEqual(verified.seen, (final["epoch"], x(final["head"])))
        self.assertEqual(verified.members_hash, x(final["head"]))
        self.assertEqual(sorted(verified.members), final["members"])
        self.assertEqual((verified.kind, verified.title), ("group", "Pläne"))
        for golden in GOLDEN["states"]:
            self.assertEqual(verified.members_at(x(golden["hash"])), frozenset(golden["members"]))

    def test_state_hashes_by_hand(self):
        """hash = SHA-256("securechatd/membership-hash/v1" ‖ the state's bytes), and each prev is the hash before it."""
        prev = ZERO_HASH
        for golden in GOLDEN["states"]:
            data = x(golden["bytes"])
            self.assertEqual(hashlib.sha256(b"securechatd/membership-hash/v1" + data).hexdigest(), golden["hash"])
            self.assertEqual(data[:24], length(struct.pack(">Q", 7)) + length(struct.pack(">Q", golden["epoch"])))
            self.assertEqual(data[24:60], length(prev))
            prev = x(golden["hash"])

    def test_first_state_by_hand(self):
        """Epoch 1's bytes field by field from docs/E2EE.md's table, and its signature by the phone's key."""
        phone = GOLDEN["devices"][0]
        members = length(b"alice") + length(b"bob")
        title = "Pläne".encode("utf-8")
        self.assertEqual(len(title), 6)
        numbers = [struct.pack(">Q", 7), struct.pack(">Q", 1), bytes(32)]
        fields = numbers + [b"create", b"group", title, members, b"alice", x(phone["device_id"])]
        signed = b"".join(map(length, fields))
        data = x(GOLDEN["states"][0]["bytes"])
        signature = data[len(signed) + 4 :]
        self.assertEqual(data, signed + length(signature))
        self.assertEqual(len(signature), 64)
        Ed25519PublicKey.from_public_bytes(x(phone["sig_pub"])).verify(signature, b"securechatd/membership/v1" + signed)

    def test_a_revoked_device_of_the_golden_chain_cannot_act(self):
        """The laptop signed alice's chain once; it is revoked now, so a state it signs is refused."""
        verified = verify_membership(GOLDEN["conversation"], GOLDEN_STATES[:2], GOLDEN_LOOKUP)
        by_laptop = membership.leave(verified.latest, LAPTOP)
        self.assertRaises(UnknownActorDevice, verified.extend, [by_laptop], GOLDEN_LOOKUP)


class Conversation(unittest.TestCase):
    """Conversation 1: alice and bob; carol, mallory and the others have verified chains of one device, alice two."""

    def setUp(self):
        users = ("alice", "bob", "carol", "mallory")
        self.alice, self.bob, self.carol, self.mallory = firsts = [Device.generate(user) for user in users]
        self.phone = Device.generate("alice")
        self.chains = {d.user: ChainState(d.user).extend([chain.first(d, "")]) for d in firsts}
        alice = self.chains["alice"]
        self.chains["alice"] = alice.extend([chain.add(alice, self.alice, self.phone, "phone")])
        self.lookup = chain_lookup(self.chains)
        self.one = membership.create(1, "group", "", ["bob"], self.alice)
        self.state = MembershipState(1).extend([self.one], self.lookup)

    def revoke(self, device):
        """Revoke `device` in its user's chain, signed by the user's first device."""
        first = self.alice if device.user == "alice" else device
        state = self.chains[device.user]
        self.chains[device.user] = state.extend([chain.revoke(state, first, device.id)])

    def assertBreaks(self, error, verified, states, lookup=None):
        """extend() raises `error` (exactly, not a sibling rule) and leaves `verified` as it was."""
        before = (verified.seen, verified.members, verified.latest, dict(verified.verified))
        raised = self.assertRaises(MembershipError, verified.extend, states, lookup or self.lookup)
        self.assertIs(type(raised), error, str(raised))
        self.assertEqual((verified.seen, verified.members, verified.latest, dict(verified.verified)), before)
        return raised

    def signed(self, state, device, **changes):
        """`state` with `changes`, signed again by `device`: a member's device signed it, yet it breaks a rule."""
        return sign_state(replace(state, **changes), device)


class BuildingTests(Conversation):
    def test_create(self):
        one = self.one
        self.assertEqual((one.epoch, one.prev, one.op, one.members), (1, ZERO_HASH, "create", ("alice", "bob")))
        self.assertEqual((self.one.actor, self.one.actor_device), ("alice", self.alice.id))
        self.assertEqual(self.state.seen, (1, self.one.hash()))
        self.assertEqual((self.state.members, self.state.kind, self.state.title), ({"alice", "bob"}, "group", ""))
        direct = membership.create(2, "direct", "", ["alice", "bob"], self.bob)  # the actor is added once
        self.assertEqual(MembershipState(2).extend([direct], self.lookup).members, {"alice", "bob"})

    def test_create_add_leave(self):
        two = membership.add(self.one, ["dave", "carol"], self.bob)
        self.assertEqual((two.epoch, two.prev, two.op, two.actor), (2, self.one.hash(), "add", "bob"))
        self.assertEqual(two.members, ("alice", "bob", "carol", "dave"))
        state = self.state.extend([two], self.lookup)
        three = membership.leave(two, self.phone)  # another current device of a member
        state = state.extend([three], self.lookup)
        self.assertEqual((state.seen, state.members), ((3, three.hash()), {"bob", "carol", "dave"}))
        self.assertEqual(state.members_hash, three.hash())

    def test_round_trip(self):
        state = membership.add(self.one, ["carol"], self.bob)
        self.assertEqual(State.from_bytes(state.to_bytes()), state)
        self.assertEqual(state.hash(), hashlib.sha256(b"securechatd/membership-hash/v1" + state.to_bytes()).digest())

    def test_incremental_is_the_same_as_at_once(self):
        states, verified = [self.one], self.state
        for build in (
            lambda s: membership.add(s, ["carol"], self.bob),
            lambda s: membership.add(s, ["dave", "erin"], self.carol),
            lambda s: membership.leave(s, self.alice),
            lambda s: membership.leave(s, self.bob),
        ):
            states.append(build(states[-1]))
            verified = verified.extend(states[-1:], self.lookup)
        at_once = verify_membership(1, [State.from_bytes(s.to_bytes()) for s in states], self.lookup)
        from_seen = verify_membership(1, states[:2], self.lookup).extend(states[2:], self.lookup)
        with_seen = verify_membership(1, states, self.lookup, seen=(3, states[2].hash()))
        for other in (at_once, from_seen, with_seen):
            self.assertEqual((other.seen, other.members), (verified.seen, verified.members))
            self.assertEqual(dict(other.verified), dict(verified.verified))
        self.assertEqual(verified.members, {"carol", "dave", "erin"})

    def test_continue_from_a_state_verified_before(self):
        """MembershipState(conversation, latest) picks up from a state kept earlier (the server's, a client's)."""
        kept = MembershipState(1, self.one)
        self.assertEqual((kept.seen, kept.members), (self.state.seen, self.state.members))
        two = membership.add(self.one, ["carol"], self.bob)
        self.assertEqual(kept.extend([two], self.lookup).members, {"alice", "bob", "carol"})

    def test_only_the_named_device_signs(self):
        self.assertRaises(ValueError, sign_state, self.one, self.phone)
        self.assertRaises(ValueError, sign_state, self.one, self.bob)

    def test_builders_refuse_malformed_states(self):
        self.assertRaises(Malformed, membership.create, 1, "direct", "", ["bob", "carol"], self.alice)  # three members
        self.assertRaises(Malformed, membership.create, 1, "group", "x" * 201, ["bob"], self.alice)
        self.assertRaises(Malformed, membership.create, 1, "group", "", ["Bob"], self.alice)
        self.assertRaises(Malformed, membership.create, 1, "channel", "", ["bob"], self.alice)
        self.assertRaises(Malformed, membership.add, self.one, ["x"], self.bob)

    def test_members_at(self):
        two = membership.add(self.one, ["carol"], self.bob)
        three = membership.leave(two, self.alice)
        state = self.state.extend([two, three], self.lookup)
        self.assertTrue(state.is_member_at(self.one.hash(), "alice"))
        self.assertFalse(state.is_member_at(self.one.hash(), "carol"))
        self.assertTrue(state.is_member_at(two.hash(), "carol"))
        self.assertFalse(state.is_member_at(three.hash(), "alice"))  # after alice left, no message is hers to send
        self.assertIsNone(state.members_at(bytes(32)))
        self.assertFalse(state.is_member_at(bytes(32), "bob"))  # a state never verified here: fetch, then ask again
        self.assertFalse(state.is_member_at(membership.add(self.one, ["mallory"], self.bob).hash(), "mallory"))

    def test_nothing_verified_yet(self):
        empty = MembershipState(1)
        self.assertEqual((empty.seen, empty.members, empty.latest), ((0, ZERO_HASH), frozenset(), None))
        self.assertRaises(ValueError, getattr, empty, "members_hash")
        self.assertFalse(empty.is_member_at(self.one.hash(), "alice"))

    def test_the_last_member_leaves(self):
        state = self.state.extend([membership.leave(self.one, self.alice)], self.lookup)
        state = state.extend([membership.leave(state.latest, self.bob)], self.lookup)
        self.assertEqual(state.members, frozenset())
        self.assertBreaks(NotAMember, state, [membership.add(state.latest, ["bob"], self.bob)])


class RuleTests(Conversation):
    """One test per rule of docs/E2EE.md, in the order they are checked; each asserts the error class that names it."""

    def test_wrong_conversation(self):
        self.assertBreaks(WrongConversation, MembershipState(2), [self.one])
        two = membership.add(self.one, ["carol"], self.bob)
        self.assertBreaks(WrongConversation, self.state, [self.signed(two, self.bob, conversation=2)])

    def test_gap(self):
        two = membership.add(self.one, ["carol"], self.bob)
        three = membership.add(two, ["dave"], self.bob)
        error = self.assertBreaks(Gap, self.state, [three])
        self.assertIn("state 3 came where state 2 belongs", str(error))
        self.assertBreaks(Gap, self.state.extend([two], self.lookup), [two])  # a state already taken in
        self.assertBreaks(Gap, MembershipState(1), [two])
        self.assertBreaks(Gap, MembershipState(1), [self.signed(self.one, self.alice, epoch=0)])

    def test_fork_prev_not_the_hash_before(self):
        """Two states for one epoch: what follows the other one does not extend what was seen."""
        mine = self.state.extend([membership.add(self.one, ["carol"], self.bob)], self.lookup)
        theirs = membership.add(self.one, ["dave"], self.alice)
        self.assertBreaks(Fork, mine, [membership.add(theirs, ["erin"], self.alice)])
        self.assertBreaks(Gap, mine, [theirs])  # epoch 2 is taken: a state for it again is not the next one
        self.assertBreaks(Fork, MembershipState(1), [self.signed(self.one, self.alice, prev=bytes([1]) * 32)])

    def test_fork_against_what_was_seen(self):
        """States rewritten under a seen state, or cut short of it, are a fork alarm."""
        two = membership.add(self.one, ["carol"], self.bob)
        rewritten = membership.add(self.one, ["dave"], self.bob)
        self.assertRaises(Fork, verify_membership, 1, [self.one, rewritten], self.lookup, seen=(2, two.hash()))
        error = self.assertRaises(Fork, verify_membership, 1, [self.one], self.lookup, seen=(2, two.hash()))
        self.assertIn("end before state 2", str(error))
        other_first = membership.create(1, "group", "", ["carol"], self.alice)
        self.assertRaises(Fork, verify_membership, 1, [other_first], self.lookup, seen=(1, self.one.hash()))
        self.assertEqual(verify_membership(1, [self.one, two], self.lookup, seen=(1, self.one.hash())).epoch, 2)

    def test_first_state_is_a_create_by_a_member(self):
        empty = MembershipState(1)
        self.assertBreaks(BadFirstState, empty, [self.signed(self.one, self.alice, op="add")])
        self.assertBreaks(BadFirstState, empty, [self.signed(self.one, self.alice, op="leave")])
        self.assertBreaks(BadFirstState, empty, [self.signed(self.one, self.alice, members=("bob", "mallory"))])

    def test_created_once(self):
        two = membership.add(self.one, ["carol"], self.bob)
        self.assertBreaks(Recreated, self.state, [self.signed(two, self.bob, op="create")])

    def test_kind_kept(self):
        three = membership.add(self.one, ["carol"], self.bob)
        state = self.state.extend([three], self.lookup)
        as_direct = self.signed(membership.leave(three, self.alice), self.alice, kind="direct")  # direct-shaped
        self.assertBreaks(KindChanged, state, [as_direct])

    def test_title_kept(self):
        two = membership.add(self.one, ["carol"], self.bob)
        self.assertBreaks(TitleChanged, self.state, [self.signed(two, self.bob, title="new")])

    def test_only_a_member_adds_or_leaves(self):
        self.assertBreaks(NotAMember, self.state, [membership.add(self.one, ["carol"], self.carol)])
        self.assertBreaks(NotAMember, self.state, [membership.leave(self.one, self.carol)])

    def test_an_add_adds(self):
        self.assertBreaks(BadAdd, self.state, [membership.add(self.one, [], self.bob)])
        self.assertBreaks(BadAdd, self.state, [membership.add(self.one, ["alice"], self.bob)])
        swapped = self.signed(membership.add(self.one, ["carol"], self.bob), self.bob, members=("bob", "carol"))
        self.assertBreaks(BadAdd, self.state, [swapped])

    def test_a_leave_removes_the_actor_only(self):
        leave = membership.leave(self.one, self.alice)
        self.assertBreaks(BadLeave, self.state, [self.signed(leave, self.alice, members=())])  # bob removed too
        self.assertBreaks(BadLeave, self.state, [self.signed(leave, self.alice, members=("bob", "carol"))])
        self.assertBreaks(BadLeave, self.state, [self.signed(leave, self.alice, members=("alice", "bob"))])

    def test_direct_conversations_neither_add_nor_leave(self):
        """A direct state has two members and no title (Malformed otherwise): an add or leave there changes nothing."""
        direct = membership.create(2, "direct", "", ["bob"], self.alice)
        state = MembershipState(2).extend([direct], self.lookup)
        self.assertRaises(Malformed, membership.add, direct, ["carol"], self.alice)
        self.assertRaises(Malformed, membership.leave, direct, self.alice)
        self.assertBreaks(BadAdd, state, [membership.add(direct, [], self.alice)])
        unchanged = State(2, 2, direct.hash(), "leave", "direct", "", ("alice", "bob"), "alice", self.alice.id)
        self.assertBreaks(BadLeave, state, [sign_state(unchanged, self.alice)])

    def test_actor_device_is_current(self):
        two = membership.add(self.one, ["carol"], self.bob)
        unknown = Device.generate("bob")  # never in bob's chain
        self.assertBreaks(UnknownActorDevice, self.state, [membership.add(self.one, ["carol"], unknown)])
        no_chain_for_bob = chain_lookup({"alice": self.chains["alice"]})
        self.assertBreaks(UnknownActorDevice, self.state, [two], lookup=no_chain_for_bob)
        another_device = lambda user, device: self.alice.keys  # noqa: E731 (a lookup that answers for the wrong device)
        self.assertBreaks(UnknownActorDevice, self.state, [two], lookup=another_device)
        self.revoke(self.phone)
        self.assertBreaks(UnknownActorDevice, self.state, [membership.add(self.one, ["carol"], self.phone)])

    def test_signature(self):
        two = membership.add(self.one, ["carol"], self.bob)
        self.assertBreaks(BadSignature, self.state, [replace(two, signature=bytes(64))])
        for signature in (
            bytes(64),
            self.carol.sign(membership.SIGN_LABEL, two.fields()),
            self.bob.sign(chain.LINK_LABEL, two.fields()),  # bob's, under another label
        ):
            self.assertBreaks(BadSignature, self.state, [replace(two, signature=signature)])
        self.assertBreaks(BadSignature, self.state, [replace(two, members=("alice", "bob", "dave"))])  # changed since
        by_alice = membership.add(self.one, ["carol"], self.alice)
        by_phone = replace(by_alice, signature=self.phone.sign(membership.SIGN_LABEL, by_alice.fields()))
        self.assertBreaks(BadSignature, self.state, [by_phone])  # alice's other device: the state names her first

    def test_a_bad_state_in_a_batch_changes_nothing(self):
        two = membership.add(self.one, ["carol"], self.bob)
        three = membership.add(two, ["mallory"], self.mallory)
        error = self.assertBreaks(NotAMember, self.state, [two, three])
        self.assertEqual(error.epoch, 3)

    def test_malformed_state(self):
        two = membership.add(self.one, ["carol"], self.bob)
        for bad in (
            replace(two, title="ü" * 101),  # 202 bytes, 101 characters
            replace(two, op="remove"),
            replace(two, kind="channel"),
            replace(two, members=("bob", "alice", "carol")),  # not sorted
            replace(two, members=("alice", "bob", "bob", "carol")),
            replace(two, members=("alice", "bob", "Carol")),
            replace(two, members=("alice", "bob", "ca")),
            replace(two, members=("alice", "bob", "c" * 33)),
            replace(two, members=("alice", "bob", "carol", "9lives")),
            replace(two, members=("alice", "bob", "carol", "dave eve")),
            replace(two, members=tuple(f"user{i:04}" for i in range(1001))),
            replace(two, actor="Bob"),
            replace(two, actor_device=two.actor_device[:15]),
            replace(two, prev=b""),
            replace(two, signature=b""),
            replace(two, kind="direct"),  # three members
            replace(self.one, kind="direct", title="us"),  # a title
        ):
            self.assertRaises(Malformed, self.state.extend, [bad], self.lookup)
            self.assertRaises(Malformed, State.from_bytes, bad.to_bytes())
        for bad in (replace(two, epoch=-1), replace(two, epoch=1 << 64), replace(two, conversation=1 << 64)):
            self.assertRaises(Malformed, self.state.extend, [bad], self.lookup)
        self.assertEqual(len(State.from_bytes(replace(two, title="ü" * 100).to_bytes()).title), 100)  # 200 bytes: fits

    def test_malformed_bytes(self):
        good = self.one.to_bytes()
        numbers = [struct.pack(">Q", 1), struct.pack(">Q", 1), ZERO_HASH]
        parts = numbers + [b"create", b"group", b"", enc(["alice", "bob"]), b"alice", self.alice.id, self.one.signature]
        self.assertEqual(enc(parts), good)
        for at, value in (
            (0, b"\x00" * 7 + b"\x01" + b"\x00"),  # a 9-byte number
            (1, b"\x01"),
            (5, b"\xff"),  # a title that is not UTF-8
            (6, enc([b"alice", "bob\u00e9".encode("utf-8")])),  # a name that is not ASCII
            (6, b"\x00\x00\x00\x09alice"),  # members that do not parse
            (7, "al\u00efce".encode("utf-8")),
        ):
            self.assertRaises(Malformed, State.from_bytes, enc(parts[:at] + [value] + parts[at + 1 :]))
        self.assertRaises(Malformed, State.from_bytes, enc(parts[:-1]))
        self.assertRaises(Malformed, State.from_bytes, good + length(b""))


class ServerInjectionTests(Conversation):
    """A member the server adds on its own is refused, whatever it signs with, and the members stay what they were."""

    def assertInjectionRefused(self, error, state):
        self.assertBreaks(error, self.state, [state])
        self.assertNotIn("mallory", self.state.members)
        self.assertRaises(error, verify_membership, 1, [self.one, State.from_bytes(state.to_bytes())], self.lookup)

    def test_signed_by_a_non_member(self):
        """mallory has a current device of her own: she is still no member, so her add is not one."""
        self.assertInjectionRefused(NotAMember, membership.add(self.one, ["mallory"], self.mallory))

    def test_signed_by_a_revoked_device(self):
        """alice's phone was stolen and revoked: its key signs no more states."""
        add = membership.add(self.one, ["mallory"], self.phone)
        self.state.extend([add], self.lookup)  # accepted while the phone was current
        self.revoke(self.phone)
        self.assertInjectionRefused(UnknownActorDevice, add)

    def test_signed_by_an_unknown_device(self):
        """The server's own key, named as a device of alice: not in her verified chain."""
        server_key = Device.generate("alice")
        self.assertInjectionRefused(UnknownActorDevice, membership.add(self.one, ["mallory"], server_key))

    def test_an_add_the_actor_could_not_sign(self):
        """The server names alice's real device but has no signature of hers: its own or hers on another state fails."""
        add = membership.add(self.one, ["carol"], self.alice)
        forged = replace(add, members=("alice", "bob", "mallory"))
        self.assertInjectionRefused(BadSignature, forged)
        self.assertInjectionRefused(BadSignature, replace(forged, signature=self.one.signature))
        by_mallory = self.mallory.sign(membership.SIGN_LABEL, forged.fields())
        self.assertInjectionRefused(BadSignature, replace(forged, signature=by_mallory))


class SeenTests(Conversation):
    """A client keeps (epoch, hash) of what it verified; checked again, those states need no device still current."""

    def test_states_seen_stay_valid_after_their_device_is_revoked(self):
        two = membership.add(self.one, ["carol"], self.phone)
        three = membership.add(two, ["dave"], self.bob)
        verified = self.state.extend([two, three], self.lookup)
        self.revoke(self.phone)
        self.assertRaises(UnknownActorDevice, verify_membership, 1, [self.one, two, three], self.lookup)  # from scratch
        again = verify_membership(1, [self.one, two, three], self.lookup, seen=verified.seen)
        self.assertEqual((again.seen, again.members), (verified.seen, verified.members))
        after = verify_membership(1, [self.one, two], self.lookup, seen=(2, two.hash())).extend([three], self.lookup)
        self.assertEqual(after.seen, verified.seen)
        four = membership.add(three, ["erin"], self.phone)
        states = [self.one, two, three, four]
        self.assertRaises(UnknownActorDevice, verify_membership, 1, states, self.lookup, seen=verified.seen)

    def test_states_seen_are_still_checked_in_order(self):
        """Only the devices and signatures of the states up to the seen one are taken as checked, not the rest."""
        two = membership.add(self.one, ["carol"], self.bob)
        self.assertRaises(Gap, verify_membership, 1, [two, two], self.lookup, seen=(2, two.hash()))


class FlippedByteTests(unittest.TestCase):
    """Any byte of a valid state changed: parsing (Malformed) or verification (a MembershipError) fails there."""

    def assertRefused(self, index, position, mask):
        data = bytearray(GOLDEN_STATES[index].to_bytes())
        data[position] ^= mask
        try:
            state = State.from_bytes(bytes(data))
        except Malformed:
            return
        before = verify_membership(GOLDEN["conversation"], GOLDEN_STATES[:index], GOLDEN_LOOKUP)
        self.assertRaises(MembershipError, before.extend, [state], GOLDEN_LOOKUP)

    def test_every_byte(self):
        for index, state in enumerate(GOLDEN_STATES):
            for position in range(len(state.to_bytes())):
                self.assertRefused(index, position, 0x01)

    @settings(max_examples=300, deadline=None)
    @given(st.data())
    def test_any_change(self, data):
        index = data.draw(st.integers(0, len(GOLDEN_STATES) - 1))
        position = data.draw(st.integers(0, len(GOLDEN_STATES[index].to_bytes()) - 1))
        self.assertRefused(index, position, data.draw(st.integers(1, 255)))


class HistoryTests(Conversation):
    """A device revoked after it signed a state: a member added later still verifies that state."""

    def test_a_later_member_verifies_a_state_signed_by_a_device_revoked_since(self):
        two = membership.add(self.one, ["carol"], self.phone)  # alice's phone adds carol
        self.revoke(self.phone)  # then the phone is lost and revoked
        three = membership.add(two, ["mallory"], self.bob)  # bob, on a current device, adds mallory
        current, history = chain_lookup(self.chains), chain_lookup(self.chains, former=True)
        with self.assertRaises(UnknownActorDevice):  # with current devices only: the phone's state cannot be checked
            verify_membership(1, [self.one, two, three], current)
        verified = verify_membership(1, [self.one, two, three], current, history_lookup=history)
        self.assertEqual(verified.members, {"alice", "bob", "carol", "mallory"})

    def test_the_newest_state_must_still_be_signed_by_a_current_device(self):
        self.revoke(self.phone)
        history = chain_lookup(self.chains, former=True)
        by_lost_phone = membership.add(self.one, ["mallory"], self.phone)
        raised = self.assertRaises(
            UnknownActorDevice, self.state.extend, [by_lost_phone], chain_lookup(self.chains), history
        )
        self.assertIn("not a current device", str(raised))
