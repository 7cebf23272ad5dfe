//! `producer_type = Direct`: send at once through rdkafka and wait for the broker's ack.
//! Not transactional: a message sent this way stays sent when the caller's transaction rolls back.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};

use super::{OutboxMessage, ProduceError};
use crate::config::{Config, KafkaConfig};

/// A Kafka producer that sends one message and waits for its acknowledgement.
#[derive(Clone)]
pub struct DirectProducer {
    inner: FutureProducer<crate::kafka_log::QuietContext>,
}

impl DirectProducer {
    /// Creates a producer from `[kafka]`: idempotent, murmur2 partitioner (keys land where the
    /// Java client puts them), no linger. `[kafka.properties]` win over these defaults.
    pub fn new(kafka: &KafkaConfig) -> Result<Self, KafkaError> {
        let mut cfg = rdkafka::ClientConfig::new();
        cfg.set("enable.idempotence", "true")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "0")
            .set("message.timeout.ms", "30000")
            .set(
                "message.max.bytes",
                crate::config::PRODUCER_MESSAGE_MAX_BYTES,
            );
        for (k, v) in kafka.client_properties() {
            cfg.set(k, v);
        }
        Ok(DirectProducer {
            inner: cfg
                .create_with_context(Default::default())
                .map_err(crate::kafka_log::redact)?,
        })
    }

    /// Sends `message` and blocks until the broker acknowledged it; returns (partition, offset).
    pub fn send(&self, message: &OutboxMessage) -> Result<(i32, i64), ProduceError> {
        let mut record: FutureRecord<'_, str, [u8]> =
            FutureRecord::to(&message.topic).headers(message.kafka_headers());
        if let Some(k) = &message.key {
            record = record.key(k.as_str());
        }
        if let Some(p) = message.partition {
            record = record.partition(p);
        }
        if let Some(v) = &message.payload {
            record = record.payload(v.as_slice());
        }
        let delivery = loop {
            match self.inner.send_result(record) {
                Ok(d) => break d,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    self.inner.poll(Duration::from_millis(10));
                }
                Err((e, _)) => return Err(e.into()),
            }
        };
        match futures::executor::block_on(delivery) {
            Ok(Ok(d)) => Ok((d.partition, d.offset)),
            Ok(Err((e, _))) => Err(e.into()),
            Err(_canceled) => Err(KafkaError::Canceled.into()),
        }
    }

    /// Waits up to `timeout` for messages still in flight.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.inner.flush(timeout)
    }
}

#[derive(Default)]
struct DirectState {
    kafka: Option<KafkaConfig>,
    producer: Option<Arc<DirectProducer>>,
}

static DIRECT: Mutex<DirectState> = Mutex::new(DirectState {
    kafka: None,
    producer: None,
});

/// Sets the `[kafka]` settings that direct producers use in this process. Without this call,
/// the first direct message loads them with [`Config::load`]. Nothing connects here.
pub fn init_direct(kafka: &KafkaConfig) {
    let mut state = DIRECT.lock().unwrap_or_else(|p| p.into_inner());
    state.kafka = Some(kafka.clone());
    state.producer = None;
}

fn shared_producer() -> Result<Arc<DirectProducer>, ProduceError> {
    // A broken producer is let go after the lock (declared first, dropped last): its drop may
    // wait for its queue.
    let mut _broken = None;
    let mut state = DIRECT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = &state.producer {
        // A fatal error (idempotence broken: e.g. the broker refused a producer id) fails every
        // later send of that producer: start a new one.
        match p.inner.client().fatal_error() {
            None => return Ok(p.clone()),
            Some((code, reason)) => {
                tracing::warn!(
                    "direct producer: fatal error {code:?} ({reason}); creating a new one"
                );
                _broken = state.producer.take();
            }
        }
    }
    let kafka = match &state.kafka {
        Some(k) => k.clone(),
        None => Config::load()?.kafka,
    };
    let p = Arc::new(DirectProducer::new(&kafka)?);
    state.kafka = Some(kafka);
    state.producer = Some(p.clone());
    Ok(p)
}

pub(crate) fn send(message: &OutboxMessage) -> Result<(i32, i64), ProduceError> {
    shared_producer()?.send(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    /// After a fatal error, the next direct message gets a new producer instead of failing like
    /// every later one of the old producer. (librdkafka's mock cluster refuses the producer id,
    /// which a real broker without an authorizer cannot do on demand.)
    #[test]
    fn a_producer_with_a_fatal_error_is_replaced() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("direct", 1, 1).unwrap();
        cluster.request_errors(
            RDKafkaApiKey::InitProducerId,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_CLUSTER_AUTHORIZATION_FAILED],
        );
        let kafka = Config::from_toml_str(
            &format!(
                "[kafka]\nhosts = \"{}\"\n[kafka.properties]\n\"message.timeout.ms\" = \"5000\"\n",
                cluster.bootstrap_servers()
            ),
            crate::config::Origin::Defaults,
            &Default::default(),
        )
        .unwrap()
        .kafka;
        init_direct(&kafka);
        let m = OutboxMessage::new("direct", Some(b"{}".to_vec()));
        let first = shared_producer().unwrap();
        assert!(send(&m).is_err(), "the producer id is refused");
        assert!(
            first.inner.client().fatal_error().is_some(),
            "a refused producer id is fatal for an idempotent producer"
        );
        let second = shared_producer().unwrap();
        assert!(
            !Arc::ptr_eq(&first, &second),
            "replaced after the fatal error"
        );
        assert!(send(&m).is_ok(), "the new producer delivers");
    }
}
