//! Relay throughput, latency and memory on PostgreSQL and a real broker.
//!
//! Run with `cargo bench --bench relay`. The bench first runs
//! `cargo build --release --bin devour-relay` (cargo bench builds in the release profile, so the
//! binary matches the code under test), creates its own database `devour_bench_relay_<pid>`
//! (dropped at the end) and a fresh topic per measurement (deleted at the end).
//!
//! Figures:
//! 1. Drain of a backlog of `ROWS` rows (JSON payloads of `PAYLOAD` bytes, `KEYS` keys) into a
//!    `PARTITIONS`-partition topic by `devour-relay --drain` (a child process; time from spawn to
//!    exit), against a raw rdkafka `ThreadedProducer` with the relay's producer settings sending
//!    the same messages (same keys, payloads, headers of the same size) to another fresh topic
//!    on the same broker, timed from producer creation to the last delivery report. The raw
//!    producer's messages are built in memory before the clock starts; its headers are built in
//!    the timed loop, as the relay builds them.
//! 2. Commit → broker-acknowledgement latency, p50 and p99, at `RATE` rows/s offered for
//!    `LATENCY_SECS` s: a relay started in this process (`devour::relay::start`, follow mode)
//!    and a writer on its own connection inserting `RATE / 100` rows every 10 ms (one multi-row
//!    INSERT, so one transaction, per tick), woken by the outbox's LISTEN/NOTIFY only (the
//!    writer does not call `notify_local`, like an application in another process). The figures
//!    are the relay's own report (`RelayReport::latency_p50_ms`/`_p99_ms`): the time the
//!    delivery report arrives (the producer's delivery callback) minus the row's `created_at`
//!    (`clock_timestamp()` at insert, so the commit's own WAL flush is counted too). 10 warm-up
//!    rows are delivered before the writer starts (so the producer knows the topic); they are
//!    part of the report too. Before it, as a reference, a raw producer with the relay's
//!    settings sends the same messages at the same pace to a fresh topic: send → delivery
//!    report, p50 and p99, what the broker and the client alone take on this machine.
//! 3. Peak RSS (`VmHWM` of `/proc/PID/status`, sampled every 20 ms) of the relay process while
//!    draining `ROWS` and `BIG_ROWS` rows.
//! 4. Drain time of `BIG_ROWS` rows against `ROWS` rows.
//!
//! With the throughput figures go CPU costs per message: busy time of the whole machine during
//! the timed phase (`/proc/stat`: PostgreSQL, the broker and the client together) and of the
//! client alone (the relay process, sampled every 20 ms, or this process for the raw producer).
//!
//! Before each drain the backlog is inserted (untimed) with multi-row INSERTs of 1,000 rows,
//! 50,000 rows per transaction, with `shard` computed in Rust, then `VACUUM ANALYZE`. Before
//! every timed phase (relay drain, raw producer, latency run) PostgreSQL checkpoints, the page
//! cache is flushed (`sync`) and the bench waits a second, so that no phase pays for the disk
//! writes of the one before (PostgreSQL, the broker and the bench share one machine). The
//! topics are deleted when the bench ends; a broker removes a deleted topic's files
//! `log.segment.delete.delay.ms` later (60 s by default, 1 s on a broker `bin/kafka-start`
//! started), which stalls its produce requests for 100–200 ms: on a broker with the default,
//! start the next run more than a minute after the last one ended, or the latency phase may
//! meet it.
//!
//! The relay/raw comparison runs `ROUNDS` rounds (raw first in even rounds, relay first in odd
//! ones, a fresh backlog and fresh topics each round); the ratio is the median of the rounds'
//! ratios, the rates the medians of the rounds' rates.
//!
//! Environment:
//! - `DEVOUR_BENCH_PG_URL`: PostgreSQL server URL (default
//!   `postgres://postgres:postgres@127.0.0.1:5432/postgres`). Its parameters are kept: libpq's
//!   default `sslmode=prefer` uses TLS when the server offers it (the parameters line says
//!   whether it did); `?sslmode=disable` measures without.
//! - `DEVOUR_BENCH_KAFKA`: bootstrap servers (default `127.0.0.1:19092`).
//! - `DEVOUR_BENCH_ROWS`: rows of the drain comparison (default 200000).
//! - `DEVOUR_BENCH_BIG_ROWS`: rows of the big drain (default 1000000; 0 skips it).
//! - `DEVOUR_BENCH_KEYS` (default 1000), `DEVOUR_BENCH_PAYLOAD` (bytes, default 1024),
//!   `DEVOUR_BENCH_PARTITIONS` (default 12).
//! - `DEVOUR_BENCH_ROUNDS`: rounds of the relay/raw comparison (default 3).
//! - `DEVOUR_BENCH_RATE` (rows/s, default 1000) and `DEVOUR_BENCH_LATENCY_SECS` (default 15);
//!   `DEVOUR_BENCH_LATENCY_SECS=0` skips the latency figure.
//! - `DEVOUR_BENCH_RELAY_BIN`: use this relay binary instead of building one.
//! - `DEVOUR_BENCH_SHOW_RELAY_LOG=1`: print the relay child's stderr after each drain. The
//!   child's pid is printed to stderr when it starts (for `perf record -p PID`).
//!
//! The latency figure uses the relay library linked into this bench, not the binary.
//! - `DEVOUR_RELAY_*` and `DEVOUR_KAFKA_PROPERTY_*` are passed to the relay (both the child
//!   process and the in-process one), e.g. `DEVOUR_RELAY_BATCH_SIZE=5000`; the
//!   `DEVOUR_KAFKA_PROPERTY_*` ones also to the raw producer. Other `DEVOUR_*` variables are
//!   not passed on.

