//! `devour status`: is everything flowing? The outbox backlog per topic and shard and the age
//! of its oldest row, dead letters, relays and the shards they hold, and each consumer route's
//! lag. Gathered from the database and the broker; rendered as a table or as JSON.

use std::fmt::Write as _;
use std::time::Duration;

use crate::config::Config;
use crate::consume::lag::{route_lag, PartitionLag};
use crate::db::{DbError, DbPool, RelayState, ShardBacklog, TopicBacklog};

/// Everything `devour status` shows.
#[derive(Debug, Clone, serde::Serialize)]
#[non_exhaustive]
pub struct Status {
    /// Why the database part (outbox, dead letters, relays) could not be read; those fields
    /// are then empty.
    pub database_error: Option<String>,
    /// Undelivered rows.
    pub outbox: Backlog,
    /// Rows per shard (shards with rows only).
    pub shards: Vec<ShardBacklog>,
    /// Dead letters.
    pub dead_letters: Backlog,
    /// With `on_dead_letter = "block_key"`: undelivered rows of keys that have a dead letter,
    /// per key (they wait for `devour outbox retry` or `discard`); empty otherwise.
    pub held_back: Vec<crate::db::KeyRows>,
    /// Relays that heartbeat, with the shards they hold.
    pub relays: Vec<RelayState>,
    /// A relay whose last heartbeat is older than its own `lease_ttl_ms` (this, the status
    /// configuration's, for relays that did not record theirs) is silent: it crashed or was
    /// stopped without leaving (its row stays until another relay clears it).
    pub silent_after_s: f64,
    /// The relays judged silent so (their ids).
    pub silent: Vec<String>,
    /// Shards held by no relay under an unexpired lease.
    pub unheld_shards: i64,
    /// Each consumer route's lag.
    pub consumers: Vec<RouteStatus>,
}

/// Rows in all, the oldest's age, and per topic.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Backlog {
    /// Rows.
    pub rows: i64,
    /// Age of the oldest row in seconds (`null` when there is none).
    pub oldest_age_s: Option<f64>,
    /// Per topic, biggest first.
    pub topics: Vec<TopicBacklog>,
}

impl Backlog {
    fn of(topics: Vec<TopicBacklog>) -> Backlog {
        Backlog {
            rows: topics.iter().map(|t| t.rows).sum(),
            oldest_age_s: topics.iter().map(|t| t.oldest_age_s).reduce(f64::max),
            topics,
        }
    }
}

/// One consumer route's lag.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RouteStatus {
    /// Route name.
    pub route: String,
    /// Consumer group.
    pub group: String,
    /// Messages not yet finished by the group, over all partitions (`null` if unknown).
    pub lag: Option<i64>,
    /// Per partition.
    pub partitions: Vec<PartitionLag>,
    /// The route's topics that do not exist (yet): nothing to be behind on there, but a
    /// misspelt name shows here.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub missing_topics: Vec<String>,
    /// Why the lag is unknown (broker unreachable, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Status {
    /// Whether something could not be found out (a route's lag).
    pub fn problems(&self) -> Vec<String> {
        self.database_error
            .iter()
            .map(|e| format!("database: {e}"))
            .chain(self.consumers.iter().filter_map(|c| {
                c.error
                    .as_ref()
                    .map(|e| format!("consumer route {}: {e}", c.route))
            }))
            .collect()
    }
}

/// What `devour status` reads from the database.
#[derive(Default)]
struct DatabasePart {
    outbox: Backlog,
    shards: Vec<ShardBacklog>,
    dead_letters: Backlog,
    held_back: Vec<crate::db::KeyRows>,
    relays: Vec<RelayState>,
    held: i64,
}

fn database_part(config: &Config) -> Result<DatabasePart, DbError> {
    crate::db::require_existing_file(&config.database)?;
    let pool = DbPool::connect(&config.database)?;
    let mut conn = pool.get()?;
    let (topics, shards) = conn.backlog()?;
    let dead_letters = Backlog::of(conn.dead_letters_by_topic()?);
    let held_back = if config.relay.on_dead_letter == crate::config::DeadLetterPolicy::BlockKey
        && dead_letters.rows > 0
    {
        conn.held_back()?
    } else {
        Vec::new()
    };
    Ok(DatabasePart {
        outbox: Backlog::of(topics),
        shards,
        dead_letters,
        held_back,
        relays: conn.relays()?,
        held: conn.held_shards()?,
    })
}

