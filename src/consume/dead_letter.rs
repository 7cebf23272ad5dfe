//! Publishing a message that will never succeed to the route's dead-letter topic, with headers
//! saying where it came from and why it failed. The consumer commits the message's offset only
//! after the broker acknowledged the dead letter.

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};

use super::handler::Meta;
use super::ConsumeError;
use crate::config::{Config, ConsumerRoute};

/// Header: the topic the message was read from.
pub const HEADER_DLQ_TOPIC: &str = "devour-dlq-topic";
/// Header: its partition.
pub const HEADER_DLQ_PARTITION: &str = "devour-dlq-partition";
/// Header: its offset.
pub const HEADER_DLQ_OFFSET: &str = "devour-dlq-offset";
/// Header: the last error.
pub const HEADER_DLQ_ERROR: &str = "devour-dlq-error";
/// Header: how many times the handler was called.
pub const HEADER_DLQ_ATTEMPTS: &str = "devour-dlq-attempts";
/// Header: the consumer group.
pub const HEADER_DLQ_GROUP: &str = "devour-dlq-group";
/// Header: the route.
pub const HEADER_DLQ_ROUTE: &str = "devour-dlq-route";
/// Header: when it was dead-lettered (Unix milliseconds).
pub const HEADER_DLQ_FAILED_AT: &str = "devour-dlq-failed-at-ms";

/// Longest error text carried in a header.
const MAX_ERROR_BYTES: usize = 4096;

#[derive(Default)]
struct Context {
    quiet: crate::kafka_log::Quiet,
}

crate::kafka_log::quiet_client_context!(Context);

impl ProducerContext for Context {
    type DeliveryOpaque = Box<std::sync::mpsc::SyncSender<Result<(), String>>>;

    fn delivery(&self, result: &DeliveryResult<'_>, done: Self::DeliveryOpaque) {
        let _ = done.send(result.as_ref().map(|_| ()).map_err(|(e, _)| e.to_string()));
    }
}

/// The dead-letter producer of one route (idempotent, murmur2 like every devour producer).
pub(crate) struct DeadLetters {
    producer: ThreadedProducer<Context>,
    route: ConsumerRoute,
}

impl DeadLetters {
    pub(crate) fn new(config: &Config, route: &ConsumerRoute) -> Result<DeadLetters, ConsumeError> {
        let mut c = config.kafka.client_config();
        // The route's brokers and credentials (a principal allowed on its topic and `.dlq`).
        super::route_connection(&mut c, route);
        c.set("enable.idempotence", "true")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "0");
        // A dead letter is the message plus headers: the topic's limit decides, not the
        // client's default (unless `[kafka.properties]` sets one).
        if c.get("message.max.bytes").is_none() {
            c.set(
                "message.max.bytes",
                crate::config::PRODUCER_MESSAGE_MAX_BYTES,
            );
        }
        let producer = c.create_with_context(Context::default()).map_err(|e| {
            ConsumeError::Kafka(format!(
                "dead-letter producer: {}",
                crate::kafka_log::redact(e)
            ))
        })?;
        Ok(DeadLetters {
            producer,
            route: route.clone(),
        })
    }

    /// Sends `payload` with `meta`'s key and headers plus the `devour-dlq-*` headers, and waits
    /// for the broker's answer.
    pub(crate) fn publish(
        &self,
        meta: &Meta<'_>,
        payload: Option<&[u8]>,
        error: &str,
        attempts: u32,
        stop: &std::sync::atomic::AtomicBool,
    ) -> Result<String, String> {
        let topic = self.route.dead_letter_topic_for(meta.topic);
        let mut headers = OwnedHeaders::new();
        for (k, v) in meta.raw_headers() {
            if !k.starts_with(b"devour-dlq-") {
                // rdkafka takes names as text: a name that is not UTF-8 goes on with U+FFFD
                // for its bad bytes.
                let k = String::from_utf8_lossy(k);
                headers = headers.insert(Header { key: &k, value: v });
            }
        }
        let mut error = error.to_string();
        if error.len() > MAX_ERROR_BYTES {
            let mut cut = MAX_ERROR_BYTES;
            while !error.is_char_boundary(cut) {
                cut -= 1;
            }
            error.truncate(cut);
        }
        let now_ms = chrono::Utc::now().timestamp_millis().to_string();
        let extra = [
            (HEADER_DLQ_TOPIC, meta.topic.to_string()),
            (HEADER_DLQ_PARTITION, meta.partition.to_string()),
            (HEADER_DLQ_OFFSET, meta.offset.to_string()),
            (HEADER_DLQ_ERROR, error),
            (HEADER_DLQ_ATTEMPTS, attempts.to_string()),
            (HEADER_DLQ_GROUP, self.route.group.clone()),
            (HEADER_DLQ_ROUTE, self.route.name.clone()),
            (HEADER_DLQ_FAILED_AT, now_ms),
        ];
        for (k, v) in &extra {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let size = payload.map_or(0, <[u8]>::len)
            + meta.key.map_or(0, <[u8]>::len)
            + extra.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        // The one failure that waiting does not cure: say what would.
        let hint = |e: &str| {
            if e.contains("too large") {
                format!(
                    " (the message with its headers is about {size} bytes: raise the \
                     max.message.bytes of {topic}; the partition waits until then)"
                )
            } else {
                String::new()
            }
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let mut record: BaseRecord<'_, [u8], [u8], _> =
            BaseRecord::with_opaque_to(&topic, Box::new(tx)).headers(headers);
        if let Some(k) = meta.key {
            record = record.key(k);
        }
        if let Some(p) = payload {
            record = record.payload(p);
        }
        self.producer.send(record).map_err(|(e, _)| {
            let e = e.to_string();
            format!("cannot queue the dead letter for {topic}: {e}{}", hint(&e))
        })?;
        // message.timeout.ms (default 300 s) bounds the wait; a little more for the callback.
        // A stop ends the wait: the message is not finished, so it is read again later.
        let deadline = std::time::Instant::now() + Duration::from_secs(330);
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(Ok(())) => return Ok(topic),
                Ok(Err(e)) => {
                    return Err(format!("dead letter to {topic} failed: {e}{}", hint(&e)))
                }
                Err(_) if stop.load(std::sync::atomic::Ordering::Relaxed) => {
                    return Err(format!(
                        "dead letter to {topic}: stopping before its acknowledgement"
                    ))
                }
                Err(_) if std::time::Instant::now() >= deadline => {
                    return Err(format!("dead letter to {topic}: no delivery report"))
                }
                Err(_) => {}
            }
        }
    }
}
