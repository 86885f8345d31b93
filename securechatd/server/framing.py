"""Bounded AMP framing: a box may only grow so big before the connection is dropped.

Plain AMP limits each key (255 bytes) and value (65,535) but not how many
keys a box holds, so one peer streaming an endless box of unique keys could
grow the server without bound. Here every box has a byte and key budget
(small before login); the length prefix of each key or value is checked
against what is left, so nothing over budget is ever buffered. Boxes AMP
cannot make sense of (neither command nor answer, an answer to nothing we
asked) end the connection with one log line rather than a traceback.
"""

from twisted.logger import Logger
from twisted.protocols import amp

log = Logger()

KEY_LIMIT = 255
VALUE_LIMIT = 0xFFFF
PREFIX = 2  # bytes of length before every key and value


class BoxLimits:
    """The budget of one box: total bytes (keys, values and their prefixes) and keys."""

    def __init__(self, max_bytes, max_keys):
        self.max_bytes = max_bytes
        self.max_keys = max_keys


class BoundedBoxProtocol(amp.AMP):
    """AMP whose parser enforces `self.box_limits()` on every incoming box."""

    _bytes_left = 0  # of the current box's budget
    _keys_left = 0
    refused = None  # why the connection was dropped, once it was

    def box_limits(self):
        raise NotImplementedError

    def dataReceived(self, data):
        if self.refused is None:  # a dropped connection's last bytes are not kept
            super().dataReceived(data)

    def proto_init(self, string):
        limits = self.box_limits()
        self._bytes_left, self._keys_left = limits.max_bytes, limits.max_keys
        return super().proto_init(string)

    def proto_key(self, string):
        if string:
            self._keys_left -= 1
            self._bytes_left -= PREFIX + len(string)
            if self._keys_left < 0:
                return self.refuse("a box with too many keys")
        state = super().proto_key(string)
        if state == "value":  # the value's length prefix is checked against what is left
            self.MAX_LENGTH = max(0, min(VALUE_LIMIT, self._bytes_left - PREFIX))
        else:
            self.MAX_LENGTH = KEY_LIMIT
        return state

    def proto_value(self, string):
        self._bytes_left -= PREFIX + len(string)
        state = super().proto_value(string)
        self.MAX_LENGTH = max(0, min(KEY_LIMIT, self._bytes_left - PREFIX))
        return state

    def lengthLimitExceeded(self, length):
        self.refuse(f"a key or value of {length} bytes beyond the box's budget")

    def ampBoxReceived(self, box):
        try:
            super().ampBoxReceived(box)
        except (amp.NoEmptyBoxes, KeyError):
            self.refuse("a box that is neither a command nor an answer to a question")

    def refuse(self, why):
        """Drop this connection now, reading nothing more."""
        if self.refused is None:
            self.refused = why
            peer = self.transport.getPeer() if self.transport is not None else None
            log.warn("dropping {peer}: {why}", peer=peer, why=why)
            self.paused = True  # stops the string parser's loop over buffered data
            if self.transport is not None:
                self.transport.abortConnection()
        return "done"
