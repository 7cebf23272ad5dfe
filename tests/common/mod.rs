//! Shared helpers of the integration tests: a database per test (PostgreSQL started by
//! `bin/test`, or an SQLite file), a topic per test on the broker started by `bin/test`, the
//! test models, and ways to read what the write path wrote.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use devour::db::devour_outbox;
use devour::outbox::OutboxBackend;
use devour::prelude::*;
use diesel::connection::LoadConnection;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use serde::Serialize;
use serde_json::Value;

pub mod consume;

/// PostgreSQL server URL for tests (any database; tests create their own).
pub fn pg_admin_url() -> String {
    std::env::var("DEVOUR_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".into())
}

/// Bootstrap address of the test broker.
pub fn kafka_hosts() -> String {
    std::env::var("DEVOUR_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A name unique to this test process and call, usable as a database or topic name. A part
/// drawn once per process keeps it apart from the names of an earlier run whose process had
/// the same pid (the broker keeps topics, a crashed test leaves its database).
pub fn unique(tag: &str) -> String {
    static RUN: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let run = RUN.get_or_init(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        (t.as_nanos() as u32) ^ (t.as_secs() as u32).rotate_left(16)
    });
    format!(
        "{}_{}_{:x}_{}",
        tag.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
            .to_lowercase(),
        std::process::id(),
        run & 0xffff,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Which backend a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// A fresh database with devour's migrations and the test models' tables; dropped at the end.
pub struct TestDb {
    pub backend: Backend,
    pub url: String,
    pg_name: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    pub fn new(backend: Backend, tag: &str) -> TestDb {
        let db = match backend {
            Backend::Postgres => {
                let name = format!("devour_t_{}", unique(tag));
                let mut admin = PgConnection::establish(&pg_admin_url()).unwrap_or_else(|e| {
                    panic!("PostgreSQL at {} (run bin/test): {e}", pg_admin_url())
                });
                diesel::sql_query(format!("CREATE DATABASE {name}"))
                    .execute(&mut admin)
                    .unwrap();
                let base = pg_admin_url();
                let (server, _) = base.rsplit_once('/').expect("url has a database");
                TestDb {
                    backend,
                    url: format!("{server}/{name}"),
                    pg_name: Some(name),
                    _dir: None,
                }
            }
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("test.db");
                TestDb {
                    backend,
                    url: format!("sqlite://{}", path.display()),
                    pg_name: None,
                    _dir: Some(dir),
                }
            }
        };
        db.setup();
        db
    }

    /// The path or URL Diesel's `establish` takes.
    pub fn diesel_url(&self) -> &str {
        self.url.strip_prefix("sqlite://").unwrap_or(&self.url)
    }

    fn setup(&self) {
        match self.backend {
            Backend::Postgres => {
                let mut c = PgConnection::establish(&self.url).unwrap();
                devour::run_migrations(&mut c).unwrap();
                c.batch_execute(MODELS).unwrap();
            }
            Backend::Sqlite => {
                let mut c = SqliteConnection::establish(self.diesel_url()).unwrap();
                devour::db::sqlite::configure(&mut c, 5000).unwrap();
                devour::run_migrations(&mut c).unwrap();
                c.batch_execute(MODELS).unwrap();
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(name) = &self.pg_name {
            if let Ok(mut admin) = PgConnection::establish(&pg_admin_url()) {
                let _ = diesel::sql_query(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut admin);
            }
        }
    }
}

/// The test models' tables (the same SQL on both backends).
const MODELS: &str = "
CREATE TABLE accounts (id BIGINT PRIMARY KEY, name TEXT NOT NULL, email TEXT, version INTEGER NOT NULL DEFAULT 0);
CREATE TABLE notes (id BIGINT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE tagged (id BIGINT PRIMARY KEY, label TEXT NOT NULL);
CREATE TABLE tags (id BIGINT PRIMARY KEY, color TEXT);
CREATE TABLE stamps (id BIGINT PRIMARY KEY, at TIMESTAMPTZ NOT NULL);
CREATE TABLE audits (id BIGINT PRIMARY KEY, event TEXT NOT NULL);
";

diesel::table! {
    audits (id) {
        id -> BigInt,
        event -> Text,
    }
}

/// A model with a column named `event`, which devour's own `event` would replace.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Queryable,
    Selectable,
    Insertable,
    AsChangeset,
    Identifiable,
    Serialize,
    ProducerModel,
)]
#[diesel(table_name = audits)]
#[devour(topic = "audits", partition_key = "id")]
pub struct Audit {
    pub id: i64,
    pub event: String,
}

diesel::table! {
    tags (id) {
        id -> BigInt,
        color -> Nullable<Text>,
    }
}
diesel::table! {
    stamps (id) {
        id -> BigInt,
        at -> Timestamptz,
    }
}

/// A model whose only other field is an `Option` without `treat_none_as_null`: saved with
/// `None`, Diesel has nothing to set.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Queryable,
    Selectable,
    Insertable,
    AsChangeset,
    Identifiable,
    Serialize,
    ProducerModel,
)]
#[diesel(table_name = tags)]
#[devour(topic = "tags", partition_key = "id")]
pub struct Tag {
    pub id: i64,
    pub color: Option<String>,
}

/// A PostgreSQL-only model (a `timestamptz` column): with `check_for_backend`, the derive
/// generates its PostgreSQL store only.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Queryable,
    Selectable,
    Insertable,
    AsChangeset,
    Identifiable,
    Serialize,
    ProducerModel,
)]
#[diesel(table_name = stamps, check_for_backend(diesel::pg::Pg))]
#[devour(topic = "stamps", partition_key = "id")]
pub struct Stamp {
    pub id: i64,
    #[serde(serialize_with = "rfc3339")]
    pub at: chrono::DateTime<chrono::Utc>,
}

