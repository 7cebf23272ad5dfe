//! devour.toml validation: every bad configuration fails at load with an error naming the file,
//! the key and the reason; `devour config check` exits 0 or 2.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use devour::config::{Config, ConfigError};

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
    p
}

/// Loads `text` from a file with extra environment; returns the error, failing if it loaded.
fn load_err(text: &[u8], env: &[(&str, &str)]) -> (PathBuf, ConfigError, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "devour.toml", text);
    let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
    match Config::load_file(&path, env) {
        Ok(c) => panic!(
            "expected an error for {:?}, loaded {c:?}",
            String::from_utf8_lossy(text)
        ),
        Err(e) => (path, e, dir),
    }
}

/// Asserts the error names the file (or variable), the key, and contains each of `reason`.
fn assert_names(text: &str, env: &[(&str, &str)], key: Option<&str>, reason: &[&str]) {
    let (path, err, _dir) = load_err(text.as_bytes(), env);
    let msg = err.to_string();
    if env.is_empty() {
        assert!(
            msg.contains(&path.display().to_string()),
            "file not named in: {msg}"
        );
    }
    assert_eq!(err.key(), key, "key of: {msg}");
    if let Some(k) = key {
        assert!(msg.contains(&format!("`{k}`")), "key `{k}` not in: {msg}");
    }
    for r in reason {
        assert!(msg.contains(r), "`{r}` not in: {msg}");
    }
}

const OK: &str = "[kafka]\nhosts = \"127.0.0.1:9092\"\n";

#[test]
fn unknown_key_suggests_the_nearest() {
    assert_names(
        "[kafka]\nhots = \"a:1\"\n",
        &[],
        Some("kafka.hots"),
        &["unknown key", "did you mean `hosts`?"],
    );
}

#[test]
fn unknown_section_suggests_the_nearest() {
    assert_names(
        "[kafak]\nhosts = \"a:1\"\n",
        &[],
        Some("kafak"),
        &["unknown section", "did you mean `kafka`?"],
    );
}

#[test]
fn unknown_nested_key_in_ssl_config() {
    let dir = tempfile::tempdir().unwrap();
    let ca = write(dir.path(), "ca.pem", b"x");
    assert_names(
        &format!(
            "{OK}[kafka.ssl_config]\ncafile = \"{}\"\ncertfil = \"x\"\n",
            ca.display()
        ),
        &[],
        Some("kafka.ssl_config.certfil"),
        &["did you mean `certfile`?"],
    );
}

#[test]
fn wrong_type_names_expected_and_found() {
    assert_names(
        &format!("{OK}[database]\npool_size = \"ten\"\n"),
        &[],
        Some("database.pool_size"),
        &["wrong type", "expected an integer", "found string"],
    );
}

#[test]
fn hosts_of_wrong_type() {
    assert_names(
        "[kafka]\nhosts = 42\n",
        &[],
        Some("kafka.hosts"),
        &["expected a string or an array of strings"],
    );
}

#[test]
fn missing_hosts() {
    assert_names(
        "[database]\nurl = \"sqlite://x.db\"\n",
        &[],
        Some("kafka.hosts"),
        &["missing", "DEVOUR_KAFKA_HOSTS"],
    );
}

#[test]
fn host_without_port() {
    assert_names(
        "[kafka]\nhosts = \"broker1\"\n",
        &[],
        Some("kafka.hosts"),
        &["`broker1` has no port", "HOST:PORT"],
    );
}

#[test]
fn host_with_bad_port() {
    assert_names(
        "[kafka]\nhosts = [\"a:9092\", \"b:http\"]\n",
        &[],
        Some("kafka.hosts"),
        &["`http` is not a port"],
    );
    assert_names(
        "[kafka]\nhosts = \"a:70000\"\n",
        &[],
        Some("kafka.hosts"),
        &["`70000` is not a port"],
    );
}

#[test]
fn ssl_file_that_does_not_exist() {
    assert_names(
        &format!("{OK}[kafka.ssl_config]\ncafile = \"/nonexistent/ca.pem\"\n"),
        &[],
        Some("kafka.ssl_config.cafile"),
        &["`/nonexistent/ca.pem` does not exist"],
    );
}

#[test]
fn ssl_config_without_cafile() {
    assert_names(
        &format!("{OK}[kafka.ssl_config]\npassword = \"pw\"\n"),
        &[],
        Some("kafka.ssl_config.cafile"),
        &["missing", "needs `cafile`"],
    );
}

#[test]
fn ssl_certfile_without_keyfile() {
    let dir = tempfile::tempdir().unwrap();
    let ca = write(dir.path(), "ca.pem", b"x");
    assert_names(
        &format!(
            "{OK}[kafka.ssl_config]\ncafile = \"{0}\"\ncertfile = \"{0}\"\n",
            ca.display()
        ),
        &[],
        Some("kafka.ssl_config.keyfile"),
        &["both `certfile` and `keyfile`"],
    );
}

