ALTER TABLE devour_relay_leases DROP COLUMN sent_through;
ALTER TABLE devour_relays DROP COLUMN sent_through;
CREATE TABLE devour_inbox (
    consumer_group  TEXT NOT NULL,
    message_key     TEXT NOT NULL,
    topic           TEXT NOT NULL,
    kafka_partition INTEGER NOT NULL,
    kafka_offset    BIGINT NOT NULL,
    processed_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    PRIMARY KEY (consumer_group, message_key)
) WITHOUT ROWID;
CREATE INDEX devour_inbox_processed_at ON devour_inbox (processed_at);
INSERT OR IGNORE INTO devour_inbox (consumer_group, message_key, topic, kafka_partition, kafka_offset, processed_at)
SELECT b.consumer_group, k.value, b.topic, b.kafka_partition, b.last_offset, b.processed_at
FROM devour_inbox_batches b, json_each(b.keys) k;
DROP TABLE devour_inbox_batches;
DROP TABLE devour_inbox_offsets;
