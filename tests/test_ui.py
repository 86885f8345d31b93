"""securechat's commands, renderers, input line and session logic, without a network.

The session (main.Chat) talks to FakeClient, which answers like ChatClient
from memory, through a real ui.Console or ui.Terminal over a StringTransport.
"""

import os
import sys
import json
import locale
from datetime import datetime, timedelta, timezone

from twisted.internet import task
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.python.usage import UsageError
from twisted.trial import unittest

from securechatd import commands
from securechatd.client import ui
from securechatd.client.crypto import EncryptionUnavailable
from securechatd.client.library import (
    Conversation,
    HistoryPage,
    LoggedIn,
    Message,
    Presence,
    Receipt,
    ReceiptRow,
    RefusedAtTLS,
    Sent,
)
from securechatd.client.main import (
    Chat,
    LocalError,
    Options,
    config_path,
    configured_password,
    describe,
    full_screen,
)
from securechatd.commands import BadCredentials, MessageTooLarge, NoSuchUser

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=timezone.utc)
ZONE = timezone(timedelta(hours=-3))  # the reader's time zone: NOW reads 07:00 there, whatever the machine's
PASSWORD = "correct horse battery"


def render(record):
    """The lines for `record` read at NOW in ZONE."""
    return ui.render(record, NOW, ZONE)


class ParserTests(unittest.TestCase):
    def test_every_command(self):
        cases = {
            "/register": ("register", []),
            "/register Alice": ("register", ["alice"]),
            "/register Alice Zx-9_inv": ("register", ["alice", "Zx-9_inv"]),
            "/login alice": ("login", ["alice"]),
            "/login alice 123456": ("login", ["alice", "123456"]),
            "/logout": ("logout", []),
            "/2fa": ("2fa", []),
            "/2fa Enrol": ("2fa", ["enrol"]),
            "/2fa confirm 123 456": ("2fa", ["confirm", "123 456"]),  # (the server ignores white space in a code)
            "/2fa recovery k7qm-2xfa-ve4n": ("2fa", ["recovery", "k7qm-2xfa-ve4n"]),
            "/sessions": ("sessions", []),
            "/endsession 9b25": ("endsession", ["9b25"]),
            "/endsessions": ("endsessions", []),
            "/passwd": ("passwd", []),
            "/users": ("users", []),
            "/users al": ("users", ["al"]),
            "/who": ("who", []),
            "/status away": ("status", ["away"]),
            "/status BUSY  in a meeting, back at 3": ("status", ["busy", "in a meeting, back at 3"]),
            "/dm bob": ("dm", ["bob"]),
            "/dm Bob don't  panic": ("dm", ["bob", "don't  panic"]),
            '/group "Team lunch" bob carol': ("group", ["Team lunch", ["bob", "carol"]]),
            "/add carol Dave": ("add", [["carol", "dave"]]),
            "/leave": ("leave", []),
            "/convs": ("convs", []),
            "/open 12": ("open", ["12"]),
            "/open Team lunch": ("open", ["Team lunch"]),
            "/me waves  twice": ("me", ["waves  twice"]),
            "/reply sure": ("reply", [None, "sure"]),
            "/reply #12 sure\nsee you": ("reply", [12, "sure\nsee you"]),
            "/history": ("history", []),
            "/history 5": ("history", [5]),
            "/read": ("read", []),
            "/receipts": ("receipts", []),
            "/receipts 301": ("receipts", [301]),
            "/wait deliver": ("wait", ["deliver"]),
            "/wait receipt 2 7.5": ("wait", ["receipt", 2, 7.5]),
            "/devices": ("devices", []),
            "/revoke 3fa9": ("revoke", ["3fa9"]),
            "/verify Bob": ("verify", ["bob"]),
            "/trust bob": ("trust", ["bob"]),
            "/name 3fa9 Work laptop": ("name", ["3fa9", "Work laptop"]),
            "/link": ("link", []),
            "/approve securechat-link:AAAA BBBB": ("approve", ["securechat-link:AAAA BBBB"]),
            "/mode": ("mode", []),
            "/mode Deniable": ("mode", ["deniable"]),
            "/sign": ("sign", []),
            "/export": ("export", []),
            "/export ~/team minutes.bundle": ("export", ["~/team minutes.bundle"]),
            "/serverkey": ("serverkey", []),
            "/serverkey accept": ("serverkey", ["accept"]),
            "/wait transcript_signed 2": ("wait", ["transcript_signed", 2]),
            "/wait invited": ("wait", ["invited"]),
            "/privacy": ("privacy", []),
            "/privacy Hide-Last-Seen ON": ("privacy", ["hide-last-seen", "on"]),
            "/privacy appear-offline off": ("privacy", ["appear-offline", "off"]),
            "/invite carol Dave": ("invite", [["carol", "dave"]]),
            "/invitations": ("invitations", []),
            "/security": ("security", []),
            "/security export ~/alice log.json": ("security", ["export", "~/alice log.json"]),
            "/accept #12": ("accept", [12]),
            "/decline 12": ("decline", [12]),
            "/help": ("help", []),
            "/help dm": ("help", ["dm"]),
            "/quit": ("quit", []),
            "/QUIT": ("quit", []),
            "hello bob": ("say", ["hello bob"]),
            "  indented": ("say", ["  indented"]),
            "//etc/hosts is a file": ("say", ["/etc/hosts is a file"]),
        }
        for line, expected in cases.items():
            self.assertEqual(ui.parse(line), expected, line)
        self.assertEqual(set(ui.COMMANDS), {name for name, _ in cases.values()} - {"say"})

    def test_blank_line_is_nothing(self):
        self.assertIsNone(ui.parse("   "))

    def test_bad_input_says_how(self):
        cases = {
            "/frobnicate": "There is no command /frobnicate; /help lists them.",
            "/": "There is no command /; /help lists them.",
            "/dm": "usage: /dm USER [TEXT]",
            "/group Team": "usage: /group TITLE USER...",
            "/add": "usage: /add USER...",
            "/logout now": "usage: /logout",
            "/history 5 6": "usage: /history [N]",
            "/history five": "N must be a number above 0, not 'five'.",
            "/history 0": "N must be a number above 0, not '0'.",
            "/receipts -3": "MSG must be a number above 0, not '-3'.",
            "/status asleep": "STATUS must be one of online, away, busy, invisible, not 'asleep'.",
            "/wait lunch": "EVENT must be one of deliver, receipt, presence, conversation, transcript_signed, mode,"
            " invited, invitation_accepted, not 'lunch'.",
            "/privacy lastseen on": "SETTING must be one of hide-last-seen, appear-offline, not 'lastseen'.",
            "/privacy appear-offline maybe": "ON|OFF must be one of on, off, not 'maybe'.",
            "/accept": "usage: /accept ID",
            "/accept soon": "ID must be a number above 0, not 'soon'.",
            "/decline #0": "ID must be a number above 0, not '0'.",
            "/invite": "usage: /invite USER...",
            "/security everything": "EXPORT must be one of export, not 'everything'.",
            "/mode secret": "MODE must be one of attestable, deniable, not 'secret'.",
            "/serverkey yes": "ACCEPT must be one of accept, not 'yes'.",
            "/wait deliver 1 soon": "TIMEOUT must be a number above 0, not 'soon'.",
            '/group "Team bob': "Unbalanced quotes; usage: /group TITLE USER...",
            "/open": "usage: /open ID|NAME",
            "/me": "usage: /me TEXT",
            "/reply #12": "usage: /reply [#MSG] TEXT",
            "/reply #x yes": "MSG must be a number above 0, not 'x'.",
        }
        for line, message in cases.items():
            with self.assertRaises(ui.UsageError, msg=line) as raised:
                ui.parse(line)
            self.assertEqual(str(raised.exception), message)

    def test_help(self):
        lines = ui.help_lines()
        self.assertEqual(len(lines), len(ui.COMMANDS) + 1)
        self.assertTrue(lines[0].startswith("/register [USER]"))
        self.assertIn("/wait EVENT [COUNT] [TIMEOUT]", "\n".join(lines))
        wait = ui.help_lines("/wait")
        details = " ".join(line.strip() for line in wait[1:])
        self.assertIn("deliver, receipt, presence, conversation, transcript_signed, mode, invited or invitation_accepted", details)
        self.assertEqual(ui.help_lines("who"), ["/who  presence of the people in your conversations"])
        with self.assertRaises(ui.UsageError):
            ui.help_lines("nope")


