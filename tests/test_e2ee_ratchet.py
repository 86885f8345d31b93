"""The Double Ratchet and the pairwise Session, scripted as in libsignal's tests with in-memory devices.

Every Party saves its sessions as bytes after each step and loads them back
before the next, so every scenario also checks the saved form.
"""

import hashlib
import json
import os
import random

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from twisted.trial import unittest

from securechatd.e2ee.encoding import Malformed, enc
from securechatd.e2ee.keys import Device, LowOrderKey
from securechatd.e2ee.ratchet import MAX_SKIP, BadMessage, DuplicateMessage, Ratchet, RatchetError, TooManySkipped
from securechatd.e2ee.session import (
    ARCHIVED,
    FIRST_MESSAGE,
    RATCHET_MESSAGE,
    NewSession,
    NoSession,
    Session,
    UnknownPrekey,
)
from tests.test_e2ee_x3dh import VECTORS, bundle_of, fixed_x25519, private_hex

KEY = bytes(range(32))  # what a wrap carries: a 32-byte key


def flipped(data, at):
    """`data` with one bit of byte `at` flipped."""
    return data[:at] + bytes([data[at] ^ 0x04]) + data[at + 1 :]


def public(private):
    return private.public_key().public_bytes_raw()


class Party:
    """One in-memory device: its keys and prekeys, and each session saved as bytes between steps."""

    def __init__(self, user, one_time_prekeys=3):
        self.device = Device.generate(user)
        self.spk = self.device.new_signed_prekey()
        self.opks = {opk.id: opk for opk in self.device.new_one_time_prekeys(one_time_prekeys)}
        self.unclaimed = list(self.opks)  # what the server can still hand out, each once
        self.saved = {}  # peer device id -> Session.to_bytes()

    @property
    def id(self):
        return self.device.id

    @property
    def keys(self):
        return self.device.keys

    def bundle(self):
        opk = self.opks[self.unclaimed.pop(0)] if self.unclaimed else None
        return bundle_of(self.device, self.spk, opk)

    def session(self, peer):
        return Session.from_bytes(self.saved[peer.id]) if peer.id in self.saved else Session()

    def send(self, peer, plaintext=KEY, context=b"context"):
        session = self.session(peer)
        if not session.established:
            session.initiate(self.keys, self.device.dh_private, peer.bundle())
        wrap = session.encrypt(plaintext, context)
        self.saved[peer.id] = session.to_bytes()
        return wrap

    def receive(self, sender, wrap, context=b"context", check=None):
        """Decrypt as the client will: a NewSession goes to accept, whose one-time prekey is then deleted."""
        session = self.session(sender)
        try:
            result = session.decrypt(wrap, context, check)
        except NewSession:
            result, opk_id = session.accept(
                self.keys, self.device.dh_private, sender.keys, wrap, context, self.spk_private, self.opk_private, check
            )
            self.opks.pop(opk_id, None)
        self.saved[sender.id] = session.to_bytes()
        return result

    def refuses(self, test, sender, wrap, error, context=b"context"):
        """Assert that `wrap` fails with `error` and leaves the session, in memory and saved, as it was."""
        before = self.saved.get(sender.id)
        session = self.session(sender)
        test.assertRaises(error, self.receive, sender, wrap, context)
        if before is not None:
            test.assertRaises(error, session.decrypt, wrap, context)
            test.assertEqual(session.to_bytes(), before)
        test.assertEqual(self.saved.get(sender.id), before)

    def spk_private(self, spk_id):
        return self.spk.private if spk_id == self.spk.id else None

    def opk_private(self, opk_id):
        return self.opks[opk_id].private if opk_id in self.opks else None


