//! The write path: [`Producer`] and [`ProducerModel`] write the message a save produces into
//! `devour_outbox` on the caller's connection, so it commits or rolls back with the caller's
//! transaction.

use std::sync::atomic::{AtomicUsize, Ordering};

use diesel::connection::LoadConnection;
use serde_json::{Map, Value};

mod direct;
mod message;
mod model;
mod producer;

pub use direct::{init_direct, DirectProducer};
pub use message::{
    is_reserved_header, murmur2, partition_for_key, shard_for_key, validate_topic, Event,
    OutboxMessage, CONTENT_TYPE_JSON, HEADER_CONTENT_TYPE, HEADER_EVENT, HEADER_MESSAGE_ID,
    HEADER_POSSIBLE_DUPLICATE, HEADER_TRACEPARENT, MAX_TOPIC_LEN, RECORD_BATCH_OVERHEAD,
    RESERVED_HEADERS, SHARDS,
};
pub use model::{ModelStore, ModelTable, ProducerModel, SaveOptions, Saved};
pub use producer::{Producer, ProducerConfig, ProducerType};

use crate::config::{ConfigError, DEFAULT_MAX_MESSAGE_BYTES};

/// Extra fields merged into a message; a key equal to a field of the message replaces it.
pub type Extras = Map<String, Value>;

/// Why a message could not be produced. The transaction it was part of rolls back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProduceError {
    /// Kafka would reject the topic name.
    #[error("invalid topic name `{topic}`: {reason}")]
    InvalidTopic {
        /// The topic (cut at 300 characters).
        topic: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A negative explicit partition.
    #[error("invalid partition {partition} for topic `{topic}`: partitions start at 0")]
    InvalidPartition {
        /// The topic.
        topic: String,
        /// The partition given.
        partition: i32,
    },
    /// An extra header has the name of one devour sets itself from the message.
    #[error(
        "message to `{topic}`: header `{name}` is devour's own (message-id, event and \
         content-type come from the message; set those instead; the relay sets \
         possible-duplicate)"
    )]
    ReservedHeader {
        /// The topic.
        topic: String,
        /// The header's name.
        name: String,
    },
    /// A text the database stores as text (key, event, content type) holds a NUL character,
    /// which PostgreSQL cannot store.
    #[error("message to `{topic}`: its {field} contains a NUL character (\\0), which the database cannot store")]
    NulCharacter {
        /// The topic.
        topic: String,
        /// `key`, `event` or `content type`.
        field: &'static str,
    },
    /// Two messages of one batch have the same `message_id` (a message cloned to go to two
    /// topics, say): consumers would take the second for a redelivery of the first.
    #[error("message id {message_id} is given to more than one message of the batch; give each its own (OutboxMessage::new makes one)")]
    DuplicateMessageId {
        /// The id.
        message_id: uuid::Uuid,
    },
    /// The message is larger than the configured maximum.
    #[error(
        "message to `{topic}` is {size} bytes, over the maximum of {max} bytes \
         (`outbox.max_message_bytes`; the broker's `message.max.bytes` must allow it too)"
    )]
    TooLarge {
        /// The topic.
        topic: String,
        /// Its size in bytes (value, key, headers and framing: [`OutboxMessage::size`]).
        size: usize,
        /// The maximum in force.
        max: usize,
    },
    /// The payload could not be serialized.
    #[error("cannot serialize the message for `{what}`: {source}")]
    Serialize {
        /// Which producer or model.
        what: String,
        /// serde's error.
        source: serde_json::Error,
    },
    /// Extras were given but the message is not a JSON object they could be merged into.
    #[error("cannot merge extras into the message for `{what}`: it serializes to {found}, not a JSON object")]
    NotAnObject {
        /// Which producer or model.
        what: String,
        /// The JSON type found.
        found: &'static str,
    },
    /// A model's message has a field `event` of its own, which devour's `event`
    /// (create/update/delete) would replace.
    #[error("the message for `{what}` has a field `event` of its own, which devour sets to create/update/delete: rename it (#[serde(rename = \"...\")]) or set `event` in the extras")]
    EventField {
        /// Which model.
        what: String,
    },
    /// The field named by `partition_key` is not in the message.
    #[error("partition_key field `{field}` is not in the message for `{what}`")]
    MissingKeyField {
        /// Which producer or model.
        what: String,
        /// The field.
        field: String,
    },
    /// Deleting a model whose row does not exist.
    #[error("cannot delete `{what}`: no such row")]
    NotFound {
        /// Which model.
        what: String,
    },
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] diesel::result::Error),
    /// The broker refused or did not acknowledge a direct message.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The configuration needed for direct producing is invalid.
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    /// An application's own customization failed.
    #[error("{0}")]
    Custom(String),
}

