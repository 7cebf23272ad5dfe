//! The message envelope: what one outbox row holds, its validation, key → shard and the Kafka
//! headers every message carries.

use std::collections::BTreeMap;

use rdkafka::message::{Header, OwnedHeaders};
use uuid::Uuid;

use super::ProduceError;

/// Number of shards rows are spread over (column `shard`). Fixed: part of the table contract.
pub const SHARDS: i32 = 256;

/// Header carrying the message's unique id.
pub const HEADER_MESSAGE_ID: &str = "message-id";
/// Header carrying the event (`create`, `update`, `delete`, …).
pub const HEADER_EVENT: &str = "event";
/// Header carrying the payload's MIME type.
pub const HEADER_CONTENT_TYPE: &str = "content-type";
/// Header the relay sets (`true`) on a message it may have sent before: a relay that held its
/// shard earlier may have had it acknowledged without removing its row. Consumers with an inbox
/// look such messages up by `message-id` wherever they read them.
pub const HEADER_POSSIBLE_DUPLICATE: &str = "possible-duplicate";
/// W3C trace context header, carried from the context when given.
pub const HEADER_TRACEPARENT: &str = "traceparent";
/// Headers devour sets from the row's own columns; a message's extra headers cannot use them
/// (a second copy would be the one consumers read).
pub const RESERVED_HEADERS: [&str; 4] = [
    HEADER_MESSAGE_ID,
    HEADER_EVENT,
    HEADER_CONTENT_TYPE,
    HEADER_POSSIBLE_DUPLICATE,
];

/// Whether `name` is one of [`RESERVED_HEADERS`] (header names are case-sensitive: consumers
/// look them up exactly so).
pub fn is_reserved_header(name: &str) -> bool {
    RESERVED_HEADERS.contains(&name)
}
/// Content type of the JSON payloads the write path produces.
pub const CONTENT_TYPE_JSON: &str = "application/json";
/// Longest topic name Kafka accepts.
pub const MAX_TOPIC_LEN: usize = 249;

/// What the save produced: `create`, `update`, `delete`, or an application's own event name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Event {
    /// A model row was inserted.
    Create,
    /// A model row was updated.
    Update,
    /// A model row was deleted.
    Delete,
    /// Any other event, named by the application.
    Custom(String),
}

impl Event {
    /// The event's name as it appears in messages.
    pub fn as_str(&self) -> &str {
        match self {
            Event::Create => "create",
            Event::Update => "update",
            Event::Delete => "delete",
            Event::Custom(s) => s,
        }
    }
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&str> for Event {
    fn from(s: &str) -> Self {
        match s {
            "create" => Event::Create,
            "update" => Event::Update,
            "delete" => Event::Delete,
            other => Event::Custom(other.to_string()),
        }
    }
}

/// One message as stored in a row of `devour_outbox`.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxMessage {
    /// Kafka topic.
    pub topic: String,
    /// Message key; one key's messages are delivered in commit order.
    pub key: Option<String>,
    /// Explicit partition; `None` lets murmur2 over the key choose (as the Java client does).
    pub partition: Option<i32>,
    /// The value; `None` is a tombstone.
    pub payload: Option<Vec<u8>>,
    /// Headers beyond the standard ones (e.g. `traceparent`).
    pub headers: BTreeMap<String, String>,
    /// The event, sent as the `event` header.
    pub event: Option<String>,
    /// Unique id, sent as the `message-id` header.
    pub message_id: Uuid,
    /// MIME type of the payload, sent as the `content-type` header.
    pub content_type: String,
}

/// What a record batch of one record adds to the message, at most, as the broker counts it
/// against `max.message.bytes`: the batch header (61 bytes), the record's lengths, attributes
/// and deltas (varints, at most 36 bytes), and the lz4 framing of a value that does not
/// compress (frame header and end, 4 bytes per 64 KiB block: under 100 bytes for 1 MiB),
/// rounded up. The broker's default `message.max.bytes` (1048588) is 1 MiB plus 12: without
/// this, a message of 1 MiB would pass `outbox.max_message_bytes` and then be refused.
pub const RECORD_BATCH_OVERHEAD: usize = 256;

