#![doc = include_str!("../README.md")]
// Safe Rust throughout, but for one module that reads Kafka header names through librdkafka's
// C API (`consume::raw_headers`, which says why).
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod broker;
pub mod cli;
pub mod config;
pub mod consume;
pub mod db;
mod kafka_log;
pub mod outbox;
pub mod relay;
pub mod status;
pub mod telemetry;

pub use config::{Config, ConfigError};
pub use db::{run_migrations, DbConnection, DbError, DbPool};
pub use devour_derive::ProducerModel;
pub use outbox::ProducerModel;
pub use outbox::{
    Context, Event, Extras, ModelStore, ModelTable, OutboxMessage, ProduceError, Produced,
    Producer, ProducerConfig, ProducerType, SaveOptions, Saved,
};

/// Applies a loaded configuration to the write path of this process: the maximum message size,
/// and the `[kafka]` settings of direct producers. Optional; nothing connects.
pub fn init(config: &Config) {
    outbox::set_max_message_bytes(config.outbox.max_message_bytes);
    outbox::init_direct(&config.kafka);
}

/// Everything an application needs to declare and save models.
pub mod prelude {
    pub use crate::outbox::{
        Context, Event, Extras, ModelStore, ModelTable, Producer, ProducerConfig, ProducerModel,
        ProducerType, SaveOptions,
    };
    pub use devour_derive::ProducerModel;
}

#[doc(hidden)]
pub mod __private {
    pub use diesel;
    pub use diesel::connection::LoadConnection;
    #[cfg(feature = "postgres")]
    pub use diesel::pg::Pg;
    pub use diesel::prelude::*;
    #[cfg(feature = "sqlite")]
    pub use diesel::sqlite::Sqlite;
    pub use diesel::QueryResult;

    /// Expands to nothing: the `postgres` feature is off.
    #[cfg(not(feature = "postgres"))]
    #[macro_export]
    macro_rules! __model_store_postgres {
        ($($t:tt)*) => {};
    }
    /// Expands to nothing: the `sqlite` feature is off.
    #[cfg(not(feature = "sqlite"))]
    #[macro_export]
    macro_rules! __model_store_sqlite {
        ($($t:tt)*) => {};
    }
}
