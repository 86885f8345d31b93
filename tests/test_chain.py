"""The server's side of verifiable conversations: chain links, signed heads and receipts, mode events,
transcript heads, and the server's signing key (docs/PROTOCOL.md, "Verifiable conversations").

Every check here uses e2ee/transcript.py, the client's own code, on what the
server answers: what an honest server hands out must verify.
"""

import os
import stat

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.trial import unittest

from securechatd import commands
from securechatd.commands import BadSignature, InvalidArgument, NoSuchConversation, NotAllowed
from securechatd.e2ee import membership, transcript
from securechatd.server.chain import HeadSigner, load_server_key
from securechatd.store import StoreError
from securechatd.store.links import next_link
from tests.helpers import Connection, make_store
from tests.test_encrypted import Scene

SERVER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))  # tests/helpers.py's make_hub key


class ChainTests(Scene):
    settings = {"message_burst": 1000}

    def key(self):
        return self.ok(self.alice, commands.GetServerKey)["key"]

    def chain(self, conn, conversation_id, **arguments):
        return self.ok(conn, commands.GetChain, conversation_id=conversation_id, **arguments)

    def verified(self, conversation_id):
        """The Position after every link of the chain, each head checked against the recomputed e."""
        answer = self.chain(self.alice, conversation_id)
        links = [transcript.Link.from_bytes(data) for data in answer["links"]]
        positions = transcript.Position(conversation_id).extend(links)
        for data in answer["heads"]:
            head = transcript.Head.from_bytes(data)
            head.verify(self.key())
            self.assertEqual(head.e, positions[head.n - 1].e)
        return positions[-1], links

    def test_the_server_key_and_its_id(self):
        answer = self.ok(self.bob_watch, commands.GetServerKey)
        self.assertEqual(answer["key"], transcript._public(answer["key"]).public_bytes_raw())
        self.assertEqual(answer["key_id"], transcript.server_key_id(answer["key"]))
        stranger = Connection(self.hub)
        self.assertIn("log in", str(self.failureResultOf(stranger.call(commands.GetServerKey)).value).lower())

    def test_messages_and_membership_states_are_links_in_order(self):
        for n in range(3):
            self.sent(self.alice, self.group_id, self.seal(self.alice_laptop, self.group_id, self.everyone))
        self.add(self.alice, self.group_id, ["dave"], self.alice_laptop)
        position, links = self.verified(self.group_id)
        self.assertEqual(
            [(link.kind, link.number) for link in links],
            [("membership", 1), ("message", 1), ("message", 2), ("message", 3), ("membership", 2)],
        )
        self.assertEqual(links[1].server_time, round(self.clock.seconds() * 1000))
        self.assertEqual(position.n, 5)

    def test_each_message_has_a_receipt_that_verifies(self):
        before, _ = self.verified(self.group_id)
        sealed = self.seal(self.alice_laptop, self.group_id, self.everyone)
        sent = self.sent(self.alice, self.group_id, sealed, signature=b"s" * 64)
        receipt = transcript.Receipt.from_bytes(sent["receipt"])
        [after] = transcript.check_receipt(receipt, before, self.key())
        self.assertEqual(after.n, before.n + 1)
        [link] = receipt.links
        self.assertEqual(link.item, transcript.message_item(sealed.header, sealed.body, b"s" * 64))
        self.assertEqual((link.kind, link.number), ("message", sent["seq"]))
        phone = self.connect("bob", self.bob_phone)
        [push] = self.pushed(phone)
        self.assertEqual((push["receipt"], push["signature"]), (sent["receipt"], b"s" * 64))

    def test_a_receipt_from_a_stale_position_does_not_verify(self):
        """A receipt proves the link follows e_{n-1}: checked from another position, it fails."""
        sent = self.sent(self.alice, self.group_id, self.seal(self.alice_laptop, self.group_id, self.everyone))
        receipt = transcript.Receipt.from_bytes(sent["receipt"])
        with self.assertRaises(transcript.TranscriptError):
            transcript.check_receipt(receipt, transcript.Position(self.group_id), self.key())

    def test_a_device_that_was_offline_gets_receipts_from_the_stored_heads(self):
        sent = [
            self.sent(
                self.alice, self.group_id, self.seal(self.alice_laptop, self.group_id, self.everyone), client_msg_id=f"m{n}"
            )
            for n in range(3)
        ]
        laptop = self.connect("bob", self.bob_laptop)
        pushes = self.pushed(laptop)
        self.assertEqual([push["seq"] for push in pushes], [1, 2, 3])
        self.assertEqual([push["receipt"] for push in pushes], [answer["receipt"] for answer in sent])
        again = self.seal(self.alice_laptop, self.group_id, self.everyone)
        self.assertEqual(self.sent(self.alice, self.group_id, again, client_msg_id="m2"), sent[-1])  # a resend, too

    def test_get_chain_pages_with_the_heads_that_cover_each_page(self):
        for n in range(5):
            self.sent(self.alice, self.group_id, self.seal(self.alice_laptop, self.group_id, self.everyone))
        phone = self.connect("bob", self.bob_phone)
        page = self.chain(phone, self.group_id, limit=2)
        self.assertEqual((len(page["links"]), page["has_more"]), (2, True))
        rest = self.chain(phone, self.group_id, after_n=2, limit=10)
        self.assertEqual((len(rest["links"]), rest["has_more"]), (4, False))
        self.assertEqual(
            [transcript.Link.from_bytes(data).n for data in page["links"] + rest["links"]], list(range(1, 7))
        )
        for answer in (page, rest):  # the last head of a page covers its last link
            last_link = transcript.Link.from_bytes(answer["links"][-1]).n
            self.assertGreaterEqual(transcript.Head.from_bytes(answer["heads"][-1]).n, last_link)

    def test_get_chain_bad_input(self):
        self.refused(self.alice, InvalidArgument, commands.GetChain, conversation_id=self.group_id, after_n=-1)
        self.refused(self.alice, InvalidArgument, commands.GetChain, conversation_id=self.group_id, limit=0)
        self.refused(self.alice, InvalidArgument, commands.GetChain, conversation_id=self.group_id, limit=1001)
        dave = self.connect("dave", self.device("dave"))
        self.refused(dave, NoSuchConversation, commands.GetChain, conversation_id=self.group_id)
        self.refused(dave, NoSuchConversation, commands.GetChain, conversation_id=10**9)

    # -- mode events ------------------------------------------------------------------------

    def mode(self, previous, mode, device=None):
        device = device or self.alice_laptop
        return membership.set_mode(previous, self.group_id, mode, self.latest[self.group_id].hash(), device)

    def test_a_mode_event_is_a_link_with_a_receipt(self):
        before, _ = self.verified(self.group_id)
        event = self.mode(None, "deniable")
        answer = self.ok(self.alice, commands.PublishMode, conversation_id=self.group_id, event=event.to_bytes())
        self.assertEqual(answer["number"], 1)
        [after] = transcript.check_receipt(transcript.Receipt.from_bytes(answer["receipt"]), before, self.key())
        self.assertEqual(after.numbers["mode"], 1)
        again = self.mode(event, "attestable")
        self.ok(self.alice, commands.PublishMode, conversation_id=self.group_id, event=again.to_bytes())
        listed = self.ok(self.bob_watch, commands.GetModes, conversation_id=self.group_id)
        self.assertEqual(listed, {"events": [event.to_bytes(), again.to_bytes()], "has_more": False})
        self.assertEqual(self.ok(self.bob_watch, commands.GetModes, conversation_id=self.group_id, after_number=1)["events"], [again.to_bytes()])

    def test_a_mode_event_is_pushed_to_the_other_members_devices(self):
        """ModeChanged: clients keep the chain between messages and fetch it before they seal again."""
        phone = self.connect("bob", self.bob_phone)
        alice_again = self.connect("alice", self.alice_laptop)
        conns = (phone, alice_again, self.alice, self.bob_watch)
        self.settle(*conns)
        before = {conn: len(self.pushed(conn, "ModeChanged")) for conn in conns}
        self.ok(self.alice, commands.PublishMode, conversation_id=self.group_id, event=self.mode(None, "deniable").to_bytes())
        self.settle(*conns)
        told = {conn: self.pushed(conn, "ModeChanged")[before[conn]:] for conn in conns}
        self.assertEqual(told[phone], [{"conversation_id": self.group_id}])
        self.assertEqual(told[alice_again], [{"conversation_id": self.group_id}])  # the actor's other session too
        self.assertEqual(told[self.alice], [])  # (the session that published it has its receipt)
        self.assertEqual(told[self.bob_watch], [])  # a version 1 session keeps no chain

    def test_mode_events_bad_input(self):
        event = self.mode(None, "deniable")
        publish = dict(conversation_id=self.group_id, event=event.to_bytes())
        self.refused(self.alice, InvalidArgument, commands.PublishMode, conversation_id=self.group_id, event=b"junk")
        self.refused(self.bob_watch, NotAllowed, commands.PublishMode, **publish)  # not the actor's session
        phone = self.connect("bob", self.bob_phone)
        self.refused(phone, NotAllowed, commands.PublishMode, **publish)
        forged = self.mode(None, "deniable", device=self.alice_laptop)
        forged = membership.ModeEvent(**{**forged.__dict__, "signature": bytes(64)})
        self.refused(self.alice, BadSignature, commands.PublishMode, conversation_id=self.group_id, event=forged.to_bytes())
        skipped = self.mode(event, "attestable")  # event 2 before event 1: not next
        self.refused(self.alice, NotAllowed, commands.PublishMode, conversation_id=self.group_id, event=skipped.to_bytes())
        self.ok(self.alice, commands.PublishMode, **publish)
        self.refused(self.alice, NotAllowed, commands.PublishMode, **publish)  # the same event again: not next
        other = self.group(self.alice, self.alice_laptop, ["bob"], "other")
        self.refused(self.alice, InvalidArgument, commands.PublishMode, conversation_id=other, event=event.to_bytes())

    # -- transcript heads ----------------------------------------------------------------------

    def head(self, device, position, members=None, time=None):
        return transcript.sign_transcript_head(
            device, self.group_id, position.n, position.e, members or self.latest[self.group_id].hash(),
            time or round(self.clock.seconds() * 1000),
        )

    def test_a_signed_transcript_head_goes_to_the_other_members_and_is_kept(self):
        self.sent(self.alice, self.group_id, self.seal(self.alice_laptop, self.group_id, self.everyone))
        phone = self.connect("bob", self.bob_phone)
        carol = self.connect("carol", self.carol_laptop)
        position, _ = self.verified(self.group_id)
        head = self.head(self.bob_phone, position)
        self.ok(phone, commands.SignTranscript, conversation_id=self.group_id, head=head.to_bytes())
        self.settle(phone, carol, self.alice)
        for conn in (carol, self.alice):
            self.assertEqual(
                self.pushed(conn, "TranscriptSigned"),
                [{"conversation_id": self.group_id, "username": "bob", "head": head.to_bytes()}],
            )
        self.assertEqual(self.pushed(phone, "TranscriptSigned"), [])  # the signer has it
        self.assertEqual(self.pushed(self.bob_watch, "TranscriptSigned"), [])  # a version 1 session gets no v2 push
        laptop = self.connect("bob", self.bob_laptop)
        again = self.head(self.bob_phone, position, time=round(self.clock.seconds() * 1000) + 1)
        self.ok(phone, commands.SignTranscript, conversation_id=self.group_id, head=again.to_bytes())
        self.settle(phone, laptop)
        self.assertEqual([p["head"] for p in self.pushed(laptop, "TranscriptSigned")], [again.to_bytes()])  # bob's others
        older = self.head(self.bob_phone, transcript.Position(self.group_id))
        self.ok(phone, commands.SignTranscript, conversation_id=self.group_id, head=older.to_bytes())
        kept = self.ok(carol, commands.GetTranscriptHeads, conversation_id=self.group_id)
        self.assertEqual(kept, {"heads": [again.to_bytes()]})  # an older head does not replace a newer one

    def test_transcript_heads_bad_input(self):
        phone = self.connect("bob", self.bob_phone)
        position, _ = self.verified(self.group_id)
        theirs = self.head(self.carol_laptop, position)
        sign = commands.SignTranscript
        self.refused(phone, InvalidArgument, sign, conversation_id=self.group_id, head=b"not a head")
        self.refused(phone, NotAllowed, sign, conversation_id=self.group_id, head=theirs.to_bytes())
        mine = self.head(self.bob_phone, position)
        forged = transcript.TranscriptHead(**{**mine.__dict__, "signature": bytes(64)})
        self.refused(phone, BadSignature, sign, conversation_id=self.group_id, head=forged.to_bytes())
        self.refused(self.bob_watch, NotAllowed, sign, conversation_id=self.group_id, head=mine.to_bytes())
        other = self.group(self.alice, self.alice_laptop, ["bob"], "other")
        self.refused(phone, InvalidArgument, sign, conversation_id=other, head=mine.to_bytes())


