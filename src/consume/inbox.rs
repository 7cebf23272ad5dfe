//! The inbox (`devour_inbox_offsets`, `devour_inbox_batches`): which messages a consumer group
//! has processed, recorded in the handler's own transaction, once per transaction rather than
//! once per message. The SQL of each backend sits side by side.
//!
//! Per partition, a mark says up to which offset inbox transactions committed. A message above
//! its partition's mark is new, with no lookup, unless the relay marked it `possible-duplicate`
//! (it may have been sent before, at another offset). Any other message is looked up by its key
//! among the keys the group's transactions handled: below the mark, in the row covering its
//! offset; when marked by the relay, among the rows whose keys span it.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};

#[cfg(feature = "postgres")]
use crate::db::prepared::{PgBind, Prepared};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Text};

/// One message to record.
#[derive(Debug, Clone)]
pub(crate) struct InboxEntry<'a> {
    /// `message-id` header, else `TOPIC/PARTITION/OFFSET`.
    pub key: Cow<'a, str>,
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    /// The relay marked it `possible-duplicate`: look its key up wherever it is read.
    pub resent: bool,
}

/// A `devour_inbox_batches` row: the keys of one partition's messages in one transaction, on
/// one side of its mark. `min`/`max` in byte order (what `COLLATE "C"` compares).
#[derive(Default)]
pub(crate) struct BatchRow<'a> {
    topic: &'a str,
    partition: i32,
    first: i64,
    last: i64,
    replay: bool,
    min: &'a str,
    max: &'a str,
    keys: Vec<&'a str>,
}

/// The offsets one batch holds of a partition.
pub(crate) struct Span<'a> {
    topic: &'a str,
    partition: i32,
    lowest: i64,
    highest: i64,
}

#[derive(QueryableByName)]
struct Mark {
    #[diesel(sql_type = Text)]
    topic: String,
    #[diesel(sql_type = Integer)]
    kafka_partition: i32,
    #[diesel(sql_type = BigInt)]
    previous_offset: i64,
}

#[derive(QueryableByName)]
struct Found {
    #[diesel(sql_type = Integer)]
    i: i32,
}