#[test]
fn unknown_url_scheme() {
    assert_names(
        &format!("{OK}[database]\nurl = \"mysql://u@h/db\"\n"),
        &[],
        Some("database.url"),
        &["unknown URL scheme `mysql://`", "sqlite://PATH"],
    );
}

#[test]
fn zero_timeout() {
    assert_names(
        "[kafka]\nhosts = \"a:1\"\nsocket_timeout_ms = 0\n",
        &[],
        Some("kafka.socket_timeout_ms"),
        &["greater than zero", "found 0"],
    );
}

#[test]
fn negative_timeout() {
    assert_names(
        "[kafka]\nhosts = \"a:1\"\noffsets_channel_socket_timeout_ms = -5\n",
        &[],
        Some("kafka.offsets_channel_socket_timeout_ms"),
        &["greater than zero", "found -5"],
    );
}

#[test]
fn zero_pool_size_and_message_size() {
    assert_names(
        &format!("{OK}[database]\npool_size = 0\n"),
        &[],
        Some("database.pool_size"),
        &["greater than zero"],
    );
    assert_names(
        &format!("{OK}[outbox]\nmax_message_bytes = 0\n"),
        &[],
        Some("outbox.max_message_bytes"),
        &["greater than zero"],
    );
}

#[test]
fn limits_that_would_break_at_run_time_are_refused_at_start() {
    let cases: &[(&str, &str, &str)] = &[
        // r2d2 sets memory aside for every connection of the pool up front.
        (
            "[database]\npool_size = 4000000000\n",
            "database.pool_size",
            "at most 10000",
        ),
        // SQLite reads a larger busy timeout as 0.
        (
            "[database]\nbusy_timeout_ms = 3000000000\n",
            "database.busy_timeout_ms",
            "at most 2147483647",
        ),
        // A cutoff before PostgreSQL's earliest timestamp would fail every cleanup.
        (
            "[relay]\nretention = \"keep\"\nretention_hours = 100000000\n",
            "relay.retention_hours",
            "at most 876000",
        ),
    ];
    for (text, key, reason) in cases {
        assert_names(&format!("{OK}{text}"), &[], Some(key), &[reason]);
    }
    let long = "t".repeat(247);
    assert_names(
        &format!("{OK}[consumers.a]\ntopic = \"{long}\"\n"),
        &[],
        Some("consumers.a.dead_letter_topic"),
        &["the default, `<topic>.dlq`"],
    );
}

#[test]
fn non_utf8_file() {
    let (path, err, _d) = load_err(b"[kafka]\nhosts = \"\xff\xfe\"\n", &[]);
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string())
            && msg.contains("not UTF-8")
            && msg.contains("line 2"),
        "{msg}"
    );
}

#[test]
fn non_toml_file() {
    let (_, err, _d) = load_err(b"{\"kafka\": {\"hosts\": \"a:1\"}}", &[]);
    assert!(err.to_string().contains("not valid TOML"), "{err}");
}

#[test]
fn empty_file() {
    let (_, err, _d) = load_err(b"  \n\n", &[]);
    assert!(err.to_string().contains("the file is empty"), "{err}");
}

#[test]
fn section_that_is_not_a_table() {
    assert_names(
        "kafka = \"a:1\"\n",
        &[],
        Some("kafka"),
        &["expected a table `[kafka]`"],
    );
}

#[test]
fn property_of_wrong_type() {
    assert_names(
        &format!("{OK}[kafka.properties]\n\"linger.ms\" = [1, 2]\n"),
        &[],
        Some("kafka.properties.linger.ms"),
        &["librdkafka properties are strings, numbers or booleans"],
    );
}

#[test]
fn malformed_broker_version_and_source_address() {
    assert_names(
        "[kafka]\nhosts = \"a:1\"\nbroker_version = \"four\"\n",
        &[],
        Some("kafka.broker_version"),
        &["not a version"],
    );
    assert_names(
        "[kafka]\nhosts = \"a:1\"\nsource_address = \"here\"\n",
        &[],
        Some("kafka.source_address"),
        &["not an IP address"],
    );
}

#[test]
fn env_override_of_wrong_type_names_the_variable() {
    let (_, err, _d) = load_err(OK.as_bytes(), &[("DEVOUR_DATABASE_POOL_SIZE", "lots")]);
    let msg = err.to_string();
    assert_eq!(err.key(), Some("database.pool_size"));
    assert!(
        msg.contains("environment variable DEVOUR_DATABASE_POOL_SIZE"),
        "{msg}"
    );
}

#[test]
fn env_override_of_bad_url_names_the_variable() {
    let (_, err, _d) = load_err(OK.as_bytes(), &[("DEVOUR_DATABASE_URL", "redis://x")]);
    assert!(
        err.to_string().contains("DEVOUR_DATABASE_URL") && err.to_string().contains("redis://"),
        "{err}"
    );
}

