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
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import psycopg

from . import _errormap
from ._protocol.channels import check_channel
from ._protocol.scheduled import RELEASE_LIMIT
from .errors import DatabaseConnectionError, UsageError
from .sql import query

logger = logging.getLogger("pgherald.schedule")

_WAKE_CHANNEL = "pgherald_wake_v1"


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


def _cronsim() -> Any:
    try:
        import cronsim
    except ImportError:
        raise UsageError(
            "cron schedules need the 'schedule' extra (cronsim is not installed): "
            "pip install 'pgherald[schedule]'"
        ) from None
    return cronsim


def _zone(name: str) -> Any:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    if name == "UTC":
        return timezone.utc
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise UsageError(
            f"unknown time zone {name!r}: use an IANA name such as 'UTC' or 'Europe/Paris' "
            "(on Windows, pip install tzdata)"
        ) from None


def next_tick(cron: str, after: datetime, tz: str = "UTC") -> datetime:
    """The first tick of *cron* strictly after *after* (aware), in time zone *tz*."""
    cronsim = _cronsim()
    if not isinstance(cron, str):
        raise UsageError(f"cron must be a str such as '*/5 * * * *', not {type(cron).__name__}")
    start = after.astimezone(_zone(tz))
    try:
        it = cronsim.CronSim(cron, start)
        tick: datetime = next(it)
    except cronsim.CronSimError as exc:
        raise UsageError(
            f"invalid cron expression {cron!r} ({exc}): use five fields, minute hour "
            "day-of-month month day-of-week, such as '*/5 * * * *' (every five minutes)"
        ) from None
    except StopIteration:
        raise UsageError(f"cron expression {cron!r} never matches a date: fix it") from None
    return tick.astimezone(timezone.utc)


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
    first = next_tick(cron, datetime.now(tz=_zone("UTC")), timezone)
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
    for name, cron, tz, tick in due:
        current = now if now is not None else datetime.now(tz=_zone("UTC"))
        try:
            following = next_tick(cron, max(current, tick), tz)
        except UsageError as exc:  # stored by hand, or by another version: skip, loudly
            logger.error("schedule %r is skipped: %s", name, exc)
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
    waiting). Running consumers do this by themselves.

    .. versionadded:: 0.1
    """
    released = 0
    while True:
        with _errors("release delayed events"):
            row = conn.execute(query("release_scheduled"), {"limit": RELEASE_LIMIT}).fetchone()
        assert row is not None
        released += int(row[0])
        if int(row[0]) < RELEASE_LIMIT:
            return released, None if row[1] is None else float(row[1])


def run_scheduler(
    conninfo: str,
    *,
    stop: threading.Event | None = None,
    max_wait: float = 0.5,
) -> None:
    """
    Publish schedules' ticks and release due delayed events until *stop* is set: what
    `pgherald schedule run` does. Any number may run at once (each tick and event goes out
    once). Waits on the wake-up channel between due times (at most *max_wait* seconds, so that
    *stop* is seen), and reconnects after a lost connection.

    .. versionadded:: 0.1
    """
    _cronsim()  # fail now, not at the first tick
    stop = stop or threading.Event()
    delay = 0.1
    while not stop.is_set():
        try:
            with psycopg.connect(conninfo, autocommit=True) as conn:
                conn.execute(f"LISTEN {_WAKE_CHANNEL}")
                delay = 0.1
                _serve(conn, stop, max_wait)
        except (psycopg.OperationalError, DatabaseConnectionError) as exc:
            if stop.is_set():
                return
            text = " ".join(str(exc).split())
            logger.warning("scheduler connection failed (%s); retrying in %.1fs", text, delay)
            stop.wait(delay)
            delay = min(10.0, delay * 2)


def _serve(conn: psycopg.Connection[Any], stop: threading.Event, max_wait: float) -> None:
    while not stop.is_set():
        _, event_in = release_due_events(conn)
        tick_schedules(conn)
        with _errors("run schedules"):
            row = conn.execute(query("schedules_next")).fetchone()
        tick_in = None if row is None or row[0] is None else float(row[0])
        if tick_in is not None and tick_in <= 0:
            tick_in = max_wait  # still due after ticking: skipped (bad cron), or another's
        wait = max(0.001, min(x for x in (max_wait, event_in, tick_in) if x is not None))
        for _ in conn.notifies(timeout=wait + 0.001, stop_after=1):
            pass


class _errors:
    """Driver errors as the HeraldError that names the fix (schema missing, privileges...)."""

    def __init__(self, doing: str) -> None:
        self.doing = doing

    def __enter__(self) -> None:
        return None

    def __exit__(self, t: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc is not None and _errormap.is_driver_error(exc):
            raise _errormap.from_driver(exc, doing=self.doing) from exc
