"""A malicious-server double: an AMP-over-TLS man in the middle between real ChatClients and the real daemon.

TRUST.md §3 asks for "a loopback-TLS trial test with a malicious-server
double that forks, injects a device or member, replays, drops and
reorders". `MaliciousServer` is that double as a real network component:

- it listens on 127.0.0.1 and terminates the clients' TLS with the daemon's
  own certificate for "localhost" (from the certs directory of
  tests.helpers.start_daemon, signed by the CA the clients trust): whoever
  runs the server holds that key, so to a client the double *is* the server;
- for each client connection it opens its own TLS connection to the daemon
  (verifying it against the same CA) and relays AMP boxes both ways, parsed
  with twisted.protocols.amp's BinaryBoxProtocol;
- a test scripts attacks on what goes through: rewrite the answer to a
  command (`rewrite`), rewrite, drop or hold a push (`on_push`, `release`),
  push a box of its own (`inject`, `deliver`), replay what it recorded
  (`delivered`), all per connection (`Tap`: whose it is and which device it
  is bound to);
- it keeps every byte it received from either side (`transcript()`), so a
  test can check that a message's plaintext never crossed it.

With no rules it is a transparent relay: the clients work as against the
daemon itself. Being the server's database operator (writing rows into its
SQLite store) is the other half of the threat; tests do that through the
daemon's store directly.
"""

import itertools
import os

from twisted.internet import defer
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory
from twisted.protocols import amp
from twisted.python.failure import Failure

from securechatd import commands
from securechatd.e2ee import transcript
from securechatd.e2ee.encoding import enc
from securechatd.tls import client_options, server_options

COMMAND, ASK, ANSWER, ERROR = b"_command", b"_ask", b"_answer", b"_error"

DROP = "drop"  # on_push: the client never sees it (the daemon waits for its answer in vain)
HOLD = "hold"  # on_push: kept in MaliciousServer.held until release()

COMMANDS = {
    command.commandName: command
    for command in vars(commands).values()
    if isinstance(command, type) and issubclass(command, amp.Command) and command is not amp.Command
    and getattr(command, "commandName", None)
}


def parse_arguments(command, box):
    """A command box's arguments as the typed dict its responder would get."""
    return command.parseArguments(box, None)


def command_box(command, arguments, ask):
    """A command box of `command` with `arguments` (typed) and the tag `ask`."""
    box = command.makeArguments(arguments, None)
    box[COMMAND] = command.commandName
    box[ASK] = ask
    return box


class Push:
    """A command the daemon sent to a client (DeliverEncrypted, ConversationUpdated, ...), as the double saw it."""

    def __init__(self, tap, box):
        self.tap = tap
        self.box = box
        self.name = box[COMMAND].decode()
        self.command = COMMANDS.get(box[COMMAND])

    @property
    def arguments(self):
        return parse_arguments(self.command, self.box)

    def __repr__(self):
        return f"<Push {self.name} to {self.tap.username}>"


class _Leg(amp.BinaryBoxProtocol):
    """One side of a relayed connection: boxes in go to the Tap; every byte received is kept."""

    def __init__(self, tap, side):
        super().__init__(self)
        self.tap = tap
        self.side = side  # "client" or "server": who is at the other end
        self.lost = defer.Deferred()

    # IBoxReceiver (the leg is its own receiver)
    def startReceivingBoxes(self, sender):
        pass

    def ampBoxReceived(self, box):
        if self.side == "client":
            self.tap.from_client(box)
        else:
            self.tap.from_server(box)

    def stopReceivingBoxes(self, reason):
        pass

    def connectionMade(self):
        if self.side == "client":
            self.tap.client_connected(self)

    def dataReceived(self, data):
        self.tap.proxy.received[self.side].append(data)
        return super().dataReceived(data)

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.tap.leg_lost(self)
        self.lost.callback(None)


