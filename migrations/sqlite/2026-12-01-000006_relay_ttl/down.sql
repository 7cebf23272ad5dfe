ALTER TABLE devour_relays DROP COLUMN lease_ttl_ms;