fn rfc3339<S: serde::Serializer>(
    t: &chrono::DateTime<chrono::Utc>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339())
}

diesel::table! {
    accounts (id) {
        id -> BigInt,
        name -> Text,
        email -> Nullable<Text>,
        version -> Integer,
    }
}
diesel::table! {
    notes (id) {
        id -> BigInt,
        body -> Text,
    }
}
diesel::table! {
    tagged (id) {
        id -> BigInt,
        label -> Text,
    }
}

/// The plain model: topic `accounts`, keyed by id, produces on every save.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Queryable,
    Selectable,
    Insertable,
    AsChangeset,
    Identifiable,
    Serialize,
    ProducerModel,
)]
#[diesel(table_name = accounts, treat_none_as_null = true)]
#[devour(topic = "accounts", partition_key = "id")]
pub struct Account {
    pub id: i64,
    #[serde(serialize_with = "fail_on_boom")]
    pub name: String,
    pub email: Option<String>,
    pub version: i32,
}

/// Serializes a string, but fails for "boom": a payload that cannot be serialized.
fn fail_on_boom<S: serde::Serializer>(v: &str, s: S) -> Result<S::Ok, S::Error> {
    if v == "boom" {
        Err(serde::ser::Error::custom(
            "the value `boom` cannot be serialized",
        ))
    } else {
        s.serialize_str(v)
    }
}

impl Account {
    pub fn new(id: i64, name: &str) -> Self {
        Account {
            id,
            name: name.into(),
            email: None,
            version: 0,
        }
    }
}

/// A model that produces only when asked (`auto_produce = false`), to the generic topic.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Queryable,
    Selectable,
    Insertable,
    AsChangeset,
    Identifiable,
    Serialize,
    ProducerModel,
)]
#[diesel(table_name = notes)]
#[devour(auto_produce = false)]
pub struct Note {
    pub id: i64,
    pub body: String,
}

