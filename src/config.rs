//! `devour.toml`: loading, `DEVOUR_*` environment overrides and validation.
//!
//! Loading only validates: nothing connects here. Every failure is a [`ConfigError`] that names
//! the file (or environment variable), the dotted key and the reason.
//!
//! The file is found through `DEVOUR_CONFIG` (a path), else `./devour.toml`; without either, the
//! defaults plus environment overrides are used. Each key can be overridden by an environment
//! variable named `DEVOUR_` + the dotted key in upper case with `.` replaced by `_`
//! (`database.url` → `DEVOUR_DATABASE_URL`, `kafka.ssl_config.cafile` →
//! `DEVOUR_KAFKA_SSL_CONFIG_CAFILE`). librdkafka pass-through properties use
//! `DEVOUR_KAFKA_PROPERTY_` + the property name in upper case with `.` replaced by `_`
//! (`DEVOUR_KAFKA_PROPERTY_SASL_PASSWORD` → `sasl.password`). Values from the environment are
//! taken as they are for text keys and librdkafka properties, and read as TOML for integer and
//! boolean keys and for lists (`10`, `true`, `["a:1", "b:2"]`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use toml::{Table, Value};

mod consumers;
pub use consumers::{
    ConsumerRoute, ConsumerType, Dump, RetryPolicy, StartFrom, DLQ_SUFFIX, MAX_CONCURRENCY,
};

/// Environment variable holding the path of the configuration file.
pub const CONFIG_ENV: &str = "DEVOUR_CONFIG";
/// File looked for in the working directory when `DEVOUR_CONFIG` is not set.
pub const DEFAULT_CONFIG_FILE: &str = "devour.toml";
/// Default `database.url`: an SQLite file in the working directory.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://devour.db";
/// Default `outbox.max_message_bytes`: 1 MiB, the broker's default `message.max.bytes`.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// librdkafka's `message.max.bytes` for devour's producers, unless configured: 64 MiB. Its own
/// default (1,000,000) is below the write path's default limit (1 MiB) and the broker's
/// (1,048,588), so messages the database and the topic accept would fail in the client and be
/// dead-lettered; the topic's `max.message.bytes` is the limit that counts. 64 MiB keeps any
/// request well under the broker's `socket.request.max.bytes` (100 MiB).
pub(crate) const PRODUCER_MESSAGE_MAX_BYTES: &str = "67108864";
/// The relay producer's default `queue.buffering.max.messages`, the most `relay.max_in_flight`
/// can be unless a property raises it.
pub(crate) const RELAY_QUEUE_MAX_MESSAGES: &str = "1000000";

/// The largest `database.pool_size`: r2d2 sets memory aside for every connection up front.
pub(crate) const MAX_POOL_SIZE: u64 = 10_000;

/// The longest retention (`relay.retention_hours`, `inbox_retention_hours`): 100 years. Much
/// longer, and the cutoff falls before PostgreSQL's earliest timestamp, so cleanups fail.
pub(crate) const MAX_RETENTION_HOURS: u64 = 876_000;

/// Where a configuration value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A configuration file.
    File(PathBuf),
    /// An environment variable.
    Env(String),
    /// Built-in defaults (no file found).
    Defaults,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(p) => write!(f, "{}", p.display()),
            Origin::Env(v) => write!(f, "environment variable {v}"),
            Origin::Defaults => write!(f, "built-in defaults"),
        }
    }
}

/// A configuration that cannot be used. Names the file or variable, the key and the reason.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read, is not UTF-8, not TOML, or empty.
    #[error("{origin}: {reason}")]
    File {
        /// The file.
        origin: Origin,
        /// What is wrong with it.
        reason: String,
    },
    /// A key has a bad value, a wrong type, is unknown or missing.
    #[error("{origin}: `{key}`: {reason}")]
    Key {
        /// File or environment variable the value came from.
        origin: Origin,
        /// Dotted key, e.g. `kafka.hosts`.
        key: String,
        /// What is wrong and, where possible, what to do.
        reason: String,
    },
}

impl ConfigError {
    /// The dotted key this error is about, if it is about one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Key { key, .. } => Some(key),
            ConfigError::File { .. } => None,
        }
    }
}

/// The whole configuration. Every field has a documented default except `kafka.hosts`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Config {
    /// The file it was loaded from, if any.
    pub file: Option<PathBuf>,
    /// `[database]`.
    pub database: DatabaseConfig,
    /// `[kafka]`.
    pub kafka: KafkaConfig,
    /// `[outbox]`.
    pub outbox: OutboxConfig,
    /// `[relay]`.
    pub relay: RelayConfig,
    /// `[consumers.NAME]`: the routes of `devour consume NAME`, by NAME.
    pub consumers: BTreeMap<String, ConsumerRoute>,
    /// `[metrics]`.
    pub metrics: MetricsConfig,
    /// `[log]`.
    pub log: LogConfig,
    /// Warnings met while loading: deprecated keys, `DEVOUR_*` variables that are no setting.
    pub warnings: Vec<String>,
}

/// `[database]`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct DatabaseConfig {
    /// `url`: `sqlite://PATH` (default `sqlite://devour.db`) or `postgres://…`.
    pub url: DatabaseUrl,
    /// `pool_size`: connections in the pool (default 10).
    pub pool_size: u32,
    /// `connect_timeout_ms`: how long to wait for a pooled connection (default 30000).
    pub connect_timeout_ms: u64,
    /// `busy_timeout_ms`: SQLite's busy timeout (default 5000).
    pub busy_timeout_ms: u64,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: DatabaseUrl::parse(DEFAULT_DATABASE_URL).expect("default url parses"),
            pool_size: 10,
            connect_timeout_ms: 30_000,
            busy_timeout_ms: 5_000,
        }
    }
}

/// A parsed `database.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// `postgres://` or `postgresql://`: the URL as libpq takes it.
    Postgres(String),
    /// `sqlite://PATH`: a file path (relative to the working directory), or `:memory:`.
    Sqlite(String),
}

impl DatabaseUrl {
    /// Parses `postgres://…`, `postgresql://…` or `sqlite://PATH`.
    pub fn parse(url: &str) -> Result<DatabaseUrl, String> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(DatabaseUrl::Postgres(url.to_string()))
        } else if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err("`sqlite://` needs a file path, e.g. `sqlite://devour.db`".into());
            }
            Ok(DatabaseUrl::Sqlite(path.to_string()))
        } else {
            let scheme = url.split("://").next().filter(|_| url.contains("://"));
            Err(match scheme {
                Some(s) => format!(
                    "unknown URL scheme `{s}://`; use `sqlite://PATH` or `postgres://USER:PASSWORD@HOST/DB`"
                ),
                None => "not a URL; use `sqlite://PATH` or `postgres://USER:PASSWORD@HOST/DB`".into(),
            })
        }
    }

    /// The URL with any password replaced by `***`.
    pub fn redacted(&self) -> String {
        match self {
            DatabaseUrl::Sqlite(p) => format!("sqlite://{p}"),
            DatabaseUrl::Postgres(u) => redact_url_password(u),
        }
    }
}

