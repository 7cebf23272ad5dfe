//! The write path on PostgreSQL and SQLite: a save and its outbox row commit or roll back together.

mod common;

use common::{Account, Audit, Note, Stamp, Tag, Tagged, TestConn, TestDb};
use devour::outbox::{shard_for_key, HEADER_TRACEPARENT};
use devour::prelude::*;
use devour::{OutboxMessage, ProduceError, Producer};
use serde_json::json;

both_backends!(
    commit_writes_model_and_outbox_row,
    rollback_writes_neither,
    save_twice_is_create_then_update,
    a_save_with_nothing_to_set_is_an_update,
    a_model_field_named_event_is_an_error_not_overwritten,
    delete_produces_delete,
    delete_of_missing_row_is_an_error_and_writes_nothing,
    produce_false_suppresses,
    auto_produce_false_needs_produce_true,
    extras_override_fields,
    context_reaches_topic_and_key,
    traceparent_in_context_is_carried,
    oversize_message_writes_no_rows,
    oversize_update_keeps_the_old_row,
    invalid_topic_writes_no_rows,
    unserializable_payload_writes_no_rows,
    producer_writes_on_the_callers_transaction,
    save_inside_a_callers_transaction_rolls_back_with_it,
);

fn commit_writes_model_and_outbox_row<C: TestConn>(db: &TestDb)
where
    Account: ModelStore<C::Backend>,
{
    let mut c = C::open(db);
    let saved = Account::new(1, "ada")
        .save(&mut c, SaveOptions::new())
        .unwrap();
    assert_eq!(saved.event, Event::Create);
    assert_eq!(c.accounts(), vec![Account::new(1, "ada")]);
    let rows = c.outbox();
    assert_eq!(rows.len(), 1, "rows: {rows:?}");
    let r = &rows[0];
    assert_eq!(r.topic, "accounts");
    assert_eq!(r.key.as_deref(), Some("1"));
    assert_eq!(r.event.as_deref(), Some("create"));
    assert_eq!(r.content_type, "application/json");
    assert_eq!(r.shard, shard_for_key("1"), "shard of key 1");
    assert_eq!(
        r.payload,
        Some(json!({"id": 1, "name": "ada", "email": null, "version": 0, "event": "create"}))
    );
    let produced = saved.produced.expect("produced");
    assert_eq!(produced.outbox_id, Some(r.id));
    assert_eq!(r.message_id, produced.message.message_id.to_string());
}

fn rollback_writes_neither<C: TestConn>(db: &TestDb)
where
    Account: ModelStore<C::Backend>,
{
    let mut c = C::open(db);
    let r: Result<(), ProduceError> = c.transaction(|c| {
        Account::new(1, "ada").save(c, SaveOptions::new())?;
        Account::new(2, "bob").save(c, SaveOptions::new())?;
        Err(ProduceError::Custom(
            "the application changed its mind".into(),
        ))
    });
    assert!(r.is_err());
    assert_eq!(c.count("accounts"), 0);
    assert_eq!(c.count("devour_outbox"), 0);
}

fn save_twice_is_create_then_update<C: TestConn>(db: &TestDb)
where
    Account: ModelStore<C::Backend>,
{
    let mut c = C::open(db);
    let mut a = Account::new(7, "ada");
    assert_eq!(
        a.save(&mut c, SaveOptions::new()).unwrap().event,
        Event::Create
    );
    a.name = "ada lovelace".into();
    a.email = Some("ada@example.com".into());
    let saved = a.save(&mut c, SaveOptions::new()).unwrap();
    assert_eq!(saved.event, Event::Update);
    assert_eq!(saved.model, a);
    assert_eq!(c.accounts(), vec![a]);
    let rows = c.outbox();
    let events: Vec<_> = rows.iter().map(|r| r.event.clone().unwrap()).collect();
    assert_eq!(events, ["create", "update"], "rows: {rows:?}");
    assert!(rows[0].id < rows[1].id);
    assert_eq!(rows[1].payload.as_ref().unwrap()["name"], "ada lovelace");
    assert_eq!(rows[1].payload.as_ref().unwrap()["event"], "update");
}

