//! devour-relay against real PostgreSQL, SQLite and Kafka: everything committed arrives, in
//! per-key order, on the partition Java's murmur2 partitioner picks; late commits are not
//! skipped; refused messages are dead-lettered and (with block_key) hold their key back.

mod common;

use std::time::{Duration, Instant};

use common::{Backend, TestConn, TestDb};
use devour::outbox::partition_for_key;
use devour::relay::{self, RunOptions};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;

fn ten_thousand_rows_in_key_order_on_murmur2_partitions<C: TestConn>(db: &TestDb) {
    let topic = common::create_topic("relay10k", 6);
    let mut c = C::open(db);
    common::insert_rows(&mut c, &topic, 0, 10_000, 200);
    let report = common::relay_drain(&common::config(db, ""));
    assert_eq!(report.delivered, 10_000, "{report:?}");
    assert_eq!(c.count("devour_outbox"), 0, "delivered rows are removed");
    let msgs = common::consume_seqs(&topic, 10_000, Duration::from_secs(60));
    let dups = common::check_delivery(&msgs, 0..10_000);
    assert_eq!(dups, 0, "a clean drain delivers each row once");
    assert_eq!(
        common::topic_size(&topic),
        10_000,
        "a clean drain delivers each row once"
    );
    for m in &msgs {
        let key = m.key.as_deref().unwrap();
        assert_eq!(
            m.partition,
            partition_for_key(key.as_bytes(), 6),
            "key {key}"
        );
    }
    // The Java client's partition for known murmur2 vectors (same formula as above).
    assert_eq!(
        partition_for_key(b"21", 6),
        ((-973932308i32 & 0x7fffffff) % 6)
    );
}

both_backends!(ten_thousand_rows_in_key_order_on_murmur2_partitions);

#[test]
fn late_commit_with_a_smaller_id_is_delivered() {
    let db = TestDb::new(Backend::Postgres, "late");
    let topic = common::create_topic("late", 1);
    let handle = relay::start(&common::config(&db, ""), RunOptions::default()).unwrap();
    let mut early = PgConnection::establish(&db.url).unwrap();
    let mut late = PgConnection::establish(&db.url).unwrap();
    // The first transaction takes the smaller id and commits last; the committed row waits
    // for it up to WRITER_WAIT (2 s), then goes first.
    late.batch_execute("BEGIN").unwrap();
    common::insert_rows(&mut late, &topic, 1, 1, 2);
    common::insert_rows(&mut early, &topic, 2, 1, 2);
    let first = common::consume_seqs(&topic, 1, Duration::from_secs(30));
    assert_eq!(common::seqs(&first)[0].2, 2, "the committed row goes first");
    late.batch_execute("COMMIT").unwrap();
    let all = common::consume_seqs(&topic, 2, Duration::from_secs(30));
    common::check_delivery(&all, [1, 2]);
    handle.shutdown();
    let report = handle.join().unwrap();
    assert_eq!(report.delivered, 2);
}

/// A long transaction anywhere in the database keeps every row deleted since in the id index
/// (no snapshot may lose them yet), so a pass from the oldest row would read past all of them.
/// Passes start at the horizon instead; a row that commits late below the cursor is still
/// delivered.
#[test]
fn passes_start_at_the_horizon_while_a_long_transaction_is_open() {
    let db = TestDb::new(Backend::Postgres, "horizon");
    let topic = common::create_topic("horizon", 1);
    let mut old = PgConnection::establish(&db.url).unwrap();
    old.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM devour_relays")
        .unwrap();
    let handle = relay::start(&common::config(&db, ""), RunOptions::default()).unwrap();
    let mut c = PgConnection::establish(&db.url).unwrap();
    // 20 commits, each delivered before the next: the relay goes idle and starts a new pass
    // every time.
    for round in 0..20 {
        common::insert_rows(&mut c, &topic, round * 50 + 1, 50, 5);
        wait_for("the round's rows", || c.count("devour_outbox") == 0);
    }
    // A writer takes an id, and a later row of the same key commits first: the later row waits
    // for the open transaction (up to WRITER_WAIT, 2 s), and the two go out in id order.
    let mut late = PgConnection::establish(&db.url).unwrap();
    late.batch_execute("BEGIN").unwrap();
    common::insert_rows(&mut late, &topic, 1001, 1, 1);
    common::insert_rows(&mut c, &topic, 1002, 1, 1);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        c.count("devour_outbox"),
        1,
        "the committed row waits while a smaller id is open"
    );
    late.batch_execute("COMMIT").unwrap();
    wait_for("both rows", || c.count("devour_outbox") == 0);
    handle.shutdown();
    let report = handle.join().unwrap();
    old.batch_execute("COMMIT").unwrap();

    let msgs = common::consume_seqs(&topic, 1002, Duration::from_secs(30));
    common::check_delivery(&msgs, 1..=1002);
    let k0: Vec<i64> = common::seqs(&msgs)
        .into_iter()
        .filter(|(k, _, s)| k == "k0" && *s > 1000)
        .map(|(_, _, s)| s)
        .collect();
    assert_eq!(k0, [1001, 1002], "id order within the key");
    assert!(report.passes >= 20, "{report:?}");
    // The first passes (until the first ids settle), one when the LISTEN connection came up,
    // one if a lease came in late; not one per idle pass.
    assert!(report.passes_from_oldest * 4 <= report.passes, "{report:?}");
}

