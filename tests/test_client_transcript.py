"""The client's following of conversation chains (client/transcripts.py), on its own: no server, no network.

The chains are tests/test_transcript.py's History (the golden conversation
7 of docs/E2EE.md): what a client takes of the links and heads a server
gives, what it refuses, and the verdict on each message.
"""

from dataclasses import replace

from twisted.trial import unittest

from securechatd.client import transcripts
from securechatd.client.transcripts import (
    BROKEN,
    UNCHECKED,
    VERIFIED,
    ConversationChain,
    check_message,
    find_equivocation,
)
from securechatd.e2ee import transcript
from securechatd.e2ee.envelope import Header
from securechatd.e2ee.transcript import next_hash, sign_head
from tests.test_e2ee_membership import BOB, PHONE
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
        self.assertEqual([(v.n, v.mode, v.state, v.problems) for v in verdicts],
                         [(3, "attestable", VERIFIED, ()), (4, "attestable", VERIFIED, ()), (7, "deniable", VERIFIED, ())])
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

    def test_version_2_round_trip_and_version_1_read(self):
        import os

        from securechatd.client.device_file import ACTIVE, LABEL_V1, DeviceFile
        from securechatd.e2ee.encoding import dec, enc
        from securechatd.e2ee.keys import Device

        path = os.path.join(os.path.abspath(self.mktemp()), "alice.device")
        state = DeviceFile(path, Device.generate("alice"), ACTIVE)
        chain = ConversationChain(CONVERSATION)
        chain.absorb(History().links, History().heads, SERVER_KEY)
        state.server_key, state.transcripts = SERVER_KEY, {CONVERSATION: chain.to_bytes()}
        state.save()
        again = DeviceFile.load(path)
        self.assertEqual((again.server_key, again.transcripts), (SERVER_KEY, state.transcripts))
        self.assertEqual(ConversationChain.from_bytes(again.transcripts[CONVERSATION]).position.n, 7)
        old = enc([LABEL_V1] + dec(state.to_bytes())[1:15])  # what an earlier client wrote
        read = DeviceFile.from_bytes(path, old)
        self.assertEqual((read.server_key, read.transcripts, read.device.id), (b"", {}, state.device.id))
        self.assertEqual(dec(read.to_bytes())[0], b"securechatd/device-file/v2")
