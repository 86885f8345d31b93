"""`library`: the daemon's CPU per message sent by the real client library, encrypted or (--plaintext) not.

The `--encrypted` workloads send envelopes sealed ahead, so they measure the
daemon's cost of SendEncrypted and DeliverEncrypted alone. A real client
(securechatd.client.library.ChatClient with its device) asks the server for
more around every message: the membership state, the members' device
chains, the conversation's chain, prekey bundles for new sessions, ...
This workload measures what the daemon spends on all of that, per message,
and counts the commands the clients sent, so a change to the client's
habits (e.g. fetching fewer chains per seal) shows in both.

Set-up (not timed): K users with seeded accounts, each one ChatClient with
its own device directory under a temporary directory, logged in with the
password (a first login on a new installation binds the session to a new
device and publishes its chain and prekeys; a resumed one could not bind
it); the first user creates an encrypted group of all K through the
library (which publishes the signed epoch 1) and every member waits to
see it. Then (not timed) every user sends --warm messages (default 1), so
every pairwise session exists and every chain was fetched: the figures are
those of a conversation under way (`--warm 0` keeps first contact in them,
spread over M). Measured: every user sends M messages, one at a time (each
send's answer awaited), all users at once, until every member has opened
every other member's messages (on_deliver with a body). The clients'
cryptography and device-file writes run in this process on the same
machine: a run whose client_cpu_s nears wall_s is client-bound, but the
server's CPU per message is still its own.

`--plaintext`: the same, in a plaintext group (the bench daemon allows
them): SendMessage and Deliver, for the encrypted figures' baseline with
the same clients and pacing.
"""

import shutil
import tempfile
from collections import Counter

from twisted.internet import defer

from bench.clients import sleep
from bench.daemon import PASSWORD
from bench.measure import Meter
from bench.workloads import wait_until
from securechatd.client.library import ChatClient, ClientProtocol

SETUP_TIMEOUT = 60  # seconds for each set-up step


class CommandCounter:
    """Counts the commands every ChatClient sends and the pushes it gets, while `on` (the measured phase).

    Every call of the library goes through ClientProtocol.callRemote and every
    push through its locateResponder, so both are wrapped on the class while
    the counter is in use (`with`); securechatd itself is not changed.
    """

    def __init__(self):
        self.sent, self.pushed, self.on = Counter(), Counter(), False

    def __enter__(self):
        assert "callRemote" not in vars(ClientProtocol), "ClientProtocol.callRemote is wrapped already"
        call_remote, locate = ClientProtocol.callRemote, ClientProtocol.locateResponder

        def counted_call(protocol, command, *args, **kwargs):
            if self.on:
                self.sent[command.commandName.decode()] += 1
            return call_remote(protocol, command, *args, **kwargs)

        def counted_push(protocol, name):
            if self.on:
                self.pushed[name.decode()] += 1
            return locate(protocol, name)

        ClientProtocol.callRemote, ClientProtocol.locateResponder = counted_call, counted_push
        return self

    def __exit__(self, *exc_info):
        del ClientProtocol.callRemote, ClientProtocol.locateResponder


async def within(reactor, deferred, seconds, what):
    """`deferred`'s result, or RuntimeError naming `what` after `seconds`."""
    try:
        return await deferred.addTimeout(seconds, reactor)
    except defer.TimeoutError:
        raise RuntimeError(f"timed out after {seconds} s: {what}") from None


class Member:
    """One user's ChatClient and what it opened of the group's messages."""

    def __init__(self, reactor, target, user, directory):
        self.user = user
        self.client = ChatClient(
            target.host, target.port, target.ca, hostname="localhost", reactor=reactor,
            client_name=user, state_directory=directory, reconnect=False,  # (a lost connection fails the run)
        )
        self.group = None
        self.conversations = set()  # ids of the conversations ConversationUpdated told of
        self.opened = set()  # (sender, body) of the group's messages from others
        self.problems = 0  # messages that could not be opened
        self.alarms = Counter()
        self.client.on_deliver = self._delivered
        self.client.on_conversation = lambda conversation: self.conversations.add(conversation.conversation_id)
        self.client.on_alarm = lambda kind, user, detail: self.alarms.update([str(kind)])
        self.on_opened = lambda: None

    def _delivered(self, message):
        if message.conversation_id != self.group or message.sender == self.user:
            return
        if message.body is None:
            self.problems += 1
        else:
            self.opened.add((message.sender, message.body))
        self.on_opened()


