"""`read_log` / `aread_log`: the durable log in order, from a position, through a real server."""

from __future__ import annotations

import json
from typing import Any

import anyio
import psycopg
import pytest

import pgherald
from pgherald import sql
from pgherald._protocol import logread
from tests.fix_durable import wait_until


def ids(events: list[pgherald.Event]) -> list[int]:
    return [e.id for e in events]


def readable(conn: psycopg.Connection[Any]) -> None:
    """
    Wait until every event stored so far can be read. The horizon (the oldest running
    transaction) is server-wide: other sessions' transactions, other tests', may hold it back
    for a moment, and then nothing newer is returned (as documented).
    """
    query = (
        "SELECT coalesce(max(tx), '0') < pg_snapshot_xmin(pg_current_snapshot()) "
        "FROM pgherald.events_v1"
    )
    wait_until(lambda: conn.execute(query).fetchone() == (True,), 30.0, "the log's horizon")


def test_events_in_log_order_with_channels_and_paging(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    pgherald.install(conn)
    published = [
        pgherald.publish(conn, "a" if n % 3 else "b", {"n": n}, key=f"k{n % 5}") for n in range(12)
    ]
    with conn.transaction():  # one transaction: its events stay together, in id order
        published += [pgherald.publish(conn, "a", {"n": n}, headers={"h": n}) for n in (12, 13)]
    readable(conn)

    events = pgherald.read_log(dsn)
    assert ids(events) == published
    first = events[0]
    assert (first.channel, first.payload, first.key, first.headers) == ("b", {"n": 0}, "k0", None)
    assert events[-1].headers == {"h": 13}
    assert len({e.partition for e in events}) > 1  # spread over partitions, merged in order
    assert events[0].created_at.tzinfo is not None
    assert int(events[-1].tx) > int(events[0].tx)

    only_b = pgherald.read_log(dsn, channels=["b"])
    assert ids(only_b) == [i for i, e in zip(published, events, strict=True) if e.channel == "b"]
    assert pgherald.read_log(dsn, channels=[]) == []

    pages: list[pgherald.Event] = []
    after = 0
    while batch := pgherald.read_log(dsn, after=after, limit=5):
        assert len(batch) <= 5
        pages += batch
        after = batch[-1].id
    assert pages == events
    assert pgherald.read_log(dsn, after=published[5], limit=2) == events[6:8]


def test_the_order_is_the_transactions_not_the_ids(dsn: str, conn: psycopg.Connection[Any]) -> None:
    pgherald.install(conn)
    with psycopg.connect(dsn) as early:
        early.execute("SELECT pg_current_xact_id()")  # takes its transaction id first
        later = pgherald.publish(conn, "c", "later tx, smaller id")
        earlier = pgherald.publish(early, "c", "earlier tx, larger id")
        assert pgherald.read_log(dsn) == []  # `early` still runs: `later` must wait for it
        early.commit()
    readable(conn)
    assert ids(pgherald.read_log(dsn)) == [earlier, later]
    assert ids(pgherald.read_log(dsn, after=earlier)) == [later]
    assert pgherald.read_log(dsn, after=later) == []


def test_an_open_transaction_holds_back_its_event_and_everything_after(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    pgherald.install(conn)
    before = pgherald.publish(conn, "c", 0)
    readable(conn)
    with psycopg.connect(dsn) as open_tx:
        held = pgherald.publish(open_tx, "c", 1)  # not committed yet
        behind = pgherald.publish(conn, "c", 2)  # committed, but sorts after `held`
        seen = pgherald.read_log(dsn)
        assert ids(seen) == [before]
        assert pgherald.read_log(dsn, after=before) == []
        open_tx.commit()
    readable(conn)
    assert ids(pgherald.read_log(dsn, after=seen[-1].id)) == [held, behind]

    with psycopg.connect(dsn) as rolled_back:
        pgherald.publish(rolled_back, "c", "never")
        after = pgherald.publish(conn, "c", 3)
        assert pgherald.read_log(dsn, after=behind) == []
        rolled_back.rollback()
    readable(conn)
    assert ids(pgherald.read_log(dsn, after=behind)) == [after]


def test_paging_matches_the_log_order_whatever_the_limit_and_the_partitions(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    """Partitions give a share of the limit each: a hot key (one partition) must not break
    the order, nor lose or repeat anything, at any page size."""
    pgherald.install(conn)
    insert = (
        "INSERT INTO pgherald.events_v1 (channel, key, payload) "
        "SELECT 'c' || (g %% 3), CASE WHEN g %% %s = 0 THEN NULL ELSE 'hot' END, "
        "jsonb_build_object('n', g) FROM generate_series(1, %s) AS g"
    )
    with psycopg.connect(dsn) as early:
        early.execute("SELECT pg_current_xact_id()")  # a transaction that sorts first
        conn.execute(insert, (4, 700))  # mostly the hot key
        conn.execute(insert, (1, 300))  # spread over every partition
        early.execute(insert, (2, 200))
        early.commit()
    readable(conn)
    order = "SELECT id FROM pgherald.events_v1 {} ORDER BY tx, id"
    expected = [r[0] for r in conn.execute(order.format(""))]
    in_c1 = [r[0] for r in conn.execute(order.format("WHERE channel = 'c1'"))]
    for limit in (1, 7, 64, 333, 1000, 5000):
        for channels, want in ((None, expected), (["c1"], in_c1)):
            got: list[int] = []
            after = 0
            while batch := pgherald.read_log(conn, after=after, limit=limit, channels=channels):
                assert len(batch) <= limit
                got += ids(batch)
                after = batch[-1].id
                if len(batch) < limit:  # fewer: everything readable was read
                    assert pgherald.read_log(conn, after=after, channels=channels) == []
                    break
            assert got == want, (limit, channels)


@pytest.mark.anyio
async def test_aread_log_on_asyncio_and_trio(dsn: str, conn: psycopg.Connection[Any]) -> None:
    pgherald.install(conn)
    published = [pgherald.publish(conn, f"ch{n % 2}", {"n": n}) for n in range(7)]
    readable(conn)
    assert ids(await pgherald.aread_log(dsn)) == published
    assert ids(await pgherald.aread_log(dsn, after=published[2], limit=2)) == published[3:5]
    assert ids(await pgherald.aread_log(conn, channels=["ch1"])) == published[1::2]
    assert await pgherald.aread_log(dsn) == pgherald.read_log(dsn)
    with pytest.raises(pgherald.UsageError, match="not in the log"):
        await pgherald.aread_log(dsn, after=10**9)


def test_a_lent_connection_is_used_as_it_is_and_left_usable(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    pgherald.install(conn)
    event = pgherald.publish(conn, "c", "x")
    readable(conn)
    with psycopg.connect(dsn) as tx_conn:  # not autocommit: inside the caller's transaction
        tx_conn.execute("SELECT 1")
        assert ids(pgherald.read_log(tx_conn)) == [event]
        assert tx_conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        assert tx_conn.execute("SELECT 2").fetchone() == (2,)
    assert ids(pgherald.read_log(conn)) == [event]
    assert conn.execute("SELECT 3").fetchone() == (3,)

    conn.pgconn.send_query(b"SELECT pg_sleep(0.2), 'theirs'")  # someone else's, in flight
    with pytest.raises(pgherald.UsageError, match="busy"):
        pgherald.read_log(conn)
    results = []
    while (res := conn.pgconn.get_result()) is not None:
        results.append(res)
    assert [r.get_value(0, 1) for r in results] == [b"theirs"]  # not cancelled by us


@pytest.mark.anyio
async def test_a_read_that_overruns_its_timeout_or_is_cancelled_hands_the_connection_back(
    dsn: str,
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn, psycopg.connect(dsn) as locker:
        pgherald.install(conn)
        event = pgherald.publish(conn, "c", "x")
        locker.execute("LOCK TABLE pgherald.events_v1")  # every read waits for this lock
        with pytest.raises(pgherald.ConnectionLost, match="no answer in time"):
            pgherald.read_log(conn, timeout=0.3)
        assert conn.execute("SELECT 1").fetchone() == (1,)  # cancelled, idle again
        with pytest.raises(pgherald.ConnectionLost):
            pgherald.read_log(dsn, timeout=0.3)
        with anyio.move_on_after(0.3) as scope:
            await pgherald.aread_log(conn, timeout=30)
        assert scope.cancelled_caught
        assert conn.execute("SELECT 1").fetchone() == (1,)
        locker.rollback()
        readable(conn)
        assert ids(await pgherald.aread_log(conn)) == [event]


@pytest.mark.anyio
async def test_missing_schema_and_bad_arguments(dsn: str) -> None:
    with pytest.raises(pgherald.SchemaMissing, match="pgherald install"):
        pgherald.read_log(dsn)
    with pytest.raises(pgherald.SchemaMissing, match="pgherald install"):
        await pgherald.aread_log(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        with pytest.raises(pgherald.SchemaMissing):
            pgherald.read_log(conn)
        assert conn.execute("SELECT 1").fetchone() == (1,)
    for bad in ({"after": -1}, {"after": "3"}, {"limit": 0}, {"timeout": 0}, {"channels": "a"}):
        with pytest.raises(pgherald.UsageError):
            pgherald.read_log(dsn, **bad)
    with pytest.raises(pgherald.InvalidChannel):
        pgherald.read_log(dsn, channels=[""])
    with pytest.raises(pgherald.UsageError, match="DSN"):
        pgherald.read_log(object())  # type: ignore[arg-type]
    with pytest.raises(pgherald.ConnectError, match="cannot connect"):
        await pgherald.aread_log("host=127.0.0.1 port=1 user=postgres", timeout=2)


def test_a_read_that_finds_nothing_probes_each_partition_once(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    """The idle poll: 16 short index probes, not a scan of the log (here 60,000 events)."""
    pgherald.install(conn)
    conn.execute(
        "INSERT INTO pgherald.events_v1 (channel, payload) "
        "SELECT 'c' || (g % 4), jsonb_build_object('n', g) FROM generate_series(1, 60000) AS g"
    )
    conn.execute("VACUUM ANALYZE pgherald.events_v1")
    readable(conn)
    last = pgherald.read_log(conn, after=59990, channels=["c1"])[-1]
    query, names = sql.numbered("read_log")
    values = {
        "after_tx": last.tx,
        "after_id": str(last.id),
        "limit": "500",
        "per_partition": "63",
        "channels": "{c1}",
    }
    params = [None if values.get(n) is None else values[n].encode() for n in names]
    res = conn.pgconn.exec_params(b"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + query, params)
    value = res.get_value(0, 0)
    assert value is not None, res.error_message
    plan = json.loads(value)[0]["Plan"]
    buffers = plan["Shared Hit Blocks"] + plan["Shared Read Blocks"]
    # A scan of the (partition, tx, id) index alone would touch over 200 pages here.
    assert buffers <= 100, plan
    assert logread.START == (0, 0)
