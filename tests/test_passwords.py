"""Password rules and hashing: the whole password counts, bcrypt's 72 bytes do not."""

import errno
import os
import threading

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.trial import unittest

from securechatd.commands import WeakPassword
from securechatd.server import passwords
from securechatd.server.passwords import HashThreadPool, PasswordHasher
from tests.helpers import TEST_COST, run_now


class RuleTests(unittest.TestCase):
    def test_lengths(self):
        for bad in ["", "1234567", "x" * 1025]:
            self.assertRaises(WeakPassword, passwords.check_rule, bad)
        for good in ["12345678", "x" * 1024, "пароль-длинный"]:
            passwords.check_rule(good)


class HasherTests(unittest.TestCase):
    def setUp(self):
        self.hasher = PasswordHasher(TEST_COST, run_now)

    def hash(self, password):
        return self.successResultOf(self.hasher.hash(password))

    def verify(self, password, hashed):
        return self.successResultOf(self.hasher.verify(password, hashed))

    def test_round_trip(self):
        hashed = self.hash("correct horse")
        self.assertTrue(hashed.startswith(f"$2b$0{TEST_COST}$"))
        self.assertNotIn("correct horse", hashed)
        self.assertTrue(self.verify("correct horse", hashed))
        self.assertFalse(self.verify("correct horsE", hashed))

    def test_bytes_after_72_count(self):
        base = "a" * 100
        hashed = self.hash(base + "1")
        self.assertFalse(self.verify(base + "2", hashed))
        self.assertTrue(self.verify(base + "1", hashed))

    def test_multibyte_password_over_72_bytes(self):
        password = "ж" * 500  # 1000 bytes of UTF-8
        self.assertTrue(self.verify(password, self.hash(password)))
        self.assertFalse(self.verify("ж" * 499 + "з", self.hash(password)))

    def test_unicode_forms_match(self):
        composed, decomposed = "caf\u00e9 au lait", "cafe\u0301 au lait"
        self.assertTrue(self.verify(decomposed, self.hash(composed)))

    def test_no_stored_hash_never_verifies(self):
        self.assertFalse(self.verify("anything at all", None))

    def test_rehash_when_cost_changes(self):
        hashed = self.hash("correct horse")
        self.assertFalse(self.hasher.needs_rehash(hashed))
        self.assertTrue(PasswordHasher(TEST_COST + 1, run_now).needs_rehash(hashed))


def niceness():
    """The calling thread's own nice value."""
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


class HashThreadPoolTests(unittest.TestCase):
    """bcrypt's threads run `hash_nice` steps nicer than the daemon; the reactor's thread does not."""

    def run_on_every_thread(self, nice, threads=2):
        """Deferred firing with [(thread id, niceness)], one job on each of `threads` threads."""
        pool = HashThreadPool(nice, minthreads=0, maxthreads=threads, name="test-bcrypt")
        pool.start()
        self.addCleanup(pool.stop)
        everyone = threading.Barrier(threads, timeout=30)  # no job ends before all have a thread

        def job():
            everyone.wait()
            return threading.get_native_id(), niceness()

        return gatherResults([deferToThreadPool(reactor, pool, job) for _ in range(threads)])

    @inlineCallbacks
    def test_threads_run_at_configured_niceness(self):
        before = niceness()
        seen = yield self.run_on_every_thread(5)
        self.assertEqual(len({tid for tid, _ in seen}), 2)
        self.assertEqual([nice for _, nice in seen], [min(19, before + 5)] * 2)
        self.assertEqual(niceness(), before)

    @inlineCallbacks
    def test_zero_keeps_the_daemons_niceness(self):
        seen = yield self.run_on_every_thread(0)
        self.assertEqual([nice for _, nice in seen], [niceness()] * 2)

    @inlineCallbacks
    def test_refused_priority_is_logged_once_and_hashing_goes_on(self):
        def refuse(nice):
            raise PermissionError(errno.EPERM, "Operation not permitted")

        events = []
        self.patch(passwords, "lower_thread_priority", refuse)
        self.patch(passwords, "log", Logger(observer=events.append))
        seen = yield self.run_on_every_thread(5)
        self.assertEqual([nice for _, nice in seen], [niceness()] * 2)
        self.assertEqual(len(events), 1)
        self.assertIn("Operation not permitted", events[0]["problem"])
