//! PostgreSQL restarts in the middle of a drain: the relay reconnects and loses nothing.
//! Restarts the shared test cluster (`pg_ctlcluster`), so it sits alone in this test binary.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Backend, TestConn, TestDb};
use devour::relay::{self, RunOptions};
use diesel::prelude::*;

fn count_when_up(url: &str) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(mut c) = PgConnection::establish(url) {
            if let Ok(r) = diesel::sql_query("SELECT count(*) AS n FROM devour_outbox")
                .get_result::<common::CountRow>(&mut c)
            {
                return r.n;
            }
        }
        assert!(Instant::now() < deadline, "PostgreSQL did not come back");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// When the server last started, as text.
fn postmaster_start(c: &mut PgConnection) -> String {
    #[derive(QueryableByName)]
    struct Started {
        #[diesel(sql_type = diesel::sql_types::Text)]
        at: String,
    }
    diesel::sql_query("SELECT pg_postmaster_start_time()::text AS at")
        .get_result::<Started>(c)
        .unwrap()
        .at
}

#[test]
fn postgres_restart_mid_drain() {
    let db = TestDb::new(Backend::Postgres, "pg_restart");
    let topic = common::create_topic("pgrestart", 3);
    let mut c = PgConnection::establish(&db.url).unwrap();
    common::insert_rows(&mut c, &topic, 0, 30_000, 100);
    let mut config = common::config(&db, "");
    // Slow the relay down so that the restart lands mid-drain.
    config.relay.batch_size = 20;
    config.relay.max_in_flight = 20;
    let handle = relay::start(&config, RunOptions::default()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.count("devour_outbox") > 29_000 {
        assert!(Instant::now() < deadline, "no progress before the restart");
        std::thread::sleep(Duration::from_millis(5));
    }
    let started_before = postmaster_start(&mut c);
    drop(c);
    let version = std::env::var("DEVOUR_PG_VERSION").unwrap_or_else(|_| "15".into());
    let out = Command::new("pg_ctlcluster")
        .args([version.as_str(), "main", "restart"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pg_ctlcluster restart: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let left_after_restart = count_when_up(&db.url);
    let started_after = postmaster_start(&mut PgConnection::establish(&db.url).unwrap());
    assert_ne!(
        started_before, started_after,
        "pg_ctlcluster restarted the server the test uses ({})",
        db.url
    );
    assert!(
        left_after_restart > 0,
        "the restart came before the drain ended"
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while count_when_up(&db.url) > 0 {
        assert!(
            Instant::now() < deadline,
            "the relay did not finish after the restart"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!handle.is_finished(), "the relay survived the restart");
    handle.shutdown();
    let report = handle.join().unwrap();
    let msgs = common::consume_seqs(&topic, 30_000, Duration::from_secs(120));
    let dups = common::check_delivery(&msgs, 0..30_000);
    println!(
        "{left_after_restart} rows left after the restart; {} read, {dups} duplicates; {report:?}",
        msgs.len()
    );
}
