"""The device log (client/device_log.py): what grows with history, appended beside the device file.

Real files in a temporary directory. A crash is played by what it leaves on
disk: a torn last record, or a device file older than its log (the log was
flushed, the device file write never came).
"""

import os
import shutil
import stat
from unittest import mock

from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from securechatd.client import device_file, transcripts
from securechatd.client.device_file import ACTIVE, LABEL, DeviceFile, DeviceFileError, ReplayWindow
from securechatd.client.device_log import DeviceLog
from securechatd.client.library import ChatClient
from securechatd.client.crypto import Problem
from securechatd.client.transcripts import ConversationChain, Transcripts
from securechatd.e2ee.encoding import Malformed, dec
from securechatd.e2ee.keys import Device
from tests.test_client_e2ee import E2EETestCase
from tests.test_transcript import CONVERSATION, SERVER_KEY, History

VERSION_2 = os.path.join(os.path.dirname(__file__), "vectors", "device_file_v2.device")
BOB = ("bob", bytes(16))


class DeviceLogTests(unittest.TestCase):
    def log(self):
        return DeviceLog(os.path.join(os.path.abspath(self.mktemp()), "alice.device"))

    def test_records_are_appended_0600_and_read_in_order(self):
        log = self.log()
        self.assertEqual(log.read(), [])
        log.add(b"one")
        log.add(b"two")
        self.assertFalse(os.path.exists(log.path))  # nothing is written before flush
        log.flush()
        log.add(b"three")
        log.flush()
        log.close()
        self.assertEqual(stat.S_IMODE(os.stat(log.path).st_mode), 0o600)
        again = DeviceLog(log.device_path)
        self.assertEqual(again.read(), [b"one", b"two", b"three"])
        self.assertEqual(again.end, os.path.getsize(log.path))

    def test_a_torn_last_record_is_ignored_and_cut_off_at_the_next_append(self):
        for tail in (b"\x00\x00\x00\x09\x12", b"\x00" * 64):  # a record cut short; zeros past the end
            log = self.log()
            log.add(b"kept")
            log.flush()
            whole = log.end
            log.close()
            with open(log.path, "ab") as out:
                out.write(tail)
            again = DeviceLog(log.device_path)
            self.assertEqual(again.read(at_least=whole), [b"kept"])
            self.assertEqual(os.path.getsize(log.path), whole + len(tail))  # reading changes nothing
            again.add(b"next")
            again.flush()
            again.close()
            self.assertEqual(DeviceLog(log.device_path).read(), [b"kept", b"next"])
            self.assertEqual(os.path.getsize(log.path), again.end)

    def test_a_log_whose_label_was_cut_short_starts_again(self):
        log = self.log()
        os.makedirs(os.path.dirname(log.path))
        with open(log.path, "wb") as out:
            out.write(b"\x00\x00\x00")
        self.assertEqual(log.read(), [])
        log.add(b"one")
        log.flush()
        log.close()
        self.assertEqual(DeviceLog(log.device_path).read(), [b"one"])

    def test_a_log_shorter_than_the_device_file_counts_is_damaged(self):
        log = self.log()
        for record in (b"one", b"two"):
            log.add(record)
        log.flush()
        whole = log.end
        with open(log.path, "r+b") as out:
            out.seek(whole - 2)
            out.write(b"X")  # a flipped byte in a record the device file counts on
        self.assertRaises(Malformed, DeviceLog(log.device_path).read, whole)
        os.truncate(log.path, whole - 4)
        self.assertRaises(Malformed, DeviceLog(log.device_path).read, whole)

    def test_a_failed_append_is_written_again_by_the_next(self):
        log = self.log()
        log.add(b"one")
        log.flush()
        log.add(b"two")
        with mock.patch("os.fsync", side_effect=OSError("disk full")):
            self.assertRaises(OSError, log.flush)
        log.flush()
        log.close()
        self.assertEqual(DeviceLog(log.device_path).read(), [b"one", b"two"])


def new_state(test):
    """bob's new device file, in a directory of its own."""
    return DeviceFile(os.path.join(os.path.abspath(test.mktemp()), "bob.device"), Device.generate("bob"), ACTIVE)


