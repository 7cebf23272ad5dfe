//! What operators ask of the database: the outbox backlog, dead letters (list, show, retry,
//! discard by id, key or all), relays and their leases. The SQL of each backend sits side by
//! side where it differs.

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Double, Integer, Nullable, Text};

use super::{each_backend, DbConnection, DbError};

/// Undelivered rows of one key.
#[derive(Debug, Clone, PartialEq, serde::Serialize, QueryableByName)]
pub struct KeyRows {
    /// The key.
    #[diesel(sql_type = Text)]
    pub key: String,
    /// Its undelivered rows.
    #[diesel(sql_type = BigInt)]
    pub rows: i64,
}

/// Undelivered rows of one topic.
#[derive(Debug, Clone, PartialEq, serde::Serialize, QueryableByName)]
pub struct TopicBacklog {
    /// Topic.
    #[diesel(sql_type = Text)]
    pub topic: String,
    /// Rows.
    #[diesel(sql_type = BigInt)]
    pub rows: i64,
    /// Age of the oldest row, in seconds.
    #[diesel(sql_type = Double)]
    pub oldest_age_s: f64,
}

/// Undelivered rows of one shard.
#[derive(Debug, Clone, PartialEq, serde::Serialize, QueryableByName)]
pub struct ShardBacklog {
    /// Shard (0–255).
    #[diesel(sql_type = Integer)]
    pub shard: i32,
    /// Rows.
    #[diesel(sql_type = BigInt)]
    pub rows: i64,
    /// Age of the oldest row, in seconds.
    #[diesel(sql_type = Double)]
    pub oldest_age_s: f64,
}

/// Undelivered rows of one topic in one shard.
#[derive(QueryableByName)]
struct BacklogCell {
    #[diesel(sql_type = Text)]
    topic: String,
    #[diesel(sql_type = Integer)]
    shard: i32,
    #[diesel(sql_type = BigInt)]
    rows: i64,
    #[diesel(sql_type = Double)]
    oldest_age_s: f64,
}

/// A relay that heartbeats, with the shards it holds.
#[derive(Debug, Clone, PartialEq, serde::Serialize, QueryableByName)]
#[non_exhaustive]
pub struct RelayState {
    /// The relay's id.
    #[diesel(sql_type = Text)]
    pub relay_id: String,
    /// Seconds since its last heartbeat.
    #[diesel(sql_type = Double)]
    pub heartbeat_age_s: f64,
    /// Shards it holds under an unexpired lease.
    #[diesel(sql_type = BigInt)]
    pub shards: i64,
    /// Its `relay.lease_ttl_ms`, as its heartbeat wrote it (`None` for relays older than
    /// migration 000006).
    #[diesel(sql_type = diesel::sql_types::Nullable<BigInt>)]
    pub lease_ttl_ms: Option<i64>,
}

/// A dead letter: a row the broker refused for good.
#[derive(Debug, Clone, PartialEq, serde::Serialize, QueryableByName)]
pub struct DeadLetter {
    /// Its original outbox id (`devour outbox retry ID` puts it back in that place).
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    /// Topic.
    #[diesel(sql_type = Text)]
    pub topic: String,
    /// Key.
    #[diesel(sql_type = Nullable<Text>)]
    pub partition_key: Option<String>,
    /// Event.
    #[diesel(sql_type = Nullable<Text>)]
    pub event: Option<String>,
    /// The `message-id` header.
    #[diesel(sql_type = Text)]
    pub message_id: String,
    /// How many times the row was dead-lettered (this time included).
    #[diesel(sql_type = Integer)]
    pub attempts: i32,
    /// Why the broker refused it.
    #[diesel(sql_type = Text)]
    pub error: String,
    /// When it was written to the outbox (database time, text).
    #[diesel(sql_type = Text)]
    pub created_at: String,
    /// When it was dead-lettered (database time, text).
    #[diesel(sql_type = Text)]
    pub failed_at: String,
    /// Payload size in bytes.
    #[diesel(sql_type = BigInt)]
    pub payload_bytes: i64,
    /// The payload, for `show` (as JSON: text, UTF-8 decoded lossily).
    #[diesel(sql_type = Nullable<diesel::sql_types::Binary>)]
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "lossy_text")]
    pub payload: Option<Vec<u8>>,
    /// The extra headers (a JSON object), for `show`.
    #[diesel(sql_type = Nullable<Text>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub headers: Option<String>,
}

fn lossy_text<S: serde::Serializer>(b: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
    match b {
        Some(b) => s.serialize_str(&String::from_utf8_lossy(b)),
        None => s.serialize_none(),
    }
}

/// Which dead letters an operation applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetters {
    /// The one with this id.
    Id(i64),
    /// Every one of this key.
    Key(String),
    /// All of them.
    All,
}

