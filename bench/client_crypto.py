"""`python -m bench client-crypto`: what sealing and opening a message costs the client, in process CPU.

No daemon and no network: the e2ee modules alone, called as
securechatd/client/crypto.py calls them. One sender device (alice) has an
established Session (session.Session: X3DH with a one-time prekey, then a
message each way, so its wraps are type 1, 89 bytes) with each of the
recipient devices. Figures are microseconds of this process's CPU
(time.process_time) per message, averaged over --iterations messages;
each run builds new devices and sessions; the last line holds the medians
and ranges of the runs.

- `seal_<N>_us`: e2ee.envelope.seal of one message (the plaintext bench's
  ~28-byte body) for N recipient devices: a fresh key K, header, padded
  body, and N wraps, each one Session.encrypt.
- `seal_<N>_sessions_us`: the same plus what ChatClient does around it for
  every recipient: Session.from_bytes before and to_bytes after (the device
  file keeps sessions as bytes).
- `open_us`: Header.from_bytes, then envelope.unseal with the recipient's
  Session.decrypt (wrap, key commitment, body, padding), for a message in
  the same sending chain as the one before it (a symmetric ratchet step).
- `open_after_reply_us`: the first message after the recipient replied,
  which takes the Double Ratchet's DH step (a new X25519 key, two DH).
- `open_sessions_us`: `open_us` plus Session.from_bytes and to_bytes.
- `sign_us`: envelope.sign_message, the sender device's Ed25519 signature of
  an attestable message; `check_signature_us`: a receiver's check of it.
- `link_us`: what the daemon does per message for the conversation's chain
  (the item hash, the link's bytes and e_n); `head_sign_us`: one server
  head signature (the daemon signs one per conversation per store batch).
- `check_receipt_us`: a receiver's check of a message's receipt (one link
  recomputed, the server's head signature verified).

The device's state with H messages of history (`--history`): a device file
holding 20 sessions, the keys of H messages read and the chain of their
conversation, verified up to its link H (so it keeps the e_n of the newest
min(H, E_KEPT) links), as a client in use for a while holds it.

- `save_<H>_cpu_us` / `save_<H>_wall_us`: one DeviceFile.save (encode, write,
  fsync, rename, fsync of the directory) of that state.
- `receive_<H>_cpu_us` / `receive_<H>_wall_us`: what keeping one received
  message costs the state, as client/crypto.py and client/transcripts.py do
  it (the cryptography is left out: `open_sessions_us`): its session, replay
  window and key recorded and saved, then its link taken into the chain and
  saved again.
- `send_<H>_cpu_us` / `send_<H>_wall_us`: the same for a message sent: the
  session and counter saved after sealing, its key kept when the server's
  answer names it, then its link taken into the chain and saved.
- `load_<H>_cpu_us` / `load_<H>_wall_us`: reading it at start, as
  EndToEnd.load does (the device file and its log, the chains' windows).
- `save_<H>_file_bytes`: what the state holds on disk after those messages
  (every file of it).
- `compact_<H>_cpu_us` / `compact_<H>_wall_us`: the first save after a load,
  which compacts the device log if it is worth it (`compact_<H>_generation`
  1: it was; 0: it was not, and this is a plain save);
  `load_compacted_<H>_cpu_us` / `_wall_us` and `compacted_<H>_file_bytes`:
  reading it at start again, and what is on disk, after that.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from types import SimpleNamespace

import cryptography
from cryptography.hazmat.backends.openssl.backend import backend as openssl_backend
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.measure import cpu_ticks
from securechatd.client.device_file import ACTIVE, DeviceFile, ReplayWindow
from securechatd.client.transcripts import Transcripts
from securechatd.e2ee import envelope, keys, transcript, x3dh
from securechatd.e2ee.session import NewSession, Session

CONVERSATION = 7
MEMBERS = bytes(range(32))  # a membership state's hash; its value does not change the work


def parser():
    p = argparse.ArgumentParser(prog="python -m bench client-crypto", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=counts, default=(1, 20), help="recipient device counts to seal for (1,20)")
    p.add_argument("--iterations", type=int, default=300, help="messages per figure per run (300)")
    p.add_argument("--history", type=counts, default=(0, 1000, 10000),
                   help="messages of history of the device whose state is timed (0,1000,10000); empty: none")
    p.add_argument("--saves", type=int, default=20,
                   help="device file saves, and messages received and sent, per history size per run (20)")
    p.add_argument("--repeat", type=int, default=5, help="runs (5), each with new devices and sessions")
    p.add_argument("--directory", default=None, help="where the device files are written (a temporary directory)")
    return p


def counts(text):
    try:
        values = tuple(int(part) for part in text.split(",") if part)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of counts: {text!r}")
    if any(value < 0 for value in values):
        raise argparse.ArgumentTypeError(f"a negative count: {text!r}")
    return values


def plaintext(seq):
    """The plaintext bench's body: "<sender> <seq> <time>"."""
    return f"alice {seq} {time.perf_counter():.9f}".encode()


