//! `ProducerModel`: a Diesel model whose `save` and `delete` write the model and its message in
//! one transaction, with `event` = `create`, `update` or `delete` decided by the database.

use diesel::connection::LoadConnection;
use serde::Serialize;
use serde_json::Value;

use super::{
    compose_body, deliver, deliver_one, key_from_field, Context, Draft, Event, Extras,
    OutboxBackend, OutboxMessage, ProduceError, Produced, ProducerConfig,
};

/// The table a model is stored in. Implemented by `#[derive(ProducerModel)]`.
pub trait ModelTable {
    /// The table's name (the default topic of the model's messages).
    const TABLE: &'static str;
}

/// How a model is inserted, updated and deleted on backend `DB`. Implemented for PostgreSQL and
/// SQLite by `#[derive(ProducerModel)]`, from the model's Diesel derives (`Insertable`,
/// `AsChangeset`, `Identifiable`, `Selectable`).
pub trait ModelStore<DB: diesel::backend::Backend>: Sized {
    /// Inserts the model unless a row with its primary key exists; returns the inserted row.
    fn insert_new<C: LoadConnection<Backend = DB>>(
        &self,
        conn: &mut C,
    ) -> diesel::QueryResult<Option<Self>>;
    /// Updates the row with the model's primary key; returns the updated row, if there was one.
    fn update_existing<C: LoadConnection<Backend = DB>>(
        &self,
        conn: &mut C,
    ) -> diesel::QueryResult<Option<Self>>;
    /// Deletes the row with the model's primary key; returns the deleted row, if there was one.
    fn delete_existing<C: LoadConnection<Backend = DB>>(
        &self,
        conn: &mut C,
    ) -> diesel::QueryResult<Option<Self>>;
}

/// Options of one `save` or `delete` (the seed's `produce`, `produce_context`, `produce_extras`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SaveOptions {
    /// Produce or not; `None` follows `auto_produce`, `Some` overrides it either way.
    pub produce: Option<bool>,
    /// Handed to every customizable method; a `traceparent` entry becomes a header.
    pub context: Context,
    /// Merged into the message; a key equal to a model field replaces that field.
    pub extras: Extras,
}

impl SaveOptions {
    /// Default options: produce as `auto_produce` says, empty context and extras.
    pub fn new() -> Self {
        SaveOptions::default()
    }
    /// Forces producing on or off.
    pub fn produce(mut self, on: bool) -> Self {
        self.produce = Some(on);
        self
    }
    /// Sets a context entry.
    pub fn context(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.context.0.insert(key.into(), value.into());
        self
    }
    /// Sets an extra field.
    pub fn extra(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.extras.insert(key.into(), value.into());
        self
    }
}

/// What a `save` or `delete` did.
#[derive(Debug, Clone, PartialEq)]
pub struct Saved<M> {
    /// The row as stored (or, for a delete, as it was), with database defaults filled in.
    pub model: M,
    /// `create`, `update` or `delete`.
    pub event: Event,
    /// The message produced, unless producing was off.
    pub produced: Option<Produced>,
}

/// A Diesel model that produces a message on every save and delete (the seed's Django
/// `ProducerModel`). Derive it:
///
/// ```ignore
/// #[derive(Queryable, Selectable, Insertable, AsChangeset, Identifiable, Serialize, ProducerModel)]
/// #[diesel(table_name = accounts)]
/// #[devour(topic = "accounts", partition_key = "id")]
/// struct Account { id: i64, name: String }
/// ```
///
/// With `#[devour(customize)]` the derive leaves this trait to you, so that you can override
/// `get_topic`, `get_schema` or `get_partition_key`.
///
/// `save` inserts the model unless a row with its primary key exists, else updates that row,
/// so the key must be inserted with the model. This compiles:
///
/// ```no_run
/// use devour::ProducerModel;
/// use diesel::prelude::*;
/// diesel::table! { notes (id) { id -> Integer, body -> Text } }
/// #[derive(Queryable, Selectable, Insertable, AsChangeset, Identifiable, serde::Serialize, ProducerModel)]
/// #[diesel(table_name = notes)]
/// struct Note {
///     id: i32,
///     body: String,
/// }
/// ```
///
/// and the same model with its key left out of inserts (for a key the database assigns) does
/// not: every `save` would insert a new row.
///
/// ```compile_fail
/// use devour::ProducerModel;
/// use diesel::prelude::*;
/// diesel::table! { notes (id) { id -> Integer, body -> Text } }
/// #[derive(Queryable, Selectable, Insertable, AsChangeset, Identifiable, serde::Serialize, ProducerModel)]
/// #[diesel(table_name = notes)]
/// struct Note {
///     #[diesel(skip_insertion)]
///     id: i32,
///     body: String,
/// }
/// ```
pub trait ProducerModel: ModelTable + Serialize + Sized {
    /// The producer settings (topic, partition key field, `auto_produce`, producer type).
    const CONFIG: ProducerConfig;

    /// The topic; by default [`generic_topic`](ProducerModel::generic_topic).
    fn get_topic(&self, event: &Event, context: &Context) -> Result<String, ProduceError> {
        let _ = (event, context);
        Ok(self.generic_topic())
    }

    /// The message before extras and `event`; by default the model's fields.
    fn get_schema(&self, event: &Event, context: &Context) -> Result<Value, ProduceError> {
        let _ = (event, context);
        serde_json::to_value(self).map_err(|source| ProduceError::Serialize {
            what: Self::TABLE.to_string(),
            source,
        })
    }

