//! The relay's threads: a reader that sends the oldest undelivered rows of the shards it holds, a
//! committer that removes rows once the broker acknowledged them (or dead-letters them), a lease
//! keeper, and on PostgreSQL a listener for wake-ups.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::Producer as _;

use super::kafka::{self, InFlight, Outcome, RelayProducer, Report, TopicLimits};
use super::store::{Leases, Row, SentThrough, Store};
use super::{Mode, RelayError, RunOptions, Wake};
use crate::config::{Config, DeadLetterPolicy, RelayConfig};
use crate::db::DbError;
use crate::outbox::SHARDS;
use crate::telemetry::names;

/// What a relay run did.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct RelayReport {
    /// Rows the broker acknowledged.
    pub delivered: u64,
    /// Rows moved to the dead letters.
    pub dead_lettered: u64,
    /// Times the reader started over from the oldest row after a failure.
    pub restarts: u64,
    /// Passes over the outbox (see ARCHITECTURE.md, "Why ids are not a delivery cursor").
    pub passes: u64,
    /// Of those, the passes that started at the oldest row; the others started at the horizon
    /// below which no transaction could still commit a row.
    pub passes_from_oldest: u64,
    /// Rows still in flight when a stop's time ran out and not removed or dead-lettered by
    /// the time it ended: they stay in the outbox and will be delivered again.
    pub abandoned: u64,
    /// Rows left in the outbox when a drain ran to its end (not counting `abandoned`): rows of
    /// keys held back by a dead letter (`block_key`), rows written while it ran, or rows of
    /// shards other relays hold (0 in follow mode and for a drain that was stopped).
    pub left: u64,
    /// A drain: the largest id in the outbox when it began. It delivers the rows up to there;
    /// rows written after it began are left for the next run.
    pub drained_through: Option<i64>,
    /// Commit → acknowledgement latency, 50th percentile, in ms.
    pub latency_p50_ms: u64,
    /// Commit → acknowledgement latency, 99th percentile, in ms.
    pub latency_p99_ms: u64,
    /// How long the run lasted.
    pub elapsed: Duration,
}

/// The leases as the reader sees them.
#[derive(Debug, Clone)]
struct LeaseView {
    owned: Leases,
    /// After this instant the leases may have expired in the database: stop sending.
    valid_until: Instant,
    /// Shards being handed back: no new sends.
    releasing: BTreeSet<i32>,
    /// Another relay holds the SQLite outbox.
    standby: Option<String>,
    /// Per shard held: rows up to this id may have been sent by an earlier holder of the
    /// shard (this relay too, under an earlier epoch), and go out marked `possible-duplicate`.
    resent: SentThrough,
    /// A drain's view of the shards it does not hold (see [`Store::unattended`]): how many
    /// no live relay holds, the longest lease TTL on record, and when this was read.
    unattended: Option<(usize, u64, Instant)>,
}

/// Rows handed to the producer and not yet removed from the outbox, per shard.
#[derive(Default)]
struct InFlightRows {
    total: usize,
    per_shard: HashMap<i32, usize>,
}