#[path = "common/mod.rs"]
mod common;
use common::{env_usize, PgDb};
use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devour::db::devour_outbox;
use devour::relay::{self, RunOptions};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};

// ---------------------------------------------------------------------------------------------
// Parameters.

struct Params {
    rows: usize,
    big_rows: usize,
    keys: usize,
    payload: usize,
    partitions: i32,
    rounds: usize,
    rate: usize,
    latency_secs: u64,
    kafka: String,
}

/// The `DEVOUR_*` variables handed to the relay: its tuning and librdkafka properties.
fn relay_env() -> BTreeMap<String, String> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("DEVOUR_RELAY_") || k.starts_with("DEVOUR_KAFKA_PROPERTY_"))
        .collect()
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

// ---------------------------------------------------------------------------------------------
// The messages.

/// Key of row `i`.
fn key_of(i: usize, keys: usize) -> String {
    format!("customer-{:04}", i % keys)
}

const WORDS: [&str; 32] = [
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
    "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango",
    "uniform", "victor", "whiskey", "xray", "yankee", "zulu", "order", "shipped", "pending",
    "refund", "invoice", "customer",
];

/// A JSON payload of exactly `size` bytes (at least ~80) for row `i`: some fields and a text of
/// pseudo-random words, so that it compresses like ordinary JSON (lz4 about 2×), not like a
/// run of one byte.
fn payload_of(i: usize, key: &str, size: usize) -> Vec<u8> {
    let head = format!(
        "{{\"seq\":{i},\"key\":\"{key}\",\"amount\":{}.{:02},\"note\":\"",
        i % 9973,
        i % 100
    );
    let tail = "\"}";
    let mut out = String::with_capacity(size.max(head.len() + tail.len()));
    out.push_str(&head);
    let mut x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let body = size.saturating_sub(head.len() + tail.len());
    while out.len() < head.len() + body {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let w = WORDS[(x % WORDS.len() as u64) as usize];
        let room = head.len() + body - out.len();
        if room > w.len() {
            out.push_str(w);
            out.push(' ');
        } else {
            out.extend(std::iter::repeat_n('.', room));
        }
    }
    out.push_str(tail);
    out.into_bytes()
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL.

#[derive(QueryableByName)]
struct Setting {
    #[diesel(sql_type = diesel::sql_types::Text)]
    value: String,
}

fn setting(conn: &mut PgConnection, sql: &str) -> String {
    diesel::sql_query(sql)
        .get_result::<Setting>(conn)
        .map(|s| s.value)
        .unwrap_or_else(|e| format!("? ({e})"))
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

fn count(conn: &mut PgConnection, sql: &str) -> i64 {
    diesel::sql_query(sql)
        .get_result::<Count>(conn)
        .expect("count")
        .n
}

/// Inserts rows `first..first + n` for `topic` with multi-row INSERTs of up to 1,000 rows,
/// 50,000 rows per transaction.
fn insert_rows(conn: &mut PgConnection, topic: &str, first: usize, n: usize, p: &Params) {
    use devour_outbox::dsl as o;
    const STATEMENT: usize = 1000;
    const TRANSACTION: usize = 50_000;
    let end = first + n;
    let mut txn_start = first;
    while txn_start < end {
        let txn_end = (txn_start + TRANSACTION).min(end);
        conn.transaction::<_, diesel::result::Error, _>(|c| {
            let mut s = txn_start;
            while s < txn_end {
                let e = (s + STATEMENT).min(txn_end);
                let rows: Vec<_> = (s..e)
                    .map(|i| {
                        let key = key_of(i, p.keys);
                        let payload = payload_of(i, &key, p.payload);
                        (
                            o::topic.eq(topic),
                            o::shard.eq(devour::outbox::shard_for_key(&key)),
                            o::partition_key.eq(Some(key)),
                            o::payload.eq(Some(payload)),
                            o::event.eq(Some("create")),
                        )
                    })
                    .collect();
                diesel::insert_into(o::devour_outbox)
                    .values(&rows)
                    .execute(c)?;
                s = e;
            }
            Ok(())
        })
        .expect("insert rows");
        txn_start = txn_end;
    }
}

/// Before every timed phase: PostgreSQL's dirty pages written (CHECKPOINT), the page cache's
/// flushed (`sync`), a second of quiet; so that no phase pays for the writes of the one before.
fn settle(conn: &mut PgConnection) {
    conn.batch_execute("CHECKPOINT").expect("checkpoint");
    let _ = Command::new("sync").status();
    std::thread::sleep(Duration::from_secs(1));
}

/// Inserts a backlog of `n` rows and settles the table (VACUUM ANALYZE).
fn insert_backlog(conn: &mut PgConnection, topic: &str, n: usize, p: &Params) -> Duration {
    let t = Instant::now();
    insert_rows(conn, topic, 0, n, p);
    let took = t.elapsed();
    conn.batch_execute("VACUUM ANALYZE devour_outbox")
        .expect("vacuum");
    eprintln!(
        "  inserted {n} rows in {:.1} s ({:.0} rows/s)",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );
    took
}

// ---------------------------------------------------------------------------------------------
// Kafka.

struct Topics {
    hosts: String,
    created: Vec<String>,
    prefix: String,
}

impl Topics {
    fn new(hosts: &str) -> Topics {
        Topics {
            hosts: hosts.into(),
            created: Vec::new(),
            prefix: format!("devour-bench-relay-{}", std::process::id()),
        }
    }

    fn admin(&self) -> AdminClient<DefaultClientContext> {
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &self.hosts)
            .create()
            .expect("admin client")
    }

    /// A fresh topic with `partitions` partitions, with a leader for each when it returns.
    fn create(&mut self, tag: &str, partitions: i32) -> String {
        let name = format!("{}-{tag}-{}", self.prefix, self.created.len());
        let topic = NewTopic::new(&name, partitions, TopicReplication::Fixed(1));
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let res = futures::executor::block_on(self.admin().create_topics([&topic], &opts))
            .unwrap_or_else(|e| panic!("creating topic on {}: {e}", self.hosts));
        for r in res {
            r.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
        }
        self.created.push(name.clone());
        // Wait until the broker knows a leader for every partition.
        let consumer = self.consumer();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = consumer
                .fetch_metadata(Some(&name), Duration::from_secs(5))
                .ok()
                .and_then(|m| {
                    m.topics().first().map(|t| {
                        t.error().is_none()
                            && t.partitions().len() == partitions as usize
                            && t.partitions().iter().all(|p| p.leader() >= 0)
                    })
                })
                .unwrap_or(false);
            if ready {
                break;
            }
            assert!(Instant::now() < deadline, "topic {name} has no leaders");
            std::thread::sleep(Duration::from_millis(100));
        }
        name
    }

    fn consumer(&self) -> BaseConsumer {
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &self.hosts)
            .set("group.id", format!("{}-reader", self.prefix))
            .create()
            .expect("consumer")
    }

    /// Messages in `topic`: the sum of its partitions' high watermarks.
    fn messages(&self, topic: &str, partitions: i32) -> i64 {
        let consumer = self.consumer();
        (0..partitions)
            .map(|p| {
                consumer
                    .fetch_watermarks(topic, p, Duration::from_secs(10))
                    .map(|(lo, hi)| hi - lo)
                    .unwrap_or(-1)
            })
            .sum()
    }

    fn delete_all(&self) {
        if self.created.is_empty() {
            return;
        }
        let names: Vec<&str> = self.created.iter().map(String::as_str).collect();
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        match futures::executor::block_on(self.admin().delete_topics(&names, &opts)) {
            Ok(res) => {
                for r in res {
                    if let Err((t, e)) = r {
                        eprintln!("could not delete topic {t}: {e}");
                    }
                }
            }
            Err(e) => eprintln!("could not delete topics: {e}"),
        }
    }
}

