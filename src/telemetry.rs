//! Logs, metrics and health.
//!
//! - Logs go through `tracing`: [`init_logging`] sets the level from `[log] level` (or
//!   `RUST_LOG`, which wins) and the format (`text` or `json`).
//! - Metrics go through the `metrics` facade: the relay and the consumer record counters,
//!   gauges and histograms whatever recorder is installed (none: they cost nothing; an
//!   application may install its own). [`serve`] installs the Prometheus recorder and serves
//!   `/metrics`, `/healthz` and `/readyz` on `[metrics] listen`.
//! - Health: components report to [`health()`]; `/readyz` answers 200 when every registered
//!   check passed recently, 503 with the failing ones otherwise.
//!
//! Metric names: see [`names`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::config::{Config, LogConfig, LogFormat};

/// Metric names, all prefixed `devour_`.
pub mod names {
    /// Counter: rows delivered (acknowledged by the broker and removed).
    pub const RELAY_DELIVERED: &str = "devour_relay_delivered_total";
    /// Counter: rows moved to `devour_dead_letters`.
    pub const RELAY_DEAD_LETTERED: &str = "devour_relay_dead_lettered_total";
    /// Histogram (seconds): commit (`created_at`) → broker acknowledgement.
    pub const RELAY_LATENCY: &str = "devour_relay_delivery_latency_seconds";
    /// Histogram: rows per read of the outbox.
    pub const RELAY_BATCH_ROWS: &str = "devour_relay_batch_rows";
    /// Gauge: shards this relay holds.
    pub const RELAY_LEASES_HELD: &str = "devour_relay_leases_held";
    /// Gauge: undelivered rows in the outbox (counted every 10 s while `[metrics] listen` is set).
    pub const RELAY_BACKLOG_ROWS: &str = "devour_relay_backlog_rows";
    /// Gauge (seconds): age of the oldest undelivered row (with the backlog; 0 when empty).
    pub const RELAY_OLDEST_AGE: &str = "devour_relay_oldest_undelivered_age_seconds";
    /// Counter, label `route`: messages the handler finished.
    pub const CONSUME_PROCESSED: &str = "devour_consume_processed_total";
    /// Counter, label `route`: failed attempts that were retried.
    pub const CONSUME_RETRIED: &str = "devour_consume_retried_total";
    /// Counter, label `route`: messages sent to the dead-letter topic.
    pub const CONSUME_DEAD_LETTERED: &str = "devour_consume_dead_lettered_total";
    /// Counter, label `route`: redeliveries skipped by the inbox.
    pub const CONSUME_DUPLICATES: &str = "devour_consume_duplicates_total";
    /// Gauge, label `route`: messages of the route's topics not finished by its group
    /// (every 10 s).
    pub const CONSUME_LAG: &str = "devour_consume_lag";
}

static JSON_LOGS: OnceLock<bool> = OnceLock::new();

/// Writes a command's closing line (its summary or its error) on stderr: as a log event when
/// logs are JSON (so that stderr stays one JSON object per line), else as plain text.
pub fn say(error: bool, line: &str) {
    if JSON_LOGS.get().copied().unwrap_or(false) {
        if error {
            tracing::error!("{line}");
        } else {
            tracing::info!("{line}");
        }
    } else {
        eprintln!("{line}");
    }
}

/// Sets up `tracing` output on stderr once per process: `RUST_LOG` if set, else `[log] level`,
/// else `info`; text (colours on a terminal) or JSON lines.
pub fn init_logging(log: &LogConfig) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(log.level.as_deref().unwrap_or("info"))
    });
    let _ = JSON_LOGS.set(log.format == LogFormat::Json);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match log.format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// The state of one check.
#[derive(Debug, Clone)]
struct Check {
    ok: bool,
    at: Instant,
    detail: String,
}

/// What `/readyz` answers from: checks reported by the relay and the consumer.
#[derive(Debug, Default)]
pub struct Health {
    checks: Mutex<BTreeMap<&'static str, Check>>,
    /// Milliseconds after which a passing check counts as failing; 0: [`STALE`].
    stale_ms: std::sync::atomic::AtomicU64,
}

/// A passing check older than this counts as failing (its reporter stopped reporting), unless
/// a reporter reports less often ([`Health::report_every`]).
const STALE: Duration = Duration::from_secs(30);

impl Health {
    /// Reports check `name` (e.g. `database`, `broker`, `work`) as passing or not.
    pub fn report(&self, name: &'static str, ok: bool, detail: impl Into<String>) {
        self.checks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                name,
                Check {
                    ok,
                    at: Instant::now(),
                    detail: detail.into(),
                },
            );
    }

    /// A reporter that reports only every `period` (the relay, once per lease tick): its checks
    /// stay fresh for three periods, and at least 30 s.
    pub fn report_every(&self, period: Duration) {
        let ms = u64::try_from((3 * period).max(STALE).as_millis()).unwrap_or(u64::MAX);
        self.stale_ms
            .fetch_max(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether every check passed recently (30 s, or three report periods), with each check's
    /// state as JSON.
    pub fn ready(&self) -> (bool, serde_json::Value) {
        let stale = match self.stale_ms.load(std::sync::atomic::Ordering::Relaxed) {
            0 => STALE,
            ms => Duration::from_millis(ms),
        };
        let checks = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        let mut all = !checks.is_empty();
        let mut out = serde_json::Map::new();
        for (name, c) in checks.iter() {
            let fresh = c.at.elapsed() < stale;
            let ok = c.ok && fresh;
            all &= ok;
            out.insert(
                name.to_string(),
                serde_json::json!({
                    "ok": ok,
                    "detail": if fresh { c.detail.clone() } else { format!("no report for {} s", c.at.elapsed().as_secs()) },
                }),
            );
        }
        (all, serde_json::Value::Object(out))
    }
}

/// The process's health checks.
pub fn health() -> &'static Health {
    static HEALTH: OnceLock<Health> = OnceLock::new();
    HEALTH.get_or_init(Health::default)
}

