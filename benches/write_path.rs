//! Write-path overhead: what writing the outbox row costs on top of saving a model.
//!
//! Run with `cargo bench --bench write_path`. For each backend (PostgreSQL and SQLite) and each
//! case, the variant *without* the outbox row (`SaveOptions::new().produce(false)`) and the
//! variant *with* it (`produce(true)`) run in the same process, interleaved round by round
//! (A/B, B/A, A/B, …); the table shows the median over rounds of the mean time per transaction.
//!
//! Cases:
//! - `single`: every transaction saves one new model row (an insert; `save` opens the transaction).
//! - `update`: every transaction saves one model row that already exists (insert-or-update path).
//! - `batch100`: every transaction (`conn.transaction`) saves 100 new model rows, one `save` each
//!   (each save is a savepoint; each writes its own outbox row).
//! - `save_all100`: every transaction saves 100 new model rows with `ProducerModel::save_all`,
//!   which writes their 100 outbox rows with one multi-row INSERT.
//!
//! Before every timed run the model table and the outbox are emptied (for both variants alike,
//! outside the timed part), so the outbox index stays small and every variant starts the same.
//!
//! Environment:
//! - `DEVOUR_BENCH_PG_URL`: PostgreSQL server URL (default
//!   `postgres://postgres:postgres@127.0.0.1:5432/postgres`); the bench creates and drops its own
//!   database `devour_bench_<pid>`.
//! - `DEVOUR_BENCH_BACKENDS`: `postgres,sqlite` (default both); positional arguments
//!   (`cargo bench --bench write_path -- sqlite`) win over it.
//! - `DEVOUR_BENCH_TXNS`: transactions per variant of `single` and `update`, split across rounds
//!   (default 10000).
//! - `DEVOUR_BENCH_BATCH_TXNS`: transactions of 100 saves per variant of `batch100`, split
//!   across rounds (default 500).
//! - `DEVOUR_BENCH_ROUNDS`: rounds (default 5).
//! - `DEVOUR_BENCH_SQLITE_SYNCHRONOUS`: sets SQLite's `PRAGMA synchronous` (default: SQLite's
//!   own, FULL), e.g. `OFF` to see the CPU cost without the commit's fsync.

#[path = "common/mod.rs"]
mod common;
use common::{env_usize, PgDb};
use std::hint::black_box;
use std::time::{Duration, Instant};

use devour::outbox::OutboxBackend;
use devour::prelude::*;
use devour::ProduceError;
use diesel::connection::{LoadConnection, SimpleConnection};
use diesel::prelude::*;
use serde::Serialize;

diesel::table! {
    items (id) {
        id -> BigInt,
        name -> Text,
        qty -> Integer,
    }
}

/// The benchmark's model: topic `items`, keyed by id.
#[derive(
    Debug,
    Clone,
    Queryable,
    Selectable,
    Insertable,
    AsChangeset,
    Identifiable,
    Serialize,
    ProducerModel,
)]
#[diesel(table_name = items)]
#[devour(topic = "items", partition_key = "id")]
struct Item {
    id: i64,
    name: String,
    qty: i32,
}

impl Item {
    fn new(id: i64) -> Item {
        Item {
            id,
            name: format!("item number {id}"),
            qty: (id % 1000) as i32,
        }
    }
}

const ITEMS_SQL: &str =
    "CREATE TABLE items (id BIGINT PRIMARY KEY, name TEXT NOT NULL, qty INTEGER NOT NULL);";
const BATCH: usize = 100;

struct Params {
    txns: usize,
    batch_txns: usize,
    rounds: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Postgres => "postgres",
            Backend::Sqlite => "sqlite",
        }
    }
}

fn backends() -> Vec<Backend> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let list = if args.is_empty() {
        std::env::var("DEVOUR_BENCH_BACKENDS").unwrap_or_else(|_| "postgres,sqlite".into())
    } else {
        args.join(",")
    };
    let mut out = Vec::new();
    for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let b = match name.to_ascii_lowercase().as_str() {
            "postgres" | "postgresql" | "pg" => Backend::Postgres,
            "sqlite" => Backend::Sqlite,
            other => panic!("unknown backend `{other}` (expected postgres or sqlite)"),
        };
        if !out.contains(&b) {
            out.push(b);
        }
    }
    out
}

