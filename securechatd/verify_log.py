"""`securechatd-verify-log`: check an exported account log offline, and the check the client shares with it.

A client (securechatd/client/account_log.py) reads its user's whole account
log from seq 0, page by page (GetAccountLog), each page proved against a
signed tree head that extends the one before it, starting from the head it
remembered from its last check. replay() checks those pages with
securechatd/accountlog.py and, where they break, names the break in words a
user can act on; the client and this command call the same replay(), so they
say the same thing about the same bytes. The export file holds the pages as
the server sent them, with the server key and what the client remembered,
so anyone can check them again later without the server (docs/PROTOCOL.md,
"The client's account log check and its export file"). Stdlib, cryptography and accountlog.py: no Twisted,
no network.
"""

import argparse
import json
import sys
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import NamedTuple

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from securechatd.accountlog import (
    BadAction,
    BadTreeHead,
    Entry,
    Event,
    Inconsistent,
    Known,
    LogError,
    NotIncluded,
    ZERO_HASH,
    check_entries,
    check_tree_head,
    head_bytes,
    parse_head,
)
from securechatd.e2ee.encoding import Malformed

FORMAT = "securechatd/account-log-export/v1"
MAX_FILE = 64 * 1024 * 1024


class Row(NamedTuple):
    """One verified event as a person reads it."""

    seq: int
    time: str
    kind: str
    address: str
    device: str  # the device's id in hex, or "" (a session bound to no device)
    target: str
    signed: str  # "yes": the device signed it (checked against its key where the key was given)


@dataclass(frozen=True)
class Page:
    """One GetAccountLog answer, as sent: the signed head, the consistency proof to it, the entries."""

    tree_head: bytes
    consistency: bytes
    entries: tuple

    @classmethod
    def from_answer(cls, answer):
        entries = tuple(Entry(e["event"], e["leaf_index"], e["proof"]) for e in answer["events"])
        return cls(answer["tree_head"], answer["consistency"], entries)


@dataclass(frozen=True)
class Outcome:
    """What replay() found: the rows verified, what to remember (the last good state), the break or None."""

    rows: list
    known: Known
    problem: str | None


class _Break(Exception):
    """The sentence that names where the log breaks."""


def when(ms):
    """A time of the log (ms since the epoch) as people read it, in UTC: the same on every machine."""
    try:
        return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, ValueError, OSError):  # (a time no calendar holds: shown as it is)
        return f"{ms} ms"


def row(event):
    device = event.device.hex()
    return Row(event.seq, when(event.time_ms), event.kind, event.address, device, event.target,
               "yes" if event.action is not None else "no")  # fmt: skip


def replay(server_key, user, known, pages, refused=False, device_key=None):
    """Check `pages` of `user`'s log read from seq 0 against what the client knew (`known`): an Outcome.

    `server_key`: the Ed25519PublicKey pinned; `refused`: after the last page
    the server refused to prove the last head it showed (its tree is now
    smaller); `device_key`: as accountlog.check_entries takes it.
    """
    head, chain, rows = known.head, Known(), []
    parsed = [_parse(entry) for page in pages for entry in page.entries]
    try:
        if not pages and (not refused or head is None):
            raise _Break("the server answered with no tree head")
        for page in pages:
            head = _tree_head(server_key, page, head)
            for entry in page.entries:
                checked = _entry(user, entry, head, chain, parsed[len(rows) + 1 :], device_key)
                if checked.seq == known.seq and checked.hash != known.hash:
                    raise _Break(f"event #{checked.seq} was rewritten since it was seen in {_seen(known.head)}")
                chain = checked
                rows.append(row(parsed[len(rows)]))
        if refused:
            raise _Break(f"the server's log was cut: it no longer holds {_seen(head)}")
        if chain.seq < known.seq:
            raise _Break(_missing(chain.seq + 1, known.seq) + f" (seen in {_seen(known.head)})")
    except _Break as problem:
        return Outcome(rows, replace(chain, head=head), str(problem))
    return Outcome(rows, replace(chain, head=head), None)


