"""The full-screen `securechat` in a real pseudo-terminal against `twistd -n securechatd`, both the tree under test.

The terminal is emulated by pyte (the test extra): what the client writes is fed to a pyte
screen, and the test reads that screen, cell colours included, the way a person would see it.
Only this test polls, up to a deadline, since two real processes answer in real time.
"""

import json
import os
import termios

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.trial import unittest

from securechatd.certs import write_certs
from tests.helpers import SECURECHAT, environment, spawn_daemon, wall_now

try:
    import pyte
except ImportError:  # pragma: no cover
    pyte = None

PASSWORD = "correct horse battery"
TIMEOUT = 30
COLUMNS, ROWS = 100, 24

# Keys as a terminal sends them.
LEFT, UP, TAB, ENTER = "\x1b[D", "\x1b[A", "\t", "\r"
ALT_2, CTRL_P, CTRL_U = "\x1b2", "\x10", "\x15"
PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"


class Terminal(ProcessProtocol):
    """A program in a pseudo-terminal of COLUMNS x ROWS, its output drawn on a pyte screen."""

    def __init__(self):
        self.screen = pyte.Screen(COLUMNS, ROWS)
        self.stream = pyte.ByteStream(self.screen)
        self.ended = Deferred()

    def childDataReceived(self, fd, data):
        self.stream.feed(data)

    def processEnded(self, reason):
        self.ended.callback(reason.value.exitCode)

    def type(self, keys):
        self.transport.write(keys.encode("utf-8"))

    def text(self):
        return "\n".join(line.rstrip() for line in self.screen.display)

    def last_line(self):
        return self.screen.display[-1].rstrip()

    def cells(self, text):
        """The cells of the first place `text` is shown."""
        for y, line in enumerate(self.screen.display):
            x = line.find(text)
            if x >= 0:
                return [self.screen.buffer[y][x + i] for i in range(len(text))]
        raise AssertionError(f"{text!r} is not on the screen:\n{self.text()}")


class BatchProcess(ProcessProtocol):
    def __init__(self, keys):
        self.keys = keys
        self.out = b""
        self.ended = Deferred()

    def connectionMade(self):
        self.transport.write(self.keys.encode())
        self.transport.closeStdin()

    def outReceived(self, data):
        self.out += data

    def processEnded(self, reason):
        self.ended.callback(reason.value.exitCode)


