"""Device adds and revokes in the account log: the key directory, logging each add or revoke it stores.

The chain link is what a device signed (server/keys.py checks it), so the
event names it instead of carrying a second signature: its target is the
device added or revoked and its device the one that signed the link, and a
client finds that link in the user's verified device chain. The event is
logged once the link is stored, in a transaction of its own: a crash
between the two loses the event, never the link (the chain itself stays
the authority on devices).
"""

from twisted.logger import Logger

from securechatd.e2ee.chain import Link
from securechatd.server.keys import KeyService
from securechatd.server.policy import deferred
from securechatd.store.account_log import NewEvent

log = Logger()

LOGGED_OPS = {"add": "device_add", "revoke": "device_revoke"}


class LoggingKeyService(KeyService):
    """KeyService whose device adds and revokes are account events."""

    def __init__(self, account_log, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.account_log = account_log

    @deferred
    async def publish(self, session, data):
        published = await super().publish(session, data)
        link = Link.from_bytes(data)  # (parsed and checked already)
        kind = LOGGED_OPS.get(link.op)
        if kind is not None:
            event = NewEvent(kind, session.address, session.session_id, link.signer, link.device.hex())
            try:
                await self.account_log.record(session.username, event)
            except Exception:
                log.failure("logging device link {seq} of {user}", seq=link.seq, user=session.username)
        return published
