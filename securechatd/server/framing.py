"""Bounded, lean AMP framing: parse boxes within a budget, write boxes as bytes.

Plain AMP limits each key (255 bytes) and value (65,535) but not how many
keys a box holds, so one peer streaming an endless box of unique keys could
grow the server without bound. Here every box has a byte and key budget
(small before login); the length prefix of each key or value is checked
against what is left, so nothing over budget is ever buffered. Boxes AMP
cannot make sense of (neither command nor answer, an answer to nothing we
asked) end the connection with one log line rather than a traceback.

The parser is one loop over the received bytes (AMP's own parser makes a
few method calls per key and per value), and boxes are written with
`encode`, so a box shared by many connections (a group message's Deliver)
is encoded once and only its tag is added per connection. Both were the
largest costs of the reactor thread under load (BENCHMARKS.md).
"""

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionLost
from twisted.logger import Logger
from twisted.protocols import amp

log = Logger()

# The private names of twisted.protocols.amp this module builds on: the
# framing replaces AMP's parser and writer but keeps its request table, tags
# and dispatch. tests/test_framing.py fails loudly if an upgrade of Twisted
# removes one; nothing outside this module uses them.
PRIVATE_AMP_NAMES = {
    "class": [(amp.CommandLocator, "_commandDispatch"), (amp.BoxDispatcher, "_nextTag")],
    "instance": ["_outstandingRequests", "_failAllReason"],
    "overridden": [(amp.BoxDispatcher, "_commandReceived"), (amp.BoxDispatcher, "_answerReceived")],
}


def command_and_responder(locator, name):
    """(Command class, responder function) registered on `locator` for command `name`, or None.

    (AMP's public locateResponder wraps every call in a maybeDeferred and a
    closure; the daemon runs its own dispatch, server/protocol.py.)
    """
    return locator._commandDispatch.get(name)


KEY_LIMIT = 255
VALUE_LIMIT = 0xFFFF
PREFIX = 2  # bytes of length before every key and value
END = b"\x00\x00"  # the empty key that ends a box


def encode(pairs):
    """The wire bytes of (key, value) byte pairs, without the box's end (AMP keys are unordered)."""
    parts = []
    for key, value in pairs:
        if len(value) > VALUE_LIMIT:
            raise amp.TooLong(False, True, value, key)
        parts += (len(key).to_bytes(2, "big"), key, len(value).to_bytes(2, "big"), value)
    return b"".join(parts)


def encode_arguments(command, arguments):
    """A command box without its tag: `_command` and the encoded `arguments`."""
    values = command.makeArguments(arguments, None)
    return encode([(amp.COMMAND, command.commandName), *values.items()])


class BoxLimits:
    """The budget of one box: total bytes (keys, values and their prefixes) and keys."""

    def __init__(self, max_bytes, max_keys):
        self.max_bytes = max_bytes
        self.max_keys = max_keys


class BoundedBoxProtocol(amp.AMP):
    """AMP whose parser enforces `self.box_limits()` on every incoming box."""

    refused = None  # why the connection was dropped, once it was
    _unparsed = b""  # received bytes that do not yet make a whole key or value
    _box = None  # the box being received
    _key = None  # its key waiting for a value
    _bytes_left = 0  # of the current box's budget
    _keys_left = 0

    def box_limits(self):
        raise NotImplementedError

    def dataReceived(self, data):
        if self.refused is not None:  # a dropped connection's last bytes are not kept
            return
        if self._unparsed:
            data = self._unparsed + data
        box, key, bytes_left, keys_left = self._box, self._key, self._bytes_left, self._keys_left
        size = len(data)
        at = 0
        while at + PREFIX <= size:
            length = (data[at] << 8) | data[at + 1]
            if key is None and length == 0:  # the end of a box
                at += PREFIX
                self._box = None
                self._box_received(box or {})
                if self.refused is not None:
                    return
                box = None
                continue
            if box is None:
                limits = self.box_limits()
                bytes_left, keys_left, box = limits.max_bytes, limits.max_keys, {}
            if key is None:
                if keys_left < 1:
                    self.refuse("a box with too many keys")
                    return
                if length > KEY_LIMIT or length + PREFIX > bytes_left:
                    self.refuse(f"a key of {length} bytes beyond the box's budget")
                    return
            elif length + PREFIX > bytes_left:
                self.refuse(f"a value of {length} bytes beyond the box's budget")
                return
            end = at + PREFIX + length
            if end > size:
                break  # the rest of this string is still on its way
            string = data[at + PREFIX : end]
            at = end
            bytes_left -= PREFIX + length
            if key is None:
                key = string
                keys_left -= 1
            else:
                box[key] = string
                key = None
        self._unparsed = data[at:]
        self._box, self._key, self._bytes_left, self._keys_left = box, key, bytes_left, keys_left

    def _box_received(self, box):
        try:
            self.ampBoxReceived(box)
        except (amp.NoEmptyBoxes, KeyError):
            self.refuse("a box that is neither a command nor an answer to a question")

    def _answerReceived(self, box):
        # (AMP's own adds an errback per answer; the Deferreds of our pushes never fail)
        self._outstandingRequests.pop(box[amp.ANSWER]).callback(box)

    def refuse(self, why):
        """Drop this connection now, reading nothing more."""
        if self.refused is None:
            self.refused = why
            self._unparsed = b""
            peer = self.transport.getPeer() if self.transport is not None else None
            log.warn("dropping {peer}: {why}", peer=peer, why=why)
            if self.transport is not None:
                self.transport.abortConnection()

    # -- writing ---------------------------------------------------------------------

    def write(self, data):
        """Send wire bytes (whole boxes) to the peer."""
        if self.transport is None:
            raise ConnectionLost()
        self.transport.write(data)

    def sendBox(self, box):
        self.write(encode(box.items()) + END)

    def send_command(self, encoded):
        """Send a command box made by `encode_arguments`: a Deferred of the answer box."""
        if self._failAllReason is not None:
            return fail(self._failAllReason)
        tag = self._nextTag()
        try:
            self.write(encoded + encode([(amp.ASK, tag)]) + END)
        except ConnectionLost:  # (a fan-out goes on to the other recipients)
            return fail()
        answer = self._outstandingRequests[tag] = Deferred()
        return answer
