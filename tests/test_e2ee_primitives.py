"""Known answers for every primitive of cryptography's the e2ee layer uses, as it uses them.

The values are the RFCs' and Wycheproof's, vendored in tests/vectors/ (see
its README for where each came from); none was produced by the code under
test. A failure here means the library or the way we call it changed.
"""

import json
import os

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand
from twisted.trial import unittest

from securechatd.e2ee.keys import LowOrderKey, dh

VECTORS = os.path.join(os.path.dirname(__file__), "vectors")


def load(name):
    with open(os.path.join(VECTORS, name)) as f:
        return json.load(f)


def x(value):
    return bytes.fromhex(value)


def x25519(scalar, u):
    """RFC 7748's X25519(k, u) on raw 32-byte strings, through cryptography (which clamps k and masks u)."""
    return X25519PrivateKey.from_private_bytes(scalar).exchange(X25519PublicKey.from_public_bytes(u))


class X25519Tests(unittest.TestCase):
    """RFC 7748 §5.2 and §6.1."""

    vectors = load("rfc7748.json")

    def test_single_step(self):
        for case in self.vectors["single_step"]:
            self.assertEqual(x25519(x(case["scalar"]), x(case["u"])).hex(), case["output"])

    def test_iterated(self):
        """k becomes the output and u the old k; 1 and 1,000 rounds (1,000,000 would take minutes)."""
        iterated = self.vectors["iterated"]
        k = u = x(iterated["start"])
        for step in range(1, 1001):
            k, u = x25519(k, u), k
            if step == 1:
                self.assertEqual(k.hex(), iterated["after_1"])
        self.assertEqual(k.hex(), iterated["after_1000"])

    def test_diffie_hellman(self):
        v = {name: x(value) for name, value in self.vectors["diffie_hellman"].items()}
        alice, bob = X25519PrivateKey.from_private_bytes(v["alice_private"]), X25519PrivateKey.from_private_bytes(v["bob_private"])
        self.assertEqual(alice.public_key().public_bytes_raw(), v["alice_public"])
        self.assertEqual(bob.public_key().public_bytes_raw(), v["bob_public"])
        self.assertEqual(dh(alice, v["bob_public"]), v["shared"])
        self.assertEqual(dh(bob, v["alice_public"]), v["shared"])


class LowOrderTests(unittest.TestCase):
    """Wycheproof's low-order public keys: dh() refuses every one, as docs/E2EE.md ("X3DH") says."""

    def test_all_zero_shared_secret_is_refused(self):
        cases = load("wycheproof_x25519_low_order.json")["tests"]
        self.assertGreaterEqual(len(cases), 20)
        for case in cases:
            self.assertEqual(case["shared"], "00" * 32, case["tcId"])
            private = X25519PrivateKey.from_private_bytes(x(case["private"]))
            self.assertRaises(LowOrderKey, dh, private, x(case["public"]))

    def test_refused_even_if_the_backend_returns_zeros(self):
        """dh() checks the output itself, not only relying on OpenSSL's refusal."""

        class Backend:
            def exchange(self, public):
                return bytes(32)

        self.assertRaises(LowOrderKey, dh, Backend(), x(load("rfc7748.json")["diffie_hellman"]["bob_public"]))


class Ed25519Tests(unittest.TestCase):
    """RFC 8032 §7.1: TEST 1, 2, 3, 1024 and SHA(abc)."""

    def test_vectors(self):
        tests = load("rfc8032.json")["tests"]
        self.assertEqual([t["name"] for t in tests], ["TEST 1", "TEST 2", "TEST 3", "TEST 1024", "TEST SHA(abc)"])
        for t in tests:
            key = Ed25519PrivateKey.from_private_bytes(x(t["secret_key"]))
            message, signature = x(t["message"]), x(t["signature"])
            self.assertEqual(key.public_key().public_bytes_raw().hex(), t["public_key"], t["name"])
            self.assertEqual(key.sign(message).hex(), t["signature"], t["name"])
            public = Ed25519PublicKey.from_public_bytes(x(t["public_key"]))
            public.verify(signature, message)
            forged = bytes([signature[0] ^ 1]) + signature[1:]
            self.assertRaises(InvalidSignature, public.verify, forged, message)
        self.assertEqual(len(x(tests[3]["message"])), 1023)


class HKDFTests(unittest.TestCase):
    """RFC 5869 Appendix A.1-A.3 (SHA-256): the PRK (extract, an HMAC keyed with the salt) and the OKM."""

    def test_vectors(self):
        for t in load("rfc5869.json")["tests"]:
            ikm, salt, info = x(t["ikm"]), x(t["salt"]), x(t["info"])
            okm = HKDF(hashes.SHA256(), t["length"], salt or None, info).derive(ikm)
            self.assertEqual(okm.hex(), t["okm"], t["name"])
            extract = hmac.HMAC(salt or bytes(32), hashes.SHA256())
            extract.update(ikm)
            prk = extract.finalize()
            self.assertEqual(prk.hex(), t["prk"], t["name"])
            self.assertEqual(HKDFExpand(hashes.SHA256(), t["length"], info).derive(prk).hex(), t["okm"], t["name"])


class ChaCha20Poly1305Tests(unittest.TestCase):
    """RFC 8439 §2.8.2."""

    def test_vector(self):
        v = {name: x(value) for name, value in load("rfc8439.json").items() if name != "source"}
        aead = ChaCha20Poly1305(v["key"])
        sealed = aead.encrypt(v["nonce"], v["plaintext"], v["aad"])
        self.assertEqual(sealed.hex(), (v["ciphertext"] + v["tag"]).hex())
        self.assertEqual(aead.decrypt(v["nonce"], sealed, v["aad"]), v["plaintext"])
        self.assertRaises(InvalidTag, aead.decrypt, v["nonce"], sealed, v["aad"] + b"x")
        self.assertRaises(InvalidTag, aead.decrypt, v["nonce"], sealed[:-1] + bytes([sealed[-1] ^ 1]), v["aad"])
