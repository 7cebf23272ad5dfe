//! SQLite specifics: migrations, the outbox insert, and model persistence.

use diesel::connection::LoadConnection;
use diesel::prelude::*;
use diesel::sqlite::Sqlite;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use super::{devour_outbox, DbError, MigrateConnection, NewOutboxRow};
use crate::outbox::{OutboxBackend, OutboxMessage};

/// devour's SQLite migrations, embedded in the binary.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");

impl OutboxBackend for Sqlite {
    fn insert_outbox<C>(conn: &mut C, m: &OutboxMessage) -> QueryResult<i64>
    where
        C: LoadConnection<Backend = Sqlite>,
    {
        use devour_outbox::dsl as o;
        diesel::insert_into(o::devour_outbox)
            .values(NewOutboxRow::new(m))
            .returning(o::id)
            .get_result(conn)
    }

    fn insert_outbox_batch<C>(conn: &mut C, ms: &[OutboxMessage]) -> QueryResult<Vec<i64>>
    where
        C: LoadConnection<Backend = Sqlite>,
    {
        // Diesel cannot combine SQLite's multi-row INSERT with RETURNING. The ids are known
        // anyway: the transaction holds SQLite's write lock and AUTOINCREMENT hands one
        // statement's rows consecutive ids in VALUES order, ending at last_insert_rowid().
        let mut ids = Vec::with_capacity(ms.len());
        let mut rest = ms;
        while !rest.is_empty() {
            // Chunks of fixed sizes keep each statement's text constant, so Diesel prepares
            // it once.
            rest = match rest.len() {
                n if n >= 128 => insert_chunk::<C, 128>(conn, rest, &mut ids)?,
                n if n >= 32 => insert_chunk::<C, 32>(conn, rest, &mut ids)?,
                n if n >= 8 => insert_chunk::<C, 8>(conn, rest, &mut ids)?,
                _ => {
                    ids.push(Self::insert_outbox(conn, &rest[0])?);
                    &rest[1..]
                }
            };
        }
        Ok(ids)
    }
}

/// Inserts the first `N` of `ms` with one statement, appends their ids, returns the rest.
fn insert_chunk<'m, C, const N: usize>(
    conn: &mut C,
    ms: &'m [OutboxMessage],
    ids: &mut Vec<i64>,
) -> QueryResult<&'m [OutboxMessage]>
where
    C: LoadConnection<Backend = Sqlite>,
{
    use devour_outbox::dsl as o;
    let rows: [NewOutboxRow; N] = std::array::from_fn(|i| NewOutboxRow::new(&ms[i]));
    diesel::insert_into(o::devour_outbox)
        .values(&rows)
        .execute(conn)?;
    let last: i64 = diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(
        "last_insert_rowid()",
    ))
    .get_result(conn)?;
    ids.extend(last - N as i64 + 1..=last);
    Ok(&ms[N..])
}

impl MigrateConnection for diesel::SqliteConnection {
    fn run_devour_migrations(&mut self) -> Result<Vec<String>, DbError> {
        self.run_pending_migrations(MIGRATIONS)
            .map(|applied| super::migration_names::<Sqlite>(&MIGRATIONS, &applied))
            .map_err(|e| DbError::Migrate {
                url: "SQLite".into(),
                reason: e.to_string(),
            })
    }
}

/// Implements `ModelStore<Sqlite>` for a model (used by `#[derive(ProducerModel)]`).
#[doc(hidden)]
#[macro_export]
macro_rules! __model_store_sqlite {
    ($model:ty, $table:expr, $conflict:expr) => {
        $crate::__model_store!($crate::__private::Sqlite, $model, $table, $conflict);
    };
}

/// Per-connection settings of devour's SQLite pool: WAL journal, busy timeout, foreign keys.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionOptions {
    /// How long a writer waits for the lock before failing with "database is locked".
    pub busy_timeout_ms: u64,
}

impl diesel::r2d2::CustomizeConnection<diesel::SqliteConnection, diesel::r2d2::Error>
    for ConnectionOptions
{
    fn on_acquire(&self, conn: &mut diesel::SqliteConnection) -> Result<(), diesel::r2d2::Error> {
        configure(conn, self.busy_timeout_ms).map_err(diesel::r2d2::Error::QueryError)
    }
}

/// Sets WAL mode, the busy timeout and foreign keys on an SQLite connection. Applications that
/// open their own connections to the same file should do the same.
pub fn configure(conn: &mut diesel::SqliteConnection, busy_timeout_ms: u64) -> QueryResult<()> {
    diesel::sql_query(format!("PRAGMA busy_timeout = {busy_timeout_ms}")).execute(conn)?;
    diesel::sql_query("PRAGMA journal_mode = WAL").execute(conn)?;
    diesel::sql_query("PRAGMA foreign_keys = ON").execute(conn)?;
    Ok(())
}

/// Why opening the SQLite file `path` failed, saying which directory is missing when that is
/// the cause (SQLite says only "unable to open database file").
pub(crate) fn open_error(path: &str, e: impl std::fmt::Display) -> String {
    let parent = std::path::Path::new(path)
        .parent()
        .filter(|p| !p.as_os_str().is_empty());
    match parent {
        Some(dir) if !dir.is_dir() => {
            format!("{e} (the directory {} does not exist)", dir.display())
        }
        _ => e.to_string(),
    }
}
