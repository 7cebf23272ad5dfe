//! The `devour` command line: argument parsing and the commands behind it. The binary only
//! calls [`main`]; an application's own binary can do the same to get every subcommand.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, ConfigError, CONFIG_ENV};
use crate::db::{DbError, DbPool};

/// Exit code of a runtime failure (database or broker unreachable, a query failed).
pub const EXIT_FAILURE: u8 = 1;
/// Exit code of bad usage or bad configuration.
pub const EXIT_USAGE: u8 = 2;

/// devour: a transactional outbox for Kafka on Diesel.
#[derive(Debug, Parser)]
#[command(
    name = "devour",
    version,
    about,
    long_about = None,
    after_help = "Examples:\n  devour migrate                       create or update devour's tables\n  devour status                        is everything flowing?\n  devour outbox list                   rows the broker refused for good\n  devour consume orders-audit --drain  handle what the route's topics hold, then exit\n\nConfiguration: ./devour.toml or DEVOUR_CONFIG; every key documented in the repository's devour.toml."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the configuration comes from; flattened into every subcommand.
#[derive(Debug, Clone, Args)]
pub struct ConfigOpts {
    /// Path of devour.toml (default: $DEVOUR_CONFIG, else ./devour.toml; keys can be
    /// overridden by DEVOUR_* variables).
    // DEVOUR_CONFIG is read when the configuration loads, where an empty one counts as unset.
    #[arg(long = "config", short = 'c', global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
}

impl ConfigOpts {
    /// Loads and validates the configuration, honouring `--config`, and sets up logging as
    /// its `[log]` section says.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let mut env = crate::config::process_env();
        if let Some(path) = &self.config {
            env.retain(|(k, _)| k != CONFIG_ENV);
            env.push((CONFIG_ENV.to_string(), path.display().to_string()));
        }
        let config = Config::load_with_env(env)?;
        crate::telemetry::init_logging(&config.log);
        for w in &config.warnings {
            tracing::warn!("{w}");
        }
        Ok(config)
    }

    /// [`load`](Self::load), then one connection to the configured database.
    fn connect(&self) -> Result<(Config, crate::db::DbConnection), Failure> {
        let config = self.load()?;
        crate::db::require_existing_file(&config.database)?;
        let conn = DbPool::connect(&config.database)?.get()?;
        Ok((config, conn))
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Apply devour's database migrations (creates the outbox table).
    ///
    /// Example: DEVOUR_DATABASE_URL=postgres://app:pw@127.0.0.1/app devour migrate
    Migrate(MigrateArgs),
    /// Look at the outbox table and its dead letters; retry, discard or enqueue messages.
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// Show whether messages flow: backlog, dead letters, relays, consumer lag.
    ///
    /// Outbox backlog per topic and shard, age of the oldest row, dead letters, relays and the
    /// shards they hold, each consumer route's lag. Exit 1 when a part could not be read
    /// (database or broker unreachable).
    ///
    /// Example: devour status --json | jq .outbox.oldest_age_s
    Status(StatusArgs),
    /// Run consumer route NAME: hand each message of its topics to its handler.
    ///
    /// NAME is a `[consumers.NAME]` table of devour.toml. Offsets are committed only after the
    /// handler succeeded (or the message went to the dead-letter topic). Stops cleanly on
    /// SIGINT/SIGTERM (a second signal exits at once).
    ///
    /// Example: devour consume orders-audit
    Consume(ConsumeArgs),
}

#[derive(Debug, Args)]
struct ConsumeArgs {
    #[command(flatten)]
    config: ConfigOpts,
    /// The route's name: a `[consumers.NAME]` table of devour.toml.
    name: String,
    /// Handle what the topics hold now, then exit.
    #[arg(long)]
    drain: bool,
    /// Apply devour's migrations before starting (the inbox needs them).
    #[arg(long)]
    migrate: bool,
    /// Serve /metrics, /healthz and /readyz on this address (overrides `[metrics] listen`).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate devour.toml plus DEVOUR_* overrides and print the effective configuration with
    /// secrets redacted. Exits 0 when valid, 2 with the error otherwise.
    ///
    /// Example: DEVOUR_CONFIG=/etc/devour.toml devour config check
    Check(ConfigArgs),
}

#[derive(Debug, Args)]
struct ConfigArgs {
    #[command(flatten)]
    config: ConfigOpts,
}

