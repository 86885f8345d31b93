"""The key directory (docs/PROTOCOL.md, "Devices and keys"): chains, prekeys, device-bound sessions.

Links and prekeys are made here with `cryptography` and e2ee.chain/encoding
directly, as any client would. Most tests go through the real protocol
(iosim); races and the store's own guarantees are tested one layer down.
"""

import json
import os
import sqlite3
import struct
from dataclasses import replace

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from twisted.internet import defer, task
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from securechatd import commands, tap
from securechatd.audit import audit_line
from securechatd.commands import (
    AuthRequired,
    BadCredentials,
    BadSignature,
    InvalidArgument,
    NoSuchDevice,
    NoSuchUser,
    NotAllowed,
    RateLimited,
)
from securechatd.config import Settings
from securechatd.e2ee.chain import ZERO_HASH, Link, device_id
from securechatd.e2ee.encoding import enc, sign
from securechatd.server.framing import VALUE_LIMIT
from securechatd.server.passwords import PasswordHasher
from securechatd.store import Store
from securechatd.store.dialect import connect, open_pool
from securechatd.store.keys import NewLink
from securechatd.store.migrations import upgrade
from tests.helpers import (
    TEST_COST,
    Connection,
    _NoThreadsReactor,
    connected_client,
    make_hub,
    make_store,
    run_now,
    settle,
    start_daemon,
)
from tests.test_services import RecordingClient
from tests.test_store import GatedPool

PASSWORD = "correct horse battery"
NOW = 1_700_000_000
# docs/E2EE.md's labels, spelled out here rather than taken from the code under test
LINK_LABEL = "securechatd/chain-link/v1"
COUNTERSIGN_LABEL = "securechatd/chain-countersign/v1"
SPK_LABEL = "securechatd/spk/v1"


class Device:
    """A client's device as the tests need it: its key pairs, made with cryptography directly."""

    def __init__(self, name="laptop"):
        self.name = name
        self.sig = Ed25519PrivateKey.generate()
        self.dh = X25519PrivateKey.generate()
        self.sig_pub = self.sig.public_key().public_bytes_raw()
        self.dh_pub = self.dh.public_key().public_bytes_raw()
        self.id = device_id(self.sig_pub)
        self.hex = self.id.hex()

    def spk(self, user, spk_id=1, key=None):
        """Signed prekey arguments of UploadPrekeys, signed by this device (or `key`)."""
        spk_pub = X25519PrivateKey.generate().public_key().public_bytes_raw()
        signature = sign(key or self.sig, SPK_LABEL, [user, self.id, struct.pack(">I", spk_id), spk_pub])
        return {"spk_id": spk_id, "spk_pub": spk_pub, "spk_signature": signature}


def one_time(ids):
    return [{"opk_id": i, "opk_pub": X25519PrivateKey.generate().public_key().public_bytes_raw()} for i in ids]


class Chain:
    """A user's chain as its client keeps it: the links it made, and `link` to make the next."""

    def __init__(self, user):
        self.user = user
        self.links = []

    def head(self):
        return (len(self.links), self.links[-1].hash() if self.links else ZERO_HASH)

    def link(self, op, device, signer, name=None, **changes):
        """The next link, signed by `signer` and (an add) countersigned by `device`.

        `changes` alter the link before it is signed.
        """
        seq, prev = self.head()
        add = op == "add"
        link = Link(
            self.user,
            seq + 1,
            prev,
            op,
            device.id,
            device.sig_pub if add else b"",
            device.dh_pub if add else b"",
            (device.name if name is None else name) if op != "revoke" else "",
            signer.id,
        )
        link = replace(link, **changes)
        link = replace(link, signature=sign(signer.sig, LINK_LABEL, link.fields()))
        if add:
            link = replace(link, countersignature=sign(device.sig, COUNTERSIGN_LABEL, link.fields()))
        return link

    def accepted(self, link):
        self.links.append(link)
        return link


class KeysTestCase(unittest.TestCase):
    """Users alice, bob and carol; bob is logged in as a witness that must never be disturbed."""

    settings = {}

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.hub = make_hub(self, clock=self.clock, **self.settings)
        setup = Connection(self.hub)
        for name in ("alice", "bob", "carol"):
            self.successResultOf(setup.call(commands.Register, username=name, password=PASSWORD))
        self.witness = self.connect("bob")
        self.chains = {}

    def connect(self, username, device=None, **arguments):
        conn = Connection(self.hub)
        if device is not None:
            arguments["device_id"] = device.hex
        conn.login = self.ok(conn, commands.Login, username=username, password=PASSWORD, **arguments)
        return conn

    def ok(self, conn, command, **arguments):
        return self.successResultOf(conn.call(command, **arguments))

    def refused(self, conn, error, command, **arguments):
        """The command fails with `error`; the connection still answers, and so do other users'."""
        failure = self.failureResultOf(conn.call(command, **arguments), error)
        self.assertFalse(conn.server.lost)
        self.ok(conn, commands.Ping)
        self.ok(self.witness, commands.ListUsers)
        return str(failure.value)

    def refused_link(self, conn, error, link):
        """PublishChainLink of `link` (a Link or bytes) fails with `error`, as `refused` checks."""
        data = link.to_bytes() if isinstance(link, Link) else link
        return self.refused(conn, error, commands.PublishChainLink, link=data)

    def chain(self, user):
        return self.chains.setdefault(user, Chain(user))

    def publish(self, conn, link):
        """Publish `link` (accepted): the answer."""
        answer = self.ok(conn, commands.PublishChainLink, link=link.to_bytes())
        self.chain(link.user).accepted(link)
        return answer

    def first_device(self, user="alice", name="laptop"):
        """A logged-in connection of a new device of `user` that starts their chain: (conn, device)."""
        device = Device(name)
        conn = self.connect(user, device)
        self.publish(conn, self.chain(user).link("add", device, device))
        return conn, device

    def add_device(self, conn, signer, user="alice", name="phone"):
        """A new device of `user`, added by `signer` on `conn`, and logged in: (its conn, device)."""
        device = Device(name)
        self.publish(conn, self.chain(user).link("add", device, signer))
        return self.connect(user, device), device

    def links(self, conn, username, **arguments):
        return self.ok(conn, commands.GetDeviceChain, username=username, **arguments)

    def upload(self, conn, user, device, ids=(), **changes):
        arguments = {"device_id": device.hex, **device.spk(user), "one_time": one_time(ids), **changes}
        return self.ok(conn, commands.UploadPrekeys, **arguments)["count"]

    def settle(self, *conns):
        settle(self.clock, conns, turns=1)


