"""Positions per (group, channel, partition): channels added later, reads filtered in SQL."""

from __future__ import annotations

import psycopg
import pytest

import pgherald
from pgherald import sql
from pgherald._protocol import consumer as consumer_engine
from tests.fix_durable import FAST, drain, uncovered, wait_readable


def test_a_channel_added_to_a_group_gets_its_whole_backlog(
    installed: str, conn: psycopg.Connection
) -> None:
    pgherald.publish_many(conn, "b", list(range(1000)))  # b's backlog, before the group reads it
    pgherald.publish_many(conn, "a", list(range(10)))
    with pgherald.Consumer(installed, group="g", channels=["a"], **FAST) as c:
        assert sorted(e.payload for e in drain(c, 10)) == list(range(10))
    for i in range(10, 20):  # the group moves on along "a", well past b's backlog
        pgherald.publish(conn, "a", i)
    with pgherald.Consumer(installed, group="g", channels=["a"], **FAST) as c:
        assert sorted(e.payload for e in drain(c, 10)) == list(range(10, 20))
    assert uncovered(conn, "g", "b") == 1000
    # Now the group reads "b" too: it starts at the group's start, so the whole backlog comes.
    with pgherald.Consumer(installed, group="g", channels=["a", "b"], **FAST) as c:
        events = drain(c, 1000)
    assert [e.channel for e in events] == ["b"] * 1000
    assert sorted(e.payload for e in events) == list(range(1000))
    assert uncovered(conn, "g") == 0


def test_a_channel_added_to_a_group_started_now_begins_at_the_groups_start(
    installed: str, conn: psycopg.Connection
) -> None:
    pgherald.publish(conn, "b", "before the group")
    with pgherald.Consumer(installed, group="g", channels=["a"], start="now", **FAST):
        pass
    pgherald.publish(conn, "b", "after the group began")
    with pgherald.Consumer(installed, group="g", channels=["a", "b"], **FAST) as c:
        assert [e.payload for e in drain(c, 1)] == ["after the group began"]


@pytest.mark.anyio
async def test_an_async_consumer_of_every_channel_learns_new_channels(
    installed: str, conn: psycopg.Connection
) -> None:
    pgherald.publish(conn, "first", 1)
    seen: list[tuple[str, object]] = []
    async with pgherald.AsyncConsumer(installed, group="all", **FAST) as c:
        async for event in c:
            seen.append((event.channel, event.payload))
            if event.channel == "first":
                # A channel the log did not hold when the consumer started.
                pgherald.publish(conn, "second", 2)
            else:
                c.stop()  # a clean end (the iteration finishes and acknowledges)
    assert seen == [("first", 1), ("second", 2)]


def test_a_quiet_channel_among_many_others_is_read_and_counted_alone(
    installed: str, conn: psycopg.Connection
) -> None:
    """The read and the lag of a group cost its own channels' events only (timed: bench)."""
    for lo in range(1, 200_001, 20_000):  # short transactions (other tests' readers wait for xmin)
        conn.execute(
            "INSERT INTO pgherald.events_v1 (channel, payload)"
            " SELECT 'busy' || (i %% 100), '{}' FROM generate_series(%s::int, %s::int) AS i",
            (lo, lo + 19_999),
        )
    quiet = [pgherald.publish(conn, "quiet", i) for i in range(3)]
    conn.execute("ANALYZE pgherald.events_v1")
    with pgherald.Consumer(installed, group="q", channels=["quiet"], **FAST) as c:
        (status,) = pgherald.list_groups(conn, groups=["q"])
        assert (status.lag_events, status.lag_estimated) == (3, False)
        assert status.lag_by_channel == {"quiet": 3}
        # The consumer's read, as it runs it: a few pages, not the 200,000 others' events.
        params = {
            "group": "q",
            "channels": ["quiet"] * 16,
            "partitions": list(range(16)),
            "txs": [None] * 16,
            "ids": [None] * 16,
            "limit": 1000,
            "shares": [1000] * 16,
        }
        wait_readable(conn)
        with conn.cursor() as cur:
            cur.execute(consumer_engine._SETTINGS)  # the consumer's session (its planner settings)
            cur.execute(
                "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql.query("read_batch"), params
            )
            (plan,) = cur.fetchone()[0]  # type: ignore[index]
        top = plan["Plan"]
        assert top["Actual Rows"] == 3
        pages = top["Shared Hit Blocks"] + top["Shared Read Blocks"]
        assert pages < 300, f"the read touched {pages} pages"
        assert [e.id for e in drain(c, 3)] == quiet
    (status,) = pgherald.list_groups(conn, groups=["q"])
    assert status.lag_events == 0
    assert uncovered(conn, "q", "quiet") == 0


def test_a_busy_channel_beside_quiet_ones_does_not_shrink_the_reads(
    installed: str, conn: psycopg.Connection
) -> None:
    """
    A group of every channel over a backlog where one channel has most events: each range's
    share follows its rate, so a read delivers about what it asks for. (With even shares, the
    busy channel's ranges fill theirs first and each read delivers only up to the earliest of
    them: here about 190 events of 2,000, some 50 reads.)
    """
    conn.execute(
        "INSERT INTO pgherald.events_v1 (channel, payload)"
        " SELECT CASE WHEN i % 2 = 0 THEN 'hot' ELSE 'c' || (i % 20) END, to_jsonb(i)"
        " FROM generate_series(1, 10000) AS i"
    )
    conn.execute("ANALYZE pgherald.events_v1")
    with pgherald.Consumer(
        installed, group="every", batch_size=1000, max_batch_size=2000, **FAST
    ) as c:
        got = drain(c, 10000)
        assert sorted(e.payload for e in got) == list(range(1, 10001))
        per_range: dict[tuple[str, int], list[int]] = {}
        for e in got:
            per_range.setdefault((e.channel, e.partition), []).append(e.id)
        assert all(ids == sorted(ids) for ids in per_range.values())
        assert c.stats.reads <= 20, f"{c.stats.reads} reads for 10,000 events"
    assert uncovered(conn, "every") == 0


def test_positions_survive_the_move_to_per_channel_positions(dsn: str) -> None:
    """A database at 0.1.0_11 (positions per partition) upgraded: nothing lost, none again."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        with conn.transaction():
            for name, text in sql.migrations():
                if name >= "0.1.0_12":
                    break
                conn.execute(text)
                conn.execute(sql.query("record_migration"), {"name": name})
        ids = [
            conn.execute("SELECT pgherald.publish_v1(%s, %s::jsonb)", (ch, str(i))).fetchone()[0]  # type: ignore[index]
            for i in range(40)
            for ch in ("x", "y")
        ]
        # A group of the old schema that had consumed the first 50 events, in every partition.
        conn.execute(
            "INSERT INTO pgherald.positions_v1 (group_name, partition, tx, event_id)"
            " SELECT 'old', p, coalesce(max(e.tx), '0'), coalesce(max(e.id), 0)"
            " FROM generate_series(0, 15) AS p"
            " LEFT JOIN pgherald.events_v1 e ON e.partition = p AND e.id <= %s GROUP BY p",
            (ids[49],),
        )
        assert pgherald.install(conn) == [n for n, _ in sql.migrations() if n >= "0.1.0_12"]
        with pgherald.Consumer(dsn, group="old", channels=["x", "y"], **FAST) as c:
            got = [e.id for e in drain(c, 30)]
    assert sorted(got) == ids[50:]
