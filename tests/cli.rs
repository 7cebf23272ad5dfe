//! The `devour` binary: `migrate` and `outbox pending`, with their exit codes.

mod common;

use std::process::Command;

use common::{Account, Backend, TestConn, TestDb};
use devour::prelude::*;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;

/// Runs the devour binary with only the given environment; returns (code, stdout, stderr).
fn devour(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    run(env!("CARGO_BIN_EXE_devour"), args, env)
}

fn run(bin: &str, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    let dir = tempfile::tempdir().unwrap();
    cmd.current_dir(dir.path());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_code(got: (i32, String, String), want: i32, args: &[&str]) -> (String, String) {
    let (code, out, err) = got;
    assert_eq!(
        code,
        want,
        "devour {}\n--- stdout\n{out}\n--- stderr\n{err}",
        args.join(" ")
    );
    (out, err)
}

#[test]
fn migrate_on_a_new_sqlite_file_then_again() {
    let hosts = common::kafka_hosts();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("m.db").display());
    let env = [
        ("DEVOUR_DATABASE_URL", url.as_str()),
        ("DEVOUR_KAFKA_HOSTS", hosts.as_str()),
    ];
    let (out, _) = assert_code(devour(&["migrate"], &env), 0, &["migrate"]);
    assert!(
        out.contains("applied") && out.contains("create_outbox"),
        "{out}"
    );
    let (out, _) = assert_code(devour(&["migrate"], &env), 0, &["migrate"]);
    assert!(out.contains("up to date"), "{out}");
}

/// A relay on a database without devour's tables (not migrated, or the wrong one) stops at
/// once and says what to run, instead of retrying every query forever; `--migrate` fixes it.
#[test]
fn relay_on_a_database_without_devour_s_tables_exits_2_naming_devour_migrate() {
    let hosts = common::kafka_hosts();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("bare.db").display());
    let env = [
        ("DEVOUR_DATABASE_URL", url.as_str()),
        ("DEVOUR_KAFKA_HOSTS", hosts.as_str()),
    ];
    let relay = env!("CARGO_BIN_EXE_devour-relay");
    let (_, err) = assert_code(run(relay, &["--drain"], &env), 2, &["(relay) --drain"]);
    assert!(
        err.contains("devour_outbox") && err.contains("devour migrate"),
        "{err}"
    );
    assert_code(
        run(relay, &["--drain", "--migrate"], &env),
        0,
        &["(relay) --drain --migrate"],
    );
    // A table only block_key needs: a relay with the default policy does without it.
    let sqlite = url.trim_start_matches("sqlite://");
    let mut c = diesel::SqliteConnection::establish(sqlite).unwrap();
    c.batch_execute("DROP TABLE devour_key_releases").unwrap();
    assert_code(run(relay, &["--drain"], &env), 0, &["(relay) --drain"]);
    let block = [env[0], env[1], ("DEVOUR_RELAY_ON_DEAD_LETTER", "block_key")];
    let (_, err) = assert_code(run(relay, &["--drain"], &block), 2, &["(relay) block_key"]);
    assert!(err.contains("devour_key_releases"), "{err}");
    // Columns later migrations added are looked for too: what the relay may have sent...
    c.batch_execute("ALTER TABLE devour_relay_leases DROP COLUMN sent_through")
        .unwrap();
    let (_, err) = assert_code(run(relay, &["--drain"], &env), 2, &["(relay) --drain"]);
    assert!(err.contains("devour_relay_leases.sent_through"), "{err}");
    c.batch_execute(
        "ALTER TABLE devour_relay_leases ADD COLUMN sent_through INTEGER NOT NULL DEFAULT 0",
    )
    .unwrap();
    // ... and each relay's lease TTL.
    c.batch_execute("ALTER TABLE devour_relays DROP COLUMN lease_ttl_ms")
        .unwrap();
    let (_, err) = assert_code(run(relay, &["--drain"], &env), 2, &["(relay) --drain"]);
    assert!(err.contains("devour_relays.lease_ttl_ms"), "{err}");
    // Commands say what to run about a missing column too.
    let (_, err) = assert_code(devour(&["status"], &env), 1, &["status"]);
    assert!(err.contains("run `devour migrate`"), "{err}");
}

