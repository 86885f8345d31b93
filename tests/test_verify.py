"""securechatd-verify (securechatd/verify.py): the golden bundle passes, anything changed fails, bad input is one line.

The failure tests build bundles that break at one step and no earlier: the
golden vectors' private keys (server, alice's phone, bob's phone) re-sign
what a change would otherwise break first (heads, message signatures, the
seal), so each failure class is reached on its own.
"""

import ast
import copy
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.trial import unittest

from securechatd import verify
from securechatd.e2ee import chain as dchain, envelope, keys, membership, transcript  # producers, for AgreementTests
from securechatd.verify import H, Broken, enc, u64

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VECTORS = os.path.join(ROOT, "tests", "vectors")


def vector(name):
    with open(os.path.join(VECTORS, name), "rb") as f:
        return f.read()


GOLDEN = vector("golden_bundle.json")
TRANSCRIPT = json.loads(vector("golden_transcript.json"))
MEMBERSHIP = json.loads(vector("golden_membership.json"))
SERVER = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(TRANSCRIPT["server"]["private"]))
KEYS = {d["user"]: Ed25519PrivateKey.from_private_bytes(bytes.fromhex(d["sig_private"])) for d in MEMBERSHIP["devices"]}
SERVER_KEY = TRANSCRIPT["server"]["public"]
ALICE_PRINT, BOB_PRINT = "148160331341227459297396541329", "462221925435151064813716833376"


REPORT = """\
Conversation 7 (group "Pläne"): 7 chain links, 3 messages, 2 membership states, 2 mode events.
Server key: 4989e595ec2951ca6e81f07ee73e86521d25745996eba8602a85180e10696e03
  id 0e3f dbc7 c177 2777 1666 3186 8d14 9edf: matches the key you gave with --server-key.
  Heads signed by this key at n=4, n=7 (the last link is n=7).
Device chains:
  alice: 3 links; fingerprint matches --trust
    6cc1cd2d6299510e050d363e97fe82f6 laptop: revoked
    f0d470ad42d87a453b83a6fab3fe34b6 phone: current
  bob: 1 link; fingerprint matches --trust
    3fc0b648a8b08263baa448f6b5028e94 phone: current
Members over time:
  epoch 1 at n=1: create by alice (phone f0d470ad): alice, bob
  epoch 2 at n=5: add by bob (phone 3fc0b648): alice, bob, carol
Modes:
  event 1 at n=2: attestable, set by alice (phone f0d470ad)
  event 2 at n=6: deniable, set by bob (phone 3fc0b648)
Messages:
  seq 1 (n=3): alice (phone f0d470ad), attestable, signed by its device; disclosed: "Shall we ship on Friday?"
  seq 2 (n=4): bob (phone 3fc0b648), attestable, signed by its device; not disclosed
  seq 3 (n=7): bob (phone 3fc0b648), deniable, NOT signed; disclosed: "Off the record: I'd rather Monday."
Transcript heads (who attested the transcript, and up to where):
  alice (phone f0d470ad) attested up to n=4 (seq 2), at 2023-11-14 22:13:25 UTC by its clock
  bob (phone 3fc0b648) attested up to n=4 (seq 2), at 2023-11-14 22:13:25 UTC by its clock
Exported by bob (phone 3fc0b648) at 2023-11-14 22:14:20 UTC by its clock; the seal verifies.
Signed: seq 1, 2. Each was signed by the device its sender's chain lists: its sender cannot deny
  having sent it (unless that device was stolen).
Deniable: seq 3 carries no signature. This bundle does not prove who wrote it: the sender it shows
  is the server's word only, and a disclosed text proves what was sent, not by whom. The server's
  signed chain still proves its place in the order, and that nothing around it was changed, dropped
  or inserted.
OK: every check passed.
"""


def golden():
    return json.loads(GOLDEN)


def dump(value):
    return (json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":")) + "\n").encode("utf-8")


def x(text):
    return bytes.fromhex(text)


def sign(key, label, fields):
    return key.sign(label.encode("ascii") + enc(fields)).hex()


