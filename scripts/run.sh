#!/usr/bin/env bash
# Runs the ledger locally: makes sure PostgreSQL is up, creates the `ledger` database,
# applies migrations, then serves the command API on http://127.0.0.1:8080 (Ctrl-C stops it).
# With KAFKA_BROKERS set (e.g. KAFKA_BROKERS=127.0.0.1:9092) it also runs the relay, which
# publishes every event to that broker. Settings come from the environment (README.md,
# "Configuration").
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/postgres.sh
. scripts/postgres.sh

ensure_postgres
ADMIN_URL=$(admin_url)
if [ "$(psql "$ADMIN_URL" -qAtc "SELECT 1 FROM pg_database WHERE datname = 'ledger'")" != "1" ]; then
  log "creating database ledger"
  psql "$ADMIN_URL" -qc 'CREATE DATABASE ledger' >/dev/null
fi
export DATABASE_URL=${LEDGER_DATABASE_URL:-${ADMIN_URL%/*}/ledger}
export LOG_FORMAT=${LOG_FORMAT:-pretty}

cargo build --release --bins --locked
"${CARGO_TARGET_DIR:-target}"/release/ledger-command migrate
if [ -n "${KAFKA_BROKERS:-}" ]; then
  log "relay publishing to $KAFKA_BROKERS; status on http://${RELAY_LISTEN_ADDR:-127.0.0.1:8081}/status"
  "${CARGO_TARGET_DIR:-target}"/release/ledger-relay &
  relay_pid=$!
  trap 'kill -TERM "$relay_pid" 2>/dev/null; wait "$relay_pid" 2>/dev/null' EXIT
else
  log "no KAFKA_BROKERS: events stay in PostgreSQL (no relay)"
fi
log "command API on http://${COMMAND_LISTEN_ADDR:-127.0.0.1:8080}"
"${CARGO_TARGET_DIR:-target}"/release/ledger-command serve