/// Counts the raw producer's delivery reports.
#[derive(Default)]
struct Counter {
    ok: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Counter {
    /// Counts one delivery report; returns whether it was a delivery.
    fn record(&self, result: &DeliveryResult<'_>) -> bool {
        match result {
            Ok(_) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err((e, _)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let mut first = self.first_error.lock().unwrap();
                if first.is_none() {
                    *first = Some(e.to_string());
                }
                false
            }
        }
    }

    /// Waits until `n` reports have come, for at most `timeout`.
    fn wait(&self, n: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.ok.load(Ordering::Relaxed) + self.failed.load(Ordering::Relaxed) < n {
            assert!(Instant::now() < deadline, "raw producer: no end of reports");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn assert_no_failures(&self) {
        let failed = self.failed.load(Ordering::Relaxed);
        assert_eq!(
            failed,
            0,
            "raw producer: {failed} failed deliveries, first: {:?}",
            self.first_error.lock().unwrap()
        );
    }
}

struct RawContext(Arc<Counter>);

impl ClientContext for RawContext {}

impl ProducerContext for RawContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        self.0.record(result);
    }
}

/// Runs `tick(t)` for `t` in `0..ticks`, one every 10 ms from now; returns how many started
/// more than a tick late.
fn paced(ticks: usize, mut tick: impl FnMut(usize)) -> usize {
    let every = Duration::from_millis(10);
    let mut late = 0;
    let started = Instant::now();
    for t in 0..ticks {
        let due = started + every * t as u32;
        let now = Instant::now();
        if now < due {
            std::thread::sleep(due - now);
        } else if now - due > every {
            late += 1;
        }
        tick(t);
    }
    late
}

/// The relay's own producer settings, so that the raw producer is configured exactly alike.
fn raw_producer_config(config: &devour::Config) -> rdkafka::ClientConfig {
    devour::relay::producer_config(config)
}

/// One message of the raw producer, built before the clock starts.
struct RawMessage {
    key: String,
    payload: Vec<u8>,
    message_id: String,
}

fn raw_messages(n: usize, p: &Params) -> Vec<RawMessage> {
    (0..n)
        .map(|i| {
            let key = key_of(i, p.keys);
            let payload = payload_of(i, &key, p.payload);
            RawMessage {
                key,
                payload,
                // The outbox's message_id is a UUID in text form, 36 bytes, as here.
                message_id: uuid::Uuid::now_v7().to_string(),
            }
        })
        .collect()
}

/// The relay's headers: message-id, content-type, event (rows have no extra headers).
fn raw_headers(m: &RawMessage) -> OwnedHeaders {
    OwnedHeaders::new_with_capacity(4)
        .insert(Header {
            key: devour::outbox::HEADER_MESSAGE_ID,
            value: Some(m.message_id.as_bytes()),
        })
        .insert(Header {
            key: devour::outbox::HEADER_CONTENT_TYPE,
            value: Some("application/json".as_bytes()),
        })
        .insert(Header {
            key: devour::outbox::HEADER_EVENT,
            value: Some("create".as_bytes()),
        })
}

/// Records each delivery's send → report time, in ms (at least 1, as the relay's report).
struct LatencyContext(Arc<Mutex<hdrhistogram::Histogram<u64>>>, Arc<Counter>);

impl ClientContext for LatencyContext {}

impl ProducerContext for LatencyContext {
    type DeliveryOpaque = Box<Instant>;

