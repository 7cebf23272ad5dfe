//! A look at the brokers before a relay or a consumer starts: credentials or certificates the
//! brokers refuse (wrong SASL password, a CA that did not sign them) fail the start with the
//! reason, instead of being retried forever like an outage. Brokers that do not answer at all
//! are not an error here: the relay and the consumer wait for them.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, Producer as _};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;

/// Remembers the first authentication or TLS error librdkafka reports.
#[derive(Default)]
struct Refusals(Mutex<Option<String>>);

impl ClientContext for Refusals {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        crate::kafka_log::log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let refused = matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SSL)
        );
        if refused {
            let mut first = self.0.lock().unwrap_or_else(|p| p.into_inner());
            first.get_or_insert_with(|| format!("{error}: {reason}"));
        } else {
            tracing::debug!("librdkafka: {error}: {reason}");
        }
    }
}

impl rdkafka::producer::ProducerContext for Refusals {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::producer::DeliveryResult<'_>, _: ()) {}
}

/// Why [`check_access`] failed.
#[derive(Debug)]
pub(crate) enum AccessError {
    /// librdkafka refused the settings themselves (an unknown property, a bad value).
    Settings(String),
    /// The brokers refused the credentials or the TLS handshake.
    Refused(String),
}

impl std::fmt::Display for AccessError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AccessError::Settings(e) => write!(f, "invalid Kafka settings: {e}"),
            AccessError::Refused(e) => write!(f, "the brokers refused the connection: {e}"),
        }
    }
}

/// Connects with `config` and asks for metadata for up to `timeout`. `Err` when librdkafka
/// refuses the settings, or with its reason when the brokers refused the credentials or the
/// TLS handshake; `Ok` when they answered, or did not answer at all, or `stop` was set (the
/// caller then stops at once rather than after the whole `timeout`).
pub(crate) fn check_access(
    config: &rdkafka::ClientConfig,
    timeout: Duration,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<(), AccessError> {
    let producer: BaseProducer<Refusals> = config
        .create_with_context(Refusals::default())
        .map_err(|e| AccessError::Settings(crate::kafka_log::redact(e).to_string()))?;
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        if producer
            .client()
            .fetch_metadata(None, Duration::from_millis(500))
            .is_ok()
        {
            return Ok(());
        }
        // Serves the error callbacks.
        producer.poll(Duration::from_millis(100));
        if let Some(reason) = producer
            .context()
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            return Err(AccessError::Refused(reason));
        }
    }
    tracing::warn!(
        "no broker answered within {} s; starting anyway, and waiting for them",
        timeout.as_secs()
    );
    Ok(())
}
