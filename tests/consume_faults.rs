//! `devour consume` through crashes: `kill -9` of the consumer at random points (every message
//! processed at least once; with the inbox, every effect exactly once), and two consumers of one
//! group where one dies and the other takes over its partitions.
//!
//! The consumer processes are this test binary re-run as `child_consumer_process` with
//! `DEVOUR_TEST_CHILD` set: a user binary with its own handler, as `Registry` is meant for.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::consume::produce_seqs;
use common::{create_topic, Backend, TestDb};
use devour::consume::{Consumer, Ctx, DigestError, Meta, Payload, Registry, RunOptions};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;

/// The handler of the child processes: appends `seq partition offset pid` to `DEVOUR_TEST_OUT`
/// (without inbox) or inserts the effect row through the inbox transaction, then pauses a
/// little so that a kill lands mid-stream.
struct Effect {
    out: Option<std::fs::File>,
}

impl Consumer for Effect {
    type Message = serde_json::Value;

    fn digest(
        &mut self,
        meta: &Meta<'_>,
        m: Payload<'_, serde_json::Value>,
        ctx: &mut Ctx<'_>,
    ) -> Result<(), DigestError> {
        let seq = m.json().and_then(|v| v["seq"].as_i64()).unwrap_or(-1);
        let line = format!(
            "{seq} {} {} {}\n",
            meta.partition,
            meta.offset,
            std::process::id()
        );
        if let Some(c) = ctx.postgres() {
            c.batch_execute(&format!(
                "INSERT INTO effects (seq, part, off, pid) VALUES ({seq}, {}, {}, {})",
                meta.partition,
                meta.offset,
                std::process::id()
            ))?;
        } else if let Some(f) = &mut self.out {
            // One write per line, O_APPEND: survives kill -9 (the page cache is the kernel's).
            f.write_all(line.as_bytes())?;
        }
        std::thread::sleep(Duration::from_micros(300));
        Ok(())
    }
}

/// Not a test: the consumer process the tests below start (and kill), run as
/// `--ignored --exact child_consumer_process`.
#[test]
#[ignore = "the child process of the tests below"]
fn child_consumer_process() {
    let route = std::env::var("DEVOUR_TEST_CHILD").expect("DEVOUR_TEST_CHILD names the route");
    let config = devour::Config::load().expect("child config");
    let out = std::env::var("DEVOUR_TEST_OUT").ok();
    let mut registry = Registry::new();
    registry.register("effect", move || Effect {
        out: out.as_ref().map(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .unwrap()
        }),
    });
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone()).unwrap();
    let drain = std::env::var("DEVOUR_TEST_DRAIN").is_ok();
    let mut options = RunOptions::default();
    options.drain = drain;
    devour::consume::run(&config, &route, &registry, options, stop).expect("child consume");
}

/// Where the children of the test whose configuration is `config` write their stderr.
fn log_of(config: &Path) -> PathBuf {
    config.with_file_name("children.log")
}

fn child(config: &Path, route: &str, out: Option<&Path>, drain: bool) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--ignored",
        "--exact",
        "child_consumer_process",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("DEVOUR_TEST_CHILD", route)
    .env("DEVOUR_CONFIG", config)
    .env("RUST_LOG", "warn")
    .stdout(Stdio::null())
    .stderr(common::append_to(&log_of(config)));
    if let Some(o) = out {
        cmd.env("DEVOUR_TEST_OUT", o);
    }
    if drain {
        cmd.env("DEVOUR_TEST_DRAIN", "1");
    }
    cmd.spawn().unwrap()
}

fn write_config(dir: &Path, db: &TestDb, routes: &str) -> PathBuf {
    let path = dir.join("devour.toml");
    std::fs::write(
        &path,
        format!(
            "[database]\nurl = \"{}\"\n[kafka]\nhosts = \"{}\"\n{routes}",
            db.url,
            common::kafka_hosts()
        ),
    )
    .unwrap();
    path
}

/// (seq, partition, offset, pid) lines of a handler's output file.
/// Only complete lines count: a consumer may be writing the last one while the test reads.
fn lines(path: &Path) -> Vec<(i64, i32, i64, u32)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let field = |i: usize| -> &str {
                f.get(i)
                    .copied()
                    .unwrap_or_else(|| panic!("malformed line {l:?} in {}", path.display()))
            };
            (
                field(0).parse().unwrap(),
                field(1).parse().unwrap(),
                field(2).parse().unwrap(),
                field(3).parse().unwrap(),
            )
        })
        .collect()
}

#[derive(QueryableByName)]
struct EffectRow {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    seq: i64,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    part: i32,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    off: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pid: i64,
}

