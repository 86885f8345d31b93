"""The private AMP names the lean framing builds on, and the fast argument path's guard."""

from twisted.protocols import amp
from twisted.trial import unittest

from securechatd import commands
from securechatd.server.framing import PRIVATE_AMP_NAMES


class PrivateNamesTests(unittest.TestCase):
    """If a Twisted upgrade removes one of these, the daemon's framing is broken: fail here, by name."""

    def test_class_attributes_exist(self):
        for owner, name in PRIVATE_AMP_NAMES["class"] + PRIVATE_AMP_NAMES["overridden"]:
            self.assertTrue(hasattr(owner, name), f"twisted.protocols.amp.{owner.__name__}.{name} is gone")

    def test_instance_attributes_exist(self):
        protocol = amp.AMP()
        for name in PRIVATE_AMP_NAMES["instance"]:
            self.assertTrue(hasattr(protocol, name), f"amp.AMP instances no longer have {name}")


class ArgumentPathTests(unittest.TestCase):
    def test_every_command_is_convertible(self):
        chat_commands = [
            value
            for value in vars(commands).values()
            if isinstance(value, type) and issubclass(value, commands.ChatCommand) and value is not commands.ChatCommand
        ]
        self.assertGreater(len(chat_commands), 15)
        for command in chat_commands:
            for schema in ("arguments", "response"):
                commands._fields(command, schema)  # raises for a type the fast path cannot convert

    def test_a_multi_key_argument_is_refused_not_misencoded(self):
        class TwoKeys(amp.Unicode):
            def toBox(self, name, strings, objects, proto):
                strings[name + b"-a"] = b"x"
                strings[name + b"-b"] = b"y"

        class Odd(commands.ChatCommand):
            arguments = [(b"value", TwoKeys())]
            response = []

        with self.assertRaises(TypeError) as raised:
            Odd.makeArguments({"value": "v"}, None)
        self.assertIn("Odd.value", str(raised.exception))

    def test_a_keyword_argument_name_is_refused(self):
        class Keyword(commands.ChatCommand):
            arguments = [(b"class", amp.Unicode())]
            response = []

        with self.assertRaises(TypeError):
            Keyword.makeArguments({}, None)
