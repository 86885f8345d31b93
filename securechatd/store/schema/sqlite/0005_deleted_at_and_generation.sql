-- A deleted account is marked by deleted_at (it was the password hash '!deleted',
-- which every query had to remember to check), and its credentials change with
-- an integer generation (it was password_changed_at, nudged by 1e-6 per change).
ALTER TABLE users ADD COLUMN deleted_at REAL;
ALTER TABLE users ADD COLUMN generation INTEGER NOT NULL DEFAULT 1;
-- When an account was deleted was not recorded: the time of this upgrade is the
-- earliest time known to be after it (the upgrade records its row first).
UPDATE users SET
    deleted_at = (SELECT applied_at FROM schema_version WHERE version = 5),
    password_hash = ''
WHERE password_hash = '!deleted';
