"""`securechat`: chat on a securechatd server from a terminal, or from a script with --batch.

Chat runs typed commands on a ChatClient and turns every answer and server
push into a record (a dict), which a person sees through ui.render and a
script gets as one JSON line. The server's certificate is checked before any
password is asked for or sent.
"""

import configparser
import os
import sys
import termios
import tty
from contextlib import contextmanager
from collections import Counter, OrderedDict
from dataclasses import replace
from datetime import datetime, timezone

from twisted.internet import task
from twisted.internet.defer import Deferred, DeferredLock, TimeoutError as WaitTimeout, succeed
from twisted.internet.error import ConnectError, ConnectionClosed, ConnectionRefusedError, DNSLookupError
from twisted.internet.stdio import StandardIO
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.python import usage
from twisted.python.failure import Failure

import securechatd
from securechatd import commands, config
from securechatd.certs import CA_CERT, CertError
from securechatd.client import ui
from securechatd.client.crypto import EncryptionUnavailable
from securechatd.files import write_private
from securechatd.client.library import ChatClient, MalformedAnswer, RefusedAtTLS, TLSHandshakeFailed
from securechatd.client.transcripts import ExportError
from securechatd.commands import ChatError, MessageTooLarge, NoSuchConversation
from securechatd.e2ee.membership import ModeError

log = Logger()

HISTORY = 20  # messages shown by /history without N
RECENT = 2000  # messages remembered for /reply
WAIT_TIMEOUT = 30  # seconds /wait waits without TIMEOUT
SETTLE = 10  # seconds /quit waits for the commands still running