impl fmt::Display for DatabaseUrl {
    /// Displays the redacted URL: a password never reaches a log through `Display`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Splits a `postgres://` URL after its user info the way libpq reads it: the user info ends at
/// the first `@` before the first `/` (so a `?` in a password is part of it). Returns (user
/// info including its `@`, or empty; the rest: host, path, query).
pub(crate) fn split_userinfo(url: &str) -> (&str, &str) {
    let start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[start..];
    let slash = rest.find('/').unwrap_or(rest.len());
    match rest[..slash].find('@') {
        Some(at) => (&rest[..=at], &rest[at + 1..]),
        None => ("", rest),
    }
}

/// libpq parameters that hold a password.
const URL_SECRETS: [&str; 2] = ["password", "sslpassword"];

/// `url` with every password masked: the one in `user:password@`, and the `password` and
/// `sslpassword` parameters (`?password=…`).
fn redact_url_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let scheme = &url[..scheme_end];
    let (userinfo, rest) = split_userinfo(url);
    let userinfo = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***@"),
        None => userinfo.to_string(),
    };
    let host_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (host, tail) = rest.split_at(host_end);
    let authority = format!("{userinfo}{host}");
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _)) if URL_SECRETS.contains(&k) => format!("{k}=***"),
                    _ => p.to_string(),
                })
                .collect();
            format!("{path}?{}", params.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

/// `[kafka]`: the seed's `KAFKA_CONFIG`, mapped onto librdkafka properties.
#[derive(Debug, Clone, PartialEq, Default)]
#[non_exhaustive]
pub struct KafkaConfig {
    /// `hosts` (required): bootstrap brokers, `host:port` each → `bootstrap.servers`.
    pub hosts: Vec<String>,
    /// `client_id` → `client.id` (default `devour`).
    pub client_id: Option<String>,
    /// `ssl_config` → `security.protocol=ssl`, `ssl.*.location`, `ssl.key.password`.
    pub ssl_config: Option<SslConfig>,
    /// `socket_timeout_ms` → `socket.timeout.ms`.
    pub socket_timeout_ms: Option<u32>,
    /// `offsets_channel_socket_timeout_ms`: timeout of the consumer's offset fetches (committed
    /// offsets and watermarks, for the drain's end check and the lag gauge); default 5000.
    pub offsets_channel_socket_timeout_ms: Option<u32>,
    /// `source_address`: the local IP to connect from. librdkafka cannot bind a source address;
    /// devour uses its family to set `broker.address.family` (v4 or v6).
    pub source_address: Option<IpAddr>,
    /// `broker_version` → `broker.version.fallback` (only used by brokers without ApiVersion).
    pub broker_version: Option<String>,
    /// `exclude_internal_topics` (default true) → `topic.blacklist=^__.*` for consumers.
    pub exclude_internal_topics: bool,
    /// `[kafka.properties]`: librdkafka properties passed through as they are.
    pub properties: BTreeMap<String, String>,
}

/// `[kafka.ssl_config]`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SslConfig {
    /// `cafile` (required): CA certificate file → `ssl.ca.location`.
    pub cafile: PathBuf,
    /// `certfile`: client certificate → `ssl.certificate.location`.
    pub certfile: Option<PathBuf>,
    /// `keyfile`: client key → `ssl.key.location`.
    pub keyfile: Option<PathBuf>,
    /// `password`: the key's passphrase → `ssl.key.password`. Never printed.
    pub password: Option<String>,
}

/// `[outbox]`: the write path.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OutboxConfig {
    /// `max_message_bytes` (default 1 MiB): a message whose payload, key and headers exceed this
    /// fails the save and rolls its transaction back.
    pub max_message_bytes: usize,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

/// What the relay does with a delivered row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Delete it (default).
    Delete,
    /// Move it to `devour_outbox_delivered`, deleted after `retention_hours`.
    Keep,
}

/// What happens to the later rows of a key whose row was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterPolicy {
    /// They are delivered (default).
    Continue,
    /// They wait until the dead letter is retried or discarded.
    BlockKey,
}

/// `[relay]`: devour-relay.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RelayConfig {
    /// `batch_size`: rows read per query (default 1000).
    pub batch_size: u32,
    /// `max_in_flight`: rows handed to the producer and not yet removed (default 10000).
    pub max_in_flight: u32,
    /// `poll_interval_ms`: how often to look for rows without a wake-up (default 250).
    pub poll_interval_ms: u64,
    /// `lease_ttl_ms`: how long a shard lease lasts unless renewed (default 10000).
    pub lease_ttl_ms: u64,
    /// `retention`: `"delete"` (default) or `"keep"`.
    pub retention: Retention,
    /// `retention_hours`: how long `keep` keeps delivered rows (default 24).
    pub retention_hours: u64,
    /// `on_dead_letter`: `"continue"` (default) or `"block_key"`.
    pub on_dead_letter: DeadLetterPolicy,
    /// `shutdown_timeout_ms`: how long a stop waits for in-flight deliveries (default 30000).
    pub shutdown_timeout_ms: u64,
    /// `relay_id`: this relay's name in logs, status and the lease table, to which the relay
    /// adds a suffix unique to the run (default `HOST-PID-RANDOM`).
    pub relay_id: Option<String>,
    /// `[relay.producer]`: librdkafka properties for the relay's producer.
    pub producer: BTreeMap<String, String>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            batch_size: 1000,
            max_in_flight: 10_000,
            poll_interval_ms: 250,
            lease_ttl_ms: 10_000,
            retention: Retention::Delete,
            retention_hours: 24,
            on_dead_letter: DeadLetterPolicy::Continue,
            shutdown_timeout_ms: 30_000,
            relay_id: None,
            producer: BTreeMap::new(),
        }
    }
}

/// `[metrics]`: the HTTP endpoint of `devour-relay` and `devour consume`.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct MetricsConfig {
    /// `listen`: address serving `/metrics` (Prometheus text), `/healthz` and `/readyz`
    /// (default: none, off).
    pub listen: Option<std::net::SocketAddr>,
}

/// `[log]`.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct LogConfig {
    /// `level`: a `tracing` filter such as `info` or `devour=debug,rdkafka=warn` (default
    /// `info`; `RUST_LOG` wins when set).
    pub level: Option<String>,
    /// `format`: `"text"` (default) or `"json"` (one object per line).
    pub format: LogFormat,
}

/// How log lines look.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (colours on a terminal).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Properties whose values are secrets: never printed, never logged.
pub fn is_secret_property(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n.contains("password")
        || n.contains("passphrase")
        || n.contains("secret")
        || n.contains("token")
        || n.ends_with(".key.pem")
        || n == "sasl.oauthbearer.config"
}

