"""`Consumer.add_batch_handler`: the consumer front end the relay is built on."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import psycopg
import pytest

import pgherald
from tests.fix_brokers import publish_paced
from tests.fix_durable import uncovered
from tests.fix_faults import wait_until

FAST: dict[str, Any] = {"retry_delay": 0.001, "retry_max_delay": 0.005, "poll_interval": 0.05}


class Failed(Exception):
    def __init__(self, done: int) -> None:
        super().__init__(f"failed after {done}")
        self.done = done


def run_until_caught_up(consumer: pgherald.Consumer, conn: psycopg.Connection, group: str) -> None:
    t = threading.Thread(target=consumer.run)
    t.start()
    try:
        wait_until(lambda: uncovered(conn, group) == 0, 10, "the group to catch up")
    finally:
        consumer.stop()
        t.join(10)
    assert not t.is_alive()


def test_one_call_per_read_and_one_acknowledgement(
    installed: str, conn: psycopg.Connection
) -> None:
    ids = publish_paced(installed, "orders", 500, 500, 0)
    calls: list[list[int]] = []
    with pgherald.Consumer(installed, group="g", batch_size=200, **FAST) as c:
        c.add_batch_handler(lambda events: calls.append([e.id for e in events]), "orders")
        run_until_caught_up(c, conn, "g")
    assert [i for call in calls for i in call] == ids
    assert len(calls) < 10  # reads, not events
    assert c.stats.acknowledged == 500


def test_a_partial_count_hands_the_rest_out_again_without_a_failure(
    installed: str, conn: psycopg.Connection
) -> None:
    ids = publish_paced(installed, "orders", 100, 100, 0)
    seen: list[int] = []

    def half(events: list[pgherald.Event]) -> int | None:
        take = max(1, len(events) // 2)
        seen.extend(e.id for e in events[:take])
        return take if take < len(events) else None

    with pgherald.Consumer(installed, group="g", **FAST) as c:
        c.add_batch_handler(half, "orders")
        run_until_caught_up(c, conn, "g")
    assert seen == ids
    assert c.stats.handler_errors == 0


def test_an_exception_with_done_retries_from_that_event_then_dead_letters_it(
    installed: str, conn: psycopg.Connection
) -> None:
    ids = publish_paced(installed, "orders", 20, 20, 0)
    poison = ids[7]
    handled: list[int] = []

    def handler(events: list[pgherald.Event]) -> None:
        for n, e in enumerate(events):
            if e.id == poison:
                raise Failed(n)
            handled.append(e.id)

    with pgherald.Consumer(installed, group="g", max_attempts=3, **FAST) as c:
        c.add_batch_handler(handler, "orders")
        run_until_caught_up(c, conn, "g")
    assert handled == [i for i in ids if i != poison]  # the first 7 once, not again
    (dead,) = pgherald.dead_letters(conn, "g")
    assert dead.event_id == poison
    assert dead.attempts == 3
    assert "failed after 0" in dead.error  # the retries started at it


def test_a_bad_return_value_is_a_failure_that_names_it(
    installed: str, conn: psycopg.Connection
) -> None:
    publish_paced(installed, "orders", 3, 3, 0)
    with pgherald.Consumer(installed, group="g", max_attempts=1, **FAST) as c:
        c.add_batch_handler(lambda events: "all of them", "orders")
        run_until_caught_up(c, conn, "g")
    dead = pgherald.dead_letters(conn, "g")
    assert len(dead) == 3
    assert "return None (all handled) or how many" in dead[0].error


def test_batch_and_per_event_handlers_do_not_mix(installed: str) -> None:
    c = pgherald.Consumer(installed, group="g")
    c.add_batch_handler(lambda events: None, "orders")
    with pytest.raises(pgherald.UsageError, match="batch handler"):
        c.add_handler(["orders"], lambda e: None)
    with pytest.raises(pgherald.UsageError, match="already has handlers"):
        c.add_batch_handler(lambda events: None)
    d = pgherald.Consumer(installed, group="g")
    d.add_handler(["orders"], lambda e: None)
    with pytest.raises(pgherald.UsageError, match="already has handlers"):
        d.add_batch_handler(lambda events: None)

    async def handler(events: list[pgherald.Event]) -> None:
        pass

    with pytest.raises(pgherald.UsageError, match="is async"):
        pgherald.Consumer(installed, group="g").add_batch_handler(handler)


@pytest.mark.anyio
async def test_async_batch_handler(
    installed: str, conn: psycopg.Connection, anyio_backend: str
) -> None:
    ids = publish_paced(installed, "orders", 300, 300, 0)
    seen: list[int] = []
    all_seen = anyio.Event()

    async def handler(events: list[pgherald.Event]) -> int | None:
        await anyio.lowlevel.checkpoint()
        seen.extend(e.id for e in events[:100])
        if len(seen) >= len(ids):
            all_seen.set()
        return 100 if len(events) > 100 else None

    async with pgherald.AsyncConsumer(installed, group="g", **FAST) as c:
        c.add_batch_handler(handler, "orders")
        async with anyio.create_task_group() as tg:
            tg.start_soon(c.run)
            with anyio.fail_after(10):
                await all_seen.wait()
            c.stop()
    assert seen == ids
    assert uncovered(conn, "g") == 0  # the last read was acknowledged on the way out
