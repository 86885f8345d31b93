"""The key directory: users' device chains, their devices' prekeys, and sessions bound to devices.

The server holds no private key and cannot read a message; what it can do
is refuse what no honest client sends, so a buggy client or a stranger
cannot break someone's chain or drain their prekeys. It checks each link's
shape, its place in the chain (seq, prev), who signs it and both its
signatures, and each signed prekey's signature, with the keys the chain
lists. Clients check everything again against what they saw before: a
server that lies is caught there (docs/E2EE.md, "Device chain").

Signatures are checked by `run_in_thread` (a Deferred), off the reactor
thread, like bcrypt.
"""


from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from twisted.logger import Logger

from securechatd import commands
from securechatd.commands import BadSignature, InvalidArgument, NoSuchDevice, NoSuchUser, NotAllowed
from securechatd.e2ee.chain import COUNTERSIGN_LABEL, KEY_BYTES, LINK_LABEL, ZERO_HASH, Link
from securechatd.e2ee.encoding import Malformed, verify
from securechatd.e2ee.keys import SPK_LABEL, spk_fields
from securechatd.server.accounts import check_device_id, existing_name
from securechatd.server.policy import deferred, take, take_action
from securechatd.store.keys import NewLink

log = Logger()
security = Logger(namespace="securechatd.security")

SIGNATURE_BYTES = 64
PREKEY_IDS = 1 << 32  # prekey ids are 4 bytes; one-time prekey id 0 means "none" in an X3DH header
MOVED_ON = "This link does not follow the last link of your chain: the chain moved on; fetch it."


def signed_by(public_key, signature, label, fields):
    """True if `signature` is the Ed25519 key `public_key`'s (raw bytes) over label and fields: run off the reactor."""
    return verify(Ed25519PublicKey.from_public_bytes(public_key), signature, label, fields)


def link_signature_problem(link, signer_pub):
    """None if the link's signature (and an add's countersignature) check; else which does not."""
    fields = link.fields()
    if not signed_by(signer_pub, link.signature, LINK_LABEL, fields):
        return "The link's signature does not check with its signer's key."
    if link.op == "add" and not signed_by(link.sig_pub, link.countersignature, COUNTERSIGN_LABEL, fields):
        return "The link's countersignature does not check with the added device's key."
    return None


def _current(device):
    return device is not None and device.revoked_seq is None


