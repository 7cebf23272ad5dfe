//! `[consumers.NAME]`: the routes of `devour consume NAME` (the seed's `consumer_routes`).
//!
//! Each route names the topics to read, the consumer group, the handler and how messages reach
//! it. Routes are read from the file only (no `DEVOUR_*` overrides: a route name can contain
//! `_`, which would make the variable names ambiguous). Everything is validated at load, except
//! that the handler exists: that is checked against the registry when `devour consume` starts.

use std::collections::{BTreeMap, BTreeSet};

use toml::{Table, Value};

use super::{suggest, ConfigError, Origins, Reader};

/// `[consumers.NAME]`: one consumer route.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ConsumerRoute {
    /// NAME, the key of the route.
    pub name: String,
    /// `topic` or `topics`: what to read (required).
    pub topics: Vec<String>,
    /// `group`: the Kafka consumer group (default NAME).
    pub group: String,
    /// `handler`: the registered handler's name (default NAME); built-ins: `print`, `exec`.
    pub handler: String,
    /// `consumer_type`: `"balanced"` (default, a consumer group) or `"simple"`.
    pub consumer_type: ConsumerType,
    /// `dump`: the form in which a message reaches the handler (default `"json"`).
    pub dump: Dump,
    /// `start_from`: where a group without committed offsets starts (default `"earliest"`).
    pub start_from: StartFrom,
    /// `concurrency`: partitions processed in parallel, order kept within each (default 1).
    pub concurrency: usize,
    /// `[consumers.NAME.retry]`: how a failing message is retried.
    pub retry: RetryPolicy,
    /// `dead_letter_topic`: where messages that will never succeed go
    /// (default: the message's topic + `.dlq`).
    pub dead_letter_topic: Option<String>,
    /// `inbox`: record each message in the inbox tables in the handler's transaction and skip
    /// redeliveries (default false).
    pub inbox: bool,
    /// `inbox_retention_hours`: inbox rows older than this are deleted (default 168).
    pub inbox_retention_hours: u64,
    /// `inbox_batch`: messages handled per inbox transaction, at most (default 5000).
    pub inbox_batch: usize,
    /// `command`: the program and arguments the `exec` handler runs per message.
    pub command: Vec<String>,
    /// `exec_timeout_ms`: how long one `exec` run may take before it is killed (default 30000).
    pub exec_timeout_ms: u64,
    /// `[consumers.NAME.properties]`: librdkafka properties for this route's consumer, over
    /// `[kafka.properties]`.
    pub properties: BTreeMap<String, String>,
}

impl ConsumerRoute {
    /// The dead-letter topic for a message read from `topic`.
    pub fn dead_letter_topic_for(&self, topic: &str) -> String {
        self.dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("{topic}{DLQ_SUFFIX}"))
    }
}

/// Suffix of the default dead-letter topic.
pub const DLQ_SUFFIX: &str = ".dlq";

/// How a route's consumer gets its partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsumerType {
    /// A member of consumer group `group`: partitions are shared among the members.
    Balanced,
    /// Every partition of the topics is assigned to this consumer; no group membership (offsets
    /// are still committed under `group`, so a restart resumes).
    Simple,
}

/// The form in which a message's payload reaches the handler (the seed's `dump_raw`,
/// `dump_json`, `dump_obj`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dump {
    /// The bytes as they are.
    Raw,
    /// A `serde_json::Value`.
    Json,
    /// The handler's own serde type (the seed's `schema_class`).
    Obj,
}

impl Dump {
    /// The name used in devour.toml.
    pub fn as_str(self) -> &'static str {
        match self {
            Dump::Raw => "raw",
            Dump::Json => "json",
            Dump::Obj => "obj",
        }
    }
}

/// Where a group without committed offsets starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFrom {
    /// The oldest message still in the topic.
    Earliest,
    /// Only messages produced after the consumer started.
    Latest,
}

impl StartFrom {
    /// The name used in devour.toml (and librdkafka's `auto.offset.reset`).
    pub fn as_str(self) -> &'static str {
        match self {
            StartFrom::Earliest => "earliest",
            StartFrom::Latest => "latest",
        }
    }
}

