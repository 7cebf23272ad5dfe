//! The examples do what their docs say: `examples/python_outbox.py` writes a row the relay
//! delivers, and `examples/consumer.rs` (a user binary with its own `Registry`) counts each order
//! once through the inbox.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::consume::{produce, read_all, rewind, Out};
use common::{create_topic, Backend, TestDb};
use diesel::prelude::*;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn python_example_writes_a_row_the_relay_delivers() {
    let db = TestDb::new(Backend::Sqlite, "example_python");
    let topic = create_topic("example-python", 3);
    let out = Command::new("python3")
        .arg(repo().join("examples/python_outbox.py"))
        .args([db.diesel_url(), &topic, "42", "paid"])
        .output()
        .expect("python3 runs (.ci/run installs it)");
    assert!(out.status.success(), "{out:?}");
    #[derive(QueryableByName)]
    struct Shard {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        shard: i32,
    }
    let mut c = SqliteConnection::establish(db.diesel_url()).unwrap();
    let s: Shard = diesel::sql_query("SELECT shard FROM devour_outbox")
        .get_result(&mut c)
        .unwrap();
    assert_eq!(
        s.shard,
        devour::outbox::shard_for_key("42"),
        "Python's murmur2 shard = Rust's"
    );
    let report = common::relay_drain(&common::config(&db, ""));
    assert_eq!(report.delivered, 1);
    let got = read_all(&topic, Duration::from_secs(30));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].key.as_deref(), Some("42"));
    assert_eq!(
        got[0].partition,
        devour::outbox::partition_for_key(b"42", 3)
    );
    let v: serde_json::Value = serde_json::from_slice(got[0].payload.as_deref().unwrap()).unwrap();
    assert_eq!(v, serde_json::json!({"id": 42, "status": "paid"}));
    assert!(
        got[0].headers.contains(&("source".into(), "python".into())),
        "{:?}",
        got[0].headers
    );
    assert!(got[0].headers.contains(&("event".into(), "update".into())));
}

/// Builds `examples/consumer.rs` (cargo test builds examples, but not for `--test examples`).
fn consumer_example() -> std::path::PathBuf {
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--example", "consumer"])
        .current_dir(repo())
        .status()
        .unwrap();
    assert!(status.success());
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| repo().join("target"));
    target.join("debug/examples/consumer")
}

#[test]
fn consumer_example_counts_each_order_once() {
    let bin = consumer_example();
    let db = TestDb::new(Backend::Sqlite, "example_consumer");
    let topic = create_topic("example-orders", 2);
    let order = |id: i64, customer: i64, cents: i64, event: &str| {
        format!(
            r#"{{"id":{id},"customer_id":{customer},"total_cents":{cents},"status":"placed","event":"{event}"}}"#
        )
    };
    let (o1, o2, o3, bad) = (
        order(1, 7, 1000, "create"),
        order(2, 7, 250, "create"),
        order(3, 8, 99, "create"),
        order(4, 8, -5, "create"),
    );
    // Order 1 changes (1000 → 1200), order 5 comes and goes: each order counts once, as it is.
    let (o1b, o5, o5d) = (
        order(1, 7, 1200, "update"),
        order(5, 8, 500, "create"),
        order(5, 8, 500, "delete"),
    );
    let msg = |body: &str, id: &'static str| Out {
        key: Some("7"),
        payload: Some(body.as_bytes().to_vec()),
        headers: vec![("message-id", id), ("event", "create")],
    };
    // o2 twice with one message-id, as a relay that crashed after the ack would send it.
    produce(
        &topic,
        &[
            msg(&o1, "m1"),
            msg(&o2, "m2"),
            msg(&o3, "m3"),
            msg(&o2, "m2"),
            msg(&bad, "m4"),
            msg(&o1b, "m5"),
            msg(&o5, "m6"),
            msg(&o5d, "m7"),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let group = common::unique("totals");
    std::fs::write(
        dir.path().join("devour.toml"),
        format!(
            "[database]\nurl = \"{}\"\n[kafka]\nhosts = \"{}\"\n[consumers.totals]\ntopic = \"{topic}\"\ngroup = \"{group}\"\nhandler = \"order-totals\"\ndump = \"obj\"\ninbox = true\n",
            db.url,
            common::kafka_hosts()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(&bin)
            .args(args)
            .env("DEVOUR_CONFIG", dir.path().join("devour.toml"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "consumer {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    run(&["migrate"]);
    let log = run(&["consume", "totals", "--drain"]);
    assert!(
        log.contains("6 processed, 1 dead-lettered, 1 duplicate(s) skipped"),
        "{log}"
    );
    #[derive(QueryableByName, Debug, PartialEq)]
    struct Total {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        customer_id: i64,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        orders: i64,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        total_cents: i64,
    }
    let totals = || -> Vec<Total> {
        diesel::sql_query("SELECT customer_id, orders, total_cents FROM order_totals ORDER BY 1")
            .load(&mut SqliteConnection::establish(db.diesel_url()).unwrap())
            .unwrap()
    };
    let expected = vec![
        Total {
            customer_id: 7,
            orders: 2,
            total_cents: 1450,
        },
        Total {
            customer_id: 8,
            orders: 1,
            total_cents: 99,
        },
    ];
    assert_eq!(totals(), expected);
    // Everything again (offsets rewound): the inbox keeps the totals as they are.
    rewind(&group, &topic, 2);
    let log = run(&["consume", "totals", "--drain"]);
    assert!(
        log.contains("0 processed, 1 dead-lettered, 7 duplicate(s) skipped"),
        "{log}"
    );
    assert_eq!(totals(), expected);
    // A dead letter is not recorded in the inbox (so that a replay of it is handled): each run
    // that gave up on the negative order dead-lettered it.
    let dead = read_all(&format!("{topic}.dlq"), Duration::from_secs(30));
    assert_eq!(dead.len(), 2, "{dead:?}");
    // The example binary has devour's other commands too.
    let status = Command::new(&bin)
        .args(["status", "--json"])
        .env("DEVOUR_CONFIG", dir.path().join("devour.toml"))
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
}
