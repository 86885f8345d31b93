"""What a person sees of `securechat`: the commands and their help, how answers
and events read, and the input line that output never garbles.

Nothing here touches the network, so all of it is tested against strings and a
StringTransport; securechatd.client.main connects it to a ChatClient.
"""

import codecs
import io
import json
import re
import shlex
import shutil
import textwrap
import unicodedata
from dataclasses import dataclass, replace

import segno
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from securechatd.commands import STATUSES

EVENTS = (
    "deliver", "receipt", "presence", "conversation", "transcript_signed", "mode", "invited", "invitation_accepted"
)
MODES = ("attestable", "deniable")
PRIVACY = {"hide-last-seen": "hide_last_seen", "appear-offline": "appear_offline"}  # /privacy SETTING: SetPrivacy's


class UsageError(Exception):
    """A line that is not a valid command; str() says how to write it."""


# -- commands ------------------------------------------------------------------


def _positive(kind):
    def convert(name, word):
        try:
            value = kind(word)
        except ValueError:
            value = 0
        if value <= 0:
            raise UsageError(f"{name} must be a number above 0, not {word!r}.")
        return value

    return convert


def _conversation_id(name, word):
    """A conversation id as /convs and /invitations show it: 12 or #12."""
    return _positive(int)(name, word.removeprefix("#"))


def _one_of(choices):
    def convert(name, word):
        if word.lower() not in choices:
            raise UsageError(f"{name} must be one of {', '.join(choices)}, not {word!r}.")
        return word.lower()

    return convert


# How each argument named in a usage line is checked and converted; others are text.
_ARGUMENTS = {
    "USER": lambda name, word: word.lower(),
    "N": _positive(int),
    "MSG": _positive(int),
    "COUNT": _positive(int),
    "TIMEOUT": _positive(float),
    "STATUS": _one_of(STATUSES),
    "EVENT": _one_of(EVENTS),
    "MODE": _one_of(MODES),
    "ACCEPT": _one_of(("accept",)),
    "EXPORT": _one_of(("export",)),
    "ACTION": _one_of(("status", "enrol", "confirm", "disable", "recovery")),
    "SETTING": _one_of(tuple(PRIVACY)),
    "ON|OFF": _one_of(("on", "off")),
    "ID": _conversation_id,
}


@dataclass(frozen=True)
class Command:
    """A command whose usage line is also its argument grammar, so help and parser agree.

    `USER` is a required word, `[N]` an optional one, `USER...` one or more.
    With `rest`, the last argument takes the rest of the line as typed;
    otherwise words are split like a shell's, so a title can be quoted.
    """

    usage: str
    summary: str
    details: str = ""
    rest: bool = False

    @property
    def name(self):
        return self.usage.split()[0][1:]

    def parse(self, text):
        specs = self.usage.split()[1:]
        if specs and specs[0].startswith("[#"):  # an optional #NUMBER, told from the text after it by its #
            name = specs[0].strip("[#]")
            number = re.match(r"\s*#(\S*)\s*", text)
            first = _ARGUMENTS[name](name, number.group(1)) if number else None
            rest = replace(self, usage=" ".join(["/" + self.name] + specs[1:]))
            try:
                return [first] + rest.parse(text[number.end() :] if number else text)
            except UsageError:
                raise UsageError(f"usage: {self.usage}")
        if self.rest:
            words = text.split(None, len(specs) - 1)
        else:
            try:
                words = shlex.split(text)
            except ValueError:
                raise UsageError(f"Unbalanced quotes; usage: {self.usage}")
        arguments = []
        for index, spec in enumerate(specs):
            optional, repeated = spec.startswith("["), spec.rstrip("]").endswith("...")
            name = spec.strip("[]").removesuffix("...")
            convert = _ARGUMENTS.get(name, lambda name, word: word)
            if repeated:
                if len(words) <= index and not optional:
                    raise UsageError(f"usage: {self.usage}")
                arguments.append([convert(name, word) for word in words[index:]])
                return arguments
            if index < len(words):
                arguments.append(convert(name, words[index]))
            elif not optional:
                raise UsageError(f"usage: {self.usage}")
        if len(words) > len(specs):
            raise UsageError(f"usage: {self.usage}")
        return arguments


