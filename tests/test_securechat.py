"""`securechat` against `twistd -n securechatd`, as people and scripts run them, both running the tree under test."""

import json
import os
import socket

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.trial import unittest

from securechatd.certs import write_certs
from tests.helpers import SECURECHAT, V1_CONFIG, environment, spawn_daemon, wall_now

PASSWORD = "correct horse battery"
TIMEOUT = 30


class ClientProcess(ProcessProtocol):
    """One securechat run: `keys` are typed at the start, output is collected, `ended` fires with the exit code."""

    def __init__(self, keys, close_stdin=True):
        self.keys = keys
        self.close_stdin = close_stdin
        self.out = b""
        self.err = b""
        self.ended = Deferred()
        self._watching = []

    def connectionMade(self):
        self.transport.write(self.keys.encode())
        if self.close_stdin:
            self.transport.closeStdin()

    def outReceived(self, data):
        self.out += data
        for watch in list(self._watching):
            if watch[0]():
                self._watching.remove(watch)
                watch[1].callback(None)

    def errReceived(self, data):
        self.err += data

    def processEnded(self, reason):
        self.ended.callback(reason.value.exitCode)

    def records(self):
        return [json.loads(line) for line in self.out.decode().splitlines()]

    def when(self, predicate):
        """Deferred firing once predicate() holds (checked as output arrives)."""
        seen = Deferred()
        if predicate():
            seen.callback(None)
        else:
            self._watching.append((predicate, seen))
        return seen.addTimeout(TIMEOUT, reactor)

    def when_shown(self, text):
        return self.when(lambda: text.encode() in self.out)


def events(records, kind):
    return [r for r in records if r["event"] == kind]


def new_directory(testcase):
    directory = os.path.abspath(testcase.mktemp())
    os.makedirs(directory)
    return directory


@inlineCallbacks
def own_daemon(testcase, directory, config):
    """The tree's twistd in `directory`, with `config` (INI text) and a certificate for the name localhost
    only (so 127.0.0.1 is a wrong host name): (daemon, port)."""
    path = os.path.join(directory, "securechatd.ini")
    with open(path, "w") as f:
        f.write(config)
    write_certs(os.path.join(directory, "certs"), ["localhost"], now=wall_now())
    _, daemon = spawn_daemon(testcase, reactor, path, directory)
    return daemon, (yield daemon.listening)



class BatchDaemonCase(unittest.TestCase):
    """A daemon of its own with the defaults (plaintext refused), and `securechat --batch` processes,
    each of its own installation. `more_config()` adds to the daemon's INI file, `server_config` to its
    [server] section."""

    PASSWORD = "correct horse battery"
    server_config = ""

    def more_config(self):
        return ""

    @inlineCallbacks
    def setUp(self):
        self.directory = new_directory(self)
        config = f"[server]\nport = 0\n{self.server_config}[accounts]\nbcrypt_cost = 10\n{self.more_config()}"
        self.daemon, self.port = yield own_daemon(self, self.directory, config)

    def securechat(self, keys, installation="alice", close_stdin=False, arguments=(), password=True):
        """A `securechat --batch` typing `keys`, with its own XDG_DATA_HOME; input stays open unless `close_stdin`;
        `arguments`: more of its command line; without `password`, no SECURECHAT_PASSWORD (it is asked)."""
        client = ClientProcess(keys, close_stdin=close_stdin)
        home = os.path.join(self.directory, installation)
        os.makedirs(home, exist_ok=True)
        process = reactor.spawnProcess(
            client,
            SECURECHAT,
            [SECURECHAT, "--host", "localhost", "--port", str(self.port), "--ca", "certs/ca.pem", "--batch", *arguments],
            env=dict(environment(), XDG_DATA_HOME=home, **({"SECURECHAT_PASSWORD": self.PASSWORD} if password else {})),
            path=self.directory,
        )

        def stop():
            if not client.ended.called:
                process.signalProcess("KILL")
            return client.ended

        self.addCleanup(stop)
        return client

    def events(self, client, kind, **fields):
        return [r for r in client.records() if r["event"] == kind and all(r.get(k) == v for k, v in fields.items())]