class Peer:
    """A recipient device with its prekeys, and the established sessions between it and the sender."""

    def __init__(self, sender, user):
        self.device = keys.Device.generate(user)
        spk = self.device.new_signed_prekey()
        [opk] = self.device.new_one_time_prekeys(1)
        bundle = x3dh.Bundle(self.device.keys, spk.id, spk.public, spk.signature, opk.id, opk.public)
        self.outgoing = Session()  # the sender's session with this device
        self.outgoing.initiate(sender.keys, sender.dh_private, bundle)
        self.incoming = Session()  # this device's session with the sender
        context = b"first"
        first = self.outgoing.encrypt(b"\x00" * 32, context)
        try:
            self.incoming.decrypt(first, context)
        except NewSession:
            self.incoming.accept(
                self.device.keys, self.device.dh_private, sender.keys, first, context,
                lambda spk_id: spk.private if spk_id == spk.id else None,
                lambda opk_id: opk.private if opk_id == opk.id else None,
            )
        reply = self.incoming.encrypt(b"\x00" * 32, b"reply")
        self.outgoing.decrypt(reply, b"reply")  # established: the sender's wraps are type 1 from now on


class Run:
    def __init__(self, recipients, clock):
        self.clock = clock  # headers' client time
        self.sender = keys.Device.generate("alice")
        self.peers = [Peer(self.sender, f"user{i}") for i in range(recipients)]  # sealed for, never open
        self.reader = Peer(self.sender, "reader")  # opens what is sealed for it alone, in order
        self.by_id = {peer.device.id: peer for peer in self.peers + [self.reader]}
        self.counter = 0

    def seal(self, devices, wrap):
        self.counter += 1
        return envelope.seal(
            plaintext(self.counter), CONVERSATION, MEMBERS, "alice", self.sender.id, self.counter,
            int(self.clock.seconds() * 1000), devices, wrap,
        )

    def seal_live(self, count=None):
        """Sealed for the first `count` peers (None: for the reader alone) with the live sessions."""
        devices = [self.reader.device.id] if count is None else [peer.device.id for peer in self.peers[:count]]
        return self.seal(devices, lambda device, key, context: self.by_id[device].outgoing.encrypt(key, context))

    def seal_saved(self, count, saved):
        """As ChatClient: each recipient's session from bytes, then back to bytes."""
        devices = [peer.device.id for peer in self.peers[:count]]
        sessions = {device: Session.from_bytes(saved[device]) for device in devices}
        sealed = self.seal(devices, lambda device, key, context: sessions[device].encrypt(key, context))
        for device, session in sessions.items():
            saved[device] = session.to_bytes()
        return sealed

    def open(self, peer, sealed, session=None):
        """The plaintext of `sealed` for `peer`, as ChatClient opens it (the header parsed first)."""
        session = session or peer.incoming
        header = envelope.Header.from_bytes(sealed.header)
        return envelope.unseal(
            header, sealed.body, sealed.wraps[peer.device.id], peer.device.id,
            lambda wrap, context, check: session.decrypt(wrap, context, check),
        )

    def reply(self, peer):
        """The peer answers the sender (untimed): the sender's next message starts a new ratchet chain."""
        context = b"reply-%d" % self.counter
        peer.outgoing.decrypt(peer.incoming.encrypt(b"\x00" * 32, context), context)


