"""Attacks of a malicious server on real ChatClients, played by a man in the middle in front of the real daemon.

Every client here connects to tests.malicious.MaliciousServer, which relays
to the daemon of tests.helpers.start_daemon over TLS and rewrites, drops,
holds, replays and injects AMP boxes as each test scripts it; some tests
also write into the daemon's database, as its operator could. Each attack
must raise its specific alarm in the client (crypto.Alarm, crypto.Problem),
the application must see no forged plaintext (on_deliver gets body None
with the problem, or nothing), and honest traffic must work afterwards.
Tests named test_not_caught_* pin down what the client does NOT catch
(docs/E2EE.md, "Attacks tested"): if one starts failing, the protection got
better; update the table.
"""

import os
from dataclasses import replace

from twisted.internet import reactor, task
from twisted.internet.defer import inlineCallbacks
from twisted.protocols import amp
from twisted.trial import unittest

from securechatd import commands
from securechatd.client import library
from securechatd.client.crypto import Alarm, EncryptionUnavailable, Problem
from securechatd.e2ee import chain, envelope, membership, transcript
from securechatd.e2ee.envelope import Header
from securechatd.e2ee.keys import Device
from securechatd.e2ee.session import Session
from tests.malicious import DROP, HOLD, ChainForger, MaliciousServer, command_box, parse_arguments
from tests.test_client import PASSWORD
from tests.test_client_e2ee import E2EETestCase
from tests.test_client_transcript import chain_inbox


def deliveries(client, conversation, seq=None):
    """A push rule's test: a DeliverEncrypted to `client` in `conversation` (with `seq`, if given)."""

    def matches(push):
        if push.command is not commands.DeliverEncrypted:
            return False
        if (push.tap.username, push.tap.device_id) != (client.username, client.device_id):
            return False
        arguments = push.arguments
        return arguments["conversation_id"] == conversation and (seq is None or arguments["seq"] == seq)

    return matches


@inlineCallbacks
def until(condition, timeout=10.0):
    """Wait (polling the real reactor) until `condition()` is true."""
    waited = 0.0
    while not condition():
        if waited > timeout:
            raise AssertionError("timed out waiting")
        yield task.deferLater(reactor, 0.01, lambda: None)
        waited += 0.01


def history_to(client, rewrite):
    """An answer rule for HistoryEncrypted: `rewrite(messages)` of the pages `client` is given."""

    def rule(tap, request, answer):
        if (tap.username, tap.device_id) != (client.username, client.device_id):
            return None
        return dict(answer, messages=rewrite(answer["messages"]))

    return rule


class MaliciousServerTestCase(E2EETestCase):
    @inlineCallbacks
    def device(self, username, install="phone", **kw):
        """E2EETestCase.device, the inbox also collecting transcript heads and mode changes."""
        return chain_inbox(*(yield super().device(username, install, **kw)))

    @inlineCallbacks
    def setUp(self):
        super().setUp()  # the daemon; self.port is its port
        self.proxy = MaliciousServer(reactor, self.port, self.ca)
        yield self.proxy.start()
        self.addCleanup(self.proxy.stop)
        self.port = self.proxy.port  # every client of self.device() connects through the double

    @inlineCallbacks
    def conversation(self, title=None):
        """alice and bob, a conversation of theirs (a group if `title`), and "hello" from alice that bob read."""
        alice, alice_inbox = yield self.device("alice")
        bob, bob_inbox = yield self.device("bob", install="bobs")
        conversation, _ = yield alice.create_conversation(["bob"], title=title)
        yield alice.send_message(conversation, "hello")
        [hello] = yield bob_inbox.wait("deliver", 1)
        self.assertEqual(hello.body, "hello")
        return alice, alice_inbox, bob, bob_inbox, conversation

    def wrapped_to(self, client):
        """The device ids the last SendEncrypted of `client` carried wraps for."""
        return sorted(wrap["device_id"] for wrap in self.proxy.sent(client)[-1]["wraps"])

    def bodies(self, inbox):
        return [(m.seq, m.body, m.problem) for m in inbox.items["deliver"]]

    def kinds(self, inbox):
        return [kind for kind, _, _ in inbox.alarms()]

    @inlineCallbacks
    def still_honest(self, sender, receiver, receiver_inbox, conversation, text):
        """With the double honest again: `sender`'s `text` reaches `receiver` whole."""
        self.proxy.honest()
        yield sender.send_message(conversation, text)
        yield until(lambda: any(m.body == text for m in receiver_inbox.items["deliver"]))


class TransparencyTests(MaliciousServerTestCase):
    @inlineCallbacks
    def test_the_plaintext_never_crosses_the_server(self):
        texts = ["hello", "the code is 4711-swordfish", "grüße, ✓ und 🔐 an carol"]
        alice, alice_inbox, bob, bob_inbox, direct = yield self.conversation()
        carol, carol_inbox = yield self.device("carol", install="carols")
        group, _ = yield bob.create_conversation(["alice", "carol"], title="three")
        yield bob.send_message(direct, texts[1])
        yield alice_inbox.wait("deliver", 1)
        yield alice.send_message(group, texts[2])
        for inbox in (bob_inbox, carol_inbox):
            yield inbox.wait("deliver", 2 if inbox is bob_inbox else 1)
        for client, conversation in ((alice, direct), (bob, direct), (bob, group), (carol, group)):
            page = yield client.history(conversation)
            self.assertTrue(all(m.problem is None for m in page.messages))
        self.assertEqual([m.body for m in carol_inbox.items["deliver"]], [texts[2]])
        seen = self.proxy.transcript()
        for name in (b"SendEncrypted", b"DeliverEncrypted", b"HistoryEncrypted", PASSWORD.encode()):
            self.assertIn(name, seen)  # what went through was read inside TLS (the password is the server's to see)
        for text in texts:
            self.assertNotIn(text.encode("utf-8"), seen)
        self.assertNotIn("swordfish".encode("utf-16-le"), seen)
        self.assertEqual(self.kinds(alice_inbox) + self.kinds(bob_inbox) + self.kinds(carol_inbox), [])