/// A model whose topic and key come from the context.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Queryable,
    Selectable,
    Insertable,
    AsChangeset,
    Identifiable,
    Serialize,
    ProducerModel,
)]
#[diesel(table_name = tagged)]
#[devour(customize)]
pub struct Tagged {
    pub id: i64,
    pub label: String,
}

impl devour::ProducerModel for Tagged {
    const CONFIG: ProducerConfig = ProducerConfig::new();

    fn get_topic(&self, event: &Event, context: &Context) -> Result<String, devour::ProduceError> {
        let tenant = context
            .get("tenant")
            .and_then(Value::as_str)
            .unwrap_or("default");
        Ok(format!("tenant-{tenant}.{event}"))
    }

    fn get_partition_key(
        &self,
        _event: &Event,
        context: &Context,
        _body: &Value,
    ) -> Result<Option<String>, devour::ProduceError> {
        let prefix = context
            .get("key_prefix")
            .and_then(Value::as_str)
            .unwrap_or("");
        Ok(Some(format!("{prefix}{}", self.label)))
    }
}

/// One outbox row as the tests look at it.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub id: i64,
    pub topic: String,
    pub key: Option<String>,
    pub partition: Option<i32>,
    pub payload: Option<Value>,
    pub headers: serde_json::Map<String, Value>,
    pub event: Option<String>,
    pub message_id: String,
    pub content_type: String,
    pub shard: i32,
}

type RawRow = (
    i64,
    String,
    Option<String>,
    Option<i32>,
    Option<Vec<u8>>,
    String,
    Option<String>,
    String,
    String,
    i32,
);

/// What the tests need of a connection, on either backend.
pub trait TestConn: Connection<Backend: OutboxBackend> + LoadConnection + Sized {
    fn open(db: &TestDb) -> Self;
    fn outbox(&mut self) -> Vec<Row>;
    fn accounts(&mut self) -> Vec<Account>;
    fn count(&mut self, table: &str) -> i64;
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

macro_rules! test_conn {
    ($conn:ty) => {
        impl TestConn for $conn {
            fn open(db: &TestDb) -> Self {
                <$conn>::establish(db.diesel_url()).unwrap()
            }
            fn outbox(&mut self) -> Vec<Row> {
                use devour_outbox::dsl as o;
                let raw: Vec<RawRow> = o::devour_outbox
                    .select((
                        o::id,
                        o::topic,
                        o::partition_key,
                        o::kafka_partition,
                        o::payload,
                        o::headers,
                        o::event,
                        o::message_id,
                        o::content_type,
                        o::shard,
                    ))
                    .order(o::id)
                    .load(self)
                    .unwrap();
                raw.into_iter()
                    .map(|r| Row {
                        id: r.0,
                        topic: r.1,
                        key: r.2,
                        partition: r.3,
                        payload: r
                            .4
                            .map(|p| serde_json::from_slice(&p).expect("payload is JSON")),
                        headers: serde_json::from_str(&r.5).expect("headers are a JSON object"),
                        event: r.6,
                        message_id: r.7,
                        content_type: r.8,
                        shard: r.9,
                    })
                    .collect()
            }
            fn accounts(&mut self) -> Vec<Account> {
                accounts::table
                    .order(accounts::id)
                    .select(Account::as_select())
                    .load(self)
                    .unwrap()
            }
            fn count(&mut self, table: &str) -> i64 {
                diesel::sql_query(format!("SELECT COUNT(*) AS n FROM {table}"))
                    .get_result::<Count>(self)
                    .unwrap()
                    .n
            }
        }
    };
}
test_conn!(PgConnection);
test_conn!(SqliteConnection);

/// Runs a test body on both backends: `both_backends!(name);` defines `name::postgres` and
/// `name::sqlite` tests calling `name::<Conn>(&TestDb)`.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                use super::*;
                #[test]
                fn postgres() {
                    let db = common::TestDb::new(common::Backend::Postgres, stringify!($name));
                    super::$name::<diesel::PgConnection>(&db);
                }
                #[test]
                fn sqlite() {
                    let db = common::TestDb::new(common::Backend::Sqlite, stringify!($name));
                    super::$name::<diesel::SqliteConnection>(&db);
                }
            }
        )*
    };
}