/// `[consumers.NAME.retry]`: exponential backoff per message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// `max_attempts`: handler calls per message before it goes to the dead-letter topic
    /// (default 5).
    pub max_attempts: u32,
    /// `initial_backoff_ms`: wait after the first failure (default 200); doubles each time.
    pub initial_backoff_ms: u64,
    /// `max_backoff_ms`: the longest wait between two attempts (default 30000).
    pub max_backoff_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff_ms: 200,
            max_backoff_ms: 30_000,
        }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt `attempt` (1-based).
    pub fn backoff_ms(&self, attempt: u32) -> u64 {
        let factor = 1u64 << attempt.saturating_sub(1).min(32);
        self.initial_backoff_ms
            .saturating_mul(factor)
            .min(self.max_backoff_ms)
    }

    /// The sum of all waits of a message that fails every attempt.
    pub fn total_backoff_ms(&self) -> u64 {
        (1..self.max_attempts)
            .map(|a| self.backoff_ms(a))
            .fold(0u64, u64::saturating_add)
    }
}

/// The keys of a route.
pub(super) const ROUTE_KEYS: &[&str] = &[
    "topic",
    "topics",
    "group",
    "handler",
    "consumer_type",
    "dump",
    "start_from",
    "concurrency",
    "retry",
    "dead_letter_topic",
    "inbox",
    "inbox_retention_hours",
    "inbox_batch",
    "command",
    "exec_timeout_ms",
    "properties",
];

pub(super) const RETRY_KEYS: &[&str] = &["max_attempts", "initial_backoff_ms", "max_backoff_ms"];

/// Properties devour sets itself: a route may not override them.
const RESERVED_PROPERTIES: &[(&str, &str)] = &[
    ("group.id", "set the route's `group` instead"),
    (
        "enable.auto.offset.store",
        "devour stores an offset only after the handler succeeded",
    ),
    ("auto.offset.reset", "set the route's `start_from` instead"),
    (
        "enable.auto.commit",
        "devour commits the offsets of finished messages itself",
    ),
    (
        "enable.partition.eof",
        "devour finds the end of a drain itself",
    ),
];

/// The longest a consumer may go without polling before the group drops it, unless the route
/// or `[kafka.properties]` set `max.poll.interval.ms`.
const DEFAULT_MAX_POLL_INTERVAL_MS: u64 = 300_000;

/// Checks the keys under `[consumers]`: every entry a table of known keys.
pub(super) fn check_keys(t: &Table, origins: &Origins) -> Result<(), ConfigError> {
    let known = ROUTE_KEYS;
    for (name, value) in t {
        let prefix = format!("consumers.{name}");
        let Value::Table(route) = value else {
            return Err(ConfigError::Key {
                origin: origins.of(&prefix),
                key: prefix,
                reason: format!(
                    "wrong type: a route is a table `[consumers.{name}]` with at least `topic` (and `handler`, which defaults to the route's name), found {}",
                    value.type_str()
                ),
            });
        };
        for (key, v) in route {
            if !known.contains(&key.as_str()) {
                return Err(ConfigError::Key {
                    origin: origins.of(&prefix),
                    key: format!("{prefix}.{key}"),
                    reason: format!(
                        "unknown key{} (known in a route: {})",
                        suggest(key, known.iter().copied()),
                        known.join(", ")
                    ),
                });
            }
            if key == "retry" {
                let Value::Table(retry) = v else {
                    return Err(ConfigError::Key {
                        origin: origins.of(&prefix),
                        key: format!("{prefix}.retry"),
                        reason: format!("wrong type: expected a table, found {}", v.type_str()),
                    });
                };
                for k in retry.keys() {
                    if !RETRY_KEYS.contains(&k.as_str()) {
                        return Err(ConfigError::Key {
                            origin: origins.of(&prefix),
                            key: format!("{prefix}.retry.{k}"),
                            reason: format!(
                                "unknown key{} (known: {})",
                                suggest(k, RETRY_KEYS.iter().copied()),
                                RETRY_KEYS.join(", ")
                            ),
                        });
                    }
                }
            }
        }
    }
    Ok(())
}

