//! The relay's database work: heartbeats, shard leases, reading the oldest undelivered rows, and
//! removing, keeping or dead-lettering rows, each write fenced by the lease it was read under.
//! One function per operation; the SQL of each backend sits side by side.

use std::collections::BTreeMap;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Binary, Integer, Nullable, Text};

use crate::config::{DatabaseUrl, RelayConfig, Retention};
#[cfg(feature = "postgres")]
use crate::db::prepared::{PgBind, Prepared};
use crate::db::DbError;

/// A relay's own database connection (not pooled: the relay holds it for its life).
pub(crate) enum Store {
    #[cfg(feature = "postgres")]
    Postgres(diesel::PgConnection),
    #[cfg(feature = "sqlite")]
    Sqlite(diesel::SqliteConnection),
}

/// Shard → epoch of the leases a relay holds.
pub(crate) type Leases = BTreeMap<i32, i64>;

/// One outbox row read for delivery.
#[derive(Debug, Clone, QueryableByName)]
pub(crate) struct Row {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(sql_type = Text)]
    pub topic: String,
    #[diesel(sql_type = Nullable<Text>)]
    pub partition_key: Option<String>,
    #[diesel(sql_type = Nullable<Integer>)]
    pub kafka_partition: Option<i32>,
    #[diesel(sql_type = Nullable<Binary>)]
    pub payload: Option<Vec<u8>>,
    #[diesel(sql_type = Text)]
    pub headers: String,
    #[diesel(sql_type = Nullable<Text>)]
    pub event: Option<String>,
    #[diesel(sql_type = Text)]
    pub message_id: String,
    #[diesel(sql_type = Text)]
    pub content_type: String,
    #[diesel(sql_type = Integer)]
    pub shard: i32,
    /// `created_at` in Unix milliseconds.
    #[diesel(sql_type = BigInt)]
    pub created_ms: i64,
    /// `devour_key_releases.n` as the read saw it (0 when reads do not hold keys back).
    #[diesel(sql_type = BigInt)]
    pub key_releases: i64,
}