class InjectedDeviceTests(MaliciousServerTestCase):
    @inlineCallbacks
    def test_a_device_added_to_a_chain_answer_is_never_encrypted_to(self):
        alice, alice_inbox, bob, bob_inbox, conversation = yield self.conversation()
        seen = alice.e2ee.chains.get("bob")
        stranger = Device.generate("bob")  # the server's own keys, listed as bob's
        unsigned = chain.add(seen, stranger, stranger, "bob's new phone")  # signed by no device of bob
        # claims bob's device signed it; the signature is the stranger's
        forged = replace(chain.add(seen, stranger, stranger, "bob's new phone"), signer=bytes.fromhex(bob.device_id))

        def extra(link):
            def rule(tap, request, answer):
                if request["username"] == "bob" and tap.username == "alice":
                    return dict(answer, links=answer["links"] + [link.to_bytes()])
                return None

            return rule

        for link, reason in ((unsigned, "is not a device of 'bob'"), (forged, "signature")):
            self.proxy.honest()
            self.proxy.rewrite(commands.GetDeviceChain, extra(link))
            before = len(alice_inbox.alarms())
            alice.e2ee.chains.stale(["bob"])  # (fetched again: after a DevicesChanged, a reconnect, or an hour)
            yield alice.send_message(conversation, "to bob's real device only")
            self.assertEqual(self.wrapped_to(alice), [bob.device_id])
            [(kind, user, detail)] = alice_inbox.alarms()[before:]
            self.assertEqual((kind, user), (Alarm.BAD_CHAIN, "bob"))
            self.assertIn(reason, detail)
        self.assertEqual(alice_inbox.items["devices"], [])  # no device change was ever shown
        self.assertEqual(list(alice.e2ee.chains.get("bob").devices), [bytes.fromhex(bob.device_id)])
        # the injected device "writes": it is no sender alice knows
        sealed = envelope.seal(
            b"it's me, bob, on my new phone",
            conversation,
            alice.e2ee.membership(conversation).members_hash,
            "bob",
            stranger.id,
            1,
            0,
            [alice.e2ee.state.device.id],
            lambda device, key, context: bytes(89),
        )
        template = self.proxy.delivered(bob, conversation)[0].arguments
        yield self.proxy.deliver(
            alice,
            **dict(template, message_id=9000, seq=50, sender="bob", sender_device=stranger.id.hex(),
                   header=sealed.header, body=sealed.body, wrap=sealed.wraps[alice.e2ee.state.device.id]),
        )
        [forged_message] = alice_inbox.items["deliver"]
        self.assertEqual((forged_message.body, forged_message.problem), (None, Problem.UNKNOWN_DEVICE))
        self.assertEqual(self.kinds(alice_inbox)[-1], Problem.UNKNOWN_DEVICE)
        yield self.still_honest(bob, alice, alice_inbox, conversation, "bob, really")
        yield self.still_honest(alice, bob, bob_inbox, conversation, "alice, really")
        self.assertEqual(self.wrapped_to(alice), [bob.device_id])
        self.assertEqual(self.kinds(bob_inbox), [])

    @inlineCallbacks
    def test_a_device_the_operator_adds_is_never_encrypted_to(self):
        alice, alice_inbox, bob, bob_inbox, conversation = yield self.conversation()
        seen = alice.e2ee.chains.get("bob")
        stranger = Device.generate("bob")
        link = chain.add(seen, stranger, stranger, "ops")
        yield self.write(
            "INSERT INTO chain_links (user_id, seq, hash, link, published_at)"
            " SELECT id, 2, ?, ?, 0 FROM users WHERE username = 'bob'",
            link.hash(),
            link.to_bytes(),
        )
        yield self.write(
            "INSERT INTO devices (user_id, device_id, sig_pub, dh_pub, name, added_seq)"
            " SELECT id, ?, ?, ?, 'ops', 2 FROM users WHERE username = 'bob'",
            stranger.id.hex(),
            stranger.keys.sig_pub,
            stranger.keys.dh_pub,
        )
        sent = yield alice.send_message(conversation, "not for the operator")  # bob's chain as fetched before
        self.assertEqual(self.wrapped_to(alice), [bob.device_id])
        self.assertEqual((yield self.wrapped_for(sent.message_id)), [bob.device_id])
        self.assertEqual(alice_inbox.alarms(), [])
        sent = yield alice.send_message(conversation, "nor for it now")  # the answer named bob: fetched again
        self.assertEqual((yield self.wrapped_for(sent.message_id)), [bob.device_id])
        [(kind, user, _)] = alice_inbox.alarms()
        self.assertEqual((kind, user), (Alarm.BAD_CHAIN, "bob"))
        self.assertEqual(alice_inbox.items["devices"], [])


class InjectedMemberTests(MaliciousServerTestCase):
    @inlineCallbacks
    def test_a_member_the_server_lists_is_never_encrypted_to(self):
        alice, alice_inbox, bob, bob_inbox, group = yield self.conversation(title="two of us")
        mallory, mallory_inbox = yield self.device("mallory", install="mallorys")

        def listed(tap, request, answer):
            rows = [
                dict(row, members=sorted(row["members"] + ["mallory"])) if row["conversation_id"] == group else row
                for row in answer["conversations"]
            ]
            return dict(answer, conversations=rows)

        self.proxy.rewrite(commands.ListConversations, listed)
        yield alice.list_conversations()
        [(kind, _, detail)] = yield alice_inbox.wait("alarm", 1)
        self.assertEqual(kind, Alarm.INJECTED_MEMBER)
        self.assertIn("mallory", detail)
        yield alice.send_message(group, "not for mallory")
        self.assertNotIn(mallory.device_id, self.wrapped_to(alice))
        self.assertEqual((yield alice.members(group)), ("alice", "bob"))
        yield self.still_honest(alice, bob, bob_inbox, group, "still just us")
        yield mallory.ping()
        self.assertEqual(mallory_inbox.items["deliver"], [])

    @inlineCallbacks
    def test_a_member_the_operator_adds_reads_nothing(self):
        alice, alice_inbox, bob, bob_inbox, group = yield self.conversation(title="two of us")
        mallory, mallory_inbox = yield self.device("mallory", install="mallorys")
        yield self.operator_adds_member(group, "mallory")
        for inbox in (alice_inbox, bob_inbox):
            [(kind, _, detail)] = yield inbox.wait("alarm", 1)
            self.assertEqual(kind, Alarm.INJECTED_MEMBER)
        sent = yield alice.send_message(group, "not for mallory")
        self.assertEqual(self.wrapped_to(alice), [bob.device_id])
        self.assertEqual((yield self.wrapped_for(sent.message_id)), [bob.device_id])
        [_, delivered] = yield bob_inbox.wait("deliver", 2)
        self.assertEqual(delivered.body, "not for mallory")
        page = yield mallory.history(group)  # the server lets her read the conversation: all of it unreadable
        self.assertEqual([(m.body, m.problem) for m in page.messages], [(None, Problem.NO_KEY)] * 2)
        self.assertEqual(mallory_inbox.items["deliver"], [])
        self.assertNotIn(b"not for mallory", self.proxy.transcript())

    @inlineCallbacks
    def test_a_forged_membership_state_is_refused(self):
        alice, alice_inbox, bob, bob_inbox, group = yield self.conversation(title="two of us")
        mallory, _ = yield self.device("mallory", install="mallorys")
        latest = bob.e2ee.membership(group).latest
        by_mallory = membership.add(latest, ["mallory"], mallory.e2ee.state.device)  # she was no member
        fake_alice = Device.generate("alice")
        by_fake = membership.add(latest, ["mallory"], fake_alice)  # a device alice's chain does not list
        forged_signature = replace(by_fake, actor_device=bytes.fromhex(alice.device_id))  # alice's, not her signature
        cases = ((by_mallory, "not a member"), (by_fake, "not a current device"), (forged_signature, "signature"))
        for state, reason in cases:
            self.proxy.honest()
            self.proxy.rewrite(
                commands.GetMembership,
                lambda tap, request, answer, state=state: dict(answer, states=answer["states"] + [state.to_bytes()])
                if tap.username == "bob" else None,
            )
            before = len(bob_inbox.alarms())
            bob.e2ee.moved(group)  # (fetched again: after a ConversationUpdated, a login, or a refusal)
            yield bob.send_message(group, "not for mallory")
            self.assertEqual(self.wrapped_to(bob), [alice.device_id])
            [(kind, _, detail)] = bob_inbox.alarms()[before:]
            self.assertEqual(kind, Alarm.BAD_MEMBERSHIP)
            self.assertIn(reason, detail.lower())
            self.assertEqual(bob.e2ee.membership(group).members, {"alice", "bob"})
        yield self.still_honest(bob, alice, alice_inbox, group, "just us")
        self.assertEqual(self.kinds(alice_inbox), [])


