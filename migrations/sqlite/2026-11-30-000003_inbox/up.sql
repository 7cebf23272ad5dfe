-- `devour consume` with `inbox = true`: one row per message a consumer group has processed,
-- written in the same transaction as the handler's effects. A redelivered message whose row is
-- here is skipped, so its effects happen once.
--
-- `message_key` is the message's `message-id` header (the outbox's id for the message, the same
-- on every redelivery, even when the relay sent it twice), else `TOPIC/PARTITION/OFFSET`.
CREATE TABLE devour_inbox (
    consumer_group  TEXT NOT NULL,
    message_key     TEXT NOT NULL,
    topic           TEXT NOT NULL,
    kafka_partition INTEGER NOT NULL,
    kafka_offset    BIGINT NOT NULL,
    processed_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    PRIMARY KEY (consumer_group, message_key)
) WITHOUT ROWID;
-- Cleanup of rows older than `inbox_retention_hours`.
CREATE INDEX devour_inbox_processed_at ON devour_inbox (processed_at);