def message(**fields):
    record = dict(
        event="deliver",
        conversation_id=3,
        conversation="bob",
        message_id=7,
        seq=1,
        sender="bob",
        body="hi",
        sent_at=NOW,
    )
    record.update(fields)
    return record


class RenderTests(unittest.TestCase):
    def test_message(self):
        self.assertEqual(render(message()), ["07:00 [bob] <bob> hi"])

    def test_action(self):
        self.assertEqual(render(message(body="/me waves\x1b[2J")), ["07:00 [bob] * bob waves�[2J"])

    def test_quote_and_mentions(self):
        self.assertEqual(ui.quote("bob", "> carol: x\nlunch at noon?\nor later", "yes"), "> bob: lunch at noon?\nyes")
        self.assertEqual(ui.quote("bob", "/me " + "a" * 70, "ok"), "> bob: " + "a" * 59 + "…\nok")
        self.assertTrue(ui.mentions("@Alice: lunch?", ["alice"]))
        self.assertTrue(ui.mentions("lunch, alice?", ["bob", "alice"]))
        self.assertFalse(ui.mentions("malice aforethought", ["alice"]))
        self.assertFalse(ui.mentions("anything", [None]))

    def test_own_message_is_marked_sent(self):
        record = message(event="answer", command="say", sender="alice", body="hello")
        self.assertEqual(render(record), ["07:00 [bob] <alice> hello  (#7 sent)"])

    def test_other_people_cannot_write_control_sequences(self):
        [line] = render(message(body="one\ntwo\x1b[2J\tthree"))
        self.assertEqual(line, "07:00 [bob] <bob> one\n      two�[2J three")

    def test_older_messages_show_the_date(self):
        self.assertEqual(ui.stamp(NOW, NOW, ZONE), "07:00")
        self.assertEqual(ui.stamp(NOW - timedelta(days=1), NOW, ZONE), "Nov 21 07:00")
        self.assertEqual(ui.stamp(NOW, NOW + timedelta(days=365), ZONE), "Nov 22 07:00")
        self.assertEqual(render(message(sent_at=NOW - timedelta(hours=8))), ["Nov 21 23:00 [bob] <bob> hi"])

    def test_today_is_the_day_in_the_readers_zone(self):
        """10:00 UTC on Nov 22 is 00:00 on Nov 23 at UTC+14 (Kiritimati) and 22:00 on Nov 21 at UTC-12."""
        earlier, later = NOW - timedelta(hours=1), NOW + timedelta(hours=3)
        self.assertEqual([ui.stamp(NOW, now, timezone.utc) for now in (earlier, later)], ["10:00", "10:00"])
        self.assertEqual(ui.stamp(NOW, earlier, timezone(timedelta(hours=14))), "Nov 23 00:00")
        self.assertEqual(ui.stamp(NOW, later, timezone(timedelta(hours=14))), "00:00")
        self.assertEqual(ui.stamp(NOW, earlier, timezone(timedelta(hours=-12))), "22:00")
        self.assertEqual(ui.stamp(NOW, later, timezone(timedelta(hours=-12))), "Nov 21 22:00")

    def test_the_month_is_english_in_any_locale(self):
        try:
            previous = locale.setlocale(locale.LC_TIME)
        except locale.Error as e:
            raise unittest.SkipTest(f"no locale support: {e}")
        for name in ("de_DE.UTF-8", "de_DE.utf8", "fr_FR.UTF-8", "fr_FR.utf8"):
            try:
                locale.setlocale(locale.LC_TIME, name)
            except locale.Error:
                continue
            self.addCleanup(locale.setlocale, locale.LC_TIME, previous)
            break
        else:
            raise unittest.SkipTest("no German or French locale installed (locale -a)")
        self.assertNotEqual(datetime(2026, 12, 1).strftime("%b"), "Dec")  # the locale does change %b
        self.assertEqual(ui.stamp(datetime(2026, 12, 1, tzinfo=timezone.utc), NOW, timezone.utc), "Dec 01 00:00")

    def test_receipts(self):
        receipt = dict(event="receipt", conversation_id=3, conversation="bob", username="bob", seq=2, at=NOW)
        self.assertEqual(
            render(dict(receipt, state="delivered", message_ids=[7])), ["07:00 [bob] ✓ #7 delivered to bob"]
        )
        self.assertEqual(
            render(dict(receipt, state="read", message_ids=[7, 9])),
            ["07:00 [bob] ✓✓ 2 messages up to #9 read by bob"],
        )
        self.assertEqual(
            render(dict(receipt, state="read", message_ids=[])), ["07:00 [bob] ✓✓ messages up to no. 2 read by bob"]
        )

    def test_presence(self):
        event = dict(event="presence", username="bob", status="away", note="lunch", at=NOW)
        self.assertEqual(render(event), ["07:00 * bob is away: lunch"])
        row = dict(username="carol", status="offline", note=None, last_seen=NOW)
        self.assertEqual(
            render(dict(event="answer", command="who", presence=[row])),
            ["  carol is offline, last seen 07:00"],
        )

    def test_conversations(self):
        event = dict(event="conversation", conversation_id=3, kind="direct", title=None, at=NOW)
        direct = dict(event, conversation="alice", members=["alice", "bob"], change="new")
        self.assertEqual(render(direct), ["07:00 * new conversation with alice; /open alice to talk there"])
        group = dict(event, kind="group", conversation="Team", members=["a", "b", "c"], change="new")
        self.assertEqual(render(group), ["07:00 * new group [Team]: a, b, c; /open Team to talk there"])
        self.assertEqual(render(dict(group, change="left")), ["07:00 * you are no longer in [Team]"])

    def test_answers(self):
        def answer(command, **fields):
            return render(dict(event="answer", command=command, **fields))

        self.assertEqual(
            answer("login", username="alice", conversations=2, unread=3),
            ["logged in as alice; 3 unread in your conversations (/convs lists them)"],
        )
        self.assertEqual(
            answer("login", username="alice", conversations=0, unread=0),
            ["logged in as alice; /users lists people, /dm USER starts a conversation"],
        )
        row = dict(conversation_id=3, conversation="bob", unread=2, current=True, encrypted=True, verified=True)
        team = dict(row, conversation_id=12, conversation="Team", unread=0, current=False, verified=False)
        old = dict(row, conversation_id=14, conversation="Old", unread=0, current=False, encrypted=False, verified=False)
        self.assertEqual(
            answer("convs", conversations=[row, team, old]),
            [
                "> #3     bob                      encrypted, all verified  2 unread",
                "  #12    Team                     encrypted",
                "  #14    Old                      plaintext",
            ],
        )
        self.assertEqual(
            answer("receipts", conversation="bob", message_id=7, receipts=[
                dict(username="bob", delivered_at=NOW, read_at=None),
                dict(username="carol", delivered_at=None, read_at=None),
            ]),
            ["#7 in [bob]:", "  bob: delivered 07:00, not read yet", "  carol: not delivered yet"],
        )
        self.assertEqual(
            answer("history", conversation="bob", messages=[message()], has_more=True),
            ["(older messages: /history with a larger N)", "07:00 [bob] <bob> hi"],
        )
        self.assertEqual(answer("quit"), [])
        self.assertEqual(render(dict(event="error", code="NO_SUCH_USER", message="No.")), ["error: No."])

    def test_json(self):
        self.assertEqual(
            json.loads(ui.to_json(message())),
            dict(message(), sent_at="2026-11-22T10:00:00+00:00"),
        )

    def test_names_and_prompt(self):
        direct = Conversation(3, "direct", ("alice", "bob"))
        self.assertEqual(ui.conversation_name(direct, "alice"), "bob")
        self.assertEqual(ui.conversation_name(Conversation(4, "group", ("alice", "bob"), "Team"), "bob"), "Team")
        self.assertEqual(ui.conversation_name(Conversation(5, "group", ("alice", "bob", "carol")), "bob"), "alice, carol")
        self.assertEqual(ui.prompt(None, 0), "[-]> ")
        self.assertEqual(ui.prompt("bob", 2), "[bob · 2 unread]> ")
        self.assertEqual(ui.prompt("bob", 0, 3), "[bob · 3 unread elsewhere]> ")
        self.assertEqual(ui.prompt("bob", 1, 3), "[bob · 1 unread · 3 unread elsewhere]> ")


