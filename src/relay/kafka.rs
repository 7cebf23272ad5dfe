//! The relay's Kafka side: an idempotent producer whose delivery reports carry the outbox row
//! they are for, the classification of delivery errors, and the topics' size limits.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};

use super::store::Row;
use crate::config::KafkaConfig;
use crate::outbox::{
    HEADER_CONTENT_TYPE, HEADER_EVENT, HEADER_MESSAGE_ID, HEADER_POSSIBLE_DUPLICATE,
};

/// What the relay needs to know about a message in flight.
#[derive(Debug, Clone)]
pub(crate) struct InFlight {
    pub id: i64,
    pub shard: i32,
    pub epoch: i64,
    pub created_ms: i64,
    /// [`row_size`] of the row.
    pub size: usize,
    /// The producer's `batch.size` when it was sent.
    pub batch: usize,
}

/// A delivery report, as the relay's committer receives it.
#[derive(Debug)]
pub(crate) struct Report {
    pub row: InFlight,
    pub outcome: Outcome,
    /// When the delivery report arrived (ms since the epoch): for a delivered row, the time of
    /// the broker's acknowledgement as the relay learns it.
    pub reported_ms: i64,
}

/// How a delivery ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The broker acknowledged it.
    Delivered,
    /// The broker will never take it (too large, topic missing, not authorized, …); with the
    /// message's key.
    Rejected(String, Option<String>),
    /// It failed for a reason that may pass (or the producer broke down): send it again.
    Failed(String),
    /// The broker refused it as too large, but it is small against the producer's batches:
    /// the batch it went in was too large for the topic. Send it again in smaller batches.
    BatchTooLarge(String),
}

/// Errors that no retry can fix: the row goes to the dead letters.
pub(crate) fn is_permanent(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::MessageSizeTooLarge
            | C::UnknownTopicOrPartition
            | C::UnknownTopic
            | C::UnknownPartition
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::InvalidRecord
            | C::InvalidMessage
            | C::InvalidTopic
            | C::InvalidRequiredAcks
            | C::PolicyViolation
    )
}

/// Whether `code` says the topic or partition does not exist. That is permanent only once it
/// lasts: a broker with stale metadata (during a rolling restart, say) says it of a topic that
/// exists (see [`MissingTopics`]).
pub(crate) fn is_missing(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition
    )
}

/// The topics the brokers said do not exist, and since when. A row of such a topic is
/// dead-lettered only once the topic has been missing for `grace` (librdkafka's
/// `topic.metadata.propagation.max.ms`, 30 s by default, which it also gives a topic being
/// created); until then the relay starts over from the oldest row and tries again.
pub(crate) struct MissingTopics {
    since: std::sync::Mutex<HashMap<String, Instant>>,
    any: std::sync::atomic::AtomicBool,
    grace: Duration,
}

impl MissingTopics {
    pub(crate) fn new(cfg: &ClientConfig) -> MissingTopics {
        let ms = cfg
            .get("topic.metadata.propagation.max.ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(30_000);
        MissingTopics {
            since: Default::default(),
            any: Default::default(),
            grace: Duration::from_millis(ms),
        }
    }

    /// `topic` was just reported missing: whether it has been missing for the whole grace.
    pub(crate) fn for_good(&self, topic: &str) -> bool {
        use std::sync::atomic::Ordering;
        let mut since = self.since.lock().unwrap_or_else(|p| p.into_inner());
        self.any.store(true, Ordering::Release);
        since
            .entry(topic.to_string())
            .or_insert_with(Instant::now)
            .elapsed()
            >= self.grace
    }

    /// A message reached `topic`: it exists.
    pub(crate) fn found(&self, topic: &str) {
        use std::sync::atomic::Ordering;
        if self.any.load(Ordering::Acquire) {
            let mut since = self.since.lock().unwrap_or_else(|p| p.into_inner());
            since.remove(topic);
            self.any.store(!since.is_empty(), Ordering::Release);
        }
    }

    /// The grace, for messages.
    pub(crate) fn grace(&self) -> Duration {
        self.grace
    }
}

/// Routes delivery reports to the committer.
pub(crate) struct RelayContext {
    reports: Sender<Report>,
    missing: std::sync::Arc<MissingTopics>,
    quiet: crate::kafka_log::Quiet,
}

crate::kafka_log::quiet_client_context!(RelayContext);

impl ProducerContext for RelayContext {
    type DeliveryOpaque = Box<InFlight>;

