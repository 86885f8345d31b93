"""Verifiable conversations on the server: signed chain heads, the chain, mode events, transcript heads.

The store places every message, membership state and mode event of an
encrypted conversation as the next link of its hash chain, in the
transaction that stores it (store/links.py). The server signs heads
(conversation, n, e_n) with its own Ed25519 key: before a store batch
commits, `HeadSigner` makes every link the batch appended a head and signs
the Merkle root of all those heads once, on the database thread: a batch
costs one signature, however many conversations and messages it holds
(e2ee/transcript.py, `signed_heads`), and each link's receipt is just its
head and itself. The newest head of each conversation is stored in the same
transaction, for the receipts of messages read back later (links up to
that head). Two heads
signed for one n with different e are portable proof that the server
lied, which is the point: the server cannot show members different
histories without handing them that proof.

Mode events and transcript heads are signed by members' devices; the server
checks their shape, their place and who signs them (as for membership
states), keeps them and passes them on; clients check everything again.
"""

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from twisted.internet.defer import succeed
from twisted.logger import Logger

from securechatd.commands import BadSignature, InvalidArgument, NoSuchDevice, NotAllowed
from securechatd.e2ee.encoding import Malformed
from securechatd.e2ee.membership import MODE_SIGN_LABEL, ModeEvent
from securechatd.e2ee.transcript import TH_LABEL, TranscriptHead, server_key_id, signed_heads
from securechatd.secretbox import load_or_create_key
from securechatd.server.keys import signed_by
from securechatd.server.policy import check_limit, deferred, take_action

log = Logger()

CHAIN_PAGE = (100, 1000)  # GetChain's default and largest limit (links are about 120 bytes)
MODES_PAGE = 100
MOVED_ON = "The mode of this conversation changed, or its membership did; fetch them and sign again."
# what members sign and the server checks: (its name, its signer's user and device fields, its label)
_SIGNED = {
    ModeEvent: ("mode event", "actor", "actor_device", MODE_SIGN_LABEL),
    TranscriptHead: ("transcript head", "user", "device", TH_LABEL),
}


def load_server_key(path):
    """The server's Ed25519 signing key, from its 32-byte seed file (made 0600 at first start)."""
    return Ed25519PrivateKey.from_private_bytes(load_or_create_key(path))


class HeadSigner:
    """Signs the chain heads of each store batch: the store calls it before the batch commits (store/links.py)."""

    def __init__(self, store, key):
        self.key = key
        self.public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.key_id = server_key_id(self.public)
        store.sign_heads = self.sign

    def sign(self, heads):
        """[head bytes] for [(conversation, n, e)] under one signature (on the database thread)."""
        return signed_heads(self.key, heads)


class ChainService:
    """GetServerKey, GetChain, PublishMode, GetModes, SignTranscript and GetTranscriptHeads."""

    def __init__(self, store, conversations, registry, clock, heads, run_in_thread, actions):
        self.store = store
        self.conversations = conversations
        self.registry = registry
        self.clock = clock
        self.heads = heads
        self._run = run_in_thread
        self.actions = actions  # the TokenBucket of membership changes: a mode change is one

    def server_key(self):
        return succeed((self.heads.public, self.heads.key_id))

    async def _encrypted(self, session, conversation_id):
        conversation = await self.conversations.member_of(conversation_id, session.username)
        if not conversation.encrypted:
            raise NotAllowed("This conversation is not end-to-end encrypted: it has no chain.")
        return conversation

    @deferred
    async def chain(self, session, conversation_id, after_n, limit):
        """([link bytes] after `after_n`, [head bytes] covering them, has_more)."""
        limit = check_limit(limit, CHAIN_PAGE)
        if after_n is not None and after_n < 0:
            raise InvalidArgument("after_n must be 0 or more.")
        conversation = await self._encrypted(session, conversation_id)
        return await self.store.chain(conversation.id, after_n or 0, limit)

    @deferred
    async def modes(self, session, conversation_id, after_number):
        if after_number is not None and after_number < 0:
            raise InvalidArgument("after_number must be 0 or more.")
        conversation = await self._encrypted(session, conversation_id)
        return await self.store.mode_events(conversation.id, after_number or 0, MODES_PAGE)

    async def _device_key(self, session, what):
        """The Ed25519 public key of the session's device (NOT_ALLOWED unbound, NO_SUCH_DEVICE revoked)."""
        if session.device_id is None:
            raise NotAllowed(f"Log in with your device_id to {what}.")
        chain = await self.store.chain_state(session.username, [session.device_id])
        device = chain and chain.devices.get(session.device_id)
        if device is None or device.revoked_seq is not None:
            raise NoSuchDevice(f"Device {session.device_id} is not a current device of your chain.")
        return device.sig_pub

    async def _signed_here(self, session, conversation_id, data, kind):
        """(Conversation, the ModeEvent or TranscriptHead `data` encodes), once it is checked to be this
        conversation's and signed by the session's own device; else the coded error of the first check."""
        what, user, device, label = _SIGNED[kind]
        try:
            item = kind.from_bytes(data)
        except Malformed as problem:
            raise InvalidArgument(f"Not a {what}: {problem}.")
        conversation = await self._encrypted(session, conversation_id)
        if item.conversation != conversation.id:
            raise InvalidArgument(f"This {what} is another conversation's than the one it is sent to.")
        if getattr(item, user) != session.username or getattr(item, device).hex() != session.device_id:
            raise NotAllowed(f"A {what} you send must be yours, signed by the device this session is bound to.")
        take_action(self.actions, session)
        sig_pub = await self._device_key(session, f"send a {what}")
        if not await self._run(signed_by, sig_pub, item.signature, label, item.fields()):
            raise BadSignature(f"The {what}'s signature does not check with your device's key.")
        return conversation, item

    @deferred
    async def publish_mode(self, session, conversation_id, data):
        """(the event's number, its receipt): a signed mode event placed as the conversation's next link."""
        conversation, event = await self._signed_here(session, conversation_id, data, ModeEvent)
        link = await self.store.publish_mode(
            conversation.id, event.number, event.prev, event.hash(), data, event.members, self.clock.seconds()
        )
        if link is None:
            raise NotAllowed(MOVED_ON)
        self.registry.tell(  # (clients keep the chain between messages)
            conversation.members,
            lambda client: client.mode_changed(conversation.id),
            exclude=session,
            devices_only=True,
        )
        return event.number, link.receipt

    @deferred
    async def sign_transcript(self, session, conversation_id, data):
        """Keep a transcript head the session's device signed, and pass it to the members' other devices."""
        conversation, head = await self._signed_here(session, conversation_id, data, TranscriptHead)
        kept = await self.store.keep_transcript_head(conversation.id, session.username, session.device_id, head.n, data)
        if kept:  # to every member's devices, the signer's others too
            self.registry.tell(
                conversation.members,
                lambda client: client.transcript_signed(conversation.id, session.username, data),
                exclude=session,
                devices_only=True,
            )

    @deferred
    async def transcript_heads(self, session, conversation_id):
        conversation = await self._encrypted(session, conversation_id)
        return await self.store.transcript_heads(conversation.id)
