"""
Fixtures and helpers for the durable event log: an installed schema, a consumer in a thread,
and a consumer or scheduler of any runtime (thread, asyncio, trio) on a thread of its own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import anyio
import psycopg
import pytest

import pgherald

FAST = {"poll_interval": 0.1, "rebalance_interval": 0.2}


def drain(
    consumer: pgherald.Consumer,
    n: int,
    each: Callable[[pgherald.Event], object] | None = None,
) -> list[pgherald.Event]:
    """
    Iterate *consumer* until it has given *n* events, stopping it cleanly (so the last one is
    acknowledged); *each*, when given, sees every event as it comes (to check the consumer's
    state mid-stream).
    """
    got: list[pgherald.Event] = []
    for e in consumer:
        got.append(e)
        if each is not None:
            each(e)
        if len(got) >= n:
            consumer.stop()
    return got


def publish_each(dsn: str, payloads: list[Any], channel: str = "ch", **kwargs: Any) -> list[int]:
    """Publish each payload in a transaction of its own (an autocommit connection of its own)."""
    with psycopg.connect(dsn, autocommit=True) as c:
        return [pgherald.publish(c, channel, p, **kwargs) for p in payloads]


def terminate(conn: psycopg.Connection, pid: int | None) -> None:
    """End the session *pid* (a consumer's backend) from *conn*, as an administrator would."""
    assert pid is not None
    assert conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)


def wait_until(cond: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    """Poll *cond* until truthy (bounded); fail with *what* otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)  # polling a condition, bounded by the deadline


def wait_readable(conn: psycopg.Connection, timeout: float = 10.0) -> None:
    """
    Wait until every stored event is readable: a log reader sees events only below its
    snapshot's xmin, and any transaction that writes on the server (another database: other
    tests, run side by side) holds that back while it runs.
    """
    wait_until(
        lambda: conn.execute(
            "SELECT pg_snapshot_xmin(pg_current_snapshot()) > "
            "coalesce((SELECT max(tx) FROM pgherald.events_v1), '0')"
        ).fetchone()[0],  # type: ignore[index]
        timeout,
        "the server's other transactions to end (the log's readers wait for them)",
    )


def uncovered(conn: psycopg.Connection, group: str, channel: str | None = None) -> int:
    """
    Events the group's position has not passed yet (0: the position covers them all): a
    channel's own position, else (a channel the group has not read) the group's start.
    """
    row = conn.execute(
        "SELECT count(*) FROM pgherald.events_v1 e " + _POSITION + " WHERE"
        " (coalesce(p.tx, s.tx) IS NULL"
        "  OR (e.tx, e.id) > (coalesce(p.tx, s.tx), coalesce(p.event_id, s.event_id)))"
        " AND (%s::text IS NULL OR e.channel = %s)",
        (group, group, channel, channel),
    ).fetchone()
    assert row is not None
    return int(row[0])


def acknowledged(conn: psycopg.Connection, group: str) -> set[int]:
    """Ids of the events the group's position has passed (acknowledged)."""
    rows = conn.execute(
        "SELECT e.id FROM pgherald.events_v1 e " + _POSITION + " WHERE"
        " (e.tx, e.id) <= (coalesce(p.tx, s.tx), coalesce(p.event_id, s.event_id))",
        (group, group),
    )
    return {r[0] for r in rows}


_POSITION = (
    "LEFT JOIN pgherald.positions_v2 p ON p.group_name = %s AND p.channel = e.channel"
    " AND p.partition = e.partition "
    "LEFT JOIN pgherald.positions_v2 s ON s.group_name = %s AND s.channel = ''"
    " AND s.partition = e.partition"
)


class Running:
    """A sync `Consumer` running handlers in a thread; records what it handled."""

    def __init__(
        self,
        dsn: str,
        *,
        group: str = "g",
        channels: tuple[str, ...] = ("ch",),
        handler: Callable[[pgherald.Event], None] | None = None,
        **options: Any,
    ) -> None:
        self.consumer = pgherald.Consumer(
            dsn, group=group, channels=channels, **{**FAST, **options}
        )
        self.seen: list[pgherald.Event] = []
        self.error: BaseException | None = None
        self._extra = handler

        @self.consumer.on()
        def record(event: pgherald.Event) -> None:
            if self._extra is not None:
                self._extra(event)
            self.seen.append(event)

        self.consumer.connect()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.consumer.run()
        except BaseException as exc:  # reported by the test, not as a thread warning
            self.error = exc

    @property
    def ids(self) -> list[int]:
        return [e.id for e in self.seen]

    def wait_count(self, n: int, timeout: float = 5.0) -> None:
        wait_until(lambda: len(self.seen) >= n or self.error, timeout, f"{n} events")
        assert self.error is None, repr(self.error)

    def stop(self) -> None:
        self.consumer.stop()
        self.thread.join(10)
        assert not self.thread.is_alive(), "consumer did not stop"
        self.consumer.close()
        assert self.error is None, repr(self.error)


@pytest.fixture
def installed(dsn: str, conn: psycopg.Connection) -> str:
    """The test database with pgherald's schema installed; returns its DSN."""
    pgherald.install(conn)
    return dsn


@pytest.fixture
def running(installed: str) -> Iterator[Callable[..., Running]]:
    """Start consumers in threads; all stopped (and closed) at the end of the test."""
    started: list[Running] = []

    def start(**kwargs: Any) -> Running:
        r = Running(installed, **kwargs)
        started.append(r)
        return r

    yield start
    for r in started:
        if r.thread.is_alive():
            r.consumer.stop()
            r.thread.join(10)
        r.consumer.close()


