#!/usr/bin/env bash
# Measures what the claims of idempotency keys and transfer steps cost a group-commit
# statement: pgbench appends batches of N events (no key, no step: the common case, plus
# one keyed batch) to `events` with the claims as per-row triggers (before migration
# 20261130060001), as statement-level triggers over a transition table (after), and with
# no claim triggers at all (the floor). One scratch database, migrated by ledger-command.
#
# Usage: scripts/bench-claims.sh [--rows N] [--seconds N] [--clients N]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/postgres.sh
. scripts/postgres.sh

ROWS=64 SECONDS_EACH=10 CLIENTS=2
while [ $# -gt 0 ]; do
  case "$1" in
    --rows) ROWS=$2; shift 2 ;;
    --seconds) SECONDS_EACH=$2; shift 2 ;;
    --clients) CLIENTS=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

ensure_postgres
ADMIN_URL=$(admin_url)
DB=ledger_bench_claims
URL="${ADMIN_URL%/*}/$DB"
psql "$ADMIN_URL" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB" >/dev/null
trap 'psql "$ADMIN_URL" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null' EXIT
cargo build --quiet --bin ledger-command --locked
DATABASE_URL=$URL LOG_FORMAT=pretty "${CARGO_TARGET_DIR:-target}/debug/ledger-command" migrate >/dev/null

SCRIPT=$(mktemp -t claims.XXXXXX.sql)
cat >"$SCRIPT" <<SQL
INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
SELECT 'account', gen_random_uuid()::text, 1, 'MoneyDeposited', '2',
       '{"type":"MoneyDeposited","amount":1,"currency":"EUR","reference":null}'::json,
       json_build_object('request_id', gen_random_uuid()::text, 'correlation_id', gen_random_uuid()::text,
                         'causation_id', gen_random_uuid()::text, 'command_id', gen_random_uuid()::text)
  FROM generate_series(1, $ROWS);
SQL

# The per-row claims exactly as the migrations before 20261130060001 defined them.
PER_ROW=$(cat <<'SQL'
DROP TRIGGER IF EXISTS events_claim_idempotency_keys ON events;
DROP TRIGGER IF EXISTS events_claim_transfer_steps ON events;
CREATE OR REPLACE FUNCTION claim_idempotency_key() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    key   text := NEW.metadata ->> 'idempotency_key';
    scope text := coalesce(NEW.metadata ->> 'idempotency_scope', 'legacy');
BEGIN
    IF key IS NULL THEN RETURN NULL; END IF;
    INSERT INTO idempotency_keys AS claimed (idempotency_key, client_scope, request_hash,
                                             aggregate_type, aggregate_id, last_sequence, last_position)
    VALUES (key, scope, coalesce(NEW.metadata ->> 'request_hash', ''), NEW.aggregate_type,
            NEW.aggregate_id, NEW.sequence, NEW.global_position)
    ON CONFLICT (idempotency_key, client_scope) DO UPDATE
        SET last_sequence = greatest(claimed.last_sequence, EXCLUDED.last_sequence),
            last_position = greatest(claimed.last_position, EXCLUDED.last_position)
        WHERE claimed.transaction_id = pg_current_xact_id()
          AND claimed.aggregate_type = EXCLUDED.aggregate_type
          AND claimed.aggregate_id = EXCLUDED.aggregate_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'idempotency key is already used by another request' USING ERRCODE = 'unique_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION claim_transfer_step() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    step_id text := NEW.metadata ->> 'transfer_step';
BEGIN
    IF step_id IS NULL THEN RETURN NULL; END IF;
    INSERT INTO transfer_steps (step, aggregate_type, aggregate_id, sequence, global_position, event_type, payload)
    VALUES (step_id, NEW.aggregate_type, NEW.aggregate_id, NEW.sequence, NEW.global_position, NEW.event_type, NEW.payload)
    ON CONFLICT (step) DO NOTHING;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'transfer step % is already taken', step_id USING ERRCODE = 'unique_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER events_claim_idempotency_key AFTER INSERT ON events FOR EACH ROW EXECUTE FUNCTION claim_idempotency_key();
CREATE TRIGGER events_claim_transfer_step AFTER INSERT ON events FOR EACH ROW EXECUTE FUNCTION claim_transfer_step();
SQL
)
STATEMENT=$(cat <<'SQL'
DROP TRIGGER IF EXISTS events_claim_idempotency_key ON events;
DROP TRIGGER IF EXISTS events_claim_transfer_step ON events;
CREATE TRIGGER events_claim_idempotency_keys AFTER INSERT ON events REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION claim_idempotency_keys();
CREATE TRIGGER events_claim_transfer_steps AFTER INSERT ON events REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION claim_transfer_steps();
SQL
)
NONE=$(cat <<'SQL'
DROP TRIGGER IF EXISTS events_claim_idempotency_key ON events;
DROP TRIGGER IF EXISTS events_claim_transfer_step ON events;
DROP TRIGGER IF EXISTS events_claim_idempotency_keys ON events;
DROP TRIGGER IF EXISTS events_claim_transfer_steps ON events;
SQL
)

echo "machine: $(nproc) cores; $ROWS events per statement, $CLIENTS clients, ${SECONDS_EACH}s each"
printf '| claims | statements/s | events/s | ms per statement |\n|---|---:|---:|---:|\n'
for variant in per_row statement none per_row statement none; do
  case $variant in
    per_row) PGOPTIONS="-c client_min_messages=warning" psql "$URL" -q -v ON_ERROR_STOP=1 -c "$PER_ROW" >/dev/null ;;
    statement) PGOPTIONS="-c client_min_messages=warning" psql "$URL" -q -v ON_ERROR_STOP=1 -c "$STATEMENT" >/dev/null ;;
    none) PGOPTIONS="-c client_min_messages=warning" psql "$URL" -q -v ON_ERROR_STOP=1 -c "$NONE" >/dev/null ;;
  esac
  psql "$URL" -qc "TRUNCATE events, idempotency_keys, transfer_steps" -c "VACUUM ANALYZE events" >/dev/null 2>&1 || true
  tps=$(pgbench -n -f "$SCRIPT" -c "$CLIENTS" -j "$CLIENTS" -T "$SECONDS_EACH" "$URL" 2>/dev/null \
    | awk '/^tps = / {print $3}')
  awk -v v="$variant" -v t="$tps" -v r="$ROWS" 'BEGIN { printf "| %s | %.0f | %.0f | %.3f |\n", v, t, t * r, 1000 / t }'
done
rm -f "$SCRIPT"
