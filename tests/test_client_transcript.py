"""The client's following of conversation chains (client/transcripts.py), on its own: no server, no network.

The chains are tests/test_transcript.py's History (the golden conversation
7 of docs/E2EE.md): what a client takes of the links and heads a server
gives, what it refuses, and the verdict on each message.
"""

import os
from dataclasses import replace

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet.defer import inlineCallbacks, succeed
from twisted.trial import unittest

from securechatd import commands, verify
from securechatd.client.crypto import Alarm
from securechatd.client.device_file import ACTIVE, LABEL_V1, DeviceFile
from securechatd.client.library import ChatClient, Conversation, Message
from securechatd.client.transcripts import TranscriptSigned

from securechatd.client import transcripts
from securechatd.client.transcripts import (
    BROKEN,
    UNCHECKED,
    VERIFIED,
    ConversationChain,
    check_message,
    find_equivocation,
)
from securechatd.e2ee import membership, transcript
from securechatd.e2ee.encoding import dec, enc
from securechatd.e2ee.keys import Device
from securechatd.e2ee.envelope import Header
from securechatd.e2ee.transcript import next_hash, sign_head
from tests.test_e2ee_membership import BOB, PHONE
from tests import test_tui
from tests.test_client_device_log import VERSION_2
from tests.test_client_e2ee import E2EETestCase
from tests.test_ui import NOW, FakeClient, message, render
from tests.test_transcript import CONVERSATION, SERVER, SERVER_KEY, History


def kinds(problems):
    return [problem.kind for problem in problems]


