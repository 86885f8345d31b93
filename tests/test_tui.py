"""The full-screen securechat (client/tui.py) with urwid's own harness: keys pressed into the widget tree,
screens rendered as text and as runs of display attributes; no terminal, no event loop, a task.Clock.

The session is the real main.Chat over test_ui's FakeClient, so what is tested is what a person gets.
"""

from twisted.internet import task
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from twisted.trial import unittest
from urwid.testing import press, render_runs, render_text, resolve_runs

from securechatd.client import tui, ui
from securechatd.client.library import Conversation, HistoryPage, Invitation, Message, Receipt
from securechatd.client.main import Chat
from tests.test_ui import NOW, PASSWORD, ZONE, FakeClient

SIZE = (100, 20)
BOB = Conversation(3, "direct", ("alice", "bob"))
TEAM = Conversation(4, "group", ("alice", "bob", "carol"), "Team lunch")


class FakeReactor(task.Clock):
    """A clock that records the processes it is asked to start (notify-send)."""

    def __init__(self):
        super().__init__()
        self.spawned = []

    def spawnProcess(self, protocol, executable, args, env=None):
        self.spawned.append(args)


class TuiTestCase(unittest.TestCase):
    """alice logged in to a Chat whose console is a Tui, with `conversations` known to the server."""

    conversations = (BOB, TEAM)
    options = {}

    def setUp(self):
        self.clock = FakeReactor()
        self.clock.advance(NOW.timestamp())
        self.client = FakeClient()
        for c in self.conversations:
            self.client.conversations[c.conversation_id] = c
        self.bells = []
        self.tui = tui.Tui(
            self.clock, tz=ZONE, environ={}, which=lambda name: None, bell=lambda: self.bells.append(1), **self.options
        )
        self.chat = Chat(self.client, self.tui, self.clock, password=PASSWORD)
        self.tui.attach(self.chat)
        self.status = self.chat.run()
        self.login()

    def login(self):
        self.type("/login alice")

    def keys(self, *keys):
        self.assertEqual(press(self.tui.widget, SIZE, *keys), [])
        self.clock.advance(0)

    def type(self, text, enter=True):
        self.keys(*text)
        if enter:
            self.keys("enter")

    def screen(self, size=SIZE):
        return "\n".join(render_text(self.tui.widget, size, focus=True, strip=True))

    def input(self):
        return self.tui.edit.edit_text

    def deliver(self, message_id, seq, sender, body, conversation_id=3):
        self.client.on_deliver(Message(message_id, seq, sender, body, NOW, conversation_id))
        self.clock.advance(0)

    def sent(self):
        return [call[2] for call in self.client.calls if call[0] == "send_message"]