/// Data handed to every customizable method (`get_topic`, `get_schema`, `get_partition_key`).
/// A `traceparent` entry is carried as the `traceparent` header of the message.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Context(pub Map<String, Value>);

impl Context {
    /// An empty context.
    pub fn new() -> Self {
        Context::default()
    }

    /// The context with `key` set to `value`.
    pub fn with(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.0.insert(key.into(), value.into());
        self
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key)
    }

    /// The W3C `traceparent` to carry, if given.
    pub fn traceparent(&self) -> Option<&str> {
        self.0.get(HEADER_TRACEPARENT).and_then(Value::as_str)
    }
}

static MAX_MESSAGE_BYTES: AtomicUsize = AtomicUsize::new(DEFAULT_MAX_MESSAGE_BYTES);

/// Sets the process-wide default maximum message size of the write path
/// (`outbox.max_message_bytes`); a producer's own `max_message_bytes` wins over it.
pub fn set_max_message_bytes(bytes: usize) {
    MAX_MESSAGE_BYTES.store(bytes, Ordering::Relaxed);
}

/// The maximum message size in force for `config`.
pub(crate) fn max_message_bytes(config: &ProducerConfig) -> usize {
    config
        .max_message_bytes
        .unwrap_or_else(|| MAX_MESSAGE_BYTES.load(Ordering::Relaxed))
}

/// A database backend the write path can write outbox rows to (PostgreSQL or SQLite).
pub trait OutboxBackend: diesel::backend::Backend + Sized {
    /// Inserts one row; returns its id.
    fn insert_outbox<C>(
        conn: &mut C,
        message: &OutboxMessage,
    ) -> Result<i64, diesel::result::Error>
    where
        C: LoadConnection<Backend = Self>;

    /// Inserts rows with one multi-row INSERT (per chunk); returns their ids in order.
    fn insert_outbox_batch<C>(
        conn: &mut C,
        messages: &[OutboxMessage],
    ) -> Result<Vec<i64>, diesel::result::Error>
    where
        C: LoadConnection<Backend = Self>;
}

/// Writes messages to the outbox on `conn` after validating them all (and that no two share a
/// `message_id`): nothing is written if one is invalid, nor if the database refuses one (the
/// batch is one transaction, a savepoint in the caller's). The rows commit or roll back with
/// the transaction `conn` is in, and relays
/// running in this process are woken. Returns the row ids in the order of `messages`.
pub fn write_messages<C>(
    conn: &mut C,
    messages: &[OutboxMessage],
    max_message_bytes: usize,
) -> Result<Vec<i64>, ProduceError>
where
    C: LoadConnection,
    C::Backend: OutboxBackend,
{
    for m in messages {
        m.validate(max_message_bytes)?;
    }
    if messages.len() > 1 {
        let mut seen = std::collections::HashSet::with_capacity(messages.len());
        if let Some(m) = messages.iter().find(|m| !seen.insert(m.message_id)) {
            return Err(ProduceError::DuplicateMessageId {
                message_id: m.message_id,
            });
        }
    }
    let ids = match messages {
        [] => return Ok(Vec::new()),
        [one] => vec![<C::Backend as OutboxBackend>::insert_outbox(conn, one)?],
        // Several statements (chunks): one transaction (a savepoint inside the caller's), so
        // that a failure in a later chunk leaves none of the earlier ones behind when the
        // caller has no transaction open.
        many => {
            conn.transaction(|c| <C::Backend as OutboxBackend>::insert_outbox_batch(c, many))?
        }
    };
    // Relays in this process look more often for a while (the rows are not committed yet).
    crate::relay::notify_local();
    Ok(ids)
}

/// What one produce did.
#[derive(Debug, Clone, PartialEq)]
pub struct Produced {
    /// The outbox row's id (`None` for a direct message).
    pub outbox_id: Option<i64>,
    /// The message as written or sent.
    pub message: OutboxMessage,
    /// Partition and offset the broker gave a direct message.
    pub delivered: Option<(i32, i64)>,
}

