#!/usr/bin/env python3
"""A Python application writing to devour's outbox with plain SQL (docs/outbox-table.md).

The order update and its message are one transaction: commit delivers the message (devour-relay
picks it up), rollback discards both. Standard library only, on the SQLite file devour uses by
default; on PostgreSQL the same INSERT works through psycopg (see docs/outbox-table.md).

    python3 examples/python_outbox.py devour.db orders 42 paid
    devour-relay --drain

On SQLite one relay drains every shard, so `shard` may stay 0; on PostgreSQL leave it out and a
trigger computes it. `murmur2` below shows the formula for writers that set it themselves.
"""

import json
import sqlite3
import sys


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (org.apache.kafka.common.utils.Utils.murmur2), as a signed 32-bit int."""
    m, r = 0x5BD1E995, 24
    length = len(data)
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = int.from_bytes(data[i:i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = (h * m) & 0xFFFFFFFF
        h ^= k
    rest = length % 4
    tail = data[length - rest:]
    if rest == 3:
        h ^= tail[2] << 16
    if rest >= 2:
        h ^= tail[1] << 8
    if rest >= 1:
        h ^= tail[0]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def shard(key: str) -> int:
    """The relay shard of a keyed row: (murmur2(key) & 0x7fffffff) % 256."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % 256


def main() -> None:
    assert murmur2(b"21") == -973932308 and murmur2(b"foobar") == -790332482  # Java's vectors
    path, topic, order_id, status = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("CREATE TABLE IF NOT EXISTS py_orders (id INTEGER PRIMARY KEY, status TEXT NOT NULL)")
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "INSERT INTO py_orders (id, status) VALUES (?, ?) "
            "ON CONFLICT (id) DO UPDATE SET status = excluded.status",
            (order_id, status),
        )
        payload = json.dumps({"id": order_id, "status": status}).encode()
        conn.execute(
            "INSERT INTO devour_outbox (topic, partition_key, payload, event, headers, shard) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (topic, str(order_id), payload, "update", json.dumps({"source": "python"}), shard(str(order_id))),
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    print(f"order {order_id} is {status}; its message waits in devour_outbox")


if __name__ == "__main__":
    main()
