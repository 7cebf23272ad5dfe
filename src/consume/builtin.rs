//! The built-in handlers, so that the shipped `devour` binary is useful without Rust code:
//! `print` (one JSON line per message on stdout, the seed's `dump_json`) and `exec` (runs a
//! command per message).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use super::handler::{Consumer, Ctx, DigestError, Meta, Payload};
use crate::config::{ConsumerRoute, Dump};

/// `handler = "print"`: writes each message as one JSON line on stdout:
/// `{"topic", "partition", "offset", "key", "timestamp_ms", "headers", "event", "message"}`,
/// where `message` is the JSON payload (`dump = "json"` or `"obj"`) or the payload as text
/// (`dump = "raw"`; bytes that are not UTF-8 become `{"base64": …}`).
pub struct Print {
    out: std::io::Stdout,
}

impl Print {
    pub(crate) fn new(_route: &ConsumerRoute) -> Print {
        Print {
            out: std::io::stdout(),
        }
    }
}

/// A header or key value as JSON: text if UTF-8, else `{"base64": …}`.
fn bytes_value(b: &[u8]) -> Value {
    match std::str::from_utf8(b) {
        Ok(s) => Value::String(s.to_string()),
        Err(_) => {
            use base64::Engine;
            json!({ "base64": base64::engine::general_purpose::STANDARD.encode(b) })
        }
    }
}

/// The message's headers as a JSON object (`print` writes them, `exec` passes them on).
fn headers_json(meta: &Meta<'_>) -> Map<String, Value> {
    meta.raw_headers()
        .map(|(k, v)| {
            let k = String::from_utf8_lossy(k).into_owned();
            (k, v.map(bytes_value).unwrap_or(Value::Null))
        })
        .collect()
}

/// The message's metadata as a JSON object (what `print` writes).
fn meta_json(meta: &Meta<'_>) -> Map<String, Value> {
    let headers = headers_json(meta);
    let mut m = Map::new();
    m.insert("topic".into(), meta.topic.into());
    m.insert("partition".into(), meta.partition.into());
    m.insert("offset".into(), meta.offset.into());
    m.insert(
        "key".into(),
        meta.key.map(bytes_value).unwrap_or(Value::Null),
    );
    m.insert(
        "timestamp_ms".into(),
        meta.timestamp_ms.map(Value::from).unwrap_or(Value::Null),
    );
    m.insert(
        "event".into(),
        meta.event()
            .map(|e| Value::String(e.to_string()))
            .unwrap_or(Value::Null),
    );
    m.insert("headers".into(), Value::Object(headers));
    m
}

impl Consumer for Print {
    type Message = Value;

    fn digest(
        &mut self,
        meta: &Meta<'_>,
        message: Payload<'_, Value>,
        _ctx: &mut Ctx<'_>,
    ) -> Result<(), DigestError> {
        let mut line = meta_json(meta);
        let message = match message {
            Payload::Raw(b) => bytes_value(b),
            Payload::Json(v) | Payload::Obj(v) => v,
        };
        line.insert("message".into(), message);
        let mut text = serde_json::to_vec(&Value::Object(line)).map_err(DigestError::give_up)?;
        text.push(b'\n');
        // Written and flushed before `digest` returns, so before the offset is stored. Output
        // that cannot be written (a closed pipe: `devour consume x | head`) stops the consumer:
        // retrying or dead-lettering would move the rest of the topic away unseen.
        let mut out = self.out.lock();
        out.write_all(&text)
            .and_then(|()| out.flush())
            .map_err(|e| DigestError::stop(format!("cannot write to stdout: {e}")))
    }
}

/// Exit status of an `exec` command that means "this message will never succeed": it goes to
/// the dead-letter topic at once (sysexits' `EX_DATAERR`).
pub const EXEC_GIVE_UP_STATUS: i32 = 65;