/// Builds the message body: `schema` + `extras` + `event`. Extras replace fields of the same
/// name; `event` is set unless the extras set it. A body that is not a JSON object is kept as
/// is when there is nothing to merge.
pub(crate) fn compose_body(
    what: &str,
    schema: Value,
    extras: &Extras,
    event: &Event,
) -> Result<Value, ProduceError> {
    match schema {
        Value::Object(mut fields) => {
            for (k, v) in extras {
                fields.insert(k.clone(), v.clone());
            }
            if !extras.contains_key("event") {
                fields.insert("event".into(), Value::String(event.to_string()));
            }
            Ok(Value::Object(fields))
        }
        other if extras.is_empty() => Ok(other),
        other => Err(ProduceError::NotAnObject {
            what: what.to_string(),
            found: json_type(&other),
        }),
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The default partition key: the field `field` of the message body, as a string
/// (numbers and booleans by their JSON text; `null` means no key).
pub(crate) fn key_from_field(
    what: &str,
    field: Option<&str>,
    body: &Value,
) -> Result<Option<String>, ProduceError> {
    let Some(field) = field else { return Ok(None) };
    match body.get(field) {
        None => Err(ProduceError::MissingKeyField {
            what: what.to_string(),
            field: field.to_string(),
        }),
        Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Ok(Some(other.to_string())),
    }
}

/// Everything one message needs once the customizable methods have answered.
pub(crate) struct Draft<'a> {
    pub what: &'a str,
    pub config: &'a ProducerConfig,
    pub event: &'a Event,
    pub topic: String,
    pub body: Value,
    pub key: Option<String>,
    pub context: &'a Context,
}

impl Draft<'_> {
    /// Serializes the body and assembles the message (not validated yet).
    pub(crate) fn into_message(self) -> Result<OutboxMessage, ProduceError> {
        let payload = serde_json::to_vec(&self.body).map_err(|source| ProduceError::Serialize {
            what: self.what.to_string(),
            source,
        })?;
        let mut message = OutboxMessage::new(self.topic, Some(payload));
        message.key = self.key;
        message.partition = self.config.partition;
        message.event = Some(self.event.to_string());
        if let Some(tp) = self.context.traceparent() {
            message
                .headers
                .insert(HEADER_TRACEPARENT.into(), tp.to_string());
        }
        Ok(message)
    }
}

/// Validates `messages` and delivers them as `config.producer_type` says: written to the outbox
/// on `conn` (one INSERT for all of them), or sent to Kafka now.
pub(crate) fn deliver<C>(
    conn: &mut C,
    config: &ProducerConfig,
    messages: Vec<OutboxMessage>,
) -> Result<Vec<Produced>, ProduceError>
where
    C: LoadConnection,
    C::Backend: OutboxBackend,
{
    let max = max_message_bytes(config);
    match config.producer_type {
        ProducerType::Outbox => {
            let ids = write_messages(conn, &messages, max)?;
            Ok(messages
                .into_iter()
                .zip(ids)
                .map(|(message, id)| Produced {
                    outbox_id: Some(id),
                    message,
                    delivered: None,
                })
                .collect())
        }
        ProducerType::Direct => {
            for m in &messages {
                m.validate(max)?;
            }
            messages
                .into_iter()
                .map(|message| {
                    let delivered = direct::send(&message)?;
                    Ok(Produced {
                        outbox_id: None,
                        message,
                        delivered: Some(delivered),
                    })
                })
                .collect()
        }
    }
}

/// Delivers one message (see [`deliver`]).
pub(crate) fn deliver_one<C>(
    conn: &mut C,
    config: &ProducerConfig,
    message: OutboxMessage,
) -> Result<Produced, ProduceError>
where
    C: LoadConnection,
    C::Backend: OutboxBackend,
{
    Ok(deliver(conn, config, vec![message])?
        .pop()
        .expect("one message in, one out"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn extras_override_fields_and_event_is_added() {
        let mut extras = Extras::new();
        extras.insert("name".into(), json!("override"));
        extras.insert("extra".into(), json!(1));
        let body =
            compose_body("m", json!({"id": 1, "name": "a"}), &extras, &Event::Update).unwrap();
        assert_eq!(
            body,
            json!({"id": 1, "name": "override", "extra": 1, "event": "update"})
        );
    }

    #[test]
    fn extras_on_a_non_object_is_an_error() {
        let mut extras = Extras::new();
        extras.insert("x".into(), json!(1));
        assert!(matches!(
            compose_body("m", json!("text"), &extras, &Event::Create),
            Err(ProduceError::NotAnObject {
                found: "a string",
                ..
            })
        ));
        assert_eq!(
            compose_body("m", json!("text"), &Extras::new(), &Event::Create).unwrap(),
            json!("text")
        );
    }

    #[test]
    fn key_field_rules() {
        let body = json!({"id": 7, "s": "x", "n": null});
        assert_eq!(
            key_from_field("m", Some("id"), &body).unwrap().as_deref(),
            Some("7")
        );
        assert_eq!(
            key_from_field("m", Some("s"), &body).unwrap().as_deref(),
            Some("x")
        );
        assert_eq!(key_from_field("m", Some("n"), &body).unwrap(), None);
        assert_eq!(key_from_field("m", None, &body).unwrap(), None);
        assert!(matches!(
            key_from_field("m", Some("nope"), &body),
            Err(ProduceError::MissingKeyField { .. })
        ));
    }
}
