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
    consumer: BaseConsumer,
    route: ConsumerRoute,
}

impl LagReader {
    /// A reader for `route`.
    pub fn new(config: &Config, route: &ConsumerRoute) -> Result<LagReader, String> {
        let consumer: BaseConsumer = super::consumer_config(config, route, |c| {
            c.set("group.id", &route.group)
                .set("enable.auto.commit", "false");
        })
        .create()
        .map_err(|e| format!("creating a consumer: {e}"))?;
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
    consumer: &BaseConsumer,
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
        if t.error().is_some() {
            // The topic does not exist (yet): nothing to be behind on.
            continue;
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
