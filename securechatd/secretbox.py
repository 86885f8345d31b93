"""Sealing the secrets the server must read back (TOTP secrets) under a key kept outside the database.

A copy of the database alone (a backup, a dump, a replica) then reveals no
TOTP secret. The key is 32 random bytes in a file of its own, mode 0600,
made at first start. Sealing is ChaCha20-Poly1305 with a random nonce (a
96-bit nonce is safe for far more secrets than a server will ever seal) and
associated data naming the purpose and the user, so a sealed secret copied
into another user's row, or presented for another purpose, does not open.
"""

import contextlib
import os
import secrets
import stat

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from securechatd.e2ee.encoding import labelled
from securechatd.files import sync_directory

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
TOTP_SECRET_LABEL = "securechatd/totp-secret/v1"


class KeyFileError(Exception):
    """The server key file cannot be used; the message says why and what to do."""


class Unsealable(ValueError):
    """Sealed bytes that do not open with this key for this user: damaged, moved from another row, or of another key."""


def load_or_create_key(path, sealed_for=0):
    """The server key in `path`, made first if there is no file there and no secret was sealed before.

    With the secrets of `sealed_for` users sealed under the key that was
    there, a missing file is a KeyFileError instead: a new key opens none of
    them, so every code of those users would be refused with no word why
    (the file left behind in a restore to another machine, or a changed path).

    A new key is written to a temporary file beside `path` (created 0600,
    fsynced), then linked into place and the directory fsynced, so the name
    survives a power loss before any secret sealed under it reaches the
    database. A link, unlike a rename, never replaces a key another process
    made meanwhile: then that key is the one used.
    """
    try:
        return _read_key(path)
    except FileNotFoundError:
        if sealed_for:
            raise KeyFileError(_lost_key_text(path, sealed_for)) from None
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(descriptor, "wb") as out:
                out.write(os.urandom(KEY_BYTES))
                out.flush()
                os.fsync(out.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(temporary, path)
        finally:
            os.unlink(temporary)
        sync_directory(directory)
    except OSError as problem:
        raise KeyFileError(f"cannot create the server key {path}: {problem.strerror}")
    return _read_key(path)


def _lost_key_text(path, sealed_for):
    return (
        f"the TOTP key {path} is missing, but the two-factor secrets in the database ({sealed_for} users)"
        " are sealed under it and no new key would open them: put the file back (restore it from its backup, or"
        " correct [accounts] totp_key if it moved) and start again; only if it is lost for good, switch those"
        " users' two-factor login off (securechatd-admin 2fa USER --disable) so that a new key can be made"
    )


def seal(key, user, secret):
    """`secret` encrypted for `user`'s row: nonce || ciphertext || tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, secret, _associated_data(user))


def unseal(key, user, sealed):
    """The secret seal(key, user, …) was given; Unsealable if these bytes are not that."""
    if not isinstance(sealed, bytes) or len(sealed) < NONCE_BYTES + TAG_BYTES:
        raise Unsealable("too short to be a sealed secret")
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], _associated_data(user))
    except InvalidTag:
        raise Unsealable("does not open with this server key for this user") from None


def _associated_data(user):
    return labelled(TOTP_SECRET_LABEL, [user])


def _read_key(path):
    """The key in `path`; FileNotFoundError if there is none, KeyFileError if it is not fit to be one."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise
    except OSError as problem:
        raise KeyFileError(f"cannot read the server key {path}: {problem.strerror}")
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise KeyFileError(f"the server key {path} is not a regular file")
        if status.st_mode & 0o077:
            raise KeyFileError(
                f"the server key {path} has mode {stat.S_IMODE(status.st_mode):04o}, so other users may have read it:"
                " if none did, chmod 600 it; otherwise treat the TOTP secrets as disclosed"
            )
        key = os.read(descriptor, KEY_BYTES + 1)
    finally:
        os.close(descriptor)
    if len(key) != KEY_BYTES:
        raise KeyFileError(f"the server key {path} is {status.st_size} bytes, not {KEY_BYTES}: damaged or not a key; it was left as it is")
    return key


