"""
Delayed and periodic events.

- Delayed: `publish(..., deliver_at=...)` stores the event in ``pgherald.scheduled_v1``; when it
  is due, `release_due_events` (run by every consumer, see ``_protocol/scheduled.py``, and by
  `run_scheduler`) moves it into the log, exactly once.
- Periodic: `add_schedule` stores a cron schedule in ``pgherald.schedules_v1``; `tick_schedules`
  publishes each due tick exactly once however many processes call it (the statement that
  moves ``next_tick`` on publishes, see queries.sql schedule_tick). Ticks missed while nothing
  ran are not replayed: the last one missed is published once, then the schedule goes on from
  now. Cron parsing needs the ``schedule`` extra (cronsim).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import psycopg

from . import _checks, _errormap
from ._conninfo import connect_error, describe, listener_conninfo
from ._protocol.channels import check_channel
from ._protocol.pgwire import Request
from ._protocol.scheduled import RELEASE_LIMIT, next_tick, require_cronsim, zone
from ._protocol.scheduler import SchedulerConfig, SchedulerEngine, due_tick
from ._waiting import Waiter
from ._waiting_async import AsyncWaiter
from .errors import ConnectError, UsageError
from .sql import query

logger = logging.getLogger("pgherald.schedule")


@dataclass(frozen=True)
class Schedule:
    """A periodic event (a row of ``pgherald.schedules_v1``)."""

    name: str
    cron: str
    timezone: str
    """The cron expression's time zone (IANA name)."""
    channel: str
    key: str | None
    payload: Any
    headers: dict[str, Any] | None
    next_tick: datetime
    last_tick: datetime | None
    created_at: datetime


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip():
        raise UsageError("a schedule's name must be a non-empty str")
    return name


def add_schedule(
    conn: psycopg.Connection[Any],
    name: str,
    cron: str,
    channel: str,
    payload: object = None,
    *,
    key: str | None = None,
    headers: Mapping[str, Any] | None = None,
    timezone: str = "UTC",
    replace: bool = False,
) -> Schedule:
    """
    Publish *payload* on *channel* at every tick of *cron* (five fields, in *timezone*), once
    per tick however many `run_scheduler` / `pgherald schedule run` processes run. *payload*
    None: ``{}``. Each event's headers add ``pgherald_schedule`` (the name) and
    ``pgherald_tick`` (the tick's time). An existing schedule of that name is an error unless
    *replace*. Runs in the caller's transaction (commit it unless *conn* is in autocommit).

    .. versionadded:: 0.1
    """
    _check_name(name)
    check_channel(channel)
    if key is not None and not isinstance(key, str):
        raise UsageError(f"key must be a str or None, got {type(key).__name__}")
    first = next_tick(cron, datetime.now(tz=zone("UTC")), timezone)
    try:
        payload_text = json.dumps({} if payload is None else payload, allow_nan=False)
        headers_text = None if headers is None else json.dumps(dict(headers), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"payload and headers must be JSON values ({exc})") from None
    params = {
        "name": name,
        "cron": cron,
        "timezone": timezone,
        "channel": channel,
        "key": key,
        "payload": payload_text,
        "headers": headers_text,
        "next_tick": first.isoformat(),
        "replace": replace,
    }
    with _errors("add a schedule"):
        row = conn.execute(query("schedule_add"), params).fetchone()
    if not row or not row[0]:
        raise UsageError(
            f"a schedule named {name!r} exists already: remove it first, or replace it "
            "(replace=True, `schedule add --replace`)"
        )
    found = [s for s in list_schedules(conn) if s.name == name]
    return found[0]


def remove_schedule(conn: psycopg.Connection[Any], name: str) -> bool:
    """Delete schedule *name*; False if there was none. Runs in the caller's transaction.

    .. versionadded:: 0.1
    """
    _check_name(name)
    with _errors("remove a schedule"):
        return conn.execute(query("schedule_remove"), {"name": name}).fetchone() is not None


def list_schedules(conn: psycopg.Connection[Any]) -> list[Schedule]:
    """Every schedule, by name.

    .. versionadded:: 0.1
    """
    with _errors("list schedules"):
        rows = conn.execute(query("schedules")).fetchall()
    return [
        Schedule(
            name=r[0],
            cron=r[1],
            timezone=r[2],
            channel=r[3],
            key=r[4],
            payload=json.loads(r[5]),
            headers=None if r[6] is None else json.loads(r[6]),
            next_tick=r[7],
            last_tick=r[8],
            created_at=r[9],
        )
        for r in rows
    ]


