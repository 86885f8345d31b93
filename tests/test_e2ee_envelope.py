"""Envelopes: padding, fan-out to every device, the key commitment, context binding, each failure's own error."""

import json
import os
from dataclasses import replace

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from twisted.trial import unittest

from securechatd.e2ee.encoding import Malformed, digest, enc
from securechatd.e2ee.envelope import (
    ATTESTABLE,
    DENIABLE,
    SUITE,
    BadBody,
    BadMessageSignature,
    BadPadding,
    Header,
    KeyCommitmentMismatch,
    Unsigned,
    check_signature,
    commitment,
    pad,
    seal,
    sign_message,
    unpad,
    unseal,
)
from securechatd.e2ee.keys import Prekey
from securechatd.e2ee.transcript import genesis
from securechatd.e2ee.ratchet import BadMessage
from securechatd.e2ee.session import Session
from tests.test_e2ee_ratchet import Party, flipped
from tests.test_e2ee_x3dh import VECTORS, bundle_of, fixed_device, fixed_x25519, private_hex

MEMBERS = digest("securechatd/members/v1", [b"a membership state"])
TIME = 1_700_000_000_000


def send(sender, recipients, plaintext=b"hello", conversation=1, counter=1, key=None, wrap=None):
    """`sender`'s envelope to the `recipients` Parties, wrapped through its sessions (or `wrap`)."""
    by_id = {recipient.id: recipient for recipient in recipients}
    wrap = wrap or (lambda device, key, context: sender.send(by_id[device], key, context))
    return seal(plaintext, conversation, MEMBERS, sender.device.user, sender.id, counter, TIME, list(by_id), wrap, key)


def receive(receiver, sender, envelope, header=None, wrap=None, body=None):
    """What `receiver` reads of `envelope`, as the client will: parse the header, then unseal through the session."""
    header = Header.from_bytes(envelope.header if header is None else header)
    return unseal(
        header,
        envelope.body if body is None else body,
        envelope.wraps[receiver.id] if wrap is None else wrap,
        receiver.id,
        lambda wrap, context, check: receiver.receive(sender, wrap, context, check),
    )


def golden():
    """Alice's envelope to two devices (Bob's bundle has a one-time prekey, Carol's has none), fixed throughout."""
    alice, bob, carol = (fixed_device(user) for user in ("alice", "bob", "carol"))
    bundles = {
        bob.id: bundle_of(bob, bob.signed_prekey(7, fixed_x25519("bob/spk/7")), Prekey(3, fixed_x25519("bob/opk/3"))),
        carol.id: bundle_of(carol, carol.signed_prekey(5, fixed_x25519("carol/spk/5"))),
    }
    sessions = {}
    for device, bundle in bundles.items():
        sessions[device] = Session()
        names = iter((f"envelope/ek/{bundle.keys.user}", f"envelope/ratchet/{bundle.keys.user}"))
        sessions[device].initiate(alice.keys, alice.dh_private, bundle, lambda: fixed_x25519(next(names)))
    key = bytes.fromhex("4b" * 32)
    envelope = seal(
        b"Hello, Bob and Carol",
        42,
        MEMBERS,
        "alice",
        alice.id,
        1,
        TIME,
        [bob.id, carol.id],
        lambda device, key, context: sessions[device].encrypt(key, context),
        key,
        mode=ATTESTABLE,
        prev=(0, genesis(42)),
        signer=alice,
    )
    named = {
        f"{device.user}/{kind}": private_hex(getattr(device, kind + "_private"))
        for device in (alice, bob, carol)
        for kind in ("sig", "dh")
    }
    for name in ("bob/spk/7", "bob/opk/3", "carol/spk/5"):
        named[name] = private_hex(fixed_x25519(name))
    for user in ("bob", "carol"):
        for kind in ("ek", "ratchet"):
            named[f"envelope/{kind}/{user}"] = private_hex(fixed_x25519(f"envelope/{kind}/{user}"))
    return {
        "about": "docs/E2EE.md, Encrypted messages: Alice's first envelope to Bob (bundle: spk 7, opk 3) and Carol"
        " (spk 5, no opk), each wrap a first message made with EK envelope/ek/<user>"
        " and ratchet key envelope/ratchet/<user>; attestable, signed by alice's device, sent at chain head"
        " (0, e_0 of conversation 42)",
        "private_keys": named,
        "key": key.hex(),
        "plaintext": "Hello, Bob and Carol",
        "conversation": 42,
        "members": MEMBERS.hex(),
        "counter": 1,
        "client_time": TIME,
        "mode": ATTESTABLE,
        "prev_n": 0,
        "prev_e": genesis(42).hex(),
        "header": envelope.header.hex(),
        "header_hash": Header.from_bytes(envelope.header).digest().hex(),
        "body": envelope.body.hex(),
        "signature": envelope.signature.hex(),
        "wraps": {device.hex(): wrap.hex() for device, wrap in envelope.wraps.items()},
    }


