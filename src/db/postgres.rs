//! PostgreSQL specifics: migrations, the outbox insert, and model persistence.

use diesel::connection::LoadConnection;
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use super::{devour_outbox, DbError, MigrateConnection, NewOutboxRow};
use crate::outbox::{OutboxBackend, OutboxMessage};

/// libpq settings every devour connection gets unless its URL sets them: a server that
/// vanishes without closing its connections (a failover, a network partition) is noticed in
/// about half a minute instead of the kernel's hours, so the relay and the consumers fail over
/// and reconnect instead of waiting in a socket read.
const CLIENT_TIMEOUTS: [(&str, &str); 5] = [
    ("connect_timeout", "10"),
    ("keepalives_idle", "15"),
    ("keepalives_interval", "5"),
    ("keepalives_count", "3"),
    ("tcp_user_timeout", "30000"),
];

/// `url` (a `postgres://` URL, as `database.url` must be) with [`CLIENT_TIMEOUTS`] added as
/// query parameters where it does not set them (nor `PGCONNECT_TIMEOUT` the connect timeout).
pub(crate) fn with_client_timeouts(url: &str) -> String {
    // A `?` in the user info (a password) does not start the query.
    let mut query = crate::config::split_userinfo(url).1.contains('?');
    let mut out = url.trim_end().to_string();
    for (k, v) in CLIENT_TIMEOUTS {
        if url.contains(&format!("{k}="))
            || (k == "connect_timeout" && std::env::var_os("PGCONNECT_TIMEOUT").is_some())
        {
            continue;
        }
        out.push(if query { '&' } else { '?' });
        query = true;
        out.push_str(&format!("{k}={v}"));
    }
    out
}

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

/// Key of the advisory lock held while devour's migrations run ("devour" in ASCII).
const MIGRATION_LOCK: i64 = 0x6465_766f_7572;

impl MigrateConnection for diesel::PgConnection {
    /// Under an advisory lock: relays and apps starting at once on a fresh database take turns
    /// (Diesel takes none), and the later ones find the migrations applied instead of failing
    /// on `CREATE FUNCTION`.
    fn run_devour_migrations(&mut self) -> Result<Vec<String>, DbError> {
        let err = |reason: String| DbError::Migrate {
            url: "PostgreSQL".into(),
            reason,
        };
        let lock = |c: &mut Self, f: &str| {
            diesel::sql_query(format!("SELECT {f}({MIGRATION_LOCK})"))
                .execute(c)
                .map_err(|e| err(e.to_string()))
        };
        lock(self, "pg_advisory_lock")?;
        let applied = self
            .run_pending_migrations(MIGRATIONS)
            .map(|applied| super::migration_names::<Pg>(&MIGRATIONS, &applied))
            .map_err(|e| err(e.to_string()));
        let unlocked = lock(self, "pg_advisory_unlock");
        let applied = applied?;
        unlocked?;
        Ok(applied)
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

/// Whether a connection error is one that trying again will not mend: the server answered and
/// refused these credentials, this database or this client.
pub(crate) fn refused_for_good(reason: &str) -> bool {
    [
        "password authentication failed",
        "authentication failed for user",
        "no pg_hba.conf entry",
        "does not exist",
        "invalid connection option",
        "invalid URI",
        "is not permitted to log in",
    ]
    .iter()
    .any(|s| reason.contains(s))
}

#[cfg(test)]
mod tests {
    use super::with_client_timeouts;

    #[test]
    fn client_timeouts_are_added_unless_set() {
        assert_eq!(
            with_client_timeouts("postgres://u:p@h/db"),
            "postgres://u:p@h/db?connect_timeout=10&keepalives_idle=15&keepalives_interval=5\
             &keepalives_count=3&tcp_user_timeout=30000"
        );
        assert_eq!(
            with_client_timeouts("postgresql://h/db?sslmode=require&connect_timeout=3&keepalives_idle=60&keepalives_interval=1&keepalives_count=9"),
            "postgresql://h/db?sslmode=require&connect_timeout=3&keepalives_idle=60&keepalives_interval=1&keepalives_count=9&tcp_user_timeout=30000"
        );
        assert_eq!(
            with_client_timeouts("postgres://u:p?w@h/db"),
            "postgres://u:p?w@h/db?connect_timeout=10&keepalives_idle=15&keepalives_interval=5\
             &keepalives_count=3&tcp_user_timeout=30000"
        );
    }
}