impl KafkaConfig {
    /// How long a consumer waits for one offset fetch: `offsets_channel_socket_timeout_ms`, or
    /// 5 s.
    pub fn offsets_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(u64::from(
            self.offsets_channel_socket_timeout_ms.unwrap_or(5_000),
        ))
    }

    /// The librdkafka properties for a client of any kind (producer or consumer), in order:
    /// devour's own mapping first, then `[kafka.properties]`, which win.
    pub fn client_properties(&self) -> BTreeMap<String, String> {
        let mut p = BTreeMap::new();
        p.insert("bootstrap.servers".to_string(), self.hosts.join(","));
        p.insert(
            "client.id".to_string(),
            self.client_id.clone().unwrap_or_else(|| "devour".into()),
        );
        if let Some(ssl) = &self.ssl_config {
            p.insert("security.protocol".into(), "ssl".into());
            p.insert("ssl.ca.location".into(), ssl.cafile.display().to_string());
            if let Some(c) = &ssl.certfile {
                p.insert("ssl.certificate.location".into(), c.display().to_string());
            }
            if let Some(k) = &ssl.keyfile {
                p.insert("ssl.key.location".into(), k.display().to_string());
            }
            if let Some(pw) = &ssl.password {
                p.insert("ssl.key.password".into(), pw.clone());
            }
        }
        if let Some(t) = self.socket_timeout_ms {
            p.insert("socket.timeout.ms".into(), t.to_string());
        }
        if let Some(addr) = self.source_address {
            let family = if addr.is_ipv4() { "v4" } else { "v6" };
            p.insert("broker.address.family".into(), family.into());
        }
        if let Some(v) = &self.broker_version {
            p.insert("broker.version.fallback".into(), v.clone());
        }
        for (k, v) in &self.properties {
            p.insert(k.clone(), v.clone());
        }
        p
    }

    /// The properties of a consumer: [`client_properties`](Self::client_properties) plus
    /// `topic.blacklist` when `exclude_internal_topics` is on.
    pub fn consumer_properties(&self) -> BTreeMap<String, String> {
        let mut p = self.client_properties();
        if self.exclude_internal_topics && !self.properties.contains_key("topic.blacklist") {
            p.insert("topic.blacklist".into(), "^__.*".into());
        }
        p
    }

    /// An rdkafka `ClientConfig` holding [`client_properties`](Self::client_properties).
    pub fn client_config(&self) -> rdkafka::ClientConfig {
        let mut c = rdkafka::ClientConfig::new();
        for (k, v) in self.client_properties() {
            c.set(k, v);
        }
        c
    }
}

// ---------------------------------------------------------------------------------------------
// Loading

/// Checks a log filter (`log.level`, `RUST_LOG`): one the tracing filter refuses, and also one
/// it takes but that would silence devour. The filter takes a bare word as a target with every
/// level, and nothing else: a misspelt level (`warning`, `verbose`) would silence every message,
/// errors too.
pub(crate) fn check_log_filter(filter: &str) -> Result<(), String> {
    tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
    let directives: Vec<&str> = filter
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    if directives.is_empty() {
        return Err("it is empty".into());
    }
    for directive in directives {
        let named = directive.rsplit_once('=').map_or(directive, |(_, l)| l);
        // The filter also takes levels as numbers: 0 (off) to 5 (trace).
        let numeric = matches!(named, "0" | "1" | "2" | "3" | "4" | "5");
        if !numeric && !LOG_LEVELS.contains(&named.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "`{directive}` has no level; levels are {}",
                LOG_LEVELS.join(", ")
            ));
        }
    }
    Ok(())
}

/// The levels a `log.level` directive may name.
const LOG_LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];

/// The known keys of each section and their types: the single source for validation,
/// suggestions and environment variable names.
const KEYS: &[(&str, Kind)] = &[
    ("database.url", Kind::Str),
    ("database.pool_size", Kind::Int),
    ("database.connect_timeout_ms", Kind::Int),
    ("database.busy_timeout_ms", Kind::Int),
    ("kafka.hosts", Kind::StrOrList),
    ("kafka.client_id", Kind::Str),
    ("kafka.ssl_config", Kind::Table),
    ("kafka.ssl_config.cafile", Kind::Str),
    ("kafka.ssl_config.certfile", Kind::Str),
    ("kafka.ssl_config.keyfile", Kind::Str),
    ("kafka.ssl_config.password", Kind::Str),
    ("kafka.socket_timeout_ms", Kind::Int),
    ("kafka.offsets_channel_socket_timeout_ms", Kind::Int),
    ("kafka.source_address", Kind::Str),
    ("kafka.broker_version", Kind::Str),
    ("kafka.exclude_internal_topics", Kind::Bool),
    ("kafka.zookeeper_hosts", Kind::StrOrList),
    ("kafka.use_greenlets", Kind::Bool),
    ("kafka.properties", Kind::Table),
    ("outbox.max_message_bytes", Kind::Int),
    ("relay.batch_size", Kind::Int),
    ("relay.max_in_flight", Kind::Int),
    ("relay.poll_interval_ms", Kind::Int),
    ("relay.lease_ttl_ms", Kind::Int),
    ("relay.retention", Kind::Str),
    ("relay.retention_hours", Kind::Int),
    ("relay.on_dead_letter", Kind::Str),
    ("relay.shutdown_timeout_ms", Kind::Int),
    ("relay.relay_id", Kind::Str),
    ("relay.producer", Kind::Table),
    ("metrics.listen", Kind::Str),
    ("log.level", Kind::Str),
    ("log.format", Kind::Str),
];

const SECTIONS: &[&str] = &[
    "database",
    "kafka",
    "outbox",
    "relay",
    "consumers",
    "metrics",
    "log",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    Int,
    Bool,
    StrOrList,
    Table,
}

impl Kind {
    fn describe(self) -> &'static str {
        match self {
            Kind::Str => "a string",
            Kind::Int => "an integer",
            Kind::Bool => "a boolean (true or false)",
            Kind::StrOrList => "a string or an array of strings",
            Kind::Table => "a table",
        }
    }
}

/// Every dotted key of the sections (not the routes), and whether an environment variable can
/// override it (tables cannot; their keys can): what the reference documents.
pub fn known_keys() -> impl Iterator<Item = (&'static str, bool)> {
    KEYS.iter().map(|(k, kind)| (*k, *kind != Kind::Table))
}

/// The keys of a `[consumers.NAME]` route (`retry.*` inside `retry`).
pub fn route_keys() -> impl Iterator<Item = String> {
    consumers::ROUTE_KEYS
        .iter()
        .filter(|k| **k != "retry")
        .map(|k| k.to_string())
        .chain(consumers::RETRY_KEYS.iter().map(|k| format!("retry.{k}")))
}

/// The process environment as text, for [`Config::load_with_env`]. `std::env::vars` panics on
/// a variable that is not UTF-8 (anyone's, not only devour's); such variables are left out,
/// except devour's own (`DEVOUR_*`), which are kept with the bad bytes replaced, so that the
/// key's validation names them.
pub fn process_env() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(k, v)| {
            let k = k.into_string().ok()?;
            match v.into_string() {
                Ok(v) => Some((k, v)),
                Err(v) if k.starts_with("DEVOUR_") => Some((k, v.to_string_lossy().into_owned())),
                Err(_) => None,
            }
        })
        .collect()
}

/// The environment variable that overrides a dotted key.
pub fn env_var_for(key: &str) -> String {
    format!("DEVOUR_{}", key.replace('.', "_").to_ascii_uppercase())
}

const PROPERTY_ENV_PREFIX: &str = "DEVOUR_KAFKA_PROPERTY_";

impl Config {
    /// Loads the configuration the way every devour command does: the file named by
    /// `DEVOUR_CONFIG`, else `./devour.toml` if it exists, else defaults; then `DEVOUR_*`
    /// overrides from the process environment; then validation.
    pub fn load() -> Result<Config, ConfigError> {
        Self::load_with_env(process_env())
    }