#[derive(Debug, Args)]
struct MigrateArgs {
    #[command(flatten)]
    config: ConfigOpts,
}

#[derive(Debug, Args)]
struct StatusArgs {
    #[command(flatten)]
    config: ConfigOpts,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
    /// How long to wait for each answer of the broker, in ms (at least 1).
    #[arg(long, default_value_t = 5000, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    timeout_ms: u64,
}

#[derive(Debug, Subcommand)]
enum OutboxCommand {
    /// List the oldest undelivered rows.
    ///
    /// Example: devour outbox pending --limit 20
    Pending(PendingArgs),
    /// List dead letters (rows the broker refused for good), oldest first.
    ///
    /// Example: devour outbox list --key customer-42
    List(ListArgs),
    /// Show one dead letter in full: error, attempts, headers and payload.
    ///
    /// Example: devour outbox show 4711
    Show(ShowArgs),
    /// Put dead letters back into the outbox, each in its original place: it is delivered
    /// before the later rows of its key.
    ///
    /// Example: devour outbox retry 4711 | devour outbox retry --key customer-42 | devour outbox retry --all
    Retry(DeadLetterArgs),
    /// Delete dead letters for good (the later rows of their keys are then delivered).
    ///
    /// Example: devour outbox discard 4711 | devour outbox discard --key customer-42 | devour outbox discard --all
    Discard(DeadLetterArgs),
    /// Enqueue a message from the shell: the payload is read from stdin, the relay delivers it.
    ///
    /// Example: echo '{"id": 42}' | devour outbox put --topic orders --key 42 --event create
    Put(PutArgs),
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["id", "key", "all"])))]
struct DeadLetterArgs {
    #[command(flatten)]
    config: ConfigOpts,
    /// The dead letter's id (its original outbox id).
    id: Option<i64>,
    /// Every dead letter of this key.
    #[arg(long)]
    key: Option<String>,
    /// Every dead letter.
    #[arg(long)]
    all: bool,
}

impl DeadLetterArgs {
    fn which(&self) -> crate::db::DeadLetters {
        match (&self.id, &self.key) {
            (Some(id), _) => crate::db::DeadLetters::Id(*id),
            (None, Some(k)) => crate::db::DeadLetters::Key(k.clone()),
            (None, None) => crate::db::DeadLetters::All,
        }
    }
}

#[derive(Debug, Args)]
struct ListArgs {
    #[command(flatten)]
    config: ConfigOpts,
    /// Only the dead letters of this key.
    #[arg(long)]
    key: Option<String>,
    /// How many to show.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..))]
    limit: i64,
    /// Print one JSON object per dead letter instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ShowArgs {
    #[command(flatten)]
    config: ConfigOpts,
    /// The dead letter's id.
    id: i64,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct PutArgs {
    #[command(flatten)]
    config: ConfigOpts,
    /// The topic.
    #[arg(long)]
    topic: String,
    /// The key (messages of one key are delivered in order).
    #[arg(long)]
    key: Option<String>,
    /// The `event` header.
    #[arg(long)]
    event: Option<String>,
    /// A header NAME=VALUE (repeatable).
    #[arg(long = "header", value_name = "NAME=VALUE")]
    headers: Vec<String>,
    /// The payload's content type.
    #[arg(long, default_value = crate::outbox::CONTENT_TYPE_JSON)]
    content_type: String,
    /// Send a tombstone (no payload) instead of reading stdin.
    #[arg(long)]
    tombstone: bool,
}

#[derive(Debug, Args)]
struct PendingArgs {
    #[command(flatten)]
    config: ConfigOpts,
    /// How many rows to show.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..))]
    limit: i64,
    /// Print one JSON object per row instead of a table.
    #[arg(long)]
    json: bool,
}

/// A command's failure, with the exit code it maps to.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Db(#[from] DbError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Relay(#[from] crate::relay::RelayError),
    #[error("{0}")]
    Consume(#[from] crate::consume::ConsumeError),
}

impl Failure {
    /// What to do, when the error says it: a devour table or column the database lacks.
    fn hint(&self) -> Option<&'static str> {
        match self {
            Failure::Db(e) => e.hint(),
            _ => None,
        }
    }