class ConsoleTests(unittest.TestCase):
    def setUp(self):
        self.console = ui.Console()
        self.transport = StringTransport()
        self.console.makeConnection(self.transport)

    def lines(self, count):
        return [self.successResultOf(self.console.next_line()) for _ in range(count)]

    def test_lines(self):
        self.console.dataReceived(b"/login alice\r\nsecret\nhal")
        waiting = self.console.next_line(), self.console.next_line(), self.console.next_line()
        self.assertEqual([self.successResultOf(d) for d in waiting[:2]], ["/login alice", "secret"])
        self.assertNoResult(waiting[2])
        self.console.dataReceived("lo 👋".encode()[:-1])
        self.console.dataReceived("lo 👋\n".encode()[-2:])
        self.assertEqual(self.successResultOf(waiting[2]), "hallo 👋")

    def test_end_of_input(self):
        self.console.dataReceived(b"last line without a newline")
        self.console.readConnectionLost()
        self.assertEqual(self.lines(3), ["last line without a newline", None, None])

    def test_secret_is_the_next_line(self):
        asked = self.console.read_secret("Password: ")
        self.console.dataReceived(b"hunter22\n")
        self.assertEqual(self.successResultOf(asked), "hunter22")
        self.assertEqual(self.transport.value(), b"")

    def test_show(self):
        self.console.set_prompt("[bob]> ")
        self.console.show("one")
        self.assertEqual(self.transport.value(), b"one\n")