class LocalError(Exception):
    """A problem the client finds by itself, with a code in the style of the server's."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def describe(error):
    """(code, one sentence) for anything a command can fail with."""
    if isinstance(error, ChatError):
        return error.code.decode(), str(error)
    if isinstance(error, LocalError):
        return error.code, str(error)
    if isinstance(error, ui.UsageError):
        return "USAGE", str(error)
    if isinstance(error, ExportError):
        return "EXPORT", str(error)
    if isinstance(error, ModeError):
        return "MODE", f"{str(error).split(': ', 1)[-1].capitalize()}."
    if isinstance(error, EncryptionUnavailable):
        return "NO_DEVICE", str(error)
    if isinstance(error, RefusedAtTLS):
        return "TLS_REFUSED", _tls_refusal(error.alert)
    if isinstance(error, MalformedAnswer):
        return "BAD_ANSWER", str(error)
    if isinstance(error, ConnectionClosed):
        return "DISCONNECTED", "Not connected to the server."
    return "INTERNAL", f"Unexpected problem: {type(error).__name__}: {error} (--debug logs the details)."


def _tls_refusal(alert):
    """What to do about a server that ended the connection with a TLS alert: it refused our client certificate."""
    if "certificate required" in alert:
        return (
            "The server requires a client certificate: give yours with --cert FILE --key FILE"
            " (the operator makes one with securechatd-admin certs --client USER)."
        )
    return (
        f"The server refused your client certificate ({alert}): it must be issued by the CA the server"
        " trusts for client certificates, and not expired."
    )


class Chat:
    """One person's session: typed lines in; answers and events out as records.

    In --batch (and whenever input is not a terminal) each line is run to the
    end before the next is read, so a script reads as it runs; at a terminal
    lines run at once, so a slow answer holds up nothing.
    """

    def __init__(self, client, console, clock, *, password=None, user=None, batch=False, keep_going=False):
        self.client = client
        self.console = console
        self.clock = clock
        self.password = password  # from --password-file or SECURECHAT_PASSWORD
        self.default_user = user
        self.batch = batch
        self.keep_going = keep_going
        self.failed = False
        self.done = Deferred()  # fires with the exit status
        self.offline = False  # the connection is lost and being re-established
        self.conversations = {}  # id -> library Conversation, kept up to date
        self.current = None
        self._mine = {}  # conversation id -> {seq: message id} of our messages
        self._recent = OrderedDict()  # message id -> (conversation id, sender, body), the newest RECENT: for /reply
        self._marks = {}  # (conversation id, reader, state) -> seq shown so far
        self._busy = 0  # commands running
        self._idle = []  # Deferreds of a /quit waiting for the other commands
        self._pushes = DeferredLock()  # pushes are shown one at a time, in order
        self._arrived, self._claimed, self._waiters = Counter(), Counter(), []
        client.on_deliver = self._push(self._delivered)
        client.on_receipt = self._push(self._receipt)
        client.on_presence = self._push(self._presence)
        client.on_conversation = self._push(self._conversation)
        client.on_reconnected = self._push(self._reconnected)
        client.on_disconnected = self._disconnected
        client.on_logged_out = self._logged_out
        client.on_alarm = self._alarm
        client.on_devices_changed = self._devices_changed
        client.on_transcript_signed = self._push(self._transcript_signed)
        client.second_factor = self._ask_code
        client.enrol = self._enrol_at_login
        client.on_recovery_codes = lambda codes: self.emit(
            {"event": "recovery_codes", "recovery_codes": codes, "at": self._now()}
        )
        mode_changed = self._push(self._mode_changed)
        client.on_mode = lambda conversation_id, mode, actor: mode_changed((conversation_id, mode, actor))
        client.on_invited = self._push(self._invited)
        accepted = self._push(self._invitation_accepted)
        client.on_invitation_accepted = lambda conversation_id, user, added: accepted((conversation_id, user, added))

    # -- running -------------------------------------------------------------

    def run(self):
        """Deferred exit status: after /quit, the end of the input, or an error in --batch."""
        self._prompt()
        Deferred.fromCoroutine(self._read())
        return self.done

    def finish(self, status):
        if not self.done.called:
            self.done.callback(status)

    async def _read(self):
        if self.default_user is not None:
            await self.command("login", [])
        while not self.done.called:
            line = await self.console.next_line()
            if self.done.called:
                return
            if line is None:
                await self.command("quit", [])
                return
            running = Deferred.fromCoroutine(self.execute(line))
            if not self.console.interactive:
                await running

    async def execute(self, line):
        try:
            parsed = ui.parse(line)
        except ui.UsageError:
            self._error(line.split()[0].lstrip("/").lower(), Failure())
            return
        if parsed is not None:
            await self.command(*parsed)

    async def command(self, name, arguments):
        """Run one command; its failure is shown as one line, never raised."""
        self._busy += 1
        try:
            await getattr(self, "_do_" + name)(*arguments)
        except Exception:
            self._error(name, Failure())
        finally:
            self._busy -= 1
            if self._busy <= 1:
                idle, self._idle = self._idle, []
                for waiting in idle:
                    if not waiting.called:
                        waiting.callback(None)

    def _error(self, command, failure):
        code, message = describe(failure.value)
        if code == "INTERNAL":
            log.failure("/{command} failed", failure, command=command)
        self.failed = True
        self.emit({"event": "error", "command": command, "code": code, "message": message})
        if self.batch and not self.keep_going:
            self.finish(1)

    def emit(self, record):
        if self.batch:
            self.console.show(ui.to_json(record))
        else:
            self.console.show_record(record, self._now())
        self._prompt()

    def _answer(self, command, **fields):
        self.emit({"event": "answer", "command": command, **fields})

    def _prompt(self):
        name = self._name(self.current) if self.current is not None else None
        here = self.conversations[self.current].unread if self.current in self.conversations else 0
        total = sum(c.unread for c in self.conversations.values())
        conversation = self.conversations.get(self.current)
        mode = self.client.known_mode(self.current) if conversation is not None and conversation.encrypted else None
        self.console.set_prompt(ui.prompt(name, here, total - here, mode))

    def _now(self):
        return datetime.fromtimestamp(self.clock.seconds(), timezone.utc)

    # -- what we know ---------------------------------------------------------------

    def name(self, conversation_id):
        """What a person calls the conversation: the other person, or the group's title."""
        return self._name(conversation_id)

    def switch(self, conversation_id):
        """Make `conversation_id` current as /open does (None: no conversation); for window keys. Deferred."""
        if conversation_id is None:
            self.current = None
            self._prompt()
            return succeed(None)
        return Deferred.fromCoroutine(self.command("open", [f"#{conversation_id}"]))

    def _name(self, conversation_id):
        conversation = self.conversations.get(conversation_id)
        if conversation is None:
            return f"#{conversation_id}"
        return ui.conversation_name(conversation, self.client.username)

    async def _refresh(self):
        self.conversations = {c.conversation_id: c for c in await self.client.list_conversations()}
        if self.current not in self.conversations:
            self.current = None

    async def _know(self, conversation_id):
        if conversation_id not in self.conversations:
            await self._refresh()

    def _forget(self):
        self.conversations, self.current, self._mine, self._marks = {}, None, {}, {}
        self._recent.clear()

    def _remember(self, conversation_id, message_id, sender, body):
        self._recent[message_id] = (conversation_id, sender, body)
        self._recent.move_to_end(message_id)
        while len(self._recent) > RECENT:
            self._recent.popitem(last=False)

    def _logged_in(self):
        if self.client.username is None:
            raise LocalError("AUTH_REQUIRED", "Log in first: /login USER, or /register USER for a new account.")

    def _here(self):
        """The current conversation's id, or why there is none."""
        self._logged_in()
        if self.current is None:
            raise LocalError("NO_CONVERSATION", "There is no current conversation: /dm USER, /open NAME or /convs.")
        return self.current

    def _seen(self, conversation_id, message):
        """Note a message of the conversation (for unread counts and our own messages' receipts)."""
        if message.sender == self.client.username:
            self._mine.setdefault(conversation_id, {})[message.seq] = message.message_id
        conversation = self.conversations.get(conversation_id)
        if conversation is not None and message.seq > conversation.last_seq:
            unread = conversation.unread + (message.sender != self.client.username)
            self.conversations[conversation_id] = replace(conversation, last_seq=message.seq, unread=unread)

    def _message(self, conversation_id, message):
        body = message.body if message.body is not None else ""
        self._remember(conversation_id, message.message_id, message.sender, body)
        record = {
            "conversation_id": conversation_id,
            "conversation": self._name(conversation_id),
            "message_id": message.message_id,
            "seq": message.seq,
            "sender": message.sender,
            "body": body,
            "sent_at": message.sent_at,
        }
        if message.problem is not None:  # never dropped: shown as a message that could not be read, and why
            record.update(problem=message.problem, problem_detail=message.problem_detail)
        if message.chain is not None:  # what the conversation's chain says of it (docs/CLIENT.md)
            record.update(
                mode=message.mode, n=message.n, chain=message.chain, chain_problems=list(message.chain_problems)
            )
        return record

    # -- accounts ------------------------------------------------------------------

    def _user(self, user, command):
        user = user or self.default_user
        if user is None:
            raise ui.UsageError(f"usage: {ui.COMMANDS[command].usage} (or start securechat with --user NAME)")
        return user

    async def _secret(self, prompt):
        secret = await self.console.read_secret(prompt)
        if not secret:
            raise LocalError("CANCELLED", "No password was given.")
        return secret

    async def _new_password(self, prompt):
        password = await self._secret(prompt)
        if self.console.interactive and await self._secret("Again: ") != password:
            raise LocalError("PASSWORD_MISMATCH", "The two passwords differ.")
        return password

    async def _do_register(self, user=None, invite=None):
        user = self._user(user, "register")
        password = self.password or await self._new_password(f"New password for {user}: ")
        username = await self.client.register(user, password, invite)
        self._answer("register", username=username)
        await self._log_in(username, password)

    async def _do_login(self, user=None, code=None):
        user = self._user(user, "login")
        await self._log_in(user, self.password or await self._secret(f"Password for {user}: "), code)

    def _ask_code(self, username):
        """The second factor of a login (ChatClient.second_factor): asked without echo; in --batch the next line."""
        return Deferred.fromCoroutine(self._code(f"Two-factor code for {username} (or a recovery code): "))

    def _enrol_at_login(self, username, secret, uri):
        """The server requires two-factor login (ChatClient.enrol): show the new secret, ask a code of it."""
        self.emit({"event": "enrol", "username": username, "secret": secret, "uri": uri, "at": self._now()})
        return Deferred.fromCoroutine(self._code(f"Code from your authenticator app for {username}: "))

    async def _code(self, prompt, code=None):
        if code:
            return code
        code = (await self.console.read_secret(prompt) or "").strip()
        if not code:
            raise LocalError("CANCELLED", "No code was given.")
        return code

    async def _log_in(self, user, password, code=None):
        login = await self.client.login(user, password, **({"code": code} if code else {}))
        # What the server pushes after its answer is shown after this answer.
        await self._pushes.acquire()
        try:
            self._forget()
            self.default_user = login.username
            await self._refresh()
            unread = sum(c.unread for c in self.conversations.values())
            self._answer("login", username=login.username, conversations=len(self.conversations), unread=unread)
        finally:
            self._pushes.release()

    async def _do_logout(self):
        await self.client.logout()
        self._forget()
        self._answer("logout")

    async def _do_passwd(self):
        old = self.password or await self._secret("Current password: ")
        new = await self._new_password("New password: ")
        await self.client.change_password(old, new)
        if self.password is not None:
            self.password = new
        self._answer("passwd")

    # -- account security --------------------------------------------------------------

    async def _do_2fa(self, action="status", code=None):
        self._logged_in()
        if action == "status":
            status = await self.client.two_factor_status()
            self._answer("2fa", action=action, enabled=status["enabled"], required=status["required"],
                         recovery_codes_left=status["recovery_codes_left"])
        elif action == "enrol":
            secret, uri = await self.client.begin_two_factor()
            self._answer("2fa", action=action, secret=secret, uri=uri)
        elif action == "disable":
            await self.client.disable_two_factor(await self._code("Code (or a recovery code): ", code))
            self._answer("2fa", action=action)
        elif action == "confirm":
            password = self.password or await self._secret("Current password: ")
            code = await self._code("Code from your authenticator app: ", code)
            codes = await self.client.confirm_two_factor(code, password)
            self._answer("2fa", action=action, recovery_codes=codes)
        else:
            codes = await self.client.new_recovery_codes(await self._code("Code (or a recovery code): ", code))
            self._answer("2fa", action=action, recovery_codes=codes)

    async def _do_sessions(self):
        self._logged_in()
        sessions = await self.client.list_sessions()
        self._answer("sessions", sessions=[dict(s) for s in sessions])

    async def _do_endsession(self, session):
        self._logged_in()
        session = session.lower()
        if len(session) != 32:  # the start of an id, as /sessions shows it
            found = [s["session_id"] for s in await self.client.list_sessions() if s["session_id"].startswith(session)]
            if len(found) != 1:
                raise LocalError(
                    "NO_SUCH_SESSION",
                    f"No session id starts with {session!r}; /sessions lists them."
                    if not found
                    else f"More than one session id starts with {session!r}: give more of it.",
                )
            session = found[0]
        await self.client.end_session(session)
        self._answer("endsession", session_id=session)

    async def _do_security(self, export=None, path=None):
        self._logged_in()
        if export is not None:
            path = self._output_path(path, f"securechat-account-log-{self.client.username}", "json")
        with writing(path):
            report = await self.client.check_account_log(export_to=path)
        self._answer(
            "security",
            username=self.client.username,
            verified=report.verified,
            problem=report.problem,
            tree_size=report.tree_size,
            events=[row._asdict() for row in report.events],
            file=path,
        )

    async def _do_endsessions(self):
        self._logged_in()
        ended = await self.client.end_other_sessions()
        self._answer("endsessions", ended=ended)

    # -- people --------------------------------------------------------------------

    async def _do_users(self, prefix=None):
        users = await self.client.list_users(prefix, commands.USERS_LIMIT[1])
        self._answer("users", users=[{"username": name, "status": status} for name, status in users])

    async def _do_who(self):
        await self._refresh()
        me = self.client.username
        contacts = sorted({m for c in self.conversations.values() for m in c.members} - {me})
        rows = []
        per_call = commands.MAX_PRESENCE_NAMES
        for start in range(0, len(contacts), per_call):
            rows += await self.client.get_presence(contacts[start : start + per_call])
        presence = [
            {"username": p.username, "status": p.status, "note": p.note, "last_seen": p.last_seen} for p in rows
        ]
        self._answer("who", presence=presence)

    async def _do_privacy(self, setting=None, switch=None):
        self._logged_in()
        if setting is not None and switch is None:
            raise ui.UsageError(f"Say on or off: /privacy {setting} on, or /privacy {setting} off.")
        privacy = await self.client.set_privacy(**({ui.PRIVACY[setting]: switch == "on"} if setting else {}))
        self._answer(
            "privacy", hide_last_seen=privacy.hide_last_seen, appear_offline=privacy.appear_offline, changed=setting
        )

    async def _do_status(self, status, note=None):
        await self.client.set_presence(status, note)
        self._answer("status", status=status, note=note)

    # -- conversations ---------------------------------------------------------------

    async def _open(self, conversation_id):
        await self._know(conversation_id)
        self.current = conversation_id
        conversation = self.conversations.get(conversation_id)
        mode = None  # (plaintext, or no device here)
        if conversation is not None and conversation.encrypted:
            mode = await self.client.mode(conversation_id)
        fields = {"conversation_id": conversation_id, "conversation": self._name(conversation_id)}
        if mode is not None:
            fields["mode"] = mode
        return fields

    async def _do_dm(self, user, text=None):
        conversation_id, created = await self.client.create_conversation([user])
        fields = dict(await self._open(conversation_id), created=created)
        if text:
            fields.update(await self._send(conversation_id, text))
        self._answer("dm", **fields)

    async def _do_group(self, title, users):
        conversation_id, _ = await self.client.create_conversation(users, title=title)
        fields = await self._open(conversation_id)
        invited = sorted(row.username for row in await self.client.group_invitations(conversation_id))
        members = list(self.conversations[conversation_id].members)
        self._answer("group", **fields, members=members, invited=invited)

    async def _do_add(self, users):
        conversation_id = self._here()
        invited = await self.client.add_members(conversation_id, users)
        conversation = self.conversations[conversation_id]
        members = tuple(sorted(set(conversation.members) | (set(users) - set(invited))))
        self.conversations[conversation_id] = replace(conversation, members=members)
        self._answer(
            "add",
            conversation_id=conversation_id,
            conversation=self._name(conversation_id),
            members=list(members),
            invited=invited,
        )

    # -- invitations ----------------------------------------------------------------------

    def _group_here(self):
        """The current conversation's id if it is a group, or why invitations do not apply."""
        conversation_id = self._here()
        conversation = self.conversations.get(conversation_id)
        if conversation is not None and conversation.kind != "group":
            raise LocalError(
                "NOT_A_GROUP", "Nobody is invited to a direct conversation: /group TITLE USER... starts a group."
            )
        return conversation_id

    async def _do_invite(self, users):
        conversation_id = self._group_here()
        invited = await self.client.invite_members(conversation_id, users)
        name = self._name(conversation_id)
        self._answer("invite", conversation_id=conversation_id, conversation=name, invited=invited)

    async def _do_invitations(self):
        self._logged_in()
        fields = {"invitations": [invitation_fields(i) for i in await self.client.list_invitations()]}
        conversation = self.conversations.get(self.current)
        if conversation is not None and conversation.kind == "group":
            rows = await self.client.group_invitations(self.current)
            fields.update(
                conversation_id=self.current, conversation=self._name(self.current), group=[vars(r) for r in rows]
            )
        self._answer("invitations", **fields)

    async def _answer_invitation(self, command, conversation_id, accept):
        """/accept or /decline: the group's title is taken from the invitation before it is gone."""
        self._logged_in()
        invitations = {i.conversation_id: i for i in await self.client.list_invitations()}
        try:
            joined = await self.client.answer_invitation(conversation_id, accept)
        except NoSuchConversation:
            raise LocalError(
                "NO_SUCH_INVITATION", f"You have no invitation to #{conversation_id}; /invitations lists yours."
            )
        if joined:
            await self._refresh()
        invitation = invitations.get(conversation_id)
        name = self._name(conversation_id) if joined or invitation is None else ui.invitation_name(vars(invitation))
        self._answer(command, conversation_id=conversation_id, conversation=name, joined=joined)

    async def _do_accept(self, conversation_id):
        await self._answer_invitation("accept", conversation_id, True)

    async def _do_decline(self, conversation_id):
        await self._answer_invitation("decline", conversation_id, False)

    async def _do_leave(self):
        conversation_id = self._here()
        await self.client.leave_conversation(conversation_id)
        name = self._name(conversation_id)
        del self.conversations[conversation_id]
        self.current = None
        self._answer("leave", conversation_id=conversation_id, conversation=name)

    async def _do_convs(self):
        await self._refresh()
        rows = [
            {
                "conversation_id": c.conversation_id,
                "conversation": self._name(c.conversation_id),
                "kind": c.kind,
                "title": c.title,
                "members": list(c.members),
                "last_seq": c.last_seq,
                "unread": c.unread,
                "current": c.conversation_id == self.current,
                "encrypted": bool(c.encrypted),
                "verified": bool(c.encrypted)
                and all(self.client.is_verified(m) for m in c.members if m != self.client.username),
                "mode": self.client.known_mode(c.conversation_id) if c.encrypted else None,
            }
            for c in self.conversations.values()
        ]
        self._answer("convs", conversations=rows)

    def _find(self, target):
        """The id of the conversation `target` names (an id, a person, a title), or None."""
        number = target.lstrip("#")
        if number.isdigit():
            return int(number) if int(number) in self.conversations else None
        found = [i for i in self.conversations if self._name(i).lower() == target.lower()]
        if len(found) > 1:
            ids = ", ".join(f"#{i}" for i in found)
            raise LocalError("AMBIGUOUS", f"Several conversations are called {target}: {ids}; /open ID picks one.")
        return found[0] if found else None

    async def _do_open(self, target):
        self._logged_in()
        conversation_id = self._find(target)
        if conversation_id is None:
            await self._refresh()
            conversation_id = self._find(target)
        if conversation_id is None:
            raise LocalError(
                "NO_SUCH_CONVERSATION", f"You have no conversation {target}; /convs lists yours, /dm USER starts one."
            )
        fields = await self._open(conversation_id)
        unread = self.conversations[conversation_id].unread
        missed = []
        if unread:  # what came while away is what one opens a conversation to read
            page = await self.client.history(conversation_id, limit=min(unread, HISTORY))
            missed = [self._message(conversation_id, m) for m in page.messages]
        self._answer("open", **fields, unread=unread, messages=missed)

    # -- messages ------------------------------------------------------------------------

    async def _send(self, conversation_id, text):
        if self.conversations[conversation_id].unread:
            await self._mark_read(conversation_id)  # a reply shows what came before was read
        sent = await self.client.send_message(conversation_id, text)
        fields = {
            "message_id": sent.message_id,
            "seq": sent.seq,
            "sender": self.client.username,
            "body": text,
            "sent_at": sent.sent_at,
        }
        if sent.chain is not None:
            fields.update(mode=sent.mode, n=sent.n, chain=sent.chain)
        self._mine.setdefault(conversation_id, {})[sent.seq] = sent.message_id
        self._remember(conversation_id, sent.message_id, self.client.username, text)
        conversation = self.conversations.get(conversation_id)
        if conversation is not None and sent.seq > conversation.last_seq:
            self.conversations[conversation_id] = replace(conversation, last_seq=sent.seq)
        return fields

    async def _do_say(self, text):
        conversation_id = self._here()
        if self.offline:  # shown now, so the typing does not seem lost; sent when the connection is back
            self.emit(
                {
                    "event": "pending",
                    "conversation_id": conversation_id,
                    "conversation": self._name(conversation_id),
                    "sender": self.client.username,
                    "body": text,
                    "sent_at": self._now(),
                }
            )
        try:
            sent = await self._send(conversation_id, text)
        except MessageTooLarge:
            self.console.give_back(text)  # the text is not lost: it is back in the input line to shorten
            raise
        self._answer("say", conversation_id=conversation_id, conversation=self._name(conversation_id), **sent)

    async def _do_me(self, text):
        await self._do_say(ui.ACTION + text)

    async def _quoted(self, conversation_id, message_id):
        """(message id, conversation id, sender, body) of the message a /reply answers."""
        if message_id in self._recent:
            return (message_id, *self._recent[message_id])
        if message_id is None:
            for recent_id, quoted in reversed(self._recent.items()):
                if quoted[0] == conversation_id and quoted[1] != self.client.username:
                    return (recent_id, *quoted)
        page = await self.client.history(conversation_id, limit=100)
        for message in reversed(page.messages):
            if message.message_id == message_id or (message_id is None and message.sender != self.client.username):
                return message.message_id, conversation_id, message.sender, message.body
        if message_id is None:
            raise LocalError("NO_MESSAGE", "There is no message from someone else here to reply to.")
        raise LocalError("NO_MESSAGE", f"There is no message #{message_id} among the last 100 here.")

    async def _do_reply(self, message_id, text):
        message_id, conversation_id, sender, body = await self._quoted(self._here(), message_id)
        sent = await self._send(conversation_id, ui.quote(sender, body, text))
        self._answer(
            "say",
            conversation_id=conversation_id,
            conversation=self._name(conversation_id),
            reply_to=message_id,
            **sent,
        )

    async def _do_history(self, count=HISTORY):
        conversation_id = self._here()
        page = await self.client.history(conversation_id, limit=count)
        for message in page.messages:
            self._seen(conversation_id, message)
        self._answer(
            "history",
            conversation_id=conversation_id,
            conversation=self._name(conversation_id),
            messages=[self._message(conversation_id, m) for m in page.messages],
            has_more=page.has_more,
        )

    async def _mark_read(self, conversation_id):
        seq = self.conversations[conversation_id].last_seq
        await self.client.mark_read(conversation_id, seq)
        self.conversations[conversation_id] = replace(self.conversations[conversation_id], unread=0)
        return seq

    async def _do_read(self):
        conversation_id = self._here()
        seq = await self._mark_read(conversation_id)
        self._answer("read", conversation_id=conversation_id, conversation=self._name(conversation_id), seq=seq)

    async def _last_of_mine(self, conversation_id):
        if not self._mine.get(conversation_id):
            page = await self.client.history(conversation_id, limit=100)
            for message in page.messages:
                self._seen(conversation_id, message)
        mine = self._mine.get(conversation_id)
        if not mine:
            raise LocalError("NO_MESSAGE", "You have sent no message here yet; /receipts MSG names one.")
        return mine[max(mine)]

    async def _do_receipts(self, message_id=None):
        if message_id is None:
            conversation_id = self._here()
            message_id = await self._last_of_mine(conversation_id)
        else:
            mine = [c for c, messages in self._mine.items() if message_id in messages.values()]
            conversation_id = mine[0] if mine else self._here()
        rows = await self.client.get_receipts(conversation_id, message_id)
        self._answer(
            "receipts",
            conversation_id=conversation_id,
            conversation=self._name(conversation_id),
            message_id=message_id,
            receipts=[{"username": r.username, "delivered_at": r.delivered_at, "read_at": r.read_at} for r in rows],
        )

    # -- verifiable conversations (docs/CLIENT.md) -------------------------------------------------

    def _encrypted_here(self):
        conversation_id = self._here()
        conversation = self.conversations.get(conversation_id)
        if conversation is not None and not conversation.encrypted:
            raise LocalError("PLAINTEXT", "This conversation is not end-to-end encrypted: it has no signed chain.")
        return conversation_id

    async def _do_mode(self, mode=None):
        conversation_id = self._encrypted_here()
        if mode is None:
            current, changed = await self.client.mode(conversation_id), False
        else:
            current, changed = await self.client.set_mode(conversation_id, mode), True
        if current is None:
            raise LocalError("NO_DEVICE", self.client.encryption_problem or "This conversation has no mode here.")
        self._answer(
            "mode",
            conversation_id=conversation_id,
            conversation=self._name(conversation_id),
            mode=current,
            changed=changed,
        )

    async def _do_sign(self):
        conversation_id = self._encrypted_here()
        signed = await self.client.sign_transcript(conversation_id)
        if signed is None:
            mode = await self.client.mode(conversation_id)
            if mode == "deniable":
                raise LocalError("DENIABLE", "This conversation is deniable: nobody signs its transcript.")
            raise LocalError("NOTHING_TO_SIGN", "There is nothing here to sign yet.")
        name = self._name(conversation_id)
        self._answer("sign", conversation_id=conversation_id, conversation=name, n=signed.n, seq=signed.seq)

    async def _do_export(self, path=None):
        conversation_id = self._encrypted_here()
        exported = await self.client.export(conversation_id)
        path = self._output_path(path, f"securechat-{conversation_id}", "bundle")
        with writing(path):
            write_private(path, exported.data)
        self._answer(
            "export",
            conversation_id=conversation_id,
            conversation=self._name(conversation_id),
            file=path,
            links=exported.links,
            messages=exported.messages,
            disclosed=list(exported.disclosed),
            transcript_heads=exported.transcript_heads,
            left_out=list(exported.left_out),
        )

    def _output_path(self, path, stem, suffix):
        """Where an export goes: `path` (~ expanded), else STEM-TIME.SUFFIX in the current directory."""
        if path is None:
            path = f"{stem}-{self._now().strftime('%Y%m%d-%H%M%S')}.{suffix}"
        return os.path.abspath(os.path.expanduser(path))

    async def _do_serverkey(self, accept=None):
        self._logged_in()
        accepted = accept == "accept" and self.client.accept_server_key()
        if accept == "accept" and not accepted:
            raise LocalError("NOTHING_TO_ACCEPT", "The server gives the key this device pinned: nothing to accept.")
        pinned, other = self.client.server_key_ids()
        if pinned is None:
            raise LocalError("NO_SERVER_KEY", "No server key is pinned here (the server keeps no signed chains?).")
        self._answer("serverkey", key_id=pinned, other_key_id=other, accepted=accepted)

    async def _transcript_signed(self, signed):
        await self._conversation_event(
            "transcript_signed",
            signed.conversation_id,
            username=signed.username,
            device_id=signed.device_id,
            n=signed.n,
            seq=signed.seq,
            verified=signed.verified,
            problem=signed.problem,
        )

    async def _invited(self, invitation):
        self.emit({"event": "invited", **invitation_fields(invitation), "at": self._now()})
        self._arrive("invited")

    async def _invitation_accepted(self, accepted):
        conversation_id, username, added = accepted
        await self._conversation_event("invitation_accepted", conversation_id, username=username, added=added)

    async def _mode_changed(self, change):
        conversation_id, mode, actor = change
        await self._conversation_event("mode", conversation_id, mode=mode, by=actor)

    async def _conversation_event(self, event, conversation_id, **fields):
        """Show a push about a conversation (named as the user knows it) and count it for /wait."""
        await self._know(conversation_id)
        self.emit(
            {
                "event": event,
                "conversation_id": conversation_id,
                "conversation": self._name(conversation_id),
                **fields,
                "at": self._now(),
            }
        )
        self._arrive(event)

    # -- the rest ------------------------------------------------------------------------

    async def _do_help(self, command=None):
        self._answer("help", lines=ui.help_lines(command))

    async def _do_wait(self, event, count=1, timeout=WAIT_TIMEOUT):
        waiter = (event, count, Deferred())
        waiter[2].addTimeout(timeout, self.clock)
        self._waiters.append(waiter)
        self._wake()
        try:
            await waiter[2]
        except WaitTimeout:
            self._waiters.remove(waiter)
            came = self._arrived[event] - self._claimed[event]
            raise LocalError("TIMEOUT", f"Waited {timeout:g} s for {count} {event} event(s); {came} came.")
        self._answer("wait", awaited=event, count=count)

    def _arrive(self, event):
        # Counted on the next turn, after the push's acknowledgement is on its
        # way, so a command that /wait lets through is sent after it.
        def count():
            self._arrived[event] += 1
            self._wake()

        self.clock.callLater(0, count)

    def _wake(self):
        for waiter in list(self._waiters):
            event, count, arrived = waiter
            if self._arrived[event] - self._claimed[event] >= count:
                self._claimed[event] += count
                self._waiters.remove(waiter)
                arrived.callback(None)

    async def _do_quit(self):
        if self._busy > 1:  # a message typed just before may still be on its way
            idle = Deferred().addTimeout(SETTLE, self.clock)
            self._idle.append(idle)
            try:
                await idle
            except WaitTimeout:
                pass
        self._answer("quit")
        self.finish(1 if self.batch and self.failed else 0)

    # -- pushes from the server --------------------------------------------------------

    def _push(self, handler):
        """A library callback running `handler` after earlier pushes; a failure is shown, not raised.

        (A Deliver is acknowledged when this returns, so it is acknowledged once shown.)
        """

        def received(item):
            return self._pushes.run(handler, item).addErrback(lambda failure: self._error("push", failure))

        return received

    async def _delivered(self, message):
        conversation_id = message.conversation_id
        await self._know(conversation_id)
        self._seen(conversation_id, message)
        if self.current is None and conversation_id in self.conversations:
            self.current = conversation_id  # so a reply needs no /open
        self.emit({"event": "deliver", **self._message(conversation_id, message)})
        self._arrive("deliver")

    async def _receipt(self, receipt):
        conversation_id = receipt.conversation_id
        await self._know(conversation_id)
        message_ids = []
        if receipt.username == self.client.username:
            if receipt.state == "read":
                await self._refresh()  # read on another device: new unread counts
        else:
            key = (conversation_id, receipt.username, receipt.state)
            shown = self._marks.get(key, 0)
            mine = self._mine.get(conversation_id, {})
            message_ids = [mine[seq] for seq in sorted(mine) if shown < seq <= receipt.seq]
            self._marks[key] = max(shown, receipt.seq)
        self.emit(
            {
                "event": "receipt",
                "conversation_id": conversation_id,
                "conversation": self._name(conversation_id),
                "username": receipt.username,
                "state": receipt.state,
                "seq": receipt.seq,
                "at": receipt.at,
                "message_ids": message_ids,
            }
        )
        self._arrive("receipt")

    async def _presence(self, presence):
        self.emit(
            {
                "event": "presence",
                "username": presence.username,
                "status": presence.status,
                "note": presence.note,
                "at": presence.at,
            }
        )
        self._arrive("presence")

    async def _conversation(self, conversation):
        conversation_id = conversation.conversation_id
        known = self.conversations.get(conversation_id)
        before = set(known.members) if known is not None else set(conversation.members)
        name = ui.conversation_name(conversation, self.client.username)
        if self.client.username not in conversation.members:
            self.conversations.pop(conversation_id, None)
            if self.current == conversation_id:
                self.current = None
            change = "left"
        elif known is None:
            self.conversations[conversation_id] = conversation
            change = "new"
        else:
            self.conversations[conversation_id] = replace(known, members=conversation.members, title=conversation.title)
            change = "members"
        self.emit(
            {
                "event": "conversation",
                "conversation_id": conversation_id,
                "conversation": name,
                "kind": conversation.kind,
                "title": conversation.title,
                "members": list(conversation.members),
                "change": change,
                "joined": sorted(set(conversation.members) - before),
                "left": sorted(before - set(conversation.members) - {self.client.username}),
                "at": self._now(),
            }
        )
        self._arrive("conversation")

    def _alarm(self, kind, user, detail):
        """Something about the keys the user must know (a fork, an injected member, ...): always shown."""
        self.emit({"event": "alarm", "kind": kind, "user": user, "detail": detail, "at": self._now()})

    def _devices_changed(self, user, added, removed):
        self.emit(
            {
                "event": "devices",
                "user": user,
                "added": list(added),
                "removed": list(removed),
                "verified": False,
                "at": self._now(),
            }
        )

    # -- devices and verification ----------------------------------------------------

    async def _do_devices(self):
        self._logged_in()
        devices = await self.client.list_devices()
        rows = [{"device_id": d.device_id, "name": d.name, "this_device": d.this_device} for d in devices]
        self._answer("devices", devices=rows)

    async def _own_device(self, device):
        """The one device of the user whose id starts with `device`."""
        matches = [d for d in await self.client.list_devices() if d.device_id.startswith(device.lower())]
        if len(matches) != 1:
            raise LocalError(
                "NO_SUCH_DEVICE", f"{len(matches) or 'None'} of your devices start with {device}; /devices lists them."
            )
        return matches[0]

    async def _do_revoke(self, device):
        self._logged_in()
        found = await self._own_device(device)
        await self.client.revoke_device(found.device_id)
        self._answer("revoke", device_id=found.device_id, name=found.name)

    async def _do_name(self, device, name):
        self._logged_in()
        found = await self._own_device(device)
        await self.client.rename_device(found.device_id, name)
        self._answer("name", device_id=found.device_id, name=name)

    async def _do_verify(self, user):
        self._logged_in()
        user = user.lower()
        number = await self.client.safety_number(user)
        self._answer("verify", user=user, safety_number=number, verified=self.client.is_verified(user))

    async def _do_trust(self, user):
        self._logged_in()
        user = user.lower()
        await self.client.trust(user)
        self._answer("trust", user=user)

    async def _do_link(self):
        """On a new installation: the request to approve elsewhere; once approved, the device starts work."""
        self._logged_in()
        if await self.client.complete_link():
            self._answer("link", linked=True, device_id=self.client.device_id)
            return
        request = await self.client.link_request()
        self._answer("link", linked=False, request=request)

    async def _do_approve(self, request):
        self._logged_in()
        device_id, name = await self.client.link_new_device(request)
        self._answer("approve", device_id=device_id, name=name)

    async def _reconnected(self, login):
        self.offline = False
        await self._refresh()
        self.emit({"event": "reconnected", "username": login.username, "at": self._now()})

    def _disconnected(self, reason):
        refused = reason.check(RefusedAtTLS)  # (not reconnected: the certificate would be refused again)
        if self.batch or refused:  # no reconnecting in --batch: a script should know at once
            lost = reason if refused else Failure(LocalError("DISCONNECTED", "The connection to the server was lost."))
            self._error("connection", lost)
            if self.batch:
                self.finish(1)
        else:
            self.offline = True
            self.emit({"event": "disconnected", "message": reason.getErrorMessage(), "at": self._now()})

    def quiet(self):
        """Show no more disconnects: the program is ending (Ctrl-C stops the reactor first)."""
        self.client.on_disconnected = lambda reason: None

    def _logged_out(self, reason):
        self._forget()
        self.emit({"event": "logged_out", "message": reason, "at": self._now()})


