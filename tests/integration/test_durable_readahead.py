"""The consumer's read-ahead over a backlog: while a batch is handled, the next read runs on the
server. None of this may skip, reorder or (beyond at-least-once) repeat an event."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import anyio
import psycopg
import pytest

import pgherald
from tests.fix_durable import FAST, Running, uncovered, wait_until

KEYS = 7


def backlog(conn: psycopg.Connection, n: int, channel: str = "ch") -> list[int]:
    """*n* keyed events in one transaction (through publish_v1); their ids in log order."""
    conn.execute(
        "SELECT pgherald.publish_v1(%s, jsonb_build_object('k', g %% %s, 's', g), "
        "'k' || (g %% %s), NULL) FROM generate_series(1, %s) AS g",
        (channel, KEYS, KEYS, n),
    )
    rows = conn.execute("SELECT id FROM pgherald.events_v1 ORDER BY tx, id").fetchall()
    return [r[0] for r in rows]


def reading_ahead(consumer: pgherald.Consumer | pgherald.AsyncConsumer) -> bool:
    core = consumer._core
    return core._in_flight is not None or core._ready is not None


def assert_key_order(events: list[pgherald.Event]) -> None:
    for k in range(KEYS):
        seqs = [e.payload["s"] for e in events if e.payload["k"] == k]
        assert seqs == sorted(seqs), f"key k{k} out of order"


def test_backlog_is_read_ahead_exactly_once_in_log_order(
    installed: str, conn: psycopg.Connection
) -> None:
    ids = backlog(conn, 1500)
    got: list[pgherald.Event] = []
    ahead = False
    with pgherald.Consumer(installed, group="g", channels=["ch"], batch_size=100, **FAST) as c:
        for e in c:
            got.append(e)
            ahead = ahead or reading_ahead(c)
            if len(got) == len(ids):
                c.stop()
    assert ahead, "a backlog should be read ahead"
    assert [e.id for e in got] == ids
    assert uncovered(conn, "g") == 0


def test_break_mid_batch_discards_the_read_ahead(installed: str, conn: psycopg.Connection) -> None:
    ids = backlog(conn, 600)
    got: list[int] = []
    with pgherald.Consumer(installed, group="g", channels=["ch"], batch_size=100, **FAST) as c:
        for e in c:
            got.append(e.id)
            if len(got) == 150:
                assert reading_ahead(c)
                break  # the event in hand is not acknowledged: it comes again
        for e in c:  # same connection, the read ahead is still there
            got.append(e.id)
            if len(got) == len(ids) + 1:
                c.stop()
    assert got == ids[:150] + ids[149:]
    assert uncovered(conn, "g") == 0


def test_stop_mid_batch_then_run_again_with_handlers(
    installed: str, conn: psycopg.Connection
) -> None:
    ids = backlog(conn, 600)
    got: list[int] = []
    c = pgherald.Consumer(installed, group="g", channels=["ch"], batch_size=100, **FAST)

    @c.on("ch")
    def handle(e: pgherald.Event) -> None:
        got.append(e.id)
        if len(got) in (250, len(ids)):
            c.stop()  # after this event: the rest of the batch and the read ahead wait

    with c:
        c.run()
        assert got == ids[:250]
        c.run()
    assert got == ids
    assert uncovered(conn, "g") == 0


def test_terminated_backend_with_a_read_ahead_in_flight(
    installed: str, conn: psycopg.Connection
) -> None:
    ids = backlog(conn, 1000)
    got: list[int] = []
    with pgherald.Consumer(installed, group="g", channels=["ch"], batch_size=50, **FAST) as c:
        for e in c:
            got.append(e.id)
            if len(got) == 75:
                assert reading_ahead(c)
                pid = c.backend_pid
                assert conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()
            if set(ids) <= set(got):
                c.stop()
    assert c.stats["reconnects"] >= 1
    assert set(got) == set(ids)
    assert len(got) - len(ids) <= 50  # at most the unacknowledged batch again
    assert list(dict.fromkeys(got)) == ids  # first deliveries in log order
    assert uncovered(conn, "g") == 0


def test_partition_handover_during_a_backlog(
    installed: str, conn: psycopg.Connection, running: Callable[..., Running]
) -> None:
    ids = backlog(conn, 2000)

    def slow(_: pgherald.Event) -> None:
        sum(
            range(50_000)
        )  # ~1 ms of work: keep the backlog long enough for the second member to join

    r1 = running(handler=slow, batch_size=50)
    r1.wait_count(200)
    r2 = running(handler=slow, batch_size=50)
    wait_until(lambda: len(r1.seen) + len(r2.seen) >= len(ids), 30, "the whole backlog")
    assert r1.error is None
    assert r2.error is None
    assert r2.seen, "the second member should have taken partitions mid-backlog"
    assert Counter(r1.ids + r2.ids) == Counter(ids)  # each event once, by one member
    assert_key_order(r1.seen)
    assert_key_order(r2.seen)
    wait_until(lambda: uncovered(conn, "g") == 0, what="the group position to cover all")


def test_transactional_handler_over_a_read_ahead(installed: str, conn: psycopg.Connection) -> None:
    conn.execute("CREATE TABLE effects (event_id bigint PRIMARY KEY)")
    ids = backlog(conn, 400)
    c = pgherald.Consumer(installed, group="g", channels=["ch"], batch_size=50, **FAST)

    @c.on("ch", transactional=True)
    def handle(e: pgherald.Event, tx: psycopg.Connection[Any]) -> None:
        tx.execute("INSERT INTO effects VALUES (%s)", (e.id,))
        if e.id == ids[-1]:
            c.stop()

    with c:
        c.run()
    rows = conn.execute("SELECT event_id FROM effects ORDER BY event_id").fetchall()
    assert [r[0] for r in rows] == sorted(ids)
    assert uncovered(conn, "g") == 0


@pytest.mark.anyio
async def test_async_consumer_reads_a_backlog_ahead(installed: str) -> None:
    def load() -> list[int]:
        with psycopg.connect(installed, autocommit=True) as c:
            return backlog(c, 800)

    ids = await anyio.to_thread.run_sync(load)
    got: list[int] = []
    async with pgherald.AsyncConsumer(
        installed, group="g", channels=["ch"], batch_size=100, **FAST
    ) as c:
        with anyio.fail_after(20):
            async for e in c:
                got.append(e.id)
                if len(got) == 350:
                    assert reading_ahead(c)
                    c.stop()  # mid-batch: the rest of it and the read ahead wait
            async for e in c:
                got.append(e.id)
                if len(got) == len(ids):
                    c.stop()
    assert got == ids