/// One line of the result table.
struct Line {
    backend: &'static str,
    case: &'static str,
    without: Vec<f64>,
    with: Vec<f64>,
    target: Option<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Hands out ids never used before in this process, so every save of a new item is an insert.
struct Ids(i64);

impl Ids {
    fn take(&mut self, n: usize) -> std::ops::Range<i64> {
        let start = self.0;
        self.0 += n as i64;
        start..self.0
    }
}

/// The cases, run on one connection of either backend. `reset` empties the model table and
/// the outbox.
fn run_cases<C>(conn: &mut C, backend: Backend, reset: &str, p: &Params, ids: &mut Ids) -> Vec<Line>
where
    C: LoadConnection,
    C::Backend: OutboxBackend,
    Item: ModelStore<C::Backend>,
{
    let per_round = p.txns.div_ceil(p.rounds);
    let batch_per_round = p.batch_txns.div_ceil(p.rounds);

    let single = |conn: &mut C, ids: &mut Ids, produce: bool| -> Duration {
        let items: Vec<Item> = ids.take(per_round).map(Item::new).collect();
        let t = Instant::now();
        for item in &items {
            black_box(
                item.save(conn, SaveOptions::new().produce(produce))
                    .expect("save"),
            );
        }
        t.elapsed()
    };
    let update = |conn: &mut C, ids: &mut Ids, produce: bool| -> Duration {
        // The rows exist before the timed part (written without outbox rows, in one transaction).
        let mut items: Vec<Item> = ids.take(per_round).map(Item::new).collect();
        conn.transaction::<_, ProduceError, _>(|c| {
            for item in &items {
                item.save(c, SaveOptions::new().produce(false))?;
            }
            Ok(())
        })
        .expect("pre-insert");
        for item in &mut items {
            item.qty += 1;
        }
        let t = Instant::now();
        for item in &items {
            let saved = item
                .save(conn, SaveOptions::new().produce(produce))
                .expect("save");
            debug_assert_eq!(saved.event, Event::Update);
            black_box(saved);
        }
        t.elapsed()
    };
    let batch = |conn: &mut C, ids: &mut Ids, produce: bool| -> Duration {
        let txns: Vec<Vec<Item>> = (0..batch_per_round)
            .map(|_| ids.take(BATCH).map(Item::new).collect())
            .collect();
        let t = Instant::now();
        for txn in &txns {
            conn.transaction::<_, ProduceError, _>(|c| {
                for item in txn {
                    black_box(item.save(c, SaveOptions::new().produce(produce))?);
                }
                Ok(())
            })
            .expect("batch transaction");
        }
        t.elapsed()
    };

    let save_all = |conn: &mut C, ids: &mut Ids, produce: bool| -> Duration {
        let txns: Vec<Vec<Item>> = (0..batch_per_round)
            .map(|_| ids.take(BATCH).map(Item::new).collect())
            .collect();
        let t = Instant::now();
        for txn in &txns {
            black_box(
                Item::save_all(conn, txn, SaveOptions::new().produce(produce)).expect("save_all"),
            );
        }
        t.elapsed()
    };

    let mut lines = Vec::new();
    type Run<'a, C> = &'a dyn Fn(&mut C, &mut Ids, bool) -> Duration;
    let cases: [(&'static str, Run<'_, C>, usize, Option<f64>); 4] = [
        ("single", &single, per_round, Some(1.3)),
        ("update", &update, per_round, None),
        ("batch100", &batch, batch_per_round, Some(1.5)),
        ("save_all100", &save_all, batch_per_round, Some(1.5)),
    ];
    for (case, run, txns_per_round, target) in cases {
        // Warm-up (not counted): prepared statements, caches, the first pages of the tables.
        for produce in [false, true] {
            conn.batch_execute(reset).expect("reset");
            run(conn, ids, produce);
        }
        let mut without = Vec::new();
        let mut with = Vec::new();
        for round in 0..p.rounds {
            // A/B in even rounds, B/A in odd ones, so drift hits both variants alike.
            let order = if round % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for produce in order {
                conn.batch_execute(reset).expect("reset");
                let elapsed = run(conn, ids, produce);
                let us = elapsed.as_secs_f64() * 1e6 / txns_per_round as f64;
                if produce {
                    with.push(us);
                } else {
                    without.push(us);
                }
            }
        }
        eprintln!(
            "  {:<8} {:<8} without {:?} with {:?} (µs/txn per round)",
            backend.name(),
            case,
            without.iter().map(|v| v.round() as i64).collect::<Vec<_>>(),
            with.iter().map(|v| v.round() as i64).collect::<Vec<_>>(),
        );
        lines.push(Line {
            backend: backend.name(),
            case,
            without,
            with,
            target,
        });
    }
    conn.batch_execute(reset).expect("reset");
    lines
}

// ---------------------------------------------------------------------------------------------
// Setup and report.

#[derive(QueryableByName)]
struct Setting {
    #[diesel(sql_type = diesel::sql_types::Text)]
    value: String,
}

fn setting<C>(conn: &mut C, sql: &str) -> String
where
    C: LoadConnection,
    diesel::query_builder::SqlQuery: diesel::query_dsl::LoadQuery<'static, C, Setting>,
{
    diesel::sql_query(sql)
        .get_result::<Setting>(conn)
        .map(|s| s.value)
        .unwrap_or_else(|e| format!("? ({e})"))
}

fn bench_postgres(p: &Params, ids: &mut Ids, notes: &mut Vec<String>) -> Vec<Line> {
    let db = PgDb::create("devour_bench");
    let mut conn = PgConnection::establish(&db.url).expect("connect");
    devour::run_migrations(&mut conn).expect("migrations");
    conn.batch_execute(ITEMS_SQL).expect("items table");
    notes.push(format!(
        "postgres: {}; database {}; synchronous_commit={}, fsync={}, wal_sync_method={}",
        setting(
            &mut conn,
            "SELECT split_part(version(), ' on ', 1) AS value"
        ),
        db.name,
        setting(
            &mut conn,
            "SELECT current_setting('synchronous_commit') AS value"
        ),
        setting(&mut conn, "SELECT current_setting('fsync') AS value"),
        setting(
            &mut conn,
            "SELECT current_setting('wal_sync_method') AS value"
        ),
    ));
    let lines = run_cases(
        &mut conn,
        Backend::Postgres,
        "TRUNCATE items, devour_outbox",
        p,
        ids,
    );
    drop(conn);
    drop(db);
    lines
}

fn bench_sqlite(p: &Params, ids: &mut Ids, notes: &mut Vec<String>) -> Vec<Line> {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bench.db");
    let mut conn = SqliteConnection::establish(path.to_str().expect("UTF-8 path")).expect("open");
    devour::db::sqlite::configure(&mut conn, 5000).expect("configure");
    if let Ok(sync) = std::env::var("DEVOUR_BENCH_SQLITE_SYNCHRONOUS") {
        conn.batch_execute(&format!("PRAGMA synchronous = {sync}"))
            .expect("synchronous");
    }
    devour::run_migrations(&mut conn).expect("migrations");
    conn.batch_execute(ITEMS_SQL).expect("items table");
    notes.push(format!(
        "sqlite: {}; file {}; journal_mode={}, synchronous={} (0 off, 1 normal, 2 full)",
        setting(&mut conn, "SELECT 'SQLite ' || sqlite_version() AS value"),
        path.display(),
        setting(
            &mut conn,
            "SELECT journal_mode AS value FROM pragma_journal_mode"
        ),
        setting(
            &mut conn,
            "SELECT CAST(synchronous AS TEXT) AS value FROM pragma_synchronous"
        ),
    ));
    run_cases(
        &mut conn,
        Backend::Sqlite,
        "DELETE FROM items; DELETE FROM devour_outbox;",
        p,
        ids,
    )
}

fn main() {
    let p = Params {
        txns: env_usize("DEVOUR_BENCH_TXNS", 10_000).max(1),
        batch_txns: env_usize("DEVOUR_BENCH_BATCH_TXNS", 500).max(1),
        rounds: env_usize("DEVOUR_BENCH_ROUNDS", 5).max(1),
    };
    let backends = backends();
    let per_round = p.txns.div_ceil(p.rounds);
    let batch_per_round = p.batch_txns.div_ceil(p.rounds);
    println!("# devour write-path benchmark");
    println!();
    println!(
        "- backends: {}",
        backends
            .iter()
            .map(|b| b.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "- rounds: {} (variants interleaved A/B, B/A, …; one warm-up run per variant first, not counted)",
        p.rounds
    );
    println!(
        "- single, update: N = {} transactions per variant ({} per round), 1 save per transaction",
        per_round * p.rounds,
        per_round
    );
    println!(
        "- batch100: {} transactions per variant ({} per round), {BATCH} saves per transaction",
        batch_per_round * p.rounds,
        batch_per_round
    );
    println!("- model and outbox tables emptied before every timed run (untimed, both variants)");
    println!("- figures: median over rounds of the mean µs per transaction");

    let mut ids = Ids(1);
    let mut notes = Vec::new();
    let mut lines = Vec::new();
    let started = Instant::now();
    for b in &backends {
        eprintln!("running {} …", b.name());
        let l = match b {
            Backend::Postgres => bench_postgres(&p, &mut ids, &mut notes),
            Backend::Sqlite => bench_sqlite(&p, &mut ids, &mut notes),
        };
        lines.extend(l);
    }
    for n in &notes {
        println!("- {n}");
    }
    println!();
    println!("| backend | case | without (µs/txn) | with (µs/txn) | ratio | target |");
    println!("|---|---|---:|---:|---:|---|");
    for l in &lines {
        let (wo, w) = (median(&l.without), median(&l.with));
        let ratio = w / wo;
        let target = match l.target {
            Some(t) if ratio <= t => format!("≤ {t:.1}× ok"),
            Some(t) => format!("≤ {t:.1}× MISSED"),
            None => "-".into(),
        };
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.2}× | {} |",
            l.backend, l.case, wo, w, ratio, target
        );
    }
    println!();
    println!("total time: {:.1} s", started.elapsed().as_secs_f64());
}
