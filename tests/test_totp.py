"""Second factors: RFC 6238 / RFC 4226 known answers, the window and replay rules, recovery codes.

The known answers are vendored in tests/vectors/rfc6238.json and
rfc4226.json (sources inside each file); none was produced by the code under
test. Times are plain numbers, as the daemon passes `reactor.seconds()`.
"""

import base64
import hashlib
import json
import os
import re
import struct
from urllib.parse import parse_qs, urlsplit

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.twofactor.hotp import HOTP
from cryptography.hazmat.primitives.twofactor.totp import TOTP
from twisted.trial import unittest

from securechatd import totp

VECTORS = os.path.join(os.path.dirname(__file__), "vectors")


def load(name):
    with open(os.path.join(VECTORS, name)) as f:
        return json.load(f)


RFC6238 = load("rfc6238.json")
RFC4226 = load("rfc4226.json")
SECRET = RFC4226["secret_ascii"].encode("ascii")  # 20 bytes, as the daemon's secrets are
NOW = 1111111109  # an RFC 6238 time, 29 s into its step
STEP = NOW // 30


class RFC6238Tests(unittest.SynchronousTestCase):
    """Appendix B, every row: SHA-1, SHA-256 and SHA-512, each with its own seed length."""

    def test_seed_lengths(self):
        self.assertEqual({alg: len(seed) for alg, seed in RFC6238["seeds_ascii"].items()}, {"SHA1": 20, "SHA256": 32, "SHA512": 64})

    def test_library_totp(self):
        """cryptography's TOTP, which gives us the provisioning URI, agrees with every row."""
        for case in RFC6238["tests"]:
            seed = RFC6238["seeds_ascii"][case["algorithm"]].encode("ascii")
            algorithm = getattr(hashes, case["algorithm"])()
            generated = TOTP(seed, 8, algorithm, RFC6238["time_step"]).generate(case["time"])
            self.assertEqual(generated.decode(), case["totp"], case)

    def test_steps(self):
        for case in RFC6238["tests"]:
            self.assertEqual(totp.time_step(case["time"]), int(case["step_hex"], 16))

    def test_library_hotp_at_each_step(self):
        """TOTP is HOTP of the step (RFC 6238 §4), which is how totp.check computes it."""
        for case in RFC6238["tests"]:
            seed = RFC6238["seeds_ascii"][case["algorithm"]].encode("ascii")
            hotp = HOTP(seed, 8, getattr(hashes, case["algorithm"])())
            self.assertEqual(hotp.generate(int(case["step_hex"], 16)).decode(), case["totp"], case)

    def test_our_codes(self):
        """Our six digits are the last six of the RFC's eight (both are the same number mod 10**n)."""
        for case in RFC6238["tests"]:
            if case["algorithm"] != "SHA1":
                continue
            seed = RFC6238["seeds_ascii"]["SHA1"].encode("ascii")
            self.assertEqual(totp.code(seed, case["time"]), case["totp"][-6:])
            self.assertEqual(totp.check(seed, case["totp"][-6:], case["time"], None), int(case["step_hex"], 16))


class RFC4226Tests(unittest.SynchronousTestCase):
    """Appendix D: the intermediate HMACs, the truncation and the codes."""

    def test_hmac(self):
        for case in RFC4226["tests"]:
            mac = hmac.HMAC(SECRET, hashes.SHA1())
            mac.update(struct.pack(">Q", case["count"]))
            self.assertEqual(mac.finalize().hex(), case["hmac_sha1"])

    def test_library_hotp(self):
        """Six digits as in the RFC; seven and eight from its truncated values, which exercise the truncation itself."""
        for case in RFC4226["tests"]:
            self.assertEqual(int(case["truncated_hex"], 16), case["truncated_decimal"])
            self.assertEqual(HOTP(SECRET, 6, hashes.SHA1()).generate(case["count"]).decode(), case["hotp"])
            for digits in (7, 8):
                expected = "%0*d" % (digits, case["truncated_decimal"] % 10**digits)
                self.assertEqual(HOTP(SECRET, digits, hashes.SHA1()).generate(case["count"]).decode(), expected)

    def test_our_codes(self):
        """Step c runs from 30c to 30c + 29.999…: our code there is HOTP(c)."""
        for case in RFC4226["tests"]:
            for now in (30 * case["count"], 30 * case["count"] + 29.999):
                self.assertEqual(totp.code(SECRET, now), case["hotp"])