class TerminalTests(unittest.TestCase):
    def setUp(self):
        self.terminal = ui.Terminal(width=lambda: 20)
        self.transport = StringTransport()
        self.terminal.makeConnection(self.transport)
        self.terminal.set_prompt("[bob]> ")
        self.transport.clear()

    def keys(self, text):
        self.terminal.dataReceived(text.encode())

    def test_output_is_printed_above_what_is_being_typed(self):
        self.keys("hel")
        self.assertEqual(self.transport.value(), b"hel")
        self.terminal.show("10:00 [bob] <bob> hi")
        self.assertEqual(self.transport.value(), b"hel\r\x1b[J10:00 [bob] <bob> hi\n[bob]> hel")
        self.keys("lo\r")
        self.assertEqual(self.successResultOf(self.terminal.next_line()), "hello")

    def test_a_sent_message_leaves_the_input_line(self):
        self.keys("hello\r")
        self.assertTrue(self.transport.value().endswith(b"hello\r\x1b[J[bob]> "))

    def test_a_command_stays_on_screen(self):
        self.keys("/who\n")
        self.assertEqual(self.transport.value(), b"/who\n[bob]> ")
        self.assertEqual(self.successResultOf(self.terminal.next_line()), "/who")

    def test_wrapped_input_is_cleared_on_every_row(self):
        self.keys("x" * 30)  # 7 + 30 columns: three rows of 20
        self.transport.clear()
        self.terminal.show("event")
        self.assertEqual(self.transport.value(), b"\r\x1b[1A\x1b[Jevent\n[bob]> " + b"x" * 30)

    def test_editing_keys(self):
        self.keys("one two  three\x17")
        self.assertEqual(self.terminal.typed, "one two  ")
        self.keys("\x7f\x7f\x7fX")
        self.assertEqual(self.terminal.typed, "one twX")
        self.keys("\x1b[A\x1bOD\x1b[1;5C\x1bxY")  # arrows, Ctrl-arrow, Alt-x: ignored
        self.assertEqual(self.terminal.typed, "one twXY")
        self.keys("\x15")
        self.assertEqual(self.terminal.typed, "")
        self.keys("\tnaïve ")
        self.terminal.dataReceived("日本".encode()[:4])
        self.terminal.dataReceived("日本".encode()[4:])
        self.assertEqual(self.terminal.typed, "naïve 日本")

    def test_secret_is_not_echoed(self):
        self.keys("half")
        asked = self.terminal.read_secret("Password: ")
        self.keys("s3cret!\x7f\r")
        self.assertEqual(self.successResultOf(asked), "s3cret")
        self.assertNotIn(b"s3cret", self.transport.value())
        self.assertTrue(self.transport.value().endswith(b"Password: \n[bob]> half"))
        self.assertEqual(self.terminal.typed, "half")

    def test_ctrl_d_ends_on_an_empty_line(self):
        ended = self.terminal.next_line()
        self.keys("x\x04")
        self.assertNoResult(ended)
        self.keys("\x7f\x04")
        self.assertIsNone(self.successResultOf(ended))


class FakeClient:
    """What Chat uses of ChatClient, answered at once from memory (or not: see `hold`)."""

    def __init__(self):
        self.username = None
        self.calls = []
        self.limits = []  # the limit of each list_users call
        self.pages = {}  # conversation_id -> the HistoryPage history() answers
        self.conversations = {}
        self.users = {"alice", "bob", "carol"}
        self.failing = {}  # method name -> exception it fails with once
        self.hold = None  # a method name whose answers wait in self.held
        self.held = []
        self._ids = iter(range(100, 1000))

    def _answer(self, name, *arguments, result=None):
        self.calls.append((name, *arguments))
        if name in self.failing:
            return fail(self.failing.pop(name))
        if name == self.hold:
            held = Deferred()
            self.held.append((held, result))
            return held
        return succeed(result)

    def login(self, username, password, remember_password=False):
        answer = self._answer("login", username, password)
        if not answer.called or isinstance(answer.result, Failure):
            return answer
        self.username = username
        return answer.addCallback(lambda _: LoggedIn(username, "s1", NOW, "token"))

    def register(self, username, password, invite=None):
        return self._answer("register", username, password, invite, result=username)

    def logout(self):
        self.username = None
        return self._answer("logout")

    def change_password(self, old, new):
        return self._answer("change_password", old, new)

    def list_conversations(self):
        return self._answer("list_conversations", result=list(self.conversations.values()))

    def create_conversation(self, members, title=None):
        missing = set(members) - self.users
        if missing:
            return fail(NoSuchUser(f"There is no user {sorted(missing)[0]}."))
        everyone = tuple(sorted({self.username, *members}))
        for c in self.conversations.values():
            if title is None and c.kind == "direct" and c.members == everyone:
                return self._answer("create_conversation", members, title, result=(c.conversation_id, False))
        conversation_id = len(self.conversations) + 1
        kind = "direct" if title is None and len(members) == 1 else "group"
        self.conversations[conversation_id] = Conversation(conversation_id, kind, everyone, title)
        return self._answer("create_conversation", members, title, result=(conversation_id, True))

    def add_members(self, conversation_id, members):
        return self._answer("add_members", conversation_id, members, result=[])

    def group_invitations(self, conversation_id):
        return self._answer("group_invitations", conversation_id, result=[])

    def leave_conversation(self, conversation_id):
        del self.conversations[conversation_id]
        return self._answer("leave_conversation", conversation_id)

    def send_message(self, conversation_id, body):
        if len(body.encode("utf-8")) > 16384:  # (as ChatClient answers it, from the server's limit)
            return fail(MessageTooLarge("A message body is at most 16384 bytes of UTF-8."))
        c = self.conversations[conversation_id]
        self.conversations[conversation_id] = Conversation(c.conversation_id, c.kind, c.members, c.title, c.last_seq + 1)
        sent = Sent(next(self._ids), c.last_seq + 1, NOW)
        return self._answer("send_message", conversation_id, body, result=sent)

    def history(self, conversation_id, before_seq=None, limit=None):
        page = self.pages.get(conversation_id, HistoryPage((), False))
        return self._answer("history", conversation_id, limit, result=page)

    def mark_read(self, conversation_id, seq, private=False):
        return self._answer("mark_read", conversation_id, seq)

    def get_receipts(self, conversation_id, message_id):
        return self._answer("get_receipts", conversation_id, message_id, result=[ReceiptRow("bob", NOW, None)])

    def set_presence(self, status, note=None):
        return self._answer("set_presence", status, note)

    def get_presence(self, usernames):
        rows = [Presence(name, "online") for name in usernames]
        return self._answer("get_presence", usernames, result=rows)

    def list_users(self, prefix=None, limit=None):
        self.limits.append(limit)
        return self._answer("list_users", prefix, result=[(name, "online") for name in sorted(self.users)])


class ChatTestCase(unittest.TestCase):
    """A Chat over a FakeClient and a line Console; `records()` reads what it wrote as JSON."""

    batch = True
    keep_going = False
    password = PASSWORD

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(NOW.timestamp())
        self.client = FakeClient()
        self.console = self.make_console()
        self.transport = StringTransport()
        self.console.makeConnection(self.transport)
        self.chat = Chat(
            self.client,
            self.console,
            self.clock,
            password=self.password,
            batch=self.batch,
            keep_going=self.keep_going,
        )
        self.status = self.chat.run()

    def make_console(self):
        return ui.Console(tz=ZONE)

    def type(self, *lines):
        self.console.dataReceived("".join(line + "\n" for line in lines).encode())
        self.clock.advance(0)

    def records(self):
        records = [json.loads(line) for line in self.transport.value().decode().splitlines()]
        self.transport.clear()
        return records

    def answers(self):
        return [r for r in self.records() if r["event"] == "answer"]

    def logged_in(self, *conversations):
        for c in conversations:
            self.client.conversations[c.conversation_id] = c
        self.type("/login alice")
        self.transport.clear()


