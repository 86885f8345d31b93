"""Verifiable conversations as people run them: `securechat --batch` processes against `twistd -n securechatd`.

Three users hold an attestable group conversation (messages, read receipts
that are signed transcript heads, /sign), one of them writes it out with
/export, and securechatd-verify, a process of its own, accepts the file; the
same with a deniable conversation: no signatures, and the report says so.
"""

import os
import stat
import sys
from datetime import datetime, timezone

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue

from securechatd.client import ui
from tests.helpers import environment
from tests.test_securechat import TIMEOUT, BatchDaemonCase



class ExportedSessionTests(BatchDaemonCase):
    def more_config(self):
        return "[privacy]\ninvitations = off\n"  # (strangers put in a group at once, as before invitations)

    def answered(self, client, command):
        return client.when(lambda: self.events(client, "answer", command=command))

    @inlineCallbacks
    def verify(self, path):
        """(exit status, report) of `python -m securechatd.verify FILE` run on its own."""
        out, err, status = yield getProcessOutputAndValue(
            sys.executable, ["-m", "securechatd.verify", path], env=environment(), path=self.directory
        ).addTimeout(TIMEOUT, reactor)
        return status, (out + err).decode()

    @inlineCallbacks
    def people(self, *names):
        clients = []
        for name in names:
            client = self.securechat(installation=name, keys=f"/register {name}\n")
            yield self.answered(client, "login")
            clients.append(client)
        return clients

    @inlineCallbacks
    def test_an_attestable_group_exported_passes_securechatd_verify(self):
        alice, bob, carol = yield self.people("alice", "bob", "carol")
        alice.transport.write(b'/group "Friday plans" bob carol\n/convs\nShall we ship on Friday?\n')
        yield self.answered(alice, "say")
        [convs] = self.events(alice, "answer", command="convs")
        self.assertEqual([row["mode"] for row in convs["conversations"]], ["attestable"])
        for client, text in ((bob, "Yes: Friday, 10:00."), (carol, "Fine by me.")):
            yield client.when(lambda client=client: self.events(client, "deliver", body="Shall we ship on Friday?"))
            client.transport.write(f"/open Friday plans\n{text}\n/read\n".encode())
            yield self.answered(client, "read")
        [delivered] = self.events(bob, "deliver", body="Shall we ship on Friday?")
        self.assertEqual((delivered["mode"], delivered["chain"]), ("attestable", "verified"))
        signers = lambda: {r["username"] for r in self.events(alice, "transcript_signed", verified=True)}  # noqa: E731
        yield alice.when(lambda: signers() == {"bob", "carol"})
        self.assertIn("read by bob, transcript verified up to #", self.securechat_text(alice))
        alice.transport.write(b"/wait deliver 2\n/sign\n/export minutes.bundle\n")
        yield self.answered(alice, "export")
        [exported] = self.events(alice, "answer", command="export")
        self.assertEqual((exported["messages"], exported["disclosed"]), (3, [1, 2, 3]))
        path = os.path.join(self.directory, "minutes.bundle")
        self.assertEqual(exported["file"], path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        status, report = yield self.verify(path)
        self.assertEqual(status, 0, report)
        self.assertIn("OK: every check passed.", report)
        self.assertIn("Signed: seq 1, 2, 3.", report)
        self.assertIn('disclosed: "Yes: Friday, 10:00."', report)
        for client in (alice, bob, carol):
            self.assertEqual(self.events(client, "alarm"), [], client.records())
        with open(path, "rb") as f:
            data = bytearray(f.read())
        data[data.index(b'"links"') + 20] ^= 1
        broken = os.path.join(self.directory, "changed.bundle")
        with open(broken, "wb") as f:
            f.write(bytes(data))
        status, report = yield self.verify(broken)
        self.assertEqual(status, 1, report)

    @inlineCallbacks
    def test_a_deniable_conversation_shows_no_signatures_and_says_so(self):
        alice, bob = yield self.people("alice", "bob")
        alice.transport.write(b"/dm bob\n/mode deniable\nthis stays between us\n")
        yield self.answered(alice, "say")
        [mode] = self.events(alice, "answer", command="mode")
        self.assertEqual((mode["mode"], mode["changed"]), ("deniable", True))
        yield bob.when(lambda: self.events(bob, "deliver", body="this stays between us"))
        [delivered] = self.events(bob, "deliver")
        self.assertEqual((delivered["mode"], delivered["chain"]), ("deniable", "verified"))
        bob.transport.write(b"/open alice\n/mode\n/export\n/sign\n")  # (the error ends the --batch run)
        yield bob.when(lambda: self.events(bob, "error", command="sign"))
        [shown] = self.events(bob, "answer", command="mode")
        self.assertEqual((shown["mode"], shown["changed"]), ("deniable", False))
        [refused] = self.events(bob, "error", command="sign")
        self.assertEqual(refused["code"], "DENIABLE")
        [exported] = self.events(bob, "answer", command="export")
        self.assertTrue(os.path.basename(exported["file"]).startswith("securechat-"))
        status, report = yield self.verify(exported["file"])
        self.assertEqual(status, 0, report)
        self.assertIn("deniable, NOT signed", report)
        self.assertIn("This bundle does not prove who wrote it", report)
        self.assertNotIn("Signed: seq", report)

    def securechat_text(self, client):
        """What a person would have read of `client`'s records (ui.render of each)."""
        lines = []
        for record in client.records():
            for key in ("at", "sent_at"):
                if isinstance(record.get(key), str):
                    record[key] = datetime.fromisoformat(record[key])
            lines += ui.render(record, datetime.now(timezone.utc))
        return "\n".join(lines)

