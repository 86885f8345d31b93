"""The audit log: security events as JSON lines, in a file of their own.

Security events are the log events that carry a `security_event` field
(logged in the `securechatd.security` namespace). Only known, harmless
fields are written, so nothing secret can slip in by a careless log call.
"""

import json
import os
from datetime import datetime, timezone

from zope.interface import implementer
from twisted.logger import ILogObserver

FIELDS = ("username", "address", "method", "client_name", "session_id", "reason", "count", "target")


def audit_line(event):
    """The JSON line for a security event, or None for any other event."""
    kind = event.get("security_event")
    if kind is None:
        return None
    record = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), timezone.utc).isoformat(),
        "event": kind,
    }
    for name in FIELDS:
        if event.get(name) is not None:
            record[name] = event[name]
    return json.dumps(record, sort_keys=True, default=str)


def open_private(path):
    """`path` opened for appending, created readable by its owner only."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a", encoding="utf-8")


@implementer(ILogObserver)
class AuditLog:
    """A log observer appending security events to one file."""

    def __init__(self, path):
        self.path = path
        self._file = open_private(path)

    def __call__(self, event):
        line = audit_line(event)
        if line is not None:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self):
        self._file.close()


def record(path, kind, now, **fields):
    """Append one event, at `now` (seconds since the epoch), to the audit log at `path` (for securechatd-admin)."""
    if path is None:
        return
    with open_private(path) as audit:
        audit.write(audit_line(dict(fields, security_event=kind, log_time=now)) + "\n")