COMMANDS = {
    command.name: command
    for command in (
        Command(
            "/register [USER] [INVITE]",
            "create an account and log in",
            "Asks for a new password twice (8 to 1024 characters) unless --password-file or "
            "SECURECHAT_PASSWORD gives one. USER defaults to --user. Where registration is closed, "
            "INVITE is the invitation an administrator gave you (securechatd-admin invite).",
        ),
        Command(
            "/login [USER] [CODE]",
            "log in",
            "Asks for the password unless --password-file or SECURECHAT_PASSWORD gives one "
            "(in --batch without either, the next input line is the password). With two-factor login on, "
            "CODE is the code of your authenticator app or a recovery code; without it you are asked "
            "(in --batch: the next input line).",
        ),
        Command("/logout", "log out; the connection stays open"),
        Command(
            "/passwd",
            "change your password; ends your other sessions",
            "Asks for the current password (unless given by --password-file or SECURECHAT_PASSWORD) "
            "and the new one twice; in --batch the next input line is the new password.",
        ),
        Command(
            "/2fa [ACTION] [CODE]",
            "two-factor login: status, enrol, confirm CODE, disable CODE, recovery CODE",
            "status (the default) says whether it is on and how many recovery codes are left. enrol shows a "
            "secret and an otpauth:// URI for your authenticator app; confirm CODE with a code of the app "
            "and your password (asked unless --password-file or SECURECHAT_PASSWORD gives it; in --batch the "
            "next input line) switches it on and shows ten recovery codes, once: keep them safe (it also ends "
            "your other sessions). disable CODE switches it off; recovery CODE makes ten new recovery codes (the old stop "
            "working). CODE may be a recovery code; without it you are asked.",
            rest=True,
        ),
        Command(
            "/sessions",
            "your sessions: logged in now, or able to come back",
        ),
        Command(
            "/endsession SESSION",
            "end one of your other sessions (its id from /sessions, or the start of it)",
            "Its connection closes and it cannot resume; it must log in again.",
        ),
        Command("/endsessions", "end all your sessions but this one"),
        Command(
            "/security [EXPORT] [FILE]",
            "your account log (logins, second factor, password, devices, sessions), checked",
            "Each event is checked against the server's signed, append-only log: it says \"verified\", or names "
            "the break (an event rewritten, dropped or reordered, a forked or cut log, a device action not "
            "signed by that device). The newest tree head checked is kept beside this device's file, so any later "
            "rewrite of what you saw is caught. export FILE also writes what was read (file mode 0600) for "
            "securechatd-verify-log FILE; default FILE: securechat-account-log-USER-TIME.json.",
            rest=True,
        ),
        Command(
            "/privacy [SETTING] [ON|OFF]",
            "your privacy: hide-last-seen on|off, appear-offline on|off",
            "Without SETTING, shows both. hide-last-seen on: nobody else sees when you were last online. "
            "appear-offline on: everyone else sees you offline, in every session, until you switch it off. "
            "Who sees your presence at all (the people you share a conversation with, or everyone) is the "
            "server's setting.",
        ),
        Command("/users [PREFIX]", "registered users and their presence"),
        Command("/who", "presence of the people in your conversations"),
        Command(
            "/status STATUS [NOTE]",
            "set your presence (online, away, busy, invisible)",
            "NOTE is shown with it, as in /status away back at 3. Invisible shows you as offline to others.",
            rest=True,
        ),
        Command(
            "/dm USER [TEXT]",
            "talk with USER, sending TEXT if given",
            rest=True,
        ),
        Command(
            "/group TITLE USER...",
            "start a group with these people",
            'Quote a title with spaces: /group "Team lunch" bob carol',
        ),
        Command(
            "/add USER...",
            "add people to the current group",
            "Someone who shares no conversation with you is invited instead (on a server with invitations on): "
            "they join once they accept.",
        ),
        Command(
            "/invite USER...",
            "invite people to the current group: they join once they accept",
            "In an end-to-end encrypted group, once they accept, your device adds them with a signed "
            "membership state by itself.",
        ),
        Command(
            "/invitations",
            "your invitations to groups (and, in a group, who is invited to it)",
        ),
        Command("/accept ID", "accept the invitation to group ID (from /invitations) and join it",
                "An encrypted group is joined once a member's device adds you with a signed membership state: "
                "the group then shows up by itself."),
        Command("/decline ID", "decline the invitation to group ID (nobody is told)"),
        Command("/leave", "leave the current group"),
        Command("/convs", "your conversations with their unread counts"),
        Command(
            "/open ID|NAME",
            "switch conversation: id, person or group title",
            rest=True,
        ),
        Command(
            "/me TEXT",
            "say TEXT as an action: * you TEXT",
            "Sent as a message whose text starts with /me; clients show it as an action.",
            rest=True,
        ),
        Command(
            "/reply [#MSG] TEXT",
            "answer a message, quoting its first line",
            "Without #MSG, quotes the newest message from someone else here. Message numbers are shown "
            "as #N (in the full-screen client at the end of each message).",
            rest=True,
        ),
        Command("/devices", "your devices (end-to-end encryption keys)"),
        Command(
            "/revoke DEVICE",
            "revoke one of your devices (its id from /devices, or the start of it)",
            "The revoked device can read nothing sent after its revocation is seen.",
        ),
        Command(
            "/verify USER",
            "show the safety number to compare with USER",
            "The same 60 digits on both sides when nobody sits in the middle; read them aloud or compare in person.",
        ),
        Command("/name DEVICE NAME", "name one of your devices (shown to your contacts)", rest=True),
        Command("/trust USER", "mark USER verified after comparing safety numbers"),
        Command(
            "/link",
            "on a new device: the request to approve on a device already in use",
            "Prints a line to type on another of your devices; once it is approved there, /link again here"
            " (a --batch run does not reconnect: start it again).",
        ),
        Command("/approve REQUEST", "add a new device of yours (the line /link printed there)", rest=True),
        Command(
            "/mode [MODE]",
            "show or set how the current conversation is kept: attestable or deniable",
            "Attestable (the default): each message is signed by its sender's device, so it can be shown later, "
            "to someone who was not there, who said what (/export). Deniable: nothing is signed; only the members "
            "can tell who wrote what. Every member sees the change; signatures already made stay.",
        ),
        Command(
            "/sign",
            "sign the transcript of the current conversation as you have it",
            "Your device signs the conversation's chain up to its newest link you verified; the others see "
            "\"transcript verified up to #N\". Reading (/read) does it too, and leaving does it first.",
        ),
        Command(
            "/export [FILE]",
            "write the current conversation to FILE for an offline check",
            "A bundle (file mode 0600) of every message, the server's signed chain, the device chains, the "
            "transcript heads and the key and text of each message this device can read: anyone can check it "
            "with securechatd-verify FILE, and learns those texts. Default FILE: securechat-ID-TIME.bundle.",
            rest=True,
        ),
        Command(
            "/serverkey [ACCEPT]",
            "the id of the key that signs the server's chains (compare it with the operator)",
            "Pinned the first time. If the server ever signs with another key you are warned; /serverkey accept "
            "pins the new one once you have checked it out of band.",
        ),
        Command("/history [N]", "the last N messages here (default 20)"),
        Command(
            "/read",
            "mark the current conversation read (✓✓)",
            "Sending a message into a conversation marks it read too.",
        ),
        Command(
            "/receipts [MSG]",
            "who got and read MSG (default: your last here)",
        ),
        Command(
            "/wait EVENT [COUNT] [TIMEOUT]",
            "for scripts: wait for COUNT more EVENTs",
            "EVENT is deliver, receipt, presence, conversation, transcript_signed, mode, invited or"
            " invitation_accepted; COUNT defaults to 1. "
            "Only events "
            "no earlier /wait claimed count, so /wait deliver returns at once if a message came in "
            "before it. Fails after TIMEOUT seconds (default 30). Later input waits meanwhile.",
        ),
        Command("/help [COMMAND]", "this list, or more about one command"),
        Command("/quit", "leave (also Ctrl-D)"),
    )
}


