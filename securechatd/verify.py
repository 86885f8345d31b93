"""securechatd-verify: check an exported conversation bundle offline.

    securechatd-verify BUNDLE [--server-key KEY] [--trust USER:FINGERPRINT ...]

A second implementation of the bundle format, written from docs/E2EE.md
("Verifying a bundle" and the sections it names) alone. It imports nothing
from securechatd on purpose: if the client's code and this module disagree,
one of them is wrong, and the golden vectors say which. Standard library and
`cryptography` only; no network, no clock.

It follows the doc's eleven steps in order and stops at the first failure,
naming the item. Exit status: 0 every check passed, 1 the bundle is broken,
2 a usage error or a file that cannot be read.
"""

import argparse
import hashlib
import hmac
import json
import re
import struct
import sys
import textwrap
from datetime import datetime, timedelta, timezone

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

FORMAT = "securechatd-bundle/v1"
SUITE = b"securechatd-e2ee-v1"
MAX_INT = 2**53 - 1  # the bundle's integers: JSON numbers any reader holds exactly
MAX_FILE = 1 << 28  # 256 MiB: far above any real conversation, below running out of memory
ATTESTABLE, DENIABLE = b"attestable", b"deniable"
CLOCK_SKEW_MS = 5 * 60 * 1000  # client_time further than this from server_time is reported
USER_NAME = re.compile(r"[a-z][a-z0-9_.-]{2,31}")  # PROTOCOL.md's stored form
HEX = re.compile(r"(?:[0-9a-f]{2})*")
ZERO32 = bytes(32)


class Broken(Exception):
    """The bundle fails a check. The message names the first broken item."""

    def __init__(self, step, message):
        super().__init__(message)
        self.step = step


class UsageError(Exception):
    """A bad argument or an unreadable file: exit status 2, not a verdict on a bundle."""


# -- Encoding (docs/E2EE.md "Encoding") ----------------------------------------


def enc(fields):
    return b"".join(struct.pack(">I", len(f)) + f for f in fields)


def dec(data):
    """The fields of enc(fields), or None if `data` is not exactly that."""
    fields, i = [], 0
    while i < len(data):
        if len(data) - i < 4:
            return None
        (size,) = struct.unpack(">I", data[i : i + 4])
        i += 4
        if size > len(data) - i:
            return None
        fields.append(data[i : i + size])
        i += size
    return fields


def H(label, fields):
    return hashlib.sha256(label.encode("ascii") + enc(fields)).digest()


def in_batch(leaf, index, size, path, root):
    """Whether `path` leads from the leaf hash at `index` of a batch of `size` heads to `root` (RFC 9162 §2.1.3.2)."""
    if not 0 <= index < size or any(len(p) != 32 for p in path):
        return False
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = hashlib.sha256(b"\x01" + p + r).digest()
            while fn and not fn & 1:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = hashlib.sha256(b"\x01" + r + p).digest()
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and r == root


def u64(n):
    return struct.pack(">Q", n)


def signed(public, signature, label, fields):
    """Whether `signature` is the Ed25519 signature of `public` over label ‖ enc(fields)."""
    if len(public) != 32 or len(signature) != 64:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, label.encode("ascii") + enc(fields))
    except (InvalidSignature, ValueError):
        return False
    return True


def device_id(sig_pub):
    return H("securechatd/device-id/v1", [sig_pub])[:16]


def server_key_id(public):
    return H("securechatd/server-key-id/v1", [public])[:16]


def readable_id(raw):
    text = raw.hex()
    return " ".join(text[i : i + 4] for i in range(0, len(text), 4))


def fingerprint(user, sig_pubs):
    """The user's 30-digit safety fingerprint over these keys (docs/E2EE.md "Safety numbers")."""
    keys = enc(sorted(sig_pubs))
    h = b"securechatd/safety/v1" + enc([user.encode("ascii"), keys])
    for _ in range(5200):
        h = hashlib.sha512(h + keys).digest()
    return "".join("%05d" % (int.from_bytes(h[i : i + 5], "big") % 100000) for i in range(0, 30, 5))


def is_user(raw):
    return isinstance(raw, bytes) and USER_NAME.fullmatch(raw.decode("latin-1")) is not None


def utf8(raw):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def fields_of(raw, sizes, where, step, what):
    """Split `raw` into fields whose lengths match `sizes` (an int, None for any, or a set)."""
    fields = dec(raw)
    if fields is None or len(fields) != len(sizes):
        raise Broken(step, f"{where}: malformed {what} (not {len(sizes)} enc fields)")
    for value, size in zip(fields, sizes):
        ok = size is None or (len(value) in size if isinstance(size, set) else len(value) == size)
        if not ok:
            raise Broken(step, f"{where}: malformed {what} (a field has the wrong length)")
    return fields


def num(raw):
    return int.from_bytes(raw, "big")


