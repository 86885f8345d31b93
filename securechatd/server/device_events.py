"""Device adds and revokes in the account log: the key directory, logging each add or revoke it stores.

The chain link is what a device signed (server/keys.py checks it), so the
event names it instead of carrying a second signature: its target is the
device added or revoked and its device the one that signed the link, and a
client finds that link in the user's verified device chain. The event is
logged in the transaction that stores the link (store/keys.py), so the two
commit or roll back together: the log never misses a device the chain has,
nor tells of one it has not.
"""

from securechatd.server.keys import KeyService
from securechatd.store.account_log import NewEvent

LOGGED_OPS = {"add": "device_add", "revoke": "device_revoke"}


class LoggingKeyService(KeyService):
    """KeyService whose device adds and revokes are account events."""

    def __init__(self, account_log, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.account_log = account_log

    async def _store_link(self, session, link, new):
        """Store the link with its account event, in one transaction: both or neither."""
        kind = LOGGED_OPS.get(link.op)
        event = kind and NewEvent(kind, session.address, session.session_id, link.signer, new.device)
        stored = await self.store.append_link(session.username, new, self.clock.seconds(), event)
        self.account_log.added(stored)
        return stored