#[test]
fn config_path_that_does_not_exist() {
    let err = Config::load_with_env([(
        "DEVOUR_CONFIG".to_string(),
        "/nonexistent/devour.toml".to_string(),
    )])
    .unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/devour.toml")
            && err.to_string().contains("does not exist"),
        "{err}"
    );
}

#[test]
fn deprecated_keys_load_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "d.toml",
        b"[kafka]\nhosts = \"a:1\"\nzookeeper_hosts = \"z:2181\"\nuse_greenlets = true\n",
    );
    let c = Config::load_file(&path, []).unwrap();
    assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings);
    assert!(c.warnings[0].contains("zookeeper_hosts") && c.warnings[0].contains("deprecated"));
}

#[test]
fn mapping_onto_librdkafka_properties() {
    let dir = tempfile::tempdir().unwrap();
    let ca = write(dir.path(), "ca.pem", b"x");
    let text = format!(
        "[kafka]\nhosts = [\"a:1\", \"b:2\"]\nclient_id = \"app\"\nsocket_timeout_ms = 1234\nsource_address = \"::1\"\n\
         broker_version = \"3.9.0\"\n[kafka.ssl_config]\ncafile = \"{0}\"\ncertfile = \"{0}\"\nkeyfile = \"{0}\"\npassword = \"pw\"\n\
         [kafka.properties]\n\"linger.ms\" = 7\n\"client.id\" = \"from-properties\"\n",
        ca.display()
    );
    let path = write(dir.path(), "m.toml", text.as_bytes());
    let c = Config::load_file(&path, []).unwrap();
    let p = c.kafka.client_properties();
    assert_eq!(p["bootstrap.servers"], "a:1,b:2");
    assert_eq!(p["client.id"], "from-properties", "[kafka.properties] win");
    assert_eq!(p["security.protocol"], "ssl");
    assert_eq!(p["ssl.ca.location"], ca.display().to_string());
    assert_eq!(p["ssl.key.password"], "pw");
    assert_eq!(p["socket.timeout.ms"], "1234");
    assert_eq!(p["broker.address.family"], "v6");
    assert_eq!(p["broker.version.fallback"], "3.9.0");
    assert_eq!(p["linger.ms"], "7");
    assert_eq!(c.kafka.consumer_properties()["topic.blacklist"], "^__.*");
}

#[test]
fn repository_devour_toml_is_valid_and_documents_every_key() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = root.join("devour.toml");
    Config::load_file(&path, [])
        .unwrap_or_else(|e| panic!("the example devour.toml must load: {e}"));
    let text = std::fs::read_to_string(&path).unwrap();
    let shown = documented_keys(&text);
    // Every key the code reads, in its own section (a route's under `consumers.*`).
    let keys = devour::config::known_keys()
        .map(|(k, _)| k.to_string())
        .chain(devour::config::route_keys().map(|k| format!("consumers.*.{k}")))
        .chain(["consumers.*.retry".to_string()]);
    for key in keys {
        let (section, name) = key.rsplit_once('.').unwrap();
        assert!(
            shown.contains(&(section.to_string(), name.to_string())),
            "devour.toml does not document `{name}` under [{section}]"
        );
    }
}

/// The (section, key) pairs a devour.toml shows, set or commented out: `key = …` and
/// `# key = …` lines under `[section]` or `# [section]`, keys a comment names as `` `key = …` ``,
/// and each table as a key of its parent. A route's name reads as `*`.
fn documented_keys(text: &str) -> std::collections::BTreeSet<(String, String)> {
    let mut shown = std::collections::BTreeSet::new();
    let mut section = String::new();
    for line in text.lines() {
        let line = line.trim_start().trim_start_matches('#').trim();
        if let Some(table) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let mut parts: Vec<&str> = table.split('.').collect();
            if parts[0] == "consumers" && parts.len() > 1 {
                parts[1] = "*";
            }
            section = parts.join(".");
            if let Some((parent, name)) = section.rsplit_once('.') {
                shown.insert((parent.to_string(), name.to_string()));
            }
            continue;
        }
        let key = |s: &str| -> Option<String> {
            let (k, _) = s.split_once('=')?;
            let k = k.trim().trim_matches('"');
            (!k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
                .then(|| k.to_string())
        };
        if let Some(k) = key(line) {
            shown.insert((section.clone(), k));
        }
        for quoted in line.split('`').skip(1).step_by(2) {
            if let Some(k) = key(quoted) {
                shown.insert((section.clone(), k));
            }
        }
    }
    shown
}

// --- `devour config check` --------------------------------------------------------------

fn devour(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_devour"));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    (out.status.code().unwrap_or(-1), stdout, stderr)
}

