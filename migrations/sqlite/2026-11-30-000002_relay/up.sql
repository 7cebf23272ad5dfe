-- devour-relay's state (see the PostgreSQL migration). On SQLite one relay at a time drains the
-- outbox: it holds every shard's lease; a second relay stands by. Times are Unix milliseconds.

CREATE TABLE devour_relays (
    relay_id     TEXT PRIMARY KEY,
    started_at   INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL
);

CREATE TABLE devour_relay_leases (
    shard      INTEGER PRIMARY KEY CHECK (shard >= 0 AND shard < 256),
    owner      TEXT,
    epoch      INTEGER NOT NULL DEFAULT 0,
    expires_at INTEGER
);
WITH RECURSIVE s(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM s WHERE n < 255)
INSERT INTO devour_relay_leases (shard) SELECT n FROM s;

CREATE TABLE devour_dead_letters (
    id              INTEGER PRIMARY KEY,
    topic           TEXT NOT NULL,
    partition_key   TEXT,
    kafka_partition INTEGER,
    payload         BLOB,
    headers         TEXT NOT NULL,
    event           TEXT,
    message_id      TEXT NOT NULL,
    content_type    TEXT NOT NULL,
    shard           INTEGER NOT NULL,
    created_at      TEXT NOT NULL,
    attempts        INTEGER NOT NULL,
    error           TEXT NOT NULL,
    failed_at       TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now'))
);
CREATE INDEX devour_dead_letters_key ON devour_dead_letters (partition_key);

CREATE TABLE devour_outbox_delivered (
    id              INTEGER PRIMARY KEY,
    topic           TEXT NOT NULL,
    partition_key   TEXT,
    kafka_partition INTEGER,
    payload         BLOB,
    headers         TEXT NOT NULL,
    event           TEXT,
    message_id      TEXT NOT NULL,
    content_type    TEXT NOT NULL,
    shard           INTEGER NOT NULL,
    created_at      TEXT NOT NULL,
    attempts        INTEGER NOT NULL,
    delivered_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now'))
);
CREATE INDEX devour_outbox_delivered_at ON devour_outbox_delivered (delivered_at);
