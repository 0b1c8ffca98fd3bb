-- The `export` scope (issue 17, ADR 0019): `GET /v1/subjects/{id}/export` hands out a data
-- subject's personal data in clear, so it needs a key with a scope of its own. The scope
-- existed in the code (`Scope::Export`) but this check refused to store it.
ALTER TABLE api_keys
    DROP CONSTRAINT api_keys_scopes_check,
    ADD CONSTRAINT api_keys_scopes_check
        CHECK (scopes <@ ARRAY ['write', 'read', 'admin', 'export']::text[]);
