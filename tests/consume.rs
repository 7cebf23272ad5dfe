//! `devour consume` in process, against the real broker and databases: outbox → relay → consume
//! end to end, offsets committed only after success, retries, dead letters, undecodable
//! payloads, panics, simple consumers, concurrency, and the inbox's exactly-once effects.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::consume::{
    accept, committed, drain, offsets_reader, produce, produce_seqs, read_all, recording, rewind,
    Out, Seen,
};
use common::{config, create_topic, Backend, TestDb};
use devour::consume::DigestError;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;

const T: Duration = Duration::from_secs(60);

fn route(name: &str, topic: &str, extra: &str) -> String {
    format!(
        "[consumers.{name}]\ntopic = \"{topic}\"\nhandler = \"record\"\ngroup = \"{}\"\n{extra}\n",
        common::unique(name)
    )
}

/// Per partition, offsets strictly increase in the order the handler saw them (first attempts).
fn assert_partition_order(calls: &[Seen]) {
    let mut last: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for c in calls.iter().filter(|c| c.attempt == 1) {
        if let Some(prev) = last.insert((c.topic.clone(), c.partition), c.offset) {
            assert!(
                prev < c.offset,
                "partition {}: offset {} handled after {prev}",
                c.partition,
                c.offset
            );
        }
    }
}

fn end_to_end(backend: Backend) {
    let db = TestDb::new(backend, "consume_e2e");
    let topic = create_topic("consume-e2e", 4);
    let cfg = config(&db, &route("e2e", &topic, ""));
    match backend {
        Backend::Postgres => common::insert_rows(
            &mut PgConnection::establish(&db.url).unwrap(),
            &topic,
            0,
            2000,
            50,
        ),
        Backend::Sqlite => common::insert_rows(
            &mut SqliteConnection::establish(db.diesel_url()).unwrap(),
            &topic,
            0,
            2000,
            50,
        ),
    }
    let relay = common::relay_drain(&cfg);
    assert_eq!(relay.delivered, 2000);

    let (registry, calls) = recording(accept());
    let report = drain(&cfg, "e2e", &registry, T);
    let calls = calls.lock().unwrap().clone();
    assert_eq!(report.processed, 2000, "{report:?}");
    let seqs: BTreeSet<i64> = calls.iter().map(Seen::seq).collect();
    assert_eq!(
        seqs,
        (0..2000).collect::<BTreeSet<_>>(),
        "every outbox row reached the handler"
    );
    assert_eq!(calls.len(), 2000, "each message once");
    assert_partition_order(&calls);
    // Per key, seqs in commit order; and the devour headers reached the handler.
    let mut per_key: BTreeMap<String, i64> = BTreeMap::new();
    for c in &calls {
        let key = c.key.clone().expect("outbox rows have keys");
        if let Some(prev) = per_key.insert(key.clone(), c.seq()) {
            assert!(prev < c.seq(), "key {key}: seq {} after {prev}", c.seq());
        }
        assert_eq!(c.event.as_deref(), Some("create"));
        assert!(c.message_id.is_some(), "message-id header missing: {c:?}");
    }
    // The offsets are committed: a second run of the route finds nothing new.
    let (registry, again) = recording(accept());
    let report = drain(&cfg, "e2e", &registry, T);
    assert_eq!((report.processed, again.lock().unwrap().len()), (0, 0));
}

#[test]
fn outbox_to_relay_to_consume_postgres() {
    end_to_end(Backend::Postgres);
}

#[test]
fn outbox_to_relay_to_consume_sqlite() {
    end_to_end(Backend::Sqlite);
}

#[test]
fn a_handler_failing_three_times_then_succeeding_commits_only_after() {
    failing_three_times_then_succeeding("", 10);
}

#[test]
fn a_handler_failing_three_times_then_succeeding_commits_only_after_with_workers() {
    failing_three_times_then_succeeding("concurrency = 2", 10);
}

/// As above with workers, when more messages wait than the worker's queue holds: the poll
/// thread, blocked handing it the next one, still stores what was finished.
#[test]
fn a_handler_failing_three_times_then_succeeding_commits_only_after_with_a_full_worker_queue() {
    failing_three_times_then_succeeding("concurrency = 2", 2_000);
}

#[test]
fn a_handler_failing_three_times_then_succeeding_commits_only_after_with_an_inbox() {
    failing_three_times_then_succeeding("inbox = true", 10);
}

