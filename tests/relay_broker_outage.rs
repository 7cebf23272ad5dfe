//! The broker goes away for 20 seconds in the middle of a drain: the relay waits it out, loses
//! nothing, keeps per-key order, and is still running afterwards. Uses a broker of its own.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Backend, TestConn, TestDb};
use devour::relay::{self, RunOptions};
use diesel::prelude::*;

struct Broker {
    dir: tempfile::TempDir,
    port: u16,
}

impl Broker {
    fn script(&self, name: &str, args: &[&str]) -> String {
        let out = Command::new(
            concat!(env!("CARGO_MANIFEST_DIR"), "/bin/", "kafka-start")
                .replace("kafka-start", name),
        )
        .args(args)
        .env("DEVOUR_KAFKA_DIR", self.dir.path())
        .env("DEVOUR_KAFKA_PORT", self.port.to_string())
        .env("DEVOUR_KAFKA_CONTROLLER_PORT", (self.port + 1).to_string())
        .output()
        .unwrap();
        assert!(
            out.status.success(),
            "bin/{name} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .to_string()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/bin/kafka-stop"))
            .env("DEVOUR_KAFKA_DIR", self.dir.path())
            .env("DEVOUR_KAFKA_PORT", self.port.to_string())
            .env("DEVOUR_KAFKA_CONTROLLER_PORT", (self.port + 1).to_string())
            .output();
    }
}

#[test]
fn broker_down_for_20_seconds_mid_drain() {
    let broker = Broker {
        dir: tempfile::tempdir().unwrap(),
        port: std::env::var("DEVOUR_TEST_OUTAGE_PORT")
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(19292),
    };
    let hosts = broker.script("kafka-start", &[]);
    let db = TestDb::new(Backend::Postgres, "broker_outage");
    let topic = common::unique("outage").replace('_', "-");
    broker.script(
        "kafka-topics",
        &["--create", "--topic", &topic, "--partitions", "3"],
    );

    let mut config = common::config(&db, "");
    config.kafka.hosts = vec![hosts.clone()];
    let handle = relay::start(&config, RunOptions::default()).unwrap();
    let mut c = PgConnection::establish(&db.url).unwrap();
    // Rows keep coming through the outage.
    common::insert_rows(&mut c, &topic, 0, 20_000, 100);
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.count("devour_outbox") > 15_000 {
        assert!(Instant::now() < deadline, "no progress before the outage");
        std::thread::sleep(Duration::from_millis(5));
    }
    broker.script("kafka-stop", &[]);
    let stopped_at = Instant::now();
    let mut next = 20_000;
    while stopped_at.elapsed() < Duration::from_secs(20) {
        common::insert_rows(&mut c, &topic, next, 500, 100);
        next += 500;
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(
        !handle.is_finished(),
        "the relay keeps running while the broker is down"
    );
    let left_during_outage = c.count("devour_outbox");
    assert!(left_during_outage > 0, "rows wait while the broker is down");
    broker.script("kafka-start", &[]);
    let deadline = Instant::now() + Duration::from_secs(120);
    while c.count("devour_outbox") > 0 {
        assert!(
            Instant::now() < deadline,
            "the relay did not catch up after the outage"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!handle.is_finished(), "the relay is still up");
    handle.shutdown();
    let report = handle.join().unwrap();

    std::env::set_var("DEVOUR_TEST_KAFKA", &hosts);
    let msgs = common::consume_seqs(&topic, next as usize, Duration::from_secs(120));
    let dups = common::check_delivery(&msgs, 0..next);
    println!(
        "{next} rows, {left_during_outage} waiting during the outage; {} read, {dups} duplicates; report {report:?}",
        msgs.len()
    );
}
