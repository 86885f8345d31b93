"""No text a server (or another person) sends reaches a screen as a control sequence (security review, issue 13).

A malicious server could rewrite the user's screen with escape sequences in
any field it fills: an account log row's address or kind, a session's
address or id, an invitation's title, an alarm's detail, a presence note...
(even hide a "does NOT check" line). Each record kind with such fields goes
through the renderers (ui.render, the line-by-line Terminal, the full-screen
Tui) with ESC/CSI/OSC sequences and C1 controls in every field; --batch
keeps them, JSON-escaped, on one valid line. The library refuses a session
id that is not 32 hex digits (through the malicious-server double).
"""

import json
import unicodedata

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from securechatd import commands
from securechatd.client import ui
from securechatd.client.library import Conversation, MalformedAnswer
from tests.malicious import MaliciousServer
from tests.test_client import PASSWORD
from tests.test_client_twofactor import DaemonClientCase
from tests.test_tui import TuiTestCase
from tests.test_ui import NOW, ZONE

# clear the screen, move up and erase a line, set the title (OSC ... BEL), a C1 CSI, a C1 OSC ... ST, DEL
EVIL = "\x1b[2J\x1b[1A\x1b[2K\x1b]0;pwned\x07\x9b31m\x9d8;;http://evil\x9c\x7f"
SESSION_ID = "0123456789abcdef" * 2


def records(x):
    """One record of every kind that shows what a server sent, `x` in each text field it fills."""
    message = {"conversation_id": 3, "conversation": "bob" + x, "sender": "bob" + x, "body": "hi" + x,
               "sent_at": NOW, "message_id": 7, "seq": 1}
    invitation = {"conversation_id": 4, "kind": "group", "inviter": "carol" + x, "title": "Team" + x,
                  "invited_at": NOW, "accepted": False, "encrypted": True}
    session = {"session_id": x + SESSION_ID, "device_id": "ab" * 16 + x, "client_name": "phone" + x,
               "address": "10.0.0.2" + x, "since": NOW, "last_active": NOW, "online": True, "this_session": False}
    answer = {"event": "answer"}
    return [
        {**answer, "command": "security", "username": "alice", "verified": False, "problem": "a break" + x,
         "tree_size": 2, "file": None,
         "events": [{"seq": 1, "time": "2026-11-22 10:00:00 UTC" + x, "kind": "login" + x, "address": "10.0.0.9" + x,
                     "device": "cd" * 16 + x, "target": "password" + x, "signed": "no"}]},
        {**answer, "command": "sessions", "sessions": [session]},
        {**answer, "command": "endsession", "session_id": x + SESSION_ID},
        {**answer, "command": "invitations", "invitations": [invitation], "conversation_id": 4,
         "conversation": "Team" + x,
         "group": [{"username": "dave" + x, "inviter": "carol" + x, "invited_at": NOW, "accepted": False}]},
        {"event": "invited", **invitation, "at": NOW},
        {"event": "invitation_accepted", "conversation_id": 4, "conversation": "Team" + x, "username": "dave" + x,
         "added": True, "at": NOW},
        {"event": "alarm", "kind": "fork" + x, "user": "bob" + x, "detail": "forked" + x, "at": NOW},
        {"event": "logged_out", "message": "ended" + x, "at": NOW},
        {"event": "reconnected", "username": "alice" + x, "at": NOW},
        {"event": "presence", "username": "bob" + x, "status": "away" + x, "note": "back soon" + x, "at": NOW},
        {**answer, "command": "who", "presence": [{"username": "bob" + x, "status": "offline", "note": x,
                                                  "last_seen": NOW}]},
        {**answer, "command": "users", "users": [{"username": "bob" + x, "status": "online" + x}]},
        {**answer, "command": "login", "username": "alice" + x, "conversations": 1, "unread": 0},
        {"event": "deliver", **message},
        {"event": "deliver", **message, "problem": "bad_mac", "problem_detail": "no" + x},
        {"event": "receipt", "conversation_id": 3, "conversation": "bob" + x, "username": "bob" + x,
         "state": "read", "seq": 1, "at": NOW, "message_ids": [7]},
        {**answer, "command": "receipts", "message_id": 7, "conversation_id": 3, "conversation": "bob" + x,
         "receipts": [{"username": "bob" + x, "delivered_at": NOW, "read_at": None}]},
        {"event": "conversation", "conversation_id": 4, "conversation": "Team" + x, "kind": "group",
         "title": "Team" + x, "members": ["alice", "bob" + x], "change": "members", "joined": ["bob" + x],
         "left": ["eve" + x], "at": NOW},
        {"event": "conversation", "conversation_id": 5, "conversation": "eve" + x, "kind": "direct", "title": None,
         "members": ["alice", "eve" + x], "change": "new", "joined": [], "left": [], "at": NOW},
        {**answer, "command": "group", "conversation_id": 4, "conversation": "Team" + x,
         "members": ["alice", "bob" + x], "invited": ["carol" + x]},
        {"event": "transcript_signed", "conversation_id": 3, "conversation": "bob" + x, "username": "bob" + x,
         "n": 2, "seq": 1, "verified": True, "at": NOW},
        {"event": "mode", "conversation_id": 3, "conversation": "bob" + x, "by": "bob" + x, "mode": "deniable",
         "at": NOW},
        {**answer, "command": "2fa", "action": "enrol", "secret": "JBSWY3DP" + x,
         "uri": "otpauth://totp/securechatd:alice?secret=JBSWY3DP" + x},
        {**answer, "command": "2fa", "action": "confirm", "recovery_codes": ["k7qm-2xfa-ve4n" + x]},
        {**answer, "command": "devices", "devices": [{"device_id": "ef" * 16 + x, "name": "laptop" + x,
                                                     "this_device": False}]},
        {"event": "devices", "user": "bob" + x, "added": ["ab" * 16 + x], "removed": [], "verified": False, "at": NOW},
        {"event": "error", "command": "sessions", "code": "X", "message": "refused" + x},
    ]


