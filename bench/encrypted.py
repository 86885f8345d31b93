"""End-to-end encrypted traffic: `direct --encrypted` and `fanout --encrypted`.

The same shapes, pacing and figures as the plaintext workloads, in encrypted
conversations, so the two can be set side by side (same daemon settings:
`[messages] plaintext = allowed`, the rest as RAISED_LIMITS).

Set-up (never timed): every user gets a device (e2ee.keys.Device), logs in
bound to it (Resume with `device_id`) and publishes link 1 of its chain
(PublishChainLink); each conversation is created with `encrypted` true and
its creator publishes the signed epoch 1 (PublishMembership,
e2ee.membership.create). Then every sender's M envelopes are sealed ahead
with e2ee.envelope.seal: a real header (this conversation, the epoch 1
hash, the sender and its device, counters 1..M) and a real body (the
plaintext workload's body of the same size, "<sender> <seq> <time>",
padded to 256 bytes and encrypted: 272 bytes). Their SendEncrypted
arguments are AMP-encoded then too, so the measured phase costs the
generator no cryptography, and the daemon's CPU is all the daemon's own.

Wraps are stand-ins of a ratchet wrap's size (89 random bytes after the
type byte 1): the daemon checks a wrap's size and where it goes, never what
it holds (docs/PROTOCOL.md, SendEncrypted). The client's own cost of
sealing and opening is `python -m bench client-crypto` (client_crypto.py).

Receivers answer DeliverEncrypted at once. Latency is looked up by the
header bytes, which are unique per message (each carries its counter).
"""

import os
import time

from twisted.internet import defer
from twisted.protocols import amp

from bench.traffic import Traffic
from securechatd import commands
from securechatd.e2ee import chain, envelope, keys, membership

WRAP_BYTES = 89  # a type 1 (ratchet) wrap: what an established session sends
_WRAPS = amp.AmpList(commands.WRAP_ITEM)
SEALING = (
    "envelopes sealed and signed (attestable) in set-up with e2ee.envelope.seal (real header, body and signature,"
    " counters 1..M per device);"
    " wraps are random 89-byte stand-ins (the daemon checks sizes and recipients only)"
)


def make_devices(users):
    """A new device per user: {user: keys.Device}."""
    return {user: keys.Device.generate(user) for user in users}


async def publish_chains(clients, devices):
    """Link 1 of every user's chain, from the user's session (bound to that very device)."""
    await defer.gatherResults(
        [
            clients[user].callRemote(commands.PublishChainLink, link=chain.first(device, "bench").to_bytes())
            for user, device in devices.items()
        ]
    )


async def publish_epoch1(client, conversation_id, kind, title, others, device):
    """Epoch 1 of an encrypted conversation, signed by its creator's device; its hash (every header names it)."""
    state = membership.create(conversation_id, kind, title, others, device)
    await client.callRemote(commands.PublishMembership, conversation_id=conversation_id, membership=state.to_bytes())
    return state.hash()


def _stand_in_wrap(device, key, context):
    return b"\x01" + os.urandom(WRAP_BYTES - 1)


def preseal(device, conversation_id, members_hash, recipients, count, run_id, now):
    """SendEncrypted arguments (bytes, as callRemoteString takes them) of `count` envelopes from `device`.

    `recipients` are device ids (bytes); counters run 1..count; `now` (seconds, the reactor's) is the client time.
    """
    conversation = b"%d" % conversation_id
    client_time = int(now * 1000)
    prepared = []
    for seq in range(count):
        plaintext = f"{device.user} {seq} {time.perf_counter():.9f}".encode()  # as Traffic's plaintext bodies
        sealed = envelope.seal(
            plaintext, conversation_id, members_hash, device.user, device.id, seq + 1, client_time + seq,
            recipients, _stand_in_wrap, signer=device,  # attestable, as groups are by default: signed
        )
        wraps = [{"device_id": recipient.hex(), "wrap": wrap} for recipient, wrap in sealed.wraps.items()]
        prepared.append(
            {
                "conversation_id": conversation,
                "client_msg_id": f"{run_id}-{seq}".encode(),
                "header": sealed.header,
                "body": sealed.body,
                "wraps": _WRAPS.toStringProto(wraps, None),
                "signature": sealed.signature,
            }
        )
    return prepared


def envelope_figures(prepared, wraps_per_message):
    """The sizes of what one SendEncrypted carries (of the first prepared envelope)."""
    first = next(iter(prepared.values()))[0]
    return dict(
        header_bytes=len(first["header"]),
        body_bytes=len(first["body"]),
        wrap_bytes=WRAP_BYTES,
        wraps_per_message=wraps_per_message,
        sealing=SEALING,
    )


class EncryptedTraffic(Traffic):
    """Traffic whose senders send pre-sealed envelopes (SendEncrypted) and whose receivers get DeliverEncrypted.

    `prepared`: {sender: [SendEncrypted arguments, one per message]}; the rest as Traffic.
    """

    def __init__(self, clients, conversation, observer, recipients, messages, window, prepared):
        super().__init__(clients, conversation, observer, recipients, messages, window)
        self.prepared = prepared  # (their client_msg_ids were made with them)
        self.sent_by_header = {}  # header -> (sender, send time)

    def send(self, sender):
        seq = self.sent[sender]
        self.sent[sender] += 1
        self.outstanding[sender] += 1
        arguments = self.prepared[sender][seq]
        now = time.perf_counter()
        self.sent_by_header[arguments["header"]] = (sender, now)
        answer = self.clients[sender].callRemoteString(b"SendEncrypted", True, **arguments)
        answer.addCallbacks(self._answered, self._failed, callbackArgs=(now,), errbackArgs=(sender,))

    def _delivered(self, client, box):
        now = time.perf_counter()
        found = self.sent_by_header.get(box.get(b"header"))
        if found is None:
            self.foreign += 1  # not sent by this run
            return
        sender, sent_at = found
        self.send_times.append(sent_at)
        self.latencies.append(now - sent_at)
        self.delivered += 1
        if self.observer[sender] == client.user:
            self._free_slot(sender)
        self._check_done()