class KeyService:
    def __init__(
        self, store, registry, clock, run_in_thread, actions, claims, max_devices, max_one_time_prekeys, look_up
    ):
        self.store = store
        self.look_up = look_up  # PresenceService.look_up: asking about a stranger is a directory search
        self.registry = registry
        self.clock = clock
        self._run = run_in_thread
        self.actions = actions  # the TokenBucket of membership changes: a chain change is one
        self.claims = claims  # a TokenBucket per (caller, user claimed from)
        self.max_devices = max_devices  # current devices per chain
        self.max_one_time_prekeys = max_one_time_prekeys  # stored per device

    # -- chains ------------------------------------------------------------------------

    @deferred
    async def publish(self, session, data):
        """Append the link `data` to the caller's chain: (its seq, its hash)."""
        link = self._parse(data)
        if link.user != session.username:
            raise NotAllowed("A link of someone else's chain: you may only publish to your own.")
        take_action(self.actions, session)
        device, signer = link.device.hex(), link.signer.hex()
        state = await self._chain_state(session, {device, signer})
        if link.seq != state.seq + 1 or link.prev != (state.hash or ZERO_HASH):
            raise NotAllowed(MOVED_ON)
        self._check_publisher(session, link, signer, state)
        self._check_op(link, state.devices.get(device), state.current)
        signer_pub = link.sig_pub if link.seq == 1 else state.devices[signer].sig_pub
        problem = await self._run(link_signature_problem, link, signer_pub)
        if problem:
            raise BadSignature(problem)
        digest = link.hash()
        new = NewLink(link.seq, link.prev, digest, data, link.op, device, link.sig_pub, link.dh_pub, link.name)
        if not await self._store_link(session, link, new):
            raise NotAllowed(MOVED_ON)
        security.info(
            "device chain of {username}: link {seq} {op}s device {target}",
            username=session.username,
            seq=link.seq,
            op=link.op,
            target=device,  # (the audit log's field for what an event is about)
            signer=signer,
            session_id=session.session_id,
            security_event=f"device_{link.op}",
        )
        if link.op == "revoke":
            self._end_sessions(session, device)
        told = self._tell_contacts(session)  # (the link is stored: its answer does not wait for this)
        told.addErrback(lambda failure: log.failure("telling {user}'s contacts of a device change", failure,
                                                    user=session.username))
        return link.seq, digest

    @deferred
    async def _tell_contacts(self, session):
        """DevicesChanged to every device session of the caller's contacts and the caller's others: their
        clients keep chains between messages, and fetch this one before they encrypt again."""
        contacts = await self.store.contacts_of(session.username)
        self.registry.tell(
            [session.username, *sorted(contacts)],
            lambda client: client.devices_changed(session.username),
            exclude=session,
            devices_only=True,
        )

    async def _store_link(self, session, link, new):
        """True if the NewLink `new` (of the checked Link `link`) now ends the caller's chain."""
        return await self.store.append_link(session.username, new, self.clock.seconds())

    async def _chain_state(self, session, device_ids):
        state = await self.store.chain_state(session.username, device_ids)
        if state is None:  # (deleted by securechatd-admin while logged in)
            raise NoSuchUser("Your account no longer exists.")
        return state

    @staticmethod
    def _parse(data):
        if len(data) > commands.MAX_LINK_BYTES:
            raise InvalidArgument(f"A chain link is at most {commands.MAX_LINK_BYTES} bytes.")
        try:
            return Link.from_bytes(data)
        except Malformed as problem:
            raise InvalidArgument(f"Not a chain link: {problem}.")

    @staticmethod
    def _check_publisher(session, link, signer, state):
        """Only the session's own device signs what it publishes; link 1 is the device itself."""
        if link.seq == 1:
            if link.op != "add" or link.signer != link.device:
                raise NotAllowed("The first link of a chain adds the device that signs it.")
            if session.device_id not in (None, signer):
                raise NotAllowed("This session is bound to another device than the link's.")
            return
        if session.device_id is None:
            raise NotAllowed("Log in with your device_id to change your device chain.")
        if session.device_id != signer:
            raise NotAllowed("A session publishes only links its own device signs.")
        if not _current(state.devices.get(signer)):
            raise NotAllowed("The signer is not a current device of this chain.")

    def _check_op(self, link, device, current):
        """What the link does must fit the device it is about, as the chain stands (`current` devices)."""
        if link.op == "add":
            if device is not None:
                raise NotAllowed("That device is already in the chain (a revoked device cannot come back).")
            if current >= self.max_devices:
                raise NotAllowed(f"A chain holds at most {self.max_devices} devices: revoke one first.")
        elif not _current(device):
            raise NoSuchDevice(f"There is no current device {link.device.hex()} in your chain.")

    def _end_sessions(self, publisher, device_id):
        """A revoked device's sessions end at once (the publishing one right after its answer)."""
        for session in self.registry.all_sessions_of(publisher.username):
            if session.device_id != device_id:
                continue
            if session is publisher:
                self.clock.callLater(0, self._end, session)
            else:
                self._end(session)

    @staticmethod
    def _end(session):
        session.end()
        session.client.session_ended("This device was revoked.")

    @deferred
    async def chain(self, session, username, after_seq):
        """([link bytes], has_more): `username`'s chain after link `after_seq` (0 or None: from the start)."""
        name = existing_name(username)
        after_seq = after_seq or 0
        if after_seq < 0:
            raise InvalidArgument("after_seq must be 0 or more.")
        await self._looked_up(session, name)
        page = await self.store.device_chain(name, after_seq, commands.CHAIN_PAGE)
        if page is None:
            raise NoSuchUser(f"There is no user {username[:40]!r}.")
        return page

    async def _looked_up(self, session, name):
        """Asking about `name` is a directory search unless the caller shares a conversation with them
        (PresenceService.look_up); one's own name asks nothing (a client fetches its own chain as often as
        its contacts')."""
        if name != session.username:
            await self.look_up(session, [name])

    # -- prekeys -----------------------------------------------------------------------

    @staticmethod
    def _own_device(session, device_id=None):
        """The session's device; `device_id`, if given, must be it."""
        if session.device_id is None:
            raise NotAllowed("Log in with your device_id to manage your device's prekeys.")
        if device_id is not None and check_device_id(device_id) != session.device_id:
            raise NotAllowed("A session manages only the prekeys of its own device.")
        return session.device_id

    @deferred
    async def upload(self, session, device_id, spk_id, spk_pub, spk_signature, one_time):
        """Replace the device's signed prekey and add `one_time` prekeys [(id, pub)]: how many are stored."""
        device_id = self._own_device(session, device_id)
        if not 0 <= spk_id < PREKEY_IDS:
            raise InvalidArgument("spk_id must be from 0 to 2**32 - 1.")
        if len(spk_pub) != KEY_BYTES or len(spk_signature) != SIGNATURE_BYTES:
            raise InvalidArgument(f"spk_pub is {KEY_BYTES} bytes and spk_signature {SIGNATURE_BYTES}.")
        if len(one_time) > commands.MAX_PREKEYS_PER_UPLOAD:
            raise InvalidArgument(f"At most {commands.MAX_PREKEYS_PER_UPLOAD} one-time prekeys per upload.")
        if any(not 1 <= opk_id < PREKEY_IDS or len(opk_pub) != KEY_BYTES for opk_id, opk_pub in one_time):
            raise InvalidArgument(f"Each opk_id is from 1 to 2**32 - 1 and each opk_pub {KEY_BYTES} bytes.")
        if len(dict(one_time)) < len(one_time):
            raise InvalidArgument("An opk_id appears twice in this upload.")
        state = await self._chain_state(session, [device_id])
        device = state.devices.get(device_id)
        if not _current(device):
            raise NoSuchDevice("This device is not a current device of your chain: publish its link first.")
        fields = spk_fields(session.username, bytes.fromhex(device_id), spk_id, spk_pub)
        if not await self._run(signed_by, device.sig_pub, spk_signature, SPK_LABEL, fields):
            raise BadSignature("spk_signature does not check with this device's key.")
        outcome, value = await self.store.store_prekeys(
            session.username,
            device_id,
            (spk_id, spk_pub, spk_signature),
            one_time,
            self.max_one_time_prekeys,
            self.clock.seconds(),
        )
        if outcome == "no device":
            raise NoSuchDevice("This device was revoked meanwhile.")
        if outcome == "conflict":
            raise InvalidArgument(f"One-time prekey {value} is already stored with another key.")
        if outcome == "full":
            raise NotAllowed(
                f"A device keeps at most {self.max_one_time_prekeys} one-time prekeys; {value} are stored."
            )
        return value

    @deferred
    async def count(self, session):
        """One-time prekeys left for the session's device."""
        return await self.store.count_prekeys(session.username, self._own_device(session))

    @deferred
    async def claim(self, session, username, device_id):
        """The PrekeyBundle of one of `username`'s devices, with at most one one-time prekey, never handed out twice."""
        name = existing_name(username)
        check_device_id(device_id)
        take(self.claims, (session.username, name), f"Too many prekey claims for {name}")
        await self._looked_up(session, name)
        outcome, bundle = await self.store.claim_prekeys(name, device_id)
        if outcome == "no user":
            raise NoSuchUser(f"There is no user {username[:40]!r}.")
        if outcome == "no device":
            raise NoSuchDevice(f"{name} has no current device {device_id}.")
        if outcome == "no prekeys":
            raise NoSuchDevice(f"Device {device_id} of {name} has not uploaded prekeys yet.")
        return bundle

    # -- the caller's devices ------------------------------------------------------------

    @deferred
    async def devices(self, session):
        """(current Devices of the caller's chain, the caller's Sessions): who is logged in on which device."""
        devices = await self.store.current_devices(session.username)
        return devices, self.registry.all_sessions_of(session.username)