#[test]
fn config_check_prints_effective_config_with_secrets_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let ca = write(dir.path(), "ca.pem", b"x");
    let text = format!(
        "[database]\nurl = \"postgres://app:dbsecret@127.0.0.1/app?sslpassword=sslkeysecret&sslmode=require&password=paramsecret\"\n\
         [kafka]\nhosts = \"a:1\"\n\
         [kafka.ssl_config]\ncafile = \"{}\"\npassword = \"keysecret\"\n[kafka.properties]\n\"sasl.password\" = \"saslsecret\"\n\
         \"sasl.oauthbearer.assertion.private.key.passphrase\" = \"phrasesecret\"\n",
        ca.display()
    );
    let path = write(dir.path(), "devour.toml", text.as_bytes());
    let (code, out, err) = devour(
        &["config", "check"],
        &[
            ("DEVOUR_CONFIG", path.to_str().unwrap()),
            ("DEVOUR_KAFKA_HOSTS", "127.0.0.1:19092"),
            ("DEVOUR_KAFKA_PROPERTY_SASL_USERNAME", "bob"),
        ],
    );
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(out.contains("127.0.0.1:19092"), "env override shown: {out}");
    assert!(out.contains("\"sasl.username\" = \"bob\""), "{out}");
    assert!(
        out.contains(
            "postgres://app:***@127.0.0.1/app?sslpassword=***&sslmode=require&password=***"
        ),
        "{out}"
    );
    for secret in [
        "dbsecret",
        "sslkeysecret",
        "paramsecret",
        "keysecret",
        "saslsecret",
        "phrasesecret",
    ] {
        assert!(
            !out.contains(secret) && !err.contains(secret),
            "{secret} leaked:\n{out}\n{err}"
        );
    }
}

#[test]
fn config_check_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "devour.toml", b"[kafka]\nhosts = \"nope\"\n");
    let (code, out, err) = devour(
        &["config", "check", "--config", path.to_str().unwrap()],
        &[],
    );
    assert_eq!(code, 2, "stdout: {out}\nstderr: {err}");
    assert!(
        err.contains("`kafka.hosts`") && err.contains(path.to_str().unwrap()),
        "{err}"
    );
}

#[test]
fn bad_usage_exits_2() {
    let (code, _, err) = devour(&["config", "frobnicate"], &[]);
    assert_eq!(code, 2, "{err}");
    for args in [
        &["outbox", "list", "--limit=-1"][..],
        &["outbox", "pending", "--limit", "0"],
    ] {
        let (code, _, err) = devour(args, &[]);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains("--limit"), "{args:?}: {err}");
    }
}

/// `properties = "k=v"` (a string where a table belongs) is refused, not read as empty.
#[test]
fn properties_that_are_not_a_table_name_the_key() {
    assert_names(
        "[kafka]\nhosts = \"127.0.0.1:9092\"\nproperties = \"security.protocol=ssl\"\n",
        &[],
        Some("kafka.properties"),
        &["wrong type", "expected a table", "found string"],
    );
    assert_names(
        &format!("{OK}[relay]\nproducer = [\"linger.ms=5\"]\n"),
        &[],
        Some("relay.producer"),
        &["wrong type", "expected a table", "found array"],
    );
}

#[test]
fn relay_keys_are_validated() {
    assert_names(
        &format!("{OK}[relay]\non_dead_letter = \"skip\"\n"),
        &[],
        Some("relay.on_dead_letter"),
        &["`skip` is not one of"],
    );
    assert_names(
        &format!("{OK}[relay]\nretention = \"forever\"\n"),
        &[],
        Some("relay.retention"),
        &["`forever` is not one of"],
    );
    assert_names(
        &format!("{OK}[relay]\nlease_ttl_ms = 10\n"),
        &[],
        Some("relay.lease_ttl_ms"),
        &["at least 1000"],
    );
    assert_names(
        &format!("{OK}[relay]\nlease_ttl_ms = 100000000000000\n"),
        &[],
        Some("relay.lease_ttl_ms"),
        &["at most 86400000"],
    );
    assert_names(
        &format!("{OK}[relay]\nbatch_size = 500\nmax_in_flight = 100\n"),
        &[],
        Some("relay.max_in_flight"),
        &["at least relay.batch_size (500)"],
    );
    assert_names(
        &format!("{OK}[relay]\nmax_in_flight = 2000000\n"),
        &[],
        Some("relay.max_in_flight"),
        &["at most the producer's queue.buffering.max.messages (1000000)"],
    );
    assert_names(
        &format!("{OK}[relay]\nbatch_sise = 5\n"),
        &[],
        Some("relay.batch_sise"),
        &["did you mean `batch_size`?"],
    );
    assert_names(
        &format!("{OK}[relay.producer]\n\"linger.ms\" = {{ a = 1 }}\n"),
        &[],
        Some("relay.producer.linger.ms"),
        &["wrong type"],
    );
}