impl DeadLetters {
    /// `WHERE` condition on `devour_dead_letters` (bound as parameter 1 where it needs one).
    fn condition(&self, placeholder: &str) -> String {
        match self {
            DeadLetters::Id(_) => format!("id = {placeholder}"),
            DeadLetters::Key(_) => format!("partition_key = {placeholder}"),
            DeadLetters::All => "true".into(),
        }
    }

    fn id(&self) -> i64 {
        match self {
            DeadLetters::Id(id) => *id,
            _ => 0,
        }
    }

    fn key(&self) -> &str {
        match self {
            DeadLetters::Key(k) => k,
            _ => "",
        }
    }
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

const OUTBOX_COLUMNS: &str = "id, topic, partition_key, kafka_partition, payload, headers, event, \
     message_id, content_type, shard, created_at, attempts";

/// `age(column)` in seconds, per backend.
#[cfg(feature = "postgres")]
fn age_pg(column: &str) -> String {
    format!("CAST(EXTRACT(EPOCH FROM (now() - {column})) AS DOUBLE PRECISION)")
}

#[cfg(feature = "sqlite")]
fn age_sqlite(column: &str) -> String {
    format!("CAST((julianday('now') - julianday({column})) * 86400.0 AS REAL)")
}

impl DbConnection {
    fn age(&self, column: &str) -> String {
        match self {
            #[cfg(feature = "postgres")]
            DbConnection::Postgres(_) => age_pg(column),
            #[cfg(feature = "sqlite")]
            DbConnection::Sqlite(_) => age_sqlite(column),
        }
    }

    /// `SELECT column, count(*) AS rows, age(min(since)) AS oldest_age_s FROM table GROUP BY
    /// column ORDER BY order`.
    fn grouped(&self, column: &str, table: &str, since: &str, order: &str) -> String {
        format!(
            "SELECT {column}, CAST(count(*) AS BIGINT) AS rows, {} AS oldest_age_s \
             FROM {table} GROUP BY {column} ORDER BY {order}",
            self.age(&format!("min({since})"))
        )
    }

    /// How the first bind parameter is written.
    fn first_placeholder(&self) -> &'static str {
        match self {
            #[cfg(feature = "postgres")]
            DbConnection::Postgres(_) => "$1",
            #[cfg(feature = "sqlite")]
            DbConnection::Sqlite(_) => "?1",
        }
    }

    /// Undelivered rows per topic (biggest first) and per shard (shards without rows left
    /// out), from one pass over the outbox.
    pub fn backlog(&mut self) -> Result<(Vec<TopicBacklog>, Vec<ShardBacklog>), DbError> {
        let q = self.grouped("topic, shard", "devour_outbox", "created_at", "1, 2");
        let cells: Vec<BacklogCell> =
            each_backend!(self, c => diesel::sql_query(&q).load(&mut **c)?);
        let mut topics: Vec<TopicBacklog> = Vec::new();
        let mut shards: std::collections::BTreeMap<i32, ShardBacklog> = Default::default();
        for cell in cells {
            match topics.last_mut() {
                Some(t) if t.topic == cell.topic => {
                    t.rows += cell.rows;
                    t.oldest_age_s = t.oldest_age_s.max(cell.oldest_age_s);
                }
                _ => topics.push(TopicBacklog {
                    topic: cell.topic,
                    rows: cell.rows,
                    oldest_age_s: cell.oldest_age_s,
                }),
            }
            let s = shards.entry(cell.shard).or_insert(ShardBacklog {
                shard: cell.shard,
                rows: 0,
                oldest_age_s: cell.oldest_age_s,
            });
            s.rows += cell.rows;
            s.oldest_age_s = s.oldest_age_s.max(cell.oldest_age_s);
        }
        topics.sort_by(|a, b| b.rows.cmp(&a.rows).then_with(|| a.topic.cmp(&b.topic)));
        Ok((topics, shards.into_values().collect()))
    }

    /// Undelivered rows of keys that have a dead letter, per key, most rows first (at most 1,000
    /// keys): under `on_dead_letter = "block_key"` these rows wait until the dead letter is
    /// retried or discarded.
    pub fn held_back(&mut self) -> Result<Vec<KeyRows>, DbError> {
        let q =
            "SELECT o.partition_key AS key, CAST(count(*) AS BIGINT) AS rows FROM devour_outbox o \
                 WHERE o.partition_key IN (SELECT d.partition_key FROM devour_dead_letters d) \
                 GROUP BY o.partition_key ORDER BY 2 DESC, 1 LIMIT 1000";
        Ok(each_backend!(self, c => diesel::sql_query(q).load(&mut **c)?))
    }