/// A model whose other fields are all `None` without `treat_none_as_null` gives Diesel nothing to
/// set: saving it again is still an update (it was an error).
fn a_save_with_nothing_to_set_is_an_update<C: TestConn>(db: &TestDb)
where
    Tag: ModelStore<C::Backend>,
{
    let mut c = C::open(db);
    let t = Tag { id: 1, color: None };
    let events: Vec<Event> = (0..2)
        .map(|_| t.save(&mut c, SaveOptions::new()).unwrap().event)
        .collect();
    assert_eq!(events, [Event::Create, Event::Update]);
    let red = Tag {
        id: 2,
        color: Some("red".into()),
    };
    red.save(&mut c, SaveOptions::new()).unwrap();
    // `None` means "leave it" here (Diesel's default): the row keeps its colour.
    let saved = Tag { id: 2, color: None }
        .save(&mut c, SaveOptions::new())
        .unwrap();
    assert_eq!((saved.event, saved.model), (Event::Update, red));
    let events: Vec<_> = c
        .outbox()
        .iter()
        .map(|r| r.event.clone().unwrap())
        .collect();
    assert_eq!(events, ["create", "update", "create", "update"]);
}

/// A model's own `event` column would silently become create/update/delete in the message:
/// the save fails instead, and writes nothing.
fn a_model_field_named_event_is_an_error_not_overwritten<C: TestConn>(db: &TestDb)
where
    Audit: ModelStore<C::Backend>,
{
    let mut c = C::open(db);
    let a = Audit {
        id: 1,
        event: "login".into(),
    };
    let err = a.save(&mut c, SaveOptions::new()).unwrap_err();
    assert!(
        err.to_string().contains("has a field `event` of its own"),
        "{err}"
    );
    assert_eq!((c.count("audits"), c.count("devour_outbox")), (0, 0));
}

fn delete_produces_delete<C: TestConn>(db: &TestDb)
where
    Account: ModelStore<C::Backend>,
{
    let mut c = C::open(db);
    let a = Account::new(3, "cy");
    a.save(&mut c, SaveOptions::new()).unwrap();
    let d = a.delete(&mut c, SaveOptions::new()).unwrap();
    assert_eq!(d.event, Event::Delete);
    assert_eq!(d.model, a);
    assert_eq!(c.count("accounts"), 0);
    let rows = c.outbox();
    assert_eq!(rows.len(), 2, "rows: {rows:?}");
    assert_eq!(rows[1].event.as_deref(), Some("delete"));
    assert_eq!(rows[1].payload.as_ref().unwrap()["event"], "delete");
    assert_eq!(rows[1].payload.as_ref().unwrap()["name"], "cy");
    assert_eq!(rows[1].key.as_deref(), Some("3"));
}

fn delete_of_missing_row_is_an_error_and_writes_nothing<C: TestConn>(db: &TestDb)
where
    Account: ModelStore<C::Backend>,
{
    let mut c = C::open(db);
    let err = Account::new(99, "ghost")
        .delete(&mut c, SaveOptions::new())
        .unwrap_err();
    assert!(matches!(err, ProduceError::NotFound { .. }), "{err}");
    assert_eq!(c.count("devour_outbox"), 0);
}

fn produce_false_suppresses<C: TestConn>(db: &TestDb)
where
    Account: ModelStore<C::Backend>,
{
    let mut c = C::open(db);
    let a = Account::new(1, "quiet");
    let saved = a.save(&mut c, SaveOptions::new().produce(false)).unwrap();
    assert!(saved.produced.is_none());
    a.delete(&mut c, SaveOptions::new().produce(false)).unwrap();
    assert_eq!(c.count("devour_outbox"), 0);
    // The saves themselves happened.
    a.save(&mut c, SaveOptions::new().produce(false)).unwrap();
    assert_eq!(c.count("accounts"), 1);
}

fn auto_produce_false_needs_produce_true<C: TestConn>(db: &TestDb)
where
    Note: ModelStore<C::Backend>,
{
    let mut c = C::open(db);
    let n = Note {
        id: 1,
        body: "draft".into(),
    };
    assert!(n
        .save(&mut c, SaveOptions::new())
        .unwrap()
        .produced
        .is_none());
    assert_eq!(c.count("devour_outbox"), 0);
    let saved = n.save(&mut c, SaveOptions::new().produce(true)).unwrap();
    assert_eq!(saved.event, Event::Update);
    let rows = c.outbox();
    assert_eq!(rows.len(), 1, "rows: {rows:?}");
    // No topic configured: the generic topic is the table name; no partition key.
    assert_eq!(rows[0].topic, "notes");
    assert_eq!(rows[0].key, None);
}

