"""The full-screen `securechat`: a window per conversation, drawn by urwid on Twisted's reactor.

main.Chat stays the one place that runs commands and turns answers and pushes
into records; Tui is the console it talks to (next_line, read_secret,
show_record, set_prompt, close), as ui.Console and ui.Terminal are. Tui sorts
each record into its conversation's window and draws it; every text of a
record (ui.cleaned), and every name it draws from elsewhere, goes through
ui.clean, so no control character a server or a remote person sent reaches
the terminal.

The widgets are plain urwid objects: tests press keys into `Tui.widget` and
render it with urwid.testing, with no terminal and no event loop. Only
`start()` makes a MainLoop on a real terminal.
"""

import os
import shutil
import termios
import zlib

import urwid
from urwid.command_map import Command
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

from securechatd.client import ui

log = Logger()

SIDEBAR = 22  # columns of the conversation list
NARROW = 60  # on a terminal narrower than this the list is left out; the status line names busy windows
SCROLLBACK = 5000  # lines kept per window (the oldest tenth goes when there are more)
INPUT_HISTORY = 500  # lines kept per window for Up/Down
NOTE_LENGTH = 200  # characters of a message shown in a desktop notification

NICKS = ("nick1", "nick2", "nick3", "nick4", "nick5", "nick6")  # other people's names, one colour each

# (name, colours with 16 colours, background, without colour (NO_COLOR, --no-color): only bold, underline, standout)
PALETTE = [
    ("time", "dark gray", "default", ""),
    ("id", "dark gray", "default", ""),
    ("own", "light cyan,bold", "default", "bold"),
    ("nick1", "light green", "default", ""),
    ("nick2", "yellow", "default", ""),
    ("nick3", "light magenta", "default", ""),
    ("nick4", "light blue", "default", ""),
    ("nick5", "brown", "default", ""),
    ("nick6", "dark cyan", "default", ""),
    ("system", "dark gray", "default", ""),
    ("answer", "default", "default", ""),
    ("error", "light red,bold", "default", "bold"),
    ("receipt", "dark green", "default", ""),
    ("pending", "yellow", "default", ""),
    ("quote", "dark gray", "default", ""),
    ("mention", "yellow,bold", "default", "bold,underline"),
    ("found", "black", "yellow", "standout"),
    ("bar", "white", "dark blue", "standout"),
    ("bar alert", "yellow,bold", "dark blue", "standout,bold"),
    ("caption", "light cyan", "default", "bold"),
    ("list", "default", "default", ""),
    ("list current", "black", "light gray", "standout"),
    ("list unread", "white,bold", "default", "bold"),
    ("list mention", "light red,bold", "default", "bold,underline"),
    ("divider", "dark gray", "default", ""),
]

KEYS_HELP = [
    "Keys: Enter sends; Alt-Enter or Ctrl-J starts a new line (a paste is one message);",
    "  Alt-1..9 a window (Alt-0 the status window), Ctrl-N/Ctrl-P the next/previous one;",
    "  Up/Down this window's earlier lines; Tab completes commands, people and conversations;",
    "  PageUp/PageDown scroll, Ctrl-R searches back (again: further), Enter keeps the place, Esc goes back;",
    "  Ctrl-A/E, Alt-B/F, Ctrl-Left/Right, Ctrl-W/U/K, Ctrl-Y, Ctrl-_ (undo); Ctrl-D on an empty line quits.",
]


def nick(name):
    """The colour of a person's name: the same in every run."""
    return NICKS[zlib.crc32(name.encode("utf-8")) % len(NICKS)]


def _plain(markup):
    """The text of urwid markup."""
    if isinstance(markup, str):
        return markup
    if isinstance(markup, tuple):
        return _plain(markup[1])
    return "".join(_plain(part) for part in markup)


