"""Every SQL statement of securechatd lives in this package."""

from securechatd.store.accounts import AccountStore
from securechatd.store.messaging import MessagingStore


class Store(AccountStore, MessagingStore):
    """The daemon's database: one adbapi pool, methods returning Deferreds."""