    fn delivery(&self, result: &DeliveryResult<'_>, row: Self::DeliveryOpaque) {
        let outcome = match result {
            Ok(m) => {
                self.missing.found(m.topic());
                Outcome::Delivered
            }
            // The broker checks `max.message.bytes` against whole record batches; librdkafka
            // fails every message of a batch it refused, and splits nothing.
            // A row smaller than the batch limit may have shared its batch: it goes again in
            // smaller ones (halving until each row travels alone, then a refusal is the row's).
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge), _))
                if row.size < row.batch =>
            {
                Outcome::BatchTooLarge(format!(
                    "a batch of up to {} bytes was too large for the topic",
                    row.batch
                ))
            }
            Err((KafkaError::MessageProduction(code), m))
                if is_missing(*code) && !self.missing.for_good(m.topic()) =>
            {
                Outcome::Failed(format!(
                    "{code} (topic {}: until it has been missing for {} s, the relay tries again)",
                    m.topic(),
                    self.missing.grace().as_secs()
                ))
            }
            Err((KafkaError::MessageProduction(code), m)) if is_permanent(*code) => {
                Outcome::Rejected(
                    // "TopicAuthorizationFailed (Broker: Topic authorization failed)".
                    code.to_string(),
                    m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                )
            }
            Err((e, _)) => Outcome::Failed(e.to_string()),
        };
        // The committer outlives the producer; if it is gone, the relay is stopping anyway.
        let _ = self.reports.send(Report {
            row: *row,
            outcome,
            reported_ms: chrono::Utc::now().timestamp_millis(),
        });
    }
}

/// The relay's producer.
pub(crate) type RelayProducer = ThreadedProducer<RelayContext>;

/// librdkafka's default `batch.size`.
const DEFAULT_BATCH_SIZE: usize = 1_000_000;

/// The largest record batch (`batch.size`) `cfg` lets the producer build.
pub(crate) fn batch_size(cfg: &ClientConfig) -> usize {
    cfg.get("batch.size")
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_BATCH_SIZE)
}

/// The largest `batch.size` whose record batches a topic with `max.message.bytes` = `limit`
/// takes (with room for the batch's framing and for compression that does not shrink the
/// data): the broker's default limit (1,048,588) takes librdkafka's default batches.
pub(crate) fn batch_size_for_limit(limit: usize) -> usize {
    limit.saturating_sub(limit / 50 + 512).max(1)
}

/// The relay producer's settings that per-key order relies on: `[relay.producer]` may not
/// change them (checked when the configuration loads), and those `[kafka.properties]` sets
/// for devour's other clients do not apply to the relay.
pub(crate) const ORDERING_SETTINGS: &[(&str, &str)] = &[
    ("enable.idempotence", "true"),
    ("enable.gapless.guarantee", "true"),
    ("message.timeout.ms", "0"),
];

/// Other names librdkafka takes for an ordering setting.
const ALIASES: &[(&str, &str)] = &[("delivery.timeout.ms", "message.timeout.ms")];

/// Partitioners that spread one key's messages over several partitions (their order lost).
const KEY_SPREADING_PARTITIONERS: &[&str] = &["random"];

/// Why producer property `name` = `value` would break per-key order, if it would.
pub(crate) fn ordering_conflict(name: &str, value: &str) -> Option<String> {
    let canonical = ALIASES
        .iter()
        .find(|(alias, _)| *alias == name)
        .map_or(name, |(_, c)| *c);
    if let Some((_, want)) = ORDERING_SETTINGS.iter().find(|(k, _)| *k == canonical) {
        return (value != *want).then(|| format!("per-key order relies on {canonical} = {want}"));
    }
    (name == "partitioner" && KEY_SPREADING_PARTITIONERS.contains(&value)).then(|| {
        format!(
            "`{value}` spreads one key's messages over several partitions, losing their order; \
             use a key-hashing partitioner such as murmur2_random (the default)"
        )
    })
}

