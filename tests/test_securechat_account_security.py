"""The rest of issue 13 as people run it: `securechat --batch` processes against `twistd -n securechatd`.

Invitations (the daemon's default, on) to an encrypted group, completed by the inviter's device; privacy
settings; mutual TLS with the right certificate, another account's, another CA's and none (a certificate
from `securechatd-admin certs --client USER`); the account log checked with /security and exported for
`securechatd-verify-log`.
"""

import os
import stat
import sys

from twisted.internet.defer import inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue

from securechatd.certs import write_certs, write_client_cert
from tests.helpers import BIN, environment, wall_now
from tests.test_client_twofactor_e2e import SecurechatCase


class AccountSecurityCase(SecurechatCase):
    @inlineCallbacks
    def refused(self, client, command, code, text):
        """`client` stops at its one error: `command` answered `code`, and its message says `text`."""
        yield self.ended(client, 1)
        [error] = self.events(client, "error")
        self.assertEqual((error["command"], error["code"]), (command, code))
        self.assertIn(text, error["message"])


class InvitationSecurechatTests(AccountSecurityCase):
    @inlineCallbacks
    def test_a_stranger_is_invited_accepts_and_is_added_by_the_inviters_device(self):
        carol = self.securechat("/register carol\n", installation="carol")
        yield self.answered(carol, "login")
        alice = self.securechat('/register alice\n/group "Team lunch" carol\n', installation="alice")
        yield self.answered(alice, "group")
        [group] = self.events(alice, "answer", command="group")
        self.assertEqual((group["members"], group["invited"]), (["alice"], ["carol"]))
        yield carol.when(lambda: self.events(carol, "invited"))
        [invited] = self.events(carol, "invited")
        self.assertEqual((invited["inviter"], invited["title"], invited["encrypted"]), ("alice", "Team lunch", True))
        number = invited["conversation_id"]

        alice.transport.write(b"/wait invitation_accepted\n")
        carol.transport.write(f"/invitations\n/accept {number}\n/wait conversation\n".encode())
        yield self.answered(alice, "wait")
        [accepted] = self.events(alice, "invitation_accepted")
        self.assertEqual((accepted["username"], accepted["added"]), ("carol", True))
        yield self.answered(carol, "wait")
        [listed] = self.events(carol, "answer", command="invitations")
        self.assertEqual([(i["conversation_id"], i["accepted"]) for i in listed["invitations"]], [(number, False)])
        [answer] = self.events(carol, "answer", command="accept")
        self.assertEqual((answer["conversation"], answer["joined"]), ("Team lunch", False))
        self.assertEqual(self.events(carol, "conversation")[0]["members"], ["alice", "carol"])

        carol.transport.write(b"/open #%d\nthanks alice\n/accept 999\n" % number)
        yield alice.when(lambda: self.events(alice, "deliver", body="thanks alice"))
        yield self.refused(carol, "accept", "NO_SUCH_INVITATION", "You have no invitation to #999")

    @inlineCallbacks
    def test_privacy_settings(self):
        alice = self.securechat(
            "/register alice\n/privacy\n/privacy appear-offline on\n/privacy hide-last-seen on\n"
            "/privacy appear-offline off\n/privacy hide-last-seen\n",
            close_stdin=True,
        )
        yield self.refused(alice, "privacy", "USAGE", "/privacy hide-last-seen on")
        answers = [(a["hide_last_seen"], a["appear_offline"]) for a in self.events(alice, "answer", command="privacy")]
        self.assertEqual(answers, [(False, False), (False, True), (True, True), (True, False)])


