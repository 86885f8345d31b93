"""The two openers of store.dialect under the name callers used before it existed."""

from securechatd.store.dialect import connect, open_pool

__all__ = ["connect", "open_pool"]
