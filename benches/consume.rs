//! `devour consume` throughput against a raw rdkafka consumer, on a real broker.
//!
//! Run with `cargo bench --bench consume`. The bench produces `ROWS` messages once (JSON payloads
//! of `PAYLOAD` bytes over `KEYS` keys, into a `PARTITIONS`-partition topic, with the relay's
//! producer settings and devour's headers), then reads all of them, in this process, in rounds:
//!
//! 1. raw: an rdkafka `BaseConsumer` in a fresh group polling until it has seen every message
//!    (it touches each payload's length), offsets auto-committed (librdkafka's defaults);
//! 2. devour, no-op handler: `devour::consume::run` on a route with a fresh group, `dump = "raw"`
//!    and a handler that returns `Ok(())`, in drain mode;
//! 3. devour, no-op handler with `dump = "json"` (every payload parsed into a
//!    `serde_json::Value`), for reference;
//! 4. devour, no-op handler with `inbox = true` on PostgreSQL (each transaction of up to
//!    `inbox_batch` messages moves its partitions' marks and records their keys), in each round
//!    right after the no-op run it is compared with.
//!
//! Every figure is messages / time from the first message received to the last one finished
//! (for devour: `ConsumeReport::busy`), so that joining the group and the drain's end check are
//! not counted on either side. Rounds alternate the order of raw and devour; figures are the
//! medians of the rounds. CPU per message (this process) goes with each figure.
//!
//! Environment: `DEVOUR_BENCH_KAFKA` (default `127.0.0.1:19092`), `DEVOUR_BENCH_PG_URL`,
//! `DEVOUR_BENCH_ROWS` (200000), `DEVOUR_BENCH_KEYS` (1000), `DEVOUR_BENCH_PAYLOAD` (1024),
//! `DEVOUR_BENCH_PARTITIONS` (12), `DEVOUR_BENCH_ROUNDS` (3), `DEVOUR_BENCH_INBOX=0` skips the
//! inbox figure, `DEVOUR_BENCH_INBOX_ROUTE` adds route keys to the inbox route, `;`-separated
//! (e.g. `inbox_batch = 5000;concurrency = 2`).

mod common;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{env_usize, PgDb};
use devour::consume::{Consumer, Ctx, DigestError, Meta, Payload, Registry, RunOptions};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::Message;

struct Params {
    kafka: String,
    rows: usize,
    keys: usize,
    payload: usize,
    partitions: i32,
    rounds: usize,
}

struct NoOp;

impl Consumer for NoOp {
    type Message = serde_json::Value;
    fn digest(
        &mut self,
        _: &Meta<'_>,
        _: Payload<'_, serde_json::Value>,
        _: &mut Ctx<'_>,
    ) -> Result<(), DigestError> {
        Ok(())
    }
}

/// CPU seconds (user + system) of this process so far.
fn self_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|r| r.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

fn payload_of(i: usize, key: &str, size: usize) -> Vec<u8> {
    let head = format!("{{\"seq\":{i},\"key\":\"{key}\",\"text\":\"");
    let fill = size.saturating_sub(head.len() + 2).max(1);
    let mut s = head.into_bytes();
    s.extend(std::iter::repeat_n(b'x', fill));
    s.extend_from_slice(b"\"}");
    s
}

fn create_topic(p: &Params, name: &str) {
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &p.kafka)
        .create()
        .expect("admin client");
    let topic = NewTopic::new(name, p.partitions, TopicReplication::Fixed(1));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for r in
        futures::executor::block_on(admin.create_topics([&topic], &opts)).expect("create topic")
    {
        r.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
    }
}

fn delete_topic(p: &Params, name: &str) {
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &p.kafka)
        .create()
        .expect("admin client");
    let _ = futures::executor::block_on(admin.delete_topics(&[name], &AdminOptions::new()));
}

/// Produces the messages with the relay's producer settings and devour's headers.
fn produce(p: &Params, config: &devour::Config, topic: &str) {
    let producer: BaseProducer = devour::relay::producer_config(config)
        .create()
        .expect("producer");
    let t = Instant::now();
    for i in 0..p.rows {
        let key = format!("key-{}", i % p.keys);
        let payload = payload_of(i, &key, p.payload);
        let id = format!("0192a3b4-c5d6-7e8f-9a0b-{i:012}");
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "message-id",
                value: Some(id.as_bytes()),
            })
            .insert(Header {
                key: "event",
                value: Some("create".as_bytes()),
            })
            .insert(Header {
                key: "content-type",
                value: Some("application/json".as_bytes()),
            });
        let mut record = BaseRecord::to(topic)
            .key(&key)
            .payload(&payload)
            .headers(headers);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    producer.poll(Duration::from_millis(5));
                    record = r;
                }
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(120)).expect("flush");
    eprintln!(
        "  produced {} messages in {:.1} s",
        p.rows,
        t.elapsed().as_secs_f64()
    );
}