def controls(text):
    """The control characters in `text` but the line breaks a renderer makes."""
    return [c for c in text if unicodedata.category(c) == "Cc" and c != "\n"]


class RenderTests(unittest.TestCase):
    def test_no_control_character_of_any_field_is_rendered(self):
        for record in records(EVIL):
            lines = ui.render(record, NOW, ZONE)
            self.assertEqual(controls("".join(lines)), [], record)
            self.assertIn("�", "".join(lines), record)  # (what was there is shown replaced, not dropped)

    def test_the_same_records_without_controls_read_as_before(self):
        for record in records(""):
            self.assertNotIn("�", "".join(ui.render(record, NOW, ZONE)), record)

    def test_an_address_cannot_hide_that_the_account_log_does_not_check(self):
        [security] = [r for r in records("\x1b[1A\x1b[2K\r") if r.get("command") == "security"]
        lines = ui.render(security, NOW, ZONE)
        self.assertTrue(lines[0].startswith("!! account log of alice does NOT check: a break"))
        self.assertEqual(len(lines), 3)  # (the heading, the event, how far it was verified: no line of the server's)
        self.assertIn("from 10.0.0.9�[1A�[2K� device", lines[1])

    def test_a_field_cannot_start_a_line_of_its_own_nor_reorder_one(self):
        """A newline (or a line separator) in a name or an address would draw a fake row; a bidirectional
        override would show "verified" for what reads otherwise: both are replaced. A message keeps its lines."""
        fake = "\n!! account log of alice: verified\u2028x\u202eok\u2066"
        for record in records(fake):
            lines = ui.render(record, NOW, ZONE)
            shown = "\n".join(lines)
            for unsafe in ("\u2028", "\u202e", "\u2066"):
                self.assertNotIn(unsafe, shown, record)
            self.assertFalse(any(line.startswith("!! account log of alice: verified") for line in lines), record)
        message = next(r for r in records("") if r.get("event") == "deliver")
        self.assertIn("      second line", "\n".join(ui.render(dict(message, body="first\nsecond line"), NOW, ZONE)))

    def test_the_prompt_shows_a_title_as_text(self):
        self.assertEqual(controls(ui.prompt("Team" + EVIL, 1)), [])

    def test_batch_json_keeps_each_record_on_one_valid_line(self):
        for record in records(EVIL + "\n\r\u2028\u2029"):
            line = ui.to_json(record)
            self.assertEqual(line.splitlines(), [line])
            self.assertEqual(controls(line), [])
            self.assertTrue(line.isascii())
            as_sent = json.loads(json.dumps(record, default=lambda value: value.isoformat()))
            self.assertEqual(json.loads(line), as_sent)  # (a script gets what was sent, escaped)