fn extras_override_fields<C: TestConn>(db: &TestDb)
where
    Account: ModelStore<C::Backend>,
{
    let mut c = C::open(db);
    Account::new(5, "real name")
        .save(
            &mut c,
            SaveOptions::new()
                .extra("name", "shown name")
                .extra("source", "signup-form"),
        )
        .unwrap();
    let p = c.outbox()[0].payload.clone().unwrap();
    assert_eq!(p["name"], "shown name");
    assert_eq!(p["source"], "signup-form");
    assert_eq!(p["id"], 5);
    // The model row keeps its own value.
    assert_eq!(c.accounts()[0].name, "real name");
}

fn context_reaches_topic_and_key<C: TestConn>(db: &TestDb)
where
    Tagged: ModelStore<C::Backend>,
{
    let mut c = C::open(db);
    Tagged {
        id: 1,
        label: "blue".into(),
    }
    .save(
        &mut c,
        SaveOptions::new()
            .context("tenant", "acme")
            .context("key_prefix", "k-"),
    )
    .unwrap();
    let rows = c.outbox();
    assert_eq!(rows[0].topic, "tenant-acme.create");
    assert_eq!(rows[0].key.as_deref(), Some("k-blue"));
}

fn traceparent_in_context_is_carried<C: TestConn>(db: &TestDb)
where
    Account: ModelStore<C::Backend>,
{
    let mut c = C::open(db);
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    Account::new(1, "traced")
        .save(&mut c, SaveOptions::new().context(HEADER_TRACEPARENT, tp))
        .unwrap();
    Account::new(2, "untraced")
        .save(&mut c, SaveOptions::new())
        .unwrap();
    let rows = c.outbox();
    assert_eq!(rows[0].headers.get("traceparent"), Some(&json!(tp)));
    assert!(rows[1].headers.is_empty(), "headers: {:?}", rows[1].headers);
    assert_ne!(rows[0].message_id, rows[1].message_id);
}

fn oversize_message_writes_no_rows<C: TestConn>(db: &TestDb)
where
    Account: ModelStore<C::Backend>,
{
    let mut c = C::open(db);
    let big = Account::new(1, &"x".repeat(1024 * 1024));
    let err = big.save(&mut c, SaveOptions::new()).unwrap_err();
    match &err {
        ProduceError::TooLarge { size, max, topic } => {
            assert!(*size > 1024 * 1024);
            assert_eq!(*max, 1024 * 1024);
            assert_eq!(topic, "accounts");
        }
        other => panic!("expected TooLarge, got {other}"),
    }
    assert!(err.to_string().contains("max_message_bytes"), "{err}");
    assert_eq!(c.count("accounts"), 0);
    assert_eq!(c.count("devour_outbox"), 0);
}

fn oversize_update_keeps_the_old_row<C: TestConn>(db: &TestDb)
where
    Account: ModelStore<C::Backend>,
{
    let mut c = C::open(db);
    Account::new(1, "small")
        .save(&mut c, SaveOptions::new())
        .unwrap();
    let err = Account::new(1, &"y".repeat(2 * 1024 * 1024))
        .save(&mut c, SaveOptions::new())
        .unwrap_err();
    assert!(matches!(err, ProduceError::TooLarge { .. }), "{err}");
    assert_eq!(c.accounts(), vec![Account::new(1, "small")]);
    assert_eq!(c.count("devour_outbox"), 1);
}

fn invalid_topic_writes_no_rows<C: TestConn>(db: &TestDb)
where
    Tagged: ModelStore<C::Backend>,
{
    let mut c = C::open(db);
    for tenant in ["has space", "slash/y", &"t".repeat(250)] {
        let err = Tagged {
            id: 1,
            label: "x".into(),
        }
        .save(&mut c, SaveOptions::new().context("tenant", tenant))
        .unwrap_err();
        assert!(
            matches!(err, ProduceError::InvalidTopic { .. }),
            "{tenant}: {err}"
        );
    }
    assert_eq!(c.count("tagged"), 0);
    assert_eq!(c.count("devour_outbox"), 0);
}

fn unserializable_payload_writes_no_rows<C: TestConn>(db: &TestDb)
where
    Account: ModelStore<C::Backend>,
{
    let mut c = C::open(db);
    let err = Account::new(1, "boom")
        .save(&mut c, SaveOptions::new())
        .unwrap_err();
    assert!(matches!(err, ProduceError::Serialize { .. }), "{err}");
    assert!(err.to_string().contains("cannot be serialized"), "{err}");
    assert_eq!(c.count("accounts"), 0);
    assert_eq!(c.count("devour_outbox"), 0);
}