#[test]
fn relay_keys_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "r.toml", OK.as_bytes());
    let env = [
        ("DEVOUR_RELAY_ON_DEAD_LETTER", "block_key"),
        ("DEVOUR_RELAY_BATCH_SIZE", "50"),
    ];
    let c = Config::load_file(
        &path,
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
    .unwrap();
    assert_eq!(
        c.relay.on_dead_letter,
        devour::config::DeadLetterPolicy::BlockKey
    );
    assert_eq!(c.relay.batch_size, 50);
}

// --- [consumers.NAME] ---------------------------------------------------------------------

#[test]
fn a_route_gets_documented_defaults() {
    let c = Config::from_toml_str(
        &format!("{OK}[consumers.audit]\ntopic = \"orders\"\n"),
        devour::config::Origin::Defaults,
        &Default::default(),
    )
    .unwrap();
    let r = &c.consumers["audit"];
    assert_eq!(r.topics, vec!["orders"]);
    assert_eq!((r.group.as_str(), r.handler.as_str()), ("audit", "audit"));
    assert_eq!(r.consumer_type, devour::config::ConsumerType::Balanced);
    assert_eq!(r.dump, devour::config::Dump::Json);
    assert_eq!(r.start_from, devour::config::StartFrom::Earliest);
    assert_eq!((r.concurrency, r.inbox, r.inbox_batch), (1, false, 5000));
    assert_eq!(r.retry, devour::config::RetryPolicy::default());
    assert_eq!(r.dead_letter_topic_for("orders"), "orders.dlq");
    assert_eq!(
        (1..=5).map(|a| r.retry.backoff_ms(a)).collect::<Vec<_>>(),
        vec![200, 400, 800, 1600, 3200]
    );
}

#[test]
fn bad_routes_name_the_key() {
    let cases: &[(&str, &str, &[&str])] = &[
        ("[consumers.a]\ntopics = []\n", "consumers.a.topics", &["is empty"]),
        ("[consumers.a]\ntopic = \"t\"\ntopics = [\"u\"]\n", "consumers.a.topics", &["not both"]),
        ("[consumers.a]\ntopics = [\"t\", \"t\"]\n", "consumers.a.topics", &["listed twice"]),
        ("[consumers.a]\ntopic = \"t\"\nconsumer_type = \"shared\"\n", "consumers.a.consumer_type", &["not one of \"balanced\", \"simple\""]),
        ("[consumers.a]\ntopic = \"t\"\nstart_from = \"begin\"\n", "consumers.a.start_from", &["not one of"]),
        ("[consumers.a]\ntopic = \"t\"\nconcurrency = 65\n", "consumers.a.concurrency", &["at most 64"]),
        ("[consumers.a]\ntopic = \"t\"\nretry = { max_attempts = 0 }\n", "consumers.a.retry.max_attempts", &["greater than zero"]),
        ("[consumers.a]\ntopic = \"t\"\nretry = { initial_backoff_ms = 500, max_backoff_ms = 100 }\n", "consumers.a.retry.max_backoff_ms", &["less than retry.initial_backoff_ms"]),
        ("[consumers.a]\ntopic = \"t\"\nretry = { max_attempt = 3 }\n", "consumers.a.retry.max_attempt", &["did you mean `max_attempts`?"]),
        ("[consumers.a]\ntopic = \"t\"\ninbox = \"yes\"\n", "consumers.a.inbox", &["expected a boolean"]),
        ("[consumers.a]\ntopic = \"t\"\ninbox_batch = 20000\n", "consumers.a.inbox_batch", &["at most 10000"]),
        ("[consumers.a]\ntopic = \"t\"\ncommand = [\"x\"]\n", "consumers.a.command", &["only used by `handler = \"exec\"`"]),
        ("[consumers.a]\ntopic = \"t\"\nhandler = \"print\"\nexec_timeout_ms = 100\n", "consumers.a.exec_timeout_ms", &["only used by `handler = \"exec\"`"]),
        ("[consumers.a]\ntopic = \"t\"\nhandler = \"exec\"\ncommand = [\"\"]\n", "consumers.a.command", &["missing"]),
        ("[consumers.a]\ntopic = \"t\"\nproperties = \"fetch.min.bytes=1\"\n", "consumers.a.properties", &["expected a table"]),
        ("[consumers.a]\ntopic = \"t\"\n[consumers.a.properties]\n\"auto.offset.reset\" = \"latest\"\n", "consumers.a.properties.auto.offset.reset", &["`start_from`"]),
        ("[consumers.a]\ntopic = \"t\"\n[consumers.a.properties]\n\"enable.auto.offset.store\" = true\n", "consumers.a.properties.enable.auto.offset.store", &["only after the handler succeeded"]),
        ("[consumers]\na = 1\n", "consumers.a", &["a route is a table"]),
        ("[consumers.a]\ntopic = \"t\"\ninbox = true\nconcurrency = 10\n", "consumers.a.concurrency", &["need 11 database connections", "database.pool_size is 10"]),
        ("[consumers.a]\ntopic = \"t\"\n[consumers.a.properties]\n\"enable.auto.commit\" = false\n", "consumers.a.properties.enable.auto.commit", &["cannot be set here"]),
        ("[consumers.\"a b\"]\ntopic = \"t\"\n", "consumers.a b", &["ASCII letters"]),
        // The default dead-letter topic (`<topic>.dlq`) is checked like one that is set.
        ("[consumers.a]\ntopics = [\"o\", \"o.dlq\"]\n", "consumers.a.dead_letter_topic", &["`o.dlq` is also a topic this route reads", "the default"]),
        ("[consumers.a]\ntopic = \"t\"\ninbox_retention_hours = 100000000\n", "consumers.a.inbox_retention_hours", &["at most 876000"]),
        // Waits so long that their sum overflows are refused, not wrapped around to a pass.
        ("[consumers.a]\ntopic = \"t\"\nretry = { initial_backoff_ms = 5000000000000000000, max_backoff_ms = 5000000000000000000 }\n", "consumers.a.retry.max_backoff_ms", &["too close to max.poll.interval.ms"]),
        ("[consumers.a]\ntopic = \"t\"\nhandler = \"exec\"\ncommand = [\"x\"]\nexec_timeout_ms = 5000000000000000000\n", "consumers.a.exec_timeout_ms", &["too close to"]),
    ];
    for (route, key, reason) in cases {
        assert_names(&format!("{OK}{route}"), &[], Some(key), reason);
    }
}