def golden():
    """The first three messages of a ratchet (two from Alice, Bob's answer after his DH step) from fixed keys."""
    sk = hashlib.sha256(b"securechatd golden ratchet SK").digest()
    ad, context = enc(["alice", "bob"]), enc(["securechatd/wrap/v1", bytes(32), bytes(16)])
    keys = {name: fixed_x25519("ratchet/" + name) for name in ("bob_spk", "alice_ratchet", "bob_ratchet", "alice_next")}
    alice = Ratchet.alice(sk, public(keys["bob_spk"]), keys["alice_ratchet"])
    bob = Ratchet.bob(sk, keys["bob_spk"])
    messages = []
    for sender, receiver, plaintext, next_key in (
        (alice, bob, b"first", "bob_ratchet"),
        (alice, bob, b"second", "bob_ratchet"),
        (bob, alice, b"third", "alice_next"),
    ):
        header, ciphertext = sender.encrypt(plaintext, ad, context)
        decrypted = receiver.decrypt(header, ciphertext, ad, context, new_key=lambda: keys[next_key])
        assert decrypted == plaintext
        messages.append({"plaintext": plaintext.decode(), "header": header.hex(), "ciphertext": ciphertext.hex()})
    return {
        "about": "docs/E2EE.md, Double Ratchet: Alice sends two messages, Bob answers after his DH ratchet step",
        "sk": sk.hex(),
        "ad": ad.hex(),
        "context": context.hex(),
        "private_keys": {name: private_hex(key) for name, key in keys.items()},
        "messages": messages,
    }


class RatchetTests(unittest.TestCase):
    def test_golden_vector(self):
        with open(os.path.join(VECTORS, "golden_ratchet.json")) as f:
            self.assertEqual(golden(), json.load(f))

    def pair(self):
        sk, spk = os.urandom(32), X25519PrivateKey.generate()
        return Ratchet.alice(sk, public(spk)), Ratchet.bob(sk, spk)

    def test_state_round_trips_through_bytes_exactly(self):
        alice, bob = self.pair()
        sent = [alice.encrypt(b"m%d" % n, b"ad", b"") for n in range(5)]
        bob.decrypt(*sent[4], b"ad", b"")  # four skipped keys
        alice.decrypt(*bob.encrypt(b"back", b"ad", b""), b"ad", b"")
        bob.decrypt(*alice.encrypt(b"again", b"ad", b""), b"ad", b"")  # a previous chain
        for state in (alice, bob):
            saved = state.to_bytes()
            self.assertEqual(Ratchet.from_bytes(saved).to_bytes(), saved)
        self.assertEqual((len(bob.skipped), len(bob.previous)), (4, 1))
        self.assertEqual(Ratchet.from_bytes(bob.to_bytes()).decrypt(*sent[2], b"ad", b""), b"m2")

    def test_a_saved_state_of_another_shape_is_malformed(self):
        saved = self.pair()[1].to_bytes()
        for bad in (b"", b"junk", saved[:-1], saved.replace(b"ratchet-state-v1", b"ratchet-state-v9")):
            self.assertRaises(Malformed, Ratchet.from_bytes, bad)

    def test_bob_sends_only_after_receiving(self):
        self.assertRaises(RatchetError, self.pair()[1].encrypt, b"x", b"ad", b"")

    def test_alice_refuses_a_message_under_bobs_signed_prekey(self):
        alice, bob = self.pair()
        header = bob.dhs.public_key().public_bytes_raw() + bytes(8)
        self.assertRaises(BadMessage, alice.decrypt, header, bytes(48), b"ad", b"")

    def test_keys_depend_on_ad_header_and_context(self):
        alice, bob = self.pair()
        header, ciphertext = alice.encrypt(b"x", b"ad", b"context")
        self.assertRaises(BadMessage, bob.decrypt, header, ciphertext, b"AD", b"context")
        self.assertRaises(BadMessage, bob.decrypt, header, ciphertext, b"ad", b"other")
        self.assertRaises(BadMessage, bob.decrypt, header[:-1] + b"\x01", ciphertext, b"ad", b"context")
        self.assertEqual(bob.decrypt(header, ciphertext, b"ad", b"context"), b"x")


