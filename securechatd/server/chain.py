"""Verifiable conversations on the server: signed chain heads, the chain, mode events, transcript heads.

The store places every message, membership state and mode event of an
encrypted conversation as the next link of its hash chain, in the
transaction that stores it (store/links.py). The server then signs heads
(conversation, n, e_n) with its own Ed25519 key: `HeadSigner` gathers the
links committed in one store batch, makes every one of them a head, and
signs the Merkle root of all those heads once, off the reactor thread: a
batch costs one signature, however many conversations and messages it
holds (e2ee/transcript.py, `sign_heads`), and each link's receipt is just
its head and itself. The newest head of each conversation is stored, for the
receipts of messages read back later (links up to that head). Two heads
signed for one n with different e are portable proof that the server
lied, which is the point: the server cannot show members different
histories without handing them that proof.

Mode events and transcript heads are signed by members' devices; the server
checks their shape, their place and who signs them (as for membership
states), keeps them and passes them on; clients check everything again.
"""

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from securechatd.commands import BadSignature, InvalidArgument, NoSuchDevice, NotAllowed
from securechatd.e2ee.encoding import Malformed
from securechatd.e2ee.membership import MODE_SIGN_LABEL, ModeEvent
from securechatd.e2ee.transcript import TH_LABEL, TranscriptHead, receipt_bytes, server_key_id, sign_heads
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


def _sign_heads(key, heads):
    """[head bytes] for [(conversation, n, e)], under one signature: run off the reactor thread."""
    return [head.to_bytes() for head in sign_heads(key, heads)]


class HeadSigner:
    """Signs chain heads for the links committed in each store batch, and gives each link its receipt."""

    def __init__(self, store, key, run_in_thread):
        self.store = store
        self.key = key
        self.public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.key_id = server_key_id(self.public)
        self._run = run_in_thread
        self._waiting = []  # [(ChainLink, Deferred of its receipt)] of the batch being finished
        self._signing = succeed(None)  # one signing job at a time, so receipts come in link order
        store.after_each_batch(self._sign)

    def receipt(self, link):
        """Deferred receipt bytes for a ChainLink just committed (None if signing failed: it is logged),
        once the batch that committed it is done."""
        receipt = Deferred()
        self._waiting.append((link, receipt))
        if not self.store.finishing_batch:  # its batch is done already
            self._sign()
        return receipt

    def _sign(self):
        """Every link waiting is a head of its own, all signed together: each receipt is its head and its link."""
        if not self._waiting:
            return
        waiting, self._waiting = self._waiting, []
        heads = [(link.conversation_id, link.n, link.e) for link, _ in waiting]
        self._signing.addCallback(lambda _: self._run(_sign_heads, self.key, heads))
        self._signing.addCallbacks(self._signed, self._failed, callbackArgs=(waiting,), errbackArgs=(waiting,))
        self._signing.addErrback(lambda failure: log.failure("giving receipts", failure))

    def _signed(self, signed, waiting):
        last = {}  # conversation -> its last link's head: kept for receipts of messages read back later
        for (link, receipt), head in zip(waiting, signed):
            receipt.callback(receipt_bytes(head, [link.data]))
            if link.n > last.get(link.conversation_id, (0,))[0]:
                last[link.conversation_id] = (link.n, head)
        stored = self.store.add_heads([(c, n, head) for c, (n, head) in last.items()])
        stored.addErrback(lambda failure: log.failure("storing signed heads", failure))

    def _failed(self, failure, waiting):
        log.failure("signing chain heads", failure)
        for _, receipt in waiting:
            receipt.callback(None)


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
        return event.number, await self.heads.receipt(link)

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
