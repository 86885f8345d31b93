"""Refused logins a user should hear of reach their account log, not only the operator's security log."""

from securechatd import commands
from securechatd.commands import NoSuchDevice, NotAllowed, RateLimited
from tests.helpers import Connection
from tests.test_account_security import PASSWORD, Client, Device, SecurityTestCase


class RefusalTests(SecurityTestCase):
    def failed(self):
        """The targets of alice's login_failed events, as her client reads and checks them."""
        events = Client(self, self.connect(), "alice").fetch()
        return [(event.target, event.device) for event in events if event.kind == "login_failed"]

    def test_a_device_not_in_the_chain(self):
        self.bound()  # alice has a chain
        stranger = Device()
        conn = Connection(self.hub)
        self.failureResultOf(
            conn.call(commands.Login, username="alice", password=PASSWORD, device_id=stranger.hex), NoSuchDevice
        )
        self.assertIn(("device not in the chain", stranger.id), self.failed())

    def test_a_client_certificate_of_another_account(self):
        """Logged for alice, and a failed attempt of the certificate's account: its holder is throttled (so
        nobody fills alice's log, nor the operator's), never alice, who still logs in."""
        for _ in range(5):
            refused = self.hub.accounts.login("alice", PASSWORD, None, "10.0.0.9", None, certificate="bob")
            self.failureResultOf(refused, NotAllowed)
        self.failureResultOf(
            self.hub.accounts.login("alice", PASSWORD, None, "10.0.0.9", None, certificate="bob"), RateLimited
        )
        alice = Connection(self.hub, address="10.0.0.10")
        self.ok(alice, commands.Login, username="alice", password=PASSWORD)
        failed = self.failed()
        self.assertEqual(failed.count(("the client certificate of bob", b"")), 5)
