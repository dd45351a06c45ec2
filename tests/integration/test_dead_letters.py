"""Poison events and dead letters through a real server: a group never stops, redelivery."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from typing import Any

import anyio
import anyio.lowlevel
import psycopg
import pytest

import pgherald
from tests.fix_durable import FAST, Running, acknowledged, drain, uncovered, wait_until

DEEP = "SELECT pgherald.publish_v1(%s, (repeat('[', 3000) || repeat(']', 3000))::jsonb)"
"""An array nested 3,000 deep: jsonb takes it, Python's json raises RecursionError."""
HUGE = "SELECT pgherald.publish_v1(%s, ('1' || repeat('0', 4999))::jsonb)"
"""A 5,000-digit integer: jsonb takes it, Python's int() refuses it (max str digits)."""


def publish_all(dsn: str, items: list[tuple[str, Any]]) -> list[int]:
    """Publish (channel, payload) in order, one transaction; "deep"/"huge" write poison."""
    ids = []
    with psycopg.connect(dsn, autocommit=True) as c, c.transaction():
        for channel, payload in items:
            if payload in ("deep", "huge"):
                row = c.execute(DEEP if payload == "deep" else HUGE, (channel,)).fetchone()
                assert row is not None
                ids.append(int(row[0]))
            else:
                ids.append(pgherald.publish(c, channel, payload))
    return ids


def scenario(dsn: str) -> tuple[list[int], dict[str, int]]:
    """
    Ten good events on "ch", a failing one, a 5,000-digit one on "ch", a 3,000-deep one on the
    unrelated channel "other" (which the group does not read, but whose rows its reads meet).
    """
    items: list[tuple[str, Any]] = [("ch", {"n": i}) for i in range(5)]
    items += [("other", "deep"), ("ch", {"fail": True}), ("ch", "huge")]
    items += [("ch", {"n": i}) for i in range(5, 10)]
    ids = publish_all(dsn, items)
    return [i for i, (_, p) in zip(ids, items, strict=True) if isinstance(p, dict) and "n" in p], {
        "deep": ids[5],
        "fail": ids[6],
        "huge": ids[7],
    }


class Flaky:
    """A handler that fails on {"fail": true} until `healed`; records what it handled."""

    def __init__(self) -> None:
        self.healed = False
        self.handled: list[int] = []
        self.calls: Counter[int] = Counter()

    def __call__(self, event: pgherald.Event) -> None:
        self.calls[event.id] += 1
        if isinstance(event.payload, dict) and event.payload.get("fail") and not self.healed:
            raise RuntimeError("boom")
        self.handled.append(event.id)


def check_dead(conn: psycopg.Connection, marks: dict[str, int], attempts: int) -> None:
    dead = {d.event_id: d for d in pgherald.dead_letters(conn, "g")}
    assert set(dead) == {marks["fail"], marks["huge"]}, dead  # not "deep": not the group's
    failed = dead[marks["fail"]]
    assert (failed.group, failed.channel, failed.attempts) == ("g", "ch", attempts)
    assert "RuntimeError: boom" in failed.error
    assert failed.error.startswith("handler ")
    assert failed.first_failed_at <= failed.last_failed_at <= failed.dead_at
    assert failed.in_log
    assert failed.redeliver_at is None
    huge = dead[marks["huge"]]
    assert huge.attempts == 1
    assert "cannot decode the event: ValueError" in huge.error


# -- poison events never stop a group --