#[test]
fn rows_inserted_with_psql_are_delivered() {
    let db = TestDb::new(Backend::Postgres, "psql");
    let topic = common::create_topic("psql", 3);
    let sql = format!(
        "BEGIN; INSERT INTO devour_outbox (topic, partition_key, payload, event) \
         VALUES ('{topic}', 'order-42', convert_to('{{\"seq\": 7}}', 'UTF8'), 'update'); COMMIT;"
    );
    let out = std::process::Command::new("psql")
        .arg(&db.url)
        .arg("-c")
        .arg(&sql)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = common::relay_drain(&common::config(&db, ""));
    assert_eq!(report.delivered, 1);
    let msgs = common::consume(&topic, 1, Duration::from_secs(30));
    assert_eq!(msgs[0].key.as_deref(), Some("order-42"));
    assert_eq!(msgs[0].partition, partition_for_key(b"order-42", 3));
    let header = |n: &str| {
        msgs[0]
            .headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(header("event").as_deref(), Some("update"));
    assert_eq!(header("content-type").as_deref(), Some("application/json"));
    // The column's default: a UUIDv7 (time-ordered), as devour's write path makes.
    let id = header("message-id").unwrap();
    assert_eq!((id.len(), &id[14..15]), (36, "7"), "{id}");
    let ms = u64::from_str_radix(&id[..8], 16).unwrap() << 16
        | u64::from_str_radix(&id[9..13], 16).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(now - ms < 120_000, "{id}: {ms} ms, now {now}");
}

/// A topic whose max.message.bytes is 20,000.
fn small_topic(tag: &str) -> String {
    let name = common::unique(tag).replace('_', "-");
    common::create_named_topic(&name, 1, &[("max.message.bytes", "20000")]);
    name
}

fn raise_limit(topic: &str) {
    set_limit(topic, "200000");
}

fn set_limit(topic: &str, bytes: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", common::kafka_hosts())
        .create()
        .unwrap();
    let alter = AlterConfig::new(ResourceSpecifier::Topic(topic)).set("max.message.bytes", bytes);
    for r in
        futures::executor::block_on(admin.alter_configs([&alter], &AdminOptions::new())).unwrap()
    {
        r.unwrap();
    }
    // The broker applies the change a moment later: wait until it describes the topic so.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let described = futures::executor::block_on(
            admin.describe_configs([&ResourceSpecifier::Topic(topic)], &AdminOptions::new()),
        )
        .unwrap();
        let value = described[0]
            .as_ref()
            .ok()
            .and_then(|r| r.get("max.message.bytes"))
            .and_then(|e| e.value.clone());
        if value.as_deref() == Some(bytes) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{topic}: max.message.bytes is still {value:?}, not {bytes}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Rows: k1 seq 1 (small), k1 seq 2 (too large for the topic), k1 seq 3, k2 seq 4. Returns
/// the large row's id.
fn insert_with_a_large_one(c: &mut PgConnection, topic: &str) -> i64 {
    let big = "x".repeat(50_000);
    for (key, seq, pad) in [
        ("k1", 1, ""),
        ("k1", 2, big.as_str()),
        ("k1", 3, ""),
        ("k2", 4, ""),
    ] {
        c.batch_execute(&format!(
            "INSERT INTO devour_outbox (topic, partition_key, payload) VALUES \
             ('{topic}', '{key}', convert_to('{{\"seq\":{seq},\"pad\":\"{pad}\"}}', 'UTF8'))"
        ))
        .unwrap();
    }
    diesel::sql_query("SELECT id AS n FROM devour_outbox WHERE length(payload) > 40000")
        .get_result::<Id>(c)
        .unwrap()
        .n
}

#[derive(QueryableByName)]
struct Id {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

fn dead_letters(c: &mut PgConnection) -> Vec<(i64, String)> {
    #[derive(QueryableByName)]
    struct Dl {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        id: i64,
        #[diesel(sql_type = diesel::sql_types::Text)]
        error: String,
    }
    diesel::sql_query("SELECT id, error FROM devour_dead_letters ORDER BY id")
        .load::<Dl>(c)
        .unwrap()
        .into_iter()
        .map(|d| (d.id, d.error))
        .collect()
}

/// Runs `devour outbox ACTION ID` (another process) on `db`; fails the test if it fails.
fn outbox_cli(db: &TestDb, action: &str, id: i64) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_devour"))
        .args(["outbox", action, &id.to_string()])
        .env("DEVOUR_DATABASE_URL", &db.url)
        .env("DEVOUR_KAFKA_HOSTS", common::kafka_hosts())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{action}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn too_large_message_is_dead_lettered_while_the_others_flow() {
    let db = TestDb::new(Backend::Postgres, "dlq_continue");
    let topic = small_topic("dlq-continue");
    let mut c = PgConnection::establish(&db.url).unwrap();
    let big_id = insert_with_a_large_one(&mut c, &topic);
    let report = common::relay_drain(&common::config(&db, ""));
    assert_eq!(
        (report.delivered, report.dead_lettered),
        (3, 1),
        "{report:?}"
    );
    let dl = dead_letters(&mut c);
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].0, big_id);
    assert!(
        dl[0].1.contains("max.message.bytes"),
        "error recorded: {}",
        dl[0].1
    );
    let msgs = common::consume_seqs(&topic, 3, Duration::from_secs(30));
    common::check_delivery(&msgs, [1, 3, 4]);
}

