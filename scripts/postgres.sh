# Shared by scripts/run.sh and scripts/test.sh: make sure PostgreSQL runs on 127.0.0.1:5432
# and find a URL of a role that may create databases. Source it; it defines functions only.

log() { printf '\033[1m[%s]\033[0m %s\n' "$(basename "$0")" "$*" >&2; }

PGHOST_ADDR=${PGHOST_ADDR:-127.0.0.1}
PGPORT_NUM=${PGPORT_NUM:-5432}

pg_up() { pg_isready -q -h "$PGHOST_ADDR" -p "$PGPORT_NUM" 2>/dev/null; }

# The newest installed server's bin directory (the Debian layout), or nothing.
pg_server_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | while read -r d; do [ -x "$d/postgres" ] && echo "$d"; done | tail -n 1; }

# Makes sure a server answers on $PGHOST_ADDR:$PGPORT_NUM. A machine may have only the client
# tools (pg_isready, psql): then the server is installed from Debian's packages. An installed
# server with no cluster gets one; a stopped cluster is started.
ensure_postgres() {
  if pg_up; then return 0; fi
  if [ -z "$(pg_server_bin)" ]; then
    log "no PostgreSQL server installed: installing it from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq postgresql postgresql-client >/dev/null
  fi
  local bin version
  bin=$(pg_server_bin)
  [ -n "$bin" ] || { log "PostgreSQL server binaries not found after installing"; exit 1; }
  version=$(basename "$(dirname "$bin")")
  command -v pg_isready >/dev/null 2>&1 || { PATH="$bin:$PATH"; export PATH; }
  if ! pg_up; then
    log "PostgreSQL $version is not running: starting it"
    if [ ! -f "/etc/postgresql/$version/main/postgresql.conf" ]; then
      log "creating cluster $version/main"
      pg_createcluster "$version" main >/dev/null
    fi
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  fi
  for _ in $(seq 1 60); do pg_up && break; sleep 0.5; done
  pg_up || { log "PostgreSQL did not come up on $PGHOST_ADDR:$PGPORT_NUM"; exit 1; }
}

# The URL of a role that may create databases. Trust auth (this machine kind) needs no
# password; a stock Debian install asks for one, so give the postgres role a known one.
admin_url() {
  if [ -n "${DATABASE_URL:-}" ]; then echo "$DATABASE_URL"; return; fi
  local trust="postgres://postgres@$PGHOST_ADDR:$PGPORT_NUM/postgres"
  if psql "$trust" -qAtc 'select 1' >/dev/null 2>&1; then echo "$trust"; return; fi
  local with_password="postgres://postgres:postgres@$PGHOST_ADDR:$PGPORT_NUM/postgres"
  if ! psql "$with_password" -qAtc 'select 1' >/dev/null 2>&1; then
    log "setting a password on the postgres role (local peer authentication)"
    su postgres -c "psql -qc \"ALTER ROLE postgres PASSWORD 'postgres'\"" >/dev/null
  fi
  echo "$with_password"
}

# Drops the per-test databases (ledger_test_<id>, ledger_e2e_<id>) left by earlier runs. A
# database someone is connected to (another test run on the same server) is left alone.
drop_test_databases() {
  local admin=$1
  psql "$admin" -qAtc "SELECT datname FROM pg_database d WHERE datname ~ '^ledger_(test|e2e)_'
                         AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.datname = d.datname)" 2>/dev/null |
    while read -r db; do psql "$admin" -qc "DROP DATABASE IF EXISTS \"$db\"" >/dev/null 2>&1 || true; done
}
