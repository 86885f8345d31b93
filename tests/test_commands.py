"""The fast argument path's AmpList conversion against amp.AmpList's own, and shared DeliverEncrypted boxes."""

from datetime import datetime, timezone

from hypothesis import given, settings, strategies as st
from twisted.protocols import amp
from twisted.trial import unittest

from securechatd import commands
from securechatd.records import ChainLink, EncryptedMessage
from securechatd.server import wire
from securechatd.server.framing import END, encode

# (an item schema, hypothesis items for it): optional fields missing, unicode, bytes, lists, nested lists
SCHEMAS = {
    "wraps": (commands.WRAP_ITEM, st.fixed_dictionaries({"device_id": st.text(), "wrap": st.binary(max_size=300)})),
    "receipts": (
        dict(commands.GetReceipts.response)[b"receipts"].subargs,
        st.fixed_dictionaries(
            {"username": st.text(max_size=40)},
            optional={
                "delivered_at": st.datetimes(timezones=st.just(timezone.utc)),
                "read_at": st.datetimes(timezones=st.just(timezone.utc)),
            },
        ),
    ),
    "conversations": (
        dict(commands.ListConversations.response)[b"conversations"].subargs,
        st.fixed_dictionaries(
            {
                "conversation_id": st.integers(-(2**63), 2**63 - 1),
                "kind": st.text(max_size=10),
                "members": st.lists(st.text(max_size=20), max_size=5),
                "last_seq": st.integers(0, 2**40),
                "unread": st.integers(0, 2**20),
            },
            optional={"title": st.none() | st.text(max_size=30), "encrypted": st.none() | st.booleans()},
        ),
    ),
    "nested": (
        [(b"name", amp.Unicode()), (b"inner", amp.AmpList(commands.WRAP_ITEM, optional=True))],
        st.fixed_dictionaries(
            {"name": st.text(max_size=10)},
            optional={
                "inner": st.lists(
                    st.fixed_dictionaries({"device_id": st.text(max_size=5), "wrap": st.binary(max_size=5)})
                )
            },
        ),
    ),
}


def fast(subargs, optional=False):
    """The fast path's converter for AmpList(subargs), as _fields makes it for a command argument."""

    class One(commands.ChatCommand):
        arguments = [(b"value", amp.AmpList(subargs, optional=optional))]
        response = []

    [(_, _, converter)] = commands._fields(One, "arguments")
    return converter


def expected(items, subargs):
    """What amp.AmpList's fromStringProto gives for items: absent optional values are None."""
    return [{name.decode(): item.get(name.decode()) for name, _ in subargs} for item in items]


class AmpListPathTests(unittest.TestCase):
    def assert_same_as_amp(self, subargs, items):
        reference = amp.AmpList(subargs)
        converter = fast(subargs)
        encoded = reference.toStringProto(items, None)
        self.assertEqual(converter.toStringProto(items, None), encoded)
        parsed = converter.fromStringProto(encoded, None)
        self.assertEqual(parsed, reference.fromStringProto(encoded, None))
        return parsed

    def test_schemas_round_trip_as_amp_does(self):
        for label, (subargs, item) in SCHEMAS.items():

            @settings(max_examples=60, deadline=None)
            @given(st.lists(item, max_size=6))
            def check(items):
                parsed = self.assert_same_as_amp(subargs, items)
                if label != "nested":  # (nested lists come back with their own None-filled items)
                    self.assertEqual(parsed, expected(items, subargs))

            with self.subTest(label):
                check()

    def test_examples(self):
        self.assertEqual(self.assert_same_as_amp(commands.WRAP_ITEM, []), [])
        unicode = [{"device_id": "ünï¢ødé \U0001f510", "wrap": b"\x00\xff" * 40}, {"device_id": "", "wrap": b""}]
        self.assertEqual(self.assert_same_as_amp(commands.WRAP_ITEM, unicode), unicode)
        receipts = dict(commands.GetReceipts.response)[b"receipts"].subargs
        at = datetime(2026, 11, 30, 6, 50, tzinfo=timezone.utc)
        items = [{"username": "a"}, {"username": "b", "read_at": at}, {"username": "c", "delivered_at": None}]
        self.assertEqual(self.assert_same_as_amp(receipts, items), expected(items, receipts))

    def test_extra_keys_and_repeated_keys_read_as_amp_does(self):
        converter = fast(commands.WRAP_ITEM)
        box = encode([(b"device_id", b"a"), (b"other", b"x"), (b"wrap", b"1"), (b"wrap", b"2")]) + END
        reference = amp.AmpList(commands.WRAP_ITEM)
        self.assertEqual(converter.fromStringProto(box, None), reference.fromStringProto(box, None))
        self.assertEqual(converter.fromStringProto(box, None), [{"device_id": "a", "wrap": b"2"}])
        optional = [(b"a", amp.String(optional=True))]
        reference = amp.AmpList(optional)
        self.assertEqual(fast(optional).fromStringProto(END * 2, None), reference.fromStringProto(END * 2, None))
        self.assertEqual(fast(optional).fromStringProto(END * 2, None), [{"a": None}, {"a": None}])

    def test_encoding_errors_are_amps(self):
        converter = fast(commands.WRAP_ITEM)
        with self.assertRaises(KeyError):
            converter.toStringProto([{"device_id": "a"}], None)
        with self.assertRaises(amp.TooLong):
            converter.toStringProto([{"device_id": "a", "wrap": b"x" * 0x10000}], None)
        with self.assertRaises(TypeError):
            converter.toStringProto([{"device_id": "a", "wrap": "text"}], None)

    def test_an_item_argument_of_several_keys_is_refused(self):
        class TwoKeys(amp.Unicode):
            def toBox(self, name, strings, objects, proto):
                strings[name + b"-a"] = b"x"

        with self.assertRaises(TypeError) as raised:
            fast([(b"value", TwoKeys())])
        self.assertIn("value", str(raised.exception))


