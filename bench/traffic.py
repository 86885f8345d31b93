"""Message traffic between logged-in bench clients, with xmpp_load's flow control.

Each sender keeps at most `window` messages outstanding. A message stops
being outstanding when a designated *observer* receives it: the partner in
the 1:1 workload, the next member of the group in the fan-out workload
(securechatd sends no copy back to the sending session, so the sender cannot
pace itself on its own echo as it does in a Prosody room). In closed-loop
mode that delivery sends the sender's next message at once; in paced mode a
per-sender timer sends whenever the window has room.

Bodies are "<sender> <seq> <t_send>" (about 25 bytes); latency is receive
time minus t_send, both `time.perf_counter()` of this one process.
"""

import os
import time
from collections import Counter

from twisted.internet.defer import Deferred

from bench.clients import error_code


class Traffic:
    def __init__(self, clients, conversation, observer, recipients, messages, window, closed_loop=True):
        """
        clients: {user: BenchClient}; conversation: {sender: conversation id};
        observer: {sender: user whose Deliver frees a window slot};
        recipients: copies the server delivers per message (to members other than the sender);
        messages: per sender (closed loop), or None for as many as the timers send.
        """
        self.clients = clients
        self.conversation = {s: b"%d" % c for s, c in conversation.items()}
        self.observer = observer
        self.recipients = recipients
        self.messages = messages
        self.window = window
        self.closed_loop = closed_loop
        self.sent = Counter()
        self.outstanding = Counter()
        self.send_times, self.latencies, self.answer_latencies = [], [], []
        self.delivered = 0
        self.answered = 0
        self.foreign = 0
        self.errors = Counter()
        self.done = Deferred()
        self.run_id = os.urandom(4).hex()  # (sender, client_msg_id) is an idempotency key
        for client in clients.values():
            client.on_deliver = self._delivered

    @property
    def expected_deliveries(self):
        return (sum(self.sent.values()) - sum(self.errors.values())) * self.recipients

    def start(self):
        """Closed loop: every sender sends its first `window` messages."""
        for sender in self.conversation:
            for _ in range(min(self.window, self.messages)):
                self.send(sender)

    def send(self, sender):
        seq = self.sent[sender]
        self.sent[sender] += 1
        self.outstanding[sender] += 1
        now = time.perf_counter()
        body = f"{sender} {seq} {now:.9f}".encode()
        answer = self.clients[sender].send_message(
            self.conversation[sender], f"{self.run_id}-{seq}".encode(), body
        )
        answer.addCallbacks(self._answered, self._failed, callbackArgs=(now,), errbackArgs=(sender,))

    def send_if_room(self, sender):
        """Paced mode's timer tick: True if a message went out."""
        if self.outstanding[sender] < self.window and not self.clients[sender].lost:
            self.send(sender)
            return True
        return False

    def _answered(self, box, sent_at):
        self.answered += 1
        self.answer_latencies.append(time.perf_counter() - sent_at)
        self._check_done()

    def _failed(self, failure, sender):
        self.errors[error_code(failure)] += 1
        self._free_slot(sender)
        self._check_done()

    def _delivered(self, client, box):
        now = time.perf_counter()
        sender, _, sent_at = box[b"body"].split(b" ")
        sender = sender.decode()
        if sender not in self.observer:
            self.foreign += 1  # left pending by an earlier run on a reused server
            return
        sent_at = float(sent_at)
        self.send_times.append(sent_at)
        self.latencies.append(now - sent_at)
        self.delivered += 1
        if self.observer[sender] == client.user:
            self._free_slot(sender)
        self._check_done()

    def _free_slot(self, sender):
        self.outstanding[sender] -= 1
        if (
            self.closed_loop
            and self.sent[sender] < self.messages
            and not self.done.called  # finished or timed out
            and not self.clients[sender].lost
        ):
            self.send(sender)

    def _check_done(self):
        everything_sent = self.messages is not None and all(
            self.sent[s] >= self.messages for s in self.conversation
        )
        if (
            everything_sent
            and not self.done.called
            and self.delivered >= self.expected_deliveries
            and self.answered + sum(self.errors.values()) >= sum(self.sent.values())
        ):
            self.done.callback(None)