class Tap:
    """One client connection through the double, and its own connection to the daemon.

    `username` and `device_id` are known once the daemon answered a Login or
    Resume (device_id None: a session bound to no device).
    """

    def __init__(self, proxy):
        self.proxy = proxy
        self.client = None  # the _Leg to the client
        self.server = None  # the _Leg to the daemon
        self.waiting = []  # boxes from the client before the daemon's connection is up
        self.asked = {}  # tag -> (command class, request box) of the client's commands
        self.injected = {}  # tag -> Deferred: pushes of the double's own; the client's answer fires it
        self.username = None
        self.device_id = None
        self.closed = False
        self.connecting = None  # the Deferred of the connection to the daemon

    def __repr__(self):
        return f"<Tap {self.username} {self.device_id}>"

    # -- plumbing --------------------------------------------------------------

    def client_connected(self, leg):
        self.client = leg
        endpoint = wrapClientTLS(
            client_options(self.proxy.ca_path, "localhost"),
            TCP4ClientEndpoint(self.proxy.reactor, "127.0.0.1", self.proxy.daemon_port, timeout=10),
        )
        factory = Factory.forProtocol(lambda: _Leg(self, "server"))
        self.connecting = endpoint.connect(factory)
        self.connecting.addCallbacks(self._server_connected, self._server_failed)

    def _server_connected(self, leg):
        self.server = leg
        if self.closed:
            leg.transport.loseConnection()
            return
        waiting, self.waiting = self.waiting, []
        for box in waiting:
            leg.sendBox(box)

    def _server_failed(self, failure):
        if self.client is not None and self.client.transport is not None:
            self.client.transport.loseConnection()

    def leg_lost(self, leg):
        self.closed = True
        for other in (self.client, self.server):
            if other is not None and other is not leg and other.transport is not None:
                other.transport.loseConnection()
        for waiting in self.injected.values():
            if not waiting.called:
                waiting.errback(Failure(ConnectionError("the client's connection was lost")))
        self.injected.clear()

    def to_server(self, box):
        if self.server is None:
            self.waiting.append(box)
        elif self.server.transport is not None:
            self.server.sendBox(box)

    def to_client(self, box):
        if self.client is not None and self.client.transport is not None:
            self.client.sendBox(box)

    # -- what goes through -----------------------------------------------------

    def from_client(self, box):
        tag = box.get(ANSWER, box.get(ERROR))
        if tag is not None and tag in self.injected:  # the client's answer to a push of ours: not the daemon's
            waiting = self.injected.pop(tag)
            if ERROR in box:
                waiting.errback(Failure(commands.ChatError(box.get(b"_error_description", b"").decode())))
            else:
                waiting.callback(box)
            return
        if COMMAND in box:
            command = COMMANDS.get(box[COMMAND])
            self.asked[box[ASK]] = (command, box)
            self.proxy.requests.append((self, command, box))
            for rule in list(self.proxy.request_rules):
                box = rule(self, command, box)
                if box is None:
                    return
        self.to_server(box)

    def from_server(self, box):
        if COMMAND in box:
            self.proxy.push_received(self, Push(self, box))
            return
        tag = box.get(ANSWER, box.get(ERROR))
        command, request = self.asked.pop(tag, (None, None))
        if command in (commands.Login, commands.Resume) and ANSWER in box:
            self.username = box[b"username"].decode()
            device = request.get(b"device_id")
            self.device_id = device.decode() if device else None
        if ANSWER in box and command is not None:
            for command_rule, rewrite in list(self.proxy.answer_rules):
                if command_rule is command:
                    answer = command.parseResponse(box, None)
                    changed = rewrite(self, parse_arguments(command, request), answer)
                    if changed is DROP:
                        return
                    if changed is not None:
                        box = command.makeResponse(changed, None)
                        box[ANSWER] = tag
        self.to_client(box)

    def inject(self, command, **arguments):
        """Push a command of the double's own to the client: a Deferred of the client's answer box."""
        tag = b"mitm-%d" % next(self.proxy.tags)
        answered = self.injected[tag] = defer.Deferred()
        self.to_client(command_box(command, arguments, tag))
        return answered