class HeadSignerTests(unittest.TestCase):
    """Before a store batch commits, one signature covers every link it appended; each receipt is its own head and link."""

    def signed_batch(self, conversations, links_each):
        """Append `links_each` message links to each of `conversations` in one store call (one batch): (the
        ChainLinks, how many signatures were made, the store)."""
        store = make_store(self)
        signer = HeadSigner(store, SERVER_KEY)
        batches = []
        store.sign_heads = lambda heads: batches.append(heads) or signer.sign(heads)

        def append(txn):
            txn.executemany(
                "INSERT INTO conversations (id, kind, created_at) VALUES (?, 'group', 0)", [(c,) for c in conversations]
            )
            return [
                next_link(txn, c, "message", number, bytes(32), 1000.0 + number)
                for number in range(1, links_each + 1)
                for c in conversations
            ]

        links = self.successResultOf(store._write("test", append))
        return links, len(batches), store

    def check(self, link, before):
        """The link's receipt checks against the server key after `before` (a Position): the Position at link.n."""
        receipt = transcript.Receipt.from_bytes(link.receipt)
        self.assertEqual([l.to_bytes() for l in receipt.links], [link.data])
        return transcript.check_receipt(receipt, before, SERVER_KEY.public_key().public_bytes_raw())[-1]

    def test_every_link_of_a_batch_is_a_head_and_its_receipt_is_that_head_and_link(self):
        links, signatures, store = self.signed_batch([9], 20)
        self.assertEqual(signatures, 1)
        position = transcript.Position(9)
        for link in links:
            position = self.check(link, position)
        stored = self.successResultOf(store._read("test", lambda txn: txn.execute("SELECT n FROM heads").fetchall()))
        self.assertEqual(stored, [(20,)])  # the newest per conversation, in the same transaction

    def test_one_signature_covers_every_conversation_of_a_batch(self):
        links, signatures, store = self.signed_batch(list(range(1, 6)), 2)
        self.assertEqual(signatures, 1)
        heads = [transcript.Receipt.from_bytes(link.receipt).head for link in links]
        self.assertEqual({(head.size, head.signature) for head in heads}, {(10, heads[0].signature)})
        positions = {}
        for link in links:
            positions[link.conversation_id] = self.check(link, positions.get(link.conversation_id, transcript.Position(link.conversation_id)))
        stored = self.successResultOf(store._read("test", lambda txn: txn.execute("SELECT conversation_id, n FROM heads").fetchall()))
        self.assertEqual(sorted(stored), [(c, 2) for c in range(1, 6)])

    def test_a_batch_whose_heads_cannot_be_signed_stores_no_link(self):
        links, _, store = self.signed_batch([9], 1)
        store.sign_heads = lambda heads: 1 / 0

        def append(txn):
            return next_link(txn, 9, "message", 2, bytes(32), 1000.0)

        failure = self.failureResultOf(store._write("test", append), StoreError)
        self.assertIn("signing chain heads: ZeroDivisionError", str(failure.value))
        stored = self.successResultOf(store._read("test", lambda txn: txn.execute("SELECT n FROM links").fetchall()))
        self.assertEqual(stored, [(1,)])

    def test_a_batch_that_fails_keeps_no_head(self):
        store = make_store(self)
        HeadSigner(store, SERVER_KEY)

        def append_then_fail(txn):
            txn.execute("INSERT INTO conversations (id, kind, created_at) VALUES (9, 'group', 0)")
            next_link(txn, 9, "message", 1, bytes(32), 1000.0)
            txn.execute("INSERT INTO nowhere VALUES (1)")

        self.failureResultOf(store._write("test", append_then_fail), StoreError)
        count = self.successResultOf(store._read("test", lambda txn: txn.execute("SELECT COUNT(*) FROM heads").fetchall()))
        self.assertEqual(count, [(0,)])


class ServerKeyFileTests(unittest.TestCase):
    def test_made_private_at_first_start_and_kept(self):
        path = os.path.join(self.mktemp(), "signing.key")
        os.makedirs(os.path.dirname(path))
        first = load_server_key(path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        again = load_server_key(path)
        self.assertEqual(first.public_key().public_bytes_raw(), again.public_key().public_bytes_raw())
