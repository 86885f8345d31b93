-- The key directory (docs/PROTOCOL.md, "Devices and keys"): public material only.
-- Each user's device chain, link by link as published (the bytes clients check),
-- and the state it implies per device; prekeys per current device.
CREATE TABLE chain_links (
    user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    hash BLOB NOT NULL,
    link BLOB NOT NULL,
    published_at REAL NOT NULL,
    PRIMARY KEY (user_id, seq)
);
CREATE TABLE devices (
    user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    device_id TEXT NOT NULL,
    sig_pub BLOB NOT NULL,
    dh_pub BLOB NOT NULL,
    name TEXT NOT NULL,
    added_seq INTEGER NOT NULL,
    revoked_seq INTEGER,
    PRIMARY KEY (user_id, device_id)
);
CREATE TABLE signed_prekeys (
    user_id INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    spk_id INTEGER NOT NULL,
    spk_pub BLOB NOT NULL,
    signature BLOB NOT NULL,
    uploaded_at REAL NOT NULL,
    PRIMARY KEY (user_id, device_id),
    FOREIGN KEY (user_id, device_id) REFERENCES devices (user_id, device_id) ON DELETE CASCADE
);
CREATE TABLE one_time_prekeys (
    user_id INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    opk_id INTEGER NOT NULL,
    opk_pub BLOB NOT NULL,
    uploaded_at REAL NOT NULL,
    PRIMARY KEY (user_id, device_id, opk_id),
    FOREIGN KEY (user_id, device_id) REFERENCES devices (user_id, device_id) ON DELETE CASCADE
);
-- The device a resume token's session was bound to (NULL: none), so that
-- revoking a device also spends the tokens it could come back with.
ALTER TABLE resume_tokens ADD COLUMN device_id TEXT;