/// The statements of one backend.
pub(crate) trait InboxSql {
    /// Moves each partition's mark up to its largest offset here (creating it), locking it for
    /// the transaction; returns the marks as they were.
    fn advance(&mut self, group: &str, marks: &[Span<'_>]) -> QueryResult<Marks>;
    /// Of `at` (indices into `entries`, below their partition's mark), those whose key the row
    /// covering their offset holds.
    fn found_at_offsets(
        &mut self,
        group: &str,
        entries: &[InboxEntry<'_>],
        at: &[usize],
    ) -> QueryResult<Vec<usize>>;
    /// Of `at`, those whose key any row of their topic holds.
    fn found_by_key(
        &mut self,
        group: &str,
        entries: &[InboxEntry<'_>],
        at: &[usize],
    ) -> QueryResult<Vec<usize>>;
    /// Writes `rows`.
    fn record(&mut self, group: &str, rows: &[BatchRow<'_>]) -> QueryResult<()>;
}

/// Records `entries` for `group`, in the caller's transaction; returns, for each, whether it is
/// new (to be handled). A key seen twice in one batch is new once.
pub(crate) fn claim<C: InboxSql>(
    c: &mut C,
    group: &str,
    entries: &[InboxEntry<'_>],
) -> QueryResult<Vec<bool>> {
    // Sorted: concurrent transactions (a consumer that lost its partitions and does not know
    // yet) lock the marks in one order.
    let mut spans: BTreeMap<(&str, i32), (i64, i64)> = BTreeMap::new();
    for e in entries {
        let s = spans
            .entry((e.topic, e.partition))
            .or_insert((e.offset, e.offset));
        s.0 = s.0.min(e.offset);
        s.1 = s.1.max(e.offset);
    }
    let marks: Vec<Span<'_>> = spans
        .iter()
        .map(|(&(topic, partition), &(lowest, highest))| Span {
            topic,
            partition,
            lowest,
            highest,
        })
        .collect();
    let moved = c.advance(group, &marks)?;
    let before: HashMap<(&str, i32), i64> = marks
        .iter()
        .map(|m| {
            let mark = moved
                .get(&(m.topic.to_string(), m.partition))
                .copied()
                .unwrap_or(-1);
            ((m.topic, m.partition), mark)
        })
        .collect();
    // Usually every message is above its partition's mark and none is marked: the batch is
    // recorded with no lookup.
    if !entries.iter().any(|e| e.resent)
        && marks
            .iter()
            .all(|m| before[&(m.topic, m.partition)] < m.lowest)
    {
        let none = vec![false; entries.len()];
        c.record(group, &batch_rows(entries, &none, &none))?;
        return Ok(first_of_each_key(entries, &none));
    }
    let mut below = vec![false; entries.len()];
    let mut at_offsets = Vec::new();
    // Messages come in runs of one partition: look its mark up once per run.
    let mut run: Option<((&str, i32), i64)> = None;
    for (i, e) in entries.iter().enumerate() {
        let place = (e.topic, e.partition);
        let mark = match run {
            Some((p, m)) if p == place => m,
            _ => {
                let m = before.get(&place).copied().unwrap_or(-1);
                run = Some((place, m));
                m
            }
        };
        if e.offset <= mark {
            below[i] = true;
            at_offsets.push(i);
        }
    }
    let mut found = vec![false; entries.len()];
    if !at_offsets.is_empty() {
        for i in c.found_at_offsets(group, entries, &at_offsets)? {
            found[i] = true;
        }
    }
    let by_key: Vec<usize> = (0..entries.len())
        .filter(|&i| !found[i] && entries[i].resent)
        .collect();
    if !by_key.is_empty() {
        for i in c.found_by_key(group, entries, &by_key)? {
            found[i] = true;
        }
    }
    let new = first_of_each_key(entries, &found);
    let rows = batch_rows(entries, &found, &below);
    if !rows.is_empty() {
        c.record(group, &rows)?;
    }
    Ok(new)
}

/// Which entries are new: not `found`, and the first of their key in the batch (nor the key of
/// one found).
fn first_of_each_key(entries: &[InboxEntry<'_>], found: &[bool]) -> Vec<bool> {
    // Keys are message ids that producers chose, not input an attacker shapes to collide:
    // a fast hash (SipHash cost a tenth of the inbox's own time).
    let mut seen =
        HashSet::with_capacity_and_hasher(entries.len(), foldhash::fast::RandomState::default());
    entries
        .iter()
        .zip(found)
        .map(|(e, &found)| seen.insert(e.key.as_ref()) && !found)
        .collect()
}

/// The rows to record: every entry goes in its partition's row, skipped or not (a redelivery
/// of any of its offsets finds its own key there), except those below the mark that were found
/// (already in a row); below the mark, the rows are replays. In the order of the marks.
fn batch_rows<'e>(
    entries: &'e [InboxEntry<'_>],
    found: &[bool],
    below: &[bool],
) -> Vec<BatchRow<'e>> {
    let mut rows: Vec<BatchRow<'_>> = Vec::new();
    let mut index: BTreeMap<(&str, i32, bool), usize> = BTreeMap::new();
    // Messages come in runs of one partition: find its row once per run.
    let mut run: Option<((&str, i32, bool), usize)> = None;
    for (i, e) in entries.iter().enumerate() {
        if found[i] && below[i] {
            continue;
        }
        let key = e.key.as_ref();
        let place = (e.topic, e.partition, below[i]);
        let at = match run {
            Some((p, at)) if p == place => at,
            _ => {
                let at = *index.entry(place).or_insert_with(|| {
                    rows.push(BatchRow {
                        topic: e.topic,
                        partition: e.partition,
                        first: e.offset,
                        last: e.offset,
                        replay: below[i],
                        min: key,
                        max: key,
                        keys: Vec::new(),
                    });
                    rows.len() - 1
                });
                run = Some((place, at));
                at
            }
        };
        let r = &mut rows[at];
        r.first = r.first.min(e.offset);
        r.last = r.last.max(e.offset);
        r.min = r.min.min(key);
        r.max = r.max.max(key);
        r.keys.push(key);
    }
    // In the order of the marks.
    index
        .into_values()
        .map(|at| std::mem::take(&mut rows[at]))
        .collect()
}

/// Each partition's mark before a batch moved it.
pub(crate) type Marks = HashMap<(String, i32), i64>;

fn marks_of(rows: Vec<Mark>) -> Marks {
    rows.into_iter()
        .map(|m| ((m.topic, m.kafka_partition), m.previous_offset))
        .collect()
}

fn found(rows: Vec<Found>) -> Vec<usize> {
    rows.into_iter().map(|f| f.i as usize).collect()
}

#[cfg(feature = "postgres")]
impl InboxSql for diesel::PgConnection {
    fn advance(&mut self, group: &str, marks: &[Span<'_>]) -> QueryResult<Marks> {
        let topics: Vec<&str> = marks.iter().map(|m| m.topic).collect();
        let partitions: Vec<i32> = marks.iter().map(|m| m.partition).collect();
        let offsets: Vec<i64> = marks.iter().map(|m| m.highest).collect();
        let rows = Prepared {
            sql: "INSERT INTO devour_inbox_offsets AS o \
                     (consumer_group, topic, kafka_partition, through_offset, previous_offset) \
                 SELECT $1, t, p, x, -1 FROM unnest($2::text[], $3::int[], $4::bigint[]) AS m(t, p, x) \
                 ON CONFLICT (consumer_group, topic, kafka_partition) DO UPDATE \
                 SET previous_offset = o.through_offset, \
                     through_offset = greatest(o.through_offset, excluded.through_offset), \
                     processed_at = now() \
                 RETURNING topic, kafka_partition, previous_offset",
            binds: &[
                PgBind::Text(group),
                PgBind::Texts(&topics),
                PgBind::Ints(&partitions),
                PgBind::BigInts(&offsets),
            ],
        }
        .load(self)?;
        Ok(marks_of(rows))
    }

    fn found_at_offsets(
        &mut self,
        group: &str,
        entries: &[InboxEntry<'_>],
        at: &[usize],
    ) -> QueryResult<Vec<usize>> {
        let (idx, keys, topics, partitions, offsets) = columns(entries, at);
        // The row covering an offset is the first one ending at or after it (the rows of a
        // partition that are not replays never overlap); replay rows may overlap anything.
        let rows = Prepared {
            sql: "SELECT m.i FROM unnest($2::int[], $3::text[], $4::text[], $5::int[], $6::bigint[]) \
                     AS m(i, k, t, p, o) \
                 WHERE EXISTS (SELECT 1 FROM ( \
                         SELECT b.first_offset, b.keys FROM devour_inbox_batches b \
                         WHERE b.consumer_group = $1 AND b.topic = m.t AND b.kafka_partition = m.p \
                           AND NOT b.replay AND b.last_offset >= m.o \
                         ORDER BY b.last_offset LIMIT 1) x \
                       WHERE x.first_offset <= m.o AND m.k = ANY(x.keys)) \
                    OR EXISTS (SELECT 1 FROM devour_inbox_batches b \
                       WHERE b.consumer_group = $1 AND b.topic = m.t AND b.kafka_partition = m.p \
                         AND b.replay AND b.last_offset >= m.o AND b.first_offset <= m.o \
                         AND m.k = ANY(b.keys))",
            binds: &[
                PgBind::Text(group),
                PgBind::Ints(&idx),
                PgBind::Texts(&keys),
                PgBind::Texts(&topics),
                PgBind::Ints(&partitions),
                PgBind::BigInts(&offsets),
            ],
        }
        .load(self)?;
        Ok(found(rows))
    }

    fn found_by_key(
        &mut self,
        group: &str,
        entries: &[InboxEntry<'_>],
        at: &[usize],
    ) -> QueryResult<Vec<usize>> {
        let (idx, keys, topics, _, _) = columns(entries, at);
        let rows = Prepared {
            sql: "SELECT m.i FROM unnest($2::int[], $3::text[], $4::text[]) AS m(i, k, t) \
                 WHERE EXISTS (SELECT 1 FROM devour_inbox_batches b \
                     WHERE b.consumer_group = $1 AND b.topic = m.t \
                       AND b.max_key >= m.k AND b.min_key <= m.k AND m.k = ANY(b.keys))",
            binds: &[
                PgBind::Text(group),
                PgBind::Ints(&idx),
                PgBind::Texts(&keys),
                PgBind::Texts(&topics),
            ],
        }
        .load(self)?;
        Ok(found(rows))
    }

    fn record(&mut self, group: &str, rows: &[BatchRow<'_>]) -> QueryResult<()> {
        let (keys, starts, ends) = key_slices(rows);
        let topics: Vec<&str> = rows.iter().map(|r| r.topic).collect();
        let partitions: Vec<i32> = rows.iter().map(|r| r.partition).collect();
        let firsts: Vec<i64> = rows.iter().map(|r| r.first).collect();
        let lasts: Vec<i64> = rows.iter().map(|r| r.last).collect();
        let replays: Vec<bool> = rows.iter().map(|r| r.replay).collect();
        let mins: Vec<&str> = rows.iter().map(|r| r.min).collect();
        let maxes: Vec<&str> = rows.iter().map(|r| r.max).collect();
        Prepared {
            sql: "INSERT INTO devour_inbox_batches (consumer_group, topic, kafka_partition, \
                     first_offset, last_offset, replay, min_key, max_key, keys) \
                 SELECT $1, t, p, f, l, r, mn, mx, ($9::text[])[s:e] \
                 FROM unnest($2::text[], $3::int[], $4::bigint[], $5::bigint[], $6::bool[], \
                     $7::text[], $8::text[], $10::int[], $11::int[]) \
                     AS m(t, p, f, l, r, mn, mx, s, e)",
            binds: &[
                PgBind::Text(group),
                PgBind::Texts(&topics),
                PgBind::Ints(&partitions),
                PgBind::BigInts(&firsts),
                PgBind::BigInts(&lasts),
                PgBind::Bools(&replays),
                PgBind::Texts(&mins),
                PgBind::Texts(&maxes),
                PgBind::Texts(&keys),
                PgBind::Ints(&starts),
                PgBind::Ints(&ends),
            ],
        }
        .execute(self)?;
        Ok(())
    }
}

/// The keys of every row in one array, and each row's slice of it (1-based, inclusive): an
/// array of arrays must be rectangular.
#[cfg(feature = "postgres")]
fn key_slices<'r>(rows: &[BatchRow<'r>]) -> (Vec<&'r str>, Vec<i32>, Vec<i32>) {
    let keys: Vec<&str> = rows.iter().flat_map(|r| r.keys.iter().copied()).collect();
    let (mut starts, mut ends) = (
        Vec::with_capacity(rows.len()),
        Vec::with_capacity(rows.len()),
    );
    let mut at = 1;
    for r in rows {
        starts.push(at);
        at += r.keys.len() as i32;
        ends.push(at - 1);
    }
    (keys, starts, ends)
}

/// The entries at `at`, column by column: index, key, topic, partition, offset.
#[allow(clippy::type_complexity)]
fn columns<'e>(
    entries: &'e [InboxEntry<'_>],
    at: &[usize],
) -> (Vec<i32>, Vec<&'e str>, Vec<&'e str>, Vec<i32>, Vec<i64>) {
    let mut cols = (
        Vec::with_capacity(at.len()),
        Vec::with_capacity(at.len()),
        Vec::with_capacity(at.len()),
        Vec::with_capacity(at.len()),
        Vec::with_capacity(at.len()),
    );
    for &i in at {
        let e = &entries[i];
        cols.0.push(i as i32);
        cols.1.push(e.key.as_ref());
        cols.2.push(e.topic);
        cols.3.push(e.partition);
        cols.4.push(e.offset);
    }
    cols
}

/// SQLite takes a list as one JSON bind, read with `json_each`.
#[cfg(feature = "sqlite")]
fn json_rows(entries: &[InboxEntry<'_>], at: &[usize]) -> String {
    let rows: Vec<serde_json::Value> = at
        .iter()
        .map(|&i| {
            let e = &entries[i];
            serde_json::json!([i, e.key, e.topic, e.partition, e.offset])
        })
        .collect();
    serde_json::Value::Array(rows).to_string()
}

/// The columns of [`json_rows`], by name.
#[cfg(feature = "sqlite")]
const SQLITE_ROWS: &str =
    "SELECT json_extract(value, '$[0]') AS i, json_extract(value, '$[1]') AS k, \
     json_extract(value, '$[2]') AS t, json_extract(value, '$[3]') AS p, \
     json_extract(value, '$[4]') AS o FROM json_each(?2)";

#[cfg(feature = "sqlite")]
const SQLITE_NOW: &str = "strftime('%Y-%m-%d %H:%M:%f', 'now')";

#[cfg(feature = "sqlite")]
impl InboxSql for diesel::SqliteConnection {
    fn advance(&mut self, group: &str, marks: &[Span<'_>]) -> QueryResult<Marks> {
        let marks: Vec<(&str, i32, i64)> = marks
            .iter()
            .map(|m| (m.topic, m.partition, m.highest))
            .collect();
        let json = serde_json::to_string(&marks).expect("strings and numbers serialize");
        // `WHERE true` keeps SQLite from reading ON CONFLICT as a join constraint.
        let rows = diesel::sql_query(format!(
            "INSERT INTO devour_inbox_offsets \
                 (consumer_group, topic, kafka_partition, through_offset, previous_offset, processed_at) \
             SELECT ?1, json_extract(value, '$[0]'), json_extract(value, '$[1]'), \
                 json_extract(value, '$[2]'), -1, {SQLITE_NOW} FROM json_each(?2) WHERE true \
             ON CONFLICT (consumer_group, topic, kafka_partition) DO UPDATE \
             SET previous_offset = devour_inbox_offsets.through_offset, \
                 through_offset = max(devour_inbox_offsets.through_offset, excluded.through_offset), \
                 processed_at = excluded.processed_at \
             RETURNING topic, kafka_partition, previous_offset"
        ))
        .bind::<Text, _>(group)
        .bind::<Text, _>(json)
        .load(self)?;
        Ok(marks_of(rows))
    }

    fn found_at_offsets(
        &mut self,
        group: &str,
        entries: &[InboxEntry<'_>],
        at: &[usize],
    ) -> QueryResult<Vec<usize>> {
        let rows = diesel::sql_query(format!(
            "SELECT m.i AS i FROM ({SQLITE_ROWS}) m \
             WHERE EXISTS (SELECT 1 FROM ( \
                     SELECT b.first_offset, b.keys FROM devour_inbox_batches b \
                     WHERE b.consumer_group = ?1 AND b.topic = m.t AND b.kafka_partition = m.p \
                       AND NOT b.replay AND b.last_offset >= m.o \
                     ORDER BY b.last_offset LIMIT 1) x, json_each(x.keys) j \
                   WHERE x.first_offset <= m.o AND j.value = m.k) \
                OR EXISTS (SELECT 1 FROM devour_inbox_batches b, json_each(b.keys) j \
                   WHERE b.consumer_group = ?1 AND b.topic = m.t AND b.kafka_partition = m.p \
                     AND b.replay AND b.last_offset >= m.o AND b.first_offset <= m.o \
                     AND j.value = m.k)"
        ))
        .bind::<Text, _>(group)
        .bind::<Text, _>(json_rows(entries, at))
        .load(self)?;
        Ok(found(rows))
    }

    fn found_by_key(
        &mut self,
        group: &str,
        entries: &[InboxEntry<'_>],
        at: &[usize],
    ) -> QueryResult<Vec<usize>> {
        let rows = diesel::sql_query(format!(
            "SELECT m.i AS i FROM ({SQLITE_ROWS}) m \
             WHERE EXISTS (SELECT 1 FROM devour_inbox_batches b, json_each(b.keys) j \
                 WHERE b.consumer_group = ?1 AND b.topic = m.t \
                   AND b.max_key >= m.k AND b.min_key <= m.k AND j.value = m.k)"
        ))
        .bind::<Text, _>(group)
        .bind::<Text, _>(json_rows(entries, at))
        .load(self)?;
        Ok(found(rows))
    }

    fn record(&mut self, group: &str, rows: &[BatchRow<'_>]) -> QueryResult<()> {
        let list: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!([
                    r.topic,
                    r.partition,
                    r.first,
                    r.last,
                    r.replay,
                    r.min,
                    r.max,
                    serde_json::to_string(&r.keys).expect("strings serialize")
                ])
            })
            .collect();
        diesel::sql_query(format!(
            "INSERT INTO devour_inbox_batches (consumer_group, topic, kafka_partition, \
                 first_offset, last_offset, replay, min_key, max_key, keys, processed_at) \
             SELECT ?1, json_extract(value, '$[0]'), json_extract(value, '$[1]'), \
                 json_extract(value, '$[2]'), json_extract(value, '$[3]'), \
                 json_extract(value, '$[4]'), json_extract(value, '$[5]'), \
                 json_extract(value, '$[6]'), json_extract(value, '$[7]'), {SQLITE_NOW} \
             FROM json_each(?2)"
        ))
        .bind::<Text, _>(group)
        .bind::<Text, _>(serde_json::Value::Array(list).to_string())
        .execute(self)?;
        Ok(())
    }
}

/// Deletes `group`'s inbox rows older than `hours`; returns how many.
pub(crate) fn cleanup(
    conn: &mut crate::db::DbConnection,
    group: &str,
    hours: u64,
) -> Result<usize, crate::db::DbError> {
    let hours = i64::try_from(hours).unwrap_or(i64::MAX / 3_600_000);
    // In chunks: short transactions, however much there is to delete. The batches first: a
    // partition's mark is never older than its rows.
    let mut total = 0;
    loop {
        let n =
            crate::db::each_backend!(conn, c => Cleanup::cleanup_batches(&mut **c, group, hours)?);
        total += n;
        if n < CLEANUP_CHUNK {
            break;
        }
    }
    total += crate::db::each_backend!(conn, c => Cleanup::cleanup_marks(&mut **c, group, hours)?);
    Ok(total)
}

/// Rows deleted per statement by [`cleanup`].
const CLEANUP_CHUNK: usize = 1_000;

trait Cleanup {
    fn cleanup_batches(&mut self, group: &str, hours: i64) -> QueryResult<usize>;
    fn cleanup_marks(&mut self, group: &str, hours: i64) -> QueryResult<usize>;
}

#[cfg(feature = "postgres")]
impl Cleanup for diesel::PgConnection {
    fn cleanup_batches(&mut self, group: &str, hours: i64) -> QueryResult<usize> {
        diesel::sql_query(
            "DELETE FROM devour_inbox_batches WHERE ctid = ANY(ARRAY( \
               SELECT ctid FROM devour_inbox_batches WHERE consumer_group = $1 \
               AND processed_at < now() - make_interval(hours => $2::int) LIMIT $3))",
        )
        .bind::<Text, _>(group)
        .bind::<BigInt, _>(hours.min(i64::from(i32::MAX)))
        .bind::<BigInt, _>(CLEANUP_CHUNK as i64)
        .execute(self)
    }
    fn cleanup_marks(&mut self, group: &str, hours: i64) -> QueryResult<usize> {
        diesel::sql_query(
            "DELETE FROM devour_inbox_offsets WHERE consumer_group = $1 \
               AND processed_at < now() - make_interval(hours => $2::int)",
        )
        .bind::<Text, _>(group)
        .bind::<BigInt, _>(hours.min(i64::from(i32::MAX)))
        .execute(self)
    }
}

#[cfg(feature = "sqlite")]
impl Cleanup for diesel::SqliteConnection {
    fn cleanup_batches(&mut self, group: &str, hours: i64) -> QueryResult<usize> {
        diesel::sql_query(
            "DELETE FROM devour_inbox_batches WHERE rowid IN ( \
               SELECT rowid FROM devour_inbox_batches WHERE consumer_group = ?1 \
               AND processed_at < strftime('%Y-%m-%d %H:%M:%f', 'now', '-' || ?2 || ' hours') \
               LIMIT ?3)",
        )
        .bind::<Text, _>(group)
        .bind::<BigInt, _>(hours)
        .bind::<BigInt, _>(CLEANUP_CHUNK as i64)
        .execute(self)
    }
    fn cleanup_marks(&mut self, group: &str, hours: i64) -> QueryResult<usize> {
        diesel::sql_query(
            "DELETE FROM devour_inbox_offsets WHERE consumer_group = ?1 \
               AND processed_at < strftime('%Y-%m-%d %H:%M:%f', 'now', '-' || ?2 || ' hours')",
        )
        .bind::<Text, _>(group)
        .bind::<BigInt, _>(hours)
        .execute(self)
    }
}

/// Fails with a hint when the inbox tables do not exist (migrations not applied).
pub(crate) fn check_table(conn: &mut crate::db::DbConnection) -> Result<(), crate::db::DbError> {
    let q = "SELECT 1 FROM devour_inbox_offsets, devour_inbox_batches WHERE 1 = 0";
    crate::db::each_backend!(conn, c => diesel::sql_query(q).execute(&mut **c).map(|_| ())?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, partition: i32, offset: i64, resent: bool) -> InboxEntry<'_> {
        InboxEntry {
            key: key.into(),
            topic: "t",
            partition,
            offset,
            resent,
        }
    }

    /// Every way a message is judged new or seen, on one connection.
    fn judged<C: InboxSql>(c: &mut C) {
        let keys: Vec<String> = (0..8).map(|i| format!("a{i}")).collect();
        let a = |i: usize, o: i64| entry(&keys[i], 0, o, false);
        // First reads: all new, whatever the partition.
        let first = [a(0, 0), a(1, 1), a(2, 2), a(3, 3), entry("b0", 1, 0, false)];
        assert_eq!(claim(c, "g", &first).unwrap(), [true; 5]);
        // Read again from offset 2 (a consumer that died before committing its offsets), then
        // on: the ones below the mark were handled; the others are new.
        let again = [a(2, 2), a(3, 3), a(4, 4), a(5, 5)];
        assert_eq!(claim(c, "g", &again).unwrap(), [false, false, true, true]);
        // Marked by the relay, at new offsets: a1 was handled (at another offset), zz never.
        let resent = [entry("a1", 0, 6, true), entry("zz", 0, 7, true)];
        assert_eq!(claim(c, "g", &resent).unwrap(), [false, true]);
        // The same message twice in one batch, unmarked: handled once.
        let twice = [a(6, 8), a(6, 9)];
        assert_eq!(claim(c, "g", &twice).unwrap(), [true, false]);
        // Below the mark, another key at a handled offset (the topic made anew, a dead letter
        // replayed): new, and recorded, so that reading it again skips it.
        let remade = [entry("new-1", 0, 1, false), entry("new-3", 0, 3, false)];
        assert_eq!(claim(c, "g", &remade).unwrap(), [true, true]);
        assert_eq!(claim(c, "g", &remade).unwrap(), [false, false]);
        // Offset 7 (zz, handled when marked) and 9 (the second a6, skipped) read again: zz is
        // found; the skipped copy's offset holds no key of its own but a6's key is there.
        let later = [entry("zz", 0, 7, false), entry("a6", 0, 9, false)];
        assert_eq!(claim(c, "g", &later).unwrap(), [false, false]);
        // Below the mark, one new key twice (offsets 2 and 4 held other keys): handled once,
        // and both offsets are recorded with it, so that reading offset 4 again skips it.
        let twice_below = [entry("rep", 0, 2, false), entry("rep", 0, 4, false)];
        assert_eq!(claim(c, "g", &twice_below).unwrap(), [true, false]);
        assert_eq!(
            claim(c, "g", &[entry("rep", 0, 4, false)]).unwrap(),
            [false]
        );
        // Another group has seen nothing.
        assert_eq!(claim(c, "h", &first).unwrap(), [true; 5]);
        // A gap (an offset dead-lettered between two transactions) holds no key.
        let gap = [entry("dead", 1, 5, false), entry("b1", 1, 6, false)];
        assert_eq!(claim(c, "g", &gap).unwrap(), [true, true]);
        assert_eq!(
            claim(c, "g", &[entry("dead-again", 1, 3, false)]).unwrap(),
            [true]
        );
    }

    /// An upgrade from the per-message inbox (migration 000007) keeps what it knew: its marks,
    /// and each key wherever in its partition a copy is read again.
    fn carried_over<C>(c: &mut C, migrations: fn() -> diesel_migrations::EmbeddedMigrations)
    where
        C: InboxSql + diesel_migrations::MigrationHarness<C::Backend> + diesel::Connection,
    {
        for _ in 0..6 {
            c.run_next_migration(migrations()).unwrap();
        }
        c.batch_execute(
            "INSERT INTO devour_inbox (consumer_group, message_key, topic, kafka_partition, kafka_offset) \
             VALUES ('g', 'k1', 't', 0, 5), ('g', 'k2', 't', 0, 15000), ('g', 'k3', 't', 1, 2)",
        )
        .unwrap();
        c.run_pending_migrations(migrations()).unwrap();
        let again = [
            // k1 sent twice by an older relay: its copy at 12000, read again, is skipped.
            entry("k1", 0, 12000, false),
            entry("k2", 0, 15000, false),
            entry("new", 0, 15001, false),
            entry("k3", 1, 2, false),
        ];
        assert_eq!(claim(c, "g", &again).unwrap(), [false, false, true, false]);
    }

    #[cfg(feature = "sqlite")]
    #[test]
    fn an_upgrade_keeps_what_the_old_inbox_knew_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let mut c = diesel::SqliteConnection::establish(path.to_str().unwrap()).unwrap();
        carried_over(&mut c, || crate::db::sqlite::MIGRATIONS);
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn an_upgrade_keeps_what_the_old_inbox_knew_postgres() {
        crate::db::testing::in_pg_database("inbox_upgrade", |url| {
            let mut c = diesel::PgConnection::establish(url).unwrap();
            carried_over(&mut c, || crate::db::postgres::MIGRATIONS);
        });
    }

    #[cfg(feature = "sqlite")]
    #[test]
    fn messages_are_judged_by_mark_and_key_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inbox.db");
        crate::db::testing::migrated_config(&format!("sqlite://{}", path.display()));
        let mut c = diesel::SqliteConnection::establish(path.to_str().unwrap()).unwrap();
        judged(&mut c);
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn messages_are_judged_by_mark_and_key_postgres() {
        crate::db::testing::in_pg_database("inbox_judged", |url| {
            crate::db::testing::migrated_config(url);
            let mut c = diesel::PgConnection::establish(url).unwrap();
            judged(&mut c);
        });
    }
}
