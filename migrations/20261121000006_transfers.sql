-- Transfers between accounts (ADR 0008).

-- Each money-moving step of a transfer (`<transfer id>/debit`, `/credit`, `/settle`) is taken
-- at most once, by whichever event settles it first: the debit step by the source's
-- TransferSent or by the transfer's TransferFailed; the credit step by the destination's
-- TransferReceived or by the source's TransferRefunded. The claim is made by the trigger
-- below in the SAME transaction as the event, so "the step happened" and "the step is
-- claimed" can never disagree: a second event for a claimed step fails with
-- unique_violation (postgres-es reports a concurrency conflict; the command side then finds
-- the claim). Unlike idempotency keys, step claims are never purged.
CREATE TABLE transfer_steps
(
    step            text PRIMARY KEY,
    transaction_id  xid8        NOT NULL DEFAULT pg_current_xact_id(),
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,
    sequence        bigint      NOT NULL,
    global_position bigint      NOT NULL,
    event_type      text        NOT NULL,
    payload         json        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION claim_transfer_step() RETURNS trigger
    LANGUAGE plpgsql AS
$$
DECLARE
    step_id text := NEW.metadata ->> 'transfer_step';
BEGIN
    IF step_id IS NULL THEN
        RETURN NULL;
    END IF;
    INSERT INTO transfer_steps (step, aggregate_type, aggregate_id, sequence, global_position,
                                event_type, payload)
    VALUES (step_id, NEW.aggregate_type, NEW.aggregate_id, NEW.sequence, NEW.global_position,
            NEW.event_type, NEW.payload)
    ON CONFLICT (step) DO NOTHING;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'transfer step % is already taken', step_id
            USING ERRCODE = 'unique_violation';
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER events_claim_transfer_step
    AFTER INSERT
    ON events
    FOR EACH ROW
EXECUTE FUNCTION claim_transfer_step();

-- Statement entries name the transfer they are a leg of.
ALTER TABLE account_statements
    ADD COLUMN transfer_id uuid;

-- One row per transfer: what GET /v1/transfers/{id} answers.
CREATE TABLE transfers
(
    transfer_id     text PRIMARY KEY,
    from_account    text        NOT NULL,
    to_account      text        NOT NULL,
    amount          bigint      NOT NULL,
    currency        text        NOT NULL,
    state           text        NOT NULL,
    failure_code    text,
    failure_reason  text,
    version         bigint      NOT NULL,
    last_position   bigint      NOT NULL,
    requested_at    timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL
);

CREATE INDEX transfers_in_flight_idx ON transfers (currency) WHERE state IN ('requested', 'debited');