    /// [`load`](Self::load) with an explicit environment (tests, embedding).
    pub fn load_with_env(
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let env: BTreeMap<String, String> = env.into_iter().collect();
        let path = match env.get(CONFIG_ENV) {
            Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
            _ => {
                let p = PathBuf::from(DEFAULT_CONFIG_FILE);
                p.exists().then_some(p)
            }
        };
        match path {
            Some(p) => {
                let text = read_config_file(&p)?;
                Self::from_toml_str(&text, Origin::File(p), &env)
            }
            None => Self::from_table(Table::new(), Origin::Defaults, &env),
        }
    }

    /// Loads a given file plus overrides from `env`.
    pub fn load_file(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let env: BTreeMap<String, String> = env.into_iter().collect();
        let text = read_config_file(path)?;
        Self::from_toml_str(&text, Origin::File(path.to_path_buf()), &env)
    }

    /// Parses and validates TOML text (with environment overrides from `env`).
    pub fn from_toml_str(
        text: &str,
        origin: Origin,
        env: &BTreeMap<String, String>,
    ) -> Result<Config, ConfigError> {
        if text.trim().is_empty() {
            return Err(ConfigError::File {
                origin,
                reason: "the file is empty; it needs at least `[kafka]` with `hosts`".into(),
            });
        }
        let table: Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::File {
                origin: origin.clone(),
                reason: format!("not valid TOML: {}", e.to_string().trim_end()),
            })?;
        Self::from_table(table, origin, env)
    }

    fn from_table(
        mut table: Table,
        origin: Origin,
        env: &BTreeMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let file = match &origin {
            Origin::File(p) => Some(p.clone()),
            _ => None,
        };
        let mut origins = Origins {
            file: origin,
            env_keys: BTreeMap::new(),
        };
        apply_env_overrides(&mut table, env, &mut origins)?;
        check_unknown_keys(&table, &origins)?;
        let mut warnings = unknown_env_warnings(env);
        let r = Reader {
            table: &table,
            origins: &origins,
        };

        let mut database = DatabaseConfig::default();
        if let Some(url) = r.string("database.url")? {
            database.url =
                DatabaseUrl::parse(&url).map_err(|reason| r.err("database.url", reason))?;
        }
        if let Some(n) = r.positive_at_most("database.pool_size", MAX_POOL_SIZE)? {
            database.pool_size = n as u32;
        }
        if let Some(n) = r.positive("database.connect_timeout_ms")? {
            database.connect_timeout_ms = n;
        }
        // SQLite reads a larger PRAGMA busy_timeout as 0: no waiting at all.
        if let Some(n) = r.positive_at_most("database.busy_timeout_ms", i32::MAX as u64)? {
            database.busy_timeout_ms = n;
        }

        let mut kafka = KafkaConfig {
            exclude_internal_topics: true,
            ..KafkaConfig::default()
        };
        kafka.hosts = match r.string_list("kafka.hosts")? {
            Some(h) => h,
            None => {
                return Err(ConfigError::Key {
                    origin: origins.file.clone(),
                    key: "kafka.hosts".into(),
                    reason: format!(
                        "missing: set `hosts = \"HOST:PORT\"` under `[kafka]` or the environment variable {}",
                        env_var_for("kafka.hosts")
                    ),
                })
            }
        };
        if kafka.hosts.is_empty() {
            return Err(r.err("kafka.hosts", "is empty: give at least one HOST:PORT"));
        }
        for h in &kafka.hosts {
            validate_host_port(h).map_err(|reason| r.err("kafka.hosts", reason))?;
        }
        if let Some(id) = r.string("kafka.client_id")? {
            if id.trim().is_empty() {
                return Err(r.err("kafka.client_id", "must not be empty"));
            }
            kafka.client_id = Some(id);
        }
        if r.get("kafka.ssl_config").is_some() {
            let cafile = r.string("kafka.ssl_config.cafile")?.ok_or_else(|| {
                r.err(
                    "kafka.ssl_config.cafile",
                    "missing: `ssl_config` needs `cafile`, the CA certificate that signed the brokers' certificates",
                )
            })?;
            let existing = |key: &str| -> Result<Option<PathBuf>, ConfigError> {
                match r.string(key)? {
                    None => Ok(None),
                    Some(p) => {
                        let path = PathBuf::from(&p);
                        if path.is_file() {
                            Ok(Some(path))
                        } else {
                            Err(r.err(key, format!("file `{p}` does not exist or is not a file")))
                        }
                    }
                }
            };
            let cafile = existing("kafka.ssl_config.cafile")?.unwrap_or_else(|| cafile.into());
            let certfile = existing("kafka.ssl_config.certfile")?;
            let keyfile = existing("kafka.ssl_config.keyfile")?;
            if certfile.is_some() != keyfile.is_some() {
                let missing = if certfile.is_some() {
                    "keyfile"
                } else {
                    "certfile"
                };
                return Err(r.err(
                    &format!("kafka.ssl_config.{missing}"),
                    "missing: a client certificate needs both `certfile` and `keyfile`",
                ));
            }
            kafka.ssl_config = Some(SslConfig {
                cafile,
                certfile,
                keyfile,
                password: r.string("kafka.ssl_config.password")?,
            });
        }
        kafka.socket_timeout_ms = r.timeout_u32("kafka.socket_timeout_ms")?;
        kafka.offsets_channel_socket_timeout_ms =
            r.timeout_u32("kafka.offsets_channel_socket_timeout_ms")?;
        if let Some(a) = r.string("kafka.source_address")? {
            let ip = a
                .parse::<IpAddr>()
                .or_else(|_| a.parse::<std::net::SocketAddr>().map(|s| s.ip()))
                .map_err(|_| {
                    r.err(
                        "kafka.source_address",
                        format!("`{a}` is not an IP address (e.g. `10.0.0.5` or `::1`)"),
                    )
                })?;
            kafka.source_address = Some(ip);
        }
        if let Some(v) = r.string("kafka.broker_version")? {
            let parts: Vec<&str> = v.split('.').collect();
            if !(2..=4).contains(&parts.len())
                || parts
                    .iter()
                    .any(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()))
            {
                return Err(r.err(
                    "kafka.broker_version",
                    format!("`{v}` is not a version such as `3.9.0` or `4.1`"),
                ));
            }
            kafka.broker_version = Some(v);
        }
        if let Some(b) = r.boolean("kafka.exclude_internal_topics")? {
            kafka.exclude_internal_topics = b;
        }
        for deprecated in ["kafka.zookeeper_hosts", "kafka.use_greenlets"] {
            if r.get(deprecated).is_some() {
                let w = format!(
                    "{}: `{deprecated}` is deprecated and ignored: {}",
                    r.origin(deprecated),
                    if deprecated.ends_with("zookeeper_hosts") {
                        "Kafka 4 has no ZooKeeper; brokers are found through `hosts`"
                    } else {
                        "devour uses OS threads and tokio; there are no greenlets"
                    }
                );
                tracing::warn!("{w}");
                warnings.push(w);
            }
        }
        kafka.properties = r.properties("kafka.properties")?;

        let mut outbox = OutboxConfig::default();
        if let Some(n) = r.positive("outbox.max_message_bytes")? {
            outbox.max_message_bytes = usize::try_from(n)
                .map_err(|_| r.err("outbox.max_message_bytes", "is too large"))?;
        }

        let mut relay = RelayConfig::default();
        let int_u32 = |key: &str, n: u64| {
            u32::try_from(n)
                .map_err(|_| r.err(key, format!("{n} is too large (at most {})", u32::MAX)))
        };
        if let Some(n) = r.positive("relay.batch_size")? {
            relay.batch_size = int_u32("relay.batch_size", n)?;
        }
        if let Some(n) = r.positive("relay.max_in_flight")? {
            relay.max_in_flight = int_u32("relay.max_in_flight", n)?;
        }
        if relay.max_in_flight < relay.batch_size {
            return Err(r.err(
                "relay.max_in_flight",
                format!(
                    "must be at least relay.batch_size ({}), found {}",
                    relay.batch_size, relay.max_in_flight
                ),
            ));
        }
        if let Some(n) = r.positive("relay.poll_interval_ms")? {
            relay.poll_interval_ms = n;
        }
        if let Some(n) = r.positive("relay.lease_ttl_ms")? {
            if n < 1000 {
                return Err(r.err(
                    "relay.lease_ttl_ms",
                    format!("must be at least 1000 ms, found {n}"),
                ));
            }
            // Other relays compute with it too (heartbeat age, row cleanup): keep it a length
            // of time their database can add to a timestamp.
            if n > 86_400_000 {
                return Err(r.err(
                    "relay.lease_ttl_ms",
                    format!("must be at most 86400000 ms (a day), found {n}"),
                ));
            }
            relay.lease_ttl_ms = n;
        }
        if let Some(v) = r.string("relay.retention")? {
            relay.retention = match v.as_str() {
                "delete" => Retention::Delete,
                "keep" => Retention::Keep,
                other => {
                    return Err(r.err(
                        "relay.retention",
                        format!("`{other}` is not one of \"delete\", \"keep\""),
                    ))
                }
            };
        }
        if let Some(n) = r.positive_at_most("relay.retention_hours", MAX_RETENTION_HOURS)? {
            relay.retention_hours = n;
        }
        if let Some(v) = r.string("relay.on_dead_letter")? {
            relay.on_dead_letter = match v.as_str() {
                "continue" => DeadLetterPolicy::Continue,
                "block_key" => DeadLetterPolicy::BlockKey,
                other => {
                    return Err(r.err(
                        "relay.on_dead_letter",
                        format!("`{other}` is not one of \"continue\", \"block_key\""),
                    ))
                }
            };
        }
        if let Some(n) = r.positive("relay.shutdown_timeout_ms")? {
            relay.shutdown_timeout_ms = n;
        }
        if let Some(id) = r.string("relay.relay_id")? {
            if id.trim().is_empty() {
                return Err(r.err("relay.relay_id", "must not be empty"));
            }
            relay.relay_id = Some(id);
        }
        relay.producer = r.properties("relay.producer")?;
        for (name, value) in &relay.producer {
            if let Some(why) = crate::relay::ordering_conflict(name, value) {
                return Err(r.err(
                    &format!("relay.producer.{name}"),
                    format!("{why}; remove this setting"),
                ));
            }
        }
        // More rows in flight than the producer's queue holds would wait on a full queue for
        // good.
        let queue = relay
            .producer
            .get("queue.buffering.max.messages")
            .or_else(|| kafka.properties.get("queue.buffering.max.messages"))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| RELAY_QUEUE_MAX_MESSAGES.parse().expect("a number"));
        if u64::from(relay.max_in_flight) > queue {
            return Err(r.err(
                "relay.max_in_flight",
                format!(
                    "must be at most the producer's queue.buffering.max.messages ({queue}), found {}",
                    relay.max_in_flight
                ),
            ));
        }

        let consumers = consumers::parse(&r, &kafka.properties, database.pool_size)?;

        let mut metrics = MetricsConfig::default();
        if let Some(a) = r.string("metrics.listen")? {
            if !a.trim().is_empty() {
                metrics.listen = Some(a.parse().map_err(|_| {
                    r.err(
                        "metrics.listen",
                        format!("`{a}` is not an address such as `127.0.0.1:9464`"),
                    )
                })?);
            }
        }
        let mut log = LogConfig::default();
        if let Some(level) = r.string("log.level")? {
            check_log_filter(&level).map_err(|why| {
                r.err(
                    "log.level",
                    format!("`{level}` is not a log filter such as `info` or `devour=debug,rdkafka=warn`: {why}"),
                )
            })?;
            log.level = Some(level);
        }
        if let Some(f) = r.string("log.format")? {
            log.format = match f.as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => {
                    return Err(r.err(
                        "log.format",
                        format!("`{other}` is not one of \"text\", \"json\""),
                    ))
                }
            };
        }

        Ok(Config {
            file,
            database,
            kafka,
            outbox,
            relay,
            consumers,
            metrics,
            log,
            warnings,
        })
    }

    /// The effective configuration as TOML, secrets replaced by `***`
    /// (what `devour config check` prints).
    pub fn to_redacted_toml(&self) -> String {
        let mut root = Table::new();
        let mut db = Table::new();
        db.insert("url".into(), self.database.url.redacted().into());
        db.insert(
            "pool_size".into(),
            i64::from(self.database.pool_size).into(),
        );
        db.insert(
            "connect_timeout_ms".into(),
            clamp_i64(self.database.connect_timeout_ms).into(),
        );
        db.insert(
            "busy_timeout_ms".into(),
            clamp_i64(self.database.busy_timeout_ms).into(),
        );
        root.insert("database".into(), db.into());

        let k = &self.kafka;
        let mut kt = Table::new();
        kt.insert(
            "hosts".into(),
            Value::Array(k.hosts.iter().map(|h| h.clone().into()).collect()),
        );
        kt.insert(
            "client_id".into(),
            k.client_id
                .clone()
                .unwrap_or_else(|| "devour".into())
                .into(),
        );
        if let Some(t) = k.socket_timeout_ms {
            kt.insert("socket_timeout_ms".into(), i64::from(t).into());
        }
        // Its default is devour's (socket_timeout_ms's is librdkafka's, shown only when set).
        kt.insert(
            "offsets_channel_socket_timeout_ms".into(),
            (k.offsets_timeout().as_millis() as i64).into(),
        );
        if let Some(a) = k.source_address {
            kt.insert("source_address".into(), a.to_string().into());
        }
        if let Some(v) = &k.broker_version {
            kt.insert("broker_version".into(), v.clone().into());
        }
        kt.insert(
            "exclude_internal_topics".into(),
            k.exclude_internal_topics.into(),
        );
        if let Some(ssl) = &k.ssl_config {
            let mut st = Table::new();
            st.insert("cafile".into(), ssl.cafile.display().to_string().into());
            if let Some(c) = &ssl.certfile {
                st.insert("certfile".into(), c.display().to_string().into());
            }
            if let Some(c) = &ssl.keyfile {
                st.insert("keyfile".into(), c.display().to_string().into());
            }
            if ssl.password.is_some() {
                st.insert("password".into(), "***".into());
            }
            kt.insert("ssl_config".into(), st.into());
        }
        if !k.properties.is_empty() {
            kt.insert(
                "properties".into(),
                redacted_properties(&k.properties).into(),
            );
        }
        root.insert("kafka".into(), kt.into());

        let mut ot = Table::new();
        ot.insert(
            "max_message_bytes".into(),
            clamp_i64(self.outbox.max_message_bytes as u64).into(),
        );
        root.insert("outbox".into(), ot.into());

        let rl = &self.relay;
        let mut rt = Table::new();
        rt.insert("batch_size".into(), i64::from(rl.batch_size).into());
        rt.insert("max_in_flight".into(), i64::from(rl.max_in_flight).into());
        rt.insert(
            "poll_interval_ms".into(),
            clamp_i64(rl.poll_interval_ms).into(),
        );
        rt.insert("lease_ttl_ms".into(), clamp_i64(rl.lease_ttl_ms).into());
        let retention = match rl.retention {
            Retention::Delete => "delete",
            Retention::Keep => "keep",
        };
        rt.insert("retention".into(), retention.into());
        rt.insert(
            "retention_hours".into(),
            clamp_i64(rl.retention_hours).into(),
        );
        let policy = match rl.on_dead_letter {
            DeadLetterPolicy::Continue => "continue",
            DeadLetterPolicy::BlockKey => "block_key",
        };
        rt.insert("on_dead_letter".into(), policy.into());
        rt.insert(
            "shutdown_timeout_ms".into(),
            clamp_i64(rl.shutdown_timeout_ms).into(),
        );
        if let Some(id) = &rl.relay_id {
            rt.insert("relay_id".into(), id.clone().into());
        }
        if !rl.producer.is_empty() {
            rt.insert("producer".into(), redacted_properties(&rl.producer).into());
        }
        root.insert("relay".into(), rt.into());
        let mut metrics = Table::new();
        if let Some(a) = self.metrics.listen {
            metrics.insert("listen".into(), a.to_string().into());
        }
        root.insert("metrics".into(), metrics.into());
        let mut log = Table::new();
        log.insert(
            "level".into(),
            self.log
                .level
                .clone()
                .unwrap_or_else(|| "info".into())
                .into(),
        );
        log.insert(
            "format".into(),
            match self.log.format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            }
            .into(),
        );
        root.insert("log".into(), log.into());
        if !self.consumers.is_empty() {
            root.insert(
                "consumers".into(),
                consumers::to_table(&self.consumers).into(),
            );
        }
        toml::to_string_pretty(&root).unwrap_or_default()
    }
}