impl OutboxMessage {
    /// A message to `topic` with a fresh time-ordered id and a JSON content type.
    pub fn new(topic: impl Into<String>, payload: Option<Vec<u8>>) -> Self {
        OutboxMessage {
            topic: topic.into(),
            key: None,
            partition: None,
            payload,
            headers: BTreeMap::new(),
            event: None,
            message_id: Uuid::now_v7(),
            content_type: CONTENT_TYPE_JSON.into(),
        }
    }

    /// Bytes the message occupies on the wire, as the broker counts them against
    /// `max.message.bytes` when it travels alone: value, key, every header's
    /// name and value, and the framing of a record batch of one record
    /// ([`RECORD_BATCH_OVERHEAD`] plus 10 bytes of lengths per header).
    pub fn size(&self) -> usize {
        let headers = 3 + self.headers.len();
        let standard = [
            (HEADER_MESSAGE_ID, 36usize),
            (HEADER_CONTENT_TYPE, self.content_type.len()),
            (HEADER_EVENT, self.event.as_ref().map_or(0, String::len)),
        ];
        self.payload.as_ref().map_or(0, Vec::len)
            + self.key.as_ref().map_or(0, String::len)
            + standard.iter().map(|(n, v)| n.len() + v).sum::<usize>()
            + self
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.len())
                .sum::<usize>()
            + RECORD_BATCH_OVERHEAD
            + 10 * headers
    }

    /// Checks what Kafka would reject (the topic name, the partition, and the size) and extra
    /// headers that would shadow devour's own.
    pub fn validate(&self, max_message_bytes: usize) -> Result<(), ProduceError> {
        validate_topic(&self.topic)?;
        if let Some(name) = self.headers.keys().find(|k| is_reserved_header(k)) {
            return Err(ProduceError::ReservedHeader {
                topic: self.topic.clone(),
                name: name.clone(),
            });
        }
        for (field, text) in [
            ("key", self.key.as_deref()),
            ("event", self.event.as_deref()),
            ("content type", Some(self.content_type.as_str())),
        ] {
            if text.is_some_and(|t| t.contains('\0')) {
                return Err(ProduceError::NulCharacter {
                    topic: self.topic.clone(),
                    field,
                });
            }
        }
        if let Some(p) = self.partition {
            if p < 0 {
                return Err(ProduceError::InvalidPartition {
                    topic: self.topic.clone(),
                    partition: p,
                });
            }
        }
        let size = self.size();
        if size > max_message_bytes {
            return Err(ProduceError::TooLarge {
                topic: self.topic.clone(),
                size,
                max: max_message_bytes,
            });
        }
        Ok(())
    }

    /// The shard the row belongs to: [`shard_for_key`] of the key; a keyless row (which needs no
    /// order) is spread by the random low bits of its message id.
    pub fn shard(&self) -> i32 {
        match &self.key {
            Some(k) => shard_for_key(k),
            None => (self.message_id.as_u128() % SHARDS as u128) as i32,
        }
    }

    /// The headers as a JSON object, as stored in the `headers` column.
    pub fn headers_json(&self) -> String {
        serde_json::to_string(&self.headers).expect("a map of strings serializes")
    }

    /// All Kafka headers of the message: `message-id`, `content-type`, `event` (when set),
    /// then the extra headers.
    pub fn kafka_headers(&self) -> OwnedHeaders {
        let id = self.message_id.to_string();
        let mut h = OwnedHeaders::new_with_capacity(3 + self.headers.len())
            .insert(Header {
                key: HEADER_MESSAGE_ID,
                value: Some(id.as_bytes()),
            })
            .insert(Header {
                key: HEADER_CONTENT_TYPE,
                value: Some(self.content_type.as_bytes()),
            });
        if let Some(e) = &self.event {
            h = h.insert(Header {
                key: HEADER_EVENT,
                value: Some(e.as_bytes()),
            });
        }
        for (k, v) in &self.headers {
            h = h.insert(Header {
                key: k.as_str(),
                value: Some(v.as_bytes()),
            });
        }
        h
    }
}