/// Reads every route of `[consumers]`. `kafka_properties` are the `[kafka.properties]`, for
/// checks that depend on them.
pub(super) fn parse(
    r: &Reader<'_>,
    kafka_properties: &BTreeMap<String, String>,
    pool_size: u32,
) -> Result<BTreeMap<String, ConsumerRoute>, ConfigError> {
    let mut routes = BTreeMap::new();
    let Some(Value::Table(t)) = r.get("consumers") else {
        return Ok(routes);
    };
    for name in t.keys() {
        let route = parse_route(r, name, kafka_properties)?;
        // Each inbox worker holds a connection; one more serves cleanup and health checks.
        if route.inbox && route.concurrency as u64 + 1 > u64::from(pool_size) {
            return Err(r.err(
                &format!("consumers.{name}.concurrency"),
                format!(
                    "{} inbox workers need {} database connections, but database.pool_size is {pool_size}: \
                     raise database.pool_size or lower concurrency",
                    route.concurrency,
                    route.concurrency + 1
                ),
            ));
        }
        routes.insert(name.clone(), route);
    }
    Ok(routes)
}

fn one_of<T: Copy>(
    r: &Reader<'_>,
    key: &str,
    choices: &[(&str, T)],
    default: T,
) -> Result<T, ConfigError> {
    match r.string(key)? {
        None => Ok(default),
        Some(v) => choices
            .iter()
            .find(|(name, _)| *name == v)
            .map(|(_, c)| *c)
            .ok_or_else(|| {
                let names: Vec<String> = choices.iter().map(|(n, _)| format!("\"{n}\"")).collect();
                r.err(
                    key,
                    format!(
                        "`{v}` is not one of {}{}",
                        names.join(", "),
                        suggest(&v, choices.iter().map(|(n, _)| *n))
                    ),
                )
            }),
    }
}

