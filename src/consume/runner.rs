//! The consumer loop of one route: polling, handing messages to the dispatcher (inline, or to
//! one worker thread per slice of partitions), storing offsets of finished messages, committing
//! on revoke and on stop, and noticing when a drain is complete.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::Message;

use super::dead_letter::DeadLetters;
use super::dispatch::{Detached, Dispatcher, Record, Stats};
use super::handler::Registry;
use super::{ConsumeError, ConsumeReport, RunOptions};
use crate::config::{Config, ConsumerRoute, ConsumerType};
use crate::db::DbPool;

/// Most messages handled per batch without an inbox (what librdkafka has fetched already).
const BATCH: usize = 64;
/// How long one poll waits for a message.
const POLL: Duration = Duration::from_millis(100);
/// How often finished messages' offsets are handed to librdkafka (which commits them every
/// `auto.commit.interval.ms`).
const STORE_EVERY: Duration = Duration::from_millis(200);
/// How often an idle drain asks the broker whether it is at the end.
const DRAIN_CHECK_EVERY: Duration = Duration::from_millis(500);
/// How often check `work` is reported.
const HEALTH_EVERY: Duration = Duration::from_secs(5);
/// How long a drain waits for partitions before it decides there is nothing to drain.
const NOTHING_ASSIGNED: Duration = Duration::from_secs(15);
/// How often old inbox rows are deleted.
const INBOX_CLEANUP_EVERY: Duration = Duration::from_secs(3600);

/// Next offsets to store, per partition: finished messages' offsets + 1.
#[derive(Default)]
struct Offsets {
    next: Vec<(String, i32, i64)>,
}

impl Offsets {
    fn mark(&mut self, topic: &str, partition: i32, offset: i64) {
        match self
            .next
            .iter_mut()
            .find(|(t, p, _)| *p == partition && t == topic)
        {
            Some(e) => e.2 = e.2.max(offset + 1),
            None => self.next.push((topic.to_string(), partition, offset + 1)),
        }
    }

    fn take(&mut self) -> Option<TopicPartitionList> {
        if self.next.is_empty() {
            return None;
        }
        let mut tpl = TopicPartitionList::new();
        for (t, p, o) in self.next.drain(..) {
            let _ = tpl.add_partition_offset(&t, p, Offset::Offset(o));
        }
        Some(tpl)
    }
}

/// What the poll thread, the workers and the rebalance callback share.
#[derive(Default)]
struct Shared {
    /// Bumped when partitions are revoked: messages polled before may belong to another
    /// member now.
    revocations: std::sync::atomic::AtomicU64,
    offsets: Mutex<Offsets>,
    /// Messages handed to workers and not yet finished or dropped.
    in_flight: Mutex<usize>,
    settled: Condvar,
}

impl Shared {
    fn finished(&self, n: usize) {
        let mut f = self.in_flight.lock().expect("in-flight lock");
        *f -= n;
        if *f == 0 {
            self.settled.notify_all();
        }
    }

    /// Records `finished` messages (in order) as done: their offsets + 1 are the next to store.
    fn mark<R: Record>(&self, finished: &[R]) {
        if finished.is_empty() {
            return;
        }
        let mut offsets = self.offsets.lock().expect("offsets lock");
        for m in finished {
            let (topic, partition, offset) = m.place();
            offsets.mark(topic, partition, offset);
        }
    }

    fn wait_settled(&self) {
        let mut f = self.in_flight.lock().expect("in-flight lock");
        while *f > 0 {
            f = self.settled.wait(f).expect("in-flight lock");
        }
    }

    /// Hands the finished messages' offsets to librdkafka.
    fn store<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>) {
        let tpl = self.offsets.lock().expect("offsets lock").take();
        if let Some(tpl) = tpl {
            if let Err(e) = consumer.store_offsets(&tpl) {
                // A partition revoked meanwhile: its next owner redelivers (at least once).
                tracing::debug!("storing offsets: {e}");
            }
        }
    }
}