class ReplayTests(MaliciousServerTestCase):
    @inlineCallbacks
    def test_an_envelope_replayed_into_another_conversation_is_refused(self):
        alice, alice_inbox, bob, bob_inbox, direct = yield self.conversation()
        group, _ = yield alice.create_conversation(["bob"], title="the other one")
        yield alice.send_message(group, "hello group")
        yield bob_inbox.wait("deliver", 2)
        self.proxy.on_push(lambda push: HOLD if deliveries(bob, direct, seq=2)(push) else None)
        yield alice.send_message(direct, "for the direct conversation only")
        yield until(lambda: self.proxy.held)
        [held] = self.proxy.held
        original = held.arguments
        session = dict(bob.e2ee.state.sessions)
        # as it is, into the group: the header names the direct conversation
        yield self.proxy.deliver(bob, **dict(original, conversation_id=group, seq=2, message_id=7001))
        # its header rewritten for the group (which the server can do: it is not signed): the wrap's context is
        # the header it was made for, so the key does not come out
        header = Header.from_bytes(original["header"])
        moved = replace(header, conversation=group, members=bob.e2ee.membership(group).members_hash)
        yield self.proxy.deliver(
            bob, **dict(original, conversation_id=group, seq=2, message_id=7002, header=moved.to_bytes())
        )
        self.assertEqual(
            self.bodies(bob_inbox)[2:],
            [(2, None, Problem.MISMATCHED_HEADER), (2, None, Problem.BAD_MESSAGE)],
        )
        self.assertEqual(self.kinds(bob_inbox), [Problem.MISMATCHED_HEADER, Problem.BAD_MESSAGE])
        self.assertEqual(bob.e2ee.state.sessions, session)  # nothing changed: the real one still opens
        self.proxy.release(held)
        [*_, real] = yield bob_inbox.wait("deliver", 5)
        self.assertEqual((real.conversation_id, real.seq, real.body), (direct, 2, "for the direct conversation only"))
        yield self.still_honest(alice, bob, bob_inbox, group, "the group's own seq 2")
        self.assertEqual(bob_inbox.items["deliver"][-1].seq, 2)  # (a seq taken by forgeries is still read)
        self.assertEqual(len(bob_inbox.alarms()), 2)

    @inlineCallbacks
    def test_an_envelope_replayed_in_its_conversation_is_refused(self):
        alice, alice_inbox, bob, bob_inbox, conversation = yield self.conversation()
        yield alice.send_message(conversation, "two")
        yield bob_inbox.wait("deliver", 2)
        two = self.proxy.delivered(bob, conversation)[-1].arguments
        self.assertEqual(two["seq"], 2)
        yield self.proxy.deliver(bob, **dict(two, message_id=two["message_id"] + 1000, seq=3))  # a new id and seq
        yield self.proxy.deliver(bob, **two)  # exactly the push again: a duplicate, shown once
        yield self.proxy.deliver(bob, **dict(two, seq=3))  # its own id as a new seq
        self.assertEqual(self.bodies(bob_inbox)[2:], [(3, None, Problem.REPLAY), (3, None, Problem.REPLAY)])
        [(kind, user, detail), (kind2, _, detail2)] = bob_inbox.alarms()
        self.assertEqual((kind, user, kind2), (Problem.REPLAY, "alice", Problem.REPLAY))
        self.assertIn("seen before", detail)
        self.assertIn("shown before as seq 2", detail2)
        yield self.still_honest(alice, bob, bob_inbox, conversation, "the real seq 3")
        self.assertEqual(bob_inbox.items["deliver"][-1].seq, 3)
        self.assertEqual(len(bob_inbox.alarms()), 2)

    @inlineCallbacks
    def test_after_a_restart_a_read_message_pushed_as_a_new_seq_is_a_replay(self):
        """The key of a message read is kept with the place it was read at (the device file keeps both): after a
        restart, the server cannot show it again as new, and the real message of that seq still comes."""
        alice, alice_inbox, bob, bob_inbox, conversation = yield self.conversation()
        hello = self.proxy.delivered(bob, conversation)[0].arguments
        yield bob.close()
        bob, bob_inbox = yield self.device("bob", install="bobs")
        yield self.proxy.deliver(bob, **dict(hello, seq=2))
        self.assertEqual(self.bodies(bob_inbox), [(2, None, Problem.REPLAY)])
        self.assertEqual(self.kinds(bob_inbox), [Problem.REPLAY])
        yield alice.send_message(conversation, "the real seq 2")
        yield bob_inbox.wait("deliver", 2)
        self.assertEqual(self.bodies(bob_inbox)[-1], (2, "the real seq 2", None))

    @inlineCallbacks
    def test_after_a_restart_another_envelope_under_a_read_id_is_a_replay_not_the_senders_fault(self):
        """The kept key is looked up by the server's message id, with the place it was read at: another envelope
        under the id of a message read, at another seq, is the server's replay, not a key mismatch of the sender."""
        alice, alice_inbox, bob, bob_inbox, conversation = yield self.conversation()
        hello = self.proxy.delivered(bob, conversation)[0].arguments
        yield bob.close()
        self.proxy.on_push(lambda push: HOLD if deliveries(bob, conversation, seq=2)(push) else None)
        yield alice.send_message(conversation, "two")
        bob, bob_inbox = yield self.device("bob", install="bobs")
        yield until(lambda: self.proxy.held)
        [held] = self.proxy.held
        two = held.arguments
        yield self.proxy.deliver(bob, **dict(two, message_id=hello["message_id"]))
        [(kind, _, _)] = bob_inbox.alarms()
        self.assertEqual(kind, Problem.REPLAY)
        self.proxy.release(held)
        [_, real] = yield bob_inbox.wait("deliver", 2)
        self.assertEqual((real.seq, real.body), (2, "two"))  # the real one still opens