/// `handler = "exec"`: runs the route's `command` once per message, with the payload's bytes
/// on stdin as they came (with `dump = "json"`, a payload that is not JSON goes to the
/// dead-letter topic instead; a tombstone gives an empty stdin and `DEVOUR_TOMBSTONE=1`) and the
/// metadata in environment variables: `DEVOUR_ROUTE`, `DEVOUR_TOPIC`, `DEVOUR_PARTITION`,
/// `DEVOUR_OFFSET`, `DEVOUR_KEY` (a key that is not UTF-8 text, or holds a NUL byte, comes as
/// `DEVOUR_KEY_BASE64` instead), `DEVOUR_TIMESTAMP_MS`, `DEVOUR_EVENT`, `DEVOUR_MESSAGE_ID`,
/// `DEVOUR_ATTEMPT`, `DEVOUR_HEADERS` (a JSON object) and `DEVOUR_TOMBSTONE` (`1` or `0`).
/// Exit 0 = done; exit 65 = give up (dead letter now); any other status, a signal, or running
/// longer than `exec_timeout_ms` = an error, retried. A command that cannot be started (it or
/// its interpreter is missing or not executable) stops the consumer, its message unfinished,
/// rather than sending every message to the dead-letter topic; a message whose metadata no
/// process can take (a NUL byte in a header) goes to the dead-letter topic. The command runs in a process group of its own,
/// which a timeout kills whole, as does a second SIGINT/SIGTERM that ends the consumer.
/// The command's stdout and stderr are the consumer's; it inherits the consumer's environment
/// without devour's own `DEVOUR_*` variables (they may hold secrets).
pub struct Exec {
    program: String,
    args: Vec<String>,
    timeout: Duration,
}

impl Exec {
    pub(crate) fn new(route: &ConsumerRoute) -> Result<Exec, String> {
        let (program, args) = route
            .command
            .split_first()
            .ok_or("the `exec` handler needs `command`")?;
        if find_program(program).is_none() {
            let hint = if program.contains(char::is_whitespace) {
                format!(
                    "; `command` is the program and its arguments as a list, e.g. {:?}",
                    program.split_whitespace().collect::<Vec<_>>()
                )
            } else {
                String::new()
            };
            return Err(format!(
                "`command` program `{program}` is not an executable file, nor found on PATH{hint}"
            ));
        }
        Ok(Exec {
            program: program.clone(),
            args: args.to_vec(),
            timeout: Duration::from_millis(route.exec_timeout_ms),
        })
    }
}

/// Where `program` runs from: itself when it holds a `/`, else the first executable file of that
/// name on `PATH`.
fn find_program(program: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let runnable = |p: &std::path::Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = std::path::PathBuf::from(program);
        return runnable(&p).then_some(p);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|p| runnable(p))
}

/// The process groups of the `exec` commands running now, so that a consumer that exits at
/// once (a second SIGINT/SIGTERM) takes them with it instead of leaving them to finish a
/// message whose offset it did not commit.
static RUNNING: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// One command in [`RUNNING`] while this lives.
struct Running(u32);

impl Running {
    fn register(child: &std::process::Child) -> Running {
        RUNNING
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(child.id());
        Running(child.id())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        RUNNING
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|g| *g != self.0);
    }
}

/// Kills the process group of every `exec` command running now.
pub(crate) fn kill_running_commands() {
    let running = RUNNING.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for group in running {
        if let Some(group) = i32::try_from(group)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        {
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
    }
}

/// Kills the process group `child` leads (the command and whatever it started).
fn kill_group(child: &mut std::process::Child) {
    if let Some(group) = i32::try_from(child.id())
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
    }
    let _ = child.kill();
}

/// Waits at most a second for the stdin feeder: a process that inherited stdin and never reads
/// it may keep the pipe full for as long as it lives; the feeder is then left to end with it.
fn finish_feeder(feeder: std::thread::JoinHandle<()>) {
    let deadline = Instant::now() + Duration::from_secs(1);
    while !feeder.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    if feeder.is_finished() {
        let _ = feeder.join();
    }
}

impl Exec {
    /// What a failure to start the command means. The program or its interpreter missing or
    /// not executable: no message would get through, so the consumer stops rather than
    /// dead-letter them all. This message's own metadata that no process can take (a NUL byte
    /// in a header, an environment over the system's limit): it goes to the dead-letter topic.
    /// Anything else (no processes left, the file being replaced): retried.
    fn spawn_failed(&self, e: std::io::Error) -> DigestError {
        use std::io::ErrorKind as K;
        let why = format!("cannot start `{}`: {e}", self.program);
        match e.kind() {
            // The file is there: what is missing is the interpreter its `#!` line names.
            K::NotFound if find_program(&self.program).is_some() => DigestError::stop(format!(
                "{why} (the program is there: the interpreter on its #! line is not)"
            )),
            K::NotFound | K::PermissionDenied => DigestError::stop(why),
            K::InvalidInput | K::ArgumentListTooLong => DigestError::give_up(format!(
                "{why} (this message's metadata cannot be passed to a process)"
            )),
            _ => DigestError::retry(why),
        }
    }
}