def test_poison_and_failing_handler_leave_the_group_running(
    installed: str, conn: psycopg.Connection
) -> None:
    good, marks = scenario(installed)
    flaky = Flaky()
    r = Running(installed, handler=flaky, max_attempts=3, retry_delay=0.01)
    try:
        wait_until(lambda: len(flaky.handled) >= 10 or r.error, 10, "the good events")
        assert r.error is None, repr(r.error)
        assert flaky.handled == good  # in order, all of them
        assert flaky.calls[marks["fail"]] == 3
        wait_until(lambda: uncovered(conn, "g", "ch") == 0, 5, "the group past everything")
        check_dead(conn, marks, attempts=3)
        stats = r.consumer.stats
        assert (stats.dead_lettered, stats.skipped, stats.handler_errors) == (2, 1, 3)
        # Still running: a new event comes through.
        (later,) = publish_all(installed, [("ch", {"n": 99})])
        wait_until(lambda: later in flaky.handled or r.error, 5, "a later event")
    finally:
        r.stop()
    # A restart does not see the poison again.
    again = Flaky()
    r2 = Running(installed, handler=again)
    try:
        (last,) = publish_all(installed, [("ch", {"n": 100})])
        wait_until(lambda: again.handled or r2.error, 5, "the next event")
        assert again.handled == [last]
    finally:
        r2.stop()


class Unprintable(Exception):
    """An exception whose message fails (a bug in someone's __str__)."""

    def __str__(self) -> str:
        raise KeyError("id")


