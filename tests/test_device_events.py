"""Device adds and revokes in the account log: stored with their chain link, or not at all.

The log is read as a client reads it (inclusion proofs checked against the
signed tree head); a failure while logging is made in the real SQLite file
by a trigger that refuses the event's row, and then neither the link nor
its event may be stored, and the publisher gets a coded error.
"""

import sqlite3

from securechatd import commands
from securechatd.commands import ServiceUnavailable
from tests.test_account_security import Client, SecurityTestCase
from tests.test_keys import Chain, Device

REFUSE_EVENTS = (
    "CREATE TRIGGER refuse_events BEFORE INSERT ON account_events"
    " BEGIN SELECT RAISE(ABORT, 'the test refuses account events'); END"
)


class DeviceEventTests(SecurityTestCase):
    def setUp(self):
        super().setUp()
        self.chain = Chain("alice")
        self.laptop = Device("laptop")
        self.conn = self.connect(device_id=self.laptop.hex)
        self.client = Client(self, self.conn, "alice", {self.laptop.id: self.laptop.sig.public_key()})

    def publish(self, link):
        return self.conn.call(commands.PublishChainLink, link=link.to_bytes())

    def accepted(self, link):
        self.ok(self.conn, commands.PublishChainLink, link=self.chain.accepted(link).to_bytes())

    def sql(self, *statements):
        """Run `statements` in the store's database file, from a connection of their own."""
        db = sqlite3.connect(self.hub.store._pool.connargs[0], isolation_level=None)
        try:
            return [db.execute(statement).fetchall() for statement in statements]
        finally:
            db.close()

    def device_events(self):
        return [(e.kind, e.device, e.target) for e in self.client.fetch() if e.kind.startswith("device_")]

    def links(self):
        return self.ok(self.conn, commands.GetDeviceChain, username="alice")["links"]

    def test_every_link_stored_has_its_event_proved_in_the_log(self):
        phone = Device("phone")
        self.accepted(self.chain.link("add", self.laptop, self.laptop))
        self.accepted(self.chain.link("add", phone, self.laptop))
        self.accepted(self.chain.link("revoke", phone, self.laptop))
        self.assertEqual(len(self.links()), 3)
        self.assertEqual(
            self.device_events(),  # (each checked with its inclusion proof against the signed head)
            [
                ("device_add", self.laptop.id, self.laptop.hex),
                ("device_add", self.laptop.id, phone.hex),
                ("device_revoke", self.laptop.id, phone.hex),
            ],
        )

    def test_an_add_whose_event_fails_is_not_stored(self):
        self.client.fetch()
        self.sql(REFUSE_EVENTS)
        link = self.chain.link("add", self.laptop, self.laptop)
        self.failureResultOf(self.publish(link), ServiceUnavailable)
        self.assertEqual(self.links(), [])
        self.assertEqual(self.sql("SELECT * FROM devices"), [[]])
        self.sql("DROP TRIGGER refuse_events")
        self.assertEqual(self.device_events(), [])
        self.accepted(link)  # nothing half-stored: the same link takes the same place
        self.assertEqual(self.device_events(), [("device_add", self.laptop.id, self.laptop.hex)])

    def test_a_revoke_whose_event_fails_is_not_stored(self):
        phone = Device("phone")
        self.accepted(self.chain.link("add", self.laptop, self.laptop))
        self.accepted(self.chain.link("add", phone, self.laptop))
        phone_conn = self.connect(device_id=phone.hex)
        self.ok(phone_conn, commands.UploadPrekeys, device_id=phone.hex, **phone.spk("alice"), one_time=[])
        self.client.fetch()
        self.sql(REFUSE_EVENTS)
        revoke = self.chain.link("revoke", phone, self.laptop)
        self.failureResultOf(self.publish(revoke), ServiceUnavailable)
        self.assertEqual(len(self.links()), 2)
        [[(revoked_seq,)], [(prekeys,)]] = self.sql(
            f"SELECT revoked_seq FROM devices WHERE device_id = '{phone.hex}'",
            f"SELECT COUNT(*) FROM signed_prekeys WHERE device_id = '{phone.hex}'",
        )
        self.assertEqual((revoked_seq, prekeys), (None, 1))  # the revoke's other changes rolled back too
        self.ok(phone_conn, commands.Ping)  # the phone's session goes on
        self.sql("DROP TRIGGER refuse_events")
        self.assertEqual(self.device_events(), [])
        self.accepted(revoke)
        self.assertEqual(self.device_events(), [("device_revoke", self.laptop.id, phone.hex)])
