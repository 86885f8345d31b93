"""End-to-end encryption inside ChatClient: this device, its prekeys and sessions, sealing and opening messages.

`EndToEnd` is one user's device on one installation. It keeps everything in
the device file (client/device_file.py) and writes it once per step: the
sessions a message advanced go to disk with that message (before it is sent;
before a received one is acknowledged). A message's key goes to the device
log beside it, durable before the device file that moves past the message. It asks the server through the
client's `call`, and checks everything the server says against the device
chains (client/chains.py) and signed membership states it verified: the
recipients of a message are the current devices of the members of the
latest verified state, never a list from the server.

A message that cannot be opened is reported with the step that failed
(`Problem`) and raises the matching alarm; nothing is dropped silently.

Device lifecycle (the statuses of client/device_file.py):

- *new*: the first login of a user on this installation makes a device (in
  memory until the login succeeds) and logs in bound to it. If the user has
  no chain yet, the device publishes link 1 (trusted on first use) and is
  *active*. If the user has devices already, the server refuses the bound
  login (NO_SUCH_DEVICE); the client logs in unbound and the device is
  *pending*: it cannot encrypt (EncryptionUnavailable says why) and receives
  nothing of encrypted conversations (the server sends them to bound
  sessions only).
- Adding a pending device takes one trip by hand between the devices:
  on the new device `link_request(signer)` drafts the add link of itself
  after the chain's current head, names the existing device `signer` that
  will sign it (the only device, if there is one), countersigns it and
  returns it as text (`securechatd-link:` and hex); the user carries it to
  that device, whose `link_new_device(text)` checks it (this user, signed
  by it, placed after its chain's head, every chain rule, the
  countersignature) and signs and publishes it. Then `complete_link()` on
  the new device (or simply its next login, which is bound at once) finds
  itself in the chain, logs in again bound to its device (a reconnection)
  and uploads its prekeys. A request is good until the chain moves on.
- *active*: at every login the own chain is checked (a fork is an alarm),
  the signed prekey rotated when a week old (the one before is kept a week
  for first messages still on their way), and one-time prekeys refilled to
  100 when fewer than 25 are left on the server (also counted shortly after
  a first message used one).
- *revoked*: a device its chain revoked (revoke_device() from another
  device, or itself) is refused at its next login; the client logs in
  unbound, raises the alarm, and the next login starts a new device in its
  place (what it verified about others is kept; its keys and sessions are
  not).

Chains of other users are fetched when they are needed: at once when a
DevicesChanged push names one this device keeps (coalesced per user), before
a message is sealed if the chain was marked stale (a push, a login) or last
fetched more than `chain_max_age` ago (an hour), for a sender device not
known yet, for the signers of new membership states, mode events and
transcript heads, for an export, for safety numbers and trust. The
conversation's membership state and chain are kept between messages too
(`moved`). Between fetches the server keeps sealing honest: it refuses a
wrap for a device that is no longer current (revoked, or its user gone), and
the client fetches every chain again and seals anew; a SendEncrypted answer
names the members who have a current device the message was not wrapped for
(a device added since), whose chains are fetched before the next message. A
change of devices is reported with on_devices_changed.
"""

import inspect
import os
from dataclasses import dataclass, field, replace

from twisted.internet.defer import Deferred, DeferredList, DeferredLock, FirstError, gatherResults
from twisted.internet.error import ConnectionClosed
from twisted.logger import Logger

from securechatd import commands
from securechatd.client import transcripts
from securechatd.client.chains import Chains
from securechatd.client.device_file import ACTIVE, NEW, PENDING, REVOKED, DeviceFile, DeviceFileError, ReplayWindow
from securechatd.e2ee import chain, envelope, membership, safety, transcript
from securechatd.e2ee.encoding import Malformed, dec, enc
from securechatd.e2ee.envelope import BadBody, BadPadding, Header, KeyCommitmentMismatch, open_body, unseal
from securechatd.e2ee.keys import BadPrekeySignature, Device, LowOrderKey
from securechatd.e2ee.ratchet import BadMessage, DuplicateMessage, TooManySkipped
from securechatd.e2ee.session import NewSession, NoSession, Session, UnknownPrekey
from securechatd.e2ee.x3dh import Bundle

log = Logger()

WEEK = 7 * 24 * 3600.0  # a signed prekey's life; the one before is kept one more week
ONE_TIME_PREKEYS = 100  # uploaded at first, and refilled up to
REFILL_BELOW = 25
KEY_BYTES = 32
LINK_REQUEST = b"securechatd/link-request/v1"
LINK_PREFIX = "securechatd-link:"


class EncryptionUnavailable(Exception):
    """This client cannot encrypt to that conversation now; the message says why (nothing was sent)."""


class LinkError(ValueError):
    """A device link request that cannot be used: the message says why."""


class Problem:
    """Why a message could not be opened: Message.problem, and the kind of the alarm raised with it."""

    NO_DEVICE = "no_device"  # this installation is not an active device of its user
    MALFORMED_HEADER = "malformed_header"
    MISMATCHED_HEADER = "mismatched_header"  # the header names another conversation, sender or device than the delivery
    UNKNOWN_DEVICE = "unknown_device"  # the sender device is not a current device of the sender's verified chain
    UNKNOWN_MEMBERSHIP = "unknown_membership"  # the header names no membership state verified for the conversation
    NOT_A_MEMBER = "not_a_member"  # the sender is not a member of the state the header names
    NO_WRAP = "no_wrap"  # no wrap of the message key for this device came with it
    REPLAY = "replay"  # the sender device's counter was seen before (or is too far behind)
    MALFORMED_WRAP = "malformed_wrap"
    NO_SESSION = "no_session"
    UNKNOWN_PREKEY = "unknown_prekey"
    LOW_ORDER_KEY = "low_order_key"
    DUPLICATE = "duplicate"
    TOO_MANY_SKIPPED = "too_many_skipped"
    BAD_MESSAGE = "bad_message"  # the wrap does not authenticate
    KEY_COMMITMENT_MISMATCH = "key_commitment_mismatch"  # the sender showed recipients different keys
    BAD_BODY = "bad_body"
    BAD_PADDING = "bad_padding"
    BAD_TEXT = "bad_text"  # the plaintext is not UTF-8
    NO_KEY = "no_key"  # (history) a message this device never had a key for, e.g. from before it was added