def shown(text):
    """`text` with anything not printable escaped: names, titles and plaintexts come from the bundle, not us."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def when(ms):
    try:
        return (datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(milliseconds=ms)).strftime(
            "%Y-%m-%d %H:%M:%S UTC"
        )
    except OverflowError:
        return f"{ms} ms"


# -- Step 1: form --------------------------------------------------------------


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate member")
    return dict(pairs)


def _reject(text):
    raise ValueError(f"number {text} is not an integer")


def read_json(data):
    """The bundle's value, if `data` is exactly its canonical JSON (RFC 8785 plus one LF)."""
    step = "form"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise Broken(step, "bundle: not UTF-8") from None
    try:
        value = json.loads(
            text, object_pairs_hook=_no_duplicates, parse_float=_reject, parse_constant=_reject
        )
    except (ValueError, RecursionError) as e:
        raise Broken(step, f"bundle: not JSON ({str(e)[:80]})") from None
    try:
        canonical = json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":")) + "\n"
        canonical = canonical.encode("utf-8")
    except (ValueError, RecursionError, UnicodeEncodeError):
        raise Broken(step, "bundle: not canonical JSON (a string is not Unicode text)") from None
    if canonical != data:
        raise Broken(step, "bundle: not in canonical form (RFC 8785 JCS plus one LF)")
    return value


def _members(obj, names, where):
    if type(obj) is not dict:
        raise Broken("form", f"{where}: not an object")
    if set(obj) != set(names):
        missing, extra = sorted(set(names) - set(obj)), sorted(set(obj) - set(names))
        what = f"missing {', '.join(missing)}" if missing else f"unexpected {shown(', '.join(extra)[:80])}"
        raise Broken("form", f"{where}: {what}")


def _int(value, where):
    if type(value) is not int or not 0 <= value <= MAX_INT:
        raise Broken("form", f"{where}: not an integer from 0 to 2^53-1")
    return value


def _hex(value, where, size=None):
    if type(value) is not str or not HEX.fullmatch(value):
        raise Broken("form", f"{where}: not lower-case hex of whole bytes")
    raw = bytes.fromhex(value)
    if size is not None and len(raw) != size:
        raise Broken("form", f"{where}: not {size} bytes")
    return raw


def _hexes(value, where):
    if type(value) is not list:
        raise Broken("form", f"{where}: not an array")
    return [_hex(v, f"{where}[{i}]") for i, v in enumerate(value)]


def _str(value, where):
    if type(value) is not str:
        raise Broken("form", f"{where}: not a string")
    return value


def parse_form(value):
    """Check members and types; return a plain dict of bytes and ints."""
    top = [
        "format", "conversation", "server_key", "device_chains", "membership", "modes", "links",
        "heads", "envelopes", "transcript_heads", "disclosed", "export",
    ]  # fmt: skip
    _members(value, top, "bundle")
    if value["format"] != FORMAT:
        raise Broken("form", f"format: not {FORMAT!r}")
    b = {"conversation": _int(value["conversation"], "conversation")}
    b["server_key"] = _hex(value["server_key"], "server_key", 32)
    chains = value["device_chains"]
    if type(chains) is not dict:
        raise Broken("form", "device_chains: not an object")
    b["device_chains"] = {}
    for user, links in chains.items():
        if not USER_NAME.fullmatch(user):
            raise Broken("form", f"device_chains: {user[:40]!r} is not a user name")
        b["device_chains"][user] = _hexes(links, f"device_chains.{user}")
    for name in ("membership", "modes", "links", "heads", "transcript_heads"):
        b[name] = _hexes(value[name], name)
    if type(value["envelopes"]) is not list:
        raise Broken("form", "envelopes: not an array")
    b["envelopes"] = []
    for i, env in enumerate(value["envelopes"]):
        where = f"envelopes[{i}]"
        _members(env, ["seq", "header", "body", "signature"], where)
        b["envelopes"].append(
            {
                "seq": _int(env["seq"], f"{where}.seq"),
                "header": _hex(env["header"], f"{where}.header"),
                "body": _hex(env["body"], f"{where}.body"),
                "signature": _hex(env["signature"], f"{where}.signature"),
            }
        )
    if type(value["disclosed"]) is not list:
        raise Broken("form", "disclosed: not an array")
    b["disclosed"] = []
    for i, d in enumerate(value["disclosed"]):
        where = f"disclosed[{i}]"
        _members(d, ["seq", "key", "plaintext"], where)
        b["disclosed"].append(
            {
                "seq": _int(d["seq"], f"{where}.seq"),
                "key": _hex(d["key"], f"{where}.key", 32),
                "plaintext": _str(d["plaintext"], f"{where}.plaintext"),
            }
        )
    e = value["export"]
    _members(e, ["user", "device", "time", "signature"], "export")
    b["export"] = {
        "user": _str(e["user"], "export.user"),
        "device": _hex(e["device"], "export.device", 16),
        "time": _int(e["time"], "export.time"),
        "signature": _hex(e["signature"], "export.signature", 64),
    }
    return b


# -- The checks -----------------------------------------------------------------