def send_encrypted_box(wraps_value):
    """A SendEncrypted box whose `wraps` value is the raw bytes given."""
    return {
        b"conversation_id": b"7",
        b"client_msg_id": b"m1",
        b"header": b"h",
        b"body": b"b",
        b"wraps": wraps_value,
    }


class MalformedAmpListTests(unittest.TestCase):
    GOOD = encode([(b"device_id", b"d1"), (b"wrap", b"w1")]) + END

    def refused(self, wraps_value):
        with self.assertRaises(commands.InvalidArgument):
            commands.SendEncrypted.parseArguments(send_encrypted_box(wraps_value), None)

    def test_a_good_value_is_read(self):
        arguments = commands.SendEncrypted.parseArguments(send_encrypted_box(self.GOOD * 2), None)
        self.assertEqual(arguments["wraps"], [{"device_id": "d1", "wrap": b"w1"}] * 2)
        self.assertEqual(commands.SendEncrypted.parseArguments(send_encrypted_box(b""), None)["wraps"], [])

    def test_truncated_anywhere(self):
        for cut in range(1, len(self.GOOD)):
            with self.subTest(cut=cut):
                self.refused(self.GOOD + self.GOOD[:cut])

    def test_a_box_without_its_end(self):
        self.refused(self.GOOD + encode([(b"device_id", b"d2"), (b"wrap", b"w2")]))
        self.refused(encode([(b"device_id", b"d2")]))

    def test_a_key_or_value_longer_than_what_is_left(self):
        self.refused(b"\x00\x09dev")
        self.refused(b"\x00\x09device_id\x00\x05w1" + END)

    def test_a_key_longer_than_amp_allows(self):
        long_key = b"k" * 256
        self.refused(len(long_key).to_bytes(2, "big") + long_key + b"\x00\x01v" + self.GOOD)
        longest = fast([(b"k" * 255, amp.String(optional=True))])
        value = b"\x00\xff" + b"k" * 255 + b"\x00\x01v" + END
        self.assertEqual(longest.fromStringProto(value, None), [{"k" * 255: b"v"}])

    def test_a_missing_item_argument_or_bad_text(self):
        self.refused(encode([(b"device_id", b"d1")]) + END)
        self.refused(encode([(b"device_id", b"\xff"), (b"wrap", b"w")]) + END)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=80))
    def test_random_bytes_are_read_as_amp_does_or_refused(self, data):
        reference = amp.AmpList(commands.WRAP_ITEM)
        try:
            arguments = commands.SendEncrypted.parseArguments(send_encrypted_box(data), None)
        except commands.InvalidArgument:
            return
        self.assertEqual(arguments["wraps"], reference.fromStringProto(data, None))


class DeliverEncryptedBoxTests(unittest.TestCase):
    def decode(self, encoded):
        """The arguments of a DeliverEncrypted box as a client parses them (its tag and end added)."""
        [box] = amp.parseString(encoded + encode([(amp.ASK, b"1")]) + END)
        self.assertEqual(box.pop(amp.COMMAND), b"DeliverEncrypted")
        del box[amp.ASK]
        return commands.DeliverEncrypted.parseArguments(box, None)

    def test_two_devices_share_the_message_and_get_their_own_wraps(self):
        message = EncryptedMessage(
            41, 7, 12, "alice", "ab" * 16, 1_790_000_000.25, b"header\x00", b"body" * 70, {"d1": b"w1", "d2": b"w2"},
            b"s" * 64, ChainLink(7, 30, b"e" * 32, b"link", b"receipt"),
        )
        first = self.decode(wire.deliver_encrypted_box(message, message.wraps["d1"]))
        second = self.decode(wire.deliver_encrypted_box(message, message.wraps["d2"]))
        self.assertEqual(first.pop("wrap"), b"w1")
        self.assertEqual(second.pop("wrap"), b"w2")
        self.assertEqual(first, second)
        self.assertEqual(
            first,
            {
                "message_id": 41,
                "conversation_id": 7,
                "seq": 12,
                "sender": "alice",
                "sender_device": "ab" * 16,
                "sent_at": wire.utc(1_790_000_000.25),
                "header": b"header\x00",
                "body": b"body" * 70,
                "signature": b"s" * 64,
                "link": b"link",
                "receipt": b"receipt",
            },
        )
        self.assertIsNone(self.decode(wire.deliver_encrypted_box(message, None))["wrap"])

    def test_the_shared_part_is_encoded_once(self):
        message = EncryptedMessage(42, 7, 13, "bob", "cd" * 16, 1_790_000_001.0, b"h", b"b", {"d1": b"w1", "d2": b"w2"})
        wire._envelope_box.cache_clear()
        for device in ("d1", "d2", "d1"):
            wire.deliver_encrypted_box(message, message.wraps[device])
        info = wire._envelope_box.cache_info()
        self.assertEqual((info.misses, info.hits), (1, 2))