def _seen(head):
    return f"the tree head of size {head.size} signed {when(head.timestamp_ms)}"


def _missing(first, last):
    return f"event #{first} is missing" if first == last else f"events #{first} to #{last} are missing"


def _parse(entry):
    try:
        return Event.from_bytes(entry.event)
    except Malformed:
        return None


def _tree_head(server_key, page, before):
    try:
        return check_tree_head(server_key, page.tree_head, before, page.consistency)
    except BadTreeHead as problem:
        raise _Break(f"the server's tree head is not valid: {problem}")
    except Inconsistent:
        head = parse_head(page.tree_head)  # (signed: only the proof failed)
        if head.size < before.size:
            raise _Break(
                f"the server's log was cut: its tree of {head.size} leaves is smaller than {_seen(before)}"
            ) from None
        raise _Break(
            f"the server's log was forked: the tree head of size {head.size} is not consistent with {_seen(before)}"
        ) from None


def _entry(user, entry, head, chain, later, device_key):
    """check_entries for one entry; a LogError becomes the sentence naming the break (`later`: the events after it)."""
    try:
        return check_entries(user, [entry], head, chain, device_key)
    except NotIncluded:
        event = Event.from_bytes(entry.event)
        raise _Break(f"event #{event.seq} was rewritten: it is not the event the signed tree holds") from None
    except BadAction as problem:
        raise _Break(f"a device's action was forged: {problem}") from None
    except LogError as problem:
        raise _Break(_chain_break(user, entry, chain, later) or str(problem)) from None


def _chain_break(user, entry, chain, later):
    """Why `entry` does not follow event `chain.seq`: dropped, reordered or rewritten (None: not its place)."""
    event = _parse(entry)
    if event is None or event.user != user:
        return None
    expected = chain.seq + 1
    if event.seq > expected:
        if any(e is not None and e.seq == expected for e in later):
            return f"the log was reordered: event #{event.seq} comes before event #{expected}"
        return _missing(expected, event.seq - 1)
    if event.seq < expected:
        return f"the log was reordered: event #{event.seq} comes after event #{chain.seq}"
    if event.prev != chain.hash:
        if chain.seq == 0:
            return "event #1 was rewritten: it does not start the chain"
        return f"event #{chain.seq} was rewritten: event #{event.seq} follows another version of it"
    return None


# -- the export file ------------------------------------------------------------------------


def known_to_json(known):
    """The JSON object of a Known, as the state and export files keep it."""
    return {
        "tree_head": head_bytes(known.head).hex() if known.head else None,
        "seq": known.seq,
        "hash": known.hash.hex(),
    }


def known_from_json(data):
    """The Known of known_to_json(); ValueError if `data` is not one."""
    try:
        head, seq = data["tree_head"], _count(data["seq"])
        if seq and not head:
            raise TypeError("an event seen is seen in a tree head")
        return Known(seq, _hash(data["hash"]), parse_head(bytes.fromhex(head)) if head else None)
    except (KeyError, TypeError, AttributeError) as problem:
        raise ValueError(f"not a remembered log state ({type(problem).__name__}: {problem})") from None


def dumps(user, server_key, known, pages, refused):
    """The export file's bytes: canonical JSON (sorted keys, no spaces, ASCII), bytes in hex."""
    document = {
        "format": FORMAT,
        "user": user,
        "server_key": server_key.hex(),
        "known": known_to_json(known),
        "pages": [
            {
                "tree_head": page.tree_head.hex(),
                "consistency": page.consistency.hex(),
                "events": [
                    {"event": e.event.hex(), "leaf_index": e.leaf_index, "proof": e.proof.hex()} for e in page.entries
                ],
            }
            for page in pages
        ],
        "refused": refused,
    }
    return (json.dumps(document, sort_keys=True, separators=(",", ":")) + "\n").encode("ascii")