fn redacted_properties(props: &BTreeMap<String, String>) -> Table {
    props
        .iter()
        .map(|(n, v)| {
            let shown = if is_secret_property(n) {
                "***".to_string()
            } else {
                v.clone()
            };
            (n.clone(), Value::String(shown))
        })
        .collect()
}

fn clamp_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn read_config_file(path: &Path) -> Result<String, ConfigError> {
    let origin = Origin::File(path.to_path_buf());
    let bytes = std::fs::read(path).map_err(|e| ConfigError::File {
        origin: origin.clone(),
        reason: if e.kind() == std::io::ErrorKind::NotFound {
            format!("cannot read the configuration file: it does not exist (named by --config or {CONFIG_ENV})")
        } else {
            format!("cannot read the configuration file: {e}")
        },
    })?;
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = 1 + e.as_bytes()[..at].iter().filter(|b| **b == b'\n').count();
        ConfigError::File {
            origin,
            reason: format!("not UTF-8 text (invalid byte at offset {at}, line {line})"),
        }
    })
}

fn validate_host_port(h: &str) -> Result<(), String> {
    let hint = "expected HOST:PORT, e.g. `127.0.0.1:9092`";
    let (host, port) = h
        .rsplit_once(':')
        .ok_or_else(|| format!("`{h}` has no port; {hint}"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty()
        || host
            .chars()
            .any(|c| c.is_whitespace() || c == '/' || c == ',')
    {
        return Err(format!("`{h}` has no valid host; {hint}"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("`{h}`: `{port}` is not a port (1-65535); {hint}")),
    }
}

struct Origins {
    file: Origin,
    /// Keys set from the environment, with their variable.
    env_keys: BTreeMap<String, String>,
}

impl Origins {
    fn of(&self, key: &str) -> Origin {
        match self.env_keys.get(key) {
            Some(var) => Origin::Env(var.clone()),
            None => self.file.clone(),
        }
    }
}

fn env_value(raw: &str, kind: Kind) -> Value {
    // Text keys take the text as it is: read as TOML, `1_000` would become `1000`, `0.10`
    // `0.1`, and a quoted password would lose its quotes.
    if kind == Kind::Str || (kind == Kind::StrOrList && !raw.trim_start().starts_with('[')) {
        return Value::String(raw.to_string());
    }
    // A TOML value where the text is one (`10`, `true`, `["a", "b"]`), else a plain string.
    format!("v = {raw}")
        .parse::<Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| Value::String(raw.to_string()))
}

fn table_at<'t>(root: &'t mut Table, path: &[&str]) -> Option<&'t mut Table> {
    let mut t = root;
    for part in path {
        let entry = t
            .entry(part.to_string())
            .or_insert_with(|| Value::Table(Table::new()));
        t = entry.as_table_mut()?;
    }
    Some(t)
}