/// Gathers the status. A part that cannot be read (the database, a route's lag) is reported as
/// such ([`Status::problems`]); the others are still read.
pub fn gather(config: &Config, timeout: Duration) -> Status {
    let (db, database_error) = match database_part(config) {
        Ok(db) => (db, None),
        Err(e) => {
            let text = match e.hint() {
                Some(hint) => format!("{e} ({hint})"),
                None => e.to_string(),
            };
            (
                DatabasePart::default(),
                Some(crate::telemetry::one_line_error(&text)),
            )
        }
    };
    let read = database_error.is_none();
    let DatabasePart {
        outbox,
        shards,
        dead_letters,
        held_back,
        relays,
        held,
    } = db;
    // Side by side: with the broker away each read takes the whole timeout, and the status
    // should take one timeout, not one per route.
    let lags: Vec<Result<Vec<PartitionLag>, String>> = std::thread::scope(|s| {
        let reads: Vec<_> = config
            .consumers
            .values()
            .map(|route| s.spawn(move || route_lag(config, route, timeout)))
            .collect();
        reads
            .into_iter()
            .map(|r| {
                r.join()
                    .unwrap_or_else(|_| Err("reading the lag panicked".into()))
            })
            .collect()
    });
    let consumers = config
        .consumers
        .values()
        .zip(lags)
        .map(|(route, lag)| match lag {
            Ok(partitions) => RouteStatus {
                route: route.name.clone(),
                group: route.group.clone(),
                lag: Some(partitions.iter().map(|p| p.lag).sum()),
                // A topic that exists has partitions, each read above.
                missing_topics: route
                    .topics
                    .iter()
                    .filter(|t| !partitions.iter().any(|p| &p.topic == *t))
                    .cloned()
                    .collect(),
                partitions,
                error: None,
            },
            Err(e) => RouteStatus {
                route: route.name.clone(),
                group: route.group.clone(),
                lag: None,
                partitions: Vec::new(),
                missing_topics: Vec::new(),
                error: Some(e),
            },
        })
        .collect();
    let silent_after_s = config.relay.lease_ttl_ms as f64 / 1000.0;
    let silent = relays
        .iter()
        .filter(|r| {
            r.heartbeat_age_s
                > r.lease_ttl_ms
                    .map_or(silent_after_s, |ms| ms as f64 / 1000.0)
        })
        .map(|r| r.relay_id.clone())
        .collect();
    Status {
        database_error,
        outbox,
        shards,
        dead_letters,
        held_back,
        relays,
        silent_after_s,
        silent,
        unheld_shards: if read {
            i64::from(crate::outbox::SHARDS) - held
        } else {
            0
        },
        consumers,
    }
}

/// `text` for one cell of a table: at most `max` characters, control characters (a payload's
/// newlines) written as escapes, so that every row stays on one line.
pub(crate) fn one_line(text: &str, max: usize) -> String {
    text.chars()
        .take(max)
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// Seconds as a short human duration.
fn age(s: Option<f64>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s < 60.0 => format!("{s:.1} s"),
        Some(s) if s < 3600.0 => format!("{:.1} min", s / 60.0),
        Some(s) if s < 86400.0 => format!("{:.1} h", s / 3600.0),
        Some(s) => format!("{:.1} d", s / 86400.0),
    }
}

