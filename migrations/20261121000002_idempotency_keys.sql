-- Idempotency keys (Idempotency-Key header).
--
-- A key is claimed in the SAME transaction as the events its request appends, by the trigger
-- below, so "events committed" and "key used" can never disagree, even when the process dies
-- between commit and response. A second transaction appending events under a claimed key
-- fails with unique_violation (which postgres-es reports as a concurrency conflict; the
-- command service then finds the claim and answers with the first request's outcome).
--
-- Requests that were refused (a domain rule, e.g. insufficient funds) append nothing; their
-- answer is stored here directly, under the same uniqueness.
CREATE TABLE idempotency_keys
(
    idempotency_key text        PRIMARY KEY,
    request_hash    text        NOT NULL,
    transaction_id  xid8        NOT NULL DEFAULT pg_current_xact_id(),
    aggregate_type  text,
    aggregate_id    text,
    last_sequence   bigint,
    last_position   bigint,
    response_status smallint,
    response_body   json,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX idempotency_keys_created_at_idx ON idempotency_keys (created_at);

CREATE FUNCTION claim_idempotency_key() RETURNS trigger
    LANGUAGE plpgsql AS
$$
DECLARE
    key text := NEW.metadata ->> 'idempotency_key';
BEGIN
    IF key IS NULL THEN
        RETURN NULL;
    END IF;
    INSERT INTO idempotency_keys AS claimed (idempotency_key, request_hash, aggregate_type,
                                             aggregate_id, last_sequence, last_position)
    VALUES (key, coalesce(NEW.metadata ->> 'request_hash', ''), NEW.aggregate_type,
            NEW.aggregate_id, NEW.sequence, NEW.global_position)
    ON CONFLICT (idempotency_key) DO UPDATE
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

CREATE TRIGGER events_claim_idempotency_key
    AFTER INSERT
    ON events
    FOR EACH ROW
EXECUTE FUNCTION claim_idempotency_key();
