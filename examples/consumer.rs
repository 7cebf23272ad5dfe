//! A consumer binary with its own handlers: it registers them in a `Registry` and hands that to
//! devour's command line, so it has every `devour` subcommand (`migrate`, `status`, `outbox …`)
//! and `consume NAME` routes to its handlers.
//!
//! Two handlers:
//! - `order-totals` (`dump = "obj"`, `inbox = true`): keeps each customer's order count and total
//!   in table `order_totals` (an order counts once, as it is now: an `update` replaces its old
//!   total, a `delete` takes it out), in the inbox transaction, so a message Kafka or the relay
//!   delivers twice counts once too;
//! - `audit`: prints one line per message (any `dump`).
//!
//! ```toml
//! [consumers.totals]
//! topic = "orders"
//! handler = "order-totals"
//! dump = "obj"
//! inbox = true
//! ```
//!
//! ```sh
//! cargo run --example consumer -- migrate
//! cargo run --example consumer -- consume totals --drain
//! ```

use std::process::ExitCode;

use devour::consume::{Consumer, Ctx, DigestError, Meta, Payload, Registry};
use diesel::connection::SimpleConnection;

/// The `orders` messages of the quickstart app.
#[derive(Debug, serde::Deserialize)]
struct Order {
    id: i64,
    customer_id: i64,
    total_cents: i64,
    /// Added by devour to every `ProducerModel` message.
    event: Option<String>,
}

const TABLES: &str = "CREATE TABLE IF NOT EXISTS order_totals \
    (customer_id BIGINT PRIMARY KEY, orders BIGINT NOT NULL, total_cents BIGINT NOT NULL); \
    CREATE TABLE IF NOT EXISTS order_lines \
    (id BIGINT PRIMARY KEY, customer_id BIGINT NOT NULL, total_cents BIGINT NOT NULL)";

/// Keeps `order_totals` up to date, exactly once per order message.
struct OrderTotals;

impl OrderTotals {
    fn apply(conn: &mut impl SimpleConnection, order: &Order) -> Result<(), DigestError> {
        conn.batch_execute(TABLES)?;
        // Take the order's last known line (if any) out of its customer's total…
        conn.batch_execute(&format!(
            "UPDATE order_totals SET orders = orders - 1, \
               total_cents = total_cents - (SELECT total_cents FROM order_lines WHERE id = {id}) \
             WHERE customer_id = (SELECT customer_id FROM order_lines WHERE id = {id}); \
             DELETE FROM order_lines WHERE id = {id}",
            id = order.id,
        ))?;
        // …then, unless it was deleted, put it back as it is now.
        if order.event.as_deref() != Some("delete") {
            conn.batch_execute(&format!(
                "INSERT INTO order_lines (id, customer_id, total_cents) VALUES ({id}, {c}, {t}); \
                 INSERT INTO order_totals (customer_id, orders, total_cents) VALUES ({c}, 1, {t}) \
                 ON CONFLICT (customer_id) DO UPDATE SET orders = order_totals.orders + 1, \
                 total_cents = order_totals.total_cents + {t}",
                id = order.id,
                c = order.customer_id,
                t = order.total_cents,
            ))?;
        }
        Ok(())
    }
}

impl Consumer for OrderTotals {
    type Message = Order;
    const DUMPS: &'static [devour::config::Dump] = &[devour::config::Dump::Obj];

    fn digest(
        &mut self,
        meta: &Meta<'_>,
        message: Payload<'_, Order>,
        ctx: &mut Ctx<'_>,
    ) -> Result<(), DigestError> {
        let order = message
            .into_obj()
            .ok_or_else(|| DigestError::give_up("order-totals needs dump = \"obj\""))?;
        if order.total_cents < 0 {
            // Will never be right: to the dead-letter topic, the consumer goes on.
            return Err(DigestError::give_up(format!(
                "order {} has a negative total",
                order.id
            )));
        }
        if let Some(c) = ctx.postgres() {
            Self::apply(c, &order)?;
        } else if let Some(c) = ctx.sqlite() {
            Self::apply(c, &order)?;
        } else {
            return Err(DigestError::give_up("order-totals needs inbox = true"));
        }
        tracing::debug!(offset = meta.offset, order = order.id, "counted");
        Ok(())
    }
}

/// Prints a line per message.
struct Audit;

impl Consumer for Audit {
    type Message = serde_json::Value;

    fn digest(
        &mut self,
        meta: &Meta<'_>,
        message: Payload<'_, serde_json::Value>,
        _ctx: &mut Ctx<'_>,
    ) -> Result<(), DigestError> {
        let body = match message {
            Payload::Raw(b) => String::from_utf8_lossy(b).into_owned(),
            Payload::Json(v) | Payload::Obj(v) => v.to_string(),
        };
        println!(
            "{}[{}]@{} key={} event={} {body}",
            meta.topic,
            meta.partition,
            meta.offset,
            meta.key_str().unwrap_or("-"),
            meta.event().map(|e| e.to_string()).unwrap_or_default(),
        );
        Ok(())
    }
}

fn main() -> ExitCode {
    let mut registry = Registry::new();
    registry.register("order-totals", || OrderTotals);
    registry.register("audit", || Audit);
    devour::cli::main_with(registry)
}
