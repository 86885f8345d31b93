"""Device keys, their private records, prekeys and the signed prekey (docs/E2EE.md, "Devices", "Prekeys")."""

import hashlib
import json
import os
import struct

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from twisted.trial import unittest

from securechatd.e2ee.encoding import Malformed, enc
from securechatd.e2ee.keys import (
    MAX_PREKEY_ID,
    BadPrekeySignature,
    Device,
    DeviceKeys,
    Prekey,
    check_signed_prekey,
    device_id,
    dh,
)

with open(os.path.join(os.path.dirname(__file__), "vectors", "golden_keys.json")) as f:
    GOLDEN = json.load(f)


def x(value):
    return bytes.fromhex(value)


def golden_device():
    g = GOLDEN["device"]
    return Device(g["user"], Ed25519PrivateKey.from_private_bytes(x(g["sig_private"])), X25519PrivateKey.from_private_bytes(x(g["dh_private"])))


def length(data):
    return struct.pack(">I", len(data)) + data


class GoldenTests(unittest.TestCase):
    def test_device(self):
        g, device = GOLDEN["device"], golden_device()
        self.assertEqual(device.keys, DeviceKeys("alice", x(g["device_id"]), x(g["sig_pub"]), x(g["dh_pub"])))
        self.assertEqual(device.to_bytes().hex(), g["record"])

    def test_device_id_by_hand(self):
        """The id is the first 16 bytes of SHA-256("securechatd/device-id/v1" ‖ enc([sig_pub]))."""
        g = GOLDEN["device"]
        by_hand = hashlib.sha256(b"securechatd/device-id/v1" + length(x(g["sig_pub"]))).digest()[:16]
        self.assertEqual(by_hand.hex(), g["device_id"])
        self.assertEqual(device_id(x(g["sig_pub"])).hex(), g["device_id"])

    def test_device_record_by_hand(self):
        g = GOLDEN["device"]
        fields = [b"securechatd/device/v1", b"alice", x(g["sig_private"]), x(g["dh_private"]), struct.pack(">I", 1)]
        self.assertEqual(b"".join(map(length, fields)).hex(), g["record"])

    def test_signed_prekey(self):
        g = GOLDEN["signed_prekey"]
        spk = golden_device().signed_prekey(g["spk_id"], X25519PrivateKey.from_private_bytes(x(g["spk_private"])))
        self.assertEqual((spk.public.hex(), spk.signature.hex(), spk.to_bytes().hex()), (g["spk_pub"], g["spk_signature"], g["record"]))

    def test_signed_prekey_signature_by_hand(self):
        """Ed25519 over "securechatd/spk/v1" ‖ enc([user, device, spk_id (4 bytes), spk_pub])."""
        g, sig_pub = GOLDEN["signed_prekey"], x(GOLDEN["device"]["sig_pub"])
        signed = b"securechatd/spk/v1" + length(b"alice") + length(x(g["device_id"])) + length(struct.pack(">I", g["spk_id"])) + length(x(g["spk_pub"]))
        Ed25519PublicKey.from_public_bytes(sig_pub).verify(x(g["spk_signature"]), signed)

    def test_records_parse_back(self):
        device = Device.from_bytes(x(GOLDEN["device"]["record"]))
        self.assertEqual((device.keys, device.next_prekey_id), (golden_device().keys, 1))
        spk = Prekey.from_bytes(x(GOLDEN["signed_prekey"]["record"]))
        self.assertEqual((spk.id, spk.public.hex()), (GOLDEN["signed_prekey"]["spk_id"], GOLDEN["signed_prekey"]["spk_pub"]))


class DeviceTests(unittest.TestCase):
    def test_generate(self):
        one, two = Device.generate("alice"), Device.generate("alice")
        self.assertNotEqual(one.id, two.id)
        self.assertEqual(one.id, device_id(one.keys.sig_pub))
        self.assertEqual((one.keys.user, len(one.id), len(one.keys.dh_pub)), ("alice", 16, 32))

    def test_record_round_trip(self):
        device = Device.generate("ålice")
        device.new_one_time_prekeys(3)
        again = Device.from_bytes(device.to_bytes())
        self.assertEqual((again.user, again.keys, again.next_prekey_id), ("ålice", device.keys, 4))
        self.assertEqual(again.sign("securechatd/t/v1", [b"x"]), device.sign("securechatd/t/v1", [b"x"]))
        self.assertEqual(dh(again.dh_private, device.keys.dh_pub), dh(device.dh_private, device.keys.dh_pub))

    def test_no_private_key_in_repr(self):
        device = golden_device()
        spk = device.new_signed_prekey()
        text = repr(device) + repr(spk) + repr(device.keys)
        for secret in (GOLDEN["device"]["sig_private"], GOLDEN["device"]["dh_private"], spk.private.private_bytes_raw().hex()):
            self.assertNotIn(secret, text)
        self.assertIn(device.id.hex(), repr(device))

    def test_malformed_records(self):
        good = x(GOLDEN["device"]["record"])
        g = GOLDEN["device"]
        bad = [
            b"",
            good[:-1],
            x(GOLDEN["signed_prekey"]["record"]),  # a prekey record is not a device record
            enc([b"securechatd/device/v2", b"alice", x(g["sig_private"]), x(g["dh_private"]), struct.pack(">I", 1)]),
            enc([b"securechatd/device/v1", b"\xff", x(g["sig_private"]), x(g["dh_private"]), struct.pack(">I", 1)]),
            enc([b"securechatd/device/v1", b"alice", x(g["sig_private"])[:31], x(g["dh_private"]), struct.pack(">I", 1)]),
            enc([b"securechatd/device/v1", b"alice", x(g["sig_private"]), x(g["dh_private"]) + b"\0", struct.pack(">I", 1)]),
            enc([b"securechatd/device/v1", b"alice", x(g["sig_private"]), x(g["dh_private"]), struct.pack(">I", 0)]),
            enc([b"securechatd/device/v1", b"alice", x(g["sig_private"]), x(g["dh_private"]), struct.pack(">Q", 1)]),
        ]
        for data in bad:
            self.assertRaises(Malformed, Device.from_bytes, data)

    def test_malformed_prekey_records(self):
        private = bytes(range(32))
        for data in (
            b"",
            x(GOLDEN["device"]["record"]),
            enc([b"securechatd/prekey/v1", struct.pack(">I", 0), private, b""]),
            enc([b"securechatd/prekey/v1", struct.pack(">I", 1), private[:16], b""]),
            enc([b"securechatd/prekey/v1", struct.pack(">I", 1), private, bytes(63)]),
        ):
            self.assertRaises(Malformed, Prekey.from_bytes, data)