/// A general producer: signups keyed by e-mail.
#[derive(serde::Serialize)]
struct Signup {
    email: String,
    plan: &'static str,
}
struct SignupProducer;
impl Producer for SignupProducer {
    type Source = str;
    type Message = Signup;
    const CONFIG: ProducerConfig = ProducerConfig::new()
        .topic("signups")
        .partition_key("email");
    fn get_schema(&self, _: &Event, email: &str, ctx: &Context) -> Result<Signup, ProduceError> {
        let plan = if ctx.get("paid").is_some() {
            "paid"
        } else {
            "free"
        };
        Ok(Signup {
            email: email.to_string(),
            plan,
        })
    }
}

fn producer_writes_on_the_callers_transaction<C: TestConn>(db: &TestDb) {
    let mut c = C::open(db);
    let mut extras = devour::Extras::new();
    extras.insert("campaign".into(), json!("winter"));
    c.transaction(|c| {
        SignupProducer.produce(
            c,
            Event::Create,
            "a@example.com",
            &extras,
            &Context::new().with("paid", true),
        )
    })
    .unwrap();
    let _ = c.transaction(|c| {
        SignupProducer.produce(c, Event::Create, "b@example.com", &extras, &Context::new())?;
        Err::<(), _>(ProduceError::Custom("rolled back".into()))
    });
    let rows = c.outbox();
    assert_eq!(rows.len(), 1, "only the committed message: {rows:?}");
    assert_eq!(rows[0].topic, "signups");
    assert_eq!(rows[0].key.as_deref(), Some("a@example.com"));
    assert_eq!(
        rows[0].payload,
        Some(
            json!({"email": "a@example.com", "plan": "paid", "campaign": "winter", "event": "create"})
        )
    );
}

fn save_inside_a_callers_transaction_rolls_back_with_it<C: TestConn>(db: &TestDb)
where
    Account: ModelStore<C::Backend>,
{
    let mut c = C::open(db);
    Account::new(1, "kept")
        .save(&mut c, SaveOptions::new())
        .unwrap();
    // The save succeeds (its savepoint is released), then the caller's transaction fails.
    let _ = c.transaction(|c| {
        let mut a = Account::new(1, "changed");
        a.version = 1;
        a.save(c, SaveOptions::new())?;
        Account::new(2, "new").save(c, SaveOptions::new())?;
        Err::<(), _>(ProduceError::Custom("later step failed".into()))
    });
    assert_eq!(c.accounts(), vec![Account::new(1, "kept")]);
    assert_eq!(c.count("devour_outbox"), 1);
}

both_backends!(
    save_all_writes_every_message_in_order,
    save_all_rolls_back_entirely_on_one_bad_model
);

fn save_all_writes_every_message_in_order<C: TestConn>(db: &TestDb)
where
    Account: ModelStore<C::Backend>,
{
    let mut c = C::open(db);
    Account::new(2, "exists")
        .save(&mut c, SaveOptions::new())
        .unwrap();
    let models: Vec<Account> = (1..=5).map(|i| Account::new(i, &format!("a{i}"))).collect();
    let saved =
        Account::save_all(&mut c, &models, SaveOptions::new().extra("batch", true)).unwrap();
    let events: Vec<_> = saved.iter().map(|s| s.event.as_str().to_string()).collect();
    assert_eq!(events, ["create", "update", "create", "create", "create"]);
    let rows = c.outbox();
    assert_eq!(rows.len(), 6, "{rows:?}");
    for (s, r) in saved.iter().zip(&rows[1..]) {
        let p = s.produced.as_ref().unwrap();
        assert_eq!(
            p.outbox_id,
            Some(r.id),
            "ids returned in the order of the models"
        );
        assert_eq!(r.message_id, p.message.message_id.to_string());
        assert_eq!(r.key.as_deref(), Some(s.model.id.to_string().as_str()));
        assert_eq!(r.payload.as_ref().unwrap()["batch"], true);
        assert_eq!(r.shard, shard_for_key(&s.model.id.to_string()));
    }
    assert!(rows.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(c.count("accounts"), 5);
    let none = Account::save_all(&mut c, &models, SaveOptions::new().produce(false)).unwrap();
    assert!(none
        .iter()
        .all(|s| s.produced.is_none() && s.event == Event::Update));
    assert_eq!(c.count("devour_outbox"), 6);
}

fn save_all_rolls_back_entirely_on_one_bad_model<C: TestConn>(db: &TestDb)
where
    Account: ModelStore<C::Backend>,
{
    let mut c = C::open(db);
    let mut models: Vec<Account> = (1..=3).map(|i| Account::new(i, "ok")).collect();
    models.push(Account::new(4, &"z".repeat(1024 * 1024 + 1)));
    let err = Account::save_all(&mut c, &models, SaveOptions::new()).unwrap_err();
    assert!(matches!(err, ProduceError::TooLarge { .. }), "{err}");
    assert_eq!(c.count("accounts"), 0);
    assert_eq!(c.count("devour_outbox"), 0);
}

/// A model with a PostgreSQL-only column type (`timestamptz`) and
/// `#[diesel(check_for_backend(diesel::pg::Pg))]` compiles (the derive generates no SQLite
/// store for it) and saves.
#[test]
fn a_postgres_only_model_saves() {
    use diesel::Connection;
    let db = TestDb::new(common::Backend::Postgres, "pg_only_model");
    let mut c = diesel::PgConnection::establish(&db.url).unwrap();
    let at = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
    let saved = Stamp { id: 1, at }
        .save(&mut c, SaveOptions::new())
        .unwrap();
    assert_eq!(saved.event, Event::Create);
    let rows = c.outbox();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0].payload.as_ref().unwrap()["at"],
        "2023-11-14T22:13:20+00:00"
    );
}