class BatchTests(ChatTestCase):
    def test_register_logs_in(self):
        self.type("/register Alice")
        self.assertEqual(
            self.records(),
            [
                {"event": "answer", "command": "register", "username": "alice"},
                {"event": "answer", "command": "login", "username": "alice", "conversations": 0, "unread": 0},
            ],
        )
        self.assertEqual(self.client.calls[:2], [("register", "alice", PASSWORD, None), ("login", "alice", PASSWORD)])

    def test_dm_and_say(self):
        self.logged_in()
        self.type("/dm bob hello bob", "and more")
        dm, say = self.records()
        self.assertEqual(
            dm,
            {
                "event": "answer",
                "command": "dm",
                "conversation_id": 1,
                "conversation": "bob",
                "created": True,
                "message_id": 100,
                "seq": 1,
                "sender": "alice",
                "body": "hello bob",
                "sent_at": NOW.isoformat(),
            },
        )
        self.assertEqual((say["command"], say["conversation"], say["seq"], say["body"]), ("say", "bob", 2, "and more"))

    def test_first_error_ends_a_batch(self):
        self.logged_in()
        self.type("/dm nobody hi", "/who")
        self.assertEqual(
            self.records(),
            [{"event": "error", "command": "dm", "code": "NO_SUCH_USER", "message": "There is no user nobody."}],
        )
        self.assertEqual(self.successResultOf(self.status), 1)

    def test_usage_errors_are_errors(self):
        self.type("/dm")
        [error] = self.records()
        self.assertEqual((error["command"], error["code"], error["message"]), ("dm", "USAGE", "usage: /dm USER [TEXT]"))
        self.assertEqual(self.successResultOf(self.status), 1)

    def test_a_message_needs_a_login_and_a_conversation(self):
        self.type("hello?")
        [error] = self.records()
        self.assertEqual(error["code"], "AUTH_REQUIRED")

    def test_end_of_input_quits(self):
        self.logged_in()
        self.console.readConnectionLost()
        self.assertEqual(self.records(), [{"event": "answer", "command": "quit"}])
        self.assertEqual(self.successResultOf(self.status), 0)

    def test_unexpected_failure_is_one_line(self):
        self.logged_in()
        self.client.failing["list_users"] = KeyError("oops")
        self.type("/users")
        [error] = self.records()
        self.assertEqual(error["code"], "INTERNAL")
        self.assertEqual(error["message"], "Unexpected problem: KeyError: 'oops' (--debug logs the details).")
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_disconnect_ends_a_batch(self):
        self.logged_in()
        self.client.on_disconnected(Failure(ConnectionLost()))
        [error] = self.records()
        self.assertEqual((error["code"], error["message"]), ("DISCONNECTED", "The connection to the server was lost."))
        self.assertEqual(self.successResultOf(self.status), 1)


class KeepGoingTests(ChatTestCase):
    keep_going = True

    def test_errors_do_not_stop_but_set_the_status(self):
        self.client.failing["login"] = BadCredentials("Wrong username or password.")
        self.type("/login alice", "/help quit")
        error, help = self.records()
        self.assertEqual((error["code"], error["message"]), ("BAD_CREDENTIALS", "Wrong username or password."))
        self.assertEqual(help["lines"], ["/quit  leave (also Ctrl-D)"])
        self.console.readConnectionLost()
        self.assertEqual(self.successResultOf(self.status), 1)


class AskingTests(ChatTestCase):
    password = None

    def test_password_is_the_next_line_without_a_configured_one(self):
        self.type("/login alice", PASSWORD, "/passwd", PASSWORD, "new password 2")
        self.assertEqual([a["command"] for a in self.answers()], ["login", "passwd"])
        self.assertEqual(self.client.calls[-1], ("change_password", PASSWORD, "new password 2"))

    def test_no_password_cancels(self):
        self.type("/login alice", "")
        [error] = self.records()
        self.assertEqual((error["code"], error["message"]), ("CANCELLED", "No password was given."))


