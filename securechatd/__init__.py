"""securechatd: a self-hosted secure chat daemon (AMP over TLS, SQLite, bcrypt)."""

__version__ = "0.1.0"  # the one place it is written: setup.py and --version read it
