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

/// How long a repeating warning stays quiet after it was logged (see [`Repeats`]).
pub(crate) const REPEAT_AFTER: Duration = Duration::from_secs(30);

/// Counts repeats of a warning, by kind, so that one repeating every second while a dependency
/// is down (a broker, the database) is logged once per [`REPEAT_AFTER`], with how many were
/// held back.
#[derive(Default)]
pub(crate) struct Repeats(Mutex<std::collections::HashMap<String, (Instant, u64)>>);

impl Repeats {
    /// `Some(suffix)`: log this one now, ending with `suffix` (how many were held back since
    /// the last, if any); `None`: hold it back.
    pub(crate) fn due(&self, kind: &str) -> Option<String> {
        let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let held_back = match seen.get_mut(kind) {
            Some((at, n)) if at.elapsed() < REPEAT_AFTER => {
                *n += 1;
                return None;
            }
            Some((at, n)) => {
                *at = Instant::now();
                std::mem::take(n)
            }
            None => {
                seen.insert(kind.to_string(), (Instant::now(), 0));
                0
            }
        };
        Some(if held_back > 0 {
            format!(
                " ({held_back} more like it in the last {} s)",
                REPEAT_AFTER.as_secs()
            )
        } else {
            String::new()
        })
    }

    /// How many of `kind` are held back now (tests).
    #[cfg(test)]
    pub(crate) fn held_back(&self, kind: &str) -> Option<u64> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(kind)
            .map(|(_, n)| *n)
    }
}

/// `e`'s text on one line: libpq's messages end in a newline, and some span several, which
/// breaks line-oriented logs and health details.
pub(crate) fn one_line_error(e: &dyn std::fmt::Display) -> String {
    e.to_string()
        .trim_end()
        .split('\n')
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Metric names, all prefixed `devour_`.
pub mod names {
    /// Counter: rows delivered (acknowledged by the broker; a removal fenced off by a lost
    /// lease still counts).
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
/// else `info`; text (colours on a terminal) or JSON lines. An empty `RUST_LOG` counts as unset;
/// one that would silence devour (a misspelt level) is set aside with a warning.
pub fn init_logging(log: &LogConfig) {
    use std::io::IsTerminal;
    let configured = log.level.as_deref().unwrap_or("info");
    let filter = match std::env::var("RUST_LOG") {
        // Set but empty: as if unset.
        Ok(v) if v.trim().is_empty() => configured.to_string(),
        Ok(v) => {
            match crate::config::check_log_filter(&v) {
                Ok(()) => v,
                Err(why) => {
                    eprintln!("devour: warning: RUST_LOG={v:?} is set aside ({why}); using `{configured}`");
                    configured.to_string()
                }
            }
        }
        Err(_) => configured.to_string(),
    };
    let filter = tracing_subscriber::EnvFilter::new(filter);
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
                    detail: one_line_error(&detail.into()),
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
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connections answered at once; more wait in the listen queue (not accepted meanwhile).
const MAX_CONNECTIONS: usize = 16;
/// How long a client may take to send its request, and to take the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// The most of a request that is read: the request line and headers (a body is never read).
const MAX_REQUEST: usize = 8192;

/// Installs the Prometheus recorder (once per process) and serves `/metrics`, `/healthz` and
/// `/readyz` on `addr` until the returned [`Server`] is dropped. Also starts a broker probe
/// (a metadata request every 10 s) reporting check `broker`.
///
/// The endpoint answers GET and HEAD of those paths and closes each connection after one
/// answer. It reads at most 8 KiB of a request, never its body, and gives a client 2 s to send
/// it, on a thread per connection (at most 16), so no client can hold up the others, the
/// process, or its stop.
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
    let listener = std::net::TcpListener::bind(addr).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("metrics endpoint on {addr} (metrics.listen / --metrics-listen): {e}"),
        )
    })?;
    let addr = listener.local_addr()?;
    // Polled, so that a stop is seen within 50 ms without a connection to wake it.
    listener.set_nonblocking(true)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let thread = {
        let stop = stop.clone();
        let handle = handle.clone();
        std::thread::Builder::new()
            .name("devour-metrics".into())
            .spawn(move || accept_loop(listener, &handle, &stop))?
    };
    // Not ready until the run itself says it has work (shards held, partitions assigned):
    // until then only the broker probe would report, and it may pass while the database is
    // down or the route's topic does not exist yet.
    health().report("work", false, "starting");
    probe_broker(config, handle, stop.clone());
    tracing::info!("metrics and health on http://{addr}/metrics, /healthz, /readyz");
    Ok(Server {
        addr,
        stop,
        thread: Some(thread),
    })
}

