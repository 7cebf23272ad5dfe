//! Metrics, health and logs of the shipped binaries: `/metrics` counts what a run did,
//! `/healthz` and `/readyz` answer, a broker that cannot be reached makes `/readyz` fail, logs
//! can be JSON, and secrets stay out of them.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::consume::{produce, Out};
use common::{create_topic, Backend, TestConn, TestDb};
use diesel::prelude::*;

/// A port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET `path` on 127.0.0.1:`port`: (status, body); `None` if nothing answers.
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// The value of the sample `name` (with its labels, as rendered) in a /metrics text.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Polls `path` until `pred` holds for (status, body); panics with the last answer after 30 s.
fn wait_for(port: u16, path: &str, pred: impl Fn(u16, &str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = get(port, path);
        if let Some((code, body)) = &got {
            if pred(*code, body) {
                return body.clone();
            }
        }
        assert!(Instant::now() < deadline, "GET {path}: last answer {got:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn spawn(bin: &str, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DEVOUR_CONFIG", dir.join("devour.toml"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

fn stop(mut child: Child) -> String {
    common::sigterm(&child);
    let status = common::exit_within(&mut child, Duration::from_secs(60))
        .unwrap_or_else(|| panic!("the process did not exit within 60 s of SIGTERM"));
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "exit 0 on SIGTERM: {status:?}\n{err}");
    err
}

#[test]
fn relay_metrics_health_and_readiness() {
    let db = TestDb::new(Backend::Postgres, "telemetry_relay");
    let topic = create_topic("telemetry-relay", 3);
    let mut c = PgConnection::establish(&db.url).unwrap();
    common::insert_rows(&mut c, &topic, 0, 120, 10);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("devour.toml"), "[kafka]\nhosts = \"x:1\"\n").unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let relay = spawn(
        env!("CARGO_BIN_EXE_devour-relay"),
        dir.path(),
        &["--metrics-listen", &listen],
        &[
            ("DEVOUR_DATABASE_URL", &db.url),
            ("DEVOUR_KAFKA_HOSTS", &common::kafka_hosts()),
            ("DEVOUR_LOG_FORMAT", "json"),
        ],
    );
    let metrics = wait_for(port, "/metrics", |_, b| {
        sample(b, "devour_relay_delivered_total") == Some(120.0)
    });
    assert_eq!(
        sample(&metrics, "devour_relay_leases_held"),
        Some(256.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "devour_relay_delivery_latency_seconds_count"),
        Some(120.0),
        "{metrics}"
    );
    assert!(
        sample(&metrics, "devour_relay_batch_rows_count").unwrap_or(0.0) >= 1.0,
        "{metrics}"
    );
    // Present at 0 before the first dead letter, so that `increase()` sees the first one.
    assert_eq!(
        sample(&metrics, "devour_relay_dead_lettered_total"),
        Some(0.0),
        "{metrics}"
    );
    assert_eq!(get(port, "/healthz"), Some((200, "ok\n".to_string())));
    let ready = wait_for(port, "/readyz", |code, _| code == 200);
    let checks: serde_json::Value = serde_json::from_str(&ready).unwrap();
    for check in ["database", "broker", "work"] {
        assert_eq!(checks[check]["ok"], true, "{checks:#}");
    }
    assert_eq!(get(port, "/nope").map(|r| r.0), Some(404));
    assert_eq!(get(port, "/metrics?x=1").map(|r| r.0), Some(200));
    // Clients that send nothing, or announce a body they never send, hold up nobody: the
    // others are answered meanwhile, and so are they (a body is never read).
    let idle = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut huge = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        huge,
        "GET /healthz HTTP/1.1\r\nContent-Length: 4611686018427387904\r\n\r\n"
    )
    .unwrap();
    huge.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = String::new();
    huge.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(get(port, "/healthz"), Some((200, "ok\n".to_string())));
    drop(idle);
    // A head that never ends within 8 KiB is refused, not taken for a request.
    assert_eq!(
        get(port, &format!("/metrics?{}", "x".repeat(9000))).map(|r| r.0),
        Some(431)
    );
    assert_eq!(c.count("devour_outbox"), 0);
    let log = stop(relay);
    // JSON logs: every line an object with a level; the database password never shows.
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"))
        })
        .collect();
    assert!(
        lines.iter().any(|l| l["message"]
            .as_str()
            .unwrap_or("")
            .contains("relay starting")),
        "{log}"
    );
    assert!(lines.iter().all(|l| l["level"].is_string()), "{log}");
    assert!(
        !log.contains("postgres:postgres@"),
        "the database password was logged:\n{log}"
    );
}

