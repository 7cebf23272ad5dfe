//! Concurrent saves on PostgreSQL: for every model, outbox order equals commit order.

mod common;

use std::collections::BTreeMap;

use common::{Account, Backend, TestConn, TestDb};
use devour::prelude::*;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;

const THREADS: i64 = 8;
const SAVES_PER_THREAD: i64 = 1_000;
const MODELS: i64 = 50;

#[test]
fn outbox_ids_increase_with_each_models_version() {
    let db = TestDb::new(Backend::Postgres, "concurrency");
    let mut setup = PgConnection::establish(&db.url).unwrap();
    for id in 0..MODELS {
        Account::new(id, "start")
            .save(&mut setup, SaveOptions::new().produce(false))
            .unwrap();
    }

    std::thread::scope(|s| {
        for t in 0..THREADS {
            let url = db.url.clone();
            s.spawn(move || {
                let mut c = PgConnection::establish(&url).unwrap();
                // Durability is not what this test is about; order is.
                c.batch_execute("SET synchronous_commit = off").unwrap();
                for i in 0..SAVES_PER_THREAD {
                    let id = (i * 7 + t * 13) % MODELS;
                    c.transaction::<_, devour::ProduceError, _>(|c| {
                        let mut a: Account = common_accounts_for_update(c, id);
                        a.version += 1;
                        a.name = format!("thread {t} save {i}");
                        a.save(c, SaveOptions::new())?;
                        Ok(())
                    })
                    .unwrap();
                }
            });
        }
    });

    let rows = setup.outbox();
    assert_eq!(
        rows.len() as i64,
        THREADS * SAVES_PER_THREAD,
        "one outbox row per save"
    );
    let mut versions: BTreeMap<String, Vec<(i64, i64)>> = BTreeMap::new();
    for r in &rows {
        let v = r.payload.as_ref().unwrap()["version"].as_i64().unwrap();
        versions
            .entry(r.key.clone().unwrap())
            .or_default()
            .push((r.id, v));
    }
    assert_eq!(versions.len() as i64, MODELS);
    for (key, seq) in &versions {
        // Rows come ordered by id: the versions must then be 1, 2, 3, … with no gap or repeat.
        let got: Vec<i64> = seq.iter().map(|(_, v)| *v).collect();
        let want: Vec<i64> = (1..=got.len() as i64).collect();
        if got != want {
            let first_bad = got
                .iter()
                .zip(&want)
                .position(|(g, w)| g != w)
                .unwrap_or(got.len().min(want.len()));
            panic!(
                "model {key}: versions in outbox-id order are not 1..={} (first difference at #{first_bad}: {:?})",
                want.len(),
                &seq[first_bad.saturating_sub(2)..(first_bad + 3).min(seq.len())]
            );
        }
    }
    let final_versions: i64 = setup.accounts().iter().map(|a| i64::from(a.version)).sum();
    assert_eq!(final_versions, THREADS * SAVES_PER_THREAD);
}

/// Reads account `id` locking its row, so concurrent writers of one model take turns.
fn common_accounts_for_update(c: &mut PgConnection, id: i64) -> Account {
    common::accounts::table
        .find(id)
        .select(Account::as_select())
        .for_update()
        .get_result(c)
        .unwrap()
}