class FullScreenTests(unittest.TestCase):
    @inlineCallbacks
    def setUp(self):
        if pyte is None:
            if os.environ.get("CI") == "true":
                self.fail("pyte is missing: pip install '.[test]'")
            raise unittest.SkipTest("pyte is missing (pip install '.[test]'): no terminal to read the screen from")
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        config = os.path.join(self.directory, "securechatd.ini")
        with open(config, "w") as f:
            f.write("[server]\nport = 0\n[accounts]\nbcrypt_cost = 10\n")
        write_certs(os.path.join(self.directory, "certs"), ["localhost"], now=wall_now())
        _, self.daemon = spawn_daemon(self, reactor, config, self.directory)
        self.port = yield self.daemon.listening
        self.ca = os.path.join(self.directory, "certs", "ca.pem")

    def environment(self, **changes):
        env = dict(
            environment(),
            TERM="xterm",
            SECURECHAT_PASSWORD=PASSWORD,
            XDG_DATA_HOME=os.path.join(self.directory, "data"),
            XDG_CONFIG_HOME=os.path.join(self.directory, "config"),  # no one's own config file
        )
        env.pop("NO_COLOR", None)
        env.update(changes)
        return env

    def arguments(self):
        return ["--host", "localhost", "--port", str(self.port), "--ca", self.ca]

    def terminal(self, *arguments, **env):
        master, slave = os.openpty()
        termios.tcsetwinsize(slave, (ROWS, COLUMNS))
        terminal = Terminal()
        process = reactor.spawnProcess(
            terminal,
            SECURECHAT,
            [SECURECHAT, *self.arguments(), *arguments],
            env=self.environment(**env),
            path=self.directory,
            usePTY=(master, slave, os.ttyname(slave)),
        )
        self.addCleanup(self.stop, process, terminal.ended)
        return terminal

    def batch(self, keys):
        batch = BatchProcess(keys)
        process = reactor.spawnProcess(
            batch, SECURECHAT, [SECURECHAT, *self.arguments(), "--batch"], env=self.environment(), path=self.directory
        )
        self.addCleanup(self.stop, process, batch.ended)
        return batch

    def stop(self, process, ended):
        if not ended.called:
            process.signalProcess("KILL")
        return ended

    @inlineCallbacks
    def until(self, terminal, predicate, what):
        """Poll the screen until `predicate()` holds, or fail after TIMEOUT seconds showing the screen."""
        deadline = reactor.seconds() + TIMEOUT
        while not predicate():
            if reactor.seconds() > deadline:
                self.fail(f"no {what} after {TIMEOUT} s; the screen:\n{terminal.text()}")
            yield task.deferLater(reactor, 0.05)

    def shown(self, terminal, text):
        return self.until(terminal, lambda: text in terminal.text(), repr(text))

    @inlineCallbacks
    def test_two_people(self):
        carol = self.terminal()
        yield self.shown(carol, "not logged in")
        carol.type("/register carol" + ENTER)
        yield self.shown(carol, "logged in as carol")
        carol.type("hi alce")  # half typed when alice's message comes
        yield self.until(carol, lambda: carol.last_line().endswith("> hi alce"), "typing")
        alice = self.batch(
            "/register alice\n/dm carol hello carol\n/wait deliver 1 30\n/group Team carol\n/wait deliver 1 30\n"
        )
        yield self.shown(carol, "<alice> hello carol")
        self.assertEqual(carol.last_line(), "[alice]> hi alce")  # the typing is intact, now in alice's window
        self.assertIn(" 1 alice", carol.text())  # the conversation list

        carol.type(LEFT + LEFT + "i" + ENTER)
        yield self.shown(carol, "<carol> hi alice")
        yield self.until(carol, lambda: carol.last_line() == "[alice]>", "an empty input line")
        carol.type(UP)
        yield self.until(carol, lambda: carol.last_line() == "[alice]> hi alice", "the line sent before")
        carol.type(CTRL_U + "/op" + TAB)
        yield self.until(carol, lambda: carol.last_line() == "[alice]> /open", "/op completed")

        yield self.shown(carol, " 2 Team")  # alice made a group
        carol.type(CTRL_U + ALT_2)
        yield self.shown(carol, "carol │ 2:Team")
        self.assertEqual(carol.last_line(), "[Team]>")
        carol.type(PASTE_START + "line one\rline two" + PASTE_END)
        yield self.until(carol, lambda: carol.last_line() == "line two", "the paste in the input")
        carol.type(ENTER)
        yield self.shown(carol, "      line two")
        carol.type(CTRL_P)
        yield self.shown(carol, "carol │ 1:alice")

        # Colours: our own name, the status line.
        self.assertNotEqual({cell.fg for cell in carol.cells("<carol>")}, {"default"})
        self.assertEqual({cell.bg for cell in carol.cells("carol │ 1:alice")}, {"blue"})

        self.assertEqual((yield alice.ended), 0, alice.out)
        records = [json.loads(line) for line in alice.out.decode().splitlines()]
        delivered = [(r["conversation"], r["body"]) for r in records if r["event"] == "deliver"]
        self.assertEqual(delivered, [("carol", "hi alice"), ("Team", "line one\nline two")])  # the paste: one message
        carol.type("/quit" + ENTER)
        self.assertEqual((yield carol.ended), 0)

    @inlineCallbacks
    def test_no_color(self):
        for how in ({"NO_COLOR": "1"}, {}):
            arguments = () if how else ("--no-color",)
            dave = self.terminal(*arguments, **how)
            yield self.shown(dave, "not logged in │ 0:status")
            colours = {(cell.fg, cell.bg) for line in dave.screen.buffer.values() for cell in line.values()}
            self.assertEqual(colours, {("default", "default")}, how)
            self.assertTrue(all(cell.reverse for cell in dave.cells("not logged in │ 0:status")))  # standout
            dave.type("\x04")  # Ctrl-D on an empty line
            self.assertEqual((yield dave.ended), 0)
        coloured = self.terminal()
        yield self.shown(coloured, "not logged in │ 0:status")
        self.assertEqual({cell.bg for cell in coloured.cells("not logged in │ 0:status")}, {"blue"})
