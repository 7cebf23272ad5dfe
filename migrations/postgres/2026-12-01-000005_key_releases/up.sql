-- How many times dead letters were retried or discarded. With `on_dead_letter = "block_key"`
-- a relay's reads leave out the rows of a key that has a dead letter, and go on past them;
-- once the key is released, those rows must go before any later row of the key. Each read
-- returns this number (from its own snapshot): a relay that sees it change starts its next
-- pass at the oldest row before sending anything more. `devour outbox retry|discard` adds one
-- in the same transaction; whoever deletes dead letters by hand should too.
CREATE TABLE devour_key_releases (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    n   bigint NOT NULL
);
INSERT INTO devour_key_releases (n) VALUES (0);
