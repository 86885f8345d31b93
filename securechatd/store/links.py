"""SQL for the conversations' hash chains: links, the server's signed heads, mode events, transcript heads.

Every message, membership state and mode event placed in an encrypted
conversation becomes the conversation's next link (docs/E2EE.md, "Chain
links"), in the transaction that places it: the link's n is the
conversation's chain_n + 1 and its e_n hashes e_{n-1}, so the chain can
only ever grow at its end and a rolled-back batch leaves no link behind.
The store computes e_n (a SHA-256 of bytes it stores anyway) but never
holds the server's key: before a batch's transaction commits, LinkStore has
every link it appended signed by the service's `sign_heads` (server/chain.py,
one signature for the batch), gives each link its receipt and keeps each
conversation's newest head, all in that transaction. So a link is never
committed without its signed head, and a new message's receipt is there when
its caller gets the message.
"""

from securechatd.e2ee.transcript import Link, genesis, next_hash, receipt_bytes
from securechatd.records import ChainLink
from securechatd.store.base import USER_ID, StoreBase, StoreError, blobs_page


def milliseconds(now):
    """A link's server time: the seconds of the injected clock, in whole milliseconds."""
    return round(now * 1000)


def append_link(txn, conversation_id, n, prev_e, kind, number, item, now):
    """Store link `n` (the conversation's chain_n was moved to n by the caller) after e_{n-1} = `prev_e`
    (None for the first link): the ChainLink."""
    link = Link(conversation_id, n, milliseconds(now), kind, number, item)
    e = next_hash(genesis(conversation_id) if prev_e is None else bytes(prev_e), link)
    data = link.to_bytes()
    txn.execute("INSERT INTO links (conversation_id, n, e, link) VALUES (?, ?, ?, ?)", (conversation_id, n, e, data))
    appended = ChainLink(conversation_id, n, e, data)
    txn.links.append(appended)  # signed before the transaction commits (LinkStore._finish_batch)
    return appended


# The end of a conversation's chain moves on by one, in the UPDATE that numbers what the link is for
# (or alone, NEXT_LINK): RETURNING the new n and e_{n-1} (NULL at n = 1).
NEXT_LINK_SET = "chain_n = chain_n + 1"
NEXT_LINK_RETURNING = "chain_n, (SELECT e FROM links WHERE conversation_id = conversations.id AND n = chain_n - 1)"
NEXT_LINK = f"UPDATE conversations SET {NEXT_LINK_SET} WHERE id = ? RETURNING {NEXT_LINK_RETURNING}"


def next_link(txn, conversation_id, kind, number, item, now):
    """Place the next link of the conversation's chain: its ChainLink."""
    txn.execute(NEXT_LINK, (conversation_id,))
    n, prev_e = txn.fetchone()
    return append_link(txn, conversation_id, n, prev_e, kind, number, item, now)


def receipts(txn, conversation_id, ns):
    """{n: receipt bytes} for the links `ns` of one conversation that a stored head covers (the
    first signed head h at or after n, and links n..h); links no head covers yet are left out."""
    if not ns:
        return {}
    first = min(ns)
    txn.execute(
        "SELECT n, head FROM heads WHERE conversation_id = ? AND n >= ? ORDER BY n LIMIT ?",
        (conversation_id, first, len(ns) + 1),
    )
    heads = txn.fetchall()
    if not heads:
        return {}
    txn.execute(
        "SELECT n, link FROM links WHERE conversation_id = ? AND n BETWEEN ? AND ? ORDER BY n",
        (conversation_id, first, heads[-1][0]),
    )
    links = {n: bytes(data) for n, data in txn.fetchall()}
    found = {}
    for n in ns:
        head = next(((h, bytes(data)) for h, data in heads if h >= n), None)
        if head is not None:
            found[n] = receipt_bytes(head[1], [links[k] for k in range(n, head[0] + 1)])
    return found