class AbsorbTests(unittest.TestCase):
    """What a client takes of the links and heads it is given."""

    def setUp(self):
        self.history = History()

    def test_links_covered_by_signed_heads_are_taken(self):
        chain = ConversationChain(CONVERSATION)
        absorbed = chain.absorb(self.history.links, self.history.heads, SERVER_KEY)
        self.assertEqual((absorbed.problems, absorbed.missing_after, absorbed.unsigned), ([], None, 0))
        self.assertEqual(len(absorbed.accepted), 7)
        self.assertEqual((chain.position.n, chain.position.e), (7, self.history.position.e))
        self.assertEqual(chain.epochs, {1: 1, 2: 5})
        self.assertEqual(chain.mode_links, {1: 2, 2: 6})
        for n in range(8):
            self.assertEqual(chain.e_at(n), self.history.positions[n].e)
        self.assertEqual([chain.seq_at(n) for n in range(8)], [0, 0, 0, 1, 2, 2, 2, 3])
        self.assertEqual(chain.epoch_at(4), 1)
        self.assertEqual(chain.epoch_at(5), 2)

    def test_a_batch_in_two_receipts(self):
        chain = ConversationChain(CONVERSATION)
        first = chain.absorb(self.history.links[:4], self.history.heads[:1], SERVER_KEY)
        self.assertEqual((len(first.accepted), first.problems), (4, []))
        second = self.history.receipt(5, self.history.heads[1])
        absorbed = chain.absorb(second.links, [second.head], SERVER_KEY)
        self.assertEqual((len(absorbed.accepted), absorbed.problems, chain.position.n), (3, [], 7))

    def test_links_no_signed_head_covers_wait(self):
        chain = ConversationChain(CONVERSATION)
        absorbed = chain.absorb(self.history.links, self.history.heads[:1], SERVER_KEY)
        self.assertEqual((len(absorbed.accepted), absorbed.unsigned, chain.position.n), (4, 3, 4))
        absorbed = chain.absorb(self.history.links[4:], [], SERVER_KEY)
        self.assertEqual((absorbed.accepted, absorbed.unsigned, chain.position.n), ([], 3, 4))

    def test_a_gap_is_named_and_nothing_after_it_is_taken(self):
        chain = ConversationChain(CONVERSATION)
        absorbed = chain.absorb(self.history.links[2:4], self.history.heads[:1], SERVER_KEY)
        self.assertEqual((absorbed.accepted, absorbed.missing_after, chain.position.n), ([], 0, 0))

    def test_a_head_another_key_signed_covers_nothing(self):
        chain = ConversationChain(CONVERSATION)
        other = sign_head(PHONE.sig_private, CONVERSATION, 4, self.history.positions[4].e)
        absorbed = chain.absorb(self.history.links[:4], [other], SERVER_KEY)
        self.assertEqual(kinds(absorbed.problems), [transcripts.BAD_HEAD_SIGNATURE])
        self.assertEqual((absorbed.accepted, chain.position.n), ([], 0))

    def test_a_rewritten_link_does_not_match_the_signed_head(self):
        chain = ConversationChain(CONVERSATION)
        links = list(self.history.links[:4])
        links[2] = replace(links[2], server_time=links[2].server_time + 1)
        absorbed = chain.absorb(links, self.history.heads[:1], SERVER_KEY)
        self.assertEqual(kinds(absorbed.problems), [transcripts.HEAD_MISMATCH])
        self.assertEqual(chain.position.n, 0)

    def test_two_signed_heads_for_one_n_are_kept_as_proof(self):
        chain = ConversationChain(CONVERSATION)
        chain.absorb(self.history.links[:4], self.history.heads[:1], SERVER_KEY)
        forked = replace(self.history.links[3], item=bytes(32))
        lie = sign_head(SERVER, CONVERSATION, 4, next_hash(self.history.positions[3].e, forked))
        absorbed = chain.absorb([forked], [lie], SERVER_KEY)
        self.assertEqual(
            sorted(kinds(absorbed.problems)),
            sorted([transcripts.CHAIN_FORK, transcripts.EQUIVOCATION, transcripts.HEAD_MISMATCH]),
        )
        [proof] = chain.proofs
        self.assertTrue(transcript.Equivocation.from_bytes(proof).proves(SERVER_KEY))
        self.assertEqual(chain.position.n, 4)
        self.assertEqual(chain.e_at(4), self.history.positions[4].e)  # what was verified stays

    def test_an_equivocation_across_n_is_found_from_the_whole_other_chain(self):
        chain = ConversationChain(CONVERSATION)
        chain.absorb(self.history.links, self.history.heads, SERVER_KEY)
        other_links = list(self.history.links[:3]) + [replace(self.history.links[3], server_time=1)]
        e = self.history.positions[3].e
        for link in other_links[3:] + list(self.history.links[4:]):
            e = next_hash(e, link)
        other = other_links + list(self.history.links[4:])  # another link 4, so another e from 4 on
        head = sign_head(SERVER, CONVERSATION, 7, e)
        proof = find_equivocation(chain, other, [head], SERVER_KEY)
        self.assertIsNotNone(proof)
        self.assertTrue(proof.proves(SERVER_KEY))
        self.assertIsNone(find_equivocation(chain, self.history.links, self.history.heads, SERVER_KEY))

    def test_the_window_keeps_the_newest(self):
        self.patch(transcripts, "E_KEPT", 3)
        chain = ConversationChain(CONVERSATION)
        chain.absorb(self.history.links, self.history.heads, SERVER_KEY)
        self.assertEqual(sorted(chain.window), [5, 6, 7])
        self.assertIsNone(chain.e_at(4))
        self.assertEqual(chain.e_at(0), transcript.genesis(CONVERSATION))

    def test_the_round_trip(self):
        chain = ConversationChain(CONVERSATION)
        chain.absorb(self.history.links, self.history.heads, SERVER_KEY)
        chain.modes = [event.to_bytes() for event in self.history.modes]
        chain.counters[("alice", PHONE.id)] = (3, 1)
        chain.proofs = [b"a proof"]
        chain.signed = 4
        again = ConversationChain.from_bytes(chain.to_bytes())
        self.assertEqual(again.to_bytes(), chain.to_bytes())
        self.assertEqual((again.position.n, again.position.e, dict(again.position.numbers)),
                         (7, chain.position.e, {"message": 3, "membership": 2, "mode": 2}))
        self.assertEqual((again.window, again.epochs, again.mode_links), (chain.window, chain.epochs, chain.mode_links))
        self.assertEqual((again.counters, again.proofs, again.signed, again.mode), (chain.counters, [b"a proof"], 4,
                                                                                    "deniable"))
        self.assertEqual(sorted(again.heads), [4, 7])
        self.assertEqual(ConversationChain.from_bytes(ConversationChain(3).to_bytes()).position.n, 0)


