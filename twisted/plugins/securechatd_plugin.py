"""Makes `twistd securechatd` find the daemon without importing it."""

from twisted.application.service import ServiceMaker

securechatd = ServiceMaker(
    "securechatd",
    "securechatd.tap",
    "A secure chat daemon: AMP over TLS with accounts in SQLite.",
    "securechatd",
)
