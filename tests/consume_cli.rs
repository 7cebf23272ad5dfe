//! The shipped `devour consume` binary: its built-in `print` and `exec` handlers, a clean stop
//! on SIGTERM with offsets committed, and exit code 2 with a clear message for a bad route,
//! handler or `dump`.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::consume::{committed, offsets_reader, produce, read_all, Out};
use common::create_topic;

fn devour(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_devour"));
    cmd.args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DEVOUR_CONFIG", dir.join("devour.toml"))
        .env("RUST_LOG", "info");
    cmd
}

fn run(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = devour(dir, args).output().unwrap();
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

fn setup(routes: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("devour.toml"),
        format!(
            "[database]\nurl = \"sqlite://{}\"\n[kafka]\nhosts = \"{}\"\n{routes}",
            dir.path().join("app.db").display(),
            common::kafka_hosts()
        ),
    )
    .unwrap();
    dir
}

#[test]
fn bad_route_handler_or_dump_exits_2_with_a_clear_message() {
    let cases: &[(&str, &[&str], &str)] = &[
        (
            "[consumers.a]\ntopic = \"t\"\nhandler = \"print\"\n[consumers.b]\ntopic = \"t\"\nhandler = \"print\"\n",
            &["consume", "nope"],
            "no consumer route `nope` in the configuration (configured: a, b)",
        ),
        (
            "[kafka.properties]\n",
            &["consume", "nope"],
            "none is configured: add a `[consumers.NAME]` table",
        ),
        (
            "[consumers.a]\ntopic = \"t\"\nhandler = \"billing\"\n",
            &["consume", "a"],
            "`consumers.a.handler`: no handler named `billing` (registered: exec, print)",
        ),
        (
            "[consumers.a]\ntopic = \"t\"\nhandler = \"print\"\ndump = \"yaml\"\n",
            &["consume", "a"],
            "`consumers.a.dump`: `yaml` is not one of \"raw\", \"json\", \"obj\"",
        ),
        (
            "[consumers.a]\ntopic = \"t\"\nhandler = \"exec\"\ndump = \"obj\"\ncommand = [\"true\"]\n",
            &["consume", "a"],
            "`consumers.a.dump`: handler `exec` does not take dump = \"obj\" (it takes: raw, json)",
        ),
        (
            "[consumers.a]\ntopic = \"t\"\nhandler = \"exec\"\n",
            &["consume", "a"],
            "`consumers.a.command`: missing",
        ),
        (
            "[consumers.a]\ntopic = \"t\"\nhandler = \"exec\"\ncommand = [\"no-such-program-for-devour\"]\n",
            &["consume", "a"],
            "`command` program `no-such-program-for-devour` is not an executable file, nor found on PATH",
        ),
        (
            "[consumers.a]\ntopic = \"t\"\nhandler = \"exec\"\ncommand = \"sh -c true\"\n",
            &["consume", "a"],
            "is the program and its arguments as a list, e.g. [\"sh\", \"-c\", \"true\"]",
        ),
        (
            "[consumers.a]\nhandler = \"print\"\n",
            &["consume", "a"],
            "`consumers.a.topic`: missing",
        ),
        (
            "[consumers.a]\ntopic = \"bad topic\"\nhandler = \"print\"\n",
            &["consume", "a"],
            "`consumers.a.topic`",
        ),
        (
            "[consumers.a]\ntopic = \"t\"\nhandler = \"print\"\nconsumer_tpye = \"simple\"\n",
            &["consume", "a"],
            "`consumers.a.consumer_tpye`: unknown key; did you mean `consumer_type`?",
        ),
        (
            "[consumers.a]\ntopic = \"t\"\nhandler = \"print\"\n[consumers.a.properties]\n\"group.id\" = \"x\"\n",
            &["consume", "a"],
            "`consumers.a.properties.group.id`: cannot be set here: set the route's `group` instead",
        ),
        (
            "[consumers.a]\ntopic = \"t\"\nhandler = \"print\"\nretry = { max_attempts = 20, max_backoff_ms = 60000 }\n",
            &["consume", "a"],
            "`consumers.a.retry.max_backoff_ms`",
        ),
        (
            "[consumers.a]\ntopic = \"t\"\ndead_letter_topic = \"t\"\nhandler = \"print\"\n",
            &["consume", "a"],
            "dead letters would come back",
        ),
        (
            "[consumers.a]\ntopic = \"t\"\nhandler = \"print\"\nconcurrency = 0\n",
            &["consume", "a"],
            "`consumers.a.concurrency`: must be greater than zero",
        ),
    ];
    for (routes, args, expected) in cases {
        let dir = setup(routes);
        let t = Instant::now();
        let (code, _, stderr) = run(dir.path(), args);
        assert_eq!(code, 2, "{routes}\n{args:?} → {stderr}");
        assert!(
            stderr.contains(expected),
            "{routes}\nexpected `{expected}` in:\n{stderr}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "a bad route fails at start"
        );
    }
}

