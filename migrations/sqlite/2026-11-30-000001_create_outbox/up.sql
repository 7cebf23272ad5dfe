-- devour's outbox: the public contract between writers (devour's write path, or any
-- application inserting rows with plain SQL in its own transaction) and devour-relay.
-- Every column is documented in docs/outbox-table.md.
-- AUTOINCREMENT: ids are never reused after delivered rows are deleted, so they keep increasing.
CREATE TABLE devour_outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    topic           TEXT NOT NULL
                    CHECK (length(topic) BETWEEN 1 AND 249
                           AND topic NOT GLOB '*[^a-zA-Z0-9._-]*'
                           AND topic NOT IN ('.', '..')),
    partition_key   TEXT,
    kafka_partition INTEGER CHECK (kafka_partition >= 0),
    payload         BLOB,
    headers         TEXT NOT NULL DEFAULT '{}',
    event           TEXT,
    message_id      TEXT NOT NULL DEFAULT (
                        lower(hex(randomblob(4))) || '-' || lower(hex(randomblob(2))) || '-4'
                        || substr(lower(hex(randomblob(2))), 2) || '-'
                        || substr('89ab', 1 + (abs(random()) % 4), 1)
                        || substr(lower(hex(randomblob(2))), 2) || '-' || lower(hex(randomblob(6)))),
    content_type    TEXT NOT NULL DEFAULT 'application/json',
    shard           INTEGER NOT NULL DEFAULT 0,
    created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    attempts        INTEGER NOT NULL DEFAULT 0
);