fn apply_env_overrides(
    table: &mut Table,
    env: &BTreeMap<String, String>,
    origins: &mut Origins,
) -> Result<(), ConfigError> {
    for (key, kind) in KEYS {
        if *kind == Kind::Table {
            continue;
        }
        let var = env_var_for(key);
        let Some(raw) = env.get(&var) else { continue };
        let parts: Vec<&str> = key.split('.').collect();
        let (last, parents) = parts.split_last().expect("keys are dotted");
        let Some(t) = table_at(table, parents) else {
            return Err(ConfigError::Key {
                origin: Origin::Env(var),
                key: parents.join("."),
                reason: "cannot override a key inside a value that is not a table".into(),
            });
        };
        t.insert(last.to_string(), env_value(raw, *kind));
        origins.env_keys.insert(key.to_string(), var);
    }
    for (var, raw) in env {
        let Some(rest) = var.strip_prefix(PROPERTY_ENV_PREFIX) else {
            continue;
        };
        let name = rest.to_ascii_lowercase().replace('_', ".");
        if name.is_empty() {
            continue;
        }
        if let Some(t) = table_at(table, &["kafka", "properties"]) {
            t.insert(name.clone(), Value::String(raw.clone()));
            origins
                .env_keys
                .insert(format!("kafka.properties.{name}"), var.clone());
        }
    }
    Ok(())
}

