-- Readers of the log (the relay, and the projector when no broker is configured).
--
-- A notification on channel `ledger_events` after every statement that appends events,
-- delivered at commit, so readers wake up instead of polling hard. Readers still poll
-- slowly as a fallback: a notification can come while an older transaction holds the
-- watermark back.
CREATE FUNCTION notify_ledger_events() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    PERFORM pg_notify('ledger_events', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER events_notify_readers
    AFTER INSERT
    ON events
    FOR EACH STATEMENT
EXECUTE FUNCTION notify_ledger_events();

-- Where each relay has published up to: a cursor in the log's commit-safe order
-- (transaction_id, global_position). Written only after the broker confirmed delivery.
CREATE TABLE relay_checkpoints
(
    relay_name      text PRIMARY KEY,
    transaction_id  xid8        NOT NULL,
    global_position bigint      NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
