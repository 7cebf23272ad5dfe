//! `producer_type = Direct`: the message goes to the real broker at once, keyed by murmur2 as the
//! Java client would, with devour's headers; nothing is written to the outbox.

mod common;

use std::time::Duration;

use common::{Backend, TestConn, TestDb};
use devour::config::{Config, Origin};
use devour::outbox::partition_for_key;
use devour::prelude::*;
use devour::{ProduceError, Producer};
use diesel::prelude::*;

#[derive(serde::Serialize)]
struct Ping {
    n: u32,
}

/// Sends `Ping`s straight to Kafka, to the topic given in the context.
struct PingProducer;
impl Producer for PingProducer {
    type Source = u32;
    type Message = Ping;
    const CONFIG: ProducerConfig = ProducerConfig::new()
        .partition_key("n")
        .producer_type(ProducerType::Direct);
    fn get_schema(&self, _: &Event, n: &u32, _: &Context) -> Result<Ping, ProduceError> {
        Ok(Ping { n: *n })
    }
    fn get_topic(&self, _: &Event, _: &u32, ctx: &Context) -> Result<String, ProduceError> {
        Ok(ctx
            .get("topic")
            .and_then(|t| t.as_str())
            .unwrap_or("")
            .to_string())
    }
}

fn init_direct() {
    let config = Config::from_toml_str(
        &format!("[kafka]\nhosts = \"{}\"\n", common::kafka_hosts()),
        Origin::Defaults,
        &Default::default(),
    )
    .unwrap();
    devour::init(&config);
}

#[test]
fn direct_message_is_read_back_from_the_broker() {
    init_direct();
    let topic = common::create_topic("direct", 3);
    let db = TestDb::new(Backend::Sqlite, "direct");
    let mut conn = SqliteConnection::open(&db);
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let ctx = Context::new()
        .with("topic", topic.as_str())
        .with("traceparent", tp);
    let mut sent = Vec::new();
    for n in 0..6u32 {
        let p = PingProducer
            .produce(&mut conn, Event::Create, &n, &Extras::new(), &ctx)
            .unwrap();
        assert_eq!(p.outbox_id, None);
        let (partition, offset) = p.delivered.expect("acked by the broker");
        assert!(offset >= 0);
        sent.push((n, partition, p.message.message_id.to_string()));
    }
    assert_eq!(
        conn.count("devour_outbox"),
        0,
        "direct messages bypass the outbox"
    );

    let got = common::consume(&topic, 6, Duration::from_secs(30));
    for (n, partition, id) in &sent {
        let key = n.to_string();
        let m = got
            .iter()
            .find(|m| m.key.as_deref() == Some(key.as_str()))
            .unwrap_or_else(|| panic!("key {key} not read back: {got:?}"));
        assert_eq!(m.partition, *partition, "reported partition of key {key}");
        assert_eq!(
            m.partition,
            partition_for_key(key.as_bytes(), 3),
            "murmur2 partition of key {key}"
        );
        let payload: serde_json::Value =
            serde_json::from_slice(m.payload.as_deref().unwrap()).unwrap();
        assert_eq!(payload, serde_json::json!({"n": n, "event": "create"}));
        let header = |name: &str| {
            m.headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(header("message-id"), Some(id.as_str()));
        assert_eq!(header("event"), Some("create"));
        assert_eq!(header("content-type"), Some("application/json"));
        assert_eq!(header("traceparent"), Some(tp));
    }
}

#[test]
fn direct_message_with_an_invalid_topic_is_refused_before_sending() {
    init_direct();
    let db = TestDb::new(Backend::Sqlite, "direct_bad");
    let mut conn = SqliteConnection::open(&db);
    let err = PingProducer
        .produce(
            &mut conn,
            Event::Create,
            &1,
            &Extras::new(),
            &Context::new().with("topic", "no spaces allowed"),
        )
        .unwrap_err();
    assert!(matches!(err, ProduceError::InvalidTopic { .. }), "{err}");
}

#[test]
fn direct_is_not_transactional() {
    init_direct();
    let topic = common::create_topic("direct_rollback", 1);
    let db = TestDb::new(Backend::Sqlite, "direct_rb");
    let mut conn = SqliteConnection::open(&db);
    let _ = conn.transaction(|c| {
        PingProducer.produce(
            c,
            Event::Create,
            &42,
            &Extras::new(),
            &Context::new().with("topic", topic.as_str()),
        )?;
        Err::<(), _>(ProduceError::Custom("rolled back".into()))
    });
    // As documented: the message was sent before the rollback and stays sent.
    let got = common::consume(&topic, 1, Duration::from_secs(30));
    assert_eq!(got[0].key.as_deref(), Some("42"));
}
