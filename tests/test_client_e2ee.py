"""End-to-end encryption in the client library, against the real daemon over TLS on 127.0.0.1.

Each client is one installation (its own state directory): `phone` and
`laptop` of one user are two devices. The server is the real one; where a
test plays a malicious server, it changes the daemon's database or pushes
what the server could push, and the client must catch it.
"""

import os
import stat
from unittest import mock

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.trial import unittest

from securechatd import commands
from securechatd.client import library
from securechatd.client.chains import Chains
from securechatd.client.crypto import Alarm, EncryptionUnavailable, EndToEnd, LinkError, Problem
from securechatd.client.device_file import ACTIVE, PENDING, REVOKED, DeviceFile, DeviceFileError, ReplayWindow
from securechatd.client.library import ChatClient, split_wraps
from securechatd.e2ee import chain, envelope, membership
from securechatd.e2ee.keys import Device
from securechatd.e2ee.session import Session
from securechatd.server.protocol import ChatLocator
from tests.helpers import chat_client, start_daemon
from tests.test_client import PASSWORD, Inbox

WEEK = 7 * 24 * 3600


class E2EEInbox(Inbox):
    """Inbox, and the alarms and device changes a client reports."""

    def __init__(self, client):
        super().__init__(client)
        self.items.update(alarm=[], devices=[])
        client.on_alarm = lambda kind, user, detail: self._add("alarm", (kind, user, detail))
        client.on_devices_changed = lambda user, added, removed: self._add("devices", (user, added, removed))

    def alarms(self, kind=None):
        return [alarm for alarm in self.items["alarm"] if kind is None or alarm[0] == kind]


def rows(txn, query, *args):
    txn.execute(query, args)
    return txn.fetchall()


class E2EETestCase(unittest.TestCase):
    settings = {"plaintext": "refused"}

    def setUp(self):
        self.port, self.ca, self.hub = start_daemon(self, reactor, **self.settings)
        self.base = os.path.abspath(self.mktemp())
        self.registered = set()
        self.patch(EndToEnd, "REFILL_DELAY", 0)

    def directory(self, install):
        return os.path.join(self.base, install)

    @inlineCallbacks
    def device(self, username, install="phone", remember_password=False, **kw):
        """A client of `username` on installation `install`, logged in: (client, E2EEInbox)."""
        client = chat_client(self, reactor, self.port, self.ca, install, self.base, **kw)
        inbox = E2EEInbox(client)
        yield client.connect()
        if username not in self.registered:
            yield client.register(username, PASSWORD)
            self.registered.add(username)
        yield client.login(username, PASSWORD, remember_password=remember_password)
        return client, inbox

    @inlineCallbacks
    def linked(self, existing, username, install="laptop", **kw):
        """A second device of `username`, added by the client `existing`: (client, inbox)."""
        client, inbox = yield self.device(username, install, **kw)
        self.assertEqual(client.e2ee.status, PENDING)
        request = yield client.link_request()
        added = yield existing.link_new_device(request)
        self.assertEqual(added, (client.device_id, install))
        bound = yield client.complete_link()
        self.assertTrue(bound)
        return client, inbox

    def query(self, sql, *args):
        return self.hub.store._read("test query", rows, sql, *args)

    def write(self, sql, *args):
        return self.hub.store._write("test change", rows, sql, *args)

    @inlineCallbacks
    def operator_adds_member(self, group, name):
        """What an operator can do: a members row for `name`, announced to the members as a join."""
        yield self.write(
            "INSERT INTO members (conversation_id, user_id, joined_at, delivered_seq, read_seq)"
            " SELECT ?, id, 0, 0, 0 FROM users WHERE username = ?",
            group,
            name,
        )
        conversations = self.hub.conversations
        cached = conversations.cached(group)
        injected = cached._replace(members=tuple(sorted(cached.members + (name,))))
        conversations._update(injected)
        conversations.announce(injected, injected.members, joined=[name])

    def session_devices(self, username):
        return sorted(session.device_id or "" for session in self.hub.registry.sessions_of(username))

    @inlineCallbacks
    def server_prekey_count(self, username, device_id):
        [(count,)] = yield self.query(
            "SELECT COUNT(*) FROM one_time_prekeys o JOIN users u ON u.id = o.user_id"
            " WHERE u.username = ? AND o.device_id = ?",
            username,
            device_id,
        )
        return count

    @inlineCallbacks
    def wrapped_for(self, message_id):
        """The device ids the server holds a wrap of message `message_id` for (until they acknowledge it)."""
        self.hub.encrypted.flush_acknowledged()  # (acknowledged wraps are otherwise deleted within ACK_FLUSH)
        found = yield self.query("SELECT device_id FROM wraps WHERE message_id = ?", message_id)
        return sorted(device for (device,) in found)

    def count_chain_fetches(self):
        """[(asker, user)] of every GetDeviceChain from now on."""
        asked, chain = [], self.hub.keys.chain
        self.patch(self.hub.keys, "chain", lambda session, user, after: (asked.append((session.username, user)), chain(session, user, after))[1])
        return asked

    def count_commands(self, username):
        """[command name] of every command `username`'s sessions send from now on."""
        sent, run = [], ChatLocator.run

        def counting(locator, name, box):
            if locator.session is not None and locator.session.username == username:
                sent.append(name.decode())
            return run(locator, name, box)

        self.patch(ChatLocator, "run", counting)
        return sent

    @inlineCallbacks
    def count_saves(self, client):
        """[1 for every write of `client`'s device file] from now on, once what it had under way is done."""
        yield client.e2ee.settled()  # (the prekey refill after a first message)
        saves, save = [], client.e2ee.state.save
        self.patch(client.e2ee.state, "save", lambda: (saves.append(1), save())[1])
        return saves

    def lose_devices_changed(self):
        """From now on the server tells nobody of device changes (as if every DevicesChanged push were lost)."""
        self.patch(self.hub.keys, "_tell_contacts", lambda session: succeed(None))

    @inlineCallbacks
    def after_a_first_message(self, title=None):
        """alice and bob (one device each) in a conversation (a group if `title`), alice's first message read by
        bob: (alice, her inbox, bob, his inbox, the conversation)."""
        alice, alice_inbox = yield self.device("alice")
        bob, bob_inbox = yield self.device("bob", install="bobs")
        conversation, _ = yield alice.create_conversation(["bob"], title=title)
        yield alice.send_message(conversation, "first")
        yield bob_inbox.wait("deliver", 1)
        return alice, alice_inbox, bob, bob_inbox, conversation

    @inlineCallbacks
    def revoke_a_laptop(self, announced=True):
        """alice's phone revokes her laptop after bob wrote to her ("before"), and the laptop logs in again unbound
        (`announced`: bob's client is told with DevicesChanged): (phone, its inbox, laptop, its inbox, bob, their
        conversation)."""
        phone, phone_inbox = yield self.device("alice")
        laptop, laptop_inbox = yield self.linked(phone, "alice", remember_password=True)
        bob, _ = yield self.device("bob", install="bobs")
        conversation, _ = yield bob.create_conversation(["alice"])
        yield bob.send_message(conversation, "before")
        yield laptop_inbox.wait("deliver", 1)
        if not announced:
            self.lose_devices_changed()
        reconnected = Deferred()
        laptop.on_reconnected = reconnected.callback
        yield phone.revoke_device(laptop.device_id)
        yield reconnected.addTimeout(10, reactor)  # the server ended its session; it logs in without the device
        return phone, phone_inbox, laptop, laptop_inbox, bob, conversation