class Verifier:
    """Steps 2-11 of docs/E2EE.md "Verifying a bundle", in order, over a parsed bundle.

    Each step leaves what later steps and the report need on self.
    """

    def __init__(self, bundle, server_key=None, trust=()):
        self.b = bundle
        self.conv = u64(bundle["conversation"])
        self.given_key = server_key  # ("key" | "id", bytes) or None
        self.trust = trust  # [(user, 30 digits)]
        self.warnings = []

    def run(self):
        self.check_server_key()
        self.check_device_chains()
        self.check_membership()
        self.check_modes()
        self.check_links()
        self.check_heads()
        self.check_messages()
        self.check_transcript_heads()
        self.check_disclosures()
        self.check_seal()
        return self

    # 2
    def check_server_key(self):
        key = self.b["server_key"]
        self.key_id = server_key_id(key)
        if self.given_key is None:
            return
        kind, given = self.given_key
        if (kind == "key" and given != key) or (kind == "id" and given != self.key_id):
            raise Broken(
                "server key",
                f"server key: the bundle's key (id {readable_id(self.key_id)}) is not the one given",
            )

    # 3
    def check_device_chains(self):
        self.devices = {}  # user -> {device id: {"key", "name", "revoked"}}
        for user in sorted(self.b["device_chains"]):
            self.devices[user] = self._chain(user, self.b["device_chains"][user])
        for user, digits in self.trust:
            if user not in self.devices:
                raise Broken("device chains", f"trust {user}: the bundle has no device chain of {user}")
            current = [d["key"] for d in self.devices[user].values() if not d["revoked"]]
            if not current:
                raise Broken("device chains", f"trust {user}: {user} has no current device, so no fingerprint")
            if fingerprint(user, current) != digits:
                raise Broken(
                    "device chains",
                    f"trust {user}: the fingerprint of {user}'s current devices in the bundle is not the one given",
                )

    def _chain(self, user, links):
        step = "device chains"
        devices, revoked = {}, set()
        prev = ZERO32
        if not links:
            raise Broken(step, f"device chain of {user}: empty (a chain starts at link 1)")
        for i, raw in enumerate(links, 1):
            where = f"device chain of {user}, link {i}"
            f = fields_of(raw, [None, 8, 32, None, 16, {0, 32}, {0, 32}, None, 16, 64, {0, 64}], where, step, "link")
            luser, seq, lprev, op, dev, sig_pub, dh_pub, name, signer, signature, counter = f
            if op not in (b"add", b"revoke", b"name"):
                raise Broken(step, f"{where}: malformed link (unknown op)")
            add = op == b"add"
            if add != (len(sig_pub) == 32) or add != (len(dh_pub) == 32) or add != (len(counter) == 64):
                raise Broken(step, f"{where}: malformed link (keys and countersignature belong to add only)")
            if add and device_id(sig_pub) != dev:
                raise Broken(step, f"{where}: malformed link (the device id is not the id of its key)")
            if len(name) > 64 or utf8(name) is None or (op == b"revoke" and name):
                raise Broken(step, f"{where}: malformed link (name)")
            if luser != user.encode("ascii"):
                raise Broken(step, f"{where}: the link is of another user")
            if num(seq) != i:
                raise Broken(step, f"{where}: seq is {num(seq)}, not {i} (a gap)")
            if lprev != prev:
                raise Broken(step, f"{where}: prev is not the hash of the link before (a fork)")
            if i == 1 and (not add or signer != dev):
                raise Broken(step, f"{where}: link 1 is not an add signed by the device it adds")
            if i == 1:
                signer_key = sig_pub
            elif signer in revoked:
                raise Broken(step, f"{where}: signed by a revoked device")
            elif signer not in devices:
                raise Broken(step, f"{where}: signed by a device not in the chain")
            else:
                signer_key = devices[signer]["key"]
            fields = f[:9]
            if not signed(signer_key, signature, "securechatd/chain-link/v1", fields):
                raise Broken(step, f"{where}: signature does not verify")
            if add:
                if not signed(sig_pub, counter, "securechatd/chain-countersign/v1", fields):
                    raise Broken(step, f"{where}: countersignature does not verify")
                if dev in revoked:
                    raise Broken(step, f"{where}: adds a revoked device again")
                if dev in devices:
                    raise Broken(step, f"{where}: adds a device already in the chain")
                devices[dev] = {"key": sig_pub, "name": utf8(name), "revoked": False}
            else:
                if dev not in devices or dev in revoked:
                    raise Broken(step, f"{where}: {op.decode()} of a device that is not current")
                if op == b"revoke":
                    revoked.add(dev)
                    devices[dev]["revoked"] = True
                else:
                    devices[dev]["name"] = utf8(name)
            prev = H("securechatd/chain-hash/v1", f)
        return devices

    def device_of(self, user, device, where, step):
        """The sig key of a device the user's chain adds (revoked since or not), or a Broken."""
        if user not in self.devices:
            raise Broken(step, f"{where}: the bundle has no device chain of {shown(user[:40])}")
        if device not in self.devices[user]:
            raise Broken(step, f"{where}: device {device.hex()} is not a device of {user}")
        return self.devices[user][device]["key"]

    # 4
    def check_membership(self):
        step = "membership"
        self.states = []  # per epoch - 1: {"hash", "members", "op", "actor", "device", "kind", "title"}
        self.state_by_hash = {}
        prev, before = ZERO32, None
        for epoch, raw in enumerate(self.b["membership"], 1):
            where = f"membership epoch {epoch}"
            f = fields_of(raw, [8, 8, 32, None, None, None, None, None, 16, 64], where, step, "state")
            conv, ep, sprev, op, kind, title, members_raw, actor, actor_device, signature = f
            names = dec(members_raw)
            if (
                op not in (b"create", b"add", b"leave")
                or kind not in (b"direct", b"group")
                or len(title) > 200
                or utf8(title) is None
                or names is None
                or len(names) > 1000
                or not all(is_user(n) for n in names)
                or names != sorted(set(names))
                or not is_user(actor)
                or (kind == b"direct" and (len(names) != 2 or title))
            ):
                raise Broken(step, f"{where}: malformed state")
            if conv != self.conv:
                raise Broken(step, f"{where}: of another conversation")
            if num(ep) != epoch:
                raise Broken(step, f"{where}: epoch is {num(ep)}, not {epoch} (a gap)")
            if sprev != prev:
                raise Broken(step, f"{where}: prev is not the hash of the state before (a fork)")
            members = set(n.decode("ascii") for n in names)
            actor_name = actor.decode("ascii")
            if before is None:
                if op != b"create" or actor_name not in members:
                    raise Broken(step, f"{where}: epoch 1 is not a create by a member")
            else:
                if op == b"create":
                    raise Broken(step, f"{where}: a second create")
                if kind != before["kind"]:
                    raise Broken(step, f"{where}: the kind changed")
                if title != before["title"]:
                    raise Broken(step, f"{where}: the title changed")
                if actor_name not in before["members"]:
                    raise Broken(step, f"{where}: the actor {actor_name} was not a member")
                old = before["members"]
                if op == b"add" and (kind != b"group" or not (members > old)):
                    raise Broken(step, f"{where}: not an add (the members before plus at least one, groups only)")
                if op == b"leave" and (kind != b"group" or members != old - {actor_name}):
                    raise Broken(step, f"{where}: not a leave (the members before without the actor, groups only)")
            key = self.device_of(actor_name, actor_device, where, step)
            if not signed(key, signature, "securechatd/membership/v1", f[:9]):
                raise Broken(step, f"{where}: signature does not verify")
            prev = H("securechatd/membership-hash/v1", f)
            before = {
                "hash": prev, "members": members, "op": op.decode(), "actor": actor_name,
                "device": actor_device, "kind": kind, "title": title,
            }  # fmt: skip
            self.states.append(before)
            self.state_by_hash[prev] = epoch

    # 5
    def check_modes(self):
        step = "modes"
        self.modes = []  # per number - 1: {"hash", "mode", "epoch", "actor", "device"}
        prev, mode = ZERO32, None
        for number, raw in enumerate(self.b["modes"], 1):
            where = f"mode event {number}"
            f = fields_of(raw, [8, 8, 32, None, 32, None, 16, 64], where, step, "mode event")
            conv, nr, mprev, new_mode, members, actor, actor_device, signature = f
            if new_mode not in (ATTESTABLE, DENIABLE) or not is_user(actor):
                raise Broken(step, f"{where}: malformed mode event")
            if conv != self.conv:
                raise Broken(step, f"{where}: of another conversation")
            if num(nr) != number:
                raise Broken(step, f"{where}: number is {num(nr)}, not {number} (a gap)")
            if mprev != prev:
                raise Broken(step, f"{where}: prev is not the hash of the event before (a fork)")
            if number > 1 and new_mode == mode:
                raise Broken(step, f"{where}: sets the mode already in force")
            actor_name = actor.decode("ascii")
            epoch = self.state_by_hash.get(members)
            if epoch is None:
                raise Broken(step, f"{where}: names a membership state not in the bundle")
            if actor_name not in self.states[epoch - 1]["members"]:
                raise Broken(step, f"{where}: the actor {actor_name} is not a member of epoch {epoch}")
            key = self.device_of(actor_name, actor_device, where, step)
            if not signed(key, signature, "securechatd/mode/v1", f[:7]):
                raise Broken(step, f"{where}: signature does not verify")
            prev, mode = H("securechatd/mode-hash/v1", f), new_mode
            self.modes.append(
                {"hash": prev, "mode": mode.decode(), "epoch": epoch, "actor": actor_name, "device": actor_device}
            )

    # 6
    def check_links(self):
        step = "links"
        if not self.b["links"]:
            raise Broken(step, "links: the chain is empty")
        kinds = {
            b"message": ("message", "envelope", len(self.b["envelopes"])),
            b"membership": ("membership", "membership state", len(self.states)),
            b"mode": ("mode", "mode event", len(self.modes)),
        }
        self.e = [H("securechatd/chain-genesis/v1", [self.conv])]
        self.links = [None]  # per n: {"kind", "number", "time"}
        self.at = {"message": {}, "membership": {}, "mode": {}}  # kind -> number -> n
        self.mode_at = ["attestable"]  # per n: the mode in force
        self.epoch_at = [0]  # per n: the membership epoch in force (0: none)
        self.seq_at = [0]  # per n: the last message seq at or before n
        last = {"message": 0, "membership": 0, "mode": 0}
        for n, raw in enumerate(self.b["links"], 1):
            where = f"link n={n}"
            f = fields_of(raw, [8, 8, 8, None, 8, 32], where, step, "link")
            conv, ln, server_time, kind_raw, number_raw, item = f
            if kind_raw not in kinds:
                raise Broken(step, f"{where}: malformed link (unknown kind)")
            kind, what, count = kinds[kind_raw]
            if conv != self.conv:
                raise Broken(step, f"{where}: of another conversation")
            if num(ln) != n:
                raise Broken(step, f"{where}: n is {num(ln)}, not {n} (a gap)")
            number = num(number_raw)
            if number != last[kind] + 1:
                raise Broken(step, f"{where}: {kind} number {number}, not {last[kind] + 1} (a gap)")
            if number > count:
                raise Broken(step, f"{where}: the bundle has no {what} {number}")
            last[kind] = number
            if kind == "message":
                env = self.b["envelopes"][number - 1]
                mine = H("securechatd/envelope-item/v1", [env["header"], env["body"], env["signature"]])
            elif kind == "membership":
                mine = self.states[number - 1]["hash"]
            else:
                mine = self.modes[number - 1]["hash"]
            if item != mine:
                raise Broken(step, f"{where}: the item hash is not that of {what} {number}")
            if kind == "mode" and self.modes[number - 1]["epoch"] not in self.at["membership"]:
                raise Broken(step, f"{where}: mode event {number} names a membership state not on the chain before it")
            self.at[kind][number] = n
            self.links.append({"kind": kind, "number": number, "time": num(server_time)})
            self.e.append(H("securechatd/chain/v1", [conv, self.e[-1]] + f[1:]))
            self.mode_at.append(self.modes[number - 1]["mode"] if kind == "mode" else self.mode_at[-1])
            self.epoch_at.append(number if kind == "membership" else self.epoch_at[-1])
            self.seq_at.append(number if kind == "message" else self.seq_at[-1])
        for kind, what, count in kinds.values():
            if last[kind] != count:
                raise Broken(step, f"links: the chain has {last[kind]} {kind} links, the bundle {count} {what}s")

    # 7
    def check_heads(self):
        step = "heads"
        last_n = len(self.links) - 1
        heads = []
        for i, raw in enumerate(self.b["heads"], 1):
            conv, n_raw, e, index, size, root, path, signature = fields_of(
                raw, [8, 8, 32, 8, 8, 32, None, 64], f"head {i}", step, "head"
            )
            path = dec(path)
            leaf = hashlib.sha256(b"\x00" + enc([conv, n_raw, e])).digest()
            ok = (
                path is not None
                and in_batch(leaf, num(index), num(size), path, root)
                and signed(self.b["server_key"], signature, "securechatd/server-heads/v1", [size, root])
            )
            heads.append((num(n_raw), conv, e, ok))
        # Two heads the server key signed for one n with different e are proof it lied: say so, not just "out of order".
        seen = {}
        for n, conv, e, ok in heads:
            if ok and seen.setdefault((conv, n), e) != e:
                why = f"the server key signed two heads for n={n} with different e: it equivocated"
                raise Broken(step, f"head n={n}: {why}")
        self.heads = [n for n, _, _, _ in heads]
        if any(b <= a for a, b in zip(self.heads, self.heads[1:])):
            raise Broken(step, "heads: n is not strictly increasing")
        if not self.heads or self.heads[-1] != last_n:
            raise Broken(step, f"heads: no signed head at the last link n={last_n}")
        for n, conv, e, ok in heads:
            where = f"head n={n}"
            if not ok:
                raise Broken(step, f"{where}: not signed by the server key")
            if conv != self.conv:
                raise Broken(step, f"{where}: of another conversation")
            if n < 1:
                raise Broken(step, f"{where}: no link n={n} in the bundle")
            if e != self.e[n]:
                raise Broken(step, f"{where}: e is not the recomputed e_{n} (the server key signed another history)")

    # 8
    def check_messages(self):
        step = "messages"
        counters = {}
        self.messages = []
        sizes = [None, 8, 32, None, 16, 8, 8, None, 8, 32, 32]
        for seq, env in enumerate(self.b["envelopes"], 1):
            n = self.at["message"][seq]
            where = f"message seq {seq}"
            if env["seq"] != seq:
                raise Broken(step, f"{where}: the envelope says seq {env['seq']}")
            f = fields_of(env["header"], sizes, where, step, "header")
            suite, conv, members, sender, device, counter, client_time, mode, prev_n, prev_e, kc = f
            if suite != SUITE or mode not in (ATTESTABLE, DENIABLE) or not is_user(sender):
                raise Broken(step, f"{where}: malformed header")
            if conv != self.conv:
                raise Broken(step, f"{where}: the header is of another conversation")
            sender_name = sender.decode("ascii")
            key = self.device_of(sender_name, device, where, step)
            view = num(prev_n)
            if view >= n:
                raise Broken(step, f"{where}: its sender's view prev_n={view} is not before its link n={n}")
            if prev_e != self.e[view]:
                why = f"prev_e is not e at prev_n={view}: a fork (its sender saw another history)"
                raise Broken(step, f"{where}: {why}")
            if mode.decode() != self.mode_at[view]:
                raise Broken(step, f"{where}: mode {mode.decode()} is not the mode in force at prev_n={view}")
            epoch = self.state_by_hash.get(members)
            if epoch is None or self.at["membership"][epoch] >= n:
                raise Broken(step, f"{where}: names a membership state not on the chain before it")
            if sender_name not in self.states[epoch - 1]["members"]:
                raise Broken(step, f"{where}: the sender {sender_name} is not a member of the epoch {epoch} it names")
            if sender_name not in self.states[self.epoch_at[n] - 1]["members"]:
                raise Broken(step, f"{where}: the sender {sender_name} is not a member at n={n}")
            signature = env["signature"]
            if mode == ATTESTABLE:
                header_hash = H("securechatd/header/v1", f)
                body_hash = H("securechatd/message-body/v1", [env["body"]])
                if not signature:
                    raise Broken(step, f"{where}: attestable but not signed")
                fields = [conv, sender, device, header_hash, body_hash]
                if not signed(key, signature, "securechatd/message-sig/v1", fields):
                    raise Broken(step, f"{where}: signature does not verify")
            elif signature:
                raise Broken(step, f"{where}: deniable but carries a signature")
            c, last = num(counter), counters.get((sender, device), 0)  # counters start at 1: the first is above 0
            if c <= last:
                raise Broken(step, f"{where}: counter {c} is not above {last} (a replay)")
            counters[(sender, device)] = c
            skew = num(client_time) - self.links[n]["time"]
            if abs(skew) > CLOCK_SKEW_MS:
                self.warnings.append(
                    f"message seq {seq}: the sender's clock was {abs(skew) // 1000} s "
                    f"{'ahead of' if skew > 0 else 'behind'} the server's"
                )
            self.messages.append(
                {"seq": seq, "n": n, "sender": sender_name, "device": device, "mode": mode.decode(), "kc": kc,
                 "header": env["header"], "view": view, "members": epoch}
            )  # fmt: skip

    # 9
    def check_transcript_heads(self):
        step = "transcript heads"
        last_n = len(self.links) - 1
        self.ths = []
        for i, raw in enumerate(self.b["transcript_heads"], 1):
            where = f"transcript head {i}"
            f = fields_of(raw, [8, 8, 32, 32, 8, None, 16, 64], where, step, "transcript head")
            conv, n_raw, e, members, time, user, device, signature = f
            if not is_user(user):
                raise Broken(step, f"{where}: malformed transcript head")
            name, n = user.decode("ascii"), num(n_raw)
            where = f"transcript head {i} ({name}, n={n})"
            if conv != self.conv:
                raise Broken(step, f"{where}: of another conversation")
            if not 1 <= n <= last_n:
                raise Broken(step, f"{where}: no link n={n} in the bundle")
            if self.mode_at[n] != "attestable":
                raise Broken(step, f"{where}: the conversation is deniable at n={n}")
            key = self.device_of(name, device, where, step)
            if not signed(key, signature, "securechatd/transcript-head/v1", f[:7]):
                raise Broken(step, f"{where}: signature does not verify")
            if e != self.e[n]:
                raise Broken(step, f"{where}: e is not the recomputed e_{n}: a fork ({name} was shown another history)")
            state = self.states[self.epoch_at[n] - 1] if self.epoch_at[n] else None
            if state is None or members != state["hash"]:
                raise Broken(step, f"{where}: members is not the membership state in force at n={n}")
            if name not in state["members"]:
                raise Broken(step, f"{where}: {name} is not a member at n={n}")
            self.ths.append({"user": name, "device": device, "n": n, "seq": self.seq_at[n], "time": num(time)})

    # 10
    def check_disclosures(self):
        step = "disclosures"
        self.disclosed = {}
        last = 0
        for d in self.b["disclosed"]:
            seq = d["seq"]
            where = f"disclosed seq {seq}"
            if seq <= last:
                raise Broken(step, f"{where}: not above the disclosure before")
            if seq > len(self.messages) or seq < 1:
                raise Broken(step, f"{where}: no such message in the bundle")
            last = seq
            m, key = self.messages[seq - 1], d["key"]
            if hmac.new(key, b"securechatd/kc/v1", hashlib.sha256).digest() != m["kc"]:
                raise Broken(step, f"{where}: the key is not the one the sender committed to (kc)")
            ad = hashlib.sha256(b"securechatd/header/v1" + m["header"]).digest()
            try:
                padded = ChaCha20Poly1305(key).decrypt(bytes(12), self.b["envelopes"][seq - 1]["body"], ad)
            except InvalidTag:
                raise Broken(step, f"{where}: the body does not decrypt under the key") from None
            text = unpad(padded)
            if text is None:
                raise Broken(step, f"{where}: bad padding")
            try:
                given = d["plaintext"].encode("utf-8")
            except UnicodeEncodeError:
                raise Broken(step, f"{where}: the plaintext is not Unicode text") from None
            if text != given:
                raise Broken(step, f"{where}: the body decrypts to another plaintext")
            self.disclosed[seq] = d["plaintext"]

    # 11
    def check_seal(self):
        step = "seal"
        e = self.b["export"]
        user = e["user"]
        where = f"seal ({shown(user[:40])})"
        if not any(user in s["members"] for s in self.states):
            raise Broken(step, f"{where}: the exporter is not a member of any state")
        self.device_of(user, e["device"], where, step)
        dev = self.devices[user][e["device"]]
        if dev["revoked"]:
            raise Broken(step, f"{where}: the exporter's device is revoked")
        b = self.b
        chains = [
            enc([u.encode("ascii"), enc(b["device_chains"][u])]) for u in sorted(b["device_chains"])
        ]
        contents = H(
            "securechatd/export-contents/v1",
            [
                FORMAT.encode("ascii"), self.conv, b["server_key"], enc(chains), enc(b["membership"]),
                enc(b["modes"]), enc(b["links"]), enc(b["heads"]),
                enc([enc([u64(v["seq"]), v["header"], v["body"], v["signature"]]) for v in b["envelopes"]]),
                enc(b["transcript_heads"]),
                enc([enc([u64(d["seq"]), d["key"], d["plaintext"].encode("utf-8")]) for d in b["disclosed"]]),
            ],
        )  # fmt: skip
        fields = [self.conv, user.encode("ascii"), e["device"], u64(e["time"]), contents]
        if not signed(dev["key"], e["signature"], "securechatd/export/v1", fields):
            raise Broken(step, f"{where}: signature does not verify")


