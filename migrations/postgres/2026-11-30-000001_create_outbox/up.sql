-- devour's outbox: the public contract between writers (devour's write path, or any
-- application inserting rows with plain SQL in its own transaction) and devour-relay.
-- Every column is documented in docs/outbox-table.md.

-- Kafka's murmur2 (org.apache.kafka.common.utils.Utils.murmur2), the hash of the Java client's
-- default partitioner, over the bytes of `data`. Returns the signed 32-bit result as Java does.
CREATE FUNCTION devour_murmur2(data bytea) RETURNS integer
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    m CONSTANT bigint := 1540483477;           -- 0x5bd1e995
    mask CONSTANT bigint := 4294967295;        -- 0xffffffff
    len CONSTANT integer := length(data);
    body CONSTANT integer := len - len % 4;
    h bigint := 2538058380 # len;              -- seed 0x9747b28c ^ length
    k bigint;
    i integer := 0;
BEGIN
    WHILE i < body LOOP
        k := get_byte(data, i)::bigint
             | (get_byte(data, i + 1)::bigint << 8)
             | (get_byte(data, i + 2)::bigint << 16)
             | (get_byte(data, i + 3)::bigint << 24);
        k := (k * m) & mask;
        k := k # (k >> 24);
        k := (k * m) & mask;
        h := ((h * m) & mask) # k;
        i := i + 4;
    END LOOP;
    IF len % 4 = 3 THEN h := h # (get_byte(data, body + 2)::bigint << 16); END IF;
    IF len % 4 >= 2 THEN h := h # (get_byte(data, body + 1)::bigint << 8); END IF;
    IF len % 4 >= 1 THEN
        h := h # get_byte(data, body)::bigint;
        h := (h * m) & mask;
    END IF;
    h := h # (h >> 13);
    h := (h * m) & mask;
    h := h # (h >> 15);
    IF h >= 2147483648 THEN
        RETURN (h - 4294967296)::integer;
    END IF;
    RETURN h::integer;
END
$$;

-- The shard of a row: (murmur2(UTF-8 bytes of the key) & 0x7fffffff) % 256 for a keyed row,
-- id % 256 for a row without a key. Relays own shards, so one key is drained by one relay.
CREATE FUNCTION devour_shard(partition_key text, id bigint) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN partition_key IS NULL THEN (id % 256)::integer
        ELSE (devour_murmur2(convert_to(partition_key, 'UTF8')) & 2147483647) % 256
    END
$$;

-- Fills in `shard` for writers that leave it out (plain SQL). devour's own write path computes
-- it in Rust, so the trigger's WHEN clause skips the function call for it.
CREATE FUNCTION devour_fill_shard() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.shard := devour_shard(NEW.partition_key, NEW.id);
    RETURN NEW;
END
$$;

CREATE TABLE devour_outbox (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic           text NOT NULL
                    CHECK (topic ~ '^[a-zA-Z0-9._-]+$' AND length(topic) <= 249
                           AND topic NOT IN ('.', '..')),
    partition_key   text,
    kafka_partition integer CHECK (kafka_partition >= 0),
    payload         bytea,
    headers         text NOT NULL DEFAULT '{}',
    event           text,
    message_id      text NOT NULL DEFAULT gen_random_uuid()::text,
    content_type    text NOT NULL DEFAULT 'application/json',
    shard           integer NOT NULL,  -- filled by devour_outbox_shard when left out
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    attempts        integer NOT NULL DEFAULT 0
);

CREATE TRIGGER devour_outbox_shard BEFORE INSERT ON devour_outbox
    FOR EACH ROW WHEN (NEW.shard IS NULL) EXECUTE FUNCTION devour_fill_shard();