#[test]
fn config_check_shows_routes_with_secrets_masked() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "devour.toml",
        format!("{OK}[consumers.a]\ntopic = \"t\"\nhandler = \"print\"\n[consumers.a.properties]\n\"sasl.password\" = \"hunter2\"\n").as_bytes(),
    );
    let c = Config::load_file(&path, []).unwrap();
    let text = c.to_redacted_toml();
    assert!(text.contains("[consumers.a]"), "{text}");
    assert!(text.contains("dead_letter_topic = \"t.dlq\""), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    // What it prints loads again, to the same routes.
    let again = Config::from_toml_str(&text, devour::config::Origin::Defaults, &Default::default())
        .unwrap();
    assert_eq!(again.consumers["a"].topics, c.consumers["a"].topics);
}

#[test]
fn bad_metrics_and_log_settings_name_the_key() {
    assert_names(
        &format!("{OK}[metrics]\nlisten = \"localhost\"\n"),
        &[],
        Some("metrics.listen"),
        &["not an address"],
    );
    assert_names(
        &format!("{OK}[log]\nformat = \"xml\"\n"),
        &[],
        Some("log.format"),
        &["not one of \"text\", \"json\""],
    );
    assert_names(
        &format!("{OK}[log]\nlevel = \"devour=loud\"\n"),
        &[],
        Some("log.level"),
        &["not a log filter"],
    );
    // A misspelt level would read as a target and silence everything, errors included.
    for level in ["verbose", "warning", "info,devour"] {
        assert_names(
            &format!("{OK}[log]\nlevel = \"{level}\"\n"),
            &[],
            Some("log.level"),
            &["has no level", "trace, debug, info, warn, error, off"],
        );
    }
    assert_names(
        &format!("{OK}[log]\nlevel = \"\"\n"),
        &[],
        Some("log.level"),
        &["it is empty"],
    );
    // What the filter takes is taken: a trailing comma, levels as numbers.
    for level in ["info,", "devour=4,rdkafka=1", "WARN"] {
        Config::from_toml_str(
            &format!("{OK}[log]\nlevel = \"{level}\"\n"),
            devour::config::Origin::Defaults,
            &Default::default(),
        )
        .unwrap_or_else(|e| panic!("{level}: {e}"));
    }
    assert_names(
        OK,
        &[("DEVOUR_LOG_LEVEL", "warning")],
        Some("log.level"),
        &["DEVOUR_LOG_LEVEL", "`warning` has no level"],
    );
    assert_names(
        OK,
        &[("DEVOUR_METRICS_LISTEN", "nope")],
        Some("metrics.listen"),
        &["DEVOUR_METRICS_LISTEN"],
    );
    let c = Config::from_toml_str(
        &format!("{OK}[metrics]\nlisten = \"127.0.0.1:9464\"\n[log]\nlevel = \"devour=debug,rdkafka=warn\"\nformat = \"json\"\n"),
        devour::config::Origin::Defaults,
        &Default::default(),
    )
    .unwrap();
    assert_eq!(c.metrics.listen, Some("127.0.0.1:9464".parse().unwrap()));
    assert_eq!(c.log.format, devour::config::LogFormat::Json);
    assert_eq!(c.log.level.as_deref(), Some("devour=debug,rdkafka=warn"));
}