def parse(line):
    """(command name, arguments) for a typed line, or None for a blank one.

    A line without a slash is `say`, the text for the current conversation;
    `//text` says "/text".
    """
    if not line.strip():
        return None
    if line.startswith("//"):
        return "say", [line[1:]]
    if not line.startswith("/"):
        return "say", [line]
    name, _, text = line[1:].partition(" ")
    command = COMMANDS.get(name.lower())
    if command is None:
        raise UsageError(f"There is no command /{name}; /help lists them.")
    return command.name, command.parse(text)


def help_lines(name=None):
    if name is not None:
        command = COMMANDS.get(name.lstrip("/").lower())
        if command is None:
            raise UsageError(f"There is no command /{name.lstrip('/')}; /help lists them.")
        return [f"{command.usage}  {command.summary}"] + textwrap.wrap(
            command.details, 78, initial_indent="  ", subsequent_indent="  "
        )
    width = max(len(command.usage) for command in COMMANDS.values())
    return [f"{command.usage:<{width}}  {command.summary}" for command in COMMANDS.values()] + [
        "Lines without a slash go to the current conversation; // sends a leading /.",
    ]


# -- how things read ------------------------------------------------------------


def conversation_name(conversation, me):
    """A direct conversation is called by the other person's name, a group by its title."""
    others = [member for member in conversation.members if member != me]
    if conversation.kind == "direct":
        return others[0] if others else me
    return conversation.title or ", ".join(others)


def prompt(conversation, unread, elsewhere=0, mode=None):
    """The input prompt: where a line without a slash goes, its mode (encrypted), its unread count, and the others'."""
    parts = [clean(conversation or "-")] + ([mode] if mode else [])
    if unread:
        parts.append(f"{unread} unread")
    if elsewhere:
        parts.append(f"{elsewhere} unread elsewhere")
    return f"[{' · '.join(parts)}]> "


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def stamp(moment, now, tz=None):
    """When `moment` was, in time zone `tz`: HH:MM on the day `now` falls on there, else "Nov 22 10:00".

    `now` comes from the caller's clock, never the wall clock; `tz` None means
    this machine's local time zone. The month is English whatever the locale.
    """
    local, today = moment.astimezone(tz), now.astimezone(tz)
    time = f"{local.hour:02d}:{local.minute:02d}"
    return time if local.date() == today.date() else f"{_MONTHS[local.month - 1]} {local.day:02d} {time}"


# Shown as U+FFFD besides control characters: what reorders a line (bidirectional overrides, isolates and
# marks: "Trojan source") or breaks it where a terminal does not show a newline (line, paragraph separators).
_UNSAFE = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029")
MULTILINE = frozenset({"body"})  # the fields of a record whose newlines are kept (messages)


def clean(text, indent="", one_line=False):
    """Text from other people made safe for a terminal: no control sequences.

    A newline continues on an indented line (`one_line`: it is refused like the
    rest, so a name or an address cannot start a line of its own); every other
    control character (ESC above all, which could rewrite the screen) and
    every character that reorders or breaks a line becomes U+FFFD.
    """
    lines = [text] if one_line else text.split("\n")
    safe = [
        "".join("�" if c in _UNSAFE or unicodedata.category(c) == "Cc" else c for c in line.replace("\t", " "))
        for line in lines
    ]
    return ("\n" + indent).join(safe)


