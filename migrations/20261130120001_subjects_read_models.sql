-- Personal data in the read models (issue 17, ADR 0019): a subject's name lives in ONE
-- read-model row (`subjects`), so an erasure rewrites one row; account summaries carry the
-- subject id and readers join `subjects` for the name; totals are keyed by subject id.
--
-- Existing rows: a migration cannot decrypt, and the old rows name owners in clear. So the
-- changed models are emptied here (with their guards and checkpoints) and marked stale when
-- the store holds events: the projector then says `ledger-admin rebuild all` is needed (or
-- rebuilds them itself with PROJECTOR_AUTO_REBUILD), and the rebuild from the log writes
-- the right rows (legacy owners of v1 openings become legacy subjects). Statements keep
-- their rows: a plain (v2) reference stays as it was.

-- The data subjects: the decrypted name, or the erased marker `[erased]`.
CREATE TABLE subjects
(
    subject_id    uuid PRIMARY KEY,
    -- The name in clear, or `[erased]` once the subject is erased.
    name          text        NOT NULL,
    -- Known only from the `owner` of v1 account openings (no key, no SubjectRegistered).
    legacy        boolean     NOT NULL,
    -- SubjectRegistered's time (legacy: the earliest opening); NULL only while an erasure
    -- has been projected before the registration (two partitions).
    registered_at timestamptz,
    erased_at     timestamptz,
    last_position bigint      NOT NULL,
    updated_at    timestamptz NOT NULL
);

-- Account summaries name their subject; the name is read from `subjects`.
TRUNCATE account_summaries;
ALTER TABLE account_summaries
    DROP COLUMN owner,
    ADD COLUMN subject_id uuid NOT NULL;
CREATE INDEX account_summaries_subject_idx ON account_summaries (subject_id);

-- Statement entries whose reference was encrypted name the subject whose key sealed it, so
-- the subject's erasure finds them (and only them) to write the marker.
ALTER TABLE account_statements
    ADD COLUMN data_subject uuid;
CREATE INDEX account_statements_data_subject_idx ON account_statements (data_subject)
    WHERE data_subject IS NOT NULL;

-- Totals per subject id (never per name).
DROP TABLE owner_totals;
DROP TABLE owner_total_accounts;
CREATE TABLE subject_totals
(
    subject_id    uuid        NOT NULL,
    currency      text        NOT NULL,
    accounts      bigint      NOT NULL,
    open_accounts bigint      NOT NULL,
    balance       numeric     NOT NULL,
    last_position bigint      NOT NULL,
    updated_at    timestamptz NOT NULL,
    PRIMARY KEY (subject_id, currency)
);
-- The subject_totals projection's own memory of which account belongs to which subject.
CREATE TABLE subject_total_accounts
(
    account_id text PRIMARY KEY,
    subject_id uuid    NOT NULL,
    currency   text    NOT NULL,
    balance    bigint  NOT NULL,
    open       boolean NOT NULL
);

-- The emptied or new projections start again from nothing...
DELETE FROM projection_guards WHERE projection IN ('account_summary', 'owner_totals');
DELETE FROM projection_checkpoints WHERE projection IN ('account_summary', 'owner_totals');
UPDATE dead_letters SET projection = 'subject_totals' WHERE projection = 'owner_totals';
DELETE FROM projection_versions WHERE projection = 'owner_totals';
-- ...and are stale when there is a log to rebuild them from.
UPDATE projection_versions SET version = 0 WHERE projection = 'account_summary';
INSERT INTO projection_versions (projection, version)
SELECT p, 0 FROM unnest(ARRAY ['subjects', 'subject_totals']) AS p
 WHERE EXISTS (SELECT 1 FROM events)
ON CONFLICT (projection) DO UPDATE SET version = 0;

-- A subject's export reads the transfers of its accounts.
CREATE INDEX transfers_from_account_idx ON transfers (from_account);
CREATE INDEX transfers_to_account_idx ON transfers (to_account);
