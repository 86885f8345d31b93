"""The conversation chains a client has verified (docs/E2EE.md, "Verifiable conversations"; docs/CLIENT.md).

The server links every message, membership state and mode event of an
encrypted conversation into one hash chain and signs heads of it with its
own key. A client follows each conversation's chain link by link
(`ConversationChain`, kept in the device file) and checks, per message, what
docs/E2EE.md "What a receiver checks, per link" lists (`check_message`):
the link is the envelope's, the sender's view of the chain is ours (else a
fork), the header's mode is the mode in force at that view, the signature
(attestable), the sender a member where the link stands, the sender
device's counter above its last in chain order, its clock near the
server's. `Transcripts` is the part that talks to the server: the server
key pinned on first use, fetching links (GetChain) where some are missing,
the membership states and mode events the chain names, transcript heads
(signed read receipts) and the export bundle.

Every failure is an alarm of its own kind (`Alarm` in client/crypto.py)
and never hides a message: it is still handed over, marked.

Kept per conversation: the verified Position, e_n of the newest E_KEPT
links (a sender's view or a transcript head older than that cannot be
checked: it is reported as unchecked, not as a failure), where each
membership state and mode event stands, each sender device's last counter,
the newest HEADS_KEPT signed heads (to catch a second head for one n) and
every equivocation proof found.
"""

from dataclasses import dataclass

from twisted.logger import Logger
from twisted.protocols import amp

from securechatd import commands
from securechatd.e2ee import envelope, membership, transcript
from securechatd.e2ee.encoding import Malformed, dec, enc
from securechatd.e2ee.envelope import ATTESTABLE, Header
from securechatd.e2ee.transcript import (
    MEMBERSHIP,
    MESSAGE,
    MODE,
    Equivocation,
    ForkDetected,
    Head,
    Link,
    Position,
    TranscriptError,
    message_item,
    next_hash,
)

log = Logger()

E_KEPT = 1000  # e_n kept per conversation, the newest; a view older than that cannot be checked
HEADS_KEPT = 64  # signed heads kept per conversation, the newest: a second head for one of those n is proof
CLOCK_SKEW_MS = 5 * 60 * 1000  # a header's client_time further than this from its link's server_time is flagged
LABEL = b"securechatd/client-chain/v1"

VERIFIED = "verified"  # every check of docs/E2EE.md passed
UNCHECKED = "unchecked"  # nothing failed, but not everything could be checked (no link, a view too old)
BROKEN = "broken"  # a check failed: an alarm was raised


# on_alarm kinds raised here (crypto.Alarm lists them with the others)
SERVER_KEY_CHANGED = "server_key_changed"  # the server's head-signing key is not the one pinned
BAD_HEAD_SIGNATURE = "bad_head_signature"  # a head (of a receipt, of GetChain) not signed by the pinned key
HEAD_MISMATCH = "head_mismatch"  # links that recompute to another e than the server signed: a rewritten receipt
EQUIVOCATION = "equivocation"  # two validly signed heads for one history disagree: the proof is kept
CHAIN_GAP = "chain_gap"  # links this device could not get: the chain has a hole here
CHAIN_FORK = "chain_fork"  # a sender's view (prev_n, prev_e), or a link shown again, differs from ours
LINK_MISMATCH = "link_mismatch"  # a chain link that is not its item's (message, membership state, mode event)
UNCHAINED = "unchained"  # a message without its chain link from a server that keeps chains
MODE_MISMATCH = "mode_mismatch"  # a header's mode is not the mode in force at its sender's view
BAD_MODE = "bad_mode"  # a mode event that breaks a rule: refused, the mode stays as it was
UNSIGNED = "unsigned"  # an attestable message without its signature
BAD_SIGNATURE = "bad_signature"  # a message signature that is not the sender device's (or a deniable one signed)
SENDER_NOT_MEMBER = "sender_not_member"  # the sender is not a member where the chain placed the message
REORDERED = "reordered"  # a counter not above the sender device's last one in the chain: reordered or replayed
CLOCK_SKEW = "clock_skew"  # the sender's clock far from the server's (a warning)
TRANSCRIPT_FORK = "transcript_fork"  # a member signed another e at n than this device verified
BAD_TRANSCRIPT_HEAD = "bad_transcript_head"  # a transcript head not signed by a current device of a member

WARNINGS = frozenset({CLOCK_SKEW})  # kinds that leave a message's state VERIFIED


class ChainProblem(Exception):
    """One failed check: `kind` (an alarm kind above) and what happened."""

    def __init__(self, kind, detail):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def _u64(raw):
    if len(raw) != 8:
        raise Malformed("a number is not 8 bytes")
    return int.from_bytes(raw, "big")


@dataclass(frozen=True)
class Verdict:
    """What the chain says about one message: its link n, its mode, VERIFIED/UNCHECKED/BROKEN and the problems."""

    n: int | None = None
    mode: str | None = None
    state: str = UNCHECKED
    problems: tuple = ()  # ChainProblem


@dataclass
class Absorbed:
    """What ConversationChain.absorb did: links accepted (in order), the problems found, links still missing."""

    accepted: list
    problems: list
    missing_after: int | None = None  # a gap: no link after this n came (the next one given was further on)
    unsigned: int = 0  # links left out because no signed head covers them yet


