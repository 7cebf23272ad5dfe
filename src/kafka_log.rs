//! How devour's Kafka clients report librdkafka's logs and global errors: as rdkafka's default
//! does, except that a global error repeating while a broker is down (librdkafka reports one
//! every few hundred milliseconds per connection) is logged once per
//! [`REPEAT_AFTER`](crate::telemetry::REPEAT_AFTER), with how many were held back, and that
//! librdkafka's warning about a setting devour makes on purpose is not repeated at every start.

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;

/// librdkafka warns that `enable.gapless.guarantee` is experimental: the relay relies on it.
const DELIBERATE: &str = "enable.gapless.guarantee is experimental";

/// Global errors logged, by kind, so that one that repeats is logged once per
/// [`REPEAT_AFTER`](crate::telemetry::REPEAT_AFTER).
#[derive(Default)]
pub(crate) struct Quiet(crate::telemetry::Repeats);

impl Quiet {
    /// Logs `error` unless one of its kind was logged less than
    /// [`REPEAT_AFTER`](crate::telemetry::REPEAT_AFTER) ago.
    pub(crate) fn error(&self, error: &KafkaError, reason: &str) {
        let kind = match error.rdkafka_error_code() {
            Some(code) => format!("{code:?}"),
            None => error.to_string(),
        };
        if let Some(more) = self.0.due(&kind) {
            // rdkafka's own target, so that a `log.level` part for `rdkafka` still governs it.
            tracing::error!(target: "rdkafka::client", "librdkafka: {error}: {reason}{more}");
        }
    }
}

/// `e` with the value of a secret property replaced by `***`: librdkafka's error about a
/// property it refuses repeats the property's value (a password pasted under its Java client
/// name, for one), and devour prints such errors.
pub(crate) fn redact(e: KafkaError) -> KafkaError {
    match e {
        KafkaError::ClientConfig(code, desc, key, value)
            if crate::config::is_secret_property(&key) =>
        {
            let desc = if value.is_empty() {
                desc
            } else {
                desc.replace(&value, "***")
            };
            KafkaError::ClientConfig(code, desc, key, "***".into())
        }
        other => other,
    }
}

/// rdkafka's default log, without the warning about a setting devour makes on purpose.
pub(crate) fn log(level: RDKafkaLogLevel, fac: &str, message: &str) {
    if message.contains(DELIBERATE) {
        tracing::debug!(target: "librdkafka", "librdkafka: {fac} {message}");
        return;
    }
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => {
            tracing::error!(target: "librdkafka", "librdkafka: {fac} {message}")
        }
        RDKafkaLogLevel::Warning => {
            tracing::warn!(target: "librdkafka", "librdkafka: {fac} {message}")
        }
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", "librdkafka: {fac} {message}")
        }
        RDKafkaLogLevel::Debug => {
            tracing::debug!(target: "librdkafka", "librdkafka: {fac} {message}")
        }
    }
}

/// A client context that only reports as above (for clients with no context of their own).
#[derive(Default)]
pub(crate) struct QuietContext {
    quiet: Quiet,
}

quiet_client_context!(QuietContext);

impl rdkafka::consumer::ConsumerContext for QuietContext {}

/// Implements `ClientContext` for a context type with a `quiet: Quiet` field.
macro_rules! quiet_client_context {
    ($t:ty) => {
        impl rdkafka::ClientContext for $t {
            fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
                $crate::kafka_log::log(level, fac, message);
            }
            fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
                self.quiet.error(&error, reason);
            }
        }
    };
}
pub(crate) use quiet_client_context;

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::types::RDKafkaErrorCode;

    #[test]
    fn a_repeated_error_is_counted_not_logged() {
        let q = Quiet::default();
        let down = KafkaError::Global(RDKafkaErrorCode::AllBrokersDown);
        let other = KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure);
        for _ in 0..5 {
            q.error(&down, "1/1 brokers are down");
        }
        q.error(&other, "connection refused");
        assert_eq!(
            q.0.held_back("AllBrokersDown"),
            Some(4),
            "four held back after the first"
        );
        assert_eq!(q.0.held_back("BrokerTransportFailure"), Some(0));
    }
}