def invitation_fields(invitation):
    """A library Invitation as a record's fields (`encrypted` a plain yes or no)."""
    return dict(vars(invitation), encrypted=bool(invitation.encrypted))


@contextmanager
def writing(path):
    """An OSError while writing `path` (or a file it needs) as the EXPORT error a person reads."""
    try:
        yield
    except OSError as problem:
        raise LocalError("EXPORT", f"Cannot write {problem.filename or path}: {problem.strerror}.")


# -- the program -----------------------------------------------------------------------


NOTIFY = ("auto", "bell", "desktop", "both", "none")


def _yes_no(text):
    value = {"yes": True, "true": True, "on": True, "1": True, "no": False, "false": False, "off": False, "0": False}
    if text.strip().lower() not in value:
        raise ValueError(f"must be yes or no, not {text!r}")
    return value[text.strip().lower()]


def _notify(text):
    if text.strip().lower() not in NOTIFY:
        raise ValueError(f"must be one of {', '.join(NOTIFY)}, not {text!r}")
    return text.strip().lower()


def _port(text):
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise ValueError(f"must be from 1 to 65535, not {text!r}")
    return port


# Every setting of the client's config file: (section, key) -> (option it stands for, conversion).
CONFIG = {
    ("server", "host"): ("host", str.strip),
    ("server", "port"): ("port", _port),
    ("server", "ca"): ("ca", lambda text: os.path.expanduser(text.strip())),
    ("account", "user"): ("user", str.strip),
    ("account", "cert"): ("cert", lambda text: os.path.expanduser(text.strip())),
    ("account", "key"): ("key", lambda text: os.path.expanduser(text.strip())),
    ("ui", "color"): ("color", _yes_no),
    ("ui", "plain"): ("plain", _yes_no),
    ("ui", "notify"): ("notify", _notify),
    ("ui", "highlight"): ("highlight", lambda text: tuple(w.strip() for w in text.split(",") if w.strip())),
}


