-- Account security (issue 13; docs/PROTOCOL.md, "Account security").
-- Two-factor login: each user's TOTP secret, sealed under the server's totp
-- key (securechatd/secretbox.py: a copy of the database alone reveals no
-- secret); enabled 0 is an enrolment not confirmed yet; last_step is the
-- last time step accepted, never accepted again (RFC 6238 §5.2).
CREATE TABLE two_factor (
    user_id INTEGER PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    sealed BLOB NOT NULL,
    enabled INTEGER NOT NULL DEFAULT 0,
    last_step INTEGER,
    changed_at REAL NOT NULL
);
-- Single-use recovery codes, as hashes (totp.recovery_code_hash): one is deleted when used.
CREATE TABLE recovery_codes (
    user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    code_hash BLOB NOT NULL,
    PRIMARY KEY (user_id, code_hash)
);
-- Sessions a user can list and end: a resume token is a session that may come
-- back; what its client said it was, from where, and when it was last active.
ALTER TABLE resume_tokens ADD COLUMN client_name TEXT;
ALTER TABLE resume_tokens ADD COLUMN address TEXT;
ALTER TABLE resume_tokens ADD COLUMN last_active REAL;
-- The account log: each user's events as a hash chain (hash: the chain head
-- after the event), each head a leaf of one append-only Merkle tree (leaf: its
-- leaf hash, at leaf_index). Rows are never changed or deleted, a deleted
-- account's included (its user row stays). nonce: a device-signed action's,
-- so a signed action is accepted once.
CREATE TABLE account_events (
    user_id INTEGER NOT NULL REFERENCES users (id),
    seq INTEGER NOT NULL,
    hash BLOB NOT NULL,
    event BLOB NOT NULL,
    leaf_index INTEGER NOT NULL UNIQUE,
    leaf BLOB NOT NULL,
    nonce BLOB,
    PRIMARY KEY (user_id, seq)
);
CREATE UNIQUE INDEX account_events_by_nonce ON account_events (user_id, nonce) WHERE nonce IS NOT NULL;
-- Privacy: each user may hide their last-seen time and appear offline to everyone.
ALTER TABLE users ADD COLUMN hide_last_seen INTEGER NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN appear_offline INTEGER NOT NULL DEFAULT 0;
-- Invitations to groups ([privacy] invitations = on): someone who shares no
-- conversation with the inviter joins only by accepting. accepted_at: an
-- accepted invitation to an encrypted group, waiting for a member's signed state.
CREATE TABLE invitations (
    conversation_id INTEGER NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    inviter TEXT NOT NULL,
    invited_at REAL NOT NULL,
    accepted_at REAL,
    PRIMARY KEY (conversation_id, user_id)
);
CREATE INDEX invitations_by_user ON invitations (user_id);
