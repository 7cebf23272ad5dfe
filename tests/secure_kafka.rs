//! devour against the test broker's TLS and SASL_SSL listeners (`bin/kafka-start` makes them
//! and their certificates): the relay delivers and `devour consume` reads back over TLS with a
//! client certificate and an encrypted key, over SASL PLAIN and SCRAM-SHA-512; a wrong password
//! or a CA that did not sign the broker's certificate fails clearly; and no secret ever reaches
//! `devour config check`, a log line or an error message.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Backend, SecureKafka, TestConn, TestDb};
use diesel::prelude::*;
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};

/// What a run of one of devour's binaries did.
struct Run {
    command: String,
    /// The exit code; `None` when it was killed at the time limit (or by a signal).
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` → exit {:?} after {:.1} s\n--- stdout\n{}\n--- stderr\n{}",
            self.command,
            self.code,
            self.took.as_secs_f64(),
            self.stdout,
            self.stderr
        )
    }
}

/// Runs `bin args` in `dir` (with its devour.toml), killed after `limit`.
fn run(bin: &str, dir: &Path, args: &[&str], limit: Duration) -> Run {
    let t0 = Instant::now();
    let mut child = Command::new(bin)
        .args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DEVOUR_CONFIG", dir.join("devour.toml"))
        .env("RUST_LOG", "debug,librdkafka=debug,rdkafka=debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let reader = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            pipe.read_to_end(&mut s).unwrap();
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let out = reader(Box::new(child.stdout.take().unwrap()));
    let err = reader(Box::new(child.stderr.take().unwrap()));
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if t0.elapsed() > limit {
            child.kill().unwrap();
            child.wait().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Run {
        command: format!(
            "{} {}",
            bin.rsplit('/').next().unwrap_or(bin),
            args.join(" ")
        ),
        code,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
        took: t0.elapsed(),
    }
}

fn relay_drain(dir: &Path, limit: Duration) -> Run {
    run(env!("CARGO_BIN_EXE_devour-relay"), dir, &["--drain"], limit)
}

fn consume_drain(dir: &Path, limit: Duration) -> Run {
    run(
        env!("CARGO_BIN_EXE_devour"),
        dir,
        &["consume", "read", "--drain"],
        limit,
    )
}

/// Fails when a secret shows in any output of `run`.
fn assert_no_secret(run: &Run, secrets: &[&str]) {
    for s in secrets {
        assert!(!s.is_empty());
        assert!(
            !run.stdout.contains(s) && !run.stderr.contains(s),
            "the secret `{s}` leaked into the output of {run}"
        );
    }
}

/// An application directory: devour.toml with the SQLite database `db`, the `[kafka]` tables
/// `kafka_toml` (hosts included), and a route `read` printing `topic` in a group of its own.
fn app(db: &TestDb, kafka_toml: &str, topic: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[database]\nurl = \"{}\"\n{kafka_toml}\n[consumers.read]\ntopic = \"{topic}\"\n\
         group = \"{}\"\nhandler = \"print\"\n",
        db.url,
        common::unique("secure-read")
    );
    std::fs::write(dir.path().join("devour.toml"), toml).unwrap();
    dir
}

/// `[kafka]` for the TLS listener: the test CA, the client certificate and its encrypted key.
fn mtls_toml(s: &SecureKafka) -> String {
    format!(
        "[kafka]\nhosts = \"{}\"\n[kafka.ssl_config]\ncafile = \"{}\"\ncertfile = \"{}\"\n\
         keyfile = \"{}\"\npassword = \"{}\"\n",
        s.ssl_hosts,
        s.file("ca.pem"),
        s.file("client.pem"),
        s.file("client.enc.key"),
        s.password("client-key.password"),
    )
}

/// `[kafka]` for the SASL_SSL listener with `mechanism` and `password` for user `devour`.
fn sasl_toml(s: &SecureKafka, cafile: &str, mechanism: &str, password: &str) -> String {
    format!(
        "[kafka]\nhosts = \"{}\"\n[kafka.ssl_config]\ncafile = \"{cafile}\"\n\
         [kafka.properties]\n\"security.protocol\" = \"sasl_ssl\"\n\"sasl.mechanisms\" = \"{mechanism}\"\n\
         \"sasl.username\" = \"devour\"\n\"sasl.password\" = \"{password}\"\n",
        s.sasl_hosts
    )
}

/// Rows into the outbox, `devour-relay --drain` over the secure listener, then
/// `devour consume read --drain` (handler `print`) reads them back over it too.
fn round_trip(kafka_toml: impl Fn(&str) -> String, tag: &str, secrets: &[&str]) {
    let topic = common::create_topic(tag, 1);
    let db = TestDb::new(Backend::Sqlite, tag);
    let mut c = SqliteConnection::open(&db);
    common::insert_rows(&mut c, &topic, 0, 3, 2);
    let dir = app(&db, &kafka_toml(&topic), &topic);

    let relay = relay_drain(dir.path(), Duration::from_secs(60));
    assert_eq!(relay.code, Some(0), "{relay}");
    assert_eq!(c.count("devour_outbox"), 0, "every row delivered: {relay}");
    assert_no_secret(&relay, secrets);

    let consume = consume_drain(dir.path(), Duration::from_secs(60));
    assert_eq!(consume.code, Some(0), "{consume}");
    let seqs: Vec<(String, i64)> = consume
        .stdout
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}\n{consume}"));
            (
                v["key"].as_str().unwrap_or_default().to_string(),
                v["message"]["seq"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    let want: Vec<(String, i64)> = vec![("k0".into(), 0), ("k1".into(), 1), ("k0".into(), 2)];
    assert_eq!(seqs, want, "what `print` read back: {consume}");
    assert_no_secret(&consume, secrets);
}

#[test]
fn tls_with_client_certificate_and_encrypted_key_round_trip() {
    let s = SecureKafka::from_env();
    let key_password = s.password("client-key.password");
    round_trip(|_| mtls_toml(&s), "secure-mtls", &[&key_password]);
}

#[test]
fn sasl_plain_over_tls_round_trip() {
    let s = SecureKafka::from_env();
    let password = s.password("sasl-plain.password");
    let ca = s.file("ca.pem");
    round_trip(
        |_| sasl_toml(&s, &ca, "PLAIN", &password),
        "secure-plain",
        &[&password],
    );
}

#[test]
fn sasl_scram_sha_512_over_tls_round_trip() {
    let s = SecureKafka::from_env();
    let password = s.password("sasl-scram.password");
    let ca = s.file("ca.pem");
    round_trip(
        |_| sasl_toml(&s, &ca, "SCRAM-SHA-512", &password),
        "secure-scram",
        &[&password],
    );
}

// ---------------------------------------------------------------------------------------------
// Failures, seen by a client built from `KafkaConfig::client_config()`

/// Records the errors librdkafka reports through the client's error callback, and whether a
/// message was delivered.
#[derive(Clone, Default)]
struct Errors(Arc<Mutex<Vec<(KafkaError, String)>>>, Arc<Mutex<bool>>);

impl ClientContext for Errors {
    fn error(&self, error: KafkaError, reason: &str) {
        self.0.lock().unwrap().push((error, reason.to_string()));
    }
}

impl ProducerContext for Errors {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if result.is_ok() {
            *self.1.lock().unwrap() = true;
        }
    }
}

impl Errors {
    /// Waits up to 20 s for an error with `code` (the first one reported is returned).
    fn wait_for(&self, code: RDKafkaErrorCode) -> Option<(KafkaError, String)> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(e) = self
                .0
                .lock()
                .unwrap()
                .iter()
                .find(|(e, _)| e.rdkafka_error_code() == Some(code))
            {
                return Some(e.clone());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }

    fn all(&self) -> String {
        let errors = self.0.lock().unwrap();
        errors
            .iter()
            .map(|(e, r)| format!("{e:?}: {r}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Loads `kafka_toml` as devour does, builds a producer from `client_config()`, sends one
/// message, checks that it was not delivered, and returns the errors the client reported.
fn failing_client(kafka_toml: &str, topic: &str) -> Errors {
    let config = devour::Config::from_toml_str(
        kafka_toml,
        devour::config::Origin::Defaults,
        &Default::default(),
    )
    .unwrap();
    let errors = Errors::default();
    let producer: BaseProducer<Errors> = config
        .kafka
        .client_config()
        .set("message.timeout.ms", "8000")
        .create_with_context(errors.clone())
        .unwrap();
    producer
        .send(BaseRecord::<str, str>::to(topic).payload("never arrives"))
        .map_err(|(e, _)| e)
        .unwrap();
    let _ = producer.flush(Duration::from_secs(10)); // it expires after message.timeout.ms
    assert!(
        !*errors.1.lock().unwrap(),
        "the message was delivered despite the bad credentials; errors:\n{}",
        errors.all()
    );
    errors
}

#[test]
fn wrong_sasl_password_is_an_authentication_error() {
    let s = SecureKafka::from_env();
    let ca = s.file("ca.pem");
    let wrong = format!("dvwrong{}", std::process::id());
    for mechanism in ["PLAIN", "SCRAM-SHA-512"] {
        let topic = common::create_topic("secure-badpw", 1);
        let errors = failing_client(&sasl_toml(&s, &ca, mechanism, &wrong), &topic);
        let (e, reason) = errors
            .wait_for(RDKafkaErrorCode::Authentication)
            .unwrap_or_else(|| {
                panic!(
                    "{mechanism}: no Authentication error; got:\n{}",
                    errors.all()
                )
            });
        assert!(
            reason.contains("SASL authentication error")
                && (reason.contains("Invalid username or password") // PLAIN
                    || reason.contains("invalid credentials with SASL mechanism SCRAM-SHA-512")),
            "{mechanism}: the reason says what failed: {e:?}: {reason}"
        );
        assert!(
            !errors.all().contains(&wrong),
            "{mechanism}: the password leaked into an error:\n{}",
            errors.all()
        );
    }
}

#[test]
fn a_ca_that_did_not_sign_the_broker_is_an_ssl_handshake_error() {
    let s = SecureKafka::from_env();
    let topic = common::create_topic("secure-badca", 1);
    let toml = format!(
        "[kafka]\nhosts = \"{}\"\n[kafka.ssl_config]\ncafile = \"{}\"\ncertfile = \"{}\"\nkeyfile = \"{}\"\n",
        s.ssl_hosts,
        s.file("untrusted-ca.pem"),
        s.file("client.pem"),
        s.file("client.key"),
    );
    let errors = failing_client(&toml, &topic);
    let (e, reason) = errors
        .wait_for(RDKafkaErrorCode::SSL)
        .unwrap_or_else(|| panic!("no SSL error; got:\n{}", errors.all()));
    assert!(
        reason.contains("SSL handshake failed") && reason.contains("certificate verify failed"),
        "the reason says the broker's certificate was not trusted: {e:?}: {reason}"
    );
}

#[test]
fn the_tls_listener_refuses_a_client_without_a_certificate() {
    let s = SecureKafka::from_env();
    let topic = common::create_topic("secure-nocert", 1);
    let toml = format!(
        "[kafka]\nhosts = \"{}\"\n[kafka.ssl_config]\ncafile = \"{}\"\n",
        s.ssl_hosts,
        s.file("ca.pem")
    );
    let errors = failing_client(&toml, &topic);
    // The broker aborts the handshake (client auth required) with a TLS alert, which the
    // client reports as an SSL or transport error ("Connection refused" would be one too, so
    // the reason must name the alert).
    let seen = errors
        .wait_for(RDKafkaErrorCode::SSL)
        .or_else(|| errors.wait_for(RDKafkaErrorCode::BrokerTransportFailure));
    let (e, reason) =
        seen.unwrap_or_else(|| panic!("no SSL or transport error; got:\n{}", errors.all()));
    assert!(
        reason.contains("alert bad certificate") || reason.contains("alert certificate required"),
        "the broker refused the handshake for want of a certificate: {e:?}: {reason}"
    );
}

// ---------------------------------------------------------------------------------------------
// Failures, seen from the shipped binaries

#[test]
fn config_check_never_prints_a_secret() {
    let s = SecureKafka::from_env();
    let key_password = s.password("client-key.password");
    let sasl_password = s.password("sasl-scram.password");
    let db = TestDb::new(Backend::Sqlite, "secure-check");
    let toml = format!(
        "{}[kafka.properties]\n\"security.protocol\" = \"sasl_ssl\"\n\"sasl.mechanisms\" = \"SCRAM-SHA-512\"\n\
         \"sasl.username\" = \"devour\"\n\"sasl.password\" = \"{sasl_password}\"\n\
         \"sasl.oauthbearer.client.secret\" = \"{sasl_password}\"\n",
        mtls_toml(&s)
    );
    let dir = app(&db, &toml, "t");
    let check = run(
        env!("CARGO_BIN_EXE_devour"),
        dir.path(),
        &["config", "check"],
        Duration::from_secs(30),
    );
    assert_eq!(check.code, Some(0), "{check}");
    assert!(
        check.stdout.contains("sasl.username") && check.stdout.contains("***"),
        "the effective configuration is printed with secrets as ***: {check}"
    );
    assert_no_secret(&check, &[&key_password, &sasl_password]);
}

/// A client key that does not decrypt with `ssl_config.password` fails at start, at once, with
/// exit 1 and the librdkafka property that failed, without the password.
#[test]
fn a_wrong_key_password_fails_at_start_without_printing_it() {
    let s = SecureKafka::from_env();
    let db = TestDb::new(Backend::Sqlite, "secure-keypw");
    let wrong = format!("dvwrongkey{}", std::process::id());
    let right = s.password("client-key.password");
    let toml = mtls_toml(&s).replace(&right, &wrong);
    assert!(toml.contains(&wrong));
    let dir = app(&db, &toml, "t");
    for (bin, args) in [
        (env!("CARGO_BIN_EXE_devour-relay"), &["--drain"][..]),
        (
            env!("CARGO_BIN_EXE_devour"),
            &["consume", "read", "--drain"][..],
        ),
    ] {
        let r = run(bin, dir.path(), args, Duration::from_secs(30));
        assert_eq!(r.code, Some(1), "{r}");
        assert!(r.took < Duration::from_secs(10), "fails at start: {r}");
        assert!(
            r.stderr.contains("ssl.key.location failed"),
            "the error names what failed: {r}"
        );
        assert_no_secret(&r, &[&wrong, &right]);
    }
}

/// The relay given a wrong SASL password: it says why it cannot deliver, keeps the row, and never
/// prints the password.
#[test]
fn relay_with_a_wrong_sasl_password_says_so_keeps_the_row_and_hides_the_password() {
    let s = SecureKafka::from_env();
    let topic = common::create_topic("secure-relay-badpw", 1);
    let db = TestDb::new(Backend::Sqlite, "secure-relay-badpw");
    let mut c = SqliteConnection::open(&db);
    common::insert_rows(&mut c, &topic, 0, 1, 1);
    let wrong = format!("dvwrong{}", std::process::id());
    let dir = app(
        &db,
        &sasl_toml(&s, &s.file("ca.pem"), "SCRAM-SHA-512", &wrong),
        &topic,
    );
    let relay = relay_drain(dir.path(), Duration::from_secs(10));
    assert!(
        relay.stderr.contains("Authentication failed")
            && relay
                .stderr
                .contains("invalid credentials with SASL mechanism SCRAM-SHA-512"),
        "the relay says why it cannot deliver: {relay}"
    );
    assert_eq!(
        relay.code,
        Some(1),
        "a drain that delivered nothing exits 1 (not 0, nor killed at the time limit): {relay}"
    );
    assert_eq!(
        c.count("devour_outbox"),
        1,
        "the row waits in the outbox: {relay}"
    );
    assert_no_secret(&relay, &[&wrong]);
}

/// `devour consume --drain` given a wrong SASL password, and given a CA that did not sign the
/// broker's certificate: it says why, and never prints the password.
#[test]
fn consume_with_bad_credentials_says_so_and_hides_the_password() {
    let s = SecureKafka::from_env();
    let topic = common::create_topic("secure-consume-bad", 1);
    let db = TestDb::new(Backend::Sqlite, "secure-consume-bad");
    let wrong = format!("dvwrong{}", std::process::id());
    let cases = [
        (
            sasl_toml(&s, &s.file("ca.pem"), "PLAIN", &wrong),
            "SASL authentication error: Authentication failed",
        ),
        (
            sasl_toml(&s, &s.file("untrusted-ca.pem"), "PLAIN", &wrong),
            "SSL handshake failed",
        ),
    ];
    for (toml, expected) in cases {
        let dir = app(&db, &toml, &topic);
        let consume = consume_drain(dir.path(), Duration::from_secs(10));
        assert!(
            consume.stderr.contains(expected),
            "expected `{expected}` in: {consume}"
        );
        assert_no_secret(&consume, &[&wrong]);
    }
}

/// Each refusal (a wrong password, a CA that did not sign the brokers) ends `drain` at start
/// with exit 1, `prefix` and the reason, and prints no secret. librdkafka would retry both
/// forever; devour checks access before it starts.
fn assert_refused_at_start(
    db: &TestDb,
    topic: &str,
    prefix: &str,
    drain: fn(&Path, Duration) -> Run,
) {
    let s = SecureKafka::from_env();
    let wrong = format!("dvwrong{}", std::process::id());
    let right = s.password("sasl-plain.password");
    let cases = [
        (
            sasl_toml(&s, &s.file("ca.pem"), "PLAIN", &wrong),
            "uthentication",
        ),
        (
            sasl_toml(&s, &s.file("untrusted-ca.pem"), "PLAIN", &right),
            "SSL handshake failed",
        ),
    ];
    for (toml, reason) in cases {
        let dir = app(db, &toml, topic);
        let run = drain(dir.path(), Duration::from_secs(60));
        assert_eq!(run.code, Some(1), "{run}");
        assert!(
            run.stderr.contains(prefix) && run.stderr.contains(reason),
            "expected `{prefix}` and `{reason}` in: {run}"
        );
        assert_no_secret(&run, &[&wrong, &right]);
    }
}

#[test]
fn relay_drain_exits_non_zero_on_a_wrong_password_or_ca() {
    let topic = common::create_topic("secure-relay-exit", 1);
    let db = TestDb::new(Backend::Sqlite, "secure-relay-exit");
    let mut c = SqliteConnection::open(&db);
    common::insert_rows(&mut c, &topic, 0, 1, 1);
    assert_refused_at_start(&db, &topic, "devour-relay: error:", relay_drain);
    assert_eq!(c.count("devour_outbox"), 1, "the row waits in the outbox");
}

#[test]
fn consume_drain_exits_non_zero_on_a_wrong_password_or_ca() {
    let topic = common::create_topic("secure-consume-exit", 1);
    let db = TestDb::new(Backend::Sqlite, "secure-consume-exit");
    assert_refused_at_start(&db, &topic, "devour: error:", consume_drain);
}