class MaliciousServer:
    """The double in front of the daemon at 127.0.0.1:`daemon_port`, whose certs directory holds ca.pem.

    Rules (all empty at first, so it relays honestly; honest() empties them):

    - `rewrite(command, f)`: the daemon's answers to `command` go through
      `f(tap, request arguments, answer)` (typed dicts); `f` returns the
      answer to give instead, None to leave it, or DROP;
    - `on_push(f)`: each push of the daemon goes through `f(push)`, which
      returns None (forward it), DROP, HOLD (keep it in `held` until
      `release(push)`), or a dict of arguments to forward instead (the same
      tag: the client's answer still reaches the daemon);
    - `on_request(f)`: each command of a client goes through
      `f(tap, command, box)`, which returns the box to forward or None.

    `pushes` lists every push the daemon sent (Push), whatever became of it;
    `requests` every command of a client, as (tap, command, box).
    """

    def __init__(self, reactor, daemon_port, ca_path):
        self.reactor = reactor
        self.daemon_port = daemon_port
        self.ca_path = ca_path
        self.certs = os.path.dirname(ca_path)
        self.taps = []
        self.pushes = []
        self.requests = []  # (tap, command, box) of every command a client sent
        self.held = []
        self.received = {"client": [], "server": []}  # every byte received from the clients and from the daemon
        self.request_rules, self.answer_rules, self.push_rules = [], [], []
        self.tags = itertools.count(1)
        self.port = None
        self._listening = None

    @defer.inlineCallbacks
    def start(self):
        """Listen on 127.0.0.1 (a free port, then in `port`)."""
        endpoint = SSL4ServerEndpoint(self.reactor, 0, server_options(self.certs), interface="127.0.0.1")
        self._listening = yield endpoint.listen(Factory.forProtocol(self._accept))
        self.port = self._listening.getHost().port
        return self

    def _accept(self):
        tap = Tap(self)
        self.taps.append(tap)
        return _Leg(tap, "client")

    def stop(self):
        """Stop listening and close every relayed connection; fires when all are closed."""
        waiting = [self._listening.stopListening()] if self._listening is not None else []
        for tap in self.taps:
            if tap.connecting is not None and not tap.connecting.called:
                tap.connecting.cancel()
            for leg in (tap.client, tap.server):
                if leg is not None:
                    if leg.transport is not None and not leg.lost.called:
                        leg.transport.loseConnection()
                    waiting.append(leg.lost)
        return defer.DeferredList(waiting)

    # -- rules -----------------------------------------------------------------

    def rewrite(self, command, rewrite):
        self.answer_rules.append((command, rewrite))
        return rewrite

    def on_push(self, rule):
        self.push_rules.append(rule)
        return rule

    def on_request(self, rule):
        self.request_rules.append(rule)
        return rule

    def honest(self):
        """Drop every rule: relay as is from now on."""
        del self.request_rules[:], self.answer_rules[:], self.push_rules[:]

    def push_received(self, tap, push):
        self.pushes.append(push)
        for rule in list(self.push_rules):
            action = rule(push)
            if action is DROP:
                return
            if action is HOLD:
                self.held.append(push)
                return
            if action is not None:
                push = Push(tap, command_box(push.command, action, push.box[ASK]))
        tap.to_client(push.box)

    def release(self, push):
        """Give a held push to its client now (its answer goes to the daemon, as if it had never been held)."""
        self.held.remove(push)
        push.tap.to_client(push.box)

    # -- looking things up -----------------------------------------------------

    def tap_of(self, client):
        """The open connection of a ChatClient, by the user and device it is logged in as."""
        for tap in reversed(self.taps):
            if tap.username == client.username and tap.device_id == client.device_id and not tap.closed:
                return tap
        raise LookupError(f"no open connection of {client.username} ({client.device_id}) through the double")

    def delivered(self, client=None, conversation_id=None):
        """The DeliverEncrypted pushes the daemon sent (to `client`, in `conversation_id`), as Push objects."""
        found = []
        for push in self.pushes:
            if push.command is not commands.DeliverEncrypted:
                continue
            if client is not None and (push.tap.username, push.tap.device_id) != (client.username, client.device_id):
                continue
            if conversation_id is not None and push.arguments["conversation_id"] != conversation_id:
                continue
            found.append(push)
        return found

    def sent(self, client, command=commands.SendEncrypted):
        """The arguments (typed) of every `command` that `client` sent through the double, in order."""
        return [
            parse_arguments(command, box)
            for tap, asked, box in self.requests
            if asked is command and (tap.username, tap.device_id) == (client.username, client.device_id)
        ]

    def deliver(self, client, **arguments):
        """Push a DeliverEncrypted of the double's own (typed arguments) to `client`: Deferred of its answer."""
        return self.tap_of(client).inject(commands.DeliverEncrypted, **arguments)

    def transcript(self):
        """Every byte the double received, from the clients and from the daemon (inside TLS: AMP boxes)."""
        return b"".join(self.received["client"]) + b"".join(self.received["server"])


