//! Shared by the benchmarks: a PostgreSQL database of their own, and numeric settings from the
//! environment.

use diesel::connection::SimpleConnection;
use diesel::prelude::*;

/// Creates the benchmark's PostgreSQL database and drops it (`WITH (FORCE)`) when dropped.
pub struct PgDb {
    admin_url: String,
    pub name: String,
    pub url: String,
}

impl PgDb {
    /// Creates `PREFIX_<pid>` on the server of `DEVOUR_BENCH_PG_URL`.
    pub fn create(prefix: &str) -> PgDb {
        let admin_url = std::env::var("DEVOUR_BENCH_PG_URL")
            .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".into());
        let name = format!("{prefix}_{}", std::process::id());
        let mut admin = PgConnection::establish(&admin_url)
            .unwrap_or_else(|e| panic!("PostgreSQL at {admin_url}: {e}"));
        // Two statements: DROP/CREATE DATABASE cannot run in the implicit transaction of one.
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .expect("drop stale database");
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("create database");
        // Keep the URL's parameters (e.g. `?sslmode=disable`).
        let (base, query) = match admin_url.split_once('?') {
            Some((b, q)) => (b, format!("?{q}")),
            None => (admin_url.as_str(), String::new()),
        };
        let (server, _) = base.rsplit_once('/').expect("URL names a database");
        let url = format!("{server}/{name}{query}");
        PgDb {
            admin_url,
            name,
            url,
        }
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        match PgConnection::establish(&self.admin_url) {
            Ok(mut admin) => {
                if let Err(e) = admin.batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.name
                )) {
                    eprintln!("could not drop database {}: {e}", self.name);
                }
            }
            Err(e) => eprintln!("could not drop database {}: {e}", self.name),
        }
    }
}

/// The number in environment variable `name` (`_` allowed as a separator), else `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}