class MessageTests(unittest.TestCase):
    """The verdict on each message of the golden history."""

    def setUp(self):
        self.history = History()
        self.chain = ConversationChain(CONVERSATION)
        self.chain.absorb(self.history.links, self.history.heads, SERVER_KEY)
        self.chain.modes = [event.to_bytes() for event in self.history.modes]
        self.states = {state.hash(): epoch for epoch, state in enumerate(self.history.states, 1)}

    def state_of_epoch(self, epoch):
        return self.history.states[epoch - 1] if 1 <= epoch <= len(self.history.states) else None

    def check(self, seq, header=None, body=None, signature=None, link=None, keys=None, chain=None):
        _, raw, raw_body, raw_signature = self.history.envelopes[seq - 1]
        device = {1: PHONE, 2: BOB, 3: BOB}[seq]
        link = link or self.history.links[{1: 2, 2: 3, 3: 6}[seq]]
        return check_message(
            chain or self.chain,
            header or Header.from_bytes(raw),
            raw_body if body is None else body,
            raw_signature if signature is None else signature,
            link,
            seq,
            keys or device.keys,
            self.state_of_epoch,
            self.states.get,
        )

    def test_the_golden_messages_verify(self):
        verdicts = [self.check(seq) for seq in (1, 2, 3)]
        self.assertEqual(
            [(v.n, v.mode, v.state, v.problems) for v in verdicts],
            [(3, "attestable", VERIFIED, ()), (4, "attestable", VERIFIED, ()), (7, "deniable", VERIFIED, ())],
        )
        self.assertEqual(self.chain.counters, {("alice", PHONE.id): (3, 1), ("bob", BOB.id): (7, 2)})

    def test_a_message_sent_across_a_fork(self):
        forked = History(forked=True)
        _, header, body, signature = forked.envelopes[1]
        link = forked.links[3]
        self.chain = ConversationChain(CONVERSATION)
        self.chain.absorb(forked.links, forked.heads, SERVER_KEY)
        verdict = self.check(2, Header.from_bytes(header), body, signature, link)
        self.assertEqual((verdict.state, kinds(verdict.problems)), (BROKEN, [transcripts.CHAIN_FORK]))

    def test_another_envelope_than_the_link_holds(self):
        verdict = self.check(2, link=self.history.links[2])  # seq 1's link for seq 2
        self.assertEqual(kinds(verdict.problems), [transcripts.LINK_MISMATCH, transcripts.LINK_MISMATCH,
                                                   transcripts.CHAIN_FORK])

    def test_signatures(self):
        self.assertEqual(kinds(self.check(1, signature=b"").problems), [transcripts.LINK_MISMATCH,
                                                                        transcripts.UNSIGNED])
        _, header, body, signature = self.history.envelopes[0]
        item = transcript.message_item(header, body, bytes(64))
        link = replace(self.history.links[2], item=item)
        chain = ConversationChain(CONVERSATION)  # a chain whose link 3 holds the badly signed envelope
        chain.absorb(self.history.links[:2] + [link], [sign_head(SERVER, CONVERSATION, 3, next_hash(
            self.history.positions[2].e, link))], SERVER_KEY)
        verdict = self.check(1, signature=bytes(64), link=link, chain=chain)
        self.assertEqual((verdict.state, kinds(verdict.problems)), (BROKEN, [transcripts.BAD_SIGNATURE]))
        verdict = self.check(1, keys=BOB.keys)
        self.assertEqual(kinds(verdict.problems), [transcripts.BAD_SIGNATURE])

    def test_a_counter_not_above_the_last_in_chain_order(self):
        self.check(2)
        _, raw, _, _ = self.history.envelopes[2]
        header = replace(Header.from_bytes(raw), counter=1)
        verdict = self.check(3, header=header)
        self.assertIn(transcripts.REORDERED, kinds(verdict.problems))

    def test_a_mode_that_is_not_the_one_at_the_senders_view(self):
        _, raw, _, _ = self.history.envelopes[2]
        header = replace(Header.from_bytes(raw), mode="attestable")
        self.assertIn(transcripts.MODE_MISMATCH, kinds(self.check(3, header=header).problems))

    def test_a_sender_not_a_member_where_the_chain_placed_it(self):
        _, raw, _, _ = self.history.envelopes[0]
        header = replace(Header.from_bytes(raw), sender="carol")
        verdict = self.check(1, header=header, keys=PHONE.keys)
        self.assertIn(transcripts.SENDER_NOT_MEMBER, kinds(verdict.problems))

    def test_a_far_clock_is_a_warning(self):
        link = self.history.links[2]
        moved = replace(link, server_time=link.server_time + transcripts.CLOCK_SKEW_MS + 1000)
        verdict = check_message(
            self.chain, Header.from_bytes(self.history.envelopes[0][1]), self.history.envelopes[0][2],
            self.history.envelopes[0][3], moved, 1, PHONE.keys, self.state_of_epoch, self.states.get,
        )
        self.assertIn(transcripts.CLOCK_SKEW, kinds(verdict.problems))
        self.assertIn(transcripts.CHAIN_FORK, kinds(verdict.problems))  # (a link other than the one verified)
        self.assertIn("s behind the server's", verdict.problems[-1].detail)

    def test_no_link_or_a_view_too_old_is_unchecked(self):
        verdict = check_message(self.chain, Header.from_bytes(self.history.envelopes[0][1]),
                                self.history.envelopes[0][2], self.history.envelopes[0][3], None, 1, PHONE.keys,
                                self.state_of_epoch, self.states.get)
        self.assertEqual((verdict.state, kinds(verdict.problems)), (UNCHECKED, [transcripts.UNCHAINED]))
        self.patch(transcripts, "E_KEPT", 1)
        chain = ConversationChain(CONVERSATION)
        chain.absorb(self.history.links, self.history.heads, SERVER_KEY)
        chain.modes = [event.to_bytes() for event in self.history.modes]
        self.assertEqual(self.check(1, chain=chain).state, UNCHECKED)