    fn exit_code(&self) -> u8 {
        match self {
            Failure::Config(_) | Failure::Usage(_) => EXIT_USAGE,
            Failure::Relay(
                crate::relay::RelayError::Config(_) | crate::relay::RelayError::Schema { .. },
            ) => EXIT_USAGE,
            Failure::Consume(e) if e.is_usage() => EXIT_USAGE,
            Failure::Db(_)
            | Failure::Io(_)
            | Failure::NotFound(_)
            | Failure::Relay(_)
            | Failure::Consume(_) => EXIT_FAILURE,
        }
    }
}

/// Parses the process arguments, runs the command, prints any error, and returns the exit code
/// (0 ok, 1 runtime failure, 2 bad usage or configuration). `devour consume` knows the built-in
/// handlers only; see [`main_with`].
pub fn main() -> ExitCode {
    main_with(crate::consume::Registry::new())
}

/// [`main`] for an application's own binary: `devour consume` routes to the handlers of
/// `registry` (plus the built-ins), and every other subcommand works as in `devour`.
pub fn main_with(registry: crate::consume::Registry) -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { 0 });
        }
    };
    match run(cli, &registry) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`devour outbox pending | head`): what it wanted was written.
        Err(Failure::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            crate::telemetry::say(true, &format!("devour: error: {e}"));
            if let Some(hint) = e.hint() {
                crate::telemetry::say(true, &format!("devour: hint: {hint}"));
            }
            ExitCode::from(e.exit_code())
        }
    }
}

/// Prints `rows` as JSON lines, or as a table: `header`, a line each, `(N what shown)`.
fn print_rows<T: serde::Serialize>(
    json: bool,
    rows: &[T],
    header: &str,
    what: &str,
    line: impl Fn(&T) -> String,
) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        for r in rows {
            writeln!(out, "{}", serde_json::to_string(r).expect("rows serialize"))?;
        }
    } else {
        writeln!(out, "{header}")?;
        for r in rows {
            writeln!(out, "{}", line(r))?;
        }
        writeln!(out, "({} {what} shown)", rows.len())?;
    }
    Ok(())
}

/// Runs `op` (retry or discard) on the dead letters `args` name and says how many it `did`;
/// `NotFound` when there were none.
fn on_dead_letters(
    args: &DeadLetterArgs,
    did: &str,
    op: impl FnOnce(&mut crate::db::DbConnection, &crate::db::DeadLetters) -> Result<usize, DbError>,
) -> Result<(), Failure> {
    let (_, mut conn) = args.config.connect()?;
    let which = args.which();
    let n = op(&mut conn, &which)?;
    if n == 0 {
        return Err(Failure::NotFound(match which {
            crate::db::DeadLetters::Id(id) => format!("no dead letter with id {id}"),
            crate::db::DeadLetters::Key(k) => format!("no dead letter with key `{k}`"),
            crate::db::DeadLetters::All => "there are no dead letters".into(),
        }));
    }
    println!("{n} dead letter(s) {did}");
    Ok(())
}

/// A flag set by the first SIGINT or SIGTERM; a second one exits the process with 130 at once,
/// killing the commands `exec` handlers run.
fn stop_on_signals() -> std::io::Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    use std::sync::atomic::Ordering;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    let flag = stop.clone();
    std::thread::Builder::new()
        .name("devour-signals".into())
        .spawn(move || {
            // Counted here: the flag is also set by the run itself (a handler that stops it).
            let mut seen = 0;
            for signal in signals.forever() {
                seen += 1;
                flag.store(true, Ordering::SeqCst);
                if seen > 1 {
                    crate::consume::kill_running_commands();
                    // `_exit`: no destructors or exit handlers of libraries whose threads run.
                    signal_hook::low_level::exit(130);
                }
                let name = if signal == signal_hook::consts::SIGINT { "SIGINT" } else { "SIGTERM" };
                tracing::info!("{name}: stopping once the work in hand is finished (a second signal exits at once)");
            }
        })?;
    Ok(stop)
}

