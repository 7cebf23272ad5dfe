-- Each relay's own lease TTL, written with its heartbeat: whether a relay is alive (for the
-- share of shards each claims), when its row is forgotten, and whether `devour status` calls it
-- silent are judged by its own TTL, not by the reader's (relays may run with different ones).
-- NULL for rows written before this migration: readers use their own TTL for those.
ALTER TABLE devour_relays ADD COLUMN lease_ttl_ms INTEGER;
