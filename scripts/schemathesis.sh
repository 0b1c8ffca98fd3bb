#!/usr/bin/env bash
# Property-based API testing: runs schemathesis (from PyPI) against the running command and
# query APIs, driven by their own /openapi.json, and fails on any 5xx, any response that
# breaks its documented schema, or an undocumented content type. Generated strings may hold
# NUL and every other control character (path and query parameters included); the exhaustive
# control-byte cases are in tests/tests/review_query.rs.
#
# Sets up what it needs: PostgreSQL, a scratch `ledger_schemathesis` database (migrated), an
# API key with the write and read scopes (no rate limit for this run), both APIs on free
# ports, and schemathesis itself (pip, pinned) when missing. Expects the debug binaries
# (scripts/test.sh builds them; this script builds them when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/postgres.sh
. scripts/postgres.sh

SCHEMATHESIS_VERSION=4.32.5
ensure_postgres
ADMIN_URL=$(admin_url)
bin="${CARGO_TARGET_DIR:-target}/debug"
[ -x "$bin/ledger-query" ] || cargo build --workspace --bins --locked
if ! schemathesis --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
  log "installing schemathesis $SCHEMATHESIS_VERSION from PyPI"
  python3 -m pip install --quiet "schemathesis==$SCHEMATHESIS_VERSION"
fi

psql "$ADMIN_URL" -qc 'DROP DATABASE IF EXISTS ledger_schemathesis WITH (FORCE)' >/dev/null
psql "$ADMIN_URL" -qc 'CREATE DATABASE ledger_schemathesis' >/dev/null
export DATABASE_URL="${ADMIN_URL%/*}/ledger_schemathesis"
export LOG_FORMAT=json RUST_LOG=warn AUTH_MODE=api-keys RATE_LIMIT_PER_SECOND=0 READ_WAIT_TIMEOUT=50ms
# A key-encryption key for this scratch database only (ADR 0019).
export PII_KEK="schemathesis:$(head -c 32 /dev/urandom | base64)"
"$bin/ledger-command" migrate 2>/dev/null
key=$("$bin/ledger-admin" --json keys create --name schemathesis --scope write,read,admin,export |
  sed -n 's/.*"key": "\(lk_[0-9a-f_]*\)".*/\1/p')

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
command_addr="127.0.0.1:$(free_port)"
query_addr="127.0.0.1:$(free_port)"
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null; wait "${pids[@]}" 2>/dev/null; psql "$ADMIN_URL" -qc "DROP DATABASE IF EXISTS ledger_schemathesis WITH (FORCE)" >/dev/null 2>&1' EXIT
COMMAND_LISTEN_ADDR=$command_addr "$bin/ledger-command" serve & pids+=($!)
QUERY_LISTEN_ADDR=$query_addr "$bin/ledger-query" & pids+=($!)
"$bin/ledger-projector" --listen-addr "127.0.0.1:$(free_port)" & pids+=($!)
for addr in "$command_addr" "$query_addr"; do
  for _ in $(seq 100); do curl -sf "http://$addr/readyz" >/dev/null && break; sleep 0.2; done
done

status=0
for addr in "$command_addr" "$query_addr"; do
  log "schemathesis against http://$addr/openapi.json"
  schemathesis run "http://$addr/openapi.json" \
    --checks not_a_server_error,response_schema_conformance,content_type_conformance \
    --header "Authorization: Bearer $key" \
    --max-examples "${SCHEMATHESIS_MAX_EXAMPLES:-25}" \
    --generation-allow-x00 true \
    --generation-codec utf-8 \
    --phases coverage,fuzzing \
    --seed 1 \
    --no-color || status=1
done
exit $status
