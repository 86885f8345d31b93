"""The login and registration throttles under concurrent load, over real TLS on 127.0.0.1."""

from twisted.internet import reactor
from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.trial import unittest

from securechatd import commands
from tests.helpers import connected_client, start_daemon

PASSWORD = "correct horse battery"


class ThrottleUnderLoadTests(unittest.TestCase):
    def setUp(self):
        self.port, self.ca, self.hub = start_daemon(
            self, reactor, registration_exempt=(), unauthenticated_per_address=100
        )

    @inlineCallbacks
    def clients(self, count):
        connected = yield DeferredList(
            [connected_client(self, reactor, self.port, self.ca) for _ in range(count)], consumeErrors=True
        )
        return [client for ok, client in connected if ok]

    @inlineCallbacks
    def outcomes(self, calls):
        results = yield DeferredList(calls, consumeErrors=True)
        counts = {}
        for ok, result in results:
            name = "ok" if ok else type(result.value).__name__
            counts[name] = counts.get(name, 0) + 1
        return counts

    @inlineCallbacks
    def test_concurrent_guesses_at_one_account(self):
        [setup] = yield self.clients(1)
        self.hub.accounts.registration_exempt = frozenset(["127.0.0.1"])
        yield setup.callRemote(commands.Register, username="alice", password=PASSWORD)
        guessers = yield self.clients(30)
        counts = yield self.outcomes(
            [c.callRemote(commands.Login, username="alice", password=f"guess number {i}") for i, c in enumerate(guessers)]
        )
        self.assertEqual(counts, {"BadCredentials": 5, "RateLimited": 25})
        with self.assertRaises(commands.RateLimited):  # even the right password waits now
            yield setup.callRemote(commands.Login, username="alice", password=PASSWORD)

    @inlineCallbacks
    def test_concurrent_guesses_from_one_address(self):
        guessers = yield self.clients(30)
        counts = yield self.outcomes(
            [c.callRemote(commands.Login, username=f"user{i}", password="guess number 1") for i, c in enumerate(guessers)]
        )
        self.assertEqual(counts, {"BadCredentials": 20, "RateLimited": 10})

    @inlineCallbacks
    def test_concurrent_registrations_from_one_address(self):
        clients = yield self.clients(10)
        counts = yield self.outcomes(
            [c.callRemote(commands.Register, username=f"user{i}", password=PASSWORD) for i, c in enumerate(clients)]
        )
        self.assertEqual(counts, {"ok": 1, "RateLimited": 9})
        self.assertEqual(len((yield self.hub.store.list_users())), 1)