class DeviceFileTests(unittest.TestCase):
    state = new_state

    def test_message_keys_are_in_the_log_and_the_device_file_does_not_grow(self):
        state = self.state()
        state.save()
        size = os.path.getsize(state.path)
        for message_id in range(1, 101):
            state.keep_key(message_id, os.urandom(32), 5, message_id)
        state.save()
        self.assertEqual(os.path.getsize(state.path), size)
        self.assertGreater(os.path.getsize(state.log.path), 100 * 32)
        again = DeviceFile.load(state.path)
        self.assertEqual(again.message_keys, state.message_keys)

    def test_a_sent_messages_key_is_appended_without_rewriting_the_device_file(self):
        state = self.state()
        state.keep_key(8, b"J" * 32, 5, 1)
        state.save()
        inode, length = os.stat(state.path).st_ino, os.path.getsize(state.log.path)
        state.keep_key(9, b"K" * 32, 5, 2)
        state.keep_key(9, b"K" * 32, 5, 2)  # (kept again, e.g. a resent message's answer: one record)
        state.save_log()
        self.assertEqual(os.stat(state.path).st_ino, inode)
        self.assertEqual(DeviceFile.load(state.path).message_keys, {8: (b"J" * 32, 5, 1), 9: (b"K" * 32, 5, 2)})
        self.assertLess(os.path.getsize(state.log.path) - length, 200)

    def test_a_crash_after_the_log_and_before_the_device_file_keeps_the_key_and_refuses_the_counter(self):
        state = self.state()
        state.replay[BOB] = ReplayWindow()
        state.save()
        window = state.replay[BOB]
        window.record(4)  # what opening bob's message with counter 4 changes, as client/crypto.py does it
        state.keep_key(30, b"K" * 32, 5, 7, BOB, 4)
        with mock.patch("securechatd.client.device_file.write_private", side_effect=OSError("killed")):
            self.assertRaises(OSError, state.save)
        again = DeviceFile.load(state.path)
        self.assertEqual(again.message_keys, {30: (b"K" * 32, 5, 7)})  # read again by its id: nothing lost
        self.assertFalse(again.replay[BOB].fresh(4))  # under another id: a replay
        self.assertTrue(again.replay[BOB].fresh(5))

    def test_a_device_file_older_than_a_damaged_log_is_an_error(self):
        state = self.state()
        state.keep_key(1, b"K" * 32, 5, 1)
        state.save()
        os.truncate(state.log.path, os.path.getsize(state.log.path) - 1)
        with self.assertRaises(DeviceFileError) as raised:
            DeviceFile.load(state.path)
        self.assertIn("damaged", str(raised.exception))

    def test_a_version_2_file_is_read_and_migrated_at_the_first_save(self):
        path = os.path.join(os.path.abspath(self.mktemp()), "alice.device")
        os.makedirs(os.path.dirname(path))
        shutil.copy(VERSION_2, path)
        keys = {12: (b"K" * 32, 5, 3), 13: (b"L" * 32, 5, 4), 20: (b"M" * 32, 6, 1)}
        state = DeviceFile.load(path)
        self.assertEqual((state.device.user, state.counter, state.server_key), ("alice", 7, b"S" * 32))
        self.assertEqual(state.message_keys, keys)
        self.assertEqual((state.replay[BOB].highest, state.replay[BOB].fresh(3)), (5, False))
        self.assertFalse(os.path.exists(state.log.path))  # loading writes nothing
        state.save()
        data = open(path, "rb").read()
        self.assertEqual(dec(data)[0], LABEL)
        self.assertNotIn(b"K" * 32, data)
        again = DeviceFile.load(path)
        self.assertEqual((again.message_keys, again.replay[BOB].highest), (keys, 5))
        again.save()
        self.assertEqual(DeviceFile.load(path).message_keys, keys)  # (migrated once: no key twice)
        self.assertEqual(len(DeviceLog(state.path).read()), 3)


class Stub:
    """What Transcripts reads of client/crypto.EndToEnd when it starts: the device file."""

    def __init__(self, state):
        self.state = state


