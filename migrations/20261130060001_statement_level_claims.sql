-- Idempotency keys and transfer steps are claimed once per statement, over the statement's
-- new rows (a transition table), instead of once per row (write-path issue). A group-commit
-- statement appends up to COMMAND_BATCH_MAX events and most carry neither a key nor a step:
-- the per-row triggers ran two PL/pgSQL calls and parsed the metadata twice for each. The
-- rules are those of the per-row claims (20261121000002, 20261130001501, 20261121000006):
--
-- * a key is claimed by the first transaction that writes an event under it, in its
--   client's scope; the same transaction may add later events under it, to the same
--   aggregate only; anyone else gets unique_violation, and the statement writes nothing;
-- * a transfer step is taken by exactly one event, ever.

CREATE FUNCTION claim_idempotency_keys() RETURNS trigger
    LANGUAGE plpgsql AS
$$
DECLARE
    wanted  bigint;
    claimed bigint;
BEGIN
    WITH keyed AS (
        SELECT metadata ->> 'idempotency_key'                      AS idempotency_key,
               coalesce(metadata ->> 'idempotency_scope', 'legacy') AS client_scope,
               coalesce(metadata ->> 'request_hash', '')            AS request_hash,
               aggregate_type, aggregate_id, sequence, global_position
          FROM new_events
    ), grouped AS (
        SELECT idempotency_key, client_scope,
               min(request_hash)                               AS request_hash,
               min(aggregate_type)                             AS aggregate_type,
               min(aggregate_id)                               AS aggregate_id,
               max(sequence)                                   AS last_sequence,
               max(global_position)                            AS last_position,
               count(DISTINCT (aggregate_type, aggregate_id)) AS aggregates
          FROM keyed
         WHERE idempotency_key IS NOT NULL
         GROUP BY idempotency_key, client_scope
    ), upserted AS (
        INSERT INTO idempotency_keys AS held (idempotency_key, client_scope, request_hash,
                                              aggregate_type, aggregate_id, last_sequence,
                                              last_position)
        SELECT idempotency_key, client_scope, request_hash, aggregate_type, aggregate_id,
               last_sequence, last_position
          FROM grouped
         -- one key for two aggregates in one statement is never a claim
         WHERE aggregates = 1
        ON CONFLICT (idempotency_key, client_scope) DO UPDATE
            SET last_sequence = greatest(held.last_sequence, EXCLUDED.last_sequence),
                last_position = greatest(held.last_position, EXCLUDED.last_position)
            -- only the transaction that claimed the key may add events under it, and only
            -- to the same aggregate
            WHERE held.transaction_id = pg_current_xact_id()
              AND held.aggregate_type = EXCLUDED.aggregate_type
              AND held.aggregate_id = EXCLUDED.aggregate_id
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM grouped), (SELECT count(*) FROM upserted)
      INTO wanted, claimed;
    IF claimed < wanted THEN
        RAISE EXCEPTION 'idempotency key is already used by another request'
            USING ERRCODE = 'unique_violation';
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION claim_transfer_steps() RETURNS trigger
    LANGUAGE plpgsql AS
$$
DECLARE
    wanted bigint;
    taken  bigint;
BEGIN
    WITH stepped AS (
        SELECT metadata ->> 'transfer_step' AS step, aggregate_type, aggregate_id, sequence,
               global_position, event_type, payload
          FROM new_events
    ), claims AS (
        SELECT * FROM stepped WHERE step IS NOT NULL
    ), inserted AS (
        INSERT INTO transfer_steps (step, aggregate_type, aggregate_id, sequence,
                                    global_position, event_type, payload)
        SELECT step, aggregate_type, aggregate_id, sequence, global_position, event_type,
               payload
          FROM claims
        -- a step taken before, or twice in this statement: fewer rows than claims
        ON CONFLICT (step) DO NOTHING
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM claims), (SELECT count(*) FROM inserted)
      INTO wanted, taken;
    IF taken < wanted THEN
        RAISE EXCEPTION 'a transfer step of this statement is already taken'
            USING ERRCODE = 'unique_violation';
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER events_claim_idempotency_key ON events;
DROP TRIGGER events_claim_transfer_step ON events;
DROP FUNCTION claim_idempotency_key();
DROP FUNCTION claim_transfer_step();

CREATE TRIGGER events_claim_idempotency_keys
    AFTER INSERT
    ON events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT
EXECUTE FUNCTION claim_idempotency_keys();

CREATE TRIGGER events_claim_transfer_steps
    AFTER INSERT
    ON events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT
EXECUTE FUNCTION claim_transfer_steps();
