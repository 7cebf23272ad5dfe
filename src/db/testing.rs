//! Databases for unit tests: a configuration with devour's tables created, and a fresh
//! PostgreSQL database dropped afterwards.

use diesel::Connection;

/// A configuration for the database at `url`, with devour's tables created there.
pub(crate) fn migrated_config(url: &str) -> crate::Config {
    let config = crate::Config::from_toml_str(
        &format!("[database]\nurl = \"{url}\"\n[kafka]\nhosts = \"127.0.0.1:9\"\n"),
        crate::config::Origin::Defaults,
        &Default::default(),
    )
    .unwrap();
    crate::db::DbPool::connect(&config.database)
        .unwrap()
        .migrate()
        .unwrap();
    config
}

/// Runs `f` with the URL of a fresh PostgreSQL database (dropped afterwards).
#[cfg(feature = "postgres")]
pub(crate) fn in_pg_database(what: &str, f: impl FnOnce(&str) + std::panic::UnwindSafe) {
    let admin = std::env::var("DEVOUR_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".into());
    let name = format!("devour_u_{what}_{}", std::process::id());
    let mut c = diesel::PgConnection::establish(&admin).unwrap();
    use diesel::connection::SimpleConnection;
    c.batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
        .unwrap();
    c.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
    let (base, _) = admin.rsplit_once('/').unwrap();
    let url = format!("{base}/{name}");
    let result = std::panic::catch_unwind(|| f(&url));
    c.batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .unwrap();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
