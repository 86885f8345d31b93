"""X3DH: both sides agree, a badly signed prekey and low-order keys are refused, golden vectors hold."""

import hashlib
import json
import os

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from twisted.trial import unittest

from securechatd.e2ee import x3dh
from securechatd.e2ee.keys import BadPrekeySignature, Device, LowOrderKey, Prekey, spk_fields

VECTORS = os.path.join(os.path.dirname(__file__), "vectors")

# u-coordinates of low-order points (and their non-canonical twins): X25519 with any of them is all zero.
LOW_ORDER = [
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000000",
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
]


def fixed_x25519(label):
    """A fixed X25519 private key, so golden vectors can be re-derived."""
    return X25519PrivateKey.from_private_bytes(hashlib.sha256(label.encode()).digest())


def private_hex(key):
    return key.private_bytes_raw().hex()


def fixed_device(user):
    return Device(
        user,
        Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"{user}/sig".encode()).digest()),
        fixed_x25519(f"{user}/dh"),
    )


def device_from(entry):
    """The Device a golden vector's entry describes."""
    return Device(
        entry["user"],
        Ed25519PrivateKey.from_private_bytes(bytes.fromhex(entry["sig_private"])),
        X25519PrivateKey.from_private_bytes(bytes.fromhex(entry["dh_private"])),
    )


def bundle_of(device, spk, opk=None):
    """The bundle a device's spk (and optional opk) make, as the server would hand it out."""
    return x3dh.Bundle(device.keys, spk.id, spk.public, spk.signature, opk.id if opk else 0, opk.public if opk else b"")


def golden():
    """The X3DH golden vector, with and without a one-time prekey: inputs and outputs as hex."""
    alice, bob = fixed_device("alice"), fixed_device("bob")
    spk = bob.signed_prekey(7, fixed_x25519("bob/spk/7"))
    opk = Prekey(3, fixed_x25519("bob/opk/3"))
    ek = fixed_x25519("alice/ek")
    cases = {}
    for name, one_time in (("with_opk", opk), ("without_opk", None)):
        agreement = x3dh.initiate(alice.keys, alice.dh_private, bundle_of(bob, spk, one_time), ek)
        cases[name] = {"opk_id": agreement.opk_id, "sk": agreement.sk.hex(), "ad": agreement.ad.hex()}
    return {
        "about": "docs/E2EE.md, X3DH: Alice's initiate with the keys below; Bob's respond gives the same SK and AD",
        **{
            device.user: {
                "user": device.user,
                "sig_private": private_hex(device.sig_private),
                "dh_private": private_hex(device.dh_private),
            }
            for device in (alice, bob)
        },
        "spk": {"id": 7, "private": private_hex(spk.private), "signature": spk.signature.hex()},
        "opk": {"id": 3, "private": private_hex(opk.private)},
        "ek_private": private_hex(ek),
        "ek_public": ek.public_key().public_bytes_raw().hex(),
        "cases": cases,
    }


class X3DHTests(unittest.TestCase):
    def setUp(self):
        self.alice, self.bob = Device.generate("alice"), Device.generate("bob")
        self.spk = self.bob.new_signed_prekey()
        (self.opk,) = self.bob.new_one_time_prekeys(1)

    def agree(self, opk):
        sent = x3dh.initiate(self.alice.keys, self.alice.dh_private, bundle_of(self.bob, self.spk, opk))
        got = x3dh.respond(
            self.bob.keys, self.bob.dh_private, self.alice.keys, sent.ek, self.spk.private, opk.private if opk else None
        )
        return sent, got

    def test_both_sides_agree_with_a_one_time_prekey(self):
        sent, got = self.agree(self.opk)
        self.assertEqual((sent.sk, sent.ad), (got.sk, got.ad))
        self.assertEqual((sent.spk_id, sent.opk_id), (self.spk.id, self.opk.id))
        self.assertEqual(len(sent.sk), 32)

    def test_both_sides_agree_without_one(self):
        sent, got = self.agree(None)
        self.assertEqual((sent.sk, sent.ad), (got.sk, got.ad))
        self.assertEqual(sent.opk_id, 0)

    def test_the_one_time_prekey_changes_the_secret(self):
        self.assertNotEqual(self.agree(self.opk)[0].sk, self.agree(None)[0].sk)

    def test_ad_binds_both_users_devices_and_identity_keys_in_order(self):
        sent, _ = self.agree(None)
        self.assertEqual(sent.ad, x3dh.associated_data(self.alice.keys, self.bob.keys))
        self.assertNotEqual(sent.ad, x3dh.associated_data(self.bob.keys, self.alice.keys))

    def test_a_badly_signed_prekey_is_refused(self):
        mallory = Device.generate("bob")
        spk = self.spk
        forged = mallory.signed_prekey(spk.id, X25519PrivateKey.generate())
        for bundle in (
            # the server's own prekey, signed by a device that is not bob's
            x3dh.Bundle(self.bob.keys, forged.id, forged.public, forged.signature),
            # bob's signature moved onto another key, or another id
            x3dh.Bundle(self.bob.keys, spk.id, forged.public, spk.signature),
            x3dh.Bundle(self.bob.keys, spk.id + 1, spk.public, spk.signature),
            x3dh.Bundle(self.bob.keys, spk.id, spk.public, bytes(64)),
        ):
            self.assertRaises(BadPrekeySignature, x3dh.initiate, self.alice.keys, self.alice.dh_private, bundle)

    def test_a_low_order_signed_prekey_is_refused_even_when_signed(self):
        for public in map(bytes.fromhex, LOW_ORDER):
            signature = self.bob.sign("securechatd/spk/v1", spk_fields("bob", self.bob.id, 9, public))
            bundle = x3dh.Bundle(self.bob.keys, 9, public, signature)
            self.assertRaises(LowOrderKey, x3dh.initiate, self.alice.keys, self.alice.dh_private, bundle)

    def test_a_low_order_one_time_prekey_or_ephemeral_key_is_refused(self):
        for point in map(bytes.fromhex, LOW_ORDER):
            bundle = x3dh.Bundle(self.bob.keys, self.spk.id, self.spk.public, self.spk.signature, 4, point)
            self.assertRaises(LowOrderKey, x3dh.initiate, self.alice.keys, self.alice.dh_private, bundle)
            self.assertRaises(
                LowOrderKey, x3dh.respond, self.bob.keys, self.bob.dh_private, self.alice.keys, point, self.spk.private
            )

    def test_golden_vector(self):
        with open(os.path.join(VECTORS, "golden_x3dh.json")) as f:
            frozen = json.load(f)
        self.assertEqual(golden(), frozen)
        # and from the JSON's inputs alone, Bob's side gives the same values
        alice, bob = (device_from(frozen[user]) for user in ("alice", "bob"))
        spk = X25519PrivateKey.from_private_bytes(bytes.fromhex(frozen["spk"]["private"]))
        opk = X25519PrivateKey.from_private_bytes(bytes.fromhex(frozen["opk"]["private"]))
        ek = bytes.fromhex(frozen["ek_public"])
        for name, one_time in (("with_opk", opk), ("without_opk", None)):
            got = x3dh.respond(bob.keys, bob.dh_private, alice.keys, ek, spk, one_time)
            self.assertEqual((got.sk.hex(), got.ad.hex()), (frozen["cases"][name]["sk"], frozen["cases"][name]["ad"]))
