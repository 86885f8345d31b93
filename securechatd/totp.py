"""Second factors: RFC 6238 time-based codes and single-use recovery codes.

Codes come from `cryptography`'s HOTP/TOTP; what it leaves to us is the
policy: a window of one time step either side for clock drift, and never
accepting a step at or below the last one accepted (RFC 6238 §5.2), which the
caller stores. Time is always passed in (`reactor.seconds()`), never read.
"""

import os
import re
import secrets

from cryptography.hazmat.primitives.hashes import SHA1
from cryptography.hazmat.primitives.twofactor import InvalidToken
from cryptography.hazmat.primitives.twofactor.hotp import HOTP
from cryptography.hazmat.primitives.twofactor.totp import TOTP

from securechatd.e2ee.encoding import digest

SECRET_BYTES = 20  # 160 bits, RFC 4226 §4's recommendation; and base32 without the '=' padding some apps mishandle
DIGITS = 6  # with SHA-1 and 30 s: what every authenticator app supports (some ignore other settings)
TIME_STEP = 30
WINDOW = 1  # steps accepted either side of the current one

RECOVERY_CODES = 10
RECOVERY_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"  # lower-case base32: no 0/o or 1/l pairs to confuse
RECOVERY_GROUPS = 3
RECOVERY_GROUP = 4  # 3 groups of 4 characters of 5 bits: 60 bits a code
RECOVERY_LABEL = "securechatd/recovery-code/v1"

_CODE = re.compile(r"[0-9]{%d}\Z" % DIGITS)
_RECOVERY = re.compile(r"[%s]{%d}\Z" % (RECOVERY_ALPHABET, RECOVERY_GROUPS * RECOVERY_GROUP))
_SPACES = re.compile(r"\s+")
_SPACES_AND_DASHES = re.compile(r"[\s-]+")


def new_secret():
    """A fresh TOTP secret: 160 random bits."""
    return os.urandom(SECRET_BYTES)


def provisioning_uri(secret, user, issuer="securechatd"):
    """The otpauth://totp/<issuer>:<user>?secret=… URI an authenticator app scans (the issuer is what the app
    shows above the code: [accounts] totp_issuer, so one name on two servers reads as two entries)."""
    return _totp(secret).get_provisioning_uri(user, issuer)


def time_step(now):
    """The RFC 6238 counter for `now` (seconds since the epoch, T0 = 0)."""
    return int(now // TIME_STEP)


def code(secret, now):
    """The code an authenticator app shows at `now`."""
    return _hotp(secret).generate(time_step(now)).decode("ascii")


def check(secret, typed, now, last_step):
    """The step `typed` is the code of, or None if it is not a code to accept.

    Accepted: exactly six digits (white space, as apps show it, is dropped),
    the code of the current step or one step either side, and a step above
    `last_step` (None if no code was ever accepted), so a code cannot be
    replayed, nor an older code used once a newer one was. The caller stores
    the returned step as the new `last_step` in the same transaction that
    lets the user in.
    """
    if not isinstance(typed, str):
        return None
    typed = _SPACES.sub("", typed)
    if not _CODE.match(typed):
        return None
    hotp, current, typed = _hotp(secret), time_step(now), typed.encode("ascii")
    lowest = max(current - WINDOW, 0 if last_step is None else last_step + 1, 0)
    for step in range(lowest, current + WINDOW + 1):
        try:
            hotp.verify(typed, step)
        except InvalidToken:
            continue
        return step
    return None


def new_recovery_codes():
    """Ten fresh recovery codes as they are shown once, e.g. 'k7qm-2xfa-ve4n'."""
    return [_new_recovery_code() for _ in range(RECOVERY_CODES)]


def normalise_recovery_code(typed):
    """A typed recovery code in its stored form (lower case, no spaces or dashes), or None if it cannot be one."""
    if not isinstance(typed, str):
        return None
    typed = _SPACES_AND_DASHES.sub("", typed).lower()
    return typed if _RECOVERY.match(typed) else None


def recovery_code_hash(user, typed):
    """What is stored for a recovery code and looked up when one is typed; None if `typed` cannot be a code.

    A fast hash is enough because a code carries 60 random bits: finding any
    one of a user's ten codes from a stolen database still takes about 2**56
    SHA-256 runs, and hashing the user name in leaves no table or search
    across users. A slow hash (bcrypt) adds little against that much entropy
    and would make each try cost ten bcrypt runs, where this is one indexed
    lookup.
    """
    code = normalise_recovery_code(typed)
    return None if code is None else digest(RECOVERY_LABEL, [user, code])


def _new_recovery_code():
    groups = ("".join(secrets.choice(RECOVERY_ALPHABET) for _ in range(RECOVERY_GROUP)) for _ in range(RECOVERY_GROUPS))
    return "-".join(groups)


def _totp(secret):
    return TOTP(secret, DIGITS, SHA1(), TIME_STEP)


def _hotp(secret):
    """The HOTP the TOTP is made of (RFC 6238 §4: TOTP = HOTP(K, step)), to check several steps without times."""
    return HOTP(secret, DIGITS, SHA1())
