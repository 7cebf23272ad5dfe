-- A shard outside 0–255 has no lease: the relay would never deliver the row (and `--drain`
-- would never end). SQLite has one relay at a time, holding every shard, so rows already
-- written so go to shard 0; new ones are refused (SQLite cannot add a CHECK to a table).
UPDATE devour_outbox SET shard = 0 WHERE shard < 0 OR shard >= 256;
CREATE TRIGGER devour_outbox_shard_range BEFORE INSERT ON devour_outbox
    WHEN NEW.shard < 0 OR NEW.shard >= 256
BEGIN
    SELECT RAISE(ABORT, 'devour_outbox.shard must be between 0 and 255');
END;
CREATE TRIGGER devour_outbox_shard_range_update BEFORE UPDATE OF shard ON devour_outbox
    WHEN NEW.shard < 0 OR NEW.shard >= 256
BEGIN
    SELECT RAISE(ABORT, 'devour_outbox.shard must be between 0 and 255');
END;