def per_message(work, iterations):
    """Process CPU per call of work(i) in microseconds."""
    started = time.process_time()
    for i in range(iterations):
        work(i)
    return (time.process_time() - started) / iterations * 1e6


def measure_run(args, directory, clock):
    run = Run(max(args.devices + (20,)), clock)
    first = run.seal_live(max(args.devices + (1,)))
    wrap_sizes = sorted({len(wrap) for wrap in first.wraps.values()})
    if wrap_sizes != [89]:
        raise RuntimeError(f"the sessions are not established: wraps of {wrap_sizes} bytes")
    result = {"wrap_bytes": 89, "header_bytes": len(first.header), "body_bytes": len(first.body)}
    for count in args.devices:
        result[f"seal_{count}_us"] = round(per_message(lambda _: run.seal_live(count), args.iterations), 1)
        saved = {peer.device.id: peer.outgoing.to_bytes() for peer in run.peers[:count]}
        result[f"seal_{count}_sessions_us"] = round(
            per_message(lambda _: run.seal_saved(count, saved), args.iterations), 1
        )
        for peer in run.peers[:count]:
            peer.outgoing = Session.from_bytes(saved[peer.device.id])  # carry on from where the saved ones are

    peer = run.reader
    run.reply(peer)
    run.open(peer, run.seal_live())  # the DH step of the new chain, untimed
    batch = [run.seal_live() for _ in range(args.iterations)]
    result["open_us"] = round(per_message(lambda i: run.open(peer, batch[i]), args.iterations), 1)

    saved = peer.incoming.to_bytes()
    batch = [run.seal_live() for _ in range(args.iterations)]

    def open_saved(i):
        nonlocal saved
        session = Session.from_bytes(saved)
        run.open(peer, batch[i], session)
        saved = session.to_bytes()

    result["open_sessions_us"] = round(per_message(open_saved, args.iterations), 1)
    peer.incoming = Session.from_bytes(saved)

    spent = 0.0
    for _ in range(args.iterations):
        run.reply(peer)
        sealed = run.seal_live()
        started = time.process_time()
        run.open(peer, sealed)
        spent += time.process_time() - started
    result["open_after_reply_us"] = round(spent / args.iterations * 1e6, 1)

    result.update(verifiable_figures(run, args.iterations))

    for history in args.history:
        result.update(state_figures(run, directory, history, args.saves))
    return result