    /// The Kafka key; by default the field named by `CONFIG.partition_key` in `body`.
    fn get_partition_key(
        &self,
        event: &Event,
        context: &Context,
        body: &Value,
    ) -> Result<Option<String>, ProduceError> {
        let _ = (event, context);
        key_from_field(Self::TABLE, Self::CONFIG.partition_key, body)
    }

    /// `CONFIG.topic`, else the table name.
    fn generic_topic(&self) -> String {
        Self::CONFIG.topic.unwrap_or(Self::TABLE).to_string()
    }

    /// The message this model produces for `event` (fields + extras + `event`), topic and key
    /// decided, not yet validated or written.
    fn message(
        &self,
        event: &Event,
        extras: &Extras,
        context: &Context,
    ) -> Result<OutboxMessage, ProduceError> {
        let schema = self.get_schema(event, context)?;
        // A column named `event` would be replaced without a word: say so instead.
        if schema.get("event").is_some() && !extras.contains_key("event") {
            return Err(ProduceError::EventField {
                what: Self::TABLE.to_string(),
            });
        }
        let body = compose_body(Self::TABLE, schema, extras, event)?;
        let topic = self.get_topic(event, context)?;
        let key = self.get_partition_key(event, context, &body)?;
        Draft {
            what: Self::TABLE,
            config: &Self::CONFIG,
            event,
            topic,
            body,
            key,
            context,
        }
        .into_message()
    }

    /// Produces this model's message for `event` on `conn` without saving it.
    fn produce<C>(
        &self,
        conn: &mut C,
        event: Event,
        extras: &Extras,
        context: &Context,
    ) -> Result<Produced, ProduceError>
    where
        C: LoadConnection,
        C::Backend: OutboxBackend,
    {
        let message = self.message(&event, extras, context)?;
        deliver_one(conn, &Self::CONFIG, message)
    }

    /// Inserts or updates the model and writes its message, in one transaction (a savepoint
    /// inside the caller's). `event` is `create` when the row was inserted, `update` when it
    /// existed. Any error rolls both back.
    fn save<C>(&self, conn: &mut C, options: SaveOptions) -> Result<Saved<Self>, ProduceError>
    where
        C: LoadConnection,
        C::Backend: OutboxBackend,
        Self: ModelStore<C::Backend>,
    {
        conn.transaction(|conn| {
            let (model, event) = upsert(self, conn)?;
            let produced = if options.produce.unwrap_or(Self::CONFIG.auto_produce) {
                Some(model.produce(conn, event.clone(), &options.extras, &options.context)?)
            } else {
                None
            };
            Ok(Saved {
                model,
                event,
                produced,
            })
        })
    }

    /// Saves many models in one transaction and writes all their messages with a single
    /// multi-row INSERT: the fast way to save a batch. Each model's `event` is decided as in
    /// [`save`](ProducerModel::save); `options` apply to every model. Any error rolls all of it
    /// back. Messages are written in the order of `models`.
    fn save_all<C>(
        conn: &mut C,
        models: &[Self],
        options: SaveOptions,
    ) -> Result<Vec<Saved<Self>>, ProduceError>
    where
        C: LoadConnection,
        C::Backend: OutboxBackend,
        Self: ModelStore<C::Backend>,
    {
        conn.transaction(|conn| {
            let saved = models
                .iter()
                .map(|m| upsert(m, conn))
                .collect::<Result<Vec<_>, _>>()?;
            if !options.produce.unwrap_or(Self::CONFIG.auto_produce) {
                return Ok(saved
                    .into_iter()
                    .map(|(model, event)| Saved {
                        model,
                        event,
                        produced: None,
                    })
                    .collect());
            }
            let messages = saved
                .iter()
                .map(|(m, event)| m.message(event, &options.extras, &options.context))
                .collect::<Result<Vec<_>, _>>()?;
            let produced = deliver(conn, &Self::CONFIG, messages)?;
            Ok(saved
                .into_iter()
                .zip(produced)
                .map(|((model, event), p)| Saved {
                    model,
                    event,
                    produced: Some(p),
                })
                .collect())
        })
    }

    /// Deletes the model's row and writes a `delete` message, in one transaction.
    /// Deleting a row that does not exist is [`ProduceError::NotFound`] and produces nothing.
    fn delete<C>(&self, conn: &mut C, options: SaveOptions) -> Result<Saved<Self>, ProduceError>
    where
        C: LoadConnection,
        C::Backend: OutboxBackend,
        Self: ModelStore<C::Backend>,
    {
        conn.transaction(|conn| {
            let Some(model) = self.delete_existing(conn)? else {
                return Err(ProduceError::NotFound {
                    what: Self::TABLE.to_string(),
                });
            };
            let produced = if options.produce.unwrap_or(Self::CONFIG.auto_produce) {
                Some(model.produce(conn, Event::Delete, &options.extras, &options.context)?)
            } else {
                None
            };
            Ok(Saved {
                model,
                event: Event::Delete,
                produced,
            })
        })
    }
}

/// Inserts the model unless its primary key exists, else updates it; the database's answer
/// decides `create` or `update`.
fn upsert<M, C>(model: &M, conn: &mut C) -> Result<(M, Event), ProduceError>
where
    M: ModelStore<C::Backend>,
    C: LoadConnection,
{
    if let Some(row) = model.insert_new(conn)? {
        return Ok((row, Event::Create));
    }
    if let Some(row) = model.update_existing(conn)? {
        return Ok((row, Event::Update));
    }
    // The row was deleted between the two statements: insert it again.
    match model.insert_new(conn)? {
        Some(row) => Ok((row, Event::Create)),
        None => Err(ProduceError::Database(diesel::result::Error::NotFound)),
    }
}