class ChainWindowTests(unittest.TestCase):
    """The e_n of a conversation's chain are appended to the log, not rewritten with the device file."""

    def verified(self):
        """(device file, its Transcripts, conversation 7's chain verified to link 7)."""
        state = new_state(self)
        kept = Transcripts(Stub(state))
        chain = kept.get(CONVERSATION)
        history = History()
        chain.absorb(history.links, history.heads, SERVER_KEY)
        return state, kept, chain

    def test_the_window_goes_to_the_log_and_comes_back(self):
        state, kept, chain = self.verified()
        kept._keep(chain)
        state.save()
        self.assertEqual(ConversationChain.from_bytes(state.transcripts[CONVERSATION]).window, {})
        again = Transcripts(Stub(DeviceFile.load(state.path))).chain(CONVERSATION)
        self.assertEqual((again.window, again.position.e), (chain.window, chain.position.e))
        self.assertEqual(again.to_bytes(), chain.to_bytes())

    def test_links_past_the_head_of_the_device_file_are_not_taken(self):
        state, _, chain = self.verified()
        state.keep_links(CONVERSATION, chain.unsaved)
        state.transcripts[CONVERSATION] = ConversationChain(CONVERSATION).to_bytes()  # the device file of before
        state.save()  # (as a crash leaves it: the chain at its genesis in the device file, e_1 ... e_7 in the log)
        again = Transcripts(Stub(DeviceFile.load(state.path))).chain(CONVERSATION)
        self.assertEqual((again.position.n, again.window), (0, {}))

    def test_the_newest_are_kept(self):
        self.patch(transcripts, "E_KEPT", 3)
        state, kept, chain = self.verified()
        kept._keep(chain)
        state.save()
        self.assertEqual(len(state.windows), 0)
        again = Transcripts(Stub(DeviceFile.load(state.path))).chain(CONVERSATION)
        self.assertEqual(sorted(again.window), [5, 6, 7])

    def test_a_version_2_chain_with_its_window_inline_moves_to_the_log(self):
        state, history = new_state(self), History()
        chain = ConversationChain(CONVERSATION)
        chain.absorb(history.links, history.heads, SERVER_KEY)
        state.transcripts[CONVERSATION] = chain.to_bytes()  # as a version 2 device file kept it
        kept = Transcripts(Stub(state))
        self.assertEqual(kept.chain(CONVERSATION).window, chain.window)
        state.save()
        self.assertEqual(ConversationChain.from_bytes(state.transcripts[CONVERSATION]).window, {})
        again = Transcripts(Stub(DeviceFile.load(state.path))).chain(CONVERSATION)
        self.assertEqual(again.window, chain.window)