def unpad(padded):
    """The plaintext bytes of `plaintext ‖ 0x80 ‖ 0x00…` of a bucket's size (256, 512, …), or None."""
    size = len(padded)
    if size < 256 or size & (size - 1):
        return None
    stripped = padded.rstrip(b"\x00")
    if not stripped.endswith(b"\x80"):
        return None
    return stripped[:-1]


def verify(data, server_key=None, trust=()):
    """Check a bundle's bytes; return the finished Verifier, or raise Broken naming the first failure."""
    value = read_json(data)
    return Verifier(parse_form(value), server_key, trust).run()


# -- Report ---------------------------------------------------------------------


def report(v, given_key):
    """The readable account of a verified bundle, as lines."""
    b, first = v.b, v.states[0]
    out = []
    say = out.append

    def para(text):
        out.extend(textwrap.wrap(text, 100, subsequent_indent="  "))

    def dev(user, device):
        """A device as the report names it: its name, the start of its id, and whether it is revoked now."""
        d = v.devices[user][device]
        name = f"{shown(d['name'])} " if d["name"] else ""
        return f"{name}{device.hex()[:8]}" + (", now revoked" if d["revoked"] else "")

    def plural(count, word):
        return f"{count} {word}{'' if count == 1 else 's'}"

    title = f' "{shown(utf8(first["title"]))}"' if first["title"] else ""
    say(
        f"Conversation {b['conversation']} ({first['kind'].decode()}{title}): "
        f"{plural(len(v.links) - 1, 'chain link')}, "
        f"{plural(len(v.messages), 'message')}, {plural(len(v.states), 'membership state')}, "
        f"{plural(len(v.modes), 'mode event')}."
    )
    say(f"Server key: {b['server_key'].hex()}")
    if given_key:
        what = "key" if given_key[0] == "key" else "key id"
        say(f"  id {readable_id(v.key_id)}: matches the {what} you gave with --server-key.")
    else:
        say(f"  id {readable_id(v.key_id)}: taken from the bundle, as nothing was given to compare it with.")
        para(
            "  Compare this id with the one the server's operator publishes (securechatd-admin prints it), "
            "or run again with --server-key: until then the bundle only shows it is consistent with itself."
        )
    say(f"  Heads signed by this key at n={', n='.join(map(str, v.heads))} (the last link is n={v.heads[-1]}).")
    say("Device chains:")
    for user in sorted(v.devices):
        trusted = "; fingerprint matches --trust" if user in dict(v.trust) else ""
        say(f"  {user}: {plural(len(b['device_chains'][user]), 'link')}{trusted}")
        for device, d in v.devices[user].items():
            say(f"    {device.hex()} {shown(d['name']) or '(no name)'}: {'revoked' if d['revoked'] else 'current'}")
    say("Members over time:")
    for epoch, s in enumerate(v.states, 1):
        members = ", ".join(sorted(s["members"])) or "nobody"
        by = f"{s['actor']} ({dev(s['actor'], s['device'])})"
        say(f"  epoch {epoch} at n={v.at['membership'][epoch]}: {s['op']} by {by}: {members}")
    say("Modes:")
    if not v.modes:
        say("  no mode event: attestable throughout")
    for number, m in enumerate(v.modes, 1):
        by = f"{m['actor']} ({dev(m['actor'], m['device'])})"
        say(f"  event {number} at n={v.at['mode'][number]}: {m['mode']}, set by {by}")
    say("Messages:")
    for m in v.messages:
        how = "attestable, signed by its device" if m["mode"] == "attestable" else "deniable, NOT signed"
        text = v.disclosed.get(m["seq"])
        text = "not disclosed" if text is None else "disclosed: " + shown(json.dumps(text, ensure_ascii=False))
        say(f"  seq {m['seq']} (n={m['n']}): {m['sender']} ({dev(m['sender'], m['device'])}), {how}; {text}")
    say("Transcript heads (who attested the transcript, and up to where):")
    if not v.ths:
        say("  none")
    for t in v.ths:
        by = f"{t['user']} ({dev(t['user'], t['device'])})"
        say(f"  {by} attested up to n={t['n']} (seq {t['seq']}), at {when(t['time'])} by its clock")
    e = b["export"]
    by = f"{e['user']} ({dev(e['user'], e['device'])})"
    say(f"Exported by {by} at {when(e['time'])} by its clock; the seal verifies.")
    signed_ = [str(m["seq"]) for m in v.messages if m["mode"] == "attestable"]
    deniable = [str(m["seq"]) for m in v.messages if m["mode"] == "deniable"]
    if signed_:
        para(
            f"Signed: seq {', '.join(signed_)}. Each was signed by the device its sender's chain lists: its sender "
            "cannot deny having sent it (unless that device was stolen)."
        )
    if deniable:
        one = len(deniable) == 1
        it, its = ("it", "its") if one else ("them", "their")
        para(
            f"Deniable: seq {', '.join(deniable)} {'carries' if one else 'carry'} no signature. This bundle does "
            f"not prove who wrote {it}: the sender it shows is the server's word only, and a disclosed text proves "
            f"what was sent, not by whom. The server's signed chain still proves {its} place in the order, and that "
            f"nothing around {it} was changed, dropped or inserted."
        )
    untrusted = sorted(set(v.devices) - set(dict(v.trust)))
    if untrusted:
        para(
            f"Not compared with a fingerprint: {', '.join(untrusted)}. Their devices are the ones their chains in "
            "this bundle list; to know those are really theirs, compare fingerprints with them and pass "
            "--trust USER:FINGERPRINT."
        )
    for w in v.warnings:
        say(f"Warning: {w}")
    say("OK: every check passed.")
    return out