class ConversationTests(ChatTestCase):
    def test_messages_to_an_unknown_conversation_are_named(self):
        self.logged_in()
        self.client.conversations[7] = Conversation(7, "group", ("alice", "bob", "carol"), "Team")
        handled = self.client.on_deliver(Message(301, 1, "bob", "hi all", NOW, 7))
        self.successResultOf(handled)  # acknowledged once shown
        [deliver] = self.records()
        self.assertEqual((deliver["conversation"], deliver["sender"], deliver["body"]), ("Team", "bob", "hi all"))
        self.assertEqual(self.chat.current, 7)  # nothing was open: a reply goes there

    def test_pushes_after_the_login_answer_are_shown_after_it(self):
        self.client.conversations[3] = Conversation(3, "direct", ("alice", "bob"), last_seq=1, unread=1)
        self.client.hold = "list_conversations"
        self.type("/login alice")
        self.client.on_deliver(Message(301, 1, "bob", "while you were away", NOW, 3))
        self.assertEqual(self.records(), [])
        self.client.hold = None
        held, result = self.client.held.pop()
        held.callback(result)
        login, deliver = self.records()
        self.assertEqual((login["command"], login["unread"], deliver["body"]), ("login", 1, "while you were away"))
        self.assertEqual(self.chat.conversations[3].unread, 1)  # counted once

    def test_receipts_name_our_messages(self):
        self.logged_in()
        self.type("/dm bob one", "two", "three")
        self.records()
        for state, seq in [("delivered", 2), ("read", 1), ("delivered", 3), ("read", 3)]:
            self.client.on_receipt(Receipt(1, "bob", state, seq, NOW))
        self.assertEqual(
            [(r["state"], r["message_ids"]) for r in self.records()],
            [("delivered", [100, 101]), ("read", [100]), ("delivered", [102]), ("read", [101, 102])],
        )
        self.type("/receipts")
        [answer] = self.records()
        self.assertEqual(answer["message_id"], 102)
        self.assertEqual(answer["receipts"], [{"username": "bob", "delivered_at": NOW.isoformat(), "read_at": None}])

    def test_open_by_id_name_or_title(self):
        bob = Conversation(3, "direct", ("alice", "bob"), last_seq=4, unread=2)
        team = Conversation(8, "group", ("alice", "bob", "carol"), "Team lunch")
        self.logged_in(bob, team)
        self.type("/open Team Lunch", "/open bob", "/open #8", "/open 3")
        self.assertEqual([(a["conversation_id"], a["conversation"]) for a in self.answers()], [(8, "Team lunch"), (3, "bob"), (8, "Team lunch"), (3, "bob")])

    def test_the_prompt_counts_this_conversation_apart_from_the_others(self):
        bob = Conversation(3, "direct", ("alice", "bob"), last_seq=4, unread=2)
        carol = Conversation(5, "direct", ("alice", "carol"), last_seq=1, unread=1)
        prompts = []
        self.patch(self.console, "set_prompt", prompts.append)
        self.logged_in(bob, carol)
        self.type("/open carol")
        self.assertEqual(prompts[-1], "[carol · 1 unread · 2 unread elsewhere]> ")

    def test_open_shows_what_was_missed(self):
        missed = (Message(301, 3, "bob", "are you there?", NOW, 3), Message(302, 4, "bob", "lunch?", NOW, 3))
        self.client.pages[3] = HistoryPage(missed, True)
        self.logged_in(Conversation(3, "direct", ("alice", "bob"), last_seq=4, unread=2))
        self.type("/open bob")
        [answer] = self.answers()
        self.assertEqual([m["body"] for m in answer["messages"]], ["are you there?", "lunch?"])
        self.assertEqual(self.client.calls[-1], ("history", 3, 2))
        for message in answer["messages"]:
            message["sent_at"] = NOW  # (as the Chat hands it to render, before JSON)
        lines = ui.render(answer, NOW, timezone.utc)
        self.assertEqual(lines[0], "now in [bob], 2 unread:")
        self.assertIn("are you there?", lines[1])

    def test_open_finds_new_conversations_or_says_what_to_do(self):
        self.logged_in()
        self.client.conversations[4] = Conversation(4, "direct", ("alice", "carol"))
        self.type("/open carol")
        self.assertEqual(self.records()[0]["conversation_id"], 4)
        self.type("/open dave")
        [error] = self.records()
        self.assertEqual(error["message"], "You have no conversation dave; /convs lists yours, /dm USER starts one.")

    def test_same_names_are_ambiguous(self):
        self.logged_in(Conversation(3, "direct", ("alice", "bob")), Conversation(5, "group", ("alice", "bob"), "bob"))
        self.type("/open bob")
        [error] = self.records()
        self.assertEqual(error["message"], "Several conversations are called bob: #3, #5; /open ID picks one.")

    def test_read_marks_up_to_the_last_message(self):
        self.logged_in(Conversation(3, "direct", ("alice", "bob"), last_seq=4, unread=2))
        self.type("/open bob")
        self.client.on_deliver(Message(301, 5, "bob", "one more", NOW, 3))
        self.type("/read")
        self.assertEqual(self.client.calls[-1], ("mark_read", 3, 5))
        self.assertEqual(self.chat.conversations[3].unread, 0)

    def test_replying_marks_read(self):
        self.logged_in(Conversation(3, "direct", ("alice", "bob"), last_seq=4, unread=2))
        self.type("/open bob", "ok")
        self.assertEqual([c[0] for c in self.client.calls[-2:]], ["mark_read", "send_message"])

    def test_who_asks_for_everyone_we_share_a_conversation_with(self):
        self.logged_in(
            Conversation(3, "direct", ("alice", "bob")), Conversation(5, "group", ("alice", "bob", "carol"), "T")
        )
        self.type("/who")
        [answer] = self.records()
        self.assertEqual([p["username"] for p in answer["presence"]], ["bob", "carol"])
        self.assertEqual(self.client.calls[-1], ("get_presence", ["bob", "carol"]))

    def test_who_asks_within_the_servers_limit(self):
        """A user with 150 contacts: GetPresence takes at most commands.MAX_PRESENCE_NAMES names a call."""
        members = ("alice", *[f"user{i:03}" for i in range(150)])
        self.logged_in(Conversation(5, "group", members, "Everyone"))
        self.type("/who")
        [answer] = self.records()
        self.assertEqual(len(answer["presence"]), 150)
        asked = [len(call[1]) for call in self.client.calls if call[0] == "get_presence"]
        self.assertEqual(asked, [commands.MAX_PRESENCE_NAMES, 150 - commands.MAX_PRESENCE_NAMES])

    def test_users_asks_within_the_servers_limit(self):
        self.logged_in()
        self.type("/users")
        [limit] = self.client.limits
        self.assertLessEqual(limit, commands.USERS_LIMIT[1])

    def test_groups(self):
        self.logged_in()
        self.type('/group "Team lunch" bob', "/add carol", "/leave")
        group, add, leave = self.answers()
        self.assertEqual((group["conversation"], group["members"]), ("Team lunch", ["alice", "bob"]))
        self.assertEqual(add["members"], ["alice", "bob", "carol"])
        self.assertEqual((leave["conversation"], self.chat.current), ("Team lunch", None))

    def test_conversation_updates(self):
        self.logged_in()
        self.client.on_conversation(Conversation(9, "group", ("alice", "bob"), "Plans"))
        self.client.on_conversation(Conversation(9, "group", ("alice", "bob", "carol"), "Plans"))
        self.client.on_conversation(Conversation(9, "group", ("bob", "carol"), "Plans"))
        self.assertEqual([r["change"] for r in self.records()], ["new", "members", "left"])
        self.assertNotIn(9, self.chat.conversations)

    def test_membership_changes_say_who_joined_and_who_left(self):
        self.logged_in()
        self.client.on_conversation(Conversation(9, "group", ("alice", "bob", "dave"), "Plans"))
        self.client.on_conversation(Conversation(9, "group", ("alice", "bob", "carol"), "Plans"))
        [_, change] = self.records()
        self.assertEqual((change["joined"], change["left"]), (["carol"], ["dave"]))
        change["at"] = NOW
        [line] = ui.render(change, NOW, timezone.utc)
        self.assertTrue(line.endswith("* [Plans] carol joined; dave left: now alice, bob, carol"), line)

    def test_a_receipt_for_messages_of_an_earlier_run_says_up_to_where(self):
        self.logged_in(Conversation(3, "direct", ("alice", "bob"), last_seq=4))
        self.client.on_receipt(Receipt(3, "bob", "read", 4, NOW))
        [receipt] = self.records()
        receipt["at"] = NOW
        [line] = ui.render(receipt, NOW, timezone.utc)
        self.assertTrue(line.endswith("✓✓ messages up to no. 4 read by bob"), line)

    def test_logged_out_forgets(self):
        self.logged_in(Conversation(3, "direct", ("alice", "bob")))
        self.type("/open bob")
        self.client.on_logged_out("The session could not be resumed; log in again.")
        self.assertEqual((self.chat.conversations, self.chat.current), ({}, None))
        self.assertEqual(self.records()[-1]["event"], "logged_out")


