#!/usr/bin/env bash
# Apache Kafka for the tests, the benchmarks and scripts/run.sh: one single-node KRaft broker
# (combined broker and controller) run from Maven Central's jars.
#
#   scripts/kafka.sh install            install the broker's classpath once per machine, outside
#                                       the checkout (default ~/.local/kafka/<version>); prints
#                                       the classpath directory
#   scripts/kafka.sh start DIR [keep [PORT CONTROLLER_PORT]]
#                                       format a fresh data directory DIR, start a broker on free
#                                       127.0.0.1 ports in the background, wait until it answers
#                                       a metadata request; prints its bootstrap address ("keep":
#                                       reuse DIR's data and ports from an earlier start)
#   scripts/kafka.sh stop DIR           SIGTERM, then SIGKILL after KAFKA_STOP_SECONDS (20)
#   scripts/kafka.sh exec DIR PORT CONTROLLER_PORT
#                                       format DIR if it is new, then exec the broker in the
#                                       foreground (the test harness holds it as its child so
#                                       it can kill and restart it on the same ports and data)
#
# Sourced (by test.sh, bench.sh, run.sh) it only defines the functions below.
#
# Settings: KAFKA_VERSION (pinned below), KAFKA_HOME (where the classpath goes),
# KAFKA_HEAP (default -Xms256m -Xmx512m).
#
# Kafka's published POM leaves out the SLF4J binding that its tarball ships; without one the
# broker logs nothing at all. Kafka 4.x still speaks SLF4J 1.7, so the binding is
# log4j-slf4j-impl (not log4j-slf4j2-impl, which SLF4J 1.7 ignores silently).

export KAFKA_VERSION=${KAFKA_VERSION:-4.2.0}
LOG4J_VERSION=${LOG4J_VERSION:-2.24.3}
KAFKA_HOME=${KAFKA_HOME:-$HOME/.local/kafka/$KAFKA_VERSION}
KAFKA_HEAP=${KAFKA_HEAP:--Xms256m -Xmx512m}

kafka_log() { printf '\033[1m[kafka]\033[0m %s\n' "$*" >&2; }

