DROP TABLE devour_outbox;
DROP FUNCTION devour_fill_shard();
DROP FUNCTION devour_shard(text, bigint);
DROP FUNCTION devour_murmur2(bytea);