/// The outbox's last id handed out (`last_id`, 0 before the first), when the server started (a
/// restart or a failover may hand out ids again), and the transactions that held a write lock
/// on the outbox just after.
#[derive(Debug, Clone, QueryableByName)]
pub(crate) struct IdSample {
    #[diesel(sql_type = BigInt)]
    pub last_id: i64,
    #[diesel(sql_type = BigInt)]
    pub server_started_us: i64,
    #[diesel(sql_type = diesel::sql_types::Array<Text>)]
    pub holders: Vec<String>,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct Holder {
    #[diesel(sql_type = Text)]
    owner: String,
}

/// A lease held: its shard, its epoch, and the largest id a holder before may have sent.
#[derive(QueryableByName)]
struct LeaseRow {
    #[diesel(sql_type = Integer)]
    shard: i32,
    #[diesel(sql_type = BigInt)]
    epoch: i64,
    #[diesel(sql_type = BigInt)]
    sent_through: i64,
}

/// Per shard: rows up to this id may have been sent (acknowledged, even) by a relay that held
/// the shard before, without being removed.
pub(crate) type SentThrough = BTreeMap<i32, i64>;

fn held(rows: Vec<LeaseRow>) -> (Leases, SentThrough) {
    rows.into_iter()
        .map(|r| ((r.shard, r.epoch), (r.shard, r.sent_through)))
        .unzip()
}

/// A JSON array, the way SQLite takes a list in one bind (`json_each`).
fn json_list<T: serde::Serialize>(items: &[T]) -> String {
    serde_json::to_string(items).expect("numbers serialize")
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

const PG_ROW: &str = "id, topic, partition_key, kafka_partition, payload, headers, event, \
     message_id, content_type, shard, (date_part('epoch', created_at) * 1000)::bigint AS created_ms";
const SQLITE_ROW: &str = "id, topic, partition_key, kafka_partition, payload, headers, event, \
     message_id, content_type, shard, \
     CAST((julianday(created_at) - 2440587.5) * 86400000 AS INTEGER) AS created_ms";
const COLUMNS: &str = "id, topic, partition_key, kafka_partition, payload, headers, event, \
     message_id, content_type, shard, created_at, attempts";

/// Session settings of the connections that read the outbox (the reader's and the read-ahead's)
/// on PostgreSQL, for its reads of "the oldest rows above an id" in a table whose low end is,
/// until VACUUM comes, mostly deleted rows:
/// - Generic plans (made once, see `Prepared`): a plan made for the ids as constants made the
///   planner look up the id index's lowest or highest live entry at every read
///   (`get_actual_variable_range`, when the id falls in an end bin of the histogram), stepping
///   over every dead entry on the way. After a large drain that was about a millisecond of
///   planning per read.
/// - Only the id index's order: a generic plan made with statistics from an emptier table
///   (a burst after a quiet spell, before autoanalyze) could otherwise collect every row above
///   the id and sort them, reading the whole backlog for each batch.
#[cfg(feature = "postgres")]
const PG_READER_SESSION: &str = "SET plan_cache_mode = force_generic_plan; \
     SET enable_bitmapscan = off; SET enable_seqscan = off; SET enable_sort = off";

impl Store {
    /// Opens a connection for the relay.
    pub(crate) fn connect(url: &DatabaseUrl, busy_timeout_ms: u64) -> Result<Store, DbError> {
        let err = |e: diesel::ConnectionError| DbError::Connect {
            url: url.redacted(),
            reason: e.to_string(),
        };
        match url {
            #[cfg(feature = "postgres")]
            DatabaseUrl::Postgres(u) => Ok(Store::Postgres(
                diesel::PgConnection::establish(&crate::db::postgres::with_client_timeouts(u))
                    .map_err(err)?,
            )),
            #[cfg(feature = "sqlite")]
            DatabaseUrl::Sqlite(path) => {
                let mut c = diesel::SqliteConnection::establish(path).map_err(err)?;
                crate::db::sqlite::configure(&mut c, busy_timeout_ms)?;
                Ok(Store::Sqlite(c))
            }
            #[allow(unreachable_patterns)]
            other => Err(DbError::Connect {
                url: other.redacted(),
                reason: "this build of devour lacks the backend's cargo feature".into(),
            }),
        }
    }

    /// Opens a connection to the configured database.
    pub(crate) fn open(config: &crate::config::Config) -> Result<Store, DbError> {
        Self::connect(&config.database.url, config.database.busy_timeout_ms)
    }

    /// Opens a connection for reading the outbox (`fetch`): see `PG_READER_SESSION`.
    pub(crate) fn open_reader(config: &crate::config::Config) -> Result<Store, DbError> {
        let mut store = Self::open(config)?;
        #[cfg(feature = "postgres")]
        if let Store::Postgres(c) = &mut store {
            // Only a plan choice: without it (a server before PostgreSQL 12 has no
            // `plan_cache_mode`), reads are planned at every run, as they once were.
            if let Err(e) =
                diesel::connection::SimpleConnection::batch_execute(c, PG_READER_SESSION)
            {
                tracing::warn!("the outbox reader's session settings did not apply ({e}); reads are planned at every run");
            }
        }
        Ok(store)
    }

    /// Whether this store can share the outbox between several relays.
    pub(crate) fn shares_shards(&self) -> bool {
        match self {
            #[cfg(feature = "postgres")]
            Store::Postgres(_) => true,
            #[cfg(feature = "sqlite")]
            Store::Sqlite(_) => false,
        }
    }

    /// Records that `relay` is alive (with its TTL); forgets relays silent for three of their
    /// TTLs; returns how many relays are alive by their own TTL (this one included). Rows
    /// without a TTL (written before migration 000006) are judged by `ttl_ms`.
    pub(crate) fn heartbeat(&mut self, relay: &str, ttl_ms: u64) -> Result<usize, DbError> {
        let ttl = ttl_ms as i64;
        let n = match self {
            #[cfg(feature = "postgres")]
            Store::Postgres(c) => {
                diesel::sql_query(
                    "INSERT INTO devour_relays (relay_id, lease_ttl_ms) VALUES ($1, $2) \
                     ON CONFLICT (relay_id) DO UPDATE SET heartbeat_at = now(), lease_ttl_ms = $2",
                )
                .bind::<Text, _>(relay)
                .bind::<BigInt, _>(ttl)
                .execute(c)?;
                // A silent relay's row stays while a lease names it: the relay taking that lease
                // over reads from it what the silent one may have sent.
                diesel::sql_query(
                    "DELETE FROM devour_relays WHERE heartbeat_at \
                       < now() - coalesce(lease_ttl_ms, $1) * 3 * interval '1 millisecond' \
                     AND NOT EXISTS (SELECT 1 FROM devour_relay_leases l \
                       WHERE l.owner = devour_relays.relay_id)",
                )
                .bind::<BigInt, _>(ttl)
                .execute(c)?;
                diesel::sql_query(
                    "SELECT count(*) AS n FROM devour_relays WHERE heartbeat_at \
                       > now() - coalesce(lease_ttl_ms, $1) * interval '1 millisecond'",
                )
                .bind::<BigInt, _>(ttl)
                .get_result::<Count>(c)?
                .n
            }
            #[cfg(feature = "sqlite")]
            Store::Sqlite(c) => {
                let now = now_ms();
                diesel::sql_query(
                    "INSERT INTO devour_relays (relay_id, started_at, heartbeat_at, lease_ttl_ms) \
                     VALUES (?1, ?2, ?2, ?3) \
                     ON CONFLICT (relay_id) DO UPDATE SET heartbeat_at = ?2, lease_ttl_ms = ?3",
                )
                .bind::<Text, _>(relay)
                .bind::<BigInt, _>(now)
                .bind::<BigInt, _>(ttl)
                .execute(c)?;
                diesel::sql_query(
                    "DELETE FROM devour_relays WHERE heartbeat_at < ?1 - 3 * coalesce(lease_ttl_ms, ?2) \
                     AND NOT EXISTS (SELECT 1 FROM devour_relay_leases l \
                       WHERE l.owner = devour_relays.relay_id)",
                )
                .bind::<BigInt, _>(now)
                .bind::<BigInt, _>(ttl)
                .execute(c)?;
                diesel::sql_query(
                    "SELECT count(*) AS n FROM devour_relays \
                     WHERE heartbeat_at > ?1 - coalesce(lease_ttl_ms, ?2)",
                )
                .bind::<BigInt, _>(now)
                .bind::<BigInt, _>(ttl)
                .get_result::<Count>(c)?
                .n
            }
        };
        Ok(n.max(1) as usize)
    }

    /// Extends the unexpired leases `relay` holds; returns them, with what each lease says was
    /// sent before it was taken. A lease that expired is lost (another relay may have it by
    /// now); [`claim`](Self::claim) can take it again.
    pub(crate) fn renew(
        &mut self,
        relay: &str,
        ttl_ms: u64,
    ) -> Result<(Leases, SentThrough), DbError> {
        Ok(held(match self {
            #[cfg(feature = "postgres")]
            Store::Postgres(c) => diesel::sql_query(
                "UPDATE devour_relay_leases SET expires_at = now() + $2 * interval '1 millisecond' \
                 WHERE owner = $1 AND expires_at > now() RETURNING shard, epoch, sent_through",
            )
            .bind::<Text, _>(relay)
            .bind::<BigInt, _>(ttl_ms as i64)
            .load(c)?,
            #[cfg(feature = "sqlite")]
            Store::Sqlite(c) => {
                let now = now_ms();
                diesel::sql_query(
                    "UPDATE devour_relay_leases SET expires_at = ?3 \
                     WHERE owner = ?1 AND expires_at > ?2 RETURNING shard, epoch, sent_through",
                )
                .bind::<Text, _>(relay)
                .bind::<BigInt, _>(now)
                .bind::<BigInt, _>(now + ttl_ms as i64)
                .load(c)?
            }
        }))
    }

    /// Takes up to `max` shards that nobody holds or whose lease expired, bumping their epochs.
    /// On SQLite a relay takes every shard or none: if another relay holds any, it returns the
    /// holder and nothing else.
    pub(crate) fn claim(
        &mut self,
        relay: &str,
        ttl_ms: u64,
        max: usize,
    ) -> Result<(Leases, SentThrough, Option<String>), DbError> {
        match self {
            #[cfg(feature = "postgres")]
            Store::Postgres(c) => {
                if max == 0 {
                    return Ok((Leases::new(), SentThrough::new(), None));
                }
                // The lease keeps what its last holder may have sent (from that holder's row).
                let rows: Vec<LeaseRow> = diesel::sql_query(
                    "UPDATE devour_relay_leases l SET owner = $1, epoch = epoch + 1, \
                         expires_at = now() + $2 * interval '1 millisecond', \
                         sent_through = greatest(l.sent_through, coalesce( \
                             (SELECT r.sent_through FROM devour_relays r WHERE r.relay_id = l.owner), 0)) \
                     WHERE shard IN (SELECT shard FROM devour_relay_leases \
                         WHERE owner IS NULL OR expires_at IS NULL OR expires_at <= now() \
                         ORDER BY shard LIMIT $3 FOR UPDATE SKIP LOCKED) \
                     RETURNING shard, epoch, sent_through",
                )
                .bind::<Text, _>(relay)
                .bind::<BigInt, _>(ttl_ms as i64)
                .bind::<BigInt, _>(max as i64)
                .load(c)?;
                let (leases, sent) = held(rows);
                Ok((leases, sent, None))
            }
            #[cfg(feature = "sqlite")]
            Store::Sqlite(c) => c.immediate_transaction(|c| {
                let now = now_ms();
                let holder: Option<Holder> = diesel::sql_query(
                    "SELECT owner FROM devour_relay_leases \
                     WHERE owner IS NOT NULL AND owner <> ?1 AND expires_at > ?2 LIMIT 1",
                )
                .bind::<Text, _>(relay)
                .bind::<BigInt, _>(now)
                .get_result(c)
                .optional()?;
                if let Some(h) = holder {
                    return Ok((Leases::new(), SentThrough::new(), Some(h.owner)));
                }
                let rows: Vec<LeaseRow> = diesel::sql_query(
                    "UPDATE devour_relay_leases SET \
                         epoch = CASE WHEN owner = ?1 AND expires_at > ?2 THEN epoch ELSE epoch + 1 END, \
                         sent_through = max(sent_through, coalesce((SELECT r.sent_through \
                             FROM devour_relays r WHERE r.relay_id = devour_relay_leases.owner), 0)), \
                         owner = ?1, expires_at = ?3 \
                     RETURNING shard, epoch, sent_through",
                )
                .bind::<Text, _>(relay)
                .bind::<BigInt, _>(now)
                .bind::<BigInt, _>(now + ttl_ms as i64)
                .load(c)?;
                let (leases, sent) = held(rows);
                Ok((leases, sent, None))
            }),
        }
    }

    /// Records that `relay` may hand rows up to id `through` to a producer; a relay that takes
    /// one of its shards over marks those rows `possible-duplicate`. Must commit before any of
    /// them is sent.
    pub(crate) fn cover(&mut self, relay: &str, through: i64) -> Result<(), DbError> {
        let n = match self {
            #[cfg(feature = "postgres")]
            Store::Postgres(c) => Prepared {
                sql: "UPDATE devour_relays SET sent_through = greatest(sent_through, $2) \
                      WHERE relay_id = $1",
                binds: &[PgBind::Text(relay), PgBind::BigInt(through)],
            }
            .execute(c)?,
            #[cfg(feature = "sqlite")]
            Store::Sqlite(c) => diesel::sql_query(
                "UPDATE devour_relays SET sent_through = max(sent_through, ?2) WHERE relay_id = ?1",
            )
            .bind::<Text, _>(relay)
            .bind::<BigInt, _>(through)
            .execute(c)?,
        };
        if n == 0 {
            // Forgotten (silent for three TTLs, holding nothing): the next heartbeat writes the
            // row again; send nothing until then.
            return Err(DbError::Query(diesel::result::Error::NotFound));
        }
        Ok(())
    }

    /// Gives up the leases on `shards`.
    pub(crate) fn release(&mut self, relay: &str, shards: &[i32]) -> Result<(), DbError> {
        match self {
            #[cfg(feature = "postgres")]
            Store::Postgres(c) => diesel::sql_query(
                "UPDATE devour_relay_leases SET owner = NULL, expires_at = NULL, \
                     sent_through = greatest(sent_through, coalesce( \
                         (SELECT r.sent_through FROM devour_relays r WHERE r.relay_id = $1), 0)) \
                 WHERE owner = $1 AND shard = ANY($2)",
            )
            .bind::<Text, _>(relay)
            .bind::<diesel::sql_types::Array<Integer>, _>(shards)
            .execute(c)?,
            #[cfg(feature = "sqlite")]
            Store::Sqlite(c) => diesel::sql_query(
                "UPDATE devour_relay_leases SET owner = NULL, expires_at = NULL, \
                     sent_through = max(sent_through, coalesce( \
                         (SELECT r.sent_through FROM devour_relays r WHERE r.relay_id = ?1), 0)) \
                 WHERE owner = ?1 AND shard IN (SELECT value FROM json_each(?2))",
            )
            .bind::<Text, _>(relay)
            .bind::<Text, _>(json_list(shards))
            .execute(c)?,
        };
        Ok(())
    }

    /// Releases every lease of `relay` and removes it from the live relays.
    pub(crate) fn leave(&mut self, relay: &str) -> Result<(), DbError> {
        let all: Vec<i32> = (0..crate::outbox::SHARDS).collect();
        self.release(relay, &all)?;
        match self {
            #[cfg(feature = "postgres")]
            Store::Postgres(c) => {
                diesel::sql_query("DELETE FROM devour_relays WHERE relay_id = $1")
                    .bind::<Text, _>(relay)
                    .execute(c)?
            }
            #[cfg(feature = "sqlite")]
            Store::Sqlite(c) => diesel::sql_query("DELETE FROM devour_relays WHERE relay_id = ?1")
                .bind::<Text, _>(relay)
                .execute(c)?,
        };
        Ok(())
    }

    /// For a drain that holds fewer than every shard: how many shards neither `relay` nor a
    /// relay that looks alive holds (unheld, expired, or held by a relay whose last heartbeat
    /// is older than two thirds of its lease TTL: relays beat every third), and the longest
    /// lease TTL among the relays on record. SQLite: a relay holds every shard or none.
    pub(crate) fn unattended(&mut self, relay: &str, ttl_ms: u64) -> Result<(usize, u64), DbError> {
        match self {
            #[cfg(feature = "postgres")]
            Store::Postgres(c) => {
                #[derive(QueryableByName)]
                struct Unattended {
                    #[diesel(sql_type = BigInt)]
                    n: i64,
                    #[diesel(sql_type = BigInt)]
                    ttl: i64,
                }
                let u: Unattended = diesel::sql_query(
                    "SELECT (SELECT count(*) FROM devour_relay_leases l \
                               LEFT JOIN devour_relays r ON r.relay_id = l.owner \
                             WHERE l.owner IS DISTINCT FROM $1 \
                               AND (l.owner IS NULL OR l.expires_at IS NULL OR l.expires_at <= now() \
                                 OR r.relay_id IS NULL \
                                 OR r.heartbeat_at < now() - coalesce(r.lease_ttl_ms, $2) * 2 / 3 \
                                      * interval '1 millisecond')) AS n, \
                            (SELECT coalesce(max(coalesce(lease_ttl_ms, $2)), $2) \
                             FROM devour_relays) AS ttl",
                )
                .bind::<Text, _>(relay)
                .bind::<BigInt, _>(ttl_ms as i64)
                .get_result(c)?;
                Ok((u.n.max(0) as usize, u.ttl.max(0) as u64))
            }
            #[cfg(feature = "sqlite")]
            Store::Sqlite(_) => Ok((0, ttl_ms)),
        }
    }

    /// The largest id in the outbox (0 when empty): where a drain's work ends.
    pub(crate) fn max_id(&mut self) -> Result<i64, DbError> {
        let q = "SELECT coalesce(max(id), 0) AS n FROM devour_outbox";
        Ok(match self {
            #[cfg(feature = "postgres")]
            Store::Postgres(c) => diesel::sql_query(q).get_result::<Count>(c)?.n,
            #[cfg(feature = "sqlite")]
            Store::Sqlite(c) => diesel::sql_query(q).get_result::<Count>(c)?.n,
        })
    }

    /// The outbox's last id handed out, then the transactions (virtual ids), other than this
    /// connection's, holding a lock on the outbox that INSERT takes (or a stronger one): the
    /// only ones that may hold an id not committed yet, prepared transactions among them.
    /// `None` on SQLite (one writer at a time takes ids and commits) and when sessions cache
    /// ids (sequence `CACHE` > 1).
    pub(crate) fn id_sample(&mut self) -> Result<Option<IdSample>, DbError> {
        match self {
            #[cfg(feature = "postgres")]
            Store::Postgres(c) => {
                // The locks are read in a subquery that depends on the sequence's row, so after
                // it: a transaction not holding a lock by then takes ids above `last_id`.
                let rows: Vec<IdSample> = Prepared {
                    binds: &[],
                    sql: "SELECT s.last_id, s.server_started_us, ARRAY( \
                       SELECT DISTINCT l.virtualtransaction FROM pg_locks l \
                       WHERE s.last_id IS NOT NULL AND l.locktype = 'relation' AND l.granted \
                         AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                         AND l.relation = 'devour_outbox'::regclass \
                         AND l.mode IN ('RowExclusiveLock', 'ShareRowExclusiveLock', \
                                        'ExclusiveLock', 'AccessExclusiveLock') \
                         AND l.pid IS DISTINCT FROM pg_backend_pid()) AS holders \
                     FROM (SELECT coalesce(pg_sequence_last_value(q.seqrelid), 0) AS last_id, \
                             (extract(epoch FROM pg_postmaster_start_time()) * 1000000)::bigint \
                               AS server_started_us \
                           FROM pg_sequence q \
                           WHERE q.seqrelid = pg_get_serial_sequence('devour_outbox', 'id')::regclass \
                             AND q.seqcache = 1 \
                           OFFSET 0) s",
                }
                .load(c)?;
                Ok(rows.into_iter().next())
            }
            #[cfg(feature = "sqlite")]
            Store::Sqlite(_) => Ok(None),
        }
    }

    /// Fails with the first table (or column) the relay needs under `config` that the database lacks
    /// (checked in the catalog, as seen through the connection's search path).
    pub(crate) fn check_tables(&mut self, config: &RelayConfig) -> Result<(), super::RelayError> {
        let mut tables = vec![
            "devour_outbox",
            "devour_relays",
            "devour_relay_leases",
            "devour_dead_letters",
        ];
        if config.retention == Retention::Keep {
            tables.push("devour_outbox_delivered");
        }
        if config.on_dead_letter == crate::config::DeadLetterPolicy::BlockKey {
            tables.push("devour_key_releases");
        }
        for table in tables {
            if !self.has(table, None)? {
                return Err(super::RelayError::Schema {
                    missing: format!("table {table}"),
                });
            }
        }
        // Columns added to tables by later migrations.
        const COLUMNS_ADDED: &[(&str, &str)] = &[
            ("devour_relays", "lease_ttl_ms"),
            ("devour_relays", "sent_through"),
            ("devour_relay_leases", "sent_through"),
        ];
        for &(table, column) in COLUMNS_ADDED {
            if !self.has(table, Some(column))? {
                return Err(super::RelayError::Schema {
                    missing: format!("column {table}.{column}"),
                });
            }
        }
        Ok(())
    }

    /// Whether the catalog has `table` (with `column`, if given).
    fn has(&mut self, table: &str, column: Option<&str>) -> Result<bool, DbError> {
        let found: Vec<Count> = match self {
            #[cfg(feature = "postgres")]
            Store::Postgres(c) => diesel::sql_query(
                "SELECT CAST(count(*) AS BIGINT) AS n FROM pg_attribute \
                 WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped \
                   AND ($2::text IS NULL OR attname = $2)",
            )
            .bind::<Text, _>(table)
            .bind::<Nullable<Text>, _>(column)
            .load(c)?,
            #[cfg(feature = "sqlite")]
            Store::Sqlite(c) => diesel::sql_query(
                "SELECT CAST(count(*) AS BIGINT) AS n FROM pragma_table_info(?1) \
                 WHERE ?2 IS NULL OR name = ?2",
            )
            .bind::<Text, _>(table)
            .bind::<Nullable<Text>, _>(column)
            .load(c)?,
        };
        Ok(found.first().is_some_and(|f| f.n > 0))
    }

    /// The oldest undelivered rows after `after_id` in `shards`, in id order. With
    /// `skip_blocked_keys`, rows whose key has a dead letter are left out, and each row carries
    /// how many times keys were released (`devour_key_releases`) as this read saw it.
    pub(crate) fn fetch(
        &mut self,
        shards: &[i32],
        after_id: i64,
        until_id: Option<i64>,
        limit: u32,
        skip_blocked_keys: bool,
    ) -> Result<Vec<Row>, DbError> {
        let all = shards.len() == crate::outbox::SHARDS as usize;
        let blocked = if skip_blocked_keys {
            " AND (o.partition_key IS NULL OR NOT EXISTS (SELECT 1 FROM devour_dead_letters d \
               WHERE d.partition_key = o.partition_key))"
        } else {
            ""
        };
        let releases = if skip_blocked_keys {
            "coalesce((SELECT n FROM devour_key_releases), 0)"
        } else {
            "0"
        };
        Ok(match self {
            #[cfg(feature = "postgres")]
            Store::Postgres(c) => {
                let row = format!("{PG_ROW}, CAST({releases} AS BIGINT) AS key_releases");
                let until = if until_id.is_some() {
                    " AND o.id <= $3"
                } else {
                    ""
                };
                let shard_filter = if all { "" } else { " AND o.shard = ANY($4)" };
                let oldest = format!(
                    "SELECT {row} FROM devour_outbox o WHERE o.id > $1{until}{shard_filter}{blocked} \
                     ORDER BY o.id LIMIT $2"
                );
                // Under a cap, rows above the last id the sequence handed out are read too: they
                // were put back under ids of their own (`devour outbox retry` after the sequence
                // was reset), and no transaction can still take such an id from the sequence.
                // (The sequence is read once, in a subquery, so that the bound is an index
                // condition.)
                let sql = match until_id {
                    None => oldest,
                    Some(_) => format!(
                        "SELECT * FROM (({oldest}) UNION ALL \
                           (SELECT {row} FROM devour_outbox o \
                            WHERE o.id > greatest($1, $3, (SELECT coalesce(pg_sequence_last_value( \
                                    pg_get_serial_sequence('devour_outbox', 'id')::regclass), 0))) \
                              {shard_filter}{blocked} ORDER BY o.id LIMIT $2) \
                         ) r ORDER BY id LIMIT $2"
                    ),
                };
                Prepared {
                    sql: &sql,
                    binds: &[
                        PgBind::BigInt(after_id),
                        PgBind::BigInt(i64::from(limit)),
                        PgBind::BigInt(until_id.unwrap_or(0)),
                        PgBind::Ints(shards),
                    ],
                }
                .load(c)?
            }
            #[cfg(feature = "sqlite")]
            Store::Sqlite(c) => {
                let row = format!("{SQLITE_ROW}, CAST({releases} AS BIGINT) AS key_releases");
                // An integer, so written into the text as is.
                let until = until_id.map_or(String::new(), |u| format!(" AND o.id <= {u}"));
                let shard_filter = if all {
                    ""
                } else {
                    " AND o.shard IN (SELECT value FROM json_each(?3))"
                };
                let q = diesel::sql_query(format!(
                    "SELECT {row} FROM devour_outbox o WHERE o.id > ?1{until}{shard_filter}{blocked} \
                     ORDER BY o.id LIMIT ?2"
                ))
                .into_boxed::<diesel::sqlite::Sqlite>()
                .bind::<BigInt, _>(after_id)
                .bind::<BigInt, _>(i64::from(limit));
                if all {
                    q.load(c)?
                } else {
                    q.bind::<Text, _>(json_list(shards)).load(c)?
                }
            }
        })
    }

    /// Removes (or, with `Retention::Keep`, moves to `devour_outbox_delivered`) the delivered
    /// rows `ids`, but only those in shards `relay` still holds at the epochs in `leases`.
    /// Returns how many rows it removed.
    pub(crate) fn complete(
        &mut self,
        relay: &str,
        leases: &Leases,
        ids: &[i64],
        retention: Retention,
    ) -> Result<usize, DbError> {
        if ids.is_empty() {
            return Ok(0);
        }
        match self {
            #[cfg(feature = "postgres")]
            Store::Postgres(c) => {
                // The epochs held, by shard (-1, no epoch, for a shard not held): a lookup per
                // lease row. (A join with the pairs, planned once for arrays of unknown length,
                // compared every lease with every pair.)
                let mut epochs = vec![-1_i64; crate::outbox::SHARDS as usize];
                for (shard, epoch) in leases {
                    if let Some(e) = usize::try_from(*shard).ok().and_then(|s| epochs.get_mut(s)) {
                        *e = *epoch;
                    }
                }
                let delete = "DELETE FROM devour_outbox o \
                     WHERE o.id = ANY($1) AND o.shard = ANY(ARRAY( \
                       SELECT l.shard FROM devour_relay_leases l \
                       WHERE l.owner = $2 AND l.expires_at > now() \
                         AND l.epoch = ($3::bigint[])[l.shard + 1]))";
                let sql = match retention {
                    Retention::Delete => delete.to_string(),
                    Retention::Keep => format!(
                        "WITH moved AS ({delete} RETURNING o.*) \
                         INSERT INTO devour_outbox_delivered ({COLUMNS}) SELECT {COLUMNS} FROM moved"
                    ),
                };
                c.transaction(|c| {
                    // A removal lost in a server crash only brings delivered rows back, to be
                    // delivered again (at least once): it need not wait for its WAL to reach
                    // the disk. Visibility does not wait: the next read no longer sees the rows.
                    diesel::sql_query("SET LOCAL synchronous_commit = off").execute(c)?;
                    Ok(Prepared {
                        sql: &sql,
                        binds: &[
                            PgBind::BigInts(ids),
                            PgBind::Text(relay),
                            PgBind::BigInts(&epochs),
                        ],
                    }
                    .execute(c)?)
                })
            }
            #[cfg(feature = "sqlite")]
            Store::Sqlite(c) => c.immediate_transaction(|c| {
                let fence = "id IN (SELECT value FROM json_each(?1)) AND shard IN ( \
                       SELECT l.shard FROM devour_relay_leases l JOIN json_each(?3) m \
                         ON l.shard = json_extract(m.value, '$[0]') \
                        AND l.epoch = json_extract(m.value, '$[1]') \
                       WHERE l.owner = ?2 AND l.expires_at > ?4)";
                let mine: Vec<(i32, i64)> = leases.iter().map(|(s, e)| (*s, *e)).collect();
                let bind = |sql: String| {
                    diesel::sql_query(sql)
                        .bind::<Text, _>(json_list(ids))
                        .bind::<Text, _>(relay)
                        .bind::<Text, _>(json_list(&mine))
                        .bind::<BigInt, _>(now_ms())
                };
                if retention == Retention::Keep {
                    bind(format!(
                        "INSERT INTO devour_outbox_delivered ({COLUMNS}) \
                         SELECT {COLUMNS} FROM devour_outbox WHERE {fence}"
                    ))
                    .execute(c)?;
                }
                Ok(bind(format!("DELETE FROM devour_outbox WHERE {fence}")).execute(c)?)
            }),
        }
    }

    /// Moves row `id` to `devour_dead_letters` with `error`, if `relay` still holds its shard at
    /// `epoch`. Returns whether it moved.
    pub(crate) fn dead_letter(
        &mut self,
        relay: &str,
        shard: i32,
        epoch: i64,
        id: i64,
        error: &str,
    ) -> Result<bool, DbError> {
        let dead_columns = format!("{COLUMNS}, error");
        match self {
            #[cfg(feature = "postgres")]
            Store::Postgres(c) => {
                let n = diesel::sql_query(format!(
                    "WITH moved AS (DELETE FROM devour_outbox o USING devour_relay_leases l \
                         WHERE o.id = $1 AND l.shard = o.shard AND l.shard = $3 AND l.epoch = $4 \
                           AND l.owner = $2 AND l.expires_at > now() RETURNING o.*) \
                     INSERT INTO devour_dead_letters ({dead_columns}) \
                     SELECT id, topic, partition_key, kafka_partition, payload, headers, event, \
                         message_id, content_type, shard, created_at, attempts + 1, $5 FROM moved"
                ))
                .bind::<BigInt, _>(id)
                .bind::<Text, _>(relay)
                .bind::<Integer, _>(shard)
                .bind::<BigInt, _>(epoch)
                .bind::<Text, _>(error)
                .execute(c)?;
                Ok(n == 1)
            }
            #[cfg(feature = "sqlite")]
            Store::Sqlite(c) => c.immediate_transaction(|c| {
                let held: Option<Count> = diesel::sql_query(
                    "SELECT 1 AS n FROM devour_relay_leases \
                     WHERE shard = ?1 AND epoch = ?2 AND owner = ?3 AND expires_at > ?4",
                )
                .bind::<Integer, _>(shard)
                .bind::<BigInt, _>(epoch)
                .bind::<Text, _>(relay)
                .bind::<BigInt, _>(now_ms())
                .get_result(c)
                .optional()?;
                if held.is_none() {
                    return Ok(false);
                }
                let n = diesel::sql_query(format!(
                    "INSERT INTO devour_dead_letters ({dead_columns}) \
                     SELECT id, topic, partition_key, kafka_partition, payload, headers, event, \
                         message_id, content_type, shard, created_at, attempts + 1, ?2 \
                     FROM devour_outbox WHERE id = ?1"
                ))
                .bind::<BigInt, _>(id)
                .bind::<Text, _>(error)
                .execute(c)?;
                diesel::sql_query("DELETE FROM devour_outbox WHERE id = ?1")
                    .bind::<BigInt, _>(id)
                    .execute(c)?;
                Ok(n == 1)
            }),
        }
    }

    /// Deletes kept delivered rows older than `hours`; returns how many.
    pub(crate) fn cleanup_delivered(&mut self, hours: u64) -> Result<usize, DbError> {
        Ok(match self {
            #[cfg(feature = "postgres")]
            Store::Postgres(c) => diesel::sql_query(
                "DELETE FROM devour_outbox_delivered WHERE id IN (SELECT id FROM devour_outbox_delivered \
                 WHERE delivered_at < now() - $1 * interval '1 hour' LIMIT 10000)",
            )
            .bind::<BigInt, _>(hours as i64)
            .execute(c)?,
            #[cfg(feature = "sqlite")]
            Store::Sqlite(c) => diesel::sql_query(
                "DELETE FROM devour_outbox_delivered WHERE id IN (SELECT id FROM devour_outbox_delivered \
                 WHERE delivered_at < strftime('%Y-%m-%d %H:%M:%f', 'now', ?1) LIMIT 10000)",
            )
            .bind::<Text, _>(format!("-{hours} hours"))
            .execute(c)?,
        })
    }

    /// Rows waiting in the outbox (for progress reports).
    /// Age in seconds of the row with the smallest id (about the oldest undelivered one; 0 when
    /// the outbox is empty). Cheap: one step along the primary key.
    pub(crate) fn oldest_age_s(&mut self) -> Result<f64, DbError> {
        #[derive(QueryableByName)]
        struct Age {
            #[diesel(sql_type = diesel::sql_types::Double)]
            age: f64,
        }
        let rows: Vec<Age> = match self {
            #[cfg(feature = "postgres")]
            Store::Postgres(c) => diesel::sql_query(
                "SELECT CAST(EXTRACT(EPOCH FROM (now() - created_at)) AS DOUBLE PRECISION) AS age \
                 FROM devour_outbox ORDER BY id LIMIT 1",
            )
            .load(c)?,
            #[cfg(feature = "sqlite")]
            Store::Sqlite(c) => diesel::sql_query(
                "SELECT CAST((julianday('now') - julianday(created_at)) * 86400.0 AS REAL) AS age \
                 FROM devour_outbox ORDER BY id LIMIT 1",
            )
            .load(c)?,
        };
        Ok(rows.first().map_or(0.0, |r| r.age.max(0.0)))
    }

    /// Rows in the outbox above id `after`.
    pub(crate) fn backlog_after(&mut self, after: i64) -> Result<i64, DbError> {
        Ok(match self {
            #[cfg(feature = "postgres")]
            Store::Postgres(c) => {
                diesel::sql_query("SELECT count(*) AS n FROM devour_outbox WHERE id > $1")
                    .bind::<BigInt, _>(after)
                    .get_result::<Count>(c)?
                    .n
            }
            #[cfg(feature = "sqlite")]
            Store::Sqlite(c) => {
                diesel::sql_query("SELECT count(*) AS n FROM devour_outbox WHERE id > ?1")
                    .bind::<BigInt, _>(after)
                    .get_result::<Count>(c)?
                    .n
            }
        })
    }

    /// Rows in the outbox.
    pub(crate) fn backlog(&mut self) -> Result<i64, DbError> {
        let q = diesel::sql_query("SELECT count(*) AS n FROM devour_outbox");
        Ok(match self {
            #[cfg(feature = "postgres")]
            Store::Postgres(c) => q.get_result::<Count>(c)?.n,
            #[cfg(feature = "sqlite")]
            Store::Sqlite(c) => q.get_result::<Count>(c)?.n,
        })
    }
}

/// The lease fence, on a real database of each backend: a relay whose lease expired, was taken
/// over, or is held again under a newer epoch removes and dead-letters nothing; the holder does.
#[cfg(test)]
mod fence_tests {
    use super::*;
    #[cfg(feature = "postgres")]
    use crate::db::testing::in_pg_database;
    use crate::db::testing::migrated_config;

    /// Runs `sql` (no result) on `store`.
    fn exec(store: &mut Store, sql: &str) {
        use diesel::connection::SimpleConnection;
        match store {
            #[cfg(feature = "postgres")]
            Store::Postgres(c) => c.batch_execute(sql).unwrap(),
            #[cfg(feature = "sqlite")]
            Store::Sqlite(c) => c.batch_execute(sql).unwrap(),
        }
    }

    fn count(store: &mut Store, table: &str) -> i64 {
        let q = diesel::sql_query(format!("SELECT count(*) AS n FROM {table}"));
        match store {
            #[cfg(feature = "postgres")]
            Store::Postgres(c) => q.get_result::<Count>(c).unwrap().n,
            #[cfg(feature = "sqlite")]
            Store::Sqlite(c) => q.get_result::<Count>(c).unwrap().n,
        }
    }

    /// Rows 1..=4 in shard 7, owned in turn by relays "a" and "b".
    fn fence(url: &str, expire: &str) {
        let config = migrated_config(url);
        let mut a = Store::open(&config).unwrap();
        let mut b = Store::open(&config).unwrap();
        exec(
            &mut a,
            "INSERT INTO devour_outbox (topic, payload, shard) VALUES \
             ('t', NULL, 7), ('t', NULL, 7), ('t', NULL, 7), ('t', NULL, 7)",
        );
        let ids = [1, 2];
        let (a_leases, _, _) = a.claim("a", 60_000, 256).unwrap();
        let a_epoch = a_leases[&7];

        // "a" pauses past its TTL: its lease has expired, nobody has taken it yet.
        exec(
            &mut a,
            &format!("UPDATE devour_relay_leases SET expires_at = {expire}"),
        );
        assert_eq!(
            a.complete("a", &a_leases, &ids, Retention::Delete).unwrap(),
            0,
            "expired lease removed rows"
        );
        assert!(
            !a.dead_letter("a", 7, a_epoch, 3, "x").unwrap(),
            "expired lease dead-lettered a row"
        );

        // "b" takes the shard over (a new epoch); "a" wakes up.
        let (b_leases, _, holder) = b.claim("b", 60_000, 256).unwrap();
        assert_eq!(holder, None);
        assert!(
            b_leases[&7] > a_epoch,
            "a takeover bumps the epoch: {b_leases:?}"
        );
        assert_eq!(
            a.complete("a", &a_leases, &ids, Retention::Keep).unwrap(),
            0,
            "a lease taken over removed rows"
        );
        assert!(
            !a.dead_letter("a", 7, a_epoch, 3, "x").unwrap(),
            "a lease taken over dead-lettered a row"
        );

        // "b" lets go and "a" holds the shard again, under a newer epoch: its old epoch's
        // removals (deliveries of the lease it lost) still remove nothing.
        b.release("b", &b_leases.keys().copied().collect::<Vec<_>>())
            .unwrap();
        let (a_again, _, _) = a.claim("a", 60_000, 256).unwrap();
        assert!(a_again[&7] > b_leases[&7]);
        assert_eq!(
            a.complete("a", &a_leases, &ids, Retention::Delete).unwrap(),
            0,
            "a stale epoch removed rows"
        );
        assert!(
            !a.dead_letter("a", 7, a_epoch, 3, "x").unwrap(),
            "a stale epoch dead-lettered a row"
        );
        assert_eq!(count(&mut a, "devour_outbox"), 4);
        assert_eq!(count(&mut a, "devour_dead_letters"), 0);

        // The holder, at its epoch, does remove and dead-letter.
        assert_eq!(
            a.complete("a", &a_again, &ids, Retention::Delete).unwrap(),
            2
        );
        assert!(a.dead_letter("a", 7, a_again[&7], 3, "x").unwrap());
        assert_eq!(count(&mut a, "devour_outbox"), 1);
        assert_eq!(count(&mut a, "devour_dead_letters"), 1);
    }

    /// What a relay may have sent goes with its leases to whoever takes them next: taken over
    /// after it died (its row kept while a lease names it), or handed back.
    fn handover(url: &str, past: &str) {
        let config = migrated_config(url);
        let mut a = Store::open(&config).unwrap();
        let mut b = Store::open(&config).unwrap();
        a.heartbeat("a", 60_000).unwrap();
        let (_, sent, _) = a.claim("a", 60_000, 256).unwrap();
        assert!(sent.values().all(|&t| t == 0), "nothing sent yet: {sent:?}");
        a.cover("a", 500).unwrap();
        a.cover("a", 400).unwrap();

        // "a" dies: silent for long, its leases run out. "b" forgets no relay that a lease
        // still names, takes the leases over, and learns what "a" may have sent.
        exec(
            &mut a,
            &format!("UPDATE devour_relays SET heartbeat_at = {past}; UPDATE devour_relay_leases SET expires_at = {past}"),
        );
        b.heartbeat("b", 60_000).unwrap();
        assert_eq!(count(&mut b, "devour_relays WHERE relay_id = 'a'"), 1);
        let (taken, sent, _) = b.claim("b", 60_000, 256).unwrap();
        assert_eq!(taken.len(), 256);
        assert!(sent.values().all(|&t| t == 500), "{sent:?}");
        // Renewals say it too (a tick that took the leases may have failed after taking them).
        let (renewed, sent) = b.renew("b", 60_000).unwrap();
        assert_eq!((renewed, sent.values().all(|&t| t == 500)), (taken, true));
        b.heartbeat("b", 60_000).unwrap();
        assert_eq!(
            count(&mut b, "devour_relays WHERE relay_id = 'a'"),
            0,
            "a silent relay no lease names is forgotten"
        );

        // "b" stops cleanly after covering 800: the leases keep it for the next holder.
        b.cover("b", 800).unwrap();
        b.leave("b").unwrap();
        a.heartbeat("a", 60_000).unwrap();
        let (taken, sent, _) = a.claim("a", 60_000, 256).unwrap();
        assert_eq!(taken.len(), 256);
        assert!(sent.values().all(|&t| t == 800), "{sent:?}");
        assert!(
            b.cover("b", 900).is_err(),
            "a relay without its row sends nothing"
        );
    }

    #[cfg(feature = "sqlite")]
    #[test]
    fn what_a_relay_may_have_sent_goes_with_its_leases_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("handover.db").display());
        handover(&url, "0");
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn what_a_relay_may_have_sent_goes_with_its_leases_postgres() {
        in_pg_database("handover", |url| handover(url, "now() - interval '1 hour'"));
    }

    #[cfg(feature = "sqlite")]
    #[test]
    fn a_lost_lease_removes_nothing_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("fence.db").display());
        fence(&url, "0");
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn a_lost_lease_removes_nothing_postgres() {
        in_pg_database("fence", |url| fence(url, "now() - interval '1 second'"));
    }

