"""Password rules and bcrypt hashing, always off the reactor thread.

The password is pre-hashed with HMAC-SHA256 and base64-encoded (44 bytes)
before bcrypt, so the whole password counts: bcrypt alone would silently
ignore everything after 72 bytes (or raise, in bcrypt >= 5).
"""

import base64
import hashlib
import hmac
import os
import sys
import threading
import unicodedata

import bcrypt
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from securechatd.commands import WeakPassword

MIN_LENGTH = 8
MAX_LENGTH = 1024
MIN_COST = 10

_PREHASH_KEY = b"securechatd password prehash v1"

log = Logger()


def token_hash(token):
    """How resume tokens and invitations are stored: never the token itself (SHA-256 of 256 random bits)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def normalize(password):
    """NFC, so the same password typed on different keyboards matches."""
    return unicodedata.normalize("NFC", password)


def check_rule(password):
    """Raise WeakPassword unless the password is 8 to 1024 characters."""
    if not MIN_LENGTH <= len(password) <= MAX_LENGTH:
        raise WeakPassword(
            f"Passwords must be {MIN_LENGTH} to {MAX_LENGTH} characters long."
        )


def _prehash(password):
    digest = hmac.new(_PREHASH_KEY, normalize(password).encode("utf-8"), hashlib.sha256)
    return base64.b64encode(digest.digest())


def hash_cost(hashed):
    """The bcrypt cost recorded in a stored hash ('$2b$12$...' -> 12)."""
    return int(hashed.split("$")[2])


class PasswordHasher:
    """bcrypt at a fixed cost, each call run by `run_in_thread` (a Deferred).

    `verify` against no stored hash still spends a full bcrypt check on a
    dummy, so an unknown user costs the same time as a wrong password.
    """

    def __init__(self, cost, run_in_thread):
        self.cost = cost
        self._run = run_in_thread
        self._dummy = self._hash(os.urandom(16).hex())

    def _hash(self, password):
        return bcrypt.hashpw(_prehash(password), bcrypt.gensalt(self.cost)).decode("ascii")

    def _verify(self, password, hashed):
        ok = bcrypt.checkpw(_prehash(password), (hashed or self._dummy).encode("ascii"))
        return ok and hashed is not None

    def hash(self, password):
        """Deferred firing with the storable hash of `password`."""
        return self._run(self._hash, password)

    def verify(self, password, hashed):
        """Deferred firing True if `password` matches `hashed` (None: never)."""
        return self._run(self._verify, password, hashed)

    def needs_rehash(self, hashed):
        return hash_cost(hashed) != self.cost


def lower_thread_priority(nice):
    """Make the calling thread `nice` steps nicer, up to 19 (on Linux niceness is per thread)."""
    if sys.platform != "linux":  # elsewhere a thread id is no process id: it could renice another
        raise OSError("per-thread niceness needs Linux")
    tid = threading.get_native_id()
    os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))


class HashThreadPool(ThreadPool):
    """bcrypt's threads, `nice` steps nicer than the daemon (0: as nice as it).

    bcrypt releases the GIL, so its threads could otherwise take every core
    from the reactor thread during a login storm; niced, they still use all
    idle CPU but the reactor preempts them as soon as it has work.
    """

    def __init__(self, nice, **kwargs):
        super().__init__(**kwargs)
        self.nice = nice
        self._warn_once = threading.Lock()

    def threadFactory(self, target, **kwargs):
        return threading.Thread(target=self._run_niced, args=(target,), **kwargs)

    def _run_niced(self, target):
        if self.nice:
            try:
                lower_thread_priority(self.nice)
            except OSError as problem:
                if self._warn_once.acquire(blocking=False):
                    log.warn(
                        "bcrypt threads keep the daemon's CPU priority (hash_nice): {problem}",
                        problem=problem.strerror or problem,
                    )
        target()
