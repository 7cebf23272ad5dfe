//! devour-relay: drains the outbox to Kafka in per-key commit order, at least once, with several
//! relays sharing the shards of one PostgreSQL database.
//!
//! Run it as a daemon (`devour-relay`), or inside an application with [`start`], which returns a
//! [`RelayHandle`] to wake it after a commit and to stop it.
//!
//! How it keeps its promises (details in ARCHITECTURE.md):
//! - it reads the undelivered rows of the shards it holds in id order, never past an id that a
//!   transaction may still commit (the settled horizon), going back to the oldest row whenever
//!   a row can be below its cursor; rows of a key held back by a dead letter (`block_key`) wait;
//!   it removes a row only after the broker acknowledged it (at least once, nothing skipped);
//! - one relay holds a shard at a time (leases with epochs in the database), every removal is
//!   fenced by the lease it was read under, and the producer is idempotent with no message
//!   expiry, so one key's messages reach Kafka in order;
//! - a message the broker refuses for good is moved to `devour_dead_letters`, never dropped.

mod engine;
mod kafka;
mod store;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use engine::RelayReport;
pub(crate) use kafka::ordering_conflict;

use crate::config::{Config, ConfigError};
use crate::db::DbError;

/// Why a relay could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The configuration is invalid.
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    /// The database could not be reached at start.
    #[error("{0}")]
    Db(#[from] DbError),
    /// The Kafka producer could not be created.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The brokers refused the relay's credentials or TLS handshake (wrong SASL password, a CA
    /// that did not sign them): retrying would not help.
    #[error("the brokers refused the connection: {0}")]
    Refused(String),
    /// librdkafka refused the Kafka settings themselves (an unknown property, a bad value).
    #[error("invalid Kafka settings: {0}")]
    Settings(String),
    /// A relay thread panicked.
    #[error("relay thread panicked: {0}")]
    Panicked(String),
    /// The database lacks tables the relay needs: devour's migrations were not applied there
    /// (or it is the wrong database).
    #[error("the database has no {missing}; run `devour migrate`, or start with --migrate")]
    Schema {
        /// The first missing table or column (`table devour_outbox`).
        missing: String,
    },
    /// `--drain` on SQLite while another relay holds the outbox: that relay delivers the rows,
    /// this one could only wait.
    #[error("relay {0} holds this SQLite outbox and delivers its rows; a drain here cannot (stop it first, or let it drain)")]
    Standby(String),
}

impl RelayError {
    /// Whether starting again later may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            RelayError::Db(e) => e.is_retriable(),
            RelayError::Kafka(_) | RelayError::Standby(_) => true,
            RelayError::Config(_)
            | RelayError::Settings(_)
            | RelayError::Refused(_)
            | RelayError::Panicked(_)
            | RelayError::Schema { .. } => false,
        }
    }
}

/// The payload of a notification on the outbox's channel that asks relays to start their next
/// pass at the oldest row: rows came back below their horizon (`devour outbox retry`), or a
/// dead letter no longer holds its key back (`devour outbox discard`).
pub(crate) const RESCAN: &str = "rescan";

/// How a relay run ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Mode {
    /// Run until stopped (the daemon).
    #[default]
    Follow,
    /// Deliver what is in the outbox, then stop (`devour-relay --drain`).
    Drain,
}

/// Options of one relay run (what the command line adds to `[relay]`).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Follow or drain.
    pub mode: Mode,
    /// Show a progress bar on stderr (drain mode, when stderr is a terminal).
    pub progress: bool,
}

/// Wakes a waiting relay loop: a flag and a condition variable.
#[derive(Debug, Default)]
pub(crate) struct Wake {
    woken: Mutex<bool>,
    cv: Condvar,
    /// Until when to poll eagerly: a local write was just made and may commit any moment.
    eager_until: Mutex<Option<Instant>>,
    /// Rows may have come back below the horizon (a dead letter retried or discarded, here or
    /// through NOTIFY, or notifications missed): the next pass starts at the oldest row.
    rescan: AtomicBool,
}

impl Wake {
    pub(crate) fn wake(&self) {
        *self.woken.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cv.notify_all();
    }

    /// Asks for the next pass to start at the oldest row.
    pub(crate) fn ask_rescan(&self) {
        self.rescan.store(true, Ordering::Release);
    }

    /// Whether a rescan was asked for (and not yet taken).
    pub(crate) fn rescan_asked(&self) -> bool {
        self.rescan.load(Ordering::Acquire)
    }

    /// Takes a rescan request.
    pub(crate) fn take_rescan(&self) -> bool {
        self.rescan.swap(false, Ordering::AcqRel)
    }

    fn wake_eager(&self) {
        *self.eager_until.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Instant::now() + Duration::from_millis(100));
        self.wake();
    }

    /// Waits until woken or `timeout`; polls every 2 ms for a while after a local write.
    pub(crate) fn wait(&self, timeout: Duration) {
        let eager = self
            .eager_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| Instant::now() < t);
        let timeout = if eager {
            timeout.min(Duration::from_millis(2))
        } else {
            timeout
        };
        let guard = self.woken.lock().unwrap_or_else(|p| p.into_inner());
        let (mut woken, _) = self
            .cv
            .wait_timeout_while(guard, timeout, |w| !*w)
            .unwrap_or_else(|p| p.into_inner());
        *woken = false;
    }
}