/// A librdkafka property librdkafka does not know stops the relay at start with its name, not
/// as "the brokers refused the connection".
#[test]
fn relay_with_a_property_librdkafka_refuses_says_so() {
    let hosts = common::kafka_hosts();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("p.db").display());
    let env = [
        ("DEVOUR_DATABASE_URL", url.as_str()),
        ("DEVOUR_KAFKA_HOSTS", hosts.as_str()),
        ("DEVOUR_KAFKA_PROPERTY_NO_SUCH_PROPERTY", "x"),
    ];
    let relay = env!("CARGO_BIN_EXE_devour-relay");
    let (_, err) = assert_code(
        run(relay, &["--drain", "--migrate"], &env),
        1,
        &["(relay) --drain"],
    );
    assert!(
        err.contains("invalid Kafka settings") && err.contains("no.such.property"),
        "{err}"
    );
    // A secret under a name librdkafka does not know (the Java client's): its refusal repeats
    // the value, which devour must not print, from the relay, a consumer or status.
    let secret = "hunter2-truststore";
    let env = [
        ("DEVOUR_DATABASE_URL", url.as_str()),
        ("DEVOUR_KAFKA_HOSTS", hosts.as_str()),
        ("DEVOUR_KAFKA_PROPERTY_SSL_TRUSTSTORE_PASSWORD", secret),
    ];
    let (_, err) = assert_code(run(relay, &["--drain"], &env), 1, &["(relay) --drain"]);
    assert!(err.contains("ssl.truststore.password ***"), "{err}");
    assert!(!err.contains(secret), "the secret leaked: {err}");
    let (_, out, err) = devour(&["status"], &env);
    assert!(
        !out.contains(secret) && !err.contains(secret),
        "the secret leaked: {out}{err}"
    );
}

/// A command on a database without devour's tables says what to run; opening the pool on a
/// new SQLite file logs nothing alarming (it opened every connection at once, and they raced
/// to switch the file to WAL: "database is locked").
#[test]
fn a_command_on_a_database_without_devour_s_tables_hints_at_devour_migrate() {
    let hosts = common::kafka_hosts();
    for i in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        // An empty file: a SQLite database without tables.
        let path = dir.path().join(format!("bare{i}.db"));
        std::fs::write(&path, b"").unwrap();
        let url = format!("sqlite://{}", path.display());
        let env = [
            ("DEVOUR_DATABASE_URL", url.as_str()),
            ("DEVOUR_KAFKA_HOSTS", hosts.as_str()),
        ];
        let (_, err) = assert_code(devour(&["outbox", "list"], &env), 1, &["outbox", "list"]);
        assert!(err.contains("run `devour migrate`"), "{err}");
        assert!(!err.contains("database is locked"), "{err}");
    }
    // A file that is not there is not created by a command that only reads or writes rows.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typo.db");
    let url = format!("sqlite://{}", path.display());
    let env = [
        ("DEVOUR_DATABASE_URL", url.as_str()),
        ("DEVOUR_KAFKA_HOSTS", hosts.as_str()),
    ];
    for args in [&["status"][..], &["outbox", "pending"], &["outbox", "list"]] {
        let (_, err) = assert_code(devour(args, &env), 1, args);
        assert!(
            err.contains("the file does not exist; `devour migrate` (or --migrate) creates it"),
            "{err}"
        );
        assert!(!path.exists(), "{args:?} created {}", path.display());
    }
    let relay = env!("CARGO_BIN_EXE_devour-relay");
    let (_, err) = assert_code(run(relay, &["--drain"], &env), 2, &["(relay) --drain"]);
    assert!(
        err.contains("does not exist") && err.contains("devour migrate"),
        "{err}"
    );
    assert!(!path.exists(), "the relay created {}", path.display());
}