/// Anything the write path accepts (up to `outbox.max_message_bytes`, 1 MiB) goes through the
/// relay's producer to a topic with the broker's default limit; it is not dead-lettered by the
/// producer's own, smaller default (`message.max.bytes` = 1,000,000).
#[test]
fn a_message_as_large_as_the_write_path_allows_is_delivered() {
    let db = TestDb::new(Backend::Postgres, "relay_big");
    let topic = common::create_topic("relay-big", 1);
    let mut c = PgConnection::establish(&db.url).unwrap();
    let pad = "x".repeat(1_040_000);
    c.batch_execute(&format!(
        "INSERT INTO devour_outbox (topic, partition_key, payload) VALUES \
         ('{topic}', 'k', convert_to('{{\"seq\":1,\"pad\":\"{pad}\"}}', 'UTF8'))"
    ))
    .unwrap();
    let report = common::relay_drain(&common::config(&db, ""));
    assert_eq!(
        (report.delivered, report.dead_lettered, report.restarts),
        (1, 0, 0),
        "{report:?} (a topic with the broker's default limit takes the producer's default \
         batches: no restart for smaller ones); dead letters: {:?}",
        dead_letters(&mut c)
    );
    let msgs = common::consume_seqs(&topic, 1, Duration::from_secs(30));
    common::check_delivery(&msgs, [1]);
}

/// A topic's max.message.bytes bounds each record batch the broker takes, not only each
/// message: a backlog of rows that each fit must not be rejected (and dead-lettered) batch by
/// batch because the producer packed more of them together than the topic allows.
#[test]
fn a_backlog_for_a_topic_with_a_small_limit_is_delivered_not_dead_lettered() {
    let db = TestDb::new(Backend::Postgres, "relay_small_batches");
    let topic = small_topic("relay-small-batches");
    let mut c = PgConnection::establish(&db.url).unwrap();
    insert_random_rows(&mut c, &topic, 1..=2000, false);
    let report = common::relay_drain(&common::config(&db, ""));
    let dl = dead_letters(&mut c);
    assert_eq!(
        (report.delivered, report.dead_lettered),
        (2000, 0),
        "{report:?}; first dead letters: {:?}",
        &dl[..dl.len().min(3)]
    );
    let msgs = common::consume_seqs(&topic, 2000, Duration::from_secs(60));
    common::check_delivery(&msgs, 1..=2000);
}

/// Rows of ~1.5 KB each (every tenth of ~17 KB with `big`) that the topic takes one by one
/// (base64 of hashes, which lz4 cannot shrink).
fn insert_random_rows(
    c: &mut PgConnection,
    topic: &str,
    seqs: std::ops::RangeInclusive<i64>,
    big: bool,
) {
    let chunks = if big {
        "CASE WHEN i % 10 = 0 THEN 380 ELSE 35 END"
    } else {
        "35"
    };
    c.batch_execute(&format!(
        "INSERT INTO devour_outbox (topic, partition_key, payload) \
         SELECT '{topic}', 'k' || (i % 20), convert_to('{{\"seq\":' || i || ',\"pad\":\"' || \
           (SELECT string_agg(encode(sha256((random()::text || i || j)::bytea), 'base64'), '') FROM generate_series(1, {chunks}) j) || '\"}}', 'UTF8') \
         FROM generate_series({}, {}) i",
        seqs.start(),
        seqs.end()
    ))
    .unwrap();
}

/// The same when the relay does not know the topic's limit (here: lowered after the relay
/// asked): batches the broker refuses are sent again, smaller, not dead-lettered; rows of
/// ~17 KB among them (more than half of some batch sizes on the way) go alone in the end.
#[test]
fn batches_a_topic_refuses_are_sent_again_smaller() {
    let db = TestDb::new(Backend::Postgres, "relay_shrink_batches");
    let topic = common::create_topic("relay-shrink-batches", 1);
    let mut c = PgConnection::establish(&db.url).unwrap();
    let handle = relay::start(&common::config(&db, ""), RunOptions::default()).unwrap();
    insert_random_rows(&mut c, &topic, 1..=100, false);
    handle.wake();
    wait_for("the first rows", || c.count("devour_outbox") == 0);
    set_limit(&topic, "20000");
    std::thread::sleep(Duration::from_secs(1));
    insert_random_rows(&mut c, &topic, 101..=2100, true);
    handle.wake();
    wait_for("the outbox to empty", || c.count("devour_outbox") == 0);
    handle.shutdown();
    let report = handle.join().unwrap();
    let dl = dead_letters(&mut c);
    assert_eq!(
        (report.delivered, report.dead_lettered),
        (2100, 0),
        "{report:?}; first dead letters: {:?}",
        &dl[..dl.len().min(3)]
    );
    assert!(report.restarts >= 1, "{report:?}");
    let msgs = common::consume_seqs(&topic, 2100, Duration::from_secs(60));
    common::check_delivery(&msgs, 1..=2100);
}

