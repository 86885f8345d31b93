"""securechatd-verify-log (securechatd/verify_log.py) on files the client's check exports from a real daemon's log.

What it finds in each broken log is tested beside the client's check
(test_client_account_log.TamperTests); here: its arguments, the file
format, a changed byte anywhere, and the command run as a subprocess of
this tree.
"""

import io
import json
import os
import stat
import subprocess
import sys

from securechatd import verify_log
from securechatd.client.account_log import AccountLogCheck
from tests.helpers import SOURCE_ROOT, environment, run_now
from tests.test_client_account_log import SEEN, LogCase


class VerifyLogTests(LogCase):
    def setUp(self):
        super().setUp()
        self.checker = self.checker()
        self.assertTrue(self.check(self.checker).verified)
        self.path = os.path.join(self.directory, "export.json")
        self.checker.export(self.path)
        with open(self.path, "rb") as f:
            self.data = f.read()

    def run_on(self, data, *arguments):
        with open(self.path, "wb") as f:
            f.write(data)
        out, err = io.StringIO(), io.StringIO()
        return verify_log.main([self.path, *arguments], out, err), out.getvalue(), err.getvalue()

    def test_an_untouched_log(self):
        status, out, err = self.run_on(self.data, "--server-key", self.server_key_bytes.hex())
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(
            out.splitlines(),
            [f"#{seq:<4} {SEEN}  login               10.0.0.1        -                                password" for seq in range(1, 5)]
            + [f"verified: 4 events of alice, in the tree of 7 leaves signed {SEEN}"],
        )
        status, out, err = self.run_on(self.data)
        self.assertEqual((status, err), (0, ""))
        self.assertTrue(out.startswith(f"server key {self.server_key_bytes.hex()}: taken from the file (give --server-key to check it)\n"))

    def test_the_file_is_canonical_and_private(self):
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        document = json.loads(self.data)
        self.assertEqual(json.dumps(document, sort_keys=True, separators=(",", ":")).encode() + b"\n", self.data)
        self.assertEqual(sorted(document), ["format", "known", "pages", "refused", "server_key", "user"])
        self.assertEqual(document["known"], {"tree_head": None, "seq": 0, "hash": "00" * 32})  # (the first check)
        self.assertEqual(verify_log.dumps(*verify_log.loads(self.data)), self.data)
        self.clock.advance(60)
        self.connect()
        self.check(self.checker)
        self.checker.export(self.path)
        with open(self.path, "rb") as f:
            known = json.load(f)["known"]
        self.assertEqual(known["seq"], 4)
        self.assertEqual(verify_log.known_from_json(known).head.size, 7)  # what the client remembered before

    def test_another_server_key(self):
        status, out, _ = self.run_on(self.data, "--server-key", "11" * 32)
        self.assertEqual((status, out), (1, f"BROKEN: the file's server key {self.server_key_bytes.hex()} is not the one given\n"))

    def test_a_known_head(self):
        """A head kept from a later check: the export of the earlier one shows a smaller tree."""
        self.clock.advance(60)
        self.connect("bob")
        self.connect()
        later = AccountLogCheck(self.state + ".2", self.server_key_bytes, "alice", run=run_now)
        self.check(later)
        with open(self.state + ".2") as f:
            head = json.load(f)["known"]["tree_head"]
        status, out, _ = self.run_on(self.data, "--known-head", head)
        self.assertEqual(status, 1)
        self.assertTrue(out.endswith(
            "BROKEN: the server's log was cut: its tree of 7 leaves is smaller than the tree head of size 9 signed"
            " 2023-11-14 22:14:20 UTC\n"
        ), out)  # fmt: skip
        other_last_byte = "01" if head.endswith("00") else "00"  # (a signature may end in 00: 1 run in 256 failed)
        status, out, _ = self.run_on(self.data, "--known-head", head[:-2] + other_last_byte)
        self.assertEqual(status, 1)
        self.assertTrue(out.endswith("\nBROKEN: the --known-head is not valid: the tree head of size 9 is not signed by the server key\n"))

    def test_any_changed_byte_fails(self):
        document = json.loads(self.data)
        page = document["pages"][0]
        places = [(page, "tree_head"), (page, "consistency")] + [
            (event, name) for event in page["events"] for name in ("event", "proof")
        ]
        for holder, name in places:
            original = holder[name]
            for at in range(0, len(original), 2):
                holder[name] = original[:at] + f"{int(original[at:at + 2], 16) ^ 1:02x}" + original[at + 2 :]
                status, out, _ = self.run_on(json.dumps(document).encode(), "--server-key", self.server_key_bytes.hex())
                self.assertEqual(status, 1, (name, at))
                self.assertIn("BROKEN: ", out)
            holder[name] = original
        self.assertEqual(self.run_on(json.dumps(document).encode())[0], 0)

    def test_files_that_are_not_exports(self):
        for data in (b"", b"[]", b"{}", self.data.replace(b"account-log-export/v1", b"account-log-export/v9"),
                     self.data.replace(b'"leaf_index":0', b'"leaf_index":-1'), self.data.replace(b'"user":"alice"', b'"user":7')):  # fmt: skip
            status, out, err = self.run_on(data)
            self.assertEqual((status, out), (2, ""), data[:80])
            self.assertTrue(err.startswith(f"securechatd-verify-log: {self.path}: "), err)
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(verify_log.main([self.path + ".absent"], out, err), 2)
        self.assertEqual(err.getvalue(), f"securechatd-verify-log: {self.path}.absent: No such file or directory\n")
        self.assertEqual(verify_log.main([self.path, "--server-key", "00"], out, io.StringIO()), 2)

    def test_as_a_subprocess_of_this_tree(self):
        run = lambda *arguments: subprocess.run(  # noqa: E731
            [sys.executable, "-m", "securechatd.verify_log", os.path.abspath(self.path), *arguments],
            cwd=self.directory, env=environment(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        done = run("--server-key", self.server_key_bytes.hex())
        self.assertEqual((done.returncode, done.stderr), (0, ""))
        self.assertTrue(done.stdout.endswith(f"verified: 4 events of alice, in the tree of 7 leaves signed {SEEN}\n"))
        which = subprocess.run(
            [sys.executable, "-c", "import securechatd.verify_log as v; print(v.__file__)"],
            cwd=self.directory, env=environment(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        self.assertEqual(which.stdout.strip(), os.path.join(SOURCE_ROOT, "securechatd", "verify_log.py"))
        self.sql(("UPDATE account_events SET event = ? WHERE rowid = ?", (self.alice(3)[1], self.alice(2)[0])))
        self.check(self.checker)
        self.checker.export(self.path)
        broken = run()
        self.assertEqual(broken.returncode, 1)
        self.assertTrue(broken.stdout.endswith("BROKEN: event #2 is missing\n"), broken.stdout)

    def test_an_export_without_a_tree_head(self):
        document = json.loads(self.data)
        document["pages"] = []
        for refused in (False, True):
            document["refused"] = refused
            status, out, _ = self.run_on(json.dumps(document).encode())
            self.assertEqual(status, 1)
            self.assertTrue(out.endswith("\nBROKEN: the server answered with no tree head\n"), out)
        document["known"]["seq"] = 3
        self.assertEqual(self.run_on(json.dumps(document).encode())[0], 2)  # (an event seen outside any tree head)
