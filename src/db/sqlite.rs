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
        // Keyless rows go to shard 0: on SQLite a single relay drains every shard.
        diesel::insert_into(o::devour_outbox)
            .values(NewOutboxRow::new(m, Some(m.shard().unwrap_or(0))))
            .returning(o::id)
            .get_result(conn)
    }
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