class ActionAndReplyTests(ChatTestCase):
    def test_me_is_a_message_starting_with_me(self):
        self.logged_in(Conversation(3, "direct", ("alice", "bob")))
        self.type("/open bob", "/me waves")
        self.assertEqual(self.client.calls[-1], ("send_message", 3, "/me waves"))
        self.assertEqual(self.answers()[-1]["body"], "/me waves")

    def test_reply_quotes_a_message_shown_or_looked_up(self):
        self.logged_in(Conversation(3, "direct", ("alice", "bob")))
        self.type("/open bob")
        self.client.on_deliver(Message(301, 1, "bob", "lunch at noon?", NOW, 3))
        self.client.on_deliver(Message(302, 2, "bob", "or later", NOW, 3))
        self.type("/reply #301 noon is fine", "/reply yes")
        sent = [call[2] for call in self.client.calls if call[0] == "send_message"]
        self.assertEqual(sent, ["> bob: lunch at noon?\nnoon is fine", "> bob: or later\nyes"])
        self.assertEqual([a.get("reply_to") for a in self.answers() if a["command"] == "say"], [301, 302])
        self.client.pages[3] = HistoryPage((Message(7, 1, "bob", "from an earlier run", NOW, 3),), False)
        self.type("/reply #7 old news")
        self.assertEqual(self.client.calls[-1], ("send_message", 3, "> bob: from an earlier run\nold news"))
        self.transport.clear()
        self.type("/reply #8 nothing")
        [error] = self.records()
        self.assertEqual(
            (error["code"], error["message"]), ("NO_MESSAGE", "There is no message #8 among the last 100 here.")
        )


class WaitTests(ChatTestCase):
    def test_wait_claims_events(self):
        self.logged_in(Conversation(3, "direct", ("alice", "bob")))
        self.client.on_presence(Presence("bob", "away", at=NOW))
        self.clock.advance(0)
        self.type("/wait presence", "/wait presence 2", "/users")
        self.assertEqual([a["command"] for a in self.answers()], ["wait"])
        self.client.on_presence(Presence("bob", "online", at=NOW))
        self.clock.advance(0)
        self.assertEqual(self.answers(), [])
        self.client.on_presence(Presence("bob", "busy", at=NOW))
        self.clock.advance(0)
        self.assertEqual([a["command"] for a in self.answers()], ["wait", "users"])

    def test_wait_times_out(self):
        self.logged_in()
        self.type("/wait deliver 1 5")
        self.clock.advance(5)
        [error] = self.records()
        self.assertEqual((error["code"], error["message"]), ("TIMEOUT", "Waited 5 s for 1 deliver event(s); 0 came."))


class InteractiveTests(ChatTestCase):
    """The same session at a terminal: human lines, the prompt, lines run at once."""

    batch = False

    def make_console(self):
        return ui.Terminal(width=lambda: 200, tz=ZONE)

    def test_a_message_arriving_while_typing(self):
        self.logged_in(Conversation(3, "direct", ("alice", "bob")))
        self.type("/open bob")
        self.transport.clear()
        self.console.dataReceived(b"on my wa")
        self.client.on_deliver(Message(301, 1, "bob", "where are you?", NOW, 3))
        self.assertEqual(
            self.transport.value().decode(),
            "on my wa\r\x1b[J07:00 [bob] <bob> where are you?\n[bob]> on my wa"
            "\r\x1b[J[bob · 1 unread]> on my wa",
        )

    def test_today_is_the_day_on_the_sessions_clock(self):
        self.logged_in(Conversation(3, "direct", ("alice", "bob")))
        self.client.on_deliver(Message(301, 1, "bob", "sent today", NOW, 3))
        self.clock.advance(24 * 60 * 60)
        self.client.on_deliver(Message(302, 2, "bob", "shown a day later", NOW, 3))
        lines = [line.rpartition("\x1b[J")[2] for line in self.transport.value().decode().split("\n")]
        self.assertIn("07:00 [bob] <bob> sent today", lines)
        self.assertIn("Nov 22 07:00 [bob] <bob> shown a day later", lines)

    def test_commands_run_at_once(self):
        self.logged_in(Conversation(3, "direct", ("alice", "bob")))
        self.client.hold = "send_message"
        self.type("/open bob", "slow", "/who")
        self.assertIn("bob is online", self.transport.value().decode())
        self.transport.clear()
        self.client.hold = None
        held, result = self.client.held.pop()
        held.callback(result)
        self.assertIn("<alice> slow  (#100 sent)", self.transport.value().decode())

    def test_a_line_typed_while_disconnected_shows_at_once_as_pending(self):
        self.logged_in(Conversation(3, "direct", ("alice", "bob")))
        self.type("/open bob")
        self.client.on_disconnected(Failure(ConnectionLost()))
        self.client.hold = "send_message"
        self.transport.clear()
        self.type("still there?")
        self.assertIn("<alice> still there?  (pending: sent once reconnected)", self.transport.value().decode())
        self.client.hold = None
        held, result = self.client.held.pop()
        held.callback(result)
        self.assertIn("<alice> still there?  (#100 sent)", self.transport.value().decode())

    def test_quit_waits_for_messages_being_sent(self):
        self.logged_in(Conversation(3, "direct", ("alice", "bob")))
        self.client.hold = "send_message"
        self.type("/open bob", "bye", "/quit")
        self.assertNoResult(self.status)
        held, result = self.client.held.pop()
        held.callback(result)
        self.assertEqual(self.successResultOf(self.status), 0)

    def test_errors_are_one_line_and_do_not_end(self):
        self.logged_in()
        self.transport.clear()
        self.type("/status sleepy")
        self.assertEqual(
            self.transport.value().decode(),
            "/status sleepy\n[-]> \r\x1b[Jerror: STATUS must be one of online, away, busy, invisible, not 'sleepy'.\n[-]> ",
        )
        self.assertNoResult(self.status)

    def test_reconnecting_is_shown(self):
        self.logged_in()
        self.transport.clear()
        self.client.on_disconnected(Failure(ConnectionLost()))
        self.client.on_reconnected(LoggedIn("alice", "s2", NOW, "token2"))
        text = self.transport.value().decode()
        self.assertIn("* connection lost; reconnecting", text)
        self.assertIn("* reconnected as alice", text)

    def test_a_refused_client_certificate_is_said_plainly_and_not_retried(self):
        self.logged_in()
        self.transport.clear()
        self.client.on_disconnected(Failure(RefusedAtTLS("tlsv1 alert unknown ca")))
        text = self.transport.value().decode()
        self.assertIn("error: The server refused your client certificate (tlsv1 alert unknown ca): it must", text)
        self.assertNotIn("reconnecting", text)
        self.assertNoResult(self.status)


