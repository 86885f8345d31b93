"""The account log on the server: one Merkle tree of every user's event-chain heads, and its signed heads.

The store places each event (store/account_log.py) in the transaction that
does what it records and returns its leaf; this service keeps the tree of
all leaves in memory (securechatd/e2ee/merkle.py: O(log n) proofs for any past
size), built from the database at start-up and brought up to date whenever
a leaf shows up that another process wrote (securechatd-admin), signs tree
heads with the server's key off the reactor thread, and answers a user's
events with an inclusion proof each and a consistency proof from the tree
size the client saw last (docs/PROTOCOL.md, "Account log").
"""

from twisted.application.service import Service
from twisted.internet.defer import DeferredLock
from twisted.logger import Logger

from securechatd.accountlog import head_bytes, proof_bytes
from securechatd.commands import InvalidArgument, NotAllowed, ServiceUnavailable
from securechatd.e2ee.merkle import Tree, sign_tree_head
from securechatd.server.policy import deferred
from securechatd.store.account_log import Logged

log = Logger()

PAGE = 50  # events per GetAccountLog answer: with proofs of 20 hashes each, well within one AMP value
REPLAYED = "This signed action was used before: sign it again with a new nonce."
DAMAGED = "The server's account log is damaged (an event is missing): its operator must restore it; nothing is shown."


class AccountLog:
    def __init__(self, store, clock, key, run_in_thread):
        self.store = store
        self.clock = clock
        self.key = key  # the server's Ed25519 signing key (chain heads too: the labels keep them apart)
        self._run = run_in_thread
        self.tree = Tree()
        self._head = None  # the newest TreeHead signed
        self._syncing = DeferredLock()
        self.damaged = False  # a leaf is missing from the database: the log can no longer grow, nor be shown

    def added(self, logged):
        """The store appended the leaf of a Logged (a store answer: None or a word are passed over)."""
        if not isinstance(logged, Logged):
            return
        if logged.leaf_index == self.tree.size:
            self.tree.append(logged.leaf)
        elif logged.leaf_index > self.tree.size and not self.damaged:  # another process wrote leaves in between
            self.sync().addErrback(lambda failure: log.failure("bringing the account log up to date", failure))

    def sync(self):
        """Deferred: the tree holds every leaf in the database (each added once, whoever asks)."""
        return self._syncing.run(self._sync)

    @deferred
    async def _sync(self):
        for logged in await self.store.account_leaves(self.tree.size):
            if logged.leaf_index == self.tree.size:
                self.tree.append(logged.leaf)
            elif logged.leaf_index > self.tree.size:
                if not self.damaged:
                    log.error(
                        "the account log in the database has no leaf {index}: it was damaged or tampered with;"
                        " GetAccountLog answers SERVICE_UNAVAILABLE until it is restored from a backup",
                        index=self.tree.size,
                    )
                self.damaged = True
                return

    @deferred
    async def record(self, username, event):
        """Log a NewEvent of `username`'s (store/account_log.py): its Logged leaf (None: no such user).

        NOT_ALLOWED for a signed action accepted before.
        """
        logged = await self.store.record_event(username, event, self.clock.seconds())
        if logged == "replayed":
            raise NotAllowed(REPLAYED)
        self.added(logged)
        return logged

    def record_quietly(self, username, event):
        """Log an event nobody waits for (a failed login): a failure is logged, never raised."""
        recorded = self.record(username, event)
        recorded.addErrback(lambda failure: log.failure("logging an account event of {user}", failure, user=username))

    async def head(self):
        """The TreeHead of the tree as it is: signed again only once the tree has grown."""
        size = self.tree.size
        if self._head is not None and self._head.size == size:
            return self._head
        root = self.tree.root(size)
        head = await self._run(sign_tree_head, self.key, size, root, round(self.clock.seconds() * 1000))
        if self._head is None or head.size > self._head.size:
            self._head = head
        return head

    @deferred
    async def page(self, username, after_seq, tree_size):
        """GetAccountLog: ([(event bytes, leaf index, inclusion proof bytes)], head bytes, consistency proof
        bytes, has_more) for `username`'s events after `after_seq`, proved against one signed head."""
        after_seq = after_seq or 0
        tree_size = tree_size or 0
        if after_seq < 0 or tree_size < 0:
            raise InvalidArgument("after_seq and tree_size are 0 or more.")
        rows = await self.store.account_events(username, after_seq, PAGE + 1)
        await self.sync()  # (after reading the events: their leaves are in the tree)
        if self.damaged:  # (a head of the part before the damage would show every later event as never logged)
            raise ServiceUnavailable(DAMAGED)
        head = await self.head()
        if tree_size > head.size:
            raise InvalidArgument(
                f"tree_size {tree_size} is larger than this log ({head.size} leaves): a server that showed you"
                " a larger one has since shown you another."
            )
        consistency = self.tree.consistency_proof(tree_size, head.size) if 0 < tree_size < head.size else []
        entries = [
            (event, index, proof_bytes(self.tree.inclusion_proof(index, head.size))) for event, index in rows[:PAGE]
        ]
        return entries, head_bytes(head), proof_bytes(consistency), len(rows) > PAGE


class AccountLogService(Service):
    """Builds the account log's tree from the database as the daemon starts (before, it is built on first use)."""

    def __init__(self, account_log):
        self.account_log = account_log

    def startService(self):
        super().startService()
        built = self.account_log.sync()
        built.addErrback(lambda failure: log.failure("building the account log's tree", failure))