class Alarm:
    """on_alarm kinds besides the Problem names (which are raised for messages that cannot be opened)."""

    FORK = "fork"  # a device chain that does not extend the one seen
    BAD_CHAIN = "bad_chain"  # a chain link that breaks another rule
    MEMBERSHIP_FORK = "membership_fork"  # membership states that do not extend the ones seen
    BAD_MEMBERSHIP = "bad_membership"  # a membership state that breaks another rule
    INJECTED_MEMBER = "injected_member"  # the server lists a member no verified state has
    MISSING_MEMBER = "missing_member"  # the server leaves out a member the latest verified state has
    KEY_MISMATCH = "key_mismatch"  # a prekey bundle whose keys are not the ones the chain lists
    BAD_PREKEY = "bad_prekey"  # a signed prekey whose signature does not check
    DEVICE_REVOKED = "device_revoked"  # this installation's device was revoked
    DEVICE_MISSING = "device_missing"  # this installation's device is not in its user's chain any more
    DEVICE_FILE = "device_file"  # the device file cannot be used (damaged, another user's, in use by another program)
    GAP = "gap"  # seqs of a conversation this device was never pushed and the server's history does not have
    # the conversation chains (client/transcripts.py; docs/CLIENT.md, "Verifiable conversations")
    SERVER_KEY_CHANGED = transcripts.SERVER_KEY_CHANGED  # the server's chain key is not the one pinned
    BAD_HEAD_SIGNATURE = transcripts.BAD_HEAD_SIGNATURE  # a chain head not signed by the pinned server key
    HEAD_MISMATCH = transcripts.HEAD_MISMATCH  # links that recompute to another e than the server signed
    EQUIVOCATION = transcripts.EQUIVOCATION  # two signed heads of two histories: the proof is kept
    CHAIN_GAP = transcripts.CHAIN_GAP  # links of the chain that never came
    CHAIN_FORK = transcripts.CHAIN_FORK  # a sender saw another history (or a link differs from the one verified)
    LINK_MISMATCH = transcripts.LINK_MISMATCH  # a chain link that is not its message's, state's or mode event's
    UNCHAINED = transcripts.UNCHAINED  # a message without its chain link
    MODE_MISMATCH = transcripts.MODE_MISMATCH  # a header's mode is not the one in force at its sender's view
    BAD_MODE = transcripts.BAD_MODE  # a mode event that breaks a rule
    UNSIGNED = transcripts.UNSIGNED  # an attestable message without its signature
    BAD_SIGNATURE = transcripts.BAD_SIGNATURE  # a message signature that is not its sender device's
    SENDER_NOT_MEMBER = transcripts.SENDER_NOT_MEMBER  # the sender is not a member where the chain placed it
    REORDERED = transcripts.REORDERED  # a counter not above its device's last in chain order
    CLOCK_SKEW = transcripts.CLOCK_SKEW  # the sender's clock far from the server's (a warning)
    TRANSCRIPT_FORK = transcripts.TRANSCRIPT_FORK  # a member signed another history
    BAD_TRANSCRIPT_HEAD = transcripts.BAD_TRANSCRIPT_HEAD  # a transcript head that does not check


_UNSEAL_PROBLEMS = (  # most specific first: several are ValueErrors
    (KeyCommitmentMismatch, Problem.KEY_COMMITMENT_MISMATCH),
    (BadBody, Problem.BAD_BODY),
    (BadPadding, Problem.BAD_PADDING),
    (UnicodeDecodeError, Problem.BAD_TEXT),
    (UnknownPrekey, Problem.UNKNOWN_PREKEY),
    (LowOrderKey, Problem.LOW_ORDER_KEY),
    (DuplicateMessage, Problem.DUPLICATE),
    (TooManySkipped, Problem.TOO_MANY_SKIPPED),
    (BadMessage, Problem.BAD_MESSAGE),
    (NoSession, Problem.NO_SESSION),
    (NewSession, Problem.NO_SESSION),
    (Malformed, Problem.MALFORMED_WRAP),
)


class Undecryptable(Exception):
    def __init__(self, problem, detail):
        super().__init__(detail)
        self.problem = problem
        self.detail = detail


@dataclass(frozen=True)
class Sealed:
    """A message ready to send: what SendEncrypted carries, its key K, and the devices it could not be wrapped for."""

    header: bytes = field(repr=False)
    body: bytes = field(repr=False)
    wraps: tuple = field(repr=False)  # ((device id hex, wrap bytes), ...)
    key: bytes = field(repr=False)  # K: never in a log
    unreached: tuple = ()  # device ids (hex) of members' devices left out, e.g. without prekeys
    signature: bytes = field(default=b"", repr=False)  # this device's over header and body (attestable; b"": deniable)
    mode: str = envelope.ATTESTABLE


@dataclass(frozen=True)
class DeviceInfo:
    device_id: str
    name: str
    this_device: bool = False


async def _gather(deferreds):
    """The results of `deferreds` (or coroutines), in order; the first failure's own exception if one fails."""
    started = [Deferred.fromCoroutine(d) if inspect.iscoroutine(d) else d for d in deferreds]
    try:
        return await gatherResults(started, consumeErrors=True)
    except FirstError as error:
        raise error.subFailure.value


def _ms(seconds):
    return int(seconds * 1000)


def _name_bytes(name, limit=chain.MAX_NAME_BYTES):
    """`name` cut to at most `limit` bytes of UTF-8 (a device name in the chain)."""
    data = name.encode("utf-8")[:limit]
    return data.decode("utf-8", "ignore")