class SessionTests(unittest.TestCase):
    def setUp(self):
        self.alice, self.bob = Party("alice"), Party("bob")

    def test_round_trip(self):
        first = self.alice.send(self.bob)
        self.assertEqual((first[0], len(first)), (FIRST_MESSAGE, 129))
        self.assertEqual(self.bob.receive(self.alice, first), KEY)
        self.assertEqual(len(self.bob.opks), 2)  # the one-time prekey it used is gone
        answer = self.bob.send(self.alice)
        self.assertEqual((answer[0], len(answer)), (RATCHET_MESSAGE, 89))
        self.assertEqual(self.alice.receive(self.bob, answer), KEY)
        self.assertEqual(self.alice.send(self.bob)[0], RATCHET_MESSAGE)

    def test_without_a_one_time_prekey(self):
        bob = Party("bob", one_time_prekeys=0)
        first = self.alice.send(bob)
        self.assertEqual(first[37:41], bytes(4))  # opk_id 0
        self.assertEqual(bob.receive(self.alice, first), KEY)
        self.assertEqual(self.alice.receive(bob, bob.send(self.alice, b"hi")), b"hi")

    def test_alice_repeats_the_x3dh_prefix_until_bob_answers_and_bob_takes_them_in_any_order(self):
        wraps = [self.alice.send(self.bob, b"m%d" % n) for n in range(3)]
        self.assertEqual({wrap[:41] for wrap in wraps}, {wraps[0][:41]})
        self.assertEqual([self.bob.receive(self.alice, wraps[n]) for n in (2, 0, 1)], [b"m2", b"m0", b"m1"])
        self.assertEqual(len(self.bob.opks), 2)
        self.alice.receive(self.bob, self.bob.send(self.alice))
        self.assertEqual(self.alice.send(self.bob)[0], RATCHET_MESSAGE)

    def test_a_long_conversation_with_interleaved_ratchet_steps_losses_and_reordering(self):
        rng = random.Random(11)
        parties = (self.alice, self.bob)
        in_flight = {party.id: [] for party in parties}  # per receiver: (plaintext, wrap)
        received = []
        for step in range(400):
            sender = rng.choice(parties)
            receiver = self.bob if sender is self.alice else self.alice
            for burst in range(rng.choice((1, 1, 1, 2, 5))):
                plaintext = b"%s %d.%d" % (sender.device.user.encode(), step, burst)
                in_flight[receiver.id].append((plaintext, sender.send(receiver, plaintext)))
            if rng.random() < 0.7:
                queue = in_flight[sender.id]
                if rng.random() < 0.3:
                    rng.shuffle(queue)
                for plaintext, wrap in queue[: rng.randint(0, len(queue))]:
                    self.assertEqual(sender.receive(receiver, wrap), plaintext)
                    received.append(plaintext)
                    queue.remove((plaintext, wrap))
        for party in parties:
            peer = self.bob if party is self.alice else self.alice
            for plaintext, wrap in in_flight[party.id]:
                self.assertEqual(party.receive(peer, wrap), plaintext)
                received.append(plaintext)
        self.assertEqual(len(received), len(set(received)))
        self.assertGreater(len(received), 600)

    def test_out_of_order_across_ratchet_steps(self):
        old = [self.alice.send(self.bob, b"a%d" % n) for n in range(5)]
        self.assertEqual(self.bob.receive(self.alice, old[4]), b"a4")
        self.alice.receive(self.bob, self.bob.send(self.alice))
        new = self.alice.send(self.bob, b"a5")
        self.assertEqual(self.bob.receive(self.alice, new), b"a5")
        self.assertEqual([self.bob.receive(self.alice, old[n]) for n in (3, 0, 2, 1)], [b"a3", b"a0", b"a2", b"a1"])

    def test_duplicates_are_a_typed_error(self):
        wraps = [self.alice.send(self.bob, b"a%d" % n) for n in range(3)]
        self.bob.receive(self.alice, wraps[2])
        self.bob.receive(self.alice, wraps[0])
        self.bob.refuses(self, self.alice, wraps[2], DuplicateMessage)  # the newest message of the chain
        self.bob.refuses(self, self.alice, wraps[0], DuplicateMessage)  # one decrypted from a skipped key
        self.alice.receive(self.bob, self.bob.send(self.alice))
        answer = self.alice.send(self.bob)
        self.bob.receive(self.alice, answer)
        self.bob.refuses(self, self.alice, answer, DuplicateMessage)
        self.bob.refuses(self, self.alice, wraps[2], DuplicateMessage)  # from a chain before a ratchet step
        self.assertEqual(self.bob.receive(self.alice, wraps[1]), b"a1")  # its skipped key is still there

    def test_more_than_max_skip_is_refused_and_exactly_max_skip_is_not(self):
        wraps = [self.alice.send(self.bob, b"%d" % n) for n in range(MAX_SKIP + 2)]
        self.bob.refuses(self, self.alice, wraps[MAX_SKIP + 1], TooManySkipped)
        self.assertEqual(self.bob.receive(self.alice, wraps[MAX_SKIP]), b"%d" % MAX_SKIP)
        self.assertEqual(self.bob.receive(self.alice, wraps[0]), b"0")
        self.assertEqual(self.bob.receive(self.alice, wraps[MAX_SKIP + 1]), b"%d" % (MAX_SKIP + 1))

    def test_at_most_max_skip_skipped_keys_are_kept_the_oldest_go_first(self):
        wraps = [self.alice.send(self.bob, b"a%d" % n) for n in range(MAX_SKIP + 1)]
        self.bob.receive(self.alice, wraps[MAX_SKIP])  # keys for a0 ... a999 kept
        self.alice.receive(self.bob, self.bob.send(self.alice))
        later = [self.alice.send(self.bob, b"c%d" % n) for n in range(11)]
        self.bob.receive(self.alice, later[10])  # ten more skipped: a0 ... a9 are given up
        for n in range(10):
            self.bob.refuses(self, self.alice, wraps[n], DuplicateMessage)
        self.assertEqual(self.bob.receive(self.alice, wraps[10]), b"a10")
        self.assertEqual(self.bob.receive(self.alice, later[0]), b"c0")

    def test_a_corrupted_wrap_fails_and_leaves_the_session_usable(self):
        self.bob.receive(self.alice, self.alice.send(self.bob))
        self.alice.receive(self.bob, self.bob.send(self.alice))
        wrap = self.alice.send(self.bob)
        for at in range(len(wrap)):
            # a corrupted pn or n may also put the message too far ahead
            expected = Malformed if at == 0 else (BadMessage, TooManySkipped) if at >= 33 else BadMessage
            self.bob.refuses(self, self.alice, flipped(wrap, at), expected)
        self.bob.refuses(self, self.alice, wrap[:56], Malformed)
        self.assertEqual(self.bob.receive(self.alice, wrap), KEY)

    def test_a_corrupted_first_message_fails_with_its_reason(self):
        wrap = self.alice.send(self.bob)
        self.bob.refuses(self, self.alice, flipped(wrap, 1), BadMessage)  # EK_A
        self.bob.refuses(self, self.alice, flipped(wrap, 36), UnknownPrekey)  # spk_id
        self.bob.refuses(self, self.alice, flipped(wrap, 40), UnknownPrekey)  # opk_id
        self.bob.refuses(self, self.alice, flipped(wrap, 100), BadMessage)
        self.assertEqual(len(self.bob.opks), 3)
        self.assertEqual(self.bob.receive(self.alice, wrap), KEY)

    def test_a_wrap_bound_to_another_context_fails(self):
        wrap = self.alice.send(self.bob, context=b"conversation 1")
        self.bob.refuses(self, self.alice, wrap, BadMessage, context=b"conversation 2")
        self.assertEqual(self.bob.receive(self.alice, wrap, context=b"conversation 1"), KEY)

    def test_a_low_order_ratchet_key_is_refused(self):
        self.bob.receive(self.alice, self.alice.send(self.bob))
        self.alice.receive(self.bob, self.bob.send(self.alice))
        wrap = self.alice.send(self.bob)
        self.bob.refuses(self, self.alice, wrap[:1] + bytes(32) + wrap[33:], LowOrderKey)

    def test_without_a_session(self):
        self.bob.receive(self.alice, self.alice.send(self.bob))
        carol = Party("carol")
        self.assertRaises(NoSession, Session().encrypt, KEY, b"")
        carol.refuses(self, self.alice, self.bob.send(self.alice), NoSession)  # a ratchet message: nothing to accept

    def test_a_first_message_for_a_prekey_we_no_longer_hold(self):
        wrap = self.alice.send(self.bob)
        self.bob.opks.clear()
        self.bob.refuses(self, self.alice, wrap, UnknownPrekey)
        bob = Party("bob", one_time_prekeys=0)
        wrap = self.alice.send(bob)
        bob.spk = bob.device.new_signed_prekey()  # rotated, and the old one's private key dropped
        bob.refuses(self, self.alice, wrap, UnknownPrekey)

    def test_a_check_that_fails_leaves_the_session_as_it_was(self):
        class Refused(Exception):
            pass

        def refuse(plaintext):
            raise Refused()

        wrap = self.alice.send(self.bob)
        self.assertRaises(Refused, self.bob.receive, self.alice, wrap, check=refuse)
        self.assertEqual(self.bob.saved, {})
        self.assertEqual(len(self.bob.opks), 3)
        self.assertEqual(self.bob.receive(self.alice, wrap, check=len), 32)
        wrap = self.alice.send(self.bob)
        session = self.bob.session(self.alice)
        before = session.to_bytes()
        self.assertRaises(Refused, session.decrypt, wrap, b"context", refuse)
        self.assertEqual(session.to_bytes(), before)

    def test_simultaneous_starts_converge(self):
        to_bob, to_alice = self.alice.send(self.bob, b"from alice"), self.bob.send(self.alice, b"from bob")
        self.assertEqual(self.bob.receive(self.alice, to_bob), b"from alice")
        self.assertEqual(self.alice.receive(self.bob, to_alice), b"from bob")
        for n in range(4):
            self.assertEqual(self.bob.receive(self.alice, self.alice.send(self.bob, b"a%d" % n)), b"a%d" % n)
            self.assertEqual(self.alice.receive(self.bob, self.bob.send(self.alice, b"b%d" % n)), b"b%d" % n)
        # both now send type 1 messages in one session, whichever began first
        self.assertEqual({self.alice.send(self.bob)[0], self.bob.send(self.alice)[0]}, {RATCHET_MESSAGE})
        current = [party.session(peer)._states[0] for party, peer in ((self.alice, self.bob), (self.bob, self.alice))]
        self.assertEqual(current[0].origin, current[1].origin)

    def test_earlier_states_are_bounded(self):
        for _ in range(ARCHIVED + 3):
            self.alice.saved.clear()  # Alice's device lost its sessions and starts afresh
            self.bob.receive(self.alice, self.alice.send(self.bob))
        saved = self.bob.saved[self.alice.id]
        self.assertEqual(len(Session.from_bytes(saved)._states), ARCHIVED + 1)

    def test_a_saved_session_of_another_shape_is_malformed(self):
        self.alice.send(self.bob)
        saved = self.alice.saved[self.bob.id]
        for bad in (b"", b"junk", saved[:-1], enc([b"securechatd-session-v1", b"x"])):
            self.assertRaises(Malformed, Session.from_bytes, bad)
        self.assertEqual(Session.from_bytes(enc([b"securechatd-session-v1"])).established, False)