both_backends!(
    a_batch_failing_part_way_leaves_none_of_it_without_a_transaction,
    messages_the_database_cannot_store_or_that_share_an_id_are_refused
);

/// A batch goes in several statements (chunks): one that fails in a later chunk leaves none
/// of the earlier ones behind, also when the caller has no transaction open.
fn a_batch_failing_part_way_leaves_none_of_it_without_a_transaction<C: TestConn>(db: &TestDb) {
    let mut c = C::open(db);
    // A row keyed `boom` fails its INSERT: a stand-in for any failure after the first chunk.
    let trigger = if std::any::type_name::<C>().contains("Pg") {
        "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN RAISE EXCEPTION 'boom'; END $$; \
         CREATE TRIGGER boom BEFORE INSERT ON devour_outbox FOR EACH ROW \
           WHEN (NEW.partition_key = 'boom') EXECUTE FUNCTION boom();"
    } else {
        "CREATE TRIGGER boom BEFORE INSERT ON devour_outbox \
           WHEN NEW.partition_key = 'boom' BEGIN SELECT RAISE(ABORT, 'boom'); END;"
    };
    c.batch_execute(trigger).unwrap();
    let messages: Vec<OutboxMessage> = (0..1_500)
        .map(|i| {
            let mut m = OutboxMessage::new("t", Some(b"{}".to_vec()));
            m.key = Some(if i == 1_200 {
                "boom".into()
            } else {
                format!("k{i}")
            });
            m
        })
        .collect();
    let err = devour::outbox::write_messages(&mut c, &messages, 1 << 20).unwrap_err();
    assert!(matches!(err, ProduceError::Database(_)), "{err}");
    assert_eq!(
        c.count("devour_outbox"),
        0,
        "rows of the earlier chunks stayed"
    );
}

fn messages_the_database_cannot_store_or_that_share_an_id_are_refused<C: TestConn>(db: &TestDb) {
    let mut c = C::open(db);
    let ok = OutboxMessage::new("t", Some(b"{}".to_vec()));
    let mut nul_key = OutboxMessage::new("t", Some(b"{}".to_vec()));
    nul_key.key = Some("a\0b".into());
    let mut nul_event = OutboxMessage::new("t", Some(b"{}".to_vec()));
    nul_event.event = Some("cre\0ate".into());
    for (bad, field) in [(nul_key, "key"), (nul_event, "event")] {
        let err = devour::outbox::write_messages(&mut c, &[ok.clone(), bad], 1 << 20).unwrap_err();
        assert!(
            matches!(&err, ProduceError::NulCharacter { field: f, .. } if *f == field),
            "{err}"
        );
    }
    // A message cloned to go to a second topic keeps its id.
    let mut copy = ok.clone();
    copy.topic = "u".into();
    let err = devour::outbox::write_messages(&mut c, &[ok.clone(), copy], 1 << 20).unwrap_err();
    assert!(
        matches!(err, ProduceError::DuplicateMessageId { message_id } if message_id == ok.message_id),
        "{err}"
    );
    assert_eq!(c.count("devour_outbox"), 0);
}