fn parse_route(
    r: &Reader<'_>,
    name: &str,
    kafka_properties: &BTreeMap<String, String>,
) -> Result<ConsumerRoute, ConfigError> {
    let key = |k: &str| format!("consumers.{name}.{k}");
    let route_key = format!("consumers.{name}");
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Err(r.err(
            &route_key,
            "a route name is made of ASCII letters, digits, `_`, `-` and `.`",
        ));
    }

    let topics = match (r.string(&key("topic"))?, r.string_list(&key("topics"))?) {
        (Some(_), Some(_)) => {
            return Err(r.err(
                &key("topics"),
                "give either `topic` or `topics`, not both",
            ))
        }
        (Some(t), None) => vec![t],
        (None, Some(ts)) if ts.is_empty() => {
            return Err(r.err(&key("topics"), "is empty: give at least one topic"))
        }
        (None, Some(ts)) => ts,
        (None, None) => {
            return Err(r.err(
                &key("topic"),
                format!("missing: a route needs the topic it reads, e.g. `topic = \"orders\"` under `[consumers.{name}]`"),
            ))
        }
    };
    let which = if r.get(&key("topic")).is_some() {
        key("topic")
    } else {
        key("topics")
    };
    let mut seen = BTreeSet::new();
    for t in &topics {
        crate::outbox::validate_topic(t).map_err(|e| r.err(&which, e.to_string()))?;
        if !seen.insert(t.as_str()) {
            return Err(r.err(&which, format!("topic `{t}` is listed twice")));
        }
    }

    let non_empty = |k: &str| -> Result<Option<String>, ConfigError> {
        match r.string(&key(k))? {
            Some(v) if v.trim().is_empty() => Err(r.err(&key(k), "must not be empty")),
            v => Ok(v),
        }
    };
    let group = non_empty("group")?.unwrap_or_else(|| name.to_string());
    let handler = non_empty("handler")?.unwrap_or_else(|| name.to_string());

    let consumer_type = one_of(
        r,
        &key("consumer_type"),
        &[
            ("balanced", ConsumerType::Balanced),
            ("simple", ConsumerType::Simple),
        ],
        ConsumerType::Balanced,
    )?;
    let dump = one_of(
        r,
        &key("dump"),
        &[("raw", Dump::Raw), ("json", Dump::Json), ("obj", Dump::Obj)],
        Dump::Json,
    )?;
    let start_from = one_of(
        r,
        &key("start_from"),
        &[
            ("earliest", StartFrom::Earliest),
            ("latest", StartFrom::Latest),
        ],
        StartFrom::Earliest,
    )?;

    let concurrency = match r.positive(&key("concurrency"))? {
        None => 1,
        Some(n) if n <= MAX_CONCURRENCY as u64 => n as usize,
        Some(n) => {
            return Err(r.err(
                &key("concurrency"),
                format!("{n} is too many: at most {MAX_CONCURRENCY} partitions in parallel"),
            ))
        }
    };

    let mut retry = RetryPolicy::default();
    if let Some(n) = r.positive(&key("retry.max_attempts"))? {
        retry.max_attempts = u32::try_from(n)
            .map_err(|_| r.err(&key("retry.max_attempts"), format!("{n} is too large")))?;
    }
    if let Some(n) = r.positive(&key("retry.initial_backoff_ms"))? {
        retry.initial_backoff_ms = n;
    }
    if let Some(n) = r.positive(&key("retry.max_backoff_ms"))? {
        retry.max_backoff_ms = n;
    }
    if retry.max_backoff_ms < retry.initial_backoff_ms {
        return Err(r.err(
            &key("retry.max_backoff_ms"),
            format!(
                "{} is less than retry.initial_backoff_ms ({})",
                retry.max_backoff_ms, retry.initial_backoff_ms
            ),
        ));
    }

    let dead_letter_topic = r.string(&key("dead_letter_topic"))?;
    // The dead-letter topic of each topic read: the one set, else `<topic>.dlq`.
    let dead_letter_topics: Vec<String> = match &dead_letter_topic {
        Some(d) => vec![d.clone()],
        None => topics.iter().map(|t| format!("{t}{DLQ_SUFFIX}")).collect(),
    };
    for d in &dead_letter_topics {
        let unset = if dead_letter_topic.is_none() {
            " (the default, `<topic>.dlq`: set `dead_letter_topic`)"
        } else {
            ""
        };
        crate::outbox::validate_topic(d)
            .map_err(|e| r.err(&key("dead_letter_topic"), format!("{e}{unset}")))?;
        if topics.contains(d) {
            return Err(r.err(
                &key("dead_letter_topic"),
                format!(
                    "`{d}` is also a topic this route reads: dead letters would come back{unset}"
                ),
            ));
        }
    }

    let inbox = r.boolean(&key("inbox"))?.unwrap_or(false);
    let inbox_retention_hours = r
        .positive_at_most(&key("inbox_retention_hours"), super::MAX_RETENTION_HOURS)?
        .unwrap_or(168);
    let inbox_batch = match r.positive(&key("inbox_batch"))? {
        None => 5000,
        Some(n) if n <= 10_000 => n as usize,
        Some(n) => {
            return Err(r.err(
                &key("inbox_batch"),
                format!("{n} is too large: at most 10000 messages per transaction"),
            ))
        }
    };

    let command = match r.get(&key("command")) {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(_) => r.string_list_exact(&key("command"))?,
    };
    if handler == "exec" {
        if command.is_empty() || command[0].trim().is_empty() {
            return Err(r.err(
                &key("command"),
                "missing: the `exec` handler needs `command = [\"PROGRAM\", \"ARG\", …]`",
            ));
        }
    } else if !command.is_empty() {
        return Err(r.err(
            &key("command"),
            format!("is only used by `handler = \"exec\"`; this route's handler is `{handler}`"),
        ));
    }
    if handler != "exec" && r.get(&key("exec_timeout_ms")).is_some() {
        return Err(r.err(
            &key("exec_timeout_ms"),
            format!("is only used by `handler = \"exec\"`; this route's handler is `{handler}`"),
        ));
    }
    let exec_timeout_ms = r.positive(&key("exec_timeout_ms"))?.unwrap_or(30_000);

    let properties = r.properties(&key("properties"))?;
    for (prop, why) in RESERVED_PROPERTIES {
        if properties.contains_key(*prop) {
            return Err(r.err(
                &key(&format!("properties.{prop}")),
                format!("cannot be set here: {why}"),
            ));
        }
    }

    // Retries run between two polls of the consumer: their waits must end before the group
    // gives the partitions away.
    if consumer_type == ConsumerType::Balanced {
        let poll_key = "max.poll.interval.ms";
        let limit = properties
            .get(poll_key)
            .or_else(|| kafka_properties.get(poll_key))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(DEFAULT_MAX_POLL_INTERVAL_MS);
        let waits = retry.total_backoff_ms();
        if waits.saturating_add(10_000) > limit {
            return Err(r.err(
                &key("retry.max_backoff_ms"),
                format!(
                    "a message failing {} times waits {waits} ms in total, too close to {poll_key} ({limit} ms): \
                     the group would drop this consumer; lower max_attempts or the backoffs, or raise \
                     {poll_key} under [consumers.{name}.properties]",
                    retry.max_attempts
                ),
            ));
        }
        // An `exec` command that hangs until its timeout on every attempt, plus the waits.
        let exec_worst = u64::from(retry.max_attempts)
            .saturating_mul(exec_timeout_ms)
            .saturating_add(waits);
        if handler == "exec" && exec_worst.saturating_add(10_000) > limit {
            return Err(r.err(
                &key("exec_timeout_ms"),
                format!(
                    "{} attempts of up to {exec_timeout_ms} ms plus {waits} ms of waits come too close to \
                     {poll_key} ({limit} ms): the group would drop this consumer; lower exec_timeout_ms or \
                     retry.max_attempts, or raise {poll_key} under [consumers.{name}.properties]",
                    retry.max_attempts
                ),
            ));
        }
    }

    Ok(ConsumerRoute {
        name: name.to_string(),
        topics,
        group,
        handler,
        consumer_type,
        dump,
        start_from,
        concurrency,
        retry,
        dead_letter_topic,
        inbox,
        inbox_retention_hours,
        inbox_batch,
        command,
        exec_timeout_ms,
        properties,
    })
}

