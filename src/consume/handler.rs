//! What a handler sees and returns: the [`Consumer`] trait, [`Meta`], [`Payload`], [`Ctx`],
//! [`DigestError`], and the [`Registry`] that maps handler names to handlers.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rdkafka::message::BorrowedMessage;
use serde::de::DeserializeOwned;

use crate::config::{ConsumerRoute, Dump};
use crate::outbox::Event;

/// A message handler: the seed's `DevourConsumer.digest`.
///
/// A route (`[consumers.NAME]` in devour.toml) names its handler; the runner polls Kafka, decodes
/// each message into the route's `dump` form, calls [`digest`](Consumer::digest), and commits the
/// message's offset only after `digest` returned `Ok` (or the message went to the dead-letter
/// topic). One handler instance serves one partition at a time; with `concurrency = N` the
/// registry's factory makes N instances.
///
/// ```
/// use devour::consume::{Consumer, Ctx, DigestError, Meta, Payload};
///
/// #[derive(serde::Deserialize)]
/// struct Order { id: i64, total: f64 }
///
/// struct Billing { seen: u64 }
///
/// impl Consumer for Billing {
///     type Message = Order;
///     fn digest(&mut self, meta: &Meta<'_>, message: Payload<'_, Order>, _ctx: &mut Ctx<'_>)
///         -> Result<(), DigestError> {
///         let order = message.into_obj().ok_or_else(|| DigestError::give_up("route must use dump = \"obj\""))?;
///         if order.total < 0.0 {
///             return Err(DigestError::give_up(format!("order {} has a negative total", order.id)));
///         }
///         self.seen += 1;
///         println!("order {} from partition {} ({:?})", order.id, meta.partition, meta.event());
///         Ok(())
///     }
/// }
/// ```
pub trait Consumer: Send + 'static {
    /// The message type for `dump = "obj"` (the seed's `schema_class`). Handlers that only take
    /// `raw` or `json` can use `serde_json::Value`.
    type Message: DeserializeOwned;

    /// The `dump` forms this handler accepts; a route with another one fails at start (exit 2).
    const DUMPS: &'static [Dump] = &[Dump::Raw, Dump::Json, Dump::Obj];

    /// Handles one message. `Err` retries it (with backoff, up to the route's
    /// `retry.max_attempts`) or, for [`DigestError::give_up`], sends it to the dead-letter topic
    /// at once. A panic counts as a retriable error.
    fn digest(
        &mut self,
        meta: &Meta<'_>,
        message: Payload<'_, Self::Message>,
        ctx: &mut Ctx<'_>,
    ) -> Result<(), DigestError>;
}

/// Where a message came from, and its key and headers.
#[derive(Debug)]
#[non_exhaustive]
pub struct Meta<'a> {
    /// The route's name (NAME in `devour consume NAME`).
    pub route: &'a str,
    /// Topic.
    pub topic: &'a str,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// The message key, if any.
    pub key: Option<&'a [u8]>,
    /// The message timestamp in Unix milliseconds, if the broker or producer set one.
    pub timestamp_ms: Option<i64>,
    /// Which attempt this is for this message (1 for the first).
    pub attempt: u32,
    /// The payload's bytes as they came, whatever the route's `dump`; `None` for a message
    /// without payload (a tombstone), which `dump = "raw"` hands over as empty bytes and
    /// `dump = "json"` as `null`.
    pub payload: Option<&'a [u8]>,
    pub(crate) headers: HeadersRef<'a>,
}

/// The headers of a borrowed or an owned message. Names are bytes: a producer may write a name
/// that is not UTF-8 (see `raw_headers`).
#[derive(Clone, Copy)]
pub(crate) enum HeadersRef<'a> {
    /// Parsed on first use (librdkafka parses a message's headers lazily; most handlers that
    /// never look at them should not pay for it).
    Borrowed(&'a BorrowedMessage<'a>),
    Owned(&'a [OwnedHeader]),
}

/// A header copied out of its message: (name, value).
pub(crate) type OwnedHeader = (Box<[u8]>, Option<Box<[u8]>>);

impl fmt::Debug for HeadersRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries((0..self.count()).filter_map(|i| {
                self.get(i)
                    .map(|(k, v)| (String::from_utf8_lossy(k), v.map(String::from_utf8_lossy)))
            }))
            .finish()
    }
}

impl<'a> HeadersRef<'a> {
    fn get(&self, idx: usize) -> Option<(&'a [u8], Option<&'a [u8]>)> {
        match *self {
            HeadersRef::Borrowed(m) => super::raw_headers::get(m, idx),
            HeadersRef::Owned(h) => h.get(idx).map(|(k, v)| (&k[..], v.as_deref())),
        }
    }