class History:
    """A device with `history` messages read in one conversation: its device file, chain and the server behind it."""

    def __init__(self, run, path, history):
        self.server = Ed25519PrivateKey.generate()
        self.server_key = self.server.public_key().public_bytes_raw()
        self.state = DeviceFile(path, keys.Device.generate("bob"), ACTIVE)
        for other in run.peers[:20]:
            self.state.sessions[other.device.user, other.device.id] = other.outgoing.to_bytes()
        self.peer = ("alice", run.sender.id)
        self.session = run.peers[0].outgoing.to_bytes()  # (its size is what counts: the bytes of a session)
        self.state.replay[self.peer] = ReplayWindow()
        self.state.server_key = self.server_key
        self.transcripts = Transcripts(self)  # (it reads `state` of its EndToEnd when it starts)
        self.chain = self.transcripts.get(CONVERSATION)
        self.position = self.chain.position
        self.chain.absorb(*self.links(history), self.server_key)
        for seq in range(1, history + 1):
            self.state.keep_key(seq, os.urandom(32), CONVERSATION, seq, self.peer, seq)
        self.transcripts._keep(self.chain)
        self.state.save()

    def links(self, count):
        """The server's next `count` message links, and a head over the last."""
        made = []
        for _ in range(count):
            n = self.position.n + 1
            made.append(transcript.Link(CONVERSATION, n, 1000 + n, "message", n, os.urandom(32)))
            self.position = self.position.after(made[-1])
        return made, [transcript.sign_head(self.server, CONVERSATION, self.position.n, self.position.e)] * bool(made)

    def take_link(self, links, heads):
        """Its link taken into the chain and saved (Transcripts.check, Transcripts.sent)."""
        self.chain.absorb(links, heads, self.server_key)
        self.transcripts._keep(self.chain)
        self.state.save()

    def receive(self, links, heads):
        """EndToEnd._open's bookkeeping of one message opened, then its link (Transcripts.check)."""
        seq = self.position.n
        self.state.sessions[self.peer] = self.session
        self.state.replay[self.peer].record(seq)
        self.state.keep_key(seq, os.urandom(32), CONVERSATION, seq, self.peer, seq)
        self.state.save()
        self.take_link(links, heads)

    def send(self, links, heads):
        """EndToEnd._seal's save, EndToEnd.sent's (the key: appended to the device log), then its link."""
        self.state.counter += 1
        self.state.sessions[self.peer] = self.session
        self.state.save()
        self.state.keep_key(self.position.n, os.urandom(32), CONVERSATION, self.position.n)
        self.state.save_log()
        self.take_link(links, heads)


def state_figures(run, directory, history, count):
    """The device's state with `history` messages read: one save, a message received, a message sent (CPU, wall)."""
    own = tempfile.mkdtemp(dir=directory)  # (each run's files alone: a compacted run leaves another log name)
    kept = History(run, os.path.join(own, f"bob-{history}.device"), history)
    figures = {}

    def timed(name, work, link=True):
        cpu = wall = 0.0
        for _ in range(count):
            batch = kept.links(1) if link else ()  # (the server's work, untimed)
            started_cpu, started_wall = time.process_time(), time.perf_counter()
            work(*batch)
            cpu += time.process_time() - started_cpu
            wall += time.perf_counter() - started_wall
        figures[f"{name}_{history}_cpu_us"] = round(cpu / count * 1e6, 1)
        figures[f"{name}_{history}_wall_us"] = round(wall / count * 1e6, 1)

    timed("save", kept.state.save, link=False)
    timed("receive", kept.receive)
    timed("send", kept.send)
    timed("load", lambda: Transcripts(SimpleNamespace(state=DeviceFile.load(kept.state.path))), link=False)
    figures[f"save_{history}_file_bytes"] = on_disk(kept.state.path)
    figures.update(compaction_figures(kept.state.path, history))
    timed("load_compacted", lambda: Transcripts(SimpleNamespace(state=DeviceFile.load(kept.state.path))), link=False)
    figures[f"compacted_{history}_file_bytes"] = on_disk(kept.state.path)
    return figures


def on_disk(path):
    """Bytes of the device file at `path` and every file beside it named after it (its log)."""
    directory, base = os.path.split(path)
    names = [name for name in os.listdir(directory) if name.startswith(base)]
    return sum(os.path.getsize(os.path.join(directory, name)) for name in names)


def compaction_figures(path, history):
    """The first save after a load, as the client's claim() does it: it compacts the log if that is worth it."""
    state = DeviceFile.load(path)
    started_cpu, started_wall = time.process_time(), time.perf_counter()
    state.save()
    cpu, wall = time.process_time() - started_cpu, time.perf_counter() - started_wall
    state.log.close()
    return {
        f"compact_{history}_cpu_us": round(cpu * 1e6, 1),
        f"compact_{history}_wall_us": round(wall * 1e6, 1),
        f"compact_{history}_generation": state.log.generation,
    }


