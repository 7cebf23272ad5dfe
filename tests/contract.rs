//! The outbox table contract: the documented plain-SQL inserts work as written, and the
//! database's shard derivation agrees with Rust's murmur2 (and so with the Java client).

mod common;

use common::{Backend, TestConn, TestDb};
use devour::outbox::{murmur2, shard_for_key};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use serde_json::json;

/// The SQL block that follows `<!-- example: NAME -->` in docs/outbox-table.md.
fn documented_example(name: &str) -> String {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/outbox-table.md"))
        .unwrap();
    let marker = format!("<!-- example: {name} -->");
    let after = &doc[doc
        .find(&marker)
        .unwrap_or_else(|| panic!("{marker} missing from the doc"))
        + marker.len()..];
    let start = after.find("```sql\n").expect("sql block") + 7;
    let end = after[start..].find("```").expect("closed block");
    after[start..start + end].to_string()
}

fn documented_insert_is_delivered_as_written<C: TestConn>(db: &TestDb) {
    let mut c = C::open(db);
    c.batch_execute("CREATE TABLE orders (id BIGINT PRIMARY KEY, status TEXT NOT NULL); INSERT INTO orders VALUES (42, 'new');")
        .unwrap();
    let example = documented_example(match db.backend {
        Backend::Postgres => "postgres",
        Backend::Sqlite => "sqlite",
    });
    c.batch_execute(&example)
        .unwrap_or_else(|e| panic!("documented SQL failed: {e}\n{example}"));
    let rows = c.outbox();
    assert_eq!(rows.len(), 1, "{rows:?}");
    let r = &rows[0];
    assert_eq!(r.topic, "orders");
    assert_eq!(r.key.as_deref(), Some("42"));
    assert_eq!(r.payload, Some(json!({"id": 42, "status": "paid"})));
    assert_eq!(r.event.as_deref(), Some("update"));
    assert_eq!(r.content_type, "application/json");
    assert_eq!(
        r.headers["traceparent"],
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );
    assert_eq!(
        r.message_id.len(),
        36,
        "a UUID by default: {}",
        r.message_id
    );
    if db.backend == Backend::Postgres {
        assert_eq!(r.shard, shard_for_key("42"), "generated shard");
    }
}

fn database_rejects_invalid_topics<C: TestConn>(db: &TestDb) {
    let mut c = C::open(db);
    for bad in ["", "has space", "a/b", ".", ".."] {
        let sql = format!("INSERT INTO devour_outbox (topic, payload) VALUES ('{bad}', NULL)");
        assert!(
            c.batch_execute(&sql).is_err(),
            "topic {bad:?} accepted by the database"
        );
    }
    let long = "t".repeat(250);
    assert!(c
        .batch_execute(&format!(
            "INSERT INTO devour_outbox (topic) VALUES ('{long}')"
        ))
        .is_err());
    assert_eq!(c.count("devour_outbox"), 0);
}

/// A shard outside 0–255 has no lease: no relay would ever deliver the row.
fn database_rejects_shards_out_of_range<C: TestConn>(db: &TestDb) {
    let mut c = C::open(db);
    for bad in [-1, 256, 100_000] {
        let sql = format!(
            "INSERT INTO devour_outbox (topic, partition_key, shard) VALUES ('t', 'k', {bad})"
        );
        assert!(
            c.batch_execute(&sql).is_err(),
            "shard {bad} accepted by the database"
        );
    }
    c.batch_execute(
        "INSERT INTO devour_outbox (topic, partition_key, shard) VALUES ('t', 'k', 255)",
    )
    .unwrap();
    assert!(
        c.batch_execute("UPDATE devour_outbox SET shard = -3")
            .is_err(),
        "an update to shard -3 accepted by the database"
    );
    assert_eq!(c.count("devour_outbox"), 1);
}

both_backends!(
    documented_insert_is_delivered_as_written,
    database_rejects_invalid_topics,
    database_rejects_shards_out_of_range
);

#[derive(QueryableByName)]
struct Hashes {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    h: i32,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    shard: i32,
}

#[test]
fn postgres_shard_and_murmur2_match_rust() {
    let db = TestDb::new(Backend::Postgres, "murmur");
    let mut c = PgConnection::establish(&db.url).unwrap();
    // Keys of every length 0..=40, with multi-byte characters, plus the Java vectors.
    let mut keys: Vec<String> = vec![
        "21".into(),
        "foobar".into(),
        "abc".into(),
        "".into(),
        "ключ-🔑".into(),
    ];
    let mut seed = 0x2545_f491_u64;
    for len in 0..=40 {
        let s: String = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                char::from_u32(0x20 + (seed % 0x7e0) as u32).unwrap_or('x')
            })
            .collect();
        keys.push(s);
    }
    for key in &keys {
        let r: Hashes = diesel::sql_query(
            "SELECT devour_murmur2(convert_to($1, 'UTF8')) AS h, devour_shard($1, 0) AS shard",
        )
        .bind::<diesel::sql_types::Text, _>(key)
        .get_result(&mut c)
        .unwrap();
        assert_eq!(r.h, murmur2(key.as_bytes()), "murmur2 of {key:?}");
        assert_eq!(r.shard, shard_for_key(key), "shard of {key:?}");
    }
    assert_eq!(murmur2(b"21"), -973932308);
}

#[test]
fn keyless_rows_spread_over_shards_by_id_on_postgres() {
    let db = TestDb::new(Backend::Postgres, "keyless");
    let mut c = PgConnection::establish(&db.url).unwrap();
    c.batch_execute("INSERT INTO devour_outbox (topic) SELECT 't' FROM generate_series(1, 300)")
        .unwrap();
    let rows = c.outbox();
    for r in &rows {
        assert_eq!(i64::from(r.shard), r.id % 256, "row {r:?}");
    }
}