    fn delivery(&self, result: &DeliveryResult<'_>, sent: Box<Instant>) {
        let ms = sent.elapsed().as_millis().max(1) as u64;
        if self.1.record(result) {
            self.0.lock().unwrap().record(ms).unwrap();
        }
    }
}

/// The latency run's reference: a raw producer (the relay's settings) sending the same messages
/// at the same pace (`RATE / 100` every 10 ms, after 10 warm-up messages whose reports are
/// awaited) to a fresh topic; send → delivery report, p50 and p99 in ms. What the broker and
/// the client take on this machine, without the database.
fn raw_latency(cx: &mut Ctx<'_>) -> (u64, u64) {
    let p = cx.p;
    let topic = cx.topics.create("raw-latency", p.partitions);
    settle(&mut cx.conn);
    let per_tick = p.rate.div_ceil(100).max(1);
    let ticks = (p.latency_secs * 100) as usize;
    let msgs = raw_messages(10 + per_tick * ticks, p);
    let histogram = Arc::new(Mutex::new(
        hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000, 3).unwrap(),
    ));
    let counter = Arc::new(Counter::default());
    let producer: ThreadedProducer<LatencyContext> = raw_producer_config(&cx.config)
        .create_with_context(LatencyContext(histogram.clone(), counter.clone()))
        .expect("raw producer");
    let send = |m: &RawMessage| {
        let record = BaseRecord::with_opaque_to(&topic, Box::new(Instant::now()))
            .key(m.key.as_str())
            .payload(m.payload.as_slice())
            .headers(raw_headers(m));
        producer
            .send(record)
            .map_err(|(e, _)| e)
            .expect("raw producer");
    };
    let (warm_up, paced_msgs) = msgs.split_at(10);
    warm_up.iter().for_each(send);
    counter.wait(10, Duration::from_secs(60));
    let batches: Vec<&[RawMessage]> = paced_msgs.chunks(per_tick).collect();
    paced(batches.len(), |t| batches[t].iter().for_each(send));
    counter.wait(msgs.len() as u64, Duration::from_secs(60));
    counter.assert_no_failures();
    let h = histogram.lock().unwrap();
    (h.value_at_quantile(0.5), h.value_at_quantile(0.99))
}

/// Sends `msgs` to `topic` with a raw producer and waits for every delivery report; returns the
/// time from producer creation to the last report, and the CPU used meanwhile.
fn raw_produce(config: &devour::Config, topic: &str, msgs: &[RawMessage]) -> (Duration, Cpu) {
    let counter = Arc::new(Counter::default());
    let busy_before = machine_busy();
    let self_before = process_cpu("self").unwrap_or(0.0);
    let started = Instant::now();
    let producer: ThreadedProducer<RawContext> = raw_producer_config(config)
        .create_with_context(RawContext(counter.clone()))
        .expect("raw producer");
    for m in msgs {
        let mut record = BaseRecord::to(topic)
            .key(m.key.as_str())
            .payload(m.payload.as_slice())
            .headers(raw_headers(m));
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => panic!("raw producer: {e}"),
            }
        }
    }
    counter.wait(msgs.len() as u64, Duration::from_secs(600));
    let took = started.elapsed();
    let cpu = Cpu {
        machine: machine_busy() - busy_before,
        client: process_cpu("self").unwrap_or(0.0) - self_before,
    };
    counter.assert_no_failures();
    let _ = producer.flush(Duration::from_secs(10));
    (took, cpu)
}

// ---------------------------------------------------------------------------------------------
// The relay as a child process.