async def library(reactor, target, p):
    """K ChatClients in one group; each sends M, one at a time; the daemon's CPU and the commands, per message."""
    if p.k < 2:
        raise ValueError("library needs k >= 2")
    users = [f"library{i}" for i in range(p.k)]
    await target.seed(reactor, users)
    await target.start(reactor)
    directory = tempfile.mkdtemp(prefix="securechatd-bench-devices-")
    members = [Member(reactor, target, user, directory) for user in users]
    try:
        with CommandCounter() as counter:
            return await _measure(reactor, target, p, members, counter)
    finally:
        await defer.DeferredList([member.client.close() for member in members])
        shutil.rmtree(directory, ignore_errors=True)


async def _measure(reactor, target, p, members, counter):
    creator, others = members[0], members[1:]
    await within(reactor, defer.gatherResults([m.client.connect() for m in members]), SETUP_TIMEOUT, "connecting")
    await within(
        reactor, defer.gatherResults([m.client.login(m.user, PASSWORD) for m in members]), SETUP_TIMEOUT,
        "password logins (each publishes its device chain and prekeys)",
    )
    encrypted = not p.plaintext
    unbound = {m.user: m.client.encryption_problem for m in members if m.client.encryption_problem}
    if unbound and encrypted:
        raise RuntimeError(f"no usable device after login: {unbound}")
    created = creator.client.create_conversation([m.user for m in others], title="bench", encrypted=encrypted)
    group, _ = await within(reactor, created, SETUP_TIMEOUT, "creating the group")
    for m in members:
        m.group = group
    await wait_until(
        reactor, lambda: all(group in m.conversations for m in others), SETUP_TIMEOUT, "every member to see the group"
    )
    await sleep(reactor, 1.0)  # (the members' checks of the new group's signed membership, in the background)

    async def round_of(first, count, timeout, what):
        """Every member sends messages first..first+count-1; until every other member opened them all."""
        expected = len(members) * (len(members) - 1) * (first + count)
        everything_opened = defer.Deferred()

        def opened():
            if sum(len(m.opened) + m.problems for m in members) >= expected and not everything_opened.called:
                everything_opened.callback(None)

        async def send_all(member):
            for i in range(first, first + count):
                await member.client.send_message(group, f"{member.user} {i}")

        for m in members:
            m.on_opened = opened
        sends = defer.gatherResults([defer.Deferred.fromCoroutine(send_all(m)) for m in members], consumeErrors=True)
        try:
            await within(reactor, defer.gatherResults([sends, everything_opened]), timeout, what)
        except RuntimeError as problem:
            opened_now = sum(len(m.opened) for m in members)
            raise RuntimeError(f"{problem}: {opened_now} of {expected} deliveries opened") from None

    await round_of(0, p.warm, SETUP_TIMEOUT, "the warm-up messages")
    counter.on = True
    meter = Meter(target.pid)
    meter.start()
    await round_of(p.warm, p.m, p.timeout, "the measured phase")
    figures = meter.stop(len(members) * p.m)
    counter.on = False

    sent = len(members) * p.m
    expected = len(members) * (len(members) - 1) * p.m
    delivered = sum(len(m.opened) for m in members) - len(members) * (len(members) - 1) * p.warm
    if figures.get("server_cpu_s"):
        figures["per_message_server_cpu_ms"] = round(1000 * figures["server_cpu_s"] / sent, 3)
    return dict(
        k=len(members),
        m=p.m,
        encrypted=encrypted,
        warm_up=p.warm,
        messages_sent=sent,
        deliveries_received=delivered,
        deliveries_expected=expected,
        undecryptable=sum(m.problems for m in members),
        alarms=dict(sum((m.alarms for m in members), Counter())),
        commands_per_message={name: round(n / sent, 3) for name, n in sorted(counter.sent.items())},
        pushes_per_message={name: round(n / sent, 3) for name, n in sorted(counter.pushed.items())},
        setup=(
            "accounts seeded as for the other workloads; one securechatd.client.library.ChatClient each with a"
            " new device; password logins (bound to the device, which publishes its chain and prekeys);"
            f" {p.warm} message(s) from each before the measured phase"
        ),
        **figures,
    )