def cleaned(record, multiline=False):
    """`record` with every text in it (at any depth) through clean(): whatever a server or another
    person sent, in any field, reaches a screen as text, never as a control sequence, and only the
    MULTILINE fields span lines."""
    if isinstance(record, str):
        return clean(record, one_line=not multiline)
    if isinstance(record, dict):
        return {key: cleaned(value, key in MULTILINE) for key, value in record.items()}
    if isinstance(record, (list, tuple)):
        return [cleaned(value, multiline) for value in record]
    return record


ACTION = "/me "  # a message starting so is an action: "* alice waves"


def is_action(body):
    return body.startswith(ACTION)


def quote(sender, body, text):
    """The body of a reply: the first line of what it answers (not a quote in it), shortened, then the text."""
    lines = [line for line in body.split("\n") if line.strip() and not line.startswith("> ")] or [""]
    first = lines[0][len(ACTION) :] if is_action(lines[0]) else lines[0]
    if len(first) > 60:
        first = first[:59] + "…"
    return f"> {sender}: {first}\n{text}"


def mentions(body, names):
    """Whether `body` names any of `names` as a word (case-insensitive; "@bob" and "bob:" count)."""
    words = [re.escape(name) for name in names if name]
    return bool(words) and re.search(rf"(?<![\w]){'|'.join(f'(?:{w})' for w in words)}(?![\w])", body, re.I) is not None


def chain_note(record):
    """What the chain says of a message, when it is worth a word: deniable, or a check that failed."""
    notes = []
    if record.get("mode") == "deniable":
        notes.append("(deniable)")
    if record.get("chain") == "broken":
        notes.append(f"!! not verified: {', '.join(record.get('chain_problems') or ())}")
    return "".join(f"  {note}" for note in notes)


MODE_TEXTS = {
    "attestable": "attestable: every message is signed by its sender's device",
    "deniable": "deniable: messages are not signed",
}


def _message(record, at, suffix=""):
    suffix = chain_note(record) + suffix
    body, head = record["body"], f"{at(record['sent_at'])} [{record['conversation']}] "
    if record.get("problem") == "no_key":
        return head + f"<{record['sender']}> (sent before this device was added: it cannot be read here)"
    if record.get("problem"):
        detail = f": {record['problem_detail']}" if record.get("problem_detail") else ""
        return head + f"<{record['sender']}> !! this message could not be decrypted ({record['problem']}{detail})"
    if is_action(body):
        return head + f"* {record['sender']} " + clean(body[len(ACTION) :], " " * 6) + suffix
    return head + f"<{record['sender']}> " + clean(body, " " * 6) + suffix


def _sent(record, at):
    return _message(record, at, f"  (#{record['message_id']} sent)")


def _receipt(record, at):
    if record["state"] == "read":
        mark, verb = "✓✓", "read by"
    else:
        mark, verb = "✓", "delivered to"
    ids = record["message_ids"]
    if len(ids) == 1:
        what = f" #{ids[0]}"
    elif ids:
        what = f" {len(ids)} messages up to #{ids[-1]}"
    else:  # (messages sent before this run: their ids are not known here, their place is)
        what = f" messages up to no. {record['seq']}"
    return [f"{at(record['at'])} [{record['conversation']}] {mark}{what} {verb} {record['username']}"]


def _presence_text(row, at):
    text = f"{row['username']} is {row['status']}"
    if row.get("note"):
        text += f": {row['note']}"
    if row["status"] == "offline" and row.get("last_seen"):
        text += f", last seen {at(row['last_seen'])}"
    return text


def _conversation(record, at):
    name, members = record["conversation"], ", ".join(record["members"])
    when = at(record["at"])
    if record["change"] == "left":
        return [f"{when} * you are no longer in [{name}]"]
    if record["change"] == "members":
        moves = [f"{', '.join(record['joined'])} joined"] if record["joined"] else []
        moves += [f"{', '.join(record['left'])} left"] if record["left"] else []
        return [f"{when} * [{name}] {'; '.join(moves) or 'members changed'}: now {members}"]
    if record["kind"] == "direct":
        return [f"{when} * new conversation with {name}; /open {name} to talk there"]
    return [f"{when} * new group [{name}]: {members}; /open {name} to talk there"]


def _login(record, at):
    line = f"logged in as {record['username']}"
    if record["unread"]:
        return [f"{line}; {record['unread']} unread in your conversations (/convs lists them)"]
    if not record["conversations"]:
        return [f"{line}; /users lists people, /dm USER starts a conversation"]
    return [f"{line}; /convs lists your conversations"]


def _dm(record, at):
    opened = f"now in [{record['conversation']}]" + (" (new conversation)" if record["created"] else "")
    opened += f" ({record['mode']})" if record.get("mode") else ""
    return [opened] + ([_sent(record, at)] if "message_id" in record else [])


def _users(record, at):
    rows = record["users"]
    return [f"  {row['username']:<20} {row['status']}" for row in rows] or ["no users found"]


def _who(record, at):
    rows = record["presence"]
    return ["  " + _presence_text(row, at) for row in rows] or [
        "you share no conversation with anyone yet; /users lists people"
    ]


