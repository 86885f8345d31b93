CREATE TABLE resume_tokens (
    token_hash TEXT PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    session_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX resume_tokens_by_user ON resume_tokens (user_id, session_id);
CREATE INDEX resume_tokens_by_expiry ON resume_tokens (expires_at);