/// Builds `devour-relay` (release) and returns its path, unless `DEVOUR_BENCH_RELAY_BIN` names one.
fn relay_binary() -> PathBuf {
    if let Ok(bin) = std::env::var("DEVOUR_BENCH_RELAY_BIN") {
        return PathBuf::from(bin);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("building devour-relay: cargo build --release --bin devour-relay …");
    let status = Command::new(cargo)
        .args(["build", "--release", "--bin", "devour-relay"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo");
    assert!(status.success(), "cargo build --release failed");
    // This bench runs from <target>/release/deps/; the binary lands in <target>/release/.
    let exe = std::env::current_exe().expect("current exe");
    let release = exe
        .parent()
        .and_then(Path::parent)
        .expect("bench exe in <target>/release/deps");
    let bin = release.join("devour-relay");
    assert!(bin.exists(), "{} missing after the build", bin.display());
    bin
}

/// The relay's configuration file for the child process (and its text for the in-process relay).
fn config_toml(db_url: &str, kafka: &str) -> String {
    format!("[database]\nurl = \"{db_url}\"\n[kafka]\nhosts = \"{kafka}\"\n")
}

/// CPU time in seconds: /proc/stat and /proc/PID/stat count in USER_HZ, 100 on Linux.
const USER_HZ: f64 = 100.0;

/// Busy CPU seconds of the whole machine so far (all CPUs: user, nice, system, irq, softirq,
/// steal).
fn machine_busy() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    let f = |i: usize| fields.get(i).copied().unwrap_or(0.0);
    (f(0) + f(1) + f(2) + f(5) + f(6) + f(7)) / USER_HZ
}

/// CPU seconds (user + system) a process has used so far; `None` once it is gone.
fn process_cpu(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is the 1st, utime the 12th.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

/// CPU used during a timed phase.
#[derive(Clone, Copy, Default)]
struct Cpu {
    /// The whole machine (PostgreSQL, the broker, the client), busy CPU seconds.
    machine: f64,
    /// The client: the relay process, or this process for the raw producer.
    client: f64,
}

struct Drain {
    cpu: Cpu,
    wall: Duration,
    /// The relay's own figure (its `run`, without process start and connecting).
    internal: Option<f64>,
    delivered: Option<u64>,
    peak_rss_kb: u64,
}

fn status_kb(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Runs `devour-relay --drain` to its exit, sampling its memory every 20 ms.
fn drain_child(bin: &Path, config_path: &Path, log: &Path) -> Drain {
    let log_file = std::fs::File::create(log).expect("log file");
    let mut cmd = Command::new(bin);
    cmd.arg("--drain")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file);
    // Only the relay's tuning from this environment; the database and broker from the file.
    for (k, _) in std::env::vars() {
        if k.starts_with("DEVOUR_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(relay_env());
    cmd.env("DEVOUR_CONFIG", config_path);
    let busy_before = machine_busy();
    let started = Instant::now();
    let mut child = cmd.spawn().expect("spawn devour-relay");
    let pid = child.id();
    eprintln!("  devour-relay --drain running as pid {pid}");
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = 0u64;
            let mut cpu = 0.0f64;
            let pid = pid.to_string();
            let path = format!("/proc/{pid}/status");
            while !done.load(Ordering::Acquire) {
                if let Ok(s) = std::fs::read_to_string(&path) {
                    for field in ["VmHWM:", "VmRSS:"] {
                        peak = peak.max(status_kb(&s, field).unwrap_or(0));
                    }
                }
                if let Some(c) = process_cpu(&pid) {
                    cpu = cpu.max(c);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (peak, cpu)
        })
    };
    let status = child.wait().expect("wait for devour-relay");
    let wall = started.elapsed();
    let machine = machine_busy() - busy_before;
    done.store(true, Ordering::Release);
    let (peak_rss_kb, client) = sampler.join().expect("sampler");
    let text = std::fs::read_to_string(log).unwrap_or_default();
    if std::env::var_os("DEVOUR_BENCH_SHOW_RELAY_LOG").is_some() {
        eprintln!("  --- devour-relay's stderr ---\n{}  ---", text);
    }
    assert!(
        status.success(),
        "devour-relay --drain failed ({status}):\n{text}"
    );
    // "devour-relay: delivered N message(s), dead-lettered M, in X s"
    let line = text.lines().rev().find(|l| l.contains("delivered"));
    let delivered = line
        .and_then(|l| l.split("delivered ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok());
    let internal = line
        .and_then(|l| l.rsplit(" in ").next())
        .and_then(|r| r.trim_end_matches(" s").trim().parse().ok());
    Drain {
        cpu: Cpu { machine, client },
        wall,
        internal,
        delivered,
        peak_rss_kb,
    }
}

// ---------------------------------------------------------------------------------------------
// The figures.

struct Ctx<'a> {
    p: &'a Params,
    db: &'a PgDb,
    conn: PgConnection,
    topics: Topics,
    config: devour::Config,
    config_path: PathBuf,
    bin: PathBuf,
    dir: &'a Path,
}

/// A drain of `n` rows by the child relay into a fresh topic; checks everything arrived.
fn relay_drain(cx: &mut Ctx<'_>, n: usize, tag: &str) -> Drain {
    let topic = cx.topics.create(tag, cx.p.partitions);
    insert_backlog(&mut cx.conn, &topic, n, cx.p);
    settle(&mut cx.conn);
    let log = cx.dir.join(format!("{topic}.log"));
    let d = drain_child(&cx.bin, &cx.config_path, &log);
    let left = count(&mut cx.conn, "SELECT count(*) AS n FROM devour_outbox");
    assert_eq!(left, 0, "rows left in the outbox after the drain");
    let dead = count(
        &mut cx.conn,
        "SELECT count(*) AS n FROM devour_dead_letters",
    );
    assert_eq!(dead, 0, "dead letters after the drain");
    let in_topic = cx.topics.messages(&topic, cx.p.partitions);
    assert!(
        in_topic >= n as i64,
        "topic {topic} holds {in_topic} of {n} messages"
    );
    eprintln!(
        "  relay drained {n} rows in {:.2} s wall ({:.0} msg/s), relay's own {:?} s, delivered {:?}, \
         topic holds {in_topic}, peak RSS {:.1} MiB; CPU: machine {:.2} s, relay {:.2} s",
        d.wall.as_secs_f64(),
        n as f64 / d.wall.as_secs_f64(),
        d.internal,
        d.delivered,
        d.peak_rss_kb as f64 / 1024.0,
        d.cpu.machine,
        d.cpu.client
    );
    d
}

fn raw_drain(cx: &mut Ctx<'_>, msgs: &[RawMessage]) -> (Duration, Cpu) {
    let topic = cx.topics.create("raw", cx.p.partitions);
    settle(&mut cx.conn);
    let (took, cpu) = raw_produce(&cx.config, &topic, msgs);
    let in_topic = cx.topics.messages(&topic, cx.p.partitions);
    assert!(
        in_topic >= msgs.len() as i64,
        "topic {topic} holds {in_topic} of {} messages",
        msgs.len()
    );
    eprintln!(
        "  raw producer sent {} messages in {:.2} s ({:.0} msg/s); CPU: machine {:.2} s, producer {:.2} s",
        msgs.len(),
        took.as_secs_f64(),
        msgs.len() as f64 / took.as_secs_f64(),
        cpu.machine,
        cpu.client
    );
    (took, cpu)
}

struct Latency {
    p50: u64,
    p99: u64,
    delivered: u64,
    written: usize,
    offered_rate: f64,
    late_ticks: usize,
}

/// Commit → ack latency at `rate` rows/s offered, by a relay in this process.
fn latency(cx: &mut Ctx<'_>) -> Latency {
    let p = cx.p;
    let topic = cx.topics.create("latency", p.partitions);
    settle(&mut cx.conn);
    let handle = relay::start(&cx.config, RunOptions::default()).expect("start relay");
    let mut writer = PgConnection::establish(&cx.db.url).expect("writer connection");
    let wait_for = |conn: &mut PgConnection, sql: &str, want: i64, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while count(conn, sql) != want {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_for(
        &mut cx.conn,
        "SELECT count(*) AS n FROM devour_relay_leases WHERE owner IS NOT NULL",
        256,
        "the relay to take every shard",
    );
    // Warm-up: the producer learns the topic's metadata (these 10 rows are in the report too).
    insert_rows(&mut writer, &topic, 0, 10, p);
    wait_for(
        &mut cx.conn,
        "SELECT count(*) AS n FROM devour_outbox",
        0,
        "the warm-up rows",
    );
    let per_tick = p.rate.div_ceil(100).max(1);
    let ticks = (p.latency_secs * 100) as usize;
    let mut next = 10;
    let started = Instant::now();
    let late_ticks = paced(ticks, |_| {
        insert_rows(&mut writer, &topic, next, per_tick, p);
        next += per_tick;
    });
    let writing = started.elapsed();
    wait_for(
        &mut cx.conn,
        "SELECT count(*) AS n FROM devour_outbox",
        0,
        "the relay to deliver everything",
    );
    handle.shutdown();
    let report = handle.join().expect("relay report");
    let written = next - 10;
    Latency {
        p50: report.latency_p50_ms,
        p99: report.latency_p99_ms,
        delivered: report.delivered,
        written,
        offered_rate: written as f64 / writing.as_secs_f64(),
        late_ticks,
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "MISSED"
    }
}

fn main() {
    let p = Params {
        rows: env_usize("DEVOUR_BENCH_ROWS", 200_000).max(1),
        big_rows: env_usize("DEVOUR_BENCH_BIG_ROWS", 1_000_000),
        keys: env_usize("DEVOUR_BENCH_KEYS", 1000).max(1),
        payload: env_usize("DEVOUR_BENCH_PAYLOAD", 1024),
        partitions: env_usize("DEVOUR_BENCH_PARTITIONS", 12).max(1) as i32,
        rounds: env_usize("DEVOUR_BENCH_ROUNDS", 3).max(1),
        rate: env_usize("DEVOUR_BENCH_RATE", 1000).max(1),
        latency_secs: env_usize("DEVOUR_BENCH_LATENCY_SECS", 15) as u64,
        kafka: std::env::var("DEVOUR_BENCH_KAFKA").unwrap_or_else(|_| "127.0.0.1:19092".into()),
    };
    let total_started = Instant::now();
    let bin = relay_binary();

    let db = PgDb::create("devour_bench_relay");
    let mut conn = PgConnection::establish(&db.url).expect("connect");
    devour::run_migrations(&mut conn).expect("migrations");
    let dir = tempfile::tempdir().expect("temp dir");
    let toml = config_toml(&db.url, &p.kafka);
    let config_path = dir.path().join("devour.toml");
    std::fs::File::create(&config_path)
        .and_then(|mut f| f.write_all(toml.as_bytes()))
        .expect("write config");
    let config =
        devour::Config::from_toml_str(&toml, devour::config::Origin::Defaults, &relay_env())
            .expect("relay configuration");
    let pg_version = setting(
        &mut conn,
        "SELECT split_part(version(), ' on ', 1) AS value",
    );
    let pg_settings = format!(
        "TLS to PostgreSQL: {}; synchronous_commit={}, shared_buffers={}, wal_compression={}",
        setting(
            &mut conn,
            "SELECT coalesce((SELECT CASE WHEN ssl THEN version ELSE 'no' END FROM pg_stat_ssl \
             WHERE pid = pg_backend_pid()), '?') AS value"
        ),
        setting(
            &mut conn,
            "SELECT current_setting('synchronous_commit') AS value"
        ),
        setting(
            &mut conn,
            "SELECT current_setting('shared_buffers') AS value"
        ),
        setting(
            &mut conn,
            "SELECT current_setting('wal_compression') AS value"
        ),
    );
    let sample = payload_of(0, &key_of(0, p.keys), p.payload);

    println!("# devour relay benchmark");
    println!();
    println!(
        "- backlog rows: {} (drain comparison, rounds: {}), {} (big drain); keys: {}; payload: {} bytes of JSON, e.g. `{}…`",
        p.rows,
        p.rounds,
        p.big_rows,
        p.keys,
        sample.len(),
        String::from_utf8_lossy(&sample[..sample.len().min(72)])
    );
    println!(
        "- rows carry event `create`, content type `application/json`, a 36-byte message id and no extra headers; the raw producer sends the same three headers"
    );
    println!(
        "- topics: fresh per measurement, {} partitions, replication 1, broker {}",
        p.partitions, p.kafka
    );
    println!(
        "- relay: `{}` --drain (child process; wall time spawn → exit; peak RSS = max VmHWM sampled every 20 ms); batch_size={}, max_in_flight={}, poll_interval_ms={}, lease_ttl_ms={}",
        bin.display(),
        config.relay.batch_size,
        config.relay.max_in_flight,
        config.relay.poll_interval_ms,
        config.relay.lease_ttl_ms
    );
    let producer_cfg = raw_producer_config(&config);
    let mut props: Vec<String> = [
        "enable.idempotence",
        "partitioner",
        "linger.ms",
        "compression.type",
        "batch.num.messages",
        "message.timeout.ms",
    ]
    .iter()
    .map(|k| format!("{k}={}", producer_cfg.get(k).unwrap_or("?")))
    .collect();
    props.sort();
    println!("- producer settings (relay and raw): {}", props.join(", "));
    println!(
        "- raw producer: ThreadedProducer, messages built before the clock starts, time from producer creation to the last delivery report"
    );
    println!(
        "- latency: in-process relay (`relay::start`, follow), writer inserting {} rows every 10 ms (one INSERT per tick) for {} s; figures from RelayReport (ack − created_at)",
        p.rate.div_ceil(100),
        p.latency_secs
    );
    println!(
        "- backlog inserted untimed: INSERTs of 1000 rows, 50000 rows per transaction, then VACUUM ANALYZE; before every timed phase: CHECKPOINT, sync, 1 s pause"
    );
    println!(
        "- postgres: {pg_version}; {pg_settings}; database {}",
        db.name
    );
    println!(
        "- machine: {} CPU(s); PostgreSQL and the broker run on it too",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let mut cx = Ctx {
        p: &p,
        db: &db,
        conn,
        topics: Topics::new(&p.kafka),
        config,
        config_path,
        bin,
        dir: dir.path(),
    };

    // 1 + 3 (small): relay drain vs raw producer.
    eprintln!("building {} raw messages …", p.rows);
    let msgs = raw_messages(p.rows, &p);
    let mut relay_rates = Vec::new();
    let mut raw_rates = Vec::new();
    let mut ratios = Vec::new();
    let mut raw_cpu: Vec<Cpu> = Vec::new();
    let mut small: Vec<Drain> = Vec::new();
    for round in 0..p.rounds {
        eprintln!("drain comparison, round {} of {} …", round + 1, p.rounds);
        let relay_first = round % 2 == 1;
        if relay_first {
            let d = relay_drain(&mut cx, p.rows, "drain");
            relay_rates.push(p.rows as f64 / d.wall.as_secs_f64());
            small.push(d);
        }
        let (raw, cpu) = raw_drain(&mut cx, &msgs);
        raw_rates.push(p.rows as f64 / raw.as_secs_f64());
        raw_cpu.push(cpu);
        if !relay_first {
            let d = relay_drain(&mut cx, p.rows, "drain");
            relay_rates.push(p.rows as f64 / d.wall.as_secs_f64());
            small.push(d);
        }
        ratios.push(relay_rates[round] / raw_rates[round]);
    }
    drop(msgs);

    // 2: latency.
    let lat = (p.latency_secs > 0).then(|| {
        eprintln!("latency at {} rows/s for {} s …", p.rate, p.latency_secs);
        let raw = raw_latency(&mut cx);
        eprintln!("  raw producer: p50 {} ms, p99 {} ms", raw.0, raw.1);
        let l = latency(&mut cx);
        eprintln!(
            "  p50 {} ms, p99 {} ms; {} written at {:.0} rows/s, {} delivered, {} late ticks",
            l.p50, l.p99, l.written, l.offered_rate, l.delivered, l.late_ticks
        );
        (l, raw)
    });

    // 3 + 4 (big).
    let big = (p.big_rows > 0).then(|| {
        eprintln!("big drain of {} rows …", p.big_rows);
        relay_drain(&mut cx, p.big_rows, "big")
    });

    // Report.
    let relay_rate = median(&relay_rates);
    let raw_rate = median(&raw_rates);
    let ratio = median(&ratios);
    let list = |v: &[f64], digits: usize| {
        v.iter()
            .map(|x| format!("{x:.digits$}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let small_wall = median(
        &small
            .iter()
            .map(|d| d.wall.as_secs_f64())
            .collect::<Vec<_>>(),
    );
    let small_rss = small.iter().map(|d| d.peak_rss_kb).max().unwrap_or(0) as f64 / 1024.0;
    let small_internal: Vec<f64> = small.iter().filter_map(|d| d.internal).collect();
    println!();
    println!("| figure | measured | target |");
    println!("|---|---:|---|");
    println!(
        "| relay drain of {} rows (wall, spawn → exit) | {:.0} msg/s ({:.2} s); rounds: {} | - |",
        p.rows,
        relay_rate,
        small_wall,
        list(&relay_rates, 0)
    );
    if !small_internal.is_empty() {
        let s = median(&small_internal);
        println!(
            "| … relay's own time (its report, without exec + connect) | {:.0} msg/s ({:.2} s) | - |",
            p.rows as f64 / s,
            s
        );
    }
    println!(
        "| raw rdkafka producer, {} messages | {:.0} msg/s ({:.2} s); rounds: {} | - |",
        p.rows,
        raw_rate,
        p.rows as f64 / raw_rate,
        list(&raw_rates, 0)
    );
    println!(
        "| relay / raw | {:.2}×; rounds: {} | ≥ 0.80× {} |",
        ratio,
        list(&ratios, 2),
        verdict(ratio >= 0.8)
    );
    // CPU per message, µs: the whole machine's busy time and the client's own.
    let per_msg = |v: Vec<f64>| median(&v) * 1e6 / p.rows as f64;
    println!(
        "| CPU per message, relay drain: whole machine / relay process | {:.1} µs / {:.1} µs | - |",
        per_msg(small.iter().map(|d| d.cpu.machine).collect()),
        per_msg(small.iter().map(|d| d.cpu.client).collect()),
    );
    println!(
        "| CPU per message, raw producer: whole machine / producer | {:.1} µs / {:.1} µs | - |",
        per_msg(raw_cpu.iter().map(|c| c.machine).collect()),
        per_msg(raw_cpu.iter().map(|c| c.client).collect()),
    );
    if let Some((l, raw)) = &lat {
        println!(
            "| raw producer, send → ack, p50 / p99, same pace (reference) | {} ms / {} ms | - |",
            raw.0, raw.1
        );
        println!(
            "| latency commit → ack, p50, at {:.0} msg/s offered | {} ms | - |",
            l.offered_rate, l.p50
        );
        println!(
            "| latency commit → ack, p99, at {:.0} msg/s offered | {} ms | ≤ 20 ms {} |",
            l.offered_rate,
            l.p99,
            verdict(l.p99 <= 20)
        );
    }
    println!(
        "| peak RSS of the relay, {} rows | {:.1} MiB | ≤ 100 MB {} |",
        p.rows,
        small_rss,
        verdict(small_rss * 1024.0 * 1024.0 <= 100e6)
    );
    if let Some(b) = &big {
        let rss = b.peak_rss_kb as f64 / 1024.0;
        println!(
            "| peak RSS of the relay, {} rows | {:.1} MiB | ≤ 100 MB {}, ≈ the {}-row figure ({:.2}×) |",
            p.big_rows,
            rss,
            verdict(rss * 1024.0 * 1024.0 <= 100e6),
            p.rows,
            rss / small_rss
        );
        let size_ratio = p.big_rows as f64 / p.rows as f64;
        let time_ratio = b.wall.as_secs_f64() / small_wall;
        println!(
            "| relay drain of {} rows (wall) | {:.0} msg/s ({:.2} s) | - |",
            p.big_rows,
            p.big_rows as f64 / b.wall.as_secs_f64(),
            b.wall.as_secs_f64()
        );
        println!(
            "| drain time {} rows / {} rows | {:.2}× | ≈ {:.1}× {} |",
            p.big_rows,
            p.rows,
            time_ratio,
            size_ratio,
            // The target is linear (time per row does not grow with the backlog): within 20%
            // of linear is met, and so is below it, where fixed costs (start-up, the first
            // metadata requests, warming caches) weigh more on the smaller drain.
            match time_ratio / size_ratio {
                r if r > 1.2 => "MISSED (time per row grows with the backlog)",
                r if r < 0.8 => "ok (below linear: fixed costs weigh more on the smaller drain)",
                _ => "ok",
            }
        );
    }
    if let Some((l, _)) = &lat {
        println!();
        println!(
            "latency run: {} rows written ({} late ticks of 10 ms), {} delivered incl. 10 warm-up rows",
            l.written, l.late_ticks, l.delivered
        );
    }
    println!();
    println!("total time: {:.1} s", total_started.elapsed().as_secs_f64());

    cx.topics.delete_all();
    drop(cx);
    drop(db);
}