#[test]
fn print_writes_one_json_line_per_message() {
    let topic = create_topic("consume-print", 1);
    produce(
        &topic,
        &[
            Out {
                headers: vec![("event", "update"), ("message-id", "m-1")],
                ..Out::seq("acct-1", 0)
            },
            Out {
                key: None,
                payload: Some(b"plain text".to_vec()),
                headers: vec![],
            },
        ],
    );
    let group = common::unique("consume-cli");
    let dir = setup(&format!(
        "[consumers.show]\ntopic = \"{topic}\"\ngroup = \"{group}\"\nhandler = \"print\"\ndump = \"raw\"\n"
    ));
    let (code, stdout, stderr) = run(dir.path(), &["consume", "show", "--drain"]);
    assert_eq!(code, 0, "{stderr}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert_eq!(lines[0]["topic"], topic.as_str());
    assert_eq!(lines[0]["partition"], 0);
    assert_eq!(lines[0]["offset"], 0);
    assert_eq!(lines[0]["key"], "acct-1");
    assert_eq!(lines[0]["event"], "update");
    assert_eq!(lines[0]["headers"]["message-id"], "m-1");
    assert_eq!(
        lines[0]["message"], r#"{"seq":0,"key":"acct-1"}"#,
        "raw: the payload as text"
    );
    assert!(lines[0]["timestamp_ms"].as_i64().unwrap() > 0);
    assert_eq!(lines[1]["key"], serde_json::Value::Null);
    assert_eq!(lines[1]["message"], "plain text");
    assert!(stderr.contains("2 processed, 0 dead-lettered"), "{stderr}");
}

/// `devour consume x | head -n 1`: once stdout is closed, `print` stops the consumer (exit 1)
/// instead of retrying and dead-lettering the rest of the topic; nothing unprinted is committed.
#[test]
fn print_stops_the_consumer_when_stdout_is_closed() {
    use std::io::BufRead;
    let topic = create_topic("consume-print-pipe", 1);
    let msgs: Vec<Out<'_>> = (0..2000).map(|i| Out::seq("k", i)).collect();
    produce(&topic, &msgs);
    let group = common::unique("pipe");
    let dir = setup(&format!(
        "[consumers.show]\ntopic = \"{topic}\"\ngroup = \"{group}\"\nhandler = \"print\"\n"
    ));
    let mut child = devour(dir.path(), &["consume", "show", "--drain"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    // The reader is dropped here: stdout is a closed pipe from now on.
    assert!(first.contains("\"offset\":0"), "{first}");
    let t = Instant::now();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(t.elapsed() < Duration::from_secs(20), "{stderr}");
    assert!(
        stderr.contains("the handler stopped the consumer: cannot write to stdout"),
        "{stderr}"
    );
    assert!(!stderr.contains("dead-letter"), "{stderr}");
    let committed_to = committed(&offsets_reader(&group), &topic, 1)[0];
    assert!(
        committed_to < 2000,
        "messages never printed were committed (up to {committed_to})"
    );
}

#[test]
fn exec_runs_the_command_per_message_and_exit_65_dead_letters() {
    let topic = create_topic("consume-exec", 1);
    produce(
        &topic,
        &[
            Out {
                headers: vec![("event", "create"), ("message-id", "m-0")],
                ..Out::seq("a", 0)
            },
            Out::seq("poison", 1),
            Out::seq("b", 2),
        ],
    );
    let group = common::unique("consume-cli");
    let dir = setup(&format!(
        "[consumers.run]\ntopic = \"{topic}\"\ngroup = \"{group}\"\nhandler = \"exec\"\n\
         command = [\"sh\", \"-c\", \"printf '%s|%s|%s|%s|%s|%s|%s|' \\\"${{DEVOUR_CONFIG:-no-config}}\\\" \\\"$DEVOUR_TOPIC\\\" \\\"$DEVOUR_OFFSET\\\" \\\"$DEVOUR_KEY\\\" \\\"$DEVOUR_EVENT\\\" \\\"$DEVOUR_MESSAGE_ID\\\" \\\"$DEVOUR_ROUTE\\\" >> out.txt; cat >> out.txt; echo >> out.txt; [ \\\"$DEVOUR_KEY\\\" != poison ] || exit 65\"]\n"
    ));
    let (code, _, stderr) = run(dir.path(), &["consume", "run", "--drain"]);
    assert_eq!(code, 0, "{stderr}");
    let out = std::fs::read_to_string(dir.path().join("out.txt")).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        vec![
            format!("no-config|{topic}|0|a|create|m-0|run|{{\"seq\":0,\"key\":\"a\"}}"),
            format!("no-config|{topic}|1|poison|||run|{{\"seq\":1,\"key\":\"poison\"}}"),
            format!("no-config|{topic}|2|b|||run|{{\"seq\":2,\"key\":\"b\"}}"),
        ],
        "one run per message, payload on stdin, metadata in the environment, devour's own DEVOUR_* settings not"
    );
    assert!(stderr.contains("2 processed, 1 dead-lettered"), "{stderr}");
    let dead = read_all(&format!("{topic}.dlq"), Duration::from_secs(30));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].key.as_deref(), Some("poison"));
    let attempts = dead[0]
        .headers
        .iter()
        .find(|(k, _)| k == "devour-dlq-attempts")
        .unwrap();
    assert_eq!(attempts.1, "1", "exit 65 gives up at once");
}