struct Measured {
    rate: f64,
    cpu_us: f64,
}

fn raw(p: &Params, config: &devour::Config, topic: &str, round: usize) -> Measured {
    let mut c = rdkafka::ClientConfig::new();
    for (k, v) in config.kafka.consumer_properties() {
        c.set(k, v);
    }
    let consumer: BaseConsumer = c
        .set(
            "group.id",
            format!("bench-raw-{}-{round}", std::process::id()),
        )
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("raw consumer");
    consumer.subscribe(&[topic]).unwrap();
    let mut seen = 0usize;
    let mut bytes = 0usize;
    let mut first = None;
    let mut cpu0 = 0.0;
    let deadline = Instant::now() + Duration::from_secs(300);
    while seen < p.rows {
        assert!(
            Instant::now() < deadline,
            "raw consumer read {seen} of {}",
            p.rows
        );
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                if first.is_none() {
                    first = Some(Instant::now());
                    cpu0 = self_cpu();
                }
                bytes += m.payload().map_or(0, <[u8]>::len);
                seen += 1;
            }
            Some(Err(e)) => eprintln!("  raw consumer: {e}"),
            None => {}
        }
    }
    let took = first.unwrap().elapsed();
    let cpu = self_cpu() - cpu0;
    assert!(bytes >= p.rows);
    Measured {
        rate: p.rows as f64 / took.as_secs_f64(),
        cpu_us: cpu * 1e6 / p.rows as f64,
    }
}

fn devour_run(p: &Params, config: &devour::Config, route: &str) -> Measured {
    let mut registry = Registry::new();
    registry.register("noop", || NoOp);
    let cpu0 = self_cpu();
    let report = devour::consume::run(
        config,
        route,
        &registry,
        RunOptions::drain(),
        Arc::new(AtomicBool::new(false)),
    )
    .expect("devour consume");
    let cpu = self_cpu() - cpu0;
    assert_eq!(report.processed as usize, p.rows, "{report:?}");
    Measured {
        rate: p.rows as f64 / report.busy.as_secs_f64(),
        // Includes joining and the drain's end check: an upper bound.
        cpu_us: cpu * 1e6 / p.rows as f64,
    }
}

