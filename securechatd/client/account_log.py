"""The client's check of its user's account log, and what it remembers between checks.

Each check reads the whole log from seq 0 (a user's log is small: logins and
security changes), asking first for the consistency proof from the tree
head remembered from the last check, and hands the pages to
securechatd.verify_log.replay (the offline verifier's own check, so the two
always agree). Only a log that checks is remembered: the newest tree head
and the user's last event (seq, hash), in a small 0600 file replaced
atomically. So once a client has seen a tree head, any later rewrite, drop,
reorder or fork of what it covered is named at the next check, and keeps
being named until the log checks again.
"""

import json
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from securechatd import commands
from securechatd.accountlog import Event, Known, parse_head
from securechatd.files import write_private
from securechatd.e2ee.encoding import Malformed
from securechatd.verify_log import Page, dumps, known_from_json, known_to_json, replay

STATE_FORMAT = "securechatd/account-log-state/v1"


@dataclass(frozen=True)
class Report:
    """What a check found: `events` (verify_log.Row, oldest first) verified up to the break named by
    `problem` (None when `verified`); `tree_size` the size of the newest tree head that checked."""

    verified: bool
    problem: str | None
    events: list
    tree_size: int


class AccountLogCheck:
    """Checks `username`'s account log against the pinned server key (32 bytes), remembering in `state_path`.

    `device_key`: as accountlog.check_entries takes it (the user's verified
    device chain), to check device-signed actions; `run`: how the checking
    runs off the reactor thread (deferToThread; tests run it at once).
    """

    def __init__(self, state_path, server_key_bytes, username, device_key=None, run=deferToThread):
        self.state_path = state_path
        self.server_key = bytes(server_key_bytes)
        self._key = Ed25519PublicKey.from_public_bytes(self.server_key)  # (ValueError at once if it is not a key)
        self.username = username
        self.device_key = device_key
        self._run = run
        self._checked = None  # (Known before, [Page], refused) of the last check, for export()

    def check(self, call):
        """Deferred of the Report; `call(command, **arguments)` is ChatClient.call. Errors other than
        the log's own (a lost connection) fail the Deferred and leave the state file as it was."""
        return Deferred.fromCoroutine(self._check(call))

    async def _check(self, call):
        try:
            known = self._load()
        except ValueError as problem:
            return Report(False, f"the account log's state file {self.state_path} cannot be used ({problem})", [], 0)
        pages, refused = await self._fetch(call, known)
        outcome = await self._run(replay, self._key, self.username, known, pages, refused, self.device_key)
        self._checked = (known, pages, refused)
        if outcome.problem is None:
            self._save(outcome.known)
        head = outcome.known.head
        return Report(outcome.problem is None, outcome.problem, outcome.rows, head.size if head else 0)

    async def _fetch(self, call, known):
        """Every page from seq 0, each proved from the head before it: ([Page], refused)."""
        pages, after, size = [], 0, known.head.size if known.head else 0
        while True:
            try:
                answer = await call(commands.GetAccountLog, after_seq=after, tree_size=size or None)
            except commands.InvalidArgument:
                if not size:
                    raise
                return pages, True  # its tree is smaller than the head `size` it showed before
            page = Page.from_answer(answer)
            pages.append(page)
            try:
                size = parse_head(page.tree_head).size
                last = Event.from_bytes(page.entries[-1].event).seq if page.entries else after
            except Malformed:
                return pages, False  # (replay names it)
            if not answer["has_more"] or last <= after:
                return pages, False
            after = last

    def export(self, path):
        """Write what the last check read as a self-contained file for securechatd-verify-log (0600)."""
        if self._checked is None:
            raise ValueError("nothing to export: check the log first")
        known, pages, refused = self._checked
        write_private(path, dumps(self.username, self.server_key, known, pages, refused))

    def _load(self):
        """The Known remembered (an empty one the first time); ValueError if the file is not usable."""
        try:
            with open(self.state_path, "rb") as f:
                state = json.loads(f.read())
        except FileNotFoundError:
            return Known()
        except OSError as problem:
            raise ValueError(problem.strerror) from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not {STATE_FORMAT}")
        if state.get("user") != self.username:
            raise ValueError(f"it is {state.get('user')!r}'s, not {self.username!r}'s")
        return known_from_json(state.get("known"))

    def _save(self, known):
        state = {"format": STATE_FORMAT, "user": self.username, "known": known_to_json(known)}
        write_private(self.state_path, json.dumps(state, sort_keys=True).encode("ascii"))