class SecretTests(unittest.SynchronousTestCase):
    def test_new_secret(self):
        secrets = {totp.new_secret() for _ in range(20)}
        self.assertEqual(len(secrets), 20)
        self.assertEqual({len(s) for s in secrets}, {20})  # 160 bits

    def test_provisioning_uri(self):
        secret = totp.new_secret()
        uri = urlsplit(totp.provisioning_uri(secret, "alice"))
        self.assertEqual((uri.scheme, uri.netloc, uri.path), ("otpauth", "totp", "/securechatd:alice"))
        query = parse_qs(uri.query)
        self.assertEqual(
            query,
            {
                "secret": [base64.b32encode(secret).decode()],
                "issuer": ["securechatd"],
                "algorithm": ["SHA1"],
                "digits": ["6"],
                "period": ["30"],
            },
        )
        self.assertNotIn("=", query["secret"][0])  # 160 bits are 32 base32 characters: no padding for apps to trip on


class CheckTests(unittest.SynchronousTestCase):
    """The window, replay and shape rules of totp.check, with the RFC's secret at a fixed time."""

    def codes(self):
        """The codes of steps STEP-2 … STEP+2, which happen to be distinct for this secret."""
        codes = {offset: totp.code(SECRET, (STEP + offset) * 30) for offset in range(-2, 3)}
        self.assertEqual(len(set(codes.values())), 5)
        return codes

    def test_window(self):
        codes = self.codes()
        for offset in (-1, 0, 1):
            self.assertEqual(totp.check(SECRET, codes[offset], NOW, None), STEP + offset)
        for offset in (-2, 2):
            self.assertIsNone(totp.check(SECRET, codes[offset], NOW, None))

    def test_window_at_the_edges_of_the_step(self):
        codes = self.codes()
        start, end = STEP * 30, STEP * 30 + 29.999
        for now in (start, end):
            self.assertEqual(totp.check(SECRET, codes[1], now, None), STEP + 1)
            self.assertEqual(totp.check(SECRET, codes[-1], now, None), STEP - 1)
        self.assertIsNone(totp.check(SECRET, codes[-1], end + 0.001, None))  # the next step has begun
        self.assertIsNone(totp.check(SECRET, codes[1], start - 0.001, None))

    def test_reuse_in_the_same_step_refused(self):
        codes = self.codes()
        accepted = totp.check(SECRET, codes[0], NOW, None)
        self.assertEqual(accepted, STEP)
        self.assertIsNone(totp.check(SECRET, codes[0], NOW, accepted))
        self.assertIsNone(totp.check(SECRET, codes[0], NOW + 30, accepted))  # still inside the window a step later

    def test_next_step_accepted_after_one_was_used(self):
        codes = self.codes()
        self.assertEqual(totp.check(SECRET, codes[1], NOW, STEP), STEP + 1)

    def test_older_step_refused_once_a_newer_was_accepted(self):
        """A phone running ahead had step+1 accepted: the current step's code, though fresh, is now spent too."""
        codes = self.codes()
        self.assertIsNone(totp.check(SECRET, codes[0], NOW, STEP + 1))
        self.assertIsNone(totp.check(SECRET, codes[-1], NOW, STEP))

    def test_code_from_two_steps_ago_refused(self):
        codes = self.codes()
        self.assertIsNone(totp.check(SECRET, codes[-2], NOW, None))
        self.assertIsNone(totp.check(SECRET, codes[-2], NOW, STEP - 5))

    def test_near_the_epoch(self):
        """At step 0 there is no step -1 to try, and no error either."""
        self.assertEqual(totp.check(SECRET, RFC4226["tests"][0]["hotp"], 10, None), 0)
        self.assertEqual(totp.check(SECRET, RFC4226["tests"][1]["hotp"], 10, None), 1)

    def test_spaces_dropped(self):
        code = self.codes()[0]
        for typed in (f"{code[:3]} {code[3:]}", f" {code}\n", f"{code[:3]}\t{code[3:]}"):
            self.assertEqual(totp.check(SECRET, typed, NOW, None), STEP)

    def test_shape_refused(self):
        code = self.codes()[0]
        arabic = code.translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩"))  # digits to str.isdigit, not to us
        shapes = ("", code[:5], code + "0", "0" + code, code[:5] + "a", code[:3] + "-" + code[3:], arabic)
        for typed in shapes + (code.encode(), None, int(code)):
            self.assertIsNone(totp.check(SECRET, typed, NOW, None), repr(typed))

    def test_wrong_code_refused(self):
        code = self.codes()[0]
        wrong = "%06d" % ((int(code) + 1) % 10**6)
        self.assertNotIn(wrong, self.codes().values())
        self.assertIsNone(totp.check(SECRET, wrong, NOW, None))

    def test_another_secret(self):
        self.assertIsNone(totp.check(b"\x01" * 20, self.codes()[0], NOW, None))


