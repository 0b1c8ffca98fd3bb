#!/usr/bin/env bash
# Runs the ledger locally: makes sure PostgreSQL is up, creates the `ledger` database,
# applies migrations, then serves the command API on http://127.0.0.1:8080 (Ctrl-C stops it).
# Settings come from the environment (see README.md, "Configuration").
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
./target/release/ledger-command migrate
log "command API on http://${COMMAND_LISTEN_ADDR:-127.0.0.1:8080}"
exec ./target/release/ledger-command serve
