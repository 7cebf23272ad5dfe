//! The relay through crashes: `kill -9` at random moments, and three relays sharing one
//! PostgreSQL database while one of them dies and comes back. Nothing is lost; the first
//! delivery of every message keeps its key's order; duplicates are counted.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Backend, TestConn, TestDb};
use diesel::prelude::*;

/// A `devour-relay` child on `db`; its stderr goes to `log`.
fn relay_process(db: &TestDb, log: &Path, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_devour-relay"))
        .args(extra)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DEVOUR_DATABASE_URL", &db.url)
        .env("DEVOUR_KAFKA_HOSTS", common::kafka_hosts())
        .env("DEVOUR_RELAY_LEASE_TTL_MS", "2000")
        .env("DEVOUR_RELAY_POLL_INTERVAL_MS", "50")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(common::append_to(log))
        .spawn()
        .unwrap()
}

#[test]
fn kill_9_ten_times_during_a_50k_drain_loses_nothing_and_keeps_key_order() {
    let db = TestDb::new(Backend::Postgres, "kill9");
    let topic = common::create_topic("kill9", 6);
    let mut c = PgConnection::establish(&db.url).unwrap();
    common::insert_rows(&mut c, &topic, 0, 50_000, 500);
    let log = common::child_log("kill9");
    let mut left = vec![50_000];
    for _ in 0..10 {
        let mut relay = relay_process(&db, &log, &[]);
        // Kill at a random point of the drain: after 300 to 3,000 more rows were delivered.
        let target = left.last().unwrap() - common::random(300, 3_000);
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.count("devour_outbox") > target && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        relay.kill().unwrap(); // SIGKILL
        common::wait_exit(&mut relay, Duration::from_secs(10), "a killed relay", &log);
        left.push(c.count("devour_outbox"));
    }
    let mut last = relay_process(&db, &log, &["--drain"]);
    common::wait_success(
        &mut last,
        Duration::from_secs(120),
        "the final drain exits 0",
        &log,
    );
    assert_eq!(c.count("devour_outbox"), 0, "drained");
    let msgs = common::consume_seqs(&topic, 50_000, Duration::from_secs(120));
    let dups = common::check_delivery(&msgs, 0..50_000);
    println!(
        "rows left after each kill: {left:?}; {} messages read, {dups} duplicates",
        msgs.len()
    );
    assert!(
        left.windows(2).all(|w| w[1] < w[0]),
        "every relay was killed mid-drain: {left:?}"
    );
}

#[derive(QueryableByName, Debug, Clone, PartialEq)]
struct Lease {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    shard: i32,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    owner: Option<String>,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    epoch: i64,
}

#[test]
fn three_relays_share_the_work_and_survive_one_being_killed() {
    let db = TestDb::new(Backend::Postgres, "three");
    let topic = common::create_topic("three", 6);
    let mut c = PgConnection::establish(&db.url).unwrap();
    // Rows keep coming for 6 s (200 every 20 ms), so the relays are busy throughout.
    let writer = {
        let (url, topic) = (db.url.clone(), topic.clone());
        std::thread::spawn(move || {
            let mut w = PgConnection::establish(&url).unwrap();
            let mut next = 0;
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(6) {
                common::insert_rows(&mut w, &topic, next, 200, 300);
                next += 200;
                std::thread::sleep(Duration::from_millis(20));
            }
            next
        })
    };
    let log = common::child_log("three");
    let mut relays: Vec<Child> = (0..3).map(|_| relay_process(&db, &log, &[])).collect();

    // Sample the leases while the relays run: an owner change always comes with a new epoch.
    let mut samples: Vec<Vec<Lease>> = Vec::new();
    let mut owners_seen = std::collections::BTreeSet::new();
    let sample = |c: &mut PgConnection,
                  samples: &mut Vec<Vec<Lease>>,
                  owners: &mut std::collections::BTreeSet<String>| {
        let l: Vec<Lease> = diesel::sql_query(
            "SELECT shard, CASE WHEN expires_at > now() THEN owner END AS owner, epoch FROM devour_relay_leases ORDER BY shard",
        )
        .load(c)
        .unwrap();
        owners.extend(l.iter().filter_map(|x| x.owner.clone()));
        samples.push(l);
    };
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(2000) {
        sample(&mut c, &mut samples, &mut owners_seen);
        std::thread::sleep(Duration::from_millis(50));
    }
    // Kill one relay mid-drain, then bring it back.
    relays[1].kill().unwrap();
    common::wait_exit(
        &mut relays[1],
        Duration::from_secs(10),
        "the killed relay",
        &log,
    );
    let killed_at = Instant::now();
    while killed_at.elapsed() < Duration::from_secs(3) {
        sample(&mut c, &mut samples, &mut owners_seen);
        std::thread::sleep(Duration::from_millis(50));
    }
    relays[1] = relay_process(&db, &log, &[]);
    let written = writer.join().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while c.count("devour_outbox") > 0 {
        assert!(
            Instant::now() < deadline,
            "the relays did not drain the outbox\n{}",
            common::log_tail(&log)
        );
        sample(&mut c, &mut samples, &mut owners_seen);
        std::thread::sleep(Duration::from_millis(50));
    }
    for r in &relays {
        // SIGTERM: a clean stop releases the leases.
        common::sigterm(r);
    }
    for r in &mut relays {
        common::wait_success(
            r,
            Duration::from_secs(60),
            "relay stopped cleanly on SIGTERM",
            &log,
        );
    }
    let msgs = common::consume_seqs(&topic, written as usize, Duration::from_secs(120));
    let dups = common::check_delivery(&msgs, 0..written);
    println!(
        "{} messages read, {dups} duplicates, {} relay ids held leases",
        msgs.len(),
        owners_seen.len()
    );
    assert!(
        owners_seen.len() >= 3,
        "several relays held shards: {owners_seen:?}"
    );
    for pair in samples.windows(2) {
        for (a, b) in pair[0].iter().zip(&pair[1]) {
            assert!(b.epoch >= a.epoch, "shard {}: epoch went back", a.shard);
        }
    }
    // Per shard, each holder after another (across samples where nobody held it: an expired
    // lease, or one let go) holds it under a newer epoch.
    let mut last: BTreeMap<i32, (String, i64)> = BTreeMap::new();
    let mut changes = 0;
    for l in samples.iter().flatten() {
        let Some(owner) = &l.owner else { continue };
        if let Some((before, epoch)) = last.get(&l.shard) {
            if before != owner {
                changes += 1;
                assert!(
                    l.epoch > *epoch,
                    "shard {} went from {before} (epoch {epoch}) to {owner} (epoch {}) without a new epoch",
                    l.shard,
                    l.epoch
                );
            }
        }
        last.insert(l.shard, (owner.clone(), l.epoch));
    }
    assert!(
        changes > 0,
        "no shard changed holder while sampled (the killed relay's shards should have)"
    );
    let held: i64 =
        diesel::sql_query("SELECT count(*) AS n FROM devour_relay_leases WHERE owner IS NOT NULL")
            .get_result::<common::CountRow>(&mut c)
            .unwrap()
            .n;
    assert_eq!(held, 0, "stopped relays released their leases");
}
