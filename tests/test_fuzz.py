"""Property-based: random boxes, argument values and command sequences never break the server.

Whatever one client sends, the server never answers UNKNOWN (an undeclared
failure), never stores half a message, and keeps serving a second client.
"""

import os
import sqlite3
import tempfile

from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.internet import task
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.trial import unittest

from securechatd import commands
from securechatd.commands import ChatError
from tests.helpers import Connection, make_hub, make_store

PASSWORD = "correct horse battery"

texts = st.text(max_size=40) | st.sampled_from(["alice", "bob", "ALICE", "", " ", "x" * 300, "online"])
integers = st.integers(min_value=-(2**70), max_value=2**70) | st.sampled_from([0, 1, 2, 3, 500, 501, 2**63])
values = {
    amp.Unicode: texts,
    amp.String: st.binary(max_size=80) | st.sampled_from([b"", bytes(32), bytes(64), b"\xff" * 600]),
    amp.Integer: integers,
    commands.Integer: integers,
    amp.Boolean: st.booleans(),
    amp.DateTime: st.none(),
}
CLIENT_COMMANDS = [
    command
    for command in vars(commands).values()
    if isinstance(command, type)
    and issubclass(command, commands.ChatCommand)
    and command not in (commands.ChatCommand, commands.Deliver, commands.Receipt,
                        commands.PresenceChanged, commands.ConversationUpdated)
]


def arguments_for(command):
    """A strategy of keyword arguments for `command`, any of them possibly left out."""
    fields = {}
    for name, argument in command.arguments:
        if isinstance(argument, amp.ListOf):
            strategy = st.lists(texts, max_size=4)
        elif isinstance(argument, amp.AmpList):
            item = {name.decode(): integers if isinstance(sub, amp.Integer) else values[type(sub)]
                    for name, sub in argument.subargs}
            strategy = st.lists(st.fixed_dictionaries(item), max_size=3)
        elif isinstance(argument, amp.Integer):
            strategy = integers
        else:
            strategy = values[type(argument)]
        fields[name.decode()] = st.none() | strategy
    return st.fixed_dictionaries(fields).map(lambda d: {k: v for k, v in d.items() if v is not None})


def _loose(command):
    """The same command, but every argument optional, so the fuzzer can leave any out."""
    arguments = []
    for name, argument in command.arguments:
        if isinstance(argument, amp.ListOf):
            loose = amp.ListOf(argument.elementType)
        elif isinstance(argument, amp.AmpList):
            loose = amp.AmpList(argument.subargs)
        elif isinstance(argument, amp.Integer):
            loose = amp.Integer()  # the fuzzer may send what the server refuses to parse
        else:
            loose = type(argument)()
        loose.optional = True
        arguments.append((name, loose))
    return type(command.__name__, (amp.Command,), {
        "commandName": command.commandName, "arguments": arguments,
        "response": [], "errors": commands.ERRORS,
    })


calls = st.lists(
    st.sampled_from(CLIENT_COMMANDS).flatmap(lambda c: st.tuples(st.just(c), arguments_for(c))),
    max_size=12,
)
raw_boxes = st.lists(
    st.dictionaries(st.binary(min_size=1, max_size=20), st.binary(max_size=60), max_size=6), max_size=4
)


class FuzzTests(unittest.SynchronousTestCase):
    def fresh(self):
        clock = task.Clock()
        directory = tempfile.mkdtemp(dir=os.getcwd())
        store = make_store(self, os.path.join(directory, "fuzz.sqlite"))
        hub = make_hub(self, clock=clock, store=store)
        witness = Connection(hub)
        for name in ("alice", "bob"):
            witness.call(commands.Register, username=name, password=PASSWORD)
        fuzzer = Connection(hub)
        fuzzer.call(commands.Login, username="alice", password=PASSWORD)
        witness.call(commands.Login, username="bob", password=PASSWORD)
        conversation = self.successResultOf(witness.call(commands.CreateConversation, members=["alice"]))
        return hub, store, fuzzer, witness, conversation["conversation_id"], clock

    def check(self, store, witness, conversation, clock):
        clock.advance(0)
        sent = witness.call(commands.SendMessage, conversation_id=conversation, client_msg_id="w", body="still here")
        self.assertIn("seq", self.successResultOf(sent))
        path = store._pool.connargs[0]
        with sqlite3.connect(path) as db:
            for conversation_id, last_seq in db.execute("SELECT id, last_seq FROM conversations"):
                seqs = [s for (s,) in db.execute(
                    "SELECT seq FROM messages WHERE conversation_id = ? ORDER BY seq", (conversation_id,))]
                self.assertEqual(seqs, list(range(1, last_seq + 1)))
            self.assertEqual(db.execute("PRAGMA integrity_check").fetchone()[0], "ok")

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(calls)
    def test_random_commands(self, sequence):
        hub, store, fuzzer, witness, conversation, clock = self.fresh()
        for command, arguments in sequence:
            if "conversation_id" in arguments and arguments["conversation_id"] == 1:
                arguments["conversation_id"] = conversation
            outcome = fuzzer.call(_loose(command), **arguments)
            result = []
            outcome.addBoth(result.append)
            if result and isinstance(result[0], Failure):
                self.assertTrue(
                    result[0].check(ChatError, amp.UnhandledCommand),
                    f"{command.__name__}({arguments!r}) answered {result[0].value!r}",
                )
        self.assertFalse(fuzzer.server.lost)
        self.check(store, witness, conversation, clock)

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(raw_boxes)
    def test_random_boxes(self, boxes):
        hub, store, fuzzer, witness, conversation, clock = self.fresh()
        answered = []
        write = fuzzer.server.transport.write
        fuzzer.server.transport.write = lambda data: answered.append(data) or write(data)
        for fields in boxes:
            box = amp.AmpBox(fields)
            try:
                fuzzer.client.transport.write(box.serialize())
            except Exception:
                continue  # not even serialisable: nothing went out
            fuzzer.pump.flush()
        self.assertNotIn(b"UNKNOWN", b"".join(answered))
        self.check(store, witness, conversation, clock)
