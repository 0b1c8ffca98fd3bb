#!/usr/bin/env bash
# Runs every test of the ledger on this machine, setting up what the tests need first:
#   1. PostgreSQL on 127.0.0.1:5432 (installed from Debian's packages and started if missing),
#   2. a `ledger_test` database with every migration applied (through `ledger-command migrate`),
#   3. Apache Kafka (scripts/kafka.sh: installed once per machine under ~/.local/kafka from
#      Maven Central, with Java, Maven and kcat from Debian's packages when missing), one
#      single-node broker for the whole run on free loopback ports; each test keeps to its own
#      topic and consumer groups, and a test that stops the broker starts one of its own,
#   4. the workspace binaries (the end-to-end tests start them as processes),
# then runs the whole test suite (cargo-nextest when installed, cargo test otherwise) and,
# when no filter is given, schemathesis against both HTTP APIs (scripts/schemathesis.sh).
# Each test creates its own database next to `ledger_test`; they are dropped at the end.
#
# Usage: scripts/test.sh [extra arguments for the test runner, e.g. a test name filter]
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/postgres.sh
. scripts/postgres.sh
# shellcheck source=scripts/kafka.sh
. scripts/kafka.sh

ensure_postgres
ADMIN_URL=$(admin_url)
BASE_URL=${ADMIN_URL%/*}
drop_test_databases "$ADMIN_URL"
KAFKA_DIR=$(mktemp -d -t ledger-kafka.XXXXXX)
cleanup() {
  kafka_stop "$KAFKA_DIR"
  rm -rf "$KAFKA_DIR"
  drop_test_databases "$ADMIN_URL"
}
trap cleanup EXIT

# A scratch database, made afresh each run (so no migration from another checkout lingers).
log "creating database ledger_test"
psql "$ADMIN_URL" -qc 'DROP DATABASE IF EXISTS ledger_test WITH (FORCE)' >/dev/null
psql "$ADMIN_URL" -qc 'CREATE DATABASE ledger_test' >/dev/null
export DATABASE_URL="$BASE_URL/ledger_test"

ensure_kafka
log "starting the run's Kafka broker (log: $KAFKA_DIR/broker.log)"
LEDGER_TEST_KAFKA=$(kafka_start "$KAFKA_DIR")
export LEDGER_TEST_KAFKA LEDGER_TEST_KAFKA_LOG="$KAFKA_DIR/broker.log"
log "Kafka broker at $LEDGER_TEST_KAFKA"

log "building the workspace binaries"
cargo build --workspace --bins --locked

log "applying migrations to ledger_test"
LOG_FORMAT=pretty "${CARGO_TARGET_DIR:-target}/debug/ledger-command" migrate

log "running the tests"
status=0
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast "$@" || status=$?
else
  cargo test --workspace --locked --no-fail-fast "$@" || status=$?
fi

# With no filter given, the whole suite: also the property-based API tests.
if [ $# -eq 0 ]; then
  log "running schemathesis against both HTTP APIs"
  scripts/schemathesis.sh || status=1
fi
exit $status