/// A topic of its own for one test, created with `partitions` partitions.
pub fn create_topic(tag: &str, partitions: i32) -> String {
    let name = unique(tag).replace('_', "-");
    create_named_topic(&name, partitions, &[]);
    name
}

/// Creates topic `name` with topic `configs` (e.g. `max.message.bytes`).
pub fn create_named_topic(name: &str, partitions: i32, configs: &[(&str, &str)]) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka_hosts())
        .create()
        .unwrap();
    let topic = configs.iter().fold(
        NewTopic::new(name, partitions, TopicReplication::Fixed(1)),
        |t, (k, v)| t.set(k, v),
    );
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let res = futures::executor::block_on(admin.create_topics([&topic], &opts))
        .unwrap_or_else(|e| panic!("creating topic on {} (run bin/test): {e}", kafka_hosts()));
    for r in res {
        r.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
    }
}

/// A Kafka message as read back.
#[derive(Debug, Clone)]
pub struct Received {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, String)>,
}

/// A consumer of `topic` from its beginning, in a group of its own, committing nothing.
fn reader(topic: &str) -> rdkafka::consumer::BaseConsumer {
    use rdkafka::consumer::Consumer;
    let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka_hosts())
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    consumer
}

/// How many messages `topic` (a fresh one: its low watermarks are 0) holds: the sum of its
/// partitions' high watermarks. Counts what a read that stopped early would miss.
pub fn topic_size(topic: &str) -> i64 {
    use rdkafka::consumer::Consumer;
    let consumer = reader(topic);
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    metadata.topics()[0]
        .partitions()
        .iter()
        .map(|p| {
            let (low, high) = consumer
                .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .unwrap();
            assert_eq!(low, 0, "{topic} is a fresh topic");
            high
        })
        .sum()
}

pub fn received_of(m: &rdkafka::message::BorrowedMessage<'_>) -> Received {
    use rdkafka::message::{Headers, Message};
    Received {
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        payload: m.payload().map(<[u8]>::to_vec),
        headers: m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_string(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// Reads `n` messages from the beginning of `topic` with a real consumer (fails after `timeout`).
pub fn consume(topic: &str, n: usize, timeout: Duration) -> Vec<Received> {
    let consumer = reader(topic);
    let deadline = std::time::Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "read {} of {n} messages from {topic} before the timeout: {out:?}",
            out.len()
        );
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(e)) => panic!("consumer error on {topic}: {e}"),
            Some(Ok(m)) => out.push(received_of(&m)),
        }
    }
    out
}

/// A configuration for `db` and the test broker, with `extra` after the `[relay]` settings:
/// more `[relay]` keys, and further tables such as `[consumers.NAME]`.
pub fn config(db: &TestDb, extra: &str) -> devour::Config {
    devour::Config::from_toml_str(
        &format!(
            "[database]\nurl = \"{}\"\n[kafka]\nhosts = \"{}\"\n[relay]\nlease_ttl_ms = 3000\npoll_interval_ms = 50\nshutdown_timeout_ms = 10000\n{extra}\n",
            db.url,
            kafka_hosts()
        ),
        devour::config::Origin::Defaults,
        &Default::default(),
    )
    .unwrap_or_else(|e| panic!("test config: {e}\n{extra}"))
}

/// Runs a relay in drain mode (`relay::start`, then `join`): it delivers what is in the outbox,
/// then returns its report.
pub fn relay_drain(config: &devour::Config) -> devour::relay::RelayReport {
    let options = devour::relay::RunOptions {
        mode: devour::relay::Mode::Drain,
        progress: false,
    };
    devour::relay::start(config, options)
        .and_then(|handle| handle.join())
        .unwrap_or_else(|e| panic!("relay drain: {e}"))
}

