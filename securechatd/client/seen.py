"""What a client installation has already handed to its user, so a Deliver pushed again is not shown twice.

Delivery is at least once (docs/PROTOCOL.md): after a daemon crash a message
already answered can come again. Deliver arrives in seq order per
conversation, so the highest seq handed over per conversation is all there
is to remember. It is kept in a small file of the installation's own (mode
0600, replaced atomically), so it holds across reconnects and restarts.
"""

import json
import os


class SeenMessages:
    """conversation_id -> the highest seq handed to the user; saved to `path` (None: memory only)."""

    def __init__(self, path=None):
        self.path = path
        self._highest = {}
        if path is not None and os.path.exists(path):
            with open(path, encoding="utf-8") as saved:
                self._highest = {int(c): seq for c, seq in json.load(saved).items()}

    def is_new(self, conversation_id, seq):
        return seq > self._highest.get(conversation_id, 0)

    def handed_over(self, conversation_id, seq):
        if self.is_new(conversation_id, seq):
            self._highest[conversation_id] = seq

    def save(self):
        """Replace the file with what is known now: write a 0600 temporary file, then rename it."""
        if self.path is None:
            return
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, mode=0o700, exist_ok=True)
        temporary = f"{self.path}.{os.getpid()}.tmp"
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as out:
            json.dump(self._highest, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, self.path)