/// A worker's queue. When the worker ends (a panic included), what is still queued for it is
/// no longer in flight, so that a revoke waiting for in-flight messages does not wait forever.
struct Queue {
    rx: crossbeam_channel::Receiver<Detached>,
    shared: Arc<Shared>,
}

impl Drop for Queue {
    fn drop(&mut self) {
        let n = self.rx.try_iter().count();
        if n > 0 {
            self.shared.finished(n);
        }
    }
}

/// Marks `n` messages as no longer in flight when dropped.
struct Settle<'a>(&'a Shared, usize);

impl Drop for Settle<'_> {
    fn drop(&mut self) {
        self.0.finished(self.1);
    }
}

struct RunnerContext {
    shared: Arc<Shared>,
    route: String,
    quiet: crate::kafka_log::Quiet,
    /// `start_from = "latest"`: commit where a partition the group never committed starts.
    pin_latest: bool,
    /// `kafka.offsets_channel_socket_timeout_ms`.
    offsets_timeout: Duration,
}

crate::kafka_log::quiet_client_context!(RunnerContext);

impl ConsumerContext for RunnerContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            if self.pin_latest {
                pin_latest(consumer, tpl, &self.route, self.offsets_timeout);
            }
        }
        if let Rebalance::Revoke(tpl) = rebalance {
            // A batch being filled on the polling thread (this callback runs inside its poll)
            // is dropped, not handled: its partitions are someone else's from now on.
            self.shared.revocations.fetch_add(1, Ordering::Release);
            // Finish what is in hand, store and commit its offsets, then let the partitions go.
            self.shared.wait_settled();
            self.shared.store(consumer);
            match consumer.commit_consumer_state(CommitMode::Sync) {
                Ok(())
                | Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
                Err(e) => tracing::warn!(route = %self.route, "commit before revoke: {e}"),
            }
            tracing::info!(route = %self.route, "partitions revoked: {}", describe(tpl));
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(route = %self.route, "partitions assigned: {}", describe(tpl))
            }
            Rebalance::Error(e) => tracing::warn!(route = %self.route, "rebalance failed: {e}"),
            Rebalance::Revoke(_) => {}
        }
    }
}

/// With `start_from = "latest"`, a partition its group never committed starts at its end. That
/// end is committed before the partition is taken (assigned by the group, or by a simple
/// consumer to itself), so the consumer starts there too: a
/// consumer that stops or dies before its own first commit would otherwise leave the next one
/// to start at the end as it is then, skipping every message in between, and the group's lag
/// would read 0 until that first commit. Best effort: on failure, the start is librdkafka's.
fn pin_latest<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    tpl: &TopicPartitionList,
    route: &str,
    timeout: Duration,
) {
    let committed = match consumer.committed_offsets(tpl.clone(), timeout) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(route = %route, "reading committed offsets at assignment: {e}");
            return;
        }
    };
    let mut pin = TopicPartitionList::new();
    for e in committed.elements() {
        if matches!(e.offset(), Offset::Offset(_)) {
            continue;
        }
        match consumer.fetch_watermarks(e.topic(), e.partition(), timeout) {
            Ok((_, end)) => {
                if let Err(err) =
                    pin.add_partition_offset(e.topic(), e.partition(), Offset::Offset(end))
                {
                    tracing::warn!(route = %route, "{err}");
                    return;
                }
            }
            Err(err) => {
                tracing::warn!(route = %route, "end of {}[{}] at assignment: {err}", e.topic(), e.partition());
                return;
            }
        }
    }
    if pin.count() == 0 {
        return;
    }
    match consumer.commit(&pin, CommitMode::Sync) {
        Ok(()) => {
            tracing::info!(route = %route, "start_from = \"latest\": starting at the end of {}", describe(&pin))
        }
        Err(e) => tracing::warn!(route = %route, "committing where it starts: {e}"),
    }
}

fn describe(tpl: &TopicPartitionList) -> String {
    let mut parts: Vec<String> = tpl
        .elements()
        .iter()
        .map(|e| format!("{}[{}]", e.topic(), e.partition()))
        .collect();
    if parts.is_empty() {
        parts.push("none".into());
    }
    parts.join(", ")
}

