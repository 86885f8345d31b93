"""Private files: written whole or not at all, mode 0600, and durable with their names."""

import os
import secrets


def sync_directory(directory):
    """fsync a directory: a file created or renamed in it keeps its name after a power loss."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_private(path, data):
    """Replace `path` with `data`, mode 0600: a temporary file beside it, fsync, rename, fsync of the directory,
    so a crash leaves the old file or the new one, never half of one."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
    # (a new name nobody could have placed a link or a file under: exports may go to shared directories)
    temporary = f"{path}.{secrets.token_hex(8)}.tmp"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    sync_directory(directory)  # the rename itself survives a power loss
