"""End-to-end encryption as people run it: `securechat --batch` processes against `twistd -n securechatd`.

Three installations (alice; bob's laptop and, added later, bob's phone) hold
an encrypted conversation with receipts against a daemon with its default
settings; afterwards no message text is anywhere the server keeps things:
the database, its WAL, the daemon's log and the audit log.
"""

import glob
import json
import os

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks

from tests.test_securechat import TIMEOUT, BatchDaemonCase

SECRETS = ("the-first-secret-4f1c", "the-second-secret-9a2e", "a-reply-from-the-phone-77d0")


class EncryptedSessionTests(BatchDaemonCase):
    def more_config(self):
        self.audit = os.path.join(self.directory, "audit.jsonl")
        return f"[logging]\naudit_log = {self.audit}\n"

    def answered(self, client, command):
        return client.when(lambda: self.events(client, "answer", command=command))

    @inlineCallbacks
    def test_three_installations_talk_and_the_server_keeps_no_text(self):
        laptop = self.securechat(installation="bob-laptop", keys="/register bob\n")
        yield self.answered(laptop, "login")
        alice = self.securechat(installation="alice", keys=f"/register alice\n/dm bob {SECRETS[0]}\n")
        yield alice.when(lambda: self.events(alice, "answer", command="dm"))
        yield laptop.when(lambda: self.events(laptop, "deliver", body=SECRETS[0]))
        yield alice.when(lambda: self.events(alice, "receipt", state="delivered"))

        # bob's second installation: a new device, added from the laptop
        phone = self.securechat(installation="bob-phone", keys="/login bob\n/link\n")
        yield self.answered(phone, "link")
        [link] = self.events(phone, "answer", command="link")
        laptop.transport.write(f"/approve {link['request']}\n/devices\n".encode())
        yield self.answered(laptop, "devices")
        [devices] = self.events(laptop, "answer", command="devices")
        self.assertEqual(len(devices["devices"]), 2)
        phone.transport.write(b"/quit\n")  # (--batch does not reconnect: its next start binds the new device)
        yield phone.ended.addTimeout(TIMEOUT, reactor)
        phone = self.securechat(installation="bob-phone", keys="/login bob\n/link\n")
        yield phone.when(lambda: self.events(phone, "answer", command="link", linked=True))

        alice.transport.write(f"{SECRETS[1]}\n".encode())
        for device in (laptop, phone):
            yield device.when(lambda device=device: self.events(device, "deliver", body=SECRETS[1]))
        phone.transport.write(f"/open alice\n{SECRETS[2]}\n/read\n".encode())
        yield alice.when(lambda: self.events(alice, "deliver", body=SECRETS[2]))
        yield laptop.when(lambda: self.events(laptop, "deliver", body=SECRETS[2]))  # a copy to bob's other device
        yield alice.when(lambda: self.events(alice, "receipt", state="read", username="bob"))
        for client in (alice, laptop, phone):
            self.assertEqual(self.events(client, "alarm"), [], client.records())
            client.transport.write(b"/quit\n")
            code = yield client.ended.addTimeout(TIMEOUT, reactor)
            self.assertEqual(code, 0, client.err)
        self.assertEqual(self.events(alice, "answer", command="dm")[0]["conversation"], "bob")

        self.daemon_process_kept_no_text()

    def daemon_process_kept_no_text(self):
        kept = glob.glob(os.path.join(self.directory, "securechatd.sqlite*"))
        self.assertTrue(any(path.endswith("-wal") for path in kept) or kept, kept)
        places = {path: open(path, "rb").read() for path in kept + [self.audit]}
        places["the daemon's log"] = self.daemon.output
        for place, data in places.items():
            for secret in SECRETS:
                self.assertNotIn(secret.encode(), data, f"{secret} is in {place}")
        self.assertTrue(places[self.audit].strip())  # (the audit log was written: logins)
        json.loads(places[self.audit].splitlines()[0])
