"""kill -9 of the daemon (the tree under test, under twistd) while messages are being sent: nothing answered is lost.

PROTOCOL.md: "SendMessage answers only after the message is committed to the
database: an answered message survives a kill -9 of the daemon", and a
client that resends after a lost answer, with the same client_msg_id, gets
the first message back and nothing is stored or delivered twice.
"""

import os
import signal
import sqlite3

from twisted.internet import defer, reactor, task
from twisted.internet.defer import inlineCallbacks
from twisted.internet.error import ConnectionClosed
from twisted.trial import unittest

from securechatd import commands
from tests.helpers import tls_connect
from tests.test_integration import PASSWORD, ChatClient, WaitTimeout, bounded
from tests.helpers import V1_CONFIG, spawn_daemon

COUNT = 200
IN_FLIGHT = 8
KILL_AFTER = 100  # answered sends


class CrashTests(unittest.TestCase):
    timeout = 90

    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.database = os.path.join(self.directory, "chat.sqlite")
        self.ca = os.path.join(self.directory, "certs", "ca.pem")
        self.config = os.path.join(self.directory, "securechatd.ini")
        with open(self.config, "w") as f:
            f.write(
                "[server]\nport = 0\n"
                f"[database]\npath = {self.database}\n"
                "[accounts]\nbcrypt_cost = 10\n"
                # not about the message rate limit: alice sends (and resends) at once
                "[limits]\nmessage_burst = 100000\nmessage_rate = 100000\n"
                + V1_CONFIG  # plaintext conversations, as version 1 has them
            )

    def spawn(self):
        """twistd running the securechatd under test; killed in cleanup if still running."""
        return spawn_daemon(self, reactor, self.config, self.directory)
    @inlineCallbacks
    def login(self, port, username):
        client = ChatClient(username)
        yield tls_connect(reactor, port, self.ca, protocol=client)

        def close():
            if not client.lost.called:
                client.transport.loseConnection()
            return bounded(client.lost, 5, f"close of {client}")

        self.addCleanup(close)
        yield client.callRemote(commands.Login, username=username, password=PASSWORD)
        return client

    def stored(self, conversation):
        """{client_msg_id: (message_id, seq)} as the database file has them now.

        Read-only, so that closing it never checkpoints the WAL: after the kill
        the daemon's next start must recover from the files as the kill left them.
        """
        db = sqlite3.connect(f"file:{self.database}?mode=ro", uri=True)
        try:
            return {
                client_msg_id: (message_id, seq)
                for client_msg_id, message_id, seq in db.execute(
                    "SELECT client_msg_id, id, seq FROM messages WHERE conversation_id = ?",
                    (conversation,),
                )
            }
        finally:
            db.close()

    @inlineCallbacks
    def alice_and_bob(self):
        """A daemon with alice and bob registered, alice logged in, and their conversation."""
        process, daemon = self.spawn()
        port = yield daemon.listening
        setup = ChatClient("setup")
        yield tls_connect(reactor, port, self.ca, protocol=setup)
        for name in ("alice", "bob"):
            yield setup.callRemote(commands.Register, username=name, password=PASSWORD)
        setup.transport.loseConnection()
        yield setup.lost
        alice = yield self.login(port, "alice")
        answer = yield alice.callRemote(commands.CreateConversation, members=["bob"])
        return process, daemon, port, alice, answer["conversation_id"]

    @inlineCallbacks
    def test_answered_messages_survive_kill_9(self):
        process, daemon, port, alice, conversation = yield self.alice_and_bob()

        # alice sends with several in flight; the daemon is killed mid-stream
        ids = [f"crash-{i:03d}" for i in range(COUNT)]
        body = {i: f"message {i}" for i in ids}
        answered, failed, issued = {}, [], []
        pending = iter(ids)
        threshold = defer.Deferred()

        def send(client_msg_id):
            issued.append(client_msg_id)
            return alice.callRemote(
                commands.SendMessage,
                conversation_id=conversation,
                client_msg_id=client_msg_id,
                body=body[client_msg_id],
            )

        @inlineCallbacks
        def sender():
            while not threshold.called:  # from then on, only what is in flight
                client_msg_id = next(pending)
                try:
                    sent = yield send(client_msg_id)
                except ConnectionClosed:  # the connection died with the daemon
                    failed.append(client_msg_id)
                    return
                except Exception as problem:
                    if not threshold.called:
                        threshold.errback(problem)  # fail now, not at the test's timeout
                    raise
                answered[client_msg_id] = sent
                if len(answered) == KILL_AFTER:
                    # stop reading answers: what the daemon commits from now on is
                    # committed but, for alice, never answered (a lost answer)
                    alice.transport.transport.pauseProducing()
                    threshold.callback(None)

        senders = defer.gatherResults([sender() for _ in range(IN_FLIGHT)])
        yield threshold
        # Reading has stopped: these two are committed below but never answered.
        # (The senders' own sends in flight may all have been answered in the read
        # that reached the threshold, when the daemon answered a batch at once.)
        unread = [next(pending) for _ in range(2)]
        lost = [send(client_msg_id) for client_msg_id in unread]
        # let every send issued so far commit, so some committed ones go unanswered
        for _ in range(500):
            # (first a reactor turn: answers that arrived in the same read as the
            # threshold's are handled now, not after `committed_unanswered` is counted)
            yield task.deferLater(reactor, 0.01, lambda: None)
            if len(self.stored(conversation)) >= len(issued):
                break
        else:
            self.fail(f"the daemon did not commit the {len(issued)} messages sent within 5 s")
        committed_unanswered = len(issued) - len(answered)
        extra = [next(pending) for _ in range(4)]  # and a few more, racing the kill
        racing = [send(client_msg_id) for client_msg_id in extra]
        process.signalProcess("KILL")
        code, killed_by = yield daemon.ended
        alice.transport.abortConnection()  # the answers in the socket are lost with it
        yield senders
        yield bounded(alice.lost, 5, "alice's connection to end")
        for client_msg_id, sending in zip(unread + extra, lost + racing):
            sending.addErrback(lambda _, i=client_msg_id: failed.append(i))
            self.assertIn(client_msg_id, failed)  # reading had stopped: no answer came
        self.assertEqual(killed_by, signal.SIGKILL)
        self.assertGreaterEqual(committed_unanswered, len(unread))
        self.assertGreaterEqual(len(answered), KILL_AFTER)
        self.assertLess(len(answered), COUNT)
        self.assertEqual(len(failed), committed_unanswered + len(extra))
        self.assertEqual(set(answered) | set(failed), set(issued))
        # every answered message is in the database (reading it recovers the WAL, as a start would)
        wal = self.database + "-wal"
        self.assertTrue(os.path.exists(wal) and os.path.getsize(wal) > 0)
        stored = self.stored(conversation)
        self.assertTrue(os.path.getsize(wal) > 0, "reading checkpointed the WAL")
        for client_msg_id, sent in answered.items():
            self.assertEqual(stored.get(client_msg_id), (sent["message_id"], sent["seq"]), client_msg_id)
        self.assertEqual(sorted(seq for _, seq in stored.values()), list(range(1, len(stored) + 1)))

        # the same database, a new daemon; alice resends what got no answer
        process, daemon = self.spawn()
        port = yield daemon.listening
        alice = yield self.login(port, "alice")
        resent = {}
        for client_msg_id in ids:
            if client_msg_id not in answered:
                resent[client_msg_id] = yield alice.callRemote(
                    commands.SendMessage,
                    conversation_id=conversation,
                    client_msg_id=client_msg_id,
                    body=body[client_msg_id],
                )
        # an answered one sent again is the same message, across the restart
        for client_msg_id in ids[:3] + list(answered)[-3:]:
            again = yield alice.callRemote(
                commands.SendMessage,
                conversation_id=conversation,
                client_msg_id=client_msg_id,
                body=body[client_msg_id],
            )
            self.assertEqual(again, answered[client_msg_id])
        # one committed before the kill but never answered comes back as it was stored
        for client_msg_id, sent in resent.items():
            if client_msg_id in stored:
                self.assertEqual((sent["message_id"], sent["seq"]), stored[client_msg_id])
        final = {**answered, **resent}
        self.assertEqual(len(final), COUNT)
        self.assertEqual(sorted(a["seq"] for a in final.values()), list(range(1, COUNT + 1)))
        self.assertEqual(len({a["message_id"] for a in final.values()}), COUNT)

        bob = yield self.login(port, "bob")
        try:
            yield bob.wait_for_delivers(COUNT)
        except WaitTimeout:
            self.fail(f"bob got {len(bob.delivered())} of {COUNT} messages: {bob.summary()}")
        yield alice.callRemote(
            commands.SendMessage, conversation_id=conversation, client_msg_id="last", body="last"
        )
        yield bob.wait_for_body("last")
        # every message exactly once, in seq order, as alice's answers said
        self.assertEqual(bob.seqs(), list(range(1, COUNT + 2)))
        expected = sorted(
            (a["seq"], a["message_id"], body[client_msg_id]) for client_msg_id, a in final.items()
        )
        self.assertEqual(
            [(d["seq"], d["message_id"], d["body"]) for d in bob.delivered()[:COUNT]], expected
        )

        bob.transport.loseConnection()
        alice.transport.loseConnection()
        yield defer.gatherResults([bob.lost, alice.lost])
        process.signalProcess("TERM")
        yield daemon.ended
        self.assertNotIn(b"Traceback", daemon.output)
        with sqlite3.connect(self.database) as db:
            self.assertEqual(db.execute("PRAGMA integrity_check").fetchall(), [("ok",)])
            self.assertEqual(db.execute("SELECT COUNT(*) FROM messages").fetchone()[0], COUNT + 1)
        db.close()

    @inlineCallbacks
    def test_kill_and_restart_loop(self):
        """Three rounds of send, kill -9 mid-stream, restart, resend: every message once, none lost."""
        process, daemon, port, alice, conversation = yield self.alice_and_bob()
        answered, unanswered = {}, []
        for round_ in range(3):
            ids = [f"r{round_}-{i:02d}" for i in range(40)]

            def send(client_msg_id, client=alice):
                sent = client.callRemote(
                    commands.SendMessage, conversation_id=conversation, client_msg_id=client_msg_id, body=client_msg_id
                )
                sent.addCallbacks(
                    lambda answer, i=client_msg_id: answered.__setitem__(i, answer),
                    lambda failure, i=client_msg_id: failure.trap(ConnectionClosed) and unanswered.append(i),
                )
                return sent

            sends = [send(i) for i in ids[:30]]  # 30 in flight at once
            yield sends[10 + 5 * round_]  # kill at a different point each round
            process.signalProcess("KILL")
            yield daemon.ended
            if alice.transport is not None:
                alice.transport.abortConnection()
            yield defer.DeferredList(sends, consumeErrors=True)
            process, daemon = self.spawn()
            port = yield daemon.listening
            alice = yield self.login(port, "alice")
            for client_msg_id in list(unanswered) + ids[30:]:  # resend what had no answer, then more
                answered[client_msg_id] = yield alice.callRemote(
                    commands.SendMessage, conversation_id=conversation, client_msg_id=client_msg_id, body=client_msg_id
                )
            unanswered.clear()
        stored = self.stored(conversation)
        self.assertEqual(len(answered), 120)
        for client_msg_id, answer in answered.items():
            self.assertEqual(stored[client_msg_id], (answer["message_id"], answer["seq"]))
        self.assertEqual(sorted(seq for _, seq in stored.values()), list(range(1, 121)))
        bob = yield self.login(port, "bob")
        yield bob.wait_for_delivers(120)
        self.assertEqual(bob.seqs(), list(range(1, 121)))
        process.signalProcess("TERM")
        yield daemon.ended
        with sqlite3.connect(self.database) as db:
            self.assertEqual(db.execute("PRAGMA integrity_check").fetchall(), [("ok",)])
        db.close()
