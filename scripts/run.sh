#!/usr/bin/env bash
# Runs the whole ledger locally: makes sure PostgreSQL is up, creates the `ledger` database,
# applies migrations, then starts
#   - the projector (status on http://127.0.0.1:8082/status),
#   - the query API on http://127.0.0.1:8083,
#   - the command API on http://127.0.0.1:8080 (in the foreground; Ctrl-C stops everything).
# Without KAFKA_BROKERS the projector reads the event store directly, so PostgreSQL is all
# it needs. With KAFKA_BROKERS=host:port the relay publishes every event to that existing
# cluster and the projector consumes it there. With KAFKA=local it starts a local Apache
# Kafka broker first (scripts/kafka.sh, data kept in ~/.local/ledger-kafka between runs, on
# 127.0.0.1:9092 unless KAFKA_PORT says otherwise) and uses that. Settings come from the
# environment (README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/postgres.sh
. scripts/postgres.sh

ensure_postgres
ADMIN_URL=$(admin_url)
if [ "${KAFKA:-}" = local ] && [ -z "${KAFKA_BROKERS:-}" ]; then
  # shellcheck source=scripts/kafka.sh
  . scripts/kafka.sh
  KAFKA_DATA=${KAFKA_DATA:-$HOME/.local/ledger-kafka}
  KAFKA_BROKERS=$(kafka_start "$KAFKA_DATA" keep "${KAFKA_PORT:-9092}" "${KAFKA_CONTROLLER_PORT:-9093}")
  export KAFKA_BROKERS
  log "local Kafka broker at $KAFKA_BROKERS (stop it with: scripts/kafka.sh stop $KAFKA_DATA)"
fi
if [ "$(psql "$ADMIN_URL" -qAtc "SELECT 1 FROM pg_database WHERE datname = 'ledger'")" != "1" ]; then
  log "creating database ledger"
  psql "$ADMIN_URL" -qc 'CREATE DATABASE ledger' >/dev/null
fi
export DATABASE_URL=${LEDGER_DATABASE_URL:-${ADMIN_URL%/*}/ledger}
# The key-encryption key of personal data (ADR 0019). Without PII_KEK in the environment a
# local one is made once and kept outside the checkout: losing it makes every data subject's
# name and references unreadable, as if each had been erased.
if [ -z "${PII_KEK:-}" ]; then
  kek_file=${LEDGER_PII_KEK_FILE:-$HOME/.local/ledger/pii_kek}
  if [ ! -s "$kek_file" ]; then
    mkdir -p "$(dirname "$kek_file")"
    (umask 077 && printf 'local-%s:%s\n' "$(date +%Y%m%d)" "$(head -c 32 /dev/urandom | base64)" >"$kek_file")
    log "made a local key-encryption key in $kek_file (keep it: without it names are gone)"
  fi
  PII_KEK=$(cat "$kek_file")
  export PII_KEK
fi
export LOG_FORMAT=${LOG_FORMAT:-pretty}
bin="${CARGO_TARGET_DIR:-target}/release"

cargo build --release --bins --locked
"$bin/ledger-command" migrate
if [ "${AUTH_MODE:-api-keys}" = api-keys ]; then
  key=$("$bin/ledger-admin" --json keys create --name "local-$(date +%s)" --scope write,read,admin |
    sed -n 's/.*"key": "\(lk_[0-9a-f_]*\)".*/\1/p')
  log "API key for this run (write, read, admin): $key"
  log "  e.g. curl -H 'Authorization: Bearer $key' ...   (revoke with ledger-admin keys revoke)"
fi

pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null; wait "${pids[@]}" 2>/dev/null' EXIT
if [ -n "${KAFKA_BROKERS:-}" ]; then
  log "relay publishing to $KAFKA_BROKERS; status on http://${RELAY_LISTEN_ADDR:-127.0.0.1:8081}/status"
  "$bin/ledger-relay" & pids+=($!)
else
  log "no KAFKA_BROKERS: the projector reads the event store directly"
fi
"$bin/ledger-projector" & pids+=($!)
"$bin/ledger-query" & pids+=($!)
log "query API on http://${QUERY_LISTEN_ADDR:-127.0.0.1:8083}; command API on http://${COMMAND_LISTEN_ADDR:-127.0.0.1:8080}"
"$bin/ledger-command" serve