# -- a consumer or a scheduler of any runtime, run by a thread (fault tests) --


class _OnAThread:
    """`obj.run()` of one runtime on a thread: directly (sync), or in ``anyio.run``."""

    def __init__(self, runtime: str, obj: Any) -> None:
        self.runtime = runtime
        self.obj = obj
        self.error: BaseException | None = None
        self.returned_at: float | None = None
        self.thread = threading.Thread(target=self._main, name=f"run-{runtime}", daemon=True)
        self.thread.start()

    def _main(self) -> None:
        try:
            if self.runtime == "sync":
                self.obj.run()
            else:
                anyio.run(self.obj.run, backend=self.runtime)
        except BaseException as exc:  # kept for the test
            self.error = exc
        finally:
            self.returned_at = time.monotonic()

    def alive(self) -> bool:
        assert self.thread.is_alive(), f"run() ended: {self.error!r}"
        return True

    def end(self) -> None:
        """Stop it if it still runs (a test's cleanup, after a failure)."""
        if self.thread.is_alive():
            self.obj.stop()
            self.thread.join(10)

    def stop(self, within: float = 1.0) -> float:
        """Stop it; assert that run() returned within *within* seconds; return the time."""
        started = time.monotonic()
        self.obj.stop()
        self.thread.join(within + 5)
        assert not self.thread.is_alive(), "run() did not return after stop()"
        took = (self.returned_at or time.monotonic()) - started
        assert took < within, f"run() took {took:.2f}s after stop() (at most {within}s)"
        return took


class ConsumerOnAThread(_OnAThread):
    """A consumer of one runtime, its handlers registered, running on a thread."""

    def __init__(self, runtime: str, consumer: Any) -> None:
        self.consumer = consumer
        super().__init__(runtime, consumer)
        # Its first read is sent once it is connected, in the group, holding partitions.
        wait_until(
            lambda: self.consumer.stats.reads or not self.thread.is_alive(),
            10,
            "run() to connect and read",
        )

    def close(self) -> None:
        if self.thread.is_alive():
            self.consumer.stop()
            self.thread.join(10)
        if self.runtime == "sync":
            self.consumer.close()
        else:
            anyio.run(self.consumer.aclose, backend="asyncio")

    def __enter__(self) -> ConsumerOnAThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ConsumerRun(ConsumerOnAThread):
    """A consumer of one runtime on a thread; the ids (and payloads) its handler saw."""

    def __init__(
        self,
        runtime: str,
        dsn: str,
        *,
        handler: Callable[[pgherald.Event], Any] | None = None,
        **options: Any,
    ) -> None:
        self.seen: list[int] = []
        self.payloads: list[Any] = []
        self.gaps: list[pgherald.Gap] = []
        options.setdefault("group", "g")
        options.setdefault("channels", ["ch"])
        cls = pgherald.Consumer if runtime == "sync" else pgherald.AsyncConsumer
        consumer: Any = cls(dsn, on_reconnect=self.gaps.append, **options)
        extra = handler

        def record(e: pgherald.Event) -> None:
            if extra is not None:
                extra(e)
            self.seen.append(e.id)
            self.payloads.append(e.payload)

        consumer.on()(record)
        super().__init__(runtime, consumer)


@pytest.fixture
def consumers() -> Iterator[Callable[..., ConsumerRun]]:
    started: list[ConsumerRun] = []

    def start(runtime: str, dsn: str, **options: Any) -> ConsumerRun:
        run = ConsumerRun(runtime, dsn, **options)
        started.append(run)
        return run

    yield start
    for run in started:
        run.close()


class SchedulerRun(_OnAThread):
    """A scheduler of one runtime on a thread."""

    def __init__(self, runtime: str, dsn: str, **options: Any) -> None:
        cls = pgherald.Scheduler if runtime == "sync" else pgherald.AsyncScheduler
        self.scheduler: Any = cls(dsn, **options)
        super().__init__(runtime, self.scheduler)
        wait_until(
            lambda: self.scheduler.backend_pid or not self.thread.is_alive(),
            10,
            "run() to connect",
        )

    def stop(self, within: float = 1.0) -> float:
        """As for any runner, and run() ended without an error."""
        took = super().stop(within)
        assert self.error is None, repr(self.error)
        return took


@pytest.fixture
def schedulers() -> Iterator[Callable[..., SchedulerRun]]:
    started: list[SchedulerRun] = []

    def start(runtime: str, dsn: str, **options: Any) -> SchedulerRun:
        run = SchedulerRun(runtime, dsn, **options)
        started.append(run)
        return run

    yield start
    for run in started:
        if run.thread.is_alive():
            run.scheduler.stop()
            run.thread.join(10)


def publish_delayed(dsn: str, value: Any, after: float = 0.2, channel: str = "ch") -> int:
    """Publish *value* on *channel*, due *after* seconds from now."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return pgherald.publish(conn, channel, value, deliver_after=timedelta(seconds=after))


def log_payloads(dsn: str, channel: str = "ch") -> list[Any]:
    """The payloads of the log's events on *channel*, in id order."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [
            r[0]
            for r in conn.execute(
                "SELECT payload FROM pgherald.events_v1 WHERE channel = %s ORDER BY id", (channel,)
            )
        ]
