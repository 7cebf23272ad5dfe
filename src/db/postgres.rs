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
        diesel::insert_into(o::devour_outbox)
            .values(NewOutboxRow::new(m))
            .returning(o::id)
            .get_result(conn)
    }

    fn insert_outbox_batch<C>(conn: &mut C, ms: &[OutboxMessage]) -> QueryResult<Vec<i64>>
    where
        C: LoadConnection<Backend = Pg>,
    {
        use devour_outbox::dsl as o;
        let mut ids = Vec::with_capacity(ms.len());
        for chunk in ms.chunks(super::BATCH_INSERT_ROWS) {
            let rows: Vec<NewOutboxRow> = chunk.iter().map(NewOutboxRow::new).collect();
            let returned: Vec<(i64, String)> = diesel::insert_into(o::devour_outbox)
                .values(&rows)
                .returning((o::id, o::message_id))
                .get_results(conn)?;
            ids.extend(super::ids_in_order(chunk, returned)?);
        }
        Ok(ids)
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