class EditingTests(TuiTestCase):
    def test_a_message_too_long_comes_back_to_the_input_with_its_error(self):
        self.type("/open bob")
        long = "é" * 9000  # 18,000 bytes of UTF-8
        self.tui.edit.set_edit_text(long)
        self.keys("enter")
        self.assertEqual(self.input(), long)
        self.assertTrue(self.chat.failed)  # (the error line is there, above the long input)
        self.tui.edit.set_edit_text("")
        self.assertIn("at most 16384 bytes", self.screen())

    def test_readline_keys(self):
        self.type("one two three", enter=False)
        self.keys("ctrl w")
        self.assertEqual(self.input(), "one two ")
        self.keys("ctrl a", "X", "meta f", "meta f", "Y")
        self.assertEqual(self.input(), "Xone twoY ")
        self.keys("ctrl left", "ctrl k")
        self.assertEqual(self.input(), "Xone ")
        self.keys("home", "delete", "end", "left", "Z", "right", "!")
        self.assertEqual(self.input(), "oneZ !")
        self.keys("ctrl u")
        self.assertEqual(self.input(), "")
        self.keys("ctrl y")  # what Ctrl-U took
        self.assertEqual(self.input(), "oneZ !")

    def test_input_history_is_per_window(self):
        self.type("/open bob")
        self.type("first")
        self.type("second")
        self.keys("meta 2")
        self.assertIn("2:Team lunch", self.screen())
        self.type("for the team")
        self.keys("ctrl p")
        self.assertIn("1:bob", self.screen())
        self.type("half typed", enter=False)
        self.keys("up")
        self.assertEqual(self.input(), "second")
        self.keys("up", "up", "up")
        self.assertEqual(self.input(), "first")  # ("/open bob" was typed in the status window)
        self.keys("down")
        self.assertEqual(self.input(), "second")
        self.keys("down")
        self.assertEqual(self.input(), "half typed")
        self.keys("ctrl n", "ctrl u", "up")
        self.assertEqual(self.input(), "for the team")

    def test_tab_completes_commands_people_and_conversations(self):
        self.type("/op", enter=False)
        self.keys("tab")
        self.assertEqual(self.input(), "/open ")
        self.type("Te", enter=False)
        self.keys("tab")
        self.assertEqual(self.input(), "/open Team lunch")
        self.keys("ctrl u")
        self.type("/dm c", enter=False)
        self.keys("tab")
        self.assertEqual(self.input(), "/dm carol ")
        self.keys("ctrl u")
        self.type("c", enter=False)
        self.keys("tab")
        self.assertEqual(self.input(), "carol: ")
        self.type("ask @b", enter=False)
        self.keys("tab")
        self.assertEqual(self.input(), "carol: ask @bob ")
        self.keys("ctrl u")
        self.type("/re", enter=False)
        self.keys("tab", "tab")  # several: Tab steps through them
        self.assertIn(self.input(), ("/receipts ", "/reply "))

    def test_tab_offers_message_numbers_for_reply(self):
        self.type("/open bob")
        self.deliver(301, 1, "bob", "lunch?")
        self.type("/reply #", enter=False)
        self.keys("tab")
        self.assertEqual(self.input(), "/reply #301 ")

    def test_a_paste_is_one_message(self):
        self.type("/open bob")
        self.keys("begin paste", *"line one", "enter", *"line two", "tab", "x", "end paste")
        self.assertEqual(self.input(), "line one\nline two    x")
        self.assertEqual(self.sent(), [])
        self.keys("meta enter", *"typed")
        self.keys("enter")
        self.assertEqual(self.sent(), ["line one\nline two    x\ntyped"])
        self.assertIn("<alice> line one\n", self.screen() + "\n")
        self.assertIn("      line two", self.screen())

    def test_ctrl_d_on_an_empty_line_quits(self):
        self.type("x", enter=False)
        self.keys("ctrl d")
        self.assertNoResult(self.status)
        self.keys("backspace", "ctrl d")
        self.assertEqual(self.successResultOf(self.status), 0)

    def test_a_password_is_not_shown(self):
        self.chat.password = None
        self.type("half", enter=False)
        self.keys("ctrl a")
        Deferred.fromCoroutine(self.chat.execute("/passwd"))
        self.assertTrue(self.screen().endswith("\nCurrent password:"))
        self.type("s3cret!")
        self.assertNotIn("s3cret", self.screen())
        self.assertTrue(self.screen().endswith("\nNew password:"))
        self.type("new password")
        self.type("new password")
        self.assertIn(("change_password", "s3cret!", "new password"), self.client.calls)
        self.assertEqual(self.input(), "half")
        self.assertNotIn("password", self.screen().split("\n")[-1])


