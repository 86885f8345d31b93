"""Smoke test of the load generator: every workload, tiny, against a daemon it starts itself.

Each run is `python -m bench ...` as a subprocess, the way it is used; it
must print exactly one JSON line holding its figures. Nothing here asserts
a speed: performance is measured by bench/, never by the test suite.
"""

import json
import os
import subprocess
import sys

from twisted.trial import unittest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = {
    "workload",
    "server",
    "fresh_daemon",
    "bcrypt_cost",
    "securechatd_commit",
    "tree_dirty",
    "daemon_log",
    "started_at",
}
TRAFFIC = {"sent", "delivered", "expected", "p50_ms", "p99_ms", "answer_p50_ms", "answer_p99_ms"}
ENVELOPE = {"header_bytes", "body_bytes", "wrap_bytes", "wraps_per_message", "sealing", "deliver_encrypted_received"}
CPU = {"wall_s", "server_cpu_s", "server_cpu_util", "per_server_cpu_s", "client_cpu_s", "server_rss_kb"}


def run_bench(*arguments):
    """`python -m bench ARGUMENTS` in the repository: the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "bench", *arguments], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def bench(*arguments, daemon=True):
    """Run the bench (against a daemon: with bcrypt's lowest allowed cost); its one line of JSON."""
    ran = run_bench(*arguments, *(("--bcrypt-cost", "10", "--timeout", "60") if daemon else ()))
    lines = ran.stdout.splitlines()
    if ran.returncode or len(lines) != 1:
        raise AssertionError(f"bench {arguments} exited {ran.returncode}:\n{ran.stdout}\n{ran.stderr[-3000:]}")
    return json.loads(lines[0])


class BenchSmokeTests(unittest.TestCase):
    def check(self, result, workload, keys):
        self.assertNotIn("error", result)
        self.assertEqual(result["workload"], workload)
        self.assertLessEqual(COMMON | keys, set(result), sorted(COMMON | keys - set(result)))
        self.assertTrue(result["fresh_daemon"])
        self.assertEqual(result["bcrypt_cost"], 10)

    def test_logins(self):
        result = bench("logins", "-n", "3")
        self.check(result, "logins", CPU | {"logins_per_s", "p50_ms", "p99_ms", "ok", "concurrency"})
        self.assertEqual((result["method"], result["ok"], result["errors"]), ("password", 3, {}))

    def test_logins_resume(self):
        result = bench("logins", "-n", "4", "--resume", "--concurrency", "2")
        self.check(result, "logins", CPU | {"logins_per_s", "p50_ms", "p99_ms"})
        self.assertEqual((result["method"], result["ok"], result["concurrency"]), ("resume", 4, 2))

    def test_direct(self):
        result = bench("direct", "-n", "4", "-m", "5", "-w", "2")
        self.check(result, "direct", CPU | TRAFFIC | {"msgs_per_s", "persisted", "window"})
        self.assertEqual((result["sent"], result["delivered"], result["expected"]), (20, 20, 20))
        self.assertFalse(result["timed_out"])
        self.assertFalse(result["encrypted"])

    def test_fanout(self):
        result = bench("fanout", "-k", "3", "-m", "3", "-w", "2")
        self.check(result, "fanout", CPU | TRAFFIC | {"deliveries_per_s", "pacing", "room_msgs_per_s"})
        self.assertEqual((result["sent"], result["delivered"]), (9, 18))

    def test_direct_encrypted(self):
        result = bench("direct", "--encrypted", "-n", "4", "-m", "5", "-w", "2")
        self.check(result, "direct", CPU | TRAFFIC | ENVELOPE | {"msgs_per_s", "persisted", "window"})
        self.assertTrue(result["encrypted"])
        self.assertEqual((result["sent"], result["delivered"], result["expected"]), (20, 20, 20))
        self.assertEqual((result["deliver_encrypted_received"], result["plaintext_deliver_received"]), (20, 0))
        self.assertEqual((result["send_errors"], result["timed_out"]), ({}, False))
        self.assertEqual((result["wraps_per_message"], result["wrap_bytes"], result["body_bytes"]), (1, 89, 272))
        self.assertEqual(result["raised_limits"]["messages"], {"plaintext": "allowed"})  # as the plaintext runs

    def test_fanout_encrypted(self):
        result = bench("fanout", "--encrypted", "-k", "3", "-m", "3", "-w", "2")
        self.check(result, "fanout", CPU | TRAFFIC | ENVELOPE | {"deliveries_per_s", "room_msgs_per_s"})
        self.assertTrue(result["encrypted"])
        self.assertEqual((result["sent"], result["delivered"], result["send_errors"]), (9, 18, {}))
        self.assertEqual((result["deliver_encrypted_received"], result["plaintext_deliver_received"]), (18, 0))
        self.assertEqual(result["wraps_per_message"], 2)

    def test_encrypted_is_for_direct_and_fanout(self):
        ran = run_bench("idle", "--encrypted")
        self.assertNotEqual(ran.returncode, 0)
        self.assertIn("--encrypted is an option of direct and fanout", ran.stderr)
        self.assertEqual(ran.stdout, "")

    def test_client_crypto(self):
        arguments = ("--devices", "1,3", "--iterations", "3", "--history", "0,5", "--saves", "1", "--repeat", "1")
        result = bench("client-crypto", *arguments, daemon=False)
        self.assertEqual((result["workload"], result["run"], result["wrap_bytes"]), ("client-crypto", 1, 89))
        figures = {"seal_1_us", "seal_3_us", "seal_1_sessions_us", "seal_3_sessions_us", "open_us", "open_sessions_us",
                   "open_after_reply_us", "save_0_cpu_us", "save_5_wall_us", "save_5_file_bytes",
                   "sign_us", "check_signature_us", "link_us", "head_sign_us", "check_receipt_us"}
        self.assertLessEqual(figures, set(result), sorted(figures - set(result)))
        self.assertTrue(all(result[name] > 0 for name in figures))
        self.assertGreater(result["save_5_file_bytes"], result["save_0_file_bytes"])

    def test_idle(self):
        result = bench("idle", "-c", "5", "--hold", "0.1")
        self.check(result, "idle", CPU | {"rss_per_conn_kb", "server_rss_before_kb", "server_rss_after_kb"})
        self.assertEqual(result["connected"], 5)

    def test_storm(self):
        result = bench("storm", "-n", "2", "--logins", "2", "--duration", "0.3", "--rate", "20")
        self.check(result, "storm", {"p99_ms_without_storm", "p99_ms_with_storm", "without_storm", "with_storm"})
        self.assertEqual(result["with_storm"]["ok"], 2)
        self.assertLessEqual({"p50_ms", "p99_ms", "server_cpu_s"}, set(result["without_storm"]))

    def test_offline(self):
        result = bench("offline", "-p", "20")
        self.check(result, "offline", CPU | {"msgs_per_s", "flush_s", "rss_growth_kb", "server_rss_peak_kb"})
        self.assertEqual((result["received"], result["duplicates"], result["in_order"]), (20, 0, True))

    def test_flood(self):
        result = bench("flood", "--flooders", "0,1", "--duration", "1", "--outstanding", "64", "--rate", "5")
        self.check(result, "flood", {"phases", "canary_p99_ms_0", "canary_p99_ms_1", "server_cpu_util_1", "flood_refused_1"})
        self.assertNotIn("message_burst", result["raised_limits"]["limits"])  # the daemon's default limit
        self.assertEqual(result["canary_send_errors"], {})
        quiet, flooded = result["phases"]
        self.assertEqual((quiet["flooders"], quiet["flood_sent"], flooded["flooders"]), (0, 0, 1))
        self.assertGreater(quiet["canary_delivered"], 0)
        self.assertGreater(flooded["flood_refused"], 0)
        self.assertLess(flooded["flood_stored"], flooded["flood_sent"])
        self.assertLessEqual({"canary_p50_ms", "canary_p99_ms", "server_cpu_s", "flood_unanswered"}, set(flooded))

    def test_killloop(self):
        result = bench("killloop", "--rounds", "2", "-n", "4", "-w", "2", "--duration", "0.4")
        self.check(result, "killloop", {"repeats", "repeat_age_max_ms", "delivered_before_kills", "per_round"})
        self.assertEqual([r["round"] for r in result["per_round"]], [0, 1])
        self.assertGreater(result["delivered_before_kills"], 0)
        for r in result["per_round"]:
            self.assertLessEqual(r["repeats"], min(r["pushed_after_restart"], r["delivered_before_kill"]))
