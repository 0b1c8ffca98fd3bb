-- Idempotency keys are scoped per client (ADR 0012): the same key from two API keys is two
-- keys. `client_scope` is `key:<API key id>` for a request authenticated by an API key and
-- `anonymous` when the command API runs with AUTH_MODE=disabled (one scope for everyone).
--
-- Keys stored before this migration cannot be attributed to a client (nothing recorded
-- which API key sent them), so they get the scope `legacy`. The command API still finds a
-- legacy key when a request carries it with the SAME fingerprint (method, path, body), so a
-- client retrying across the upgrade is answered from the first attempt instead of being
-- carried out twice; a legacy key under a different request is ignored rather than answered
-- 422, since it may be another client's. Legacy rows age out with IDEMPOTENCY_RETENTION.
ALTER TABLE idempotency_keys
    ADD COLUMN client_scope text NOT NULL DEFAULT 'legacy';
ALTER TABLE idempotency_keys
    ALTER COLUMN client_scope DROP DEFAULT;

-- Key first: one index range finds a client's row and a legacy row for the same key.
ALTER TABLE idempotency_keys
    DROP CONSTRAINT idempotency_keys_pkey,
    ADD PRIMARY KEY (idempotency_key, client_scope);

-- The claim made in the events' own transaction, now under the event's scope (metadata
-- `idempotency_scope`; events written by code that predates scopes claim as `legacy`).
CREATE OR REPLACE FUNCTION claim_idempotency_key() RETURNS trigger
    LANGUAGE plpgsql AS
$$
DECLARE
    key   text := NEW.metadata ->> 'idempotency_key';
    scope text := coalesce(NEW.metadata ->> 'idempotency_scope', 'legacy');
BEGIN
    IF key IS NULL THEN
        RETURN NULL;
    END IF;
    INSERT INTO idempotency_keys AS claimed (idempotency_key, client_scope, request_hash,
                                             aggregate_type, aggregate_id, last_sequence,
                                             last_position)
    VALUES (key, scope, coalesce(NEW.metadata ->> 'request_hash', ''), NEW.aggregate_type,
            NEW.aggregate_id, NEW.sequence, NEW.global_position)
    ON CONFLICT (idempotency_key, client_scope) DO UPDATE
        SET last_sequence = greatest(claimed.last_sequence, EXCLUDED.last_sequence),
            last_position = greatest(claimed.last_position, EXCLUDED.last_position)
        -- only the transaction that claimed the key may add events under it, and only to the
        -- same aggregate
        WHERE claimed.transaction_id = pg_current_xact_id()
          AND claimed.aggregate_type = EXCLUDED.aggregate_type
          AND claimed.aggregate_id = EXCLUDED.aggregate_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'idempotency key is already used by another request'
            USING ERRCODE = 'unique_violation';
    END IF;
    RETURN NULL;
END
$$;