    /// Dead letters per topic (as [`TopicBacklog`]: rows and the oldest's age since it failed).
    pub fn dead_letters_by_topic(&mut self) -> Result<Vec<TopicBacklog>, DbError> {
        let q = self.grouped("topic", "devour_dead_letters", "failed_at", "2 DESC, 1");
        Ok(each_backend!(self, c => diesel::sql_query(&q).load(&mut **c)?))
    }

    /// Relays that heartbeat, with the shards each holds now.
    pub fn relays(&mut self) -> Result<Vec<RelayState>, DbError> {
        let (age, now) = match self {
            #[cfg(feature = "postgres")]
            DbConnection::Postgres(_) => (age_pg("r.heartbeat_at"), "now()".to_string()),
            #[cfg(feature = "sqlite")]
            // SQLite keeps relay times (`heartbeat_at`, `expires_at`) in Unix milliseconds.
            DbConnection::Sqlite(_) => {
                let now_ms = "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)";
                (
                    format!("CAST(({now_ms} - r.heartbeat_at) / 1000.0 AS REAL)"),
                    now_ms.to_string(),
                )
            }
        };
        let q = format!(
            "SELECT r.relay_id, {age} AS heartbeat_age_s, CAST(r.lease_ttl_ms AS BIGINT) AS lease_ttl_ms, \
               (SELECT CAST(count(*) AS BIGINT) FROM devour_relay_leases l \
                 WHERE l.owner = r.relay_id AND l.expires_at > {now}) AS shards \
             FROM devour_relays r ORDER BY r.relay_id"
        );
        Ok(each_backend!(self, c => diesel::sql_query(&q).load(&mut **c)?))
    }

    /// Dead letters, oldest first, at most `limit`.
    pub fn list_dead_letters(
        &mut self,
        which: &DeadLetters,
        limit: i64,
    ) -> Result<Vec<DeadLetter>, DbError> {
        self.dead_letters(which, limit, false)
    }

    /// One dead letter with its payload and headers.
    pub fn show_dead_letter(&mut self, id: i64) -> Result<Option<DeadLetter>, DbError> {
        Ok(self.dead_letters(&DeadLetters::Id(id), 1, true)?.pop())
    }

    fn dead_letters(
        &mut self,
        which: &DeadLetters,
        limit: i64,
        full: bool,
    ) -> Result<Vec<DeadLetter>, DbError> {
        let (null_bytes, len) = match self {
            #[cfg(feature = "postgres")]
            DbConnection::Postgres(_) => ("CAST(NULL AS bytea)", "octet_length(payload)"),
            #[cfg(feature = "sqlite")]
            DbConnection::Sqlite(_) => ("CAST(NULL AS BLOB)", "length(payload)"),
        };
        let extra = if full {
            "payload, headers".to_string()
        } else {
            format!("{null_bytes} AS payload, CAST(NULL AS TEXT) AS headers")
        };
        let placeholder = self.first_placeholder();
        let q = format!(
            "SELECT id, topic, partition_key, event, message_id, attempts, error, \
               CAST(created_at AS TEXT) AS created_at, CAST(failed_at AS TEXT) AS failed_at, \
               CAST(COALESCE({len}, 0) AS BIGINT) AS payload_bytes, {extra} \
             FROM devour_dead_letters WHERE {} ORDER BY id LIMIT {limit}",
            which.condition(placeholder)
        );
        let rows = each_backend!(self, c => match which {
            DeadLetters::Id(_) => diesel::sql_query(&q).bind::<BigInt, _>(which.id()).load(&mut **c)?,
            DeadLetters::Key(_) => diesel::sql_query(&q).bind::<Text, _>(which.key()).load(&mut **c)?,
            DeadLetters::All => diesel::sql_query(&q).load(&mut **c)?,
        });
        Ok(rows)
    }

    /// Puts dead letters back into the outbox under their original ids (so each is delivered
    /// before the later rows of its key). Returns how many.
    pub fn retry_dead_letters(&mut self, which: &DeadLetters) -> Result<usize, DbError> {
        let n = match self {
            #[cfg(feature = "postgres")]
            DbConnection::Postgres(c) => {
                let q = format!(
                    "WITH d AS (DELETE FROM devour_dead_letters WHERE {} RETURNING *) \
                     INSERT INTO devour_outbox ({OUTBOX_COLUMNS}) OVERRIDING SYSTEM VALUE \
                     SELECT {OUTBOX_COLUMNS} FROM d",
                    which.condition("$1")
                );
                with_rescan(c, |c| releasing_keys!(c, bind_which!(&q, which, c)?))?
            }
            #[cfg(feature = "sqlite")]
            DbConnection::Sqlite(c) => c.immediate_transaction(|c| {
                let cond = which.condition("?1");
                let insert = format!(
                    "INSERT INTO devour_outbox ({OUTBOX_COLUMNS}) \
                     SELECT {OUTBOX_COLUMNS} FROM devour_dead_letters WHERE {cond}"
                );
                let n = bind_which!(&insert, which, c)?;
                let delete = format!("DELETE FROM devour_dead_letters WHERE {cond}");
                bind_which!(&delete, which, c)?;
                releasing_keys!(c, n)
            })?,
        };
        if n > 0 {
            self.ask_relays_to_rescan();
        }
        Ok(n)
    }