/// A pseudo-random number in [lo, hi) (the clock's nanoseconds are random enough here).
pub fn random(lo: i64, hi: i64) -> i64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as i64;
    lo + nanos % (hi - lo)
}

/// Inserts `n` rows with plain SQL: row `i` (from `first`) has key `k{i % keys}` and the JSON
/// payload `{"seq": i, "key": ...}`.
pub fn insert_rows<C: TestConn>(c: &mut C, topic: &str, first: i64, n: i64, keys: i64) {
    let mut done = 0;
    while done < n {
        let chunk = (n - done).min(500);
        let values: Vec<String> = (first + done..first + done + chunk)
            .map(|i| {
                let key = format!("k{}", i % keys);
                format!(
                    "('{topic}', '{key}', CAST('{{\"seq\":{i},\"key\":\"{key}\"}}' AS {blob}), 'create', {shard})",
                    blob = if std::any::type_name::<C>().contains("Pg") { "bytea" } else { "BLOB" },
                    shard = devour::outbox::shard_for_key(&key),
                )
            })
            .collect();
        c.batch_execute(&format!(
            "INSERT INTO devour_outbox (topic, partition_key, payload, event, shard) VALUES {}",
            values.join(",")
        ))
        .unwrap();
        done += chunk;
    }
}

/// The `seq` of each message, grouped by key in the order they were read per partition.
pub fn seqs(msgs: &[Received]) -> Vec<(String, i32, i64)> {
    msgs.iter()
        .map(|m| {
            let v: serde_json::Value =
                serde_json::from_slice(m.payload.as_deref().unwrap()).unwrap();
            (
                m.key.clone().unwrap_or_default(),
                m.partition,
                v["seq"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// Checks that every seq in `expected` arrived, and that per key the *first* delivery of each
/// seq is in increasing order. Returns the number of duplicates. Panics with what differed.
pub fn check_delivery(msgs: &[Received], expected: impl IntoIterator<Item = i64>) -> usize {
    use std::collections::{BTreeMap, BTreeSet, HashSet};
    let mut seen = HashSet::new();
    let mut last_first: BTreeMap<String, i64> = BTreeMap::new();
    let mut dups = 0;
    // Messages come per partition in offset order; sort so that holds whatever the reader did.
    let mut sorted: Vec<&Received> = msgs.iter().collect();
    sorted.sort_by_key(|m| (m.partition, m.offset));
    for (key, _, seq) in seqs(&sorted.iter().map(|m| (*m).clone()).collect::<Vec<_>>()) {
        if !seen.insert(seq) {
            dups += 1;
            continue;
        }
        if let Some(prev) = last_first.insert(key.clone(), seq) {
            assert!(
                prev < seq,
                "key {key}: first delivery of seq {seq} came after seq {prev}"
            );
        }
    }
    // A message the relay sent again carries `possible-duplicate: true` (what an inbox looks
    // up): of all copies of one message-id, only one (the first send) may lack it.
    let mut copies: std::collections::HashMap<&str, (usize, usize)> = Default::default();
    for m in msgs {
        let header = |name: &str| {
            m.headers
                .iter()
                .rev()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        if let Some(id) = header("message-id") {
            let c = copies.entry(id).or_default();
            c.0 += 1;
            if header("possible-duplicate") != Some("true") {
                c.1 += 1;
            }
        }
    }
    let unmarked: Vec<_> = copies
        .iter()
        .filter(|(_, (_, unmarked))| *unmarked > 1)
        .take(10)
        .collect();
    assert!(
        unmarked.is_empty(),
        "messages sent again without the possible-duplicate mark (id: (copies, unmarked)): {unmarked:?}"
    );
    let marked: usize = copies.values().map(|(n, u)| n - u).sum();
    if dups > 0 || marked > 0 {
        eprintln!("{dups} duplicate(s); {marked} cop(ies) marked possible-duplicate");
    }
    let want: BTreeSet<i64> = expected.into_iter().collect();
    let missing: Vec<_> = want.iter().filter(|s| !seen.contains(s)).take(20).collect();
    assert!(
        missing.is_empty(),
        "{} message(s) lost, e.g. seqs {missing:?}",
        want.iter().filter(|s| !seen.contains(s)).count()
    );
    dups
}

/// Reads `topic` from the beginning until `unique` distinct seqs arrived, then one more second
/// for stragglers (duplicates); fails after `timeout`.
pub fn consume_seqs(topic: &str, distinct: usize, timeout: Duration) -> Vec<Received> {
    let consumer = reader(topic);
    let deadline = std::time::Instant::now() + timeout;
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut done_at: Option<std::time::Instant> = None;
    let mut last_error: Option<String> = None;
    loop {
        if let Some(t) = done_at {
            if t.elapsed() > Duration::from_secs(1) {
                return out;
            }
        }
        if std::time::Instant::now() >= deadline {
            if seen.len() >= distinct {
                return out; // No time left for stragglers.
            }
            let missing: Vec<i64> = (0..distinct as i64)
                .filter(|s| !seen.contains(s))
                .take(20)
                .collect();
            panic!(
                "read {} of {distinct} distinct messages from {topic} before the timeout; \
                 missing (of seqs 0..{distinct}) e.g. {missing:?}; last consumer error: {last_error:?}",
                seen.len()
            );
        }
        let polled = consumer.poll(Duration::from_millis(100));
        if let Some(Err(e)) = &polled {
            last_error = Some(e.to_string());
        }
        if let Some(Ok(m)) = polled {
            let r = received_of(&m);
            let v: serde_json::Value =
                serde_json::from_slice(r.payload.as_deref().unwrap_or(b"{}")).unwrap_or_default();
            seen.insert(v["seq"].as_i64().unwrap_or(-1));
            out.push(r);
            if seen.len() >= distinct && done_at.is_none() {
                done_at = Some(std::time::Instant::now());
            }
        }
    }
}

/// `SELECT count(*) AS n`.
#[derive(QueryableByName)]
pub struct CountRow {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub n: i64,
}

/// The test broker's TLS and SASL_SSL listeners and the certificates and passwords that
/// `bin/kafka-start` made for them (`bin/test` exports these from `<data dir>/secrets/test.env`).
pub struct SecureKafka {
    /// `DEVOUR_TEST_KAFKA_SSL`: TLS, client certificate required (default: the PLAINTEXT port + 2).
    pub ssl_hosts: String,
    /// `DEVOUR_TEST_KAFKA_SASL`: SASL_SSL, PLAIN and SCRAM-SHA-512 (default: PLAINTEXT port + 3).
    pub sasl_hosts: String,
    /// `DEVOUR_TEST_KAFKA_SECRETS` (default `<repo>/.devour/kafka/secrets`).
    pub secrets: std::path::PathBuf,
}

impl SecureKafka {
    pub fn from_env() -> SecureKafka {
        let plain = kafka_hosts();
        let (host, port) = plain
            .rsplit_once(':')
            .expect("DEVOUR_TEST_KAFKA is HOST:PORT");
        let port: u16 = port.parse().expect("DEVOUR_TEST_KAFKA has a numeric port");
        let var = |name: &str, default: String| std::env::var(name).unwrap_or(default);
        SecureKafka {
            ssl_hosts: var("DEVOUR_TEST_KAFKA_SSL", format!("{host}:{}", port + 2)),
            sasl_hosts: var("DEVOUR_TEST_KAFKA_SASL", format!("{host}:{}", port + 3)),
            secrets: var(
                "DEVOUR_TEST_KAFKA_SECRETS",
                concat!(env!("CARGO_MANIFEST_DIR"), "/.devour/kafka/secrets").into(),
            )
            .into(),
        }
    }

    /// A file of the secrets directory, e.g. `ca.pem`; panics when missing.
    pub fn file(&self, name: &str) -> String {
        let p = self.secrets.join(name);
        assert!(
            p.is_file(),
            "{} is missing (run bin/test, or set DEVOUR_TEST_KAFKA_SECRETS to bin/kafka-start's <data dir>/secrets)",
            p.display()
        );
        p.display().to_string()
    }

    /// The content of a password file of the secrets directory.
    pub fn password(&self, name: &str) -> String {
        std::fs::read_to_string(self.file(name))
            .unwrap()
            .trim()
            .to_string()
    }
}

/// A file under the test target's scratch directory that child processes append their stderr
/// to (`tag` names it; one per test), so that a failure can show what they said.
pub fn child_log(tag: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("child-logs");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{}.log", unique(tag)));
    let _ = std::fs::remove_file(&path);
    path
}

/// `log` opened for appending, as a child's stdout or stderr.
pub fn append_to(log: &std::path::Path) -> std::process::Stdio {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap()
        .into()
}

/// The last 40 lines of `log`.
pub fn log_tail(log: &std::path::Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!(
        "--- last lines of {}\n{}",
        log.display(),
        lines[lines.len().saturating_sub(40)..].join("\n")
    )
}

/// Waits up to `limit` for `child` to exit; past that, kills it and returns `None`.
pub fn exit_within(
    child: &mut std::process::Child,
    limit: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits up to `limit` for `child` to exit; past that, kills it and fails, showing `log`.
pub fn wait_exit(
    child: &mut std::process::Child,
    limit: Duration,
    what: &str,
    log: &std::path::Path,
) -> std::process::ExitStatus {
    exit_within(child, limit)
        .unwrap_or_else(|| panic!("{what} did not exit within {limit:?}\n{}", log_tail(log)))
}

/// [`wait_exit`], and fails unless `child` exited 0 (`what` says what was expected).
pub fn wait_success(
    child: &mut std::process::Child,
    limit: Duration,
    what: &str,
    log: &std::path::Path,
) {
    let status = wait_exit(child, limit, what, log);
    assert!(status.success(), "{what}: {status:?}\n{}", log_tail(log));
}

/// Sends SIGTERM to `child`, failing if it cannot be sent.
pub fn sigterm(child: &std::process::Child) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -TERM {}: {status:?}", child.id());
}

/// A PostgreSQL role on `db` allowed `limit` connections at once, with rights on devour's
/// tables; dropped with this value.
pub struct LimitedRole {
    admin_url: String,
    pub role: String,
    /// `db`'s URL, logging in as the role.
    pub url: String,
}

impl LimitedRole {
    pub fn new(db: &TestDb, limit: u32) -> LimitedRole {
        use diesel::connection::SimpleConnection;
        use diesel::Connection;
        let role = unique("devour_limited");
        let mut c = diesel::PgConnection::establish(&db.url).unwrap();
        c.batch_execute(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD 'limited' CONNECTION LIMIT {limit}; \
             GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}; \
             GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role};"
        ))
        .unwrap();
        let url = db
            .url
            .replacen("postgres:postgres@", &format!("{role}:limited@"), 1);
        assert_ne!(
            url, db.url,
            "the test database URL has the expected credentials"
        );
        LimitedRole {
            admin_url: db.url.clone(),
            role,
            url,
        }
    }
}

impl Drop for LimitedRole {
    fn drop(&mut self) {
        use diesel::connection::SimpleConnection;
        use diesel::Connection;
        if let Ok(mut c) = diesel::PgConnection::establish(&self.admin_url) {
            let _ = c.batch_execute(&format!("DROP OWNED BY {0}; DROP ROLE {0}", self.role));
        }
    }
}