fn accept_loop(
    listener: std::net::TcpListener,
    handle: &metrics_exporter_prometheus::PrometheusHandle,
    stop: &std::sync::atomic::AtomicBool,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let open = std::sync::Arc::new(AtomicUsize::new(0));
    /// Gives its connection's place back however the answer ends.
    struct Place(std::sync::Arc<AtomicUsize>);
    impl Drop for Place {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::AcqRel);
        }
    }
    while !stop.load(Ordering::Relaxed) {
        if open.load(Ordering::Acquire) >= MAX_CONNECTIONS {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                open.fetch_add(1, Ordering::AcqRel);
                let (place, handle) = (Place(open.clone()), handle.clone());
                // If the thread cannot start, the closure (and its place) is dropped.
                let _ = std::thread::Builder::new()
                    .name("devour-metrics-client".into())
                    .spawn(move || {
                        let _place = place;
                        answer(stream, &handle);
                    });
            }
            // Nothing to accept yet (or a failed accept): look again shortly.
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Reads one request's head from `stream` (within [`CLIENT_TIMEOUT`] and [`MAX_REQUEST`]),
/// answers it and closes the connection.
fn answer(mut stream: std::net::TcpStream, handle: &metrics_exporter_prometheus::PrometheusHandle) {
    use std::io::{Read, Write};
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let complete =
        |h: &[u8]| h.windows(4).any(|w| w == b"\r\n\r\n") || h.windows(2).any(|w| w == b"\n\n");
    while !complete(&head) && head.len() < MAX_REQUEST {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method.is_empty() {
        return;
    }
    let (code, body, kind) = if complete(&head) {
        route(method, target, handle)
    } else if head.len() >= MAX_REQUEST {
        (431, "request head too long\n".into(), "text/plain")
    } else {
        (400, "incomplete request\n".into(), "text/plain")
    };
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        400 => "Bad Request",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let allow = if code == 405 {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        out.extend_from_slice(body.as_bytes());
    }
    let _ = stream.write_all(&out);
    let _ = stream.flush();
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// The answer to `method target`: status, body, content type.
fn route(
    method: &str,
    target: &str,
    handle: &metrics_exporter_prometheus::PrometheusHandle,
) -> (u16, String, &'static str) {
    if method != "GET" && method != "HEAD" {
        return (405, "only GET and HEAD\n".into(), "text/plain");
    }
    let path = target.split(['?', '#']).next().unwrap_or("");
    match path.trim_end_matches('/') {
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
    }
}

/// Asks the broker for metadata every 10 s on a thread of its own, until `stop`; reports check
/// `broker`. Also runs the recorder's upkeep every second.
fn probe_broker(
    config: &Config,
    handle: metrics_exporter_prometheus::PrometheusHandle,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    use std::sync::atomic::Ordering;
    let mut c = rdkafka::ClientConfig::new();
    for (k, v) in config.kafka.client_properties() {
        c.set(k, v);
    }
    let _ = std::thread::Builder::new()
        .name("devour-broker-probe".into())
        .spawn(move || {
            let mut client: Option<BaseConsumer<crate::kafka_log::QuietContext>> = None;
            while !stop.load(Ordering::Relaxed) {
                if client.is_none() {
                    client = c
                        .create_with_context(crate::kafka_log::QuietContext::default())
                        .map_err(|e| {
                            health().report(
                                "broker",
                                false,
                                format!(
                                    "cannot create a Kafka client: {}",
                                    crate::kafka_log::redact(e)
                                ),
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
                let mut upkeep = Instant::now();
                while Instant::now() < next && !stop.load(Ordering::Relaxed) {
                    // Histogram samples pile up until rendered: fold them in every second, so
                    // that memory does not grow when nobody scrapes `/metrics`.
                    if upkeep.elapsed() >= Duration::from_secs(1) {
                        handle.run_upkeep();
                        upkeep = Instant::now();
                    }
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

#[cfg(test)]
mod repeat_tests {
    use super::*;

    #[test]
    fn an_error_on_several_lines_is_reported_on_one() {
        assert_eq!(
            one_line_error(&"no connection to the server\n"),
            "no connection to the server"
        );
        assert_eq!(
            one_line_error(&"connection failed: refused\n  is the server running?\n"),
            "connection failed: refused; is the server running?"
        );
        health().report("one-line-test", false, "a\nb\n");
        let (_, checks) = health().ready();
        assert_eq!(checks["one-line-test"]["detail"], "a; b", "{checks}");
    }
}