/// A key that is not clean text reaches the command as DEVOUR_KEY_BASE64 (a NUL byte cannot go
/// into an environment variable: every run failed to start and the message was
/// dead-lettered). A command that outlives `exec_timeout_ms` is killed with everything it
/// started, and a child that holds stdin without reading it does not hang the consumer.
#[test]
fn exec_passes_binary_keys_in_base64_and_a_timeout_kills_the_whole_group() {
    let topic = create_topic("consume-exec-group", 1);
    let big = Out {
        payload: Some(vec![b'x'; 300_000]),
        ..Out::seq("slow", 1)
    };
    produce(&topic, &[Out::seq("a\0b", 0), big, Out::seq("c", 2)]);
    let group = common::unique("consume-cli");
    let pid = std::process::id();
    let dir = setup(&format!(
        "[consumers.run]\ntopic = \"{topic}\"\ngroup = \"{group}\"\nhandler = \"exec\"\ndump = \"raw\"\nexec_timeout_ms = 500\n\
         retry = {{ max_attempts = 1 }}\n\
         command = [\"sh\", \"-c\", \"if [ \\\"$DEVOUR_KEY\\\" = slow ]; then sleep 29.{pid} | sleep 29.{pid}; fi; \
         printf '%s|%s\\\\n' \\\"$DEVOUR_KEY\\\" \\\"${{DEVOUR_KEY_BASE64:-}}\\\" >> out.txt\"]\n"
    ));
    let t = Instant::now();
    let (code, _, stderr) = run(dir.path(), &["consume", "run", "--drain"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "the timed-out command held the consumer for {:?}",
        t.elapsed()
    );
    let out = std::fs::read_to_string(dir.path().join("out.txt")).unwrap();
    assert_eq!(out, "|YQBi\nc|\n", "{stderr}");
    assert!(stderr.contains("2 processed, 1 dead-lettered"), "{stderr}");
    assert!(
        stderr.contains("ran longer than exec_timeout_ms"),
        "{stderr}"
    );
    let sleeping = Command::new("pgrep")
        .args(["-f", &format!("sleep 29.{pid}")])
        .output()
        .unwrap();
    assert!(
        sleeping.stdout.is_empty(),
        "the timed-out command's children were left running: {}",
        String::from_utf8_lossy(&sleeping.stdout)
    );
}

/// Waits up to 60 s for `child` (its stderr piped, read after); kills it and fails past that.
fn bounded_wait(child: &mut std::process::Child, what: &str) -> std::process::ExitStatus {
    common::exit_within(child, Duration::from_secs(60)).unwrap_or_else(|| {
        let mut stderr = String::new();
        let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr);
        panic!("{what} did not exit within 60 s\n{stderr}");
    })
}