class PrekeyTests(unittest.TestCase):
    def test_ids_are_unique_per_device_and_survive_the_record(self):
        device = Device.generate("alice")
        ids = [device.new_signed_prekey().id] + [p.id for p in device.new_one_time_prekeys(100)]
        device = Device.from_bytes(device.to_bytes())
        ids += [p.id for p in device.new_one_time_prekeys(25)] + [device.new_signed_prekey().id]
        self.assertEqual(ids, list(range(1, 128)))

    def test_one_time_prekeys(self):
        opks = Device.generate("alice").new_one_time_prekeys(3)
        self.assertEqual([p.signature for p in opks], [b""] * 3)
        self.assertEqual(len({p.public for p in opks}), 3)
        again = Prekey.from_bytes(opks[0].to_bytes())
        self.assertEqual((again.id, again.public, again.signature), (opks[0].id, opks[0].public, b""))

    def test_ids_run_out_rather_than_repeat(self):
        device = Device.generate("alice")
        device.next_prekey_id = MAX_PREKEY_ID - 2
        self.assertEqual([p.id for p in device.new_one_time_prekeys(2)], [MAX_PREKEY_ID - 2, MAX_PREKEY_ID - 1])
        self.assertRaises(OverflowError, device.new_one_time_prekeys, 1)
        self.assertEqual(Device.from_bytes(device.to_bytes()).next_prekey_id, MAX_PREKEY_ID)

    def test_signed_prekey_checks(self):
        device = Device.generate("alice")
        spk = device.new_signed_prekey()
        check_signed_prekey(device.keys, spk.id, spk.public, spk.signature)
        again = Prekey.from_bytes(spk.to_bytes())
        check_signed_prekey(device.keys, again.id, again.public, again.signature)

    def test_signed_prekey_bound_to_user_device_id_and_key(self):
        device, other = Device.generate("alice"), Device.generate("alice")
        spk = device.new_signed_prekey()
        keys = device.keys
        renamed = DeviceKeys("mallory", keys.device, keys.sig_pub, keys.dh_pub)
        for wrong in (
            (renamed, spk.id, spk.public, spk.signature),
            (other.keys, spk.id, spk.public, spk.signature),
            (keys, spk.id + 1, spk.public, spk.signature),
            (keys, spk.id, other.keys.dh_pub, spk.signature),
            (keys, spk.id, spk.public, bytes([spk.signature[0] ^ 1]) + spk.signature[1:]),
            (keys, spk.id, spk.public, b""),
        ):
            self.assertRaises(BadPrekeySignature, check_signed_prekey, *wrong)


class DeviceKeysTests(unittest.TestCase):
    def test_id_must_match_key(self):
        keys = Device.generate("alice").keys
        other = Device.generate("alice").keys
        self.assertRaises(Malformed, DeviceKeys, "alice", other.device, keys.sig_pub, keys.dh_pub)
        self.assertRaises(Malformed, DeviceKeys, "alice", keys.device, keys.sig_pub, keys.dh_pub[:31])
        self.assertRaises(Malformed, DeviceKeys, "alice", keys.device, keys.sig_pub + b"\0", keys.dh_pub)

    def test_verify(self):
        device = Device.generate("alice")
        signature = device.sign("securechatd/t/v1", ["alice", b"x"])
        self.assertTrue(device.keys.verify(signature, "securechatd/t/v1", ["alice", b"x"]))
        self.assertFalse(device.keys.verify(signature, "securechatd/u/v1", ["alice", b"x"]))
        self.assertFalse(Device.generate("alice").keys.verify(signature, "securechatd/t/v1", ["alice", b"x"]))


class DHTests(unittest.TestCase):
    def test_both_sides_agree(self):
        a, b = Device.generate("alice"), Device.generate("bob")
        self.assertEqual(dh(a.dh_private, b.keys.dh_pub), dh(b.dh_private, a.keys.dh_pub))

    def test_public_key_length(self):
        private = X25519PrivateKey.generate()
        for public in (b"", bytes(31), bytes(33)):
            self.assertRaises(Malformed, dh, private, public)