class Line(urwid.WidgetWrap):
    """One entry of a window's scrollback: a message (with its id, seq and receipts) or a system line."""

    def __init__(self, markup, message_id=None, seq=None):
        self.text = urwid.Text(markup)
        self.map = urwid.AttrMap(self.text, None)
        super().__init__(self.map)
        self.message_id = message_id
        self.seq = seq
        self.plain = _plain(markup)
        self.record = None  # for our own messages: what to draw again when a receipt comes
        self.delivered, self.read = set(), set()

    def set_markup(self, markup):
        self.text.set_text(markup)
        self.plain = _plain(markup)

    def highlight(self, on):
        self.map.set_attr_map({None: "found" if on else None})


class Window:
    """What one conversation (or, with id None, the status window) shows: scrollback, input history, marks."""

    def __init__(self, conversation_id):
        self.conversation_id = conversation_id
        self.walker = urwid.SimpleFocusListWalker([])
        self.listbox = urwid.ListBox(self.walker)
        self.follow = True  # the newest line stays in view; off once scrolled up
        self.unseen = 0  # lines added since it was scrolled up
        self.mentioned = False  # someone named you here since you last looked
        self.history = []  # lines sent from here, oldest first
        self.browsing = None  # (index into history, the text being typed before browsing)
        self.messages = {}  # message id -> Line

    def add(self, line, before=None):
        if line.message_id is not None:
            self.messages[line.message_id] = line
        if before is None:
            self.walker.append(line)
        else:
            self.walker.insert(before, line)
        if len(self.walker) > SCROLLBACK:
            cut = SCROLLBACK // 10
            for old in self.walker[:cut]:
                self.messages.pop(old.message_id, None)
            del self.walker[:cut]
        if self.follow:
            self.bottom()
        else:
            self.unseen += 1

    def place(self, seq):
        """Where a message numbered `seq` goes among the ones shown: before the first later one."""
        for index, line in enumerate(self.walker):
            if line.seq is not None and line.seq > seq:
                return index
        return None

    def bottom(self):
        if len(self.walker):
            self.listbox.set_focus(len(self.walker) - 1)
            self.listbox.set_focus_valign("bottom")
        self.follow, self.unseen = True, 0

    def remember(self, text):
        if text.strip() and (not self.history or self.history[-1] != text):
            self.history.append(text)
            del self.history[:-INPUT_HISTORY]
        self.browsing = None


class _Quiet(ProcessProtocol):
    """notify-send's output is of no interest."""


class _Screen(urwid.display.raw.Screen):
    """urwid's terminal, where Ctrl-J (a line feed, once the tty stops turning Enter into one) reads as Alt-Enter."""

    def _get_input_codes(self):
        codes = []
        for code in super()._get_input_codes():
            codes += [27, 13] if code == 10 else [code]
        return codes


class ChatWidget(urwid.WidgetWrap):
    """The whole screen: the conversation list, the current window, a status line and the input line."""

    def __init__(self, tui, wide, narrow):
        self.tui = tui
        self.wide, self.narrow = wide, narrow
        super().__init__(wide)

    def selectable(self):
        return True

    def render(self, size, focus=False):
        layout = self.wide if size[0] >= NARROW else self.narrow
        if self._w is not layout:
            self._w = layout
        return super().render(size, focus)

    def keypress(self, size, key):
        try:
            return self.tui.keypress(size, key)
        except Exception:
            log.failure("key {key}", key=key)
            return None


