#!/usr/bin/env bash
# Profiles the command API at one client with its accounts cached: seeds 1,000 accounts in
# a scratch database, starts the release ledger-command, warms up, then runs
# `perf record -a -g` for 8 s while `wrk -t1 -c1` posts deposits, and prints wrk's rate and
# latency and the CPU shares by process (BENCHMARKS.md, "Where the 1-client time goes").
#
# Usage: scripts/profile-one-client.sh        (needs perf and wrk; PostgreSQL as scripts/postgres.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/postgres.sh
. scripts/postgres.sh
ensure_postgres
ADMIN_URL=$(admin_url)
DB=ledger_profile
export DATABASE_URL="${ADMIN_URL%/*}/$DB"
WORK=$(mktemp -d -t ledger-profile.XXXXXX)
psql "$ADMIN_URL" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB" >/dev/null
cargo build --release --bin ledger-command --locked
BIN="${CARGO_TARGET_DIR:-target}/release/ledger-command"
"$BIN" migrate >/dev/null 2>&1
psql "$DATABASE_URL" -qc "
INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
SELECT 'account', id, 1, 'AccountOpened', '1',
       json_build_object('type','AccountOpened','owner','bench','currency','EUR'), '{}'::json
  FROM (SELECT gen_random_uuid()::text id FROM generate_series(1, 1000)) a;
INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
SELECT 'account', aggregate_id, 2, 'MoneyDeposited', '2',
       json_build_object('type','MoneyDeposited','amount',1000000,'currency','EUR','reference',null), '{}'::json
  FROM events WHERE sequence = 1;" >/dev/null
psql "$DATABASE_URL" -qc "VACUUM ANALYZE events" >/dev/null
ids=$(psql "$DATABASE_URL" -Atc "SELECT string_agg('\"' || aggregate_id || '\"', ',') FROM events WHERE sequence = 1")
cat >"$WORK/deposits.lua" <<LUA
local ids = {$ids}
local i = 0
wrk.method = "POST"
wrk.body = '{"amount": 1, "currency": "EUR"}'
wrk.headers["Content-Type"] = "application/json"
request = function()
  i = i + 7919
  return wrk.format(nil, "/v1/accounts/" .. ids[(i % #ids) + 1] .. "/deposits")
end
LUA
AUTH_MODE=disabled RUST_LOG=warn COMMAND_LISTEN_ADDR=127.0.0.1:18080 "$BIN" >"$WORK/command.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; psql "$ADMIN_URL" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null; rm -rf "$WORK"' EXIT
for _ in $(seq 1 50); do curl -sf http://127.0.0.1:18080/healthz >/dev/null && break; sleep 0.2; done
wrk -t1 -c1 -d3s -s "$WORK/deposits.lua" http://127.0.0.1:18080/ >/dev/null   # every account cached
wrk -t1 -c1 -d12s --latency -s "$WORK/deposits.lua" http://127.0.0.1:18080/ >"$WORK/wrk.txt" &
sleep 1
perf record -a -g -o "$WORK/perf.data" -- sleep 8 >/dev/null 2>&1
wait %2 || true
grep -E "Requests/sec|50%|99%" "$WORK/wrk.txt"
perf report -i "$WORK/perf.data" --sort comm --stdio 2>/dev/null | grep -E "^ +[0-9]" | head -6
perf report -i "$WORK/perf.data" --comm tokio-rt-worker --sort dso --stdio --no-children 2>/dev/null \
  | grep -E "^ +[0-9]" | head -4
