-- Per-subject data keys for crypto-shredding personal data (issue 17, ADR 0019). Each row
-- is one version of one data subject's data key, stored only wrapped (AEAD-sealed) by a
-- key-encryption key (KEK) from configuration; `kek_id` names that KEK. Erasing a subject
-- deletes the wrapped bytes of every version and keeps the row as a tombstone, so an
-- erased subject (erasing again answers the same) can be told from one never known (404).
-- Statements on this table live in the `ledger-pii` crate (`pii/src/store.rs`).
CREATE TABLE subject_keys
(
    subject_id   uuid        NOT NULL,
    key_version  integer     NOT NULL CHECK (key_version > 0),
    kek_id       text        NOT NULL,
    wrapped_key  bytea,
    created_at   timestamptz NOT NULL DEFAULT now(),
    rewrapped_at timestamptz,
    erased_at    timestamptz,
    PRIMARY KEY (subject_id, key_version),
    -- Live: wrapped bytes and no erasure time. Erased: neither bytes nor a way back.
    CONSTRAINT subject_keys_live_or_erased CHECK ((wrapped_key IS NULL) = (erased_at IS NOT NULL))
);

-- KEK rotation walks the live keys not yet under the current KEK.
CREATE INDEX subject_keys_live_by_kek ON subject_keys (kek_id, subject_id, key_version)
    WHERE erased_at IS NULL;