class PaddingTests(unittest.TestCase):
    def test_buckets_double_from_256(self):
        for size, bucket in ((0, 256), (255, 256), (256, 512), (511, 512), (512, 1024), (5000, 8192)):
            padded = pad(b"x" * size)
            self.assertEqual(len(padded), bucket)
            self.assertEqual(padded[size:], b"\x80" + bytes(bucket - size - 1))
            self.assertEqual(unpad(padded), b"x" * size)

    def test_what_pad_cannot_have_made_is_refused(self):
        for bad in (b"", b"x\x80" + bytes(298), bytes(256), b"x\x80\x01" + bytes(253), pad(b"x")[:-1]):
            self.assertRaises(BadPadding, unpad, bad)


class HeaderTests(unittest.TestCase):
    def header(self, **fields):
        values = dict(
            conversation=7, members=MEMBERS, sender="alice", sender_device=bytes(16), counter=3, client_time=TIME,
            mode=ATTESTABLE, prev_n=4, prev_e=bytes(range(32)), kc=commitment(bytes(32)),
        )
        return Header(**{**values, **fields})

    def test_round_trip_is_canonical(self):
        for mode in (ATTESTABLE, DENIABLE):
            header = self.header(sender="zoë", mode=mode)
            data = header.to_bytes()
            self.assertEqual(Header.from_bytes(data), header)
            self.assertEqual(Header.from_bytes(data).to_bytes(), data)
            sizes = (len(SUITE), 8, 32, len("zoë".encode()), 16, 8, 8, len(mode), 8, 32, 32)
            self.assertEqual(len(data), 11 * 4 + sum(sizes))

    def test_a_header_of_another_shape_is_malformed(self):
        fields = self.header().fields()
        for at, value in ((0, "securechatd-e2ee-v2"), (1, b"1234567"), (2, bytes(31)), (3, b"\xff"), (4, bytes(15)),
                          (5, bytes(9)), (6, b""), (7, "signed"), (7, b"\xff"), (8, bytes(7)), (9, bytes(31)),
                          (10, bytes(33))):
            self.assertRaises(Malformed, Header.from_bytes, enc(fields[:at] + [value] + fields[at + 1 :]))
        self.assertRaises(Malformed, Header.from_bytes, enc(fields[:-1]))
        self.assertRaises(Malformed, self.header, counter=-1)
        self.assertRaises(Malformed, self.header, conversation=1 << 64)
        self.assertRaises(Malformed, self.header, prev_n=1 << 64)
        self.assertRaises(Malformed, self.header, mode="Attestable")


