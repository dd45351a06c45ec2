"""Delayed events (publish(..., deliver_at=...)) and periodic schedules, through a real server."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
import psycopg
import pytest

import pgherald
from tests.fix_durable import Running, wait_until

SLOW_POLL = {"poll_interval": 5.0, "rebalance_interval": 0.2}
"""A poll far longer than the lateness allowed: a delayed event on time proves the hook."""
LATE = 0.1
"""Seconds a delayed event may enter the log after deliver_at."""
HELD = 1.0
"""Seconds it may then take to reach a handler. The log is read only below the server's
oldest running transaction (docs/durable.md, the ordering trap): on a shared test server other
sessions' transactions (CREATE DATABASE, say) hold that back for a while, whatever we do.
`bench/scheduled_bench.py` measures the lateness to the handler on a quiet server."""


def counts(conn: psycopg.Connection) -> tuple[int, int]:
    """(delayed events waiting, events in the log)."""
    row = conn.execute(
        "SELECT (SELECT count(*) FROM pgherald.scheduled_v1), "
        "(SELECT count(*) FROM pgherald.events_v1)"
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def due_time(conn: psycopg.Connection, scheduled_id: int) -> float:
    row = conn.execute(
        "SELECT extract(epoch FROM deliver_at) FROM pgherald.scheduled_v1 WHERE id = %s",
        (scheduled_id,),
    ).fetchone()
    assert row is not None
    return float(row[0])


def entered(conn: psycopg.Connection, event_id: int) -> float:
    """When the event entered the log (its release), by the server's clock."""
    row = conn.execute(
        "SELECT extract(epoch FROM created_at) FROM pgherald.events_v1 WHERE id = %s", (event_id,)
    ).fetchone()
    assert row is not None
    return float(row[0])


def idle(consumer: Running) -> None:
    """Wait until the consumer has connected and released once (it then waits for wake-ups)."""
    wait_until(lambda: consumer.consumer.stats.reads >= 1, 5, "the consumer's first read")


# -- delayed events --


def test_delayed_event_waits_then_arrives_on_time(
    installed: str, conn: psycopg.Connection, running: Callable[..., Running]
) -> None:
    handled: dict[int, float] = {}

    def note(event: pgherald.Event) -> None:
        handled[event.id] = time.time()

    consumer = running(handler=note, **SLOW_POLL)
    idle(consumer)
    pgherald.publish(conn, "ch", {"n": 0})  # an ordinary one, to know the consumer reads
    consumer.wait_count(1)
    sid = pgherald.publish(conn, "ch", {"n": 1}, deliver_after=timedelta(seconds=0.6))
    due = due_time(conn, sid)
    assert counts(conn) == (1, 1)  # not in the log: no group's position can pass it
    consumer.wait_count(2, timeout=5)
    (event,) = consumer.seen[1:]
    assert event.payload == {"n": 1}
    assert handled[event.id] >= due, "delivered before deliver_at"
    assert due <= entered(conn, event.id) < due + LATE
    assert handled[event.id] - due < HELD, f"late by {handled[event.id] - due:.3f}s"
    assert counts(conn) == (0, 2)


def test_deliver_at_and_a_consumer_started_later(
    installed: str, conn: psycopg.Connection, running: Callable[..., Running]
) -> None:
    at = datetime.now(timezone.utc) + timedelta(seconds=0.3)
    sid = pgherald.publish(conn, "ch", "later", deliver_at=at, key="k", headers={"h": 1})
    past = pgherald.publish(conn, "ch", "overdue", deliver_at=at - timedelta(hours=1))
    assert abs(due_time(conn, sid) - at.timestamp()) < 0.001
    assert due_time(conn, past) < at.timestamp()
    consumer = running(**SLOW_POLL)  # releases what is overdue at once, then waits for "later"
    consumer.wait_count(1, timeout=8)
    # (on a loaded machine the consumer may start after "later" fell due too: first all the same)
    assert consumer.seen[0].payload == "overdue"
    consumer.wait_count(2, timeout=8)
    later = consumer.seen[1]
    assert (later.payload, later.key, later.headers) == ("later", "k", {"h": 1})
    assert at.timestamp() <= entered(conn, later.id) < at.timestamp() + LATE


def test_rollback_schedules_nothing(installed: str, conn: psycopg.Connection) -> None:
    with psycopg.connect(installed) as c:
        pgherald.publish(c, "ch", 1, deliver_after=timedelta(0))
        c.rollback()
    assert counts(conn) == (0, 0)
    assert pgherald.release_due_events(conn) == (0, None)
    assert counts(conn) == (0, 0)