#[test]
fn block_key_holds_later_rows_until_retry_or_discard() {
    let db = TestDb::new(Backend::Postgres, "dlq_block");
    let topic = small_topic("dlq-block");
    let mut c = PgConnection::establish(&db.url).unwrap();
    let big_id = insert_with_a_large_one(&mut c, &topic);
    let config = common::config(&db, "on_dead_letter = \"block_key\"");
    let handle = relay::start(&config, RunOptions::default()).unwrap();
    let msgs = common::consume_seqs(&topic, 2, Duration::from_secs(30));
    common::check_delivery(&msgs, [1, 4]);
    wait_for("the dead letter", || dead_letters(&mut c).len() == 1);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        c.count("devour_outbox"),
        1,
        "k1's later row waits behind its dead letter"
    );

    // Once the topic takes the message, a retry delivers it, then the row that waited.
    raise_limit(&topic);
    outbox_cli(&db, "retry", big_id);
    handle.wake();
    wait_for("the outbox to empty", || c.count("devour_outbox") == 0);
    handle.shutdown();
    handle.join().unwrap();
    let msgs = common::consume_seqs(&topic, 4, Duration::from_secs(30));
    let order: Vec<i64> = common::seqs(&msgs)
        .into_iter()
        .filter(|(k, _, _)| k == "k1")
        .map(|(_, _, s)| s)
        .collect();
    assert_eq!(
        order,
        [1, 2, 3],
        "k1 in order once its dead letter was retried"
    );
}

#[test]
fn discarding_the_dead_letter_releases_its_key() {
    let db = TestDb::new(Backend::Postgres, "dlq_discard");
    let topic = small_topic("dlq-discard");
    let mut c = PgConnection::establish(&db.url).unwrap();
    let big_id = insert_with_a_large_one(&mut c, &topic);
    let config = common::config(&db, "on_dead_letter = \"block_key\"");
    let handle = relay::start(&config, RunOptions::default()).unwrap();
    wait_for("the dead letter", || dead_letters(&mut c).len() == 1);
    let mut conn = devour::DbPool::connect(&config.database)
        .unwrap()
        .get()
        .unwrap();
    let which = devour::db::DeadLetters::Id(big_id);
    assert_eq!(conn.discard_dead_letters(&which).unwrap(), 1);
    assert_eq!(conn.discard_dead_letters(&which).unwrap(), 0, "gone");
    handle.wake();
    wait_for("the outbox to empty", || c.count("devour_outbox") == 0);
    handle.shutdown();
    handle.join().unwrap();
    let msgs = common::consume_seqs(&topic, 3, Duration::from_secs(30));
    common::check_delivery(&msgs, [1, 3, 4]);
}

