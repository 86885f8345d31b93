-- Verifiable conversations (docs/E2EE.md, "Verifiable conversations"). Each
-- encrypted conversation has a hash chain kept by the server: every message,
-- membership state and mode event placed is a link (n = 1, 2, ...), stored as
-- the bytes clients check with its e_n. chain_n is the conversation's last n.
-- (Encrypted conversations created before this version have no links for
-- what they held then; encrypted conversations had not been released.)
ALTER TABLE conversations ADD COLUMN chain_n INTEGER NOT NULL DEFAULT 0;
CREATE TABLE links (
    conversation_id INTEGER NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    n INTEGER NOT NULL,
    e BLOB NOT NULL,
    link BLOB NOT NULL,
    PRIMARY KEY (conversation_id, n)
) WITHOUT ROWID;
-- The heads (conversation, n, e_n) the server signed with its key: one covers
-- every link up to n.
CREATE TABLE heads (
    conversation_id INTEGER NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    n INTEGER NOT NULL,
    head BLOB NOT NULL,
    PRIMARY KEY (conversation_id, n)
) WITHOUT ROWID;
-- An encrypted message's link, and its sender device's signature (attestable mode).
ALTER TABLE messages ADD COLUMN link_n INTEGER;
ALTER TABLE messages ADD COLUMN signature BLOB;
-- Signed mode events (attestable or deniable), as published.
CREATE TABLE mode_events (
    conversation_id INTEGER NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    number INTEGER NOT NULL,
    hash BLOB NOT NULL,
    event BLOB NOT NULL,
    published_at REAL NOT NULL,
    PRIMARY KEY (conversation_id, number)
);
-- The newest transcript head each member device signed, as sent.
CREATE TABLE transcript_heads (
    conversation_id INTEGER NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    device_id TEXT NOT NULL,
    n INTEGER NOT NULL,
    head BLOB NOT NULL,
    PRIMARY KEY (conversation_id, user_id, device_id)
);