def config_path(environ):
    """The client's config file: $XDG_CONFIG_HOME/securechat/config.ini, else ~/.config/securechat/config.ini."""
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "securechat", "config.ini")


def read_config(path, required=False):
    """{option: value} from the client's config file; a missing file is empty unless `required`.

    A bad file is a usage.UsageError naming the file and the setting.
    """
    parser = configparser.ConfigParser(interpolation=None, default_section="\0")
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except FileNotFoundError:
        if required:
            raise usage.UsageError(f"there is no config file {path}")
        return {}
    except (OSError, UnicodeDecodeError, configparser.Error) as problem:
        raise usage.UsageError(f"cannot read {path}: {str(problem).splitlines()[0]}")
    values = {}
    for section in parser.sections():
        for key, text in parser.items(section):
            if (section, key) not in CONFIG:
                known = ", ".join(f"[{s}] {k}" for s, k in CONFIG)
                raise usage.UsageError(f"{path}: there is no setting [{section}] {key} (known: {known})")
            option, convert = CONFIG[section, key]
            try:
                values[option] = convert(text)
            except ValueError as problem:
                raise usage.UsageError(f"{path}: [{section}] {key} {problem}")
    return values


# What an option is when neither the command line nor the config file says.
DEFAULTS = {
    "host": "localhost",
    "port": config.Settings.port,
    "ca": os.path.join(config.Settings.certs, CA_CERT),
    "user": None,
    "cert": None,
    "key": None,
    "color": True,
    "plain": False,
    "notify": "auto",
    "highlight": (),
}