/// k1's dead letter is retried or discarded (`devour outbox ACTION`, another process) while
/// new rows of k1 keep coming: every row of k1 goes in order. The rows of k1 written while it
/// was held back lie below the relay's cursor; the ones written after the release are above it,
/// and must not go first. (Before reads carried `devour_key_releases`, a relay in another
/// process on SQLite sent them first, for up to a second.)
fn released_key_keeps_its_order_under_writes<C: TestConn + Send + 'static>(
    db: &TestDb,
    action: &str,
) {
    let topic = small_topic(&format!("released-{action}"));
    let blob = if std::any::type_name::<C>().contains("Pg") {
        "bytea"
    } else {
        "BLOB"
    };
    let insert = move |c: &mut C, topic: &str, key: &str, seq: i64, pad: usize| {
        c.batch_execute(&format!(
            "INSERT INTO devour_outbox (topic, partition_key, payload, event, shard) VALUES \
             ('{topic}', '{key}', CAST('{{\"seq\":{seq},\"pad\":\"{}\"}}' AS {blob}), 'create', {})",
            "x".repeat(pad),
            devour::outbox::shard_for_key(key)
        ))
        .unwrap()
    };
    let open = || {
        let mut c = C::open(db);
        if blob == "BLOB" {
            c.batch_execute("PRAGMA busy_timeout = 10000").unwrap();
        }
        c
    };
    let mut c = open();
    for (key, seq, pad) in [("k1", 1, 0), ("k1", 2, 50_000), ("k1", 3, 0), ("k2", 4, 0)] {
        insert(&mut c, &topic, key, seq, pad);
    }
    let big_id = c
        .outbox()
        .into_iter()
        .find(|r| r.payload.as_ref().is_some_and(|p| p["seq"] == 2))
        .unwrap()
        .id;
    if action == "discard" {
        // The count's row deleted by hand: reads take it as 0, and the release writes it back.
        c.batch_execute("DELETE FROM devour_key_releases").unwrap();
    }
    let config = common::config(db, "on_dead_letter = \"block_key\"");
    let handle = relay::start(&config, RunOptions::default()).unwrap();
    common::check_delivery(
        &common::consume_seqs(&topic, 2, Duration::from_secs(30)),
        [1, 4],
    );
    wait_for("the dead letter", || c.count("devour_dead_letters") == 1);
    if action == "retry" {
        raise_limit(&topic);
    }

    // Rows keep coming, k1's among them, faster than reads find none (a read that finds
    // none makes the relay start over at the oldest row); the release comes in the middle.
    const BATCHES: i64 = 300;
    const PER_BATCH: i64 = 20;
    let written = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let writer = {
        let topic = topic.clone();
        let written = written.clone();
        let mut w = open();
        std::thread::spawn(move || {
            for b in 0..BATCHES {
                let values: Vec<String> = (0..PER_BATCH)
                    .map(|i| {
                        let seq = 5 + b * PER_BATCH + i;
                        let key = format!("k{}", 1 + seq % 5);
                        format!(
                            "('{topic}', '{key}', CAST('{{\"seq\":{seq}}}' AS {blob}), 'create', {})",
                            devour::outbox::shard_for_key(&key)
                        )
                    })
                    .collect();
                w.batch_execute(&format!(
                    "INSERT INTO devour_outbox (topic, partition_key, payload, event, shard) VALUES {}",
                    values.join(",")
                ))
                .unwrap();
                written.store(b + 1, std::sync::atomic::Ordering::Release);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    wait_for("rows written", || {
        written.load(std::sync::atomic::Ordering::Acquire) >= BATCHES / 4
    });
    outbox_cli(db, action, big_id);
    assert!(
        written.load(std::sync::atomic::Ordering::Acquire) < BATCHES,
        "the release came after the last write: the machine is too slow for this test"
    );
    writer.join().unwrap();
    wait_for("the outbox to empty", || c.count("devour_outbox") == 0);
    handle.shutdown();
    handle.join().unwrap();
    let mut expected: Vec<i64> = (1..5 + BATCHES * PER_BATCH).collect();
    if action == "discard" {
        expected.retain(|s| *s != 2);
    }
    let msgs = common::consume_seqs(&topic, expected.len(), Duration::from_secs(30));
    // Per key, first deliveries in order, none lost (one partition: the topic's order).
    common::check_delivery(&msgs, expected);
}

#[test]
fn a_retried_key_keeps_its_order_under_writes_sqlite() {
    let db = TestDb::new(Backend::Sqlite, "released_retry");
    released_key_keeps_its_order_under_writes::<SqliteConnection>(&db, "retry");
}

#[test]
fn a_discarded_key_keeps_its_order_under_writes_sqlite() {
    let db = TestDb::new(Backend::Sqlite, "released_discard");
    released_key_keeps_its_order_under_writes::<SqliteConnection>(&db, "discard");
}

#[test]
fn a_discarded_key_keeps_its_order_under_writes_postgres() {
    let db = TestDb::new(Backend::Postgres, "released_discard");
    released_key_keeps_its_order_under_writes::<PgConnection>(&db, "discard");
}

#[test]
fn a_retried_key_keeps_its_order_under_writes_postgres() {
    let db = TestDb::new(Backend::Postgres, "released_retry");
    released_key_keeps_its_order_under_writes::<PgConnection>(&db, "retry");
}

/// A relay that fails at start after its lease keeper began (here: the database refuses its
/// fourth connection) leaves no thread behind holding the shards: another relay can take them.
#[test]
fn a_relay_that_fails_at_start_leaves_no_lease_holder_behind() {
    let db = TestDb::new(Backend::Postgres, "start_fails");
    let mut c = PgConnection::establish(&db.url).unwrap();
    // A role allowed three connections: the reader, the committer and the lease keeper; the
    // backlog counter (metrics on) is refused.
    let limited = common::LimitedRole::new(&db, 3);
    let url = &limited.url;
    let config = devour::Config::from_toml_str(
        &format!(
            "[database]\nurl = \"{url}\"\n[kafka]\nhosts = \"{}\"\n[relay]\nlease_ttl_ms = 3000\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\n",
            common::kafka_hosts()
        ),
        devour::config::Origin::Defaults,
        &Default::default(),
    )
    .unwrap();
    // Whether the lease keeper claims shards before the refusal is a race: start again until a
    // failed start had claimed some (their epochs moved), and check every time that nothing
    // stays held.
    let epochs = |c: &mut PgConnection| {
        diesel::sql_query("SELECT coalesce(sum(epoch), 0)::bigint AS n FROM devour_relay_leases")
            .get_result::<common::CountRow>(c)
            .unwrap()
            .n
    };
    let mut claimed = false;
    let mut failure = None;
    for _ in 0..20 {
        let epochs_before = epochs(&mut c);
        let err = relay::start(&config, RunOptions::default())
            .and_then(|h| h.join())
            .expect_err("the fourth connection is refused");
        assert!(err.to_string().contains("connection"), "{err}");
        claimed = epochs(&mut c) > epochs_before;
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut held;
        loop {
            held = c.count("devour_relay_leases WHERE owner IS NOT NULL AND expires_at > now()");
            if held == 0 || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if held != 0 {
            failure = Some(format!("{held} shards still held by the failed relay"));
            break;
        }
        if claimed {
            break;
        }
    }
    drop(limited);
    assert_eq!(failure, None);
    assert!(
        claimed,
        "in 20 starts the lease keeper never claimed a shard before the failure"
    );
}

/// Two relays given one `relay_id` (one config shared by two instances) do not share leases:
/// one delivers, the other stands by, and nothing goes twice.
#[test]
fn two_relays_given_one_name_do_not_both_deliver() {
    let db = TestDb::new(Backend::Sqlite, "same_name");
    let topic = common::create_topic("same-name", 3);
    let config = common::config(&db, "relay_id = \"twin\"");
    let first = relay::start(&config, RunOptions::default()).unwrap();
    let second = relay::start(&config, RunOptions::default()).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let mut c = SqliteConnection::open(&db);
    c.batch_execute("PRAGMA busy_timeout = 10000").unwrap();
    common::insert_rows(&mut c, &topic, 0, 3000, 30);
    let msgs = common::consume_seqs(&topic, 3000, Duration::from_secs(60));
    first.shutdown();
    second.shutdown();
    first.join().unwrap();
    second.join().unwrap();
    let dups = common::check_delivery(&msgs, 0..3000);
    assert_eq!(dups, 0, "two relays named alike both delivered");
    assert_eq!(
        common::topic_size(&topic),
        3000,
        "two relays named alike both delivered (after the read)"
    );
}

#[test]
fn second_relay_on_sqlite_stands_by_until_the_first_stops() {
    let db = TestDb::new(Backend::Sqlite, "standby");
    let topic = common::create_topic("standby", 1);
    let config = common::config(&db, "");
    let first = relay::start(&config, RunOptions::default()).unwrap();
    let mut c = SqliteConnection::open(&db);
    // The first relay holds every shard before the second starts.
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.count("devour_relay_leases WHERE owner IS NOT NULL") < 256 {
        assert!(Instant::now() < deadline, "the first relay took no lease");
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = relay::start(&config, RunOptions::default()).unwrap();
    common::insert_rows(&mut c, &topic, 0, 100, 10);
    common::consume_seqs(&topic, 100, Duration::from_secs(30));
    // A drain cannot wait for the holder forever: it says who drains the outbox instead.
    let t = Instant::now();
    let drain = RunOptions {
        mode: relay::Mode::Drain,
        progress: false,
    };
    let err = relay::start(&config, drain)
        .and_then(|h| h.join())
        .expect_err("a drain while another relay holds the SQLite outbox");
    assert!(matches!(err, relay::RelayError::Standby(_)), "{err}");
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    first.shutdown();
    let r1 = first.join().unwrap();
    assert_eq!(r1.delivered, 100, "the first relay did the work");
    common::insert_rows(&mut c, &topic, 100, 50, 10);
    let msgs = common::consume_seqs(&topic, 150, Duration::from_secs(30));
    second.shutdown();
    let r2 = second.join().unwrap();
    assert_eq!(
        r2.delivered, 50,
        "the second took over once the first released the outbox"
    );
    common::check_delivery(&msgs, 0..150);
}

#[test]
fn retention_keep_moves_delivered_rows_and_cleans_up_old_ones() {
    let db = TestDb::new(Backend::Postgres, "keep");
    let topic = common::create_topic("keep", 1);
    let mut c = PgConnection::establish(&db.url).unwrap();
    c.batch_execute(
        "INSERT INTO devour_outbox_delivered (id, topic, headers, message_id, content_type, shard, created_at, attempts, delivered_at) \
         VALUES (999999, 'old', '{}', 'm', 'application/json', 0, now() - interval '3 days', 0, now() - interval '2 days')",
    )
    .unwrap();
    common::insert_rows(&mut c, &topic, 0, 20, 5);
    let report = common::relay_drain(&common::config(
        &db,
        "retention = \"keep\"\nretention_hours = 24",
    ));
    assert_eq!(report.delivered, 20);
    assert_eq!(c.count("devour_outbox"), 0);
    let kept = c.count("devour_outbox_delivered");
    assert_eq!(
        kept, 20,
        "the 20 delivered rows are kept, the 2-day-old one is cleaned up"
    );
    common::check_delivery(
        &common::consume_seqs(&topic, 20, Duration::from_secs(30)),
        0..20,
    );
}

#[test]
fn postgres_notify_wakes_the_relay_without_polling() {
    let db = TestDb::new(Backend::Postgres, "notify");
    let topic = common::create_topic("notify", 1);
    // Poll once a minute: only the NOTIFY can explain a quick delivery.
    let mut config = common::config(&db, "");
    config.relay.poll_interval_ms = 60_000;
    // The lease keeper wakes the reader on each renewal (every third of the TTL): keep it quiet.
    config.relay.lease_ttl_ms = 60_000;
    let handle = relay::start(&config, RunOptions::default()).unwrap();
    let mut c = PgConnection::establish(&db.url).unwrap();
    // Settled: every shard held (gaining one starts a pass, which would deliver without the
    // NOTIFY) and the relay listening.
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.count("devour_relay_leases WHERE owner IS NOT NULL") < 256
        || c.count("pg_stat_activity WHERE datname = current_database() AND query ILIKE 'LISTEN%'")
            == 0
    {
        assert!(Instant::now() < deadline, "the relay did not settle");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Its first passes (on start, on claiming) are over.
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    common::insert_rows(&mut c, &topic, 0, 1, 1);
    while c.count("devour_outbox") > 0 && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let took = started.elapsed();
    handle.shutdown();
    handle.join().unwrap();
    assert!(
        took < Duration::from_secs(5),
        "delivered {took:?} after the insert: not woken by NOTIFY"
    );
    common::consume_seqs(&topic, 1, Duration::from_secs(10));
}

/// Dropping a `RelayHandle` stops its relay and waits for it: when the drop returns, the
/// relay has let its leases go.
#[test]
fn dropping_the_handle_stops_the_relay() {
    let db = TestDb::new(Backend::Sqlite, "drop_handle");
    let config = common::config(&db, "");
    let handle = relay::start(&config, RunOptions::default()).unwrap();
    let mut c = SqliteConnection::open(&db);
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.count("devour_relay_leases WHERE owner IS NOT NULL") < 256 {
        assert!(Instant::now() < deadline, "the relay took no lease");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(handle);
    assert_eq!(
        c.count("devour_relay_leases WHERE owner IS NOT NULL"),
        0,
        "the dropped relay still holds leases"
    );
    assert_eq!(
        c.count("devour_relays"),
        0,
        "the dropped relay is still registered"
    );
}

/// A drain ends with the rows a dead letter holds back (`block_key`) still in the outbox, and
/// says how many.
#[test]
fn a_drain_reports_the_rows_a_dead_letter_holds_back() {
    let db = TestDb::new(Backend::Postgres, "drain_left");
    let topic = small_topic("drain-left");
    let mut c = PgConnection::establish(&db.url).unwrap();
    insert_with_a_large_one(&mut c, &topic);
    let report = common::relay_drain(&common::config(&db, "on_dead_letter = \"block_key\""));
    assert_eq!(
        (report.delivered, report.dead_lettered, report.left),
        (2, 1, 1),
        "k1's later row is left behind its dead letter: {report:?}"
    );
}

/// A drain delivers the rows there when it begins, and ends however fast rows keep coming:
/// those written after it began are left for the next run.
fn a_drain_ends_while_rows_keep_coming<C: TestConn + Send + 'static>(db: &TestDb) {
    let topic = common::create_topic("drain-under-writes", 3);
    let open = || {
        let mut c = C::open(db);
        if std::any::type_name::<C>().contains("Sqlite") {
            c.batch_execute("PRAGMA busy_timeout = 10000").unwrap();
        }
        c
    };
    let mut c = open();
    // One writer, no aborted transactions: row `seq` has id `seq + 1`.
    const BEFORE: i64 = 2_000;
    common::insert_rows(&mut c, &topic, 0, BEFORE, 50);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (topic, stop) = (topic.clone(), stop.clone());
        let mut w = open();
        std::thread::spawn(move || {
            let mut next = BEFORE;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                common::insert_rows(&mut w, &topic, next, 5, 50);
                next += 5;
                std::thread::sleep(Duration::from_millis(2));
            }
            next
        })
    };
    // Writes are under way before the drain begins, and go on until it has ended.
    std::thread::sleep(Duration::from_millis(200));
    let (tx, rx) = std::sync::mpsc::channel();
    let config = common::config(db, "");
    std::thread::spawn(move || tx.send(common::relay_drain(&config)));
    let report = rx.recv_timeout(Duration::from_secs(120));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.join().unwrap();
    let report = report.expect("the drain ended within 2 minutes while rows kept coming");
    let through = report.drained_through.expect("a drain says where it ended");
    let left = c.count("devour_outbox");
    assert!(
        through >= BEFORE && report.delivered as i64 == through && report.left as i64 <= left,
        "a drain delivers the rows up to the largest id there was when it began: {report:?}, \
         {written} written, {left} left"
    );
    assert!(
        left > 0 && left == written - through,
        "the rows written after it began are left: {report:?}, {written} written, {left} left"
    );
    let msgs = common::consume_seqs(&topic, through as usize, Duration::from_secs(60));
    common::check_delivery(&msgs, 0..through);
}

both_backends!(a_drain_ends_while_rows_keep_coming);

/// A drain on PostgreSQL that holds every shard and passes over nothing ends after one pass: it
/// neither starts over from the oldest row when its listener comes up (that connection listens
/// before the first read) nor reads from the oldest row again at the end (which would walk the
/// index entries of every row it just removed), and it counts only the rows above its bound.
#[test]
fn a_drain_needs_one_pass_from_the_oldest_row() {
    let db = TestDb::new(Backend::Postgres, "drain_one_pass");
    let topic = common::create_topic("drain-one-pass", 3);
    let mut c = PgConnection::establish(&db.url).unwrap();
    common::insert_rows(&mut c, &topic, 0, 3_000, 50);
    let report = common::relay_drain(&common::config(&db, ""));
    assert_eq!(
        (
            report.delivered,
            report.left,
            report.passes,
            report.passes_from_oldest
        ),
        (3_000, 0, 1, 1),
        "{report:?}"
    );
    assert_eq!(c.count("devour_outbox"), 0);
    let msgs = common::consume_seqs(&topic, 3_000, Duration::from_secs(60));
    common::check_delivery(&msgs, 0..3_000);
}

/// A drain that holds fewer than every shard waits for the shards of a relay that died, even
/// one whose lease TTL is longer than its own: it takes them over when their leases run out
/// and drains their rows too.
#[test]
fn a_drain_waits_out_a_dead_relay_with_a_longer_lease_ttl() {
    let db = TestDb::new(Backend::Postgres, "drain_dead_ttl");
    let topic = common::create_topic("drain-dead-ttl", 3);
    let mut c = PgConnection::establish(&db.url).unwrap();
    common::insert_rows(&mut c, &topic, 0, 1_000, 200);
    // A relay killed a second ago, with a 9 s TTL (this drain's is 3 s): its heartbeat looks
    // alive for a while, and it holds half the shards for 8 more seconds.
    c.batch_execute(
        "INSERT INTO devour_relays (relay_id, started_at, heartbeat_at, lease_ttl_ms) \
           VALUES ('dead-1', now() - interval '1 minute', now() - interval '1 second', 9000); \
         UPDATE devour_relay_leases SET owner = 'dead-1', epoch = epoch + 1, \
           expires_at = now() + interval '8 seconds' WHERE shard < 128",
    )
    .unwrap();
    let held_by_dead: i64 = {
        #[derive(QueryableByName)]
        struct N {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        diesel::sql_query("SELECT count(*) AS n FROM devour_outbox WHERE shard < 128")
            .get_result::<N>(&mut c)
            .unwrap()
            .n
    };
    assert!(held_by_dead > 0 && held_by_dead < 1_000);
    let report = common::relay_drain(&common::config(&db, ""));
    assert_eq!(
        (report.delivered, report.left),
        (1_000, 0),
        "the dead relay's {held_by_dead} rows were drained too: {report:?}"
    );
    let msgs = common::consume_seqs(&topic, 1_000, Duration::from_secs(60));
    common::check_delivery(&msgs, 0..1_000);
}

/// The write path's size check leaves room for what the broker adds: a message of exactly
/// `outbox.max_message_bytes` (the default, 1 MiB) whose value does not compress reaches a
/// topic with the broker's default limit (1 MiB + 12 bytes per record batch).
#[test]
fn the_largest_message_a_save_accepts_fits_the_broker_s_default_limit() {
    let db = TestDb::new(Backend::Postgres, "relay_max_size");
    let topic = common::create_topic("relay-max-size", 1);
    let mut c = PgConnection::establish(&db.url).unwrap();
    // Bytes that do not compress (xorshift), so that lz4 only adds its framing.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut noise = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as u8
    };
    let max = devour::config::DEFAULT_MAX_MESSAGE_BYTES;
    let mut m = devour::OutboxMessage::new(&topic, Some(Vec::new()));
    m.key = Some("k".into());
    let room = max - m.size();
    m.payload = Some((0..room).map(|_| noise()).collect());
    assert_eq!(m.size(), max);
    let mut over = m.clone();
    over.message_id = uuid::Uuid::now_v7();
    over.payload.as_mut().unwrap().push(0);
    assert!(matches!(
        devour::outbox::write_messages(&mut c, &[over], max),
        Err(devour::ProduceError::TooLarge { .. })
    ));
    devour::outbox::write_messages(&mut c, &[m], max).unwrap();
    let report = common::relay_drain(&common::config(&db, ""));
    assert_eq!(
        (report.delivered, report.dead_lettered),
        (1, 0),
        "{report:?}; dead letters: {:?}",
        dead_letters(&mut c)
    );
}

/// A stop whose time runs out leaves the rows still in flight in the outbox (delivered again by
/// the next run) and says how many. Rows whose reports come in while the producer closes are
/// removed like any other, and are not counted as left behind.
#[test]
fn a_stop_that_runs_out_of_time_counts_only_the_rows_it_left() {
    let db = TestDb::new(Backend::Postgres, "abandon");
    let topic = common::create_topic("abandon", 6);
    let mut c = PgConnection::establish(&db.url).unwrap();
    let rows = 50_000;
    common::insert_rows(&mut c, &topic, 1, rows, 100);
    let mut config = common::config(&db, "");
    config.relay.shutdown_timeout_ms = 1;
    // Big reads: a stop is likely to find rows in flight.
    config.relay.batch_size = 5_000;
    // Stopped mid-stream up to 4 times, or until a stop leaves rows behind.
    let (mut delivered, mut left_behind) = (0, 0);
    for _ in 0..4 {
        let before = c.count("devour_outbox");
        let handle = relay::start(&config, RunOptions::default()).unwrap();
        wait_for("deliveries under way", || {
            c.count("devour_outbox") < before - 5_000
        });
        handle.shutdown();
        let report = handle.join().unwrap();
        let left = c.count("devour_outbox");
        delivered += report.delivered as i64;
        assert_eq!(
            delivered + left,
            rows,
            "every row is either delivered (and removed) or still in the outbox: {report:?}"
        );
        assert!(
            report.abandoned as i64 <= left,
            "{} rows reported left in flight, but only {left} are in the outbox: {report:?}",
            report.abandoned
        );
        left_behind = report.abandoned;
        if left_behind > 0 {
            break;
        }
    }
    eprintln!("rows the last stop left in flight: {left_behind}");
    // The next run delivers what was left: nothing is lost, and every key's order holds.
    common::relay_drain(&common::config(&db, ""));
    assert_eq!(c.count("devour_outbox"), 0);
    let msgs = common::consume_seqs(&topic, rows as usize, Duration::from_secs(60));
    common::check_delivery(&msgs, 1..=rows);
}