fn effect_rows(c: &mut PgConnection) -> Vec<(i64, i32, i64, u32)> {
    diesel::sql_query("SELECT seq, part, off, pid FROM effects ORDER BY id")
        .load::<EffectRow>(c)
        .unwrap()
        .into_iter()
        .map(|r| (r.seq, r.part, r.off, r.pid as u32))
        .collect()
}

/// Kills a consumer 5 times, each after 300 to 1,100 more messages were processed, then lets a
/// last one drain. Returns what each kill left processed.
fn kill_five_times(
    config: &Path,
    route: &str,
    out: Option<&Path>,
    processed: &mut dyn FnMut() -> usize,
    total: usize,
) -> Vec<usize> {
    let mut at = vec![processed()];
    for _ in 0..5 {
        let mut c = child(config, route, out, false);
        let target = (at.last().unwrap() + common::random(300, 1_100) as usize).min(total - 200);
        let deadline = Instant::now() + Duration::from_secs(30);
        while processed() < target && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        c.kill().unwrap(); // SIGKILL
        common::wait_exit(
            &mut c,
            Duration::from_secs(10),
            "a killed consumer",
            &log_of(config),
        );
        at.push(processed());
    }
    let mut last = child(config, route, out, true);
    let log = log_of(config);
    common::wait_success(
        &mut last,
        Duration::from_secs(120),
        "the last consumer drains and exits 0",
        &log,
    );
    at
}

/// Checks per-partition order of first processing and returns (distinct seqs, duplicates).
fn check(rows: &[(i64, i32, i64, u32)]) -> (BTreeSet<i64>, usize) {
    let mut first: BTreeSet<i64> = BTreeSet::new();
    let mut last_offset: BTreeMap<i32, i64> = BTreeMap::new();
    let mut dups = 0;
    for (seq, part, off, _) in rows {
        if !first.insert(*seq) {
            dups += 1;
            continue;
        }
        if let Some(prev) = last_offset.insert(*part, *off) {
            assert!(
                prev < *off,
                "partition {part}: offset {off} first processed after {prev}"
            );
        }
    }
    (first, dups)
}

const N: i64 = 6_000;

#[test]
fn kill_9_five_times_processes_every_message_at_least_once() {
    let db = TestDb::new(Backend::Sqlite, "consume_kill9");
    let dir = tempfile::tempdir().unwrap();
    let topic = create_topic("consume-kill9", 4);
    produce_seqs(&topic, N, 100);
    let out = dir.path().join("processed.txt");
    let config = write_config(
        dir.path(),
        &db,
        &format!(
            "[consumers.kill]\ntopic = \"{topic}\"\nhandler = \"effect\"\ngroup = \"{}\"\nproperties = {{ \"auto.commit.interval.ms\" = 200, \"session.timeout.ms\" = 6000, \"heartbeat.interval.ms\" = 500 }}\n",
            common::unique("kill")
        ),
    );
    let at = kill_five_times(
        &config,
        "kill",
        Some(&out),
        &mut || lines(&out).len(),
        N as usize,
    );
    let rows = lines(&out);
    let (seen, dups) = check(&rows);
    let missing: Vec<i64> = (0..N).filter(|s| !seen.contains(s)).take(20).collect();
    assert!(
        missing.is_empty(),
        "lost messages, e.g. {missing:?}; processed after each kill: {at:?}"
    );
    println!(
        "processed after each kill: {at:?}; {} handler calls, {dups} duplicates",
        rows.len()
    );
    assert!(
        at.windows(2).all(|w| w[1] > w[0]),
        "every consumer was killed mid-stream: {at:?}"
    );
}

#[test]
fn kill_9_five_times_with_the_inbox_gives_every_effect_exactly_once() {
    let db = TestDb::new(Backend::Postgres, "consume_kill9_inbox");
    let mut c = PgConnection::establish(&db.url).unwrap();
    c.batch_execute("CREATE TABLE effects (id BIGSERIAL PRIMARY KEY, seq BIGINT NOT NULL, part INT NOT NULL, off BIGINT NOT NULL, pid BIGINT NOT NULL)")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let topic = create_topic("consume-kill9-inbox", 4);
    produce_seqs(&topic, N, 100);
    let config = write_config(
        dir.path(),
        &db,
        &format!(
            "[consumers.kill]\ntopic = \"{topic}\"\nhandler = \"effect\"\ninbox = true\ninbox_batch = 50\ngroup = \"{}\"\nproperties = {{ \"auto.commit.interval.ms\" = 5000, \"session.timeout.ms\" = 6000, \"heartbeat.interval.ms\" = 500 }}\n",
            common::unique("kill_inbox")
        ),
    );
    let mut count = || common::TestConn::count(&mut c, "effects") as usize;
    let at = kill_five_times(&config, "kill", None, &mut count, N as usize);
    let rows = effect_rows(&mut PgConnection::establish(&db.url).unwrap());
    let (seen, dups) = check(&rows);
    assert_eq!(
        seen.len(),
        N as usize,
        "every message has its effect; after each kill: {at:?}"
    );
    assert_eq!(dups, 0, "an effect happened twice; after each kill: {at:?}");
    assert_eq!(rows.len(), N as usize);
    println!(
        "effects after each kill: {at:?}; {} rows, no duplicates",
        rows.len()
    );
    assert!(
        at.windows(2).all(|w| w[1] > w[0]),
        "every consumer was killed mid-stream: {at:?}"
    );
}