/// Message 4 of `n` (one partition) fails three times: it is retried, the messages after it
/// wait, the ones before it are committed meanwhile, and nothing from it on until it succeeds.
fn failing_three_times_then_succeeding(extra: &str, n: i64) {
    let db = TestDb::new(Backend::Sqlite, "consume_retry");
    let topic = create_topic("consume-retry", 1);
    produce_seqs(&topic, n, 1);
    let name = "retry";
    let r = route(
        name,
        &topic,
        &format!(
            "retry = {{ max_attempts = 5, initial_backoff_ms = 300, max_backoff_ms = 300 }}\n\
             properties = {{ \"auto.commit.interval.ms\" = 100 }}\n{extra}"
        ),
    );
    let cfg = config(&db, &r);
    let group = cfg.consumers[name].group.clone();
    let succeeded = Arc::new(AtomicBool::new(false));
    let s = succeeded.clone();
    let behaviour: common::consume::Behaviour = Arc::new(move |seen, _| {
        if seen.seq() == 4 {
            if seen.attempt <= 3 {
                return Err(DigestError::retry(format!(
                    "attempt {} fails",
                    seen.attempt
                )));
            }
            s.store(true, Ordering::SeqCst);
        }
        Ok(())
    });
    let (registry, calls) = recording(behaviour);
    // Watch the group's committed offset while message 4 is failing.
    let watching = Arc::new(AtomicBool::new(true));
    let (w, s2, g, t) = (
        watching.clone(),
        succeeded.clone(),
        group.clone(),
        topic.clone(),
    );
    let watcher = std::thread::spawn(move || {
        let reader = offsets_reader(&g);
        let mut seen_while_failing = Vec::new();
        while w.load(Ordering::SeqCst) {
            if !s2.load(Ordering::SeqCst) {
                seen_while_failing.push(committed(&reader, &t, 1)[0]);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        seen_while_failing
    });
    let report = drain(&cfg, name, &registry, T);
    watching.store(false, Ordering::SeqCst);
    let while_failing = watcher.join().unwrap();
    let calls = calls.lock().unwrap().clone();
    let attempts: Vec<u32> = calls
        .iter()
        .filter(|c| c.seq() == 4)
        .map(|c| c.attempt)
        .collect();
    assert_eq!(
        attempts,
        vec![1, 2, 3, 4],
        "message 4 is tried until it succeeds"
    );
    assert_eq!(
        (report.processed, report.retries, report.dead_lettered),
        (n as u64, 3, 0),
        "{report:?}"
    );
    // Offsets are per-partition watermarks: while offset 4 was failing, nothing at or past it
    // may be committed (committed offset = next to read, so at most 4).
    assert!(
        !while_failing.is_empty(),
        "the watcher sampled nothing during the failures"
    );
    let max = *while_failing.iter().max().unwrap();
    assert!(
        max <= 4,
        "committed {max} while offset 4 had not succeeded: {while_failing:?}"
    );
    // ... and the messages before it were committed meanwhile (the watcher saw a real commit).
    assert!(
        while_failing.contains(&4),
        "offsets 0-3 were not committed while offset 4 was retried: {while_failing:?}"
    );
    // The messages after 4 waited for it (order within the partition). With an inbox, the
    // messages before it were handled again in a transaction of their own: count each
    // message's first call.
    let mut seen_offsets = BTreeSet::new();
    let firsts: Vec<Seen> = calls
        .iter()
        .filter(|c| seen_offsets.insert(c.offset))
        .cloned()
        .collect();
    assert_partition_order(&firsts);
    let order: Vec<i64> = firsts.iter().map(Seen::seq).collect();
    assert_eq!(order, (0..n).collect::<Vec<_>>());
    assert_eq!(
        committed(&offsets_reader(&group), &topic, 1),
        vec![n],
        "all committed after success"
    );
}

#[test]
fn permanent_errors_and_exhausted_retries_go_to_the_dead_letter_topic_and_the_consumer_goes_on() {
    let db = TestDb::new(Backend::Sqlite, "consume_dlq");
    let topic = create_topic("consume-dlq", 2);
    let dlq = format!("{topic}.dlq");
    produce(
        &topic,
        &[
            Out::seq("a", 0),
            Out {
                key: Some("b"),
                payload: Some(br#"{"seq": 1, "fatal": true}"#.to_vec()),
                headers: vec![("trace", "t-1")],
            },
            Out::seq("a", 2),
            Out::seq("c", 3),
            Out::seq("a", 4),
        ],
    );
    let name = "dlq";
    let cfg = config(
        &db,
        &route(
            name,
            &topic,
            "retry = { max_attempts = 2, initial_backoff_ms = 10 }",
        ),
    );
    let behaviour: common::consume::Behaviour = Arc::new(|seen, _| match seen.seq() {
        1 => Err(DigestError::give_up("this order can never be billed")),
        3 => Err(DigestError::retry("downstream says no")),
        _ => Ok(()),
    });
    let (registry, calls) = recording(behaviour);
    let report = drain(&cfg, name, &registry, T);
    assert_eq!(
        (report.processed, report.dead_lettered),
        (3, 2),
        "{report:?}"
    );
    let calls = calls.lock().unwrap().clone();
    let tries = |s: i64| calls.iter().filter(|c| c.seq() == s).count();
    assert_eq!(
        (tries(1), tries(3)),
        (1, 2),
        "give_up is not retried; retry stops at max_attempts"
    );
    let dead = read_all(&dlq, Duration::from_secs(30));
    assert_eq!(dead.len(), 2, "dead letters: {dead:?}");
    let group = cfg.consumers[name].group.clone();
    for d in &dead {
        let h: BTreeMap<&str, &str> = d
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let payload: serde_json::Value =
            serde_json::from_slice(d.payload.as_deref().unwrap()).unwrap();
        let seq = payload["seq"].as_i64().unwrap();
        let original = calls
            .iter()
            .find(|c| c.seq() == seq)
            .unwrap_or_else(|| panic!("dead letter of seq {seq}, never handled: {d:?}"));
        let header = |k: &str| -> &str {
            h.get(k)
                .copied()
                .unwrap_or_else(|| panic!("dead letter without {k}: {h:?}"))
        };
        assert_eq!(header("devour-dlq-topic"), topic, "{h:?}");
        assert_eq!(
            header("devour-dlq-partition"),
            original.partition.to_string(),
            "{h:?}"
        );
        assert_eq!(
            header("devour-dlq-offset"),
            original.offset.to_string(),
            "{h:?}"
        );
        assert_eq!(header("devour-dlq-group"), group, "{h:?}");
        assert_eq!(header("devour-dlq-route"), name, "{h:?}");
        assert_eq!(d.key.as_deref(), original.key.as_deref(), "the key is kept");
        let failed_at: i64 = header("devour-dlq-failed-at-ms")
            .parse()
            .unwrap_or_else(|e| panic!("devour-dlq-failed-at-ms: {e}: {h:?}"));
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        assert!(
            (now_ms - 120_000..=now_ms).contains(&failed_at),
            "devour-dlq-failed-at-ms {failed_at} is not within this test's run (now {now_ms})"
        );
        match seq {
            1 => {
                assert_eq!(h["devour-dlq-attempts"], "1");
                assert!(
                    h["devour-dlq-error"].contains("can never be billed"),
                    "{h:?}"
                );
                assert_eq!(h["trace"], "t-1", "original headers are kept");
            }
            3 => {
                assert_eq!(h["devour-dlq-attempts"], "2");
                assert!(
                    h["devour-dlq-error"].contains("downstream says no"),
                    "{h:?}"
                );
            }
            other => panic!("seq {other} should not be dead-lettered"),
        }
    }
    // Committed offset = next to read; -1 for a partition that had no messages.
    let committed: i64 = committed(&offsets_reader(&group), &topic, 2)
        .iter()
        .map(|o| o.max(&0))
        .sum();
    assert_eq!(committed, 5, "all 5 committed, the dead-lettered ones too");
}

#[test]
fn undecodable_payloads_go_to_the_dead_letter_topic() {
    let db = TestDb::new(Backend::Sqlite, "consume_undecodable");
    let topic = create_topic("consume-undecodable", 1);
    let dlq = create_topic("consume-undecodable-dlq", 1);
    produce(
        &topic,
        &[
            Out::seq("a", 0),
            Out {
                key: Some("a"),
                payload: Some(b"not json {".to_vec()),
                headers: vec![],
            },
            Out::seq("a", 2),
            Out {
                key: Some("a"),
                payload: Some(br#"{"seq": "three"}"#.to_vec()),
                headers: vec![],
            },
        ],
    );
    #[derive(serde::Deserialize)]
    struct Typed {
        seq: i64,
    }
    struct TypedHandler(Arc<std::sync::Mutex<Vec<i64>>>);
    impl devour::consume::Consumer for TypedHandler {
        type Message = Typed;
        fn digest(
            &mut self,
            _: &devour::consume::Meta<'_>,
            m: devour::consume::Payload<'_, Typed>,
            _: &mut devour::consume::Ctx<'_>,
        ) -> Result<(), DigestError> {
            self.0.lock().unwrap().push(m.into_obj().unwrap().seq);
            Ok(())
        }
    }
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut registry = devour::consume::Registry::new();
    let s = seen.clone();
    registry.register("typed", move || TypedHandler(s.clone()));
    let cfg = config(
        &db,
        &format!(
            "[consumers.typed]\ntopic = \"{topic}\"\nhandler = \"typed\"\ndump = \"obj\"\ndead_letter_topic = \"{dlq}\"\ngroup = \"{}\"\n",
            common::unique("typed")
        ),
    );
    let report = drain(&cfg, "typed", &registry, T);
    assert_eq!(
        *seen.lock().unwrap(),
        vec![0, 2],
        "only decodable messages reach the handler"
    );
    assert_eq!((report.processed, report.dead_lettered), (2, 2));
    let dead = read_all(&dlq, Duration::from_secs(30));
    let errors: Vec<String> = dead
        .iter()
        .map(|d| {
            d.headers
                .iter()
                .find(|(k, _)| k == "devour-dlq-error")
                .unwrap()
                .1
                .clone()
        })
        .collect();
    assert_eq!(dead.len(), 2, "{errors:?}");
    assert!(
        errors.iter().all(|e| e.starts_with("undecodable")),
        "{errors:?}"
    );
    assert_eq!(
        dead[0].payload.as_deref(),
        Some(&b"not json {"[..]),
        "the payload is kept as it was"
    );
}

#[test]
fn a_panicking_handler_is_retried_not_fatal() {
    let db = TestDb::new(Backend::Sqlite, "consume_panic");
    let topic = create_topic("consume-panic", 1);
    produce_seqs(&topic, 3, 1);
    let cfg = config(
        &db,
        &route("panic", &topic, "retry = { initial_backoff_ms = 10 }"),
    );
    let behaviour: common::consume::Behaviour = Arc::new(|seen, _| {
        if seen.seq() == 1 && seen.attempt == 1 {
            panic!("handler bug on seq 1");
        }
        Ok(())
    });
    let (registry, calls) = recording(behaviour);
    let report = drain(&cfg, "panic", &registry, T);
    assert_eq!(
        (report.processed, report.retries, report.dead_lettered),
        (3, 1, 0),
        "{report:?}"
    );
    let order: Vec<(i64, u32)> = calls
        .lock()
        .unwrap()
        .iter()
        .map(|c| (c.seq(), c.attempt))
        .collect();
    assert_eq!(order, vec![(0, 1), (1, 1), (1, 2), (2, 1)]);
}

#[test]
fn simple_consumers_each_read_every_partition() {
    let db = TestDb::new(Backend::Sqlite, "consume_simple");
    let topic = create_topic("consume-simple", 3);
    produce_seqs(&topic, 300, 30);
    // Two simple consumers at once, each in a group of its own (a simple consumer resumes from
    // its group's committed offsets): no group sharing, each reads all 3 partitions.
    let runs: Vec<_> = (0..2)
        .map(|_| {
            let cfg = config(&db, &route("simple", &topic, "consumer_type = \"simple\""));
            std::thread::spawn(move || {
                let (registry, calls) = recording(accept());
                drain(&cfg, "simple", &registry, T);
                let calls = calls.lock().unwrap().clone();
                calls
            })
        })
        .collect();
    for run in runs {
        let calls = run.join().unwrap();
        let partitions: BTreeSet<i32> = calls.iter().map(|c| c.partition).collect();
        assert_eq!(partitions, BTreeSet::from([0, 1, 2]));
        let seqs: BTreeSet<i64> = calls.iter().map(Seen::seq).collect();
        assert_eq!(seqs.len(), 300, "a simple consumer reads every message");
        assert_partition_order(&calls);
    }
}

#[test]
fn concurrency_handles_partitions_in_parallel_and_keeps_their_order() {
    let db = TestDb::new(Backend::Sqlite, "consume_concurrency");
    let topic = create_topic("consume-concurrency", 8);
    produce_seqs(&topic, 800, 64);
    let cfg = config(&db, &route("par", &topic, "concurrency = 4"));
    let busy = Arc::new(AtomicU32::new(0));
    let peak = Arc::new(AtomicU32::new(0));
    let (b, p) = (busy.clone(), peak.clone());
    let behaviour: common::consume::Behaviour = Arc::new(move |_, _| {
        let now = b.fetch_add(1, Ordering::SeqCst) + 1;
        p.fetch_max(now, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(2));
        b.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    });
    let (registry, calls) = recording(behaviour);
    let report = drain(&cfg, "par", &registry, T);
    let calls = calls.lock().unwrap().clone();
    assert_eq!(report.processed, 800);
    assert_eq!(
        calls.iter().map(Seen::seq).collect::<BTreeSet<_>>().len(),
        800
    );
    assert_partition_order(&calls);
    assert!(
        peak.load(Ordering::SeqCst) > 1,
        "handlers never ran in parallel"
    );
}

// --- inbox ---------------------------------------------------------------------------------

const EFFECTS: &str = "CREATE TABLE effects (seq BIGINT NOT NULL, note TEXT NOT NULL)";

/// Inserts the message's effect through the inbox transaction.
fn write_effect(seen: &Seen, ctx: &mut devour::consume::Ctx<'_>) -> Result<(), DigestError> {
    let sql = format!(
        "INSERT INTO effects (seq, note) VALUES ({}, 'attempt {}')",
        seen.seq(),
        seen.attempt
    );
    if let Some(c) = ctx.postgres() {
        c.batch_execute(&sql)?;
    } else if let Some(c) = ctx.sqlite() {
        c.batch_execute(&sql)?;
    } else {
        return Err(DigestError::give_up("no inbox transaction"));
    }
    Ok(())
}

fn effects(db: &TestDb) -> BTreeMap<i64, i64> {
    #[derive(QueryableByName)]
    struct E {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        seq: i64,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let q = "SELECT seq, CAST(count(*) AS BIGINT) AS n FROM effects GROUP BY seq";
    let rows: Vec<E> = match db.backend {
        Backend::Postgres => diesel::sql_query(q)
            .load(&mut PgConnection::establish(&db.url).unwrap())
            .unwrap(),
        Backend::Sqlite => diesel::sql_query(q)
            .load(&mut SqliteConnection::establish(db.diesel_url()).unwrap())
            .unwrap(),
    };
    rows.into_iter().map(|e| (e.seq, e.n)).collect()
}

fn exec(db: &TestDb, sql: &str) {
    match db.backend {
        Backend::Postgres => PgConnection::establish(&db.url)
            .unwrap()
            .batch_execute(sql)
            .unwrap(),
        Backend::Sqlite => SqliteConnection::establish(db.diesel_url())
            .unwrap()
            .batch_execute(sql)
            .unwrap(),
    }
}

/// `extra`: more route keys (e.g. `concurrency`).
fn inbox_exactly_once(backend: Backend, extra: &str) {
    let db = TestDb::new(backend, "consume_inbox");
    exec(&db, EFFECTS);
    let topic = create_topic("consume-inbox", 3);
    // 300 messages with message ids; then 20 of them again, as a relay that took over a shard
    // whose rows were acknowledged but not removed sends them: same message-id, new offsets,
    // marked `possible-duplicate`. Then 5 new messages marked so too (a mark the relay sets
    // on rows it cannot know were sent): handled, since no transaction handled their ids.
    let ids: Vec<String> = (0..305).map(|i| format!("mid-{i:03}")).collect();
    let keys: Vec<String> = (0..30).map(|k| format!("k{k}")).collect();
    let msg = |i: usize| Out {
        headers: vec![("message-id", ids[i].as_str())],
        ..Out::seq(&keys[i % 30], i as i64)
    };
    let resent = |i: usize| Out {
        headers: vec![
            ("message-id", ids[i].as_str()),
            ("possible-duplicate", "true"),
        ],
        ..Out::seq(&keys[i % 30], i as i64)
    };
    produce(&topic, &(0..300).map(msg).collect::<Vec<_>>());
    produce(&topic, &(100..120).map(resent).collect::<Vec<_>>());
    produce(&topic, &(300..305).map(resent).collect::<Vec<_>>());
    let name = "inbox";
    let cfg = config(
        &db,
        &route(
            name,
            &topic,
            &format!(
                "inbox = true\ninbox_batch = 64\nretry = {{ initial_backoff_ms = 10 }}\n{extra}"
            ),
        ),
    );
    // Seq 150's first attempt fails after writing its effect: that write must roll back.
    let behaviour: common::consume::Behaviour = Arc::new(|seen, ctx| {
        write_effect(seen, ctx)?;
        if seen.seq() == 150 && seen.attempt == 1 {
            return Err(DigestError::retry("fails once after writing"));
        }
        Ok(())
    });
    let (registry, _) = recording(behaviour.clone());
    let report = drain(&cfg, name, &registry, T);
    assert_eq!(
        (report.processed, report.duplicates),
        (305, 20),
        "{report:?}"
    );
    let e = effects(&db);
    assert_eq!(e.len(), 305, "every message has its effect");
    let twice: Vec<_> = e.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "effects not exactly once: {twice:?}");

    // The whole topic again (offsets rewound, as after a crash before any commit).
    rewind(&cfg.consumers[name].group, &topic, 3);
    let (registry, calls) = recording(behaviour);
    let report = drain(&cfg, name, &registry, T);
    assert_eq!(
        (report.processed, report.duplicates),
        (0, 325),
        "{report:?}"
    );
    assert!(
        calls.lock().unwrap().is_empty(),
        "the handler saw redeliveries"
    );
    assert_eq!(effects(&db), e, "redelivery changed the effects");
}

#[test]
fn inbox_gives_exactly_once_effects_postgres() {
    inbox_exactly_once(Backend::Postgres, "");
}

/// Workers (one per partition here), each with its own connection and transactions.
#[test]
fn inbox_gives_exactly_once_effects_with_concurrency_postgres() {
    inbox_exactly_once(Backend::Postgres, "concurrency = 3");
}

#[test]
fn inbox_gives_exactly_once_effects_sqlite() {
    inbox_exactly_once(Backend::Sqlite, "");
}

#[test]
fn inbox_without_migrations_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("empty.db").display());
    let cfg = devour::Config::from_toml_str(
        &format!(
            "[database]\nurl = \"{url}\"\n[kafka]\nhosts = \"{}\"\n[consumers.x]\ntopic = \"t\"\nhandler = \"print\"\ninbox = true\n",
            common::kafka_hosts()
        ),
        devour::config::Origin::Defaults,
        &Default::default(),
    )
    .unwrap();
    let t = Instant::now();
    let err = devour::consume::run(
        &cfg,
        "x",
        &devour::consume::Registry::new(),
        devour::consume::RunOptions::drain(),
        Arc::new(AtomicBool::new(false)),
    )
    .unwrap_err();
    assert!(err.is_usage(), "{err}");
    assert!(err.to_string().contains("devour migrate"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(10));
}

#[test]
fn old_inbox_rows_are_cleaned_at_start() {
    let db = TestDb::new(Backend::Sqlite, "consume_inbox_cleanup");
    let topic = create_topic("consume-inbox-cleanup", 1);
    produce_seqs(&topic, 5, 1);
    let cfg = config(
        &db,
        &route("clean", &topic, "inbox = true\ninbox_retention_hours = 24"),
    );
    let group = cfg.consumers["clean"].group.clone();
    exec(
        &db,
        &format!(
            "INSERT INTO devour_inbox_batches (consumer_group, topic, kafka_partition, first_offset, last_offset, replay, min_key, max_key, keys, processed_at) VALUES \
             ('{group}', 't', 0, 0, 0, 0, 'old', 'old', '[\"old\"]', strftime('%Y-%m-%d %H:%M:%f', 'now', '-25 hours')), \
             ('{group}', 't', 0, 1, 1, 0, 'recent', 'recent', '[\"recent\"]', strftime('%Y-%m-%d %H:%M:%f', 'now', '-23 hours')), \
             ('other-group', 't', 0, 0, 0, 0, 'old', 'old', '[\"old\"]', strftime('%Y-%m-%d %H:%M:%f', 'now', '-25 hours')); \
             INSERT INTO devour_inbox_offsets (consumer_group, topic, kafka_partition, through_offset, previous_offset, processed_at) VALUES \
             ('{group}', 'old', 0, 0, 0, strftime('%Y-%m-%d %H:%M:%f', 'now', '-25 hours')), \
             ('{group}', 'recent', 0, 1, 1, strftime('%Y-%m-%d %H:%M:%f', 'now', '-23 hours')), \
             ('other-group', 'old', 0, 0, 0, strftime('%Y-%m-%d %H:%M:%f', 'now', '-25 hours'))"
        ),
    );
    let (registry, _) = recording(accept());
    let report = drain(&cfg, "clean", &registry, T);
    assert_eq!(report.processed, 5);
    #[derive(QueryableByName, Debug, PartialEq)]
    struct K {
        #[diesel(sql_type = diesel::sql_types::Text)]
        consumer_group: String,
        #[diesel(sql_type = diesel::sql_types::Text)]
        key: String,
    }
    let mut conn = SqliteConnection::establish(db.diesel_url()).unwrap();
    let pairs = |rows: Vec<K>| -> Vec<(String, String)> {
        rows.into_iter()
            .map(|k| (k.consumer_group, k.key))
            .collect()
    };
    let batches = pairs(
        diesel::sql_query(
            "SELECT consumer_group, min_key AS key FROM devour_inbox_batches WHERE min_key IN ('old', 'recent') ORDER BY 1, 2",
        )
        .load(&mut conn)
        .unwrap(),
    );
    let marks = pairs(
        diesel::sql_query(
            "SELECT consumer_group, topic AS key FROM devour_inbox_offsets WHERE topic IN ('old', 'recent') ORDER BY 1, 2",
        )
        .load(&mut conn)
        .unwrap(),
    );
    let expected = vec![
        (group.clone(), "recent".to_string()),
        ("other-group".to_string(), "old".to_string()),
    ];
    assert_eq!(
        (batches, marks),
        (expected.clone(), expected),
        "only this group's rows older than inbox_retention_hours are deleted"
    );
}

#[test]
fn a_transaction_that_fails_at_commit_dead_letters_only_its_message() {
    commit_fails(
        "consume-commit-fails",
        "max_attempts = 2, initial_backoff_ms = 10",
        "",
    );
}

/// A batch of one is the failing message itself: its attempts are counted (it once retried at
/// attempt 1 forever).
#[test]
fn a_transaction_that_fails_at_commit_in_a_batch_of_one_is_retried_then_dead_lettered() {
    commit_fails(
        "consume-commit-fails-one",
        "max_attempts = 2, initial_backoff_ms = 10",
        "inbox_batch = 1",
    );
}

/// With one attempt, the first failure dead-letters it (this once panicked).
#[test]
fn a_transaction_that_fails_at_commit_with_one_attempt_is_dead_lettered() {
    commit_fails(
        "consume-commit-fails-once",
        "max_attempts = 1",
        "inbox_batch = 1",
    );
}

fn commit_fails(topic: &str, retry: &str, extra: &str) {
    let db = TestDb::new(Backend::Postgres, "consume_commit_fails");
    exec(
        &db,
        "CREATE TABLE effects (seq BIGINT NOT NULL, note TEXT NOT NULL); \
         CREATE TABLE once (v INT UNIQUE DEFERRABLE INITIALLY DEFERRED); INSERT INTO once VALUES (1);",
    );
    let topic = create_topic(topic, 1);
    produce_seqs(&topic, 10, 2);
    let name = "commit";
    let cfg = config(
        &db,
        &route(
            name,
            &topic,
            &format!("inbox = true\nretry = {{ {retry} }}\n{extra}"),
        ),
    );
    // Seq 3 breaks a deferred constraint: its statement passes, its COMMIT fails.
    let behaviour: common::consume::Behaviour = Arc::new(|seen, ctx| {
        write_effect(seen, ctx)?;
        if seen.seq() == 3 {
            ctx.postgres()
                .unwrap()
                .batch_execute("INSERT INTO once VALUES (1)")?;
        }
        Ok(())
    });
    let (registry, _) = recording(behaviour);
    let report = drain(&cfg, name, &registry, T);
    assert_eq!(
        (report.processed, report.dead_lettered),
        (9, 1),
        "{report:?}"
    );
    let e = effects(&db);
    assert_eq!(
        e.keys().copied().collect::<Vec<_>>(),
        vec![0, 1, 2, 4, 5, 6, 7, 8, 9]
    );
    assert!(e.values().all(|n| *n == 1), "{e:?}");
    let error = the_one_dead_letter_error(&topic);
    assert!(error.contains("database"), "{error}");
}

/// The `devour-dlq-error` header of the one message in `topic`'s dead-letter topic.
fn the_one_dead_letter_error(topic: &str) -> String {
    let dead = read_all(&format!("{topic}.dlq"), Duration::from_secs(30));
    assert_eq!(dead.len(), 1, "{dead:?}");
    dead[0]
        .headers
        .iter()
        .find(|(k, _)| k == "devour-dlq-error")
        .expect("devour-dlq-error header")
        .1
        .clone()
}

/// A handler that opens a transaction of its own and panics inside it, or returns with it still
/// open: the inbox transaction must not go on inside it (every later batch would then only
/// release a savepoint, never commit, and vanish when the connection closes).
#[test]
fn a_handler_leaving_its_own_transaction_open_commits_nothing_of_it() {
    let db = TestDb::new(Backend::Postgres, "consume_nested_tx");
    exec(&db, EFFECTS);
    let topic = create_topic("consume-nested-tx", 1);
    produce_seqs(&topic, 20, 2);
    let name = "nested";
    let cfg = config(
        &db,
        &route(
            name,
            &topic,
            "inbox = true\ninbox_batch = 5\nretry = { max_attempts = 3, initial_backoff_ms = 10 }",
        ),
    );
    let behaviour: common::consume::Behaviour = Arc::new(|seen, ctx| {
        write_effect(seen, ctx)?;
        let c = ctx.postgres().unwrap();
        match (seen.seq(), seen.attempt) {
            // Panics inside its own transaction, once.
            (3, 1) => c
                .transaction::<(), diesel::result::Error, _>(|c| {
                    c.batch_execute("INSERT INTO effects (seq, note) VALUES (3, 'inside')")?;
                    panic!("panics inside its own transaction")
                })
                .unwrap(),
            // Always leaves a transaction of its own open.
            (12, _) => {
                use diesel::connection::{AnsiTransactionManager, TransactionManager};
                AnsiTransactionManager::begin_transaction(c)?;
            }
            _ => {}
        }
        Ok(())
    });
    let (registry, _) = recording(behaviour);
    let report = drain(&cfg, name, &registry, T);
    assert_eq!(
        (report.processed, report.dead_lettered),
        (19, 1),
        "{report:?}"
    );
    // Read after the consumer's connections are gone: only committed work is here.
    let e = effects(&db);
    let expected: Vec<i64> = (0..20).filter(|s| *s != 12).collect();
    assert_eq!(e.keys().copied().collect::<Vec<_>>(), expected, "{e:?}");
    assert!(
        e.values().all(|n| *n == 1),
        "effects not exactly once: {e:?}"
    );
    let error = the_one_dead_letter_error(&topic);
    assert!(error.contains("transaction of its own open"), "{error}");
}

/// A route's own brokers and credentials (`bootstrap.*`, `sasl.*`, … in its properties) are the
/// dead-letter producer's too: here `[kafka] hosts` leads nowhere, and a dead letter sent there
/// would wait forever while the partition stood still.
#[test]
fn dead_letters_go_through_the_route_s_own_connection_settings() {
    let db = TestDb::new(Backend::Sqlite, "consume_dlq_route_conn");
    let topic = create_topic("consume-dlq-route-conn", 1);
    produce(
        &topic,
        &[Out::seq("a", 0), Out::seq("b", 1), Out::seq("c", 2)],
    );
    let name = "own";
    let cfg = devour::Config::from_toml_str(
        &format!(
            "[database]\nurl = \"{}\"\n[kafka]\nhosts = \"127.0.0.1:9\"\n{}\
             [consumers.{name}.properties]\n\"bootstrap.servers\" = \"{}\"\n",
            db.url,
            route(name, &topic, "retry = { max_attempts = 1 }"),
            common::kafka_hosts()
        ),
        devour::config::Origin::Defaults,
        &Default::default(),
    )
    .unwrap();
    let behaviour: common::consume::Behaviour = Arc::new(|seen, _| match seen.seq() {
        1 => Err(DigestError::give_up("never")),
        _ => Ok(()),
    });
    let (registry, _) = recording(behaviour);
    let report = drain(&cfg, name, &registry, T);
    assert_eq!(
        (report.processed, report.dead_lettered),
        (2, 1),
        "{report:?}"
    );
    let dead = read_all(&format!("{topic}.dlq"), Duration::from_secs(30));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].key.as_deref(), Some("b"));
}

/// An inbox route's workers each hold a connection: when the server allows the consumer fewer
/// than it needs at once, the start fails saying so, instead of workers waiting later.
#[test]
fn an_inbox_consumer_the_server_allows_too_few_connections_fails_at_start() {
    let db = TestDb::new(Backend::Postgres, "consume_conn_limit");
    let topic = create_topic("consume-conn-limit", 3);
    let limited = common::LimitedRole::new(&db, 2);
    let url = &limited.url;
    let cfg = devour::Config::from_toml_str(
        &format!(
            "[database]\nurl = \"{url}\"\nconnect_timeout_ms = 2000\n[kafka]\nhosts = \"{}\"\n{}",
            common::kafka_hosts(),
            route("limited", &topic, "inbox = true\nconcurrency = 3")
        ),
        devour::config::Origin::Defaults,
        &Default::default(),
    )
    .unwrap();
    let (registry, seen) = recording(accept());
    let result = devour::consume::run(
        &cfg,
        "limited",
        &registry,
        devour::consume::RunOptions::drain(),
        Arc::new(AtomicBool::new(false)),
    );
    drop(limited);
    let err = result.expect_err("4 connections at once, the role allows 2");
    assert!(
        err.to_string()
            .contains("consumers.limited (inbox, concurrency 3) needs 4 connections at once"),
        "{err}"
    );
    assert!(seen.lock().unwrap().is_empty(), "nothing was handled");
}

/// `topics = [A, B]`: one route reads both topics, each partition in order.
#[test]
fn a_route_reads_every_topic_it_lists() {
    let db = TestDb::new(Backend::Sqlite, "consume_topics");
    let a = create_topic("consume-topics-a", 2);
    let b = create_topic("consume-topics-b", 1);
    produce_seqs(&a, 30, 5);
    produce(
        &b,
        &(100..110).map(|s| Out::seq("b", s)).collect::<Vec<_>>(),
    );
    let cfg = config(
        &db,
        &format!(
            "[consumers.both]\ntopics = [\"{a}\", \"{b}\"]\nhandler = \"record\"\ngroup = \"{}\"\n",
            common::unique("both")
        ),
    );
    let (registry, calls) = recording(accept());
    let report = drain(&cfg, "both", &registry, T);
    let calls = calls.lock().unwrap().clone();
    let per_topic = |t: &str| -> BTreeSet<i64> {
        calls
            .iter()
            .filter(|c| c.topic == t)
            .map(Seen::seq)
            .collect()
    };
    assert_eq!(per_topic(&a), (0..30).collect(), "{report:?}");
    assert_eq!(per_topic(&b), (100..110).collect(), "{report:?}");
    assert_eq!(report.processed, 40);
    assert_partition_order(&calls);
}

/// `start_from = "latest"`: a new group starts at the end, so only messages produced after it
/// joined are handled.
/// With `start_from = "latest"`, where a group starts is committed as it takes the partitions:
/// a consumer that stops before its first commit (here, a drain with nothing new to read) leaves
/// the next one to go on from there, not from the end as it is then.
#[test]
fn start_from_latest_commits_where_it_starts() {
    latest_pinned("consumer_type = \"balanced\"");
}

/// The same for a simple consumer (it assigns itself every partition, offsets in its group).
#[test]
fn start_from_latest_commits_where_it_starts_simple() {
    latest_pinned("consumer_type = \"simple\"");
}

fn latest_pinned(extra: &str) {
    let db = TestDb::new(Backend::Sqlite, "consume_latest_pin");
    let topic = create_topic("consume-latest-pin", 2);
    produce_seqs(&topic, 10, 2);
    let cfg = config(
        &db,
        &route("pin", &topic, &format!("start_from = \"latest\"\n{extra}")),
    );
    let (registry, calls) = recording(accept());
    let report = drain(&cfg, "pin", &registry, T);
    assert_eq!(report.processed, 0, "{report:?}");
    // The partitions' ends (10 messages in all), not "no offset" (-1).
    let start = committed(&offsets_reader(&cfg.consumers["pin"].group), &topic, 2);
    assert!(
        start.iter().all(|o| *o >= 0) && start.iter().sum::<i64>() == 10,
        "the start is committed: {start:?}"
    );
    produce(
        &topic,
        &(100..105).map(|i| Out::seq("new", i)).collect::<Vec<_>>(),
    );
    let report = drain(&cfg, "pin", &registry, T);
    assert_eq!(report.processed, 5, "{report:?}");
    let seqs: Vec<i64> = calls.lock().unwrap().iter().map(Seen::seq).collect();
    assert_eq!(seqs, (100..105).collect::<Vec<_>>());
}

#[test]
fn start_from_latest_skips_what_was_there_before() {
    let db = TestDb::new(Backend::Sqlite, "consume_latest");
    let topic = create_topic("consume-latest", 1);
    produce_seqs(&topic, 20, 2);
    let cfg = config(&db, &route("latest", &topic, "start_from = \"latest\""));
    let (registry, calls) = recording(accept());
    let stop = Arc::new(AtomicBool::new(false));
    let run = {
        let (cfg, stop) = (cfg.clone(), stop.clone());
        std::thread::spawn(move || {
            devour::consume::run(
                &cfg,
                "latest",
                &registry,
                devour::consume::RunOptions::default(),
                stop,
            )
        })
    };
    // New messages, one at a time, until the consumer (once it has its partition) sees one.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut next = 1000;
    while calls.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no new message was handled");
        produce(&topic, &[Out::seq("new", next)]);
        next += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    run.join().unwrap().unwrap();
    let seqs: Vec<i64> = calls.lock().unwrap().iter().map(Seen::seq).collect();
    assert!(
        seqs.iter().all(|s| *s >= 1000),
        "messages from before the group joined were handled: {seqs:?}"
    );
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "once joined, every new message is handled, in order: {seqs:?}"
    );
}