#[test]
fn the_reference_documents_every_key_with_its_environment_variable() {
    let reference =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/reference.md"))
            .unwrap();
    for (key, overridable) in devour::config::known_keys() {
        assert!(
            reference.contains(&format!("`{key}`")),
            "docs/reference.md does not document `{key}`"
        );
        if overridable {
            let var = devour::config::env_var_for(key);
            assert!(
                reference.contains(&format!("`{var}`")),
                "docs/reference.md does not name {var}"
            );
        }
    }
    for key in devour::config::route_keys() {
        assert!(
            reference.contains(&format!("`{key}`")),
            "docs/reference.md does not document route key `{key}`"
        );
    }
    for metric in [
        devour::telemetry::names::RELAY_DELIVERED,
        devour::telemetry::names::RELAY_DEAD_LETTERED,
        devour::telemetry::names::RELAY_LATENCY,
        devour::telemetry::names::RELAY_BATCH_ROWS,
        devour::telemetry::names::RELAY_LEASES_HELD,
        devour::telemetry::names::RELAY_BACKLOG_ROWS,
        devour::telemetry::names::RELAY_OLDEST_AGE,
        devour::telemetry::names::CONSUME_PROCESSED,
        devour::telemetry::names::CONSUME_RETRIED,
        devour::telemetry::names::CONSUME_DEAD_LETTERED,
        devour::telemetry::names::CONSUME_DUPLICATES,
        devour::telemetry::names::CONSUME_LAG,
    ] {
        assert!(
            reference.contains(&format!("`{metric}`")),
            "docs/reference.md does not list {metric}"
        );
    }
}

#[test]
fn an_exec_route_must_fit_its_attempts_in_the_poll_interval() {
    assert_names(
        &format!("{OK}[consumers.a]\ntopic = \"t\"\nhandler = \"exec\"\ncommand = [\"x\"]\nexec_timeout_ms = 60000\n"),
        &[],
        Some("consumers.a.exec_timeout_ms"),
        &["5 attempts of up to 60000 ms", "max.poll.interval.ms (300000 ms)"],
    );
    // Raising the interval for the route makes room.
    let c = Config::from_toml_str(
        &format!("{OK}[consumers.a]\ntopic = \"t\"\nhandler = \"exec\"\ncommand = [\"x\"]\nexec_timeout_ms = 60000\n[consumers.a.properties]\n\"max.poll.interval.ms\" = 600000\n"),
        devour::config::Origin::Defaults,
        &Default::default(),
    )
    .unwrap();
    assert_eq!(c.consumers["a"].exec_timeout_ms, 60000);
}

