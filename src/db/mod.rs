//! Database access: connection pools, embedded migrations, and the outbox table's Diesel schema.
//!
//! Backend-specific SQL lives in one module per backend ([`postgres`], [`sqlite`]); this module
//! holds what both share and the [`DbPool`] / [`DbConnection`] enums that devour's own commands
//! use. Applications keep using their own `PgConnection` / `SqliteConnection`.

use std::time::Duration;

use diesel::r2d2::{ConnectionManager, ManageConnection, Pool, PooledConnection};

use crate::config::{DatabaseConfig, DatabaseUrl};

mod admin;
#[cfg(feature = "postgres")]
pub(crate) mod prepared;
#[cfg(test)]
pub(crate) mod testing;
pub use admin::{DeadLetter, DeadLetters, KeyRows, RelayState, ShardBacklog, TopicBacklog};

#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;

diesel::table! {
    /// The outbox table, as the write path sees it (the columns both backends type alike).
    /// `created_at` is typed per backend and read by backend modules.
    devour_outbox (id) {
        /// Increasing id; order of insertion, not of commit.
        id -> BigInt,
        /// Kafka topic.
        topic -> Text,
        /// Kafka message key; messages with one key are delivered in commit order.
        partition_key -> Nullable<Text>,
        /// Explicit Kafka partition; NULL lets the murmur2 partitioner pick by key.
        kafka_partition -> Nullable<Integer>,
        /// Message value; NULL is a tombstone.
        payload -> Nullable<Binary>,
        /// JSON object of extra Kafka headers (string → string).
        headers -> Text,
        /// `create`, `update`, `delete` or an application's own event name.
        event -> Nullable<Text>,
        /// Unique message id, sent as the `message-id` header.
        message_id -> Text,
        /// MIME type of the payload, sent as the `content-type` header.
        content_type -> Text,
        /// Shard of the row (see `outbox::shard_for_key`).
        shard -> Integer,
        /// How many times the row was dead-lettered before.
        attempts -> Integer,
    }
}

/// One outbox row to insert, as both backends take it. Every value is bound (a `None` is NULL,
/// never `DEFAULT`), so the statement is prepared once and cached.
#[derive(diesel::Insertable)]
#[diesel(table_name = devour_outbox, treat_none_as_default_value = false)]
pub(crate) struct NewOutboxRow {
    topic: String,
    partition_key: Option<String>,
    kafka_partition: Option<i32>,
    payload: Option<Vec<u8>>,
    headers: String,
    event: Option<String>,
    message_id: String,
    content_type: String,
    shard: i32,
}

impl NewOutboxRow {
    /// The row of `m`. Owns its values: a row type without lifetimes lets Diesel cache
    /// fixed-size multi-row INSERTs too.
    pub(crate) fn new(m: &crate::outbox::OutboxMessage) -> Self {
        NewOutboxRow {
            topic: m.topic.clone(),
            partition_key: m.key.clone(),
            kafka_partition: m.partition,
            payload: m.payload.clone(),
            headers: m.headers_json(),
            event: m.event.clone(),
            message_id: m.message_id.to_string(),
            content_type: m.content_type.clone(),
            shard: m.shard(),
        }
    }
}

/// Rows per multi-row outbox INSERT (9 bound values each, well under PostgreSQL's 65,535).
pub(crate) const BATCH_INSERT_ROWS: usize = 1000;

/// The ids of a multi-row INSERT's `RETURNING (id, message_id)`, in the order of `messages`
/// (matched by message id, so nothing relies on the order rows come back in).
pub(crate) fn ids_in_order(
    messages: &[crate::outbox::OutboxMessage],
    returned: Vec<(i64, String)>,
) -> diesel::QueryResult<Vec<i64>> {
    let by_message: std::collections::HashMap<String, i64> =
        returned.into_iter().map(|(id, mid)| (mid, id)).collect();
    messages
        .iter()
        .map(|m| {
            by_message
                .get(&m.message_id.to_string())
                .copied()
                .ok_or(diesel::result::Error::NotFound)
        })
        .collect()
}