/// The running metrics endpoint.
pub struct Server {
    /// The address it listens on (useful with port 0).
    pub addr: SocketAddr,
    server: std::sync::Arc<tiny_http::Server>,
    thread: Option<std::thread::JoinHandle<()>>,
    probe_stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.probe_stop
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Installs the Prometheus recorder (once per process) and serves `/metrics`, `/healthz` and
/// `/readyz` on `addr` until the returned [`Server`] is dropped. Also starts a broker probe
/// (a metadata request every 10 s) reporting check `broker`.
pub fn serve(addr: SocketAddr, config: &Config) -> std::io::Result<Server> {
    static HANDLE: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    let handle = HANDLE
        .get_or_init(|| {
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
                    &[
                        0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                        10.0, 30.0, 60.0,
                    ],
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Suffix("_rows".into()),
                        &[1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0],
                    )
                })
                .expect("bucket lists are not empty")
                .build_recorder();
            let handle = recorder.handle();
            // An application may have installed its own recorder: then ours only renders.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone();
    let server = tiny_http::Server::http(addr)
        .map_err(|e| std::io::Error::other(format!("metrics endpoint on {addr}: {e}")))?;
    let addr = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| std::io::Error::other("metrics endpoint has no IP address"))?;
    let server = std::sync::Arc::new(server);
    let s = server.clone();
    let thread = std::thread::Builder::new()
        .name("devour-metrics".into())
        .spawn(move || {
            for request in s.incoming_requests() {
                let (code, body, kind) = match request.url() {
                    "/metrics" => (200, handle.render(), "text/plain; version=0.0.4"),
                    "/healthz" => (200, "ok\n".to_string(), "text/plain"),
                    "/readyz" => {
                        let (ok, checks) = health().ready();
                        (
                            if ok { 200 } else { 503 },
                            format!("{checks}\n"),
                            "application/json",
                        )
                    }
                    _ => (
                        404,
                        "not found: try /metrics, /healthz, /readyz\n".into(),
                        "text/plain",
                    ),
                };
                let header =
                    tiny_http::Header::from_bytes("Content-Type", kind).expect("valid header");
                let _ = request.respond(
                    tiny_http::Response::from_string(body)
                        .with_status_code(code)
                        .with_header(header),
                );
            }
        })?;
    let probe_stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    probe_broker(config, probe_stop.clone());
    tracing::info!("metrics and health on http://{addr}/metrics, /healthz, /readyz");
    Ok(Server {
        addr,
        server,
        thread: Some(thread),
        probe_stop,
    })
}

/// Asks the broker for metadata every 10 s on a thread of its own, until `stop`; reports check
/// `broker`.
fn probe_broker(config: &Config, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    use std::sync::atomic::Ordering;
    let mut c = rdkafka::ClientConfig::new();
    for (k, v) in config.kafka.client_properties() {
        c.set(k, v);
    }
    let _ = std::thread::Builder::new()
        .name("devour-broker-probe".into())
        .spawn(move || {
            let mut client: Option<BaseConsumer> = None;
            while !stop.load(Ordering::Relaxed) {
                if client.is_none() {
                    client = c
                        .create()
                        .map_err(|e| {
                            health().report(
                                "broker",
                                false,
                                format!("cannot create a Kafka client: {e}"),
                            )
                        })
                        .ok();
                }
                if let Some(client) = &client {
                    match client.fetch_metadata(None, Duration::from_secs(5)) {
                        Ok(m) => health().report(
                            "broker",
                            !m.brokers().is_empty(),
                            format!("{} broker(s)", m.brokers().len()),
                        ),
                        Err(e) => health().report("broker", false, e.to_string()),
                    }
                }
                let next = Instant::now() + Duration::from_secs(10);
                while Instant::now() < next && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A check reported 40 s ago is stale for a reporter that reports every few seconds, but
    /// not for one that reports every 20 s (a relay with lease_ttl_ms = 60000).
    #[test]
    fn checks_of_a_slow_reporter_stay_fresh_for_three_periods() {
        let h = Health::default();
        h.checks.lock().unwrap().insert(
            "database",
            Check {
                ok: true,
                at: Instant::now() - Duration::from_secs(40),
                detail: "leases renewed".into(),
            },
        );
        assert!(!h.ready().0, "stale after 30 s by default");
        h.report_every(Duration::from_secs(20));
        assert!(h.ready().0, "fresh for 60 s when reports come every 20 s");
        h.report_every(Duration::from_secs(1));
        assert!(h.ready().0, "a faster reporter does not shorten it");
    }
}
