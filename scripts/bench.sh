#!/usr/bin/env bash
# Runs a benchmark against the real processes (release build), with its ceiling measured in
# the same run. Sets up PostgreSQL and an Apache Kafka broker (scripts/kafka.sh) like scripts/test.sh.
#
# Usage: scripts/bench.sh relay [--accounts N] [--events-per-account N] [--partitions N]
#        scripts/bench.sh rebuild [--accounts N] [--events-per-account N] [--projection P]
#        scripts/bench.sh commands [--accounts N] [--seconds N]
#        scripts/bench.sh visible [--accounts N] [--rate N] [--seconds N] [--from-store | --compare] [--linger 5ms]
#        scripts/bench.sh rejoin [--rounds N]
#        scripts/bench.sh transfers [--accounts N] [--rate N] [--seconds N] [--concurrency N]
#        scripts/bench.sh reads [--accounts N] [--seconds N] [--connections N]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/postgres.sh
. scripts/postgres.sh
# shellcheck source=scripts/kafka.sh
. scripts/kafka.sh

ensure_postgres
ADMIN_URL=$(admin_url)
KAFKA_DIR=$(mktemp -d -t ledger-bench-kafka.XXXXXX)
trap 'kafka_stop "$KAFKA_DIR"; rm -rf "$KAFKA_DIR"; drop_test_databases "$ADMIN_URL"' EXIT
if [ "$(psql "$ADMIN_URL" -qAtc "SELECT 1 FROM pg_database WHERE datname = 'ledger_test'")" != "1" ]; then
  psql "$ADMIN_URL" -qc 'CREATE DATABASE ledger_test' >/dev/null
fi
export DATABASE_URL="${ADMIN_URL%/*}/ledger_test"
ensure_kafka
LEDGER_TEST_KAFKA=$(kafka_start "$KAFKA_DIR")
export LEDGER_TEST_KAFKA LEDGER_TEST_KAFKA_LOG="$KAFKA_DIR/broker.log"
if ! command -v wrk >/dev/null; then
  echo "installing wrk (HTTP load generator, Debian package)"
  apt-get install -y wrk >/dev/null || sudo apt-get install -y wrk >/dev/null
fi
cargo build --release --workspace --bins --locked
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -sr)"
"${CARGO_TARGET_DIR:-target}"/release/ledger-bench "$@"
