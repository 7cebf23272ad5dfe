ALTER TABLE devour_outbox ALTER COLUMN message_id SET DEFAULT gen_random_uuid()::text;
DROP FUNCTION devour_uuid_v7();
ALTER TABLE devour_relay_leases DROP COLUMN sent_through;
ALTER TABLE devour_relays DROP COLUMN sent_through;
CREATE TABLE devour_inbox (
    consumer_group  text NOT NULL,
    message_key     text NOT NULL,
    topic           text NOT NULL,
    kafka_partition integer NOT NULL,
    kafka_offset    bigint NOT NULL,
    processed_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, message_key)
);
CREATE INDEX devour_inbox_processed_at ON devour_inbox (processed_at);
-- The exact offset of each key is not kept: the row's last one stands for it.
INSERT INTO devour_inbox (consumer_group, message_key, topic, kafka_partition, kafka_offset, processed_at)
SELECT consumer_group, k, topic, kafka_partition, last_offset, processed_at
FROM devour_inbox_batches, unnest(keys) AS k
ON CONFLICT DO NOTHING;
DROP TABLE devour_inbox_batches;
DROP TABLE devour_inbox_offsets;