def test_cancel_a_delayed_event(installed: str, conn: psycopg.Connection) -> None:
    keep = pgherald.publish(conn, "ch", "keep", deliver_after=timedelta(0))
    drop = pgherald.publish(conn, "ch", "drop", deliver_after=timedelta(0))
    assert pgherald.cancel_delayed(conn, drop)
    assert not pgherald.cancel_delayed(conn, drop)
    assert pgherald.release_due_events(conn) == (1, None)
    assert not pgherald.cancel_delayed(conn, keep)  # released: too late
    assert conn.execute("SELECT payload FROM pgherald.events_v1").fetchall() == [("keep",)]
    with pytest.raises(pgherald.UsageError, match="publish"):
        pgherald.cancel_delayed(conn, "1")  # type: ignore[arg-type]


def test_delayed_through_psycopg2_and_sqlalchemy(installed: str, conn: psycopg.Connection) -> None:
    import psycopg2

    from tests.fix_db import sqlalchemy_engine

    pg2 = psycopg2.connect(installed)
    try:
        pgherald.publish(pg2, "ch", "pg2", deliver_after=timedelta(seconds=30))
        pg2.commit()
    finally:
        pg2.close()
    engine = sqlalchemy_engine(installed)
    try:
        with engine.begin() as sa_conn:
            at = datetime.now(timezone(timedelta(hours=2))) + timedelta(seconds=30)
            pgherald.publish(sa_conn, "ch", "sa", deliver_at=at)
    finally:
        engine.dispose()
    rows = conn.execute(
        "SELECT payload, extract(epoch FROM deliver_at - created_at) FROM pgherald.scheduled_v1 "
        "ORDER BY id"
    ).fetchall()
    assert [p for p, _ in rows] == ["pg2", "sa"]
    assert all(29 < float(d) < 31 for _, d in rows), rows