    fn count(&self) -> usize {
        match *self {
            HeadersRef::Borrowed(m) => super::raw_headers::count(m),
            HeadersRef::Owned(h) => h.len(),
        }
    }
}

impl<'a> Meta<'a> {
    /// All headers in order: (name, value). A header whose name is not UTF-8 (a producer
    /// other than devour may write one) is left out here; [`Meta::raw_headers`] has it.
    pub fn headers(&self) -> impl Iterator<Item = (&'a str, Option<&'a [u8]>)> + '_ {
        self.raw_headers()
            .filter_map(|(k, v)| std::str::from_utf8(k).ok().map(|k| (k, v)))
    }

    /// All headers in order, each name as the bytes it came as.
    pub fn raw_headers(&self) -> impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)> + '_ {
        (0..self.headers.count()).filter_map(|i| self.headers.get(i))
    }

    /// The value of the last header called `name`.
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        (0..self.headers.count())
            .rev()
            .filter_map(|i| self.headers.get(i))
            .find(|(k, _)| *k == name.as_bytes())
            .and_then(|(_, v)| v)
    }

    /// A header as UTF-8 text.
    pub fn header_str(&self, name: &str) -> Option<&'a str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The key as UTF-8 text.
    pub fn key_str(&self) -> Option<&'a str> {
        self.key.and_then(|k| std::str::from_utf8(k).ok())
    }

    /// The devour `event` header: create, update, delete or a custom event.
    pub fn event(&self) -> Option<Event> {
        self.header_str(crate::outbox::HEADER_EVENT)
            .map(Event::from)
    }

    /// The devour `message-id` header: the same on every redelivery of one outbox row.
    pub fn message_id(&self) -> Option<&'a str> {
        self.id_and_resent().0
    }

    /// [`Meta::message_id`] and [`Meta::possible_duplicate`] in one pass over the headers.
    pub(crate) fn id_and_resent(&self) -> (Option<&'a str>, bool) {
        let (mut id, mut resent) = (None, None);
        for i in (0..self.headers.count()).rev() {
            let Some((k, v)) = self.headers.get(i) else {
                continue;
            };
            if id.is_none() && k == crate::outbox::HEADER_MESSAGE_ID.as_bytes() {
                id = Some(v.and_then(|v| std::str::from_utf8(v).ok()));
            } else if resent.is_none() && k == crate::outbox::HEADER_POSSIBLE_DUPLICATE.as_bytes() {
                resent = Some(v == Some(b"true"));
            }
            if id.is_some() && resent.is_some() {
                break;
            }
        }
        (id.flatten(), resent.unwrap_or(false))
    }

    /// Whether the relay marked the message as one it may have sent before (header
    /// `possible-duplicate: true`): it may have been read already, at another offset.
    pub fn possible_duplicate(&self) -> bool {
        self.id_and_resent().1
    }
}

/// A message's payload in the route's `dump` form.
#[derive(Debug)]
pub enum Payload<'a, T> {
    /// `dump = "raw"`: the bytes (empty for a message without payload).
    Raw(&'a [u8]),
    /// `dump = "json"`: the payload parsed as JSON (`Null` for a message without payload).
    Json(serde_json::Value),
    /// `dump = "obj"`: the payload decoded into the handler's message type.
    Obj(T),
}

impl<'a, T> Payload<'a, T> {
    /// The bytes, for `dump = "raw"`.
    pub fn raw(&self) -> Option<&'a [u8]> {
        match self {
            Payload::Raw(b) => Some(b),
            _ => None,
        }
    }

    /// The JSON value, for `dump = "json"`.
    pub fn json(&self) -> Option<&serde_json::Value> {
        match self {
            Payload::Json(v) => Some(v),
            _ => None,
        }
    }

    /// The decoded message, for `dump = "obj"`.
    pub fn into_obj(self) -> Option<T> {
        match self {
            Payload::Obj(o) => Some(o),
            _ => None,
        }
    }
}

/// Decodes `bytes` into the form `dump` asks for.
pub(crate) fn decode<T: DeserializeOwned>(
    bytes: Option<&[u8]>,
    dump: Dump,
) -> Result<Payload<'_, T>, String> {
    match dump {
        Dump::Raw => Ok(Payload::Raw(bytes.unwrap_or_default())),
        Dump::Json => match bytes {
            None => Ok(Payload::Json(serde_json::Value::Null)),
            Some(b) => serde_json::from_slice(b)
                .map(Payload::Json)
                .map_err(|e| format!("payload is not JSON: {e}")),
        },
        Dump::Obj => serde_json::from_slice(bytes.unwrap_or(b"null"))
            .map(Payload::Obj)
            .map_err(|e| {
                format!(
                    "payload does not decode into {}: {e}",
                    std::any::type_name::<T>()
                )
            }),
    }
}

