"""Every SQL statement of securechatd lives in this package.

What the rest of the daemon needs to open the database: `prepare_database`
at start-up (creates or upgrades the schema), `open_pool` and `Store` for
running, and the two errors: MigrationError from the first, StoreError from
every store call.
"""

from securechatd.store.account_log import AccountLogStore
from securechatd.store.accounts import AccountStore
from securechatd.store.base import StoreError
from securechatd.store.dialect import open_pool
from securechatd.store.encrypted import EncryptedStore
from securechatd.store.keys import KeyStore
from securechatd.store.links import LinkStore
from securechatd.store.messaging import MessagingStore
from securechatd.store.migrations import MigrationError, prepare_database
from securechatd.store.privacy import PrivacyStore
from securechatd.store.twofactor import TwoFactorStore

__all__ = ["MigrationError", "Store", "StoreError", "open_pool", "prepare_database"]


class Store(
    AccountStore, MessagingStore, KeyStore, EncryptedStore, LinkStore, AccountLogStore, TwoFactorStore, PrivacyStore
):
    """The daemon's database: one adbapi pool, methods returning Deferreds."""
