//! The operator's commands against real PostgreSQL and Kafka: `devour status` (backlog, dead
//! letters, relays, consumer lag), `devour outbox list|show|retry|discard` by id, key and all,
//! and `devour outbox put`.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::consume::{produce_seqs, read_all};
use common::{create_topic, Backend, TestConn, TestDb};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use serde_json::Value;

/// `bin` with nothing in its environment but PATH, `dir`'s devour.toml, `db` and the broker.
fn command(bin: &str, dir: &Path, db: &TestDb) -> Command {
    let mut cmd = Command::new(bin);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DEVOUR_CONFIG", dir.join("devour.toml"))
        .env("DEVOUR_DATABASE_URL", &db.url)
        .env("DEVOUR_KAFKA_HOSTS", common::kafka_hosts());
    cmd
}

/// `devour-relay`, its stderr appended to `relay.log` in `dir`.
fn relay_command(dir: &Path, db: &TestDb) -> Command {
    let mut cmd = command(env!("CARGO_BIN_EXE_devour-relay"), dir, db);
    cmd.stderr(common::append_to(&dir.join("relay.log")));
    cmd
}

/// `devour-relay --drain`, which must exit 0.
fn relay_drain(dir: &Path, db: &TestDb) {
    let mut relay = relay_command(dir, db).arg("--drain").spawn().unwrap();
    let log = dir.join("relay.log");
    common::wait_success(
        &mut relay,
        Duration::from_secs(60),
        "devour-relay --drain exits 0",
        &log,
    );
}

