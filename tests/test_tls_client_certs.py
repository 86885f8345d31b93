"""Client certificates (mutual TLS) against the real daemon over TLS on 127.0.0.1.

`securechatd-admin certs --client USER` (certs.write_client_cert) makes the
certificates from the daemon's own CA; a certificate names the only account
that may log in (Login and Resume) on its connection; with `required` a
connection without one, or with one from another CA, does not get past TLS.
"""

import os

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from securechatd import commands
from securechatd.certs import write_certs, write_client_cert
from securechatd.commands import NotAllowed
from tests.helpers import connected_client, start_daemon, wall_now

PASSWORD = "correct horse battery"


class ClientCertTestCase(unittest.TestCase):
    mode = "required"

    def setUp(self):
        self.port, self.ca, self.hub = start_daemon(self, reactor, client_certificates=self.mode)
        self.certs = os.path.dirname(self.ca)
        for name in ("alice", "bob"):
            write_client_cert(self.certs, name, now=wall_now())

    def connect(self, name=None, directory=None):
        """Deferred TLS connection presenting `name`'s certificate (from `directory`), or none."""
        directory = directory or self.certs
        cert = {} if name is None else {
            "client_cert": os.path.join(directory, f"{name}.pem"),
            "client_key": os.path.join(directory, f"{name}.key"),
        }
        return connected_client(self, reactor, self.port, self.ca, **cert)

    @inlineCallbacks
    def refused_at_tls(self, client):
        """The connection does not get past TLS: its first command fails, the daemon has no session."""
        outcome = []
        yield client.callRemote(commands.Register, username="carol", password=PASSWORD).addBoth(outcome.append)
        self.assertTrue(hasattr(outcome[0], "value"), outcome)
        self.assertNotIsInstance(outcome[0].value, commands.ChatError)
        self.assertIsNone((yield self.hub.store.get_credentials("carol")))


class AnotherCa:
    """Required or allowed alike: a certificate from another CA does not get past TLS."""

    @inlineCallbacks
    def test_a_certificate_of_another_ca(self):
        other = self.mktemp()
        write_certs(other, ["localhost"], now=wall_now())
        write_client_cert(other, "alice", now=wall_now())
        yield self.refused_at_tls((yield self.connect("alice", other)))


class RequiredTests(AnotherCa, ClientCertTestCase):
    @inlineCallbacks
    def test_the_right_certificate(self):
        alice = yield self.connect("alice")
        yield alice.callRemote(commands.Register, username="alice", password=PASSWORD)
        answer = yield alice.callRemote(commands.Login, username="Alice", password=PASSWORD)
        self.assertEqual(answer["username"], "alice")
        again = yield self.connect("alice")
        yield again.callRemote(commands.Resume, username="alice", resume_token=answer["resume_token"])

    @inlineCallbacks
    def test_a_certificate_for_another_account(self):
        alice = yield self.connect("alice")
        with self.assertRaises(NotAllowed) as refused:  # (nor can it take the name issued to another)
            yield alice.callRemote(commands.Register, username="bob", password=PASSWORD)
        self.assertIn("client certificate is for another account", str(refused.exception))
        bob = yield self.connect("bob")
        yield bob.callRemote(commands.Register, username="bob", password=PASSWORD)
        with self.assertRaises(NotAllowed) as refused:
            yield alice.callRemote(commands.Login, username="bob", password=PASSWORD)
        self.assertIn("client certificate is for another account", str(refused.exception))
        token = (yield bob.callRemote(commands.Login, username="bob", password=PASSWORD))["resume_token"]
        with self.assertRaises(NotAllowed):
            yield alice.callRemote(commands.Resume, username="bob", resume_token=token)
        yield bob.callRemote(commands.Ping)  # (bob's session carries on)

    @inlineCallbacks
    def test_no_certificate(self):
        yield self.refused_at_tls((yield self.connect()))


class AllowedTests(AnotherCa, ClientCertTestCase):
    mode = "allowed"

    @inlineCallbacks
    def test_without_a_certificate_the_password_alone(self):
        plain = yield self.connect()
        yield plain.callRemote(commands.Register, username="bob", password=PASSWORD)
        yield plain.callRemote(commands.Login, username="bob", password=PASSWORD)

    @inlineCallbacks
    def test_with_one_only_its_account(self):
        yield (yield self.connect()).callRemote(commands.Register, username="bob", password=PASSWORD)
        alice = yield self.connect("alice")
        with self.assertRaises(NotAllowed):
            yield alice.callRemote(commands.Register, username="carol", password=PASSWORD)
        with self.assertRaises(NotAllowed):
            yield alice.callRemote(commands.Login, username="bob", password=PASSWORD)