class TerminalTests(unittest.TestCase):
    """The line-by-line client writes its own escapes (to redraw the input line), and no one else's."""

    def test_no_sequence_of_a_field_reaches_the_terminal(self):
        terminal = ui.Terminal(width=lambda: 200, tz=ZONE)
        transport = StringTransport()
        terminal.makeConnection(transport)
        terminal.set_prompt("[-]> ")
        for record in records(EVIL):
            transport.clear()
            terminal.show_record(record, NOW)
            written = transport.value().decode()
            self.assertEqual(controls(written.replace("\r\x1b[J", "")), [], record)


class TuiTests(TuiTestCase):
    """The full-screen client: what each window holds, and the screen, carry no control character."""

    def shown(self):
        return [line.plain for window in self.tui.windows.values() for line in window.walker]

    def test_no_control_character_reaches_a_window(self):
        for record in records(EVIL):
            self.tui.show_record(record, NOW)
        self.assertEqual(controls("".join(self.shown())), [])
        self.assertIn("10.0.0.2�", "".join(self.shown()))
        self.assertEqual(controls(self.screen()), [])

    def test_names_drawn_from_elsewhere(self):
        """The user's own name (as the server's Login answer gave it), a conversation's, a member's (Tab)."""
        self.client.username = "alice" + EVIL
        self.client.conversations[6] = Conversation(6, "direct", ("alice" + EVIL, "mallory" + EVIL))
        self.type("/open #6")
        self.type("/dm mal", enter=False)
        self.keys("tab")
        self.assertTrue(self.input().startswith("/dm mallory�"))
        self.assertEqual(controls(self.screen()), [])
        self.assertEqual(controls(self.tui.edit.caption + self.input()), [])


class SessionIdTests(DaemonClientCase):
    """ChatClient.list_sessions through the malicious-server double."""

    @inlineCallbacks
    def setUp(self):
        super().setUp()
        self.proxy = MaliciousServer(reactor, self.port, self.ca)
        yield self.proxy.start()
        self.addCleanup(self.proxy.stop)
        self.port = self.proxy.port
        self.client = self.make_client()
        yield self.client.connect()
        yield self.client.register("alice", PASSWORD)
        yield self.client.login("alice", PASSWORD)

    def rewrite(self, session_id):
        def rewritten(tap, request, answer):
            return dict(answer, sessions=[dict(s, session_id=session_id, address=EVIL) for s in answer["sessions"]])

        self.proxy.rewrite(commands.ListSessions, rewritten)

    @inlineCallbacks
    def test_a_session_id_not_32_hex_digits_is_refused(self):
        for wrong in (SESSION_ID[:31] + EVIL, SESSION_ID.upper(), SESSION_ID + "0", "", SESSION_ID[:31] + "\n"):
            self.proxy.honest()
            self.rewrite(wrong)
            with self.assertRaises(MalformedAnswer):
                yield self.client.list_sessions()

    @inlineCallbacks
    def test_a_right_id_passes_and_its_address_is_left_to_the_renderer(self):
        self.rewrite(SESSION_ID)
        [session] = yield self.client.list_sessions()
        self.assertEqual((session["session_id"], session["address"]), (SESSION_ID, EVIL))
        [line] = ui.render({"event": "answer", "command": "sessions", "sessions": [session]}, NOW, ZONE)
        self.assertEqual(controls(line), [])