def _convs(record, at):
    rows = record["conversations"]
    if not rows:
        return ["no conversations yet; /dm USER starts one"]
    lines = []
    for row in rows:
        marker = ">" if row["current"] else " "
        unread = f"{row['unread']} unread" if row["unread"] else ""
        security = ("encrypted, all verified" if row["verified"] else "encrypted") if row.get("encrypted") else "plaintext"
        if row.get("mode"):
            security += f", {row['mode']}"
        line = f"{marker} #{row['conversation_id']:<5} {row['conversation']:<24} {security:<24} {unread}"
        lines.append(line.rstrip())
    return lines


def _open(record, at):
    line = f"now in [{record['conversation']}]" + (f" ({record['mode']})" if record.get("mode") else "")
    if not record["unread"]:
        return [line]
    missed = [_message(message, at) for message in record["messages"]]
    if len(missed) < record["unread"]:
        missed.insert(0, f"(the {len(missed)} newest shown; /history N shows more)")
    return [f"{line}, {record['unread']} unread:", *missed]


def _history(record, at):
    lines = [_message(message, at) for message in record["messages"]] or ["no messages yet"]
    if record["has_more"]:
        lines.insert(0, "(older messages: /history with a larger N)")
    return lines


def _receipts(record, at):
    lines = [f"#{record['message_id']} in [{record['conversation']}]:"]
    for row in record["receipts"]:
        if row["read_at"]:
            state = f"read {at(row['read_at'])}"
        elif row["delivered_at"]:
            state = f"delivered {at(row['delivered_at'])}, not read yet"
        else:
            state = "not delivered yet"
        lines.append(f"  {row['username']}: {state}")
    return lines


def _transcript_signed(record, at):
    where = f"{at(record['at'])} [{record['conversation']}]"
    upto = f"#{record['n']}" + (f" (message no. {record['seq']})" if record.get("seq") else "")
    if record["verified"]:
        return [f"{where} read by {record['username']}, transcript verified up to {upto}"]
    if record.get("problem"):
        return [f"{where} !! read by {record['username']}: their transcript up to {upto} does NOT check"
                f" ({record['problem']})"]
    return [f"{where} read by {record['username']} up to {upto} (not checked here: beyond what this device holds)"]


def _export(record, at):
    shown = len(record["disclosed"])
    lines = [
        f"exported [{record['conversation']}] to {record['file']}: {record['links']} chain links,"
        f" {record['messages']} messages ({shown} with their text), {record['transcript_heads']} transcript heads",
        f"  anyone with the file can check it: securechatd-verify {record['file']}"
        + (" (and read the texts in it)" if shown else ""),
    ]
    lines += [f"  left out: {reason}" for reason in record["left_out"]]
    return lines


def _serverkey(record, at):
    lines = [f"the server's chain key: {record['key_id']}" + (" (newly accepted)" if record["accepted"] else "")]
    if record.get("other_key_id"):
        lines.append(f"!! the server now signs with another key: {record['other_key_id']};"
                     " /serverkey accept pins it once the operator confirmed it")
    return lines


def _two_factor(record, at):
    action = record["action"]
    if action == "status":
        if not record["enabled"]:
            return ["two-factor login is off" + (" (this server requires it)" if record["required"] else "")
                    + "; /2fa enrol switches it on"]
        return [f"two-factor login is on; {record['recovery_codes_left']} recovery code(s) left"]
    if action == "enrol":
        return [
            "Add this account to your authenticator app: scan the code, type in the secret, or open the URI",
            *qr_code(record["uri"]),
            f"  secret: {record['secret']}",
            f"  URI:    {record['uri']}",
            "then /2fa confirm CODE with the code it shows.",
        ]
    if action == "disable":
        return ["two-factor login is off"]
    lines = ["two-factor login is on; your other sessions were ended"] if action == "confirm" else []
    lines.append("Your recovery codes, each good once, shown only now; keep them somewhere safe:")
    lines += [f"  {code}" for code in record["recovery_codes"]]
    return lines


def qr_code(text):
    """`text` as a QR code of half blocks, two modules a character row (segno's compact terminal form).

    Light modules are drawn, as on a terminal with light text on a dark background; apps read the
    inverse too. No escape sequences, so the full-screen client shows it as any other text.
    """
    out = io.StringIO()
    segno.make(text).terminal(out=out, compact=True)
    return out.getvalue().splitlines()


def _security(record, at):
    user = record["username"]
    if record["verified"]:
        lines = [f"account log of {user}: verified ({len(record['events'])} events, tree of {record['tree_size']})"]
    else:
        lines = [f"!! account log of {user} does NOT check: {record['problem'] or ''}"]
    for run in _runs_of_resumes(record["events"]):
        e, last = run[0], run[-1]
        signed = "  signed by its device" if e["signed"] == "yes" else ""
        where = f" from {e['address']}" if e["address"] else ""
        device = f" device {e['device'][:8]}" if e["device"] else ""
        target = f" {e['target']}" if e["target"] else ""
        if len(run) == 1:
            lines.append(f"  #{e['seq']:<4} {e['time']}  {e['kind']}{target}{where}{device}{signed}")
        else:
            lines.append(
                f"  #{e['seq']}-#{last['seq']} {e['time']} to {last['time']}  {len(run)} x {e['kind']}{target}{where}{device}"
            )
    if not record["verified"] and record["events"]:
        lines.append(f"  (verified up to #{record['events'][-1]['seq']})")
    if record.get("file"):
        lines.append(f"  written to {record['file']}: securechatd-verify-log {record['file']} checks it")
    return lines