class DeviceFileTests(unittest.TestCase):
    """The device file keeps the pinned server key and the conversation chains; a version 1 file still reads."""

    def test_the_round_trip_and_version_1_read(self):
        path = os.path.join(os.path.abspath(self.mktemp()), "alice.device")
        state = DeviceFile(path, Device.generate("alice"), ACTIVE)
        chain = ConversationChain(CONVERSATION)
        chain.absorb(History().links, History().heads, SERVER_KEY)
        state.server_key, state.transcripts = SERVER_KEY, {CONVERSATION: chain.to_bytes()}
        state.save()
        again = DeviceFile.load(path)
        self.assertEqual((again.server_key, again.transcripts), (SERVER_KEY, state.transcripts))
        self.assertEqual(ConversationChain.from_bytes(again.transcripts[CONVERSATION]).position.n, 7)
        version_2 = open(VERSION_2, "rb").read()  # written by the client before the device log
        old = enc([LABEL_V1] + dec(version_2)[1:15])  # and what a version 1 client wrote
        read = DeviceFile.from_bytes(path, old)
        self.assertEqual((read.server_key, read.transcripts, read.device.user), (b"", {}, "alice"))
        self.assertEqual(dec(read.to_bytes())[0], b"securechatd/device-file/v3")


# -- against the real daemon -----------------------------------------------------------------------


def chain_inbox(client, inbox):
    """`inbox` (an E2EEInbox) also collects the transcript heads and mode changes `client` reports."""
    inbox.items.update(signed=[], mode=[])
    client.on_transcript_signed = lambda signed: inbox._add("signed", signed)
    client.on_mode = lambda conversation, mode, actor: inbox._add("mode", (conversation, mode, actor))
    return client, inbox


class ChainTestCase(E2EETestCase):
    """Real ChatClients against the real daemon over TLS (tests/test_client_e2ee.py's E2EETestCase)."""

    @inlineCallbacks
    def device(self, username, install="phone", **kw):
        return chain_inbox(*(yield super().device(username, install, **kw)))

    @inlineCallbacks
    def three(self, title="plans"):
        """alice, bob and carol in a group alice made, each having read alice's "hello": [(client, inbox)], id."""
        people = []
        for name in ("alice", "bob", "carol"):
            people.append((yield self.device(name, install=name + "s")))
        (alice, _), (bob, bob_inbox), (carol, carol_inbox) = people
        group, _ = yield alice.create_conversation(["bob", "carol"], title=title)
        yield alice.send_message(group, "hello")
        yield bob_inbox.wait("deliver", 1)
        yield carol_inbox.wait("deliver", 1)
        return people, group

    def kinds(self, inbox):
        return [kind for kind, _, _ in inbox.alarms()]