class WindowTests(TuiTestCase):
    def test_a_window_per_conversation_with_a_list(self):
        self.deliver(301, 1, "bob", "lunch?")
        self.deliver(302, 1, "carol", "who is in?", conversation_id=4)
        screen = self.screen()
        self.assertIn(" 1 bob", screen)
        self.assertIn("07:00 <bob> lunch?  #301", screen)  # the first message made bob's window current
        self.assertNotIn("who is in?", screen)
        self.assertRegex(screen, r" 2 Team lunch +1│")
        self.keys("meta 2")
        screen = self.screen()
        self.assertIn("07:00 <carol> who is in?  #302", screen)
        self.assertNotIn("lunch?  #301", screen)
        self.assertEqual(self.chat.current, 4)  # a line typed now goes to the team
        self.keys("ctrl n")
        self.assertIn("0:status", self.screen())
        self.assertIsNone(self.chat.current)
        self.keys("ctrl n")
        self.assertEqual(self.chat.current, 3)
        self.type("/open Team lunch")
        self.assertEqual(self.chat.current, 4)

    def test_mentions_are_marked_in_the_list_and_the_text(self):
        self.type("/open bob")
        self.deliver(302, 1, "carol", "alice, are you in?", conversation_id=4)
        self.assertRegex(self.screen(), r" 2 Team lunch +@1│")
        self.assertIn("act: 2@", self.screen())
        self.keys("meta 2")
        self.assertRegex(self.screen(), r" 2 Team lunch +1│")  # seen: the marker goes, the unread count stays
        runs = render_runs(self.tui.widget, SIZE, focus=True)
        self.assertIn(("mention", "alice, are you in?"), [run for row in runs for run in row])

    def test_missed_messages_are_shown_when_a_window_opens(self):
        self.client.conversations[4] = Conversation(4, "group", TEAM.members, TEAM.title, last_seq=3, unread=2)
        self.type("/login alice")  # again, to learn the unread counts
        self.type("/open bob")
        self.deliver(303, 3, "bob", "third, arrived now", conversation_id=4)
        self.client.pages[4] = HistoryPage(
            (Message(301, 1, "carol", "first", NOW, 4), Message(302, 2, "bob", "second", NOW, 4),
             Message(303, 3, "bob", "third, arrived now", NOW, 4)),
            False,
        )
        self.keys("meta 2")
        screen = self.screen()
        self.assertEqual(screen.count("third, arrived now"), 1)
        self.assertLess(screen.index("first"), screen.index("second"))
        self.assertLess(screen.index("second"), screen.index("third"))

    def test_a_message_arriving_while_typing(self):
        self.type("/open bob")
        self.type("on my wa", enter=False)
        self.deliver(301, 1, "bob", "where are you?")
        self.assertIn("<bob> where are you?", self.screen())
        self.assertEqual(self.input(), "on my wa")
        self.assertTrue(self.screen().endswith("[bob]> on my wa"))

    def test_narrow_terminal_has_no_list(self):
        self.type("/open bob")
        self.deliver(302, 1, "carol", "hi", conversation_id=4)
        screen = self.screen((50, 10))
        self.assertNotIn("│", screen.replace(" │ ", ""))
        self.assertIn("act: 2", screen)

    def test_scrollback_and_search(self):
        self.type("/open bob")
        for n in range(1, 41):
            self.deliver(300 + n, n, "bob", f"message {n}")
        self.assertIn("message 40", self.screen())
        self.keys("page up")
        self.assertNotIn("message 40", self.screen())
        self.assertIn("scrolled back (PgDn)", self.screen())
        self.deliver(341, 41, "bob", "message 41")
        self.assertIn("1 new below (PgDn)", self.screen())
        self.keys("page down", "page down", "page down")
        self.assertIn("message 41", self.screen())
        self.assertNotIn("PgDn", self.screen())

        self.type("draft", enter=False)
        self.keys("ctrl r", *"message 1")
        screen = self.screen()
        self.assertIn("message 19", screen)  # the newest line that matches
        runs = [run for row in render_runs(self.tui.widget, SIZE, focus=True) for run in row]
        self.assertTrue(any(attr == "found" and "message 19" in text for attr, text in runs))
        self.keys("ctrl r")
        found = [text for attr, text in (r for row in render_runs(self.tui.widget, SIZE, focus=True) for r in row)]
        self.assertTrue(any("message 18" in text for text in found))
        self.keys("enter")
        self.assertEqual(self.input(), "draft")
        self.assertIn("message 18", self.screen())
        self.keys("ctrl r", "esc")
        self.assertIn("message 41", self.screen())


class RenderingTests(TuiTestCase):
    def test_receipts_mark_our_messages_in_place(self):
        self.type("/open bob")
        self.type("lunch?")
        self.assertIn("<alice> lunch?  #100", self.screen())
        self.client.on_receipt(Receipt(3, "bob", "delivered", 1, NOW))
        self.assertIn("<alice> lunch?  #100  ✓\n", self.screen() + "\n")
        self.client.on_receipt(Receipt(3, "bob", "read", 1, NOW))
        self.assertIn("<alice> lunch?  #100  ✓✓", self.screen())
        self.assertNotIn("read by", self.screen())

    def test_group_receipts_count_readers(self):
        self.type("/open Team lunch")
        self.type("pizza?")
        self.client.on_receipt(Receipt(4, "bob", "read", 1, NOW))
        self.assertIn("pizza?  #100  ✓✓ 1/2", self.screen())
        self.client.on_receipt(Receipt(4, "carol", "read", 1, NOW))
        self.assertIn("pizza?  #100  ✓✓", self.screen())

    def test_actions_replies_and_remote_control_characters(self):
        self.type("/open bob")
        self.deliver(301, 1, "bob", "/me waves \x1b[2J\x07")
        self.type("/me waves back")
        self.type("/reply #301 hello")
        screen = self.screen()
        self.assertIn("07:00 * bob waves �[2J�  #301", screen)
        self.assertIn("07:00 * alice waves back  #100", screen)
        self.assertIn("07:00 <alice> > bob: waves �[2J�\n", screen)
        self.assertIn("│      hello  #101\n", screen)
        self.assertNotIn("\x1b", screen)
        self.assertEqual(self.sent()[-1], "> bob: waves \x1b[2J\x07\nhello")  # (the server refuses that ESC)

    def test_pending_lines_become_sent_ones(self):
        self.type("/open bob")
        self.client.on_disconnected(Failure(ConnectionLost()))
        self.client.hold = "send_message"
        self.type("still there?")
        self.assertIn("still there?  (pending: sent once reconnected)", self.screen())
        self.assertIn("reconnecting…", self.screen())
        self.client.hold = None
        held, result = self.client.held.pop()
        held.callback(result)
        self.assertNotIn("pending", self.screen())
        self.assertEqual(self.screen().count("still there?"), 1)

    def test_colours(self):
        self.type("/open bob")
        self.deliver(301, 1, "bob", "hi")
        self.type("hello")
        self.client.on_receipt(Receipt(3, "bob", "read", 2, NOW))
        self.type("/frobnicate")
        runs = [run for row in render_runs(self.tui.widget, SIZE, focus=True) for run in row]
        attrs = {text.strip(): attr for attr, text in runs}
        self.assertEqual(attrs["<alice>"], "own")
        self.assertEqual(attrs["<bob>"], tui.nick("bob"))
        self.assertEqual(attrs["✓✓"], "receipt")
        self.assertEqual(attrs["error: There is no command /frobnicate; /help lists them."], "error")
        self.assertEqual(attrs["07:00"], "time")
        coloured = resolve_runs([runs], tui.PALETTE, colors=16)[0]
        own = {str(spec.foreground) for spec, text in coloured if text.strip() == "<alice>"}
        self.assertEqual(own, {"light cyan,bold"})
        bar = {spec.background for spec, text in coloured if text.strip().startswith("alice │")}
        self.assertEqual(bar, {"dark blue"})
        # Without colour (NO_COLOR, --no-color) the same screen uses only bold, underline and standout.
        for spec, text in resolve_runs([runs], tui.PALETTE, colors=1)[0]:
            self.assertEqual((spec.foreground_basic, spec.background_basic), (0, 0), text)  # the default colours
            self.assertEqual(spec.colors, 1)