class LinkStore(StoreBase):
    # [head bytes] for [(conversation_id, n, e)], all under one signature: set by server/chain.py's
    # HeadSigner (None: links are stored unsigned, as by securechatd-admin)
    sign_heads = None

    def _finish_batch(self, txn):
        """Every link the batch appended is a head, all signed at once: each link's receipt is its head and
        itself. Each conversation's newest head is kept, for the receipts of messages read back later."""
        if not txn.links or self.sign_heads is None:
            return
        try:
            heads = self.sign_heads([(link.conversation_id, link.n, link.e) for link in txn.links])
        except Exception as problem:  # (then every call that placed a link fails: none is stored unsigned)
            raise StoreError(f"signing chain heads: {problem!r}") from problem
        newest = {}
        for link, head in zip(txn.links, heads):
            link.receipt = receipt_bytes(head, [link.data])
            newest[link.conversation_id] = (link.conversation_id, link.n, head)  # (links come in n order)
        txn.executemany(
            "INSERT INTO heads (conversation_id, n, head) VALUES (?, ?, ?) ON CONFLICT DO NOTHING", newest.values()
        )

    def chain(self, conversation_id, after_n, limit):
        """Deferred ([link bytes] after n `after_n`, at most `limit`, [head bytes] covering them, has_more).

        The heads are those from the first link returned up to the first head
        at or after the last one (which covers every link returned before it).
        """
        return self._read("chain", self._chain_txn, conversation_id, after_n, limit)

    @staticmethod
    def _chain_txn(txn, conversation_id, after_n, limit):
        txn.execute(
            "SELECT n, link FROM links WHERE conversation_id = ? AND n > ? ORDER BY n LIMIT ?",
            (conversation_id, after_n, limit + 1),
        )
        rows = txn.fetchall()
        links = rows[:limit]
        if not links:
            return [], [], False
        txn.execute(
            "SELECT head FROM heads WHERE conversation_id = ? AND n >= ?"
            " AND n <= COALESCE((SELECT MIN(n) FROM heads WHERE conversation_id = ? AND n >= ?), ?) ORDER BY n",
            (conversation_id, links[0][0], conversation_id, links[-1][0], links[-1][0]),
        )
        heads = [bytes(head) for (head,) in txn.fetchall()]
        return [bytes(data) for _, data in links], heads, len(rows) > limit

    # -- mode events -----------------------------------------------------------------------

    def publish_mode(self, conversation_id, number, prev_hash, event_hash, event, members_hash, now):
        """Deferred: record mode event `number` (whose prev is `prev_hash`) of the encrypted conversation
        as its next link, if it follows the last one recorded and the conversation's latest membership
        hash is still `members_hash`: its ChainLink; None (nothing changed) if not."""
        return self._write(
            "publish_mode", self._publish_mode_txn, conversation_id, number, prev_hash, event_hash, event,
            members_hash, now,
        )

    @staticmethod
    def _publish_mode_txn(txn, conversation_id, number, prev_hash, event_hash, event, members_hash, now):
        txn.execute(
            "SELECT number, hash FROM mode_events WHERE conversation_id = ? ORDER BY number DESC LIMIT 1",
            (conversation_id,),
        )
        last = txn.fetchone()
        last_number, last_hash = (last[0], bytes(last[1])) if last else (0, None)
        if number != last_number + 1 or (last_hash is not None and prev_hash != last_hash):
            return None
        txn.execute("SELECT members_hash FROM conversations WHERE id = ? AND encrypted = 1", (conversation_id,))
        row = txn.fetchone()
        if row is None or row[0] is None or bytes(row[0]) != members_hash:
            return None
        txn.execute(
            "INSERT INTO mode_events (conversation_id, number, hash, event, published_at) VALUES (?, ?, ?, ?, ?)",
            (conversation_id, number, event_hash, event, now),
        )
        return next_link(txn, conversation_id, "mode", number, event_hash, now)

    def mode_events(self, conversation_id, after_number, limit):
        """Deferred ([event bytes] after `after_number` in order, at most `limit`, has_more)."""
        return self._read("mode_events", self._mode_events_txn, conversation_id, after_number, limit)

    @staticmethod
    def _mode_events_txn(txn, conversation_id, after_number, limit):
        return blobs_page(
            txn,
            "SELECT event FROM mode_events WHERE conversation_id = ? AND number > ? ORDER BY number LIMIT ?",
            (conversation_id, after_number),
            limit,
        )

    # -- transcript heads --------------------------------------------------------------------

    def keep_transcript_head(self, conversation_id, username, device_id, n, head):
        """Deferred: keep `head` as the device's newest transcript head of the conversation unless it
        has one at a later n: True if kept."""
        return self._write(
            "keep_transcript_head", self._keep_transcript_head_txn, conversation_id, username, device_id, n, head
        )

    @staticmethod
    def _keep_transcript_head_txn(txn, conversation_id, username, device_id, n, head):
        txn.execute(
            "INSERT INTO transcript_heads (conversation_id, user_id, device_id, n, head)"
            f" SELECT ?, ({USER_ID}), ?, ?, ? WHERE true"
            " ON CONFLICT (conversation_id, user_id, device_id) DO UPDATE SET n = excluded.n, head = excluded.head"
            " WHERE excluded.n >= transcript_heads.n",
            (conversation_id, username, device_id, n, head),
        )
        return txn.rowcount == 1

    def transcript_heads(self, conversation_id):
        """Deferred [head bytes]: each current member device's newest transcript head, by user and device."""
        return self._read("transcript_heads", self._transcript_heads_txn, conversation_id)

    @staticmethod
    def _transcript_heads_txn(txn, conversation_id):
        txn.execute(
            "SELECT t.head FROM transcript_heads t JOIN members m"
            " ON m.conversation_id = t.conversation_id AND m.user_id = t.user_id"
            " WHERE t.conversation_id = ? ORDER BY t.user_id, t.device_id",
            (conversation_id,),
        )
        return [bytes(head) for (head,) in txn.fetchall()]
