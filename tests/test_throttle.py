"""Throttling with task.Clock: account delays, address windows, bounded memory."""

from twisted.internet import task
from twisted.trial import unittest

from securechatd.commands import RateLimited
from securechatd.server.throttle import AccountDelay, LoginThrottle, WindowCounter, retry_text


class WindowCounterTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.counter = WindowCounter(self.clock, limit=2, window=10)

    def test_limit_within_window(self):
        self.counter.record("a")
        self.clock.advance(3)
        self.counter.record("a")
        self.assertEqual(self.counter.retry_after("a"), 7)
        self.assertEqual(self.counter.retry_after("b"), 0)
        self.clock.advance(7)
        self.assertEqual(self.counter.retry_after("a"), 0)

    def test_sliding(self):
        for _ in range(5):
            self.counter.record("a")
            self.clock.advance(6)
        self.assertEqual(self.counter.retry_after("a"), 0)

    def test_stale_keys_are_swept(self):
        for i in range(5000):
            self.counter.record(f"address{i}")
        self.clock.advance(10)
        for i in range(5000):
            self.counter.record(f"fresh{i}")
        self.assertLessEqual(len(self.counter._events), 5000 + 1024)


class AccountDelayTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.delay = AccountDelay(self.clock, free=3, max_delay=8, window=100)

    def fail_times(self, count):
        for _ in range(count):
            self.delay.record("alice")

    def test_free_failures(self):
        self.fail_times(2)
        self.assertEqual(self.delay.retry_after("alice"), 0)

    def test_doubling_up_to_max(self):
        waits = []
        for _ in range(7):
            self.delay.record("alice")
            waits.append(self.delay.retry_after("alice"))
        self.assertEqual(waits, [0, 0, 1, 2, 4, 8, 8])

    def test_success_resets(self):
        self.fail_times(4)
        self.delay.forget("alice")
        self.assertEqual(self.delay.retry_after("alice"), 0)

    def test_quiet_window_resets(self):
        self.fail_times(6)
        self.clock.advance(100)
        self.delay.record("alice")
        self.assertEqual(self.delay.retry_after("alice"), 0)


class LoginThrottleTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.throttle = LoginThrottle(self.clock, 5, 900, 20, 3600)

    def fail(self, account, address):
        self.throttle.begin(account, address)
        self.throttle.end(account, address, False)

    def test_account_wait_even_for_right_password(self):
        for _ in range(5):
            self.fail("alice", "10.0.0.1")
        with self.assertRaises(RateLimited) as raised:
            self.throttle.begin("alice", "10.0.0.2")
        self.assertIn("retry in 1 second", str(raised.exception))
        self.throttle.begin("bob", "10.0.0.1")

    def test_address_block_spans_accounts(self):
        for i in range(20):
            self.fail(f"user{i}", "10.0.0.1")
        with self.assertRaises(RateLimited) as raised:
            self.throttle.begin("alice", "10.0.0.1")
        self.assertIn("retry in 3600 seconds", str(raised.exception))
        self.throttle.begin("alice", "10.0.0.2")
        self.clock.advance(3600)
        self.throttle.begin("alice", "10.0.0.1")

    def test_concurrent_guesses_count_while_in_flight(self):
        for _ in range(5):
            self.throttle.begin("alice", "10.0.0.1")  # five checks under way at once
        with self.assertRaises(RateLimited) as raised:
            self.throttle.begin("alice", "10.0.0.2")
        self.assertIn("retry in 1 second", str(raised.exception))
        for _ in range(5):
            self.throttle.end("alice", "10.0.0.1", None)  # (e.g. they turned out right)
        self.throttle.begin("alice", "10.0.0.2")

    def test_concurrent_guesses_per_address(self):
        for i in range(20):
            self.throttle.begin(f"user{i}", "10.0.0.1")
        self.assertRaises(RateLimited, self.throttle.begin, "alice", "10.0.0.1")
        self.throttle.end("user0", "10.0.0.1", True)
        self.throttle.begin("alice", "10.0.0.1")


class AddressKeyTests(unittest.TestCase):
    def test_ipv6_counts_per_64(self):
        from securechatd.server.throttle import address_key

        self.assertEqual(address_key("2001:db8:1:2:aaaa::1"), address_key("2001:db8:1:2:bbbb::9"))
        self.assertNotEqual(address_key("2001:db8:1:2::1"), address_key("2001:db8:1:3::1"))
        self.assertEqual(address_key("192.0.2.7"), "192.0.2.7")


class RetryTextTests(unittest.TestCase):
    def test_whole_seconds_rounded_up_and_counted_right(self):
        self.assertEqual(
            [retry_text(s) for s in (0.2, 1, 1.5, 600)],
            ["retry in 1 second", "retry in 1 second", "retry in 2 seconds", "retry in 600 seconds"],
        )