/// The database connection of an inbox transaction (`inbox = true`), by backend.
#[non_exhaustive]
pub enum TxConnection<'a> {
    /// PostgreSQL.
    #[cfg(feature = "postgres")]
    Postgres(&'a mut diesel::PgConnection),
    /// SQLite.
    #[cfg(feature = "sqlite")]
    Sqlite(&'a mut diesel::SqliteConnection),
}

/// What a handler can use besides the message.
#[non_exhaustive]
pub struct Ctx<'a> {
    pub(crate) tx: Option<TxConnection<'a>>,
    /// The handler asked for the connection.
    pub(crate) lent: bool,
}

impl<'a> Ctx<'a> {
    pub(crate) fn none() -> Ctx<'static> {
        Ctx {
            tx: None,
            lent: false,
        }
    }

    pub(crate) fn with(tx: TxConnection<'a>) -> Ctx<'a> {
        Ctx {
            tx: Some(tx),
            lent: false,
        }
    }

    /// With `inbox = true`: the connection whose transaction also records the message in the
    /// inbox. What the handler writes through it commits together with that record, once.
    /// `None` without an inbox.
    pub fn transaction(&mut self) -> Option<&mut TxConnection<'a>> {
        self.lent = true;
        self.tx.as_mut()
    }

    /// [`transaction`](Self::transaction) on PostgreSQL.
    #[cfg(feature = "postgres")]
    pub fn postgres(&mut self) -> Option<&mut diesel::PgConnection> {
        self.lent = true;
        match self.tx.as_mut()? {
            TxConnection::Postgres(c) => Some(c),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// [`transaction`](Self::transaction) on SQLite.
    #[cfg(feature = "sqlite")]
    pub fn sqlite(&mut self) -> Option<&mut diesel::SqliteConnection> {
        self.lent = true;
        match self.tx.as_mut()? {
            TxConnection::Sqlite(c) => Some(c),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }
}

/// A handler's failure, and what the runner should do about it.
///
/// Any error converts into a retriable one, so `?` works in `digest`.
pub struct DigestError {
    pub(crate) error: String,
    pub(crate) action: Action,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Retry(Option<Duration>),
    GiveUp,
    Stop,
}

impl DigestError {
    /// Try again after the route's backoff (until `retry.max_attempts`).
    pub fn retry(error: impl fmt::Display) -> DigestError {
        DigestError {
            error: error.to_string(),
            action: Action::Retry(None),
        }
    }

    /// Try again after `delay` instead of the route's backoff (until `retry.max_attempts`).
    pub fn retry_after(error: impl fmt::Display, delay: Duration) -> DigestError {
        DigestError {
            error: error.to_string(),
            action: Action::Retry(Some(delay)),
        }
    }

    /// This message will never succeed: send it to the dead-letter topic now.
    pub fn give_up(error: impl fmt::Display) -> DigestError {
        DigestError {
            error: error.to_string(),
            action: Action::GiveUp,
        }
    }

    /// The consumer itself cannot go on (its output is gone, a resource it needs for every
    /// message is lost): the message is not finished and its offset is not committed; the run
    /// stops as on SIGTERM, commits what was finished, and ends with this error (`devour
    /// consume` exits 1). Neither retried nor dead-lettered.
    pub fn stop(error: impl fmt::Display) -> DigestError {
        DigestError {
            error: error.to_string(),
            action: Action::Stop,
        }
    }

    /// The error text.
    pub fn message(&self) -> &str {
        &self.error
    }

    /// Whether the runner will try again (attempts permitting).
    pub fn is_retriable(&self) -> bool {
        matches!(self.action, Action::Retry(_))
    }
}

impl fmt::Debug for DigestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DigestError({:?}: {})", self.action, self.error)
    }
}

impl fmt::Display for DigestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.error)
    }
}

impl<E: std::error::Error> From<E> for DigestError {
    fn from(e: E) -> DigestError {
        DigestError::retry(e)
    }
}

/// One handler call, with the message already in hand; object-safe face of a [`Consumer`].
pub(crate) trait DynConsumer: Send {
    /// Decodes and digests. `Err(Undecodable)` when the payload does not decode.
    fn call(
        &mut self,
        meta: &Meta<'_>,
        payload: Option<&[u8]>,
        dump: Dump,
        ctx: &mut Ctx<'_>,
    ) -> Result<(), CallError>;
}