class ClientCertificateSecurechatTests(AccountSecurityCase):
    server_config = "client_certificates = required\n"

    @inlineCallbacks
    def setUp(self):
        yield super().setUp()
        for name in ("alice", "bob"):
            out, err, code = yield getProcessOutputAndValue(
                os.path.join(BIN, "securechatd-admin"),
                ["certs", "--dir", "certs", "--client", name],
                env=environment(),
                path=self.directory,
            )
            self.assertEqual(code, 0, (out, err))

    def as_user(self, name, directory="certs"):
        return ("--cert", f"{directory}/{name}.pem", "--key", f"{directory}/{name}.key")

    @inlineCallbacks
    def test_the_right_certificate_logs_in(self):
        alice = self.securechat("/register alice\n/quit\n", arguments=self.as_user("alice"))
        yield self.ended(alice)
        self.assertEqual(len(self.events(alice, "answer", command="login", username="alice")), 1)

    @inlineCallbacks
    def test_another_accounts_certificate_is_refused(self):
        yield self.ended(self.securechat("/register alice\n/quit\n", arguments=self.as_user("alice")))
        bob = self.securechat("/login alice\n", arguments=self.as_user("bob"))
        yield self.refused(bob, "login", "NOT_ALLOWED", "client certificate is for another account")

    @inlineCallbacks
    def test_no_certificate_or_another_cas_is_refused_clearly(self):
        other = os.path.join(self.directory, "other")
        write_certs(other, ["localhost"], now=wall_now())
        write_client_cert(other, "alice", now=wall_now())
        for arguments, text in (
            ((), "The server requires a client certificate: give yours with --cert FILE --key FILE"),
            (self.as_user("alice", "other"), "The server refused your client certificate (tlsv1 alert unknown ca)"),
        ):
            client = self.securechat("/login alice\n", arguments=arguments)
            yield self.ended(client, 1)
            error = self.events(client, "error")[0]
            self.assertEqual(error["code"], "TLS_REFUSED", error)
            self.assertIn(text, error["message"])

    @inlineCallbacks
    def test_a_missing_certificate_file_or_key(self):
        missing = self.securechat("/login alice\n", arguments=("--cert", "certs/carol.pem", "--key", "certs/carol.key"))
        yield self.refused(
            missing,
            "connect",
            "CERTIFICATE",
            "cannot read certs/carol.pem: No such file or directory (--cert and --key name your client certificate",
        )
        alone = self.securechat("/login alice\n", arguments=("--cert", "certs/alice.pem"))
        yield self.ended(alone, 1)
        self.assertIn(b"--cert and --key go together", alone.err)


class SecuritySecurechatTests(AccountSecurityCase):
    @inlineCallbacks
    def test_the_account_log_is_verified_and_exported_for_the_verifier(self):
        first = self.securechat("/register alice\n/quit\n")
        yield self.ended(first)
        alice = self.securechat("/login alice\n/endsessions\n/security\n/security export alice-log.json\n/quit\n")
        yield self.ended(alice)
        shown, exported = self.events(alice, "answer", command="security")
        self.assertEqual((shown["verified"], shown["problem"], shown["file"]), (True, None, None))
        kinds = [e["kind"] for e in shown["events"]]
        self.assertEqual(kinds, ["login", "device_add", "login", "sessions_end_others"])
        self.assertEqual(shown["events"][3]["signed"], "yes")  # (checked against the device's key in its chain)
        self.assertEqual(shown["events"][2]["address"], "127.0.0.1")
        self.assertEqual(len(shown["events"][1]["device"]), 32)  # (the device that signed its chain link)
        self.assertTrue(exported["verified"])
        self.assertGreaterEqual(exported["tree_size"], shown["tree_size"])
        path = os.path.join(self.directory, "alice-log.json")
        self.assertEqual(exported["file"], path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        state = os.path.join(self.directory, "alice", "securechat", f"localhost-{self.port}", "alice.account-log.json")
        self.assertTrue(os.path.exists(state))  # (beside the device file: the next check starts from its head)
        out, err, code = yield getProcessOutputAndValue(
            sys.executable, ["-m", "securechatd.verify_log", path], env=environment(), path=self.directory
        )
        self.assertEqual(code, 0, (out, err))
        self.assertIn(b"verified: 4 events of alice", out)

    @inlineCallbacks
    def test_security_before_logging_in_says_why(self):
        alice = self.securechat("/security\n", close_stdin=True)
        yield self.refused(alice, "security", "AUTH_REQUIRED", "Log in first")