class HonestServerTests(ChainTestCase):
    @inlineCallbacks
    def test_messages_are_verified_against_the_signed_chain(self):
        [(alice, alice_inbox), (bob, bob_inbox), (carol, carol_inbox)], group = yield self.three()
        key = self.hub.chain.heads.public
        for client in (alice, bob, carol):
            self.assertEqual(client.e2ee.state.server_key, key)  # pinned at the first login
        [hello] = bob_inbox.items["deliver"]
        self.assertEqual((hello.mode, hello.n, hello.chain, hello.chain_problems), ("attestable", 2, "verified", ()))
        sent = yield bob.send_message(group, "hi all")
        self.assertEqual((sent.mode, sent.n, sent.chain), ("attestable", 3, "verified"))
        [_, hi] = yield carol_inbox.wait("deliver", 2)
        self.assertEqual((hi.body, hi.n, hi.chain), ("hi all", 3, "verified"))
        # carol adds dave: a membership link none of them is pushed; the next message's link jumps over it
        dave, _ = yield self.device("dave", install="daves")
        yield carol.add_members(group, ["dave"])
        yield alice.send_message(group, "welcome dave")
        [*_, welcome] = yield bob_inbox.wait("deliver", 2)
        self.assertEqual((welcome.n, welcome.chain), (5, "verified"))
        chain = bob.e2ee.transcripts.chain(group)
        self.assertEqual((chain.position.n, chain.epochs), (5, {1: 1, 2: 4}))
        # the sender's view: each header names the head its sender had verified
        header = Header.from_bytes(self.proxy_free_header(alice, group))
        self.assertIn(header.prev_n, (3, 4))  # (4 once the server signed a head over carol's add)
        self.assertEqual(header.prev_e, chain.e_at(header.prev_n))
        for inbox in (alice_inbox, bob_inbox, carol_inbox):
            self.assertEqual(inbox.alarms(), [])

    def proxy_free_header(self, client, conversation):
        """The header of `client`'s last message in `conversation`, from its history as the daemon keeps it."""
        return self._headers[(client.username, conversation)]

    @inlineCallbacks
    def setUp(self):
        yield super().setUp()
        self._headers = {}
        original = ChatClient._send_sealed

        async def keeping(client, protocol, client_msg_id, outgoing):
            self._headers[(client.username, outgoing.conversation_id)] = outgoing.sealed.header
            return await original(client, protocol, client_msg_id, outgoing)

        self.patch(ChatClient, "_send_sealed", keeping)

    @inlineCallbacks
    def test_read_receipts_are_signed_transcript_heads(self):
        [(alice, alice_inbox), (bob, _), (carol, carol_inbox)], group = yield self.three()
        asked, chain = [], self.hub.keys.chain
        self.patch(self.hub.keys, "chain", lambda session, user, after: (asked.append(session.username), chain(session, user, after))[1])
        yield bob.mark_read(group, 1)
        [signed] = yield alice_inbox.wait("signed", 1)
        self.assertEqual(
            (signed.conversation_id, signed.username, signed.device_id, signed.n, signed.seq, signed.verified),
            (group, "bob", bob.device_id, 2, 1, True),
        )
        self.assertNotIn("alice", asked)  # checked with bob's chain as kept: a read receipt costs no fetch
        yield bob.mark_read(group, 1)  # the same link again: nothing new to sign
        mine = yield carol.sign_transcript(group)  # /sign: a head over all carol verified
        self.assertEqual((mine.n, mine.seq), (2, 1))
        yield alice_inbox.wait("signed", 2)
        self.assertEqual([s.username for s in alice_inbox.items["signed"]], ["bob", "carol"])
        self.assertEqual(alice_inbox.alarms(), [])
        yield alice.send_message(group, "bye carol")
        yield carol_inbox.wait("deliver", 2)
        yield carol.leave_conversation(group)  # leaving signs the whole transcript first
        [*_, last] = yield alice_inbox.wait("signed", 3)
        self.assertEqual((last.username, last.n, last.verified), ("carol", 3, True))

    @inlineCallbacks
    def test_the_mode_is_a_signed_event_every_member_sees(self):
        [(alice, alice_inbox), (bob, bob_inbox), (carol, carol_inbox)], group = yield self.three()
        mode = yield bob.mode(group)
        self.assertEqual(mode, "attestable")  # the default
        self.assertEqual((yield alice.set_mode(group, "deniable")), "deniable")
        with self.assertRaises(membership.ModeUnchanged):
            yield alice.set_mode(group, "deniable")
        yield bob.send_message(group, "off the record")  # bob's client fetches the chain before sealing
        [_, off] = yield carol_inbox.wait("deliver", 2)
        self.assertEqual((off.mode, off.chain), ("deniable", "verified"))
        self.assertEqual(bob_inbox.items["mode"], [(group, "deniable", "alice")])
        [(_, signature)] = yield self.query("SELECT id, signature FROM messages WHERE seq = 2")
        self.assertIn(signature, (None, b""))  # deniable: nothing signed
        self.assertIsNone((yield carol.sign_transcript(group)))  # no transcript heads in deniable mode
        self.assertEqual(bob.known_mode(group), "deniable")
        yield bob.set_mode(group, "attestable")
        sent = yield alice.send_message(group, "on the record again")
        self.assertEqual(sent.mode, "attestable")
        for inbox in (alice_inbox, bob_inbox, carol_inbox):
            self.assertEqual(inbox.alarms(), [])

    @inlineCallbacks
    def test_the_chain_survives_a_restart(self):
        [(alice, _), (bob, bob_inbox), _], group = yield self.three()
        before = bob.e2ee.transcripts.chain(group).to_bytes()
        yield bob.close()
        bob, bob_inbox = yield self.device("bob", install="bobs")
        self.assertEqual(bob.e2ee.transcripts.chain(group).to_bytes(), before)
        yield alice.send_message(group, "after the restart")
        [message] = yield bob_inbox.wait("deliver", 1)
        self.assertEqual((message.body, message.chain), ("after the restart", "verified"))

    @inlineCallbacks
    def test_a_changed_server_key_is_a_loud_alarm(self):
        [(alice, alice_inbox), _, _], group = yield self.three()
        yield alice.close()
        other = Ed25519PrivateKey.generate()  # the operator swaps the key
        self.hub.chain.heads.key, old = other, self.hub.chain.heads.public
        self.hub.chain.heads.public = other.public_key().public_bytes_raw()
        self.hub.chain.heads.key_id = transcript.server_key_id(self.hub.chain.heads.public)
        alice, alice_inbox = yield self.device("alice", install="alices")
        [(kind, user, detail)] = alice_inbox.alarms()
        self.assertEqual((kind, user), (Alarm.SERVER_KEY_CHANGED, None))
        self.assertEqual(alice.e2ee.state.server_key, old)  # the pinned key stays
        pinned, now = alice.server_key_ids()
        self.assertIn(pinned, detail)
        self.assertIn(now, detail)
        self.assertTrue(alice.accept_server_key())
        self.assertEqual(alice.e2ee.state.server_key, self.hub.chain.heads.public)


