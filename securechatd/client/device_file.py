"""The device file: everything one installation keeps to be one device of one user (docs/E2EE.md, "Devices").

One file per installation and user (`<state_directory>/<user>.device`), mode
0600, replaced atomically (a temporary file in the same directory, fsync,
rename, fsync of the directory), so a crash leaves the old file or the new
one, never half of one. It holds private keys: losing it loses this device
(its keys, sessions and the keys of the messages it read), nothing else.

Versioned, in the e2ee layer's own encoding: `enc` of the label
`securechatd/device-file/v3` and the sections below, each an `enc` of its
records. (Version 2 added the server's pinned key and the conversation chains
verified, client/transcripts.py; version 3 moved the message keys and the
chains' e_n to the device log, and once the log is compacted a last field
names its generation; a version 1 or 2 file is read, and written back as
version 3.) The client changes a DeviceFile in memory and calls
save() once per step, so what one message changed (its session, the replay
window of its sender, a one-time prekey it used) lands in one write.

What grows with history is appended to the device log instead
(client/device_log.py), and save() makes it durable first: a message's key
is on disk before the device file that moves its session past it, so a
crash between the two leaves a message that is read again with its key (by
its id), never one lost. A received message's record names its sender
device and counter, and loading replays those into the replay windows: a
key on disk whose device file write never came still refuses that counter.

The log is compacted at the first save after load, if it holds more than
COMPACT_RATIO times what is live and at least COMPACT_AT bytes: a log of the
next generation holding only what a load would take from the old one is
written and made durable, then the device file naming it, then the old log
is removed. A crash before the device file leaves the old pair (the new log
is a leftover); after it, the new pair (the old log is one); leftovers are
removed at the first save after the next load.
"""

import errno
import fcntl
import os

from securechatd.client import transcripts
from securechatd.client.device_log import FRAME_BYTES, DeviceLog
from securechatd.e2ee.encoding import Malformed, dec, enc
from securechatd.e2ee.keys import Device, Prekey
from securechatd.files import write_private

LABEL = b"securechatd/device-file/v3"
LABEL_V2 = b"securechatd/device-file/v2"  # read, never written: the message keys and e_n inside
LABEL_V1 = b"securechatd/device-file/v1"  # read, never written: no server key, no conversation chains
KEY, LINK = b"key", b"link"  # the device log's records: a message's key; a chain link's e_n
COMPACT_AT = 1 << 20  # bytes: a smaller log is read at start in ~30 ms, not worth rewriting
COMPACT_RATIO = 1.5  # compacted when it holds more than this times what is live (at best ~2: a key and an e_n
# a message, and the key alone live)
_KEY_BYTES = FRAME_BYTES + len(enc([KEY, 0, b"", 0, 0, "", b"", 0]))  # a live key's record, but for K
_LINK_BYTES = FRAME_BYTES + len(enc([LINK, 0, 0, b"", 0]))  # an e_n's record, but for e_n

# status of this installation's device
NEW = "new"  # keys made; not yet in the user's chain, and the chain was not looked at yet
PENDING = "pending"  # the user has a chain that does not list it: an existing device must add it
ACTIVE = "active"  # a current device of the user's chain
REVOKED = "revoked"  # revoked by the chain: it can never come back
STATUSES = (NEW, PENDING, ACTIVE, REVOKED)

WINDOW = 1024  # counters of one sender device accepted out of order below the highest seen
_WINDOW_MASK = (1 << WINDOW) - 1
_WINDOW_BYTES = WINDOW // 8


_IN_USE = "the device file {path} is in use by another program"


def _flock(descriptor):
    """True if this process now holds the lock of `descriptor`; False if another one holds it."""
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as problem:
        if problem.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _held_elsewhere(path):
    """True if another program holds `<path>.lock` (never creates it)."""
    try:
        descriptor = os.open(f"{path}.lock", os.O_RDWR)
    except OSError:
        return False
    try:
        return not _flock(descriptor)
    finally:
        os.close(descriptor)  # (and with it a lock taken just to look)


class DeviceFileError(Exception):
    """The device file cannot be used: damaged, of another user, or held by another process."""


