//! Refusals that the test broker cannot give on demand (it has no authorizer, and creates
//! topics as they are used), from librdkafka's mock cluster: a topic the relay may not write
//! to, and one that does not exist. Their rows go to the dead letters with the broker's error;
//! the other rows are delivered.

mod common;

use std::time::Duration;

use common::{Backend, TestConn, TestDb};
use diesel::prelude::*;
use rdkafka::mocking::MockCluster;
use rdkafka::types::RDKafkaRespErr;

#[derive(QueryableByName, Debug)]
struct Dead {
    #[diesel(sql_type = diesel::sql_types::Text)]
    topic: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    error: String,
}

/// A relay's configuration on `db` and the mock `cluster`, with `properties` (TOML lines) under
/// `[kafka.properties]`.
fn mock_config(
    db: &TestDb,
    cluster: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>,
    properties: &str,
) -> devour::Config {
    devour::Config::from_toml_str(
        &format!(
            "[database]\nurl = \"{}\"\n[kafka]\nhosts = \"{}\"\n[kafka.properties]\n{properties}\n\
             [relay]\nlease_ttl_ms = 3000\npoll_interval_ms = 50\n",
            db.url,
            cluster.bootstrap_servers()
        ),
        devour::config::Origin::Defaults,
        &Default::default(),
    )
    .unwrap()
}

#[test]
fn rows_for_a_topic_not_authorized_or_missing_are_dead_lettered() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("open", 1, 1).unwrap();
    cluster
        .topic_error(
            "denied",
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
        )
        .unwrap();
    cluster
        .topic_error(
            "missing",
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART,
        )
        .unwrap();
    let db = TestDb::new(Backend::Sqlite, "refusals");
    let mut c = SqliteConnection::open(&db);
    for (topic, seq) in [("open", 0), ("denied", 1), ("missing", 2), ("open", 3)] {
        common::insert_rows(&mut c, topic, seq, 1, 4);
    }
    let config = mock_config(
        &db,
        &cluster,
        "\"topic.metadata.propagation.max.ms\" = \"1000\"",
    );
    let options = devour::relay::RunOptions {
        mode: devour::relay::Mode::Drain,
        progress: false,
    };
    let handle = devour::relay::start(&config, options).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while c.count("devour_outbox") > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "rows left: {}",
            c.count("devour_outbox")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let report = handle.join().unwrap();
    let dead: Vec<Dead> =
        diesel::sql_query("SELECT topic, error FROM devour_dead_letters ORDER BY topic")
            .load(&mut c)
            .unwrap();
    println!("{report:?}\n{dead:?}");
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert_eq!(dead[0].topic, "denied");
    assert!(
        dead[0].error.contains("TopicAuthorizationFailed"),
        "{dead:?}"
    );
    assert_eq!(dead[1].topic, "missing");
    assert!(dead[1].error.contains("Unknown"), "{dead:?}");
    assert_eq!(report.delivered, 2, "{report:?}");
}

/// A broker with stale metadata (during a rolling restart, say) reports a topic that exists,
/// and that the relay has been writing to, as unknown. librdkafka then fails its messages at
/// once (its own wait is for topics it has not seen yet). Their rows wait, and go once the
/// topic answers again: they are dead-lettered only if it stays missing for
/// `topic.metadata.propagation.max.ms`.
#[test]
fn a_topic_reported_missing_for_a_moment_is_not_dead_lettered() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("flaky", 1, 1).unwrap();
    let db = TestDb::new(Backend::Sqlite, "refusals_flaky");
    let mut c = SqliteConnection::open(&db);
    let config = mock_config(
        &db,
        &cluster,
        "\"topic.metadata.propagation.max.ms\" = \"4000\"\n\
         \"topic.metadata.refresh.interval.ms\" = \"200\"",
    );
    let handle = devour::relay::start(&config, devour::relay::RunOptions::default()).unwrap();
    let wait_empty = |c: &mut SqliteConnection| {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while c.count("devour_outbox") > 0 {
            assert!(std::time::Instant::now() < deadline, "rows left");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    common::insert_rows(&mut c, "flaky", 0, 3, 2);
    wait_empty(&mut c);
    // Known for longer than librdkafka's own wait for a topic to appear.
    std::thread::sleep(Duration::from_secs(5));
    cluster
        .topic_error(
            "flaky",
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART,
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(600));
    common::insert_rows(&mut c, "flaky", 3, 3, 2);
    std::thread::sleep(Duration::from_secs(2));
    let dead = c.count("devour_dead_letters");
    cluster
        .topic_error("flaky", RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR)
        .unwrap();
    assert_eq!(
        dead, 0,
        "dead-lettered while the topic was only reported missing"
    );
    wait_empty(&mut c);
    handle.shutdown();
    let report = handle.join().unwrap();
    assert_eq!(
        (report.delivered, report.dead_lettered),
        (6, 0),
        "{report:?}"
    );
}
