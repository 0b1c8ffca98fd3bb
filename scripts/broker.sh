# Shared by scripts/test.sh and scripts/bench.sh: the tansu Kafka-protocol broker, installed
# once per machine (outside the checkout, so fresh clones reuse it). Source it.

# Installs tansu 0.6.0 into $TANSU_ROOT (default ~/.local/tansu) unless it is there, and
# exports TANSU_BIN for the tests, which start one broker per test on a free loopback port.
ensure_tansu() {
  TANSU_ROOT=${TANSU_ROOT:-$HOME/.local/tansu}
  export TANSU_BIN="$TANSU_ROOT/bin/tansu"
  if ! "$TANSU_BIN" --version 2>/dev/null | grep -q '0\.6\.0'; then
    log "installing the tansu broker into $TANSU_ROOT (once per machine; about 20 minutes)"
    cargo install tansu@0.6.0 --locked --features dynostore,libsql --root "$TANSU_ROOT"
  fi
}
