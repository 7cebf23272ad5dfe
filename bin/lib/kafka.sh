# shellcheck shell=bash
# Shared helpers for bin/kafka-start, bin/kafka-stop and bin/kafka-topics: a single-node Apache
# Kafka 4.x broker (KRaft) run from jars that Maven resolves from Maven Central (bin/kafka/pom.xml).
#
# Use from another script:
#   . "$repo/bin/lib/kafka.sh"
#   kafka_classpath                      # prints the classpath (resolves it once, then cached)
#   kafka_java org.apache.kafka.tools.ConsoleProducer --bootstrap-server "$KAFKA_ADDR" --topic t
# or, without sourcing: cp=$(bin/kafka-start --print-classpath)
#
# Environment (all optional):
#   DEVOUR_KAFKA_VERSION           Kafka version (default 4.1.2)
#   DEVOUR_CACHE_DIR               cache root (default ~/.cache/devour); classpath in kafka-<version>/
#   DEVOUR_KAFKA_DIR               config, data, pid and broker.log (default <repo>/.devour/kafka)
#   DEVOUR_KAFKA_PORT              client port on 127.0.0.1 (default 19092)
#   DEVOUR_KAFKA_CONTROLLER_PORT   KRaft controller port (default client port + 1)

# shellcheck disable=SC2034  # these are for the scripts that source this file
KAFKA_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
KAFKA_VERSION=${DEVOUR_KAFKA_VERSION:-4.1.2}
KAFKA_CACHE=${DEVOUR_CACHE_DIR:-$HOME/.cache/devour}/kafka-$KAFKA_VERSION
KAFKA_DIR=${DEVOUR_KAFKA_DIR:-$KAFKA_REPO/.devour/kafka}
KAFKA_PORT=${DEVOUR_KAFKA_PORT:-19092}
KAFKA_CONTROLLER_PORT=${DEVOUR_KAFKA_CONTROLLER_PORT:-$((KAFKA_PORT + 1))}
KAFKA_ADDR=127.0.0.1:$KAFKA_PORT
KAFKA_PID_FILE=$KAFKA_DIR/kafka.pid
KAFKA_CONFIG=$KAFKA_DIR/server.properties

kafka_log() { echo "kafka: $*" >&2; }

# Prints the classpath. Resolved once by Maven into $KAFKA_CACHE/classpath.txt; re-resolved when
# the file is missing, a jar in it is gone, or bin/kafka/pom.xml changed.
kafka_classpath() {
  local pom=$KAFKA_REPO/bin/kafka/pom.xml cpfile=$KAFKA_CACHE/classpath.txt
  local sum jar ok=1 jars
  sum=$(sha256sum "$pom" | cut -c1-16)
  if [[ -s $cpfile && $(cat "$KAFKA_CACHE/pom.sha256" 2>/dev/null) == "$sum" ]]; then
    IFS=: read -ra jars <"$cpfile" || true   # the file has no final newline
    for jar in "${jars[@]}"; do [[ -f $jar ]] || { ok=0; break; }; done
    if ((ok)); then cat "$cpfile"; return 0; fi
  fi
  mkdir -p "$KAFKA_CACHE"
  kafka_log "resolving Kafka $KAFKA_VERSION jars with Maven (once) ..."
  local tmp=$cpfile.$$ mvnlog=$KAFKA_CACHE/mvn.log
  if ! mvn -B -q -f "$pom" -Dkafka.version="$KAFKA_VERSION" dependency:build-classpath \
      -Dmdep.outputFile="$tmp" >"$mvnlog" 2>&1 || [[ ! -s $tmp ]]; then
    cat "$mvnlog" >&2
    kafka_log "error: Maven could not resolve org.apache.kafka:kafka_2.13:$KAFKA_VERSION (log: $mvnlog)"
    rm -f "$tmp"
    return 1
  fi
  mv "$tmp" "$cpfile"            # atomic: concurrent callers never read a half-written file
  echo "$sum" >"$KAFKA_CACHE/pom.sha256"
  cat "$cpfile"
}

# Writes a log4j2 config logging LEVEL and up to the given target (SYSTEM_OUT/SYSTEM_ERR); prints
# its path. The broker logs INFO to stdout (redirected to broker.log), the tools WARN to stderr.
kafka_log_config() {
  local level=$2 target=$3 file=$KAFKA_CACHE/log4j2-$1.properties
  mkdir -p "$KAFKA_CACHE"
  cat >"$file.$$" <<EOF
status = warn
# keep logging during Kafka's own shutdown hook (log4j2 would stop first)
shutdownHook = disable
appender.out.type = Console
appender.out.name = OUT
appender.out.target = $target
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = $level
rootLogger.appenderRef.out.ref = OUT
# per-request logging is far too chatty for a test broker
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.state.name = state.change.logger
logger.state.level = WARN
EOF
  mv "$file.$$" "$file"
  echo "$file"
}

# Runs a Java main class of the Kafka jars, e.g. a tool: kafka_java CLASS ARGS...
# JVM flags tuned for quick start of short-lived tools; override with DEVOUR_KAFKA_TOOL_OPTS.
kafka_java() {
  local cp logcfg
  cp=$(kafka_classpath) || return 1
  logcfg=$(kafka_log_config tools WARN SYSTEM_ERR)
  # shellcheck disable=SC2086  # word-splitting of the options is intended
  java ${DEVOUR_KAFKA_TOOL_OPTS:--Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1} \
    -Dlog4j2.configurationFile="$logcfg" -cp "$cp" "$@"
}

# True when something accepts TCP connections on 127.0.0.1:PORT.
kafka_port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Prints the pid of the broker started by kafka-start for this data dir, if it is still alive
# (the command line must name our server.properties: guards against a recycled pid).
kafka_pid() {
  local pid
  pid=$(cat "$KAFKA_PID_FILE" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "kafka.Kafka $KAFKA_CONFIG" || return 1
  echo "$pid"
}