def tick_schedules(conn: psycopg.Connection[Any], *, now: datetime | None = None) -> list[int]:
    """
    Publish every schedule's due tick, each exactly once whoever else calls this at the same
    time; return the ids of the events published here. *now* (tests): the time to tick at,
    instead of the server's. With *conn* in autocommit each tick commits on its own; else in
    the caller's transaction (ticks are then claimed when it commits).

    .. versionadded:: 0.1
    """
    at = None if now is None else now.isoformat()
    with _errors("run schedules"):
        due = conn.execute(query("schedules_due"), {"now": at}).fetchall()
    ids: list[int] = []
    for name, cron, tz, tick, _ in due:
        current = now if now is not None else datetime.now(tz=timezone.utc)
        following = due_tick(name, cron, tz, tick, current)
        if following is None:
            continue
        params = {"name": name, "tick": tick.isoformat(), "following": following.isoformat()}
        with _errors("publish a schedule's tick"):
            row = conn.execute(query("schedule_tick"), params).fetchone()
        if row is not None:  # else another process published this tick
            ids.append(int(row[0]))
    return ids


def cancel_delayed(conn: psycopg.Connection[Any], scheduled_id: int) -> bool:
    """
    Withdraw a delayed event: *scheduled_id* is what `publish(..., deliver_at=...)` returned.
    True if it was still waiting (it will never be delivered); False if it was released
    already (or never existed). Runs in the caller's transaction.

    .. versionadded:: 0.1
    """
    if isinstance(scheduled_id, bool) or not isinstance(scheduled_id, int):
        raise UsageError(
            f"scheduled_id must be the int that publish(..., deliver_at=...) returned, not "
            f"{scheduled_id!r}"
        )
    with _errors("cancel a delayed event"):
        row = conn.execute(query("cancel_delayed"), {"id": scheduled_id}).fetchone()
    return row is not None


def delayed_pending(conn: psycopg.Connection[Any]) -> tuple[int, datetime | None]:
    """Delayed events waiting (not yet in the log), and when the first is due."""
    with _errors("count delayed events"):
        row = conn.execute(query("scheduled_pending")).fetchone()
    assert row is not None
    return int(row[0]), row[1]


def release_due_events(conn: psycopg.Connection[Any]) -> tuple[int, float | None]:
    """
    Move due delayed events into the log, each exactly once whoever else does it at the same
    time; return how many moved here, and the seconds until the next one is due (None: none
    waiting; 0 with none moved: another releaser was at work, try again). Running consumers
    do this by themselves. Call it in a transaction of its own (an autocommit connection): in
    one that has written already, the events take that transaction's older id and may sort
    before events released meanwhile.

    .. versionadded:: 0.1
    """
    released = 0
    while True:
        with _errors("release delayed events"):
            row = conn.execute(query("release_scheduled"), {"limit": RELEASE_LIMIT}).fetchone()
        assert row is not None
        released += int(row[0])
        if int(row[0]) < RELEASE_LIMIT:
            return released, None if row[1] is None else max(0.0, float(row[1]))


class _SchedulerBase:
    def __init__(
        self,
        dsn: str | None,
        *,
        max_wait: float,
        statement_timeout: float,
        connect_timeout: float,
        reconnect_initial_delay: float,
        reconnect_max_delay: float,
    ) -> None:
        for name, value in (
            ("max_wait", max_wait),
            ("statement_timeout", statement_timeout),
            ("connect_timeout", connect_timeout),
            ("reconnect_initial_delay", reconnect_initial_delay),
            ("reconnect_max_delay", reconnect_max_delay),
        ):
            _checks.seconds(name, value)
        require_cronsim()  # fail now, not at the first tick
        self.dsn = dsn
        self.config = SchedulerConfig(
            conninfo=listener_conninfo(dsn, application_name="pgherald-schedule"),
            max_wait=float(max_wait),
            statement_timeout=float(statement_timeout),
            connect_timeout=float(connect_timeout),
            reconnect_initial_delay=float(reconnect_initial_delay),
            reconnect_max_delay=float(reconnect_max_delay),
        )
        self._engine = SchedulerEngine(self.config)
        self._busy = False

    @property
    def ticks(self) -> int:
        """Schedule ticks this scheduler published (others may publish some)."""
        return self._engine.ticks

    @property
    def released(self) -> int:
        """Delayed events this scheduler moved into the log."""
        return self._engine.released

    @property
    def reconnects(self) -> int:
        """Connections replaced after one was lost."""
        return self._engine.reconnects

    @property
    def connect_failures(self) -> int:
        """Connection attempts that failed."""
        return self._engine.connect_failures

    @property
    def backend_pid(self) -> int | None:
        """The server process of the current connection (None: not connected)."""
        return self._engine.backend_pid

    def _claim(self) -> SchedulerEngine:
        if self._busy:
            raise UsageError("this scheduler is already running: one run at a time")
        self._busy = True
        return self._engine

    def _steps(self, engine: SchedulerEngine) -> Generator[Request, Any, None]:
        try:
            yield from engine.run()
        except ConnectError as exc:  # given up: the same failure three times in a row
            raise connect_error(self.config.conninfo, str(exc)) from None

    def _check(self) -> Generator[Request, Any, None]:
        try:
            yield from self._engine.check()
        except ConnectError as exc:
            raise connect_error(self.config.conninfo, str(exc)) from None

    def __repr__(self) -> str:
        state = "running" if self._busy else "idle"
        return f"<{type(self).__name__} {describe(self.config.conninfo)} {state}>"

    def _release(self) -> None:
        """A run ended: it may run again (a stop() before a run ends that run at once)."""
        self._engine.stopping = False
        self._busy = False


