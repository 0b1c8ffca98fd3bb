-- The event store: postgres-es's `events` and `snapshots` tables, extended with columns that
-- postgres-es never names (so their defaults fill them on every insert).
--
-- global_position: a store-wide, increasing position; the consistency token handed to
--   clients. Allocated at insert, so it is NOT commit order: a transaction that took a lower
--   position may commit after one that took a higher position.
-- transaction_id: the inserting transaction's xid8. Readers of the log only take events whose
--   transaction is older than every transaction still running
--   (transaction_id < pg_snapshot_xmin(pg_current_snapshot())), in (transaction_id,
--   global_position) order; nothing can later commit behind that watermark, so no reader skips.
-- event_id: a stable id, the dedup key downstream (Kafka re-deliveries carry the same id).
CREATE TABLE events
(
    aggregate_type  text                         NOT NULL,
    aggregate_id    text                         NOT NULL,
    sequence        bigint CHECK (sequence >= 0) NOT NULL,
    event_type      text                         NOT NULL,
    event_version   text                         NOT NULL,
    payload         json                         NOT NULL,
    metadata        json                         NOT NULL,
    global_position bigint GENERATED ALWAYS AS IDENTITY,
    event_id        uuid                         NOT NULL DEFAULT gen_random_uuid(),
    transaction_id  xid8                         NOT NULL DEFAULT pg_current_xact_id(),
    recorded_at     timestamptz                  NOT NULL DEFAULT now(),
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);

CREATE UNIQUE INDEX events_global_position_key ON events (global_position);
CREATE UNIQUE INDEX events_event_id_key ON events (event_id);
CREATE INDEX events_commit_order_idx ON events (transaction_id, global_position);

-- Aggregate snapshots, written by postgres-es every N events (SNAPSHOT_EVERY).
CREATE TABLE snapshots
(
    aggregate_type   text                                 NOT NULL,
    aggregate_id     text                                 NOT NULL,
    last_sequence    bigint CHECK (last_sequence >= 0)    NOT NULL,
    current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
    payload          json                                 NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
);
