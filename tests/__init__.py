"""trial tests for securechatd, one module per module of the package.

Importing this package (trial does, in each worker of `trial -j N`) starts a
watch over every log event of the run: an event that carries one of the
passwords or message bodies the tests use, or a secret a test made and
watches while it runs (a TOTP secret, a recovery code, a code typed: see
SecretWatch.watch), fails the test that was running, whatever order the
tests run in.
"""

import re

from twisted.logger import Logger, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

# Passwords and message bodies the tests send: none may reach a log event.
SECRETS = (
    "correct horse battery",
    "another password",
    "a new password",
    "a fresh password",
    "not the password",
    "wrong password",
    "wrong guess",
    "guess number 1",
    "audit test password 7d1c",
    "audit test body 93fe",
    "hello bob",
    "from phone",
    "slow to show",
)


class SecretInLog(Exception):
    """A log event carried a test's password or message body; says which, with the secrets blanked out."""


class SecretWatch:
    """A log observer for the whole run that finds secrets in events.

    It reads what any log observer could write: the formatted text, every
    text field (a JSON log writes fields the format leaves out) and the
    traceback of a failure. An event with a secret is logged again as a
    SecretInLog failure, which trial reports as an error of the test running
    at the time; `leaks` keeps every description, `checked` counts events.
    """

    def __init__(self, secrets):
        self.secrets = secrets
        self.leaks = []
        self.checked = 0
        self._log = Logger(namespace=__name__ + ".SecretWatch")
        self._dynamic = {}  # secrets a test made while it runs (a TOTP secret, codes) -> their pattern

    def watch(self, *secrets):
        """Watch for `secrets` too (made at run time: TOTP secrets, recovery codes, typed codes) until
        `forget`; each matches only as a whole word, so a 6-digit code is not found inside a longer
        number or a hex id."""
        for secret in secrets:
            self._dynamic[secret] = re.compile(r"(?<![0-9A-Za-z])" + re.escape(secret) + r"(?![0-9A-Za-z])")

    def forget(self, *secrets):
        for secret in secrets:
            self._dynamic.pop(secret, None)

    def __call__(self, event):
        if event.get("log_namespace") == self._log.namespace:
            return
        self.checked += 1
        texts = list(_texts(event))
        found = [i for i, secret in enumerate(self.secrets) if any(secret in text for text in texts)]
        found += [secret for secret, pattern in list(self._dynamic.items()) if any(map(pattern.search, texts))]
        if found:
            found = [f if isinstance(f, int) else "watched" for f in found]  # (never the secret itself)
            leak = (
                f"tests.SECRETS{found} in a log event of {event.get('log_namespace', '?')}: "
                f"{self.blank(formatEvent(event))!r}"
            )
            self.leaks.append(leak)
            self._log.failure("{leak}", Failure(SecretInLog(leak)), leak=leak)

    def blank(self, text):
        for i, secret in enumerate(self.secrets):
            text = text.replace(secret, f"<SECRETS[{i}]>")
        for secret, pattern in list(self._dynamic.items()):
            text = pattern.sub("<a secret watched>", text)
        return text


def _texts(event):
    yield formatEvent(event)
    for key in ("log_failure", "failure"):
        failure = event.get(key)
        if isinstance(failure, Failure):
            yield failure.getTraceback()
    for value in event.values():
        yield from _strings(value, 2)


def _strings(value, depth):
    if isinstance(value, str):
        yield value
    elif isinstance(value, bytes):
        yield value.decode("utf-8", "replace")
    elif depth and isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from _strings(item, depth - 1)
    elif depth and isinstance(value, dict):
        for item in value.values():
            yield from _strings(item, depth - 1)


WATCH = SecretWatch(SECRETS)
globalLogPublisher.addObserver(WATCH)