/// Most partitions a route processes in parallel.
pub const MAX_CONCURRENCY: usize = 64;

/// The routes as TOML, for `devour config check` (secret properties masked).
pub(super) fn to_table(routes: &BTreeMap<String, ConsumerRoute>) -> Table {
    let mut all = Table::new();
    for (name, c) in routes {
        let mut t = Table::new();
        if c.topics.len() == 1 {
            t.insert("topic".into(), c.topics[0].clone().into());
        } else {
            t.insert(
                "topics".into(),
                Value::Array(c.topics.iter().cloned().map(Value::from).collect()),
            );
        }
        t.insert("group".into(), c.group.clone().into());
        t.insert("handler".into(), c.handler.clone().into());
        let consumer_type = match c.consumer_type {
            ConsumerType::Balanced => "balanced",
            ConsumerType::Simple => "simple",
        };
        t.insert("consumer_type".into(), consumer_type.into());
        t.insert("dump".into(), c.dump.as_str().into());
        t.insert("start_from".into(), c.start_from.as_str().into());
        t.insert("concurrency".into(), (c.concurrency as i64).into());
        let mut retry = Table::new();
        retry.insert(
            "max_attempts".into(),
            i64::from(c.retry.max_attempts).into(),
        );
        retry.insert(
            "initial_backoff_ms".into(),
            super::clamp_i64(c.retry.initial_backoff_ms).into(),
        );
        retry.insert(
            "max_backoff_ms".into(),
            super::clamp_i64(c.retry.max_backoff_ms).into(),
        );
        t.insert("retry".into(), retry.into());
        let dlq = match &c.dead_letter_topic {
            Some(d) => d.clone(),
            None => c
                .topics
                .iter()
                .map(|t| format!("{t}{DLQ_SUFFIX}"))
                .collect::<Vec<_>>()
                .join(", "),
        };
        t.insert("dead_letter_topic".into(), dlq.into());
        t.insert("inbox".into(), c.inbox.into());
        t.insert(
            "inbox_retention_hours".into(),
            super::clamp_i64(c.inbox_retention_hours).into(),
        );
        t.insert("inbox_batch".into(), (c.inbox_batch as i64).into());
        if !c.command.is_empty() {
            t.insert(
                "command".into(),
                Value::Array(c.command.iter().cloned().map(Value::from).collect()),
            );
            t.insert(
                "exec_timeout_ms".into(),
                super::clamp_i64(c.exec_timeout_ms).into(),
            );
        }
        t.insert(
            "properties".into(),
            super::redacted_properties(&c.properties).into(),
        );
        all.insert(name.clone(), t.into());
    }
    all
}
