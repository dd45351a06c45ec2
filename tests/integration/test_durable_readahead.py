"""The consumer's read-ahead over a backlog: while a batch is handled, the next read runs on the
server. None of this may skip, reorder or (beyond at-least-once) repeat an event."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import anyio
import psycopg
import pytest

import pgherald
from tests.fix_durable import FAST, Running, acknowledged, drain, uncovered, wait_until
from tests.fix_faults import await_until

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
    core = consumer._engine
    return core._in_flight is not None or core._ready is not None


def assert_key_order(events: list[pgherald.Event]) -> None:
    for k in range(KEYS):
        seqs = [e.payload["s"] for e in events if e.payload["k"] == k]
        assert seqs == sorted(seqs), f"key k{k} out of order"


def test_backlog_is_read_ahead_exactly_once_in_log_order(
    installed: str, conn: psycopg.Connection
) -> None:
    ids = backlog(conn, 1500)
    ahead: list[bool] = []
    with pgherald.Consumer(installed, group="g", channels=["ch"], batch_size=100, **FAST) as c:
        got = drain(c, len(ids), lambda _: ahead.append(reading_ahead(c)))
    assert any(ahead), "a backlog should be read ahead"
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


@pytest.mark.anyio
async def test_async_break_mid_batch_then_loop_again(
    installed: str, conn: psycopg.Connection, anyio_backend: str
) -> None:
    # `async for` left by break: the async twin of the test above. The second loop on the same
    # consumer starts at the event in hand (what came before it is acknowledged), as does a
    # consumer of the group after this one has gone.
    ids = backlog(conn, 600)
    got: list[int] = []
    async with pgherald.AsyncConsumer(
        installed, group="g", channels=["ch"], batch_size=100, **FAST
    ) as c:
        async for e in c:
            got.append(e.id)
            if len(got) == 150:
                break  # the event in hand is not acknowledged: it comes again
        async for e in c:
            got.append(e.id)
            if len(got) == 300:
                break
    assert got == ids[:150] + ids[149:299]
    assert acknowledged(conn, "g") == set(ids[:298])  # not the one in hand
    async with pgherald.AsyncConsumer(installed, group="g", channels=["ch"], **FAST) as c:
        async for e in c:
            got.append(e.id)
            if len(got) == len(ids) + 2:
                c.stop()
    assert got == ids[:150] + ids[149:299] + ids[298:]
    assert uncovered(conn, "g") == 0


@pytest.mark.anyio
async def test_async_loop_in_another_task_while_aclose_or_a_second_loop(
    installed: str, conn: psycopg.Connection, anyio_backend: str
) -> None:
    # A loop waiting for events in one task: a second loop on the consumer is refused (it is in
    # use), and aclose() from another task ends the first loop cleanly.
    ids = backlog(conn, 3)
    consumer = pgherald.AsyncConsumer(installed, group="g", channels=["ch"], **FAST)
    got: list[int] = []
    ended: list[str] = []

    async def loop() -> None:
        async for e in consumer:
            got.append(e.id)
        ended.append("cleanly")

    async with consumer, anyio.create_task_group() as tg:
        tg.start_soon(loop)
        await await_until(lambda: len(got) == 3, 10, "the backlog")
        await await_until(lambda: consumer._iteration._running, 5, "the loop waiting")  # type: ignore[union-attr]
        with pytest.raises(pgherald.UsageError, match="already in use"):
            async for _ in consumer:
                pass
        await consumer.aclose()
        await await_until(lambda: ended == ["cleanly"], 5, "the first loop's end")
    assert got == ids


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
    with pgherald.Consumer(
        installed, group="g", channels=["ch"], batch_size=50, max_batch_size=200, **FAST
    ) as c:
        for e in c:
            got.append(e.id)
            if len(got) == 75:
                assert reading_ahead(c)
                pid = c.backend_pid
                assert conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()
            if set(ids) <= set(got):
                c.stop()
    assert c.stats.reconnects >= 1
    assert set(got) == set(ids)
    assert len(got) - len(ids) <= 200  # at most the unacknowledged read again (max_batch_size)
    assert list(dict.fromkeys(got)) == ids  # first deliveries in log order
    assert uncovered(conn, "g") == 0


def _handover(
    conn: psycopg.Connection,
    running: Callable[..., Running],
    ids: list[int],
    work: int,
    first_ready: Callable[[Running], object],
    **options: Any,
) -> None:
    """
    A second member joins the group while the first works through *ids*: every event is
    handled once, by one of them, in key order; the group's position ends past them all.
    """

    def slow(_: pgherald.Event) -> None:
        sum(range(work))  # keep the backlog long enough for the second member to join

    r1 = running(handler=slow, **options)
    first_ready(r1)
    r2 = running(handler=slow, **options)
    wait_until(lambda: len(r1.seen) + len(r2.seen) >= len(ids), 60, "the whole backlog")
    assert r1.error is None
    assert r2.error is None
    assert r2.seen, "the second member should have taken partitions mid-backlog"
    assert Counter(r1.ids + r2.ids) == Counter(ids)  # each event once, by one member
    assert_key_order(r1.seen)
    assert_key_order(r2.seen)
    wait_until(lambda: uncovered(conn, "g") == 0, what="the group position to cover all")


def test_partition_handover_during_a_backlog(
    installed: str, conn: psycopg.Connection, running: Callable[..., Running]
) -> None:
    ids = backlog(conn, 2000)
    _handover(conn, running, ids, 50_000, lambda r1: r1.wait_count(200), batch_size=50)


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


# -- reads grow while behind, shrink once caught up --


def test_reads_grow_over_a_backlog_and_shrink_once_caught_up(
    installed: str, conn: psycopg.Connection
) -> None:
    ids = backlog(conn, 5000)
    sizes: list[int] = []  # the next read's size, seen at each event
    with pgherald.Consumer(
        installed, group="g", channels=["ch"], batch_size=100, max_batch_size=800, **FAST
    ) as c:
        assert c.read_size == 100
        got = drain(c, len(ids), lambda _: sizes.append(c.read_size))
        assert max(sizes) == 800, "reads over a backlog should grow to max_batch_size"
        last_full = len(sizes) - sizes[::-1].index(800)
        assert sizes[:last_full] == sorted(sizes[:last_full]), "only growth while behind"
        assert sizes[-1] == 100, "the backlog's last read was not full: back to batch_size"
        more = [pgherald.publish(conn, "ch", {"k": 0, "s": 10_000 + i}) for i in range(5)]

        def back_to_batch_size(_: pgherald.Event) -> None:
            assert c.read_size == 100  # caught up: a read that is not full brings it back

        got += drain(c, len(more), back_to_batch_size)
    assert [e.id for e in got] == ids + more
    assert_key_order(got)
    assert uncovered(conn, "g") == 0


def test_fixed_read_size_when_max_equals_batch_size(
    installed: str, conn: psycopg.Connection
) -> None:
    ids = backlog(conn, 1000)
    with pgherald.Consumer(
        installed, group="g", channels=["ch"], batch_size=100, max_batch_size=100, **FAST
    ) as c:

        def fixed(_: pgherald.Event) -> None:
            assert c.read_size == 100

        got = [e.id for e in drain(c, len(ids), fixed)]
    assert got == ids


def test_max_batch_size_below_batch_size_is_refused(installed: str) -> None:
    with pytest.raises(pgherald.UsageError, match="max_batch_size"):
        pgherald.Consumer(installed, group="g", batch_size=100, max_batch_size=50)
    with pytest.raises(pgherald.UsageError, match="batch_size"):
        pgherald.AsyncConsumer(installed, group="g", batch_size=0)
    # The default never caps below batch_size.
    c = pgherald.Consumer(installed, group="g", batch_size=50_000)
    try:
        assert c._config.max_batch_size == 50_000
    finally:
        c.close()


KILLED_CONSUMER = """
import sys, pgherald
with pgherald.Consumer(sys.argv[1], group="g", channels=["ch"], batch_size=100,
                       max_batch_size=800, poll_interval=0.1) as c:
    for e in c:
        print(e.id, c.read_size, flush=True)