# -- chains ------------------------------------------------------------------------------


class PublishTests(KeysTestCase):
    def test_the_first_link_is_trusted_on_first_use(self):
        alice, device = self.first_device()
        [link] = self.chain("alice").links
        self.assertEqual(self.links(self.witness, "alice"), {"links": [link.to_bytes()], "has_more": False})
        self.assertEqual(self.chain("alice").head(), (1, link.hash()))

    def test_the_answer_is_the_new_seq_and_hash(self):
        device = Device()
        conn = self.connect("alice", device)
        link = self.chain("alice").link("add", device, device)
        answer = self.ok(conn, commands.PublishChainLink, link=link.to_bytes())
        self.assertEqual(answer, {"seq": 1, "hash": link.hash()})

    def test_a_session_bound_to_no_device_may_start_the_chain(self):
        conn, device = self.connect("alice"), Device()
        self.publish(conn, self.chain("alice").link("add", device, device))
        self.assertEqual(len(self.links(self.witness, "alice")["links"]), 1)

    def test_devices_add_rename_and_revoke_each_other(self):
        laptop_conn, laptop = self.first_device()
        phone_conn, phone = self.add_device(laptop_conn, laptop)
        self.publish(phone_conn, self.chain("alice").link("name", laptop, phone, name="old laptop"))
        self.publish(phone_conn, self.chain("alice").link("revoke", laptop, phone))
        links = self.links(self.witness, "alice")["links"]
        self.assertEqual(links, [link.to_bytes() for link in self.chain("alice").links])
        self.assertEqual([Link.from_bytes(data).op for data in links], ["add", "add", "name", "revoke"])

    def test_the_golden_chain_of_the_e2ee_spec(self):
        """tests/vectors/golden_chain.json (made by the client side): the server takes it as it is."""
        path = os.path.join(os.path.dirname(__file__), "vectors", "golden_chain.json")
        with open(path, encoding="utf-8") as f:
            golden = json.load(f)
        sessions = {}  # device id -> a connection bound to it, logged in once the chain lists it
        for link in golden["links"]:
            data = bytes.fromhex(link["bytes"])
            signer = Link.from_bytes(data).signer.hex()
            if signer not in sessions:
                sessions[signer] = self.connect("alice", device_id=signer)
            answer = self.ok(sessions[signer], commands.PublishChainLink, link=data)
            self.assertEqual(answer, {"seq": link["seq"], "hash": bytes.fromhex(link["hash"])})
        published = [bytes.fromhex(link["bytes"]) for link in golden["links"]]
        self.assertEqual(self.links(self.witness, "alice")["links"], published)
        laptop, phone = (sessions[device["device_id"]] for device in golden["devices"])
        [device] = self.ok(phone, commands.ListDevices)["devices"]
        self.assertEqual({device["device_id"]: device["name"]}, golden["final"]["devices"])
        self.settle(laptop)
        self.assertTrue(laptop.server.lost)  # the revoked laptop's session ended

    def test_malformed_links(self):
        conn, device = self.connect("alice"), Device()
        good = self.chain("alice").link("add", device, device)
        data = good.to_bytes()
        bad = {
            "empty": b"",
            "garbage": b"\xff" * 40,
            "truncated": data[:-1],
            "a field too many": data + enc([b"x"]),
            "too long": data + b"\x00" * commands.MAX_LINK_BYTES,
            "unknown op": replace(good, op="rotate").to_bytes(),
            "device id not its key's": replace(good, device=Device().id).to_bytes(),
            "short key": replace(good, sig_pub=good.sig_pub[:31]).to_bytes(),
            "short signature": replace(good, signature=good.signature[:63]).to_bytes(),
            "seq of 4 bytes": enc([*good.fields()[:1], b"\x00\x00\x00\x01", *good.fields()[2:]] + [b"s" * 64] * 2),
            "a revoke with keys": replace(good, op="revoke", countersignature=b"").to_bytes(),
            "user not UTF-8": enc([b"\xff", *good.fields()[1:], good.signature, good.countersignature]),
        }
        for what, link in bad.items():
            text = self.refused_link(conn, InvalidArgument, link)
            self.assertTrue(text.startswith(("Not a chain link", "A chain link is at most")), (what, text))
        self.assertEqual(self.links(self.witness, "alice")["links"], [])
        self.publish(conn, good)  # nothing was half-stored: the chain starts as if they never came

    def test_a_link_of_another_users_chain(self):
        conn, device = self.connect("alice"), Device()
        text = self.refused_link(conn, NotAllowed, Chain("bob").link("add", device, device))
        self.assertIn("your own", text)
        self.assertEqual(self.links(conn, "bob")["links"], [])

    def test_a_user_name_must_match_exactly(self):
        conn, device = self.connect("alice"), Device()
        link = Chain("Alice").link("add", device, device)
        self.refused_link(conn, NotAllowed, link)

    def test_stale_and_skipping_links_are_refused(self):
        conn, laptop = self.first_device()
        chain = self.chain("alice")
        phone, tablet = Device("phone"), Device("tablet")
        first = chain.link("add", phone, laptop)
        second = chain.link("add", tablet, laptop)  # made at the same head: one of them must lose
        self.publish(conn, first)
        text = self.refused_link(conn, NotAllowed, second)
        self.assertIn("the chain moved on; fetch it", text)
        skipping = chain.link("add", tablet, laptop, seq=5)
        self.refused_link(conn, NotAllowed, skipping)
        forked = chain.link("add", tablet, laptop, prev=b"\x01" * 32)
        self.refused_link(conn, NotAllowed, forked)
        replayed = chain.links[0]
        self.refused_link(conn, NotAllowed, replayed)
        self.assertEqual(len(self.links(self.witness, "alice")["links"]), 2)

    def test_the_first_link_must_add_its_own_signer(self):
        conn, device, other = self.connect("alice"), Device(), Device()
        chain = self.chain("alice")
        for link in (
            chain.link("add", device, other),  # signed by another key than the one it adds
            chain.link("name", device, device),
            chain.link("revoke", device, device),
            chain.link("add", device, device, prev=b"\x02" * 32),
            chain.link("add", device, device, seq=0),
        ):
            self.refused_link(conn, NotAllowed, link)
        self.assertEqual(self.links(self.witness, "alice")["links"], [])

    def test_bad_signatures(self):
        conn, laptop = self.first_device()
        chain, phone = self.chain("alice"), Device("phone")
        good = chain.link("add", phone, laptop)
        forged = replace(good, signature=sign(Device().sig, LINK_LABEL, good.fields()))
        text = self.refused_link(conn, BadSignature, forged)
        self.assertIn("signature does not check with its signer", text)
        wrong_label = replace(good, signature=sign(laptop.sig, COUNTERSIGN_LABEL, good.fields()))
        self.refused_link(conn, BadSignature, wrong_label)
        renamed = replace(good, name="evil")  # fields changed after signing
        self.refused_link(conn, BadSignature, renamed)
        self.assertEqual(len(self.links(self.witness, "alice")["links"]), 1)
        self.publish(conn, good)

    def test_a_device_must_countersign_its_own_addition(self):
        conn, laptop = self.first_device()
        phone = Device("phone")
        good = self.chain("alice").link("add", phone, laptop)
        for countersignature in (sign(laptop.sig, COUNTERSIGN_LABEL, good.fields()), bytes(64)):
            text = self.refused_link(conn, BadSignature, replace(good, countersignature=countersignature))
            self.assertIn("countersignature", text)
        self.assertEqual(len(self.links(self.witness, "alice")["links"]), 1)

    def test_a_first_link_with_a_bad_signature(self):
        conn, device = self.connect("alice"), Device()
        good = self.chain("alice").link("add", device, device)
        forged = replace(good, signature=bytes(64))
        self.refused_link(conn, BadSignature, forged)

    def test_only_the_sessions_own_device_signs(self):
        laptop_conn, laptop = self.first_device()
        phone_conn, phone = self.add_device(laptop_conn, laptop)
        chain = self.chain("alice")
        tablet = Device("tablet")
        # the phone's session may not publish what the laptop signed
        text = self.refused_link(phone_conn, NotAllowed, chain.link("add", tablet, laptop))
        self.assertIn("its own device", text)
        unbound = self.connect("alice")
        text = self.refused_link(unbound, NotAllowed, chain.link("add", tablet, laptop))
        self.assertIn("device_id", text)
        self.publish(laptop_conn, chain.link("add", tablet, laptop))

    def test_a_session_bound_to_another_device_cannot_start_the_chain(self):
        bound, device = self.connect("alice", Device()), Device()
        self.refused_link(bound, NotAllowed, self.chain("alice").link("add", device, device))

    def test_devices_already_in_the_chain_are_not_added_again(self):
        conn, laptop = self.first_device()
        chain = self.chain("alice")
        phone_conn, phone = self.add_device(conn, laptop)
        self.refused_link(conn, NotAllowed, chain.link("add", phone, laptop))
        self.publish(conn, chain.link("revoke", phone, laptop))
        text = self.refused_link(conn, NotAllowed, chain.link("add", phone, laptop))
        self.assertIn("revoked device cannot come back", text)

    def test_renaming_or_revoking_a_device_not_in_the_chain(self):
        conn, laptop = self.first_device()
        stranger = Device("stranger")
        for op in ("name", "revoke"):
            self.refused_link(conn, NoSuchDevice, self.chain("alice").link(op, stranger, laptop))

    def test_a_revoked_signer_signs_nothing(self):
        """A link from a session whose device was revoked while the link was on its way."""
        laptop_conn, laptop = self.first_device()
        phone_conn, phone = self.add_device(laptop_conn, laptop)
        session, _ = self.successResultOf(
            self.hub.accounts.login("alice", PASSWORD, None, "10.0.0.1", RecordingClient(), laptop.hex)
        )
        self.publish(phone_conn, self.chain("alice").link("revoke", laptop, phone))
        late = self.chain("alice").link("add", Device("tablet"), laptop)
        failure = self.failureResultOf(self.hub.keys.publish(session, late.to_bytes()), NotAllowed)
        self.assertIn("not a current device", str(failure.value))

    def test_a_chain_lists_at_most_max_devices(self):
        self.hub.keys.max_devices = 2
        conn, laptop = self.first_device()
        _, phone = self.add_device(conn, laptop)
        text = self.refused_link(conn, NotAllowed, self.chain("alice").link("add", Device(), laptop))
        self.assertIn("at most 2 devices", text)
        self.publish(conn, self.chain("alice").link("revoke", phone, laptop))
        self.publish(conn, self.chain("alice").link("add", Device(), laptop))

    def test_publishing_is_rate_limited_like_membership_changes(self):
        conn, laptop = self.first_device()
        chain = self.chain("alice")
        for i in range(19):  # the first link took one of the burst of 20
            self.publish(conn, chain.link("name", laptop, laptop, name=f"laptop {i}"))
        text = self.refused_link(conn, RateLimited, chain.link("name", laptop, laptop))
        self.assertIn("retry in 1 second.", text)
        self.clock.advance(1)
        self.publish(conn, chain.link("name", laptop, laptop, name="at last"))

    def test_every_key_command_needs_a_login(self):
        conn = Connection(self.hub)
        for command, arguments in (
            (commands.PublishChainLink, {"link": b""}),
            (commands.GetDeviceChain, {"username": "bob"}),
            (commands.UploadPrekeys, {**Device().spk("alice"), "device_id": "0" * 32, "one_time": []}),
            (commands.CountPrekeys, {}),
            (commands.ClaimPrekeyBundle, {"username": "bob", "device_id": "0" * 32}),
            (commands.ListDevices, {}),
        ):
            self.refused(conn, AuthRequired, command, **arguments)