# Installs what is missing: Java and Maven (Debian's packages), kcat (the readiness probe and a
# tool for operators), and the broker's runtime classpath through Maven.
ensure_kafka() {
  local missing=()
  command -v java >/dev/null 2>&1 || missing+=(default-jre-headless)
  command -v mvn >/dev/null 2>&1 || missing+=(maven)
  command -v kcat >/dev/null 2>&1 || missing+=(kcat)
  if [ ${#missing[@]} -gt 0 ]; then
    kafka_log "installing ${missing[*]} from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  if [ -f "$KAFKA_HOME/lib/.complete" ]; then return 0; fi
  kafka_log "installing Apache Kafka $KAFKA_VERSION into $KAFKA_HOME (once per machine)"
  mkdir -p "$KAFKA_HOME"
  cat >"$KAFKA_HOME/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.ledger</groupId>
  <artifactId>kafka-broker-classpath</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>$LOG4J_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-core</artifactId>
      <version>$LOG4J_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-api</artifactId>
      <version>$LOG4J_VERSION</version>
    </dependency>
  </dependencies>
</project>
EOF
  rm -rf "$KAFKA_HOME/lib"
  (cd "$KAFKA_HOME" && mvn -q -B dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory=lib) || {
    kafka_log "Maven could not resolve Kafka $KAFKA_VERSION"
    return 1
  }
  cat >"$KAFKA_HOME/log4j2.properties" <<'EOF'
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = out
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
logger.apache.name = org.apache.kafka
logger.apache.level = INFO
EOF
  touch "$KAFKA_HOME/lib/.complete"
}

kafka_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Runs java with the broker's classpath, heap and logging configuration, then the
# arguments (a main class and its arguments). KAFKA_EXEC=1 replaces the shell with it.
kafka_java() {
  # shellcheck disable=SC2086
  set -- java $KAFKA_HEAP -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$KAFKA_HOME/log4j2.properties" -cp "$KAFKA_HOME/lib/*" "$@"
  if [ "${KAFKA_EXEC:-}" = 1 ]; then exec "$@"; else "$@"; fi
}

# Writes DIR/server.properties for a combined broker+controller on the given ports.
kafka_configure() {
  local dir=$1 port=$2 controller=$3
  mkdir -p "$dir/data"
  cat >"$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=1
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
controller.quorum.bootstrap.servers=127.0.0.1:$controller
inter.broker.listener.name=PLAINTEXT
log.dirs=$dir/data
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
auto.create.topics.enable=false
group.initial.rebalance.delay.ms=0
log.flush.interval.messages=9223372036854775807
log.retention.hours=168
EOF
  echo "$port $controller" >"$dir/ports"
}

# Formats DIR (once) as a standalone KRaft controller.
kafka_format() {
  local dir=$1
  [ -f "$dir/data/meta.properties" ] && return 0
  kafka_java kafka.tools.StorageTool format --standalone --ignore-formatted \
    --cluster-id "$(kafka_java kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1)" \
    --config "$dir/server.properties" >>"$dir/broker.log" 2>&1 || {
    kafka_log "formatting $dir failed:"; tail -n 30 "$dir/broker.log" >&2; return 1
  }
}

kafka_ready() { kcat -b "$1" -L -m 2 >/dev/null 2>&1; }

# Starts a broker in the background and prints its address. By default on free ports with
# fresh storage in DIR. With KEEP=keep, a DIR formatted before is reused with its ports and
# data (scripts/run.sh: the topic outlives the run, as the event store does), and a broker
# already running there is left as it is; PORT and CONTROLLER_PORT, when given, are used for
# a new DIR.
kafka_start() {
  local dir=$1 keep=${2:-} port=${3:-} controller=${4:-}
  ensure_kafka >&2 || return 1
  if [ "$keep" = keep ] && [ -f "$dir/ports" ] && [ -f "$dir/data/meta.properties" ]; then
    read -r port controller <"$dir/ports"
    if [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null && kafka_ready "127.0.0.1:$port"; then
      echo "127.0.0.1:$port"; return 0
    fi
  else
    rm -rf "$dir"; mkdir -p "$dir"
    [ -n "$port" ] || port=$(kafka_free_port)
    [ -n "$controller" ] || controller=$(kafka_free_port)
    while [ "$controller" = "$port" ]; do controller=$(kafka_free_port); done
    kafka_configure "$dir" "$port" "$controller"
  fi
  kafka_format "$dir" || return 1
  nohup bash "$(kafka_script_path)" exec "$dir" "$port" "$controller" \
    >>"$dir/broker.log" 2>&1 </dev/null &
  echo $! >"$dir/pid"
  local deadline=$((SECONDS + 90))
  until kafka_ready "127.0.0.1:$port"; do
    if ! kill -0 "$(cat "$dir/pid")" 2>/dev/null || [ $SECONDS -ge $deadline ]; then
      kafka_log "the broker did not come up; its log ($dir/broker.log) ends with:"
      tail -n 40 "$dir/broker.log" >&2
      return 1
    fi
    sleep 0.2
  done
  echo "127.0.0.1:$port"
}

kafka_stop() {
  local dir=$1 pid
  [ -f "$dir/pid" ] || return 0
  pid=$(cat "$dir/pid")
  kill -TERM "$pid" 2>/dev/null || { rm -f "$dir/pid"; return 0; }
  local deadline=$((SECONDS + ${KAFKA_STOP_SECONDS:-20}))
  while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$dir/pid"
}

kafka_script_path() { echo "${KAFKA_SCRIPT:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/kafka.sh}"; }

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  case "${1:-}" in
    install) ensure_kafka; echo "$KAFKA_HOME" ;;
    start) kafka_start "${2:?data directory}" "${3:-}" "${4:-}" "${5:-}" ;;
    stop) kafka_stop "${2:?data directory}" ;;
    exec)
      dir=${2:?data directory}; port=${3:?port}; controller=${4:?controller port}
      [ -f "$KAFKA_HOME/lib/.complete" ] || ensure_kafka >&2
      [ -f "$dir/server.properties" ] || kafka_configure "$dir" "$port" "$controller"
      kafka_format "$dir"
      KAFKA_EXEC=1 kafka_java kafka.Kafka "$dir/server.properties"
      ;;
    *) sed -n '2,20p' "$0" >&2; exit 2 ;;
  esac
fi