/// Runs consumer route `name` of `config` with the handlers of `registry` until `stop` is set
/// (or, with [`RunOptions::drain`], until the assigned partitions are read to their end). On
/// stop: no more fetching, the message in hand is finished, offsets are committed, the consumer
/// leaves its group.
pub fn run(
    config: &Config,
    name: &str,
    registry: &Registry,
    options: RunOptions,
    stop: Arc<AtomicBool>,
) -> Result<ConsumeReport, ConsumeError> {
    let route = config
        .consumers
        .get(name)
        .ok_or_else(|| ConsumeError::UnknownRoute {
            name: name.to_string(),
            known: config.consumers.keys().cloned().collect(),
        })?;
    let route = Arc::new(route.clone());
    let mut handlers = Vec::with_capacity(route.concurrency);
    for _ in 0..route.concurrency {
        handlers.push(
            registry
                .instantiate(&route)
                .map_err(ConsumeError::Handler)?,
        );
    }
    let pool = if route.inbox {
        let pool = DbPool::connect_lazy(&config.database)?;
        let connect_timeout = Duration::from_millis(config.database.connect_timeout_ms);
        let Some(mut conn) = pool.get_or_stop(&stop, connect_timeout)? else {
            // Stopped while the database was not up yet: a clean stop, nothing done.
            tracing::info!(
                route = name,
                "stopped before the database answered; nothing was done"
            );
            let clock = Clock {
                first: None,
                last: None,
            };
            return Ok(report(&Stats::default(), Instant::now(), &clock));
        };
        super::inbox::check_table(&mut conn).map_err(|e| ConsumeError::Inbox(format!(
            "`consumers.{name}.inbox` needs the inbox tables devour_inbox_offsets and devour_inbox_batches ({e}); run `devour migrate` or start with --migrate"
        )))?;
        let removed = super::inbox::cleanup(&mut conn, &route.group, route.inbox_retention_hours)?;
        tracing::debug!(route = name, "inbox cleanup removed {removed} row(s)");
        drop(conn);
        // Each worker holds a connection while it handles a batch, and the health check takes
        // one more: open them all now, so that a server allowing fewer fails the start.
        pool.open(
            route.concurrency as u32 + 1,
            &format!(
                "consumers.{name} (inbox, concurrency {})",
                route.concurrency
            ),
        )?;
        Some(pool)
    } else {
        None
    };
    {
        // The connection settings only (a producer-side check would warn about consumer ones).
        let mut c = rdkafka::ClientConfig::new();
        for (k, v) in config.kafka.client_properties() {
            if super::is_connection_property(&k) || !config.kafka.properties.contains_key(&k) {
                c.set(k, v);
            }
        }
        super::route_connection(&mut c, &route);
        crate::broker::check_access(&c, Duration::from_secs(10), &stop)
            .map_err(|e| ConsumeError::Kafka(e.to_string()))?;
    }
    let dead_letters = Arc::new(DeadLetters::new(config, &route)?);
    let shared = Arc::new(Shared::default());
    let consumer = create_consumer(config, &route, options.drain, shared.clone())?;
    if options.drain && !stop.load(Ordering::Relaxed) {
        // Nothing to drain from a topic that does not exist: most likely a misspelt name,
        // which a drain would otherwise report as done.
        let missing = missing_topics(&consumer, &route);
        if !missing.is_empty() {
            let (noun, verb) = if missing.len() == 1 {
                ("topic", "does")
            } else {
                ("topics", "do")
            };
            return Err(ConsumeError::Kafka(format!(
                "`consumers.{name}`: {noun} {} {verb} not exist, so there is nothing to drain",
                missing.join(", ")
            )));
        }
    }
    let stats = Arc::new(Stats::default());
    tracing::info!(
        route = name,
        "consuming {} as group {} ({}), handler {}, dump {}, concurrency {}{}",
        route.topics.join(", "),
        route.group,
        match route.consumer_type {
            ConsumerType::Balanced => "balanced",
            ConsumerType::Simple => "simple",
        },
        route.handler,
        route.dump.as_str(),
        route.concurrency,
        if route.inbox { ", inbox" } else { "" }
    );
    let started = Instant::now();
    let mut clock = Clock {
        first: None,
        last: None,
    };
    match route.consumer_type {
        ConsumerType::Balanced => {
            let topics: Vec<&str> = route.topics.iter().map(String::as_str).collect();
            consumer
                .subscribe(&topics)
                .map_err(|e| ConsumeError::Kafka(format!("subscribing to {topics:?}: {e}")))?;
        }
        ConsumerType::Simple => {
            if !assign_all(&consumer, &route, &stop)? {
                return Ok(report(&stats, started, &clock));
            }
        }
    }
    let lag_thread = config
        .metrics
        .listen
        .is_some()
        .then(|| spawn_lag_gauge(config, &route));
    let mut dispatchers: Vec<Dispatcher> = handlers
        .into_iter()
        .map(|h| {
            Dispatcher::new(
                route.clone(),
                h,
                dead_letters.clone(),
                pool.clone(),
                stop.clone(),
                stats.clone(),
            )
        })
        .collect();
    let mut loop_state = LoopState {
        consumer: &consumer,
        route: &route,
        shared: &shared,
        stop: &stop,
        drain: options.drain,
        last_store: Instant::now(),
        last_drain_check: Instant::now(),
        last_cleanup: Instant::now(),
        last_health: Instant::now() - HEALTH_EVERY,
        health_served: config.metrics.listen.is_some(),
        unassigned_since: None,
        pool: pool.as_ref(),
        clock: &mut clock,
        offsets_timeout: config.kafka.offsets_timeout(),
    };
    if dispatchers.len() == 1 {
        loop_state.inline(&mut dispatchers[0]);
    } else {
        loop_state.with_workers(dispatchers);
    }
    // Stopping: everything finished is stored and committed before the consumer leaves.
    shared.store(&consumer);
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => tracing::warn!(route = name, "final commit: {e}"),
    }
    drop(consumer);
    if let Some((done, thread)) = lag_thread {
        done.store(true, Ordering::Relaxed);
        // It ends after the read it is in, which may wait out the broker's timeouts partition
        // by partition: the stop does not wait for that (the last commit is done). Left
        // alone, it ends on its own.
        let waiting = Instant::now();
        while !thread.is_finished() && waiting.elapsed() < Duration::from_secs(1) {
            std::thread::sleep(Duration::from_millis(10));
        }
        if thread.is_finished() {
            let _ = thread.join();
        }
    }
    if let Some(why) = stats
        .stopped_by
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        return Err(ConsumeError::Stopped(why));
    }
    Ok(report(&stats, started, &clock))
}