class OrderTests(MaliciousServerTestCase):
    @inlineCallbacks
    def test_a_held_back_message_is_put_back_in_order(self):
        alice, _, bob, bob_inbox, conversation = yield self.conversation()
        self.proxy.on_push(lambda push: HOLD if deliveries(bob, conversation, seq=2)(push) else None)
        yield alice.send_message(conversation, "two")
        yield alice.send_message(conversation, "three")
        delivered = yield bob_inbox.wait("deliver", 3)
        # at seq 3 the client saw seq 2 missing, found it (with its wrap) in the history: shown first
        self.assertEqual([(m.seq, m.body) for m in delivered], [(1, "hello"), (2, "two"), (3, "three")])
        [held] = self.proxy.held
        self.proxy.release(held)  # pushed late: a duplicate now
        yield bob.ping()
        self.assertEqual(len(bob_inbox.items["deliver"]), 3)
        self.assertEqual(bob_inbox.alarms(), [])
        yield self.still_honest(alice, bob, bob_inbox, conversation, "four")

    @inlineCallbacks
    def test_a_reorder_the_history_hides_raises_a_gap_and_the_late_message_is_still_shown(self):
        alice, _, bob, bob_inbox, conversation = yield self.conversation()
        self.proxy.on_push(lambda push: HOLD if deliveries(bob, conversation, seq=2)(push) else None)
        self.proxy.rewrite(commands.HistoryEncrypted, history_to(bob, lambda ms: [m for m in ms if m["seq"] != 2]))
        yield alice.send_message(conversation, "two")
        yield alice.send_message(conversation, "three")
        yield bob_inbox.wait("deliver", 2)
        [(kind, user, detail)] = yield bob_inbox.wait("alarm", 1)
        self.assertEqual((kind, user), (Alarm.GAP, None))
        self.assertIn(f"conversation {conversation}: seq 2 never reached this device", detail)
        [held] = self.proxy.held
        self.proxy.release(held)
        delivered = yield bob_inbox.wait("deliver", 3)
        # the per-device counter window and the ratchet's skipped keys take it out of order
        self.assertEqual([(m.seq, m.body, m.problem) for m in delivered],
                         [(1, "hello", None), (3, "three", None), (2, "two", None)])
        yield self.still_honest(alice, bob, bob_inbox, conversation, "four")
        self.assertEqual(len(bob_inbox.alarms()), 1)


class DropTests(MaliciousServerTestCase):
    @inlineCallbacks
    def test_a_dropped_push_is_read_from_the_history(self):
        alice, _, bob, bob_inbox, conversation = yield self.conversation()
        self.proxy.on_push(lambda push: DROP if deliveries(bob, conversation, seq=2)(push) else None)
        yield alice.send_message(conversation, "two")
        yield alice.send_message(conversation, "three")
        delivered = yield bob_inbox.wait("deliver", 3)
        self.assertEqual([(m.seq, m.body) for m in delivered], [(1, "hello"), (2, "two"), (3, "three")])
        self.assertEqual(bob_inbox.alarms(), [])

    @inlineCallbacks
    def test_a_dropped_message_raises_a_gap_alarm_naming_it(self):
        alice, _, bob, bob_inbox, conversation = yield self.conversation()
        dropped = {2, 3}
        self.proxy.on_push(lambda push: DROP if deliveries(bob, conversation)(push)
                           and push.arguments["seq"] in dropped else None)
        self.proxy.rewrite(commands.HistoryEncrypted, history_to(bob, lambda ms: [m for m in ms
                                                                             if m["seq"] not in dropped]))
        yield alice.send_message(conversation, "two")
        yield alice.send_message(conversation, "three")
        yield bob.ping()
        self.assertEqual(bob_inbox.alarms(), [])  # the last messages dropped: nothing shows it yet
        yield alice.send_message(conversation, "four")
        [(kind, user, detail)] = yield bob_inbox.wait("alarm", 1)
        yield bob_inbox.wait("deliver", 2)
        self.assertEqual((kind, user), (Alarm.GAP, None))
        self.assertIn(f"conversation {conversation}: seq 2-3 never reached this device", detail)
        self.assertIn("history of the conversation does not have them", detail)
        self.assertEqual([(m.seq, m.body) for m in bob_inbox.items["deliver"]], [(1, "hello"), (4, "four")])
        yield self.still_honest(alice, bob, bob_inbox, conversation, "five")
        self.assertEqual(len(bob_inbox.alarms()), 1)

    @inlineCallbacks
    def test_a_gap_whose_history_is_refused_is_an_alarm(self):
        alice, _, bob, bob_inbox, conversation = yield self.conversation()
        self.proxy.on_push(lambda push: DROP if deliveries(bob, conversation, seq=2)(push) else None)

        def refuse(tap, command, box):
            if command is commands.HistoryEncrypted and tap.username == "bob":
                tap.to_client(amp.AmpBox(_error=box[b"_ask"], _error_code=b"SERVICE_UNAVAILABLE",
                                         _error_description=b"Try again later."))
                return None
            return box

        self.proxy.on_request(refuse)
        yield alice.send_message(conversation, "two")
        yield alice.send_message(conversation, "three")
        [(kind, _, detail)] = yield bob_inbox.wait("alarm", 1)
        yield bob_inbox.wait("deliver", 2)
        self.assertEqual(kind, Alarm.GAP)
        self.assertIn("could not be fetched to check", detail)
        self.assertEqual([(m.seq, m.body) for m in bob_inbox.items["deliver"]], [(1, "hello"), (3, "three")])

    @inlineCallbacks
    def test_own_messages_and_messages_not_for_this_device_are_no_gap(self):
        alice, alice_inbox, bob, bob_inbox, conversation = yield self.conversation()
        carol, carol_inbox = yield self.device("carol", install="carols")
        group, _ = yield alice.create_conversation(["bob", "carol"], title="three")
        for sender, text in ((alice, "a1"), (bob, "b1"), (bob, "b2"), (alice, "a2"), (carol, "c1")):
            yield sender.send_message(group, text)
        laptop, laptop_inbox = yield self.linked(bob, "bob")  # added after c1: seqs 1-5 were not for it
        yield carol.send_message(group, "c2")
        yield laptop_inbox.wait("deliver", 1)
        yield laptop.e2ee.settled()  # (its refill after the first message, which would upload again)
        for table in ("signed_prekeys", "one_time_prekeys"):  # alice cannot start a session with the laptop
            yield self.write(f"DELETE FROM {table} WHERE device_id = ?", laptop.device_id)
        sent = yield alice.send_message(group, "a3")
        self.assertEqual(sent.unreached, (laptop.device_id,))
        yield carol.send_message(group, "c3")
        yield laptop_inbox.wait("deliver", 2)
        yield bob_inbox.wait("deliver", 1 + 6)
        # the laptop was pushed seq 6 and 8: seq 7 is in the history, with no wrap for it
        self.assertEqual([(m.seq, m.body) for m in laptop_inbox.items["deliver"]], [(6, "c2"), (8, "c3")])
        for inbox in (alice_inbox, bob_inbox, carol_inbox, laptop_inbox):
            self.assertEqual(inbox.alarms(), [])

    @inlineCallbacks
    def test_not_caught_a_withheld_wrap_looks_like_a_message_not_for_this_device(self):
        alice, _, bob, bob_inbox, conversation = yield self.conversation()
        self.proxy.on_push(lambda push: DROP if deliveries(bob, conversation, seq=2)(push) else None)
        self.proxy.rewrite(commands.HistoryEncrypted, history_to(
            bob, lambda ms: [dict(m, wrap=None) if m["seq"] == 2 else m for m in ms]))
        yield alice.send_message(conversation, "two")
        yield alice.send_message(conversation, "three")
        yield bob_inbox.wait("deliver", 2)
        self.assertEqual([(m.seq, m.body) for m in bob_inbox.items["deliver"]], [(1, "hello"), (3, "three")])
        self.assertEqual(bob_inbox.alarms(), [])  # the header lists no recipients: it may not have been for bob
        page = yield bob.history(conversation)
        self.assertEqual([(m.seq, m.problem) for m in page.messages], [(1, None), (2, Problem.NO_KEY), (3, None)])

    @inlineCallbacks
    def test_a_message_dropped_and_the_seqs_renumbered_is_caught_by_the_chain(self):
        alice, _, bob, bob_inbox, conversation = yield self.conversation()

        def renumber(push):
            if not deliveries(bob, conversation)(push):
                return None
            seq = push.arguments["seq"]
            return DROP if seq == 2 else dict(push.arguments, seq=seq - 1) if seq > 2 else None

        self.proxy.on_push(renumber)
        self.proxy.rewrite(commands.HistoryEncrypted, history_to(
            bob, lambda ms: [dict(m, seq=m["seq"] - 1 if m["seq"] > 2 else m["seq"]) for m in ms if m["seq"] != 2]))
        for text in ("two", "three", "four"):
            yield alice.send_message(conversation, text)
        yield bob_inbox.wait("deliver", 3)
        self.assertEqual([(m.seq, m.body) for m in bob_inbox.items["deliver"]],
                         [(1, "hello"), (2, "three"), (3, "four")])
        # the chain's links number the messages too, and the server signed them: each renumbered one is caught
        self.assertEqual(self.kinds(bob_inbox), [Alarm.LINK_MISMATCH, Alarm.LINK_MISMATCH])
        self.assertEqual([m.chain for m in bob_inbox.items["deliver"]], ["verified", "broken", "broken"])
        self.assertIn("its chain link is message 3", bob_inbox.alarms()[0][2])


