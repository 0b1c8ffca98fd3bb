-- Read models, built by the projector from the log; the query API reads only these.
--
-- Exactly once in effect: every change to a read model is committed in the same
-- transaction as its projection's guard for the aggregate (projection_guards), so a
-- duplicate or a re-delivery after a crash is recognised by its sequence and skipped.

-- One row per account: what GET /v1/accounts/{id} answers.
CREATE TABLE account_summaries
(
    account_id    text PRIMARY KEY,
    owner         text        NOT NULL,
    currency      text        NOT NULL,
    balance       bigint      NOT NULL,
    status        text        NOT NULL,
    version       bigint      NOT NULL,
    last_position bigint      NOT NULL,
    updated_at    timestamptz NOT NULL
);

-- One row per money movement (and opening/closing), with the running balance.
CREATE TABLE account_statements
(
    account_id      text        NOT NULL,
    sequence        bigint      NOT NULL,
    global_position bigint      NOT NULL,
    event_id        uuid        NOT NULL,
    entry_type      text        NOT NULL,
    amount          bigint      NOT NULL,
    balance_after   bigint      NOT NULL,
    reference       text,
    recorded_at     timestamptz NOT NULL,
    PRIMARY KEY (account_id, sequence)
);

-- Cross-aggregate: per owner and currency, how many accounts and how much money.
CREATE TABLE owner_totals
(
    owner         text        NOT NULL,
    currency      text        NOT NULL,
    accounts      bigint      NOT NULL,
    open_accounts bigint      NOT NULL,
    balance       bigint      NOT NULL,
    last_position bigint      NOT NULL,
    updated_at    timestamptz NOT NULL,
    PRIMARY KEY (owner, currency)
);

-- Per projection and aggregate: the last sequence handled (applied or dead-lettered).
CREATE TABLE projection_guards
(
    projection    text   NOT NULL,
    aggregate_id  text   NOT NULL,
    last_sequence bigint NOT NULL,
    last_position bigint NOT NULL,
    PRIMARY KEY (projection, aggregate_id)
);

-- Per projection: progress, for status and (when reading the store directly) the cursor.
CREATE TABLE projection_checkpoints
(
    projection      text PRIMARY KEY,
    transaction_id  xid8,
    global_position bigint      NOT NULL DEFAULT 0,
    last_position   bigint      NOT NULL DEFAULT 0,
    last_event_at   timestamptz,
    events_applied  bigint      NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Per consumer group and partition: the last Kafka offset applied (for status and lag).
CREATE TABLE projection_partitions
(
    consumer_group text        NOT NULL,
    topic          text        NOT NULL,
    partition      integer     NOT NULL,
    last_offset    bigint      NOT NULL,
    last_position  bigint      NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);

-- Events a projection could not handle, with why, the raw message and where it was.
CREATE TABLE dead_letters
(
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    projection      text        NOT NULL,
    reason          text        NOT NULL,
    event_id        uuid,
    aggregate_id    text,
    sequence        bigint,
    global_position bigint,
    event_type      text,
    event_version   text,
    source          text        NOT NULL,
    kafka_partition integer,
    kafka_offset    bigint,
    raw_headers     json,
    raw_value       text,
    status          text        NOT NULL DEFAULT 'pending',
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX dead_letters_pending_idx ON dead_letters (projection, id) WHERE status = 'pending';

-- The owner_totals projection's own memory of which account belongs to whom (events after
-- the opening do not repeat the owner), so it can be rebuilt without the other models.
CREATE TABLE owner_total_accounts
(
    account_id text PRIMARY KEY,
    owner      text   NOT NULL,
    currency   text   NOT NULL,
    balance    bigint NOT NULL,
    open       boolean NOT NULL
);