/// A failure talking to the database.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DbError {
    /// Could not connect or build the pool.
    #[error("cannot connect to {url}: {reason}")]
    Connect {
        /// The redacted URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// Running migrations failed.
    #[error("migrations failed on {url}: {reason}")]
    Migrate {
        /// The redacted URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// A query failed.
    #[error("database error: {0}")]
    Query(#[from] diesel::result::Error),
}

impl DbError {
    /// What to do, when the error says it: a query about a devour table or column the database
    /// lacks (a connection's "database … does not exist" is not about them).
    pub fn hint(&self) -> Option<&'static str> {
        let DbError::Query(_) = self else {
            return None;
        };
        let text = self.to_string();
        let missing = (text.contains("relation") || text.contains("column"))
            && text.contains("does not exist")
            || text.contains("no such table")
            || text.contains("no such column");
        missing.then_some(
            "devour's tables are missing or older than this devour: run `devour migrate`",
        )
    }

    /// Whether trying again later may succeed (the database may come back).
    pub fn is_retriable(&self) -> bool {
        match self {
            DbError::Connect { .. } => true,
            DbError::Migrate { .. } => false,
            DbError::Query(e) => query_is_retriable(e),
        }
    }
}

/// Whether a query that failed with `e` may succeed if tried again (the connection dropped, a
/// serialization conflict, SQLite's lock still held by another writer after the busy timeout), as
/// opposed to failing the same way every time.
pub(crate) fn query_is_retriable(e: &diesel::result::Error) -> bool {
    use diesel::result::{DatabaseErrorKind as Kind, Error};
    match e {
        Error::DatabaseError(
            Kind::ClosedConnection | Kind::SerializationFailure | Kind::UnableToSendCommand,
            _,
        ) => true,
        // SQLITE_BUSY and SQLITE_LOCKED, which Diesel does not tell apart from other errors.
        Error::DatabaseError(Kind::Unknown, info) => matches!(
            info.message(),
            "database is locked" | "database table is locked"
        ),
        _ => false,
    }
}

/// Whether connecting to `url` failed for good with `reason`: only a PostgreSQL server that is
/// not up yet (refused, starting up, too many clients) is worth waiting for.
pub(crate) fn connect_failed_for_good(url: &DatabaseUrl, reason: &str) -> bool {
    match url {
        #[cfg(feature = "postgres")]
        DatabaseUrl::Postgres(_) => postgres::refused_for_good(reason),
        #[allow(unreachable_patterns)]
        _ => true,
    }
}

/// Fails when `config` names a SQLite file that does not exist: opening it would create an
/// empty one (a misspelt path left behind), where only migrations should create it.
pub fn require_existing_file(config: &DatabaseConfig) -> Result<(), DbError> {
    #[cfg(feature = "sqlite")]
    if let DatabaseUrl::Sqlite(path) = &config.url {
        let special = path == ":memory:" || path.starts_with("file:");
        if !special && !std::path::Path::new(path).exists() {
            return Err(DbError::Connect {
                url: config.url.redacted(),
                reason: "the file does not exist; `devour migrate` (or --migrate) creates it"
                    .into(),
            });
        }
    }
    let _ = config;
    Ok(())
}

/// [`DbPool::connect`]'s pool of either backend: one connection first, outside the pool, since
/// r2d2 would try again until the timeout, logging each refusal, where a wrong password or a
/// missing database or file never goes away (`describe` words its error); only a PostgreSQL
/// server that is not up yet is waited for, by the pool's first connection.
#[cfg(any(feature = "postgres", feature = "sqlite"))]
fn build_pool<C>(
    manager: ConnectionManager<C>,
    builder: diesel::r2d2::Builder<ConnectionManager<C>>,
    config: &DatabaseConfig,
    describe: impl Fn(String) -> String,
    wait: bool,
) -> Result<Pool<ConnectionManager<C>>, DbError>
where
    C: diesel::r2d2::R2D2Connection + 'static,
{
    let err = |reason: String| DbError::Connect {
        url: config.url.redacted(),
        reason,
    };
    if let Err(e) = manager.connect() {
        let reason = describe(e.to_string());
        if connect_failed_for_good(&config.url, &reason) {
            return Err(err(reason));
        }
    }
    let pool = builder
        .max_size(config.pool_size)
        .min_idle(Some(0))
        .connection_timeout(Duration::from_millis(config.connect_timeout_ms))
        .build(manager)
        .map_err(|e| err(e.to_string()))?;
    if wait {
        drop(pool.get().map_err(|e| err(e.to_string()))?);
    }
    Ok(pool)
}

/// A pool of connections to the configured database.
#[derive(Clone)]
#[non_exhaustive]
pub enum DbPool {
    /// PostgreSQL.
    #[cfg(feature = "postgres")]
    Postgres(Pool<ConnectionManager<diesel::PgConnection>>),
    /// SQLite (WAL mode, busy timeout set on every connection).
    #[cfg(feature = "sqlite")]
    Sqlite(Pool<ConnectionManager<diesel::SqliteConnection>>),
}

/// One connection taken from a [`DbPool`].
#[non_exhaustive]
pub enum DbConnection {
    /// PostgreSQL.
    #[cfg(feature = "postgres")]
    Postgres(PooledConnection<ConnectionManager<diesel::PgConnection>>),
    /// SQLite.
    #[cfg(feature = "sqlite")]
    Sqlite(PooledConnection<ConnectionManager<diesel::SqliteConnection>>),
}

impl DbPool {
    /// Builds the pool and opens one connection, so that an unreachable database fails here;
    /// the others (up to `pool_size`) open only when a caller asks for one. (Opening them all at
    /// once on a new SQLite file raced to switch it to WAL, and r2d2 logged "database is
    /// locked"; keeping one idle made r2d2 replace a connection taken from the pool in the
    /// background, still connecting when a short command exited. r2d2 connects on threads of
    /// its own: a caller that gives up waiting leaves its attempt running there.)
    pub fn connect(config: &DatabaseConfig) -> Result<DbPool, DbError> {
        Self::build(config, true)
    }

    /// [`connect`](Self::connect) without waiting for the first connection (a refusal that
    /// will not go away still fails here): for a caller that waits with
    /// [`get_or_stop`](Self::get_or_stop).
    pub fn connect_lazy(config: &DatabaseConfig) -> Result<DbPool, DbError> {
        Self::build(config, false)
    }

    fn build(config: &DatabaseConfig, wait: bool) -> Result<DbPool, DbError> {
        match &config.url {
            #[cfg(feature = "postgres")]
            DatabaseUrl::Postgres(url) => Ok(DbPool::Postgres(build_pool(
                ConnectionManager::new(postgres::with_client_timeouts(url)),
                Pool::builder(),
                config,
                |e| e,
                wait,
            )?)),
            #[cfg(feature = "sqlite")]
            DatabaseUrl::Sqlite(path) => Ok(DbPool::Sqlite(build_pool(
                ConnectionManager::new(path.as_str()),
                Pool::builder().connection_customizer(Box::new(sqlite::ConnectionOptions {
                    busy_timeout_ms: config.busy_timeout_ms,
                })),
                config,
                |e| sqlite::open_error(path, e),
                wait,
            )?)),
            #[allow(unreachable_patterns)]
            other => Err(DbError::Connect {
                url: config.url.redacted(),
                reason: format!(
                    "this build of devour has no support for {other}; enable its cargo feature"
                ),
            }),
        }
    }

    /// Takes a connection from the pool.
    pub fn get(&self) -> Result<DbConnection, DbError> {
        let err = |e: r2d2::Error| DbError::Connect {
            url: self.url_hint(),
            reason: e.to_string(),
        };
        Ok(match self {
            #[cfg(feature = "postgres")]
            DbPool::Postgres(p) => DbConnection::Postgres(p.get().map_err(err)?),
            #[cfg(feature = "sqlite")]
            DbPool::Sqlite(p) => DbConnection::Sqlite(p.get().map_err(err)?),
        })
    }

    /// [`get`](Self::get), giving up early when `stop` is set (`None`): a stop asked while the
    /// database is not up yet need not wait out `connect_timeout_ms`.
    pub fn get_or_stop(
        &self,
        stop: &std::sync::atomic::AtomicBool,
        connect_timeout: std::time::Duration,
    ) -> Result<Option<DbConnection>, DbError> {
        use std::time::{Duration, Instant};
        let err = |e: r2d2::Error| DbError::Connect {
            url: self.url_hint(),
            reason: e.to_string(),
        };
        let deadline = Instant::now() + connect_timeout;
        loop {
            if stop.load(std::sync::atomic::Ordering::Acquire) {
                return Ok(None);
            }
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(250))
                .max(Duration::from_millis(1));
            let got = match self {
                #[cfg(feature = "postgres")]
                DbPool::Postgres(p) => p.get_timeout(wait).map(DbConnection::Postgres),
                #[cfg(feature = "sqlite")]
                DbPool::Sqlite(p) => p.get_timeout(wait).map(DbConnection::Sqlite),
            };
            match got {
                Ok(c) => return Ok(Some(c)),
                Err(e) if Instant::now() >= deadline => return Err(err(e)),
                Err(_) => {}
            }
        }
    }

    /// Opens `n` connections at once (then hands them back, idle), so that a server that
    /// allows fewer (`max_connections`, a role's `CONNECTION LIMIT`) fails here, at start, and
    /// not a worker later. `n` is capped at the pool's size; `who` says who needs them, for the
    /// error.
    pub fn open(&self, n: u32, who: &str) -> Result<(), DbError> {
        let n = n.min(self.max_size());
        let mut held = Vec::new();
        for i in 0..n {
            match self.get() {
                Ok(c) => held.push(c),
                Err(DbError::Connect { url, reason }) => {
                    return Err(DbError::Connect {
                        url,
                        reason: format!(
                            "{who} needs {n} connections at once; connection {} failed: {reason}",
                            i + 1
                        ),
                    })
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn max_size(&self) -> u32 {
        match self {
            #[cfg(feature = "postgres")]
            DbPool::Postgres(p) => p.max_size(),
            #[cfg(feature = "sqlite")]
            DbPool::Sqlite(p) => p.max_size(),
        }
    }

    fn url_hint(&self) -> String {
        match self {
            #[cfg(feature = "postgres")]
            DbPool::Postgres(_) => "PostgreSQL".into(),
            #[cfg(feature = "sqlite")]
            DbPool::Sqlite(_) => "SQLite".into(),
        }
    }

    /// Applies the pending migrations of this backend; returns the versions applied.
    pub fn migrate(&self) -> Result<Vec<String>, DbError> {
        let mut conn = self.get()?;
        conn.migrate()
    }
}

impl DbConnection {
    /// Applies the pending migrations of this connection's backend; returns the versions applied.
    pub fn migrate(&mut self) -> Result<Vec<String>, DbError> {
        each_backend!(self, c => run_migrations(&mut **c))
    }
}

/// Runs `$body` with `$c` bound to the concrete connection of whichever backend `$conn` is.
/// Lets one piece of Diesel code serve both backends without generic bounds.
macro_rules! each_backend {
    ($conn:expr, $c:ident => $body:expr) => {
        match $conn {
            #[cfg(feature = "postgres")]
            $crate::db::DbConnection::Postgres($c) => $body,
            #[cfg(feature = "sqlite")]
            $crate::db::DbConnection::Sqlite($c) => $body,
        }
    };
}
pub(crate) use each_backend;

/// An undelivered outbox row, as `devour outbox pending` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PendingRow {
    /// Row id.
    pub id: i64,
    /// Topic.
    pub topic: String,
    /// Key.
    pub partition_key: Option<String>,
    /// Event.
    pub event: Option<String>,
    /// Payload size.
    pub payload_bytes: usize,
    /// The payload's first 80 characters (lossy UTF-8).
    pub payload_preview: String,
    /// Creation time as the database prints it.
    pub created_at: String,
}

impl DbConnection {
    /// The `limit` oldest rows not yet delivered.
    pub fn pending(&mut self, limit: i64) -> Result<Vec<PendingRow>, DbError> {
        use devour_outbox::dsl as o;
        use diesel::prelude::*;
        type Raw = (
            i64,
            String,
            Option<String>,
            Option<String>,
            Option<Vec<u8>>,
            String,
        );
        let query = o::devour_outbox
            .select((
                o::id,
                o::topic,
                o::partition_key,
                o::event,
                o::payload,
                diesel::dsl::sql::<diesel::sql_types::Text>("CAST(created_at AS TEXT)"),
            ))
            .order(o::id)
            .limit(limit);
        let raw: Vec<Raw> = each_backend!(self, c => query.load(c)?);
        Ok(raw
            .into_iter()
            .map(|(id, topic, partition_key, event, payload, created_at)| {
                let payload = payload.unwrap_or_default();
                PendingRow {
                    id,
                    topic,
                    partition_key,
                    event,
                    payload_bytes: payload.len(),
                    payload_preview: String::from_utf8_lossy(&payload).chars().take(80).collect(),
                    created_at,
                }
            })
            .collect())
    }
}

/// Applies devour's migrations on an application's own connection (the library call behind
/// `devour migrate`). Idempotent: applied migrations are skipped.
pub fn run_migrations<C: MigrateConnection>(conn: &mut C) -> Result<Vec<String>, DbError> {
    conn.run_devour_migrations()
}

/// The names (`2026-11-30-000001_create_outbox`) of the `applied` migration versions.
fn migration_names<DB: diesel::backend::Backend>(
    source: &diesel_migrations::EmbeddedMigrations,
    applied: &[diesel::migration::MigrationVersion<'_>],
) -> Vec<String> {
    use diesel::migration::MigrationSource;
    let all = MigrationSource::<DB>::migrations(source).unwrap_or_default();
    applied
        .iter()
        .map(|v| {
            all.iter()
                .find(|m| m.name().version() == *v)
                .map(|m| m.name().to_string())
                .unwrap_or_else(|| v.to_string())
        })
        .collect()
}

/// A connection devour can migrate: `PgConnection` or `SqliteConnection`.
pub trait MigrateConnection {
    /// Applies devour's pending migrations.
    fn run_devour_migrations(&mut self) -> Result<Vec<String>, DbError>;
}

/// Implements `ModelStore<$backend>` for a model from its Diesel derives.
#[doc(hidden)]
#[macro_export]
macro_rules! __model_store {
    ($backend:ty, $model:ty, $table:expr, $conflict:expr) => {
        impl $crate::ModelStore<$backend> for $model {
            fn insert_new<C>(&self, conn: &mut C) -> $crate::__private::QueryResult<Option<Self>>
            where
                C: $crate::__private::LoadConnection<Backend = $backend>,
            {
                use $crate::__private::*;
                diesel::insert_into($table)
                    .values(self)
                    .on_conflict($conflict)
                    .do_nothing()
                    .returning(<Self as SelectableHelper<$backend>>::as_select())
                    .get_result::<Self>(conn)
                    .optional()
            }
            fn update_existing<C>(
                &self,
                conn: &mut C,
            ) -> $crate::__private::QueryResult<Option<Self>>
            where
                C: $crate::__private::LoadConnection<Backend = $backend>,
            {
                use $crate::__private::*;
                match diesel::update(self)
                    .set(self)
                    .returning(<Self as SelectableHelper<$backend>>::as_select())
                    .get_result::<Self>(conn)
                    .optional()
                {
                    // Nothing to set (every other field is `None` without
                    // `treat_none_as_null`, or skipped): the save changes nothing, and the row
                    // is updated if it is there.
                    Err(diesel::result::Error::QueryBuilderError(e))
                        if e.is::<diesel::result::EmptyChangeset>() =>
                    {
                        diesel::QueryDsl::find($table, diesel::Identifiable::id(self))
                            .select(<Self as SelectableHelper<$backend>>::as_select())
                            .get_result::<Self>(conn)
                            .optional()
                    }
                    other => other,
                }
            }
            fn delete_existing<C>(
                &self,
                conn: &mut C,
            ) -> $crate::__private::QueryResult<Option<Self>>
            where
                C: $crate::__private::LoadConnection<Backend = $backend>,
            {
                use $crate::__private::*;
                diesel::delete(self)
                    .returning(<Self as SelectableHelper<$backend>>::as_select())
                    .get_result::<Self>(conn)
                    .optional()
            }
        }
    };
}

#[cfg(all(test, feature = "sqlite"))]
mod tests {
    use diesel::connection::SimpleConnection;
    use diesel::Connection;

    /// A writer that finds SQLite's lock held past its busy timeout may succeed later; a query
    /// that is wrong fails the same way every time.
    #[test]
    fn sqlite_busy_is_retriable_and_a_bad_query_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("busy.db");
        let url = path.to_str().unwrap();
        let mut a = diesel::SqliteConnection::establish(url).unwrap();
        let mut b = diesel::SqliteConnection::establish(url).unwrap();
        a.batch_execute("CREATE TABLE t (x INTEGER); BEGIN IMMEDIATE; INSERT INTO t VALUES (1);")
            .unwrap();
        b.batch_execute("PRAGMA busy_timeout = 0").unwrap();
        let busy = b.batch_execute("INSERT INTO t VALUES (2)").unwrap_err();
        assert!(super::query_is_retriable(&busy), "{busy:?}");
        let wrong = b
            .batch_execute("INSERT INTO nowhere VALUES (2)")
            .unwrap_err();
        assert!(!super::query_is_retriable(&wrong), "{wrong:?}");
    }
}