class Options(usage.Options):
    synopsis = (
        "Usage: securechat [--host H] [--port P] [--ca FILE] [--user NAME] [--password-file FILE] "
        "[--cert FILE --key FILE] [--plain] [--no-color] [--config FILE] [--batch [--keep-going]]"
    )
    longdesc = (
        "Chat on a securechatd server; type /help once connected. A password is asked without echo, "
        "or read from --password-file or the SECURECHAT_PASSWORD environment variable, never from the "
        "command line. At a terminal the client is full-screen (a window per conversation); with --plain, "
        "or TERM=dumb, it is line by line. With --batch, commands come from standard input and every "
        "answer and event is written as one JSON object per line. Settings not given here come from "
        "the config file ($XDG_CONFIG_HOME/securechat/config.ini; see docs/CLIENT.md)."
    )
    optParameters = [
        ["host", None, None, "The server's host name; its certificate must name it. [default: localhost]"],
        ["port", None, None, f"The server's port. [default: {config.Settings.port}]", int],
        ["ca", None, None, f"The CA certificate that signed the server's. [default: {DEFAULTS['ca']}]"],
        ["user", None, None, "Log in as NAME at start."],
        ["password-file", None, None, "Take the password from the first line of FILE."],
        ["cert", None, None, "Present the client certificate in FILE (PEM), for a server that asks for one."],
        ["key", None, None, "The private key (PEM) of the --cert certificate."],
        ["config", None, None, "Read settings from FILE instead of $XDG_CONFIG_HOME/securechat/config.ini."],
    ]
    optFlags = [
        ["batch", None, "Commands from standard input, JSON lines out; stop at the first error."],
        ["keep-going", None, "With --batch, go on after errors (the exit status is still 1)."],
        ["plain", None, "At a terminal, line by line instead of full-screen (as with TERM=dumb)."],
        ["no-color", None, "No colours (as with NO_COLOR set)."],
        ["debug", None, "Log the details of unexpected problems to standard error."],
    ]

    def __init__(self, environ=None):
        super().__init__()
        self.environ = os.environ if environ is None else environ

    def opt_version(self):
        """Print securechat's version and exit (usage.Options would print Twisted's)."""
        sys.stdout.write(f"securechat {securechatd.__version__}\n")
        sys.exit(0)

    def postOptions(self):
        # The command line wins over the config file, which wins over the defaults.
        configured = read_config(self["config"] or config_path(self.environ), required=self["config"] is not None)
        for name in ("host", "port", "ca", "user", "cert", "key"):
            if self[name] is None:
                self[name] = configured.get(name, DEFAULTS[name])
        colour = configured.get("color", DEFAULTS["color"])
        self["color"] = colour and not self["no-color"] and not self.environ.get("NO_COLOR")
        self["plain"] = self["plain"] or configured.get("plain", DEFAULTS["plain"])
        self["notify"] = configured.get("notify", DEFAULTS["notify"])
        self["highlight"] = configured.get("highlight", DEFAULTS["highlight"])
        if not 0 < self["port"] < 65536:
            raise usage.UsageError("--port must be from 1 to 65535")
        if (self["cert"] is None) != (self["key"] is None):
            raise usage.UsageError("--cert and --key go together: a client certificate and its private key")
        if self["keep-going"] and not self["batch"]:
            raise usage.UsageError("--keep-going goes with --batch")
        if self["user"] is not None:
            self["user"] = self["user"].lower()