class ExportTests(ChainTestCase):
    @inlineCallbacks
    def conversation_with_history(self):
        """Three people, messages of each, a read receipt of each, an add and a switch to deniable and back."""
        [(alice, alice_inbox), (bob, bob_inbox), (carol, carol_inbox)], group = yield self.three()
        yield bob.send_message(group, "bob here")
        yield carol.send_message(group, "carol too: grüße ✓")
        for client, inbox in ((alice, alice_inbox), (bob, bob_inbox), (carol, carol_inbox)):
            yield inbox.wait("deliver", 2)
            yield client.mark_read(group, 3)
        yield alice.set_mode(group, "deniable")
        yield bob.send_message(group, "off the record")
        yield carol_inbox.wait("deliver", 3)
        yield alice_inbox.wait("signed", 2)
        return (alice, bob, carol), group

    def verify(self, data):
        return verify.verify(data)

    @inlineCallbacks
    def test_an_export_passes_the_offline_verifier_and_a_changed_byte_fails_it(self):
        (alice, bob, carol), group = yield self.conversation_with_history()
        exported = yield alice.export(group)
        self.assertEqual(exported.messages, 4)
        self.assertEqual(exported.disclosed, (1, 2, 3, 4))  # alice can read all four
        self.assertEqual(exported.left_out, ())
        checked = self.verify(exported.data)
        self.assertEqual([m["mode"] for m in checked.messages], ["attestable"] * 3 + ["deniable"])
        self.assertEqual([m["sender"] for m in checked.messages], ["alice", "bob", "carol", "bob"])
        self.assertEqual(checked.disclosed, {1: "hello", 2: "bob here", 3: "carol too: grüße ✓", 4: "off the record"})
        self.assertEqual(sorted(th["user"] for th in checked.ths), ["alice", "bob", "carol"])
        lines = "\n".join(verify.report(checked, None))
        self.assertIn("deniable", lines)
        for at in (0, len(exported.data) // 3, len(exported.data) // 2, len(exported.data) - 2):
            changed = bytearray(exported.data)
            changed[at] = changed[at] ^ 1 if changed[at] not in b'"' else ord("x")
            with self.assertRaises(verify.Broken):
                self.verify(bytes(changed))
        # bob discloses only his own messages
        mine = yield bob.export(group, disclose=[2, 4])
        self.assertEqual(self.verify(mine.data).disclosed, {2: "bob here", 4: "off the record"})

    @inlineCallbacks
    def test_the_transcript_head_of_a_member_who_left_is_exported(self):
        [(alice, alice_inbox), (bob, _), (carol, _)], group = yield self.three()
        yield carol.leave_conversation(group)  # (the server keeps the heads of members only: alice kept carol's)
        [signed] = yield alice_inbox.wait("signed", 1)
        self.assertEqual((signed.username, signed.verified), ("carol", True))
        heads = yield alice.call(commands.GetTranscriptHeads, conversation_id=group)
        self.assertEqual(heads["heads"], [])
        yield bob.send_message(group, "carol left")
        yield alice_inbox.wait("deliver", 1)
        exported = yield alice.export(group)
        checked = self.verify(exported.data)
        self.assertEqual([(th["user"], th["n"]) for th in checked.ths], [("carol", 2)])
        self.assertEqual([s["op"] for s in checked.states], ["create", "leave"])

    @inlineCallbacks
    def test_the_command_line_verifier_accepts_it_with_the_server_key(self):
        (alice, _, _), group = yield self.conversation_with_history()
        exported = yield alice.export(group)
        path = os.path.join(self.mktemp())
        with open(path, "wb") as out:
            out.write(exported.data)
        key_id = transcript.server_key_id(self.hub.chain.heads.public)
        output, errors = [], []
        status = verify.main([path, "--server-key", key_id], stdout=_Lines(output), stderr=_Lines(errors))
        self.assertEqual((status, errors), (0, []))
        self.assertIn("alice", "".join(output))
        wrong = transcript.server_key_id(Ed25519PrivateKey.generate().public_key().public_bytes_raw())
        self.assertEqual(verify.main([path, "--server-key", wrong], stdout=_Lines([]), stderr=_Lines([])), 1)

    @inlineCallbacks
    def test_a_deniable_conversation_exports_without_signatures(self):
        alice, _ = yield self.device("alice", install="alices")
        bob, bob_inbox = yield self.device("bob", install="bobs")
        direct, _ = yield alice.create_conversation(["bob"])
        yield alice.set_mode(direct, "deniable")  # "chosen at creation": mode event 1 right after epoch 1
        yield alice.send_message(direct, "between us")
        yield bob_inbox.wait("deliver", 1)
        yield bob.mark_read(direct, 1)  # deniable: a plain read receipt, no transcript head
        exported = yield bob.export(direct)
        checked = self.verify(exported.data)
        self.assertEqual([(m["mode"], m["sender"]) for m in checked.messages], [("deniable", "alice")])
        self.assertEqual((checked.ths, exported.transcript_heads), ([], 0))
        self.assertEqual(checked.disclosed, {1: "between us"})


class _Lines:
    """A file-like collecting what is written."""

    def __init__(self, lines):
        self.lines = lines

    def write(self, text):
        self.lines.append(text)

    def flush(self):
        pass


class RenderTests(unittest.TestCase):
    """What a person reads of the chain's answers and events (securechat; --batch gets the records as JSON)."""

    def render(self, record):
        return render(record)

    def test_messages_say_when_they_are_deniable_or_not_verified(self):
        self.assertEqual(self.render(message(mode="attestable", n=3, chain="verified", chain_problems=[])),
                         self.render(message()))
        self.assertEqual(self.render(message(mode="deniable", chain="verified")), ["07:00 [bob] <bob> hi  (deniable)"])
        self.assertEqual(
            self.render(message(mode="attestable", chain="broken", chain_problems=["chain_fork", "reordered"])),
            ["07:00 [bob] <bob> hi  !! not verified: chain_fork, reordered"],
        )

    def test_answers_and_events(self):
        where = dict(conversation_id=3, conversation="Team")
        self.assertEqual(
            self.render(dict(event="answer", command="mode", mode="deniable", changed=True, **where)),
            ["[Team] is now deniable: messages are not signed"],
        )
        self.assertEqual(
            self.render(dict(event="answer", command="mode", mode="attestable", changed=False, **where)),
            ["[Team] is attestable: every message is signed by its sender's device"],
        )
        self.assertEqual(
            self.render(dict(event="answer", command="sign", n=9, seq=4, **where)),
            ["[Team] you signed the transcript up to #9 (message no. 4)"],
        )
        self.assertEqual(
            self.render(dict(event="answer", command="export", file="/tmp/t.bundle", links=9, messages=4,
                             disclosed=[1, 2], transcript_heads=3, left_out=["carol has no device chain"], **where)),
            [
                "exported [Team] to /tmp/t.bundle: 9 chain links, 4 messages (2 with their text), 3 transcript heads",
                "  anyone with the file can check it: securechatd-verify /tmp/t.bundle (and read the texts in it)",
                "  left out: carol has no device chain",
            ],
        )
        self.assertEqual(
            self.render(dict(event="answer", command="serverkey", key_id="0e3f dbc7", other_key_id="9999 0000",
                             accepted=False)),
            ["the server's chain key: 0e3f dbc7",
             "!! the server now signs with another key: 9999 0000; /serverkey accept pins it once the operator"
             " confirmed it"],
        )
        signed = dict(event="transcript_signed", username="bob", device_id="ab", n=9, seq=4, verified=True,
                      problem=None, at=NOW, **where)
        self.assertEqual(
            self.render(signed), ["07:00 [Team] read by bob, transcript verified up to #9 (message no. 4)"]
        )
        self.assertEqual(
            self.render(dict(signed, verified=False, problem="transcript_fork")),
            ["07:00 [Team] !! read by bob: their transcript up to #9 (message no. 4) does NOT check (transcript_fork)"],
        )
        self.assertEqual(
            self.render(dict(event="mode", mode="deniable", by="alice", at=NOW, **where)),
            ["07:00 * [Team] alice made it deniable: messages are not signed"],
        )
        row = dict(conversation_id=3, conversation="Team", unread=0, current=False, encrypted=True, verified=False,
                   mode="deniable")
        self.assertEqual(self.render(dict(event="answer", command="convs", conversations=[row])),
                         ["  #3     Team                     encrypted, deniable"])
        self.assertEqual(self.render(dict(event="answer", command="open", unread=0, messages=[], mode="attestable",
                                          **where)), ["now in [Team] (attestable)"])


class _ModeClient(FakeClient):
    """test_ui's FakeClient, with the modes of its encrypted conversations."""

    modes = {3: "attestable", 4: "deniable"}

    def known_mode(self, conversation_id):
        return self.modes.get(conversation_id)

    def mode(self, conversation_id):
        return succeed(self.modes.get(conversation_id))


class FullScreenTests(test_tui.TuiTestCase):
    """The full-screen client shows the mode in its status line and the chain's events in their windows."""

    conversations = (
        Conversation(3, "direct", ("alice", "bob"), encrypted=True),
        Conversation(4, "group", ("alice", "bob", "carol"), "Team", encrypted=True),
    )

    def setUp(self):
        self.patch(test_tui, "FakeClient", _ModeClient)
        self.patch(_ModeClient, "modes", dict(_ModeClient.modes))
        super().setUp()

    def test_the_mode_and_the_chain_events(self):
        self.type("/open Team")
        self.assertIn("[deniable]", self.screen())
        self.client.on_mode(4, "attestable", "bob")
        self.client.modes[4] = "attestable"
        self.client.on_transcript_signed(TranscriptSigned(4, "carol", "ab" * 16, 7, 3, 0, True))
        self.client.on_deliver(Message(9, 4, "bob", "hm", NOW, 4, True, mode="attestable", n=8, chain="broken",
                                       chain_problems=("chain_fork",)))
        self.clock.advance(0)
        screen = self.screen()
        self.assertIn("bob made it attestable", screen)
        self.assertIn("read by carol, transcript verified up to #7 (message no. 3)", screen)
        self.assertIn("!! not verified: chain_fork", screen)
        self.assertIn("[attestable]", screen)