/// Produces one message to partition 0 of `topic` with `headers`, names as raw bytes: rdkafka's
/// API takes only UTF-8 names, librdkafka's (like other clients) any bytes.
#[allow(unsafe_code)]
fn produce_with_raw_header_names(topic: &str, payload: &[u8], headers: &[(&[u8], &[u8])]) {
    use rdkafka::bindings as rdsys;
    use rdkafka::producer::{BaseProducer, Producer};
    use std::ffi::CString;
    let p: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", common::kafka_hosts())
        .create()
        .unwrap();
    let topic_c = CString::new(topic).unwrap();
    let names: Vec<CString> = headers
        .iter()
        .map(|(k, _)| CString::new(*k).unwrap())
        .collect();
    let vu = |vtype, u| rdsys::rd_kafka_vu_t { vtype, u };
    use rdsys::rd_kafka_vtype_t as V;
    let mut vus = vec![
        vu(
            V::RD_KAFKA_VTYPE_TOPIC,
            rdsys::rd_kafka_vu_s__bindgen_ty_1 {
                cstr: topic_c.as_ptr(),
            },
        ),
        vu(
            V::RD_KAFKA_VTYPE_PARTITION,
            rdsys::rd_kafka_vu_s__bindgen_ty_1 { i32_: 0 },
        ),
        vu(
            V::RD_KAFKA_VTYPE_VALUE,
            rdsys::rd_kafka_vu_s__bindgen_ty_1 {
                mem: rdsys::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_1 {
                    ptr: payload.as_ptr() as *mut _,
                    size: payload.len(),
                },
            },
        ),
    ];
    for (name, (_, value)) in names.iter().zip(headers) {
        vus.push(vu(
            V::RD_KAFKA_VTYPE_HEADER,
            rdsys::rd_kafka_vu_s__bindgen_ty_1 {
                header: rdsys::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_2 {
                    name: name.as_ptr(),
                    val: value.as_ptr().cast(),
                    size: value.len() as isize,
                },
            },
        ));
    }
    // SAFETY: every pointer in `vus` outlives the flush below, which waits for the delivery
    // (librdkafka does not copy the value without RD_KAFKA_MSG_F_COPY; it copies the headers).
    let err =
        unsafe { rdsys::rd_kafka_produceva(p.client().native_ptr(), vus.as_ptr(), vus.len()) };
    assert!(err.is_null(), "rd_kafka_produceva failed");
    p.flush(Duration::from_secs(30)).expect("acked");
}