def full_screen(options, environ):
    """Whether a person at a terminal gets the full-screen client (else the line-by-line one)."""
    return not options["plain"] and environ.get("TERM", "dumb") not in ("", "dumb")


def configured_password(path, environ):
    """The password given for scripts (--password-file, else SECURECHAT_PASSWORD), or None."""
    if path is None:
        return environ.get("SECURECHAT_PASSWORD") or None
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().rstrip("\r\n") or None
    except OSError as problem:
        raise LocalError("PASSWORD_FILE", f"Cannot read the password file {path}: {problem.strerror}.")


def _handshake_problem(host, port, ca, detail):
    if "certificate verify failed" in detail:
        return LocalError(
            "CERTIFICATE",
            f"Certificate problem: the certificate of {host}:{port} is not signed by the CA in {ca}, "
            "or it has expired.",
        )
    if "Mismatch" in detail:
        return LocalError("CERTIFICATE", f"Certificate problem: the server's certificate is not for {host}.")
    return LocalError("TLS", f"TLS problem: the handshake with {host}:{port} failed ({detail}).")


def state_directory(host, port, environ):
    """Where this installation keeps its files for one server: $XDG_DATA_HOME/securechat/HOST-PORT."""
    data = environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data, "securechat", f"{host}-{port}")