#[test]
fn readyz_fails_while_the_broker_cannot_be_reached() {
    let db = TestDb::new(Backend::Sqlite, "telemetry_unready");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("devour.toml"), "[kafka]\nhosts = \"x:1\"\n").unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let closed = format!("127.0.0.1:{}", free_port());
    let relay = spawn(
        env!("CARGO_BIN_EXE_devour-relay"),
        dir.path(),
        &["--metrics-listen", &listen],
        &[
            ("DEVOUR_DATABASE_URL", &db.url),
            ("DEVOUR_KAFKA_HOSTS", &closed),
            ("RUST_LOG", "error"),
        ],
    );
    // The relay waits up to 10 s for an answer from the brokers before it starts its threads.
    let body = wait_for(port, "/readyz", |code, body| {
        code == 503 && body.contains("\"broker\"") && body.contains("\"database\"")
    });
    let checks: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(checks["broker"]["ok"], false, "{checks:#}");
    assert_eq!(
        checks["database"]["ok"], true,
        "the database is fine: {checks:#}"
    );
    assert_eq!(
        get(port, "/healthz").map(|r| r.0),
        Some(200),
        "alive all the same"
    );
    stop(relay);
}

/// A relay still waiting for its database at start is not ready (only the broker probe has
/// answered), and a SIGTERM then is a clean stop: exit 0.
#[test]
fn a_relay_waiting_for_its_database_is_not_ready_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("devour.toml"), "[kafka]\nhosts = \"x:1\"\n").unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let nobody = format!(
        "postgres://postgres:postgres@127.0.0.1:{}/devour",
        free_port()
    );
    let relay = spawn(
        env!("CARGO_BIN_EXE_devour-relay"),
        dir.path(),
        &["--metrics-listen", &listen],
        &[
            ("DEVOUR_DATABASE_URL", &nobody),
            ("DEVOUR_DATABASE_CONNECT_TIMEOUT_MS", "120000"),
            ("DEVOUR_KAFKA_HOSTS", &common::kafka_hosts()),
            ("RUST_LOG", "info"),
        ],
    );
    let body = wait_for(port, "/readyz", |code, body| {
        code == 503 && body.contains("\"broker\"") && body.contains("\"work\"")
    });
    let checks: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(checks["work"]["ok"], false, "{checks:#}");
    let err = stop(relay);
    assert!(
        err.contains("stopped before the database answered"),
        "{err}"
    );
}

/// The same for `devour consume` with an inbox: a SIGTERM while it waits for its database at
/// start is a clean stop, at once (not after `connect_timeout_ms`, nor exit 1).
#[test]
fn an_inbox_consumer_waiting_for_its_database_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("devour.toml"),
        "[kafka]\nhosts = \"x:1\"\n[consumers.r]\ntopic = \"t\"\nhandler = \"print\"\ninbox = true\n",
    )
    .unwrap();
    let nobody = format!(
        "postgres://postgres:postgres@127.0.0.1:{}/devour",
        free_port()
    );
    let consumer = spawn(
        env!("CARGO_BIN_EXE_devour"),
        dir.path(),
        &["consume", "r"],
        &[
            ("DEVOUR_DATABASE_URL", &nobody),
            ("DEVOUR_DATABASE_CONNECT_TIMEOUT_MS", "120000"),
            ("DEVOUR_KAFKA_HOSTS", &common::kafka_hosts()),
            ("RUST_LOG", "info"),
        ],
    );
    std::thread::sleep(Duration::from_secs(2));
    let err = stop(consumer);
    assert!(
        err.contains("stopped before the database answered"),
        "{err}"
    );
}

#[test]
fn consumer_metrics_count_processed_and_dead_lettered() {
    let topic = create_topic("telemetry-consume", 2);
    let mut msgs: Vec<Out<'_>> = (0..19).map(|i| Out::seq("k", i)).collect();
    msgs.push(Out {
        key: Some("k"),
        payload: Some(b"not json".to_vec()),
        headers: vec![],
    });
    produce(&topic, &msgs);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("devour.toml"),
        format!(
            "[kafka]\nhosts = \"{}\"\n[database]\nurl = \"sqlite://{}\"\n[consumers.watch]\ntopic = \"{topic}\"\ngroup = \"{}\"\nhandler = \"print\"\n",
            common::kafka_hosts(),
            dir.path().join("d.db").display(),
            common::unique("watch")
        ),
    )
    .unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let consumer = spawn(
        env!("CARGO_BIN_EXE_devour"),
        dir.path(),
        &["consume", "watch", "--metrics-listen", &listen],
        &[],
    );
    let metrics = wait_for(port, "/metrics", |_, b| {
        sample(b, "devour_consume_processed_total{route=\"watch\"}") == Some(19.0)
            && sample(b, "devour_consume_dead_lettered_total{route=\"watch\"}") == Some(1.0)
    });
    assert_eq!(
        sample(&metrics, "devour_consume_retried_total{route=\"watch\"}").unwrap_or(0.0),
        0.0
    );
    let ready = wait_for(port, "/readyz", |code, _| code == 200);
    assert!(ready.contains("partition(s) assigned"), "{ready}");
    // The lag gauge comes every 10 s: once the offsets are committed, 0.
    wait_for(port, "/metrics", |_, b| {
        sample(b, "devour_consume_lag{route=\"watch\"}") == Some(0.0)
    });
    stop(consumer);
}
