//! `devour_inbox`: the messages a consumer group has processed, recorded in the handler's own
//! transaction. The SQL of each backend sits side by side.

use std::collections::HashSet;

use diesel::prelude::*;
#[cfg(feature = "postgres")]
use diesel::sql_types::{Array, Integer};
use diesel::sql_types::{BigInt, Text};

/// One message to record.
#[derive(Debug, Clone)]
pub(crate) struct InboxEntry<'a> {
    /// `message-id` header, else `TOPIC/PARTITION/OFFSET`.
    pub key: std::borrow::Cow<'a, str>,
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

/// What a claim reports.
pub(crate) enum Claimed {
    /// How many entries were new (the fast form: no list).
    Count(usize),
    /// The keys that were new.
    Keys(HashSet<String>),
}

#[derive(QueryableByName)]
struct Key {
    #[diesel(sql_type = Text)]
    message_key: String,
}

/// Records `entries` for `group` where not already there. With `keys`, says which were new;
/// without, only how many (cheaper: when all were new, nothing else is needed).
#[cfg(feature = "postgres")]
pub(crate) fn claim_postgres(
    c: &mut diesel::PgConnection,
    group: &str,
    entries: &[InboxEntry<'_>],
    keys: bool,
) -> QueryResult<Claimed> {
    let names: Vec<&str> = entries.iter().map(|e| e.key.as_ref()).collect();
    let topics: Vec<&str> = entries.iter().map(|e| e.topic).collect();
    let partitions: Vec<i32> = entries.iter().map(|e| e.partition).collect();
    let offsets: Vec<i64> = entries.iter().map(|e| e.offset).collect();
    let insert = "INSERT INTO devour_inbox (consumer_group, message_key, topic, kafka_partition, kafka_offset) \
         SELECT $1, k, t, p, o FROM unnest($2::text[], $3::text[], $4::int[], $5::bigint[]) AS m(k, t, p, o) \
         ON CONFLICT (consumer_group, message_key) DO NOTHING";
    let q = |sql: String| {
        diesel::sql_query(sql)
            .bind::<Text, _>(group)
            .bind::<Array<Text>, _>(&names)
            .bind::<Array<Text>, _>(&topics)
            .bind::<Array<Integer>, _>(&partitions)
            .bind::<Array<BigInt>, _>(&offsets)
    };
    if keys {
        let rows: Vec<Key> = q(format!("{insert} RETURNING message_key")).load(c)?;
        Ok(Claimed::Keys(
            rows.into_iter().map(|r| r.message_key).collect(),
        ))
    } else {
        Ok(Claimed::Count(q(insert.to_string()).execute(c)?))
    }
}

/// [`claim_postgres`] on SQLite.
#[cfg(feature = "sqlite")]
pub(crate) fn claim_sqlite(
    c: &mut diesel::SqliteConnection,
    group: &str,
    entries: &[InboxEntry<'_>],
    keys: bool,
) -> QueryResult<Claimed> {
    let list: Vec<(&str, &str, i32, i64)> = entries
        .iter()
        .map(|e| (e.key.as_ref(), e.topic, e.partition, e.offset))
        .collect();
    let json = serde_json::to_string(&list).expect("strings and numbers serialize");
    // `WHERE true` keeps SQLite from reading ON CONFLICT as a join constraint.
    let insert = "INSERT INTO devour_inbox (consumer_group, message_key, topic, kafka_partition, kafka_offset) \
         SELECT ?1, json_extract(value, '$[0]'), json_extract(value, '$[1]'), \
                json_extract(value, '$[2]'), json_extract(value, '$[3]') \
         FROM json_each(?2) WHERE true \
         ON CONFLICT (consumer_group, message_key) DO NOTHING";
    let q = |sql: String| {
        diesel::sql_query(sql)
            .bind::<Text, _>(group)
            .bind::<Text, _>(json.clone())
    };
    if keys {
        let rows: Vec<Key> = q(format!("{insert} RETURNING message_key")).load(c)?;
        Ok(Claimed::Keys(
            rows.into_iter().map(|r| r.message_key).collect(),
        ))
    } else {
        Ok(Claimed::Count(q(insert.to_string()).execute(c)?))
    }
}

/// Deletes `group`'s inbox rows older than `hours`; returns how many.
pub(crate) fn cleanup(
    conn: &mut crate::db::DbConnection,
    group: &str,
    hours: u64,
) -> Result<usize, crate::db::DbError> {
    let hours = i64::try_from(hours).unwrap_or(i64::MAX / 3_600_000);
    // In chunks of 10,000 rows: short transactions, however much there is to delete.
    let mut total = 0;
    loop {
        let n = crate::db::each_backend!(conn, c => Cleanup::cleanup(&mut **c, group, hours)?);
        total += n;
        if n < 10_000 {
            return Ok(total);
        }
    }
}

trait Cleanup {
    fn cleanup(&mut self, group: &str, hours: i64) -> QueryResult<usize>;
}

#[cfg(feature = "postgres")]
impl Cleanup for diesel::PgConnection {
    fn cleanup(&mut self, group: &str, hours: i64) -> QueryResult<usize> {
        diesel::sql_query(
            "DELETE FROM devour_inbox WHERE (consumer_group, message_key) IN ( \
               SELECT consumer_group, message_key FROM devour_inbox WHERE consumer_group = $1 \
               AND processed_at < now() - make_interval(hours => $2::int) LIMIT 10000)",
        )
        .bind::<Text, _>(group)
        .bind::<BigInt, _>(hours.min(i64::from(i32::MAX)))
        .execute(self)
    }
}

#[cfg(feature = "sqlite")]
impl Cleanup for diesel::SqliteConnection {
    fn cleanup(&mut self, group: &str, hours: i64) -> QueryResult<usize> {
        diesel::sql_query(
            "DELETE FROM devour_inbox WHERE (consumer_group, message_key) IN ( \
               SELECT consumer_group, message_key FROM devour_inbox WHERE consumer_group = ?1 \
               AND processed_at < strftime('%Y-%m-%d %H:%M:%f', 'now', '-' || ?2 || ' hours') \
               LIMIT 10000)",
        )
        .bind::<Text, _>(group)
        .bind::<BigInt, _>(hours)
        .execute(self)
    }
}

/// Fails with a hint when `devour_inbox` does not exist (migrations not applied).
pub(crate) fn check_table(conn: &mut crate::db::DbConnection) -> Result<(), crate::db::DbError> {
    let q = "SELECT 1 FROM devour_inbox WHERE 1 = 0";
    crate::db::each_backend!(conn, c => diesel::sql_query(q).execute(&mut **c).map(|_| ())?);
    Ok(())
}