def reseal(b):
    """Sign the export again with bob's phone key, so only the change under test is wrong."""
    e = b["export"]
    chains = [enc([u.encode(), enc([x(link) for link in b["device_chains"][u]])]) for u in sorted(b["device_chains"])]
    contents = H(
        "securechatd/export-contents/v1",
        [
            b"securechatd-bundle/v1", u64(b["conversation"]), x(b["server_key"]), enc(chains),
            enc([x(s) for s in b["membership"]]), enc([x(m) for m in b["modes"]]), enc([x(k) for k in b["links"]]),
            enc([x(h) for h in b["heads"]]),
            enc([enc([u64(v["seq"]), x(v["header"]), x(v["body"]), x(v["signature"])]) for v in b["envelopes"]]),
            enc([x(t) for t in b["transcript_heads"]]),
            enc([enc([u64(d["seq"]), x(d["key"]), d["plaintext"].encode()]) for d in b["disclosed"]]),
        ],
    )  # fmt: skip
    fields = [u64(b["conversation"]), e["user"].encode(), x(e["device"]), u64(e["time"]), contents]
    e["signature"] = sign(KEYS[e["user"]], "securechatd/export/v1", fields)
    return b


def signed_head(fields):
    """A head (conversation, n, e) signed by the server as a batch of one: its leaf hash is the root."""
    root = hashlib.sha256(b"\x00" + enc(fields)).digest()
    signature = x(sign(SERVER, "securechatd/server-heads/v1", [u64(1), root]))
    return enc(fields + [u64(0), u64(1), root, b"", signature]).hex()


def rechain(b):
    """Recompute the message links' item hashes and every e_n, sign the heads again, then reseal."""
    conv = u64(b["conversation"])
    e, es = H("securechatd/chain-genesis/v1", [conv]), []
    for i, raw in enumerate(b["links"]):
        f = verify.dec(x(raw))
        if f[3] == b"message":
            env = b["envelopes"][verify.num(f[4]) - 1]
            f[5] = H("securechatd/envelope-item/v1", [x(env["header"]), x(env["body"]), x(env["signature"])])
            b["links"][i] = enc(f).hex()
        e = H("securechatd/chain/v1", [f[0], e] + f[1:])
        es.append(e)
    for i, raw in enumerate(b["heads"]):
        conv_, n = verify.dec(x(raw))[:2]
        b["heads"][i] = signed_head([conv_, n, es[verify.num(n) - 1]])
    return reseal(b)


def header(b, seq):
    return verify.dec(x(b["envelopes"][seq - 1]["header"]))


def set_header(b, seq, fields, signer=None):
    """Replace message `seq`'s header; sign it again with `signer`'s key if given."""
    env = b["envelopes"][seq - 1]
    env["header"] = enc(fields).hex()
    if signer:
        body_hash = H("securechatd/message-body/v1", [x(env["body"])])
        signed = [fields[1], fields[3], fields[4], H("securechatd/header/v1", fields), body_hash]
        env["signature"] = sign(KEYS[signer], "securechatd/message-sig/v1", signed)
    return b


def flip(text, i, mask=1):
    raw = bytearray(x(text))
    raw[i % len(raw)] ^= mask
    return raw.hex()


