//! Helpers of the `devour consume` tests: producing test messages, a recording handler, route
//! configurations, committed offsets, and running a route in the background.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devour::consume::{
    ConsumeReport, Consumer, Ctx, DigestError, Meta, Payload, Registry, RunOptions,
};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::Value;

use super::kafka_hosts;

/// One message to produce: key, payload, extra headers.
pub struct Out<'a> {
    pub key: Option<&'a str>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(&'a str, &'a str)>,
}

impl<'a> Out<'a> {
    /// `{"seq": seq, "key": key}` under `key`.
    pub fn seq(key: &'a str, seq: i64) -> Out<'a> {
        Out {
            key: Some(key),
            payload: Some(
                serde_json::json!({"seq": seq, "key": key})
                    .to_string()
                    .into_bytes(),
            ),
            headers: Vec::new(),
        }
    }
}

/// Produces `msgs` in order (idempotent, murmur2 like devour) and waits until all are acked.
pub fn produce(topic: &str, msgs: &[Out<'_>]) {
    let p: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka_hosts())
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .create()
        .unwrap();
    for m in msgs {
        let mut headers = OwnedHeaders::new();
        for (k, v) in &m.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let mut r: BaseRecord<'_, str, [u8]> = BaseRecord::to(topic).headers(headers);
        if let Some(k) = m.key {
            r = r.key(k);
        }
        if let Some(p) = &m.payload {
            r = r.payload(p.as_slice());
        }
        loop {
            match p.send(r) {
                Ok(()) => break,
                Err((e, back)) => {
                    assert!(
                        matches!(
                            e,
                            rdkafka::error::KafkaError::MessageProduction(
                                rdkafka::types::RDKafkaErrorCode::QueueFull
                            )
                        ),
                        "producing to {topic}: {e}"
                    );
                    p.poll(Duration::from_millis(10));
                    r = back;
                }
            }
        }
    }
    p.flush(Duration::from_secs(30))
        .expect("all test messages acked");
}

/// `n` messages `{"seq": i}` over `keys` keys (`k0`, `k1`, …), seq 0..n.
pub fn produce_seqs(topic: &str, n: i64, keys: i64) {
    let keys: Vec<String> = (0..keys).map(|k| format!("k{k}")).collect();
    let msgs: Vec<Out<'_>> = (0..n)
        .map(|i| Out::seq(&keys[(i % keys.len() as i64) as usize], i))
        .collect();
    produce(topic, &msgs);
}

/// What a recording handler saw of one call.
#[derive(Debug, Clone)]
pub struct Seen {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub attempt: u32,
    pub payload: Value,
    pub event: Option<String>,
    pub message_id: Option<String>,
}

impl Seen {
    pub fn seq(&self) -> i64 {
        self.payload["seq"].as_i64().unwrap_or(-1)
    }
}

/// Decides a recording handler's answer for a call (after it was recorded).
pub type Behaviour = Arc<dyn Fn(&Seen, &mut Ctx<'_>) -> Result<(), DigestError> + Send + Sync>;

/// A handler that records every call, then answers what `behaviour` says.
pub struct Recorder {
    pub calls: Arc<Mutex<Vec<Seen>>>,
    pub behaviour: Behaviour,
}

impl Consumer for Recorder {
    type Message = Value;

    fn digest(
        &mut self,
        meta: &Meta<'_>,
        message: Payload<'_, Value>,
        ctx: &mut Ctx<'_>,
    ) -> Result<(), DigestError> {
        let payload = match message {
            Payload::Json(v) | Payload::Obj(v) => v,
            Payload::Raw(b) => serde_json::from_slice(b).unwrap_or(Value::Null),
        };
        let seen = Seen {
            topic: meta.topic.to_string(),
            partition: meta.partition,
            offset: meta.offset,
            key: meta.key_str().map(str::to_string),
            attempt: meta.attempt,
            payload,
            event: meta.event().map(|e| e.to_string()),
            message_id: meta.message_id().map(str::to_string),
        };
        self.calls.lock().unwrap().push(seen.clone());
        (self.behaviour)(&seen, ctx)
    }
}

/// A registry with handler `record` (a [`Recorder`]) and the calls it will see.
pub fn recording(behaviour: Behaviour) -> (Registry, Arc<Mutex<Vec<Seen>>>) {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let mut registry = Registry::new();
    let c = calls.clone();
    registry.register("record", move || Recorder {
        calls: c.clone(),
        behaviour: behaviour.clone(),
    });
    (registry, calls)
}

/// A behaviour that accepts everything.
pub fn accept() -> Behaviour {
    Arc::new(|_, _| Ok(()))
}

/// Runs `route` until its partitions are read to the end; fails after `timeout`.
pub fn drain(
    config: &devour::Config,
    route: &str,
    registry: &Registry,
    timeout: Duration,
) -> ConsumeReport {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let (s, d) = (stop.clone(), done.clone());
    let watchdog = std::thread::spawn(move || {
        let t = Instant::now();
        while t.elapsed() < timeout {
            if d.load(Ordering::Relaxed) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        s.store(true, Ordering::Relaxed);
        true
    });
    let report = devour::consume::run(config, route, registry, RunOptions::drain(), stop)
        .unwrap_or_else(|e| panic!("devour consume {route}: {e}"));
    done.store(true, Ordering::Relaxed);
    let fired = watchdog.join().unwrap();
    assert!(
        !fired,
        "route {route} did not drain within {timeout:?}: {report:?}"
    );
    report
}

/// A consumer to read committed offsets of `group` (it never joins the group).
pub fn offsets_reader(group: &str) -> BaseConsumer {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka_hosts())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap()
}

/// The committed offset of `group` on each of `partitions` partitions of `topic` (-1 = none).
pub fn committed(reader: &BaseConsumer, topic: &str, partitions: i32) -> Vec<i64> {
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = reader
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    (0..partitions)
        .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(n)) => n,
            _ => -1,
        })
        .collect()
}

/// Sets `group`'s committed offsets of `topic` back to 0 (the group must have no members).
pub fn rewind(group: &str, topic: &str, partitions: i32) {
    let c = offsets_reader(group);
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Offset(0))
            .unwrap();
    }
    c.commit(&tpl, rdkafka::consumer::CommitMode::Sync)
        .expect("rewinding offsets");
}

/// Reads every message of `topic` now in it (a fresh group; stops after 3 s of silence).
pub fn read_all(topic: &str, timeout: Duration) -> Vec<super::Received> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka_hosts())
        .set("group.id", super::unique("dlq-reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let deadline = Instant::now() + timeout;
    let mut quiet_since = Instant::now();
    let mut out = Vec::new();
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                out.push(super::received_of(&m));
                quiet_since = Instant::now();
            }
            _ if !out.is_empty() && quiet_since.elapsed() > Duration::from_secs(3) => break,
            _ => {}
        }
    }
    out
}