/// Checks a topic name as Kafka does: 1 to 249 characters of `[a-zA-Z0-9._-]`, not `.` or `..`.
pub fn validate_topic(topic: &str) -> Result<(), ProduceError> {
    let reason = if topic.is_empty() {
        Some("is empty".to_string())
    } else if topic.len() > MAX_TOPIC_LEN {
        Some(format!(
            "is {} characters long; Kafka allows at most {MAX_TOPIC_LEN}",
            topic.len()
        ))
    } else if topic == "." || topic == ".." {
        Some("`.` and `..` are not allowed".to_string())
    } else {
        topic
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
            .map(|c| {
                format!("contains {c:?}; Kafka allows only ASCII letters, digits, `.`, `_` and `-`")
            })
    };
    match reason {
        Some(reason) => Err(ProduceError::InvalidTopic {
            topic: topic.chars().take(300).collect(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`): the hash the Java client's
/// default partitioner applies to a key's bytes.
pub fn murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() == 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition the Java client's default partitioner picks for `key` among `partitions`.
pub fn partition_for_key(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) % partitions
}

/// The shard of a keyed row: `(murmur2(UTF-8 key) & 0x7fffffff) % 256`. Computed the same way
/// by the database (`devour_shard`) on PostgreSQL.
pub fn shard_for_key(key: &str) -> i32 {
    partition_for_key(key.as_bytes(), SHARDS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_java_vectors() {
        // From the Java client's UtilsTest.
        assert_eq!(murmur2(b"21"), -973932308);
        assert_eq!(murmur2(b"foobar"), -790332482);
        assert_eq!(murmur2(b"a-little-bit-long-string"), -985981536);
        assert_eq!(murmur2(b"a-little-bit-longer-string"), -1486304829);
        assert_eq!(
            murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8"),
            -58897971
        );
        assert_eq!(murmur2(b"abc"), 479470107);
    }

    #[test]
    fn topic_rules() {
        assert!(validate_topic("orders.v1-eu_2").is_ok());
        assert!(validate_topic(&"a".repeat(249)).is_ok());
        for bad in [
            "",
            ".",
            "..",
            "has space",
            "slash/x",
            "ünï",
            &"a".repeat(250),
        ] {
            assert!(validate_topic(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn extra_headers_cannot_shadow_devour_s_own() {
        for name in ["message-id", "content-type", "event"] {
            let mut m = OutboxMessage::new("t", Some(b"{}".to_vec()));
            m.headers.insert(name.into(), "x".into());
            assert!(
                matches!(
                    m.validate(1 << 20),
                    Err(ProduceError::ReservedHeader { .. })
                ),
                "{name}"
            );
        }
        let mut m = OutboxMessage::new("t", Some(b"{}".to_vec()));
        m.headers.insert("message-id-of-order".into(), "x".into());
        m.headers.insert("Event".into(), "x".into());
        assert!(
            m.validate(1 << 20).is_ok(),
            "other names, and other cases, are the caller's"
        );
    }

    #[test]
    fn size_counts_payload_key_and_headers() {
        let mut m = OutboxMessage::new("t", Some(vec![0; 100]));
        let base = m.size();
        m.key = Some("k".repeat(10));
        m.headers.insert("traceparent".into(), "x".repeat(20));
        assert_eq!(m.size(), base + 10 + "traceparent".len() + 20 + 10);
        // Framing counts: an empty message is not 0 bytes on the wire.
        let empty = OutboxMessage::new("t", None);
        assert!(empty.size() >= RECORD_BATCH_OVERHEAD + "message-id".len() + 36);
        assert!(m.validate(m.size()).is_ok());
        assert!(matches!(
            m.validate(m.size() - 1),
            Err(ProduceError::TooLarge { .. })
        ));
    }
}