async def connect(reactor, host, port, ca, reconnect, cert=None, key=None):
    """A ChatClient connected to a verified server (presenting the client certificate `cert` with its `key`,
    if given), or a LocalError saying why not."""
    try:
        client = ChatClient(
            host,
            port,
            ca,
            client_name="securechat",
            reactor=reactor,
            reconnect=reconnect,
            state_directory=state_directory(host, port, os.environ),
            client_cert=cert,
            client_key=key,
        )
        await client.connect()
    except CertError as problem:
        mine = cert is not None and (cert in str(problem) or key in str(problem))
        hint = "--ca FILE names the server's CA"
        if mine:
            hint = "--cert and --key name your client certificate and its key"
        raise LocalError("CERTIFICATE", f"Certificate problem: {problem} ({hint}).")
    except TLSHandshakeFailed as problem:
        raise _handshake_problem(host, port, ca, str(problem))
    except ConnectionRefusedError:
        raise LocalError("CONNECTION", f"Cannot connect to {host}:{port}: refused; is securechatd running there?")
    except DNSLookupError:
        raise LocalError("CONNECTION", f"Cannot connect to {host}:{port}: no such host.")
    except ConnectError as problem:
        raise LocalError("CONNECTION", f"Cannot connect to {host}:{port}: {problem}")
    return client