    /// Rows are back below the relays' horizons, or a key is no longer held back: has the
    /// relays of this process start their next pass at the oldest row (on PostgreSQL,
    /// [`with_rescan`] has told every relay already).
    fn ask_relays_to_rescan(&mut self) {
        crate::relay::rescan_local();
    }

    /// Deletes dead letters for good (the later rows of their keys are then delivered).
    /// Returns how many.
    pub fn discard_dead_letters(&mut self, which: &DeadLetters) -> Result<usize, DbError> {
        let placeholder = self.first_placeholder();
        let q = format!(
            "DELETE FROM devour_dead_letters WHERE {}",
            which.condition(placeholder)
        );
        let n = match self {
            #[cfg(feature = "postgres")]
            DbConnection::Postgres(c) => {
                with_rescan(c, |c| releasing_keys!(c, bind_which!(&q, which, c)?))?
            }
            #[cfg(feature = "sqlite")]
            DbConnection::Sqlite(c) => c.immediate_transaction(|c| {
                let n = bind_which!(&q, which, c)?;
                releasing_keys!(c, n)
            })?,
        };
        if n > 0 {
            self.ask_relays_to_rescan();
        }
        Ok(n)
    }

    /// Shards held under an unexpired lease.
    pub fn held_shards(&mut self) -> Result<i64, DbError> {
        let now = match self {
            #[cfg(feature = "postgres")]
            DbConnection::Postgres(_) => "now()",
            #[cfg(feature = "sqlite")]
            DbConnection::Sqlite(_) => {
                "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)"
            }
        };
        let q = format!(
            "SELECT CAST(count(*) AS BIGINT) AS n FROM devour_relay_leases \
             WHERE owner IS NOT NULL AND expires_at > {now}"
        );
        let rows: Vec<Count> = each_backend!(self, c => diesel::sql_query(&q).load(&mut **c)?);
        Ok(rows.first().map_or(0, |r| r.n))
    }

    /// Dead letters in all.
    pub fn count_dead_letters(&mut self) -> Result<i64, DbError> {
        let q = "SELECT CAST(count(*) AS BIGINT) AS n FROM devour_dead_letters";
        let rows: Vec<Count> = each_backend!(self, c => diesel::sql_query(q).load(&mut **c)?);
        Ok(rows.first().map_or(0, |r| r.n))
    }
}

/// Executes `$q` on `$c` with `$which`'s parameter bound (if it has one).
macro_rules! bind_which {
    ($q:expr, $which:expr, $c:expr) => {
        match $which {
            DeadLetters::Id(id) => diesel::sql_query($q).bind::<BigInt, _>(*id).execute($c),
            DeadLetters::Key(k) => diesel::sql_query($q).bind::<Text, _>(k.clone()).execute($c),
            DeadLetters::All => diesel::sql_query($q).execute($c),
        }
    };
}
use bind_which;

/// After `$n` dead letters were retried or discarded (in the transaction on `$c`), counts a
/// key release if there were any: relays reading past rows of a released key (left out while it
/// was held back) see the count change in their next read and start over at the oldest row,
/// so that those rows go before any later one of the key. Evaluates to `Ok($n)`.
macro_rules! releasing_keys {
    ($c:expr, $n:expr) => {{
        let n: usize = $n;
        if n > 0 {
            // An upsert: the count goes on even if someone deleted its row.
            diesel::sql_query(
                "INSERT INTO devour_key_releases (one, n) VALUES (true, 1) \
                 ON CONFLICT (one) DO UPDATE SET n = devour_key_releases.n + 1",
            )
            .execute($c)?;
        }
        Ok::<_, diesel::result::Error>(n)
    }};
}
use releasing_keys;

/// Runs `change` in a transaction that also sends the relays' rescan request, first: they get
/// it at the commit, together with (and before) the wake-up of any row the change put back, so
/// none of them reads past such a row without going back for it, and a change whose request
/// could not be sent does not happen.
#[cfg(feature = "postgres")]
fn with_rescan(
    c: &mut diesel::PgConnection,
    change: impl FnOnce(&mut diesel::PgConnection) -> diesel::QueryResult<usize>,
) -> diesel::QueryResult<usize> {
    c.transaction(|c| {
        diesel::sql_query(format!("NOTIFY devour_outbox, '{}'", crate::relay::RESCAN))
            .execute(c)?;
        change(c)
    })
}