# -- Command line ---------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def parse_server_key(text):
    raw = re.sub(r"[\s:-]", "", text).lower()
    if HEX.fullmatch(raw) and len(raw) == 64:
        return ("key", bytes.fromhex(raw))
    if HEX.fullmatch(raw) and len(raw) == 32:
        return ("id", bytes.fromhex(raw))
    raise UsageError("--server-key: not a server key (64 hex digits) or key id (32 hex digits)")


def parse_trust(text):
    user, sep, digits = text.partition(":")
    digits = re.sub(r"\s", "", digits)
    if not sep or not USER_NAME.fullmatch(user) or not re.fullmatch(r"[0-9]{30}", digits, re.ASCII):
        raise UsageError(f"--trust {text[:80]!r}: not USER:FINGERPRINT (a user name and 30 digits)")
    return (user, digits)


def main(argv=None, stdout=None, stderr=None):
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    for stream in (stdout, stderr):  # a terminal that cannot show a name gets it escaped, not a traceback
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    parser = _Parser(prog="securechatd-verify", description="Check an exported securechatd conversation offline.")
    parser.add_argument("bundle", help="the bundle file written by securechat /export")
    parser.add_argument("--server-key", help="the server's public key or key id, as its operator publishes it")
    parser.add_argument(
        "--trust", action="append", default=[], metavar="USER:FINGERPRINT",
        help="a user's 30-digit safety fingerprint you compared with them; repeat for several users",
    )  # fmt: skip
    try:
        try:
            args = parser.parse_args(sys.argv[1:] if argv is None else argv)
        except SystemExit as e:  # --help
            return e.code or 0
        given = parse_server_key(args.server_key) if args.server_key is not None else None
        trust = [parse_trust(t) for t in args.trust]
        try:
            with open(args.bundle, "rb") as f:
                data = f.read(MAX_FILE + 1)
        except OSError as e:
            raise UsageError(f"cannot read {args.bundle}: {e.strerror or e}") from None
        if len(data) > MAX_FILE:
            raise UsageError(f"{args.bundle}: larger than {MAX_FILE} bytes")
    except UsageError as e:
        print(f"securechatd-verify: error: {e}", file=stderr)
        return 2
    try:
        v = verify(data, given, trust)
    except Broken as e:
        print(f"FAILED ({e.step}): {e}", file=stdout)
        return 1
    for line in report(v, given):
        print(line, file=stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
