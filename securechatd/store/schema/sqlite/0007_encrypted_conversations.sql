-- Encrypted conversations (docs/PROTOCOL.md, "Encrypted conversations"): the
-- server stores and relays bytes it cannot read.
-- A conversation is encrypted or not for life; an encrypted one carries the
-- epoch and hash of its latest signed membership state (0 and NULL before epoch 1).
ALTER TABLE conversations ADD COLUMN encrypted INTEGER NOT NULL DEFAULT 0;
ALTER TABLE conversations ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;
ALTER TABLE conversations ADD COLUMN members_hash BLOB;
-- Every signed membership state, as published (the bytes clients check).
CREATE TABLE membership_states (
    conversation_id INTEGER NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    epoch INTEGER NOT NULL,
    hash BLOB NOT NULL,
    state BLOB NOT NULL,
    published_at REAL NOT NULL,
    PRIMARY KEY (conversation_id, epoch)
);
-- An encrypted message is a messages row (its seq, sender, client_msg_id and
-- time; body '') with its header and encrypted body here, once ...
CREATE TABLE envelopes (
    message_id INTEGER PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE,
    sender_device TEXT NOT NULL,
    header BLOB NOT NULL,
    body BLOB NOT NULL
);
-- ... and one wrap per recipient device, until that device acknowledges it.
CREATE TABLE wraps (
    user_id INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    conversation_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    message_id INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    wrap BLOB NOT NULL,
    PRIMARY KEY (user_id, device_id, conversation_id, seq),
    FOREIGN KEY (user_id, device_id) REFERENCES devices (user_id, device_id) ON DELETE CASCADE
);
CREATE INDEX wraps_by_message ON wraps (message_id);
-- The highest header counter stored per sending device and conversation
-- (8 bytes, big-endian: counters are unsigned 64-bit numbers).
CREATE TABLE sender_counters (
    conversation_id INTEGER NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    device_id TEXT NOT NULL,
    counter BLOB NOT NULL,
    PRIMARY KEY (conversation_id, user_id, device_id)
);
-- Wraps uploaded ahead of a SendEncrypted (StageWraps), by its client_msg_id.
CREATE TABLE staged_wraps (
    user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    client_msg_id TEXT NOT NULL,
    conversation_id INTEGER NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    device_id TEXT NOT NULL,
    wrap BLOB NOT NULL,
    staged_at REAL NOT NULL,
    PRIMARY KEY (user_id, client_msg_id, device_id)
);
CREATE INDEX staged_wraps_by_time ON staged_wraps (staged_at);
