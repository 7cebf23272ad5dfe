//! One message (or, with the inbox, one batch) through the handler: decoding, retries with
//! backoff, the dead-letter topic, and the inbox transaction. `Dispatcher::handle` says how many
//! messages of a batch are finished (handled, skipped as a duplicate, or dead-lettered): only
//! their offsets may be stored.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use diesel::Connection;
use rdkafka::message::BorrowedMessage;
use rdkafka::Message;

use super::dead_letter::DeadLetters;
use super::handler::{
    Action, CallError, Ctx, DynConsumer, HeadersRef, Meta, OwnedHeader, TxConnection,
};
use super::inbox::{self, InboxEntry};
use crate::config::ConsumerRoute;
use crate::db::{DbConnection, DbError, DbPool};

/// A message as the dispatcher needs it: borrowed from the consumer (one worker) or owned
/// (handed to a worker thread).
pub(crate) trait Record {
    fn meta<'a>(&'a self, route: &'a str, attempt: u32) -> Meta<'a>;
    fn payload_bytes(&self) -> Option<&[u8]>;
    /// Topic, partition and offset.
    fn place(&self) -> (&str, i32, i64);
}

impl Record for BorrowedMessage<'_> {
    fn meta<'a>(&'a self, route: &'a str, attempt: u32) -> Meta<'a> {
        Meta {
            route,
            topic: self.topic(),
            partition: self.partition(),
            offset: self.offset(),
            key: self.key(),
            timestamp_ms: self.timestamp().to_millis(),
            attempt,
            payload: self.payload(),
            headers: HeadersRef::Borrowed(self),
        }
    }
    fn payload_bytes(&self) -> Option<&[u8]> {
        self.payload()
    }
    fn place(&self) -> (&str, i32, i64) {
        (self.topic(), self.partition(), self.offset())
    }
}

/// A message copied out of the consumer, for a worker thread.
pub(crate) struct Detached {
    topic: String,
    partition: i32,
    offset: i64,
    key: Option<Box<[u8]>>,
    payload: Option<Box<[u8]>>,
    timestamp_ms: Option<i64>,
    headers: Vec<OwnedHeader>,
}

impl Detached {
    pub(crate) fn of(m: &BorrowedMessage<'_>) -> Detached {
        let meta = m.meta("", 0);
        Detached {
            topic: meta.topic.to_string(),
            partition: meta.partition,
            offset: meta.offset,
            key: meta.key.map(Box::from),
            payload: meta.payload.map(Box::from),
            timestamp_ms: meta.timestamp_ms,
            headers: meta
                .raw_headers()
                .map(|(k, v)| (Box::from(k), v.map(Box::from)))
                .collect(),
        }
    }
}

impl Record for Detached {
    fn meta<'a>(&'a self, route: &'a str, attempt: u32) -> Meta<'a> {
        Meta {
            route,
            topic: &self.topic,
            partition: self.partition,
            offset: self.offset,
            key: self.key.as_deref(),
            timestamp_ms: self.timestamp_ms,
            attempt,
            payload: self.payload.as_deref(),
            headers: HeadersRef::Owned(&self.headers),
        }
    }
    fn payload_bytes(&self) -> Option<&[u8]> {
        self.payload.as_deref()
    }
    fn place(&self) -> (&str, i32, i64) {
        (&self.topic, self.partition, self.offset)
    }
}

/// Counters of one run, shared by the workers.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub processed: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub duplicates: AtomicU64,
    pub retries: AtomicU64,
    /// Why a handler stopped the run ([`DigestError::stop`](super::DigestError::stop)).
    pub stopped_by: std::sync::Mutex<Option<String>>,
}

/// The route's counters in the installed `metrics` recorder (no-ops without one).
struct Meters {
    processed: metrics::Counter,
    retried: metrics::Counter,
    dead_lettered: metrics::Counter,
    duplicates: metrics::Counter,
}

impl Meters {
    fn new(route: &str) -> Meters {
        use crate::telemetry::names;
        let route = route.to_string();
        Meters {
            processed: metrics::counter!(names::CONSUME_PROCESSED, "route" => route.clone()),
            retried: metrics::counter!(names::CONSUME_RETRIED, "route" => route.clone()),
            dead_lettered: metrics::counter!(names::CONSUME_DEAD_LETTERED, "route" => route.clone()),
            duplicates: metrics::counter!(names::CONSUME_DUPLICATES, "route" => route),
        }
    }
}