impl Consumer for Exec {
    type Message = Value;
    const DUMPS: &'static [Dump] = &[Dump::Raw, Dump::Json];

    fn digest(
        &mut self,
        meta: &Meta<'_>,
        message: Payload<'_, Value>,
        _ctx: &mut Ctx<'_>,
    ) -> Result<(), DigestError> {
        // The bytes as they came (`message` was decoded only to check them).
        drop(message);
        let input = meta.payload.unwrap_or_default().to_vec();
        let text = |v: Option<&str>| v.unwrap_or("").to_string();
        let headers = headers_json(meta);
        let mut command = Command::new(&self.program);
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        // devour's own settings (database URL, SASL password, …) are not the command's business.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("DEVOUR_") {
                command.env_remove(name);
            }
        }
        // After the removals above, which would undo it.
        match meta.key {
            Some(k) => match std::str::from_utf8(k) {
                Ok(k) if !k.contains('\0') => command.env("DEVOUR_KEY", k),
                _ => {
                    use base64::Engine;
                    command.env(
                        "DEVOUR_KEY_BASE64",
                        base64::engine::general_purpose::STANDARD.encode(k),
                    )
                }
            },
            None => command.env("DEVOUR_KEY", ""),
        };
        let mut child = command
            .args(&self.args)
            .env("DEVOUR_ROUTE", meta.route)
            .env("DEVOUR_TOPIC", meta.topic)
            .env("DEVOUR_PARTITION", meta.partition.to_string())
            .env("DEVOUR_OFFSET", meta.offset.to_string())
            .env(
                "DEVOUR_TIMESTAMP_MS",
                meta.timestamp_ms.map(|t| t.to_string()).unwrap_or_default(),
            )
            .env(
                "DEVOUR_EVENT",
                meta.event().map(|e| e.to_string()).unwrap_or_default(),
            )
            .env("DEVOUR_MESSAGE_ID", text(meta.message_id()))
            .env("DEVOUR_ATTEMPT", meta.attempt.to_string())
            .env("DEVOUR_HEADERS", Value::Object(headers).to_string())
            .env(
                "DEVOUR_TOMBSTONE",
                if meta.payload.is_none() { "1" } else { "0" },
            )
            .stdin(Stdio::piped())
            .spawn()
            .map_err(|e| self.spawn_failed(e))?;
        let running = Running::register(&child);
        // Feed stdin from a thread: a command that does not read it must not block us.
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let feeder = std::thread::spawn(move || {
            // A command that exits without reading its input is not an error.
            let _ = stdin.write_all(&input);
        });
        let started = Instant::now();
        let mut pause = Duration::from_micros(200);
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if started.elapsed() >= self.timeout => {
                    kill_group(&mut child);
                    let _ = child.wait();
                    drop(running);
                    finish_feeder(feeder);
                    return Err(DigestError::retry(format!(
                        "`{}` ran longer than exec_timeout_ms ({} ms) and was killed",
                        self.program,
                        self.timeout.as_millis()
                    )));
                }
                Ok(None) => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
                Err(e) => return Err(DigestError::retry(e)),
            }
        };
        // Reaped: its process group id may be reused from now on.
        drop(running);
        finish_feeder(feeder);
        match status.code() {
            Some(0) => Ok(()),
            Some(EXEC_GIVE_UP_STATUS) => Err(DigestError::give_up(format!(
                "`{}` exited with {EXEC_GIVE_UP_STATUS} (give up)",
                self.program
            ))),
            Some(c) => Err(DigestError::retry(format!(
                "`{}` exited with {c}",
                self.program
            ))),
            None => Err(DigestError::retry(format!(
                "`{}` was killed by a signal ({status})",
                self.program
            ))),
        }
    }
}