pub(crate) enum CallError {
    Undecodable(String),
    Digest(DigestError),
}

impl<C: Consumer> DynConsumer for C {
    fn call(
        &mut self,
        meta: &Meta<'_>,
        payload: Option<&[u8]>,
        dump: Dump,
        ctx: &mut Ctx<'_>,
    ) -> Result<(), CallError> {
        let message = decode::<C::Message>(payload, dump).map_err(CallError::Undecodable)?;
        self.digest(meta, message, ctx).map_err(CallError::Digest)
    }
}

type Factory =
    Box<dyn Fn(&ConsumerRoute) -> Result<Box<dyn DynConsumer>, String> + Send + Sync + 'static>;

struct Entry {
    factory: Factory,
    dumps: &'static [Dump],
}

/// Handlers by name. [`Registry::new`] holds the built-ins (`print`, `exec`); an application
/// registers its own and hands the registry to [`crate::cli::main_with`], so its binary has every
/// `devour` subcommand with its handlers routed.
///
/// ```no_run
/// use devour::consume::{Consumer, Ctx, DigestError, Meta, Payload, Registry};
///
/// struct Audit;
/// impl Consumer for Audit {
///     type Message = serde_json::Value;
///     fn digest(&mut self, meta: &Meta<'_>, m: Payload<'_, serde_json::Value>, _: &mut Ctx<'_>)
///         -> Result<(), DigestError> {
///         println!("{} {:?}", meta.offset, m.json());
///         Ok(())
///     }
/// }
///
/// fn main() -> std::process::ExitCode {
///     let mut registry = Registry::new();
///     registry.register("audit", || Audit);
///     devour::cli::main_with(registry)
/// }
/// ```
pub struct Registry {
    handlers: BTreeMap<String, Entry>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.handlers.keys()).finish()
    }
}

impl Registry {
    /// A registry with the built-in handlers `print` and `exec`.
    pub fn new() -> Registry {
        let mut r = Registry {
            handlers: BTreeMap::new(),
        };
        r.register_with_route("print", |route| Ok(super::builtin::Print::new(route)));
        r.register_with_route("exec", super::builtin::Exec::new);
        r
    }

    /// Registers handler `name`; `factory` makes one instance per worker. A later registration
    /// of the same name replaces the earlier one.
    pub fn register<C, F>(&mut self, name: &str, factory: F) -> &mut Registry
    where
        C: Consumer,
        F: Fn() -> C + Send + Sync + 'static,
    {
        self.register_with_route(name, move |_| Ok(factory()))
    }

    /// Like [`register`](Self::register), with a factory that reads the route it serves and may
    /// refuse it (the message is shown and `devour consume` exits 2).
    pub fn register_with_route<C, F>(&mut self, name: &str, factory: F) -> &mut Registry
    where
        C: Consumer,
        F: Fn(&ConsumerRoute) -> Result<C, String> + Send + Sync + 'static,
    {
        self.handlers.insert(
            name.to_string(),
            Entry {
                factory: Box::new(move |route| {
                    factory(route).map(|c| Box::new(c) as Box<dyn DynConsumer>)
                }),
                dumps: C::DUMPS,
            },
        );
        self
    }

    /// The registered names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.handlers.keys().map(String::as_str)
    }

    /// Checks that `route`'s handler exists and takes its `dump`; makes one instance.
    pub(crate) fn instantiate(
        &self,
        route: &ConsumerRoute,
    ) -> Result<Box<dyn DynConsumer>, String> {
        let key = format!("consumers.{}.handler", route.name);
        let Some(entry) = self.handlers.get(&route.handler) else {
            let names: Vec<&str> = self.names().collect();
            return Err(format!(
                "`{key}`: no handler named `{}`{} (registered: {})",
                route.handler,
                if route.handler == route.name {
                    " (`handler` defaults to the route's name)"
                } else {
                    ""
                },
                names.join(", ")
            ));
        };
        if !entry.dumps.contains(&route.dump) {
            let forms: Vec<&str> = entry.dumps.iter().map(|d| d.as_str()).collect();
            return Err(format!(
                "`consumers.{}.dump`: handler `{}` does not take dump = \"{}\" (it takes: {})",
                route.name,
                route.handler,
                route.dump.as_str(),
                forms.join(", ")
            ));
        }
        (entry.factory)(route).map_err(|e| format!("`{key}`: handler `{}`: {e}", route.handler))
    }
}
