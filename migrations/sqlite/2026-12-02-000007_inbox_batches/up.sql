-- `devour consume` with `inbox = true`, recorded per transaction instead of per message (see the
-- PostgreSQL migration). `keys` is a JSON array of strings.

CREATE TABLE devour_inbox_offsets (
    consumer_group  TEXT NOT NULL,
    topic           TEXT NOT NULL,
    kafka_partition INTEGER NOT NULL,
    through_offset  INTEGER NOT NULL,
    previous_offset INTEGER NOT NULL,
    processed_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    PRIMARY KEY (consumer_group, topic, kafka_partition)
) WITHOUT ROWID;

CREATE TABLE devour_inbox_batches (
    consumer_group  TEXT NOT NULL,
    topic           TEXT NOT NULL,
    kafka_partition INTEGER NOT NULL,
    first_offset    INTEGER NOT NULL,
    last_offset     INTEGER NOT NULL,
    replay          INTEGER NOT NULL,
    min_key         TEXT NOT NULL,
    max_key         TEXT NOT NULL,
    keys            TEXT NOT NULL,
    processed_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now'))
);
CREATE INDEX devour_inbox_batches_offsets ON devour_inbox_batches
    (consumer_group, topic, kafka_partition, last_offset) WHERE NOT replay;
CREATE INDEX devour_inbox_batches_replays ON devour_inbox_batches
    (consumer_group, topic, kafka_partition, last_offset) WHERE replay;
CREATE INDEX devour_inbox_batches_keys ON devour_inbox_batches (consumer_group, topic, max_key);
CREATE INDEX devour_inbox_batches_processed_at ON devour_inbox_batches (processed_at);

-- Carried over as on PostgreSQL: replay rows spanning each partition's whole range of offsets.
INSERT INTO devour_inbox_offsets
    (consumer_group, topic, kafka_partition, through_offset, previous_offset, processed_at)
SELECT consumer_group, topic, kafka_partition, max(kafka_offset), max(kafka_offset), max(processed_at)
FROM devour_inbox GROUP BY consumer_group, topic, kafka_partition;
INSERT INTO devour_inbox_batches
    (consumer_group, topic, kafka_partition, first_offset, last_offset, replay, min_key, max_key,
     keys, processed_at)
SELECT i.consumer_group, i.topic, i.kafka_partition, p.lo, p.hi, 1,
       min(i.message_key), max(i.message_key), json_group_array(i.message_key), max(i.processed_at)
FROM devour_inbox i
JOIN (SELECT consumer_group, topic, kafka_partition, min(kafka_offset) AS lo, max(kafka_offset) AS hi
      FROM devour_inbox GROUP BY consumer_group, topic, kafka_partition) p
  USING (consumer_group, topic, kafka_partition)
GROUP BY i.consumer_group, i.topic, i.kafka_partition, p.lo, p.hi, i.kafka_offset / 10000;
DROP TABLE devour_inbox;

-- The relay's side (see the PostgreSQL migration).
ALTER TABLE devour_relays ADD COLUMN sent_through INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devour_relay_leases ADD COLUMN sent_through INTEGER NOT NULL DEFAULT 0;