class SecurechatTests(unittest.TestCase):
    @inlineCallbacks
    def setUp(self):
        self.directory = new_directory(self)
        self.daemon, self.port = yield own_daemon(
            self, self.directory, "[server]\nport = 0\n[accounts]\nbcrypt_cost = 10\n" + V1_CONFIG  # (version 1)
        )
        self.ca = os.path.join(self.directory, "certs", "ca.pem")

    def stop(self, process, ended):
        if not ended.called:
            process.signalProcess("KILL")
        return ended

    def tearDown(self):
        self.assertNotIn(b"Traceback", self.daemon.output)
        self.assertNotIn(PASSWORD.encode(), self.daemon.output)

    def securechat(self, *arguments, keys="", ca=None, port=None, env=None, pty=False, close_stdin=None):
        client = ClientProcess(keys, close_stdin=not pty if close_stdin is None else close_stdin)
        process = reactor.spawnProcess(
            client,
            SECURECHAT,
            [SECURECHAT, "--host", "localhost", "--port", str(port or self.port), "--ca", ca or self.ca, *arguments],
            env=dict(environment(), TERM="xterm", XDG_DATA_HOME=self.directory, **(env or {})),
            path=self.directory,
            usePTY=pty,
        )
        self.addCleanup(self.stop, process, client.ended)
        return client

    @inlineCallbacks
    def test_a_closed_output_pipe_ends_the_client(self):
        """`securechat --batch ... | head -1`: once no one reads the output, it exits (status 141, as SIGPIPE)."""
        client = self.securechat(
            "--batch", env={"SECURECHAT_PASSWORD": PASSWORD}, keys="/register carol\n", close_stdin=False
        )
        yield client.when(lambda: b"\n" in client.out)  # the first line, as head -1 reads it
        client.transport.closeChildFD(1)  # head exits; the input stays open
        code = yield client.ended.addTimeout(TIMEOUT, reactor)
        self.assertEqual(code, 141)

    @inlineCallbacks
    def test_two_people_talk(self):
        password_file = os.path.join(self.directory, "bob.password")
        with open(password_file, "w") as f:
            f.write(PASSWORD + "\n")
        bob = self.securechat(
            "--batch",
            "--password-file",
            password_file,
            keys="/register bob\n/wait deliver 1 20\n/open alice\n/read\nhi alice\n"
            "/status away back soon\n/wait receipt 2 20\n",
        )
        yield bob.when(lambda: any(r.get("command") == "login" for r in bob.records()))
        alice = self.securechat(
            "--batch",
            env={"SECURECHAT_PASSWORD": PASSWORD},
            keys="/register alice\n/dm bob hello bob\n/wait deliver 1 20\n/wait receipt 2 20\n"
            "/wait presence 1 20\n/who\n/read\n/receipts\n",
        )
        self.assertEqual((yield alice.ended), 0, alice.out + alice.err)
        self.assertEqual((yield bob.ended), 0, bob.out + bob.err)
        self.assertEqual((alice.err, bob.err), (b"", b""))
        alice_says, bob_says = alice.records(), bob.records()

        answers = events(alice_says, "answer")
        self.assertEqual(
            [a["command"] for a in answers],
            ["register", "login", "dm", "wait", "wait", "wait", "who", "read", "receipts", "quit"],
        )
        dm = answers[2]
        self.assertEqual((dm["conversation"], dm["created"], dm["body"]), ("bob", True, "hello bob"))
        hello = dm["message_id"]
        [reply] = events(alice_says, "deliver")
        self.assertEqual((reply["conversation"], reply["sender"], reply["body"]), ("bob", "bob", "hi alice"))
        self.assertEqual(
            [(r["username"], r["state"], r["message_ids"]) for r in events(alice_says, "receipt")],
            [("bob", "delivered", [hello]), ("bob", "read", [hello])],
        )
        self.assertEqual(
            (events(alice_says, "presence")[0]["username"], events(alice_says, "presence")[0]["status"]),
            ("bob", "away"),
        )
        self.assertEqual(
            answers[6]["presence"], [{"username": "bob", "status": "away", "note": "back soon", "last_seen": None}]
        )
        [row] = answers[8]["receipts"]
        self.assertEqual((answers[8]["message_id"], row["username"]), (hello, "bob"))
        self.assertIsNotNone(row["read_at"])

        answers = events(bob_says, "answer")
        self.assertEqual(
            [a["command"] for a in answers],
            ["register", "login", "wait", "open", "read", "say", "status", "wait", "quit"],
        )
        [new] = events(bob_says, "conversation")
        self.assertEqual((new["conversation"], new["kind"], new["change"]), ("alice", "direct", "new"))
        [hello_bob] = events(bob_says, "deliver")
        self.assertEqual((hello_bob["message_id"], hello_bob["sender"]), (hello, "alice"))
        self.assertEqual((answers[4]["seq"], answers[5]["body"]), (1, "hi alice"))
        self.assertEqual(
            [(r["username"], r["state"], r["message_ids"]) for r in events(bob_says, "receipt")],
            [("alice", "delivered", [answers[5]["message_id"]]), ("alice", "read", [answers[5]["message_id"]])],
        )

    @inlineCallbacks
    def test_at_a_terminal(self):
        carol = self.securechat("--plain", pty=True)  # the line-by-line client (the full-screen one: test_tui_pty)
        yield carol.when_shown("[-]> ")
        for keys, shown in [
            ("/register carol\r", "New password for carol: "),
            ("carol's password\r", "Again: "),
            ("carol's password\r", "logged in as carol"),
        ]:
            carol.transport.write(keys.encode())
            yield carol.when_shown(shown)
        alice = self.securechat(
            "--batch", env={"SECURECHAT_PASSWORD": PASSWORD}, keys="/register alice\n/dm carol hello carol\n/wait receipt 2\n"
        )
        carol.transport.write(b"hi ali")
        yield carol.when_shown("<alice> hello carol")
        yield carol.when_shown("[alice · 1 unread]> hi ali")
        carol.transport.write(b"ce\r/quit\r")
        self.assertEqual((yield carol.ended), 0)
        self.assertEqual((yield alice.ended), 0, alice.out)
        shown = carol.out.decode()
        self.assertIn("<carol> hi alice  (#2 sent)", shown)
        self.assertNotIn("carol's password", shown)
        self.assertNotIn("Traceback", shown)
        self.assertEqual(
            [(r["username"], r["state"]) for r in events(alice.records(), "receipt")],
            [("carol", "delivered"), ("carol", "read")],  # replying marked "hello carol" read
        )

    @inlineCallbacks
    def test_certificate_problem_before_any_password(self):
        other = os.path.join(self.directory, "other")
        write_certs(other, ["localhost"], ["127.0.0.1"], now=wall_now())
        wrong_ca = os.path.join(other, "ca.pem")
        refused = self.securechat("--batch", "--user", "alice", ca=wrong_ca, env={"SECURECHAT_PASSWORD": PASSWORD})
        self.assertEqual((yield refused.ended), 1)
        [error] = refused.records()
        self.assertEqual((error["event"], error["code"]), ("error", "CERTIFICATE"))
        self.assertEqual(
            error["message"],
            f"Certificate problem: the certificate of localhost:{self.port} is not signed by the CA in"
            f" {wrong_ca}, or it has expired.",
        )
        self.assertEqual(refused.err, b"")

        person = self.securechat("--user", "alice", ca=wrong_ca, env={"SECURECHAT_PASSWORD": PASSWORD})
        self.assertEqual((yield person.ended), 1)
        self.assertEqual(person.out, b"")
        self.assertEqual(person.err.decode().count("\n"), 1)
        self.assertTrue(person.err.startswith(b"securechat: Certificate problem: "))

        wrong_name = self.securechat("--user", "alice", "--host", "127.0.0.1", env={"SECURECHAT_PASSWORD": PASSWORD})
        self.assertEqual((yield wrong_name.ended), 1)
        self.assertEqual(
            wrong_name.err, b"securechat: Certificate problem: the server's certificate is not for 127.0.0.1.\n"
        )

        # A login the daemon does see, to show its log would have told.
        trusted = self.securechat("--batch", "--user", "alice", env={"SECURECHAT_PASSWORD": PASSWORD})
        self.assertEqual((yield trusted.ended), 1)
        self.assertEqual(trusted.records()[0]["code"], "BAD_CREDENTIALS")
        for _ in range(100):
            if b"login failed" in self.daemon.output:
                break
            yield task.deferLater(reactor, 0.1)
        self.assertEqual(self.daemon.output.count(b"login failed"), 1)

    @inlineCallbacks
    def test_no_server(self):
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            port = unused.getsockname()[1]
        client = self.securechat("--user", "alice", port=port)
        self.assertEqual((yield client.ended), 1)
        self.assertEqual(
            client.err.decode(), f"securechat: Cannot connect to localhost:{port}: refused; is securechatd running there?\n"
        )