/// Relays running in this process, woken by the write path after it writes outbox rows.
static LOCAL: Mutex<Vec<Weak<Wake>>> = Mutex::new(Vec::new());
static ANY_LOCAL: AtomicBool = AtomicBool::new(false);

fn register_local(wake: &Arc<Wake>) {
    let mut l = LOCAL.lock().unwrap_or_else(|p| p.into_inner());
    l.retain(|w| w.strong_count() > 0);
    l.push(Arc::downgrade(wake));
    ANY_LOCAL.store(true, Ordering::Release);
}

/// Tells relays running in this process that rows were written (called by the write path; cheap
/// when no relay runs here). They poll eagerly for a moment, to see the rows once committed.
pub fn notify_local() {
    each_local(Wake::wake_eager);
}

/// Tells relays running in this process that rows came back below their cursor (a retried
/// dead letter) or a key is no longer held back: their next pass starts at the oldest row.
/// (On PostgreSQL, relays anywhere get the same request through NOTIFY.)
pub(crate) fn rescan_local() {
    each_local(|w| {
        w.ask_rescan();
        w.wake_eager();
    });
}

/// Calls `f` on every relay running in this process (nothing to do, cheaply, when none runs).
fn each_local(f: impl Fn(&Wake)) {
    if !ANY_LOCAL.load(Ordering::Acquire) {
        return;
    }
    let l = LOCAL.lock().unwrap_or_else(|p| p.into_inner());
    for w in l.iter().filter_map(Weak::upgrade) {
        f(&w);
    }
}

/// The librdkafka settings of the relay's producer for `config`: devour's defaults
/// (idempotence, murmur2 partitioner, no message expiry, linger, lz4), then `[kafka]`, then
/// `[relay.producer]`.
pub fn producer_config(config: &Config) -> rdkafka::ClientConfig {
    kafka::producer_config(&config.kafka, &config.relay.producer)
}

/// A relay running on its own threads. Keep it for as long as the relay should run: dropping it
/// stops the relay and waits for it, like [`shutdown`](Self::shutdown) then
/// [`join`](Self::join) (up to `relay.shutdown_timeout_ms` for deliveries in flight, plus the
/// database's time to remove them and release the leases). The relay also ends by itself on an
/// error it cannot retry (or a bug): watch [`is_finished`](Self::is_finished) and start a new one
/// if it does.
#[must_use = "dropping the handle stops the relay"]
pub struct RelayHandle {
    stop: Arc<AtomicBool>,
    wake: Arc<Wake>,
    thread: Option<JoinHandle<Result<RelayReport, RelayError>>>,
}

impl RelayHandle {
    /// Asks the relay to stop: it stops reading, waits (bounded) for in-flight deliveries,
    /// removes what was delivered and releases its leases.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        self.wake.wake();
    }

    /// Wakes the relay now (e.g. right after the application committed).
    pub fn wake(&self) {
        self.wake.wake();
    }

    /// Whether the relay has stopped.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits for the relay to stop and returns its report.
    pub fn join(mut self) -> Result<RelayReport, RelayError> {
        let thread = self.thread.take().expect("joined once");
        match thread.join() {
            Ok(r) => r,
            Err(p) => Err(RelayError::Panicked(panic_message(&p))),
        }
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.shutdown();
            let _ = t.join();
        }
    }
}

pub(crate) fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Starts a relay on its own threads (e.g. beside an application on SQLite). Connects first, so
/// that a wrong URL, missing tables, settings librdkafka refuses, or credentials the brokers
/// refuse fail here (brokers that do not answer are waited for: after 10 s it starts anyway). The relay runs as long as the returned handle
/// is kept.
pub fn start(config: &Config, options: RunOptions) -> Result<RelayHandle, RelayError> {
    let stop = Arc::new(AtomicBool::new(false));
    let wake = Arc::new(Wake::default());
    register_local(&wake);
    let relay = engine::Relay::connect(config, options, stop.clone(), wake.clone())?;
    let thread = std::thread::Builder::new()
        .name("devour-relay".into())
        .spawn(move || relay.run())
        .map_err(|e| RelayError::Panicked(e.to_string()))?;
    Ok(RelayHandle {
        stop,
        wake,
        thread: Some(thread),
    })
}

/// Runs a relay on this thread until `stop` is set (or, in drain mode, the outbox is empty).
pub fn run(
    config: &Config,
    options: RunOptions,
    stop: Arc<AtomicBool>,
) -> Result<RelayReport, RelayError> {
    let wake = Arc::new(Wake::default());
    register_local(&wake);
    match engine::Relay::connect(config, options, stop.clone(), wake) {
        Ok(relay) => relay.run(),
        // Stopped while it waited for a database that was not up yet: a clean stop before
        // anything was done, not a failure.
        Err(RelayError::Db(DbError::Connect { reason, .. })) if stop.load(Ordering::Acquire) => {
            tracing::info!(
                "stopped before the database answered ({}); nothing was done",
                crate::telemetry::one_line_error(&reason)
            );
            Ok(RelayReport::default())
        }
        Err(e) => Err(e),
    }
}

impl From<crate::broker::AccessError> for RelayError {
    fn from(e: crate::broker::AccessError) -> Self {
        match e {
            crate::broker::AccessError::Refused(e) => RelayError::Refused(e),
            crate::broker::AccessError::Settings(e) => RelayError::Settings(e),
        }
    }
}