fn route_config(p: &Params, db_url: &str, topic: &str, name: &str, extra: &str) -> devour::Config {
    devour::Config::from_toml_str(
        &format!(
            "[database]\nurl = \"{db_url}\"\n[kafka]\nhosts = \"{}\"\n[consumers.{name}]\ntopic = \"{topic}\"\nhandler = \"noop\"\ngroup = \"bench-{name}-{}\"\n{extra}\n",
            p.kafka,
            std::process::id()
        ),
        devour::config::Origin::Defaults,
        &Default::default(),
    )
    .expect("bench config")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Each round's ratio, for the summary lines.
fn listed(ratios: &[f64]) -> String {
    ratios
        .iter()
        .map(|r| format!("{r:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn main() {
    let p = Params {
        kafka: std::env::var("DEVOUR_BENCH_KAFKA").unwrap_or_else(|_| "127.0.0.1:19092".into()),
        rows: env_usize("DEVOUR_BENCH_ROWS", 200_000),
        keys: env_usize("DEVOUR_BENCH_KEYS", 1_000),
        payload: env_usize("DEVOUR_BENCH_PAYLOAD", 1_024),
        partitions: env_usize("DEVOUR_BENCH_PARTITIONS", 12) as i32,
        rounds: env_usize("DEVOUR_BENCH_ROUNDS", 3).max(1),
    };
    let inbox = env_usize("DEVOUR_BENCH_INBOX", 1) != 0;
    let topic = format!("devour-bench-consume-{}", std::process::id());
    let pg = PgDb::create("devour_bench_consume");
    {
        let mut c = <diesel::PgConnection as diesel::Connection>::establish(&pg.url)
            .expect("bench database");
        devour::run_migrations(&mut c).expect("migrations");
    }
    eprintln!(
        "devour consume bench: {} messages of {} bytes, {} keys, {} partitions, {} round(s), broker {}",
        p.rows, p.payload, p.keys, p.partitions, p.rounds, p.kafka
    );
    create_topic(&p, &topic);
    let base = route_config(&p, &pg.url, &topic, "unused", "");
    produce(&p, &base, &topic);

    let (mut raw_rates, mut raw_cpu, mut dev_rates, mut dev_cpu, mut json_rates, mut json_cpu) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut ratios = vec![];
    let (mut inbox_rates, mut inbox_cpu, mut inbox_ratios) = (vec![], vec![], vec![]);
    for round in 0..p.rounds {
        let cfg = route_config(
            &p,
            &pg.url,
            &topic,
            &format!("noop{round}"),
            "dump = \"raw\"",
        );
        let (r, d) = if round % 2 == 0 {
            let r = raw(&p, &cfg, &topic, round);
            (r, devour_run(&p, &cfg, &format!("noop{round}")))
        } else {
            let d = devour_run(&p, &cfg, &format!("noop{round}"));
            (raw(&p, &cfg, &topic, round), d)
        };
        eprintln!(
            "  round {}: raw {:.0} msg/s ({:.2} µs CPU/msg), devour {:.0} msg/s ({:.2} µs CPU/msg): {:.2}×",
            round + 1,
            r.rate,
            r.cpu_us,
            d.rate,
            d.cpu_us,
            d.rate / r.rate
        );
        ratios.push(d.rate / r.rate);
        raw_rates.push(r.rate);
        raw_cpu.push(r.cpu_us);
        dev_rates.push(d.rate);
        dev_cpu.push(d.cpu_us);
        let cfg = route_config(
            &p,
            &pg.url,
            &topic,
            &format!("json{round}"),
            "dump = \"json\"",
        );
        let j = devour_run(&p, &cfg, &format!("json{round}"));
        eprintln!(
            "  round {}: devour dump=json {:.0} msg/s ({:.2} µs CPU/msg)",
            round + 1,
            j.rate,
            j.cpu_us
        );
        json_rates.push(j.rate);
        json_cpu.push(j.cpu_us);
        if inbox {
            let route = std::env::var("DEVOUR_BENCH_INBOX_ROUTE").unwrap_or_default();
            let name = format!("inbox{round}");
            let cfg = route_config(
                &p,
                &pg.url,
                &topic,
                &name,
                &format!("dump = \"raw\"\ninbox = true\n{}", route.replace(';', "\n")),
            );
            let m = devour_run(&p, &cfg, &name);
            eprintln!(
                "  round {}: devour inbox (PostgreSQL) {:.0} msg/s ({:.2} µs CPU/msg): {:.2}× no-op",
                round + 1,
                m.rate,
                m.cpu_us,
                m.rate / d.rate
            );
            inbox_rates.push(m.rate);
            inbox_cpu.push(m.cpu_us);
            inbox_ratios.push(m.rate / d.rate);
        }
    }
    delete_topic(&p, &topic);

    let dev = median(dev_rates);
    println!();
    println!("| figure | msg/s | CPU µs/msg (this process) |");
    println!("|---|---:|---:|");
    println!(
        "| raw rdkafka consumer | {:.0} | {:.2} |",
        median(raw_rates),
        median(raw_cpu)
    );
    println!(
        "| devour consume, no-op handler, dump = raw | {dev:.0} | {:.2} |",
        median(dev_cpu)
    );
    println!(
        "| devour consume, no-op handler, dump = json | {:.0} | {:.2} |",
        median(json_rates),
        median(json_cpu)
    );
    if inbox {
        println!(
            "| devour consume, no-op handler, inbox = true (PostgreSQL) | {:.0} | {:.2} |",
            median(inbox_rates.clone()),
            median(inbox_cpu)
        );
    }
    println!();
    println!(
        "devour / raw (median of rounds {}): {:.2}× (target ≥ 0.8×)",
        listed(&ratios),
        median(ratios.clone())
    );
    if inbox {
        println!(
            "inbox / no-op (median of rounds {}): {:.2}× (target ≥ 0.3×); medians' ratio {:.2}×",
            listed(&inbox_ratios),
            median(inbox_ratios.clone()),
            median(inbox_rates) / dev
        );
    }
}
