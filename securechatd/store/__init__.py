"""Every SQL statement of securechatd lives in this package."""

from securechatd.store.accounts import AccountStore


class Store(AccountStore):
    """The daemon's database: one adbapi pool, methods returning Deferreds."""
