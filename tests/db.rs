//! devour's own pool: SQLite in WAL mode with a busy timeout, PostgreSQL pooled, migrations
//! through the pool, and errors that say whether retrying can help.

mod common;

use devour::config::{Config, Origin};
use devour::{DbConnection, DbPool};
use diesel::prelude::*;

fn config(url: &str) -> Config {
    Config::from_toml_str(
        &format!("[database]\nurl = \"{url}\"\nbusy_timeout_ms = 1234\npool_size = 2\nconnect_timeout_ms = 2000\n[kafka]\nhosts = \"127.0.0.1:19092\"\n"),
        Origin::Defaults,
        &Default::default(),
    )
    .unwrap()
}

#[derive(QueryableByName, Debug)]
struct Text {
    #[diesel(sql_type = diesel::sql_types::Text)]
    v: String,
}

#[derive(QueryableByName, Debug)]
struct Int {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    v: i64,
}

#[test]
fn sqlite_pool_connections_use_wal_and_the_busy_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("p.db").display());
    let pool = DbPool::connect(&config(&url).database).unwrap();
    let applied = pool.migrate().unwrap();
    assert!(
        applied.iter().any(|m| m.ends_with("_create_outbox")),
        "{applied:?}"
    );
    assert!(
        pool.migrate().unwrap().is_empty(),
        "second run applies nothing"
    );
    let DbConnection::Sqlite(mut c) = pool.get().unwrap() else {
        panic!("expected SQLite")
    };
    let mode: Text = diesel::sql_query("SELECT journal_mode AS v FROM pragma_journal_mode")
        .get_result(&mut *c)
        .unwrap();
    assert_eq!(mode.v, "wal");
    let busy: Int = diesel::sql_query("SELECT timeout AS v FROM pragma_busy_timeout")
        .get_result(&mut *c)
        .unwrap();
    assert_eq!(busy.v, 1234);
}

#[test]
fn postgres_pool_migrates_and_lists_pending_rows() {
    let db = common::TestDb::new(common::Backend::Postgres, "pool");
    let pool = DbPool::connect(&config(&db.url).database).unwrap();
    assert!(
        pool.migrate().unwrap().is_empty(),
        "TestDb already migrated"
    );
    let mut c = pool.get().unwrap();
    assert!(c.pending(10).unwrap().is_empty());
}

#[test]
fn unreachable_postgres_is_a_retriable_connect_error_without_the_password() {
    let err = DbPool::connect(&config("postgres://u:hunter2@127.0.0.1:1/x").database)
        .and_then(|p| p.get().map(|_| ()))
        .unwrap_err();
    assert!(err.is_retriable(), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("127.0.0.1:1") && !msg.contains("hunter2"),
        "{msg}"
    );
}

/// Relays and apps starting together on a fresh database all run the migrations: they take
/// turns, each migration is applied once, and none fails.
#[test]
fn migrations_started_at_once_on_a_fresh_postgres_database_all_succeed() {
    let name = format!("devour_t_{}", common::unique("migrate_race"));
    let admin_url = common::pg_admin_url();
    let mut admin = PgConnection::establish(&admin_url).unwrap();
    diesel::sql_query(format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .unwrap();
    let (server, _) = admin_url.rsplit_once('/').unwrap();
    let url = format!("{server}/{name}");
    let start = std::sync::Arc::new(std::sync::Barrier::new(4));
    let runners: Vec<_> = (0..4)
        .map(|_| {
            let (url, start) = (url.clone(), start.clone());
            std::thread::spawn(move || {
                let mut c = PgConnection::establish(&url).unwrap();
                start.wait();
                devour::run_migrations(&mut c).map_err(|e| e.to_string())
            })
        })
        .collect();
    let results: Vec<_> = runners.into_iter().map(|r| r.join().unwrap()).collect();
    diesel::sql_query(format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&mut admin)
        .unwrap();
    let applied: Vec<String> = results
        .iter()
        .flat_map(|r| {
            r.clone()
                .unwrap_or_else(|e| panic!("a runner failed: {e}; all: {results:?}"))
        })
        .collect();
    let distinct: std::collections::BTreeSet<&String> = applied.iter().collect();
    assert_eq!(distinct.len(), applied.len(), "applied twice: {applied:?}");
    assert!(
        applied.iter().any(|m| m.ends_with("_shard_range")),
        "{applied:?}"
    );
}