class FirstContactTests(MaliciousServerTestCase):
    @inlineCallbacks
    def test_not_caught_a_fake_chain_at_first_contact_reads_the_messages(self):
        """A chain seen for the first time is trusted (TOFU): only comparing safety numbers shows the server's."""
        alice, alice_inbox = yield self.device("alice")
        bob, bob_inbox = yield self.device("bob", install="bobs")
        fake = Device.generate("bob")  # the server's own device, shown to alice as bob's only one
        spk = fake.new_signed_prekey()
        self.proxy.rewrite(
            commands.GetDeviceChain,
            lambda tap, request, answer: dict(answer, links=[chain.first(fake, "phone").to_bytes()], has_more=False)
            if request["username"] == "bob" and tap.username == "alice" else None,
        )
        stolen = []

        def intercept(tap, command, box):
            if tap.username != "alice":
                return box
            if command is commands.ClaimPrekeyBundle and parse_arguments(command, box)["device_id"] == fake.id.hex():
                answer = command.makeResponse(
                    dict(spk_id=spk.id, spk_pub=spk.public, spk_signature=spk.signature,
                         sig_pub=fake.keys.sig_pub, dh_pub=fake.keys.dh_pub), None)
                answer[b"_answer"] = box[b"_ask"]
                tap.to_client(answer)  # answered by the server itself
                return None
            if command is commands.SendEncrypted:
                arguments = parse_arguments(command, box)
                [mine] = [w for w in arguments["wraps"] if w["device_id"] == fake.id.hex()]
                stolen.append((arguments["header"], arguments["body"], mine["wrap"]))
                others = [w for w in arguments["wraps"] if w is not mine]
                return command_box(command, dict(arguments, wraps=others), box[b"_ask"])  # the daemon takes it
            return box

        self.proxy.on_request(intercept)
        conversation, _ = yield alice.create_conversation(["bob"])
        yield alice.send_message(conversation, "for bob's eyes only")
        [(header, body, wrap)] = stolen
        session = Session()

        def unwrap(wrapped, context, check):
            return session.accept(fake.keys, fake.dh_private, alice.e2ee.state.device.keys, wrapped, context,
                                  lambda spk_id: spk.private if spk_id == spk.id else None, lambda opk_id: None,
                                  check).plaintext

        self.assertEqual(envelope.unseal(Header.from_bytes(header), body, wrap, fake.id, unwrap),
                         "for bob's eyes only".encode())  # the server read it
        self.assertEqual(alice_inbox.alarms(), [])
        yield bob.ping()
        self.assertEqual(bob_inbox.items["deliver"], [])
        # what shows it: the safety numbers differ ...
        self.assertNotEqual((yield alice.safety_number("bob")), (yield bob.safety_number("alice")))
        # ... and the fake chain must be shown to alice for ever: bob's real one is a fork
        self.proxy.honest()
        yield alice.safety_number("bob")
        [(kind, user, _)] = alice_inbox.alarms()
        self.assertEqual((kind, user), (Alarm.FORK, "bob"))


