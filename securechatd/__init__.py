"""securechatd: a self-hosted secure chat daemon (AMP over TLS, SQLite, bcrypt)."""