fn run(cli: Cli, registry: &crate::consume::Registry) -> Result<(), Failure> {
    match cli.command {
        Command::Consume(args) => {
            let config = args.config.load()?;
            if !config.consumers.contains_key(&args.name) {
                // Before connecting to anything.
                return Err(crate::consume::ConsumeError::UnknownRoute {
                    name: args.name,
                    known: config.consumers.keys().cloned().collect(),
                }
                .into());
            }
            // From here on a signal is a clean stop (also during --migrate).
            let stop = stop_on_signals()?;
            if args.migrate {
                DbPool::connect(&config.database)?.migrate()?;
            } else if config.consumers[&args.name].inbox {
                // As for a database without the inbox table: a setup problem (exit 2).
                crate::db::require_existing_file(&config.database).map_err(|e| {
                    crate::consume::ConsumeError::Inbox(format!(
                        "`consumers.{}.inbox` needs the inbox tables devour_inbox_offsets and devour_inbox_batches ({e}); run `devour migrate` or start with --migrate",
                        args.name
                    ))
                })?;
            }
            let mut config = config;
            if let Some(a) = args.metrics_listen {
                config.metrics.listen = Some(a);
            }
            let _server = match config.metrics.listen {
                Some(addr) => {
                    // The readiness probe reaches the brokers as the route does (its own
                    // brokers and credentials, if it has them).
                    let mut probe = config.clone();
                    if let Some(route) = config.consumers.get(&args.name) {
                        probe.kafka.properties.extend(
                            crate::consume::route_connection_properties(route)
                                .map(|(k, v)| (k.clone(), v.clone())),
                        );
                    }
                    Some(crate::telemetry::serve(addr, &probe)?)
                }
                None => None,
            };
            let options = crate::consume::RunOptions { drain: args.drain };
            let report = crate::consume::run(&config, &args.name, registry, options, stop)?;
            crate::telemetry::say(false, &format!(
                "devour consume {}: {} processed, {} dead-lettered, {} duplicate(s) skipped, {} retried attempt(s), in {:.1} s",
                args.name,
                report.processed,
                report.dead_lettered,
                report.duplicates,
                report.retries,
                report.elapsed.as_secs_f64()
            ));
            Ok(())
        }
        Command::Config(ConfigCommand::Check(args)) => {
            let config = args.config.load()?;
            let source = match &config.file {
                Some(p) => p.display().to_string(),
                None => "built-in defaults (no devour.toml found)".into(),
            };
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "# devour configuration is valid: {source} + DEVOUR_* environment overrides"
            )?;
            for w in &config.warnings {
                writeln!(out, "# warning: {w}")?;
            }
            write!(out, "{}", config.to_redacted_toml())?;
            Ok(())
        }
        Command::Migrate(args) => {
            let config = args.config.load()?;
            let pool = DbPool::connect(&config.database)?;
            let applied = pool.migrate()?;
            if applied.is_empty() {
                println!("{}: up to date", config.database.url);
            } else {
                for m in &applied {
                    println!("{}: applied {m}", config.database.url);
                }
            }
            Ok(())
        }
        Command::Outbox(OutboxCommand::Retry(args)) => {
            on_dead_letters(&args, "back in the outbox", |c, w| c.retry_dead_letters(w))
        }
        Command::Outbox(OutboxCommand::Discard(args)) => {
            on_dead_letters(&args, "discarded", |c, w| c.discard_dead_letters(w))
        }
        Command::Outbox(OutboxCommand::List(args)) => {
            let (_, mut conn) = args.config.connect()?;
            let which = match args.key {
                Some(k) => crate::db::DeadLetters::Key(k),
                None => crate::db::DeadLetters::All,
            };
            let rows = conn.list_dead_letters(&which, args.limit)?;
            let header = format!(
                "{:>8}  {:<24} {:<16} {:>8} {:>7}  {:<26} error",
                "id", "topic", "key", "attempts", "bytes", "failed_at"
            );
            print_rows(args.json, &rows, &header, "dead letter(s)", |r| {
                format!(
                    "{:>8}  {:<24} {:<16} {:>8} {:>7}  {:<26} {}",
                    r.id,
                    r.topic,
                    crate::status::one_line(r.partition_key.as_deref().unwrap_or("-"), 64),
                    r.attempts,
                    r.payload_bytes,
                    r.failed_at,
                    crate::status::one_line(&r.error, 100)
                )
            })?;
            Ok(())
        }
        Command::Outbox(OutboxCommand::Show(args)) => {
            let (_, mut conn) = args.config.connect()?;
            let Some(d) = conn.show_dead_letter(args.id)? else {
                return Err(Failure::NotFound(format!(
                    "no dead letter with id {}",
                    args.id
                )));
            };
            let mut out = std::io::stdout().lock();
            if args.json {
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&d).expect("serializes")
                )?;
            } else {
                writeln!(out, "id:          {}", d.id)?;
                writeln!(out, "topic:       {}", d.topic)?;
                writeln!(
                    out,
                    "key:         {}",
                    d.partition_key.as_deref().unwrap_or("-")
                )?;
                writeln!(out, "event:       {}", d.event.as_deref().unwrap_or("-"))?;
                writeln!(out, "message-id:  {}", d.message_id)?;
                writeln!(out, "attempts:    {}", d.attempts)?;
                writeln!(out, "created_at:  {}", d.created_at)?;
                writeln!(out, "failed_at:   {}", d.failed_at)?;
                writeln!(out, "error:       {}", d.error)?;
                writeln!(out, "headers:     {}", d.headers.as_deref().unwrap_or("{}"))?;
                writeln!(out, "payload ({} bytes):", d.payload_bytes)?;
                writeln!(
                    out,
                    "{}",
                    String::from_utf8_lossy(d.payload.as_deref().unwrap_or_default())
                )?;
            }
            Ok(())
        }
        Command::Outbox(OutboxCommand::Put(args)) => {
            let config = args.config.load()?;
            let max = config.outbox.max_message_bytes;
            let mut m = crate::outbox::OutboxMessage::new(args.topic, None);
            m.key = args.key;
            m.event = args.event;
            // A media type: type/subtype, maybe with parameters; no spaces around, no controls.
            let media = args.content_type.split(';').next().unwrap_or("");
            let well_formed = media.split_once('/').is_some_and(|(t, s)| {
                !t.is_empty() && !s.is_empty() && !media.contains(char::is_whitespace)
            });
            if !well_formed || args.content_type.contains(char::is_control) {
                return Err(Failure::Usage(format!(
                    "--content-type {:?}: expected a media type such as application/json",
                    args.content_type
                )));
            }
            m.content_type = args.content_type;
            for h in &args.headers {
                let Some((k, v)) = h.split_once('=') else {
                    return Err(Failure::Usage(format!(
                        "--header `{h}`: expected NAME=VALUE"
                    )));
                };
                if k.trim().is_empty() || k.trim() != k {
                    return Err(Failure::Usage(format!(
                        "--header `{h}`: the name is empty or has spaces around it"
                    )));
                }
                if m.headers.insert(k.to_string(), v.to_string()).is_some() {
                    return Err(Failure::Usage(format!(
                        "--header `{k}` given twice: a message holds one value per header name"
                    )));
                }
            }
            // Everything but the payload is checked before stdin is read (it may be a terminal).
            m.validate(max).map_err(|e| Failure::Usage(e.to_string()))?;
            if args.tombstone && m.key.is_none() {
                return Err(Failure::Usage(
                    "--tombstone needs --key: a tombstone deletes a key's value (a compacted \
                     topic refuses one without a key)"
                        .into(),
                ));
            }
            if !args.tombstone {
                // At most one byte over the limit: enough to refuse it, without holding a
                // stream of any length in memory.
                let mut buf = Vec::new();
                std::io::Read::read_to_end(
                    &mut std::io::Read::take(std::io::stdin().lock(), max as u64 + 1),
                    &mut buf,
                )?;
                if buf.is_empty() {
                    return Err(Failure::Usage(
                        "stdin is empty: pipe the payload in (--tombstone sends a null value)"
                            .into(),
                    ));
                }
                if buf.len() > max {
                    return Err(Failure::Usage(format!(
                        "the payload on stdin is over the maximum of {max} bytes \
                         (`outbox.max_message_bytes`)"
                    )));
                }
                m.payload = Some(buf);
            }
            crate::db::require_existing_file(&config.database)?;
            let mut conn = DbPool::connect(&config.database)?.get()?;
            let ids = crate::db::each_backend!(&mut conn, c => crate::outbox::write_messages(&mut **c, std::slice::from_ref(&m), max))
                .map_err(|e| match e {
                    crate::ProduceError::Database(d) => Failure::Db(d.into()),
                    other => Failure::Usage(other.to_string()),
                })?;
            println!(
                "outbox row {} (message-id {}) to {}",
                ids[0], m.message_id, m.topic
            );
            Ok(())
        }
        Command::Status(args) => {
            let config = args.config.load()?;
            let status = crate::status::gather(&config, Duration::from_millis(args.timeout_ms));
            let mut out = std::io::stdout().lock();
            if args.json {
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&status).expect("serializes")
                )?;
            } else {
                write!(out, "{}", crate::status::render(&status))?;
            }
            let problems = status.problems();
            if problems.is_empty() {
                Ok(())
            } else {
                Err(Failure::NotFound(problems.join("; ")))
            }
        }
        Command::Outbox(OutboxCommand::Pending(args)) => {
            let (_, mut conn) = args.config.connect()?;
            let rows = conn.pending(args.limit)?;
            let header = format!(
                "{:>8}  {:<24} {:<16} {:<8} {:>7}  {:<26} payload",
                "id", "topic", "key", "event", "bytes", "created_at"
            );
            print_rows(args.json, &rows, &header, "undelivered row(s)", |r| {
                format!(
                    "{:>8}  {:<24} {:<16} {:<8} {:>7}  {:<26} {}",
                    r.id,
                    r.topic,
                    crate::status::one_line(r.partition_key.as_deref().unwrap_or("-"), 64),
                    crate::status::one_line(r.event.as_deref().unwrap_or("-"), 32),
                    r.payload_bytes,
                    r.created_at,
                    crate::status::one_line(&r.payload_preview, 80)
                )
            })?;
            Ok(())
        }
    }
}