/// Why an attempt failed.
enum Failure {
    Undecodable(String),
    Handler(String, Action),
    /// The database failed (not the handler): retried without counting an attempt.
    Db(DbError),
}

impl From<CallError> for Failure {
    fn from(e: CallError) -> Failure {
        match e {
            CallError::Undecodable(e) => Failure::Undecodable(e),
            CallError::Digest(d) => Failure::Handler(d.error, d.action),
        }
    }
}

/// The run was asked to stop while a message was unfinished.
pub(crate) struct Stopped;

/// What follows a failed attempt.
enum Next {
    /// Call the handler again, as attempt + 1.
    Retry,
    /// Repeat the same attempt (the database failed, not the handler).
    Again,
    /// Finished: dead-lettered.
    Finished,
}

/// A transaction's end other than commit.
enum TxError {
    Db(diesel::result::Error),
    /// Message `usize` of the batch failed; nothing of the batch was committed.
    Failed(usize, Failure),
}

impl From<diesel::result::Error> for TxError {
    fn from(e: diesel::result::Error) -> TxError {
        TxError::Db(e)
    }
}

/// A connection that can record inbox entries and lend itself to a handler.
trait InboxConnection: Connection + diesel::r2d2::R2D2Connection {
    /// Records `entries` in the inbox; says which are new.
    fn claim(&mut self, group: &str, entries: &[InboxEntry<'_>]) -> diesel::QueryResult<Vec<bool>>;
    fn lend(&mut self) -> TxConnection<'_>;
    /// Fails if the transaction can no longer commit.
    fn still_open(&mut self) -> diesel::QueryResult<()>;
}

#[cfg(feature = "postgres")]
impl InboxConnection for diesel::PgConnection {
    fn claim(&mut self, group: &str, entries: &[InboxEntry<'_>]) -> diesel::QueryResult<Vec<bool>> {
        inbox::claim(self, group, entries)
    }
    fn lend(&mut self) -> TxConnection<'_> {
        TxConnection::Postgres(self)
    }
    fn still_open(&mut self) -> diesel::QueryResult<()> {
        use diesel::RunQueryDsl;
        diesel::sql_query("SELECT 1").execute(self).map(|_| ())
    }
}

#[cfg(feature = "sqlite")]
impl InboxConnection for diesel::SqliteConnection {
    fn claim(&mut self, group: &str, entries: &[InboxEntry<'_>]) -> diesel::QueryResult<Vec<bool>> {
        inbox::claim(self, group, entries)
    }
    fn lend(&mut self) -> TxConnection<'_> {
        TxConnection::Sqlite(self)
    }
    fn still_open(&mut self) -> diesel::QueryResult<()> {
        // SQLite has no aborted state: a failed statement leaves the transaction usable.
        Ok(())
    }
}

/// Handles the messages of the partitions given to one worker.
pub(crate) struct Dispatcher {
    route: Arc<ConsumerRoute>,
    handler: Box<dyn DynConsumer>,
    dead_letters: Arc<DeadLetters>,
    pool: Option<DbPool>,
    conn: Option<DbConnection>,
    stop: Arc<AtomicBool>,
    stats: Arc<Stats>,
    meters: Meters,
}

impl Dispatcher {
    pub(crate) fn new(
        route: Arc<ConsumerRoute>,
        handler: Box<dyn DynConsumer>,
        dead_letters: Arc<DeadLetters>,
        pool: Option<DbPool>,
        stop: Arc<AtomicBool>,
        stats: Arc<Stats>,
    ) -> Dispatcher {
        Dispatcher {
            meters: Meters::new(&route.name),
            route,
            handler,
            dead_letters,
            pool,
            conn: None,
            stop,
            stats,
        }
    }

    /// Handles `batch` in order; returns how many of its first messages are finished: all of
    /// them, unless a stop came while one was unfinished. Before a message's retries (waits of
    /// up to `max_backoff_ms` each), `progress` gets the batch's messages finished so far, so
    /// that their offsets need not wait for it.
    pub(crate) fn handle<R: Record>(
        &mut self,
        batch: &[R],
        progress: &mut dyn FnMut(&[R]),
    ) -> usize {
        let mut finished = 0;
        let mut report = |n: usize| progress(&batch[..n]);
        let _ = if self.route.inbox {
            self.inbox_batch(batch, &mut finished, &mut report)
        } else {
            batch.iter().try_for_each(|m| {
                // Stopping: finish the message in hand, start no other.
                if self.stop.load(Ordering::Relaxed) {
                    return Err(Stopped);
                }
                if let Err(f) = self.attempt(m, 1) {
                    report(finished);
                    self.one(m, Some(f))?;
                }
                finished += 1;
                Ok(())
            })
        };
        finished
    }

    /// Sleeps `d` unless a stop comes first (then `false`).
    fn pause(&self, d: Duration) -> bool {
        let until = std::time::Instant::now() + d;
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return false;
            }
            let now = std::time::Instant::now();
            if now >= until {
                return true;
            }
            std::thread::sleep((until - now).min(Duration::from_millis(50)));
        }
    }