/// Short commands exit cleanly: a pool that opened connections on a thread of its own could
/// still be connecting (libpq, TLS) while the process exited, and crashed it (a segfault in 8
/// of 40 runs).
#[test]
fn short_commands_exit_cleanly() {
    let hosts = common::kafka_hosts();
    let db = TestDb::new(Backend::Postgres, "short_commands");
    let env = [
        ("DEVOUR_DATABASE_URL", db.url.as_str()),
        ("DEVOUR_KAFKA_HOSTS", hosts.as_str()),
    ];
    for _ in 0..25 {
        assert_code(
            devour(&["outbox", "pending"], &env),
            0,
            &["outbox", "pending"],
        );
    }
}

#[test]
fn migrate_on_postgres() {
    let hosts = common::kafka_hosts();
    // A database with no devour tables: TestDb migrates, so make a bare one.
    let name = format!("devour_t_{}", common::unique("cli_migrate"));
    let mut admin = PgConnection::establish(&common::pg_admin_url()).unwrap();
    diesel::sql_query(format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .unwrap();
    let url = format!(
        "{}/{name}",
        common::pg_admin_url().rsplit_once('/').unwrap().0
    );
    let env = [
        ("DEVOUR_DATABASE_URL", url.as_str()),
        ("DEVOUR_KAFKA_HOSTS", hosts.as_str()),
    ];
    let (out, _) = assert_code(devour(&["migrate"], &env), 0, &["migrate"]);
    assert!(
        out.contains("applied") && !out.contains("postgres:postgres@"),
        "password must be redacted: {out}"
    );
    let (out, _) = assert_code(devour(&["migrate"], &env), 0, &["migrate"]);
    assert!(out.contains("up to date"), "{out}");
    let mut c = PgConnection::establish(&url).unwrap();
    assert_eq!(c.count("devour_outbox"), 0);
    drop(c);
    diesel::sql_query(format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&mut admin)
        .unwrap();
}

#[test]
fn migrate_against_an_unreachable_database_exits_1() {
    let hosts = common::kafka_hosts();
    let env = [
        (
            "DEVOUR_DATABASE_URL",
            "postgres://u:hunter2@127.0.0.1:1/nope",
        ),
        ("DEVOUR_DATABASE_CONNECT_TIMEOUT_MS", "2000"),
        ("DEVOUR_KAFKA_HOSTS", hosts.as_str()),
    ];
    let (_, err) = assert_code(devour(&["migrate"], &env), 1, &["migrate"]);
    assert!(
        err.contains("cannot connect to postgres://u:***@127.0.0.1:1/nope"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "password leaked: {err}");
}

/// A database that refuses for good (wrong password, no such database, a SQLite file in a
/// directory that does not exist) fails the command at once, saying why, instead of being
/// tried again until the connect timeout with a log line per attempt.
#[test]
fn a_database_that_refuses_fails_the_command_at_once() {
    let hosts = common::kafka_hosts();
    let admin = common::pg_admin_url();
    let wrong_password = admin.replacen("postgres:postgres@", "postgres:wrong@", 1);
    assert_ne!(
        wrong_password, admin,
        "the admin URL has the expected credentials"
    );
    let (base, _) = admin.rsplit_once('/').unwrap();
    let no_database = format!("{base}/devour_no_such_database");
    let cases = [
        (wrong_password.as_str(), "password authentication failed"),
        (
            no_database.as_str(),
            "devour_no_such_database\" does not exist",
        ),
        (
            "sqlite:///devour-no-such-dir/x.db",
            "the file does not exist",
        ),
    ];
    for (url, says) in cases {
        let env = [
            ("DEVOUR_DATABASE_URL", url),
            ("DEVOUR_DATABASE_CONNECT_TIMEOUT_MS", "30000"),
            ("DEVOUR_KAFKA_HOSTS", hosts.as_str()),
        ];
        let started = std::time::Instant::now();
        let (_, err) = assert_code(devour(&["outbox", "pending"], &env), 1, &[url]);
        assert!(err.contains(says), "{url}: {err}");
        assert!(
            !err.contains("r2d2"),
            "{url}: retried through the pool: {err}"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "{url}: waited {:?} for a refusal that does not go away",
            started.elapsed()
        );
    }
}

#[test]
fn migrate_with_bad_config_exits_2() {
    let (_, err) = assert_code(
        devour(&["migrate"], &[("DEVOUR_DATABASE_URL", "sqlite://x.db")]),
        2,
        &["migrate"],
    );
    assert!(err.contains("`kafka.hosts`"), "{err}");
}

#[test]
fn outbox_pending_lists_rows_in_order() {
    let hosts = common::kafka_hosts();
    let db = TestDb::new(Backend::Sqlite, "pending");
    let mut c = SqliteConnection::open(&db);
    Account::new(1, "ada")
        .save(&mut c, SaveOptions::new())
        .unwrap();
    Account::new(1, "ada l")
        .save(&mut c, SaveOptions::new())
        .unwrap();
    let env = [
        ("DEVOUR_DATABASE_URL", db.url.as_str()),
        ("DEVOUR_KAFKA_HOSTS", hosts.as_str()),
    ];
    let (out, _) = assert_code(
        devour(&["outbox", "pending"], &env),
        0,
        &["outbox", "pending"],
    );
    let create = out.find("create").unwrap_or_else(|| panic!("{out}"));
    let update = out.find("update").unwrap_or_else(|| panic!("{out}"));
    assert!(create < update, "{out}");
    assert!(out.contains("(2 undelivered row(s) shown)"), "{out}");
    let (out, _) = assert_code(
        devour(&["outbox", "pending", "--json", "--limit", "1"], &env),
        0,
        &["outbox", "pending"],
    );
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["event"], "create");
    assert_eq!(lines[0]["partition_key"], "1");
    // A payload with newlines keeps its row on one line of the table.
    c.batch_execute(
        "INSERT INTO devour_outbox (topic, partition_key, payload, shard) \
         VALUES ('t', 'k', CAST('{\n  \"a\": 1\n}' AS BLOB), 0)",
    )
    .unwrap();
    let (out, _) = assert_code(
        devour(&["outbox", "pending"], &env),
        0,
        &["outbox", "pending"],
    );
    assert_eq!(
        out.lines().count(),
        1 + 3 + 1,
        "header, 3 rows, count:\n{out}"
    );
    assert!(out.contains(r#"{\n  "a": 1\n}"#), "{out}");
}

#[test]
fn every_command_explains_itself_with_an_example() {
    let cases: &[(&str, &[&str])] = &[
        (env!("CARGO_BIN_EXE_devour"), &["--help"]),
        (env!("CARGO_BIN_EXE_devour"), &["config", "check", "--help"]),
        (env!("CARGO_BIN_EXE_devour"), &["migrate", "--help"]),
        (env!("CARGO_BIN_EXE_devour"), &["status", "--help"]),
        (env!("CARGO_BIN_EXE_devour"), &["consume", "--help"]),
        (
            env!("CARGO_BIN_EXE_devour"),
            &["outbox", "pending", "--help"],
        ),
        (env!("CARGO_BIN_EXE_devour"), &["outbox", "list", "--help"]),
        (env!("CARGO_BIN_EXE_devour"), &["outbox", "show", "--help"]),
        (env!("CARGO_BIN_EXE_devour"), &["outbox", "retry", "--help"]),
        (
            env!("CARGO_BIN_EXE_devour"),
            &["outbox", "discard", "--help"],
        ),
        (env!("CARGO_BIN_EXE_devour"), &["outbox", "put", "--help"]),
        (env!("CARGO_BIN_EXE_devour-relay"), &["--help"]),
    ];
    for (bin, args) in cases {
        let out = std::process::Command::new(bin)
            .args(*args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args:?}: {out:?}");
        assert!(
            text.contains("Example"),
            "{bin} {args:?} has no example:\n{text}"
        );
        assert!(text.lines().count() > 5, "{bin} {args:?}:\n{text}");
    }
}

/// A relay still waiting for brokers that do not answer (its start-up check lasts 10 s) stops
/// on SIGTERM without waiting the check out.
#[test]
fn a_relay_stops_on_sigterm_while_it_waits_for_the_brokers() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("r.db").display());
    let mut relay = std::process::Command::new(env!("CARGO_BIN_EXE_devour-relay"))
        .arg("--migrate")
        .env_clear()
        .env("DEVOUR_DATABASE_URL", &url)
        .env("DEVOUR_KAFKA_HOSTS", "127.0.0.1:1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    common::sigterm(&relay);
    let stopped = std::time::Instant::now();
    let log = dir.path().join("none.log");
    let status = common::wait_exit(
        &mut relay,
        std::time::Duration::from_secs(30),
        "the relay after SIGTERM",
        &log,
    );
    assert!(status.success(), "{status:?}");
    assert!(
        stopped.elapsed() < std::time::Duration::from_secs(5),
        "the relay took {:?} to stop: it waited the broker check out",
        stopped.elapsed()
    );
}

/// A reader that goes away (`| head`) is no error: the command exits 0 quietly.
#[test]
fn output_cut_short_by_the_reader_is_no_error() {
    let hosts = common::kafka_hosts();
    let db = TestDb::new(Backend::Sqlite, "broken_pipe");
    let mut c = SqliteConnection::open(&db);
    common::insert_rows(&mut c, "t", 0, 2000, 10);
    let script = format!(
        "set -o pipefail; DEVOUR_DATABASE_URL='{}' DEVOUR_KAFKA_HOSTS='{hosts}' '{}' outbox pending --limit 2000 \
         | head -c 1 >/dev/null; echo \"status ${{PIPESTATUS[0]}}\"",
        db.url,
        env!("CARGO_BIN_EXE_devour")
    );
    let out = std::process::Command::new("bash")
        .args(["-c", &script])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(stdout.trim(), "status 0", "{stderr}");
    assert!(!stderr.contains("Broken pipe"), "{stderr}");
}

/// devour-relay waits for a PostgreSQL that does not answer yet, up to connect_timeout_ms (as
/// the commands do), but not for one that refuses its credentials.
#[test]
fn a_relay_waits_for_a_database_that_is_not_up_but_not_for_one_that_refuses() {
    let hosts = common::kafka_hosts();
    let relay = env!("CARGO_BIN_EXE_devour-relay");
    let down = "postgres://postgres:postgres@127.0.0.1:1/postgres";
    let env = [
        ("DEVOUR_DATABASE_URL", down),
        ("DEVOUR_DATABASE_CONNECT_TIMEOUT_MS", "3000"),
        ("DEVOUR_KAFKA_HOSTS", hosts.as_str()),
    ];
    let started = std::time::Instant::now();
    let (_, err) = assert_code(run(relay, &["--drain"], &env), 1, &["(relay) down"]);
    let waited = started.elapsed();
    assert!(err.contains("does not answer yet"), "{err}");
    assert!(
        waited >= std::time::Duration::from_millis(2500),
        "gave up after {waited:?}, before connect_timeout_ms"
    );
    let admin = common::pg_admin_url();
    let wrong = admin.replacen("postgres:postgres@", "postgres:wrong@", 1);
    let env = [
        ("DEVOUR_DATABASE_URL", wrong.as_str()),
        ("DEVOUR_DATABASE_CONNECT_TIMEOUT_MS", "30000"),
        ("DEVOUR_KAFKA_HOSTS", hosts.as_str()),
    ];
    let started = std::time::Instant::now();
    let (_, err) = assert_code(
        run(relay, &["--drain"], &env),
        1,
        &["(relay) wrong password"],
    );
    assert!(err.contains("password authentication failed"), "{err}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "waited {:?} for a refusal that does not go away",
        started.elapsed()
    );
}