def _runs_of_resumes(events):
    """[[event]]: each event alone, but consecutive resumes (login by token) from one address and device
    together, so a client that reconnected all day is one line (every one is in the log, and in --batch)."""
    runs = []
    for e in events:
        place = (e["kind"], e["target"], e["address"], e["device"])
        if runs and place[:2] == ("login", "token") and place == runs[-1][-1]["place"]:
            runs[-1].append(dict(e, place=place))
        else:
            runs.append([dict(e, place=place)])
    return runs


def _sessions(record, at):
    lines = []
    for s in record["sessions"]:
        what = (s.get("client_name") or "?") + (f" device {s['device_id'][:8]}" if s.get("device_id") else "")
        state = "this session" if s["this_session"] else ("online" if s["online"] else "away")
        lines.append(
            f"  {s['session_id'][:8]}  {what}  from {s.get('address') or '?'}  since {at(s['since'])}"
            f"  last active {at(s['last_active'])}  ({state})"
        )
    return lines or ["no sessions"]


def _privacy(record, at):
    last_seen = "hidden from everyone" if record["hide_last_seen"] else "shown to those who see your presence"
    offline = "on: everyone else sees you offline" if record["appear_offline"] else "off"
    return [f"last seen: {last_seen}", f"appear offline: {offline}"]


def _invited_names(record):
    """The end of an /add or /group answer naming those invited instead of added."""
    invited = record.get("invited")
    return f"; invited {', '.join(invited)} (they join once they accept)" if invited else ""


def invitation_name(invitation):
    """What an invitation calls its group: the title, else its id."""
    return invitation.get("title") or f"group #{invitation['conversation_id']}"


def _invitation(row, at):
    """One of the user's invitations, as /invitations lists it."""
    group = invitation_name(row)
    line = f"  #{row['conversation_id']:<5} [{group}] from {row['inviter']}, {at(row['invited_at'])}"
    if row["accepted"]:
        return line + " (accepted: a member adds you with a signed state)"
    return line + f"  /accept {row['conversation_id']} or /decline {row['conversation_id']}"


def _invitations(record, at):
    lines = [_invitation(row, at) for row in record["invitations"]] or ["no invitations to you"]
    if "group" in record:
        lines.append(f"invited to [{record['conversation']}]:")
        for row in record["group"]:
            state = "accepted, waiting for a member's signed state" if row["accepted"] else "not answered yet"
            lines.append(f"  {row['username']} by {row['inviter']}, {at(row['invited_at'])}: {state}")
        if not record["group"]:
            lines.append("  nobody")
    return lines


def _invite(record, at):
    if not record["invited"]:
        return [f"[{record['conversation']}] nobody newly invited: they are members or invited already"]
    return [f"[{record['conversation']}] invited {', '.join(record['invited'])}: they join once they accept"]


def _accept(record, at):
    if record["joined"]:
        return [f"you joined [{record['conversation']}]; /open {record['conversation']} to talk there"]
    return [f"accepted the invitation to [{record['conversation']}]; it is end-to-end encrypted: you join"
            " when a member's device adds you with a signed state"]


def _invitation_accepted(record, at):
    done = "you added them with a signed state" if record["added"] else "a member's device adds them"
    return [f"{at(record['at'])} * [{record['conversation']}] {record['username']} accepted the invitation;"
            f" {done}"]


# Each takes the record and `at`, which writes a moment as stamp() does for this render.
def _verify(record, at):
    digits = record["safety_number"]
    state = "verified" if record["verified"] else "not verified yet"
    return [
        f"safety number with {record['user']} ({state}):",
        f"  {digits}",
        f"Compare it with {record['user']} in person or by voice; if it matches, /trust {record['user']}.",
    ]