class ReplayWindow:
    """The counters seen from one sender device: the highest, and which of the WINDOW below it.

    A header's counter is accepted once: above the highest, or within the
    window and not seen yet (messages of several conversations, or resent
    after a reconnect, may arrive out of counter order). Older is a replay.
    Bit i of `bitmap` is counter `highest - i`; counter 0 is never valid.
    """

    def __init__(self, highest=0, bitmap=1):
        self.highest = highest
        self.bitmap = bitmap

    def fresh(self, counter):
        if counter > self.highest:
            return True
        offset = self.highest - counter
        return offset < WINDOW and not (self.bitmap >> offset) & 1

    def record(self, counter):
        if counter > self.highest:
            self.bitmap = ((self.bitmap << (counter - self.highest)) | 1) & _WINDOW_MASK
            self.highest = counter
        else:
            self.bitmap |= 1 << (self.highest - counter)

    def to_bytes(self):
        return enc([self.highest, self.bitmap.to_bytes(_WINDOW_BYTES, "big")])

    @classmethod
    def from_bytes(cls, data):
        highest, bitmap = dec(data, 2)
        if len(highest) != 8 or len(bitmap) != _WINDOW_BYTES:
            raise Malformed("a replay window has the wrong size")
        return cls(_number(highest), int.from_bytes(bitmap, "big"))


def _number(raw):
    if len(raw) != 8:
        raise Malformed("a number is not 8 bytes")
    return int.from_bytes(raw, "big")


def _text(raw):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Malformed("a text field is not UTF-8")


def _records(data, count):
    """The records of a section, each `count` fields."""
    return [dec(record, count) for record in dec(data)]