/// Sets the route's lag gauge every 10 s from a thread of its own, until the flag is set.
fn spawn_lag_gauge(
    config: &Config,
    route: &ConsumerRoute,
) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let done = Arc::new(AtomicBool::new(false));
    let (d, config, route) = (done.clone(), config.clone(), route.clone());
    let gauge =
        metrics::gauge!(crate::telemetry::names::CONSUME_LAG, "route" => route.name.clone());
    let thread = std::thread::spawn(move || {
        let mut next = Instant::now();
        let mut reader = None;
        while !d.load(Ordering::Relaxed) {
            if Instant::now() >= next {
                next = Instant::now() + Duration::from_secs(10);
                if reader.is_none() {
                    reader = super::lag::LagReader::new(&config, &route)
                        .map_err(|e| tracing::debug!(route = %route.name, "lag: {e}"))
                        .ok();
                }
                if let Some(r) = &reader {
                    match r.read(config.kafka.offsets_timeout()) {
                        Ok(parts) => gauge.set(parts.iter().map(|p| p.lag).sum::<i64>() as f64),
                        Err(e) => tracing::debug!(route = %route.name, "lag: {e}"),
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    (done, thread)
}

struct Clock {
    first: Option<Instant>,
    last: Option<Instant>,
}

fn report(stats: &Stats, started: Instant, clock: &Clock) -> ConsumeReport {
    ConsumeReport {
        processed: stats.processed.load(Ordering::Relaxed),
        dead_lettered: stats.dead_lettered.load(Ordering::Relaxed),
        duplicates: stats.duplicates.load(Ordering::Relaxed),
        retries: stats.retries.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
        busy: match (clock.first, clock.last) {
            (Some(a), Some(b)) => b.duration_since(a),
            _ => Duration::ZERO,
        },
    }
}

fn create_consumer(
    config: &Config,
    route: &ConsumerRoute,
    drain: bool,
    shared: Arc<Shared>,
) -> Result<BaseConsumer<RunnerContext>, ConsumeError> {
    super::consumer_config(config, route, |c| {
        c.set("group.id", &route.group)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", route.start_from.as_str())
            .set("enable.partition.eof", "false");
        if drain {
            // A drain is short-lived: commit often so that what it did is recorded even if
            // killed.
            c.set("auto.commit.interval.ms", "1000");
        }
    })
    .create_with_context(RunnerContext {
        quiet: Default::default(),
        shared,
        route: route.name.clone(),
        pin_latest: route.start_from == crate::config::StartFrom::Latest,
        offsets_timeout: config.kafka.offsets_timeout(),
    })
    .map_err(|e| {
        ConsumeError::Kafka(format!(
            "creating the consumer: {}",
            crate::kafka_log::redact(e)
        ))
    })
}

/// The route's topics the broker says do not exist, from one metadata request (none when it
/// does not answer: the run then waits for it as usual).
fn missing_topics(consumer: &BaseConsumer<RunnerContext>, route: &ConsumerRoute) -> Vec<String> {
    let Ok(metadata) = consumer.fetch_metadata(None, Duration::from_secs(5)) else {
        return Vec::new();
    };
    route
        .topics
        .iter()
        .filter(|topic| !metadata.topics().iter().any(|t| t.name() == topic.as_str()))
        .cloned()
        .collect()
}

/// `consumer_type = "simple"`: assigns every partition of the route's topics, resuming from the
/// group's committed offsets. Waits for topics that do not exist yet; `false` if stopped first.
fn assign_all(
    consumer: &BaseConsumer<RunnerContext>,
    route: &ConsumerRoute,
    stop: &AtomicBool,
) -> Result<bool, ConsumeError> {
    let mut tpl = TopicPartitionList::new();
    for topic in &route.topics {
        let mut warned = false;
        loop {
            if stop.load(Ordering::Relaxed) {
                return Ok(false);
            }
            let partitions = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(10))
                .ok()
                .and_then(|m| {
                    m.topics()
                        .iter()
                        .find(|t| t.name() == topic && t.error().is_none())
                        .map(|t| t.partitions().len())
                })
                .unwrap_or(0);
            if partitions > 0 {
                for p in 0..partitions as i32 {
                    let _ = tpl.add_partition_offset(topic, p, Offset::Stored);
                }
                break;
            }
            if !warned {
                tracing::warn!(route = %route.name, "topic {topic} does not exist (yet); waiting for it");
                warned = true;
            }
            crate::telemetry::health().report(
                "work",
                false,
                format!("waiting for topic {topic} to exist"),
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    if consumer.context().pin_latest {
        pin_latest(
            consumer,
            &tpl,
            &route.name,
            consumer.context().offsets_timeout,
        );
    }
    consumer
        .assign(&tpl)
        .map_err(|e| ConsumeError::Kafka(format!("assigning {}: {e}", describe(&tpl))))?;
    tracing::info!(route = %route.name, "partitions assigned: {}", describe(&tpl));
    Ok(true)
}

/// What one poll gave.
enum Polled<'a> {
    Message(rdkafka::message::BorrowedMessage<'a>),
    /// Nothing (yet); poll again.
    Nothing,
    /// The drain is over.
    Over,
}

struct LoopState<'a> {
    consumer: &'a BaseConsumer<RunnerContext>,
    route: &'a ConsumerRoute,
    shared: &'a Arc<Shared>,
    stop: &'a Arc<AtomicBool>,
    drain: bool,
    last_store: Instant,
    last_drain_check: Instant,
    last_cleanup: Instant,
    last_health: Instant,
    health_served: bool,
    unassigned_since: Option<Instant>,
    pool: Option<&'a DbPool>,
    clock: &'a mut Clock,
    /// `kafka.offsets_channel_socket_timeout_ms`.
    offsets_timeout: Duration,
}

impl<'a> LoopState<'a> {
    /// `concurrency = 1`: messages are handled on the polling thread, in poll order, in batches
    /// of what librdkafka has fetched already (at most `BATCH`, or `inbox_batch` with an inbox).
    fn inline(&mut self, dispatcher: &mut Dispatcher) {
        let batch_max = self.batch_max();
        let mut batch = Vec::with_capacity(batch_max);
        while !self.stop.load(Ordering::Relaxed) {
            let revocations = self.shared.revocations.load(Ordering::Acquire);
            match self.poll_once() {
                Polled::Over => break,
                Polled::Nothing => continue,
                Polled::Message(m) => batch.push(m),
            }
            while batch.len() < batch_max {
                match self.consumer.poll(Duration::ZERO) {
                    Some(Ok(m)) => batch.push(m),
                    Some(Err(e)) => {
                        log_poll_error(self.route, &e);
                        break;
                    }
                    None => break,
                }
            }
            if self.shared.revocations.load(Ordering::Acquire) != revocations {
                // A poll above gave partitions away: what the batch holds of them is another
                // member's now (nothing of it was handled or stored; its new owner reads it).
                // The rest stays: with cooperative rebalancing, the partitions kept go on from
                // where they were, so dropping their messages would skip them.
                let kept: std::collections::HashSet<(String, i32)> =
                    match self.consumer.assignment() {
                        Ok(a) => a
                            .elements()
                            .iter()
                            .map(|e| (e.topic().to_string(), e.partition()))
                            .collect(),
                        Err(_) => Default::default(),
                    };
                let before = batch.len();
                batch.retain(|m| kept.contains(&(m.topic().to_string(), m.partition())));
                tracing::debug!(route = %self.route.name, "revoke during a batch: {} of {before} message(s) dropped", before - batch.len());
                if batch.is_empty() {
                    continue;
                }
            }
            let (shared, consumer) = (self.shared, self.consumer);
            let finished = dispatcher.handle(&batch, &mut |done| {
                // A message is being retried: the poll thread waits with it, so what the batch
                // finished before it is stored now, for librdkafka's next commit.
                shared.mark(done);
                shared.store(consumer);
            });
            self.shared.mark(&batch[..finished]);
            let stopped = finished < batch.len();
            batch.clear();
            let now = Instant::now();
            self.clock.last = Some(now);
            if stopped {
                break;
            }
            if now.duration_since(self.last_store) >= STORE_EVERY {
                self.shared.store(self.consumer);
                self.last_store = now;
                self.report_health();
            }
        }
    }

    /// Polls once (up to `POLL`). A poll that finds nothing does the idle work (and may find the
    /// drain over); an error is logged.
    fn poll_once(&mut self) -> Polled<'a> {
        let consumer = self.consumer;
        match consumer.poll(POLL) {
            None if self.idle() => Polled::Over,
            None => Polled::Nothing,
            Some(Err(e)) => {
                log_poll_error(self.route, &e);
                Polled::Nothing
            }
            Some(Ok(m)) => {
                self.clock.first.get_or_insert_with(Instant::now);
                Polled::Message(m)
            }
        }
    }

    /// Reports check `work` (partitions assigned) every few seconds.
    fn report_health(&mut self) {
        if self.last_health.elapsed() < HEALTH_EVERY {
            return;
        }
        self.last_health = Instant::now();
        let health = crate::telemetry::health();
        let n = self.consumer.assignment().map_or(0, |a| a.count());
        health.report("work", n > 0, format!("{n} partition(s) assigned"));
        // The database check is a query: only when someone reads `/readyz`.
        if let Some(pool) = self.pool.filter(|_| self.health_served) {
            match pool
                .get()
                .and_then(|mut c| super::inbox::check_table(&mut c))
            {
                Ok(()) => health.report("database", true, "inbox table reachable"),
                Err(e) => health.report("database", false, e.to_string()),
            }
        }
        self.clean_inbox();
    }

    /// Deletes old inbox rows once an hour (busy or idle).
    fn clean_inbox(&mut self) {
        let Some(pool) = self.pool else { return };
        if self.last_cleanup.elapsed() < INBOX_CLEANUP_EVERY {
            return;
        }
        self.last_cleanup = Instant::now();
        match pool.get().and_then(|mut c| {
            super::inbox::cleanup(&mut c, &self.route.group, self.route.inbox_retention_hours)
        }) {
            Ok(n) => tracing::info!(route = %self.route.name, "inbox cleanup removed {n} row(s)"),
            Err(e) => tracing::warn!(route = %self.route.name, "inbox cleanup: {e}"),
        }
    }

    fn batch_max(&self) -> usize {
        if self.route.inbox {
            self.route.inbox_batch
        } else {
            BATCH
        }
    }

    /// `concurrency > 1`: one worker thread per dispatcher; a partition always goes to the same
    /// worker, so its messages stay in order.
    fn with_workers(&mut self, dispatchers: Vec<Dispatcher>) {
        let n = dispatchers.len();
        let mut senders = Vec::with_capacity(n);
        let mut workers = Vec::with_capacity(n);
        let batch_max = self.batch_max();
        let last_done = Arc::new(Mutex::new(None::<Instant>));
        for (i, mut d) in dispatchers.into_iter().enumerate() {
            let (tx, rx) = crossbeam_channel::bounded::<Detached>(batch_max.max(256));
            senders.push(tx);
            let shared = self.shared.clone();
            let stop = self.stop.clone();
            let last_done = last_done.clone();
            let name = format!("devour-consume-{i}");
            workers.push(
                std::thread::Builder::new()
                    .name(name)
                    .spawn(move || {
                        let queue = Queue {
                            rx,
                            shared: shared.clone(),
                        };
                        let rx = &queue.rx;
                        let mut batch = Vec::with_capacity(batch_max);
                        while let Ok(m) = rx.recv() {
                            batch.push(m);
                            while batch.len() < batch_max {
                                match rx.try_recv() {
                                    Ok(m) => batch.push(m),
                                    Err(_) => break,
                                }
                            }
                            // However this batch ends (even by a panic), it is no longer in
                            // flight: a revoke waiting for in-flight messages must not hang.
                            let _settle = Settle(&shared, batch.len());
                            if !stop.load(Ordering::Relaxed) {
                                // The poll thread stores the offsets marked here.
                                let finished = d.handle(&batch, &mut |done| shared.mark(done));
                                shared.mark(&batch[..finished]);
                                *last_done.lock().expect("clock lock") = Some(Instant::now());
                            }
                            batch.clear();
                        }
                    })
                    .expect("spawning a consumer worker"),
            );
        }
        while !self.stop.load(Ordering::Relaxed) {
            let m = match self.poll_once() {
                Polled::Over => break,
                Polled::Nothing => continue,
                Polled::Message(m) => m,
            };
            let worker = worker_for(m.topic(), m.partition(), n);
            if workers[worker].is_finished() {
                // It died (it ends otherwise only when its queue closes, below).
                break;
            }
            *self.shared.in_flight.lock().expect("in-flight lock") += 1;
            let mut message = Detached::of(&m);
            let sent = loop {
                match senders[worker].send_timeout(message, STORE_EVERY) {
                    Ok(()) => break true,
                    Err(crossbeam_channel::SendTimeoutError::Timeout(back)) => {
                        // The worker's queue is full (it is waiting out a message's retries):
                        // what the workers finished meanwhile is stored all the same.
                        message = back;
                        self.shared.store(self.consumer);
                        self.last_store = Instant::now();
                        if workers[worker].is_finished() {
                            break false;
                        }
                    }
                    Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => break false,
                }
            };
            if !sent {
                self.shared.finished(1);
                break;
            }
            if self.last_store.elapsed() >= STORE_EVERY {
                self.shared.store(self.consumer);
                self.last_store = Instant::now();
                self.report_health();
            }
        }
        drop(senders);
        // A worker that died (a fault of devour's own: handler panics are caught) ends the run
        // as a crash, as it would without workers, not as a clean stop that exits 0.
        let mut died = None;
        for w in workers {
            if let Err(p) = w.join() {
                died.get_or_insert(p);
            }
        }
        if let Some(p) = died {
            std::panic::resume_unwind(p);
        }
        self.clock.last = *last_done.lock().expect("clock lock");
    }

    /// Called when a poll found nothing: stores offsets, cleans the inbox now and then, and in
    /// a drain, says whether the end is reached.
    fn idle(&mut self) -> bool {
        self.shared.store(self.consumer);
        self.last_store = Instant::now();
        self.report_health();
        if !self.drain || self.last_drain_check.elapsed() < DRAIN_CHECK_EVERY {
            return false;
        }
        self.last_drain_check = Instant::now();
        if *self.shared.in_flight.lock().expect("in-flight lock") > 0 {
            return false;
        }
        at_end(
            self.consumer,
            self.route,
            &mut self.unassigned_since,
            self.offsets_timeout,
        )
        .unwrap_or(false)
    }
}

/// Whether every assigned partition has been read to its high watermark.
fn at_end(
    consumer: &BaseConsumer<RunnerContext>,
    route: &ConsumerRoute,
    unassigned_since: &mut Option<Instant>,
    timeout: Duration,
) -> Option<bool> {
    let assignment = consumer.assignment().ok()?;
    if assignment.count() == 0 {
        // The group gave this member nothing (other members hold every partition, or the topics
        // do not exist): after a while without partitions there is nothing to drain.
        let since = *unassigned_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= NOTHING_ASSIGNED {
            tracing::warn!(
                route = %route.name,
                "no partition assigned for {} s: nothing to drain",
                since.elapsed().as_secs()
            );
            return Some(true);
        }
        return Some(false);
    }
    *unassigned_since = None;
    let position = consumer.position().ok()?;
    let committed = consumer
        .committed_offsets(assignment.clone(), timeout)
        .ok()?;
    for e in assignment.elements() {
        let (low, high) = consumer
            .fetch_watermarks(e.topic(), e.partition(), timeout)
            .ok()?;
        let offset_of = |tpl: &TopicPartitionList| match tpl
            .find_partition(e.topic(), e.partition())
            .map(|p| p.offset())
        {
            Some(Offset::Offset(n)) => Some(n),
            _ => None,
        };
        let next = offset_of(&position)
            .or_else(|| offset_of(&committed))
            .unwrap_or(match route.start_from {
                crate::config::StartFrom::Earliest => low,
                crate::config::StartFrom::Latest => high,
            });
        if next < high {
            return Some(false);
        }
    }
    Some(true)
}

fn worker_for(topic: &str, partition: i32, n: usize) -> usize {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    topic.hash(&mut h);
    partition.hash(&mut h);
    (h.finish() % n as u64) as usize
}

/// Logs a consumer error: librdkafka retries on its own, so these are worth a line, not an
/// exit; the same error again within a minute is counted, not repeated.
fn log_poll_error(route: &ConsumerRoute, e: &KafkaError) {
    static LAST: Mutex<Option<(String, Instant, u64)>> = Mutex::new(None);
    let text = e.to_string();
    let mut last = LAST.lock().expect("log lock");
    match &mut *last {
        Some((t, at, repeats)) if *t == text && at.elapsed() < Duration::from_secs(60) => {
            *repeats += 1;
        }
        _ => {
            let repeats = last.as_ref().map_or(0, |l| l.2);
            if repeats > 0 {
                tracing::warn!(route = %route.name, "consumer: previous error repeated {repeats} time(s)");
            }
            tracing::warn!(route = %route.name, "consumer: {text}");
            *last = Some((text, Instant::now(), 0));
        }
    }
}
