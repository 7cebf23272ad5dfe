//! `devour consume NAME`: reads the topics of consumer route NAME (`[consumers.NAME]` in
//! devour.toml) and hands every message to the route's handler (the seed's
//! `DevourConsumer.digest`).
//!
//! At least once: a message's offset is stored (and later committed) only after its handler
//! returned `Ok`, or after it went to the dead-letter topic. A failing message is retried with
//! exponential backoff; after `retry.max_attempts`, or at once for
//! [`DigestError::give_up`] and payloads that do not decode, it is published to the
//! dead-letter topic with headers saying where it came from and why, and the consumer goes on.
//! With `inbox = true`, the handler's database writes and a record of the message commit in one
//! transaction, and a redelivered message found in the inbox is skipped: its effects happen
//! once.
//!
//! ```no_run
//! use std::sync::{atomic::AtomicBool, Arc};
//! use devour::consume::{self, Registry, RunOptions};
//!
//! let config = devour::Config::load()?;
//! let stop = Arc::new(AtomicBool::new(false)); // set it to stop
//! let report = consume::run(&config, "audit", &Registry::new(), RunOptions::default(), stop)?;
//! println!("{} message(s)", report.processed);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod builtin;
mod dead_letter;
mod dispatch;
mod handler;
mod inbox;
pub mod lag;
mod raw_headers;
mod runner;

use std::time::Duration;

pub(crate) use builtin::kill_running_commands;
pub use builtin::{Exec, Print, EXEC_GIVE_UP_STATUS};
pub use dead_letter::{
    HEADER_DLQ_ATTEMPTS, HEADER_DLQ_ERROR, HEADER_DLQ_FAILED_AT, HEADER_DLQ_GROUP,
    HEADER_DLQ_OFFSET, HEADER_DLQ_PARTITION, HEADER_DLQ_ROUTE, HEADER_DLQ_TOPIC,
};
pub use handler::{Consumer, Ctx, DigestError, Meta, Payload, Registry, TxConnection};
pub use runner::run;

use crate::db::DbError;

/// The librdkafka configuration of a consumer of `route`: the `[kafka]` consumer properties,
/// then devour's own settings (`own`), then the route's `[properties]`, which win (devour's own
/// keys are reserved, so a route cannot override them).
pub(crate) fn consumer_config(
    config: &crate::config::Config,
    route: &crate::config::ConsumerRoute,
    own: impl FnOnce(&mut rdkafka::ClientConfig),
) -> rdkafka::ClientConfig {
    let mut c = rdkafka::ClientConfig::new();
    for (k, v) in config.kafka.consumer_properties() {
        c.set(k, v);
    }
    own(&mut c);
    for (k, v) in &route.properties {
        c.set(k, v);
    }
    c
}

/// Whether librdkafka property `k` says how to reach and log in to the brokers (as opposed to
/// how a consumer or a producer behaves).
pub(crate) fn is_connection_property(k: &str) -> bool {
    [
        "bootstrap.",
        "security.",
        "sasl.",
        "ssl.",
        "client.",
        "socket.",
        "broker.",
    ]
    .iter()
    .any(|p| k.starts_with(p))
}

/// The route's own connection properties (its brokers, its credentials): every client of the
/// route, not only its consumer, talks to the brokers as the route says.
pub(crate) fn route_connection_properties(
    route: &crate::config::ConsumerRoute,
) -> impl Iterator<Item = (&String, &String)> {
    route
        .properties
        .iter()
        .filter(|(k, _)| is_connection_property(k))
}

/// Sets [`route_connection_properties`] on `c`.
pub(crate) fn route_connection(
    c: &mut rdkafka::ClientConfig,
    route: &crate::config::ConsumerRoute,
) {
    for (k, v) in route_connection_properties(route) {
        c.set(k, v);
    }
}

/// Why `devour consume` could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumeError {
    /// No route of that name.
    #[error("no consumer route `{name}` in the configuration ({})", known_routes(.known))]
    UnknownRoute {
        /// The name asked for.
        name: String,
        /// The configured routes.
        known: Vec<String>,
    },
    /// The route's handler is not registered, refuses the route, or does not take its `dump`.
    #[error("{0}")]
    Handler(String),
    /// The inbox table is missing.
    #[error("{0}")]
    Inbox(String),
    /// A handler stopped the run ([`DigestError::stop`]); what it finished is committed.
    #[error("the handler stopped the consumer: {0}")]
    Stopped(String),
    /// The database failed.
    #[error("{0}")]
    Db(#[from] DbError),
    /// A Kafka client could not be created or configured.
    #[error("kafka: {0}")]
    Kafka(String),
}

fn known_routes(known: &[String]) -> String {
    if known.is_empty() {
        "none is configured: add a `[consumers.NAME]` table with `topic` and `handler` to devour.toml".into()
    } else {
        format!("configured: {}", known.join(", "))
    }
}

impl ConsumeError {
    /// Whether the error is about usage or configuration (exit code 2) rather than a runtime
    /// failure.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            ConsumeError::UnknownRoute { .. } | ConsumeError::Handler(_) | ConsumeError::Inbox(_)
        )
    }
}

/// How a run ends.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct RunOptions {
    /// Stop once every assigned partition has been read to its end and handled
    /// (`devour consume NAME --drain`), instead of running until stopped.
    pub drain: bool,
}

impl RunOptions {
    /// Options of a drain ([`RunOptions::drain`] set).
    pub fn drain() -> RunOptions {
        RunOptions { drain: true }
    }
}

/// What a run did.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConsumeReport {
    /// Messages the handler finished (`Ok`).
    pub processed: u64,
    /// Messages sent to the dead-letter topic.
    pub dead_lettered: u64,
    /// Messages skipped because the inbox had them already.
    pub duplicates: u64,
    /// Failed attempts that were retried.
    pub retries: u64,
    /// Time from start to stop.
    pub elapsed: Duration,
    /// Time from the first message received to the last one finished.
    pub busy: Duration,
}