class Tui(ui.Typed):
    """The full-screen console: windows per conversation, fed records by main.Chat.

    `reactor` runs notify-send and the screen; `tz` is the time zone shown (None:
    this machine's); `notify` is auto, bell, desktop, both or none; `highlight`
    are words that count as a mention besides your name. `which` and `bell` are
    for tests.
    """

    interactive = True

    def __init__(
        self, reactor, *, color=True, notify="auto", highlight=(), tz=None, environ=None, which=shutil.which, bell=None
    ):
        super().__init__()
        self.reactor = reactor
        self.color = color
        self.notify = notify
        self.highlight = tuple(highlight)
        self.tz = tz
        self.environ = os.environ if environ is None else environ
        self.which = which
        self.bell = bell or self._ring
        self.output_lost = Deferred()  # (a terminal is not a pipe that its reader closes)
        self.chat = None
        self.windows = {None: Window(None)}
        self.shown = None  # the id of the window on screen
        self.users = set()  # names for Tab
        self.focused = True  # whether the terminal has the focus, when it reports it
        self.offline = False
        self.loop = None
        self._secret = None  # (Deferred, the input put aside) while a password is typed
        self._search = None  # (the input put aside, the Line found) while searching
        self._paste = False
        self._now = None  # the moment of the last record, for stamps in search and help
        self._drawing = None  # the pending draw

        self.edit = urwid.Edit(
            ("caption", "> "), multiline=True, text_completer=self.complete, undo_limit=100, kill_buffer=[]
        )
        keys = urwid.CommandMap()
        keys.bind_readline()
        keys["ctrl left"], keys["ctrl right"] = Command.WORD_LEFT, Command.WORD_RIGHT
        keys["meta left"], keys["meta right"] = Command.WORD_LEFT, Command.WORD_RIGHT
        self.edit._command_map = keys
        self.status = urwid.Text("", wrap="ellipsis")
        self.sidebar = urwid.Text("")
        self.body = urwid.WidgetPlaceholder(self.windows[None].listbox)
        self.footer = urwid.Pile([urwid.AttrMap(self.status, "bar"), self.edit])
        listing = urwid.AttrMap(urwid.Filler(self.sidebar, valign="top"), "list")
        divider = urwid.AttrMap(urwid.SolidFill("│"), "divider")
        wide = urwid.Frame(
            urwid.Columns([(SIDEBAR, listing), (1, divider), self.body]), footer=self.footer, focus_part="footer"
        )
        narrow = urwid.Frame(self.body, footer=self.footer, focus_part="footer")
        self.widget = ChatWidget(self, wide, narrow)
        self.system("securechat: /register NAME or /login NAME to start; /help lists commands and keys.")
        self.refresh()

    # -- the terminal ---------------------------------------------------------------------

    def start(self):
        """Take over the terminal on standard input and output."""
        self.screen = _Screen(bracketed_paste_mode=True)
        if not self.color:
            self.screen.set_terminal_properties(colors=1)
        self.loop = urwid.MainLoop(
            self.widget,
            PALETTE,
            screen=self.screen,
            event_loop=urwid.TwistedEventLoop(self.reactor, manage_reactor=False),
            handle_mouse=False,
        )
        self.loop.start()
        if os.isatty(0):  # Enter reads as CR and Ctrl-J as LF, not both as LF
            mode = termios.tcgetattr(0)
            mode[0] &= ~termios.ICRNL
            termios.tcsetattr(0, termios.TCSANOW, mode)

    def stop(self):
        if self._drawing is not None and self._drawing.active():
            self._drawing.cancel()
        if self.loop is not None:
            loop, self.loop = self.loop, None
            loop.stop()

    def _ring(self):
        if self.loop is not None:
            self.screen.write("\a")
            self.screen.flush()

    def _draw(self):
        """Draw the screen on the next turn of the reactor, once however many changes come before it.

        (urwid draws after keys and its own alarms; records come from the network.)
        """
        if self.loop is not None and self._drawing is None:
            self._drawing = self.reactor.callLater(0, self._draw_now)

    def _draw_now(self):
        self._drawing = None
        if self.loop is not None:
            self.loop.draw_screen()

    # -- what main.Chat calls --------------------------------------------------------------

    def attach(self, chat):
        self.chat = chat
        self.refresh()

    def give_back(self, text):
        """Put a message that could not be sent (too long) back in the input line, unless it holds something new."""
        if not self.edit.edit_text:
            self.edit.set_edit_text(text)
            self.edit.set_edit_pos(len(text))

    def read_secret(self, prompt):
        """Deferred: a line typed without echo; the input being typed comes back after it."""
        self._secret = (Deferred(), self.edit.edit_text)
        self.edit.set_caption(("caption", prompt))
        self.edit.set_mask("")
        self.edit.set_edit_text("")
        self._draw()
        return self._secret[0]

    def set_prompt(self, prompt):
        self.refresh()

    def show(self, text):
        self.system(text, window=self.shown)
        self.refresh()

    def problem(self, text):
        self.system(text, "error", window=None)
        self.refresh()

    def close(self):
        self.stop()
        return succeed(None)

    # -- the state of the session -----------------------------------------------------------------

    def _me(self):
        return self.chat.client.username if self.chat is not None else None

    def _conversations(self):
        return self.chat.conversations if self.chat is not None else {}

    def _name(self, conversation_id):
        if conversation_id is None:
            return "status"
        return self.chat.name(conversation_id) if self.chat is not None else f"#{conversation_id}"

    def order(self):
        """The windows in list order: the status window, then conversations by id."""
        return [None] + sorted(self._conversations())

    def window(self, conversation_id):
        if conversation_id not in self.windows:
            self.windows[conversation_id] = Window(conversation_id)
        return self.windows[conversation_id]

    def refresh(self):
        """Bring the screen in line with the session: the current window, the list, the status line."""
        current = self.chat.current if self.chat is not None else None
        for gone in [i for i in self.windows if i is not None and i not in self._conversations()]:
            del self.windows[gone]
        window = self.window(current)
        if current != self.shown or self.body.original_widget is not window.listbox:
            self.shown = current
            self.body.original_widget = window.listbox
        window.mentioned = False
        if self._secret is None and self._search is None:
            self.edit.set_caption(("caption", f"[{ui.clean(self._name(current))}]> "))
        self.sidebar.set_text(self._listing())
        self.status.set_text(self._status_line(window))
        self._draw()

    def _listing(self):
        conversations = self._conversations()
        rows = []
        for number, conversation_id in enumerate(self.order()):
            name = ui.clean(self._name(conversation_id))
            unread = conversations[conversation_id].unread if conversation_id in conversations else 0
            mention = self.windows.get(conversation_id) is not None and self.windows[conversation_id].mentioned
            marks = ("@" if mention else "") + (str(unread) if unread else "")
            width = SIDEBAR - 4 - len(marks)
            if len(name) > width:
                name = name[: max(width - 1, 0)] + "…"
            text = f"{number:>2} {name:<{width}} {marks}"[:SIDEBAR].ljust(SIDEBAR)
            if conversation_id == self.shown:
                attr = "list current"
            elif mention:
                attr = "list mention"
            elif unread:
                attr = "list unread"
            else:
                attr = "list"
            rows.append((attr, text + "\n"))
        return rows or ""

    def _status_line(self, window):
        me = self._me()
        order = self.order()
        number = order.index(self.shown) if self.shown in order else "-"
        parts = [("bar", f" {ui.clean(me or 'not logged in')} │ {number}:{ui.clean(self._name(self.shown))}")]
        conversations = self._conversations()
        mode = self._mode(self.shown)
        if mode is not None:
            parts.append(("bar" if mode == "attestable" else "bar alert", f" [{mode}]"))
        if self.shown in conversations and conversations[self.shown].unread:
            parts.append(("bar", f" ({conversations[self.shown].unread} unread)"))
        busy = []
        for number, conversation_id in enumerate(self.order()):
            if conversation_id == self.shown:
                continue
            mention = conversation_id in self.windows and self.windows[conversation_id].mentioned
            if mention or (conversation_id in conversations and conversations[conversation_id].unread):
                busy.append(f"{number}{'@' if mention else ''}")
        if busy:
            parts.append(("bar alert", f" │ act: {','.join(busy)}"))
        if self.offline:
            parts.append(("bar alert", " │ reconnecting…"))
        if not window.follow:
            more = f"{window.unseen} new below" if window.unseen else "scrolled back"
            parts.append(("bar alert", f" │ {more} (PgDn)"))
        if self._search is not None:
            parts.append(("bar alert", " │ search: Ctrl-R older, Enter stay, Esc back"))
        return parts

    def _mode(self, conversation_id):
        """The mode of an encrypted conversation as its chain was last verified (None: plaintext, or unknown)."""
        conversation = self._conversations().get(conversation_id)
        if self.chat is None or conversation is None or not conversation.encrypted:
            return None
        return self.chat.client.known_mode(conversation_id)

    # -- records --------------------------------------------------------------------------------------

    def show_record(self, record, now):
        record = ui.cleaned(record)
        self._now = now
        self.refresh()  # (Chat may have changed the current conversation just before)
        event = record["event"]
        at = lambda moment: ui.stamp(moment, now, self.tz)  # noqa: E731
        if event == "answer":
            getattr(self, "_answer_" + record["command"], self._answer)(record, at)
        else:
            getattr(self, "_on_" + event, self._answer)(record, at)
        self.refresh()

    def system(self, text, attr="system", window=None):
        """A line of the client's own, in `window` (None: the status window)."""
        self.window(window).add(Line((attr, text)))

    def _lines_of(self, record, at, attr, window):
        for line in ui.render(record, self._now, self.tz):
            self.system(line, attr, window)

    def _answer(self, record, at):
        """Answers about no conversation in particular: in the window where they were asked for."""
        if record.get("command") in ("users", "who"):
            rows = record.get("users") or record.get("presence") or []
            self.users.update(row["username"] for row in rows)
        attr = "error" if record["event"] == "error" else "answer"
        self._lines_of(record, at, attr, self.shown)
        if record.get("command") == "help" and record["lines"] and record["lines"][0].startswith("/register"):
            for line in KEYS_HELP:
                self.system(line, "answer", self.shown)

    _on_error = _answer

    def _conversation_lines(self, record, at, attr="system"):
        self._lines_of(record, at, attr, record["conversation_id"])

    _answer_group = _answer_add = _answer_read = _answer_receipts = _conversation_lines
    _answer_mode = _answer_sign = _answer_export = _on_mode = _conversation_lines
    _answer_invite = _on_invitation_accepted = _conversation_lines

    def _on_transcript_signed(self, record, at):
        self._conversation_lines(record, at, "receipt" if record["verified"] else "error")

    def _answer_leave(self, record, at):
        self._lines_of(record, at, "system", None)

    def _answer_quit(self, record, at):
        pass

    def _markup(self, record, at, mark=None):
        """How a message reads: time, name, text (quotes and mentions set apart), its number, its receipt mark."""
        me, sender, body = self._me(), record["sender"], record["body"]
        mine = sender == me
        who = "own" if mine else nick(sender)
        mentioned = not mine and ui.mentions(body, (me, *self.highlight))
        markup = [("time", at(record["sent_at"]) + " ")]
        if ui.is_action(body):
            markup.append((who, f"* {sender} "))
            body = body[len(ui.ACTION) :]
        else:
            markup.append((who, f"<{sender}> "))
        for index, text in enumerate(body.split("\n")):
            if index:
                markup.append("\n      ")
            attr = "quote" if text.startswith("> ") else ("mention" if mentioned else None)
            markup.append((attr, text) if attr else text)
        if record.get("message_id") is not None:
            markup.append(("id", f"  #{record['message_id']}"))
        note = ui.chain_note(record)
        if note:
            markup.append(("error" if record.get("chain") == "broken" else "id", note))
        if mark:
            markup.append(mark)
        return markup

    def _message(self, record, at, mark=None):
        """Show a message in its window once (a message shown already is only drawn again)."""
        window = self.window(record["conversation_id"])
        line = window.messages.get(record.get("message_id"))
        if line is not None:
            return line, False
        line = Line(self._markup(record, at, mark), record.get("message_id"), record.get("seq"))
        line.record = record
        self.users.add(record["sender"])
        window.add(line, window.place(record["seq"]) if record.get("seq") is not None else None)
        return line, True

    def _on_deliver(self, record, at):
        line, new = self._message(record, at)
        if not new or record["sender"] == self._me():
            return
        conversation_id = record["conversation_id"]
        window = self.windows[conversation_id]
        mentioned = ui.mentions(record["body"], (self._me(), *self.highlight))
        away = conversation_id != self.shown or not window.follow or not self.focused
        if mentioned and conversation_id != self.shown:
            window.mentioned = True
        conversation = self._conversations().get(conversation_id)
        if away and (mentioned or (conversation is not None and conversation.kind == "direct")):
            self._notify(record)

    def _answer_say(self, record, at):
        window = self.window(record["conversation_id"])
        for line in list(window.walker):  # the same text shown pending while offline is now sent
            if line.message_id is None and line.record is not None and line.record.get("body") == record["body"]:
                window.walker.remove(line)
                break
        self._message(record, at)

    def _on_pending(self, record, at):
        line = Line(self._markup(record, at, ("pending", "  (pending: sent once reconnected)")))
        line.record = record
        self.window(record["conversation_id"]).add(line)

    def _answer_dm(self, record, at):
        if record["created"]:
            self.system(f"new conversation with {record['conversation']}", "system", record["conversation_id"])
        if "message_id" in record:
            self._message(record, at)

    def _answer_open(self, record, at):
        for message in record["messages"]:
            self._message(message, at)

    def _answer_history(self, record, at):
        added = sum(self._message(message, at)[1] for message in record["messages"])
        window = record["conversation_id"]
        if not record["messages"]:
            self.system("no messages yet", "system", window)
        elif not added:
            self.system(f"the last {len(record['messages'])} messages are all shown above", "system", window)
        elif record["has_more"]:
            self.system(f"{added} earlier messages added above; /history N shows more", "system", window)

    def _on_receipt(self, record, at):
        window = self.window(record["conversation_id"])
        marked = False
        for message_id in record["message_ids"]:
            line = window.messages.get(message_id)
            if line is None or line.record is None:
                continue
            (line.read if record["state"] == "read" else line.delivered).add(record["username"])
            line.set_markup(self._markup(line.record, at, self._mark(line, record["conversation_id"])))
            marked = True
        if not marked:
            self._conversation_lines(record, at, "receipt")

    def _mark(self, line, conversation_id):
        """✓ delivered, ✓✓ read: by everyone else in the conversation, else by how many of them."""
        conversation = self._conversations().get(conversation_id)
        others = len(set(conversation.members) - {self._me()}) if conversation is not None else 1
        read, reached = len(line.read), len(line.read | line.delivered)
        if read:
            return ("receipt", "  ✓✓" if read >= others else f"  ✓✓ {read}/{others}")
        return ("receipt", "  ✓" if reached >= others else f"  ✓ {reached}/{others}")

    def _on_presence(self, record, at):
        self.users.add(record["username"])
        texts = ui.render(record, self._now, self.tz)
        places = {None} | {
            c.conversation_id
            for c in self._conversations().values()
            if c.kind == "direct" and record["username"] in c.members
        }
        for place in places:
            for text in texts:
                self.system(text, "system", place)

    def _on_conversation(self, record, at):
        self.users.update(record["members"])
        if record["change"] == "left":
            self._lines_of(record, at, "system", None)
            return
        if record["change"] == "new":
            self._lines_of(record, at, "system", None)
            for text in ui.render(record, self._now, self.tz):  # (no "/open NAME to talk there" in its own window)
                self.system(text.split("; /open ")[0], "system", record["conversation_id"])
        else:
            self._conversation_lines(record, at)

    def _everywhere(self, record, at, attr="system"):
        for place in {None, self.shown}:
            self._lines_of(record, at, attr, place)

    def _on_disconnected(self, record, at):
        self.offline = True
        self._everywhere(record, at, "error")

    def _on_reconnected(self, record, at):
        self.offline = False
        self._everywhere(record, at)

    def _on_logged_out(self, record, at):
        self._everywhere(record, at, "error")

    def _answer_login(self, record, at):
        self.offline = False
        self._answer(record, at)

    # -- notifications ---------------------------------------------------------------------------------

    def _notify(self, record):
        """The bell, or a desktop notification (notify-send, where there is a display), as configured."""
        if self.notify == "none":
            return
        desktop = None
        if self.notify in ("auto", "desktop", "both"):
            display = self.environ.get("DISPLAY") or self.environ.get("WAYLAND_DISPLAY")
            desktop = self.which("notify-send") if display or self.notify != "auto" else None
        if desktop is not None:
            body = record["body"][len(ui.ACTION) :] if ui.is_action(record["body"]) else record["body"]
            text = body[:NOTE_LENGTH]
            title = f"{record['sender']} in {record['conversation']}"
            argv = [desktop, "--app-name=securechat", "--", title, text]
            try:
                self.reactor.spawnProcess(_Quiet(), desktop, argv, env=dict(self.environ))
            except OSError:
                desktop = None
        if desktop is None or self.notify == "both":
            self.bell()

    # -- keys ------------------------------------------------------------------------------------------------

    def _sizes(self, size):
        """(input line size, window size) for the screen's size."""
        cols, rows = size
        listbox_cols = cols - SIDEBAR - 1 if cols >= NARROW else cols
        footer_rows = self.footer.rows((cols,), True)
        return (cols,), (max(listbox_cols, 1), max(rows - footer_rows, 1))

    def keypress(self, size, key):
        edit_size, body_size = self._sizes(size)
        if key in ("window resize", "focus in", "focus out"):
            self.focused = key != "focus out"
            return None
        if key in ("begin paste", "end paste"):
            self._paste = key == "begin paste"
            return None
        if self._paste:  # a paste is text to send as one message, whatever keys its bytes read as
            if key in ("enter", "meta enter"):
                self.edit.insert_text("\n")
            elif key == "tab":
                self.edit.insert_text("    ")
            elif len(key) == 1 or not key.isascii():
                self.edit.keypress(edit_size, key)
            return None
        if self._secret is not None:
            return self._secret_key(edit_size, key)
        if self._search is not None:
            return self._search_key(edit_size, body_size, key)
        window = self.windows[self.shown]
        if key.startswith("meta ") and key[5:].isdigit() and len(key) == 6:
            order = self.order()
            if int(key[5:]) < len(order):
                self._switch(order[int(key[5:])])
            return None
        if key in ("ctrl n", "ctrl p"):
            order = self.order()
            step = 1 if key == "ctrl n" else -1
            self._switch(order[(order.index(self.shown) + step) % len(order)])
            return None
        if key in ("page up", "page down"):
            window.listbox.keypress(body_size, key)
            if "bottom" in window.listbox.ends_visible(body_size):
                window.bottom()
            else:
                window.follow = False
            self.refresh()
            return None
        if key == "ctrl r":
            self._search = (self.edit.edit_text, None)
            self.edit.set_caption(("caption", "(search back) "))
            self.edit.set_edit_text("")
            self.refresh()
            return None
        if key in ("meta enter", "ctrl j"):
            self.edit.insert_text("\n")
            return None
        if key == "enter":
            self._enter(window)
            return None
        if key == "ctrl d" and not self.edit.edit_text:
            self._end()
            return None
        if key == "ctrl l":
            if self.loop is not None:
                self.screen.clear()
            return None
        if key in ("up", "down"):
            if self.edit.keypress(edit_size, key) is not None:
                self._browse(window, -1 if key == "up" else 1)
            return None
        unhandled = self.edit.keypress(edit_size, key)
        if unhandled is None:
            window.browsing = None if key not in ("tab", "shift tab") else window.browsing
        return None

    def _enter(self, window):
        text = self.edit.edit_text
        if not text.strip():
            return
        window.remember(text)
        self.edit.set_edit_text("")
        window.bottom()
        self._put(text)

    def _browse(self, window, step):
        """Up/Down past the first/last row of the input: this window's earlier lines."""
        if window.browsing is None:
            if step > 0 or not window.history:
                return
            window.browsing = (len(window.history), self.edit.edit_text)
        index, typed = window.browsing
        index = min(max(index + step, 0), len(window.history))
        if index == len(window.history):
            window.browsing = None
            text = typed
        else:
            window.browsing = (index, typed)
            text = window.history[index]
        self.edit.set_edit_text(text)
        self.edit.set_edit_pos(len(text))

    def _switch(self, conversation_id):
        if conversation_id == self.shown:
            return
        if self.chat is None:
            return
        self.windows[self.shown].browsing = None
        self.chat.switch(conversation_id)
        self.refresh()

    def _secret_key(self, edit_size, key):
        if key in ("enter", "ctrl d"):
            (asked, typed), self._secret = self._secret, None
            secret = self.edit.edit_text
            self.edit.set_mask(None)
            self.edit.set_edit_text(typed)
            self.refresh()
            asked.callback(secret)
        elif key not in ("meta enter", "tab", "shift tab", "up", "down"):
            self.edit.keypress(edit_size, key)
        return None

    def _search_key(self, edit_size, body_size, key):
        window = self.windows[self.shown]
        typed, found = self._search
        if key in ("enter", "esc", "ctrl g", "ctrl c"):
            if found is not None:
                found.highlight(False)
            self._search = None
            self.edit.set_edit_text(typed)
            if key != "enter" or found is None:
                window.bottom()
            self.refresh()
            return None
        if key == "ctrl r":
            start = window.walker.index(found) if found is not None else len(window.walker)
        else:
            if self.edit.keypress(edit_size, key) is not None:
                return None
            start = len(window.walker)
        query = self.edit.edit_text.casefold()
        match = None
        if query:
            for index in range(start - 1, -1, -1):
                if query in window.walker[index].plain.casefold():
                    match = window.walker[index]
                    break
        if match is None and key == "ctrl r":
            return None  # nothing further back: stay on this one
        if found is not None:
            found.highlight(False)
        self._search = (typed, match)
        if match is not None:
            match.highlight(True)
            window.listbox.set_focus(window.walker.index(match))
            window.listbox.set_focus_valign("middle")
            window.follow = False
        self.refresh()
        return None

    # -- Tab -------------------------------------------------------------------------------------------------

    def complete(self, text, position):
        """Replacements for the word before the cursor: a command, then a person, a conversation or a #number."""
        before, after = text[:position], text[position:]
        start = max(before.rfind(" "), before.rfind("\n")) + 1
        word = before[start:]
        head = before[:start]
        if not head and word.startswith("/"):
            candidates = [f"/{name} " for name in ui.COMMANDS if name.startswith(word[1:].lower())]
        elif head.lower().startswith("/open "):
            word = before[len("/open ") :]
            start = len("/open ")
            names = sorted({ui.clean(self._name(c)) for c in self._conversations()})
            candidates = [name for name in names if name.lower().startswith(word.lower())]
        elif head.lower().startswith("/reply ") and word.startswith("#") and start == len("/reply "):
            window = self.windows[self.shown]
            ids = [line.message_id for line in reversed(window.walker) if line.message_id is not None]
            candidates = [f"#{i} " for i in ids if str(i).startswith(word[1:])][:20]
        else:
            people = set(self.users)
            for conversation in self._conversations().values():
                people.update(ui.clean(member) for member in conversation.members)
            people.discard(self._me())
            bare = word.lstrip("@")
            at = word[: len(word) - len(bare)]
            candidates = [at + name for name in sorted(people) if name.startswith(bare.lower()) and bare]
            if not head and not at:  # a name at the start of a message is an address: "bob: "
                candidates = [name + ": " for name in candidates]
            else:
                candidates = [name + " " for name in candidates]
        return [(head[:start] + c + after, start + len(c)) for c in candidates if head[:start] + c != before]