class KeyCommitmentTests(MaliciousServerTestCase):
    @inlineCallbacks
    def group_of_three(self):
        """alice, bob and carol in a group; bob and carol wrote first, so alice's wraps are ratchet messages."""
        alice, alice_inbox = yield self.device("alice")
        bob, bob_inbox = yield self.device("bob", install="bobs")
        carol, carol_inbox = yield self.device("carol", install="carols")
        group, _ = yield alice.create_conversation(["bob", "carol"], title="three")
        yield alice.send_message(group, "hello")
        yield bob.send_message(group, "hi from bob")
        yield carol.send_message(group, "hi from carol")
        yield alice_inbox.wait("deliver", 2)
        yield bob_inbox.wait("deliver", 2)
        yield carol_inbox.wait("deliver", 2)
        return alice, alice_inbox, bob, bob_inbox, carol, carol_inbox, group

    @inlineCallbacks
    def test_a_sender_giving_two_recipients_different_keys_is_caught(self):
        alice, _, bob, bob_inbox, carol, carol_inbox, group = yield self.group_of_three()
        original, bob_device = envelope.seal, bob.e2ee.state.device.id

        def two_faced(plaintext, *arguments, key=None, **options):
            *fields, wrap = arguments

            def wrap_other(device, message_key, context):
                return wrap(device, os.urandom(32) if device == bob_device else message_key, context)

            return original(plaintext, *fields, wrap_other, key=key, **options)

        self.patch(envelope, "seal", two_faced)  # alice's client, compromised or malicious
        yield alice.send_message(group, "what carol reads")
        [*_, caught] = yield bob_inbox.wait("deliver", 3)
        [*_, read] = yield carol_inbox.wait("deliver", 3)
        self.assertEqual((caught.body, caught.problem), (None, Problem.KEY_COMMITMENT_MISMATCH))
        self.assertEqual(bob_inbox.alarms()[0][:2], (Problem.KEY_COMMITMENT_MISMATCH, "alice"))
        self.assertEqual((read.body, read.problem), ("what carol reads", None))
        self.patch(envelope, "seal", original)
        yield self.still_honest(alice, bob, bob_inbox, group, "the same for both")
        [*_, last] = yield carol_inbox.wait("deliver", 4)
        self.assertEqual(last.body, "the same for both")
        self.assertEqual(len(bob_inbox.alarms()), 1)
        self.assertEqual(carol_inbox.alarms(), [])

    @inlineCallbacks
    def test_a_server_giving_two_recipients_different_wraps_or_bodies_is_caught(self):
        alice, _, bob, bob_inbox, carol, carol_inbox, group = yield self.group_of_three()
        held = {}

        def swap(push):
            if deliveries(carol, group)(push) and push.arguments["seq"] == 4:
                held["carol"] = push.arguments
                body = bytearray(push.arguments["body"])
                body[-1] ^= 1
                return dict(push.arguments, body=bytes(body))  # carol gets another body
            if deliveries(bob, group)(push) and push.arguments["seq"] == 4:
                held["bob"] = push
                return HOLD
            return None

        self.proxy.on_push(swap)
        yield alice.send_message(group, "one text for both")
        [*_, changed] = yield carol_inbox.wait("deliver", 3)
        self.assertEqual((changed.body, changed.problem), (None, Problem.BAD_BODY))
        yield until(lambda: "bob" in held)
        bob_push = held["bob"]
        yield self.proxy.deliver(bob, **dict(bob_push.arguments, wrap=held["carol"]["wrap"], message_id=8001))
        [*_, swapped] = bob_inbox.items["deliver"]
        self.assertEqual((swapped.body, swapped.problem), (None, Problem.BAD_MESSAGE))  # carol's wrap: not bob's
        self.assertEqual(self.kinds(carol_inbox), [Problem.BAD_BODY])
        self.assertEqual(self.kinds(bob_inbox), [Problem.BAD_MESSAGE])
        self.proxy.release(bob_push)  # bob's own push, late: it opens (the session did not move)
        [*_, real] = yield bob_inbox.wait("deliver", 4)
        self.assertEqual((real.seq, real.body), (4, "one text for both"))
        yield self.still_honest(alice, carol, carol_inbox, group, "and again")


class PrekeyBundleTests(MaliciousServerTestCase):
    @inlineCallbacks
    def first_contact(self, rewrite):
        alice, alice_inbox = yield self.device("alice")
        bob, bob_inbox = yield self.device("bob", install="bobs")
        self.proxy.rewrite(commands.ClaimPrekeyBundle, lambda tap, request, answer: rewrite(answer))
        conversation, _ = yield alice.create_conversation(["bob"])
        return alice, alice_inbox, bob, bob_inbox, conversation

    @inlineCallbacks
    def test_a_bundle_with_keys_not_in_the_chain_is_refused(self):
        attacker = Device.generate("bob")
        cases = (
            (lambda answer: dict(answer, dh_pub=attacker.keys.dh_pub, sig_pub=attacker.keys.sig_pub),
             Alarm.KEY_MISMATCH),
            (lambda answer: dict(answer, spk_pub=attacker.keys.dh_pub), Alarm.BAD_PREKEY),  # not what bob signed
        )
        alice, alice_inbox, bob, bob_inbox, conversation = yield self.first_contact(lambda answer: None)
        for rewrite, kind in cases:
            self.proxy.honest()
            self.proxy.rewrite(commands.ClaimPrekeyBundle, lambda tap, request, answer, f=rewrite: f(answer))
            before = len(alice_inbox.alarms())
            with self.assertRaises(EncryptionUnavailable):
                yield alice.send_message(conversation, "to whom?")
            [(alarm, user, _)] = alice_inbox.alarms()[before:]
            self.assertEqual((alarm, user), (kind, "bob"))
            self.assertEqual(self.proxy.sent(alice), [])  # nothing was sent
            self.assertEqual(alice.e2ee.state.sessions, {})
        yield self.still_honest(alice, bob, bob_inbox, conversation, "now to bob")

    @inlineCallbacks
    def test_not_caught_by_the_sender_a_substituted_one_time_prekey(self):
        """X3DH does not sign one-time prekeys: the sender cannot tell; the recipient cannot read it."""
        attacker = Device.generate("bob")
        alice, alice_inbox, bob, bob_inbox, conversation = yield self.first_contact(
            lambda answer: dict(answer, opk_pub=attacker.keys.dh_pub) if answer.get("opk_id") else None
        )
        yield alice.send_message(conversation, "unreadable")
        [lost] = yield bob_inbox.wait("deliver", 1)
        self.assertEqual((lost.body, lost.problem), (None, Problem.BAD_MESSAGE))
        self.assertEqual(alice_inbox.alarms(), [])
        self.proxy.honest()
        yield bob.send_message(conversation, "bob writes back: a session of his own")  # heals it
        yield alice_inbox.wait("deliver", 1)
        yield self.still_honest(alice, bob, bob_inbox, conversation, "readable again")