struct Shared {
    relay_id: String,
    config: RelayConfig,
    stop: Arc<AtomicBool>,
    /// `--drain`: deliver what is there, then end.
    drain: bool,
    /// Topics the brokers said do not exist (a row of one is dead-lettered only if it lasts).
    missing: Arc<kafka::MissingTopics>,
    wake: Arc<Wake>,
    leases: RwLock<LeaseView>,
    in_flight: Mutex<InFlightRows>,
    drained: Condvar,
    /// A delivery failed in a way that may have left a gap: start over from the oldest row.
    restart: AtomicBool,
    /// Keys dead-lettered during this pass (policy `block_key`): their later rows wait.
    blocked: Mutex<HashSet<String>>,
    delivered: AtomicU64,
    dead_lettered: AtomicU64,
    /// Rows the committer took out of the outbox: removed (or marked) after their ack, or
    /// dead-lettered after the broker refused them. Counted before they leave `in_flight`.
    settled: AtomicU64,
    latency: Mutex<hdrhistogram::Histogram<u64>>,
    /// A vital thread panicked: the relay stops.
    failed: AtomicBool,
    /// The lease keeper and committer stop after the reader.
    threads_stop: AtomicBool,
    /// The producer's `batch.size`, and the smaller one asked for (a topic takes smaller
    /// record batches): the next restart builds the producer with it.
    batch_size: AtomicUsize,
    wanted_batch_size: AtomicUsize,
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire) || self.failed.load(Ordering::Acquire)
    }

    fn add_in_flight(&self, shards: impl IntoIterator<Item = i32>) {
        let mut f = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        for shard in shards {
            f.total += 1;
            *f.per_shard.entry(shard).or_default() += 1;
        }
    }

    fn remove_in_flight(&self, shards: impl IntoIterator<Item = i32>) {
        let mut f = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        for s in shards {
            f.total = f.total.saturating_sub(1);
            if let Some(n) = f.per_shard.get_mut(&s) {
                *n -= 1;
                if *n == 0 {
                    f.per_shard.remove(&s);
                }
            }
        }
        let empty = f.total == 0;
        drop(f);
        self.drained.notify_all();
        if empty {
            // The reader may be waiting to start a new pass (or to finish a drain).
            self.wake.wake();
        }
    }

    fn in_flight(&self) -> usize {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .total
    }

    fn in_flight_on(&self, shard: i32) -> usize {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .per_shard
            .get(&shard)
            .copied()
            .unwrap_or(0)
    }

    /// Waits until at most `limit` rows are in flight, or `timeout`; returns whether it got there.
    fn wait_in_flight_at_most(&self, limit: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut f = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        while f.total > limit {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            f = self
                .drained
                .wait_timeout(f, left.min(Duration::from_millis(100)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    fn leases(&self) -> LeaseView {
        self.leases
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// [`LeaseView::valid_until`] alone (no copy of the leases).
    fn leases_valid_until(&self) -> Instant {
        self.leases
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .valid_until
    }
}

/// The body of a background thread: its shared state, its own connection, the configuration.
type ThreadBody = Box<dyn FnOnce(&Shared, Store, &Config) + Send>;

/// The relay's background threads, ended (and waited for) when dropped: at the end of `run`,
/// however it ends (an error after some threads started, a panic of the reader). Without it a
/// lease keeper outlived the relay and held its shards, so nothing delivered them (on SQLite, a
/// new relay stood by).
struct Threads {
    shared: Arc<Shared>,
    running: Vec<(&'static str, std::thread::JoinHandle<()>)>,
}

impl Threads {
    /// Ends the threads and waits for them; returns the first panic's message.
    fn stop(&mut self) -> Option<String> {
        // The committer first: once the producer is gone its channel closes, and it ends after
        // the last reports. Its last removals need the leases, which the lease keeper releases
        // when it stops: stopping both at once could leave acknowledged rows in the outbox, to
        // be delivered again. (Bounded: a committer waiting for the database gives up at
        // `threads_stop`.)
        if let Some((_, committer)) = self.running.iter().find(|(n, _)| *n == "committer") {
            let waiting = Instant::now();
            while !committer.is_finished() && waiting.elapsed() < COMMITTER_GRACE {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.shared.threads_stop.store(true, Ordering::Release);
        self.shared.wake.wake();
        let mut panicked = None;
        for (name, t) in self.running.drain(..) {
            if let Err(p) = t.join() {
                let message = format!("relay {name}: {}", super::panic_message(&p));
                tracing::error!("{message}");
                panicked.get_or_insert(message);
            }
        }
        panicked
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Stops the relay if its thread panics (dropped while unwinding): a dead committer or lease
/// keeper must not leave the reader waiting for ever. (The relay's own flag: the caller's stop
/// flag is the caller's.)
struct StopOnPanic(Arc<Shared>);

impl Drop for StopOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.failed.store(true, Ordering::Release);
            self.0.wake.wake();
        }
    }
}

/// A pass of the reader: it reads upward from `cursor`, over the shards it started with.
struct Pass {
    cursor: i64,
    started: Instant,
    /// The leases (shard → epoch) the pass reads: a shard gained, or held again under a new
    /// epoch, may hold rows below the cursor.
    leases: Leases,
    /// The settled horizon when the pass began: a row that commits late, below the cursor,
    /// has a larger id.
    horizon: i64,
    /// When the last pass from the oldest row began.
    full_at: Instant,
    /// Whether a row below the cursor may still be sent in this pass: a read went past the
    /// settled horizon, or a row was passed over (its key blocked, its shard going).
    passed_over: bool,
    /// How many times keys had been released (`devour_key_releases`) when the last read from
    /// the oldest row was taken.
    key_releases: Option<i64>,
    passes: u64,
    from_oldest: u64,
}

impl Pass {
    fn new() -> Pass {
        Pass {
            cursor: 0,
            started: Instant::now(),
            leases: Leases::new(),
            horizon: 0,
            full_at: Instant::now(),
            passed_over: false,
            key_releases: None,
            passes: 0,
            from_oldest: 0,
        }
    }

    /// Starts the next pass: from the oldest row still in the outbox when `full`, else from
    /// where a row may have committed late during this pass: the settled horizon this pass
    /// began with (or the cursor, if it did not get that far). `settled` is the settled
    /// horizon now. Keys dead-lettered in the last pass are then kept back by the query itself.
    /// Whether no row this pass should send can lie below its cursor: every read of the pass
    /// stopped at the settled horizon, none passed a row over, and the cursor is at or below
    /// the horizon (a read under a cap also returns rows put back above the sequence's last
    /// id, and the cursor can jump past ids still to be handed out); and no pass from the
    /// oldest row is asked for or due.
    fn nothing_below_cursor(&self, horizon: &Horizon, shared: &Shared) -> bool {
        horizon.enabled
            && !self.passed_over
            && self.cursor <= horizon.settled
            && self.full_at.elapsed() < FULL_PASS_EVERY
            && !shared.wake.rescan_asked()
    }

    fn restart(&mut self, shared: &Shared, full: bool, settled: i64) {
        if full {
            self.cursor = 0;
            self.full_at = Instant::now();
        } else {
            self.cursor = self.cursor.min(self.horizon);
        }
        if self.cursor == 0 {
            self.from_oldest += 1;
        }
        self.horizon = settled;
        self.started = Instant::now();
        self.passed_over = false;
        self.passes += 1;
        shared
            .blocked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

/// How often a pass starts at the oldest row even when the horizon says it need not: rows put
/// back below it by hand (SQL instead of `devour outbox retry`) are found within this.
const FULL_PASS_EVERY: Duration = Duration::from_secs(60);

/// How long reads wait for a transaction that holds a smaller id to end, before they go past
/// it (ARCHITECTURE.md, "Why ids are not a delivery cursor").
pub(crate) const WRITER_WAIT: Duration = Duration::from_secs(2);

/// How old the horizon's last sample may be for a read that finds rows.
const SAMPLE_EVERY: Duration = Duration::from_millis(10);

/// How old the horizon's last sample may be while reads run far below the cap (a backlog):
/// well under `WRITER_WAIT`, so that a transaction is taken for one held open that long only
/// when it was open almost that long.
const SAMPLE_AT_LEAST: Duration = Duration::from_millis(250);

/// Samples older than this are thinned to one per this much age (see [`Horizon::thin`]).
const THIN_AFTER: Duration = Duration::from_millis(100);

/// A sample: the last id handed out, then the transactions that held a write lock on the outbox
/// (every id at or below `last_id` not committed yet is one of theirs).
struct Sample {
    last_id: i64,
    holders: Vec<String>,
    taken: Instant,
}

/// Which ids are settled (PostgreSQL): committed or rolled back for good, so that no row at or
/// below the settled horizon can still appear. Reads stop there (waiting up to `WRITER_WAIT`
/// for an open transaction), so that a row committing late cannot be overtaken by a later row
/// of its key; and passes start there instead of at the oldest row, which, while any long
/// transaction is open in the database, means reading past every row deleted since.
struct Horizon {
    enabled: bool,
    refreshed: Option<Instant>,
    ever_worked: bool,
    samples: std::collections::VecDeque<Sample>,
    settled: i64,
    server_started_us: Option<i64>,
    warned: bool,
    /// Where the time slots of [`thin`](Self::thin) start.
    origin: Instant,
}

impl Horizon {
    fn new(store: &Store) -> Horizon {
        Horizon {
            enabled: store.shares_shards(),
            refreshed: None,
            ever_worked: false,
            samples: std::collections::VecDeque::new(),
            settled: 0,
            server_started_us: None,
            warned: false,
            origin: Instant::now(),
        }
    }

    /// Takes a sample and settles what it can. Returns `true` when ids may have gone back (the
    /// sequence was reset, or the server restarted): rows may then be below every cursor.
    fn refresh(&mut self, store: &mut Store, relay_id: &str) -> bool {
        if !self.enabled {
            return false;
        }
        self.refreshed = Some(Instant::now());
        let sample = match store.id_sample() {
            Ok(Some(sample)) => sample,
            Ok(None) => {
                tracing::warn!(relay = %relay_id, "the outbox's id sequence caches ids (CACHE > 1): reads cannot wait for open transactions, and passes start at the oldest row");
                self.enabled = false;
                return true;
            }
            Err(e) => {
                if !self.ever_worked {
                    tracing::warn!(relay = %relay_id, "cannot read the outbox's id sequence or pg_locks ({e}): reads cannot wait for open transactions, and passes start at the oldest row");
                    self.enabled = false;
                } else if !std::mem::replace(&mut self.warned, true) {
                    tracing::warn!(relay = %relay_id, "cannot settle outbox ids for now: {e}");
                }
                return false;
            }
        };
        self.ever_worked = true;
        let went_back = self
            .server_started_us
            .is_some_and(|s| s != sample.server_started_us)
            || sample.last_id < self.settled
            || self
                .samples
                .back()
                .is_some_and(|b| sample.last_id < b.last_id);
        if went_back {
            self.samples.clear();
            self.settled = 0;
        }
        self.server_started_us = Some(sample.server_started_us);
        let holders: HashSet<String> = sample.holders.iter().cloned().collect();
        self.samples.push_back(Sample {
            last_id: sample.last_id,
            holders: sample.holders,
            taken: Instant::now(),
        });
        // The newest sample whose lock holders have all ended (this one, if it has none)
        // settles every id up to it.
        if let Some(i) = self
            .samples
            .iter()
            .rposition(|s| s.holders.iter().all(|v| !holders.contains(v)))
        {
            self.settled = self.settled.max(self.samples[i].last_id);
            self.samples.drain(..i);
        }
        self.thin();
        went_back
    }

    /// Keeps few samples while a transaction holds a write lock for long (they would pile up
    /// at one per read): of those older than `THIN_AFTER`, the newest of each `THIN_AFTER` time
    /// slot, and of those older than `WRITER_WAIT` only the newest (the one
    /// [`cap`](Self::cap) uses). Dropping samples only makes the horizon later to settle, never
    /// wrong.
    fn thin(&mut self) {
        self.thin_at(Instant::now());
    }

    fn thin_at(&mut self, now: Instant) {
        let mut bucket = None;
        let mut kept = std::collections::VecDeque::with_capacity(self.samples.len());
        for s in self.samples.drain(..).rev() {
            let age = now.duration_since(s.taken);
            if age >= THIN_AFTER {
                // Slots are fixed in time (not in age), so that a kept sample grows old.
                let b = if age >= WRITER_WAIT {
                    u128::MAX
                } else {
                    s.taken.duration_since(self.origin).as_millis() / THIN_AFTER.as_millis()
                };
                if bucket == Some(b) {
                    continue;
                }
                bucket = Some(b);
            }
            kept.push_front(s);
        }
        self.samples = kept;
    }

    /// The highest id a read may reach: the settled horizon, or past a transaction that has
    /// held a smaller id for `WRITER_WAIT`. `None`: no limit (SQLite, or no horizon).
    fn cap(&self) -> Option<i64> {
        if !self.enabled {
            return None;
        }
        let waited = self
            .samples
            .iter()
            .rev()
            .find(|s| s.taken.elapsed() >= WRITER_WAIT)
            .map_or(0, |s| s.last_id);
        Some(self.settled.max(waited))
    }

    /// Whether the last sample is older than `age`.
    fn older_than(&self, age: Duration) -> bool {
        self.refreshed.is_none_or(|t| t.elapsed() >= age)
    }

    /// Whether ids above the cap have been handed out (rows there wait for their writers); with
    /// `bound` (a drain's), only ids up to it count.
    fn holds_back(&self, bound: Option<i64>) -> bool {
        self.cap().is_some_and(|c| {
            self.samples
                .back()
                .is_some_and(|s| s.last_id.min(bound.unwrap_or(i64::MAX)) > c)
        })
    }
}

/// What the read loop counted.
struct LoopCounts {
    restarts: u64,
    passes: u64,
    passes_from_oldest: u64,
    drained_through: Option<i64>,
    /// A drain that ended holding every shard, with no key held back: rows at or below its
    /// bound can only be left in flight, so the rows left are those above it.
    left_only_above: bool,
}

/// A connected relay, ready to run.
pub(crate) struct Relay {
    shared: Arc<Shared>,
    config: Config,
    options: RunOptions,
    reader: Store,
    producer_config: rdkafka::ClientConfig,
}

/// `HOST-PID`: the name of a relay whose `relay_id` is not configured.
fn default_relay_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "relay".into());
    format!("{host}-{}", std::process::id())
}

/// 32 random bits (a UUIDv7's low bits are random): unique per relay run, even for two relays
/// in one process or relays given one name.
fn run_salt() -> u32 {
    uuid::Uuid::now_v7().as_u128() as u32
}

/// Who gives up retrying when: the reader as soon as a stop is asked, the other threads only
/// when the reader is done (so that delivered rows are still removed while stopping). The
/// reader reconnects with its read settings (`Store::open_reader`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Reader,
    Background,
}

/// The relay's warnings about its database and LISTEN connection, which repeat every second or
/// so while the database is away: logged once per `REPEAT_AFTER` each, with a count.
static DB_WARNINGS: std::sync::LazyLock<crate::telemetry::Repeats> =
    std::sync::LazyLock::new(Default::default);

/// Shards as ranges: "0-127, 200, 210-212".
fn shard_ranges(shards: impl IntoIterator<Item = i32>) -> String {
    let mut ranges: Vec<(i32, i32)> = Vec::new();
    for s in shards {
        match ranges.last_mut() {
            Some((_, end)) if *end + 1 == s => *end = s,
            _ => ranges.push((s, s)),
        }
    }
    ranges
        .iter()
        .map(|(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Logs warning `kind` (`: e` after it) unless it repeats (see [`DB_WARNINGS`]).
fn warn_db(relay: &str, kind: &str, e: &dyn std::fmt::Display) {
    if let Some(more) = DB_WARNINGS.due(kind) {
        let e = crate::telemetry::one_line_error(e);
        tracing::warn!(relay = %relay, "{kind}: {e}{more}");
    }
}

/// Opens the reader's connection at start, waiting up to `connect_timeout_ms` for a database
/// that is not up yet (as devour's commands do); a refusal that does not go away (credentials,
/// a missing database) fails at once.
fn open_waiting(config: &Config, stop: &AtomicBool) -> Result<Store, DbError> {
    let deadline = Instant::now() + Duration::from_millis(config.database.connect_timeout_ms);
    let mut said = false;
    loop {
        match Store::open_reader(config) {
            Ok(store) => return Ok(store),
            Err(DbError::Connect { reason, .. })
                if !crate::db::connect_failed_for_good(&config.database.url, &reason)
                    && Instant::now() < deadline
                    && !stop.load(Ordering::Acquire) =>
            {
                if !said {
                    said = true;
                    tracing::warn!(
                        "the database does not answer yet ({}); waiting up to connect_timeout_ms",
                        crate::telemetry::one_line_error(&reason)
                    );
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Retries `f` with backoff (100 ms doubling to 5 s) until it succeeds or `role` must stop,
/// reconnecting the store after a failure. Transient failures never end the relay.
fn with_retry<T>(
    shared: &Shared,
    role: Role,
    store: &mut Store,
    config: &Config,
    what: &str,
    mut f: impl FnMut(&mut Store) -> Result<T, DbError>,
) -> Option<T> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match f(store) {
            Ok(v) => return Some(v),
            Err(e) => {
                warn_db(&shared.relay_id, &format!("{what} failed, retrying"), &e);
                let give_up = match role {
                    Role::Reader => shared.stopping(),
                    Role::Background => shared.threads_stop.load(Ordering::Acquire),
                };
                if give_up {
                    return None;
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
                let reopened = match role {
                    Role::Reader => Store::open_reader(config),
                    Role::Background => Store::open(config),
                };
                if let Ok(s) = reopened {
                    *store = s;
                }
            }
        }
    }
}

impl Relay {
    pub(crate) fn connect(
        config: &Config,
        options: RunOptions,
        stop: Arc<AtomicBool>,
        wake: Arc<Wake>,
    ) -> Result<Relay, RelayError> {
        let rc = config.relay.clone();
        // Opening a SQLite file that is not there would create an empty one.
        if crate::db::require_existing_file(&config.database).is_err() {
            return Err(RelayError::Schema {
                missing: format!(
                    "table devour_outbox (the SQLite file {} does not exist)",
                    config.database.url
                ),
            });
        }
        let mut reader = open_waiting(config, &stop)?;
        // Without devour's tables every query would fail and be retried forever: say so now.
        reader.check_tables(&rc)?;
        let producer_config = super::producer_config(config);
        crate::broker::check_access(&producer_config, ACCESS_CHECK, &stop)?;
        let batch_size = kafka::batch_size(&producer_config);
        // The name gets a suffix of this run's: two relays given one name (a deploy overlapping
        // the old process's stop, one config shared by two instances) must not share leases,
        // or both would deliver every shard.
        let name = rc.relay_id.clone().unwrap_or_else(default_relay_name);
        let relay_id = format!("{name}-{:08x}", run_salt());
        let shared = Arc::new(Shared {
            relay_id,
            config: rc,
            stop,
            drain: options.mode == Mode::Drain,
            missing: Arc::new(kafka::MissingTopics::new(&producer_config)),
            wake,
            leases: RwLock::new(LeaseView {
                owned: Leases::new(),
                valid_until: Instant::now(),
                releasing: BTreeSet::new(),
                standby: None,
                unattended: None,
                resent: SentThrough::new(),
            }),
            in_flight: Mutex::new(InFlightRows::default()),
            drained: Condvar::new(),
            restart: AtomicBool::new(false),
            blocked: Mutex::new(HashSet::new()),
            delivered: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            settled: AtomicU64::new(0),
            latency: Mutex::new(
                hdrhistogram::Histogram::new_with_bounds(1, 3_600_000, 2).expect("valid bounds"),
            ),
            threads_stop: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            batch_size: AtomicUsize::new(batch_size),
            wanted_batch_size: AtomicUsize::new(batch_size),
        });
        Ok(Relay {
            shared,
            config: config.clone(),
            options,
            reader,
            producer_config,
        })
    }

    /// Runs until stopped (or drained); returns what it did.
    pub(crate) fn run(mut self) -> Result<RelayReport, RelayError> {
        let started = Instant::now();
        let shared = self.shared.clone();
        let mut threads = Threads {
            shared: shared.clone(),
            running: Vec::new(),
        };
        let (tx, rx) = crossbeam_channel::unbounded::<Report>();
        let mut producer =
            kafka::create_producer(&self.producer_config, tx.clone(), shared.missing.clone())?;
        let mut limits = TopicLimits::new(&self.config.kafka)?;
        tracing::info!(
            relay = %shared.relay_id,
            database = %self.config.database.url,
            brokers = %self.producer_config.get("bootstrap.servers").unwrap_or(""),
            "relay starting"
        );
        // The counters exist from the start (at 0), so that a rate over them sees their first
        // increase.
        metrics::counter!(names::RELAY_DELIVERED).increment(0);
        metrics::counter!(names::RELAY_DEAD_LETTERED).increment(0);
        let overridden = super::kafka::overridden_properties(&self.config.kafka);
        if !overridden.is_empty() {
            tracing::warn!(
                relay = %shared.relay_id,
                "[kafka.properties] {} does not apply to the relay's producer: per-key order relies on {} and a key-hashing partitioner",
                overridden.join(", "),
                super::kafka::ORDERING_SETTINGS
                    .iter()
                    .map(|(k, v)| format!("{k} = {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }

        // Each background thread gets a connection of its own. The relay cannot go on without
        // a `vital` one: its panic stops the relay.
        let spawn = |name: &str, vital: bool, body: ThreadBody| {
            let (shared, config) = (shared.clone(), self.config.clone());
            let store = Store::open(&config)?;
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    let _stop = vital.then(|| StopOnPanic(shared.clone()));
                    body(&shared, store, &config)
                })
                .map_err(|e| RelayError::Panicked(format!("cannot start a thread: {e}")))
        };
        let committer = spawn(
            "devour-relay-commit",
            true,
            Box::new(move |shared, store, config| commit_loop(shared, store, config, rx)),
        )?;
        threads.running.push(("committer", committer));
        let lease_keeper = spawn("devour-relay-lease", true, Box::new(lease_loop))?;
        threads.running.push(("lease keeper", lease_keeper));
        // Counting is a pass over the outbox (long under a big backlog): on its own thread and
        // connection, only when someone reads the metrics, and never waited for at a stop.
        if self.config.metrics.listen.is_some() {
            drop(spawn(
                "devour-relay-backlog",
                false,
                Box::new(backlog_loop),
            )?);
        }
        // Wake-ups only: without it (it failed to start, or panicked) the relay polls. It
        // listens before the first read, so that it need not ask for a pass from the oldest
        // row (which would wait for everything sent so far) for what it might have missed.
        #[cfg(feature = "postgres")]
        if let crate::config::DatabaseUrl::Postgres(url) = &self.config.database.url {
            let first = listen(url)
                .inspect_err(|(kind, e)| warn_db(&shared.relay_id, kind, e))
                .ok();
            let (shared, url) = (shared.clone(), url.clone());
            match std::thread::Builder::new()
                .name("devour-relay-listen".into())
                .spawn(move || listen_loop(&shared, &url, first))
            {
                Ok(t) => threads.running.push(("listener", t)),
                Err(e) => {
                    tracing::warn!(relay = %self.shared.relay_id, "no LISTEN thread ({e}): polling every poll_interval_ms")
                }
            }
        }

        let result = self.read_loop(&mut producer, &mut limits, &tx);
        // A drain that ran to its end (not stopped, not failed).
        let drained = self.options.mode == Mode::Drain && !shared.stopping() && result.is_ok();

        // Stop: no new sends; wait for what is in flight (acked and removed), all within one
        // `shutdown_timeout_ms`, then let the others finish.
        let deadline = Instant::now() + Duration::from_millis(shared.config.shutdown_timeout_ms);
        let _ = producer.flush(deadline.saturating_duration_since(Instant::now()));
        // Only the committer settles rows in flight: once it is gone, nobody will.
        let committer_alive = threads
            .running
            .iter()
            .any(|(name, t)| *name == "committer" && !t.is_finished());
        let finished = committer_alive
            && shared.wait_in_flight_at_most(0, deadline.saturating_duration_since(Instant::now()));
        // Rows in flight when the time ran out. Closing the producer purges what it has not
        // sent or heard back about (those reports come back failed), but reports it already
        // has still come in, and the committer still removes or dead-letters those rows: they
        // are not left behind. (In flight is read first and the committer counts a row settled
        // before it leaves `in_flight`, so a row settled between the two reads makes the
        // figure err high, towards "delivered again", never low.)
        let in_flight_at_deadline = if finished {
            None
        } else {
            Some((
                shared.in_flight() as u64,
                shared.settled.load(Ordering::Relaxed),
            ))
        };
        drop(producer);
        drop(tx);
        let panicked = threads.stop();
        let abandoned = in_flight_at_deadline.map_or(0, |(rows, settled)| {
            rows.saturating_sub(shared.settled.load(Ordering::Relaxed) - settled)
        });
        let latency = shared
            .latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let counts = result?;
        // A thread that panicked stopped the relay: that is no clean stop.
        if let Some(message) = panicked {
            return Err(RelayError::Panicked(message));
        }
        // (Counting only above the bound skips the index entries of the rows just removed,
        // which a count of the whole outbox would walk.)
        let left = match counts.drained_through {
            Some(bound) if drained && counts.left_only_above => self.reader.backlog_after(bound),
            _ if drained => self.reader.backlog(),
            _ => Ok(0),
        }
        .map_or(0, |n| (n.max(0) as u64).saturating_sub(abandoned));
        let report = RelayReport {
            left,
            delivered: shared.delivered.load(Ordering::Relaxed),
            dead_lettered: shared.dead_lettered.load(Ordering::Relaxed),
            restarts: counts.restarts,
            passes: counts.passes,
            passes_from_oldest: counts.passes_from_oldest,
            drained_through: counts.drained_through,
            abandoned,
            latency_p50_ms: latency.value_at_quantile(0.5),
            latency_p99_ms: latency.value_at_quantile(0.99),
            elapsed: started.elapsed(),
        };
        tracing::info!(
            relay = %shared.relay_id,
            delivered = report.delivered,
            dead_lettered = report.dead_lettered,
            abandoned = report.abandoned,
            passes = report.passes,
            passes_from_oldest = report.passes_from_oldest,
            "relay stopped"
        );
        Ok(report)
    }

    /// Whether the next pass starts at the oldest row: always without a horizon (SQLite, a
    /// drain), when asked to (`devour outbox retry|discard`), and every `FULL_PASS_EVERY`.
    fn full_pass_due(&self, pass: &Pass, horizon: &Horizon) -> bool {
        // Taken first, so that a request is used up by whichever pass starts next.
        let asked = self.shared.wake.take_rescan();
        asked
            || !horizon.enabled
            || self.options.mode == Mode::Drain
            || pass.full_at.elapsed() >= FULL_PASS_EVERY
    }

    /// Reads the oldest undelivered rows of the held shards and hands them to the producer,
    /// until stopped. Returns how many times it started over after a failure.
    fn read_loop(
        &mut self,
        producer: &mut RelayProducer,
        limits: &mut TopicLimits,
        tx: &crossbeam_channel::Sender<Report>,
    ) -> Result<LoopCounts, RelayError> {
        let shared = self.shared.clone();
        let rc = &shared.config;
        let poll = Duration::from_millis(rc.poll_interval_ms);
        let block_keys = rc.on_dead_letter == DeadLetterPolicy::BlockKey;
        let mut pass = Pass::new();
        let reading_since = Instant::now();
        let mut horizon = Horizon::new(&self.reader);
        horizon.refresh(&mut self.reader, &shared.relay_id);
        pass.restart(&shared, true, horizon.settled);
        let mut restarts = 0;
        let mut fresh_sample_due = false;
        // The last read, when it was a full batch: its last id and the ids it spanned.
        let mut last_full_read: Option<(i64, i64)> = None;
        // Since when reads have found only rows held back behind an open transaction.
        let mut held_since: Option<Instant> = None;
        let mut progress = Progress::new(&self.options);
        let mut standby_since: Option<Instant> = None;
        let mut prefetch = Prefetcher::start(&self.config)?;
        let mut left_only_above = false;
        // Rows up to `covered` may be handed to the producer: this relay's row says so
        // (`Store::cover`), for whoever takes its shards over.
        let mut covered = 0_i64;
        // The largest id handed to a producer, and after a restart (a delivery without a
        // verdict) that id: rows up to it may have been sent, and go out marked.
        let (mut handed, mut resent_through) = (0_i64, 0_i64);
        // A drain delivers the rows there when it begins and ends once none of them is left:
        // its reads stop at the largest id there was, so that rows written meanwhile cannot
        // keep it going (they are left for the next run, and counted in its report).
        let drain_bound = if shared.drain {
            with_retry(
                &shared,
                Role::Reader,
                &mut self.reader,
                &self.config,
                "reading where the outbox ends",
                Store::max_id,
            )
        } else {
            None
        };

        while !shared.stopping() {
            if shared.restart.swap(false, Ordering::AcqRel) {
                // A delivery failed without a verdict, or a topic takes smaller record batches
                // than the producer builds: let everything in flight settle, then start over
                // from the oldest row with a fresh producer (its idempotence state may be
                // broken; its batch.size is lowered).
                restarts += 1;
                let wanted = shared.wanted_batch_size.load(Ordering::Acquire);
                let smaller = wanted < shared.batch_size.load(Ordering::Acquire);
                if smaller {
                    tracing::info!(relay = %shared.relay_id, "a topic takes smaller record batches (its max.message.bytes): the producer's batch.size is now {wanted} bytes, from the oldest undelivered row");
                } else {
                    tracing::warn!(relay = %shared.relay_id, "delivery failure: starting over from the oldest undelivered row");
                }
                // Within shutdown_timeout_ms, and not past a stop (which has its own bound: a
                // stop during a broker outage must not wait here first).
                let deadline = Instant::now() + Duration::from_millis(rc.shutdown_timeout_ms);
                while Instant::now() < deadline && !shared.stopping() {
                    let _ = producer.flush(Duration::from_millis(100));
                    if shared.wait_in_flight_at_most(0, Duration::from_millis(50)) {
                        break;
                    }
                }
                if shared.stopping() {
                    continue;
                }
                // Read again: a refused batch may have lowered it while in-flight rows settled.
                let wanted = shared.wanted_batch_size.load(Ordering::Acquire);
                if wanted < shared.batch_size.load(Ordering::Acquire) {
                    self.producer_config.set("batch.size", wanted.to_string());
                    shared.batch_size.store(wanted, Ordering::Release);
                }
                *producer = kafka::create_producer(
                    &self.producer_config,
                    tx.clone(),
                    shared.missing.clone(),
                )?;
                resent_through = handed;
                pass.restart(&shared, true, horizon.settled);
            }
            let view = shared.leases();
            if let Some(holder) = &view.standby {
                let since = *standby_since.get_or_insert_with(|| {
                    tracing::info!(relay = %shared.relay_id, "relay {holder} holds this SQLite outbox; standing by");
                    Instant::now()
                });
                // A drain stands by only as long as the holder's lease could still run out (it
                // may be stopping): past that, the holder is alive and drains the rows itself.
                if self.options.mode == Mode::Drain
                    && since.elapsed() > Duration::from_millis(2 * rc.lease_ttl_ms)
                {
                    return Err(RelayError::Standby(holder.clone()));
                }
                shared.wake.wait(poll);
                continue;
            }
            standby_since = None;
            let shards: Vec<i32> = if Instant::now() < view.valid_until {
                view.owned
                    .keys()
                    .copied()
                    .filter(|s| !view.releasing.contains(s))
                    .collect()
            } else {
                Vec::new()
            };
            if shards.is_empty() {
                shared.wake.wait(poll);
                continue;
            }
            // A shard just taken over (or held again under a new epoch) may hold rows below
            // the cursor, older than anything this relay would send next; so may the outbox
            // after `devour outbox retry|discard`: start a new pass from the oldest row first
            // (once what is in flight is removed, so nothing is sent twice).
            let gained = shards
                .iter()
                .any(|s| pass.leases.get(s) != view.owned.get(s));
            if gained {
                // Held anew: say again how far this relay may send before it sends (its row
                // may have been forgotten and written anew while it held nothing).
                covered = 0;
            }
            if pass.cursor > 0 && (gained || shared.wake.rescan_asked()) {
                if !shared.wait_in_flight_at_most(0, poll) {
                    continue;
                }
                let full = gained || self.full_pass_due(&pass, &horizon);
                pass.restart(&shared, full, horizon.settled);
            }
            pass.leases = shards
                .iter()
                .filter_map(|s| view.owned.get(s).map(|e| (*s, *e)))
                .collect();
            // Back-pressure: never more than max_in_flight rows between read and removal.
            let room = (rc.max_in_flight as usize).saturating_sub(rc.batch_size as usize);
            if !shared.wait_in_flight_at_most(room, poll) {
                continue;
            }
            // Rows that committed late with a smaller id than the cursor: look again every
            // second, once what is in flight has been removed. When none can be there
            // (`Pass::nothing_below_cursor`), the pass goes on without that wait (which would
            // hold up every row written meanwhile).
            if pass.cursor > 0 && pass.started.elapsed() > Duration::from_secs(1) {
                if pass.nothing_below_cursor(&horizon, &shared) {
                    pass.started = Instant::now();
                    pass.horizon = horizon.settled;
                    continue;
                }
                if shared.wait_in_flight_at_most(0, poll) {
                    let full = self.full_pass_due(&pass, &horizon);
                    pass.restart(&shared, full, horizon.settled);
                }
                continue;
            }
            // A sample per read would cost a query per batch: one every few ms, and a fresh one
            // before a read that found nothing is taken for "nothing to send".
            // The cap only matters near it: while full reads end far below it (a backlog), the
            // next one cannot reach it either, and a sample would change nothing it reads. Still
            // one every SAMPLE_AT_LEAST: samples settle ids (a sample's age decides how long
            // its holders have been open) and notice ids going back.
            let cap_far = !horizon.older_than(SAMPLE_AT_LEAST)
                && last_full_read.is_some_and(|(last, span)| {
                    horizon
                        .cap()
                        .is_some_and(|c| last.saturating_add(span.saturating_mul(2)) < c)
                });
            let sampled = fresh_sample_due || (horizon.older_than(SAMPLE_EVERY) && !cap_far);
            fresh_sample_due = false;
            if sampled && horizon.refresh(&mut self.reader, &shared.relay_id) {
                // Ids went back (the sequence was reset, or another server answers): rows may
                // be below every cursor.
                shared.wake.ask_rescan();
                continue;
            }
            let until = match drain_bound {
                Some(bound) => Some(horizon.cap().map_or(bound, |c| c.min(bound))),
                None => horizon.cap(),
            };
            // Past a transaction that held a smaller id for WRITER_WAIT: its row may commit
            // below the cursor.
            if horizon.enabled && until.is_some_and(|u| u > horizon.settled) {
                pass.passed_over = true;
            }
            let request = FetchRequest {
                shards: shards.clone(),
                after: pass.cursor,
                until,
                limit: rc.batch_size,
                block_keys,
                pass: pass.passes,
            };
            let rows = match prefetch.take(&request) {
                Some(rows) => rows,
                None => {
                    let Some(rows) = with_retry(
                        &shared,
                        Role::Reader,
                        &mut self.reader,
                        &self.config,
                        "reading the outbox",
                        |s| {
                            s.fetch(
                                &shards,
                                request.after,
                                request.until,
                                rc.batch_size,
                                block_keys,
                            )
                        },
                    ) else {
                        break;
                    };
                    rows
                }
            };
            metrics::histogram!(names::RELAY_BATCH_ROWS).record(rows.len() as f64);
            last_full_read = match (rows.first(), rows.last()) {
                (Some(first), Some(last)) if rows.len() >= rc.batch_size as usize => {
                    Some((last.id, last.id - first.id))
                }
                _ => None,
            };
            // Read the next batch (the rows after this one) while this one is sent. It is used
            // only if the next read would be the same: same shards, same cursor.
            if let Some(last) = rows.last() {
                prefetch.ask(FetchRequest {
                    after: last.id,
                    ..request
                });
            }
            if rows.is_empty() {
                if horizon.enabled && !sampled {
                    fresh_sample_due = true;
                    continue;
                }
                if horizon.holds_back(drain_bound) {
                    // Rows above the cap wait for the transactions holding smaller ids (at most
                    // WRITER_WAIT); look again shortly, with a fresh sample (the cap is the same
                    // until one is taken): every 2 ms at first (a short transaction commits
                    // soon), then at the sampling pace, so that a transaction left open does
                    // not cost 500 samples (pg_locks reads) a second.
                    let since = *held_since.get_or_insert_with(Instant::now);
                    let wait = if since.elapsed() < Duration::from_millis(20) {
                        Duration::from_millis(2)
                    } else {
                        SAMPLE_EVERY
                    };
                    shared.wake.wait(wait);
                    fresh_sample_due = true;
                    continue;
                }
                held_since = None;
                if shared.in_flight() == 0 {
                    // A drain leaves the shards live relays hold to them, but a relay that died
                    // holds its leases until they run out: with fewer than every shard, a drain
                    // ends only once no shard is held by neither it nor a live relay, as seen
                    // at least the longest lease TTL after its reads began (by then a relay
                    // that had died has missed heartbeats; its shards are waited for, taken
                    // over when their leases run out, and drained here).
                    let others_attended = view.unattended.is_some_and(|(n, longest, at)| {
                        n == 0 && at >= reading_since + Duration::from_millis(longest)
                    });
                    // Done once a pass from the oldest row finds nothing, or once this pass
                    // (a drain's passes all begin at the oldest row) can have left nothing
                    // behind its cursor: a pass from the oldest row would then only walk the
                    // index entries of the rows just removed, a good part of a short drain.
                    let every_shard = shards.len() == crate::outbox::SHARDS as usize;
                    if self.options.mode == Mode::Drain
                        && (every_shard || others_attended)
                        && (pass.cursor == 0 || pass.nothing_below_cursor(&horizon, &shared))
                    {
                        left_only_above = every_shard && !block_keys;
                        break;
                    }
                    let cursor = pass.cursor;
                    let full = self.full_pass_due(&pass, &horizon);
                    pass.restart(&shared, full, horizon.settled);
                    if pass.cursor != cursor {
                        // The new pass begins lower: there may be rows to read now.
                        continue;
                    }
                }
                progress.tick(&shared, &mut self.reader);
                shared.wake.wait(poll);
                continue;
            }
            held_since = None;
            // Keys released since the last read from the oldest row (their dead letters
            // retried or discarded): rows of theirs that reads left out lie below the cursor,
            // and must go before any later row of the key. Send nothing of this read; start
            // over at the oldest row, once what is in flight is removed.
            if request.after == 0 {
                pass.key_releases = Some(rows[0].key_releases);
            } else if pass.key_releases != Some(rows[0].key_releases) {
                shared.wake.ask_rescan();
                continue;
            }
            // Count the whole batch in flight at once (a row that is not sent is taken back).
            shared.add_in_flight(rows.iter().map(|r| r.shard));
            // The leases as they are now, after the rows count in flight: the lease keeper hands
            // a shard back only once the reader can have seen it marked, and then only with
            // nothing in flight on it, so either this view shows it going or the keeper waits.
            // (The view the read began with may be older than a slow read.)
            let mut view = shared.leases();
            if Instant::now() >= view.valid_until {
                // The leases ran out during the read: send nothing, and read these rows again
                // once they are renewed (the cursor stays where it was).
                shared.remove_in_flight(rows.iter().map(|r| r.shard));
                continue;
            }
            let mut topic_limit: Option<(String, Option<usize>)> = None;
            let batch_last = rows.last().map_or(0, |r| r.id);
            let mut rows = rows.into_iter();
            while let Some(row) = rows.next() {
                if shared.stopping() {
                    // Nothing after an unsent row may go: its key's order would break.
                    shared
                        .remove_in_flight(std::iter::once(row.shard).chain(rows.map(|r| r.shard)));
                    break;
                }
                if row.id > covered {
                    // Say how far this relay may send before it does (this batch, and about
                    // one more), so that a relay taking a shard over knows what to mark.
                    let through = batch_last.max(row.id) + i64::from(rc.batch_size);
                    let recorded = with_retry(
                        &shared,
                        Role::Reader,
                        &mut self.reader,
                        &self.config,
                        "recording what it may send",
                        |s| s.cover(&shared.relay_id, through),
                    );
                    if recorded.is_none() {
                        shared.remove_in_flight(
                            std::iter::once(row.shard).chain(rows.map(|r| r.shard)),
                        );
                        break;
                    }
                    covered = through;
                }
                if Instant::now() >= view.valid_until {
                    // A row before this one held the batch up (a dead letter waiting for the
                    // database, a full producer queue) until the leases the batch began with
                    // may have run out: go on only under renewed ones. (Under a new epoch,
                    // the shard's rows wait, below.)
                    view = shared.leases();
                    if Instant::now() >= view.valid_until {
                        shared.remove_in_flight(
                            std::iter::once(row.shard).chain(rows.map(|r| r.shard)),
                        );
                        break;
                    }
                }
                pass.cursor = row.id;
                if let Some(k) = &row.partition_key {
                    if block_keys
                        && shared
                            .blocked
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .contains(k)
                    {
                        shared.remove_in_flight([row.shard]);
                        pass.passed_over = true;
                        continue;
                    }
                }
                // A shard going back, lost, or held under a new epoch since the pass began: its
                // rows wait (a new epoch makes the next pass start at the oldest row).
                let Some(&epoch) = view.owned.get(&row.shard).filter(|e| {
                    !view.releasing.contains(&row.shard) && pass.leases.get(&row.shard) == Some(e)
                }) else {
                    shared.remove_in_flight([row.shard]);
                    pass.passed_over = true;
                    continue;
                };
                let limit = match &topic_limit {
                    Some((t, l)) if *t == row.topic => *l,
                    _ => {
                        let l = limits.limit(&row.topic);
                        topic_limit = Some((row.topic.clone(), l));
                        l
                    }
                };
                if let Some(limit) = limit {
                    let size = kafka::row_size(&row);
                    let fits = kafka::batch_size_for_limit(limit);
                    if fits < shared.batch_size.load(Ordering::Acquire) && size <= limit {
                        // The broker would refuse whole batches for this topic: start over
                        // with a producer that builds smaller ones (nothing after this row is
                        // sent meanwhile, so no key's order changes).
                        shared.wanted_batch_size.fetch_min(fits, Ordering::AcqRel);
                        shared.restart.store(true, Ordering::Release);
                        shared.remove_in_flight(
                            std::iter::once(row.shard).chain(rows.map(|r| r.shard)),
                        );
                        break;
                    }
                    // A cached limit may be old: ask again before refusing a row for good
                    // (and if the broker cannot say now, send it: the broker decides).
                    if size > limit && limits.refresh(&row.topic).is_some_and(|l| size > l) {
                        let error = format!(
                            "message of about {size} bytes exceeds topic `{}` max.message.bytes = {limit}",
                            row.topic
                        );
                        shared.remove_in_flight([row.shard]);
                        self.dead_letter_now(&row, epoch, &error);
                        topic_limit = None;
                        continue;
                    }
                }
                let resent = row.id <= resent_through
                    || view.resent.get(&row.shard).is_some_and(|&t| row.id <= t);
                if !self.send(producer, &row, epoch, resent) {
                    // Not handed over (a stop, or a restart to come): the rest of the batch
                    // waits too, so no later row of its key goes first.
                    shared.remove_in_flight(rows.map(|r| r.shard));
                    break;
                }
                handed = handed.max(row.id);
            }
            progress.tick(&shared, &mut self.reader);
        }
        progress.finish();
        Ok(LoopCounts {
            restarts,
            passes: pass.passes,
            passes_from_oldest: pass.from_oldest,
            drained_through: drain_bound,
            left_only_above,
        })
    }

    /// Hands one row, already counted in flight, to the producer (waiting while its queue is
    /// full, unless a stop comes); takes it back out of the count if it cannot be sent. Returns
    /// whether the batch may go on: the row was sent or dead-lettered.
    fn send(&mut self, producer: &RelayProducer, row: &Row, epoch: i64, resent: bool) -> bool {
        let mut record = kafka::record(
            row,
            epoch,
            kafka::headers(row, resent),
            self.shared.batch_size.load(Ordering::Relaxed),
        );
        if let Some(k) = &row.partition_key {
            record = record.key(k.as_str());
        }
        if let Some(p) = row.kafka_partition {
            record = record.partition(p);
        }
        if let Some(v) = &row.payload {
            record = record.payload(v.as_slice());
        }
        let shared = &self.shared;
        loop {
            match producer.send(record) {
                Ok(()) => return true,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    // The queue stays full while the broker is away: a stop must not wait
                    // for it (the row stays in the outbox).
                    if shared.stopping() {
                        shared.remove_in_flight([row.shard]);
                        return false;
                    }
                    // Nor past the leases: another relay may have the shard by now. Read
                    // again from the oldest row (this row's cursor is already set).
                    if Instant::now() >= shared.leases_valid_until() {
                        shared.remove_in_flight([row.shard]);
                        shared.wake.ask_rescan();
                        return false;
                    }
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((KafkaError::MessageProduction(code), _))
                    if kafka::is_missing(code) && !shared.missing.for_good(&row.topic) =>
                {
                    // Maybe only this producer's metadata is stale: start over (with a new
                    // producer) from the oldest row, and let the grace decide.
                    tracing::info!(relay = %shared.relay_id, id = row.id, "topic {}: {code}; trying again for up to {} s before dead-lettering its rows", row.topic, shared.missing.grace().as_secs());
                    shared.remove_in_flight([row.shard]);
                    shared.restart.store(true, Ordering::Release);
                    return false;
                }
                Err((KafkaError::MessageProduction(code), _)) if kafka::is_permanent(code) => {
                    shared.remove_in_flight([row.shard]);
                    self.dead_letter_now(row, epoch, &code.to_string());
                    return true;
                }
                Err((e, _)) => {
                    tracing::warn!(relay = %shared.relay_id, id = row.id, "cannot hand row to the producer: {e}");
                    shared.remove_in_flight([row.shard]);
                    shared.restart.store(true, Ordering::Release);
                    return false;
                }
            }
        }
    }

    /// Dead-letters a row before it was sent (so before any later row of its key).
    fn dead_letter_now(&mut self, row: &Row, epoch: i64, error: &str) {
        let shared = self.shared.clone();
        let moved = with_retry(
            &shared,
            Role::Reader,
            &mut self.reader,
            &self.config,
            "dead-lettering a row",
            |s| s.dead_letter(&shared.relay_id, row.shard, epoch, row.id, error),
        );
        match moved {
            Some(true) => {
                shared.dead_lettered.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(names::RELAY_DEAD_LETTERED).increment(1);
                tracing::warn!(relay = %shared.relay_id, id = row.id, topic = %row.topic, "dead-lettered: {error}");
            }
            // Refused (the lease changed under it): the row stays, below the cursor; the next
            // pass starts at the oldest row.
            Some(false) => shared.wake.ask_rescan(),
            None => return,
        }
        // Either way, the key's later rows in this pass wait.
        if let Some(k) = &row.partition_key {
            shared
                .blocked
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(k.clone());
        }
    }
}

/// Removes acknowledged rows in batches, dead-letters rejected ones, and asks the reader to
/// start over after any other failure.
fn commit_loop(shared: &Shared, mut store: Store, config: &Config, reports: Receiver<Report>) {
    const MAX_BATCH: usize = 5000;
    let retention = shared.config.retention;
    let mut acked: Vec<InFlight> = Vec::with_capacity(MAX_BATCH);
    // Clean up kept rows at start, then every minute.
    let mut last_cleanup = Instant::now() - Duration::from_secs(61);
    loop {
        let first = match reports.recv_timeout(Duration::from_millis(50)) {
            Ok(r) => Some(r),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        for report in first.into_iter().chain(reports.try_iter().take(MAX_BATCH)) {
            match report.outcome {
                Outcome::Delivered => {
                    // Commit (row creation) → acknowledgement, as the report arrived (not as
                    // this thread gets to it, after a removal it was busy with).
                    let ms = report.reported_ms - report.row.created_ms;
                    metrics::histogram!(names::RELAY_LATENCY).record(ms.max(0) as f64 / 1000.0);
                    let _ = shared
                        .latency
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .record(ms.max(1) as u64);
                    acked.push(report.row)
                }
                Outcome::Rejected(error, key) => {
                    let row = report.row;
                    let moved = with_retry(
                        shared,
                        Role::Background,
                        &mut store,
                        config,
                        "dead-lettering a row",
                        |s| s.dead_letter(&shared.relay_id, row.shard, row.epoch, row.id, &error),
                    );
                    if moved == Some(true) {
                        shared.dead_lettered.fetch_add(1, Ordering::Relaxed);
                        shared.settled.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!(names::RELAY_DEAD_LETTERED).increment(1);
                        tracing::warn!(relay = %shared.relay_id, id = row.id, "dead-lettered: {error}");
                    } else if moved == Some(false) {
                        // Refused (the lease changed): the row stays, below the cursor.
                        shared.wake.ask_rescan();
                    }
                    // With `block_key`, the key's rows read after this report wait (those
                    // already in the producer's queue cannot be called back).
                    if let Some(k) = key {
                        shared
                            .blocked
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(k);
                    }
                    shared.remove_in_flight([row.shard]);
                }
                Outcome::Failed(error) => {
                    tracing::warn!(relay = %shared.relay_id, id = report.row.id, "delivery failed: {error}");
                    shared.restart.store(true, Ordering::Release);
                    shared.remove_in_flight([report.row.shard]);
                }
                Outcome::BatchTooLarge(error) => {
                    tracing::debug!(relay = %shared.relay_id, id = report.row.id, "delivery failed: {error}");
                    shared
                        .wanted_batch_size
                        .fetch_min((report.row.batch / 2).max(1), Ordering::AcqRel);
                    shared.restart.store(true, Ordering::Release);
                    shared.remove_in_flight([report.row.shard]);
                }
            }
        }
        if !acked.is_empty() {
            let ids: Vec<i64> = acked.iter().map(|r| r.id).collect();
            let leases = shared.leases().owned;
            let removed = with_retry(
                shared,
                Role::Background,
                &mut store,
                config,
                "removing delivered rows",
                |s| s.complete(&shared.relay_id, &leases, &ids, retention),
            );
            if let Some(n) = removed {
                shared.settled.fetch_add(n as u64, Ordering::Relaxed);
                if n < ids.len() {
                    tracing::warn!(
                        relay = %shared.relay_id,
                        "{} delivered row(s) were not removed: their lease was lost; the new owner delivers them again",
                        ids.len() - n
                    );
                }
            }
            shared
                .delivered
                .fetch_add(acked.len() as u64, Ordering::Relaxed);
            metrics::counter!(names::RELAY_DELIVERED).increment(acked.len() as u64);
            shared.remove_in_flight(acked.drain(..).map(|r| r.shard));
        }
        if retention == crate::config::Retention::Keep
            && last_cleanup.elapsed() > Duration::from_secs(60)
        {
            last_cleanup = Instant::now();
            // One try a minute: a cleanup that keeps failing must not hold up the removals
            // (and so every delivery report) behind it. (A lost connection is opened again by
            // the next removal.)
            if let Err(e) = store.cleanup_delivered(shared.config.retention_hours) {
                warn_db(
                    &shared.relay_id,
                    "cleaning up kept rows failed (again in a minute)",
                    &e,
                );
            }
        }
    }
}

/// What the reader reads: the oldest rows after `after` of `shards`.
#[derive(Debug, Clone, PartialEq)]
struct FetchRequest {
    shards: Vec<i32>,
    after: i64,
    /// The highest id to read (the horizon's cap).
    until: Option<i64>,
    limit: u32,
    block_keys: bool,
    /// The pass it belongs to: a read-ahead is not used across passes.
    pass: u64,
}

type FetchResult = (FetchRequest, Result<Vec<Row>, DbError>);

/// Reads the reader's next batch on a connection of its own while the current one is sent.
/// A read-ahead result is a snapshot taken a little earlier than the reader's own read would
/// be; rows committed late below it are found by the next pass, as for any read.
struct Prefetcher {
    requests: crossbeam_channel::Sender<FetchRequest>,
    results: Receiver<FetchResult>,
    pending: Option<FetchRequest>,
}

impl Prefetcher {
    fn start(config: &Config) -> Result<Prefetcher, RelayError> {
        let mut store = Store::open_reader(config)?;
        let (requests, incoming) = crossbeam_channel::bounded::<FetchRequest>(1);
        let (done, results) = crossbeam_channel::bounded::<FetchResult>(1);
        let config = config.clone();
        std::thread::Builder::new()
            .name("devour-relay-read-ahead".into())
            .spawn(move || {
                for r in incoming {
                    let rows = store.fetch(&r.shards, r.after, r.until, r.limit, r.block_keys);
                    if rows.is_err() {
                        // The reader reads itself (with retries); be ready for the next one.
                        if let Ok(s) = Store::open_reader(&config) {
                            store = s;
                        }
                    }
                    if done.send((r, rows)).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| RelayError::Panicked(e.to_string()))?;
        Ok(Prefetcher {
            requests,
            results,
            pending: None,
        })
    }

    /// Starts reading `request` ahead (unless a read is already under way).
    fn ask(&mut self, request: FetchRequest) {
        if self.pending.is_none() && self.requests.send(request.clone()).is_ok() {
            self.pending = Some(request);
        }
    }

    /// The rows of `request` if they were read ahead; `None` if not (or it failed): then the
    /// reader reads itself. A read-ahead of something else is waited for and dropped.
    fn take(&mut self, request: &FetchRequest) -> Option<Vec<Row>> {
        self.pending.take()?;
        let (asked, rows) = self.results.recv().ok()?;
        let rows = rows.ok()?;
        // Read under a lower cap, the rows are still the oldest ones after the cursor (every
        // id up to that cap was settled, or waited for); if there were none, read again.
        let lower_cap = asked.until < request.until
            && FetchRequest {
                until: request.until,
                ..asked.clone()
            } == *request;
        (asked == *request || (lower_cap && !rows.is_empty())).then_some(rows)
    }
}

/// How long a stop waits for the committer's last removals before it stops the other threads.
const COMMITTER_GRACE: Duration = Duration::from_secs(5);

/// How long the start waits to learn whether the brokers accept the relay's credentials.
const ACCESS_CHECK: Duration = Duration::from_secs(10);

/// How often the backlog thread counts the outbox for the metrics.
const BACKLOG_EVERY: Duration = Duration::from_secs(10);

/// Sets the backlog gauges (rows in the outbox, age of the oldest) every `BACKLOG_EVERY`.
fn backlog_loop(shared: &Shared, mut store: Store, config: &Config) {
    let mut last = Instant::now() - BACKLOG_EVERY;
    // The last age measured, and when: while the database cannot be read, the oldest row
    // (if there was one) only gets older, and the gauge says so.
    let mut measured: Option<(f64, Instant)> = None;
    while !shared.threads_stop.load(Ordering::Acquire) {
        if last.elapsed() >= BACKLOG_EVERY {
            last = Instant::now();
            match store.backlog().and_then(|n| Ok((n, store.oldest_age_s()?))) {
                Ok((n, age)) => {
                    metrics::gauge!(names::RELAY_BACKLOG_ROWS).set(n as f64);
                    metrics::gauge!(names::RELAY_OLDEST_AGE).set(age);
                    measured = (n > 0).then(|| (age, Instant::now()));
                }
                Err(e) => {
                    if let Some((age, at)) = measured {
                        metrics::gauge!(names::RELAY_OLDEST_AGE)
                            .set(age + at.elapsed().as_secs_f64());
                    }
                    tracing::debug!(relay = %shared.relay_id, "counting the backlog: {e}");
                    // A broken connection is opened again for the next count.
                    if e.is_retriable() {
                        if let Ok(s) = Store::open(config) {
                            store = s;
                        }
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Keeps the leases: heartbeat, renew, take a fair share, hand back the excess (after its rows
/// in flight are removed), and on stop release everything.
fn lease_loop(shared: &Shared, mut store: Store, config: &Config) {
    let ttl = shared.config.lease_ttl_ms;
    let period = Duration::from_millis(ttl / 3);
    crate::telemetry::health().report_every(period);
    let id = shared.relay_id.clone();
    let shares = store.shares_shards();
    while !shared.threads_stop.load(Ordering::Acquire) {
        let started = Instant::now();
        let stopping = shared.stopping();
        let tick = (|| -> Result<(), DbError> {
            let live = store.heartbeat(&id, ttl)?;
            let (mut owned, mut sent_before) = store.renew(&id, ttl)?;
            let mut standby = None;
            let mut unattended = None;
            let before = shared.leases();
            // Only shards the reader could already see as going are handed back this tick.
            let mut releasing = before.releasing.clone();
            releasing.retain(|s| owned.contains_key(s));
            let announced = releasing.clone();
            if !stopping {
                if shares {
                    let target = (SHARDS as usize).div_ceil(live);
                    if owned.len() < target {
                        let (claimed, sent, _) = store.claim(&id, ttl, target - owned.len())?;
                        if !claimed.is_empty() {
                            tracing::info!(relay = %id, "took {} shard(s): {}", claimed.len(), shard_ranges(claimed.keys().copied()));
                        }
                        owned.extend(claimed);
                        sent_before.extend(sent);
                    } else if owned.len() > target {
                        let excess: Vec<i32> = owned
                            .keys()
                            .rev()
                            .take(owned.len() - target)
                            .copied()
                            .collect();
                        releasing.extend(excess);
                    }
                } else {
                    let (all, sent, holder) = store.claim(&id, ttl, SHARDS as usize)?;
                    owned = all;
                    sent_before = sent;
                    standby = holder;
                }
                if shared.drain && shares {
                    let (n, longest) = store.unattended(&id, ttl)?;
                    unattended = Some((n, longest, started));
                }
                // Hand back the shards whose rows in flight are all removed.
                let done: Vec<i32> = announced
                    .iter()
                    .copied()
                    .filter(|s| shared.in_flight_on(*s) == 0)
                    .collect();
                if !done.is_empty() {
                    store.release(&id, &done)?;
                    tracing::info!(relay = %id, "handed back {} shard(s) for rebalancing", done.len());
                    for s in &done {
                        owned.remove(s);
                        releasing.remove(s);
                    }
                }
            }
            let mut view = shared.leases.write().unwrap_or_else(|p| p.into_inner());
            // Trust the leases a little less long than the database does: stop sending before
            // another relay may take them.
            view.valid_until = started + Duration::from_millis(ttl - ttl / 5);
            // A shard new to the view (taken now, or in a tick that failed after taking it) or
            // held under a new epoch gets what its lease says was sent before; one still held
            // keeps what it had.
            let mut resent = before.resent;
            resent.retain(|s, _| owned.contains_key(s) && owned.get(s) == before.owned.get(s));
            for (s, through) in sent_before {
                if owned.contains_key(&s) && owned.get(&s) != before.owned.get(&s) {
                    resent.insert(s, through);
                }
            }
            view.owned = owned;
            view.resent = resent;
            view.releasing = releasing;
            view.standby = standby;
            view.unattended = unattended;
            Ok(())
        })();
        match tick {
            Ok(()) => {
                let leases = shared.leases();
                let held = leases.owned.len();
                metrics::gauge!(names::RELAY_LEASES_HELD).set(held as f64);
                let health = crate::telemetry::health();
                health.report("database", true, "leases renewed");
                let work = match &leases.standby {
                    Some(holder) => format!("standing by: {holder} drains this SQLite database"),
                    None => format!("{held} shard(s) held"),
                };
                health.report("work", held > 0, work);
            }
            Err(e) => {
                warn_db(&id, "lease renewal failed", &e);
                // Leases not renewed in time may be another relay's by now: count none.
                if Instant::now() >= shared.leases_valid_until() {
                    metrics::gauge!(names::RELAY_LEASES_HELD).set(0.0);
                    crate::telemetry::health().report("work", false, "leases not renewed in time");
                }
                crate::telemetry::health().report("database", false, e.to_string());
                if let Ok(s) = Store::open(config) {
                    store = s;
                }
            }
        }
        shared.wake.wake();
        let wait = if shared.stopping() {
            Duration::from_millis(50)
        } else {
            period
        };
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline && !shared.threads_stop.load(Ordering::Acquire) {
            std::thread::sleep(
                Duration::from_millis(20).min(deadline.saturating_duration_since(Instant::now())),
            );
        }
    }
    if let Err(e) = store.leave(&id) {
        tracing::warn!(relay = %id, "could not release leases on stop (they expire in {ttl} ms): {e}");
    }
    // Stopped: this relay holds nothing (also when it runs inside an application that goes on).
    metrics::gauge!(names::RELAY_LEASES_HELD).set(0.0);
}

/// PostgreSQL: LISTEN on `devour_outbox` and wake the reader on every notification.
#[cfg(feature = "postgres")]
/// A connection that listens on the outbox's channel; or what failed (the warning's kind) and
/// why.
#[cfg(feature = "postgres")]
fn listen(url: &str) -> Result<diesel::PgConnection, (&'static str, String)> {
    use diesel::prelude::*;
    let mut conn = diesel::PgConnection::establish(&crate::db::postgres::with_client_timeouts(url))
        .map_err(|e| {
            (
                "LISTEN connection failed (polling meanwhile)",
                e.to_string(),
            )
        })?;
    diesel::sql_query("LISTEN devour_outbox")
        .execute(&mut conn)
        .map_err(|e| ("LISTEN failed (polling meanwhile)", e.to_string()))?;
    Ok(conn)
}

/// Wakes the reader on the outbox's notifications, on `first` (listening since before the
/// first read) and then on connections of its own.
#[cfg(feature = "postgres")]
fn listen_loop(shared: &Shared, url: &str, mut first: Option<diesel::PgConnection>) {
    use diesel::prelude::*;
    while !shared.threads_stop.load(Ordering::Acquire) {
        let mut conn = match first.take() {
            Some(c) => c,
            None => match listen(url) {
                Ok(c) => {
                    // Notifications sent while no connection listened are lost, a rescan
                    // request among them perhaps: look from the oldest row once.
                    shared.wake.ask_rescan();
                    c
                }
                Err((kind, e)) => {
                    warn_db(&shared.relay_id, kind, &e);
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            },
        };
        let mut last_check = Instant::now();
        'conn: while !shared.threads_stop.load(Ordering::Acquire) {
            let mut woke = false;
            for n in conn.notifications_iter() {
                match n {
                    Ok(n) => {
                        woke = true;
                        if n.payload == super::RESCAN {
                            shared.wake.ask_rescan();
                        }
                    }
                    Err(e) => {
                        warn_db(&shared.relay_id, "LISTEN connection lost", &e);
                        break 'conn;
                    }
                }
            }
            if woke {
                shared.wake.wake();
            }
            // notifications_iter never blocks: check often, and probe the connection now and then.
            if last_check.elapsed() > Duration::from_secs(5) {
                last_check = Instant::now();
                if diesel::sql_query("SELECT 1").execute(&mut conn).is_err() {
                    break 'conn;
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The progress bar of `--drain` on a terminal.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    last: Instant,
}

impl Progress {
    fn new(options: &RunOptions) -> Progress {
        let bar = (options.progress && options.mode == Mode::Drain).then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {msg} [{elapsed_precise}]")
                    .expect("valid template"),
            );
            bar
        });
        Progress {
            bar,
            last: Instant::now() - Duration::from_secs(10),
        }
    }

    fn tick(&mut self, shared: &Shared, store: &mut Store) {
        let Some(bar) = &self.bar else { return };
        // Counting the backlog costs a scan: not more than every 2 s.
        if self.last.elapsed() < Duration::from_secs(2) {
            return;
        }
        self.last = Instant::now();
        let delivered = shared.delivered.load(Ordering::Relaxed);
        let left = store
            .backlog()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "?".into());
        let rate = delivered as f64 / bar.elapsed().as_secs_f64().max(0.001);
        bar.set_message(format!(
            "{left} rows left, {delivered} delivered, {rate:.0} msg/s"
        ));
        bar.tick();
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sample every 10 ms for 3 s, each held by one transaction left open (plus a writer of
    /// its own), thinned after each as `refresh` does: a few dozen stay instead of 300, they
    /// grow old, and the cap is the newest sample older than `WRITER_WAIT`, as without
    /// thinning.
    #[test]
    fn shards_are_logged_as_ranges() {
        assert_eq!(shard_ranges(0..256), "0-255");
        assert_eq!(shard_ranges([1, 2, 3, 7, 9, 10]), "1-3, 7, 9-10");
        assert_eq!(shard_ranges([]), "");
    }

    #[test]
    fn thinning_keeps_few_samples_that_grow_old() {
        let now = Instant::now();
        let start = now - Duration::from_millis(3000);
        let mut h = Horizon {
            enabled: true,
            refreshed: Some(now),
            ever_worked: true,
            samples: std::collections::VecDeque::new(),
            settled: 999,
            server_started_us: None,
            warned: false,
            origin: start,
        };
        for i in 0..=300 {
            let taken = start + Duration::from_millis(10 * i as u64);
            h.samples.push_back(Sample {
                last_id: 1000 + i,
                holders: vec!["1/7".into(), format!("2/{i}")],
                taken,
            });
            h.thin_at(taken);
        }
        assert!(h.samples.len() <= 40, "{} samples kept", h.samples.len());
        let ids: Vec<i64> = h.samples.iter().map(|s| s.last_id).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        assert_eq!(ids.last(), Some(&1300), "the newest stays");
        // Taken 2 s (200 samples) before the newest: within one thinning slot of it.
        let cap = h.cap().unwrap();
        assert!((1090..=1100).contains(&cap), "cap {cap}; kept {ids:?}");
    }
}