class EndToEnd:
    """One user's device on this installation.

    `client` is the ChatClient: its call(), clock, client_name and the
    callbacks on_alarm and on_devices_changed. `state` is the DeviceFile.
    """

    chain_max_age = 3600.0  # seconds a fetched chain is used to seal before it is fetched again

    def __init__(self, client, state):
        self.client = client
        self.state = state
        self.user = state.device.user
        self.lock = DeferredLock()
        self.chains = Chains(state, client.call, self.save, self._alarm, self._devices_changed, client.clock)
        self._memberships = {}
        for conversation, states in state.memberships.items():
            parsed = [membership.State.from_bytes(data) for data in states]
            seen = (len(parsed), parsed[-1].hash()) if parsed else None
            verified = membership.verify_membership(
                conversation, parsed, self.chains.lookup, seen, history_lookup=self.chains.history_lookup
            )
            self._memberships[conversation] = verified
        self.transcripts = transcripts.Transcripts(self)
        # conversations whose membership state and chain, as kept, are the latest the server told of (since
        # the last login): a message to one is sealed without asking for either (see `moved`)
        self._current = set()
        self._moves = 0  # calls of moved(): a seal that saw one while it ran does not mark its conversation current
        self._devices_pushed = set()  # users whose chain a DevicesChanged fetch waits for the lock to fetch
        self._timers = {}
        self._running = []  # Deferreds of scheduled work under way
        self._closed = False

    @classmethod
    def load(cls, client, path, username):
        """The device of `username` kept at `path`, or a new one (in memory until claim()); DeviceFileError if unusable.

        A revoked device can never come back: in its place comes a new one.
        """
        state = DeviceFile.load(path)
        if state is not None and state.device.user != username:
            raise DeviceFileError(f"the device file {path} is {state.device.user!r}'s, not {username!r}'s")
        if state is None or state.status == REVOKED:
            state = cls._fresh(path, username, state)
        try:
            return cls(client, state)
        except (chain.ChainError, membership.MembershipError, Malformed) as problem:
            raise DeviceFileError(f"the device file {path} is damaged ({problem}); it was left as it is")

    def claim(self):
        """Hold the device file for this process and write it (after a login: no file for a name that failed)."""
        self.state.lock()
        try:
            self.save()
        except BaseException:
            self.state.unlock()
            raise

    @staticmethod
    def _fresh(path, username, revoked=None):
        """A new device; what a revoked one verified about others (chains, memberships, trust, message keys) is kept."""
        state = DeviceFile(path, Device.generate(username))
        if revoked is not None:
            state.chains, state.memberships = revoked.chains, revoked.memberships
            state.trusted, state.message_keys, state.log = revoked.trusted, revoked.message_keys, revoked.log
            state.server_key, state.transcripts = revoked.server_key, revoked.transcripts
            state.windows = revoked.windows
        return state

    def close(self):
        self._closed = True
        for timer, finished in self._timers.values():
            if timer.active():
                timer.cancel()
                finished.callback(None)
        self._timers.clear()
        self.state.unlock()

    def save(self):
        """Write the device file; not once closed (its lock is released: another EndToEnd may hold the file now,
        and work that was still queued, a chain fetch say, must not write over it)."""
        if not self._closed:
            self.state.save()

    def _devices_changed(self, user, added, removed):
        """A verified chain lists other devices than before: forget the sessions with the removed ones, tell the app."""
        for device in removed:
            self.state.sessions.pop((user, bytes.fromhex(device)), None)
        revoked = user == self.user and self.device_id in removed and self.state.status == ACTIVE
        if revoked:
            self.state.status = REVOKED
        if removed:
            self.save()
        self.client.on_devices_changed(user, added, removed)
        if revoked:
            self._alarm(Alarm.DEVICE_REVOKED, self.user, f"this device ({self.device_id}) was revoked")

    def _alarm(self, kind, user, detail):
        log.warn("e2ee alarm {kind} about {user}: {detail}", kind=kind, user=user, detail=detail)
        self.client.on_alarm(kind, user, detail)

    @property
    def device_id(self):
        return self.state.device.id.hex()

    @property
    def status(self):
        return self.state.status

    @property
    def active(self):
        return self.state.status == ACTIVE

    def why_not(self):
        """Why this installation cannot encrypt now (None if it can)."""
        status = self.state.status
        if status == ACTIVE:
            return None
        if status == PENDING:
            return (
                f"This installation is a new device of {self.user} ({self.device_id}) that none of your devices"
                " has added yet: call link_request() here and link_new_device() on one of your devices."
            )
        if status == REVOKED:
            return f"This device ({self.device_id}) was revoked; log in again to start it as a new device."
        return "This device is not set up yet: log in again."

    # -- login ------------------------------------------------------------------------------

    def login_device(self, resume=False):
        """The device_id to log in bound to, or None: a resumed session binds only an active device.

        (A Resume refused for its device spends the token; a Login refused can try again unbound.)
        """
        if resume:
            return self.device_id if self.state.status == ACTIVE else None
        return self.device_id if self.state.status in (NEW, PENDING, ACTIVE) else None

    def refused(self, error):
        """A login bound to this device was refused with `error` (NoSuchDevice or NotAllowed)."""
        if isinstance(error, commands.NoSuchDevice):
            if self.state.status == ACTIVE:
                self._alarm(Alarm.DEVICE_MISSING, self.user, f"device {self.device_id} is not in {self.user}'s chain")
            self.state.status = PENDING
            self.save()

    async def start(self, bound):
        """After a login (bound or not): check the own chain, start it or find this device in it, keep prekeys.

        Answers True if the session should be bound to the device now (it was
        not, and the device is active): the client then logs in again bound.
        """
        return await self._locked(self._start, bound)

    async def _locked(self, work, *args):
        """The coroutine function `work`, run holding the device's lock (one change of the device file at a time)."""
        return await self.lock.run(lambda: Deferred.fromCoroutine(work(*args)))

    async def _start(self, bound):
        state = self.state
        own = await self.chains.refresh(self.user)
        device = state.device.id
        if own is not None and device in own.devices:
            state.status = ACTIVE
        elif own is not None and device in own.revoked:
            if state.status != REVOKED:
                state.status = REVOKED
                self._alarm(Alarm.DEVICE_REVOKED, self.user, f"this device ({self.device_id}) was revoked")
        elif own is None or own.seq == 0:
            await self._start_chain()
        else:
            if state.status == ACTIVE:
                self._alarm(Alarm.DEVICE_MISSING, self.user, f"device {self.device_id} is not in {self.user}'s chain")
            state.status = PENDING
        self.save()
        if state.status != ACTIVE:
            return False
        if not bound:
            return True
        await self.keep_prekeys()
        await self.transcripts.check_server_key()
        return False

    async def _start_chain(self):
        """Publish link 1: this device, trusted on first use (another installation may win the race: then pending)."""
        link = chain.first(self.state.device, _name_bytes(self.client.client_name or "device"))
        try:
            await self.client.call(commands.PublishChainLink, link=link.to_bytes())
        except commands.NotAllowed:
            own = await self.chains.refresh(self.user)
            self.state.status = ACTIVE if own is not None and self.state.device.id in own.devices else PENDING
            return
        self.chains.accept_own(self.user, link)
        self.state.status = ACTIVE

    # -- prekeys ----------------------------------------------------------------------------

    async def keep_prekeys(self):
        """Rotate the signed prekey when a week old, refill one-time prekeys below REFILL_BELOW, upload what is new."""
        state, now = self.state, self.client.clock.seconds()
        if state.current_spk is None or now - state.spk_made_at / 1000 >= WEEK:
            for spk_id, (prekey, retire_at) in list(state.signed_prekeys.items()):
                if not retire_at:
                    state.signed_prekeys[spk_id] = (prekey, _ms(now + WEEK))
            spk = state.device.new_signed_prekey()
            state.signed_prekeys[spk.id] = (spk, 0)
            state.spk_made_at, state.spk_uploaded = _ms(now), False
        for spk_id, (_, retire_at) in list(state.signed_prekeys.items()):
            if retire_at and retire_at <= _ms(now):
                del state.signed_prekeys[spk_id]
        count = (await self.client.call(commands.CountPrekeys))["count"]
        if count + len(state.opks_to_upload) < REFILL_BELOW:
            made = state.device.new_one_time_prekeys(ONE_TIME_PREKEYS - count - len(state.opks_to_upload))
            state.one_time_prekeys.update((prekey.id, prekey) for prekey in made)
            state.opks_to_upload.update(prekey.id for prekey in made)
        self.save()  # the prekey id counter moved: saved before anything is uploaded
        while not state.spk_uploaded or state.opks_to_upload:
            batch = sorted(state.opks_to_upload)[: commands.MAX_PREKEYS_PER_UPLOAD]
            spk = state.current_spk
            await self.client.call(
                commands.UploadPrekeys,
                device_id=self.device_id,
                spk_id=spk.id,
                spk_pub=spk.public,
                spk_signature=spk.signature,
                one_time=[
                    {"opk_id": opk_id, "opk_pub": state.one_time_prekeys[opk_id].public}
                    for opk_id in batch
                    if opk_id in state.one_time_prekeys
                ],
            )
            state.spk_uploaded = True
            state.opks_to_upload.difference_update(batch)
            self.save()
        rotate_in = state.spk_made_at / 1000 + WEEK - self.client.clock.seconds()
        self._schedule("rotate", rotate_in, self._keep_prekeys_locked)

    def _schedule(self, name, delay, work):
        """Run `work` (a coroutine function) in `delay` seconds while logged in; one timer per name."""
        if self._closed:
            return
        if name in self._timers:
            timer, finished = self._timers.pop(name)
            if timer.active():
                timer.cancel()
                finished.callback(None)
        finished = Deferred()

        def run():
            self._timers.pop(name, None)
            self._running.append(finished)
            finished.addBoth(lambda result: self._running.remove(finished) or result)
            if self.client.username is None or self.state.status != ACTIVE:
                finished.callback(None)
                return
            done = Deferred.fromCoroutine(work())
            done.addErrback(self._work_failed, name)
            done.addBoth(lambda _: finished.callback(None))

        self._timers[name] = (self.client.clock.callLater(max(delay, 0), run), finished)

    @staticmethod
    def _work_failed(failure, name):
        if failure.check(ConnectionClosed):
            log.info("e2ee: {name} waits for the connection", name=name)  # done again at the next login
        else:
            log.failure("e2ee: {name} failed", failure, name=name)

    def settled(self):
        """Deferred firing when the scheduled work that is due (a refill, a rotation whose time came) is done."""
        now = self.client.clock.seconds()
        due = [finished for timer, finished in self._timers.values() if timer.getTime() <= now]
        return DeferredList(due + list(self._running)).addCallback(lambda _: None)

    REFILL_DELAY = 1.0  # seconds after a first message before counting one-time prekeys (once for a burst)

    def refill_soon(self):
        """A first message used a one-time prekey: count what is left (once, after a burst) and refill if low."""
        if "refill" not in self._timers:
            self._schedule("refill", self.REFILL_DELAY, self._keep_prekeys_locked)

    async def _keep_prekeys_locked(self):
        return await self._locked(self.keep_prekeys)

    # -- sending ----------------------------------------------------------------------------

    async def seal_message(self, conversation_id, text):
        """Sealed: `text` encrypted for the current devices of the members of the latest verified membership state.

        The sessions it advanced and the counter are saved before this
        returns, so nothing is ever encrypted twice under one key.
        """
        return await self._locked(self._seal, conversation_id, text)

    async def _seal(self, conversation_id, text):
        reason = self.why_not()
        if reason is not None:
            raise EncryptionUnavailable(reason)
        state = self.state
        moves = self._moves
        current = conversation_id in self._current
        members = self._memberships.get(conversation_id) if current else await self.refresh_membership(conversation_id)
        if members is None or members.latest is None:
            raise EncryptionUnavailable("This conversation has no verified membership state yet.")
        if self.user not in members.members:
            raise EncryptionUnavailable(
                "You are not a member of this conversation by its latest signed state."
            )
        names = sorted(members.members)
        chains = await _gather([self.chains.refresh(name, self.chain_max_age) for name in names])
        recipients = {}
        for name, chain_state in zip(names, chains):
            for device_id, device in (chain_state.devices if chain_state is not None else {}).items():
                if device_id != state.device.id:
                    recipients[device_id] = device.keys
        others = [keys for keys in recipients.values() if keys.user != self.user]
        if not others and len(names) > 1:
            raise EncryptionUnavailable(
                f"No device of {', '.join(name for name in names if name != self.user)} to encrypt to:"
                " they have not used an encrypting client yet."
            )
        sessions, unreached = {}, []
        missing = [keys for device, keys in recipients.items() if (keys.user, device) not in state.sessions]
        started = await _gather([self._start_session(keys) for keys in missing])
        for keys, session in zip(missing, started):
            if session is None:
                unreached.append(keys.device.hex())
                del recipients[keys.device]
            else:
                sessions[keys.device] = session
        if others and not any(keys.user != self.user for keys in recipients.values()):
            raise EncryptionUnavailable(
                f"No device of {', '.join(name for name in names if name != self.user)} could be reached"
                " (no prekeys, or keys that are not the ones their chain lists)."
            )
        for device, keys in recipients.items():
            if device not in sessions:
                sessions[device] = Session.from_bytes(state.sessions[keys.user, device])
        chain = self.transcripts.get(conversation_id) if current else (await self.transcripts.sync(conversation_id))[0]
        mode = chain.mode  # the mode in force at the view the header names: (n, e_n) verified
        key = os.urandom(KEY_BYTES)
        counter = state.counter + 1
        sealed = envelope.seal(
            text.encode("utf-8"),
            conversation_id,
            members.members_hash,
            self.user,
            state.device.id,
            counter,
            _ms(self.client.clock.seconds()),
            list(recipients),
            lambda device, wrapped, context: sessions[device].encrypt(wrapped, context),
            key=key,
            mode=mode,
            prev=(chain.position.n, chain.position.e),
            signer=state.device,
        )  # signed if attestable
        state.counter = counter
        for device, session in sessions.items():
            state.sessions[recipients[device].user, device] = session.to_bytes()
        self.save()
        wraps = tuple((device.hex(), wrap) for device, wrap in sealed.wraps.items())
        if self._moves == moves:  # (a push that came while this was waiting on the server must not be lost)
            self._current.add(conversation_id)
        return Sealed(sealed.header, sealed.body, wraps, key, tuple(sorted(unreached)), sealed.signature, mode)

    async def _start_session(self, keys):
        """A new Session with the device `keys` (from its verified chain) from a claimed bundle; None if it has none."""
        try:
            bundle = await self.client.call(commands.ClaimPrekeyBundle, username=keys.user, device_id=keys.device.hex())
        except (commands.NoSuchDevice, commands.NoSuchUser, commands.RateLimited) as problem:
            log.info("e2ee: no prekey bundle for {user} {device}: {problem}", user=keys.user, device=keys.device.hex(),
                     problem=problem)
            return None
        if bundle["sig_pub"] != keys.sig_pub or bundle["dh_pub"] != keys.dh_pub:
            self._alarm(
                Alarm.KEY_MISMATCH,
                keys.user,
                f"the server's bundle for device {keys.device.hex()} lists other keys"
                f" than {keys.user}'s verified chain",
            )
            return None
        session = Session()
        try:
            session.initiate(
                self.state.device.keys,
                self.state.device.dh_private,
                Bundle(keys, bundle["spk_id"], bundle["spk_pub"], bundle["spk_signature"], bundle.get("opk_id") or 0,
                       bundle.get("opk_pub") or b""),
            )
        except (BadPrekeySignature, LowOrderKey, Malformed) as problem:
            self._alarm(Alarm.BAD_PREKEY, keys.user, f"device {keys.device.hex()}'s prekey bundle: {problem}")
            return None
        return session

    def sent(self, message_id, key, conversation_id, seq):
        """Our message was stored as `message_id` at `seq`: keep its key and place, to read it in history.

        Only the device log is written: nothing else changed (the session and counter were saved when sealing).
        """
        self.state.keep_key(message_id, key, conversation_id, seq)
        self.state.save_log()

    async def sent_checked(self, answer, sealed, conversation_id):
        """sent(), then the chain: our message's link and receipt (SendEncrypted's answer); its transcripts.Verdict."""
        self.sent(answer["message_id"], sealed.key, conversation_id, answer["seq"])
        return await self._locked(self._sent_checked, answer, sealed, conversation_id)

    async def _sent_checked(self, answer, sealed, conversation_id):
        return await self.transcripts.sent(
            conversation_id, answer["seq"], sealed.header, sealed.body, sealed.signature, answer.get("receipt")
        )

    # -- receiving --------------------------------------------------------------------------

    async def open_message(self, conversation_id, item):
        """(plaintext, None) or (None, Undecryptable) for an encrypted message (a DeliverEncrypted or history item).

        Whatever it changed (session, replay window, used one-time prekey,
        the message's key) is saved before this returns. A failure raises
        its alarm; errors talking to the server propagate (try again later).
        """
        return await self._locked(self._open_reporting, conversation_id, item)

    async def open_checked(self, conversation_id, item):
        """(plaintext, Undecryptable or None, transcripts.Verdict or None): open_message(), then the chain checks.

        The message's link (and receipt) are taken into the conversation's
        chain whether or not it could be decrypted; the Verdict is None for a
        header that does not parse or names another conversation.
        """
        return await self._locked(self._open_checked, conversation_id, item)

    async def _open_checked(self, conversation_id, item):
        text, problem = await self._open_reporting(conversation_id, item, save=False)
        verdict = None
        try:
            verdict = await self._checked_place(conversation_id, item, problem)
            return text, problem, verdict
        finally:  # one write of the device file for the message opened and its link taken (three fsyncs, not six)
            if problem is None or verdict is not None:  # (a push that changed nothing writes nothing)
                self.save()

    async def _checked_place(self, conversation_id, item, problem):
        """The transcripts.Verdict on an opened (or unopenable) message's place in the chain; None if it has none."""
        try:
            header = Header.from_bytes(item["header"])
        except Malformed:
            return None
        if header.conversation != conversation_id or self.state.status != ACTIVE:
            return None
        if problem is not None and problem.problem in (Problem.MISMATCHED_HEADER, Problem.REPLAY, Problem.DUPLICATE):
            return None  # not this conversation's message at this place: its link is not taken
        try:
            verdict = await self.transcripts.check(conversation_id, item, header, opened=problem is None)
        except ConnectionClosed:
            raise  # (the push is not answered: it comes again)
        except Exception as failed:  # never a reason not to hand the message over: it is shown, unchecked
            if isinstance(failed, commands.ChatError):
                log.info("e2ee: the chain of conversation {id} could not be followed now: {why}", id=conversation_id,
                         why=failed)
            else:
                log.failure("e2ee: following the chain of conversation {id}", id=conversation_id)
            verdict = transcripts.Verdict(None, header.mode, transcripts.UNCHECKED, ())
        return verdict

    async def _open_reporting(self, conversation_id, item, save=True):
        try:
            return await self._open(conversation_id, item, save), None
        except Undecryptable as problem:
            if problem.problem != Problem.NO_KEY:
                self._alarm(
                    problem.problem,
                    item["sender"],
                    f"message {item['message_id']} of conversation {conversation_id} cannot be read: {problem.detail}",
                )
            return None, problem

    async def _open(self, conversation_id, item, save=True):
        """The plaintext of an encrypted message, or Undecryptable; what it changed is written unless not `save`."""
        state = self.state
        if state.status != ACTIVE:
            raise Undecryptable(Problem.NO_DEVICE, self.why_not())
        try:
            header = Header.from_bytes(item["header"])
        except Malformed as problem:
            raise Undecryptable(Problem.MALFORMED_HEADER, f"its header is malformed ({problem})")
        if (header.conversation, header.sender, header.sender_device.hex()) != (
            conversation_id,
            item["sender"],
            item["sender_device"],
        ):
            raise Undecryptable(Problem.MISMATCHED_HEADER, "its header names another conversation, sender or device")
        kept = state.message_keys.get(item["message_id"])
        if kept is not None:  # read before (pushed again, or in history): its key, checked against the header
            key, place = kept[0], kept[1:]
            if place != (conversation_id, item["seq"]):
                raise Undecryptable(
                    Problem.REPLAY,
                    f"this message was read before as no. {place[1]}"
                    + (" of another conversation" if place[0] != conversation_id else "")
                    + f", and comes again as no. {item['seq']}",
                )
            return self._checked(lambda: open_body(header, item["body"], key).decode("utf-8"))
        wrap = item.get("wrap")
        if wrap is None:
            if item.get("history"):
                raise Undecryptable(Problem.NO_KEY, "this device has no key for it (sent before it was added?)")
            raise Undecryptable(Problem.NO_WRAP, "no wrap of its key for this device came with it")
        sender = self.chains.device(header.sender, header.sender_device)
        if sender is None:
            await self.chains.refresh(header.sender)
            sender = self.chains.device(header.sender, header.sender_device)
        if sender is None:
            raise Undecryptable(
                Problem.UNKNOWN_DEVICE,
                f"{header.sender_device.hex()} is not a current device of {header.sender}'s verified chain",
            )
        members = self._memberships.get(conversation_id)
        if members is None or members.members_at(header.members) is None:
            try:
                members = await self.refresh_membership(conversation_id)
            except (commands.NoSuchConversation, commands.NotAllowed) as problem:  # (left meanwhile; not encrypted)
                raise Undecryptable(Problem.UNKNOWN_MEMBERSHIP, f"its membership states cannot be fetched: {problem}")
        if members is None or members.members_at(header.members) is None:
            raise Undecryptable(Problem.UNKNOWN_MEMBERSHIP, "it names a membership state this device has not verified")
        if not members.is_member_at(header.members, header.sender):
            raise Undecryptable(Problem.NOT_A_MEMBER, f"{header.sender} is not a member of the state it was sent under")
        peer = (header.sender, header.sender_device)
        window = state.replay.get(peer) or ReplayWindow()
        if not window.fresh(header.counter):
            raise Undecryptable(Problem.REPLAY, f"counter {header.counter} of that device was seen before")
        saved = state.sessions.get(peer)
        session = Session.from_bytes(saved) if saved is not None else Session()
        opened = {}

        def unwrap(wrapped, context, check):
            def checked(message_key):
                text = check(message_key).decode("utf-8")  # before the session changes
                opened["key"] = message_key
                return text

            try:
                return session.decrypt(wrapped, context, checked)
            except NewSession:
                accepted = session.accept(
                    state.device.keys,
                    state.device.dh_private,
                    sender,
                    wrapped,
                    context,
                    self._signed_prekey,
                    self._one_time_prekey,
                    checked,
                )
                opened["opk"] = accepted.opk_id
                return accepted.plaintext

        text = self._checked(lambda: unseal(header, item["body"], wrap, state.device.id, unwrap))
        window.record(header.counter)
        state.replay[peer] = window
        state.sessions[peer] = session.to_bytes()
        state.keep_key(item["message_id"], opened["key"], conversation_id, item["seq"], peer, header.counter)
        if opened.get("opk"):
            state.one_time_prekeys.pop(opened["opk"], None)
        if save:
            self.save()
        if opened.get("opk"):
            self.refill_soon()
        return text

    @staticmethod
    def _checked(work):
        try:
            return work()
        except Exception as error:
            for kind, problem in _UNSEAL_PROBLEMS:
                if isinstance(error, kind):
                    raise Undecryptable(problem, f"{problem.replace('_', ' ')}: {error}")
            raise

    def _signed_prekey(self, spk_id):
        found = self.state.signed_prekeys.get(spk_id)
        return found[0].private if found is not None else None

    def _one_time_prekey(self, opk_id):
        found = self.state.one_time_prekeys.get(opk_id)
        return found.private if found is not None else None

    # -- membership -------------------------------------------------------------------------

    def membership(self, conversation_id):
        """The verified membership.MembershipState of a conversation, or None (no fetch here)."""
        return self._memberships.get(conversation_id)

    async def verified_membership(self, conversation_id):
        """The MembershipState after fetching what is new (None if the conversation has no state yet)."""
        return await self._locked(self.refresh_membership, conversation_id)

    def is_encrypted(self, conversation_id):
        return conversation_id in self._memberships

    def devices_pushed(self, user):
        """`user` added or revoked a device (DevicesChanged): a coroutine that fetches and checks their chain
        (under the lock, as sealing and opening), or None if one is waiting to already: pushes for a user
        coalesce, so a server repeating them makes at most one fetch wait behind another."""
        if user in self._devices_pushed:
            return None
        self._devices_pushed.add(user)
        return self._locked(self._fetch_pushed, user)

    async def _fetch_pushed(self, user):
        self._devices_pushed.discard(user)  # (a push from now on asks for one more fetch)
        # (the push marked the chain stale: fetched unless a seal fetched it since, after the push)
        return await self.chains.refresh(user, self.chain_max_age)

    def moved(self, conversation_id=None):
        """The membership or the chain of a conversation (None: of every one) may have moved on: both are fetched
        before its next message is sealed.

        Told by the pushes ConversationUpdated and ModeChanged, at each login, and
        by a refusal of a message sealed under an earlier membership state. A
        message sealed with a view of the chain that a push had not yet made
        stale is what a message crossing a mode change on its way is: valid at
        the view its header names, and the answer's receipt brings the chain up
        to date (the links before it are fetched).
        """
        self._moves += 1
        if conversation_id is None:
            self._current.clear()
        else:
            self._current.discard(conversation_id)

    async def refresh_membership(self, conversation_id):
        """The MembershipState after the states the server has beyond the last one verified (None: none yet).

        States that do not extend what was seen, or break a rule, raise the
        alarm and change nothing: the answer is what was verified before.
        """
        known = self._memberships.get(conversation_id) or membership.MembershipState(conversation_id)
        after = known.epoch - 1 if known.epoch else 0
        raw = []
        while True:
            page = await self.client.call(
                commands.GetMembership, conversation_id=conversation_id, after_epoch=after + len(raw)
            )
            raw += page["states"]
            if not page["has_more"] or not page["states"]:
                break
        try:
            states = [membership.State.from_bytes(data) for data in raw]
            if known.epoch:
                if not states or states[0].epoch != known.epoch or states[0].hash() != known.head:
                    raise membership.Fork(known.epoch, "it is not the state seen before with this epoch")
                states = states[1:]
            if not states:
                return self._memberships.get(conversation_id)
            actors = sorted({s.actor for s in states})
            await _gather([self.chains.refresh(actor) for actor in actors])
            new = known.extend(states, self.chains.lookup, self.chains.history_lookup)
        except (membership.MembershipError, Malformed) as problem:
            kind = Alarm.MEMBERSHIP_FORK if isinstance(problem, membership.Fork) else Alarm.BAD_MEMBERSHIP
            self._alarm(kind, None, f"conversation {conversation_id}'s membership: {problem}")
            return self._memberships.get(conversation_id)
        self._keep_membership(conversation_id, new, states)
        return new

    def _keep_membership(self, conversation_id, new, states):
        self._memberships[conversation_id] = new
        self.state.memberships[conversation_id] = self.state.memberships.get(conversation_id, []) + [
            s.to_bytes() for s in states
        ]
        self.save()

    def _require_active(self):
        reason = self.why_not()
        if reason is not None:
            raise EncryptionUnavailable(reason)

    async def publish_first(self, conversation_id, kind, title, others):
        """Sign and publish epoch 1 of a conversation we created (unless it has a state: a direct one found again)."""
        return await self._locked(self._publish_first, conversation_id, kind, title, others)

    async def _publish_first(self, conversation_id, kind, title, others):
        self._require_active()
        current = await self.refresh_membership(conversation_id)
        if current is not None and current.latest is not None:
            return current
        names = [name.lower() for name in others]
        first = membership.create(conversation_id, kind, title or "", names, self.state.device)
        answer = await self.client.call(
            commands.PublishMembership, conversation_id=conversation_id, membership=first.to_bytes()
        )
        published = self._published(conversation_id, first)
        await self._receipt_taken(conversation_id, answer.get("receipt"))
        return published

    async def _receipt_taken(self, conversation_id, receipt):
        """Take the links of a receipt (PublishMembership's, PublishMode's) into the conversation's chain."""
        try:
            parsed = transcript.Receipt.from_bytes(receipt) if receipt else None
        except Malformed as problem:
            self._alarm(Alarm.HEAD_MISMATCH, None, f"conversation {conversation_id}: a malformed receipt ({problem})")
            parsed = None
        if parsed is None:
            await self.transcripts.sync(conversation_id)
        else:
            await self.transcripts.sync(conversation_id, parsed.links, [parsed.head])

    async def change_membership(self, conversation_id, op, names, send):
        """Sign the state after the latest verified one (`op` "add" of `names`, or "leave"), `send` it, keep it.

        `send(state bytes)` is the AddMembers or LeaveConversation call; if it
        fails nothing is kept.
        """
        return await self._locked(self._change_membership, conversation_id, op, names, send)

    async def _change_membership(self, conversation_id, op, names, send):
        self._require_active()
        current = await self.refresh_membership(conversation_id)
        if current is None or current.latest is None:
            raise EncryptionUnavailable("This conversation has no verified membership state yet.")
        if op == "add":
            new = membership.add(current.latest, [name.lower() for name in names], self.state.device)
        else:
            new = membership.leave(current.latest, self.state.device)
        await send(new.to_bytes())
        self.moved(conversation_id)  # (its link is in the chain, which AddMembers and Leave do not answer with)
        return self._published(conversation_id, new)

    def _published(self, conversation_id, new_state):
        """Our own state the server took: it follows the latest verified one."""
        known = self._memberships.get(conversation_id) or membership.MembershipState(conversation_id)
        new = known.extend([new_state], self.chains.lookup)
        self._keep_membership(conversation_id, new, [new_state])
        return new

    async def check_members(self, conversation_id, listed):
        """Compare the server's member list with the latest verified state: alarms for a member added or left out."""
        current = await self._locked(self.refresh_membership, conversation_id)
        if current is None or current.latest is None:
            return  # not published yet (the creator publishes right after creating)
        listed = set(listed)
        injected, missing = sorted(listed - current.members), sorted(current.members - listed)
        if injected:
            self._alarm(
                Alarm.INJECTED_MEMBER,
                None,
                f"the server lists {', '.join(injected)} in conversation {conversation_id},"
                " which no signed state added:"
                " nothing is encrypted to them",
            )
        if missing:
            self._alarm(
                Alarm.MISSING_MEMBER,
                None,
                f"the server leaves {', '.join(missing)} out of conversation {conversation_id},"
                " whose signed state has them",
            )

    # -- verifiable conversations (client/transcripts.py) -----------------------------------

    def mode(self, conversation_id):
        """The mode in force at the head of the conversation's chain verified so far (no fetch)."""
        chain = self.transcripts.chain(conversation_id)
        return chain.mode if chain is not None else membership.DEFAULT_MODE

    async def current_mode(self, conversation_id):
        """The mode in force, after fetching what is new of the conversation's chain."""
        return await self._locked(self._current_mode, conversation_id)

    async def _current_mode(self, conversation_id):
        chain, _ = await self.transcripts.sync(conversation_id)
        return chain.mode

    async def set_mode(self, conversation_id, mode):
        """Sign and publish a mode event: the conversation is `mode` (attestable or deniable) from its link on."""
        return await self._locked(self._set_mode, conversation_id, mode)

    async def _set_mode(self, conversation_id, mode):
        self._require_active()
        if mode not in envelope.MODES:
            raise ValueError(f"a mode is attestable or deniable, not {mode!r}")
        members = await self.refresh_membership(conversation_id)
        if members is None or members.latest is None or self.user not in members.members:
            raise EncryptionUnavailable("You are not a member of this conversation by its latest signed state.")
        if not await self.transcripts.ready():
            raise EncryptionUnavailable("This server keeps no conversation chains: a conversation has no mode here.")
        chain, _ = await self.transcripts.sync(conversation_id)
        if chain.modes and chain.mode == mode:
            raise membership.ModeUnchanged(len(chain.modes) + 1, f"the conversation is {mode} already")
        previous = membership.ModeEvent.from_bytes(chain.modes[-1]) if chain.modes else None
        event = membership.set_mode(previous, conversation_id, mode, members.members_hash, self.state.device)
        answer = await self.client.call(commands.PublishMode, conversation_id=conversation_id, event=event.to_bytes())
        await self._receipt_taken(conversation_id, answer.get("receipt"))
        return self.transcripts.get(conversation_id).mode

    async def sign_transcript(self, conversation_id, again=False):
        """A transcript head over the conversation's chain as verified now, signed and sent; transcripts.Signed or None.

        None in a deniable conversation (and, unless `again`, if this n was signed already).
        """
        return await self._locked(self._sign_transcript, conversation_id, again)

    async def _sign_transcript(self, conversation_id, again):
        if not self.active or conversation_id not in self._memberships:
            return None
        return await self.transcripts.sign(conversation_id, _ms(self.client.clock.seconds()), again)

    async def transcript_signed(self, conversation_id, username, head):
        """A member's transcript head pushed (TranscriptSigned), checked: a transcripts.TranscriptSigned."""
        return await self._locked(self.transcripts.received_head, conversation_id, username, head)

    async def export(self, conversation_id, disclose=None):
        """transcripts.Export of the conversation, sealed by this device now (ExportError if it cannot be made)."""
        return await self._locked(self._export, conversation_id, disclose)

    async def _export(self, conversation_id, disclose):
        self._require_active()
        return await self.transcripts.export(conversation_id, _ms(self.client.clock.seconds()), disclose)

    # -- devices, safety numbers, trust -----------------------------------------------------

    async def devices(self):
        own = await self.chains.refresh(self.user)
        devices = own.devices.values() if own is not None else ()
        return [DeviceInfo(d.keys.device.hex(), d.name, d.keys.device == self.state.device.id) for d in devices]

    async def revoke(self, device_id):
        """Publish the revoke of our device `device_id` (hex), signed by this device."""
        return await self._locked(self._revoke, device_id)

    async def _revoke(self, device_id):
        self._require_active()
        target = bytes.fromhex(device_id)
        own = await self.chains.refresh(self.user)
        if own is None or target not in own.devices:
            raise LinkError(f"{device_id} is not a current device of yours")
        link = chain.revoke(own, self.state.device, target)
        await self.client.call(commands.PublishChainLink, link=link.to_bytes())
        self.chains.accept_own(self.user, link)
        self.state.sessions.pop((self.user, target), None)
        if target == self.state.device.id:
            self.state.status = REVOKED
        self.save()

    async def rename(self, device_id, name):
        """Publish a new name for our device `device_id` (hex), signed by this device: every contact sees it."""
        return await self._locked(self._rename, device_id, name)

    async def _rename(self, device_id, name):
        self._require_active()
        target = bytes.fromhex(device_id)
        own = await self.chains.refresh(self.user)
        if own is None or target not in own.devices:
            raise LinkError(f"{device_id} is not a current device of yours")
        link = chain.rename(own, self.state.device, target, name)
        own.extend([link])  # (a name too long for a link is refused here, before the server sees it)
        await self.client.call(commands.PublishChainLink, link=link.to_bytes())
        self.chains.accept_own(self.user, link)
        self.save()

    async def link_request(self, signer=None):
        """The text a new device shows, for one of the user's devices (`signer`, hex; the only one if None) to add."""
        if self.state.status == ACTIVE:
            raise LinkError("This device is already one of your devices.")
        own = await self.chains.refresh(self.user)
        if own is None or not own.devices:
            raise LinkError(f"{self.user} has no device that could add this one.")
        if signer is None:
            if len(own.devices) != 1:
                names = ", ".join(f"{d.name} ({d.keys.device.hex()})" for d in own.devices.values())
                raise LinkError(f"Say which of your devices adds this one: {names}")
            signer_id = next(iter(own.devices))
        else:
            signer_id = bytes.fromhex(signer)
            if signer_id not in own.devices:
                raise LinkError(f"{signer} is not a current device of yours")
        device = self.state.device
        draft = chain.draft_add(own, device.keys, _name_bytes(self.client.client_name or "device"), signer_id)
        draft = chain.countersign_link(draft, device)
        placeholder = replace(draft, signature=bytes(64))  # signed by the device that adds it
        return LINK_PREFIX + enc([LINK_REQUEST, placeholder.to_bytes()]).hex()

    async def link_new_device(self, request):
        """Sign and publish the add link of a link_request() made on a new device; (device id hex, name)."""
        return await self._locked(self._link_new_device, request)

    async def _link_new_device(self, request):
        self._require_active()
        if not request.startswith(LINK_PREFIX):
            raise LinkError("Not a device link request.")
        try:
            label, data = dec(bytes.fromhex(request[len(LINK_PREFIX) :].strip()), 2)
            if label != LINK_REQUEST:
                raise Malformed("not a link request of this version")
            draft = chain.Link.from_bytes(data)
        except (ValueError, Malformed) as problem:
            raise LinkError(f"This device link request is damaged ({problem}).")
        device = self.state.device
        if draft.user != self.user or draft.signer != device.id or draft.op != "add":
            raise LinkError("This request is for another user or another of your devices.")
        own = await self.chains.refresh(self.user)
        if own is None or (draft.seq, draft.prev) != (own.seq + 1, own.head):
            raise LinkError("Your device chain changed since this request was made: make a new one on the new device.")
        link = chain.sign_link(draft, device)
        try:
            own.extend([link])  # every rule, the countersignature included, before the server sees it
        except chain.ChainError as problem:
            raise LinkError(f"This request cannot be added: {problem}")
        await self.client.call(commands.PublishChainLink, link=link.to_bytes())
        self.chains.accept_own(self.user, link)
        self.save()
        return draft.device.hex(), draft.name

    async def safety_number(self, user):
        own, theirs = await _gather([self.chains.refresh(self.user), self.chains.refresh(user)])
        if own is None or theirs is None or not own.devices or not theirs.devices:
            whose = user if theirs is None or not theirs.devices else self.user
            raise EncryptionUnavailable(f"No verified devices of {whose}.")
        return safety.safety_number(own, theirs)

    async def trust(self, user):
        """Record that the user compared safety numbers with `user`: their current devices are verified."""
        theirs = await self.chains.refresh(user)
        if theirs is None or not theirs.devices:
            raise EncryptionUnavailable(f"No verified devices of {user}.")
        self.state.trusted[user] = frozenset(d.keys.sig_pub for d in theirs.devices.values())
        self.save()

    def is_verified(self, user):
        """True if `user`'s current devices are exactly the ones trusted (a change of devices undoes it)."""
        theirs = self.chains.get(user)
        trusted = self.state.trusted.get(user)
        if theirs is None or trusted is None or not theirs.devices:
            return False
        return trusted == frozenset(d.keys.sig_pub for d in theirs.devices.values())
