-- A shard outside 0–255 has no lease: no relay would ever deliver the row (and `--drain`
-- would never end). Rows already written so get the shard the contract gives them; new ones
-- are refused. NOT VALID: the constraint holds for every new or changed row without a scan of
-- the table under its exclusive lock (the UPDATE above already fixed the old rows).
UPDATE devour_outbox SET shard = devour_shard(partition_key, id) WHERE shard < 0 OR shard >= 256;
ALTER TABLE devour_outbox
    ADD CONSTRAINT devour_outbox_shard_range CHECK (shard >= 0 AND shard < 256) NOT VALID;