class Scheduler(_SchedulerBase):
    """
    What `pgherald schedule run` runs: `run` publishes every schedule's due tick and releases
    due delayed events until `stop`, each exactly once however many schedulers run at once.
    Between due times it waits on the wake-up channel, at most *max_wait* seconds. Each
    statement has *statement_timeout* seconds to answer: a connection that does not (frozen,
    half-open) is replaced, like one that is lost, after a delay of *reconnect_initial_delay*
    seconds doubling up to *reconnect_max_delay* (with jitter). A server that refuses the role
    or the database three times in a row ends `run` with `ConnectError`; a missing schema or
    privilege at once, with the error that names the fix.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        max_wait: float = 0.5,
        statement_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        reconnect_initial_delay: float = 0.1,
        reconnect_max_delay: float = 10.0,
    ) -> None:
        super().__init__(
            dsn,
            max_wait=max_wait,
            statement_timeout=statement_timeout,
            connect_timeout=connect_timeout,
            reconnect_initial_delay=reconnect_initial_delay,
            reconnect_max_delay=reconnect_max_delay,
        )
        self._waiter = Waiter()

    def check(self) -> None:
        """
        Connect once, check that pgherald's schema is installed, hang up: raise what `run`
        would only log and retry (`ConnectError`, `SchemaMissing`). What ``with`` does.
        """
        waiter = Waiter()
        try:
            waiter.run(self._check())
        finally:
            waiter.close()

    def __enter__(self) -> Scheduler:
        """`check`, then the scheduler (leaving the block stops a run in progress)."""
        self.check()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._busy:  # a run in progress ends; none left stopped for later
            self.stop()

    def stop(self) -> None:
        """End `run` soon: within a second in every state (from any thread or a signal handler)."""
        self._engine.stopping = True
        self._waiter.wake()

    def run(self) -> None:
        """Serve schedules until `stop`."""
        engine = self._claim()
        self._waiter.open()
        gen = self._steps(engine)
        try:
            self._waiter.run(gen)
        finally:
            gen.close()
            self._waiter.close()
            self._release()


class AsyncScheduler(_SchedulerBase):
    """
    `Scheduler` for asyncio and trio: ``await scheduler.run()`` until `stop` or cancellation,
    waiting on the event loop itself (no worker thread).

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        max_wait: float = 0.5,
        statement_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        reconnect_initial_delay: float = 0.1,
        reconnect_max_delay: float = 10.0,
    ) -> None:
        super().__init__(
            dsn,
            max_wait=max_wait,
            statement_timeout=statement_timeout,
            connect_timeout=connect_timeout,
            reconnect_initial_delay=reconnect_initial_delay,
            reconnect_max_delay=reconnect_max_delay,
        )
        self._waiter = AsyncWaiter()

    async def check(self) -> None:
        """`Scheduler.check` on the event loop: connect once, check the schema, hang up."""
        await AsyncWaiter().run(self._check())

    async def __aenter__(self) -> AsyncScheduler:
        """`check`, then the scheduler (leaving the block stops a run in progress)."""
        await self.check()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._busy:  # a run in progress ends; none left stopped for later
            self.stop()

    def stop(self) -> None:
        """End `run` soon: within a second in every state (from any task or thread)."""
        self._engine.stopping = True
        self._waiter.wake()

    async def run(self) -> None:
        """Serve schedules until `stop` (or until cancelled)."""
        engine = self._claim()
        self._waiter.bind()
        gen = self._steps(engine)
        try:
            await self._waiter.run(gen)
        finally:
            gen.close()
            self._waiter.release()
            self._release()


def run_scheduler(
    conninfo: str,
    *,
    stop: threading.Event | None = None,
    max_wait: float = 0.5,
) -> None:
    """
    `Scheduler(conninfo, max_wait=max_wait).run()` until *stop* is set (None: forever).

    .. versionadded:: 0.1
    """
    scheduler = Scheduler(conninfo, max_wait=max_wait)
    if stop is None:
        scheduler.run()
        return
    done = threading.Event()

    def watch() -> None:
        # A threading.Event cannot wake a waiter: look at it every 0.1 s, until run returns.
        while not stop.wait(0.1):
            if done.is_set():
                return
        scheduler.stop()

    watcher = threading.Thread(target=watch, name="pgherald-scheduler-stop", daemon=True)
    watcher.start()
    try:
        scheduler.run()
    finally:
        done.set()
        watcher.join()


class _errors:
    """Driver errors as the HeraldError that names the fix (schema missing, privileges...)."""

    def __init__(self, doing: str) -> None:
        self.doing = doing

    def __enter__(self) -> None:
        return None

    def __exit__(self, t: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc is not None and _errormap.is_driver_error(exc):
            raise _errormap.from_driver(exc, doing=self.doing) from exc