#[test]
fn two_consumers_in_a_group_one_killed_the_other_takes_over() {
    let db = TestDb::new(Backend::Sqlite, "consume_takeover");
    let dir = tempfile::tempdir().unwrap();
    let topic = create_topic("consume-takeover", 6);
    let n = 2 * N;
    produce_seqs(&topic, n, 120);
    let config = write_config(
        dir.path(),
        &db,
        &format!(
            "[consumers.pair]\ntopic = \"{topic}\"\nhandler = \"effect\"\ngroup = \"{}\"\n\
             properties = {{ \"session.timeout.ms\" = 6000, \"heartbeat.interval.ms\" = 500, \"auto.commit.interval.ms\" = 200 }}\n",
            common::unique("pair")
        ),
    );
    let (out_a, out_b) = (dir.path().join("a.txt"), dir.path().join("b.txt"));
    let mut a = child(&config, "pair", Some(&out_a), false);
    // b joins while a is busy, so a gives partitions away in the middle of its work.
    let deadline = Instant::now() + Duration::from_secs(60);
    while lines(&out_a).len() < 200 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut b = child(&config, "pair", Some(&out_b), false);
    // Both are working (the group split the partitions) before one dies: b has its share,
    // and a has handled more since.
    while lines(&out_b).len() < 200 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let a_then = lines(&out_a).len();
    while lines(&out_a).len() < a_then + 200 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let parts = |p: &Path| lines(p).iter().map(|r| r.1).collect::<BTreeSet<i32>>();
    // What each holds now: the partitions of its last 100 messages (before the second one
    // joined, the first one may have held them all).
    let recent = |p: &Path| {
        let l = lines(p);
        l[l.len().saturating_sub(100)..]
            .iter()
            .map(|r| r.1)
            .collect::<BTreeSet<i32>>()
    };
    let (before_a, before_b) = (recent(&out_a), recent(&out_b));
    assert!(
        before_a.is_disjoint(&before_b),
        "one group shares partitions: {before_a:?} / {before_b:?}"
    );
    assert!(
        !before_a.is_empty() && !before_b.is_empty(),
        "both consumers got partitions"
    );
    // The rebalance that gave b its share happened with both alive: a finished and committed
    // before letting go, so no message was handled by both.
    let seqs = |p: &Path| lines(p).iter().map(|r| r.0).collect::<BTreeSet<i64>>();
    let both: Vec<i64> = seqs(&out_a)
        .intersection(&seqs(&out_b))
        .copied()
        .take(10)
        .collect();
    assert!(
        both.is_empty(),
        "handled by both consumers during a live rebalance: {both:?}"
    );
    a.kill().unwrap();
    common::wait_exit(
        &mut a,
        Duration::from_secs(10),
        "the killed consumer",
        &log_of(&config),
    );
    let killed_at = lines(&out_a).len();
    // The survivor gets the dead one's partitions after its session times out, and finishes.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let all: Vec<_> = lines(&out_a).into_iter().chain(lines(&out_b)).collect();
        let (seen, _) = check(&all);
        if seen.len() == n as usize {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} processed 90 s after the kill (b has partitions {:?})",
            seen.len(),
            parts(&out_b)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    common::sigterm(&b);
    let log = log_of(&config);
    common::wait_success(
        &mut b,
        Duration::from_secs(60),
        "SIGTERM stops the consumer with exit 0",
        &log,
    );
    let taken: BTreeSet<i32> = lines(&out_b)
        .iter()
        .map(|r| r.1)
        .filter(|p| before_a.contains(p))
        .collect();
    assert_eq!(
        taken, before_a,
        "the survivor took over every partition of the dead consumer"
    );
    let all: Vec<_> = lines(&out_a).into_iter().chain(lines(&out_b)).collect();
    let (_, dups) = check(&all);
    println!(
        "a processed {killed_at} before the kill; b {}; {dups} duplicates",
        lines(&out_b).len()
    );
}