    /// The read, the sample and the removal are prepared once per connection and run again
    /// (not parsed and planned at every run), and the reading connection uses generic plans.
    #[cfg(feature = "postgres")]
    #[test]
    fn batch_statements_are_prepared_once_postgres() {
        in_pg_database("prepared", |url| {
            let config = migrated_config(url);
            let mut r = Store::open_reader(&config).unwrap();
            exec(
                &mut r,
                "INSERT INTO devour_outbox (topic, payload, shard) VALUES \
                 ('t', NULL, 7), ('t', NULL, 7), ('t', NULL, 8), ('t', NULL, 7)",
            );
            let (leases, _, _) = r.claim("a", 60_000, 256).unwrap();
            let all: Vec<i32> = (0..crate::outbox::SHARDS).collect();
            for after in 0..3 {
                let some = r.fetch(&[7], after, Some(100), 10, false).unwrap();
                assert_eq!(
                    some.iter().map(|row| row.id).collect::<Vec<_>>(),
                    [1, 2, 4]
                        .into_iter()
                        .filter(|i| *i > after)
                        .collect::<Vec<_>>()
                );
                assert_eq!(r.fetch(&all, after, None, 2, false).unwrap().len(), 2);
                assert!(r.id_sample().unwrap().is_some());
            }
            for id in [1, 3] {
                assert_eq!(
                    r.complete("a", &leases, &[id], Retention::Delete).unwrap(),
                    1
                );
            }
            let Store::Postgres(c) = &mut r else {
                unreachable!()
            };
            let prepared = |c: &mut diesel::PgConnection, like: &str| {
                diesel::sql_query(format!(
                    "SELECT count(*) AS n FROM pg_prepared_statements WHERE statement LIKE '{like}'"
                ))
                .get_result::<Count>(c)
                .unwrap()
                .n
            };
            assert_eq!(
                prepared(c, "%o.id > $1 AND o.id <= $2 AND o.shard = ANY($3)%"),
                1
            );
            assert_eq!(
                prepared(
                    c,
                    "SELECT id, topic%FROM devour_outbox o WHERE o.id > $1 ORDER BY%"
                ),
                1
            );
            assert_eq!(prepared(c, "SELECT s.last_id%pg_locks%"), 1);
            assert_eq!(prepared(c, "DELETE FROM devour_outbox o%"), 1);
            #[derive(QueryableByName)]
            struct Setting {
                #[diesel(sql_type = Text)]
                plan_cache_mode: String,
            }
            let mode = diesel::sql_query("SHOW plan_cache_mode")
                .get_result::<Setting>(c)
                .unwrap();
            assert_eq!(mode.plan_cache_mode, "force_generic_plan");
        });
    }
}
