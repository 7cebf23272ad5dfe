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
#   DEVOUR_KAFKA_SSL_PORT          TLS listener, client certificate required (default port + 2)
#   DEVOUR_KAFKA_SASL_PORT         SASL_SSL listener, PLAIN and SCRAM-SHA-512 (default port + 3)

# shellcheck disable=SC2034  # these are for the scripts that source this file
KAFKA_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
KAFKA_VERSION=${DEVOUR_KAFKA_VERSION:-4.1.2}
KAFKA_CACHE=${DEVOUR_CACHE_DIR:-$HOME/.cache/devour}/kafka-$KAFKA_VERSION
KAFKA_DIR=${DEVOUR_KAFKA_DIR:-$KAFKA_REPO/.devour/kafka}
KAFKA_PORT=${DEVOUR_KAFKA_PORT:-19092}
KAFKA_CONTROLLER_PORT=${DEVOUR_KAFKA_CONTROLLER_PORT:-$((KAFKA_PORT + 1))}
KAFKA_SSL_PORT=${DEVOUR_KAFKA_SSL_PORT:-$((KAFKA_PORT + 2))}
KAFKA_SASL_PORT=${DEVOUR_KAFKA_SASL_PORT:-$((KAFKA_PORT + 3))}
KAFKA_ADDR=127.0.0.1:$KAFKA_PORT
# Certificates, keys and passwords of the TLS and SASL_SSL listeners (kafka_make_secrets).
KAFKA_SECRETS=$KAFKA_DIR/secrets
# The SASL user of both mechanisms (its passwords: $KAFKA_SECRETS/sasl-{plain,scram}.password).
KAFKA_SASL_USER=devour
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

# Makes what the TLS and SASL_SSL listeners need, once, in $KAFKA_SECRETS (mode 700):
#   ca.pem, ca.key                 the test CA (10 years)
#   broker.p12                     the broker's key and certificate (SAN localhost, 127.0.0.1)
#   client.pem, client.key         a client certificate signed by the CA, and its key (no password)
#   client.enc.key                 the same key encrypted (PKCS#8, AES-256) with client-key.password
#   untrusted-ca.pem               a CA that signed nothing the broker has (for failure tests)
#   keystore.password              broker.p12's password
#   sasl-plain.password, sasl-scram.password   the passwords of user $KAFKA_SASL_USER
# Returns 0 when everything was already there, 10 when it made new secrets (the SCRAM credential
# recorded at format time is then stale: the caller reformats).
kafka_make_secrets() {
  local d=$KAFKA_SECRETS f
  local files=(ca.pem client.pem client.key client.enc.key client-key.password untrusted-ca.pem
    broker.p12 keystore.password sasl-plain.password sasl-scram.password)
  local complete=1
  for f in "${files[@]}"; do [[ -s $d/$f ]] || complete=0; done
  ((complete)) && return 0
  command -v openssl >/dev/null || { kafka_log "error: openssl is needed for the TLS listener"; return 1; }
  local tmp=$d.tmp.$$
  rm -rf "$tmp" && mkdir -p "$tmp" && chmod 700 "$tmp"
  (
    set -e
    cd "$tmp"
    umask 077
    # Random alphanumeric secrets: distinctive, so tests can grep logs for them.
    for f in keystore.password client-key.password sasl-plain.password sasl-scram.password; do
      printf 'dv%s' "$(openssl rand -hex 12)" >"$f"
    done
    q() { openssl "$@" 2>/dev/null; }
    q req -x509 -new -nodes -newkey rsa:2048 -sha256 -days 3650 -keyout ca.key -out ca.pem \
      -subj "/CN=devour test CA" -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign"
    q req -x509 -new -nodes -newkey rsa:2048 -sha256 -days 3650 -keyout untrusted-ca.key \
      -out untrusted-ca.pem -subj "/CN=devour untrusted CA" -addext "basicConstraints=critical,CA:TRUE"
    sign() {                          # sign NAME SUBJECT EXTENSIONS: NAME.key + NAME.pem
      printf '%s\n' "$3" >"$1.ext"
      q req -new -nodes -newkey rsa:2048 -keyout "$1.key" -out "$1.csr" -subj "$2"
      q x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 -sha256 \
        -extfile "$1.ext" -out "$1.pem"
      rm -f "$1.csr" "$1.ext"
    }
    sign broker "/CN=localhost" "subjectAltName=DNS:localhost,IP:127.0.0.1
extendedKeyUsage=serverAuth,clientAuth"
    sign client "/CN=$KAFKA_SASL_USER" "extendedKeyUsage=clientAuth"
    q pkcs12 -export -in broker.pem -inkey broker.key -certfile ca.pem -name broker \
      -passout "file:keystore.password" -out broker.p12
    q pkcs8 -topk8 -v2 aes-256-cbc -in client.key -passout "file:client-key.password" \
      -out client.enc.key
    rm -f broker.key untrusted-ca.key ca.srl
  ) || { rm -rf "$tmp"; kafka_log "error: making the TLS certificates with openssl failed"; return 1; }
  rm -rf "$d" && mv "$tmp" "$d"
  kafka_log "made a test CA, broker and client certificates and SASL passwords in $d"
  return 10
}
