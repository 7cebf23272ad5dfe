//! PostgreSQL specifics: migrations, the outbox insert, and model persistence.

use diesel::connection::LoadConnection;
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use super::{devour_outbox, DbError, MigrateConnection, NewOutboxRow};
use crate::outbox::{OutboxBackend, OutboxMessage};

/// devour's PostgreSQL migrations, embedded in the binary.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");

impl OutboxBackend for Pg {
    fn insert_outbox<C>(conn: &mut C, m: &OutboxMessage) -> QueryResult<i64>
    where
        C: LoadConnection<Backend = Pg>,
    {
        use devour_outbox::dsl as o;
        // `shard` is a generated column on PostgreSQL: the database derives it from the key.
        diesel::insert_into(o::devour_outbox)
            .values(NewOutboxRow::new(m, None))
            .returning(o::id)
            .get_result(conn)
    }
}

impl MigrateConnection for diesel::PgConnection {
    fn run_devour_migrations(&mut self) -> Result<Vec<String>, DbError> {
        self.run_pending_migrations(MIGRATIONS)
            .map(|applied| super::migration_names::<Pg>(&MIGRATIONS, &applied))
            .map_err(|e| DbError::Migrate {
                url: "PostgreSQL".into(),
                reason: e.to_string(),
            })
    }
}

/// Implements `ModelStore<Pg>` for a model (used by `#[derive(ProducerModel)]`).
#[doc(hidden)]
#[macro_export]
macro_rules! __model_store_postgres {
    ($model:ty, $table:expr, $conflict:expr) => {
        $crate::__model_store!($crate::__private::Pg, $model, $table, $conflict);
    };
}