def run(data, *args):
    """main() in-process on a bundle file: (exit status, stdout, stderr)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        f.write(data)
    try:
        out, err = io.StringIO(), io.StringIO()
        status = verify.main([f.name, *args], stdout=out, stderr=err)
    finally:
        os.unlink(f.name)
    return status, out.getvalue(), err.getvalue()


class GoldenTests(unittest.TestCase):
    def test_golden_bundle_passes_with_the_report_the_doc_gives(self):
        """E2EE.md: seqs 1-2 attestable (alice, bob), seq 3 deniable (bob), THs by alice and bob at n=4, disclosures 1 and 3."""
        status, out, err = run(GOLDEN, "--server-key", SERVER_KEY, "--trust", f"alice:{ALICE_PRINT}", "--trust", f"bob:{BOB_PRINT}")
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(out, REPORT)
        status, out, err = run(GOLDEN)
        self.assertEqual((status, err), (0, ""))
        self.assertIn("id 0e3f dbc7 c177 2777 1666 3186 8d14 9edf: taken from the bundle", out)
        self.assertIn("Not compared with a fingerprint: alice, bob.", out)
        self.assertTrue(out.endswith("OK: every check passed.\n"))

    def test_the_verifier_reports_what_the_doc_says(self):
        v = verify.verify(GOLDEN)
        self.assertEqual([(m["seq"], m["sender"], m["mode"]) for m in v.messages],
                         [(1, "alice", "attestable"), (2, "bob", "attestable"), (3, "bob", "deniable")])
        self.assertEqual([(t["user"], t["n"]) for t in v.ths], [("alice", 4), ("bob", 4)])
        self.assertEqual(sorted(v.disclosed), [1, 3])
        self.assertEqual(v.heads, [4, 7])
        self.assertEqual(v.e[0].hex(), TRANSCRIPT["e0"])
        self.assertEqual([e.hex() for e in v.e[1:]], [link["e"] for link in TRANSCRIPT["links"]])
        self.assertEqual(v.key_id.hex(), TRANSCRIPT["server"]["key_id"])

    def test_as_a_subprocess_of_this_tree(self):
        env = dict(os.environ, PYTHONPATH=ROOT)
        path = os.path.join(VECTORS, "golden_bundle.json")
        done = subprocess.run(
            [sys.executable, "-m", "securechatd.verify", path, "--server-key", SERVER_KEY, "--trust", f"alice:{ALICE_PRINT}"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        self.assertEqual((done.returncode, done.stderr), (0, ""))
        self.assertEqual(self._which(env), os.path.join(ROOT, "securechatd", "verify.py"))
        self.assertIn("9edf: matches the key you gave with --server-key", done.stdout)
        self.assertIn("alice: 3 links; fingerprint matches --trust", done.stdout)
        broken = subprocess.run(
            [sys.executable, "-m", "securechatd.verify", path, "--server-key", "00" * 32],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        self.assertEqual(broken.returncode, 1)
        self.assertTrue(broken.stdout.startswith("FAILED (server key): server key:"))

    def _which(self, env):
        """The file `python -m securechatd.verify` runs with this environment: this tree's, not an installed copy."""
        done = subprocess.run(
            [sys.executable, "-c", "import securechatd.verify as v; print(v.__file__)"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        return done.stdout.strip()

    def test_verify_imports_nothing_of_securechatd(self):
        """stdlib + cryptography only (DESIGN.md): it shares no code with e2ee/ on purpose."""
        with open(verify.__file__.replace(".pyc", ".py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        names = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                self.assertEqual(node.level, 0, "a relative import")
                names.append(node.module)
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
                self.fail("__import__ call")
        self.assertTrue(names)
        for name in names:
            top = name.split(".")[0]
            self.assertTrue(top == "cryptography" or top in sys.stdlib_module_names, name)
            self.assertNotEqual(top, "securechatd")

    def test_sub_formats_against_their_golden_vectors(self):
        keys = json.loads(vector("golden_keys.json"))
        device = keys["device"]
        self.assertEqual(verify.device_id(x(device["sig_pub"])).hex(), device["device_id"])
        for user in keys["safety_number"]["users"]:
            self.assertEqual(verify.fingerprint(user["user"], [x(k) for k in user["sig_pubs"]]), user["fingerprint"])
        chain = json.loads(vector("golden_chain.json"))
        self.assertEqual(verify.H("securechatd/chain-hash/v1", verify.dec(x(chain["links"][0]["bytes"]))).hex(),
                         chain["links"][0]["hash"])
        for m in TRANSCRIPT["modes"]:
            self.assertEqual(verify.H("securechatd/mode-hash/v1", verify.dec(x(m["bytes"]))).hex(), m["hash"])
        env = json.loads(vector("golden_envelope.json"))
        self.assertEqual(verify.H("securechatd/header/v1", verify.dec(x(env["header"]))).hex(), env["header_hash"])


class UsageTests(unittest.TestCase):
    def test_server_key_given_as_key_or_id(self):
        self.assertEqual(run(GOLDEN, "--server-key", SERVER_KEY.upper())[0], 0)
        status, out, _ = run(GOLDEN, "--server-key", TRANSCRIPT["server"]["readable"])
        self.assertEqual(status, 0)
        self.assertIn("matches the key id you gave", out)
        self.assertEqual(run(GOLDEN, "--server-key", "0e3f:dbc7-c177 2777 1666 3186 8d14 9edf")[0], 0)

    def test_server_key_mismatch(self):
        other = Ed25519PrivateKey.generate().public_key().public_bytes_raw().hex()
        for key in (other, "0e3f" + "0" * 28):
            status, out, err = run(GOLDEN, "--server-key", key)
            self.assertEqual((status, err), (1, ""))
            self.assertEqual(out, "FAILED (server key): server key: the bundle's key (id 0e3f dbc7 c177 2777 1666 3186 "
                                  "8d14 9edf) is not the one given\n")

    def test_trust(self):
        status, out, _ = run(GOLDEN, "--trust", f"alice:{ALICE_PRINT}", "--trust", "bob:" + " ".join(
            BOB_PRINT[i : i + 5] for i in range(0, 30, 5)))
        self.assertEqual(status, 0)
        self.assertEqual(out.count("; fingerprint matches --trust"), 2)

    def test_trust_mismatch(self):
        status, out, _ = run(GOLDEN, "--trust", f"bob:{ALICE_PRINT}")
        self.assertEqual(status, 1)
        self.assertIn("FAILED (device chains): trust bob: the fingerprint of bob's current devices", out)
        status, out, _ = run(GOLDEN, "--trust", f"carol:{ALICE_PRINT}")
        self.assertEqual(status, 1)
        self.assertIn("trust carol: the bundle has no device chain of carol", out)

    def test_usage_errors_exit_2_with_one_line(self):
        cases = [
            ["--server-key", "xyz"],
            ["--server-key", "ab" * 31],
            ["--trust", "alice"],
            ["--trust", "alice:123"],
            ["--trust", "Alice:" + ALICE_PRINT],
            ["--bogus"],
        ]
        for args in cases:
            status, out, err = run(GOLDEN, *args)
            self.assertEqual((status, out), (2, ""), args)
            self.assertEqual(err.count("\n"), 1, args)
            self.assertTrue(err.startswith("securechatd-verify: error: "), args)
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(verify.main([], stdout=out, stderr=err), 2)
        for path in (os.path.join(self.mktemp(), "missing.json"), ROOT):
            out, err = io.StringIO(), io.StringIO()
            self.assertEqual(verify.main([path], stdout=out, stderr=err), 2)
            self.assertIn("cannot read", err.getvalue())
            self.assertEqual(err.getvalue().count("\n"), 1)


class FailureTests(unittest.TestCase):
    """Each class of failure, reached on its own, with the message naming the first broken item."""

    def fails(self, data, step, message):
        if not isinstance(data, bytes):
            data = dump(data)
        status, out, err = run(data)
        self.assertEqual((status, err), (1, ""), out)
        self.assertEqual(out.count("\n"), 1, out)
        self.assertTrue(out.startswith(f"FAILED ({step}): "), out)
        self.assertIn(message, out)

    def test_form(self):
        b = golden()
        cases = [
            (b"\xff" + GOLDEN, "bundle: not UTF-8"),
            (b"", "bundle: not JSON"),
            (b"{", "bundle: not JSON"),
            (b"[" * 100000 + b"]" * 100000 + b"\n", "bundle: not JSON"),
            (json.dumps(b, indent=1).encode(), "not in canonical form"),
            (GOLDEN[:-1], "not in canonical form"),
            (GOLDEN.replace(b'"conversation":7', b'"conversation":7.0'), "not JSON"),
            (GOLDEN.replace(b'"conversation":7', b'"conversation":' + b"9" * 5000), "not JSON"),
            (GOLDEN.replace(b'"conversation":7', b'"conversation":true'), "conversation: not an integer"),
            (GOLDEN.replace(b'"conversation":7', b'"conversation":NaN'), "not JSON"),
            (GOLDEN.replace(b'"conversation":7', b'"conversation":9007199254740992'), "conversation: not an integer"),
            (GOLDEN.replace(b'"conversation":7', b'"conversation":"7"'), "conversation: not an integer"),
            (GOLDEN.replace(b'"conversation":7', b'"conversation":-7'), "conversation: not an integer"),
            (GOLDEN.replace(b'"conversation":7,', b'"conversation":7,"conversation":7,'), "not JSON"),
            (GOLDEN.replace(b'"Off the record', b'"\\ud800Off the record'), "not Unicode text"),
            (b"[]\n", "bundle: not an object"),
        ]
        for data, message in cases:
            self.fails(data, "form", message)
        for key, message in [("server_key", "server_key: not lower-case hex"), ("links", "links: not an array"),
                             ("export", "bundle: missing export")]:
            changed = golden()
            if key == "export":
                del changed[key]
            elif key == "links":
                changed[key] = {}
            else:
                changed[key] = changed[key].upper()
            self.fails(changed, "form", message)
        odd = golden()
        odd["heads"][0] = odd["heads"][0][:-1]
        self.fails(odd, "form", "heads[0]: not lower-case hex of whole bytes")
        extra = golden()
        extra["envelopes"][1]["extra"] = ""
        self.fails(extra, "form", "envelopes[1]: unexpected extra")
        short = golden()
        short["disclosed"][0]["key"] = short["disclosed"][0]["key"][2:]
        self.fails(short, "form", "disclosed[0].key: not 32 bytes")
        fmt = golden()
        fmt["format"] = "securechatd-bundle/v2"
        self.fails(fmt, "form", "format: not 'securechatd-bundle/v1'")
        name = golden()
        name["device_chains"]["Bob"] = name["device_chains"].pop("bob")
        self.fails(name, "form", "'Bob' is not a user name")

    def test_device_chains(self):
        b = golden()
        b["device_chains"]["alice"][1] = flip(b["device_chains"]["alice"][1], -100)
        self.fails(b, "device chains", "device chain of alice, link 2: signature does not verify")
        b = golden()
        del b["device_chains"]["alice"][0]
        self.fails(b, "device chains", "device chain of alice, link 1: seq is 2, not 1 (a gap)")
        b = golden()
        b["device_chains"]["alice"][2], b["device_chains"]["alice"][1] = b["device_chains"]["alice"][1:3]
        self.fails(b, "device chains", "device chain of alice, link 2: seq is 3, not 2 (a gap)")
        b = golden()
        b["device_chains"]["carol"] = b["device_chains"]["bob"]
        self.fails(b, "device chains", "device chain of carol, link 1: the link is of another user")
        b = golden()
        b["device_chains"]["bob"] = []
        self.fails(b, "device chains", "device chain of bob: empty")
        b = golden()
        b["device_chains"]["bob"][0] = b["device_chains"]["bob"][0][:-8]
        self.fails(b, "device chains", "device chain of bob, link 1: malformed link")

    def test_membership(self):
        b = golden()
        b["membership"][1] = flip(b["membership"][1], -1)
        self.fails(b, "membership", "membership epoch 2: signature does not verify")
        b = golden()
        b["membership"].reverse()
        self.fails(b, "membership", "membership epoch 1: epoch is 2, not 1 (a gap)")
        b = golden()
        del b["device_chains"]["alice"]
        self.fails(b, "membership", "membership epoch 1: the bundle has no device chain of alice")

    def test_modes(self):
        b = golden()
        b["modes"][1] = flip(b["modes"][1], -1)
        self.fails(b, "modes", "mode event 2: signature does not verify")
        b = golden()
        del b["modes"][0]
        self.fails(b, "modes", "mode event 1: number is 2, not 1 (a gap)")

    def test_links(self):
        b = golden()
        b["links"][2] = flip(b["links"][2], -1)
        self.fails(b, "links", "link n=3: the item hash is not that of envelope 1")
        b = golden()
        del b["links"][4]
        self.fails(b, "links", "link n=5: n is 6, not 5 (a gap)")
        b = golden()
        b["links"] = b["links"][:3]
        self.fails(b, "links", "links: the chain has 1 message links, the bundle 3 envelopes")
        b = golden()
        b["envelopes"][1]["body"] = flip(b["envelopes"][1]["body"], 0)
        self.fails(b, "links", "link n=4: the item hash is not that of envelope 2")
        b = golden()
        b["links"] = []
        self.fails(b, "links", "links: the chain is empty")

    def test_heads(self):
        b = golden()
        b["links"][1] = flip(b["links"][1], 35)  # the mode link's server_time: e_2 on changes, the first head sees it
        self.fails(b, "heads", "head n=4: e is not the recomputed e_4 (the server key signed another history)")
        b = golden()
        b["heads"][0] = flip(b["heads"][0], -1)
        self.fails(b, "heads", "head n=4: not signed by the server key")
        b = golden()
        del b["heads"][1]
        self.fails(b, "heads", "heads: no signed head at the last link n=7")
        b = golden()
        b["heads"].reverse()
        self.fails(b, "heads", "heads: n is not strictly increasing")

    def test_equivocation(self):
        """Two heads the server key signed for one n with different e: named as the server lying."""
        b = golden()
        b["heads"].insert(1, signed_head([u64(7), u64(4), bytes(32)]))
        self.fails(b, "heads", "head n=4: the server key signed two heads for n=4 with different e: it equivocated")

    def test_messages(self):
        b = golden()
        b["envelopes"][0]["signature"] = flip(b["envelopes"][0]["signature"], 5)
        self.fails(rechain(b), "messages", "message seq 1: signature does not verify")
        b = golden()
        b["envelopes"][1]["signature"] = ""
        self.fails(rechain(b), "messages", "message seq 2: attestable but not signed")
        b = golden()
        b["envelopes"][2]["signature"] = b["envelopes"][1]["signature"]
        self.fails(rechain(b), "messages", "message seq 3: deniable but carries a signature")
        b = golden()
        f = header(b, 3)
        f[5] = u64(1)
        self.fails(rechain(set_header(b, 3, f)), "messages", "message seq 3: counter 1 is not above 1 (a replay)")
        b = golden()
        f = header(b, 3)
        f[9] = bytes(32)
        self.fails(rechain(set_header(b, 3, f)), "messages", "message seq 3: prev_e is not e at prev_n=6: a fork")
        b = golden()
        f = header(b, 3)
        f[8] = u64(7)
        self.fails(rechain(set_header(b, 3, f)), "messages", "message seq 3: its sender's view prev_n=7 is not before")
        b = golden()
        f = header(b, 3)
        f[7] = b"attestable"
        self.fails(rechain(set_header(b, 3, f, "bob")), "messages", "message seq 3: mode attestable is not the mode in force at prev_n=6")
        b = golden()
        f = header(b, 3)
        f[4] = header(b, 1)[4]
        self.fails(rechain(set_header(b, 3, f)), "messages", "message seq 3: device f0d470ad42d87a453b83a6fab3fe34b6 is not a device of bob")
        b = golden()
        f = header(b, 2)
        f[2] = x(TRANSCRIPT["modes"][0]["hash"])
        self.fails(rechain(set_header(b, 2, f, "bob")), "messages", "message seq 2: names a membership state not on the chain before it")
        b = golden()
        f = header(b, 2)
        f[1] = u64(8)
        self.fails(rechain(set_header(b, 2, f, "bob")), "messages", "message seq 2: the header is of another conversation")
        b = golden()
        b["envelopes"][1]["seq"] = 5
        self.fails(b, "messages", "message seq 2: the envelope says seq 5")

    def test_transcript_heads(self):
        b = golden()
        b["transcript_heads"][0] = flip(b["transcript_heads"][0], -1)
        self.fails(b, "transcript heads", "transcript head 1 (alice, n=4): signature does not verify")
        b = golden()
        b["transcript_heads"][1] = b["transcript_heads"][1][:-2]
        self.fails(b, "transcript heads", "transcript head 2: malformed transcript head")

    def test_disclosures(self):
        b = golden()
        b["disclosed"][0]["key"] = flip(b["disclosed"][0]["key"], 0)
        self.fails(b, "disclosures", "disclosed seq 1: the key is not the one the sender committed to (kc)")
        b = golden()
        b["disclosed"][1]["plaintext"] = "Off the record: I'd rather Tuesday."
        self.fails(b, "disclosures", "disclosed seq 3: the body decrypts to another plaintext")
        b = golden()
        b["disclosed"].reverse()
        self.fails(b, "disclosures", "disclosed seq 1: not above the disclosure before")
        b = golden()
        b["disclosed"][1]["seq"] = 4
        self.fails(b, "disclosures", "disclosed seq 4: no such message in the bundle")
        b = golden()
        b["disclosed"][1]["seq"] = 2
        self.fails(b, "disclosures", "disclosed seq 2: the key is not the one the sender committed to (kc)")

    def test_seal(self):
        b = golden()
        b["export"]["time"] += 1
        self.fails(b, "seal", "seal (bob): signature does not verify")
        b = golden()
        del b["transcript_heads"][1]
        self.fails(b, "seal", "seal (bob): signature does not verify")
        b = golden()
        b["export"]["user"] = "carol"
        self.fails(b, "seal", "seal (carol): the bundle has no device chain of carol")
        b = golden()
        b["export"]["user"] = "dave"
        self.fails(b, "seal", "seal (dave): the exporter is not a member of any state")

    def test_the_helpers_change_nothing_else(self):
        """rechain and reseal of the untouched bundle give it back byte for byte: the failures above are their change alone."""
        self.assertEqual(dump(rechain(golden())), GOLDEN)


# -- Property tests --------------------------------------------------------------


def sites(value, path=()):
    """Every place of the bundle's value a change can touch: (path, what)."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            found += sites(item, path + (key,))
    elif isinstance(value, list):
        found.append((path, "list"))
        for i, item in enumerate(value):
            found += sites(item, path + (i,))
    elif isinstance(value, int):
        found.append((path, "number"))
    elif path[-1] in ("plaintext", "user", "format"):
        found.append((path, "text"))
    elif value:
        found.append((path, "hex"))
    if path == ("device_chains",):
        found.append((path, "users"))
    return found


SITES = sites(golden())


def get(value, path):
    for key in path:
        value = value[key]
    return value


def put(value, path, item):
    get(value, path[:-1])[path[-1]] = item


@st.composite
def mutations(draw):
    """A golden bundle value with one change: a byte of a hex value, a list item, a number or a text."""
    b = golden()
    path, what = draw(st.sampled_from(SITES))
    item = get(b, path)
    if what == "hex":
        raw = bytearray(x(item))
        raw[draw(st.integers(0, len(raw) - 1))] ^= draw(st.integers(1, 255))
        put(b, path, raw.hex())
    elif what == "number":
        put(b, path, draw(st.integers(0, 2**53 - 1).filter(lambda n: n != item)))
    elif what == "text":
        put(b, path, draw(st.text(max_size=40).filter(lambda t: t != item)))
    elif what == "users":
        del item[draw(st.sampled_from(sorted(item)))]
    else:
        how = draw(st.sampled_from(["remove", "duplicate", "swap"] if len(item) > 1 else ["remove", "duplicate"]))
        i = draw(st.integers(0, len(item) - 1))
        if how == "remove":
            del item[i]
        elif how == "duplicate":
            item.insert(draw(st.integers(0, len(item))), copy.deepcopy(item[i]))
        else:
            j = draw(st.integers(0, len(item) - 1).filter(lambda j: j != i))
            item[i], item[j] = item[j], item[i]
    return b


def json_values():
    leaves = st.none() | st.booleans() | st.integers(-(2**60), 2**60) | st.text(max_size=20) | st.floats(allow_nan=False)
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


class PropertyTests(unittest.TestCase):
    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(mutations())
    def test_any_single_change_fails(self, b):
        data = dump(b)
        self.assertNotEqual(data, GOLDEN)
        with self.assertRaises(Broken):
            verify.verify(data)

    @settings(max_examples=300, deadline=None)
    @given(st.integers(0, len(GOLDEN) - 1), st.integers(1, 255))
    def test_any_byte_of_the_file_flipped_fails(self, i, mask):
        data = bytearray(GOLDEN)
        data[i] ^= mask
        with self.assertRaises(Broken):
            verify.verify(bytes(data))

    @settings(max_examples=200, deadline=None)
    @given(st.sampled_from(SITES), json_values())
    def test_any_value_replaced_by_any_json_fails_cleanly(self, site, value):
        b = golden()
        if site[1] == "users":
            return
        if get(b, site[0]) == value:
            return
        put(b, site[0], value)
        with self.assertRaises(Broken):
            verify.verify(dump(b))

    @settings(max_examples=100, deadline=None)
    @given(st.binary(max_size=300) | json_values().map(lambda v: json.dumps(v).encode()))
    def test_arbitrary_input_is_a_broken_bundle_not_a_traceback(self, data):
        with self.assertRaises(Broken):
            verify.verify(data)

    @settings(max_examples=20, deadline=None)
    @given(st.just(None))
    def test_the_untouched_bundle_always_passes(self, _):
        verify.verify(GOLDEN)
        self.assertEqual(dump(golden()), GOLDEN)
        self.assertEqual(run(GOLDEN)[0], 0)


# -- Bundles the client's code (e2ee/) builds: the two implementations agree ------------


class Story:
    """A conversation built with securechatd.e2ee, as its server and clients would (the producer side, not a verifier)."""

    T0 = 1_800_000_000_000

    def __init__(self, conversation):
        self.conversation, self.server = conversation, Ed25519PrivateKey.generate()
        self.chains, self.states, self.modes, self.links, self.heads = {}, [], [], [], []
        self.envelopes, self.ths, self.keys, self.counters = [], [], {}, {}
        self.position = transcript.Position(conversation)

    def device(self, user, name="phone", signer=None):
        new = keys.Device.generate(user)
        links = self.chains.setdefault(user, [])
        state = dchain.ChainState(user).extend(links)
        links.append(dchain.first(new, name) if not links else dchain.add(state, signer, new, name))
        return new

    def revoke(self, signer, device):
        links = self.chains[signer.user]
        links.append(dchain.revoke(dchain.ChainState(signer.user).extend(links), signer, device.id))

    def place(self, kind, number, item):
        n = self.position.n + 1
        link = transcript.Link(self.conversation, n, self.T0 + 1000 * n, kind, number, item)
        self.position = self.position.after(link)
        self.links.append(link)

    def state(self, state):
        self.states.append(state)
        self.place(transcript.MEMBERSHIP, state.epoch, state.hash())

    def mode(self, mode, device):
        event = membership.set_mode(
            self.modes[-1] if self.modes else None, self.conversation, mode, self.states[-1].hash(), device
        )
        self.modes.append(event)
        self.place(transcript.MODE, event.number, event.hash())

    def say(self, device, text, mode="attestable", skew=0):
        seq = len(self.envelopes) + 1
        key = self.keys[seq] = os.urandom(32)
        counter = self.counters[device.id] = self.counters.get(device.id, 0) + 1
        sealed = envelope.seal(
            text.encode(), self.conversation, self.states[-1].hash(), device.user, device.id, counter,
            self.T0 + 1000 * (self.position.n + 1) + skew, [], None, key, mode=mode,
            prev=(self.position.n, self.position.e), signer=device,
        )  # fmt: skip
        self.envelopes.append((seq, sealed.header, sealed.body, sealed.signature))
        self.place(transcript.MESSAGE, seq, transcript.message_item(sealed.header, sealed.body, sealed.signature))

    def head(self):
        self.heads.append(transcript.sign_head(self.server, self.conversation, self.position.n, self.position.e))

    def read(self, device):
        self.ths.append(
            transcript.sign_transcript_head(
                device, self.conversation, self.position.n, self.position.e, self.states[-1].hash(), self.T0 + 99
            )
        )

    def bundle(self, exporter, disclose):
        sent = {seq: (header, body) for seq, header, body, _ in self.envelopes}
        opened = [
            (seq, self.keys[seq], envelope.open_body(envelope.Header.from_bytes(sent[seq][0]), sent[seq][1], self.keys[seq]))
            for seq in disclose
        ]
        return transcript.build_bundle(
            self.conversation, self.server.public_key().public_bytes_raw(),
            {user: [link.to_bytes() for link in links] for user, links in self.chains.items()},
            [s.to_bytes() for s in self.states], [m.to_bytes() for m in self.modes],
            [link.to_bytes() for link in self.links], [h.to_bytes() for h in self.heads], self.envelopes,
            [th.to_bytes() for th in self.ths], opened, exporter, self.T0 + 10**6,
        )  # fmt: skip


class AgreementTests(unittest.TestCase):
    """Bundles e2ee/ builds pass here (other kinds, modes and chains than the golden one); a fork it builds fails here."""

    def test_a_direct_deniable_conversation(self):
        s = Story(9)
        dana, erin = s.device("dana"), s.device("erin", name="")
        s.state(membership.create(9, "direct", "", ["erin"], dana))
        s.mode("deniable", dana)
        s.say(dana, "off the record", "deniable")
        s.say(erin, "ü" * 300, "deniable", skew=10 * 60 * 1000)  # 600 bytes: the 1024-byte bucket
        s.head()
        s.say(dana, "", "deniable")
        s.head()
        status, out, _ = run(s.bundle(erin, [1, 2, 3]))
        self.assertEqual(status, 0, out)
        self.assertIn("Conversation 9 (direct)", out)
        self.assertIn("event 1 at n=2: deniable", out)
        self.assertEqual(out.count("deniable, NOT signed; disclosed"), 3)
        self.assertIn("Transcript heads (who attested the transcript, and up to where):\n  none", out)
        self.assertIn("Deniable: seq 1, 2, 3 carry no signature", out)
        self.assertIn("Warning: message seq 2: the sender's clock was 600 s ahead of the server's", out)

    def test_a_group_whose_sender_device_was_revoked_since(self):
        s = Story(11)
        laptop = s.device("fred", "laptop")
        phone = s.device("fred", "phone", signer=laptop)
        gina = s.device("gina")
        s.state(membership.create(11, "group", "Plans", ["gina"], laptop))
        s.say(laptop, "from the laptop")
        s.say(gina, "hi")
        s.read(gina)
        s.head()
        s.state(membership.add(s.states[-1], ["hank"], gina))
        s.state(membership.leave(s.states[-1], phone))
        s.say(gina, "fred left")
        s.head()
        s.revoke(phone, laptop)
        status, out, _ = run(s.bundle(gina, [2]))
        self.assertEqual(status, 0, out)
        self.assertIn("seq 1 (n=2): fred (laptop ", out)
        self.assertIn(", now revoked), attestable, signed by its device; not disclosed", out)
        self.assertIn("epoch 3 at n=5: leave by fred (phone ", out)
        self.assertIn("gina, hank", out)
        self.assertIn("no mode event: attestable throughout", out)
        self.assertIn("attested up to n=3 (seq 2)", out)
        status, out, _ = run(s.bundle(laptop, []))  # a revoked device seals nothing
        self.assertEqual(out, "FAILED (seal): seal (fred): the exporter's device is revoked\n")

    def test_a_forked_history_fails_here_as_in_e2ee(self):
        from tests.test_e2ee_membership import PHONE
        from tests.test_transcript import History

        self.assertEqual(run(History().bundle(disclose=(), exporter=PHONE))[0], 0)
        status, out, _ = run(History(forked=True).bundle())
        self.assertEqual(status, 1)
        self.assertEqual(out, "FAILED (messages): message seq 2: prev_e is not e at prev_n=3: a fork "
                              "(its sender saw another history)\n")


class DocTests(unittest.TestCase):
    def test_verifying_md_shows_the_report_as_it_is(self):
        """docs/VERIFYING.md's example report is the verifier's output for the golden bundle, line for line."""
        with open(os.path.join(ROOT, "docs", "VERIFYING.md"), encoding="utf-8") as f:
            doc = f.read()
        self.assertIn("".join(f"    {line}\n" for line in REPORT.splitlines()), doc)