class AuditTests(KeysTestCase):
    def test_device_changes_and_refused_devices_reach_the_audit_log(self):
        lines = []

        def observe(event):
            lines.append(audit_line(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        laptop_conn, laptop = self.first_device()
        _, phone = self.add_device(laptop_conn, laptop)
        self.publish(laptop_conn, self.chain("alice").link("revoke", phone, laptop))
        self.refused(Connection(self.hub), NotAllowed, commands.Login, username="alice", password=PASSWORD, device_id=phone.hex)
        events = [json.loads(line) for line in lines if line]
        self.assertEqual(
            [(e["event"], e["target"]) for e in events if "target" in e],
            [
                ("device_add", laptop.hex),
                ("device_add", phone.hex),
                ("device_revoke", phone.hex),
                ("login_device_refused", phone.hex),
            ],
        )


class RaceTests(unittest.TestCase):
    """Two links for the same place of a chain, both checked before either is stored: one wins."""

    def setUp(self):
        self.clock = task.Clock()
        self.signatures = []  # (Deferred, function, args): checks the test lets finish

        def held(function, *args):
            waiting = defer.Deferred()
            self.signatures.append((waiting, function, args))
            return waiting

        self.hub = tap.make_hub(
            Settings(), make_store(self), PasswordHasher(TEST_COST, run_now), self.clock, Ed25519PrivateKey.generate(), held
        )
        self.successResultOf(self.hub.accounts.register("alice", PASSWORD, "127.0.0.1"))

    def release(self):
        while self.signatures:
            waiting, function, args = self.signatures.pop(0)
            waiting.callback(function(*args))

    def session(self, device=None):
        session, _ = self.successResultOf(
            self.hub.accounts.login("alice", PASSWORD, None, "127.0.0.1", RecordingClient(), device and device.hex)
        )
        return session

    def test_two_first_links_race(self):
        one, two = Device("one"), Device("two")
        first = self.hub.keys.publish(self.session(), Chain("alice").link("add", one, one).to_bytes())
        second = self.hub.keys.publish(self.session(), Chain("alice").link("add", two, two).to_bytes())
        self.assertEqual(len(self.signatures), 2)  # both passed every check on the chain as it was
        self.release()
        self.assertEqual(self.successResultOf(first)[0], 1)
        self.assertIn("the chain moved on", str(self.failureResultOf(second, NotAllowed).value))
        links, _ = self.successResultOf(self.hub.store.device_chain("alice", 0, 10))
        self.assertEqual([Link.from_bytes(data).device for data in links], [one.id])

    def test_signatures_are_checked_by_the_runner(self):
        """The responder's Deferred waits for the runner: the reactor thread never verifies."""
        device = Device()
        published = self.hub.keys.publish(self.session(), Chain("alice").link("add", device, device).to_bytes())
        self.assertNoResult(published)
        self.release()
        self.assertEqual(self.successResultOf(published)[0], 1)


class RevokeTests(KeysTestCase):
    def test_revoking_a_device_ends_its_sessions_at_once(self):
        laptop_conn, laptop = self.first_device()
        phone_conn, phone = self.add_device(laptop_conn, laptop)
        phone_again = self.connect("alice", phone)
        unbound = self.connect("alice")
        self.publish(laptop_conn, self.chain("alice").link("revoke", phone, laptop))
        self.settle(phone_conn, phone_again, laptop_conn, unbound)
        self.assertTrue(phone_conn.server.lost and phone_again.server.lost)
        for conn in (laptop_conn, unbound, self.witness):
            self.assertFalse(conn.server.lost)
            self.ok(conn, commands.Ping)
        self.assertEqual(
            sorted(s.device_id or "" for s in self.hub.accounts.registry.all_sessions_of("alice")), ["", laptop.hex]
        )

    def test_a_revoked_device_cannot_come_back(self):
        laptop_conn, laptop = self.first_device()
        phone_conn, phone = self.add_device(laptop_conn, laptop)
        token = phone_conn.login["resume_token"]
        self.publish(laptop_conn, self.chain("alice").link("revoke", phone, laptop))
        conn = Connection(self.hub)
        text = self.refused(conn, NotAllowed, commands.Login, username="alice", password=PASSWORD, device_id=phone.hex)
        self.assertIn("This device was revoked", text)
        # its resume token went with it, whatever device it claims now
        self.refused(conn, BadCredentials, commands.Resume, username="alice", resume_token=token, device_id=phone.hex)
        self.refused(conn, BadCredentials, commands.Resume, username="alice", resume_token=token)
        self.assertEqual([s.device_id for s in self.hub.accounts.registry.all_sessions_of("alice")], [laptop.hex])

    def test_a_device_may_revoke_itself_and_hears_the_answer(self):
        laptop_conn, laptop = self.first_device()
        phone_conn, phone = self.add_device(laptop_conn, laptop)
        answer = self.publish(phone_conn, self.chain("alice").link("revoke", phone, phone))
        self.assertEqual(answer["seq"], 3)
        self.settle(phone_conn)
        self.assertTrue(phone_conn.server.lost)
        self.assertFalse(laptop_conn.server.lost)

    def test_a_revoked_device_loses_its_prekeys(self):
        laptop_conn, laptop = self.first_device()
        phone_conn, phone = self.add_device(laptop_conn, laptop)
        self.upload(phone_conn, "alice", phone, ids=[1, 2])
        self.publish(laptop_conn, self.chain("alice").link("revoke", phone, laptop))
        self.refused(self.witness, NoSuchDevice, commands.ClaimPrekeyBundle, username="alice", device_id=phone.hex)
        self.assertEqual(self.successResultOf(self.hub.store.count_prekeys("alice", phone.hex)), 0)

    def test_the_last_device_may_be_revoked_and_then_the_chain_is_closed(self):
        conn, laptop = self.first_device()
        self.publish(conn, self.chain("alice").link("revoke", laptop, laptop))
        other = self.connect("alice")
        newcomer = Device()
        self.refused_link(other, NotAllowed, self.chain("alice").link("add", newcomer, newcomer))


class ChainPagingTests(KeysTestCase):
    settings = {"action_burst": 1000}

    def test_a_full_page_of_the_longest_links_fits_one_value(self):
        self.assertLessEqual(commands.CHAIN_PAGE * (commands.MAX_LINK_BYTES + 2), VALUE_LIMIT)
        longest = Chain("a" * 32).link("add", Device(), Device(), name="é" * 32)
        self.assertLessEqual(len(longest.to_bytes()), commands.MAX_LINK_BYTES)

    def test_paging(self):
        conn, laptop = self.first_device()
        chain = self.chain("alice")
        for i in range(commands.CHAIN_PAGE + 20):
            self.publish(conn, chain.link("name", laptop, laptop, name=f"{i:03d}" + "x" * 61))
        everything = [link.to_bytes() for link in chain.links]
        first = self.links(self.witness, "alice")
        self.assertEqual(first, {"links": everything[: commands.CHAIN_PAGE], "has_more": True})
        rest = self.links(self.witness, "alice", after_seq=commands.CHAIN_PAGE)
        self.assertEqual(rest, {"links": everything[commands.CHAIN_PAGE :], "has_more": False})
        self.assertEqual(self.links(self.witness, "alice", after_seq=len(everything) - 1)["links"], everything[-1:])

    def test_after_seq_beyond_the_chain(self):
        self.first_device()
        for after in (1, 2, 2**63 - 1):
            self.assertEqual(self.links(self.witness, "alice", after_seq=after), {"links": [], "has_more": False})
        self.refused(self.witness, InvalidArgument, commands.GetDeviceChain, username="alice", after_seq=-1)

    def test_an_after_seq_beyond_64_bits_is_malformed(self):
        self.refused(self.witness, InvalidArgument, commands.GetDeviceChain, username="alice", after_seq=2**70)

    def test_users_without_a_chain_and_users_who_do_not_exist(self):
        self.assertEqual(self.links(self.witness, "carol"), {"links": [], "has_more": False})
        self.assertEqual(self.links(self.witness, "CAROL"), {"links": [], "has_more": False})
        for name in ("nobody", "not a name!", ""):
            self.refused(self.witness, NoSuchUser, commands.GetDeviceChain, username=name)

    def test_a_strangers_chain_is_a_directory_search(self):
        """As GetPresence: a stranger's chain (or a name that is no one's) spends a search; one's own does not."""
        for n in range(Settings().search_burst):
            asked = self.witness.call(commands.GetDeviceChain, username="carol" if n % 2 else f"nobody{n}")
            self.assertIsNotNone(self.successResultOf(asked) if n % 2 else self.failureResultOf(asked, NoSuchUser))
        for name in ("carol", "nobody"):
            refused = self.witness.call(commands.GetDeviceChain, username=name)
            self.assertIn("Too many searches of the directory", str(self.failureResultOf(refused, RateLimited).value))
        conn, _ = self.first_device()
        self.links(conn, "alice")  # (others' searches are their own, and one's own chain is none)

    def test_a_user_deleted_while_logged_in(self):
        conn, laptop = self.first_device()
        self.successResultOf(self.hub.store.delete_user("alice", NOW))
        self.refused_link(conn, NoSuchUser, self.chain("alice").link("add", Device(), laptop))
        self.refused(conn, NoSuchUser, commands.UploadPrekeys, device_id=laptop.hex, one_time=[], **laptop.spk("alice"))
        self.assertEqual(self.ok(conn, commands.CountPrekeys), {"count": 0})
        self.assertEqual(self.ok(conn, commands.ListDevices)["devices"], [])

    def test_a_deleted_user_has_no_chain_and_no_keys(self):
        conn, laptop = self.first_device()
        self.upload(conn, "alice", laptop, ids=[1, 2])
        self.successResultOf(self.hub.store.delete_user("alice", NOW))
        self.refused(self.witness, NoSuchUser, commands.GetDeviceChain, username="alice")
        self.refused(self.witness, NoSuchUser, commands.ClaimPrekeyBundle, username="alice", device_id=laptop.hex)
        path = self.hub.store._pool.connargs[0]
        with sqlite3.connect(path) as db:
            for table in ("chain_links", "devices", "signed_prekeys", "one_time_prekeys"):
                self.assertEqual(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone(), (0,), table)


# -- sessions bound to devices ------------------------------------------------------------


class BindingTests(KeysTestCase):
    def test_sessions_without_a_device_work_as_in_version_1(self):
        conn = self.connect("alice")
        self.ok(conn, commands.SetPresence, status="away")
        self.assertEqual([s.device_id for s in self.hub.accounts.registry.all_sessions_of("alice")], [None])
        self.first_device()
        self.connect("alice")  # still, with a chain

    def test_any_device_may_bind_while_the_user_has_no_chain(self):
        device = Device()
        conn = self.connect("alice", device)
        [session] = self.hub.accounts.registry.all_sessions_of("alice")
        self.assertEqual(session.device_id, device.hex)
        resumed = Connection(self.hub)
        self.ok(resumed, commands.Resume, username="alice", resume_token=conn.login["resume_token"], device_id=device.hex)

    def test_a_device_not_in_the_chain_cannot_bind(self):
        self.first_device()
        conn = Connection(self.hub)
        text = self.refused(conn, NoSuchDevice, commands.Login, username="alice", password=PASSWORD, device_id=Device().hex)
        self.assertIn("not in your device chain", text)
        self.assertEqual(len(self.hub.accounts.registry.all_sessions_of("alice")), 1)
        self.ok(conn, commands.Login, username="alice", password=PASSWORD)  # the connection can log in otherwise

    def test_resume_binds_like_login(self):
        conn, laptop = self.first_device()
        token = conn.login["resume_token"]
        other = Connection(self.hub)
        answer = self.ok(other, commands.Resume, username="alice", resume_token=token, device_id=laptop.hex)
        self.assertEqual(self.hub.accounts.registry.all_sessions_of("alice")[-1].device_id, laptop.hex)
        stranger = Connection(self.hub)
        token = answer["resume_token"]
        self.refused(stranger, NoSuchDevice, commands.Resume, username="alice", resume_token=token, device_id=Device().hex)
        # a refused device spent the token, as any Resume does
        self.refused(stranger, BadCredentials, commands.Resume, username="alice", resume_token=token, device_id=laptop.hex)

    def test_malformed_device_ids(self):
        conn = Connection(self.hub)
        for bad in ("", "0" * 31, "0" * 33, "A" * 32, "g" * 32, " " + "0" * 31, "０" * 32):
            self.refused(conn, InvalidArgument, commands.Login, username="alice", password=PASSWORD, device_id=bad)
            self.refused(conn, InvalidArgument, commands.Resume, username="alice", resume_token="x", device_id=bad)
        self.ok(conn, commands.Login, username="alice", password=PASSWORD)  # no failed login was counted

    def test_list_devices(self):
        laptop_conn, laptop = self.first_device()
        phone_conn, phone = self.add_device(laptop_conn, laptop, name="phone")
        tablet_conn, tablet = self.add_device(laptop_conn, laptop, name="tablet")
        self.publish(laptop_conn, self.chain("alice").link("revoke", tablet, laptop))
        self.publish(laptop_conn, self.chain("alice").link("name", phone, laptop, name="old phone"))
        self.clock.advance(5)
        self.connect("alice", client_name="script")
        listing = self.ok(phone_conn, commands.ListDevices)
        self.assertEqual(
            listing["devices"],
            [
                {"device_id": laptop.hex, "name": "laptop", "added_seq": 1},
                {"device_id": phone.hex, "name": "old phone", "added_seq": 2},
            ],
        )
        sessions = [(s["device_id"], s["client_name"], s["address"], s["this_session"]) for s in listing["sessions"]]
        self.assertEqual(
            sessions,
            [
                (laptop.hex, None, "10.0.0.1", False),
                (phone.hex, None, "10.0.0.1", True),
                (None, "script", "10.0.0.1", False),
            ],
        )
        self.assertEqual(listing["sessions"][-1]["since"].timestamp(), NOW + 5)
        self.assertFalse(listing["has_more"])
        bobs = self.ok(self.witness, commands.ListDevices)  # no chain, one session bound to no device
        self.assertEqual((bobs["devices"], [s["device_id"] for s in bobs["sessions"]]), ([], [None]))


# -- prekeys ------------------------------------------------------------------------------


class PrekeyTests(KeysTestCase):
    def setUp(self):
        super().setUp()
        self.alice, self.laptop = self.first_device()

    def claim(self, conn=None, username="alice", device=None):
        device_id = (device or self.laptop).hex
        return self.ok(conn or self.witness, commands.ClaimPrekeyBundle, username=username, device_id=device_id)

    def test_upload_count_and_claim(self):
        spk = self.laptop.spk("alice", spk_id=7)
        prekeys = one_time([3, 1, 2])
        answer = self.ok(self.alice, commands.UploadPrekeys, device_id=self.laptop.hex, one_time=prekeys, **spk)
        self.assertEqual(answer, {"count": 3})
        self.assertEqual(self.ok(self.alice, commands.CountPrekeys), {"count": 3})
        bundle = self.claim()
        by_id = {p["opk_id"]: p["opk_pub"] for p in prekeys}
        self.assertEqual(
            bundle,
            {**spk, "opk_id": 1, "opk_pub": by_id[1], "sig_pub": self.laptop.sig_pub, "dh_pub": self.laptop.dh_pub},
        )
        self.assertEqual(self.claim()["opk_id"], 2)
        self.assertEqual(self.claim(self.alice)["opk_id"], 3)  # one's own devices too
        self.assertEqual(self.ok(self.alice, commands.CountPrekeys), {"count": 0})

    def test_with_no_one_time_prekey_left_the_bundle_has_only_the_signed_prekey(self):
        self.upload(self.alice, "alice", self.laptop, ids=[1])
        self.claim()
        bundle = self.claim()
        self.assertEqual((bundle["opk_id"], bundle["opk_pub"]), (None, None))
        self.assertEqual(len(bundle["spk_pub"]), 32)

    def test_a_new_signed_prekey_replaces_the_old(self):
        self.upload(self.alice, "alice", self.laptop)
        newer = self.laptop.spk("alice", spk_id=2)
        self.ok(self.alice, commands.UploadPrekeys, device_id=self.laptop.hex, one_time=[], **newer)
        self.assertEqual(self.claim()["spk_pub"], newer["spk_pub"])

    def test_one_time_prekeys_are_added_up_to_the_cap(self):
        self.hub.keys.max_one_time_prekeys = 150
        self.assertEqual(self.upload(self.alice, "alice", self.laptop, ids=range(1, 101)), 100)
        kept = self.claim()
        text = self.refused(
            self.alice, NotAllowed, commands.UploadPrekeys, device_id=self.laptop.hex, one_time=one_time(range(101, 153)),
            **self.laptop.spk("alice", spk_id=9),
        )
        self.assertIn("at most 150 one-time prekeys; 99 are stored", text)
        self.assertEqual(self.claim()["spk_id"], kept["spk_id"])  # nothing of the refused upload was stored
        self.assertEqual(self.upload(self.alice, "alice", self.laptop, ids=range(101, 153)), 150)

    def test_a_retried_upload_is_harmless_but_an_id_cannot_change_its_key(self):
        spk = self.laptop.spk("alice")
        prekeys = one_time([1, 2])
        for _ in range(2):
            answer = self.ok(self.alice, commands.UploadPrekeys, device_id=self.laptop.hex, one_time=prekeys, **spk)
            self.assertEqual(answer, {"count": 2})
        text = self.refused(
            self.alice, InvalidArgument, commands.UploadPrekeys, device_id=self.laptop.hex, one_time=one_time([2, 3]), **spk
        )
        self.assertIn("One-time prekey 2", text)
        self.assertEqual(self.ok(self.alice, commands.CountPrekeys), {"count": 2})

    def test_malformed_uploads(self):
        spk, key = self.laptop.spk("alice"), bytes(32)
        bad = [
            {"spk_pub": key[:31]},
            {"spk_pub": key + b"\x00"},
            {"spk_signature": spk["spk_signature"][:63]},
            {"spk_id": -1},
            {"spk_id": 2**32},
            {"one_time": [{"opk_id": 0, "opk_pub": key}]},
            {"one_time": [{"opk_id": 2**32, "opk_pub": key}]},
            {"one_time": [{"opk_id": 1, "opk_pub": key[:31]}]},
            {"one_time": [{"opk_id": 1, "opk_pub": key}, {"opk_id": 1, "opk_pub": key}]},
            {"one_time": one_time(range(1, commands.MAX_PREKEYS_PER_UPLOAD + 2))},
            {"device_id": self.laptop.hex.upper()},
        ]
        for changes in bad:
            arguments = {"device_id": self.laptop.hex, **spk, "one_time": one_time([1]), **changes}
            self.refused(self.alice, InvalidArgument, commands.UploadPrekeys, **arguments)
        self.assertEqual(self.ok(self.alice, commands.CountPrekeys), {"count": 0})
        self.refused(self.witness, NoSuchDevice, commands.ClaimPrekeyBundle, username="alice", device_id=self.laptop.hex)

    def test_a_signed_prekey_must_be_signed_by_the_device(self):
        stranger = Device()
        for spk in (
            self.laptop.spk("alice", key=stranger.sig),  # another key
            self.laptop.spk("bob"),  # another user's name
            {**self.laptop.spk("alice", spk_id=1), "spk_id": 2},  # another id than signed
        ):
            text = self.refused(self.alice, BadSignature, commands.UploadPrekeys, device_id=self.laptop.hex, one_time=[], **spk)
            self.assertIn("spk_signature", text)

    def test_only_the_sessions_own_device_uploads(self):
        phone_conn, phone = self.add_device(self.alice, self.laptop)
        spk = self.laptop.spk("alice")
        self.refused(phone_conn, NotAllowed, commands.UploadPrekeys, device_id=self.laptop.hex, one_time=[], **spk)
        unbound = self.connect("alice")
        self.refused(unbound, NotAllowed, commands.UploadPrekeys, device_id=self.laptop.hex, one_time=[], **spk)
        self.refused(unbound, NotAllowed, commands.CountPrekeys)
        bob_device = Device()  # a session of bob's claiming alice's device
        bob = self.connect("bob", bob_device)
        self.refused(bob, NotAllowed, commands.UploadPrekeys, device_id=self.laptop.hex, one_time=[], **spk)

    def test_a_device_uploads_only_once_it_is_in_the_chain(self):
        carol_device = Device()
        carol = self.connect("carol", carol_device)  # bound, but carol has no chain yet
        spk = carol_device.spk("carol")
        text = self.refused(carol, NoSuchDevice, commands.UploadPrekeys, device_id=carol_device.hex, one_time=[], **spk)
        self.assertIn("publish its link first", text)
        self.publish(carol, self.chain("carol").link("add", carol_device, carol_device))
        self.ok(carol, commands.UploadPrekeys, device_id=carol_device.hex, one_time=[], **spk)

    def test_claims_of_what_is_not_there(self):
        self.refused(self.witness, NoSuchUser, commands.ClaimPrekeyBundle, username="nobody", device_id=self.laptop.hex)
        self.refused(self.witness, NoSuchDevice, commands.ClaimPrekeyBundle, username="alice", device_id=Device().hex)
        self.refused(self.witness, NoSuchDevice, commands.ClaimPrekeyBundle, username="carol", device_id=self.laptop.hex)
        text = self.refused(self.witness, NoSuchDevice, commands.ClaimPrekeyBundle, username="alice", device_id=self.laptop.hex)
        self.assertIn("has not uploaded prekeys yet", text)
        self.refused(self.witness, InvalidArgument, commands.ClaimPrekeyBundle, username="alice", device_id="laptop")

    def test_no_one_can_drain_someones_one_time_prekeys(self):
        """Each caller has a claim budget per user claimed from (alice's own claims: no directory search)."""
        self.upload(self.alice, "alice", self.laptop, ids=range(1, 101))
        carol_device = Device()
        carol = self.connect("carol", carol_device)
        self.publish(carol, self.chain("carol").link("add", carol_device, carol_device))
        self.upload(carol, "carol", carol_device, ids=[1])
        for _ in range(Settings().claim_burst):
            self.claim(self.alice)
        text = self.refused(self.alice, RateLimited, commands.ClaimPrekeyBundle, username="alice", device_id=self.laptop.hex)
        self.assertIn("prekey claims for alice; retry in 10 seconds", text)
        self.claim(self.alice, username="carol", device=carol_device)  # another user's devices: a bucket of their own
        self.claim()  # and other callers have theirs
        self.assertEqual(self.ok(self.alice, commands.CountPrekeys), {"count": 100 - Settings().claim_burst - 1})
        self.clock.advance(10)
        self.claim(self.alice)

    def test_a_strangers_claims_are_directory_searches(self):
        """NO_SUCH_USER tells who exists: claiming from a stranger spends a search, so the directory limit
        stops a stranger before the claim budget does, whoever is named."""
        self.upload(self.alice, "alice", self.laptop, ids=range(1, 101))
        for _ in range(Settings().search_burst):
            self.claim()
        for name in ("alice", "nobody"):
            refused = self.witness.call(commands.ClaimPrekeyBundle, username=name, device_id=self.laptop.hex)
            self.assertIn("Too many searches of the directory", str(self.failureResultOf(refused, RateLimited).value))


class ClaimTransactionTests(unittest.TestCase):
    """SELECT and DELETE of a one-time prekey in one transaction: claims queued together share one."""

    def setUp(self):
        path = self.mktemp() + ".sqlite"
        make_store(self, path)
        self.pool = open_pool(path, reactor=_NoThreadsReactor(), pool_class=GatedPool)
        self.store = Store(self.pool)
        self.addCleanup(self.store.close)
        self.device = Device()
        link = Chain("alice").link("add", self.device, self.device)
        device = self.device
        new = NewLink(1, ZERO_HASH, link.hash(), link.to_bytes(), "add", device.hex, device.sig_pub, device.dh_pub, "laptop")
        spk = self.device.spk("alice")
        calls = [
            self.store.create_user("alice", "h", NOW),
            self.store.append_link("alice", new, NOW),
            self.store.store_prekeys(
                "alice", self.device.hex, (1, spk["spk_pub"], spk["spk_signature"]),
                [(p["opk_id"], p["opk_pub"]) for p in one_time([1, 2, 3])], 200, NOW,
            ),
        ]
        while self.pool.batches:
            self.pool.finish()
        self.assertEqual([self.successResultOf(d) for d in calls], [True, True, ("stored", 3)])

    def test_concurrent_claims_never_share_a_one_time_prekey(self):
        claims = [self.store.claim_prekeys("alice", self.device.hex) for _ in range(5)]
        while self.pool.batches:
            self.pool.finish()
        bundles = [self.successResultOf(d) for d in claims]
        self.assertEqual([outcome for outcome, _ in bundles], ["claimed"] * 5)
        self.assertEqual([bundle.opk_id for _, bundle in bundles], [1, 2, 3, None, None])
        counted = self.store.count_prekeys("alice", self.device.hex)
        self.pool.finish()
        self.assertEqual(self.successResultOf(counted), 0)

    def test_a_link_racing_for_a_taken_place_is_not_stored(self):
        phone = Device()
        chain = Chain("alice")
        chain.accepted(chain.link("add", self.device, self.device))
        late = chain.link("add", phone, self.device)
        args = (2, late.prev, late.hash(), late.to_bytes(), "add", phone.hex, phone.sig_pub, phone.dh_pub, "phone")
        appended = [self.store.append_link("alice", NewLink(*args), NOW) for _ in range(2)]
        while self.pool.batches:
            self.pool.finish()
        self.assertEqual([self.successResultOf(d) for d in appended], [True, False])


class MigrationTests(unittest.TestCase):
    def test_from_version_5_with_data(self):
        """Accounts and tokens of version 5 keep working; the key directory starts empty."""
        path = self.mktemp() + ".sqlite"
        db = connect(path)
        upgrade(db, path, NOW, target=5)
        db.executescript(
            """
            INSERT INTO users (username, password_hash, created_at, password_changed_at, generation)
                VALUES ('alice', 'h', 1.0, 1.0, 2);
            INSERT INTO resume_tokens (token_hash, user_id, session_id, created_at, expires_at)
                SELECT 'tokenhash', id, 'session-1', 2.0, 9e9 FROM users;
            """
        )
        self.assertEqual(upgrade(db, path, NOW + 1, target=6), [6])
        self.assertEqual(db.execute("SELECT session_id, device_id FROM resume_tokens").fetchall(), [("session-1", None)])
        db.close()
        store = make_store(self, path)
        self.assertEqual(self.successResultOf(store.consume_resume_token("alice", "tokenhash", NOW)), 2)
        self.assertEqual(self.successResultOf(store.device_chain("alice", 0, 10)), ([], False))
        self.assertEqual(self.successResultOf(store.chain_state("alice", [])).seq, 0)
        device = Device()
        outcome = store.add_device_resume_token("alice", "s2", "t2", NOW, NOW + 10, 2, device.hex)
        self.assertEqual(self.successResultOf(outcome), "recorded")


class DaemonTests(unittest.TestCase):
    """The daemon as `twistd securechatd` builds it, over real TLS: signatures are checked in a thread."""

    @defer.inlineCallbacks
    def test_a_chain_and_a_claim_through_the_real_daemon(self):
        from twisted.internet import reactor

        port, ca, _ = start_daemon(self, reactor)
        alice = yield connected_client(self, reactor, port, ca)
        bob = yield connected_client(self, reactor, port, ca)
        for client, name in ((alice, "alice"), (bob, "bob")):
            yield client.callRemote(commands.Register, username=name, password=PASSWORD)
        device = Device()
        yield alice.callRemote(commands.Login, username="alice", password=PASSWORD, device_id=device.hex)
        yield bob.callRemote(commands.Login, username="bob", password=PASSWORD)
        link = Chain("alice").link("add", device, device)
        with self.assertRaises(BadSignature):
            yield alice.callRemote(commands.PublishChainLink, link=replace(link, signature=bytes(64)).to_bytes())
        answer = yield alice.callRemote(commands.PublishChainLink, link=link.to_bytes())
        self.assertEqual(answer, {"seq": 1, "hash": link.hash()})
        prekeys = one_time([1])
        yield alice.callRemote(commands.UploadPrekeys, device_id=device.hex, one_time=prekeys, **device.spk("alice"))
        bundle = yield bob.callRemote(commands.ClaimPrekeyBundle, username="alice", device_id=device.hex)
        self.assertEqual((bundle["opk_id"], bundle["opk_pub"]), (1, prekeys[0]["opk_pub"]))
        chain = yield bob.callRemote(commands.GetDeviceChain, username="alice")
        self.assertEqual(chain, {"links": [link.to_bytes()], "has_more": False})