def verifiable_figures(run, iterations):
    """Issue 12's costs per message: signing and checking a message, the daemon's chain link and head, a receipt."""
    sealed = [run.seal_live() for _ in range(iterations)]
    headers = [envelope.Header.from_bytes(one.header) for one in sealed]
    signatures = []
    figures = {
        "sign_us": per_message(
            lambda i: signatures.append(envelope.sign_message(run.sender, headers[i], sealed[i].body)), iterations
        )
    }
    keys_of_sender = run.sender.keys
    figures["check_signature_us"] = per_message(
        lambda i: envelope.check_signature(headers[i], sealed[i].body, signatures[i], keys_of_sender), iterations
    )
    links, e = [], [transcript.genesis(CONVERSATION)]

    def link(i):  # as store/links.py places a message's link
        item = transcript.message_item(sealed[i].header, sealed[i].body, signatures[i])
        links.append(transcript.Link(CONVERSATION, i + 1, 1000 + i, "message", i + 1, item))
        e.append(transcript.next_hash(e[-1], links[-1]))
        links[-1].to_bytes()

    figures["link_us"] = per_message(link, iterations)
    positions = [transcript.Position(CONVERSATION), *transcript.Position(CONVERSATION).extend(links)]
    server = Ed25519PrivateKey.generate()
    heads = []
    figures["head_sign_us"] = per_message(
        lambda i: heads.append(transcript.sign_head(server, CONVERSATION, i + 1, positions[i + 1].e)), iterations
    )
    receipts = [transcript.receipt_bytes(heads[i].to_bytes(), [links[i].to_bytes()]) for i in range(iterations)]
    public = server.public_key().public_bytes_raw()
    figures["check_receipt_us"] = per_message(
        lambda i: transcript.check_receipt(transcript.Receipt.from_bytes(receipts[i]), positions[i], public),
        iterations,
    )
    return {name: round(value, 1) for name, value in figures.items()}


def cpu_model():
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def main(argv=None):
    args = parser().parse_args(argv)
    if args.iterations < 1 or args.repeat < 1 or args.saves < 1:
        sys.exit("bench client-crypto: --iterations, --repeat and --saves must be at least 1")
    from twisted.internet import reactor as clock  # (not run: only its clock, as everywhere else)

    directory = tempfile.mkdtemp(prefix="bench-client-crypto-", dir=args.directory)
    environment = dict(
        started_at=datetime.fromtimestamp(clock.seconds(), timezone.utc).isoformat(timespec="seconds"),
        load_average_1m_at_start=round(os.getloadavg()[0], 2),
        cpus=os.cpu_count(),
        cpu_model=cpu_model(),
        python=platform.python_version(),
        cryptography=cryptography.__version__,
        openssl=openssl_backend.openssl_version_text(),
        iterations=args.iterations,
        saves=args.saves,
    )
    runs = []
    try:
        for number in range(args.repeat):
            ticks = cpu_ticks()
            figures = measure_run(args, directory, clock)
            steal, total = (now - then for now, then in zip(cpu_ticks(), ticks))
            figures["host_steal_pct"] = round(100 * steal / total, 1) if total else None
            runs.append(figures)
            print(json.dumps({"workload": "client-crypto", "run": number + 1, **figures, **environment}), flush=True)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    numeric = [key for key, value in runs[0].items() if isinstance(value, (int, float)) and value is not None]
    summary = {
        "workload": "client-crypto",
        "summary": f"median of {len(runs)} runs",
        "runs": len(runs),
        **{key: round(statistics.median(r[key] for r in runs), 1) for key in numeric},
        "ranges": {key: [min(r[key] for r in runs), max(r[key] for r in runs)] for key in numeric},
        **environment,
    }
    if len(runs) > 1:
        print(json.dumps(summary), flush=True)
    return 0
