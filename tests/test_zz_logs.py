"""Last of the run (trial runs modules by name): the log of the whole run holds no secret."""

import os

from twisted.internet import task
from twisted.trial import unittest

from securechatd import commands
from tests.helpers import Connection, make_hub
from tests.test_audit import BODY, PASSWORD


class NoSecretsInLogsTests(unittest.TestCase):
    """Passwords and bodies the tests use never appear in trial's log of the run."""

    SECRETS = (
        PASSWORD,
        "correct horse battery",
        "another password",
        "a new password",
        "hello bob",
        "from phone",
        "slow to show",
        BODY,
    )

    def test_trial_log_of_the_run(self):
        hub = make_hub(self, clock=task.Clock())
        conn = Connection(hub)
        self.successResultOf(conn.call(commands.Register, username="zed", password=PASSWORD))
        self.failureResultOf(conn.call(commands.Login, username="zed", password="wrong " + PASSWORD))
        self.successResultOf(conn.call(commands.Register, username="zoe", password=PASSWORD))
        self.successResultOf(conn.call(commands.Login, username="zed", password=PASSWORD))
        created = self.successResultOf(conn.call(commands.CreateConversation, members=["zoe"]))
        self.successResultOf(
            conn.call(
                commands.SendMessage, conversation_id=created["conversation_id"], client_msg_id="1", body=BODY
            )
        )
        log_path = os.path.join(os.getcwd(), "test.log")  # trial's log, in its _trial_temp
        with open(log_path, encoding="utf-8", errors="replace") as log:
            text = log.read()
        self.assertIn("login failed for zed", text)  # the log did get this test's events
        for secret in self.SECRETS:
            self.assertNotIn(secret, text)
