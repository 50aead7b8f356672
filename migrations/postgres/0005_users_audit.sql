-- Users, API tokens, browser sessions and the audit trail (the security issue).
-- Passwords are argon2id PHC strings; tokens and session ids are kept only as their
-- sha256 (hex), so a copy of the database lets nobody in.
CREATE TABLE users (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,                      -- viewer, operator, fleet-manager, admin
    password_hash TEXT,                      -- NULL: no password login (tokens only)
    disabled BIGINT NOT NULL DEFAULT 0,
    created_unix_ms BIGINT NOT NULL,
    updated_unix_ms BIGINT NOT NULL
);

CREATE TABLE api_tokens (
    id TEXT PRIMARY KEY,                     -- the token's public part (insp_<id>_...)
    user_name TEXT NOT NULL REFERENCES users (name),
    token_hash TEXT NOT NULL UNIQUE,
    label TEXT NOT NULL DEFAULT '',
    created_unix_ms BIGINT NOT NULL,
    expires_unix_ms BIGINT,                  -- NULL: never
    revoked_unix_ms BIGINT,
    last_used_unix_ms BIGINT
);
CREATE INDEX api_tokens_user ON api_tokens (user_name);

CREATE TABLE sessions (
    id_hash TEXT PRIMARY KEY,
    user_name TEXT NOT NULL REFERENCES users (name),
    csrf_token TEXT NOT NULL,
    created_unix_ms BIGINT NOT NULL,
    last_seen_unix_ms BIGINT NOT NULL
);

-- Append-only: row seq (1, 2, ... without gaps) carries the hash of row seq - 1, and its
-- own hash = sha256(prev_hash, seq, actor, at_unix_ms, action, details); see audit.rs.
CREATE TABLE audit (
    seq BIGINT PRIMARY KEY,
    at_unix_ms BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    details TEXT NOT NULL,                   -- JSON
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