def test_any_exception_is_dead_lettered_with_a_storable_error(
    installed: str, conn: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    # Whatever a handler's exception holds, its event is dead-lettered and the group moves
    # on: a lone surrogate (an OSError about a file name that is not UTF-8), a NUL (which
    # PostgreSQL's text refuses and libpq would cut at), a __str__ that fails.
    failures: dict[str, Exception] = {
        "surrogate": RuntimeError("cannot import " + os.fsdecode(b"/data/\xff.csv")),
        "nul": ValueError("bad\x00byte"),
        "unprintable": Unprintable(),
    }
    ids = publish_all(installed, [("ch", {"fail": k}) for k in failures] + [("ch", {"n": 1})])

    def handler(event: pgherald.Event) -> None:
        if "fail" in event.payload:
            raise failures[event.payload["fail"]]

    # The tracebacks logged hold the surrogate as it is, which pytest-xdist cannot send
    # between processes: none captured.
    caplog.set_level(logging.CRITICAL + 1, logger="pgherald.consumer")
    r = Running(installed, handler=handler, max_attempts=1)
    try:
        wait_until(lambda: len(r.seen) == 1 or r.error, 10, "the good event")
        assert r.error is None, repr(r.error)
        assert [e.id for e in r.seen] == ids[3:]
    finally:
        r.stop()
    dead = {d.event_id: d.error for d in pgherald.dead_letters(conn, "g")}
    assert set(dead) == set(ids[:3])
    assert "cannot import /data/\\udcff.csv" in dead[ids[0]]
    assert "ValueError: bad\\x00byte" in dead[ids[1]]
    assert "Unprintable (its message could not be read)" in dead[ids[2]]


def test_poison_alone_in_a_read_of_every_channel(installed: str, conn: psycopg.Connection) -> None:
    """A group on every channel (no filter) dead-letters both undecodable events."""
    ids = publish_all(installed, [("a", "deep"), ("b", {"ok": 1}), ("a", "huge"), ("b", {"ok": 2})])
    seen: list[int] = []
    c = pgherald.Consumer(installed, group="g", **FAST)
    c.on()(lambda e: seen.append(e.id))
    with c:
        t = threading.Thread(target=c.run, daemon=True)
        t.start()
        wait_until(lambda: len(seen) >= 2, 5, "the decodable events")
        wait_until(lambda: uncovered(conn, "g") == 0, 5, "the group past everything")
        c.stop()
        t.join(5)
    assert seen == [ids[1], ids[3]]
    dead = pgherald.dead_letters(conn, "g")
    assert [(d.event_id, d.channel) for d in dead] == [(ids[0], "a"), (ids[2], "a")]
    assert "RecursionError" in dead[0].error


def test_iteration_skips_and_dead_letters_poison(installed: str, conn: psycopg.Connection) -> None:
    ids = publish_all(installed, [("ch", {"n": 1}), ("ch", "deep"), ("ch", {"n": 2})])
    with pgherald.Consumer(installed, group="g", channels=["ch"], **FAST) as c:
        got = []
        for e in c:
            got.append(e.id)
            if len(got) == 2:
                c.stop()
    assert got == [ids[0], ids[2]]
    assert [d.event_id for d in pgherald.dead_letters(conn, "g")] == [ids[1]]
    assert acknowledged(conn, "g") >= set(ids)


# -- redelivery --


def test_redelivered_dead_letter_is_handled_once_by_a_group_of_two(
    installed: str, conn: psycopg.Connection
) -> None:
    good, marks = scenario(installed)
    flaky = Flaky()
    members = [
        Running(installed, handler=flaky, max_attempts=2, retry_delay=0.01) for _ in range(2)
    ]
    try:
        wait_until(lambda: len(flaky.handled) >= 10, 10, "the good events")
        wait_until(lambda: len(pgherald.dead_letters(conn, "g")) == 2, 5, "two dead letters")
        flaky.healed = True
        assert pgherald.redeliver(conn, "g", [marks["fail"]]) == [marks["fail"]]
        assert pgherald.redeliver(conn, "g", [marks["fail"]]) == []  # already pending
        wait_until(lambda: marks["fail"] in flaky.handled, 5, "the redelivered event")
        wait_until(
            lambda: [d.event_id for d in pgherald.dead_letters(conn, "g")] == [marks["huge"]],
            5,
            "the redelivered dead letter deleted",
        )
        time.sleep(1.0)  # an observation window (5 rebalance intervals), not synchronisation
        assert Counter(flaky.handled)[marks["fail"]] == 1
        assert sorted(flaky.handled) == sorted([*good, marks["fail"]])
        assert sum(m.consumer.stats.redelivered for m in members) == 1
        # The undecodable one, redelivered, is dead again (attempts added), never handed out.
        assert pgherald.redeliver(conn, "g") == [marks["huge"]]
        wait_until(lambda: pgherald.dead_letters(conn, "g")[0].attempts == 2, 5, "dead again")
        (huge,) = pgherald.dead_letters(conn, "g")
        assert huge.redeliver_at is None
        assert huge.redeliveries == 1
        assert marks["huge"] not in flaky.calls
        # The group's position never moved back.
        assert uncovered(conn, "g", "ch") == 0
    finally:
        for m in members:
            m.stop()
    assert pgherald.purge_dead_letters(conn, "g") == 1
    assert pgherald.dead_letters(conn) == []


def test_redelivered_event_failing_again_comes_back_with_attempts_added(
    installed: str, conn: psycopg.Connection
) -> None:
    _, marks = scenario(installed)
    flaky = Flaky()
    r = Running(installed, handler=flaky, max_attempts=2, retry_delay=0.01)
    try:
        wait_until(lambda: len(pgherald.dead_letters(conn, "g")) == 2, 10, "dead letters")
        pgherald.redeliver(conn, "g", [marks["fail"]])
        wait_until(lambda: flaky.calls[marks["fail"]] == 4, 5, "two more attempts")
        wait_until(
            lambda: pgherald.dead_letters(conn, "g", ids=[marks["fail"]])[0].redeliver_at is None,
            5,
            "dead again",
        )
        (d,) = pgherald.dead_letters(conn, "g", ids=[marks["fail"]])
        assert (d.attempts, d.redeliveries) == (4, 1)
        assert r.consumer.stats.redelivered == 0
    finally:
        r.stop()


def test_transactional_handler_redelivery_commits_with_its_work(
    installed: str, conn: psycopg.Connection
) -> None:
    conn.execute("CREATE TABLE done (id bigint PRIMARY KEY)")
    (eid,) = publish_all(installed, [("ch", {"fail": True})])
    healed = False
    c = pgherald.Consumer(
        installed, group="g", channels=["ch"], max_attempts=1, retry_delay=0.01, **FAST
    )

    @c.on("ch", transactional=True)
    def handle(event: pgherald.Event, tx: psycopg.Connection) -> None:
        tx.execute("INSERT INTO done VALUES (%s)", (event.id,))
        if not healed:
            raise RuntimeError("not yet")

    with c:
        t = threading.Thread(target=c.run, daemon=True)
        t.start()
        wait_until(lambda: pgherald.dead_letters(conn, "g"), 5, "a dead letter")
        healed = True
        pgherald.redeliver(conn, "g")
        wait_until(lambda: not pgherald.dead_letters(conn, "g"), 5, "the redelivery")
        c.stop()
        t.join(5)
    assert conn.execute("SELECT id FROM done").fetchall() == [(eid,)]
    assert c.stats.redelivered == 1


def test_api_refuses_bad_arguments(installed: str, conn: psycopg.Connection) -> None:
    with pytest.raises(pgherald.UsageError, match="group"):
        pgherald.redeliver(conn, "")
    with pytest.raises(pgherald.UsageError, match="ids"):
        pgherald.purge_dead_letters(conn, "g", "12")  # type: ignore[arg-type]
    with pytest.raises(pgherald.UsageError, match="limit"):
        pgherald.dead_letters(conn, limit=0)
    with pytest.raises(pgherald.UsageError, match="limit"):
        pgherald.dead_letters(conn, limit=10**30)  # past a bigint: not the server's words
    for call in (pgherald.redeliver, pgherald.purge_dead_letters):
        with pytest.raises(pgherald.UsageError, match=r"\[5\] for one"):
            call(conn, "g", 5)  # type: ignore[arg-type]  # one id, not a list of them
        with pytest.raises(pgherald.UsageError, match="ids must be event ids"):
            call(conn, "g", [10**30])
    with pytest.raises(pgherald.UsageError, match=r"\[5\] for one"):
        pgherald.dead_letters(conn, "g", ids=5)  # type: ignore[arg-type]
    for group_call in (pgherald.reset_group, pgherald.delete_group):
        with pytest.raises(pgherald.UsageError, match="group must be a non-empty str"):
            group_call(conn, 5)  # type: ignore[arg-type]  # not "run pgherald install"


def test_api_without_schema_says_install(dsn: str, conn: psycopg.Connection) -> None:
    with pytest.raises(pgherald.SchemaMissing, match="pgherald install"):
        pgherald.dead_letters(conn)


# -- AsyncConsumer, asyncio and trio --


@pytest.mark.anyio
async def test_async_consumer_poison_dead_letters_and_redelivery(installed: str) -> None:
    good, marks = await anyio.to_thread.run_sync(scenario, installed)
    flaky = Flaky()
    handled_async: list[int] = []

    consumer = pgherald.AsyncConsumer(
        installed, group="g", channels=["ch"], max_attempts=2, retry_delay=0.01, **FAST
    )

    @consumer.on("ch")
    async def handle(event: pgherald.Event) -> None:
        await anyio.lowlevel.checkpoint()
        flaky(event)
        handled_async.append(event.id)

    def dead() -> list[pgherald.DeadLetter]:
        with psycopg.connect(installed, autocommit=True) as c:
            return pgherald.dead_letters(c, "g")

    def redeliver_all() -> list[int]:
        with psycopg.connect(installed, autocommit=True) as c:
            return pgherald.redeliver(c, "g", [marks["fail"]])

    async def until(pred: Any, what: str) -> None:
        deadline = time.monotonic() + 10
        while not await pred():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await anyio.sleep(0.02)  # polling, bounded by the deadline

    async with consumer, anyio.create_task_group() as tg:
        tg.start_soon(consumer.run)

        async def got_good() -> bool:
            return len(flaky.handled) >= 10

        await until(got_good, "good events")

        async def two_dead() -> bool:
            return len(await anyio.to_thread.run_sync(dead)) == 2

        await until(two_dead, "two dead letters")
        with psycopg.connect(installed, autocommit=True) as c:
            check_dead(c, marks, attempts=2)
        flaky.healed = True
        assert await anyio.to_thread.run_sync(redeliver_all) == [marks["fail"]]

        async def one_dead() -> bool:
            return [d.event_id for d in await anyio.to_thread.run_sync(dead)] == [marks["huge"]]

        await until(one_dead, "the redelivery")
        consumer.stop()
    assert handled_async == [*good, marks["fail"]]
    assert consumer.stats.dead_lettered == 2
    assert consumer.stats.redelivered == 1


def test_iteration_redelivery_left_early_never_moves_the_group_back(
    installed: str, conn: psycopg.Connection
) -> None:
    """Leaving an iteration of redelivered events settles those handed out, nothing else."""
    ids = publish_all(installed, [("ch", {"fail": True}), ("ch", {"fail": True}), ("ch", {"n": 1})])
    flaky = Flaky()
    r = Running(installed, handler=flaky, max_attempts=1)
    try:
        wait_until(lambda: len(pgherald.dead_letters(conn, "g")) == 2, 5, "two dead letters")
        wait_until(lambda: uncovered(conn, "g") == 0, 5, "the group past everything")
    finally:
        r.stop()
    assert pgherald.redeliver(conn, "g") == ids[:2]
    got = []
    with pgherald.Consumer(installed, group="g", channels=["ch"], **FAST) as c:
        for e in c:
            got.append(e.id)
            if len(got) == 2:
                break  # the second is in hand: not done; the first is
    assert got == ids[:2]
    assert [d.event_id for d in pgherald.dead_letters(conn, "g")] == [ids[1]]
    assert uncovered(conn, "g") == 0  # the position stayed past everything
    with pgherald.Consumer(installed, group="g", channels=["ch"], **FAST) as c:
        again = drain(c, 1)
    assert [e.id for e in again] == [ids[1]]
    assert pgherald.dead_letters(conn, "g") == []
    assert uncovered(conn, "g") == 0


def test_schema_without_dead_letters_keeps_the_group_running(
    installed: str, conn: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """A schema from before dead letters (library upgraded, not `install`): give up, log, go on."""
    conn.execute("DROP TABLE pgherald.dead_letters_v1")
    good, _ = scenario(installed)
    flaky = Flaky()
    r = Running(installed, handler=flaky, max_attempts=1)
    try:
        wait_until(lambda: len(flaky.handled) >= 10 or r.error, 10, "the good events")
        assert r.error is None, repr(r.error)
        assert flaky.handled == good
        wait_until(lambda: uncovered(conn, "g", "ch") == 0, 5, "the group past everything")
        assert r.consumer.stats.dead_lettered == 0
        assert r.consumer.stats.skipped == 1
    finally:
        r.stop()
    assert "dead letters are off" in caplog.text
    assert "pgherald install" in caplog.text


def test_redelivery_waits_for_a_consumer_of_its_channel(
    installed: str, conn: psycopg.Connection
) -> None:
    (eid,) = publish_all(installed, [("ch", {"fail": True})])
    flaky = Flaky()
    r = Running(installed, handler=flaky, max_attempts=1)
    wait_until(lambda: pgherald.dead_letters(conn, "g"), 5, "a dead letter")
    r.stop()
    flaky.healed = True
    pgherald.redeliver(conn, "g")
    elsewhere = Flaky()
    other = Running(installed, channels=("other",), handler=elsewhere)
    try:
        time.sleep(1.0)  # an observation window (5 rebalance intervals), not synchronisation
        assert elsewhere.calls == Counter()
        (pending,) = pgherald.dead_letters(conn, "g")
        assert pending.redeliver_at is not None
    finally:
        other.stop()
    r2 = Running(installed, handler=flaky)
    try:
        wait_until(lambda: not pgherald.dead_letters(conn, "g"), 5, "the redelivery")
        assert flaky.handled == [eid]
    finally:
        r2.stop()
