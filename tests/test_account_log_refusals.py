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
        """A failed login like any: logged for alice, and throttled (else any certificate holder could fill
        her log, and the operator's)."""
        for _ in range(5):
            refused = self.hub.accounts.login("alice", PASSWORD, None, "10.0.0.9", None, certificate="bob")
            self.failureResultOf(refused, NotAllowed)
        self.failureResultOf(
            self.hub.accounts.login("alice", PASSWORD, None, "10.0.0.9", None, certificate="bob"), RateLimited
        )
        self.clock.advance(3600)
        self.assertIn(("the client certificate of bob", b""), self.failed())