class OptionsTests(unittest.TestCase):
    def test_defaults_match_the_daemon_first_run(self):
        options = Options()
        options.parseOptions([])
        self.assertEqual((options["host"], options["port"], options["ca"]), ("localhost", 5599, "certs/ca.pem"))

    def test_bad_options(self):
        for argv in (["--port", "0"], ["--port", "many"], ["--keep-going"], ["--verbose"]):
            with self.assertRaises(Exception):
                Options().parseOptions(argv)

    def test_version_is_securechats_own(self):
        import io

        import securechatd

        out = io.StringIO()
        self.patch(sys, "stdout", out)
        with self.assertRaises(SystemExit) as exited:
            Options().parseOptions(["--version"])
        self.assertEqual(exited.exception.code, 0)
        self.assertEqual(out.getvalue(), f"securechat {securechatd.__version__}\n")

    def test_configured_password(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("from the file\nsecond line\n")
        self.assertEqual(configured_password(path, {"SECURECHAT_PASSWORD": "env"}), "from the file")
        self.assertEqual(configured_password(None, {"SECURECHAT_PASSWORD": "env"}), "env")
        self.assertIsNone(configured_password(None, {}))
        with self.assertRaises(LocalError) as raised:
            configured_password(path + ".missing", {})
        self.assertIn("Cannot read the password file", str(raised.exception))

    def test_config_file_then_command_line(self):
        home = self.mktemp()
        os.makedirs(os.path.join(home, "securechat"))
        with open(os.path.join(home, "securechat", "config.ini"), "w") as f:
            f.write(
                "[server]\nhost = chat.example.org\nport = 6000\nca = ~/ca.pem\n[account]\nuser = Alice\n"
                "[ui]\ncolor = no\nnotify = both\nhighlight = lunch, deploy\n"
            )
        options = Options(environ={"XDG_CONFIG_HOME": home, "HOME": "/home/a"})
        options.parseOptions([])
        self.assertEqual(
            [options[k] for k in ("host", "port", "user", "color", "plain", "notify", "highlight")],
            ["chat.example.org", 6000, "alice", False, False, "both", ("lunch", "deploy")],
        )
        self.assertTrue(options["ca"].endswith("/ca.pem") and "~" not in options["ca"])
        options = Options(environ={"XDG_CONFIG_HOME": home})
        options.parseOptions(["--host", "localhost", "--port", "5599", "--user", "bob", "--plain"])
        self.assertEqual([options[k] for k in ("host", "port", "user", "plain")], ["localhost", 5599, "bob", True])

    def test_a_client_certificate_from_the_config_file_or_the_command_line(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[account]\ncert = ~/certs/alice.pem\nkey = ~/certs/alice.key\n")
        options = Options(environ={})
        options.parseOptions(["--config", path])
        self.assertEqual([options[k].endswith(f"/certs/alice.{e}") for k, e in (("cert", "pem"), ("key", "key"))],
                         [True, True])
        self.assertNotIn("~", options["cert"])
        options = Options(environ={})
        options.parseOptions(["--config", path, "--cert", "bob.pem", "--key", "bob.key"])
        self.assertEqual((options["cert"], options["key"]), ("bob.pem", "bob.key"))
        for argv in (["--cert", "bob.pem"], ["--key", "bob.key"]):
            with self.assertRaises(UsageError) as raised:
                Options(environ={"XDG_CONFIG_HOME": self.mktemp()}).parseOptions(argv)
            self.assertIn("--cert and --key go together", str(raised.exception))

    def test_colour_is_off_with_no_color_or_the_flag(self):
        for environ, argv, color in (({}, [], True), ({"NO_COLOR": "1"}, [], False), ({"NO_COLOR": ""}, [], True),
                                     ({}, ["--no-color"], False)):
            options = Options(environ=dict(environ, XDG_CONFIG_HOME=self.mktemp()))
            options.parseOptions(argv)
            self.assertEqual(options["color"], color, (environ, argv))

    def test_bad_config_says_where(self):
        path = self.mktemp()
        for text, message in (
            ("[ui]\nnotify = loudly\n", "[ui] notify must be one of auto, bell, desktop, both, none, not 'loudly'"),
            ("[server]\nport = 0\n", "[server] port must be from 1 to 65535, not '0'"),
            ("[ui]\ncolour = no\n", "there is no setting [ui] colour"),
            ("no section\n", "cannot read"),
        ):
            with open(path, "w") as f:
                f.write(text)
            with self.assertRaises(UsageError) as raised:
                Options(environ={}).parseOptions(["--config", path])
            self.assertIn(message, str(raised.exception))
        with self.assertRaises(UsageError):
            Options(environ={}).parseOptions(["--config", path + ".missing"])

    def test_full_screen_unless_plain_or_dumb(self):
        self.assertTrue(full_screen({"plain": False}, {"TERM": "xterm"}))
        self.assertFalse(full_screen({"plain": True}, {"TERM": "xterm"}))
        self.assertFalse(full_screen({"plain": False}, {"TERM": "dumb"}))
        self.assertFalse(full_screen({"plain": False}, {}))
        self.assertEqual(config_path({"XDG_CONFIG_HOME": "/x"}), "/x/securechat/config.ini")

    def test_describe(self):
        self.assertEqual(describe(NoSuchUser("There is no user x.")), ("NO_SUCH_USER", "There is no user x."))
        self.assertEqual(describe(ConnectionLost()), ("DISCONNECTED", "Not connected to the server."))
        required = describe(RefusedAtTLS("tlsv13 alert certificate required"))
        self.assertEqual(required[0], "TLS_REFUSED")
        self.assertIn("The server requires a client certificate: give yours with --cert FILE --key FILE", required[1])
        self.assertEqual(describe(EncryptionUnavailable("Log in first.")), ("NO_DEVICE", "Log in first."))
