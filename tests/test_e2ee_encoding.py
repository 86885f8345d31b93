"""The canonical encoding and labels every e2ee signature, MAC and hash is over."""

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.trial import unittest

from securechatd.e2ee.encoding import Malformed, dec, digest, enc, sign, verify


class EncodingTests(unittest.TestCase):
    def test_golden(self):
        self.assertEqual(enc(["a", 1, b"xy"]).hex(), "00000001610000000800000000000000010000000278" "79")

    def test_field_boundaries_are_unambiguous(self):
        self.assertNotEqual(enc([b"ab", b"c"]), enc([b"a", b"bc"]))
        self.assertEqual(dec(enc([b"ab", b"", b"c"])), [b"ab", b"", b"c"])

    def test_malformed(self):
        for bad in (b"\x00\x00\x00", b"\x00\x00\x00\x05abc", b"\xff\xff\xff\xffx"):
            self.assertRaises(Malformed, dec, bad)
        self.assertRaises(Malformed, dec, enc([b"a"]), 2)

    def test_labels_separate_domains(self):
        self.assertNotEqual(digest("securechatd/a/v1", [b"x"]), digest("securechatd/b/v1", [b"x"]))
        self.assertRaises(ValueError, digest, "other/a/v1", [b"x"])

    def test_a_signature_checks_only_for_its_label_and_fields(self):
        key = Ed25519PrivateKey.generate()
        signature = sign(key, "securechatd/a/v1", ["alice", b"x"])
        public = key.public_key()
        self.assertTrue(verify(public, signature, "securechatd/a/v1", ["alice", b"x"]))
        self.assertFalse(verify(public, signature, "securechatd/b/v1", ["alice", b"x"]))
        self.assertFalse(verify(public, signature, "securechatd/a/v1", ["mallory", b"x"]))
        self.assertFalse(verify(public, b"\x00" * 64, "securechatd/a/v1", ["alice", b"x"]))
