-- `devour consume` with `inbox = true`, recorded per transaction instead of per message (one row
-- per message cost the database more than the rest of the consumer together). Each inbox
-- transaction moves its partitions' marks in `devour_inbox_offsets` and writes, per partition,
-- one `devour_inbox_batches` row with the keys of the messages it handled. A message is
-- known to be new, with no lookup, when its offset is above its partition's mark and the relay
-- did not mark it `possible-duplicate`; any other message is looked up by its key, and skipped
-- if found. The key is the `message-id` header (the outbox's id for the message, the same on
-- every redelivery, even when the relay sent it twice), else `TOPIC/PARTITION/OFFSET`.

-- One row per consumer group and partition: the highest offset an inbox transaction committed
-- (`through_offset`), and the mark the last transaction was judged against
-- (`previous_offset`), which lets one statement both move the mark and read it.
CREATE TABLE devour_inbox_offsets (
    consumer_group  text NOT NULL,
    topic           text NOT NULL,
    kafka_partition integer NOT NULL,
    through_offset  bigint NOT NULL,
    previous_offset bigint NOT NULL,
    processed_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, kafka_partition)
);

-- The keys an inbox transaction handled, per partition. `replay` rows hold messages handled
-- again below the mark (a dead letter replayed, a topic made anew); the others cover ranges
-- of offsets that never overlap, so the row holding an offset is the first one ending at or
-- after it. `min_key`/`max_key` (byte order) narrow the lookup of a message the relay marked.
CREATE TABLE devour_inbox_batches (
    consumer_group  text NOT NULL,
    topic           text NOT NULL,
    kafka_partition integer NOT NULL,
    first_offset    bigint NOT NULL,
    last_offset     bigint NOT NULL,
    replay          boolean NOT NULL,
    min_key         text COLLATE "C" NOT NULL,
    max_key         text COLLATE "C" NOT NULL,
    keys            text[] NOT NULL,
    processed_at    timestamptz NOT NULL DEFAULT now()
);
-- Ids do not compress: do not try.
ALTER TABLE devour_inbox_batches ALTER COLUMN keys SET STORAGE EXTERNAL;
-- Rows up to a page stay in it (a transaction's keys of one partition, usually).
ALTER TABLE devour_inbox_batches SET (toast_tuple_target = 8160);
CREATE INDEX devour_inbox_batches_offsets ON devour_inbox_batches
    (consumer_group, topic, kafka_partition, last_offset) WHERE NOT replay;
CREATE INDEX devour_inbox_batches_replays ON devour_inbox_batches
    (consumer_group, topic, kafka_partition, last_offset) WHERE replay;
CREATE INDEX devour_inbox_batches_keys ON devour_inbox_batches (consumer_group, topic, max_key);
-- Cleanup of rows older than `inbox_retention_hours`.
CREATE INDEX devour_inbox_batches_processed_at ON devour_inbox_batches (processed_at);

-- What the per-message table held, carried over: its marks, and its keys in rows of at most
-- 10,000 offsets. Kept as replay rows, each spanning its partition's whole range of offsets: the
-- old table kept a key once, at its first offset, and a copy at another offset read again must
-- still find it.
INSERT INTO devour_inbox_offsets
    (consumer_group, topic, kafka_partition, through_offset, previous_offset, processed_at)
SELECT consumer_group, topic, kafka_partition, max(kafka_offset), max(kafka_offset), max(processed_at)
FROM devour_inbox GROUP BY consumer_group, topic, kafka_partition;
INSERT INTO devour_inbox_batches
    (consumer_group, topic, kafka_partition, first_offset, last_offset, replay, min_key, max_key,
     keys, processed_at)
SELECT i.consumer_group, i.topic, i.kafka_partition, p.lo, p.hi, true,
       min(i.message_key COLLATE "C"), max(i.message_key COLLATE "C"), array_agg(i.message_key),
       max(i.processed_at)
FROM devour_inbox i
JOIN (SELECT consumer_group, topic, kafka_partition, min(kafka_offset) AS lo, max(kafka_offset) AS hi
      FROM devour_inbox GROUP BY consumer_group, topic, kafka_partition) p
  USING (consumer_group, topic, kafka_partition)
GROUP BY i.consumer_group, i.topic, i.kafka_partition, p.lo, p.hi, i.kafka_offset / 10000;
DROP TABLE devour_inbox;

-- The relay's side. Each relay records the largest outbox id it may hand to a producer
-- (`devour_relays.sent_through`, written before it sends anything above it); a lease takes its
-- holder's when the holder lets it go or another relay takes it over. A relay that takes a
-- shard marks the shard's rows at or below the lease's `sent_through` `possible-duplicate` (a
-- holder before may have sent them without removing them): the inbox looks those up by key.
ALTER TABLE devour_relays ADD COLUMN sent_through bigint NOT NULL DEFAULT 0;
ALTER TABLE devour_relay_leases ADD COLUMN sent_through bigint NOT NULL DEFAULT 0;

-- Time-ordered message ids for writers that leave `message_id` out (plain SQL): a UUIDv7 (its
-- first 48 bits the time in ms), as devour's write path makes. The inbox narrows its lookup of
-- a marked message by the ids' order; with random ids it would search all of a topic's rows.
CREATE FUNCTION devour_uuid_v7() RETURNS uuid
LANGUAGE sql VOLATILE PARALLEL SAFE AS $$
    SELECT encode(
        set_bit(set_bit(
            overlay(uuid_send(gen_random_uuid())
                placing substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                FROM 1 FOR 6),
            52, 1), 53, 1),
        'hex')::uuid
$$;
ALTER TABLE devour_outbox ALTER COLUMN message_id SET DEFAULT devour_uuid_v7()::text;