class RecoveryCodeTests(unittest.SynchronousTestCase):
    SHAPE = re.compile(r"[a-z2-7]{4}-[a-z2-7]{4}-[a-z2-7]{4}\Z")

    def test_new_codes(self):
        codes = totp.new_recovery_codes()
        self.assertEqual(len(codes), 10)
        self.assertEqual(len(set(codes)), 10)
        for code in codes:
            self.assertRegex(code, self.SHAPE)
        self.assertNotEqual(set(codes), set(totp.new_recovery_codes()))

    def test_entropy(self):
        """12 characters from 32: 60 bits, above the 50 the design asks for."""
        self.assertEqual(len(set(totp.RECOVERY_ALPHABET)), 32)
        self.assertEqual(totp.RECOVERY_GROUPS * totp.RECOVERY_GROUP * 5, 60)

    def test_every_character_is_used(self):
        """secrets.choice over the whole alphabet: 500 codes miss a character with probability about 32 * (31/32)**6000."""
        used = set("".join(code for _ in range(50) for code in totp.new_recovery_codes()))
        self.assertEqual(used - {"-"}, set(totp.RECOVERY_ALPHABET))

    def test_normalise(self):
        for typed in ("k7qm-2xfa-ve4n", "K7QM-2XFA-VE4N", " k7qm 2xfa ve4n\n", "k7qm2xfave4n", "k7-qm-2x--fa ve4n"):
            self.assertEqual(totp.normalise_recovery_code(typed), "k7qm2xfave4n", typed)

    def test_normalise_refuses(self):
        lengths = ("", "k7qm-2xfa-ve4", "k7qm-2xfa-ve4nn")
        characters = ("k7qm-2xfa-ve40", "k7qm-2xfa-ve41", "k7qm-2xfa-ve48", "k7qm_2xfa_ve4n", "k7qm-2xfa-vé4n")  # 0, 1, 8 are not base32
        for typed in lengths + characters + (b"k7qm2xfave4n", None):
            self.assertIsNone(totp.normalise_recovery_code(typed), repr(typed))

    def test_hash_by_hand(self):
        """SHA-256 over the label, then the user and the normalised code, each with its 4-byte length."""
        expected = hashlib.sha256(b"securechatd/recovery-code/v1" + b"\x00\x00\x00\x05alice" + b"\x00\x00\x00\x0ck7qm2xfave4n").digest()
        self.assertEqual(totp.recovery_code_hash("alice", "K7QM 2xfa-ve4n"), expected)

    def test_hash_binds_the_user(self):
        self.assertNotEqual(totp.recovery_code_hash("alice", "k7qm-2xfa-ve4n"), totp.recovery_code_hash("bob", "k7qm-2xfa-ve4n"))

    def test_hash_of_what_cannot_be_a_code(self):
        self.assertIsNone(totp.recovery_code_hash("alice", "123456"))
