-- API keys (ADR 0009). The key itself is never stored: only its SHA-256. `prefix` (12 hex
-- characters, public) finds the row; `scopes` says what the key may do (write, read, admin).
CREATE TABLE api_keys
(
    id         uuid PRIMARY KEY,
    name       text        NOT NULL,
    prefix     text        NOT NULL UNIQUE,
    key_hash   text        NOT NULL,
    scopes     text[]      NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz,
    CHECK (scopes <@ ARRAY['write', 'read', 'admin']::text[])
);