_ANSWERS = {
    "register": lambda r, at: [f"registered {r['username']}"],
    "login": _login,
    "logout": lambda r, at: ["logged out"],
    "passwd": lambda r, at: ["password changed; your other sessions are logged out"],
    "users": _users,
    "2fa": _two_factor,
    "sessions": _sessions,
    "security": _security,
    "endsession": lambda r, at: [f"ended the session {r['session_id'][:8]}"],
    "endsessions": lambda r, at: [f"ended {r['ended']} other session(s)"],
    "who": _who,
    "privacy": _privacy,
    "invite": _invite,
    "invitations": _invitations,
    "accept": _accept,
    "decline": lambda r, at: [f"declined the invitation to [{r['conversation']}]"],
    "status": lambda r, at: [f"you are {r['status']}" + (f": {r['note']}" if r["note"] else "")],
    "say": lambda r, at: [_sent(r, at)],
    "dm": _dm,
    "group": lambda r, at: [
        f"now in the new group [{r['conversation']}] with {', '.join(r['members'])}"
        + (f" ({r['mode']})" if r.get("mode") else "")
        + _invited_names(r)
    ],
    "add": lambda r, at: [f"[{r['conversation']}] members: {', '.join(r['members'])}" + _invited_names(r)],
    "leave": lambda r, at: [f"you left [{r['conversation']}]"],
    "convs": _convs,
    "open": _open,
    "history": _history,
    "read": lambda r, at: [f"[{r['conversation']}] marked read"],
    "receipts": _receipts,
    "wait": lambda r, at: [f"{r['count']} {r['awaited']} event(s) arrived"],
    "help": lambda r, at: r["lines"],
    "devices": lambda r, at: [
        f"  {d['device_id'][:8]}  {d['name']}" + ("  (this device)" if d["this_device"] else "") for d in r["devices"]
    ],
    "revoke": lambda r, at: [f"revoked {r['device_id'][:8]} ({r['name']}): it reads nothing sent from now on"],
    "verify": _verify,
    "name": lambda r, at: [f"your device {r['device_id'][:8]} is now called {r['name']}"],
    "trust": lambda r, at: [f"{r['user']} is verified; you will be told if their devices change"],
    "link": lambda r, at: (
        [f"this device ({r['device_id'][:8]}) is linked: it reads and sends encrypted messages from now on"]
        if r["linked"]
        else ["On one of your devices already in use, type:", f"  /approve {r['request']}", "then /link again here."]
    ),
    "approve": lambda r, at: [f"added the device {r['device_id'][:8]} ({r['name']})"],
    "mode": lambda r, at: [
        f"[{r['conversation']}] is " + ("now " if r["changed"] else "") + MODE_TEXTS[r["mode"]]
    ],
    "sign": lambda r, at: [
        f"[{r['conversation']}] you signed the transcript up to #{r['n']}"
        + (f" (message no. {r['seq']})" if r["seq"] else "")
    ],
    "export": _export,
    "serverkey": _serverkey,
    "quit": lambda r, at: [],
}

_EVENTS = {
    "answer": lambda r, at: _ANSWERS[r["command"]](r, at),
    "error": lambda r, at: [f"error: {r['message']}"],
    "deliver": lambda r, at: [_message(r, at)],
    "receipt": _receipt,
    "presence": lambda r, at: [f"{at(r['at'])} * {_presence_text(r, at)}"],
    "conversation": _conversation,
    "disconnected": lambda r, at: [f"{at(r['at'])} * connection lost; reconnecting"],
    "pending": lambda r, at: [_message(r, at, "  (pending: sent once reconnected)")],
    "reconnected": lambda r, at: [f"{at(r['at'])} * reconnected as {r['username']}"],
    "logged_out": lambda r, at: [f"{at(r['at'])} * logged out: {r['message']}"],
    "alarm": lambda r, at: [
        f"{at(r['at'])} !! SECURITY: {r['kind']}" + (f" ({r['user']})" if r["user"] else "") + f": {r['detail'] or ''}"
    ],
    "transcript_signed": _transcript_signed,
    "invited": lambda r, at: [
        f"{at(r['at'])} * {r['inviter']} invites you to [{invitation_name(r)}]"
        + (" (end-to-end encrypted)" if r["encrypted"] else "")
        + f": /accept {r['conversation_id']} or /decline {r['conversation_id']}"
    ],
    "invitation_accepted": _invitation_accepted,
    "enrol": lambda r, at: [f"{at(r['at'])} * this server requires two-factor login for {r['username']}"]
    + _two_factor({**r, "action": "enrol"}, at)[:-1]
    + ["then type the code it shows."],
    "recovery_codes": lambda r, at: _two_factor({**r, "action": "confirm"}, at)[1:],
    "mode": lambda r, at: [f"{at(r['at'])} * [{r['conversation']}] {r['by']} made it {MODE_TEXTS[r['mode']]}"],
    "devices": lambda r, at: [
        f"{at(r['at'])} !! {r['user']}'s devices changed: {len(r['added'])} added, {len(r['removed'])} removed;"
        f" compare safety numbers with /verify {r['user']}"
    ],
}


def render(record, now, tz=None):
    """The lines a person sees for an answer or event record.

    Times read as stamp() writes them: `now` (from the caller's clock) says
    which day is today, `tz` (None: this machine's local zone) where. Every text of the record
    goes through clean() first, so no renderer can forget one.
    """
    return _EVENTS[record["event"]](cleaned(record), lambda moment: stamp(moment, now, tz))


def to_json(record):
    """One line of JSON for --batch: times in ISO 8601, everything else as is."""
    return json.dumps(record, default=lambda value: value.isoformat())


# -- the console ------------------------------------------------------------------


class Typed:
    """Lines typed and not yet taken by Chat, and Chat waiting for the next one (every face of the client)."""

    def __init__(self):
        self._lines = []
        self._waiting = None
        self._ended = False

    def _put(self, line):
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.callback(line)
        else:
            self._lines.append(line)

    def _end(self):
        self._ended = True
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.callback(None)

    def next_line(self):
        """Deferred: the next line, or None once there are no more (end of input, Ctrl-D)."""
        if self._lines:
            return succeed(self._lines.pop(0))
        if self._ended:
            return succeed(None)
        self._waiting = Deferred()
        return self._waiting