class ForkTests(MaliciousServerTestCase):
    @inlineCallbacks
    def test_a_rewritten_or_cut_chain_raises_the_fork_alarm(self):
        alice, alice_inbox, bob, bob_inbox, conversation = yield self.conversation()
        other = chain.first(Device.generate("alice"), "evil")  # another link 1 for alice
        cases = (
            (lambda answer: dict(answer, links=[other.to_bytes()]), "not the link seen before"),
            (lambda answer: dict(answer, links=[]), "ends before link 1"),
        )
        for rewrite, reason in cases:
            self.proxy.honest()
            self.proxy.rewrite(
                commands.GetDeviceChain,
                lambda tap, request, answer, f=rewrite: f(answer)
                if request["username"] == "alice" and tap.username == "bob" else None,
            )
            before = len(bob_inbox.alarms())
            bob.e2ee.chains.stale(["alice"])  # (fetched again: after a DevicesChanged, a reconnect, or an hour)
            yield bob.send_message(conversation, "to alice's device as seen")
            self.assertEqual(self.wrapped_to(bob), [alice.device_id])
            [(kind, user, detail)] = bob_inbox.alarms()[before:]
            self.assertEqual((kind, user), (Alarm.FORK, "alice"))
            self.assertIn(reason, detail)
        self.assertEqual(list(bob.e2ee.chains.get("alice").devices), [bytes.fromhex(alice.device_id)])
        yield self.still_honest(bob, alice, alice_inbox, conversation, "no harm done")

    @inlineCallbacks
    def test_a_rewritten_membership_raises_the_membership_fork_alarm(self):
        alice, alice_inbox, bob, bob_inbox, group = yield self.conversation(title="us")
        yield self.device("mallory", install="mallorys")
        other = membership.create(group, "group", "us", ["bob", "mallory"], alice.e2ee.state.device)  # alice signed
        self.proxy.rewrite(
            commands.GetMembership,
            lambda tap, request, answer: dict(answer, states=[other.to_bytes()]) if tap.username == "bob" else None,
        )
        yield bob.send_message(group, "to the members seen")
        self.assertEqual(self.wrapped_to(bob), [alice.device_id])
        [(kind, _, detail)] = bob_inbox.alarms()
        self.assertEqual(kind, Alarm.MEMBERSHIP_FORK)
        self.assertIn("not the state seen before", detail)
        yield self.still_honest(bob, alice, alice_inbox, group, "still us")


class GapHelpersTests(unittest.TestCase):
    def test_seq_ranges(self):
        self.assertEqual(library._seq_ranges([2]), "2")
        self.assertEqual(library._seq_ranges([2, 3, 4, 7, 9, 10]), "2-4, 7, 9-10")


class ChainTestCase(MaliciousServerTestCase):
    """Attacks on the conversation chain (issue 12): a server showing members different histories, dropping,
    reordering or replaying messages in its signed chain, rewriting receipts, forging membership states."""

    @inlineCallbacks
    def forger(self, conversation, victims, change, learner):
        """A ChainForger with the daemon's own key (the operator holds it), installed in the double; it learns the
        links so far from a GetChain of `learner` (a client who is not a victim)."""
        forger = ChainForger(self.proxy, self.hub.chain.heads.key, conversation, victims, change).install()
        yield forger.learn_from(learner)
        return forger

    def alarms_of(self, inbox, kind):
        return [detail for alarm, _, detail in inbox.alarms() if alarm == kind]


class ChainForkTests(ChainTestCase):
    @inlineCallbacks
    def test_two_members_shown_different_histories_catch_the_fork_and_prove_it(self):
        alice, alice_inbox, bob, bob_inbox, conversation = yield self.conversation()
        self.assertEqual(bob.e2ee.transcripts.chain(conversation).position.n, 2)
        # bob is shown link 3 (alice's next message) placed a millisecond later: another e from link 3 on
        forger = yield self.forger(
            conversation, [bob], lambda link: replace(link, server_time=link.server_time + 1) if link.n == 3 else link,
            alice,
        )
        yield alice.send_message(conversation, "two")
        [_, two] = yield bob_inbox.wait("deliver", 2)
        self.assertEqual((two.body, two.n, two.chain), ("two", 3, "verified"))  # consistent in itself
        yield alice.send_message(conversation, "three")  # alice's header names her e at link 3
        [*_, three] = yield bob_inbox.wait("deliver", 3)
        self.assertEqual((three.body, three.chain, three.chain_problems), ("three", "broken", (Alarm.CHAIN_FORK,)))
        [fork] = self.alarms_of(bob_inbox, Alarm.CHAIN_FORK)
        self.assertIn("alice had seen another history at link 3 than this device", fork)
        # bob's read receipt signs what bob was shown: alice sees he read another history
        yield bob.mark_read(conversation, 3)
        [signed] = yield alice_inbox.wait("signed", 1)
        self.assertEqual((signed.username, signed.verified, signed.problem), ("bob", False, Alarm.TRANSCRIPT_FORK))
        # and the first message of bob's crosses the fork the other way
        yield bob.send_message(conversation, "did you get my read receipt?")
        [*_, reply] = yield alice_inbox.wait("deliver", 1)
        self.assertEqual((reply.chain, reply.chain_problems), ("broken", (Alarm.CHAIN_FORK,)))
        self.assertEqual(self.kinds(alice_inbox), [Alarm.TRANSCRIPT_FORK, Alarm.CHAIN_FORK])
        # once bob is given the real chain, the two heads the server signed for one link are proof it lied
        forger.forging = False
        yield alice.send_message(conversation, "four")
        yield bob_inbox.wait("deliver", 4)
        self.assertIn(Alarm.EQUIVOCATION, self.kinds(bob_inbox))
        [proof] = bob.e2ee.transcripts.chain(conversation).proofs
        self.assertTrue(transcript.Equivocation.from_bytes(proof).proves(self.hub.chain.heads.public))
        self.assertEqual(self.kinds(bob_inbox)[0], Alarm.CHAIN_FORK)


class ChainDropTests(ChainTestCase):
    @inlineCallbacks
    def test_a_message_dropped_from_the_chain_answers_is_a_chain_gap(self):
        alice, _, bob, bob_inbox, conversation = yield self.conversation()
        hidden = set()

        def drop(push):
            if deliveries(bob, conversation, seq=2)(push):
                hidden.add(transcript.Link.from_bytes(push.arguments["link"]).n)
                return DROP
            return None

        def chain(tap, request, answer):
            if (tap.username, tap.device_id) != (bob.username, bob.device_id):
                return None
            return dict(answer, links=[d for d in answer["links"] if transcript.Link.from_bytes(d).n not in hidden])

        self.proxy.on_push(drop)
        self.proxy.rewrite(commands.HistoryEncrypted, history_to(bob, lambda ms: [m for m in ms if m["seq"] != 2]))
        self.proxy.rewrite(commands.GetChain, chain)
        yield alice.send_message(conversation, "two")
        yield alice.send_message(conversation, "three")
        [_, three] = yield bob_inbox.wait("deliver", 2)
        self.assertEqual((three.body, three.chain), ("three", "broken"))
        self.assertIn(Alarm.CHAIN_GAP, three.chain_problems)
        [gap] = self.alarms_of(bob_inbox, Alarm.CHAIN_GAP)
        self.assertIn("link 3 of the chain never came", gap)
        self.assertEqual(sorted(set(self.kinds(bob_inbox))), sorted({Alarm.GAP, Alarm.CHAIN_GAP}))
        yield self.still_honest(alice, bob, bob_inbox, conversation, "honest again")
        self.assertEqual(bob.e2ee.transcripts.chain(conversation).position.n, 5)