class DeviceFile:
    """This device's private state; attributes are changed in place, then save() writes them all.

    - `device`: keys.Device (its private keys and prekey id counter); `status`: one of STATUSES
    - `signed_prekeys`: {spk_id: (keys.Prekey, retire_at)}: the current one has retire_at 0,
      an earlier one the time (ms) after which it is deleted; `spk_made_at` (ms) dates the current one
    - `one_time_prekeys`: {opk_id: keys.Prekey} not used yet; `spk_uploaded`: the server has the
      current signed prekey; `opks_to_upload`: ids of one-time prekeys made but not uploaded yet
    - `sessions`: {(user, device id bytes): session.Session bytes}
    - `chains`: {user: [link bytes, ...]}: every link verified, in order; `seen` is the last one's (seq, hash)
    - `memberships`: {conversation_id: [state bytes, ...]}: every verified state, in order
    - `counter`: the last counter this device sent; `replay`: {(user, device id bytes): ReplayWindow}
    - `trusted`: {user: frozenset of sig_pub}: the devices the user compared safety numbers for
    - `message_keys`: {message_id: (K, conversation, seq)} of messages read or sent, for reading history
      again (and disclosing in an export); the place is kept with the key, so a message pushed again at
      another place is a replay. Read only: keep_key() adds one (to the device log)
    - `windows`: {conversation_id: {n: (e_n, seq)}}: the chain links' e_n the device log holds, read at
      load for client/transcripts.py (which keeps the newest); keep_links() adds some
    - `server_key`: the server's Ed25519 public key (32 bytes), pinned the first time it was asked for
      (trusted on first use), or b"" before; it signs the conversation chains' heads
    - `transcripts`: {conversation_id: bytes of a client/transcripts.ConversationChain}: how far each
      conversation's chain is verified
    """

    def __init__(self, path, device, status=NEW):
        self.path = path
        self.device = device
        self.status = status
        self.counter = 0
        self.spk_made_at = 0
        self.signed_prekeys = {}
        self.one_time_prekeys = {}
        self.spk_uploaded = False
        self.opks_to_upload = set()
        self.sessions = {}
        self.chains = {}
        self.memberships = {}
        self.replay = {}
        self.trusted = {}
        self.message_keys = {}
        self.server_key = b""
        self.transcripts = {}
        self.windows = {}
        self.log = DeviceLog(path)
        self._kept = None  # at load, if the log is long: {conversation: {n: (e_n, seq)}} a load would keep
        self._leftovers = False  # logs of other generations may be beside it (until the first save after load)
        self._lock = None

    def __repr__(self):
        return f"<DeviceFile {self.device.user} {self.device.id.hex()} {self.status}>"

    @property
    def current_spk(self):
        """The current signed prekey (keys.Prekey), or None before the first."""
        for prekey, retire_at in self.signed_prekeys.values():
            if not retire_at:
                return prekey
        return None

    # -- bytes ------------------------------------------------------------------------

    def to_bytes(self):
        return enc(
            [
                LABEL,
                self.device.to_bytes(),
                self.status,
                self.counter,
                self.spk_made_at,
                b"\x01" if self.spk_uploaded else b"",
                enc([opk_id.to_bytes(4, "big") for opk_id in sorted(self.opks_to_upload)]),
                enc([enc([prekey.to_bytes(), retire_at]) for prekey, retire_at in self.signed_prekeys.values()]),
                enc([prekey.to_bytes() for prekey in self.one_time_prekeys.values()]),
                enc([enc([user, device, data]) for (user, device), data in self.sessions.items()]),
                enc([enc([user, enc(links)]) for user, links in self.chains.items()]),
                enc([enc([conversation, enc(states)]) for conversation, states in self.memberships.items()]),
                enc([enc([user, device, window.to_bytes()]) for (user, device), window in self.replay.items()]),
                enc([enc([user, enc(sorted(keys))]) for user, keys in self.trusted.items()]),
                self.log.end,  # (the log is flushed first: at least this much of it is on disk)
                self.server_key,
                enc([enc([conversation, data]) for conversation, data in self.transcripts.items()]),
            ]
            + [self.log.generation] * bool(self.log.generation)  # (absent until compacted: older clients read it)
        )

    @classmethod
    def from_bytes(cls, path, data):
        """The DeviceFile `data` holds; Malformed if it is not one of this version."""
        fields = dec(data)
        if fields[:1] == [LABEL_V1] and len(fields) == 15:
            fields += [b"", b""]
        if fields[:1] in ([LABEL], [LABEL_V2], [LABEL_V1]) and len(fields) == 17:
            fields.append(bytes(8))  # (its log is of generation 0: never compacted)
        elif fields[:1] != [LABEL] or len(fields) != 18:
            raise Malformed("not a device file of version securechatd/device-file/v3 (or v2, v1)")
        (label, device, status, counter, spk_made_at, uploaded, to_upload, spks, opks) = fields[:9]
        (sessions, chains, memberships, replay, trusted, keys_or_log, server_key, chains_verified) = fields[9:17]
        status = _text(status)
        if status not in STATUSES or uploaded not in (b"", b"\x01"):
            raise Malformed("a device file's status is unknown")
        state = cls(path, Device.from_bytes(device), status)
        state.counter, state.spk_made_at = _number(counter), _number(spk_made_at)
        state.spk_uploaded = uploaded == b"\x01"
        state.opks_to_upload = {int.from_bytes(opk_id, "big") for opk_id in dec(to_upload)}
        for record, retire_at in _records(spks, 2):
            prekey = Prekey.from_bytes(record)
            state.signed_prekeys[prekey.id] = (prekey, _number(retire_at))
        for record in dec(opks):
            prekey = Prekey.from_bytes(record)
            state.one_time_prekeys[prekey.id] = prekey
        for user, device_id, data in _records(sessions, 3):
            state.sessions[_text(user), device_id] = data
        for user, links in _records(chains, 2):
            state.chains[_text(user)] = dec(links)
        for conversation, states in _records(memberships, 2):
            state.memberships[_number(conversation)] = dec(states)
        for user, device_id, window in _records(replay, 3):
            state.replay[_text(user), device_id] = ReplayWindow.from_bytes(window)
        for user, keys in _records(trusted, 2):
            state.trusted[_text(user)] = frozenset(dec(keys))
        if label == LABEL:
            state.log = DeviceLog(path, _number(fields[17]))
            state.log.end = _number(keys_or_log)  # (how long the device log was when this was written)
        else:  # the message keys, inline before version 3: to the log at the first save
            for message_id, key, conversation, seq in _records(keys_or_log, 4):
                state.keep_key(_number(message_id), key, _number(conversation), _number(seq))
        if len(server_key) not in (0, 32):
            raise Malformed("a pinned server key is not 32 bytes")
        state.server_key = server_key
        for conversation, chain_data in _records(chains_verified, 2):
            state.transcripts[_number(conversation)] = chain_data
        return state

    # -- the device log -----------------------------------------------------------------

    def keep_key(self, message_id, key, conversation, seq, sender=None, counter=0):
        """Keep a message's key and place (to the log at the next save or save_log).

        `sender` (user, device id bytes) and `counter` name a received message's
        sender device: loading records that counter in its replay window again.
        """
        if self.message_keys.get(message_id) == (key, conversation, seq):
            return
        self.message_keys[message_id] = (key, conversation, seq)
        user, device = sender or ("", b"")
        self.log.add(enc([KEY, message_id, key, conversation, seq, user, device, counter]))

    def keep_links(self, conversation, entries):
        """Keep the e_n of chain links verified: `entries` [(n, e_n, seq)] (to the log at the next save)."""
        for n, e, seq in entries:
            self.log.add(enc([LINK, conversation, n, e, seq]))

    def _replay_log(self, records):
        for record in records:
            fields = dec(record)
            if fields[:1] == [KEY] and len(fields) == 8:
                message_id, key, conversation, seq, user, device, counter = fields[1:]
                self.message_keys[_number(message_id)] = (key, _number(conversation), _number(seq))
                if user:
                    window = self.replay.setdefault((_text(user), device), ReplayWindow())
                    if window.fresh(_number(counter)):
                        window.record(_number(counter))  # (its device file write may never have come)
            elif fields[:1] == [LINK] and len(fields) == 5:
                conversation, n, e, seq = (_number(fields[1]), _number(fields[2]), fields[3], _number(fields[4]))
                self.windows.setdefault(conversation, {})[n] = (e, seq)
            else:
                raise Malformed("a device log record of an unknown kind")

    def save_log(self):
        """Make what was kept durable, without rewriting the device file (nothing else changed)."""
        self._kept = None  # (what this flushes is not in the windows taken at load: compaction waits for a start)
        self.log.flush()

    # -- the file ---------------------------------------------------------------------

    @classmethod
    def load(cls, path):
        """The DeviceFile at `path` with its device log, or None if there is none; DeviceFileError if unusable."""
        try:
            with open(path, "rb") as saved:
                data = saved.read()
        except FileNotFoundError:
            return None
        except OSError as problem:
            raise DeviceFileError(f"cannot read the device file {path}: {problem.strerror}")
        try:
            state = cls.from_bytes(path, data)
            state._replay_log(state.log.read(state.log.end))
            if state.log.end >= COMPACT_AT:
                state._kept = state._kept_windows()
        except (OSError, Malformed, ValueError) as problem:
            if _held_elsewhere(path):  # (read while another program was writing it: a new log, say)
                raise DeviceFileError(_IN_USE.format(path=path))
            if isinstance(problem, OSError):
                raise DeviceFileError(f"cannot read the device log {state.log.path}: {problem.strerror}")
            raise DeviceFileError(f"the device file {path} (or its log) is damaged ({problem}); it was left as it is")
        state._leftovers = True
        return state

    def save(self):
        """Append what was kept to the log (durable first), then replace the file with what this object holds now.

        Each step leaves a device that loads whole if a crash stops it there (tests stop between them).
        """
        self._write_log()
        self._write_file()
        self._remove_leftovers()

    def _write_log(self):
        """Flush the pending records; or, the first time after load, compact the log if it is mostly dead weight."""
        kept, self._kept = self._kept, None
        if kept is not None and self.log.end > COMPACT_RATIO * self._live_bytes(kept):
            self.log.close()
            self.log = self.log.successor(self._live_records(kept) + self.log.pending)
        else:
            self.log.flush()

    def _write_file(self):
        write_private(self.path, self.to_bytes())

    def _remove_leftovers(self):
        """The first save after load removes the logs the device file it replaced did not name (under the lock)."""
        if self._leftovers:
            self.log.remove_others()
            self._leftovers = False

    # -- compaction ---------------------------------------------------------------------

    def _kept_windows(self):
        """Per conversation, the e_n a load gives its chain: the newest E_KEPT at or before its verified head.

        (Read at load, before client/transcripts.py takes `windows`; later e_n are in the pending records.)
        """
        kept = {}
        for conversation, data in self.transcripts.items():
            head = transcripts.ConversationChain.from_bytes(data).position.n
            window = self.windows.get(conversation, {})
            newest = sorted(n for n in window if n <= head)[-transcripts.E_KEPT :]
            kept[conversation] = {n: window[n] for n in newest}
        return kept

    def _live_bytes(self, windows):
        keys = sum(_KEY_BYTES + len(key) for key, _, _ in self.message_keys.values())
        return keys + sum(_LINK_BYTES + len(e) for window in windows.values() for e, _ in window.values())

    def _live_records(self, windows):
        """What a load must find again: every message key, and the e_n `windows` keep.

        The keys name no sender device: their counters are in the replay windows of the device file
        written with this log (recorded when opened, or from the log at load).
        """
        records = [enc([KEY, message_id, key, conversation, seq, "", b"", 0])
                   for message_id, (key, conversation, seq) in self.message_keys.items()]
        for conversation, window in windows.items():
            records += [enc([LINK, conversation, n, e, seq]) for n, (e, seq) in sorted(window.items())]
        return records

    def lock(self):
        """Hold `<path>.lock` for this process: two programs advancing the same ratchets would break them.

        DeviceFileError if another process holds it. Released by unlock() (or when the process ends).
        """
        if self._lock is not None:
            return
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, mode=0o700, exist_ok=True)
        descriptor = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        if not _flock(descriptor):
            os.close(descriptor)
            raise DeviceFileError(_IN_USE.format(path=self.path))
        self._lock = descriptor

    def unlock(self):
        self.log.close()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