    /// One message, alone, through every attempt it needs. `first` is the failure of an attempt
    /// already made (in a batch).
    fn one<R: Record>(&mut self, m: &R, first: Option<Failure>) -> Result<(), Stopped> {
        let mut attempt = 1;
        let mut failure = first;
        loop {
            let f = match failure.take() {
                Some(f) => f,
                None => match self.attempt(m, attempt) {
                    Ok(()) => return Ok(()),
                    Err(f) => f,
                },
            };
            match self.after_failure(m, attempt, f)? {
                Next::Retry => attempt += 1,
                Next::Again => {}
                Next::Finished => return Ok(()),
            }
        }
    }

    /// Calls the handler once (in an inbox transaction when the route has one).
    fn attempt<R: Record>(&mut self, m: &R, attempt: u32) -> Result<(), Failure> {
        if !self.route.inbox {
            let meta = m.meta(&self.route.name, attempt);
            let r = call(
                &mut *self.handler,
                &meta,
                m.payload_bytes(),
                self.route.dump,
                &mut Ctx::none(),
            );
            if r.is_ok() {
                self.stats.processed.fetch_add(1, Ordering::Relaxed);
                self.meters.processed.increment(1);
            }
            return r;
        }
        match self.inbox_tx(std::slice::from_ref(m), attempt) {
            Ok(()) => Ok(()),
            Err(TxError::Db(e)) => Err(Failure::Db(e.into())),
            Err(TxError::Failed(_, f)) => Err(f),
        }
    }

    /// Decides what follows failed attempt `attempt`, waiting out the backoff.
    fn after_failure<R: Record>(
        &mut self,
        m: &R,
        attempt: u32,
        f: Failure,
    ) -> Result<Next, Stopped> {
        let meta = m.meta(&self.route.name, attempt);
        let (error, after) = match f {
            Failure::Db(e) if !e.is_retriable() => {
                // Not the connection: the transaction itself fails (a constraint at COMMIT, …).
                // Count it as the message's failure, so that it ends in the dead-letter topic
                // instead of stopping the partition for good.
                self.conn = None;
                (format!("database: {e}"), None)
            }
            Failure::Db(e) => {
                self.conn = None;
                crate::telemetry::health().report("database", false, e.to_string());
                tracing::warn!(
                    route = %self.route.name, topic = meta.topic, partition = meta.partition, offset = meta.offset,
                    "inbox database failed, trying again: {}", crate::telemetry::one_line_error(&e)
                );
                let wait = Duration::from_millis(self.route.retry.max_backoff_ms.min(2_000));
                return if self.pause(wait) {
                    Ok(Next::Again)
                } else {
                    Err(Stopped)
                };
            }
            Failure::Undecodable(e) => {
                return self.dead_letter(m, attempt, &format!("undecodable: {e}"));
            }
            Failure::Handler(e, Action::GiveUp) => {
                return self.dead_letter(m, attempt, &format!("gave up: {e}"));
            }
            Failure::Handler(e, Action::Stop) => {
                tracing::error!(
                    route = %self.route.name, topic = meta.topic, partition = meta.partition, offset = meta.offset,
                    "the handler stopped the consumer: {e}"
                );
                self.stats
                    .stopped_by
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert(e);
                self.stop.store(true, Ordering::Relaxed);
                return Err(Stopped);
            }
            Failure::Handler(e, Action::Retry(after)) => (e, after),
        };
        let max = self.route.retry.max_attempts;
        if attempt >= max {
            return self.dead_letter(
                m,
                attempt,
                &format!("failed {attempt} time(s), last: {error}"),
            );
        }
        let wait =
            after.unwrap_or_else(|| Duration::from_millis(self.route.retry.backoff_ms(attempt)));
        tracing::warn!(
            route = %self.route.name, topic = meta.topic, partition = meta.partition, offset = meta.offset,
            "attempt {attempt}/{max} failed, next in {} ms: {error}", wait.as_millis()
        );
        self.stats.retries.fetch_add(1, Ordering::Relaxed);
        self.meters.retried.increment(1);
        if self.pause(wait) {
            Ok(Next::Retry)
        } else {
            Err(Stopped)
        }
    }