/// The `[kafka.properties]` that the relay does not apply, as "name = value" (for a warning).
pub(crate) fn overridden_properties(kafka: &KafkaConfig) -> Vec<String> {
    kafka
        .properties
        .iter()
        .filter(|(k, v)| ordering_conflict(k, v).is_some())
        .map(|(k, v)| format!("{k} = {v}"))
        .collect()
}

/// librdkafka settings of the relay's producer, lowest precedence first: devour's defaults,
/// then `[kafka]` (with `[kafka.properties]`), then `[relay.producer]`; the
/// [`ORDERING_SETTINGS`] always.
pub(crate) fn producer_config(
    kafka: &KafkaConfig,
    tuning: &BTreeMap<String, String>,
) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    for (k, v) in [
        // Ordered, gapless, exactly-once per partition session; acks=all.
        ("enable.idempotence", "true"),
        // A batch the broker refuses for good (too large for the topic, …) stops the producer
        // instead of letting the later batches of its partition through: those fail too, and
        // are sent again after it, from the oldest row, so no key's order changes.
        ("enable.gapless.guarantee", "true"),
        // Keys land where the Java client puts them.
        ("partitioner", "murmur2_random"),
        // Never give up on a message: a broker outage is waited out, so nothing is reordered
        // by an expiry. A stop flushes with its own bound.
        ("message.timeout.ms", "0"),
        // A backlog fills batches long before the linger ends; a trickle is sent after 1 ms
        // (5 ms doubled the commit → ack latency at 1,000 msg/s and drained no faster).
        ("linger.ms", "1"),
        ("batch.num.messages", "10000"),
        ("compression.type", "lz4"),
        (
            "queue.buffering.max.messages",
            crate::config::RELAY_QUEUE_MAX_MESSAGES,
        ),
        ("queue.buffering.max.kbytes", "1048576"),
        (
            "message.max.bytes",
            crate::config::PRODUCER_MESSAGE_MAX_BYTES,
        ),
    ] {
        cfg.set(k, v);
    }
    for (k, v) in kafka.client_properties() {
        cfg.set(k, v);
    }
    for (k, v) in tuning {
        cfg.set(k, v);
    }
    for (alias, _) in ALIASES {
        cfg.remove(alias);
    }
    for (k, v) in ORDERING_SETTINGS {
        cfg.set(*k, *v);
    }
    if cfg
        .get("partitioner")
        .is_some_and(|p| ordering_conflict("partitioner", p).is_some())
    {
        cfg.set("partitioner", "murmur2_random");
    }
    cfg
}

/// Creates the producer; its delivery reports go to `reports`.
pub(crate) fn create_producer(
    cfg: &ClientConfig,
    reports: Sender<Report>,
    missing: std::sync::Arc<MissingTopics>,
) -> Result<RelayProducer, KafkaError> {
    cfg.create_with_context(RelayContext {
        reports,
        missing,
        quiet: Default::default(),
    })
    .map_err(crate::kafka_log::redact)
}