#[test]
fn sigterm_finishes_the_message_in_hand_commits_and_exits_0() {
    let topic = create_topic("consume-sigterm", 1);
    common::consume::produce_seqs(&topic, 200, 5);
    let group = common::unique("sigterm");
    let dir = setup(&format!(
        "[consumers.slow]\ntopic = \"{topic}\"\ngroup = \"{group}\"\nhandler = \"exec\"\n\
         command = [\"sh\", \"-c\", \"sleep 0.05; cat >> out.txt; echo >> out.txt\"]\n"
    ));
    let mut child = devour(dir.path(), &["consume", "slow"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = dir.path().join("out.txt");
    let count = || {
        std::fs::read_to_string(&out)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while count() < 20 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    common::sigterm(&child);
    let t = Instant::now();
    let status = bounded_wait(&mut child, "devour consume after SIGTERM");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "exit 0 on SIGTERM: {status:?}\n{stderr}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "stopped in {:?}",
        t.elapsed()
    );
    let done = count();
    assert!(
        (20..200).contains(&done),
        "stopped mid-stream: {done} handled"
    );
    assert_eq!(
        committed(&offsets_reader(&group), &topic, 1),
        vec![done as i64],
        "the committed offset is exactly what was handled\n{stderr}"
    );
}

/// A dead letter its topic cannot take (larger than the dead-letter topic's max.message.bytes)
/// is not dropped: the partition waits, nothing is committed past it, and the log says what to
/// raise.
#[test]
fn a_dead_letter_too_large_for_its_topic_waits_and_says_what_to_raise() {
    let topic = create_topic("consume-dlq-small", 1);
    let dlq = format!("{topic}.dlq");
    common::create_named_topic(&dlq, 1, &[("max.message.bytes", "20000")]);
    let big = Out {
        payload: Some(vec![b'x'; 50_000]),
        ..Out::seq("big", 0)
    };
    produce(&topic, &[big, Out::seq("after", 1)]);
    let group = common::unique("dlq-small");
    let dir = setup(&format!(
        "[consumers.run]\ntopic = \"{topic}\"\ngroup = \"{group}\"\nhandler = \"exec\"\ndump = \"raw\"\n\
         command = [\"sh\", \"-c\", \"[ \\\"$DEVOUR_KEY\\\" != big ] || exit 65; cat >> out.txt\"]\n"
    ));
    let mut child = devour(dir.path(), &["consume", "run"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(8));
    common::sigterm(&child);
    let status = bounded_wait(&mut child, "devour consume after SIGTERM");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(
        stderr.contains(&format!("raise the max.message.bytes of {dlq}")),
        "{stderr}"
    );
    assert!(
        status.success(),
        "SIGTERM while a dead letter waits: exit 0: {status:?}\n{stderr}"
    );
    assert!(
        !dir.path().join("out.txt").exists(),
        "the message after it was handled first"
    );
    let at = committed(&offsets_reader(&group), &topic, 1)[0];
    assert!(
        at <= 0,
        "offset {at} committed past the message that was not dead-lettered"
    );
}

/// The first SIGTERM waits for the message in hand; a second one exits at once, with 130.
#[test]
fn a_second_sigterm_exits_at_once_with_130() {
    let topic = create_topic("consume-second-signal", 1);
    common::consume::produce_seqs(&topic, 3, 1);
    let group = common::unique("second-signal");
    let pid = std::process::id();
    let dir = setup(&format!(
        "[consumers.slow]\ntopic = \"{topic}\"\ngroup = \"{group}\"\nhandler = \"exec\"\n\
         exec_timeout_ms = 40000\nretry = {{ max_attempts = 1 }}\n\
         command = [\"sh\", \"-c\", \"touch started; exec sleep 28.{pid}\"]\n"
    ));
    let mut child = devour(dir.path(), &["consume", "slow"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dir.path().join("started").exists() {
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the first message never started: {:?}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    common::sigterm(&child);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the first SIGTERM waits for the message in hand"
    );
    common::sigterm(&child);
    let t = Instant::now();
    let status = bounded_wait(&mut child, "devour consume after a second SIGTERM");
    let elapsed = t.elapsed();
    // The command it was running went with it (it would finish a message whose offset was not
    // committed, which the next run handles again).
    std::thread::sleep(Duration::from_millis(200));
    let left = Command::new("pgrep")
        .args(["-f", &format!("sleep 28.{pid}")])
        .output()
        .unwrap();
    let _ = Command::new("pkill")
        .args(["-f", &format!("sleep 28.{pid}")])
        .status();
    assert!(
        elapsed < Duration::from_secs(10),
        "the second SIGTERM took {elapsed:?}"
    );
    assert_eq!(status.code(), Some(130), "{status:?}");
    assert!(
        left.stdout.is_empty(),
        "the exec command outlived the consumer: {}",
        String::from_utf8_lossy(&left.stdout)
    );
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(
        stderr.contains("SIGTERM: stopping once the work in hand is finished"),
        "the first SIGTERM says that a stop is under way: {stderr}"
    );
}

/// A command that cannot be started (here its interpreter is missing) stops the consumer with
/// exit 1 and its message unfinished, instead of sending every message to the dead-letter
/// topic.
#[test]
fn an_exec_command_that_cannot_start_stops_the_consumer() {
    let topic = create_topic("consume-exec-nostart", 1);
    common::consume::produce_seqs(&topic, 3, 1);
    let group = common::unique("exec-nostart");
    let dir = setup(&format!(
        "[consumers.run]\ntopic = \"{topic}\"\ngroup = \"{group}\"\nhandler = \"exec\"\n\
         command = [\"./handler.sh\"]\n"
    ));
    let script = dir.path().join("handler.sh");
    std::fs::write(&script, "#!/devour/no/such/interpreter\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (code, _, stderr) = run(dir.path(), &["consume", "run", "--drain"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("cannot start `./handler.sh`")
            && stderr.contains("the interpreter on its #! line is not"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("sent to dead-letter topic"),
        "nothing is dead-lettered: {stderr}"
    );
    let at = committed(&offsets_reader(&group), &topic, 1)[0];
    assert!(
        at <= 0,
        "offset {at} committed past the unfinished message: {stderr}"
    );
}

/// `exec` gets the payload's bytes as they came (not re-encoded JSON), and a tombstone as an
/// empty stdin with DEVOUR_TOMBSTONE=1.
#[test]
fn exec_gets_the_payload_as_it_came_and_tombstones_flagged() {
    let topic = create_topic("consume-exec-bytes", 1);
    let spaced = "{ \"z\": 1,\n  \"a\": 2 }";
    produce(
        &topic,
        &[
            Out {
                key: Some("k"),
                payload: Some(spaced.as_bytes().to_vec()),
                headers: vec![],
            },
            Out {
                key: Some("k"),
                payload: None,
                headers: vec![],
            },
        ],
    );
    let group = common::unique("exec-bytes");
    let dir = setup(&format!(
        "[consumers.run]\ntopic = \"{topic}\"\ngroup = \"{group}\"\nhandler = \"exec\"\n\
         command = [\"sh\", \"-c\", \"cat > in-$DEVOUR_OFFSET.txt; echo $DEVOUR_TOMBSTONE > tomb-$DEVOUR_OFFSET.txt\"]\n"
    ));
    let (code, _, stderr) = run(dir.path(), &["consume", "run", "--drain"]);
    assert_eq!(code, 0, "{stderr}");
    let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap();
    assert_eq!(read("in-0.txt"), spaced, "the payload's own bytes");
    assert_eq!(read("tomb-0.txt"), "0\n");
    assert_eq!(read("in-1.txt"), "", "a tombstone: empty stdin");
    assert_eq!(read("tomb-1.txt"), "1\n");
}

/// `exec` gets the partition, the attempt, the headers (JSON) and the timestamp of each call.
#[test]
fn exec_gets_partition_attempt_headers_and_timestamp() {
    let topic = create_topic("consume-exec-meta", 3);
    let before_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    produce(
        &topic,
        &[Out {
            headers: vec![("trace", "t-1"), ("event", "update")],
            ..Out::seq("acct-7", 0)
        }],
    );
    let written = read_all(&topic, Duration::from_secs(30));
    assert_eq!(written.len(), 1);
    let group = common::unique("exec-meta");
    let dir = setup(&format!(
        "[consumers.meta]\ntopic = \"{topic}\"\ngroup = \"{group}\"\nhandler = \"exec\"\n\
         retry = {{ max_attempts = 3, initial_backoff_ms = 10 }}\n\
         command = [\"sh\", \"meta.sh\"]\n"
    ));
    std::fs::write(
        dir.path().join("meta.sh"),
        "printf '%s|%s|%s|%s\\n' \"$DEVOUR_PARTITION\" \"$DEVOUR_ATTEMPT\" \"$DEVOUR_HEADERS\" \
         \"$DEVOUR_TIMESTAMP_MS\" >> meta.txt\n[ \"$DEVOUR_ATTEMPT\" -ge 2 ] || exit 1\n",
    )
    .unwrap();
    let (code, _, stderr) = run(dir.path(), &["consume", "meta", "--drain"]);
    assert_eq!(code, 0, "{stderr}");
    let out = std::fs::read_to_string(dir.path().join("meta.txt")).unwrap();
    let calls: Vec<Vec<&str>> = out.lines().map(|l| l.split('|').collect()).collect();
    assert_eq!(calls.len(), 2, "attempt 1 fails, attempt 2 succeeds: {out}");
    for (i, call) in calls.iter().enumerate() {
        assert_eq!(
            call[0],
            written[0].partition.to_string(),
            "partition: {out}"
        );
        assert_eq!(call[1], (i + 1).to_string(), "attempt: {out}");
        let headers: serde_json::Value = serde_json::from_str(call[2]).unwrap();
        assert_eq!(
            headers,
            serde_json::json!({"trace": "t-1", "event": "update"}),
            "headers: {out}"
        );
        let ts: i64 = call[3]
            .parse()
            .unwrap_or_else(|e| panic!("timestamp: {e}: {out}"));
        assert!(
            (before_ms - 5_000..before_ms + 60_000).contains(&ts),
            "timestamp {ts} is the message's (produced at about {before_ms})"
        );
    }
}

/// A drain of a topic that does not exist (a misspelt name) fails saying so, rather than
/// reporting, after waiting for partitions, that it drained nothing.
#[test]
fn a_drain_of_a_topic_that_does_not_exist_fails() {
    let topic = format!("consume-no-such-topic-{}", common::unique("t"));
    let dir = setup(&format!(
        "[consumers.show]\ntopic = \"{topic}\"\ngroup = \"{}\"\nhandler = \"print\"\n",
        common::unique("no-topic")
    ));
    let (code, _, stderr) = run(dir.path(), &["consume", "show", "--drain"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "topic {topic} does not exist, so there is nothing to drain"
        )),
        "{stderr}"
    );
}

/// A message whose own metadata no process can take (a NUL byte in a header) goes to the
/// dead-letter topic; the consumer goes on with the next one.
#[test]
fn an_exec_message_whose_metadata_cannot_be_passed_is_dead_lettered() {
    let topic = create_topic("consume-exec-nul", 1);
    produce(
        &topic,
        &[
            Out {
                headers: vec![("event", "bad\0event")],
                ..Out::seq("a", 0)
            },
            Out::seq("b", 1),
        ],
    );
    let dir = setup(&format!(
        "[consumers.run]\ntopic = \"{topic}\"\ngroup = \"{}\"\nhandler = \"exec\"\n\
         command = [\"sh\", \"-c\", \"cat >> out.txt; echo >> out.txt\"]\n",
        common::unique("exec-nul")
    ));
    let (code, _, stderr) = run(dir.path(), &["consume", "run", "--drain"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("1 processed, 1 dead-lettered"), "{stderr}");
    assert!(
        stderr.contains("metadata cannot be passed to a process"),
        "{stderr}"
    );
    let out = std::fs::read_to_string(dir.path().join("out.txt")).unwrap();
    assert_eq!(out, "{\"seq\":1,\"key\":\"b\"}\n");
}