    /// Publishes `m` to the dead-letter topic, trying until the broker takes it or a stop comes.
    fn dead_letter<R: Record>(
        &mut self,
        m: &R,
        attempts: u32,
        error: &str,
    ) -> Result<Next, Stopped> {
        let meta = m.meta(&self.route.name, attempts);
        let mut wait = Duration::from_millis(100);
        loop {
            match self
                .dead_letters
                .publish(&meta, m.payload_bytes(), error, attempts, &self.stop)
            {
                Ok(topic) => {
                    tracing::error!(
                        route = %self.route.name, topic = meta.topic, partition = meta.partition, offset = meta.offset,
                        "sent to dead-letter topic {topic} after {attempts} attempt(s): {error}"
                    );
                    self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    self.meters.dead_lettered.increment(1);
                    return Ok(Next::Finished);
                }
                Err(e) => {
                    tracing::warn!(
                        route = %self.route.name, topic = meta.topic, partition = meta.partition, offset = meta.offset,
                        "cannot dead-letter yet, trying again in {} ms: {e}", wait.as_millis()
                    );
                    if !self.pause(wait) {
                        return Err(Stopped);
                    }
                    wait = (wait * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    /// The batch in inbox transactions: all of it in one when every message succeeds; else the
    /// part before the failing message in one, the failing one alone (retries, dead letter),
    /// and the rest again as a batch.
    fn inbox_batch<R: Record>(
        &mut self,
        batch: &[R],
        finished: &mut usize,
        report: &mut dyn FnMut(usize),
    ) -> Result<(), Stopped> {
        if batch.is_empty() {
            return Ok(());
        }
        if self.stop.load(Ordering::Relaxed) {
            return Err(Stopped);
        }
        loop {
            match self.inbox_tx(batch, 1) {
                Ok(()) => {
                    *finished += batch.len();
                    return Ok(());
                }
                Err(TxError::Db(e)) if !crate::db::query_is_retriable(&e) => {
                    // The batch's transaction fails for good, and one of its messages is the
                    // cause: handle them one by one so that only that one fails. A batch of one
                    // is that message: this was its first attempt.
                    self.conn = None;
                    if let [m] = batch {
                        report(*finished);
                        self.one(m, Some(Failure::Db(e.into())))?;
                        *finished += 1;
                        return Ok(());
                    }
                    for m in batch {
                        if self.stop.load(Ordering::Relaxed) {
                            return Err(Stopped);
                        }
                        if let Err(f) = self.attempt(m, 1) {
                            report(*finished);
                            self.one(m, Some(f))?;
                        }
                        *finished += 1;
                    }
                    return Ok(());
                }
                Err(TxError::Db(e)) => {
                    // No attempt is lost: let `one` wait and retry the first message, then go on.
                    self.conn = None;
                    let f = Failure::Db(e.into());
                    match self.after_failure(&batch[0], 1, f)? {
                        Next::Again | Next::Retry => continue,
                        Next::Finished => unreachable!("a database failure never dead-letters"),
                    }
                }
                Err(TxError::Failed(k, f)) => {
                    self.inbox_batch(&batch[..k], finished, report)?;
                    report(*finished);
                    self.one(&batch[k], Some(f))?;
                    *finished += 1;
                    return self.inbox_batch(&batch[k + 1..], finished, report);
                }
            }
        }
    }

    /// One transaction: records `batch` in the inbox, then hands every message that was not
    /// there yet to the handler with the transaction's connection. Commits only if all succeed.
    fn inbox_tx<R: Record>(&mut self, batch: &[R], attempt: u32) -> Result<(), TxError> {
        if self.conn.is_none() {
            let pool = self.pool.as_ref().expect("an inbox route has a pool");
            self.conn = Some(pool.get().map_err(|e| TxError::Db(to_diesel(e)))?);
        }
        let conn = self.conn.as_mut().expect("just set");
        let route = &*self.route;
        let handler = &mut *self.handler;
        // Each message's meta once, for its inbox record and its handler (reading a
        // message's topic and headers from librdkafka is not free).
        let metas: Vec<Meta<'_>> = batch.iter().map(|m| m.meta(&route.name, attempt)).collect();
        let entries: Vec<InboxEntry<'_>> = metas.iter().map(inbox_entry).collect();
        let result = crate::db::each_backend!(conn, c => {
            let c: &mut _ = &mut **c;
            let r = run_inbox_tx(c, route, handler, batch, &metas, &entries);
            (r, diesel::r2d2::R2D2Connection::is_broken(c))
        });
        let (handled, skipped) = match result {
            (r, false) => r?,
            (r, true) => {
                // A transaction is still open: a handler opened one of its own and panicked
                // inside it (or left it unfinished), so the rollback above only went back to a
                // savepoint, or the commit only released one. Nothing of the batch committed.
                // Dropping the connection ends the transaction (the pool discards it).
                self.conn = None;
                r?;
                return Err(TxError::Db(diesel::result::Error::DatabaseError(
                    diesel::result::DatabaseErrorKind::Unknown,
                    Box::new(
                        "the handler left a transaction of its own open; nothing was committed"
                            .to_string(),
                    ),
                )));
            }
        };
        self.stats.processed.fetch_add(handled, Ordering::Relaxed);
        self.stats.duplicates.fetch_add(skipped, Ordering::Relaxed);
        self.meters.processed.increment(handled);
        self.meters.duplicates.increment(skipped);
        crate::telemetry::health().report("database", true, "inbox transaction committed");
        Ok(())
    }
}

/// A message's inbox record: keyed by its `message-id` header, else by where it was read.
fn inbox_entry<'a>(meta: &Meta<'a>) -> InboxEntry<'a> {
    let (id, resent) = meta.id_and_resent();
    InboxEntry {
        key: match id {
            Some(id) => id.into(),
            None => format!("{}/{}/{}", meta.topic, meta.partition, meta.offset).into(),
        },
        topic: meta.topic,
        partition: meta.partition,
        offset: meta.offset,
        resent,
    }
}

fn to_diesel(e: DbError) -> diesel::result::Error {
    match e {
        DbError::Query(q) => q,
        other => diesel::result::Error::DatabaseError(
            diesel::result::DatabaseErrorKind::ClosedConnection,
            Box::new(other.to_string()),
        ),
    }
}

/// The inbox transaction on a concrete connection; returns (handled, skipped as duplicates).
fn run_inbox_tx<C: InboxConnection, R: Record>(
    c: &mut C,
    route: &ConsumerRoute,
    handler: &mut dyn DynConsumer,
    batch: &[R],
    metas: &[Meta<'_>],
    entries: &[InboxEntry<'_>],
) -> Result<(u64, u64), TxError> {
    c.transaction::<_, TxError, _>(|c| {
        let new = c.claim(&route.group, entries)?;
        let (mut handled, mut skipped, mut lent) = (0, 0, false);
        for (i, ((m, meta), new)) in batch.iter().zip(metas).zip(new).enumerate() {
            if !new {
                skipped += 1;
                continue;
            }
            let mut ctx = Ctx::with(c.lend());
            let r = call(handler, meta, m.payload_bytes(), route.dump, &mut ctx);
            lent |= ctx.lent;
            r.map_err(|f| TxError::Failed(i, f))?;
            handled += 1;
        }
        // A handler that swallowed a database error leaves PostgreSQL's transaction aborted,
        // and COMMIT of an aborted transaction rolls back without an error: ask first (unless
        // no handler took the connection: devour's own statements all succeeded).
        if lent {
            c.still_open()?;
        }
        Ok((handled, skipped))
    })
}

/// Calls the handler, turning a panic into a retriable failure.
fn call(
    handler: &mut dyn DynConsumer,
    meta: &Meta<'_>,
    payload: Option<&[u8]>,
    dump: crate::config::Dump,
    ctx: &mut Ctx<'_>,
) -> Result<(), Failure> {
    match catch_unwind(AssertUnwindSafe(|| handler.call(meta, payload, dump, ctx))) {
        Ok(r) => r.map_err(Failure::from),
        Err(p) => Err(Failure::Handler(
            format!("handler panicked: {}", crate::relay::panic_message(&p)),
            Action::Retry(None),
        )),
    }
}