def loads(data):
    """(user, server key bytes, Known, [Page], refused) of an export file; ValueError if it is not one."""
    try:
        document = json.loads(data)
        if document["format"] != FORMAT or not isinstance(document["user"], str):
            raise ValueError(f"not {FORMAT}")
        pages = [
            Page(
                bytes.fromhex(page["tree_head"]),
                bytes.fromhex(page["consistency"]),
                tuple(
                    Entry(bytes.fromhex(e["event"]), _count(e["leaf_index"]), bytes.fromhex(e["proof"]))
                    for e in page["events"]
                ),
            )
            for page in document["pages"]
        ]
        known = known_from_json(document["known"])
        return document["user"], bytes.fromhex(document["server_key"]), known, pages, document["refused"] is True
    except (KeyError, TypeError, AttributeError) as problem:
        raise ValueError(f"not an account log export ({type(problem).__name__}: {problem})") from None


def _count(value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TypeError("a seq or leaf index is an integer of 0 or more")
    return value


def _hash(text):
    value = bytes.fromhex(text)
    if len(value) != len(ZERO_HASH):
        raise TypeError("a hash is 32 bytes")
    return value


# -- the command --------------------------------------------------------------------------


def _server_key(text):
    try:
        data = bytes.fromhex(text)
        if len(data) != 32:
            raise ValueError
        return data
    except ValueError:
        raise argparse.ArgumentTypeError("the server key is 64 hex digits") from None


def _tree_head_arg(text):
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise argparse.ArgumentTypeError("a tree head is hex digits") from None


def _parser():
    parser = argparse.ArgumentParser(prog="securechatd-verify-log", description="Check an exported account log offline.")
    parser.add_argument("file", help="the file written by securechat's account log export")
    parser.add_argument("--server-key", type=_server_key, help="the server's public key (64 hex digits), from its operator")
    parser.add_argument(
        "--known-head", type=_tree_head_arg,
        help="a tree head (hex) you kept from before: the log must extend it",
    )  # fmt: skip
    return parser


def main(argv=None, stdout=None, stderr=None):
    """Exit 0: verified; 1: the log is broken; 2: the file or the arguments cannot be used."""
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    try:
        args = _parser().parse_args(argv)
    except SystemExit as stop:
        return stop.code
    try:
        with open(args.file, "rb") as f:
            data = f.read(MAX_FILE + 1)
        if len(data) > MAX_FILE:
            raise ValueError(f"larger than {MAX_FILE} bytes")
        user, file_key, known, pages, refused = loads(data)
        key = Ed25519PublicKey.from_public_bytes(args.server_key or file_key)
    except (OSError, ValueError) as problem:
        print(f"securechatd-verify-log: {args.file}: {getattr(problem, 'strerror', None) or problem}", file=stderr)
        return 2
    if args.server_key is None:
        print(f"server key {file_key.hex()}: taken from the file (give --server-key to check it)", file=stdout)
    elif args.server_key != file_key:
        print(f"BROKEN: the file's server key {file_key.hex()} is not the one given", file=stdout)
        return 1
    if args.known_head is not None:
        try:
            known = replace(known, head=check_tree_head(key, args.known_head))
        except BadTreeHead as problem:
            print(f"BROKEN: the --known-head is not valid: {problem}", file=stdout)
            return 1
    outcome = replay(key, user, known, pages, refused)
    for r in outcome.rows:
        signed = "signed by the device" if r.signed == "yes" else ""
        print(f"#{r.seq:<4} {r.time}  {r.kind:<19} {r.address:<15} {r.device or '-':<32} {r.target} {signed}".rstrip(),
              file=stdout)  # fmt: skip
    if outcome.problem is not None:
        print(f"BROKEN: {outcome.problem}", file=stdout)
        return 1
    print(f"verified: {len(outcome.rows)} events of {user}, in the tree of {outcome.known.head.size} leaves"
          f" signed {when(outcome.known.head.timestamp_ms)}", file=stdout)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