/// The Kafka headers of a row: `message-id`, `content-type`, `event`, `possible-duplicate`
/// when `resent` (the row may have been sent before), then its `headers`.
pub(crate) fn headers(row: &Row, resent: bool) -> OwnedHeaders {
    let mut h = OwnedHeaders::new_with_capacity(4)
        .insert(Header {
            key: HEADER_MESSAGE_ID,
            value: Some(row.message_id.as_bytes()),
        })
        .insert(Header {
            key: HEADER_CONTENT_TYPE,
            value: Some(row.content_type.as_bytes()),
        });
    if let Some(e) = &row.event {
        h = h.insert(Header {
            key: HEADER_EVENT,
            value: Some(e.as_bytes()),
        });
    }
    if resent {
        h = h.insert(Header {
            key: HEADER_POSSIBLE_DUPLICATE,
            value: Some(b"true"),
        });
    }
    if row.headers.len() > 2 {
        // A malformed headers column (plain-SQL writers) is carried as one header rather than
        // losing the message.
        match serde_json::from_str::<BTreeMap<String, serde_json::Value>>(&row.headers) {
            Ok(map) => {
                for (k, v) in map {
                    // Set above from the row's columns: a second copy would be the one
                    // consumers read (a plain-SQL writer's headers are not checked). `event`
                    // only when the column has one.
                    let from_column = crate::outbox::is_reserved_header(&k)
                        && (k != HEADER_EVENT || row.event.is_some());
                    if from_column {
                        warn_shadowed_header_once(row.id, &k);
                        continue;
                    }
                    let text = match v {
                        serde_json::Value::String(s) => s,
                        other => other.to_string(),
                    };
                    h = h.insert(Header {
                        key: &k,
                        value: Some(text.as_bytes()),
                    });
                }
            }
            Err(_) => {
                h = h.insert(Header {
                    key: "devour-headers",
                    value: Some(row.headers.as_bytes()),
                })
            }
        }
    }
    h
}

/// Says once per process that a row's `headers` column named a header its columns set.
fn warn_shadowed_header_once(id: i64, name: &str) {
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            id,
            "the headers column of outbox row {id} names `{name}`, which the row's own column sets: \
             the column's value is sent (docs/outbox-table.md); later rows like it are not logged"
        );
    }
}

/// The record for a row.
pub(crate) fn record<'a>(
    row: &'a Row,
    epoch: i64,
    headers: OwnedHeaders,
    batch: usize,
) -> BaseRecord<'a, str, [u8], Box<InFlight>> {
    BaseRecord::with_opaque_to(
        &row.topic,
        Box::new(InFlight {
            id: row.id,
            shard: row.shard,
            epoch,
            created_ms: row.created_ms,
            size: row_size(row),
            batch,
        }),
    )
    .headers(headers)
}

/// The wire size of a row as the broker counts it against `max.message.bytes` (roughly).
pub(crate) fn row_size(row: &Row) -> usize {
    row.payload.as_ref().map_or(0, Vec::len)
        + row.partition_key.as_ref().map_or(0, String::len)
        + row.headers.len()
        + row.message_id.len()
        + row.content_type.len()
        + row.event.as_ref().map_or(0, String::len)
        + HEADER_POSSIBLE_DUPLICATE.len()
        + 64
}

/// Each topic's `max.message.bytes`, asked of the broker once in a while, so that a row the
/// topic can never take is dead-lettered before it is sent (and so before any later row of its
/// key).
pub(crate) struct TopicLimits {
    admin: AdminClient<crate::kafka_log::QuietContext>,
    known: HashMap<String, (Option<usize>, Instant)>,
}

const LIMIT_TTL: Duration = Duration::from_secs(300);

impl TopicLimits {
    pub(crate) fn new(kafka: &KafkaConfig) -> Result<Self, KafkaError> {
        Ok(TopicLimits {
            admin: kafka
                .client_config()
                .create_with_context(Default::default())
                .map_err(crate::kafka_log::redact)?,
            known: HashMap::new(),
        })
    }

    /// The topic's `max.message.bytes`, if the broker said (a topic that does not exist yet has
    /// none; the broker's default applies when it is created).
    pub(crate) fn limit(&mut self, topic: &str) -> Option<usize> {
        if let Some((limit, at)) = self.known.get(topic) {
            if at.elapsed() < LIMIT_TTL {
                return *limit;
            }
        }
        let limit = self.describe(topic);
        self.known
            .insert(topic.to_string(), (limit, Instant::now()));
        limit
    }

    /// Asks the broker again (the topic's settings may have changed).
    pub(crate) fn refresh(&mut self, topic: &str) -> Option<usize> {
        self.known.remove(topic);
        self.limit(topic)
    }