/// What a handler saw of the headers: (raw name, value) and the names `Meta::headers` gave.
type HeadersSeen = Arc<std::sync::Mutex<Vec<(Vec<(Vec<u8>, Vec<u8>)>, Vec<String>)>>>;

fn header_name_not_utf8(tag: &str, extra: &str) {
    let db = TestDb::new(Backend::Sqlite, tag);
    let topic = create_topic(tag, 1);
    let dlq = create_topic(&format!("{tag}-dlq"), 1);
    let bad_name: &[u8] = b"x-\xff\xfe";
    // Message 0 carries the bad name (and a message-id after it, as the inbox reads it);
    // the handler gives up on it, so it also goes to the dead-letter topic. Message 1 is plain.
    produce_with_raw_header_names(
        &topic,
        br#"{"seq": 0}"#,
        &[(bad_name, b"v"), (b"message-id", b"m-0")],
    );
    produce(&topic, &[Out::seq("a", 1)]);
    struct H(HeadersSeen);
    impl devour::consume::Consumer for H {
        type Message = serde_json::Value;
        fn digest(
            &mut self,
            meta: &devour::consume::Meta<'_>,
            m: devour::consume::Payload<'_, serde_json::Value>,
            _: &mut devour::consume::Ctx<'_>,
        ) -> Result<(), DigestError> {
            let raw = meta
                .raw_headers()
                .map(|(k, v)| (k.to_vec(), v.unwrap_or_default().to_vec()))
                .collect();
            let names = meta.headers().map(|(k, _)| k.to_string()).collect();
            self.0.lock().unwrap().push((raw, names));
            match m.json().and_then(|v| v["seq"].as_i64()) {
                Some(0) => Err(DigestError::give_up("seq 0 is refused")),
                _ => Ok(()),
            }
        }
    }
    let seen: HeadersSeen = Default::default();
    let mut registry = devour::consume::Registry::new();
    let s = seen.clone();
    registry.register("headers", move || H(s.clone()));
    let cfg = config(
        &db,
        &format!(
            "[consumers.headers]\ntopic = \"{topic}\"\nhandler = \"headers\"\ndump = \"json\"\ndead_letter_topic = \"{dlq}\"\ngroup = \"{}\"\n{extra}\n",
            common::unique(tag)
        ),
    );
    let report = drain(&cfg, "headers", &registry, T);
    assert_eq!(
        (report.processed, report.dead_lettered),
        (1, 1),
        "{report:?}"
    );
    let seen = seen.lock().unwrap();
    assert_eq!(
        seen[0].0,
        vec![
            (bad_name.to_vec(), b"v".to_vec()),
            (b"message-id".to_vec(), b"m-0".to_vec())
        ],
        "raw_headers gives the name's bytes as they came"
    );
    assert_eq!(
        seen[0].1,
        vec!["message-id".to_string()],
        "Meta::headers leaves out a name that is not UTF-8"
    );
    let dead = read_all(&dlq, Duration::from_secs(30));
    assert_eq!(dead.len(), 1, "{dead:?}");
    let names: Vec<&str> = dead[0].headers.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        &names[..2],
        ["x-\u{fffd}\u{fffd}", "message-id"],
        "the dead letter keeps the header, with U+FFFD for the bad bytes: {names:?}"
    );
}

