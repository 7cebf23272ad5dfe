//! The quickstart app: saves models through `ProducerModel`; each save writes its message into
//! the outbox in the same transaction. Run it with `bin/quickstart`.
//!
//! It works on whichever database devour.toml (or `DEVOUR_DATABASE_URL`) names: the code below
//! is written once for both backends.

use devour::config::DatabaseUrl;
use devour::outbox::OutboxBackend;
use devour::prelude::*;
use diesel::connection::{LoadConnection, SimpleConnection};
use diesel::prelude::*;
use serde::Serialize;

diesel::table! {
    customers (id) {
        id -> BigInt,
        name -> Text,
        email -> Text,
        tier -> Text,
    }
}

diesel::table! {
    orders (id) {
        id -> BigInt,
        customer_id -> BigInt,
        total_cents -> BigInt,
        status -> Text,
    }
}

/// A customer: messages on topic `customers`, keyed by the customer's id.
#[derive(
    Debug,
    Clone,
    Queryable,
    Selectable,
    Insertable,
    AsChangeset,
    Identifiable,
    Serialize,
    ProducerModel,
)]
#[diesel(table_name = customers)]
#[devour(topic = "customers", partition_key = "id")]
struct Customer {
    id: i64,
    name: String,
    email: String,
    tier: String,
}

/// An order: keyed by its customer, so one customer's orders stay in order.
#[derive(
    Debug,
    Clone,
    Queryable,
    Selectable,
    Insertable,
    AsChangeset,
    Identifiable,
    Serialize,
    ProducerModel,
)]
#[diesel(table_name = orders)]
#[devour(topic = "orders", partition_key = "customer_id")]
struct Order {
    id: i64,
    customer_id: i64,
    total_cents: i64,
    status: String,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS customers (id BIGINT PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL, tier TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS orders (id BIGINT PRIMARY KEY, customer_id BIGINT NOT NULL, total_cents BIGINT NOT NULL, status TEXT NOT NULL);
";

fn main() -> anyhow::Result<()> {
    let config = devour::Config::load()?;
    devour::init(&config);
    match &config.database.url {
        DatabaseUrl::Sqlite(path) => {
            let mut conn = SqliteConnection::establish(path)?;
            devour::db::sqlite::configure(&mut conn, config.database.busy_timeout_ms)?;
            devour::run_migrations(&mut conn)?;
            app(&mut conn)
        }
        DatabaseUrl::Postgres(url) => {
            let mut conn = PgConnection::establish(url)?;
            devour::run_migrations(&mut conn)?;
            app(&mut conn)
        }
    }
}

/// The application: ordinary Diesel code plus `save`/`delete`.
fn app<C>(conn: &mut C) -> anyhow::Result<()>
where
    C: Connection<Backend: OutboxBackend> + LoadConnection + SimpleConnection,
    Customer: ModelStore<C::Backend>,
    Order: ModelStore<C::Backend>,
{
    conn.batch_execute(SCHEMA)?;
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;

    let mut ada = Customer {
        id: run,
        name: "Ada".into(),
        email: "ada@example.com".into(),
        tier: "free".into(),
    };
    let saved = ada.save(conn, SaveOptions::new())?;
    println!("saved customer {} → {} message", ada.id, saved.event);

    // Several changes in one transaction: all their messages commit together.
    conn.transaction(|conn| -> Result<(), devour::ProduceError> {
        ada.tier = "pro".into();
        let saved = ada.save(
            conn,
            SaveOptions::new().context(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        )?;
        println!("saved customer {} → {} message", ada.id, saved.event);
        let order = Order {
            id: run,
            customer_id: ada.id,
            total_cents: 4_200,
            status: "placed".into(),
        };
        let saved = order.save(conn, SaveOptions::new().extra("currency", "EUR"))?;
        println!(
            "saved order {} → {} message (with extra `currency`)",
            order.id, saved.event
        );
        Ok(())
    })?;

    // A transaction that fails leaves neither the model nor its message behind.
    let failed = conn.transaction(|conn| -> Result<(), devour::ProduceError> {
        Order {
            id: run + 1,
            customer_id: ada.id,
            total_cents: 1,
            status: "placed".into(),
        }
        .save(conn, SaveOptions::new())?;
        Err(devour::ProduceError::Custom("payment declined".into()))
    });
    println!(
        "rolled back order {}: {} (no row, no message)",
        run + 1,
        failed.unwrap_err()
    );

    let order = Order {
        id: run,
        customer_id: ada.id,
        total_cents: 4_200,
        status: "cancelled".into(),
    };
    let deleted = order.delete(conn, SaveOptions::new())?;
    println!("deleted order {} → {} message", order.id, deleted.event);
    Ok(())
}
