-- devour-relay's state: which relays are alive, which relay owns which shard, the rows the
-- broker refused for good, the delivered rows kept in retention mode, and wake-ups.

-- Relays alive: a relay heartbeats here; the live count decides each relay's share of shards.
CREATE TABLE devour_relays (
    relay_id     text PRIMARY KEY,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);

-- One row per shard. A relay drains a shard only while it owns an unexpired lease on it;
-- `epoch` grows on every change of owner and fences a relay that lost its lease.
CREATE TABLE devour_relay_leases (
    shard      integer PRIMARY KEY CHECK (shard >= 0 AND shard < 256),
    owner      text,
    epoch      bigint NOT NULL DEFAULT 0,
    expires_at timestamptz
);
INSERT INTO devour_relay_leases (shard) SELECT s FROM generate_series(0, 255) AS s;

-- Rows the broker refused for good (too large, topic missing, not authorized). `id` is the
-- outbox id, so that `devour outbox retry` puts the row back in its place.
CREATE TABLE devour_dead_letters (
    id              bigint PRIMARY KEY,
    topic           text NOT NULL,
    partition_key   text,
    kafka_partition integer,
    payload         bytea,
    headers         text NOT NULL,
    event           text,
    message_id      text NOT NULL,
    content_type    text NOT NULL,
    shard           integer NOT NULL,
    created_at      timestamptz NOT NULL,
    attempts        integer NOT NULL,
    error           text NOT NULL,
    failed_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX devour_dead_letters_key ON devour_dead_letters (partition_key);

-- Delivered rows, kept in retention mode (`relay.retention = "keep"`) until they are older
-- than `relay.retention_hours`.
CREATE TABLE devour_outbox_delivered (
    id              bigint PRIMARY KEY,
    topic           text NOT NULL,
    partition_key   text,
    kafka_partition integer,
    payload         bytea,
    headers         text NOT NULL,
    event           text,
    message_id      text NOT NULL,
    content_type    text NOT NULL,
    shard           integer NOT NULL,
    created_at      timestamptz NOT NULL,
    attempts        integer NOT NULL,
    delivered_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX devour_outbox_delivered_at ON devour_outbox_delivered (delivered_at);

-- Wakes the relays on every INSERT into the outbox, from devour or from plain SQL. A rule, not a
-- trigger: a NOTIFY folded into the statement costs far less than a PL/pgSQL call per statement,
-- and PostgreSQL folds identical notifications of one transaction into one. (COPY does not fire
-- rules: rows COPYed in are found by the relays' fallback poll. A rule also rules out
-- INSERT ... ON CONFLICT on this table, which its contract never needs.)
CREATE RULE devour_outbox_notify AS ON INSERT TO devour_outbox DO ALSO NOTIFY devour_outbox;