"""


def test_killed_mid_grown_backlog_redelivers_at_most_one_read(
    installed: str, conn: psycopg.Connection
) -> None:
    ids = backlog(conn, 6000)
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_CONSUMER, installed],
        stdout=subprocess.PIPE,
        text=True,
    )
    first: list[int] = []
    try:
        assert proc.stdout is not None
        grown = 0
        # Well into the backlog, with reads grown to their maximum: then SIGKILL, mid-read.
        while len(first) < 3000 or grown < 800:
            line = proc.stdout.readline()
            assert line, "the consumer exited early"
            event_id, size = map(int, line.split())
            first.append(event_id)
            grown = max(grown, size)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        # What it printed before dying but this test had not read yet was delivered too.
        first += [int(line.split()[0]) for line in proc.stdout.read().splitlines() if line.strip()]
    finally:
        proc.kill()  # only the process this test started
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert first == ids[: len(first)]
    acked = acknowledged(conn, "g")
    assert acked, "some reads should have been acknowledged before the kill"
    second: list[pgherald.Event] = []
    with pgherald.Consumer(
        installed, group="g", channels=["ch"], batch_size=100, max_batch_size=800, **FAST
    ) as c:
        for e in c:
            second.append(e)
            if e.id == ids[-1]:
                c.stop()
    again = set(first) & {e.id for e in second}
    assert not again & acked, "an acknowledged event was delivered again"
    # Only the read in hand at the kill comes again (it may have been acknowledged just
    # before the kill: then nothing does): at most max_batch_size events.
    assert len(again) <= 800
    assert [e.id for e in second] == [i for i in ids if i not in acked]  # in log order, once
    assert_key_order(second)
    assert uncovered(conn, "g") == 0


def test_partition_handover_with_grown_reads(
    installed: str, conn: psycopg.Connection, running: Callable[..., Running]
) -> None:
    ids = backlog(conn, 4000)

    def grown(r1: Running) -> None:
        wait_until(lambda: r1.consumer.read_size == 640 or r1.error, 10, "r1's reads to grow")

    _handover(conn, running, ids, 20_000, grown, batch_size=20, max_batch_size=640)


@pytest.mark.anyio
async def test_async_consumer_grows_and_shrinks_its_reads(installed: str) -> None:
    def load() -> list[int]:
        with psycopg.connect(installed, autocommit=True) as c:
            return backlog(c, 3000)

    ids = await anyio.to_thread.run_sync(load)
    got: list[int] = []
    sizes: list[int] = []
    async with pgherald.AsyncConsumer(
        installed, group="g", channels=["ch"], batch_size=100, max_batch_size=400, **FAST
    ) as c:
        with anyio.fail_after(20):
            async for e in c:
                got.append(e.id)
                sizes.append(c.read_size)
                if len(got) == len(ids):
                    c.stop()
            assert max(sizes) == 400

            def one() -> int:
                with psycopg.connect(installed, autocommit=True) as conn:
                    return pgherald.publish(conn, "ch", {"k": 0, "s": -1})

            extra = await anyio.to_thread.run_sync(one)
            async for e in c:
                got.append(e.id)
                assert c.read_size == 100
                c.stop()
    assert got == [*ids, extra]


def test_reads_of_large_events_stay_under_max_batch_bytes(
    installed: str, conn: psycopg.Connection
) -> None:
    """A backlog of 100 KB events is read a few at a time, not 20,000 (gigabytes) at a time."""
    big = "x" * 100_000
    with conn.transaction():
        ids = [pgherald.publish(conn, "ch", {"i": i, "pad": big}) for i in range(120)]
    sizes: list[int] = []
    with pgherald.Consumer(
        installed, group="g", channels=["ch"], batch_size=10, max_batch_bytes=1_000_000, **FAST
    ) as c:
        got = drain(c, len(ids), lambda _: sizes.append(c.read_size))
    assert [e.id for e in got] == ids
    # After the first read (batch_size), each read holds about 1 MB: 9 events of ~100 KB.
    assert max(sizes) <= 10
    assert set(sizes[10:]) <= {9}, sizes
