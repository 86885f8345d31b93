"""The device log: what a device keeps for good, appended beside its device file (docs/E2EE.md, "Devices").

The device file is rewritten whole at every step; what grows with history
(the key of every message read or sent, the e_n of every chain link
verified) would make each step cost more than the one before. So it goes
here instead: `<device file>.log`, mode 0600, only ever appended to, each
append flushed and fsynced before the device file that counts on it is
written. Reading it once at start costs what the history holds; a message
costs one append of its own records.

A record is its length (4 bytes), a CRC-32 of the length and the bytes (4),
and the bytes; the first record is LABEL. A crash during an append leaves a
torn last record: it is read as the end of the log and cut off before the
next append. The device file records how long the log was when it was
written (`read(at_least)`), so a log cut shorter than that is damage, not a
torn record.

Compaction (DeviceFile.save) writes what is live to a log of the next
generation (`successor`), durable under its own name, before the device
file naming it replaces the one naming this; the logs of other generations
are then removed (`remove_others`). So the device file on disk always names
a whole log, and any other log beside it is a leftover.
"""

import os
import re
import struct
import zlib

from securechatd.e2ee.encoding import Malformed
from securechatd.files import sync_directory, write_private

LABEL = b"securechatd/device-log/v1"
_FRAME = struct.Struct(">II")
FRAME_BYTES = _FRAME.size  # a record's length and CRC-32, before it


def _write(descriptor, data):
    """All of `data` (a write to a regular file may be short just before the disk is full: the next one raises)."""
    while data:
        data = data[os.write(descriptor, data) :]


def _frame(record):
    length = struct.pack(">I", len(record))
    return length + struct.pack(">I", zlib.crc32(record, zlib.crc32(length))) + record


def _path(device_path, generation):
    """The log of `generation` beside the device file: generation 0 kept the name it had before compaction."""
    return f"{device_path}.log" if generation == 0 else f"{device_path}.log.{generation}"


class DeviceLog:
    """The records of the device file at `device_path`'s log of `generation`: read() them once, add() new ones,
    flush() them to disk before they count."""

    def __init__(self, device_path, generation=0):
        self.device_path = device_path
        self.generation = generation
        self.path = _path(device_path, generation)
        self.end = 0  # the bytes of whole records on disk (after read() or flush())
        self.pending = []  # records added, not written yet
        self._file = None

    def read(self, at_least=0):
        """The records on disk, in order; Malformed if the log is shorter than `at_least` bytes of whole records."""
        try:
            with open(self.path, "rb") as saved:
                data = saved.read()
        except FileNotFoundError:
            data = b""
        records, at = [], 0
        while at + _FRAME.size <= len(data):
            length, check = _FRAME.unpack_from(data, at)
            record = data[at + _FRAME.size : at + _FRAME.size + length]
            if len(record) != length or zlib.crc32(record, zlib.crc32(data[at : at + 4])) != check:
                break  # a torn last record (or damage: then the log is shorter than the device file says)
            records.append(record)
            at += _FRAME.size + length
        if at < at_least:
            raise Malformed(f"the log holds {at} bytes of whole records where the device file counts {at_least}")
        if records[:1] not in ([], [LABEL]):
            raise Malformed("not a device log of version securechatd/device-log/v1")
        self.end = at
        return records[1:]

    def add(self, record):
        self.pending.append(record)

    def flush(self):
        """Append the pending records and fsync: they are durable when this returns (a torn tail cut off first)."""
        if not self.pending:
            return
        if self._file is None:
            self._open()
        data = b"".join(_frame(record) for record in self.pending)
        os.lseek(self._file, self.end, os.SEEK_SET)  # (over what a failed flush may have left)
        _write(self._file, data)
        os.fsync(self._file)
        self.end += len(data)
        self.pending = []

    def _open(self):
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, mode=0o700, exist_ok=True)
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.fchmod(descriptor, 0o600)
            os.ftruncate(descriptor, self.end)  # what a crash left after the last whole record
            if self.end == 0:  # a new log (or one whose label a crash cut short)
                label = _frame(LABEL)
                _write(descriptor, label)
                os.fsync(descriptor)
                sync_directory(directory)
                self.end = len(label)
        except BaseException:
            os.close(descriptor)
            raise
        self._file = descriptor

    def successor(self, records):
        """A log of the next generation holding `records`, whole and durable under its name (this one untouched).

        (write_private: a temporary name, fsync, rename, fsync of the directory; a leftover of that name is replaced.)
        """
        log = DeviceLog(self.device_path, self.generation + 1)
        data = b"".join(_frame(record) for record in [LABEL, *records])
        write_private(log.path, data)
        log.end = len(data)
        return log

    def remove_others(self):
        """Remove the logs of other generations (and a compaction's temporary file): none is the device file's."""
        directory, name = os.path.split(self.device_path)
        leftover = re.compile(re.escape(name) + r"\.log(\.[0-9]+)?(\.[0-9a-f]{16}\.tmp)?")
        for other in os.listdir(directory or "."):
            if leftover.fullmatch(other) and other != os.path.basename(self.path):
                os.unlink(os.path.join(directory, other))

    def close(self):
        if self._file is not None:
            os.close(self._file)
            self._file = None