/// A variable that is not UTF-8 in the environment (anyone's) does not crash devour.
#[test]
fn config_check_survives_a_non_utf8_environment_variable() {
    use std::os::unix::ffi::OsStrExt;
    let out = Command::new(env!("CARGO_BIN_EXE_devour"))
        .args(["config", "check"])
        .env_clear()
        .env("DEVOUR_KAFKA_HOSTS", "127.0.0.1:19092")
        .env(
            std::ffi::OsStr::from_bytes(b"LEGACY_LATIN1"),
            std::ffi::OsStr::from_bytes(b"caf\xe9"),
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `[relay.producer]` cannot undo what per-key order relies on; other tuning is taken.
#[test]
fn relay_producer_settings_that_would_break_key_order_are_refused() {
    for (name, value) in [
        ("message.timeout.ms", "5000"),
        ("delivery.timeout.ms", "5000"),
        ("enable.gapless.guarantee", "false"),
        ("enable.idempotence", "false"),
    ] {
        assert_names(
            &format!("{OK}[relay.producer]\n\"{name}\" = \"{value}\"\n"),
            &[],
            Some(&format!("relay.producer.{name}")),
            &["per-key order relies on"],
        );
    }
    assert_names(
        &format!("{OK}[relay.producer]\n\"partitioner\" = \"random\"\n"),
        &[],
        Some("relay.producer.partitioner"),
        &["spreads one key's messages"],
    );
    let c = Config::from_toml_str(
        &format!(
            "{OK}[relay.producer]\n\"linger.ms\" = 10\n\"enable.idempotence\" = true\n\"message.timeout.ms\" = 0\n\"partitioner\" = \"consistent_random\"\n"
        ),
        devour::config::Origin::Defaults,
        &Default::default(),
    )
    .unwrap();
    assert_eq!(c.relay.producer["linger.ms"], "10");
}

/// `DEVOUR_*` variables that look like settings but are none are named in a warning (they
/// would be ignored silently); the scripts' own variables are not settings and pass quietly.
#[test]
fn environment_variables_that_are_no_setting_are_warned_about() {
    let env: std::collections::BTreeMap<String, String> = [
        ("DEVOUR_KAFKA_HOTS", "x"),
        ("DEVOUR_RELAY_BATCHSIZE", "5"),
        ("DEVOUR_KAFKA_PROPERTIES_COMPRESSION_TYPE", "zstd"),
        ("DEVOUR_RELAY_PRODUCER_LINGER_MS", "5"),
        ("DEVOUR_CONSUMERS_P_TOPIC", "x"),
        ("DEVOUR_RELAY_LEASE_TTL", "3000"),
        ("DEVOUR_METRICS_LISTEN_ADDR", "127.0.0.1:1"),
        ("DEVOUR_kafka_hosts", "a:1"),
        ("DEVOUR_KAFKA_PORT", "19092"),
        ("DEVOUR_KAFKA_SSL_PORT", "19094"),
        ("DEVOUR_KAFKA_DIR", "/x"),
        ("DEVOUR_PG_VERSION", "15"),
        ("DEVOUR_TEST_PG_URL", "postgres://x"),
        ("DEVOUR_LOG_LEVEL", "info"),
        ("DEVOUR_KAFKA_PROPERTY_LINGER_MS", "3"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let c = Config::from_toml_str(OK, devour::config::Origin::Defaults, &env).unwrap();
    let w = c.warnings.join("\n");
    for (var, says) in [
        ("DEVOUR_KAFKA_HOTS", "did you mean DEVOUR_KAFKA_HOSTS?"),
        (
            "DEVOUR_RELAY_BATCHSIZE",
            "did you mean DEVOUR_RELAY_BATCH_SIZE?",
        ),
        (
            "DEVOUR_KAFKA_PROPERTIES_COMPRESSION_TYPE",
            "did you mean DEVOUR_KAFKA_PROPERTY_COMPRESSION_TYPE?",
        ),
        (
            "DEVOUR_RELAY_PRODUCER_LINGER_MS",
            "[relay.producer] is read from the file only",
        ),
        (
            "DEVOUR_CONSUMERS_P_TOPIC",
            "consumer routes are read from the file only",
        ),
    ] {
        assert!(
            w.contains(&format!(
                "{var} is not a devour setting and is ignored: {says}"
            )),
            "{var}: {w}"
        );
    }
    for (var, says) in [
        (
            "DEVOUR_RELAY_LEASE_TTL",
            "did you mean DEVOUR_RELAY_LEASE_TTL_MS?",
        ),
        (
            "DEVOUR_METRICS_LISTEN_ADDR",
            "did you mean DEVOUR_METRICS_LISTEN?",
        ),
        ("DEVOUR_kafka_hosts", "did you mean DEVOUR_KAFKA_HOSTS?"),
    ] {
        assert!(
            w.contains(&format!(
                "{var} is not a devour setting and is ignored: {says}"
            )),
            "{var}: {w}"
        );
    }
    assert_eq!(c.warnings.len(), 8, "only those: {w}");
    assert_eq!(c.kafka.properties["linger.ms"], "3");
}

/// An empty DEVOUR_CONFIG counts as unset; a configuration file named but missing says where
/// its name came from.
#[test]
fn devour_config_empty_is_unset_and_a_missing_file_is_named() {
    let (code, out, err) = devour(
        &["config", "check"],
        &[
            ("DEVOUR_CONFIG", ""),
            ("DEVOUR_KAFKA_HOSTS", "127.0.0.1:9092"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("127.0.0.1:9092"), "{out}");
    for (args, env) in [
        (
            &["config", "check", "--config", "/devour-missing.toml"][..],
            &[][..],
        ),
        (
            &["config", "check"][..],
            &[("DEVOUR_CONFIG", "/devour-missing.toml")][..],
        ),
    ] {
        let (code, _, err) = devour(args, env);
        assert_eq!(code, 2, "{err}");
        assert!(
            err.contains("/devour-missing.toml: cannot read the configuration file: it does not exist (named by --config or DEVOUR_CONFIG)"),
            "{err}"
        );
    }
}

/// A `RUST_LOG` that would silence devour (a misspelt level) is set aside with a warning, so the
/// warnings and errors still show; an empty one counts as unset.
#[test]
fn a_rust_log_that_would_silence_devour_is_set_aside() {
    let warns = |rust_log: &str| {
        let (code, _, err) = devour(
            &["config", "check"],
            &[
                ("DEVOUR_KAFKA_HOSTS", "127.0.0.1:9092"),
                ("DEVOUR_KAFKA_HOTS", "x"),
                ("RUST_LOG", rust_log),
            ],
        );
        assert_eq!(code, 0, "{err}");
        err
    };
    let err = warns("warning");
    assert!(err.contains("RUST_LOG=\"warning\" is set aside"), "{err}");
    assert!(
        err.contains("DEVOUR_KAFKA_HOTS is not a devour setting"),
        "{err}"
    );
    let err = warns("");
    assert!(!err.contains("set aside"), "{err}");
    assert!(
        err.contains("DEVOUR_KAFKA_HOTS is not a devour setting"),
        "{err}"
    );
    let err = warns("error");
    assert!(
        !err.contains("DEVOUR_KAFKA_HOTS"),
        "a valid RUST_LOG wins: {err}"
    );
}
