//! How far a route's consumer group is behind: committed offsets against the end of each
//! partition, asked of the broker without joining the group.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::config::{Config, ConsumerRoute, StartFrom};

/// One partition's position.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PartitionLag {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// The group's committed offset (the next message it will read), if it committed one.
    pub committed: Option<i64>,
    /// The partition's end (high watermark).
    pub end: i64,
    /// Messages the group has not finished yet.
    pub lag: i64,
}

/// The lag of every partition of `route`'s topics. Asks the broker (`timeout` per request).
pub fn route_lag(
    config: &Config,
    route: &ConsumerRoute,
    timeout: Duration,
) -> Result<Vec<PartitionLag>, String> {
    LagReader::new(config, route)?.read(timeout)
}

/// Reads a route's lag again and again with one client (it never joins the group).
pub struct LagReader {
    consumer: BaseConsumer<crate::kafka_log::QuietContext>,
    route: ConsumerRoute,
}

impl LagReader {
    /// A reader for `route`.
    pub fn new(config: &Config, route: &ConsumerRoute) -> Result<LagReader, String> {
        let consumer = super::consumer_config(config, route, |c| {
            c.set("group.id", &route.group)
                .set("enable.auto.commit", "false");
        })
        .create_with_context(crate::kafka_log::QuietContext::default())
        .map_err(|e| format!("creating a consumer: {}", crate::kafka_log::redact(e)))?;
        Ok(LagReader {
            consumer,
            route: route.clone(),
        })
    }

    /// The lag of every partition now.
    pub fn read(&self, timeout: Duration) -> Result<Vec<PartitionLag>, String> {
        lag_of(&self.consumer, &self.route, timeout)
    }
}

fn lag_of(
    consumer: &BaseConsumer<crate::kafka_log::QuietContext>,
    route: &ConsumerRoute,
    timeout: Duration,
) -> Result<Vec<PartitionLag>, String> {
    let mut tpl = TopicPartitionList::new();
    let mut ends = Vec::new();
    for topic in &route.topics {
        let meta = consumer
            .fetch_metadata(Some(topic), timeout)
            .map_err(|e| format!("metadata of {topic}: {e}"))?;
        let Some(t) = meta.topics().iter().find(|t| t.name() == topic) else {
            continue;
        };
        match t.error() {
            None => {}
            // The topic does not exist (yet): nothing to be behind on.
            Some(rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART) => {
                continue
            }
            // Not authorized to describe it, no leader, …: unknown, not zero.
            Some(e) => {
                return Err(format!(
                    "metadata of {topic}: {}",
                    rdkafka::types::RDKafkaErrorCode::from(e)
                ))
            }
        }
        for p in t.partitions() {
            let (low, high) = consumer
                .fetch_watermarks(topic, p.id(), timeout)
                .map_err(|e| format!("end offsets of {topic}[{}]: {e}", p.id()))?;
            tpl.add_partition(topic, p.id());
            ends.push((topic.clone(), p.id(), low, high));
        }
    }
    if ends.is_empty() {
        return Ok(Vec::new());
    }
    let committed = consumer
        .committed_offsets(tpl, timeout)
        .map_err(|e| format!("committed offsets of group {}: {e}", route.group))?;
    Ok(ends
        .into_iter()
        .map(|(topic, partition, low, end)| {
            let committed = match committed
                .find_partition(&topic, partition)
                .map(|e| e.offset())
            {
                Some(Offset::Offset(n)) => Some(n),
                _ => None,
            };
            let from = committed.unwrap_or(match route.start_from {
                StartFrom::Earliest => low,
                StartFrom::Latest => end,
            });
            PartitionLag {
                topic,
                partition,
                committed,
                end,
                lag: (end - from.max(low)).max(0),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::RDKafkaRespErr;

    /// A topic the broker will not describe (not authorized, here from librdkafka's mock
    /// cluster: a real broker without an authorizer cannot refuse on demand) makes the lag
    /// unknown, an error, not zero; a topic that does not exist yet has no lag.
    #[test]
    fn a_topic_the_broker_refuses_to_describe_is_an_error_not_zero_lag() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("refused", 1, 1).unwrap();
        cluster
            .topic_error(
                "refused",
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
            )
            .unwrap();
        let config = Config::from_toml_str(
            &format!(
                "[kafka]\nhosts = \"{}\"\n\
                 [consumers.refused]\ntopic = \"refused\"\nhandler = \"print\"\n\
                 [consumers.missing]\ntopic = \"missing\"\nhandler = \"print\"\n",
                cluster.bootstrap_servers()
            ),
            crate::config::Origin::Defaults,
            &Default::default(),
        )
        .unwrap();
        let timeout = Duration::from_secs(5);
        let err = route_lag(&config, &config.consumers["refused"], timeout).unwrap_err();
        assert!(err.contains("metadata of refused"), "{err}");
        let lag = route_lag(&config, &config.consumers["missing"], timeout).unwrap();
        assert!(lag.is_empty(), "{lag:?}");
    }
}