@implementer(IHalfCloseableProtocol)
class Console(Typed, Protocol):
    """Standard input and output as lines: for pipes, scripts and --batch.

    Half-closeable, so the end of the input leaves output open for the answers
    still to come. `tz` is the time zone its reader's times are shown in (None:
    this machine's local zone).
    """

    interactive = False

    def __init__(self, tz=None):
        super().__init__()
        self.tz = tz
        self._buffer = b""
        self.closed = Deferred()
        self.output_lost = Deferred()  # fires if the reader of our output goes away (`| head -1`)

    def dataReceived(self, data):
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        for line in lines:
            self._put(line.rstrip(b"\r").decode("utf-8", "replace"))

    def readConnectionLost(self):
        if self._buffer:
            self.dataReceived(b"\n")
        self._end()

    def writeConnectionLost(self):
        if not self.output_lost.called:  # (first: the session ends for this reason, not end of input)
            self.output_lost.callback(None)
        self._end()

    def connectionLost(self, reason):
        self._end()
        self.closed.callback(None)

    def read_secret(self, prompt):
        return self.next_line()

    def give_back(self, text):
        """A line that could not be sent (too long): a pipe has nowhere to put it back."""

    def set_prompt(self, prompt):
        pass

    def show_record(self, record, now):
        """Show an answer or event record as ui.render writes it (`now` from the session's clock)."""
        for line in render(record, now, self.tz):
            self.show(line)

    def show(self, text):
        self.transport.write(text.encode("utf-8") + b"\n")

    def close(self):
        """Deferred: fires once the output is written (at once if no one reads it any more)."""
        self.transport.loseConnection()
        if self.output_lost.called:  # (StandardIO then never reports the connection lost)
            return succeed(None)
        return self.closed


def _columns(text):
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


class Terminal(Console):
    """A terminal in cbreak mode: this echoes and edits the input line itself,
    so output is printed above it and the partly typed line is drawn again.

    Keys: Backspace, Ctrl-U (erase the line), Ctrl-W (erase a word), Enter,
    Ctrl-D on an empty line (end); escape sequences such as arrow keys are
    ignored. A secret (a password) is typed without echo.
    """

    interactive = True

    def give_back(self, text):
        """Put a line that could not be sent back where it is typed, unless something else is typed there now."""
        if not self.typed:
            self._clear()
            self.typed = text
            self._draw()

    def __init__(self, width=lambda: shutil.get_terminal_size().columns, tz=None):
        super().__init__(tz)
        self.prompt = ""  # drawn by the first set_prompt
        self.typed = ""
        self._secret = None
        self._escape = ""
        self._width = width
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def dataReceived(self, data):
        for key in self._decoder.decode(data):
            self._key(key)

    def _key(self, key):
        if self._escape:  # ESC x (Alt-x), or ESC [ or ESC O up to a final byte
            self._escape += key
            if (len(self._escape) == 2 and key not in "[O") or (len(self._escape) > 2 and "@" <= key <= "~"):
                self._escape = ""
        elif key == "\x1b":
            self._escape = key
        elif key in "\r\n":
            self._enter()
        elif key in "\x7f\x08":
            self._edit(self.typed[:-1])
        elif key == "\x15":
            self._edit("")
        elif key == "\x17":
            kept = self.typed.rstrip()
            self._edit(kept[: kept.rfind(" ") + 1])
        elif key == "\x04":
            if self._secret is not None:
                self._enter()
            elif not self.typed:
                self._clear()
                self._end()
        elif key >= " ":
            self.typed += key
            if self._secret is None:
                self.transport.write(key.encode("utf-8"))

    def _enter(self):
        line, self.typed = self.typed, ""
        if self._secret is not None:
            (_, secret, self.typed), self._secret = self._secret, None
            self.transport.write(b"\n")
            self._draw()
            secret.callback(line)
            return
        if line.startswith("/"):
            self.transport.write(b"\n")  # a command stays on screen as typed
        else:
            self._clear(self.prompt + line)  # a message comes back as its "sent" line
        self._draw()
        self._put(line)

    def _edit(self, typed):
        self._clear()
        self.typed = typed
        self._draw()

    def _visible(self):
        if self._secret is not None:
            return self._secret[0]
        return self.prompt + self.typed

    def _clear(self, drawn=None):
        """Erase the input line, on every screen row it wrapped onto."""
        rows = max(_columns(self._visible() if drawn is None else drawn) - 1, 0) // max(self._width(), 1)
        self.transport.write(b"\r" + (b"\x1b[%dA" % rows if rows else b"") + b"\x1b[J")

    def _draw(self):
        self.transport.write(self._visible().encode("utf-8"))

    def read_secret(self, prompt):
        """Deferred: a line typed without echo; what was being typed comes back after it."""
        self._clear()
        self._secret = (prompt, Deferred(), self.typed)
        self.typed = ""
        self._draw()
        return self._secret[1]

    def set_prompt(self, prompt):
        if prompt != self.prompt:
            self._clear()
            self.prompt = prompt
            self._draw()

    def show(self, text):
        self._clear()
        self.transport.write(text.encode("utf-8") + b"\n")
        self._draw()

    def close(self):
        self._clear()
        return super().close()
