//! `Producer`: the seed's `Producer` with its nested `ProducerConfig`.

use diesel::connection::LoadConnection;
use serde::Serialize;
use serde_json::Value;

use super::{
    compose_body, deliver_one, key_from_field, Context, Draft, Event, Extras, OutboxBackend,
    OutboxMessage, ProduceError, Produced,
};

/// How a producer delivers its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProducerType {
    /// Write to the outbox in the caller's transaction; `devour-relay` delivers after commit.
    #[default]
    Outbox,
    /// Send to Kafka at once and return after the broker acknowledged. **Not transactional:**
    /// the message is out even if the caller's transaction later rolls back.
    Direct,
}

/// A producer's settings (the seed's nested `ProducerConfig`). Built in `const` context:
///
/// ```
/// use devour::ProducerConfig;
/// const CONFIG: ProducerConfig = ProducerConfig::new().topic("accounts").partition_key("id");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerConfig {
    /// Topic; when `None`, the generic topic (the model's table, or the producer's type name).
    pub topic: Option<&'static str>,
    /// Field of the message whose value is the Kafka key (and so decides partition and order).
    pub partition_key: Option<&'static str>,
    /// Explicit partition for every message (rarely wanted; the key usually decides).
    pub partition: Option<i32>,
    /// Outbox (default) or direct.
    pub producer_type: ProducerType,
    /// Whether a model's `save`/`delete` produce by default (default true); `SaveOptions::produce`
    /// overrides it either way.
    pub auto_produce: bool,
    /// Maximum message size for this producer; `None` uses `outbox.max_message_bytes`.
    pub max_message_bytes: Option<usize>,
}

impl ProducerConfig {
    /// Defaults: generic topic, no key, outbox, auto-produce on.
    pub const fn new() -> Self {
        ProducerConfig {
            topic: None,
            partition_key: None,
            partition: None,
            producer_type: ProducerType::Outbox,
            auto_produce: true,
            max_message_bytes: None,
        }
    }
    /// Sets the topic.
    pub const fn topic(mut self, topic: &'static str) -> Self {
        self.topic = Some(topic);
        self
    }
    /// Sets the field used as partition key.
    pub const fn partition_key(mut self, field: &'static str) -> Self {
        self.partition_key = Some(field);
        self
    }
    /// Sets an explicit partition.
    pub const fn partition(mut self, partition: i32) -> Self {
        self.partition = Some(partition);
        self
    }
    /// Sets the producer type.
    pub const fn producer_type(mut self, t: ProducerType) -> Self {
        self.producer_type = t;
        self
    }
    /// Sets `auto_produce`.
    pub const fn auto_produce(mut self, on: bool) -> Self {
        self.auto_produce = on;
        self
    }
    /// Sets the maximum message size.
    pub const fn max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = Some(bytes);
        self
    }
}

impl Default for ProducerConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// The last segment of a type's name in snake_case: `my_app::AccountProducer` → `account_producer`.
pub(crate) fn snake_type_name<T: ?Sized>() -> String {
    let full = std::any::type_name::<T>();
    let base = full.split('<').next().unwrap_or(full);
    let name = base.rsplit("::").next().unwrap_or(base);
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// A producer of messages from any source (the seed's `Producer`). Implement
/// [`get_schema`](Producer::get_schema); override the other methods to customize.
///
/// ```no_run
/// use devour::{Context, Event, Extras, Producer, ProducerConfig, ProduceError};
/// #[derive(serde::Serialize)]
/// struct Signup { email: String }
/// struct SignupProducer;
/// impl Producer for SignupProducer {
///     type Source = str;
///     type Message = Signup;
///     const CONFIG: ProducerConfig = ProducerConfig::new().topic("signups").partition_key("email");
///     fn get_schema(&self, _: &Event, email: &str, _: &Context) -> Result<Signup, ProduceError> {
///         Ok(Signup { email: email.to_string() })
///     }
/// }
/// # fn run(conn: &mut diesel::PgConnection) -> Result<(), ProduceError> {
/// use diesel::Connection;
/// conn.transaction(|conn| {
///     SignupProducer.produce(conn, Event::Create, "a@example.com", &Extras::new(), &Context::new())
/// })?;
/// # Ok(()) }
/// ```
pub trait Producer {
    /// What `produce` is given (the seed's `source`).
    type Source: ?Sized;
    /// The message type (the seed's `schema_class`): any serde type.
    type Message: Serialize;
    /// The producer's settings.
    const CONFIG: ProducerConfig;

    /// The message for `source` (the seed's `get_schema`).
    fn get_schema(
        &self,
        event: &Event,
        source: &Self::Source,
        context: &Context,
    ) -> Result<Self::Message, ProduceError>;

    /// The topic; by default [`generic_topic`](Producer::generic_topic).
    fn get_topic(
        &self,
        event: &Event,
        source: &Self::Source,
        context: &Context,
    ) -> Result<String, ProduceError> {
        let _ = (event, source, context);
        Ok(self.generic_topic())
    }

    /// The Kafka key; by default the value of the field named by `CONFIG.partition_key` in the
    /// message `body` (after extras), or none.
    fn get_partition_key(
        &self,
        event: &Event,
        source: &Self::Source,
        context: &Context,
        body: &Value,
    ) -> Result<Option<String>, ProduceError> {
        let _ = (event, source, context);
        key_from_field(&snake_type_name::<Self>(), Self::CONFIG.partition_key, body)
    }

    /// `CONFIG.topic`, else the producer's type name in snake_case (the seed's
    /// `_get_generic_topic`).
    fn generic_topic(&self) -> String {
        Self::CONFIG
            .topic
            .map(str::to_string)
            .unwrap_or_else(snake_type_name::<Self>)
    }

    /// The message for `source` (schema + extras + `event`), topic and key decided, not yet
    /// validated or written.
    fn message(
        &self,
        event: &Event,
        source: &Self::Source,
        extras: &Extras,
        context: &Context,
    ) -> Result<OutboxMessage, ProduceError> {
        let what = snake_type_name::<Self>();
        let schema = self.get_schema(event, source, context)?;
        let schema = serde_json::to_value(&schema).map_err(|source| ProduceError::Serialize {
            what: what.clone(),
            source,
        })?;
        let body = compose_body(&what, schema, extras, event)?;
        let topic = self.get_topic(event, source, context)?;
        let key = self.get_partition_key(event, source, context, &body)?;
        Draft {
            what: &what,
            config: &Self::CONFIG,
            event,
            topic,
            body,
            key,
            context,
        }
        .into_message()
    }

    /// Builds the message and writes it to the outbox on `conn`, so it commits or rolls back with
    /// the caller's transaction; a direct producer sends it now.
    fn produce<C>(
        &self,
        conn: &mut C,
        event: Event,
        source: &Self::Source,
        extras: &Extras,
        context: &Context,
    ) -> Result<Produced, ProduceError>
    where
        C: LoadConnection,
        C::Backend: OutboxBackend,
    {
        let message = self.message(&event, source, extras, context)?;
        deliver_one(conn, &Self::CONFIG, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct AccountProducer;

    #[test]
    fn snake_names() {
        assert_eq!(snake_type_name::<AccountProducer>(), "account_producer");
    }
}
