#!/usr/bin/env bash
# Runs a benchmark against the real processes (release build), with its ceiling measured in
# the same run. Sets up PostgreSQL and the broker like scripts/test.sh.
#
# Usage: scripts/bench.sh relay [--accounts N] [--events-per-account N] [--partitions N]
#        scripts/bench.sh rebuild [--accounts N] [--events-per-account N] [--projection P]
#        scripts/bench.sh commands [--accounts N] [--seconds N]
#        scripts/bench.sh visible [--accounts N] [--rate N] [--seconds N] [--from-store]
#        scripts/bench.sh reads [--accounts N] [--seconds N] [--connections N]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/postgres.sh
. scripts/postgres.sh
# shellcheck source=scripts/broker.sh
. scripts/broker.sh

ensure_postgres
ADMIN_URL=$(admin_url)
trap 'drop_test_databases "$ADMIN_URL"' EXIT
if [ "$(psql "$ADMIN_URL" -qAtc "SELECT 1 FROM pg_database WHERE datname = 'ledger_test'")" != "1" ]; then
  psql "$ADMIN_URL" -qc 'CREATE DATABASE ledger_test' >/dev/null
fi
export DATABASE_URL="${ADMIN_URL%/*}/ledger_test"
ensure_tansu
if ! command -v wrk >/dev/null; then
  echo "installing wrk (HTTP load generator, Debian package)"
  apt-get install -y wrk >/dev/null || sudo apt-get install -y wrk >/dev/null
fi
cargo build --release --workspace --bins --locked
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -sr)"
"${CARGO_TARGET_DIR:-target}"/release/ledger-bench "$@"