    fn describe(&self, topic: &str) -> Option<usize> {
        let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(5)));
        let res = futures::executor::block_on(
            self.admin
                .describe_configs([&ResourceSpecifier::Topic(topic)], &opts),
        )
        .ok()?;
        let config = res.into_iter().next()?.ok()?;
        config
            .get("max.message.bytes")
            .and_then(|e| e.value.as_deref())
            .and_then(|v| v.parse().ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[kafka.properties]` set for devour's other clients do not loosen the relay's producer.
    #[test]
    fn the_relay_keeps_its_ordering_settings_over_kafka_properties() {
        let config = crate::Config::from_toml_str(
            "[kafka]\nhosts = \"a:1\"\n[kafka.properties]\n\"message.timeout.ms\" = 5000\n\
             \"delivery.timeout.ms\" = 9000\n\"partitioner\" = \"random\"\n\
             \"enable.gapless.guarantee\" = false\n\"linger.ms\" = 7\n",
            crate::config::Origin::Defaults,
            &Default::default(),
        )
        .unwrap();
        let cfg = producer_config(&config.kafka, &config.relay.producer);
        assert_eq!(cfg.get("message.timeout.ms"), Some("0"));
        assert_eq!(
            cfg.get("delivery.timeout.ms"),
            None,
            "its alias is left out"
        );
        assert_eq!(cfg.get("partitioner"), Some("murmur2_random"));
        assert_eq!(cfg.get("enable.gapless.guarantee"), Some("true"));
        assert_eq!(cfg.get("enable.idempotence"), Some("true"));
        assert_eq!(cfg.get("linger.ms"), Some("7"), "other properties apply");
        assert_eq!(
            overridden_properties(&config.kafka),
            vec![
                "delivery.timeout.ms = 9000".to_string(),
                "enable.gapless.guarantee = false".to_string(),
                "message.timeout.ms = 5000".to_string(),
                "partitioner = random".to_string(),
            ]
        );
    }
    use rdkafka::message::Headers as _;

    /// A plain-SQL writer's `headers` column cannot add a second message-id, event or
    /// content-type: consumers read the last copy, so they would not see the row's own.
    #[test]
    fn a_row_s_headers_column_cannot_shadow_devour_s_own() {
        let row = Row {
            id: 1,
            topic: "t".into(),
            partition_key: None,
            kafka_partition: None,
            payload: None,
            headers: r#"{"message-id":"theirs","event":"x","Event":"y","trace":"abc","possible-duplicate":"false"}"#
                .into(),
            event: Some("create".into()),
            message_id: "ours".into(),
            content_type: "application/json".into(),
            shard: 0,
            created_ms: 0,
            key_releases: 0,
        };
        let listed = |h: &OwnedHeaders| -> Vec<(String, String)> {
            (0..h.count())
                .map(|i| {
                    let x = h.get(i);
                    (
                        x.key.to_string(),
                        String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned(),
                    )
                })
                .collect()
        };
        let all = listed(&headers(&row, false));
        let named = |all: &[(String, String)], n: &str| {
            all.iter()
                .filter(|(k, _)| k == n)
                .map(|(_, v)| v.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(named(&all, "message-id"), ["ours"], "{all:?}");
        assert_eq!(named(&all, "event"), ["create"], "{all:?}");
        assert_eq!(
            named(&all, "Event"),
            ["y"],
            "header names are case-sensitive: {all:?}"
        );
        assert_eq!(named(&all, "trace"), ["abc"], "{all:?}");
        // Only the relay says whether a row may have been sent before.
        assert!(named(&all, "possible-duplicate").is_empty(), "{all:?}");
        let resent = listed(&headers(&row, true));
        assert_eq!(named(&resent, "possible-duplicate"), ["true"], "{resent:?}");
        // Without an event column, the headers column's event is the one.
        let h = headers(&Row { event: None, ..row }, false);
        let events: Vec<_> = (0..h.count())
            .map(|i| h.get(i))
            .filter(|x| x.key == "event")
            .map(|x| x.value.unwrap_or_default().to_vec())
            .collect();
        assert_eq!(events, [b"x".to_vec()]);
    }
}