class ChainOrderTests(ChainTestCase):
    @inlineCallbacks
    def test_a_reordered_pair_is_caught_by_the_counters(self):
        alice, _, bob, bob_inbox, conversation = yield self.conversation()
        items, pushes = {}, {}

        def swapped(link):  # links 3 and 4 (seqs 2 and 3) hold each other's envelope
            if link.n in (3, 4) and len(items) == 2:
                return replace(link, item=items[7 - link.n])
            return link

        forger = yield self.forger(conversation, [bob], swapped, alice)

        def hold(push):
            if deliveries(bob, conversation)(push) and push.arguments["seq"] in (2, 3):
                arguments = push.arguments
                link = transcript.Link.from_bytes(arguments["link"])
                items[link.n] = link.item
                pushes[arguments["seq"]] = arguments
                return HOLD
            return None

        self.proxy.push_rules.insert(0, hold)
        yield alice.send_message(conversation, "first")
        yield alice.send_message(conversation, "second")
        yield until(lambda: len(pushes) == 2)
        first, second = pushes[2], pushes[3]
        # bob is told "second" came first, at seq 2, and "first" after it, at seq 3: a chain signed that way
        for arguments, seq, n in ((second, 2, 3), (first, 3, 4)):
            link = forger.forged(n).to_bytes()
            yield self.proxy.deliver(bob, **dict(arguments, seq=seq, link=link, receipt=forger.receipt(n, n)))
        [_, late, early] = bob_inbox.items["deliver"]
        self.assertEqual((late.body, early.body), ("second", "first"))
        self.assertIn(Alarm.REORDERED, early.chain_problems)
        [reordered] = self.alarms_of(bob_inbox, Alarm.REORDERED)
        self.assertIn("the server reordered or replayed its messages", reordered)
        self.assertEqual(late.chain_problems, (Alarm.CHAIN_FORK,))  # it names link 3 as seen: it cannot stand there

    @inlineCallbacks
    def test_an_old_envelope_placed_again_in_the_signed_chain_is_a_replay(self):
        alice, _, bob, bob_inbox, conversation = yield self.conversation()
        [hello] = self.proxy.delivered(bob, conversation)
        old = hello.arguments
        old_item = transcript.Link.from_bytes(old["link"]).item
        forger = yield self.forger(
            conversation, [bob], lambda link: replace(link, item=old_item) if link.n == 3 else link, alice
        )
        self.proxy.on_push(lambda push: HOLD if deliveries(bob, conversation, seq=2)(push) else None)
        yield alice.send_message(conversation, "two")
        yield until(lambda: self.proxy.held)
        yield self.proxy.deliver(
            bob, **dict(old, seq=2, message_id=old["message_id"] + 50, link=forger.forged(3).to_bytes(),
                        receipt=forger.receipt(3, 3))
        )
        [_, replayed] = bob_inbox.items["deliver"]
        self.assertEqual((replayed.body, replayed.problem), (None, Problem.REPLAY))
        self.assertEqual(self.kinds(bob_inbox), [Problem.REPLAY])


class ReceiptTests(ChainTestCase):
    @inlineCallbacks
    def test_a_rewritten_receipt_is_caught(self):
        alice, _, bob, bob_inbox, conversation = yield self.conversation()

        def bad_signature(push):
            if not deliveries(bob, conversation, seq=2)(push):
                return None
            receipt = transcript.Receipt.from_bytes(push.arguments["receipt"])
            head = replace(receipt.head, signature=bytes(64))
            return dict(push.arguments, receipt=transcript.Receipt(receipt.links, head).to_bytes())

        self.proxy.on_push(bad_signature)
        yield alice.send_message(conversation, "two")
        [_, two] = yield bob_inbox.wait("deliver", 2)
        self.assertEqual((two.body, two.chain, two.chain_problems), ("two", "broken", (Alarm.BAD_HEAD_SIGNATURE,)))
        self.proxy.honest()
        key = self.hub.chain.heads.key

        def another_e(push):  # signed with the server's key, over an e its links do not give
            if not deliveries(bob, conversation, seq=3)(push):
                return None
            receipt = transcript.Receipt.from_bytes(push.arguments["receipt"])
            head = transcript.sign_head(key, conversation, receipt.head.n, bytes(32))
            return dict(push.arguments, receipt=transcript.Receipt(receipt.links, head).to_bytes())

        self.proxy.on_push(another_e)
        yield alice.send_message(conversation, "three")
        [*_, three] = yield bob_inbox.wait("deliver", 3)
        self.assertEqual(three.chain, "broken")
        self.assertIn(Alarm.HEAD_MISMATCH, three.chain_problems)
        # the lie is signed: with the real head at that link, bob holds proof
        self.assertEqual(self.kinds(bob_inbox)[0], Alarm.BAD_HEAD_SIGNATURE)
        self.assertEqual(sorted(set(self.kinds(bob_inbox)[1:])), [Alarm.EQUIVOCATION, Alarm.HEAD_MISMATCH])
        self.assertEqual(len(bob.e2ee.transcripts.chain(conversation).proofs), 1)
        yield self.still_honest(alice, bob, bob_inbox, conversation, "four")
        self.assertEqual(bob_inbox.items["deliver"][-1].chain, "verified")


class ForgedMembershipLinkTests(ChainTestCase):
    @inlineCallbacks
    def test_a_membership_state_the_server_forged_into_the_chain_is_caught(self):
        alice, _, bob, bob_inbox, group = yield self.conversation(title="plans")
        carol, _ = yield self.device("carol", install="carols")
        first = membership.State.from_bytes(bob.e2ee.state.memberships[group][0])
        stranger = Device.generate("alice")  # keys of the server's own, named alice's
        forged = membership.sign_state(
            replace(first, epoch=2, prev=first.hash(), op="add", members=("alice", "bob", "carol"),
                    actor_device=stranger.id), stranger,
        )
        yield self.forger(group, [bob], lambda link: replace(link, item=forged.hash()) if link.kind == "membership"
                          and link.number == 2 else link, alice)

        def states(tap, request, answer):
            if (tap.username, tap.device_id) != (bob.username, bob.device_id) or request["conversation_id"] != group:
                return None
            return dict(answer, states=[forged.to_bytes() if membership.State.from_bytes(s).epoch == 2 else s
                                        for s in answer["states"]])

        self.proxy.rewrite(commands.GetMembership, states)
        yield alice.add_members(group, ["carol"])
        yield alice.send_message(group, "welcome carol")
        [_, welcome] = yield bob_inbox.wait("deliver", 2)
        # alice's message names the real state 2, which bob cannot verify: it is not read, and says why
        self.assertEqual((welcome.body, welcome.problem), (None, Problem.UNKNOWN_MEMBERSHIP))
        kinds = self.kinds(bob_inbox)
        self.assertIn(Alarm.BAD_MEMBERSHIP, kinds)
        self.assertIn(Alarm.LINK_MISMATCH, kinds)
        [mismatch] = self.alarms_of(bob_inbox, Alarm.LINK_MISMATCH)
        self.assertIn("names membership state 2", mismatch)
        self.assertEqual(bob.e2ee.membership(group).members, {"alice", "bob"})  # the forged state is refused