/// devour-relay: drains the outbox to Kafka, in commit order per key, at least once.
#[derive(Debug, Parser)]
#[command(
    name = "devour-relay",
    version,
    long_about = None,
    after_help = "Examples:\n  devour-relay                                 run until SIGINT/SIGTERM\n  devour-relay --drain                         deliver what is there, then exit\n  devour-relay --metrics-listen 127.0.0.1:9464 with Prometheus metrics and health"
)]
pub struct RelayCli {
    #[command(flatten)]
    config: ConfigOpts,
    /// Deliver what is in the outbox now, then exit (progress on stderr when it is a terminal).
    ///
    /// Example: devour-relay --drain
    #[arg(long)]
    drain: bool,
    /// Apply devour's migrations before starting.
    #[arg(long)]
    migrate: bool,
    /// Serve /metrics, /healthz and /readyz on this address (overrides `[metrics] listen`).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
}

/// The `devour-relay` binary: runs a relay until SIGINT/SIGTERM (a second signal exits at once).
/// Exit codes: 0 stopped cleanly, 1 runtime failure, 2 bad usage or configuration.
pub fn relay_main() -> ExitCode {
    use std::io::IsTerminal;
    let cli = match RelayCli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { 0 });
        }
    };
    let run = || -> Result<crate::relay::RelayReport, Failure> {
        let mut config = cli.config.load()?;
        // From here on a signal is a clean stop (also during --migrate, or while the database
        // is not up yet).
        let stop = stop_on_signals()?;
        if cli.migrate {
            DbPool::connect(&config.database)?.migrate()?;
        }
        if let Some(a) = cli.metrics_listen {
            config.metrics.listen = Some(a);
        }
        let _server = match config.metrics.listen {
            Some(addr) => Some(crate::telemetry::serve(addr, &config)?),
            None => None,
        };
        let options = crate::relay::RunOptions {
            mode: if cli.drain {
                crate::relay::Mode::Drain
            } else {
                crate::relay::Mode::Follow
            },
            progress: std::io::stderr().is_terminal(),
        };
        Ok(crate::relay::run(&config, options, stop)?)
    };
    match run() {
        Ok(report) => {
            let mut line = format!(
                "devour-relay: delivered {} message(s), dead-lettered {}, in {:.1} s",
                report.delivered,
                report.dead_lettered,
                report.elapsed.as_secs_f64()
            );
            if report.abandoned > 0 {
                line += &format!(
                    "; {} still in flight when the stop's time ran out (they go again)",
                    report.abandoned
                );
            }
            if report.left > 0 {
                line += &format!(
                    "; {} row(s) still in the outbox: held back by a dead letter (`devour status`), \
                     written after the drain began{}, or in other relays' shards",
                    report.left,
                    report
                        .drained_through
                        .map_or(String::new(), |id| format!(" (ids above {id})"))
                );
            }
            crate::telemetry::say(false, &line);
            ExitCode::SUCCESS
        }
        Err(e) => {
            crate::telemetry::say(true, &format!("devour-relay: error: {e}"));
            ExitCode::from(e.exit_code())
        }
    }
}