#[test]
fn a_header_name_that_is_not_utf8_is_read_as_bytes_and_dead_lettered_with_an_inbox() {
    header_name_not_utf8("consume-badname-inbox", "inbox = true");
}

#[test]
fn a_header_name_that_is_not_utf8_is_read_as_bytes_and_dead_lettered_by_a_worker() {
    header_name_not_utf8("consume-badname-workers", "concurrency = 2");
}

/// A handler that swallows a database error leaves PostgreSQL's transaction aborted, and a
/// COMMIT then rolls back without an error: the batch must fail instead. The other messages'
/// effects commit once; the one that swallowed the error, failing every attempt, is
/// dead-lettered.
#[test]
fn a_handler_swallowing_a_database_error_loses_no_effect() {
    let db = TestDb::new(Backend::Postgres, "consume_swallow");
    exec(&db, EFFECTS);
    let topic = create_topic("consume-swallow", 1);
    produce_seqs(&topic, 10, 1);
    let cfg = config(
        &db,
        &route(
            "swallow",
            &topic,
            "inbox = true\nretry = { max_attempts = 2, initial_backoff_ms = 10 }",
        ),
    );
    let behaviour: common::consume::Behaviour = Arc::new(|seen, ctx| {
        write_effect(seen, ctx)?;
        if seen.seq() == 3 {
            let _ = ctx.postgres().unwrap().batch_execute("SELECT 1 / 0");
        }
        Ok(())
    });
    let (registry, _) = recording(behaviour);
    let report = drain(&cfg, "swallow", &registry, T);
    assert_eq!(
        (report.processed, report.dead_lettered),
        (9, 1),
        "{report:?}"
    );
    let e = effects(&db);
    let expected: BTreeMap<i64, i64> = (0..10).filter(|s| *s != 3).map(|s| (s, 1)).collect();
    assert_eq!(e, expected, "effects once each, none of seq 3");
}