class ConversationChain:
    """How far this device verified one conversation's chain (mutable; to_bytes for the device file).

    The device file keeps it without its window: the e_n of the links taken
    are appended to the device log (`unsaved`, taken by Transcripts), so a
    message costs its own link, not a rewrite of the E_KEPT before it.

    `position` is a transcript.Position; `window` {n: (e_n, seq of the last
    message at or before n)} for the newest E_KEPT links; `epochs` {epoch:
    n} and `mode_links` {number: n} where each membership state and mode
    event stands; `modes` the verified mode event bytes, number 1, 2, ...;
    `counters` {(user, device): (n, counter)} of each sender device's last
    message in chain order; `heads` {n: Head} signed heads seen; `proofs`
    equivocation proofs (bytes); `signed` the n of the newest transcript
    head this device signed; `ths` {(user, device): TH bytes} the newest
    transcript head of each device that checked here (this device's own
    among them), for exports: the server keeps only its members' newest.
    """

    def __init__(self, conversation):
        self.conversation = conversation
        self.position = Position(conversation)
        self.window = {}
        self.epochs = {}
        self.mode_links = {}
        self.modes = []
        self.counters = {}
        self.heads = {}
        self.proofs = []
        self.signed = 0
        self.ths = {}
        self.unsaved = []  # [(n, e_n, seq)] taken into the window since the device log was given them

    def __repr__(self):
        return f"<ConversationChain {self.conversation} n={self.position.n}>"

    # -- what is known -----------------------------------------------------------------------

    def e_at(self, n):
        """Our e_n (e_0 for 0), or None where it is not kept (older than the window, or not reached)."""
        if n == 0:
            return transcript.genesis(self.conversation)
        if n == self.position.n:
            return self.position.e
        found = self.window.get(n)
        return found[0] if found is not None else None

    def seq_at(self, n):
        """The seq of the last message at or before link n (0: none), or None if n is not kept."""
        if n == 0:
            return 0
        if n == self.position.n:
            return self.position.numbers[MESSAGE]
        found = self.window.get(n)
        return found[1] if found is not None else None

    def mode_at(self, n):
        """The mode in force at link n: that of the last verified mode event at or before it; attestable before any."""
        mode = membership.DEFAULT_MODE
        for number, at in sorted(self.mode_links.items()):
            if at <= n and number <= len(self.modes):
                mode = membership.ModeEvent.from_bytes(self.modes[number - 1]).mode
        return mode

    @property
    def mode(self):
        """The mode in force at the head verified."""
        return self.mode_at(self.position.n)

    def epoch_at(self, n):
        """The epoch of the membership state in force at link n (0: none on the chain yet)."""
        return max((epoch for epoch, at in self.epochs.items() if at <= n), default=0)

    # -- taking links and heads ----------------------------------------------------------------

    def absorb(self, links, heads, server_key):
        """Take `links` and `heads` (parsed) that the server gave; Absorbed says what was taken and what failed.

        Heads are checked against `server_key`; links at or below the head
        verified must be the ones verified (else CHAIN_FORK); new links must
        follow on (else a gap: `missing_after`); and they are taken only up
        to the last signed head that their recomputed e matches (HEAD_MISMATCH
        if a head does not: then nothing after the head before it is taken).
        Two signed heads for one n with different e are an EQUIVOCATION, kept
        in `proofs`. A head above the links is left for later.
        """
        problems, signed = [], []
        for head in heads:
            try:
                head.verify(server_key)
                if head.conversation != self.conversation:
                    raise transcript.WrongConversation(head.n, f"the head is conversation {head.conversation}'s")
            except (TranscriptError, Malformed) as problem:
                problems.append(ChainProblem(BAD_HEAD_SIGNATURE, f"conversation {self.conversation}: {problem}"))
                continue
            signed.append(head)
        by_n = {}
        for link in sorted(links, key=lambda link: link.n):
            if link.conversation != self.conversation:
                problems.append(ChainProblem(LINK_MISMATCH, f"link {link.n} is conversation {link.conversation}'s"))
                continue
            if by_n.setdefault(link.n, link) != link:
                problems.append(ChainProblem(CHAIN_FORK, f"the server gave two different links {link.n}"))
        for n, link in sorted(by_n.items()):
            if n <= self.position.n:
                before, after = self.e_at(n - 1), self.e_at(n)
                if before is not None and after is not None and next_hash(before, link) != after:
                    problems.append(
                        ChainProblem(CHAIN_FORK, f"link {n} is not the one this device verified at {n}: a fork")
                    )
        candidates, position, missing_after = [], self.position, None
        for n, link in sorted(by_n.items()):
            if n <= self.position.n:
                continue
            if n != position.n + 1:
                missing_after = position.n
                break
            try:
                position = position.after(link)
            except (TranscriptError, Malformed) as problem:
                problems.append(ChainProblem(CHAIN_GAP, f"conversation {self.conversation}: {problem}"))
                missing_after = position.n
                break
            candidates.append((link, position))
        e_new = {p.n: p.e for _, p in candidates}
        taken = 0  # how many candidates a signed head covers
        ours_at = lambda n: e_new.get(n, self.e_at(n) if n <= self.position.n else None)  # noqa: E731
        # (at one n, a head over our e first: a second one over another e is then the server's lie, not our gap)
        for head in sorted(signed, key=lambda head: (head.n, ours_at(head.n) != head.e)):
            if head.n > self.position.n and head.n not in e_new:
                continue  # above the links given: checked when they come
            ours = ours_at(head.n)  # (None: older than the window)
            self._keep_head(head, ours, server_key, problems)
            if ours is None:
                continue
            if ours != head.e:
                problems.append(
                    ChainProblem(
                        HEAD_MISMATCH,
                        f"conversation {self.conversation}: the links recompute to another e at {head.n}"
                        " than the server signed (a rewritten receipt, or links changed or left out)",
                    )
                )
                if head.n > self.position.n + taken:
                    break  # nothing from here on
                continue
            if head.n > self.position.n:
                taken = head.n - self.position.n
        accepted = candidates[:taken]
        unsigned = len(candidates) - taken
        for link, position in accepted:
            seq = position.numbers[MESSAGE]
            self.window[link.n] = (position.e, seq)
            self.unsaved.append((link.n, position.e, seq))
            if link.kind == MEMBERSHIP:
                self.epochs[link.number] = link.n
            elif link.kind == MODE:
                self.mode_links[link.number] = link.n
        if accepted:
            self.position = accepted[-1][1]
            self._trim()
        return Absorbed([link for link, _ in accepted], problems, missing_after, unsigned)

    def _trim(self):
        for n in sorted(self.window)[: max(len(self.window) - E_KEPT, 0)]:
            del self.window[n]

    def restore(self, window):
        """Take the e_n the device log kept, {n: (e_n, seq)}: the newest E_KEPT up to the verified head.

        (Links past the head are from a step whose device file write never came: taken again when they come.)
        """
        self.window.update((n, kept) for n, kept in window.items() if n <= self.position.n)
        self._trim()

    def _keep_head(self, head, ours, server_key, problems):
        """Keep a signed head; a kept one for the same n with another e is proof the server lied (reported once).

        Of two heads for one n, the one over our e (`ours`) is the one kept.
        """
        kept = self.heads.get(head.n)
        if kept is not None and kept.e != head.e:
            proof = transcript.equivocation(kept, head, server_key)
            data = proof.to_bytes() if proof is not None else enc([kept.to_bytes(), head.to_bytes()])
            if data not in self.proofs and enc([head.to_bytes(), kept.to_bytes()]) not in self.proofs:
                self.proofs.append(data)
                problems.append(
                    ChainProblem(
                        EQUIVOCATION,
                        f"conversation {self.conversation}: the server signed two different heads at link"
                        f" {head.n} (the proof is kept)",
                    )
                )
            if kept.e == ours or head.e != ours:
                return
        self.heads[head.n] = head
        for n in sorted(self.heads)[: max(len(self.heads) - HEADS_KEPT, 0)]:
            del self.heads[n]

    def keep_proof(self, proof):
        """An Equivocation found elsewhere (e.g. across n); True if it was new."""
        data = proof.to_bytes()
        if data in self.proofs:
            return False
        self.proofs.append(data)
        return True

    # -- bytes -----------------------------------------------------------------------------------

    def to_bytes(self, with_window=True):
        """Its bytes; `with_window` False leaves the window out (the device file's: its e_n are in the device log)."""
        kept = sorted(self.window) if with_window else []
        low = kept[0] if kept else self.position.n + 1
        window = b"".join(self.window[n][0] + self.window[n][1].to_bytes(8, "big") for n in kept)
        return enc(
            [
                LABEL,
                self.conversation,
                self.position.n,
                self.position.e,
                enc([self.position.numbers[kind] for kind in transcript.KINDS]),
                low,
                window,
                enc([enc([epoch, n]) for epoch, n in sorted(self.epochs.items())]),
                enc(self.modes),
                enc([enc([number, n]) for number, n in sorted(self.mode_links.items())]),
                enc([enc([user, device, n, counter]) for (user, device), (n, counter) in self.counters.items()]),
                enc([self.heads[n].to_bytes() for n in sorted(self.heads)]),
                enc(self.proofs),
                self.signed,
                enc([self.ths[key] for key in sorted(self.ths)]),
            ]
        )

    @classmethod
    def from_bytes(cls, data):
        fields = dec(data)
        if fields[:1] != [LABEL] or len(fields) not in (14, 15):
            raise Malformed("not a conversation chain of version securechatd/client-chain/v1")
        fields += [enc([])] * (15 - len(fields))  # (kept transcript heads came later)
        (_, conversation, n, e, numbers, low, window, epochs, modes, mode_links, counters, heads, proofs, signed,
         ths) = fields
        chain = cls(_u64(conversation))
        numbers = [_u64(number) for number in dec(numbers, len(transcript.KINDS))]
        if len(e) != 32 or len(window) % 40:
            raise Malformed("a conversation chain's e or window has the wrong size")
        chain.position = Position(chain.conversation, _u64(n), e, dict(zip(transcript.KINDS, numbers)))
        low = _u64(low)
        for index in range(len(window) // 40):
            record = window[40 * index : 40 * index + 40]
            chain.window[low + index] = (record[:32], int.from_bytes(record[32:], "big"))
        chain.epochs = {_u64(epoch): _u64(at) for epoch, at in (dec(record, 2) for record in dec(epochs))}
        chain.modes = dec(modes)
        chain.mode_links = {_u64(number): _u64(at) for number, at in (dec(record, 2) for record in dec(mode_links))}
        for record in dec(counters):
            user, device, at, counter = dec(record, 4)
            chain.counters[user.decode("utf-8"), device] = (_u64(at), _u64(counter))
        for head in dec(heads):
            head = Head.from_bytes(head)
            chain.heads[head.n] = head
        chain.proofs = dec(proofs)
        chain.signed = _u64(signed)
        for data in dec(ths):
            head = transcript.TranscriptHead.from_bytes(data)
            chain.ths[head.user, head.device] = data
        return chain

    def keep_th(self, head, data):
        """Keep a transcript head that checked, if it is its device's newest."""
        kept = self.ths.get((head.user, head.device))
        if kept is None or transcript.TranscriptHead.from_bytes(kept).n <= head.n:
            self.ths[head.user, head.device] = data


def find_equivocation(chain, links, heads, server_key):
    """An Equivocation from the heads `chain` kept and a whole chain `links` (from n = 1) with its signed `heads`.

    For a server caught showing another history: the links recompute to
    e'_k; a kept head at n1 with another e than e'_n1, and one of `heads` at
    n2 >= n1 over those links, prove it signed both. None if nothing proves it.
    """
    e, ours = transcript.genesis(chain.conversation), {}
    for n, link in enumerate(sorted(links, key=lambda link: link.n), 1):
        if link.n != n:
            break
        e = next_hash(e, link)
        ours[n] = e
    ordered = sorted(links, key=lambda link: link.n)
    for first in sorted(chain.heads.values(), key=lambda head: head.n):
        if first.n not in ours or ours[first.n] == first.e:
            continue
        for second in sorted(heads, key=lambda head: head.n):
            if second.n < first.n or second.n not in ours or ours[second.n] != second.e:
                continue
            if second.n == first.n:
                proof = Equivocation(first, second)
            else:
                proof = Equivocation(first, second, ours[first.n], ordered[first.n : second.n])
            if proof.proves(server_key):
                return proof
    return None


def check_message(chain, header, body, signature, link, seq, sender_keys, state_of_epoch, epoch_of):
    """The Verdict of one message against the chain `chain` (its link already absorbed, if it has one).

    `header` is the parsed Header; `link` the message's Link (None if none
    came); `sender_keys` the sender device's DeviceKeys from its verified
    chain (None if it is not known: the signature is then unchecked);
    `state_of_epoch(epoch)` the verified membership.State of that epoch or
    None; `epoch_of(state hash)` the epoch of a verified state or None.
    """
    problems, unchecked = [], False
    mode = header.mode
    if link is None:
        return Verdict(None, mode, UNCHECKED, (ChainProblem(UNCHAINED, "no chain link came with it"),))
    n = link.n
    where = f"message seq {seq} (link {n})"
    if (link.kind, link.number, link.conversation) != (MESSAGE, seq, chain.conversation):
        problems.append(ChainProblem(LINK_MISMATCH, f"{where}: its chain link is {link.kind} {link.number}"))
    if link.item != message_item(header.to_bytes(), body, signature):
        problems.append(
            ChainProblem(LINK_MISMATCH, f"{where}: the chain holds another envelope there than the one received")
        )
    before, after = chain.e_at(n - 1), chain.e_at(n)
    if n > chain.position.n:
        unchecked = True  # not verified up to it (a gap, or a head not seen yet: reported where it happened)
    elif before is None or after is None:
        unchecked = True
    elif next_hash(before, link) != after:
        problems.append(ChainProblem(CHAIN_FORK, f"{where}: its link is not the one this device verified at {n}"))
    if n <= chain.position.n:
        try:
            if not transcript.check_sender_view(header.prev_n, header.prev_e, n, chain.e_at):
                unchecked = True
        except ForkDetected:
            problems.append(
                ChainProblem(
                    CHAIN_FORK,
                    f"{where}: {header.sender} had seen another history at link {header.prev_n} than this device:"
                    " the server forked the conversation",
                )
            )
        if header.prev_n <= chain.position.n and header.mode != chain.mode_at(header.prev_n):
            problems.append(
                ChainProblem(
                    MODE_MISMATCH,
                    f"{where}: sent as {header.mode}, but the conversation was {chain.mode_at(header.prev_n)}"
                    f" at link {header.prev_n}, its sender's view",
                )
            )
        epoch = epoch_of(header.members)
        if epoch is not None and chain.epochs.get(epoch, n) >= n:
            problems.append(
                ChainProblem(SENDER_NOT_MEMBER, f"{where}: it names membership state {epoch}, placed after it")
            )
        in_force = state_of_epoch(chain.epoch_at(n))
        if in_force is None:
            unchecked = True
        elif header.sender not in in_force.members:
            problems.append(
                ChainProblem(
                    SENDER_NOT_MEMBER, f"{where}: {header.sender} is not a member where the chain placed it"
                )
            )
    if sender_keys is None:
        unchecked = header.mode == ATTESTABLE or unchecked
        if header.mode != ATTESTABLE and signature:
            problems.append(ChainProblem(BAD_SIGNATURE, f"{where}: a deniable message carries a signature"))
    else:
        try:
            envelope.check_signature(header, body, signature, sender_keys)
        except envelope.Unsigned:
            problems.append(ChainProblem(UNSIGNED, f"{where}: attestable, but {header.sender} did not sign it"))
        except envelope.BadMessageSignature as problem:
            problems.append(ChainProblem(BAD_SIGNATURE, f"{where}: {problem}"))
    peer = (header.sender, header.sender_device)
    last = chain.counters.get(peer)
    if last is None or n > last[0]:
        if last is not None and header.counter <= last[1]:
            problems.append(
                ChainProblem(
                    REORDERED,
                    f"{where}: counter {header.counter} of {header.sender}'s device is not above {last[1]},"
                    f" its message at link {last[0]}: the server reordered or replayed its messages",
                )
            )
        else:
            chain.counters[peer] = (n, header.counter)
    skew = header.client_time - link.server_time
    if abs(skew) > CLOCK_SKEW_MS:
        problems.append(
            ChainProblem(
                CLOCK_SKEW,
                f"{where}: {header.sender}'s clock was {abs(skew) // 1000} s"
                f" {'ahead of' if skew > 0 else 'behind'} the server's",
            )
        )
    if any(problem.kind not in WARNINGS for problem in problems):
        state = BROKEN
    else:
        state = UNCHECKED if unchecked else VERIFIED
    return Verdict(n, mode, state, tuple(problems))


# -- talking to the server ------------------------------------------------------------------------


@dataclass(frozen=True)
class TranscriptSigned:
    """A member's signed transcript head (a signed read receipt), as this device checked it.

    `verified`: signed by a current device of `username`, who was a member
    at link `n`, over the very chain this device verified up to n (so both
    saw the same history up to there); else `problem` names the alarm raised
    (or None with `verified` False: n is beyond or older than what this
    device can check). `seq` is the last message at or before n (None if
    not known here); `time` the signer's clock (ms).
    """

    conversation_id: int
    username: str
    device_id: str
    n: int
    seq: int | None
    time: int
    verified: bool
    problem: str | None = None
    detail: str | None = None


@dataclass(frozen=True)
class Signed:
    """A transcript head this device signed and sent: over the chain up to link `n` (message `seq`)."""

    conversation_id: int
    n: int
    seq: int
    mode: str = ATTESTABLE


@dataclass(frozen=True)
class Export:
    """An export bundle's bytes and what is in it."""

    data: bytes
    conversation_id: int
    links: int
    messages: int
    disclosed: tuple  # seqs
    transcript_heads: int
    left_out: tuple = ()  # why some items were not put in (e.g. a transcript head that does not check)


class ExportError(Exception):
    """An export that cannot be made (the message says why); nothing was written."""


class Transcripts:
    """The conversation chains of one device: fetched, checked and kept in its device file.

    `e2ee` is the crypto.EndToEnd (its client's call, clock, alarm and
    callbacks; its memberships and device chains). Every method runs under
    the EndToEnd's lock (the caller holds it). `available` is False for a
    server that says it keeps no chains (then nothing is checked, and
    messages are UNCHECKED; with a key pinned that is an alarm), None before
    the server was asked. With a key pinned, chains are checked with it
    whatever the server answers, so refusing GetServerKey turns nothing off.
    """

    FETCH_LIMIT = 1000  # links asked for in one GetChain

    def __init__(self, e2ee):
        self.e2ee = e2ee
        self.state = e2ee.state
        self.available = True if self.state.server_key else None
        self.changed_key = None  # the key the server gives now, if it is not the one pinned
        self._chains = {}
        for conversation, data in self.state.transcripts.items():
            chain = self._chains[conversation] = ConversationChain.from_bytes(data)
            if chain.window:  # (a version 2 device file kept the e_n inline: to the log at the next save)
                chain.unsaved = [(n, e, seq) for n, (e, seq) in sorted(chain.window.items())]
                self._keep(chain)
            chain.restore(self.state.windows.pop(conversation, {}))

    @property
    def key(self):
        return self.state.server_key or None

    def get(self, conversation):
        """The ConversationChain of `conversation` (a new one at its genesis if none is kept)."""
        chain = self._chains.get(conversation)
        if chain is None:
            chain = self._chains[conversation] = ConversationChain(conversation)
        return chain

    def chain(self, conversation):
        """The kept ConversationChain, or None (no fetch)."""
        return self._chains.get(conversation)

    def _keep(self, chain):
        """Put what `chain` verified in the device file (written by the next save; its e_n to the log before)."""
        self.state.keep_links(chain.conversation, chain.unsaved)
        chain.unsaved = []
        self.state.transcripts[chain.conversation] = chain.to_bytes(with_window=False)

    def _alarm(self, problems, user=None, prefix=""):
        for problem in problems:
            self.e2ee._alarm(problem.kind, user, prefix + problem.detail)

    def _call(self, command, **arguments):
        return self.e2ee.client.call(command, **arguments)

    # -- the server key ----------------------------------------------------------------------

    async def check_server_key(self):
        """Ask the server for its head-signing key: pinned the first time, an alarm if it is not the pinned one."""
        try:
            answer = await self._call(commands.GetServerKey)
        except (amp.UnhandledCommand, amp.UnknownRemoteError):
            self.available = self.key is not None  # (pinned: still checked, so each message without a link is told)
            if self.key is not None:
                self.e2ee._alarm(
                    SERVER_KEY_CHANGED,
                    None,
                    "the server no longer gives the key that signs its conversation chains (pinned:"
                    f" {transcript.readable_key_id(transcript.server_key_id(self.key))}): nothing it says about the"
                    " order of messages can be checked",
                )
            return
        key = answer["key"]
        if len(key) != 32:
            self.available = self.key is not None
            self.e2ee._alarm(SERVER_KEY_CHANGED, None, "the server's chain key is not an Ed25519 key")
            return
        self.available = True
        if self.key is None:
            self.state.server_key = key
            self.e2ee.save()
            log.info("pinned the server key {key_id}", key_id=transcript.server_key_id(key))
        elif key != self.key:
            self.changed_key = key
            self.e2ee._alarm(
                SERVER_KEY_CHANGED,
                None,
                f"the server signs its conversation chains with key"
                f" {transcript.readable_key_id(transcript.server_key_id(key))} now, not with"
                f" {transcript.readable_key_id(transcript.server_key_id(self.key))}, the one this device pinned:"
                " what it signs is refused. Compare the key id with the server's operator before accepting it.",
            )
        else:
            self.changed_key = None

    def accept_server_key(self):
        """Pin the key the server gives now in place of the old one (after checking it out of band)."""
        if self.changed_key is None:
            return False
        self.state.server_key, self.changed_key = self.changed_key, None
        self.e2ee.save()
        return True

    def key_ids(self):
        """(the pinned key's id, the id of the other key the server gives now or None): readable, 8 groups of 4."""
        readable = lambda key: transcript.readable_key_id(transcript.server_key_id(key))  # noqa: E731
        return (readable(self.key) if self.key else None, readable(self.changed_key) if self.changed_key else None)

    # -- following a chain -------------------------------------------------------------------

    async def _fetch(self, conversation, after):
        """(links, heads, problems): the server's links after n `after` and the heads covering them."""
        raw_links, raw_heads = [], []
        while True:
            try:
                page = await self._call(
                    commands.GetChain, conversation_id=conversation, after_n=after, limit=self.FETCH_LIMIT
                )
            except (commands.NotAllowed, commands.NoSuchConversation):
                break  # left since, or not encrypted: nothing to fetch
            raw_links += page["links"]
            raw_heads += page["heads"]
            if not page["has_more"] or not page["links"]:
                break
            after = Link.from_bytes(page["links"][-1]).n
        problems = []

        def parsed(raws, kind, alarm, what):
            """The `kind`s read from `raws`; each malformed one a problem with `alarm` instead."""
            items = []
            for data in raws:
                try:
                    items.append(kind.from_bytes(data))
                except Malformed as problem:
                    problems.append(ChainProblem(alarm, f"conversation {conversation}: a malformed {what} ({problem})"))
            return items

        links = parsed(raw_links, Link, LINK_MISMATCH, "link")
        return links, parsed(raw_heads, Head, BAD_HEAD_SIGNATURE, "head"), problems

    async def sync(self, conversation, links=(), heads=(), fetch=False, save=True):
        """(ConversationChain, problems): take `links` and `heads` (from a push or receipt), fetching what is missing.

        Without links (or links that do not follow on from the verified head),
        the links after it are fetched (GetChain). The membership states and
        mode events of new links are fetched and checked against them. Each
        problem raises its alarm here. The device file is written unless
        `save` is False (the caller writes it with what else it changed).
        """
        chain = self.get(conversation)
        if not await self.ready():
            return chain, []
        links, heads, problems = list(links), list(heads), []
        fetched = False
        if fetch or not links or min(link.n for link in links) > chain.position.n + 1:
            more_links, more_heads, bad = await self._fetch(conversation, chain.position.n)
            links, heads, problems, fetched = links + more_links, heads + more_heads, problems + bad, True
        absorbed = chain.absorb(links, heads, self.key)
        accepted = list(absorbed.accepted)
        if absorbed.missing_after is not None and not fetched:
            more_links, more_heads, bad = await self._fetch(conversation, chain.position.n)
            problems += bad
            absorbed = chain.absorb(more_links + links, more_heads + heads, self.key)
            accepted += absorbed.accepted
        problems += absorbed.problems
        if absorbed.missing_after is not None:
            problems.append(
                ChainProblem(
                    CHAIN_GAP,
                    f"conversation {conversation}: link {absorbed.missing_after + 1} of the chain never came (nor"
                    f" from the server when asked), though later ones did: the server holds something back",
                )
            )
        problems += await self._check_items(chain, accepted)
        if any(problem.kind in (HEAD_MISMATCH, CHAIN_FORK) for problem in problems):
            problems += await self._look_for_proof(chain)
        self._keep(chain)
        if save:
            self.e2ee.save()
        self._alarm(problems)
        return chain, problems

    async def ready(self):
        """True if chains are followed: a key is pinned (asked for now if the server was not asked yet)."""
        if self.available is None:
            try:
                await self.check_server_key()
            except commands.ChatError as problem:  # (RATE_LIMITED, say): asked again next time
                log.info("the server's chain key could not be asked for: {problem}", problem=problem)
        return bool(self.available) and self.key is not None

    async def _look_for_proof(self, chain):
        """After a mismatch: the whole chain as the server shows it now, to find two heads it signed that disagree."""
        links, heads, _ = await self._fetch(chain.conversation, 0)
        proof = find_equivocation(chain, links, heads, self.key)
        if proof is None or not chain.keep_proof(proof):
            return []
        return [
            ChainProblem(
                EQUIVOCATION,
                f"conversation {chain.conversation}: the server signed heads at links {proof.first.n} and"
                f" {proof.second.n} of two different histories (the proof is kept)",
            )
        ]

    def states(self, conversation):
        """The verified membership.States of a conversation, epoch 1, 2, ..."""
        return [membership.State.from_bytes(data) for data in self.state.memberships.get(conversation, [])]

    async def _check_items(self, chain, accepted):
        """Problems of the membership and mode links just taken: each must hold the state or event of its number."""
        problems, conversation = [], chain.conversation
        kinds = {link.kind for link in accepted}
        if MEMBERSHIP in kinds:
            wanted = max(link.number for link in accepted if link.kind == MEMBERSHIP)
            if wanted > len(self.state.memberships.get(conversation, [])):
                await self.e2ee.refresh_membership(conversation)
            states = self.states(conversation)
            for link in accepted:
                if link.kind != MEMBERSHIP:
                    continue
                if link.number > len(states) or states[link.number - 1].hash() != link.item:
                    problems.append(
                        ChainProblem(
                            LINK_MISMATCH,
                            f"conversation {conversation}: link {link.n} names membership state {link.number},"
                            " which is not the state this device verified with that epoch (or none it could verify)",
                        )
                    )
        if MODE in kinds:
            wanted = max(link.number for link in accepted if link.kind == MODE)
            if wanted > len(chain.modes):
                problems += await self._fetch_modes(chain)
            for link in accepted:
                if link.kind != MODE:
                    continue
                if link.number > len(chain.modes):
                    chain.mode_links.pop(link.number, None)
                    problems.append(
                        ChainProblem(
                            LINK_MISMATCH,
                            f"conversation {conversation}: link {link.n} names mode event {link.number}, which"
                            " this device could not get or verify: the mode stays as it was",
                        )
                    )
                    continue
                event = membership.ModeEvent.from_bytes(chain.modes[link.number - 1])
                epochs = {state.hash(): epoch for epoch, state in enumerate(self.states(conversation), 1)}
                if event.hash() != link.item:
                    chain.mode_links.pop(link.number, None)
                    problems.append(
                        ChainProblem(
                            LINK_MISMATCH,
                            f"conversation {conversation}: link {link.n} is not the mode event {link.number}"
                            " this device verified",
                        )
                    )
                elif chain.epochs.get(epochs.get(event.members), link.n) >= link.n:
                    chain.mode_links.pop(link.number, None)
                    problems.append(
                        ChainProblem(
                            BAD_MODE,
                            f"conversation {conversation}: mode event {link.number} names a membership state"
                            " placed after it",
                        )
                    )
                else:
                    self.e2ee.client.on_mode(conversation, event.mode, event.actor)
        return problems

    async def _fetch_modes(self, chain):
        """Fetch and verify the mode events after the ones kept; problems (BAD_MODE) if they break a rule."""
        conversation, raw = chain.conversation, []
        while True:
            page = await self._call(
                commands.GetModes, conversation_id=conversation, after_number=len(chain.modes) + len(raw)
            )
            raw += page["events"]
            if not page["has_more"] or not page["events"]:
                break
        if not raw:
            return []
        try:
            events = [membership.ModeEvent.from_bytes(data) for data in chain.modes + raw]
            new = events[len(chain.modes) :]
            members = self.e2ee.membership(conversation)
            if members is None or any(members.members_at(event.members) is None for event in new):
                members = await self.e2ee.refresh_membership(conversation)
            if members is None:
                raise membership.ModeActorNotMember(new[0].number, "the conversation has no verified membership")
            for actor in sorted({event.actor for event in new}):
                await self.e2ee.chains.refresh(actor)
            membership.verify_modes(conversation, events, members, self.e2ee.chains.history_lookup)
            for event in new:
                if self.e2ee.chains.lookup(event.actor, event.actor_device) is None:
                    raise membership.BadModeSignature(
                        event.number, f"{event.actor_device.hex()} is not a current device of {event.actor!r}"
                    )
        except (membership.ModeError, Malformed) as problem:
            return [ChainProblem(BAD_MODE, f"conversation {conversation}: {problem}; the mode stays as it was")]
        chain.modes += [event.to_bytes() for event in new]
        return []

    # -- messages ----------------------------------------------------------------------------

    def _lookups(self, conversation):
        states = self.states(conversation)
        epochs = {state.hash(): epoch for epoch, state in enumerate(states, 1)}
        return (lambda epoch: states[epoch - 1] if 1 <= epoch <= len(states) else None), epochs.get

    async def check(self, conversation, item, header, opened=True):
        """The Verdict on a received message (a DeliverEncrypted or history item; `header` parsed).

        Its link (and receipt) are taken into the chain first, fetching the
        links before it this device lacks; each problem raises its alarm. A
        message that could not be opened (`opened` False: its own problem was
        reported) only gives its link and receipt: what it holds is not checked.
        The caller writes the device file (with the message it opened).
        """
        if not await self.ready():
            return Verdict(None, header.mode, UNCHECKED, ())
        problems, link, receipt = [], None, None
        where = f"message {item['message_id']} of conversation {conversation}: "
        try:
            link = Link.from_bytes(item["link"]) if item.get("link") else None
        except Malformed as problem:
            problems.append(ChainProblem(LINK_MISMATCH, f"its chain link is malformed ({problem})"))
        try:
            receipt = transcript.Receipt.from_bytes(item["receipt"]) if item.get("receipt") else None
        except Malformed as problem:
            problems.append(ChainProblem(HEAD_MISMATCH, f"its receipt is malformed ({problem})"))
        if receipt is not None and (not receipt.links or receipt.links[0] != link):
            problems.append(ChainProblem(LINK_MISMATCH, "its receipt is for another link than its own"))
            receipt = None
        if link is not None and link.conversation != conversation:
            problems.append(ChainProblem(LINK_MISMATCH, f"its chain link is conversation {link.conversation}'s"))
            link = receipt = None
        chain, synced = self.get(conversation), []
        if link is not None and (receipt is not None or link.n > chain.position.n):
            given = list(receipt.links) if receipt is not None else [link]
            heads = [receipt.head] if receipt is not None else []
            chain, synced = await self.sync(conversation, given, heads, save=False)
        if not opened:  # (what is wrong with it was reported: it may be no message of this conversation at all)
            self._keep(chain)
            problems = tuple(p for p in synced if p.kind not in WARNINGS)
            return Verdict(link.n if link is not None else None, header.mode, BROKEN if problems else UNCHECKED,
                           problems)
        if link is None and problems:
            self._alarm(problems, header.sender, where)
            return Verdict(None, header.mode, BROKEN, tuple(problems))
        keys = self.e2ee.chains.history_lookup(header.sender, header.sender_device)
        state_of_epoch, epoch_of = self._lookups(conversation)
        verdict = check_message(
            chain, header, item["body"], item.get("signature") or b"", link, item["seq"], keys, state_of_epoch, epoch_of
        )
        self._alarm(problems + list(verdict.problems), header.sender, where)
        self._keep(chain)
        problems = tuple(problems) + verdict.problems + tuple(p for p in synced if p.kind not in WARNINGS)
        if any(problem.kind not in WARNINGS for problem in problems):
            return Verdict(verdict.n, verdict.mode, BROKEN, problems)
        return Verdict(verdict.n, verdict.mode, verdict.state, problems)

    async def sent(self, conversation, seq, header, body, signature, receipt):
        """The Verdict on our own message the server took at `seq` (its receipt bytes, or None)."""
        parsed = Header.from_bytes(header)
        if not await self.ready():
            return Verdict(None, parsed.mode, UNCHECKED, ())
        problems, link = [], None
        try:
            parsed_receipt = transcript.Receipt.from_bytes(receipt) if receipt else None
        except Malformed as problem:
            parsed_receipt = None
            problems.append(ChainProblem(HEAD_MISMATCH, f"its receipt is malformed ({problem})"))
        if parsed_receipt is None:  # (a resent message's answer has none): its link comes with the next fetch
            await self.sync(conversation)
            return Verdict(None, parsed.mode, UNCHECKED, tuple(problems))
        link = parsed_receipt.links[0]
        chain, synced = await self.sync(conversation, parsed_receipt.links, [parsed_receipt.head], save=False)
        if (link.kind, link.number, link.item) != (MESSAGE, seq, message_item(header, body, signature)):
            problems.append(
                ChainProblem(LINK_MISMATCH, f"the server's receipt is not for this message at seq {seq}: it placed"
                             f" {link.kind} {link.number} there")
            )
        chain.counters[(parsed.sender, parsed.sender_device)] = (link.n, parsed.counter)
        self._alarm(problems, None, f"our message at seq {seq} of conversation {conversation}: ")
        self._keep(chain)
        self.e2ee.save()
        problems += [p for p in synced if p.kind not in WARNINGS]
        state = BROKEN if problems else (VERIFIED if link.n <= chain.position.n else UNCHECKED)
        return Verdict(link.n, parsed.mode, state, tuple(problems))

    # -- transcript heads --------------------------------------------------------------------

    async def sign(self, conversation, time, again=False):
        """Sign and send a transcript head over the chain verified so far (fetched first): Signed, or None.

        None where there is nothing to sign: no link yet, the conversation is
        deniable there (no transcript heads in deniable mode), this device's
        user is not a member there, or (unless `again`) it signed that n already.
        """
        chain, _ = await self.sync(conversation)
        n = chain.position.n
        if not await self.ready() or n == 0 or chain.mode_at(n) != ATTESTABLE:
            return None
        if chain.signed >= n and not again:
            return None
        state_of_epoch, _ = self._lookups(conversation)
        state = state_of_epoch(chain.epoch_at(n))
        device = self.state.device
        if state is None or device.user not in state.members:
            return None
        head = transcript.sign_transcript_head(device, conversation, n, chain.position.e, state.hash(), time)
        await self._call(commands.SignTranscript, conversation_id=conversation, head=head.to_bytes())
        chain.signed = max(chain.signed, n)
        chain.keep_th(head, head.to_bytes())
        self._keep(chain)
        self.e2ee.save()
        return Signed(conversation, n, chain.seq_at(n) or 0)

    async def received_head(self, conversation, username, data):
        """A member's transcript head (TranscriptSigned), checked: a TranscriptSigned record; alarms if it fails."""
        try:
            head = transcript.TranscriptHead.from_bytes(data)
        except Malformed as problem:
            detail = f"conversation {conversation}: {username} sent a malformed transcript head ({problem})"
            self.e2ee._alarm(BAD_TRANSCRIPT_HEAD, username, detail)
            return TranscriptSigned(conversation, username, "", 0, None, 0, False, BAD_TRANSCRIPT_HEAD, detail)
        problem = await self._check_head(conversation, username, head)
        chain = self.get(conversation)
        known = head.n <= chain.position.n and chain.e_at(head.n) is not None
        record = TranscriptSigned(
            conversation,
            username,
            head.device.hex(),
            head.n,
            chain.seq_at(head.n) if head.n <= chain.position.n else None,
            head.time,
            problem is None and known,
            problem.kind if problem is not None else None,
            problem.detail if problem is not None else None,
        )
        if problem is not None:
            self._alarm([problem], username)
        elif record.verified:
            chain.keep_th(head, data)
            self._keep(chain)
            self.e2ee.save()
        return record

    async def _check_head(self, conversation, username, head):
        """The ChainProblem of a transcript head (None if it checks, or cannot be checked as too old or too new)."""
        where = f"conversation {conversation}: {username}'s transcript head at link {head.n}"
        if head.conversation != conversation or head.user != username:
            return ChainProblem(BAD_TRANSCRIPT_HEAD, f"{where} is another conversation's or another user's")
        chain = self.get(conversation)
        if head.n > chain.position.n:
            chain, _ = await self.sync(conversation)
        # (one comes with every read receipt: the chain kept between messages serves, as for sealing, unless
        # it does not list the signing device)
        await self.e2ee.chains.refresh(username, self.e2ee.chain_max_age)
        keys = self.e2ee.chains.device(username, head.device)
        if keys is None:
            await self.e2ee.chains.refresh(username)
            keys = self.e2ee.chains.device(username, head.device)
        if keys is None:
            return ChainProblem(BAD_TRANSCRIPT_HEAD, f"{where} is signed by {head.device.hex()}, not a current device")
        e = chain.e_at(head.n) if head.n <= chain.position.n else None
        try:
            transcript.check_transcript_head(head, keys, e)
        except transcript.BadTranscriptSignature:
            return ChainProblem(BAD_TRANSCRIPT_HEAD, f"{where}: the signature is not its device's")
        except transcript.ForkDetected:
            return ChainProblem(
                TRANSCRIPT_FORK,
                f"{where}: {username} read another history up to there than this device: the server forked the"
                " conversation",
            )
        if e is None:
            return None
        if chain.mode_at(head.n) != ATTESTABLE:
            return ChainProblem(BAD_TRANSCRIPT_HEAD, f"{where}: the conversation is deniable there")
        state_of_epoch, _ = self._lookups(conversation)
        state = state_of_epoch(chain.epoch_at(head.n))
        if state is None or state.hash() != head.members or username not in state.members:
            return ChainProblem(
                BAD_TRANSCRIPT_HEAD, f"{where}: it names another membership state than the one in force there"
            )
        return None

    # -- export ------------------------------------------------------------------------------

    async def export(self, conversation, time, disclose=None):
        """An Export of `conversation`: the bundle of docs/E2EE.md "Export bundle", sealed by this device.

        It holds the chain up to its last signed head, every envelope,
        membership state, mode event and device chain it names, the members'
        transcript heads that check, and the keys and plaintexts of the
        messages in `disclose` (seqs; None: every message this device can
        read). ExportError if the server's answers do not make a bundle that
        checks (a fork, a missing envelope, ...).
        """
        if not await self.ready():
            raise ExportError("This server keeps no conversation chains: there is nothing to export.")
        chain, _ = await self.sync(conversation)
        links, heads, problems = await self._fetch(conversation, 0)
        if problems:
            raise ExportError(f"The server's chain of conversation {conversation} is malformed: {problems[0].detail}")
        links = sorted(links, key=lambda link: link.n)
        if [link.n for link in links] != list(range(1, len(links) + 1)):
            raise ExportError(f"The server's chain of conversation {conversation} has a hole.")
        position, es = Position(conversation), [transcript.genesis(conversation)]
        for link in links:
            try:
                position = position.after(link)
            except (TranscriptError, Malformed) as problem:
                raise ExportError(f"The server's chain of conversation {conversation} breaks a rule: {problem}")
            es.append(position.e)
            ours = chain.e_at(link.n) if link.n <= chain.position.n else None
            if ours is not None and ours != position.e:
                raise ExportError(
                    f"The server's chain of conversation {conversation} is not the one this device verified (at"
                    f" link {link.n}): it forked the conversation."
                )
        signed = {}
        for head in heads:
            try:
                head.verify(self.key)
            except (TranscriptError, Malformed):
                continue
            if head.conversation == conversation and 1 <= head.n < len(es) and es[head.n] == head.e:
                signed[head.n] = head
        if not signed:
            raise ExportError(f"No link of conversation {conversation} is signed by the server yet.")
        last = max(signed)
        links = links[:last]
        counts = {kind: sum(1 for link in links if link.kind == kind) for kind in transcript.KINDS}
        states = self.states(conversation)
        if len(states) < counts[MEMBERSHIP]:
            await self.e2ee.refresh_membership(conversation)
            states = self.states(conversation)
        if len(chain.modes) < counts[MODE]:
            await self._fetch_modes(chain)
        if len(states) < counts[MEMBERSHIP] or len(chain.modes) < counts[MODE]:
            raise ExportError("Some membership states or mode events of the chain could not be verified.")
        states, modes = states[: counts[MEMBERSHIP]], chain.modes[: counts[MODE]]
        envelopes = await self._envelopes(conversation, counts[MESSAGE])
        for link in links:
            if link.kind == MESSAGE:
                _, header, body, signature = envelopes[link.number - 1]
                wrong = message_item(header, body, signature) != link.item
            elif link.kind == MEMBERSHIP:
                wrong = states[link.number - 1].hash() != link.item
            else:
                wrong = membership.ModeEvent.from_bytes(modes[link.number - 1]).hash() != link.item
            if wrong:
                raise ExportError(f"Link {link.n} of the chain is not the {link.kind} {link.number} the server gives.")
        users = {self.state.device.user}
        for state in states:
            users |= set(state.members) | {state.actor}
        users |= {membership.ModeEvent.from_bytes(event).actor for event in modes}
        users |= {Header.from_bytes(header).sender for _, header, _, _ in envelopes}
        left_out, heads_kept = [], []
        given = (await self._call(commands.GetTranscriptHeads, conversation_id=conversation))["heads"]
        candidates = {}  # (user, device) -> [(n, bytes)]: the server's, and those kept here (of members who left)
        for data in dict.fromkeys(list(given) + list(chain.ths.values())):
            try:
                head = transcript.TranscriptHead.from_bytes(data)
            except Malformed:
                left_out.append("a malformed transcript head")
                continue
            candidates.setdefault((head.user, head.device), []).append((head.n, data))
        for key in sorted(candidates):  # each device's newest that checks
            reasons = []
            for _, data in sorted(candidates[key], reverse=True):
                reason = await self._exportable_head(data, chain, links, es, states, modes)
                if reason is None:
                    heads_kept.append(data)
                    users.add(key[0])
                    break
                reasons.append(reason)
            else:
                left_out += reasons[:1]
        device_chains = {}
        for user in sorted(users):
            await self.e2ee.chains.refresh(user)
            if self.state.chains.get(user):
                device_chains[user] = list(self.state.chains[user])
            else:
                left_out.append(f"{user} has no device chain")
        disclosed = self._disclosed(conversation, envelopes, disclose)
        data = transcript.build_bundle(
            conversation,
            self.key,
            device_chains,
            [state.to_bytes() for state in states],
            modes,
            [link.to_bytes() for link in links],
            [signed[n].to_bytes() for n in sorted(signed) if n <= last],
            envelopes,
            heads_kept,
            disclosed,
            self.state.device,
            time,
        )
        return Export(data, conversation, len(links), len(envelopes), tuple(seq for seq, _, _ in disclosed),
                      len(heads_kept), tuple(left_out))

    async def _envelopes(self, conversation, count):
        """[(seq, header, body, signature)] of seqs 1..count, from the conversation's history."""
        found, before = {}, None
        while True:
            page = await self._call(
                commands.HistoryEncrypted, conversation_id=conversation, before_seq=before, limit=500
            )
            for item in page["messages"]:
                found[item["seq"]] = (item["seq"], item["header"], item["body"], item.get("signature") or b"")
            seqs = [item["seq"] for item in page["messages"]]
            if not page["has_more"] or not seqs or min(seqs) <= 1:
                break
            before = min(seqs)
        missing = [seq for seq in range(1, count + 1) if seq not in found]
        if missing:
            raise ExportError(f"The server's history of conversation {conversation} lacks message {missing[0]}.")
        return [found[seq] for seq in range(1, count + 1)]

    async def _exportable_head(self, data, chain, links, es, states, modes):
        """Why a transcript head the server keeps cannot go in the bundle (None: it can)."""
        try:
            head = transcript.TranscriptHead.from_bytes(data)
        except Malformed:
            return "a malformed transcript head"
        if head.conversation != chain.conversation or not 1 <= head.n <= len(links):
            return f"{head.user}'s transcript head at link {head.n}, beyond the links signed"
        await self.e2ee.chains.refresh(head.user)
        keys = self.e2ee.chains.history_lookup(head.user, head.device)
        mode = membership.DEFAULT_MODE
        for link in links[: head.n]:
            if link.kind == MODE:
                mode = membership.ModeEvent.from_bytes(modes[link.number - 1]).mode
        epoch = max((link.number for link in links[: head.n] if link.kind == MEMBERSHIP), default=0)
        state = states[epoch - 1] if epoch else None
        try:
            if keys is None:
                raise transcript.BadTranscriptSignature(head.n, "not a device of its user")
            transcript.check_transcript_head(head, keys, es[head.n])
        except transcript.BadTranscriptSignature:
            return f"{head.user}'s transcript head at link {head.n} is not signed by a device of {head.user}"
        except transcript.ForkDetected:
            self.e2ee._alarm(
                TRANSCRIPT_FORK,
                head.user,
                f"conversation {chain.conversation}: {head.user} signed another history at link {head.n}",
            )
            return f"{head.user}'s transcript head at link {head.n} is over another history (a fork)"
        if mode != ATTESTABLE or state is None or state.hash() != head.members or head.user not in state.members:
            return f"{head.user}'s transcript head at link {head.n} does not fit the chain there"
        return None

    def _disclosed(self, conversation, envelopes, disclose):
        """[(seq, K, plaintext bytes)] of the messages to disclose that this device holds the key of."""
        keys = {seq: key for key, place_conversation, seq in self.state.message_keys.values()
                if place_conversation == conversation}
        wanted = sorted(keys) if disclose is None else sorted(set(disclose))
        disclosed = []
        for seq in wanted:
            if seq not in keys or not 1 <= seq <= len(envelopes):
                if disclose is not None:
                    raise ExportError(f"This device holds no key of message {seq} to disclose.")
                continue
            _, header, body, _ = envelopes[seq - 1]
            try:
                plaintext = envelope.open_body(Header.from_bytes(header), body, keys[seq])
                plaintext.decode("utf-8")
            except (ValueError, Malformed) as problem:
                raise ExportError(f"Message {seq} does not open with the key this device kept ({problem}).")
            disclosed.append((seq, keys[seq], plaintext))
        return disclosed