class ChainsTests(unittest.TestCase):
    """client/chains.py's bookkeeping of when a chain was fetched."""

    def test_a_chain_marked_stale_while_it_is_fetched_is_fetched_again(self):
        """(A DevicesChanged that comes while the chain is asked: the answer may be from before the change.)"""
        asked, clock = [], task.Clock()
        chains = Chains(
            mock.Mock(chains={}), lambda command, **arguments: asked.append(Deferred()) or asked[-1],
            lambda: None, lambda *alarm: None, lambda *change: None, clock,
        )
        chains.refresh("bob", 3600)
        chains.stale(["bob"])
        asked[0].callback({"links": [], "has_more": False})
        clock.advance(1)
        chains.refresh("bob", 3600)
        self.assertEqual(len(asked), 2)
        asked[1].callback({"links": [], "has_more": False})
        chains.refresh("bob", 3600)  # fresh now: not asked again
        self.assertEqual(len(asked), 2)


    def test_a_refused_device_names_whose_chain_to_fetch_again(self):
        """NO_SUCH_DEVICE names the device: its owner's chain is fetched again; when that cannot be told, everyone's."""
        device = Device.generate("bob")
        chains = Chains(
            mock.Mock(chains={"bob": [chain.first(device, "phone").to_bytes()]}), None, None, None, None, task.Clock()
        )
        refused = commands.NoSuchDevice(f"{device.id.hex()} is not a current device of a member of this conversation.")
        self.assertEqual(library._owner_of_refused_device(chains, refused), ["bob"])
        stranger = commands.NoSuchDevice(f"{'ab' * 16} is not a current device of a member of this conversation.")
        self.assertIsNone(library._owner_of_refused_device(chains, stranger))
        self.assertIsNone(library._owner_of_refused_device(chains, commands.NoSuchDevice("no device named")))