/// Warnings for `DEVOUR_*` variables that look like a setting but are none (a misspelt name,
/// or a table that is read from the file only): they would be ignored without a word.
fn unknown_env_warnings(env: &BTreeMap<String, String>) -> Vec<String> {
    let known: Vec<String> = KEYS
        .iter()
        .filter(|(_, kind)| *kind != Kind::Table)
        .map(|(k, _)| env_var_for(k))
        .collect();
    let mut warnings = Vec::new();
    for var in env
        .keys()
        .filter(|v| v.to_ascii_uppercase().starts_with("DEVOUR_"))
    {
        if var == CONFIG_ENV || var.starts_with(PROPERTY_ENV_PREFIX) || known.contains(var) {
            continue;
        }
        let why = if let Some(rest) = var.strip_prefix("DEVOUR_KAFKA_PROPERTIES_") {
            Some(format!("did you mean {PROPERTY_ENV_PREFIX}{rest}?"))
        } else if var.starts_with("DEVOUR_RELAY_PRODUCER_") {
            Some("[relay.producer] is read from the file only".to_string())
        } else if var.starts_with("DEVOUR_CONSUMERS_") {
            Some("consumer routes are read from the file only".to_string())
        } else {
            // Misspelt, in the wrong case, or a known name cut short or run on
            // (DEVOUR_RELAY_LEASE_TTL, DEVOUR_METRICS_LISTEN_ADDR).
            let upper = var.to_ascii_uppercase();
            known
                .iter()
                .map(|k| (strsim::levenshtein(&upper, k), k))
                .filter(|(distance, k)| {
                    *distance <= 2
                        || (upper.len() >= 12
                            && (k.starts_with(&upper) || upper.starts_with(k.as_str())))
                })
                .min()
                .map(|(_, k)| format!("did you mean {k}?"))
        };
        if let Some(why) = why {
            warnings.push(format!(
                "the environment variable {var} is not a devour setting and is ignored: {why}"
            ));
        }
    }
    warnings
}

fn suggest<'a>(unknown: &str, known: impl IntoIterator<Item = &'a str>) -> String {
    let best = known
        .into_iter()
        .map(|k| (strsim::jaro_winkler(unknown, k), k))
        .filter(|(score, _)| *score > 0.7)
        .max_by(|a, b| a.0.total_cmp(&b.0));
    match best {
        Some((_, k)) => format!("; did you mean `{k}`?"),
        None => String::new(),
    }
}

fn check_unknown_keys(table: &Table, origins: &Origins) -> Result<(), ConfigError> {
    for (section, value) in table {
        if !SECTIONS.contains(&section.as_str()) {
            return Err(ConfigError::Key {
                origin: origins.file.clone(),
                key: section.clone(),
                reason: format!(
                    "unknown section{} (known: {})",
                    suggest(section, SECTIONS.iter().copied()),
                    SECTIONS.join(", ")
                ),
            });
        }
        let Value::Table(t) = value else {
            return Err(ConfigError::Key {
                origin: origins.file.clone(),
                key: section.clone(),
                reason: format!(
                    "wrong type: expected a table `[{section}]`, found {}",
                    value.type_str()
                ),
            });
        };
        if section == "consumers" {
            consumers::check_keys(t, origins)?;
        } else {
            check_table_keys(section, t, origins)?;
        }
    }
    Ok(())
}

fn check_table_keys(prefix: &str, t: &Table, origins: &Origins) -> Result<(), ConfigError> {
    let children: BTreeSet<&str> = KEYS
        .iter()
        .filter_map(|(k, _)| k.strip_prefix(prefix)?.strip_prefix('.'))
        .filter(|rest| !rest.contains('.'))
        .collect();
    for (name, value) in t {
        let key = format!("{prefix}.{name}");
        let Some((_, kind)) = KEYS.iter().find(|(k, _)| *k == key) else {
            return Err(ConfigError::Key {
                origin: origins.of(&key),
                key: key.clone(),
                reason: format!(
                    "unknown key{} (known in `[{prefix}]`: {})",
                    suggest(name, children.iter().copied()),
                    children.iter().copied().collect::<Vec<_>>().join(", ")
                ),
            });
        };
        if *kind == Kind::Table && key != "kafka.properties" && key != "relay.producer" {
            match value {
                Value::Table(inner) => check_table_keys(&key, inner, origins)?,
                other => {
                    return Err(ConfigError::Key {
                        origin: origins.of(&key),
                        key,
                        reason: format!("wrong type: expected a table, found {}", other.type_str()),
                    })
                }
            }
        }
    }
    Ok(())
}

/// Typed access to the merged table, with errors that name the key and its origin.
struct Reader<'a> {
    table: &'a Table,
    origins: &'a Origins,
}