class CompactionTests(unittest.TestCase):
    """A log mostly dead weight is rewritten with what is live, and a crash between any two steps loses nothing.

    A crash is played by stopping between the steps of DeviceFile.save and loading what is on disk.
    """

    def setUp(self):
        self.patch(transcripts, "E_KEPT", 2)  # (the e_n of links 1-5 of 7 are dead weight)
        self.patch(device_file, "COMPACT_AT", 0)

    def history(self):
        """bob's device file and log: eight messages read (keys, counters), their chain verified to link 7."""
        state, kept, chain = ChainWindowTests.verified(self)
        state.replay[BOB] = ReplayWindow()
        for counter in range(1, 8):
            state.replay[BOB].record(counter)
            state.keep_key(counter, bytes([counter]) * 32, CONVERSATION, counter, BOB, counter)
        kept._keep(chain)
        state.save()
        state.keep_key(8, b"\x08" * 32, CONVERSATION, 8, BOB, 8)  # its device file write never came (a crash):
        state.save_log()  # counter 8 is refused by what the log says
        state.log.close()
        loaded = DeviceFile.load(state.path)
        self.chain = Transcripts(Stub(loaded)).chain(CONVERSATION).to_bytes()  # with its window, as loaded before
        self.keys = loaded.message_keys
        return state

    def files(self, state):
        return sorted(os.listdir(os.path.dirname(state.path)))

    def assertSameDevice(self, state):
        """`state` loads as it did before compaction: every key, the chain and its window, counters refused."""
        again = DeviceFile.load(state.path)
        chain = Transcripts(Stub(again)).chain(CONVERSATION)
        self.assertEqual(again.message_keys, self.keys)
        self.assertEqual((chain.position.n, sorted(chain.window), chain.to_bytes()), (7, [6, 7], self.chain))
        self.assertEqual([again.replay[BOB].fresh(counter) for counter in range(1, 10)], [False] * 8 + [True])
        again.log.close()
        return again

    def test_a_long_log_mostly_dead_is_compacted_at_the_first_save_after_load(self):
        before = self.history()
        length = before.log.end
        state = DeviceFile.load(before.path)
        state.save()
        self.assertEqual((state.log.generation, self.files(state)), (1, ["bob.device", "bob.device.log.1"]))
        for name in self.files(state):
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(os.path.dirname(state.path), name)).st_mode), 0o600)
        self.assertLess(state.log.end, length * 2 / 3)
        self.assertEqual(len(DeviceLog(state.path, 1).read()), 8 + 2)  # every key, the window's e_n
        again = self.assertSameDevice(state)
        again.keep_key(9, b"H" * 32, CONVERSATION, 9, BOB, 9)  # the new log is appended to as the old was
        again.save()
        again.log.close()
        self.assertEqual(DeviceFile.load(state.path).message_keys[9], (b"H" * 32, CONVERSATION, 9))
        self.assertEqual(self.files(state), ["bob.device", "bob.device.log.1"])

    def test_not_after_a_log_only_flush(self):
        """Records flushed by save_log() before the first save are not in the windows taken at load: that
        start does not compact (it would drop them); nothing is lost."""
        before = self.history()
        state = DeviceFile.load(before.path)
        state.keep_key(9, b"H" * 32, CONVERSATION, 9, BOB, 9)
        state.save_log()
        state.save()
        self.assertEqual((state.log.generation, self.files(state)), (0, ["bob.device", "bob.device.log"]))
        state.log.close()
        self.assertEqual(DeviceFile.load(state.path).message_keys[9], (b"H" * 32, CONVERSATION, 9))

    def test_only_a_long_log_mostly_dead_and_only_at_the_first_save_after_load(self):
        before = self.history()
        self.patch(device_file, "COMPACT_AT", before.log.end + 1)
        state = DeviceFile.load(before.path)  # too short
        state.save()
        self.patch(device_file, "COMPACT_AT", 0)
        state.save()  # (not the first save after load)
        state.log.close()
        self.patch(transcripts, "E_KEPT", 6)  # not enough dead weight: 8 keys and 6 e_n live
        state = DeviceFile.load(before.path)
        state.save()
        state.log.close()
        self.assertEqual((state.log.generation, self.files(state)), (0, ["bob.device", "bob.device.log"]))
        self.patch(transcripts, "E_KEPT", 2)  # 5 e_n dead, and the counters: more than a third of the log
        state = DeviceFile.load(before.path)
        state.save()
        state.log.close()
        self.assertEqual((state.log.generation, self.files(state)), (1, ["bob.device", "bob.device.log.1"]))

    def test_a_crash_after_the_new_log_is_written(self):
        before = self.history()
        state = DeviceFile.load(before.path)
        state._write_log()  # the log of generation 1, durable; the device file still names generation 0
        self.assertEqual(self.files(state), ["bob.device", "bob.device.log", "bob.device.log.1"])
        again = self.assertSameDevice(state)
        self.assertEqual(again.log.generation, 0)  # the new log is ignored ...
        again.save()  # ... and written again, then the old one removed
        self.assertEqual((again.log.generation, self.files(state)), (1, ["bob.device", "bob.device.log.1"]))
        self.assertSameDevice(state)

    def test_a_crash_after_the_device_file_names_the_new_log(self):
        before = self.history()
        state = DeviceFile.load(before.path)
        state._write_log()
        state._write_file()  # the old log is not removed yet
        self.assertEqual(self.files(state), ["bob.device", "bob.device.log", "bob.device.log.1"])
        again = self.assertSameDevice(state)
        self.assertEqual(again.log.generation, 1)
        self.patch(device_file, "COMPACT_AT", 1 << 30)
        again = DeviceFile.load(state.path)
        again.save()  # the old log is a leftover: removed
        again.log.close()
        self.assertEqual(self.files(state), ["bob.device", "bob.device.log.1"])
        self.assertSameDevice(state)

    def test_a_half_written_new_log_is_ignored_and_removed(self):
        before = self.history()
        state = DeviceFile.load(before.path)
        state._write_log()
        new = state.log.path
        os.truncate(new, os.path.getsize(new) // 2)  # (write_private renames only a whole file: the worst case)
        with open(f"{new}.0123456789abcdef.tmp", "wb") as out:  # write_private's, cut short by a crash
            out.write(b"\x00\x00\x00")
        self.assertSameDevice(state)
        self.patch(device_file, "COMPACT_AT", 1 << 30)
        again = DeviceFile.load(state.path)
        again.save()
        again.log.close()
        self.assertEqual(self.files(state), ["bob.device", "bob.device.log"])
        self.assertSameDevice(state)

    def test_a_device_file_naming_a_damaged_new_log_is_refused(self):
        state = DeviceFile.load(self.history().path)
        state.save()
        state.log.close()
        os.truncate(state.log.path, state.log.end - 1)
        self.assertRaises(DeviceFileError, DeviceFile.load, state.path)

    def test_a_compacted_device_file_names_its_log_and_a_version_3_file_its_first(self):
        state = DeviceFile.load(self.history().path)
        self.assertEqual(len(dec(state.to_bytes())), 17)  # (as before compaction: older clients read it)
        state.save()
        state.log.close()
        written = dec(open(state.path, "rb").read())
        self.assertEqual((written[0], len(written), written[-1]), (LABEL, 18, bytes(7) + b"\x01"))


class CrashTests(E2EETestCase):
    """Against the real daemon: a crash between the log and the device file loses nothing and lets no replay in;
    a compacted log keeps what history and the chain need."""

    @inlineCallbacks
    def test_a_message_whose_device_file_write_never_came(self):
        pushed = []
        original = ChatClient._deliver_encrypted
        self.patch(ChatClient, "_deliver_encrypted", lambda client, item: pushed.append(item) or original(client, item))
        alice, _ = yield self.device("alice")
        bob, bob_inbox = yield self.device("bob", install="bobs")
        conversation, _ = yield alice.create_conversation(["bob"])
        yield alice.send_message(conversation, "before")
        yield bob_inbox.wait("deliver", 1)
        yield bob.ping()
        path = bob.e2ee.state.path
        before = open(path, "rb").read()  # the device file as the crash will leave it
        yield alice.send_message(conversation, "hello")
        yield bob_inbox.wait("deliver", 2)
        yield bob.ping()
        yield bob.close()
        with open(path, "wb") as out:
            out.write(before)  # its log holds the key of "hello"; the device file is the one before it
        bob, bob_inbox = yield self.device("bob", install="bobs")
        bob.seen = type(bob.seen)()  # (a crash before the seen file was written, too)
        hello = pushed[-1]
        yield bob._deliver_encrypted(hello)  # pushed again: read with its kept key
        yield bob._deliver_encrypted(dict(hello, message_id=hello["message_id"] + 100, seq=hello["seq"] + 100))
        [again, replayed] = bob_inbox.items["deliver"][-2:]
        self.assertEqual((again.body, again.problem), ("hello", None))
        self.assertEqual((replayed.body, replayed.problem), (None, Problem.REPLAY))
        self.assertEqual([kind for kind, _, _ in bob_inbox.alarms()], [Problem.REPLAY])
        yield alice.send_message(conversation, "after")  # the session carries on from the device file's
        after = (yield bob_inbox.wait("deliver", 3))[-1]
        self.assertEqual((after.body, after.problem), ("after", None))

    @inlineCallbacks
    def test_a_compacted_device_reads_its_history_and_checks_the_chain(self):
        self.patch(transcripts, "E_KEPT", 2)
        self.patch(device_file, "COMPACT_AT", 0)
        alice, _ = yield self.device("alice")
        bob, bob_inbox = yield self.device("bob", install="bobs")
        conversation, _ = yield alice.create_conversation(["bob"])
        sent = [f"message {number}" for number in range(6)]
        for body in sent:
            yield alice.send_message(conversation, body)
        yield bob_inbox.wait("deliver", len(sent))
        yield bob.ping()
        yield bob.close()
        bob, bob_inbox = yield self.device("bob", install="bobs")  # loaded, compacted at its first save
        log = bob.e2ee.state.log
        self.assertEqual(log.generation, 1)
        self.assertFalse(os.path.exists(log.device_path + ".log"))
        self.assertEqual(stat.S_IMODE(os.stat(log.path).st_mode), 0o600)
        page = yield bob.history(conversation)  # (the wraps were let go: read with the keys kept)
        self.assertEqual([(m.body, m.problem) for m in page.messages], [(body, None) for body in sent])
        yield alice.send_message(conversation, "after")
        [after] = yield bob_inbox.wait("deliver", 1)
        self.assertEqual((after.body, after.problem, after.chain), ("after", None, "verified"))
        self.assertEqual(bob_inbox.alarms(), [])