class EnvelopeTests(unittest.TestCase):
    def setUp(self):
        self.alice, self.laptop, self.bob, self.carol = Party("alice"), Party("alice"), Party("bob"), Party("carol")
        self.others = (self.laptop, self.bob, self.carol)

    def converse(self):
        """A first envelope each way, so later wraps are plain ratchet messages."""
        first = send(self.alice, self.others)
        for device in self.others:
            receive(device, self.alice, first)
            receive(self.alice, device, send(device, [self.alice]))

    def test_every_device_reads_it_the_senders_other_devices_too(self):
        envelope = send(self.alice, self.others, b"hi all")
        self.assertEqual({len(wrap) for wrap in envelope.wraps.values()}, {129})
        for device in self.others:
            self.assertEqual(receive(device, self.alice, envelope), b"hi all")
            receive(self.alice, device, send(device, [self.alice]))
        envelope = send(self.alice, self.others, b"again", counter=2)
        self.assertEqual({len(wrap) for wrap in envelope.wraps.values()}, {89})
        self.assertEqual([receive(device, self.alice, envelope) for device in self.others], [b"again"] * 3)

    def test_sizes(self):
        envelope = send(self.alice, [self.bob], b"x" * 300)
        self.assertEqual(len(envelope.header), 217 + len("alice"))  # attestable; deniable is 2 bytes shorter
        self.assertEqual(len(envelope.body), 512 + 16)

    def test_a_fresh_key_every_time(self):
        one, two = send(self.alice, [self.bob]), send(self.alice, [self.bob])
        self.assertNotEqual(Header.from_bytes(one.header).kc, Header.from_bytes(two.header).kc)
        self.assertNotEqual(one.body, two.body)

    def test_recipients_shown_different_keys_raise_the_alarm(self):
        self.converse()
        def lying(device, key, context):  # Carol is sent another key than the header commits to
            if device == self.bob.id:
                return self.alice.send(self.bob, key, context)
            return self.alice.send(self.carol, bytes(32), context)

        envelope = send(self.alice, [self.bob, self.carol], wrap=lying)
        self.assertEqual(receive(self.bob, self.alice, envelope), b"hello")
        saved = self.carol.saved[self.alice.id]
        self.assertRaises(KeyCommitmentMismatch, receive, self.carol, self.alice, envelope)
        self.assertEqual(self.carol.saved[self.alice.id], saved)
        self.assertEqual(receive(self.carol, self.alice, send(self.alice, [self.carol], b"next")), b"next")

    def test_a_corrupted_header_body_or_wrap_fails_with_its_step_and_changes_nothing(self):
        self.converse()
        envelope = send(self.alice, [self.bob])
        saved = self.bob.saved[self.alice.id]
        for at in range(len(envelope.header)):
            # a header that no longer parses, or one the wrap's context no longer matches
            header = flipped(envelope.header, at)
            self.assertRaises((Malformed, BadMessage), receive, self.bob, self.alice, envelope, header=header)
        for at in range(len(envelope.body)):
            self.assertRaises(BadBody, receive, self.bob, self.alice, envelope, body=flipped(envelope.body, at))
        self.assertRaises(BadBody, receive, self.bob, self.alice, envelope, body=envelope.body[:-1])
        wrap = envelope.wraps[self.bob.id]
        for at in (0, 5, 40, 60, 88):
            self.assertRaises((Malformed, BadMessage), receive, self.bob, self.alice, envelope, wrap=flipped(wrap, at))
        self.assertEqual(self.bob.saved[self.alice.id], saved)
        self.assertEqual(receive(self.bob, self.alice, envelope), b"hello")

    def test_a_wrap_replayed_into_another_conversation_fails(self):
        self.converse()
        first = send(self.alice, [self.bob], b"one", conversation=1)
        second = send(self.alice, [self.bob], b"two", conversation=2)
        moved = replace(Header.from_bytes(first.header), conversation=2)
        self.assertRaises(BadMessage, receive, self.bob, self.alice, first, header=moved.to_bytes())
        self.assertRaises(BadMessage, receive, self.bob, self.alice, second, wrap=first.wraps[self.bob.id])
        self.assertEqual(receive(self.bob, self.alice, second), b"two")
        self.assertEqual(receive(self.bob, self.alice, first), b"one")

    def test_a_wrap_given_to_another_device_fails(self):
        self.converse()
        envelope = send(self.alice, [self.bob, self.carol, self.laptop])
        self.assertRaises(BadMessage, receive, self.carol, self.alice, envelope, wrap=envelope.wraps[self.bob.id])
        self.assertRaises(BadMessage, receive, self.laptop, self.alice, envelope, wrap=envelope.wraps[self.bob.id])
        for device in (self.bob, self.carol, self.laptop):
            self.assertEqual(receive(device, self.alice, envelope), b"hello")

    def test_golden_vector(self):
        with open(os.path.join(VECTORS, "golden_envelope.json")) as f:
            frozen = json.load(f)
        self.assertEqual(golden(), frozen)
        alice = fixed_device("alice")
        for user, spk_id, opk in (("bob", 7, Prekey(3, fixed_x25519("bob/opk/3"))), ("carol", 5, None)):
            device = fixed_device(user)
            header = Header.from_bytes(bytes.fromhex(frozen["header"]))
            accepted = unseal(
                header,
                bytes.fromhex(frozen["body"]),
                bytes.fromhex(frozen["wraps"][device.id.hex()]),
                device.id,
                lambda wrap, context, check: Session().accept(
                    device.keys,
                    device.dh_private,
                    alice.keys,
                    wrap,
                    context,
                    {spk_id: fixed_x25519(f"{user}/spk/{spk_id}")}.get,
                    {3: opk.private}.get if opk else {}.get,
                    check,
                ),
            )
            self.assertEqual(accepted, (b"Hello, Bob and Carol", opk.id if opk else 0))