impl Reader<'_> {
    fn origin(&self, key: &str) -> Origin {
        self.origins.of(key)
    }

    fn err(&self, key: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::Key {
            origin: self.origin(key),
            key: key.to_string(),
            reason: reason.into(),
        }
    }

    fn get(&self, key: &str) -> Option<&Value> {
        let mut parts = key.split('.');
        let mut v = self.table.get(parts.next()?)?;
        for p in parts {
            v = v.as_table()?.get(p)?;
        }
        Some(v)
    }

    fn wrong_type(&self, key: &str, kind: Kind, found: &Value) -> ConfigError {
        self.err(
            key,
            format!(
                "wrong type: expected {}, found {} `{found}`",
                kind.describe(),
                found.type_str()
            ),
        )
    }

    fn is_from_env(&self, key: &str) -> bool {
        self.origins.env_keys.contains_key(key)
    }

    fn string(&self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            // An environment value such as `1234` is a string when a string is expected.
            Some(v @ (Value::Integer(_) | Value::Float(_) | Value::Boolean(_)))
                if self.is_from_env(key) =>
            {
                Ok(Some(v.to_string()))
            }
            Some(v) => Err(self.wrong_type(key, Kind::Str, v)),
        }
    }

    fn string_list(&self, key: &str) -> Result<Option<Vec<String>>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(
                s.split(',')
                    .map(|h| h.trim().to_string())
                    .filter(|h| !h.is_empty())
                    .collect(),
            )),
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| match i {
                    Value::String(s) => Ok(s.trim().to_string()),
                    other => Err(self.wrong_type(key, Kind::StrOrList, other)),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(v) => Err(self.wrong_type(key, Kind::StrOrList, v)),
        }
    }

    /// An array of strings, taken as it is (no splitting at commas).
    fn string_list_exact(&self, key: &str) -> Result<Vec<String>, ConfigError> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| match i {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(self.wrong_type(key, Kind::StrOrList, other)),
                })
                .collect(),
            Some(v) => Err(self.wrong_type(key, Kind::StrOrList, v)),
        }
    }

    fn integer(&self, key: &str) -> Result<Option<i64>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Integer(i)) => Ok(Some(*i)),
            Some(v) => Err(self.wrong_type(key, Kind::Int, v)),
        }
    }

    fn positive(&self, key: &str) -> Result<Option<u64>, ConfigError> {
        match self.integer(key)? {
            None => Ok(None),
            Some(i) if i > 0 => Ok(Some(i as u64)),
            Some(i) => Err(self.err(key, format!("must be greater than zero, found {i}"))),
        }
    }

    /// A positive integer no larger than `max`.
    fn positive_at_most(&self, key: &str, max: u64) -> Result<Option<u64>, ConfigError> {
        match self.positive(key)? {
            Some(n) if n > max => Err(self.err(key, format!("must be at most {max}, found {n}"))),
            other => Ok(other),
        }
    }

    fn timeout_u32(&self, key: &str) -> Result<Option<u32>, ConfigError> {
        match self.positive(key)? {
            None => Ok(None),
            Some(n) => u32::try_from(n)
                .map(Some)
                .map_err(|_| self.err(key, format!("{n} ms is too large (at most {})", u32::MAX))),
        }
    }

    /// A table of librdkafka properties: every value a string, number or boolean.
    fn properties(&self, key: &str) -> Result<BTreeMap<String, String>, ConfigError> {
        let mut out = BTreeMap::new();
        let props = match self.get(key) {
            None => return Ok(out),
            Some(Value::Table(props)) => props,
            Some(other) => {
                return Err(self.err(
                    key,
                    format!(
                        "wrong type: expected a table of librdkafka properties \
                         (`{key} = {{ \"name\" = \"value\" }}` or a `[{key}]` section), found {}",
                        other.type_str()
                    ),
                ))
            }
        };
        for (name, value) in props {
            let v = match value {
                Value::String(s) => s.clone(),
                Value::Integer(i) => i.to_string(),
                Value::Float(f) => f.to_string(),
                Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(self.err(
                        &format!("{key}.{name}"),
                        format!(
                            "wrong type: librdkafka properties are strings, numbers or booleans, found {}",
                            other.type_str()
                        ),
                    ))
                }
            };
            out.insert(name.clone(), v);
        }
        Ok(out)
    }

    fn boolean(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Boolean(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong_type(key, Kind::Bool, v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, Origin::File("t.toml".into()), &BTreeMap::new())
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let c = load("[kafka]\nhosts = \"127.0.0.1:9092\"\n").unwrap();
        assert_eq!(c.database.url, DatabaseUrl::Sqlite("devour.db".into()));
        assert_eq!(c.database.pool_size, 10);
        assert_eq!(c.outbox.max_message_bytes, 1024 * 1024);
        assert!(c.kafka.exclude_internal_topics);
        assert_eq!(
            c.kafka.client_properties()["bootstrap.servers"],
            "127.0.0.1:9092"
        );
        assert_eq!(c.kafka.offsets_timeout(), std::time::Duration::from_secs(5));
    }

    #[test]
    fn offsets_channel_socket_timeout_sets_the_offset_fetch_timeout() {
        let c =
            load("[kafka]\nhosts = \"a:1\"\noffsets_channel_socket_timeout_ms = 750\n").unwrap();
        assert_eq!(
            c.kafka.offsets_timeout(),
            std::time::Duration::from_millis(750)
        );
    }

    #[test]
    fn env_overrides_single_keys_with_types() {
        let c = Config::from_toml_str(
            "[kafka]\nhosts = \"a:1\"\n",
            Origin::File("t.toml".into()),
            &env(&[
                ("DEVOUR_KAFKA_HOSTS", "b:2,c:3"),
                ("DEVOUR_DATABASE_POOL_SIZE", "3"),
                ("DEVOUR_KAFKA_CLIENT_ID", "1234"),
                ("DEVOUR_KAFKA_PROPERTY_LINGER_MS", "20"),
            ]),
        )
        .unwrap();
        assert_eq!(c.kafka.hosts, vec!["b:2", "c:3"]);
        assert_eq!(c.database.pool_size, 3);
        assert_eq!(c.kafka.client_id.as_deref(), Some("1234"));
        assert_eq!(c.kafka.properties["linger.ms"], "20");
    }

    /// Text keys keep the variable's text exactly (not read as a TOML number or string).
    #[test]
    fn env_overrides_of_text_keys_keep_the_text() {
        let c = Config::from_toml_str(
            "[kafka]\nhosts = \"a:1\"\n",
            Origin::File("t.toml".into()),
            &env(&[
                ("DEVOUR_KAFKA_BROKER_VERSION", "0.10"),
                ("DEVOUR_KAFKA_CLIENT_ID", "1_000"),
                ("DEVOUR_RELAY_RELAY_ID", "'quoted'"),
            ]),
        )
        .unwrap();
        assert_eq!(c.kafka.broker_version.as_deref(), Some("0.10"));
        assert_eq!(c.kafka.client_id.as_deref(), Some("1_000"));
        assert_eq!(c.relay.relay_id.as_deref(), Some("'quoted'"));
    }

    /// Every kind of secret property, in each table that takes librdkafka properties, is
    /// printed as `***` by `devour config check`; other properties as they are.
    #[test]
    fn config_check_hides_every_kind_of_secret_property() {
        let secrets = [
            ("sasl.password", "v-password"),
            ("ssl.key.password", "v-key-password"),
            ("ssl.keystore.passphrase", "v-passphrase"),
            ("sasl.oauthbearer.client.secret", "v-client-secret"),
            ("sasl.oauthbearer.token.endpoint.url", "v-token-url"),
            ("ssl.key.pem", "v-key-pem"),
            ("sasl.oauthbearer.config", "v-oauthbearer-config"),
        ];
        let props: String = secrets
            .iter()
            .map(|(k, v)| format!("\"{k}\" = \"{v}\"\n"))
            .collect();
        let text = format!(
            "[kafka]\nhosts = \"a:1\"\n[kafka.properties]\n{props}\"client.rack\" = \"r1\"\n\
             [relay.producer]\n{props}\n\
             [consumers.c]\ntopic = \"t\"\nhandler = \"print\"\n[consumers.c.properties]\n{props}"
        );
        let c = Config::from_toml_str(&text, Origin::Defaults, &env(&[])).unwrap();
        let shown = c.to_redacted_toml();
        for (k, v) in secrets {
            assert!(!shown.contains(v), "{k}'s value printed:\n{shown}");
            assert_eq!(
                shown.matches(&format!("\"{k}\" = \"***\"")).count(),
                3,
                "{k} shown as *** in [kafka.properties], [relay.producer] and the route:\n{shown}"
            );
        }
        assert!(shown.contains("\"client.rack\" = \"r1\""), "{shown}");
    }

    /// `config check` shows the defaults devour applies, not only what was set.
    #[test]
    fn config_check_shows_devour_s_own_defaults() {
        let c = Config::from_toml_str("[kafka]\nhosts = \"a:1\"\n", Origin::Defaults, &env(&[]))
            .unwrap();
        let shown = c.to_redacted_toml();
        for line in [
            "offsets_channel_socket_timeout_ms = 5000",
            "pool_size = 10",
            "exclude_internal_topics = true",
        ] {
            assert!(shown.contains(line), "{line} missing:\n{shown}");
        }
    }

    #[test]
    fn url_password_is_redacted() {
        assert_eq!(
            redact_url_password("postgres://u:secret@h:5432/db?x=1"),
            "postgres://u:***@h:5432/db?x=1"
        );
        assert_eq!(redact_url_password("postgres://h/db"), "postgres://h/db");
        assert_eq!(
            redact_url_password("postgresql://u@h/db?password=s&sslmode=require&sslpassword=t"),
            "postgresql://u@h/db?password=***&sslmode=require&sslpassword=***"
        );
        // libpq reads the user info up to the first `@` before the first `/`.
        assert_eq!(
            redact_url_password("postgres://app:pa?ss@db:5432/app?sslmode=require"),
            "postgres://app:***@db:5432/app?sslmode=require"
        );
    }

    #[test]
    fn host_port_validation() {
        assert!(validate_host_port("127.0.0.1:9092").is_ok());
        assert!(validate_host_port("[::1]:9092").is_ok());
        assert!(validate_host_port("broker").is_err());
        assert!(validate_host_port("broker:x").is_err());
        assert!(validate_host_port("broker:0").is_err());
        assert!(validate_host_port(":9092").is_err());
    }

    #[test]
    fn every_key_has_an_env_name() {
        assert_eq!(
            env_var_for("kafka.ssl_config.cafile"),
            "DEVOUR_KAFKA_SSL_CONFIG_CAFILE"
        );
        assert_eq!(env_var_for("database.url"), "DEVOUR_DATABASE_URL");
    }
}
