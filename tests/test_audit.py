"""The audit log, closed registration with invitations, and what never reaches a log."""

import json
import os
import stat

from twisted.internet import task
from twisted.logger import LogPublisher
from twisted.trial import unittest

from securechatd import audit, commands
from securechatd.commands import NotAllowed
from securechatd.server.passwords import token_hash
from securechatd.server.services import AuditLogService
from tests.helpers import Connection, make_hub

PASSWORD = "audit test password 7d1c"
BODY = "audit test body 93fe"


class AuditLogTests(unittest.TestCase):
    def setUp(self):
        self.path = self.mktemp()
        self.publisher = LogPublisher()
        self.service = AuditLogService(self.path, self.publisher)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        import securechatd.server.accounts as accounts_module
        import securechatd.server.hub as hub_module

        for module in (accounts_module, hub_module):
            self.patch(module.security, "observer", self.publisher)

    def lines(self):
        with open(self.path) as f:
            return [json.loads(line) for line in f]

    def test_security_events_only_and_private(self):
        clock = task.Clock()
        hub = make_hub(self, clock=clock)
        conn = Connection(hub)
        self.successResultOf(conn.call(commands.Register, username="alice", password=PASSWORD))
        self.failureResultOf(conn.call(commands.Login, username="alice", password="wrong password"))
        answer = self.successResultOf(conn.call(commands.Login, username="alice", password=PASSWORD))
        self.successResultOf(
            conn.call(commands.ChangePassword, old_password=PASSWORD, new_password=PASSWORD + "!")
        )
        conn.drop()
        self.assertEqual(
            [(line["event"], line.get("username")) for line in self.lines()],
            [
                ("register", "alice"),
                ("login_failed", "alice"),
                ("login", "alice"),
                ("password_changed", "alice"),
                ("session_end", "alice"),
            ],
        )
        self.assertEqual(self.lines()[1]["address"], "10.0.0.1")
        with open(self.path) as f:
            text = f.read()
        for secret in (PASSWORD, "wrong password", answer["resume_token"], "$2b$"):
            self.assertNotIn(secret, text)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_unknown_fields_are_not_written(self):
        self.publisher({"security_event": "login", "username": "bob", "password": "hunter22", "log_time": 0})
        self.publisher({"log_format": "not a security event", "log_time": 0})
        [line] = self.lines()
        self.assertEqual(line, {"event": "login", "time": "1970-01-01T00:00:00+00:00", "username": "bob"})

    def test_admin_record(self):
        audit.record(self.path, "admin_adduser", 1_700_000_000, target="carol", method="admin")
        [line] = self.lines()
        self.assertEqual((line["target"], line["time"]), ("carol", "2023-11-14T22:13:20+00:00"))


class ClosedRegistrationTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.hub = make_hub(self, clock=self.clock, registration="closed")
        self.store = self.hub.store

    def invite(self, token="invitation-1", days=7):
        now = self.clock.seconds()
        self.successResultOf(self.store.add_invite(token_hash(token), now, now + days * 86400))
        return token

    def register(self, username, **kw):
        return Connection(self.hub).call(commands.Register, username=username, password=PASSWORD, **kw)

    def test_needs_an_invitation(self):
        self.failureResultOf(self.register("alice"), NotAllowed)
        self.failureResultOf(self.register("alice", invite="made-up"), NotAllowed)
        self.assertEqual(self.successResultOf(self.store.list_users()), [])

    def test_invitation_is_single_use(self):
        token = self.invite()
        self.successResultOf(self.register("alice", invite=token))
        self.failureResultOf(self.register("bob", invite=token), NotAllowed)
        self.assertEqual(self.successResultOf(self.store.list_users()), ["alice"])

    def test_taken_name_does_not_spend_the_invitation(self):
        self.successResultOf(self.register("alice", invite=self.invite("first")))
        token = self.invite("second")
        self.failureResultOf(self.register("alice", invite=token), commands.UsernameTaken)
        self.successResultOf(self.register("bob", invite=token))

    def test_invitation_expires(self):
        token = self.invite(days=1)
        self.clock.advance(86400)
        self.failureResultOf(self.register("alice", invite=token), NotAllowed)