class DeviceFileTests(unittest.TestCase):
    """The device file on its own: format, mode, atomic replacement, the replay window."""

    def state(self):
        path = os.path.join(os.path.abspath(self.mktemp()), "alice.device")
        state = DeviceFile(path, Device.generate("alice"), ACTIVE)
        spk = state.device.new_signed_prekey()
        old = state.device.new_signed_prekey()
        state.signed_prekeys = {spk.id: (spk, 0), old.id: (old, 123456)}
        state.one_time_prekeys = {p.id: p for p in state.device.new_one_time_prekeys(3)}
        state.opks_to_upload = {max(state.one_time_prekeys)}
        state.spk_made_at, state.spk_uploaded, state.counter = 99, True, 7
        state.sessions[("bob", bytes(16))] = Session().to_bytes()
        first = chain.first(state.device, "phone")
        state.chains["alice"] = [first.to_bytes()]
        state.memberships[5] = [b"a state"]
        window = ReplayWindow()
        window.record(3)
        state.replay[("bob", bytes(16))] = window
        state.trusted["bob"] = frozenset([b"k" * 32])
        state.keep_key(12, b"K" * 32, 5, 3)  # (the key, and where it was read: conversation 5, seq 3; in the log)
        return state

    def test_every_section_survives_the_round_trip(self):
        state = self.state()
        state.save()
        again = DeviceFile.load(state.path)
        self.assertEqual(again.device.id, state.device.id)
        self.assertEqual(again.device.to_bytes(), state.device.to_bytes())
        self.assertEqual((again.status, again.counter, again.spk_made_at, again.spk_uploaded), (ACTIVE, 7, 99, True))
        self.assertEqual(
            {i: (p.to_bytes(), r) for i, (p, r) in again.signed_prekeys.items()},
            {i: (p.to_bytes(), r) for i, (p, r) in state.signed_prekeys.items()},
        )
        self.assertEqual(sorted(again.one_time_prekeys), sorted(state.one_time_prekeys))
        self.assertEqual(again.opks_to_upload, state.opks_to_upload)
        self.assertEqual(again.sessions, state.sessions)
        self.assertEqual(again.chains, state.chains)
        self.assertEqual(again.memberships, state.memberships)
        self.assertEqual(again.replay[("bob", bytes(16))].highest, 3)
        self.assertEqual(again.trusted, state.trusted)
        self.assertEqual(again.message_keys, state.message_keys)
        self.assertEqual(again.current_spk.id, min(state.signed_prekeys))

    def test_saved_0600_and_replaced_atomically(self):
        state = self.state()
        state.save()
        self.assertEqual(stat.S_IMODE(os.stat(state.path).st_mode), 0o600)
        before = os.stat(state.path).st_ino
        state.counter = 8
        state.save()
        self.assertNotEqual(os.stat(state.path).st_ino, before)  # a new file renamed over the old one
        self.assertEqual(sorted(os.listdir(os.path.dirname(state.path))), ["alice.device", "alice.device.log"])
        self.assertEqual(stat.S_IMODE(os.stat(state.log.path).st_mode), 0o600)
        self.assertEqual(DeviceFile.load(state.path).counter, 8)

    def test_a_write_that_fails_leaves_the_old_file(self):
        state = self.state()
        state.save()
        saved = open(state.path, "rb").read()
        state.counter = 9
        with mock.patch("os.replace", side_effect=OSError("disk full")):
            self.assertRaises(OSError, state.save)
        self.assertEqual(open(state.path, "rb").read(), saved)
        self.assertEqual(sorted(os.listdir(os.path.dirname(state.path))), ["alice.device", "alice.device.log"])

    def test_a_damaged_file_is_an_error_and_stays_as_it_is(self):
        state = self.state()
        state.save()
        data = bytearray(open(state.path, "rb").read())
        data[30] ^= 0xFF
        with open(state.path, "wb") as out:
            out.write(data)
        with self.assertRaises(DeviceFileError) as raised:
            DeviceFile.load(state.path)
        self.assertIn("damaged", str(raised.exception))
        self.assertEqual(open(state.path, "rb").read(), bytes(data))
        self.assertIsNone(DeviceFile.load(state.path + ".none"))

    def test_a_file_read_while_another_program_writes_it_is_in_use_not_damaged(self):
        state = self.state()
        state.save()
        os.remove(state.log.path)  # (as between the steps of a compaction: the device file names a log just gone)
        with self.assertRaises(DeviceFileError) as unlocked:
            DeviceFile.load(state.path)
        self.assertIn("is damaged", str(unlocked.exception))
        state.lock()  # another program's, while it compacts
        self.addCleanup(state.unlock)
        with self.assertRaises(DeviceFileError) as locked:
            DeviceFile.load(state.path)
        self.assertEqual(str(locked.exception), f"the device file {state.path} is in use by another program")

    def test_one_process_at_a_time(self):
        state = self.state()
        state.lock()
        self.addCleanup(state.unlock)
        other = DeviceFile(state.path, state.device)
        self.assertRaises(DeviceFileError, other.lock)
        state.unlock()
        other.lock()
        other.unlock()

    def test_the_replay_window(self):
        window = ReplayWindow()
        self.assertFalse(window.fresh(0))
        for counter in (5, 3, 2000):
            self.assertTrue(window.fresh(counter))
            window.record(counter)
            self.assertFalse(window.fresh(counter))
        self.assertTrue(window.fresh(1999))  # out of order, within the window
        self.assertFalse(window.fresh(5))  # seen, and now too far behind anyway
        self.assertFalse(window.fresh(2000 - 1024))
        again = ReplayWindow.from_bytes(window.to_bytes())
        self.assertEqual((again.highest, again.bitmap), (window.highest, window.bitmap))

    def test_wraps_beyond_one_box_are_staged_in_boxes(self):
        items = [{"device_id": f"{i:032x}", "wrap": bytes(129)} for i in range(700)]
        inline, batches = split_wraps(items, 20_000)
        self.assertEqual(inline + [item for batch in batches for item in batch], items)
        self.assertEqual(len(inline), 20_000 // 184)
        self.assertTrue(all(len(batch) * 184 <= library.BOX_BUDGET for batch in batches))
        self.assertEqual(split_wraps(items[:3], 20_000), (items[:3], []))
        box = commands.StageWraps.makeArguments({"conversation_id": 1, "client_msg_id": "x", "wraps": batches[0]}, None)
        self.assertLessEqual(len(box[b"wraps"]), 65_535)


class DeviceTests(E2EETestCase):
    @inlineCallbacks
    def test_the_first_login_starts_the_chain_and_uploads_prekeys(self):
        alice, _ = yield self.device("alice")
        path = os.path.join(self.directory("phone"), "alice.device")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual((alice.e2ee.status, alice.encryption_problem), (ACTIVE, None))
        self.assertEqual(self.session_devices("alice"), [alice.device_id])
        links = (yield alice.call(commands.GetDeviceChain, username="alice"))["links"]
        [link] = [chain.Link.from_bytes(data) for data in links]
        self.assertEqual((link.op, link.device.hex(), link.name), ("add", alice.device_id, "phone"))
        count = yield alice.call(commands.CountPrekeys)
        self.assertEqual(count["count"], 100)
        [device] = yield alice.list_devices()
        self.assertEqual((device.device_id, device.name, device.this_device), (alice.device_id, "phone", True))

    @inlineCallbacks
    def test_logging_in_again_is_the_same_device(self):
        alice, _ = yield self.device("alice")
        first = alice.device_id
        yield alice.close()
        alice, _ = yield self.device("alice")
        self.assertEqual(alice.device_id, first)
        links = (yield alice.call(commands.GetDeviceChain, username="alice"))["links"]
        self.assertEqual(len(links), 1)
        self.assertEqual((yield alice.call(commands.CountPrekeys))["count"], 100)  # nothing uploaded twice

    @inlineCallbacks
    def test_a_new_installation_waits_until_a_device_adds_it(self):
        phone, _ = yield self.device("alice")
        bob, _ = yield self.device("bob", install="bobs")
        conversation, _ = yield bob.create_conversation(["alice"])
        laptop, _ = yield self.device("alice", install="laptop")
        self.assertEqual(laptop.e2ee.status, PENDING)
        self.assertIn("none of your devices has added", laptop.encryption_problem)
        self.assertEqual(self.session_devices("alice"), sorted(["", phone.device_id]))  # the laptop is not bound
        with self.assertRaises(EncryptionUnavailable):
            yield laptop.send_message(conversation, "not yet")
        request = yield laptop.link_request()
        self.assertTrue(request.startswith("securechatd-link:"))
        added = yield phone.link_new_device(request)
        self.assertEqual(added, (laptop.device_id, "laptop"))
        with self.assertRaises(LinkError):  # a request is used once: the chain moved on
            yield phone.link_new_device(request)
        bound = yield laptop.complete_link()
        self.assertTrue(bound)
        self.assertEqual(self.session_devices("alice"), sorted([laptop.device_id, phone.device_id]))
        self.assertEqual((yield self.server_prekey_count("alice", laptop.device_id)), 100)
        devices = yield phone.list_devices()
        self.assertEqual([(d.name, d.this_device) for d in devices], [("phone", True), ("laptop", False)])

    @inlineCallbacks
    def test_a_link_request_names_the_device_that_signs(self):
        phone, _ = yield self.device("alice")
        laptop, _ = yield self.linked(phone, "alice")
        tablet, _ = yield self.device("alice", install="tablet")
        with self.assertRaises(LinkError) as which:
            yield tablet.link_request()
        self.assertIn("Say which", str(which.exception))
        request = yield tablet.link_request(laptop.device_id)
        with self.assertRaises(LinkError):  # not the phone's to sign
            yield phone.link_new_device(request)
        yield laptop.link_new_device(request)
        self.assertTrue((yield tablet.complete_link()))

    @inlineCallbacks
    def test_a_new_installation_logs_in_bound_once_it_was_added(self):
        phone, _ = yield self.device("alice")
        laptop, _ = yield self.device("alice", install="laptop")
        request = yield laptop.link_request()
        yield laptop.close()
        yield phone.link_new_device(request)
        laptop, _ = yield self.device("alice", install="laptop")  # the next login binds it at once
        self.assertEqual(laptop.e2ee.status, ACTIVE)
        self.assertIn(laptop.device_id, self.session_devices("alice"))

    @inlineCallbacks
    def test_the_signed_prekey_rotates_weekly_and_the_old_one_is_kept_a_week(self):
        clock = task.Clock()
        clock.advance(1_800_000_000)
        alice, _ = yield self.device("alice", clock=clock)
        first = alice.e2ee.state.current_spk.id
        clock.advance(WEEK)
        yield alice.e2ee.settled()
        state = alice.e2ee.state
        second = state.current_spk.id
        self.assertNotEqual(second, first)
        self.assertEqual(state.signed_prekeys[first][1], (clock.seconds() + WEEK) * 1000)  # kept another week
        bob, _ = yield self.device("bob", install="bobs")
        bundle = yield bob.call(commands.ClaimPrekeyBundle, username="alice", device_id=alice.device_id)
        self.assertEqual(bundle["spk_id"], second)
        self.assertEqual(DeviceFile.load(state.path).current_spk.id, second)
        clock.advance(WEEK)
        yield alice.e2ee.settled()
        self.assertNotIn(first, state.signed_prekeys)
        self.assertEqual(len(state.signed_prekeys), 2)

    @inlineCallbacks
    def test_nothing_is_written_to_the_device_file_once_its_client_closed(self):
        alice, _ = yield self.device("alice")
        e2ee = alice.e2ee
        yield alice.close()
        with open(e2ee.state.path, "rb") as f:
            closed_with = f.read()
        e2ee.state.counter += 1  # (as work still queued when it closed would change it)
        e2ee.save()
        with open(e2ee.state.path, "rb") as f:
            self.assertEqual(f.read(), closed_with)

    @inlineCallbacks
    def test_a_damaged_device_file_is_reported_and_kept(self):
        os.makedirs(self.directory("phone"))
        path = os.path.join(self.directory("phone"), "alice.device")
        with open(path, "wb") as out:
            out.write(b"not a device file")
        alice, inbox = yield self.device("alice")
        [(kind, user, detail)] = inbox.alarms()
        self.assertEqual((kind, user), (Alarm.DEVICE_FILE, "alice"))
        self.assertIn("damaged", alice.encryption_problem)
        self.assertEqual(open(path, "rb").read(), b"not a device file")
        self.assertEqual(self.session_devices("alice"), [""])

    @inlineCallbacks
    def test_a_device_file_is_used_by_one_client_at_a_time(self):
        first, _ = yield self.device("alice")
        second, inbox = yield self.device("alice")
        [(kind, _, detail)] = inbox.alarms()
        self.assertEqual(kind, Alarm.DEVICE_FILE)
        self.assertIn("in use", detail)
        self.assertIsNone(second.e2ee)


class MessageTests(E2EETestCase):
    @inlineCallbacks
    def test_two_users_round_trip_and_history(self):
        alice, alice_inbox = yield self.device("alice")
        bob, bob_inbox = yield self.device("bob", install="bobs")
        conversation, created = yield alice.create_conversation(["bob"])
        self.assertTrue(created)
        sent = yield alice.send_message(conversation, "hello bob ✓")
        [message] = yield bob_inbox.wait("deliver", 1)
        self.assertEqual(
            (message.message_id, message.sender, message.body, message.encrypted, message.problem),
            (sent.message_id, "alice", "hello bob ✓", True, None),
        )
        self.assertEqual(message.sender_device, alice.device_id)
        yield bob.send_message(conversation, "hi alice")
        [answer] = yield alice_inbox.wait("deliver", 1)
        self.assertEqual(answer.body, "hi alice")
        [receipt] = yield alice_inbox.wait("receipt", 1)
        self.assertEqual((receipt.username, receipt.state), ("bob", "delivered"))
        for client in (alice, bob):
            page = yield client.history(conversation)
            self.assertEqual(
                [(m.sender, m.body) for m in page.messages], [("alice", "hello bob ✓"), ("bob", "hi alice")]
            )
        self.assertEqual((yield bob.members(conversation)), ("alice", "bob"))
        self.assertEqual(alice_inbox.alarms() + bob_inbox.alarms(), [])
        self.assertEqual((yield self.wrapped_for(sent.message_id)), [])  # acknowledged: the server let the wrap go

    @inlineCallbacks
    def test_history_reads_with_kept_keys_after_a_restart_and_with_wraps_not_yet_pushed(self):
        alice, _ = yield self.device("alice")
        bob, bob_inbox = yield self.device("bob", install="bobs")
        conversation, _ = yield alice.create_conversation(["bob"])
        yield alice.send_message(conversation, "one")
        yield bob_inbox.wait("deliver", 1)
        yield alice.ping()
        yield bob.close()
        bob, bob_inbox = yield self.device("bob", install="bobs")  # the keys of what it read are in its device file
        page = yield bob.history(conversation)
        self.assertEqual([(m.body, m.problem) for m in page.messages], [("one", None)])
        held = Deferred()
        bob.on_deliver = lambda message: bob_inbox._add("deliver", message) and None or held
        yield alice.send_message(conversation, "two")
        yield alice.send_message(conversation, "three")
        yield bob_inbox.wait("deliver", 1)  # "two" is shown and held; "three" waits its turn, unopened
        page = yield bob.history(conversation)  # reads "three" from its wrap, which the server still holds
        self.assertEqual([m.body for m in page.messages], ["one", "two", "three"])
        held.callback(None)
        [_, three] = yield bob_inbox.wait("deliver", 2)
        self.assertEqual((three.body, three.problem), ("three", None))  # read with the key kept by history
        self.assertEqual(bob_inbox.alarms(), [])

    @inlineCallbacks
    def test_a_first_message_uses_a_one_time_prekey_which_is_deleted_and_refilled(self):
        alice, _ = yield self.device("alice")
        bob, bob_inbox = yield self.device("bob", install="bobs")
        yield self.write(
            "DELETE FROM one_time_prekeys WHERE device_id = ? AND opk_id NOT IN"
            " (SELECT opk_id FROM one_time_prekeys WHERE device_id = ? ORDER BY opk_id LIMIT 3)",
            bob.device_id,
            bob.device_id,
        )
        held = set(bob.e2ee.state.one_time_prekeys)
        [(used,)] = yield self.query(
            "SELECT MIN(opk_id) FROM one_time_prekeys WHERE device_id = ?", bob.device_id
        )
        conversation, _ = yield alice.create_conversation(["bob"])
        yield alice.send_message(conversation, "first")
        [message] = yield bob_inbox.wait("deliver", 1)
        self.assertEqual(message.body, "first")
        self.assertEqual(held - set(bob.e2ee.state.one_time_prekeys), {used})  # deleted in the save that read it
        self.assertNotIn(used, DeviceFile.load(bob.e2ee.state.path).one_time_prekeys)
        yield bob.e2ee.settled()
        self.assertEqual((yield self.server_prekey_count("bob", bob.device_id)), 100)  # 2 were left: refilled

    @inlineCallbacks
    def test_a_first_message_without_one_time_prekeys(self):
        alice, _ = yield self.device("alice")
        bob, bob_inbox = yield self.device("bob", install="bobs")
        yield self.write("DELETE FROM one_time_prekeys WHERE device_id = ?", bob.device_id)
        held = set(bob.e2ee.state.one_time_prekeys)
        conversation, _ = yield alice.create_conversation(["bob"])
        yield alice.send_message(conversation, "on the signed prekey alone")
        [message] = yield bob_inbox.wait("deliver", 1)
        self.assertEqual((message.body, message.problem), ("on the signed prekey alone", None))
        self.assertEqual(set(bob.e2ee.state.one_time_prekeys), held)
        yield bob.send_message(conversation, "and back")

    @inlineCallbacks
    def test_one_user_with_two_devices(self):
        phone, phone_inbox = yield self.device("alice")
        laptop, laptop_inbox = yield self.linked(phone, "alice")
        bob, bob_inbox = yield self.device("bob", install="bobs")
        conversation, _ = yield bob.create_conversation(["alice"])
        sent = yield bob.send_message(conversation, "to both of you")
        for inbox in (phone_inbox, laptop_inbox):
            [message] = yield inbox.wait("deliver", 1)
            self.assertEqual((message.message_id, message.body), (sent.message_id, "to both of you"))
        sent = yield laptop.send_message(conversation, "from the laptop")
        [message] = yield bob_inbox.wait("deliver", 1)
        self.assertEqual((message.body, message.sender_device), ("from the laptop", laptop.device_id))
        mine = (yield phone_inbox.wait("deliver", 2))[1]  # the sender's other device reads it too
        self.assertEqual((mine.sender, mine.body), ("alice", "from the laptop"))
        page = yield phone.history(conversation)
        self.assertEqual([m.body for m in page.messages], ["to both of you", "from the laptop"])
        self.assertEqual(phone_inbox.alarms() + laptop_inbox.alarms() + bob_inbox.alarms(), [])

    @inlineCallbacks
    def test_once_keys_and_chains_are_known_a_message_is_one_command(self):
        """No GetMembership, GetChain or GetDeviceChain before each message: pushes say when something moved on."""
        alice, _, bob, bob_inbox, group = yield self.after_a_first_message("us")
        sent = self.count_commands("alice")
        for n in range(3):
            yield alice.send_message(group, f"again {n}")
        self.assertEqual(sent, ["SendEncrypted"] * 3)
        yield bob.set_mode(group, "deniable")  # ModeChanged: alice's next message is sealed in the new mode
        later = yield alice.send_message(group, "off the record")
        self.assertEqual(later.mode, "deniable")
        self.assertIn("GetChain", sent[3:])
        carol, _ = yield self.device("carol", install="carols")
        yield bob.add_members(group, ["carol"])  # ConversationUpdated: alice's next one is sealed for carol too
        del sent[:]
        yield alice.send_message(group, "hello carol")
        self.assertIn("GetMembership", sent)
        self.assertEqual(sent.count("SendEncrypted"), 1)  # (not refused as sealed under an earlier state)

    @inlineCallbacks
    def test_a_message_received_is_one_write_of_the_device_file(self):
        """Opened and its link taken into the chain, then written once (each write is three fsyncs)."""
        alice, _, bob, bob_inbox, conversation = yield self.after_a_first_message()
        saves = yield self.count_saves(bob)
        yield alice.send_message(conversation, "second")
        [_, second] = yield bob_inbox.wait("deliver", 2)
        self.assertEqual((second.body, second.chain), ("second", "verified"))
        self.assertEqual(len(saves), 1)

    @inlineCallbacks
    def test_a_move_told_while_a_message_is_sealed_is_not_lost(self):
        alice, _, _, _, group = yield self.after_a_first_message("us")
        self.assertIn(group, alice.e2ee._current)
        alice.e2ee.moved(group)
        run, told = ChatLocator.run, []

        def meanwhile(locator, name, box):
            if name == b"GetMembership" and not told:  # (alice's seal waits for its answer)
                told.append(alice.e2ee.moved(group))  # a ModeChanged that comes meanwhile
            return run(locator, name, box)

        self.patch(ChatLocator, "run", meanwhile)
        yield alice.send_message(group, "sealed after a fetch")
        self.assertNotIn(group, alice.e2ee._current)  # the next message fetches again

    @inlineCallbacks
    def test_a_chain_not_followed_after_a_message_is_fetched_before_the_next(self):
        alice, _, _, _, group = yield self.after_a_first_message("us")

        async def refused(*arguments):
            raise commands.RateLimited("Too many requests: try again in 1 s.")

        self.patch(alice.e2ee, "sent_checked", refused)
        yield alice.send_message(group, "its receipt is not followed")
        self.assertNotIn(group, alice.e2ee._current)

    @inlineCallbacks
    def test_a_later_message_pushed_while_our_answer_is_followed_is_no_gap(self):
        alice, alice_inbox, bob, bob_inbox, group = yield self.after_a_first_message("us")
        yield bob.send_message(group, "hi")
        yield alice_inbox.wait("deliver", 1)
        following, checked = Deferred(), alice.e2ee.sent_checked

        async def slowly(*arguments):
            await following
            return await checked(*arguments)

        self.patch(alice.e2ee, "sent_checked", slowly)
        sent = self.count_commands("alice")
        sending = alice.send_message(group, "mine")  # answered, then followed slowly
        yield bob_inbox.wait("deliver", 2)
        yield bob.send_message(group, "after yours")  # pushed to alice meanwhile
        yield alice_inbox.wait("deliver", 2)
        following.callback(None)
        yield sending
        self.assertNotIn("HistoryEncrypted", sent)  # (alice's own seq was no gap)
        self.assertEqual([m.body for m in alice_inbox.items["deliver"]], ["hi", "after yours"])

    @inlineCallbacks
    def test_device_chains_are_fetched_when_they_change_not_before_every_message(self):
        alice, alice_inbox, bob, bob_inbox, conversation = yield self.after_a_first_message()  # (chains fetched)
        asked = self.count_chain_fetches()
        for n in range(3):
            yield alice.send_message(conversation, f"again {n}")
        yield bob_inbox.wait("deliver", 4)
        self.assertEqual(asked, [])
        laptop, laptop_inbox = yield self.linked(bob, "bob", install="bobs-laptop")  # DevicesChanged to alice
        [(user, added, removed)] = yield alice_inbox.wait("devices", 1)  # told at once, before she writes
        self.assertEqual((user, added, removed), ("bob", [laptop.device_id], []))
        yield alice.send_message(conversation, "to the laptop too")
        self.assertEqual(asked.count(("alice", "bob")), 1)
        [message] = yield laptop_inbox.wait("deliver", 1)
        self.assertEqual(message.body, "to the laptop too")

    @inlineCallbacks
    def test_devices_changed_pushed_again_and_again_costs_one_fetch(self):
        """A server repeating DevicesChanged (or naming strangers) makes no queue of fetches ahead of messages."""
        alice, _, bob, bob_inbox, conversation = yield self.after_a_first_message()
        asked = self.count_chain_fetches()
        for _ in range(50):  # (as pushes come: each answered at once)
            alice._protocol.devices_changed("bob")
            alice._protocol.devices_changed("nobody-alice-knows")
        yield alice.send_message(conversation, "after them")
        self.assertLessEqual(asked.count(("alice", "bob")), 2)
        self.assertNotIn(("alice", "nobody-alice-knows"), asked)
        self.assertIsNone(alice.e2ee.chains.get("nobody-alice-knows"))
        yield bob_inbox.wait("deliver", 2)

    @inlineCallbacks
    def test_a_device_added_unannounced_gets_the_message_after_the_answer_names_its_user(self):
        alice, _, bob, bob_inbox, conversation = yield self.after_a_first_message()
        self.lose_devices_changed()
        laptop, laptop_inbox = yield self.linked(bob, "bob", install="bobs-laptop")
        yield alice.send_message(conversation, "not to the laptop: alice has not seen it")
        yield alice.send_message(conversation, "to the laptop too")  # the answer named bob: his chain fetched
        yield laptop_inbox.wait("deliver", 1)
        yield laptop.ping()
        self.assertEqual([m.body for m in laptop_inbox.items["deliver"]], ["to the laptop too"])

    @inlineCallbacks
    def test_a_device_revoked_unannounced_is_refused_by_the_server_and_the_message_sealed_again(self):
        phone, phone_inbox, laptop, laptop_inbox, bob, conversation = yield self.revoke_a_laptop(announced=False)
        asked = self.count_chain_fetches()
        sent = yield bob.send_message(conversation, "after")  # wrapped for the laptop, refused, sealed again
        self.assertEqual([fetch for fetch in asked if fetch[0] == "bob"], [("bob", "alice")])  # (its owner's only)
        self.assertIn((yield self.wrapped_for(sent.message_id)), ([phone.device_id], []))  # ([]: acknowledged)
        [_, after] = yield phone_inbox.wait("deliver", 2)
        self.assertEqual(after.body, "after")
        yield laptop.ping()
        self.assertEqual([m.body for m in laptop_inbox.items["deliver"]], ["before"])

    @inlineCallbacks
    def test_naming_a_device_from_another(self):
        phone, _ = yield self.device("alice")
        laptop, _ = yield self.linked(phone, "alice")
        yield phone.rename_device(laptop.device_id, "Work laptop")
        names = {d.device_id: d.name for d in (yield laptop.list_devices())}
        self.assertEqual(names[laptop.device_id], "Work laptop")  # from the signed chain, as anyone sees it
        with self.assertRaises(ValueError):  # (Malformed: longer than a chain link may carry; nothing published)
            yield phone.rename_device(laptop.device_id, "x" * 65)
        self.assertIn("Work laptop", {d.name for d in (yield phone.list_devices())})

    @inlineCallbacks
    def test_a_member_deleted_from_a_group_is_asked_for_once(self):
        """The signed state still names a member the operator deleted: their chain is not asked for again at
        every message (each ask of someone who shares no conversation is a directory search: 35 messages
        would run out of them), and nothing is encrypted to them."""
        alice, _ = yield self.device("alice")
        bob, bob_inbox = yield self.device("bob", install="bobs")
        carol, _ = yield self.device("carol", install="carols")
        group, _ = yield alice.create_conversation(["bob", "carol"], title="Team")
        yield alice.send_message(group, "hello all")
        yield carol.close()
        yield self.hub.store.delete_user("carol", reactor.seconds())
        for n in range(35):
            sent = yield alice.send_message(group, f"message {n}")
        self.assertNotIn(carol.device_id, (yield self.wrapped_for(sent.message_id)))
        received = yield bob_inbox.wait("deliver", 36)
        self.assertEqual(received[-1].body, "message 34")

    @inlineCallbacks
    def test_a_group_of_three_with_an_add_and_a_leave(self):
        alice, alice_inbox = yield self.device("alice")
        bob, bob_inbox = yield self.device("bob", install="bobs")
        carol, carol_inbox = yield self.device("carol", install="carols")
        dave, dave_inbox = yield self.device("dave", install="daves")
        group, _ = yield alice.create_conversation(["bob", "carol"], title="Pläne")
        yield alice.send_message(group, "hello all")
        for inbox in (bob_inbox, carol_inbox):
            [message] = yield inbox.wait("deliver", 1)
            self.assertEqual(message.body, "hello all")
        yield bob.add_members(group, ["dave"])
        self.assertEqual((yield alice.members(group)), ("alice", "bob", "carol", "dave"))
        yield carol.send_message(group, "welcome dave")
        for inbox, count in ((alice_inbox, 1), (bob_inbox, 2), (dave_inbox, 1)):
            message = (yield inbox.wait("deliver", count))[-1]
            self.assertEqual((message.sender, message.body), ("carol", "welcome dave"))
        yield carol.leave_conversation(group)
        sent = yield dave.send_message(group, "bye carol")
        self.assertNotIn(carol.device_id, (yield self.wrapped_for(sent.message_id)))
        for inbox, count in ((alice_inbox, 2), (bob_inbox, 3)):
            message = (yield inbox.wait("deliver", count))[-1]
            self.assertEqual(message.body, "bye carol")
        yield dave.ping()
        self.assertEqual([m.body for m in carol_inbox.items["deliver"]], ["hello all"])
        self.assertEqual((yield bob.members(group)), ("alice", "bob", "dave"))
        page = yield dave.history(group)
        self.assertEqual(
            [(m.body, m.problem) for m in page.messages],
            [(None, Problem.NO_KEY), ("welcome dave", None), ("bye carol", None)],  # from before dave was added
        )
        inboxes = (alice_inbox, bob_inbox, carol_inbox, dave_inbox)
        self.assertEqual([alarm for inbox in inboxes for alarm in inbox.alarms()], [])

    @inlineCallbacks
    def test_a_message_resent_after_a_drop_is_the_same_envelope(self):
        alice, _ = yield self.device("alice", remember_password=True)
        bob, bob_inbox = yield self.device("bob", install="bobs")
        conversation, _ = yield alice.create_conversation(["bob"])
        reconnected = Deferred()
        alice.on_reconnected = reconnected.callback
        original, dropped, headers = self.hub.encrypted.send, [], []

        def send_then_drop(session, *arguments):
            headers.append(arguments[2])

            def drop(message):
                if not dropped:
                    dropped.append(message)
                    session.client.transport.abortConnection()
                return message

            return original(session, *arguments).addCallback(drop)

        self.hub.encrypted.send = send_then_drop
        counter = alice.e2ee.state.counter
        answers = [alice.send_message(conversation, f"m{i}") for i in range(3)]
        yield reconnected
        sent = []
        for answer in answers:
            sent.append((yield answer))
        self.assertEqual([s.seq for s in sent], [1, 2, 3])
        self.assertEqual(headers[0], headers[1])  # the first one again, not encrypted again
        self.assertEqual(alice.e2ee.state.counter, counter + 3)
        delivered = yield bob_inbox.wait("deliver", 3)
        self.assertEqual([(m.body, m.problem) for m in delivered], [("m0", None), ("m1", None), ("m2", None)])

    @inlineCallbacks
    def test_a_message_sealed_under_an_old_membership_is_sealed_again(self):
        alice, _ = yield self.device("alice")
        bob, bob_inbox = yield self.device("bob", install="bobs")
        carol, carol_inbox = yield self.device("carol", install="carols")
        group, _ = yield alice.create_conversation(["bob"], title="growing")
        yield bob.members(group)
        stale = []
        refresh = bob.e2ee.refresh_membership

        async def once_stale(conversation_id):
            if not stale:  # as if carol's addition had come in just after bob looked
                stale.append(bob.e2ee.membership(conversation_id))
                return stale[0]
            return await refresh(conversation_id)

        self.patch(bob.e2ee, "refresh_membership", once_stale)
        yield alice.add_members(group, ["carol"])
        sent = yield bob.send_message(group, "carol too")
        self.assertEqual(len(stale), 1)
        [message] = yield carol_inbox.wait("deliver", 1)
        self.assertEqual((message.message_id, message.body), (sent.message_id, "carol too"))

    @inlineCallbacks
    def test_wraps_that_do_not_fit_one_box_are_staged_first(self):
        self.patch(library, "BOX_BUDGET", 700)  # a body of 272 bytes and a header leave room for two wraps
        alice, _ = yield self.device("alice")
        inboxes = []
        for name in ("bob", "carol", "dave", "erin"):
            _, inbox = yield self.device(name, install=f"{name}s")
            inboxes.append(inbox)
        staged = []
        original = self.hub.encrypted.stage
        self.hub.encrypted.stage = lambda *arguments: staged.append(len(arguments[3])) or original(*arguments)
        group, _ = yield alice.create_conversation(["bob", "carol", "dave", "erin"], title="many")
        yield alice.send_message(group, "staged")
        self.assertTrue(staged)
        for inbox in inboxes:
            [message] = yield inbox.wait("deliver", 1)
            self.assertEqual(message.body, "staged")

    @inlineCallbacks
    def test_an_app_that_never_encrypts_is_as_before(self):
        port, ca, _ = start_daemon(self, reactor)  # plaintext allowed
        clients = []
        for name in ("alice", "bob"):
            client = ChatClient("127.0.0.1", port, ca, hostname="localhost", reactor=reactor)
            self.addCleanup(client.close)
            clients.append((client, Inbox(client)))
            yield client.connect()
            yield client.register(name, PASSWORD)
            yield client.login(name, PASSWORD)
        (alice, _), (bob, bob_inbox) = clients
        self.assertIsNone(alice.device_id)
        conversation, _ = yield alice.create_conversation(["bob"])
        yield alice.send_message(conversation, "plain")
        [message] = yield bob_inbox.wait("deliver", 1)
        self.assertEqual((message.body, message.encrypted), ("plain", False))
        with self.assertRaises(EncryptionUnavailable):
            yield alice.safety_number("bob")

    @inlineCallbacks
    def test_an_encrypting_client_in_a_plaintext_conversation(self):
        port, ca, _ = start_daemon(self, reactor)  # plaintext allowed
        self.port, self.ca = port, ca
        alice, _ = yield self.device("alice")
        bob, bob_inbox = yield self.device("bob", install="bobs")
        plain, _ = yield alice.create_conversation(["bob"], encrypted=False)
        secret, _ = yield alice.create_conversation(["bob"], encrypted=True)
        self.assertNotEqual(plain, secret)
        yield alice.send_message(plain, "in the clear")
        yield alice.send_message(secret, "between us")
        messages = yield bob_inbox.wait("deliver", 2)
        self.assertEqual(
            sorted((m.conversation_id, m.body, m.encrypted) for m in messages),
            [(plain, "in the clear", False), (secret, "between us", True)],
        )


class AlarmTests(E2EETestCase):
    @inlineCallbacks
    def conversation(self):
        alice, alice_inbox = yield self.device("alice")
        bob, bob_inbox = yield self.device("bob", install="bobs")
        conversation, _ = yield alice.create_conversation(["bob"])
        yield alice.send_message(conversation, "hello")
        yield bob_inbox.wait("deliver", 1)
        return alice, alice_inbox, bob, bob_inbox, conversation

    @inlineCallbacks
    def test_a_fork_of_a_chain_raises_the_alarm(self):
        alice, _, bob, bob_inbox, conversation = yield self.conversation()
        other = chain.first(Device.generate("alice"), "evil")  # what a lying server shows instead of link 1
        yield self.write(
            "UPDATE chain_links SET link = ?, hash = ? WHERE seq = 1"
            " AND user_id = (SELECT id FROM users WHERE username = 'alice')",
            other.to_bytes(),
            other.hash(),
        )
        number = yield bob.safety_number("alice")
        [(kind, user, detail)] = bob_inbox.alarms()
        self.assertEqual((kind, user), (Alarm.FORK, "alice"))
        self.assertIn("not the link seen before", detail)
        self.assertEqual(list(bob.e2ee.chains.get("alice").devices), [bytes.fromhex(alice.device_id)])
        self.assertEqual(number, (yield alice.safety_number("bob")))  # still the devices verified before
        fresh, fresh_inbox = yield self.device("bob", install="bobs2")  # a new device of bob's
        yield fresh.e2ee.chains.refresh("alice")
        self.assertEqual(fresh_inbox.alarms(), [])  # trusted on first use: only what was seen can be forked

    @inlineCallbacks
    def test_a_bad_link_raises_the_alarm(self):
        alice, _, bob, bob_inbox, conversation = yield self.conversation()
        state = bob.e2ee.chains.get("alice")
        stranger = Device.generate("alice")
        forged = chain.add(state, stranger, Device.generate("alice"), "forged")  # signed by no device of alice
        yield self.write(
            "INSERT INTO chain_links (user_id, seq, hash, link, published_at)"
            " SELECT id, 2, ?, ?, 0 FROM users WHERE username = 'alice'",
            forged.hash(),
            forged.to_bytes(),
        )
        bob.e2ee.chains.stale(["alice"])  # (fetched again: after a DevicesChanged, a reconnect, or an hour)
        yield bob.send_message(conversation, "still to the phone only")
        [(kind, user, detail)] = bob_inbox.alarms()
        self.assertEqual((kind, user), (Alarm.BAD_CHAIN, "alice"))
        self.assertIn("is not a device of 'alice'", detail)

    @inlineCallbacks
    def test_a_revoked_device_gets_nothing_new(self):
        phone, phone_inbox, laptop, laptop_inbox, bob, conversation = yield self.revoke_a_laptop()
        [(kind, user, _)] = yield laptop_inbox.wait("alarm", 1)
        self.assertEqual((kind, user, laptop.e2ee.status), (Alarm.DEVICE_REVOKED, "alice", REVOKED))
        self.assertEqual(self.session_devices("alice"), sorted(["", phone.device_id]))
        sent = yield bob.send_message(conversation, "after")
        self.assertIn((yield self.wrapped_for(sent.message_id)), ([phone.device_id], []))  # ([]: acknowledged)
        [_, after] = yield phone_inbox.wait("deliver", 2)
        self.assertEqual(after.body, "after")
        [(counted,)] = yield self.query("SELECT COUNT(*) FROM wraps WHERE device_id = ?", laptop.device_id)
        self.assertEqual(counted, 0)
        yield laptop.ping()
        self.assertEqual([m.body for m in laptop_inbox.items["deliver"]], ["before"])
        with self.assertRaises(EncryptionUnavailable) as refused:
            yield laptop.send_message(conversation, "from a revoked device")
        self.assertIn("revoked", str(refused.exception))

    @inlineCallbacks
    def test_an_altered_body_is_reported_with_its_reason(self):
        alice, _, bob, bob_inbox, conversation = yield self.conversation()
        yield bob.close()
        sent = yield alice.send_message(conversation, "altered on the way")
        [(body,)] = yield self.query("SELECT sealed FROM messages WHERE id = ?", sent.message_id)
        body = bytearray(body)
        body[0] ^= 1
        yield self.write("UPDATE messages SET sealed = ? WHERE id = ?", bytes(body), sent.message_id)
        yield alice.send_message(conversation, "and this one intact")
        bob, bob_inbox = yield self.device("bob", install="bobs")
        altered, intact = yield bob_inbox.wait("deliver", 2)
        self.assertEqual((altered.message_id, altered.body, altered.problem), (sent.message_id, None, Problem.BAD_BODY))
        self.assertIn("does not decrypt", altered.problem_detail)
        [(kind, user, detail)] = bob_inbox.alarms()
        self.assertEqual((kind, user), (Problem.BAD_BODY, "alice"))
        self.assertEqual(altered.chain, "unchecked")  # (its link was taken: a message that does not open holds nothing)
        self.assertEqual((intact.body, intact.problem, intact.chain), ("and this one intact", None, "verified"))

    @inlineCallbacks
    def test_a_replayed_first_message_is_reported_and_starts_no_session(self):
        pushed = []
        original = ChatClient._deliver_encrypted
        self.patch(ChatClient, "_deliver_encrypted", lambda client, item: pushed.append(item) or original(client, item))
        alice, _, bob, bob_inbox, conversation = yield self.conversation()
        [first] = pushed
        self.assertEqual(first["wrap"][0], 2)  # a first message, with X3DH
        session = bob.e2ee.state.sessions[("alice", bytes.fromhex(alice.device_id))]
        yield bob._deliver_encrypted(dict(first, message_id=first["message_id"] + 100, seq=first["seq"] + 100))
        [_, replayed] = bob_inbox.items["deliver"]
        self.assertEqual((replayed.body, replayed.problem), (None, Problem.REPLAY))
        self.assertEqual([kind for kind, _, _ in bob_inbox.alarms()], [Problem.REPLAY])
        self.assertEqual(bob.e2ee.state.sessions[("alice", bytes.fromhex(alice.device_id))], session)
        yield bob._deliver_encrypted(first)  # the same push again: shown once (it was seen)
        self.assertEqual(len(bob_inbox.items["deliver"]), 2)

    @inlineCallbacks
    def test_a_message_pushed_again_after_a_crash_is_read_with_its_kept_key(self):
        pushed = []
        original = ChatClient._deliver_encrypted
        self.patch(ChatClient, "_deliver_encrypted", lambda client, item: pushed.append(item) or original(client, item))
        alice, _, bob, bob_inbox, conversation = yield self.conversation()
        yield bob.ping()  # (the first push is handed over)
        bob.seen = type(bob.seen)()  # what a crash before the seen file was written forgets
        yield bob._deliver_encrypted(pushed[0])
        [first, again] = bob_inbox.items["deliver"]
        self.assertEqual((again.message_id, again.body, again.problem), (first.message_id, "hello", None))
        self.assertEqual(bob_inbox.alarms(), [])

    @inlineCallbacks
    def test_a_message_from_someone_not_a_member_is_reported(self):
        alice, _, bob, bob_inbox, conversation = yield self.conversation()
        mallory, _ = yield self.device("mallory", install="mallorys")
        members = bob.e2ee.membership(conversation)
        keys = bob.e2ee.state.device.keys
        session = yield mallory.e2ee._start_session(keys)
        sealed = envelope.seal(
            b"let me in",
            conversation,
            members.members_hash,
            "mallory",
            mallory.e2ee.state.device.id,
            1,
            0,
            [keys.device],
            lambda device, key, context: session.encrypt(key, context),
        )
        yield bob._deliver_encrypted(
            {
                "conversation_id": conversation,
                "message_id": 999,
                "seq": 99,
                "sender": "mallory",
                "sender_device": mallory.device_id,
                "sent_at": bob_inbox.items["deliver"][0].sent_at,
                "header": sealed.header,
                "body": sealed.body,
                "wrap": sealed.wraps[keys.device],
            }
        )
        [_, injected] = bob_inbox.items["deliver"]
        self.assertEqual((injected.sender, injected.body, injected.problem), ("mallory", None, Problem.NOT_A_MEMBER))
        self.assertEqual(bob_inbox.alarms()[0][:2], (Problem.NOT_A_MEMBER, "mallory"))

    def push(self, client, conversation, sealed, sender, sender_device, message_id=900, seq=90):
        """What a malicious server (or sender) pushes to `client`: a DeliverEncrypted of `sealed` for its device."""
        return client._deliver_encrypted(
            {
                "conversation_id": conversation,
                "message_id": message_id,
                "seq": seq,
                "sender": sender,
                "sender_device": sender_device.hex(),
                "sent_at": None,
                "header": sealed.header,
                "body": sealed.body,
                "wrap": sealed.wraps.get(client.e2ee.state.device.id),
            }
        )

    @inlineCallbacks
    def test_a_push_that_cannot_be_opened_or_placed_writes_nothing(self):
        """(A server pushing junk makes the client report it, not write its device file: no fsyncs for nothing.)"""
        alice, _, bob, bob_inbox, conversation = yield self.conversation()
        saves = yield self.count_saves(bob)
        junk = envelope.Envelope(b"not a header", bytes(272), {bob.e2ee.state.device.id: bytes(89)}, b"")
        yield self.push(bob, conversation, junk, "alice", alice.e2ee.state.device.id)
        [*_, shown] = bob_inbox.items["deliver"]
        self.assertEqual((shown.body, shown.problem), (None, Problem.MALFORMED_HEADER))
        self.assertEqual(saves, [])

    @inlineCallbacks
    def test_a_sender_showing_recipients_different_keys_is_caught(self):
        alice, _, bob, bob_inbox, conversation = yield self.conversation()
        state, bob_device = alice.e2ee.state, bob.e2ee.state.device.id
        session = Session.from_bytes(state.sessions[("bob", bob_device)])
        sealed = envelope.seal(
            b"two faces",
            conversation,
            alice.e2ee.membership(conversation).members_hash,
            "alice",
            state.device.id,
            state.counter + 1,
            0,
            [bob_device],
            lambda device, key, context: session.encrypt(os.urandom(32), context),  # not the key kc commits to
        )
        kept = dict(bob.e2ee.state.sessions)
        yield self.push(bob, conversation, sealed, "alice", state.device.id)
        [_, caught] = bob_inbox.items["deliver"]
        self.assertEqual((caught.body, caught.problem), (None, Problem.KEY_COMMITMENT_MISMATCH))
        self.assertEqual(bob_inbox.alarms()[0][:2], (Problem.KEY_COMMITMENT_MISMATCH, "alice"))
        self.assertEqual(bob.e2ee.state.sessions, kept)
        bob.seen = type(bob.seen)()  # (the forged push's seq 90 would hide what comes next as seen)
        yield alice.send_message(conversation, "the session is as it was")  # (same ratchet step as the forgery)
        [_, _, after] = yield bob_inbox.wait("deliver", 3)
        self.assertEqual((after.body, after.problem), ("the session is as it was", None))

    @inlineCallbacks
    def test_a_device_not_in_the_senders_chain_is_reported(self):
        alice, _, bob, bob_inbox, conversation = yield self.conversation()
        stranger = Device.generate("alice")  # a device the server says is alice's; her chain does not list it
        sealed = envelope.seal(
            b"it's me, alice",
            conversation,
            alice.e2ee.membership(conversation).members_hash,
            "alice",
            stranger.id,
            1,
            0,
            [bob.e2ee.state.device.id],
            lambda device, key, context: bytes(89),
        )
        yield self.push(bob, conversation, sealed, "alice", stranger.id)
        [_, caught] = bob_inbox.items["deliver"]
        self.assertEqual((caught.body, caught.problem), (None, Problem.UNKNOWN_DEVICE))
        self.assertEqual(bob_inbox.alarms()[0][:2], (Problem.UNKNOWN_DEVICE, "alice"))

    @inlineCallbacks
    def test_a_fork_of_the_membership_raises_the_alarm(self):
        alice, alice_inbox = yield self.device("alice")
        bob, bob_inbox = yield self.device("bob", install="bobs")
        yield self.device("mallory", install="mallorys")
        group, _ = yield alice.create_conversation(["bob"], title="us")
        yield alice.send_message(group, "hello")
        yield bob_inbox.wait("deliver", 1)
        # another epoch 1, even one alice's device signed, is not the one bob saw
        other = membership.create(group, "group", "us", ["bob", "mallory"], alice.e2ee.state.device)
        yield self.write("UPDATE membership_states SET state = ?, hash = ? WHERE conversation_id = ? AND epoch = 1",
                         other.to_bytes(), other.hash(), group)
        self.assertEqual((yield bob.members(group)), ("alice", "bob"))
        [(kind, _, detail)] = bob_inbox.alarms()
        self.assertEqual(kind, Alarm.MEMBERSHIP_FORK)
        self.assertIn("not the state seen before", detail)

    @inlineCallbacks
    def test_a_member_the_server_injects_is_never_encrypted_to(self):
        alice, alice_inbox = yield self.device("alice")
        bob, _ = yield self.device("bob", install="bobs")
        mallory, mallory_inbox = yield self.device("mallory", install="mallorys")
        group, _ = yield alice.create_conversation(["bob"], title="two of us")
        yield self.operator_adds_member(group, "mallory")
        yield alice_inbox.wait("alarm", 1)
        [(kind, _, detail)] = alice_inbox.alarms()
        self.assertEqual(kind, Alarm.INJECTED_MEMBER)
        self.assertIn("mallory", detail)
        sent = yield alice.send_message(group, "not for mallory")
        [(wrapped,)] = yield self.query("SELECT COUNT(*) FROM wraps WHERE message_id = ? AND device_id = ?",
                                        sent.message_id, mallory.device_id)
        self.assertEqual(wrapped, 0)
        yield mallory.ping()
        self.assertEqual(mallory_inbox.items["deliver"], [])

    @inlineCallbacks
    def test_a_bundle_whose_keys_are_not_the_chains_raises_the_alarm(self):
        alice, alice_inbox = yield self.device("alice")
        bob, _ = yield self.device("bob", install="bobs")
        original = self.hub.keys.claim

        def substituted(*arguments):
            def swap(bundle):
                return bundle._replace(device=bundle.device._replace(dh_pub=bytes(31) + b"\x09"))

            return original(*arguments).addCallback(swap)

        self.hub.keys.claim = substituted
        conversation, _ = yield alice.create_conversation(["bob"])
        with self.assertRaises(EncryptionUnavailable):
            yield alice.send_message(conversation, "to whom?")
        [(kind, user, _)] = alice_inbox.alarms()
        self.assertEqual((kind, user), (Alarm.KEY_MISMATCH, "bob"))


class TrustTests(E2EETestCase):
    @inlineCallbacks
    def test_safety_numbers_trust_and_a_change_of_devices(self):
        alice, alice_inbox = yield self.device("alice")
        bob, _ = yield self.device("bob", install="bobs")
        number = yield alice.safety_number("bob")
        self.assertEqual(number, (yield bob.safety_number("alice")))
        self.assertEqual(len(number.replace(" ", "")), 60)
        self.assertFalse(alice.is_verified("bob"))
        yield alice.trust("bob")
        self.assertTrue(alice.is_verified("bob"))
        self.assertEqual(DeviceFile.load(alice.e2ee.state.path).trusted.keys(), {"bob"})
        laptop, _ = yield self.linked(bob, "bob", install="bobs-laptop")
        changed = yield alice.safety_number("bob")
        self.assertNotEqual(changed, number)
        self.assertEqual(alice_inbox.items["devices"], [("bob", [laptop.device_id], [])])
        self.assertFalse(alice.is_verified("bob"))
        yield bob.revoke_device(laptop.device_id)
        yield alice.safety_number("bob")
        self.assertEqual(alice_inbox.items["devices"][1], ("bob", [], [laptop.device_id]))
        self.assertTrue(alice.is_verified("bob"))  # the devices compared, again