class ChainForger:
    """Shows some clients another history of one conversation, as a server whose operator holds its key can.

    Each link the `victims` (ChatClients) are given goes through
    `change(link)` (a transcript.Link; return it, or another one at the same
    n), the chain's e is recomputed over the changed links, and every head
    they are given is signed again with the server's own key `key` (an
    Ed25519PrivateKey): in GetChain answers, DeliverEncrypted links and
    receipts, the receipts of their SendEncrypted, PublishMembership and
    PublishMode, and the links of HistoryEncrypted. To them the forged chain
    is as well signed as the real one is to the others.

    It learns the daemon's real links from everything that crosses the double
    (install() it, and learn_from() a client, before the links it will need
    pass), so a head at n can be made once links 1..n went by.
    """

    def __init__(self, proxy, key, conversation, victims, change=lambda link: link):
        self.proxy = proxy
        self.key = key
        self.conversation = conversation
        self.victims = {(client.username, client.device_id) for client in victims}
        self.change = change
        self.real = {}  # n -> transcript.Link, as the daemon gave it
        self.forging = True

    def install(self):
        for command in (commands.SendEncrypted, commands.PublishMembership, commands.PublishMode):
            self.proxy.rewrite(command, self._receipt_answer)
        self.proxy.rewrite(commands.GetChain, self._chain_answer)
        self.proxy.rewrite(commands.HistoryEncrypted, self._history_answer)
        self.proxy.on_push(self._push)
        return self

    def learn_from(self, client):
        """Deferred: the links so far, learned from a GetChain `client` asks through the double."""
        return client.call(commands.GetChain, conversation_id=self.conversation, after_n=0)

    def _victim(self, tap):
        return self.forging and (tap.username, tap.device_id) in self.victims

    # -- the forged chain --------------------------------------------------------------------

    def learn(self, data):
        link = transcript.Link.from_bytes(data)
        if link.conversation == self.conversation:
            self.real[link.n] = link
        return link

    def forged(self, n):
        if n not in self.real:
            raise LookupError(f"the forger has not seen link {n} of conversation {self.conversation}")
        return self.change(self.real[n])

    def e(self, n):
        e = transcript.genesis(self.conversation)
        for k in range(1, n + 1):
            e = transcript.next_hash(e, self.forged(k))
        return e

    def head(self, n):
        return transcript.sign_head(self.key, self.conversation, n, self.e(n)).to_bytes()

    def receipt(self, m, h):
        """A receipt for forged link m: the forged links m..h and a head at h signed over them."""
        return enc([self.head(h)] + [self.forged(n).to_bytes() for n in range(m, h + 1)])

    def _forge_receipt(self, data):
        receipt = transcript.Receipt.from_bytes(data)
        for link in receipt.links:
            self.learn(link.to_bytes())
        if receipt.head.conversation != self.conversation:
            return data
        return self.receipt(receipt.links[0].n, receipt.head.n)

    # -- rules -------------------------------------------------------------------------------

    def _receipt_answer(self, tap, request, answer):
        if not answer.get("receipt") or request.get("conversation_id") != self.conversation:
            if answer.get("receipt"):
                self._forge_receipt(answer["receipt"])  # (learn the links)
            return None
        forged = self._forge_receipt(answer["receipt"])
        return dict(answer, receipt=forged) if self._victim(tap) else None

    def _chain_answer(self, tap, request, answer):
        for data in answer["links"]:
            self.learn(data)
        if request["conversation_id"] != self.conversation or not self._victim(tap):
            return None
        links = [transcript.Link.from_bytes(data) for data in answer["links"]]
        heads = [transcript.Head.from_bytes(data).n for data in answer["heads"]]
        top = max(self.real)
        return dict(
            answer,
            links=[self.forged(link.n).to_bytes() for link in links],
            heads=[self.head(n) for n in heads if n <= top],
        )

    def _history_answer(self, tap, request, answer):
        for item in answer["messages"]:
            if item.get("link"):
                self.learn(item["link"])
        if request["conversation_id"] != self.conversation or not self._victim(tap):
            return None
        return dict(
            answer,
            messages=[
                dict(item, link=self.forged(transcript.Link.from_bytes(item["link"]).n).to_bytes())
                if item.get("link") else item
                for item in answer["messages"]
            ],
        )

    def _push(self, push):
        if push.command is not commands.DeliverEncrypted:
            return None
        arguments = push.arguments
        if arguments.get("link"):
            self.learn(arguments["link"])
        receipt = self._forge_receipt(arguments["receipt"]) if arguments.get("receipt") else None
        if arguments["conversation_id"] != self.conversation or not self._victim(push.tap):
            return None
        link = transcript.Link.from_bytes(arguments["link"])
        return dict(arguments, link=self.forged(link.n).to_bytes(), receipt=receipt)