class NotificationTests(TuiTestCase):
    def test_a_direct_message_or_a_mention_elsewhere_rings(self):
        self.type("/open Team lunch")
        self.deliver(301, 1, "bob", "psst")  # direct, in another window
        self.assertEqual(len(self.bells), 1)
        self.deliver(302, 1, "carol", "pizza", conversation_id=4)  # here, no mention
        self.deliver(303, 2, "carol", "bob, pizza?", conversation_id=4)  # not my name
        self.assertEqual(len(self.bells), 1)
        self.keys("meta 1")
        self.deliver(304, 3, "carol", "@alice pizza?", conversation_id=4)  # my name, elsewhere
        self.assertEqual(len(self.bells), 2)
        self.deliver(305, 2, "bob", "here")  # direct, but on screen
        self.assertEqual(len(self.bells), 2)
        self.keys("focus out")  # the terminal is in the background
        self.deliver(306, 3, "bob", "hello?")
        self.assertEqual(len(self.bells), 3)
        self.assertEqual(self.clock.spawned, [])

    def test_notify_send_where_there_is_one(self):
        self.tui.which = lambda name: "/usr/bin/notify-send"
        self.tui.environ = {"DISPLAY": ":0"}
        self.type("/open Team lunch")
        self.deliver(301, 1, "bob", "-u critical\x1b[2J lunch?")
        [argv] = self.clock.spawned
        self.assertEqual(
            argv, ["/usr/bin/notify-send", "--app-name=securechat", "--", "bob in bob", "-u critical�[2J lunch?"]
        )
        self.assertEqual(self.bells, [])

    def test_none_is_quiet(self):
        self.tui.notify = "none"
        self.deliver(301, 1, "bob", "psst")
        self.assertEqual((self.bells, self.clock.spawned), ([], []))


class HighlightTests(TuiTestCase):
    options = {"highlight": ("pizza",)}

    def test_configured_words_count_as_mentions(self):
        self.type("/open bob")
        self.deliver(301, 1, "carol", "Pizza at noon", conversation_id=4)
        self.assertEqual(len(self.bells), 1)
        self.assertIn("@1", self.screen())


class AccountSecurityTests(TuiTestCase):
    def test_the_enrolment_shows_its_qr_code_whole(self):
        uri = "otpauth://totp/securechatd:alice?secret=JBSWY3DPEHPK3PXP&issuer=securechatd"
        self.client.begin_two_factor = lambda: succeed(("JBSWY3DPEHPK3PXP", uri))
        self.type("/2fa enrol")
        screen = self.screen((100, 60)).split("\n")
        code = ui.qr_code(uri)
        at = [i for i, line in enumerate(screen) if code[0] in line][0]
        self.assertEqual([line.split("│")[-1].strip() for line in screen[at : at + len(code)]],
                         [line.strip() for line in code])  # (each row on a line of its own, none wrapped)

    def test_an_invitation_and_an_accepted_one(self):
        self.client.on_invited(Invitation(12, "group", "bob", "Plans", encrypted=True))
        self.clock.advance(0)
        invited = "bob invites you to [Plans] (end-to-end encrypted): /accept 12 or /decline 12"
        self.assertIn(invited, self.screen((140, 20)))
        self.keys("meta 2")  # the Team lunch window
        self.client.on_invitation_accepted(4, "dave", True)
        self.clock.advance(0)
        accepted = "[Team lunch] dave accepted the invitation; you added them with a signed state"
        self.assertIn(accepted, self.screen((140, 20)))  # (in the group's window)