/// Polls `devour status --json` until the outbox is empty and every shard is held; then stops
/// `relay` (SIGTERM) and returns that status.
fn status_once_drained(dir: &Path, db: &TestDb, mut relay: std::process::Child) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    let s = loop {
        let s = json(dir, db, &["status", "--json"]);
        if s["outbox"]["rows"] == 0 && s["unheld_shards"] == 0 {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "relay did not drain and hold every shard: {s:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    common::sigterm(&relay);
    let log = dir.join("relay.log");
    common::wait_success(
        &mut relay,
        Duration::from_secs(60),
        "the relay stops with exit 0 on SIGTERM",
        &log,
    );
    s
}

fn devour(dir: &Path, db: &TestDb, args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let mut cmd = command(env!("CARGO_BIN_EXE_devour"), dir, db);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    {
        use std::io::Write;
        let mut i = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            i.write_all(s.as_bytes()).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(dir: &Path, db: &TestDb, args: &[&str]) -> Value {
    let (code, out, err) = devour(dir, db, args, None);
    assert_eq!(code, 0, "{args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {out}"))
}

fn setup(routes: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("devour.toml"),
        format!("[kafka]\nhosts = \"x:1\"\n{routes}"),
    )
    .unwrap();
    dir
}

/// Inserts dead letters (id, key) straight into `devour_dead_letters`.
fn dead_letters(c: &mut PgConnection, topic: &str, rows: &[(i64, &str)]) {
    for (id, key) in rows {
        c.batch_execute(&format!(
            "INSERT INTO devour_dead_letters (id, topic, partition_key, payload, headers, event, message_id, \
             content_type, shard, created_at, attempts, error) VALUES ({id}, '{topic}', '{key}', \
             convert_to('{{\"n\": {id}}}', 'UTF8'), '{{\"trace\": \"t{id}\"}}', 'create', 'mid-{id}', 'application/json', \
             {}, now(), 3, 'Broker: Message size too large')",
            devour::outbox::shard_for_key(key)
        ))
        .unwrap();
    }
}

#[test]
fn status_counts_backlog_dead_letters_and_consumer_lag() {
    let db = TestDb::new(Backend::Postgres, "ops_status");
    let mut c = PgConnection::establish(&db.url).unwrap();
    common::insert_rows(&mut c, "status-a", 0, 30, 7);
    common::insert_rows(&mut c, "status-b", 30, 20, 5);
    // The oldest row is an hour old.
    c.batch_execute(
        "UPDATE devour_outbox SET created_at = now() - interval '1 hour'          WHERE id = (SELECT min(id) FROM devour_outbox)",
    )
    .unwrap();
    dead_letters(&mut c, "status-a", &[(1_000_001, "k1")]);
    // A relay that crashed an hour ago: its row stays until another relay clears it.
    c.batch_execute(
        "INSERT INTO devour_relays (relay_id, started_at, heartbeat_at) \
         VALUES ('crashed-relay', now() - interval '2 hours', now() - interval '1 hour')",
    )
    .unwrap();
    // A relay with 60 s leases, heartbeating every 20 s: 15 s since its last heartbeat is not
    // silent for it, although it would be for this status's own 10 s TTL.
    c.batch_execute(
        "INSERT INTO devour_relays (relay_id, started_at, heartbeat_at, lease_ttl_ms) \
         VALUES ('slow-relay', now() - interval '1 hour', now() - interval '15 seconds', 60000)",
    )
    .unwrap();
    let topic = create_topic("ops-lag", 2);
    produce_seqs(&topic, 10, 4);
    let group = common::unique("lag");
    let dir = setup(&format!(
        "[consumers.lagging]\ntopic = \"{topic}\"\ngroup = \"{group}\"\nhandler = \"print\"\n"
    ));
    // The group handles the 10 messages, then 5 more arrive: lag 5.
    let (code, _, err) = devour(dir.path(), &db, &["consume", "lagging", "--drain"], None);
    assert_eq!(code, 0, "{err}");
    produce_seqs(&topic, 5, 4);

    let s = json(dir.path(), &db, &["status", "--json"]);
    assert_eq!(s["outbox"]["rows"], 50, "{s:#}");
    let topics: Vec<(String, i64)> = s["outbox"]["topics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["topic"].as_str().unwrap().to_string(),
                t["rows"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        topics,
        vec![("status-a".into(), 30), ("status-b".into(), 20)]
    );
    let shard_rows: i64 = s["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["rows"].as_i64().unwrap())
        .sum();
    assert_eq!(shard_rows, 50, "shards add up to the backlog");
    let age = s["outbox"]["oldest_age_s"].as_f64().unwrap();
    assert!((3600.0..3660.0).contains(&age), "oldest row age {age} s");
    assert_eq!(s["dead_letters"]["rows"], 1);
    assert_eq!(
        s["held_back"],
        serde_json::json!([]),
        "nothing waits under the default policy"
    );
    // Under block_key, k1's rows wait behind its dead letter: 5 of status-a's, 4 of status-b's.
    let blocking = setup("[relay]\non_dead_letter = \"block_key\"\n");
    let b = json(blocking.path(), &db, &["status", "--json"]);
    assert_eq!(
        b["held_back"],
        serde_json::json!([{"key": "k1", "rows": 9}]),
        "{b:#}"
    );
    let (code, table, err) = devour(blocking.path(), &db, &["status"], None);
    assert_eq!(code, 0, "{err}");
    assert!(
        table.contains(
            "held back (block_key): 9 row(s) of 1 key(s) wait for their dead letters: k1 (9)"
        ),
        "{table}"
    );
    assert_eq!(s["unheld_shards"], 256, "no relay runs");
    assert_eq!(
        s["silent"],
        serde_json::json!(["crashed-relay"]),
        "each relay judged by its own lease TTL"
    );
    let route = &s["consumers"][0];
    assert_eq!(
        (route["route"].as_str(), route["group"].as_str()),
        (Some("lagging"), Some(group.as_str()))
    );
    assert_eq!(route["lag"], 5, "{route:#}");

    // The table says the same.
    let (code, table, err) = devour(dir.path(), &db, &["status"], None);
    assert_eq!(code, 0, "{err}");
    assert!(table.contains("outbox: 50 undelivered row(s)"), "{table}");
    assert!(table.contains("dead letters: 1"), "{table}");
    assert!(
        table.contains("relays: 1 heartbeating, 1 silent"),
        "a relay silent for an hour is not heartbeating: {table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.contains("crashed-relay") && l.ends_with("(silent)")),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.contains("slow-relay") && !l.ends_with("(silent)")),
        "judged by its own lease TTL: {table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.contains("lagging") && l.contains(" 5 ")),
        "{table}"
    );
}

#[test]
fn status_shows_relays_and_their_shards_then_an_empty_outbox() {
    let db = TestDb::new(Backend::Postgres, "ops_relays");
    let topic = create_topic("ops-relays", 3);
    let mut c = PgConnection::establish(&db.url).unwrap();
    common::insert_rows(&mut c, &topic, 0, 200, 20);
    let dir = setup("");
    let relay = relay_command(dir.path(), &db)
        .env("DEVOUR_RELAY_RELAY_ID", "ops-relay-1")
        .spawn()
        .unwrap();
    let s = status_once_drained(dir.path(), &db, relay);
    let name = s["relays"][0]["relay_id"].as_str().unwrap_or_default();
    assert!(
        name.starts_with("ops-relay-1-"),
        "the configured name, and the run's: {s:#}"
    );
    assert_eq!(s["relays"][0]["shards"], 256);
    assert!(s["relays"][0]["heartbeat_age_s"].as_f64().unwrap() < 10.0);
    assert_eq!(c.count("devour_outbox"), 0);
}

#[test]
fn dead_letters_list_show_retry_and_discard_by_id_key_and_all() {
    let db = TestDb::new(Backend::Postgres, "ops_dead");
    let mut c = PgConnection::establish(&db.url).unwrap();
    let topic = create_topic("ops-dead", 1);
    dead_letters(
        &mut c,
        &topic,
        &[(11, "k1"), (12, "k2"), (13, "k1"), (14, "k3")],
    );
    let dir = setup("");
    let d = dir.path();
    let (code, out, err) = devour(d, &db, &["outbox", "list", "--json"], None);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 4, "{out}");
    let (_, out, _) = devour(d, &db, &["outbox", "list", "--key", "k1", "--json"], None);
    let ids: Vec<i64> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["id"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(ids, vec![11, 13]);
    let (code, out, _) = devour(d, &db, &["outbox", "list"], None);
    assert_eq!(code, 0);
    assert!(
        out.contains("Broker: Message size too large") && out.contains("(4 dead letter(s) shown)"),
        "{out}"
    );

    let (code, out, err) = devour(d, &db, &["outbox", "show", "12"], None);
    assert_eq!(code, 0, "{err}");
    for want in [
        "key:         k2",
        "attempts:    3",
        "message-id:  mid-12",
        "{\"n\": 12}",
        "\"trace\": \"t12\"",
    ] {
        assert!(out.contains(want), "`{want}` not in:\n{out}");
    }
    let (code, _, err) = devour(d, &db, &["outbox", "show", "99"], None);
    assert_eq!(
        (code, err.contains("no dead letter with id 99")),
        (1, true),
        "{err}"
    );

    // Retry by key: both rows of k1 are back in the outbox under their ids.
    let (code, out, err) = devour(d, &db, &["outbox", "retry", "--key", "k1"], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("2 dead letter(s) back in the outbox"), "{out}");
    #[derive(QueryableByName)]
    struct Id {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        id: i64,
    }
    let back: Vec<i64> = diesel::sql_query("SELECT id FROM devour_outbox ORDER BY id")
        .load::<Id>(&mut c)
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(back, vec![11, 13]);
    // Retry by id, discard all.
    assert_eq!(devour(d, &db, &["outbox", "retry", "12"], None).0, 0);
    let (code, out, _) = devour(d, &db, &["outbox", "discard", "--all"], None);
    assert_eq!((code, out.trim()), (0, "1 dead letter(s) discarded"));
    assert_eq!(c.count("devour_dead_letters"), 0);
    let (code, _, err) = devour(d, &db, &["outbox", "discard", "--all"], None);
    assert_eq!(
        (code, err.contains("there are no dead letters")),
        (1, true),
        "{err}"
    );
    let (code, _, err) = devour(d, &db, &["outbox", "retry"], None);
    assert_eq!(code, 2, "retry needs an id, --key or --all: {err}");

    // What was retried is delivered by the relay, in id order; what was discarded is not.
    relay_drain(d, &db);
    let got = read_all(&topic, Duration::from_secs(30));
    let ids: Vec<String> = got
        .iter()
        .map(|m| {
            m.headers
                .iter()
                .find(|(k, _)| k == "message-id")
                .unwrap()
                .1
                .clone()
        })
        .collect();
    assert_eq!(
        ids,
        vec!["mid-11", "mid-12", "mid-13"],
        "retried: 11 and 13 (k1), 12; discarded: 14"
    );
}

#[test]
fn put_enqueues_a_message_that_the_relay_delivers() {
    let db = TestDb::new(Backend::Postgres, "ops_put");
    let topic = create_topic("ops-put", 1);
    let dir = setup("");
    let d = dir.path();
    let (code, out, err) = devour(
        d,
        &db,
        &[
            "outbox",
            "put",
            "--topic",
            &topic,
            "--key",
            "42",
            "--event",
            "create",
            "--header",
            "trace=abc",
        ],
        Some("{\"id\": 42}"),
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("outbox row "), "{out}");
    let (code, _, err) = devour(
        d,
        &db,
        &["outbox", "put", "--topic", "bad topic", "--tombstone"],
        None,
    );
    assert_eq!(code, 2, "an invalid topic is bad input: {err}");
    assert!(err.contains("invalid topic name"), "{err}");
    let (code, _, err) = devour(
        d,
        &db,
        &["outbox", "put", "--topic", &topic, "--header", "novalue"],
        Some("x"),
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("expected NAME=VALUE"), "{err}");
    for (args, stdin, says) in [
        // A second message-id would be the one consumers read.
        (
            vec!["--header", "message-id=mine"],
            Some("{}"),
            "devour's own",
        ),
        (vec!["--header", "event=x"], Some("{}"), "devour's own"),
        (vec!["--header", "=abc"], Some("{}"), "the name is empty"),
        (vec!["--header", " sp=1"], Some("{}"), "spaces around it"),
        (
            vec!["--content-type", "garbage"],
            Some("{}"),
            "expected a media type",
        ),
        (
            vec!["--header", "a=b", "--header", "a=c"],
            Some("{}"),
            "given twice",
        ),
        (
            vec!["--content-type", ""],
            Some("{}"),
            "expected a media type",
        ),
        (
            vec!["--content-type", "text/plain\nx: y"],
            Some("{}"),
            "expected a media type",
        ),
        (vec![], Some(""), "stdin is empty"),
        (vec!["--tombstone"], None, "--tombstone needs --key"),
    ] {
        let mut all = vec!["outbox", "put", "--topic", topic.as_str()];
        all.extend(args);
        let (code, _, err) = devour(d, &db, &all, stdin);
        assert_eq!(code, 2, "{all:?}: {err}");
        assert!(err.contains(says), "{all:?}: {err}");
    }
    // Larger than the limit: refused after reading one byte past it, not the whole stream.
    let big = "x".repeat(5000);
    let mut child = command(env!("CARGO_BIN_EXE_devour"), d, &db)
        .env("DEVOUR_OUTBOX_MAX_MESSAGE_BYTES", "1024")
        .args(["outbox", "put", "--topic", &topic])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        // The put may stop reading (and close the pipe) before all of it is written.
        let _ = child.stdin.take().unwrap().write_all(big.as_bytes());
    }
    let out = child.wait_with_output().unwrap();
    let (code, err) = (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("over the maximum of 1024"), "{err}");
    // A bad topic is refused before stdin is read: a terminal (here a pipe never closed) does
    // not keep it waiting.
    let mut child = command(env!("CARGO_BIN_EXE_devour"), d, &db)
        .args(["outbox", "put", "--topic", "bad topic"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let held_open = child.stdin.take();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("`outbox put --topic 'bad topic'` waited for stdin");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(held_open);
    assert_eq!(status.code(), Some(2));

    relay_drain(d, &db);
    let got = read_all(&topic, Duration::from_secs(30));
    assert_eq!(got.len(), 1, "only the valid put is delivered: {got:?}");
    assert_eq!(got[0].key.as_deref(), Some("42"));
    assert_eq!(got[0].payload.as_deref(), Some(&b"{\"id\": 42}"[..]));
    let h: std::collections::BTreeMap<_, _> = got[0].headers.iter().cloned().collect();
    assert_eq!(h.get("event").map(String::as_str), Some("create"));
    assert_eq!(h.get("trace").map(String::as_str), Some("abc"));
    assert!(h.contains_key("message-id"));
}

#[test]
fn status_and_dead_letters_on_sqlite() {
    let db = TestDb::new(Backend::Sqlite, "ops_sqlite");
    let topic = create_topic("ops-sqlite", 1);
    let mut c = SqliteConnection::establish(db.diesel_url()).unwrap();
    common::insert_rows(&mut c, &topic, 0, 12, 3);
    c.batch_execute(&format!(
        "INSERT INTO devour_dead_letters (id, topic, partition_key, payload, headers, event, message_id, \
         content_type, shard, created_at, attempts, error) VALUES (77, '{topic}', 'k9', CAST('{{\"n\": 77}}' AS BLOB), \
         '{{}}', 'create', 'mid-77', 'application/json', 0, strftime('%Y-%m-%d %H:%M:%f', 'now'), 1, 'refused')"
    ))
    .unwrap();
    let dir = setup("");
    let d = dir.path();
    let s = json(d, &db, &["status", "--json"]);
    assert_eq!(
        (
            s["outbox"]["rows"].as_i64(),
            s["dead_letters"]["rows"].as_i64()
        ),
        (Some(12), Some(1)),
        "{s:#}"
    );
    let age = s["outbox"]["oldest_age_s"].as_f64().unwrap();
    assert!((0.0..60.0).contains(&age), "oldest row age {age} s");
    let (code, out, err) = devour(d, &db, &["outbox", "show", "77"], None);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("{\"n\": 77}") && out.contains("payload (9 bytes)"),
        "{out}"
    );
    // A relay drains and holds every shard, and says so.
    let relay = relay_command(d, &db)
        .env("DEVOUR_RELAY_POLL_INTERVAL_MS", "50")
        .spawn()
        .unwrap();
    let s = status_once_drained(d, &db, relay);
    let hb = s["relays"][0]["heartbeat_age_s"].as_f64().unwrap();
    assert!((0.0..10.0).contains(&hb), "heartbeat age {hb} s");
    assert_eq!(devour(d, &db, &["outbox", "retry", "77"], None).0, 0);
    assert_eq!(c.count("devour_dead_letters"), 0);
    assert_eq!(
        c.count("devour_outbox"),
        1,
        "the dead letter is back in the outbox"
    );
}

/// When the database cannot be read, `devour status` still reports what it can (the routes'
/// lag), says why the rest is missing, and exits 1.
#[test]
fn status_without_its_database_still_reports_consumer_lag() {
    let db = TestDb::new(Backend::Sqlite, "status_no_db");
    let topic = create_topic("ops-nodb", 1);
    produce_seqs(&topic, 3, 1);
    let ghost = format!("ops-nodb-ghost-{}", common::unique("g"));
    let dir = setup(&format!(
        "[consumers.lagging]\ntopic = \"{topic}\"\ngroup = \"{}\"\nhandler = \"print\"\n\
         [consumers.two]\ntopics = [\"{topic}\", \"{ghost}\"]\ngroup = \"{}\"\nhandler = \"print\"\n",
        common::unique("nodb"),
        common::unique("nodb")
    ));
    let missing = format!("sqlite://{}", dir.path().join("missing.db").display());
    let out = command(env!("CARGO_BIN_EXE_devour"), dir.path(), &db)
        .env("DEVOUR_DATABASE_URL", &missing)
        .args(["status", "--json"])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let s: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert!(
        s["database_error"]
            .as_str()
            .is_some_and(|e| e.contains("the file does not exist")),
        "{s:#}"
    );
    assert_eq!(s["consumers"][0]["route"], "lagging", "{s:#}");
    assert_eq!(s["consumers"][0]["lag"], 3, "{s:#}");
    // A route's topic that does not exist is named, not taken for a topic with nothing to read.
    assert_eq!(s["consumers"][1]["route"], "two", "{s:#}");
    assert_eq!(
        s["consumers"][1]["missing_topics"],
        serde_json::json!([ghost]),
        "{s:#}"
    );
    assert!(s["consumers"][0].get("missing_topics").is_none(), "{s:#}");
    assert!(stderr.contains("database: "), "{stderr}");
}