def test_due_events_are_released_once_and_in_order_by_concurrent_releasers(
    installed: str, conn: psycopg.Connection
) -> None:
    # Eight releasers at once, as eight consumers are: every event once, and the log in
    # publishing order (its (tx, id)). Two releases at once would each take some of the
    # rows, and the one with the older transaction id would store later events first.
    with conn.transaction():
        for i in range(5000):
            pgherald.publish(conn, "ch", i, key="k", deliver_after=timedelta(0))
    pgherald.publish(conn, "ch", "far", deliver_after=timedelta(hours=1))
    released: list[int] = []
    barrier = threading.Barrier(8)

    def release() -> None:
        with psycopg.connect(installed, autocommit=True) as c:
            barrier.wait()
            moved = 0
            while True:  # as a consumer does: another was at it (0 s to the next): again
                n, next_in = pgherald.release_due_events(c)
                moved += n
                assert next_in is not None
                if next_in > 0:
                    break
                time.sleep(0.001)
            assert 3500 < next_in <= 3600
            released.append(moved)

    threads = [threading.Thread(target=release) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(released) == 5000, released
    rows = conn.execute("SELECT payload FROM pgherald.events_v1 ORDER BY tx, id").fetchall()
    assert [r[0] for r in rows] == list(range(5000))  # each exactly once, in order
    assert counts(conn) == (1, 5000)


def test_a_releaser_at_work_keeps_the_others_out(installed: str, conn: psycopg.Connection) -> None:
    # While one release is in progress (here: held open), another moves nothing and hears
    # that the next event is due at once; after it, the rest goes.
    with conn.transaction():
        for i in range(1500):
            pgherald.publish(conn, "ch", i, deliver_after=timedelta(0))
    with psycopg.connect(installed) as first:  # a transaction, held open
        assert pgherald.release_due_events(first) == (1500, None)  # two batches
        assert counts(conn) == (1500, 0)  # not committed yet
        with psycopg.connect(installed, autocommit=True) as other:
            assert pgherald.release_due_events(other) == (0, 0.0)
        first.commit()
    with psycopg.connect(installed, autocommit=True) as other:
        assert pgherald.release_due_events(other) == (0, None)  # the first took all 1,500
    rows = conn.execute("SELECT payload FROM pgherald.events_v1 ORDER BY tx, id").fetchall()
    assert [r[0] for r in rows] == list(range(1500))


def test_bad_due_times_are_clear_errors(installed: str, conn: psycopg.Connection) -> None:
    with pytest.raises(pgherald.PublishError, match="timezone-aware"):
        pgherald.publish(conn, "ch", 1, deliver_at=datetime.now())
    with pytest.raises(pgherald.PublishError, match="not both"):
        pgherald.publish(
            conn,
            "ch",
            1,
            deliver_at=datetime.now(timezone.utc),
            deliver_after=timedelta(seconds=1),
        )
    with pytest.raises(pgherald.PublishError, match="timedelta"):
        pgherald.publish(conn, "ch", 1, deliver_after=5)  # type: ignore[arg-type]
    with pytest.raises(pgherald.PublishError, match="negative"):
        pgherald.publish(conn, "ch", 1, deliver_after=timedelta(seconds=-1))
    assert counts(conn) == (0, 0)


@pytest.mark.anyio
async def test_async_consumer_gets_a_delayed_event_on_time(installed: str) -> None:
    handled: list[tuple[pgherald.Event, float]] = []
    consumer = pgherald.AsyncConsumer(installed, group="g", channels=["ch"], **SLOW_POLL)

    @consumer.on("ch")
    async def handle(event: pgherald.Event) -> None:
        handled.append((event, time.time()))

    async def until(pred: Callable[[], bool], what: str, within: float = 5) -> None:
        deadline = time.monotonic() + within
        while not pred():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await anyio.sleep(0.01)  # polling, bounded by the deadline

    def publish(**when: Any) -> float:
        with psycopg.connect(installed, autocommit=True) as c:
            sid = pgherald.publish(c, "ch", "delayed" if when else "now", **when)
            return due_time(c, sid) if when else 0.0

    async with consumer, anyio.create_task_group() as tg:
        tg.start_soon(consumer.run)
        await anyio.to_thread.run_sync(publish)
        await until(lambda: len(handled) == 1, "the first event")
        due = await anyio.to_thread.run_sync(lambda: publish(deliver_after=timedelta(seconds=0.5)))
        await until(lambda: len(handled) == 2, "the delayed event", within=8)
        consumer.stop()
    event, at = handled[1]
    assert event.payload == "delayed"
    assert due <= event.created_at.timestamp() < due + LATE
    assert due <= at < due + HELD, f"late by {at - due:.3f}s"


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # psycopg's AsyncConnection: asyncio only
async def test_apublish_delayed_rolls_back_with_its_transaction(installed: str) -> None:
    async with await psycopg.AsyncConnection.connect(installed) as c:
        await pgherald.apublish(c, "ch", 1, deliver_after=timedelta(seconds=1))
        await c.rollback()
        sid = await pgherald.apublish(c, "ch", 2, deliver_after=timedelta(seconds=1))
        await c.commit()
        cur = await c.execute("SELECT id, payload FROM pgherald.scheduled_v1")
        assert await cur.fetchall() == [(sid, 2)]


# -- periodic schedules --


def test_each_tick_is_published_once_by_concurrent_tickers(
    installed: str, conn: psycopg.Connection
) -> None:
    pgherald.add_schedule(conn, "every-minute", "* * * * *", "ticks", {"x": 1}, key="t")
    pgherald.add_schedule(conn, "five", "*/5 * * * *", "ticks", None)
    first = {s.name: s.next_tick for s in pgherald.list_schedules(conn)}
    start = first["every-minute"]
    minutes = [start + timedelta(minutes=i) for i in range(30)]
    barrier = threading.Barrier(3)
    published: list[int] = []

    def tick() -> None:
        with psycopg.connect(installed, autocommit=True) as c:
            for at in minutes:
                barrier.wait()  # every thread ticks at the same simulated minute
                published.extend(pgherald.tick_schedules(c, now=at))

    threads = [threading.Thread(target=tick) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    rows = conn.execute(
        "SELECT headers->>'pgherald_schedule', (headers->>'pgherald_tick')::timestamptz, "
        "payload, key FROM pgherald.events_v1 ORDER BY id"
    ).fetchall()
    assert len(rows) == len(published)
    ticks = Counter((name, tick) for name, tick, _, _ in rows)
    assert set(ticks.values()) == {1}, "a tick was published twice"
    assert sorted(t for n, t in ticks if n == "every-minute") == minutes
    fives = sorted(t for n, t in ticks if n == "five")
    assert fives == [m for m in minutes if m.minute % 5 == 0 and m >= first["five"]]
    assert {(p == {"x": 1}, k) for n, _, p, k in rows if n == "every-minute"} == {(True, "t")}
    assert {(str(p), k) for n, _, p, k in rows if n == "five"} == {("{}", None)}
    (every,) = [s for s in pgherald.list_schedules(conn) if s.name == "every-minute"]
    assert (every.last_tick, every.next_tick) == (minutes[-1], minutes[-1] + timedelta(minutes=1))


def test_missed_ticks_are_published_once_not_replayed(
    installed: str, conn: psycopg.Connection
) -> None:
    pgherald.add_schedule(conn, "m", "* * * * *", "ticks")
    (s,) = pgherald.list_schedules(conn)
    later = s.next_tick + timedelta(hours=2, seconds=30)
    assert len(pgherald.tick_schedules(conn, now=later)) == 1
    assert pgherald.tick_schedules(conn, now=later) == []
    (s,) = pgherald.list_schedules(conn)
    assert s.next_tick == later.replace(second=0) + timedelta(minutes=1)


def test_schedule_errors_are_clear(installed: str, conn: psycopg.Connection) -> None:
    for cron in ("*/5 * * *", "61 * * * *", "every minute"):
        with pytest.raises(pgherald.HeraldError, match="invalid cron expression"):
            pgherald.add_schedule(conn, "bad", cron, "ch")
    # Five fields only: cronsim reads a sixth as seconds (a tick every second), and a seventh
    # (a year) fails later or not at all.
    for cron in ("* * * * * *", "*/10 * * * * *", "0 0 1 1 * 2027", "", "  "):
        with pytest.raises(pgherald.UsageError, match="use five fields, minute hour"):
            pgherald.add_schedule(conn, "bad", cron, "ch")
    assert pgherald.list_schedules(conn) == []
    with pytest.raises(pgherald.UsageError, match="unknown time zone"):
        pgherald.add_schedule(conn, "bad", "* * * * *", "ch", timezone="Mars/Olympus")
    with pytest.raises(pgherald.InvalidChannel):
        pgherald.add_schedule(conn, "bad", "* * * * *", "")
    pgherald.add_schedule(conn, "ok", "0 9 * * *", "ch", timezone="Europe/Paris")
    with pytest.raises(pgherald.UsageError, match="exists already"):
        pgherald.add_schedule(conn, "ok", "* * * * *", "ch")
    replaced = pgherald.add_schedule(conn, "ok", "0 9 * * *", "other", replace=True)
    assert (replaced.channel, replaced.timezone) == ("other", "UTC")
    assert pgherald.list_schedules(conn) == [replaced]
    assert pgherald.remove_schedule(conn, "ok")
    assert not pgherald.remove_schedule(conn, "ok")
    assert pgherald.list_schedules(conn) == []


def test_a_six_field_schedule_stored_before_is_skipped_not_ticked_every_second(
    installed: str, conn: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    pgherald.add_schedule(conn, "secs", "* * * * *", "ticks")
    conn.execute("UPDATE pgherald.schedules_v1 SET cron = '* * * * * *' WHERE name = 'secs'")
    (s,) = pgherald.list_schedules(conn)
    with caplog.at_level("ERROR", logger="pgherald.schedule"):
        assert pgherald.tick_schedules(conn, now=s.next_tick + timedelta(seconds=1)) == []
    assert "schedule 'secs' is skipped: invalid cron expression '* * * * * *' (6 fields)" in (
        caplog.text
    )
    assert pgherald.list_schedules(conn)[0].next_tick == s.next_tick  # left for the operator


def test_cron_time_zone_is_honoured(installed: str, conn: psycopg.Connection) -> None:
    s = pgherald.add_schedule(conn, "paris", "0 9 * * *", "ch", timezone="Europe/Paris")
    local = s.next_tick.astimezone(__import__("zoneinfo").ZoneInfo("Europe/Paris"))
    assert (local.hour, local.minute) == (9, 0)


def test_run_scheduler_ticks_and_releases_without_a_consumer(
    installed: str, conn: psycopg.Connection
) -> None:
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            pgherald.run_scheduler(installed, stop=stop)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        sid = pgherald.publish(conn, "ch", "d", deliver_after=timedelta(seconds=0.3))
        due = due_time(conn, sid)
        wait_until(lambda: counts(conn) == (0, 1), 5, "the delayed event's release")
        row = conn.execute(
            "SELECT extract(epoch FROM created_at) FROM pgherald.events_v1"
        ).fetchone()
        assert row is not None
        assert due <= float(row[0]) < due + LATE
        pgherald.add_schedule(conn, "s", "* * * * *", "ticks")
        conn.execute("UPDATE pgherald.schedules_v1 SET next_tick = now() + interval '0.2 s'")
        conn.execute("SELECT pg_notify('pgherald_wake_v1', 'scheduled')")
        wait_until(lambda: counts(conn)[1] == 2, 5, "the tick")
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()
    assert errors == []


def test_consumer_on_a_schema_without_delayed_events_keeps_consuming(
    installed: str,
    conn: psycopg.Connection,
    running: Callable[..., Running],
    caplog: pytest.LogCaptureFixture,
) -> None:
    conn.execute("DROP TABLE pgherald.scheduled_v1")  # as before migration 0.1.0_10
    with caplog.at_level("WARNING", logger="pgherald.consumer"):
        consumer = running()
        pgherald.publish(conn, "ch", 1)
        consumer.wait_count(1)
    assert "does not release delayed events" in caplog.text
    assert "pgherald install" in caplog.text