/// The status as the table `devour status` prints.
pub fn render(s: &Status) -> String {
    let mut o = String::new();
    if let Some(e) = &s.database_error {
        let _ = writeln!(o, "database: cannot be read: {e}");
        render_consumers(&mut o, s);
        return o;
    }
    let _ = writeln!(
        o,
        "outbox: {} undelivered row(s), oldest {}",
        s.outbox.rows,
        age(s.outbox.oldest_age_s)
    );
    if !s.outbox.topics.is_empty() {
        let _ = writeln!(o, "  {:<32} {:>10}  {:>10}", "topic", "rows", "oldest");
        for t in &s.outbox.topics {
            let _ = writeln!(
                o,
                "  {:<32} {:>10}  {:>10}",
                t.topic,
                t.rows,
                age(Some(t.oldest_age_s))
            );
        }
        let mut busiest = s.shards.clone();
        busiest.sort_by(|a, b| b.rows.cmp(&a.rows).then(a.shard.cmp(&b.shard)));
        let top: Vec<String> = busiest
            .iter()
            .take(5)
            .map(|b| {
                format!(
                    "{} ({} rows, oldest {})",
                    b.shard,
                    b.rows,
                    age(Some(b.oldest_age_s))
                )
            })
            .collect();
        let _ = writeln!(
            o,
            "  shards with rows: {} of {}; busiest: {}",
            s.shards.len(),
            crate::outbox::SHARDS,
            top.join(", ")
        );
    }
    let _ = writeln!(
        o,
        "dead letters: {}{}",
        s.dead_letters.rows,
        if s.dead_letters.rows > 0 {
            format!(
                ", oldest failed {} ago (devour outbox list)",
                age(s.dead_letters.oldest_age_s)
            )
        } else {
            String::new()
        }
    );
    for t in &s.dead_letters.topics {
        let _ = writeln!(o, "  {:<32} {:>10}", t.topic, t.rows);
    }
    if !s.held_back.is_empty() {
        let rows: i64 = s.held_back.iter().map(|k| k.rows).sum();
        let keys: Vec<String> = s
            .held_back
            .iter()
            .take(5)
            .map(|k| format!("{} ({})", one_line(&k.key, 64), k.rows))
            .collect();
        let _ = writeln!(
            o,
            "  held back (block_key): {rows} row(s) of {} key(s) wait for their dead letters: {}{} \
             (devour outbox list --key KEY; retry or discard)",
            s.held_back.len(),
            keys.join(", "),
            if s.held_back.len() > 5 { ", …" } else { "" }
        );
    }
    let silent = |r: &RelayState| s.silent.contains(&r.relay_id);
    let n_silent = s.silent.len();
    let _ = writeln!(
        o,
        "relays: {} heartbeating{}; shards held: {} of {}",
        s.relays.len() - n_silent,
        if n_silent > 0 {
            format!(", {n_silent} silent (crashed, or stopped without leaving)")
        } else {
            String::new()
        },
        i64::from(crate::outbox::SHARDS) - s.unheld_shards,
        crate::outbox::SHARDS
    );
    for r in &s.relays {
        let _ = writeln!(
            o,
            "  {:<40} {:>4} shard(s)  heartbeat {} ago{}",
            r.relay_id,
            r.shards,
            age(Some(r.heartbeat_age_s)),
            if silent(r) { "  (silent)" } else { "" }
        );
    }
    render_consumers(&mut o, s);
    o
}

/// The consumer routes' part of [`render`].
fn render_consumers(o: &mut String, s: &Status) {
    if s.consumers.is_empty() {
        let _ = writeln!(o, "consumers: no route configured");
    } else {
        let _ = writeln!(o, "consumers:");
        let _ = writeln!(
            o,
            "  {:<24} {:<24} {:>10}  partitions",
            "route", "group", "lag"
        );
        for c in &s.consumers {
            let lag = match (c.lag, &c.error) {
                (Some(l), _) => l.to_string(),
                (None, Some(_)) => "?".into(),
                (None, None) => "-".into(),
            };
            let detail = match &c.error {
                Some(e) => format!("error: {e}"),
                None if c.missing_topics.is_empty() => c.partitions.len().to_string(),
                None => format!(
                    "{} (no topic {})",
                    c.partitions.len(),
                    c.missing_topics.join(", ")
                ),
            };
            let _ = writeln!(o, "  {:<24} {:<24} {:>10}  {detail}", c.route, c.group, lag);
        }
    }
}