def _report(problem, batch):
    """A problem that ends the program, as one line."""
    code, message = describe(problem)
    if batch:
        sys.stdout.write(ui.to_json({"event": "error", "command": "connect", "code": code, "message": message}) + "\n")
    else:
        sys.stderr.write(f"securechat: {ui.clean(message)}\n")


CLOSED_PIPE = 128 + 13  # the status a shell shows for a program killed by SIGPIPE

async def _session(reactor, options, interactive):
    try:
        password = configured_password(options["password-file"], os.environ)
        client = await connect(
            reactor,
            options["host"],
            options["port"],
            options["ca"],
            not options["batch"],
            options["cert"],
            options["key"],
        )
    except Exception as problem:
        if not isinstance(problem, LocalError):
            log.failure("starting", Failure())
        _report(problem, options["batch"])
        raise SystemExit(1)
    if interactive and full_screen(options, os.environ):
        from securechatd.client import tui  # (urwid is imported only for the full-screen client)

        console = tui.Tui(
            reactor, color=options["color"], notify=options["notify"], highlight=options["highlight"]
        )
        console.start()
        reactor.addSystemEventTrigger("before", "shutdown", console.stop)  # Ctrl-C: the terminal back first
        global _show_problem
        _show_problem = console.problem
    else:
        if interactive:
            tty.setcbreak(0)
        console = ui.Terminal() if interactive else ui.Console()
        StandardIO(console, reactor=reactor)
    chat = Chat(
        client,
        console,
        reactor,
        password=password,
        user=options["user"],
        batch=options["batch"],
        keep_going=options["keep-going"],
    )
    if hasattr(console, "attach"):
        console.attach(chat)
    reactor.addSystemEventTrigger("before", "shutdown", chat.quiet)
    console.output_lost.addCallback(lambda _: chat.finish(CLOSED_PIPE))
    status = await chat.run()
    await client.close()
    await console.close()
    raise SystemExit(status)


def _show_problem(text):
    sys.stderr.write(f"securechat: {text}\n")


def _one_line(event):
    """Without --debug, a failure that no command reported is one line (on stderr, or in the full-screen
    client's status window), not a traceback."""
    failure = event.get("log_failure")
    if failure is not None and event.get("log_namespace") != __name__:
        _show_problem(ui.clean(f"unexpected problem: {failure.getErrorMessage()} (--debug shows more)"))


def main(argv=None):
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as problem:
        sys.stderr.write(f"securechat: {problem} (securechat --help lists the options)\n")
        sys.exit(1)
    observer = textFileLogObserver(sys.stderr) if options["debug"] else _one_line
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    interactive = not options["batch"] and os.isatty(0)
    blocking = [(fd, os.get_blocking(fd)) for fd in (0, 1)]
    terminal = termios.tcgetattr(0) if interactive else None
    try:
        task.react(_session, (options, interactive))
    finally:
        # StandardIO leaves its descriptors non-blocking and Ctrl-C skips the
        # console's own clean-up: give the shell back what it lent.
        if terminal is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, terminal)
            os.write(1, b"\r\x1b[J")
        for fd, was_blocking in blocking:
            os.set_blocking(fd, was_blocking)