class SignatureTests(unittest.TestCase):
    """Attestable messages carry the sender device's signature over header and body; deniable ones carry none."""

    def setUp(self):
        self.alice, self.bob = Party("alice"), Party("bob")

    def sealed(self, mode=ATTESTABLE, signer=True):
        return seal(
            b"we agree", 3, MEMBERS, "alice", self.alice.id, 1, TIME, [], None, mode=mode, prev=(2, bytes(32)),
            signer=self.alice.device if signer else None,
        )

    def test_an_attestable_message_is_signed_and_checks(self):
        envelope = self.sealed()
        header = Header.from_bytes(envelope.header)
        self.assertEqual((header.mode, header.prev_n, header.prev_e), (ATTESTABLE, 2, bytes(32)))
        self.assertEqual(len(envelope.signature), 64)
        self.assertEqual(envelope.signature, sign_message(self.alice.device, header, envelope.body))
        check_signature(header, envelope.body, envelope.signature, self.alice.device.keys)

    def test_a_changed_header_body_or_signature_or_another_device_fails(self):
        envelope = self.sealed()
        header = Header.from_bytes(envelope.header)
        keys = self.alice.device.keys
        for changed in (replace(header, counter=2), replace(header, prev_n=1), replace(header, mode=DENIABLE)):
            self.assertRaises(BadMessageSignature, check_signature, changed, envelope.body, envelope.signature, keys)
        for at in (0, 100, len(envelope.body) - 1):
            body = flipped(envelope.body, at)
            self.assertRaises(BadMessageSignature, check_signature, header, body, envelope.signature, keys)
        for at in (0, 63):
            signature = flipped(envelope.signature, at)
            self.assertRaises(BadMessageSignature, check_signature, header, envelope.body, signature, keys)
        bob = self.bob.device.keys
        self.assertRaises(BadMessageSignature, check_signature, header, envelope.body, envelope.signature, bob)
        self.assertRaises(ValueError, sign_message, self.bob.device, header, envelope.body)

    def test_unsigned_attestable_and_signed_deniable_are_refused(self):
        unsigned = self.sealed(signer=False)
        header = Header.from_bytes(unsigned.header)
        self.assertRaises(Unsigned, check_signature, header, unsigned.body, b"", self.alice.device.keys)
        deniable = self.sealed(mode=DENIABLE)
        self.assertEqual(deniable.signature, b"")  # a signer given in deniable mode signs nothing
        header = Header.from_bytes(deniable.header)
        check_signature(header, deniable.body, b"", self.alice.device.keys)
        signature = sign_message(self.alice.device, header, deniable.body)
        self.assertRaises(BadMessageSignature, check_signature, header, deniable.body, signature, self.alice.device.keys)

    def test_the_golden_signature_by_hand(self):
        """sign(alice, "securechatd/message-sig/v1", [conversation, sender, sender_device, H(header), H(body)])."""
        with open(os.path.join(VECTORS, "golden_envelope.json")) as f:
            frozen = json.load(f)
        alice = fixed_device("alice")
        header = Header.from_bytes(bytes.fromhex(frozen["header"]))
        body = bytes.fromhex(frozen["body"])
        self.assertEqual(header.digest().hex(), frozen["header_hash"])
        fields = [header.conversation, "alice", alice.id, header.digest(), digest("securechatd/message-body/v1", [body])]
        signed = b"securechatd/message-sig/v1" + enc(fields)
        Ed25519PublicKey.from_public_bytes(alice.keys.sig_pub).verify(bytes.fromhex(frozen["signature"]), signed)
        check_signature(header, body, bytes.fromhex(frozen["signature"]), alice.keys)

