"""
`pgherald schedule run` without I/O: on one connection, publish every schedule's due tick and
release due delayed events, then wait on the wake-up channel until the next is due; reconnect
with backoff when the connection is lost.

A generator over libpq (`pgwire`) that `Scheduler` drives on a thread and `AsyncScheduler` on
asyncio or trio. Every statement has a deadline (*statement_timeout*), so a frozen connection
is found by the first statement after it froze: at most *max_wait* + *statement_timeout*
seconds. `stop()` ends a wait at once and a statement within `pgwire.STOP_GRACE`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .. import _errormap
from ..errors import (
    ConnectError,
    ConnectionLost,
    DatabaseConnectionError,
    HeraldError,
    UsageError,
)
from . import pgwire, session
from .backoff import backoff_delay
from .pgwire import READ, SLEEP, WAIT, Request
from .scheduled import RELEASE_LIMIT, Busy, locked_out, next_tick

logger = logging.getLogger("pgherald.schedule")


@dataclass(frozen=True)
class SchedulerConfig:
    conninfo: str
    max_wait: float
    statement_timeout: float
    connect_timeout: float
    reconnect_initial_delay: float
    reconnect_max_delay: float


def due_tick(name: str, cron: str, tz: str, tick: datetime, now: datetime) -> datetime | None:
    """
    The tick after *tick*, the schedule *name*'s due one, to move its ``next_tick`` to (at or
    after *now*: ticks missed while nothing ran are not replayed). None, logged: its cron or
    time zone is invalid (stored by hand, or by another version), so it is skipped.
    """
    try:
        return next_tick(cron, max(now, tick), tz)
    except UsageError as exc:
        logger.error("schedule %r is skipped: %s", name, exc)
        return None


class SchedulerEngine:
    """The scheduler's state: `run` is its whole life, connection after connection."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.stopping = False
        self.ticks = 0
        """Schedule ticks published by this scheduler."""
        self.released = 0
        """Delayed events moved into the log by this scheduler."""
        self.reconnects = 0
        """Connections replaced after one was lost."""
        self.connect_failures = 0
        """Connection attempts that failed."""
        self.backend_pid: int | None = None
        """The server process of the current connection (None: not connected)."""
        self.rounds = 0
        """Rounds of releasing and ticking done (each after a wake-up or a timeout)."""
        self.statement: str | None = None
        """The named query in flight, if any."""
        self._busy = Busy()  # another releaser at work: try again after a growing delay

    def _stopped(self) -> bool:
        return self.stopping

    def run(self) -> Generator[Request, Any, None]:
        """Until `stopping`: connect, LISTEN, serve; after a lost connection, again."""
        config = self.config
        attempt = 0  # failures since the last good connection
        permanent = pgwire.PermanentFailures()
        was_connected = False
        while not self.stopping:
            try:
                pgconn = yield from pgwire.until_stopped(
                    pgwire.connect(config.conninfo, time.monotonic() + config.connect_timeout),
                    self._stopped,
                )
            except ConnectError as exc:
                self.connect_failures += 1
                if permanent.give_up(str(exc)):
                    raise
                attempt += 1
                yield from self._pause(attempt, f"cannot connect ({pgwire.one_line(exc)})")
                continue
            except pgwire.Abandoned:
                return  # stopped while connecting
            permanent = pgwire.PermanentFailures()
            lost: HeraldError | None = None
            try:
                yield from self._statement(pgconn, "listen_wakeups", {}, "listen for wake-ups")
                # The server's pid, not libpq's (behind PgBouncer, the pooler's own key): it
                # also tells our own wake-ups (releases, ticks) from other sessions'.
                res = yield from self._statement(pgconn, "backend_pid", {}, "listen for wake-ups")
                if was_connected:
                    self.reconnects += 1
                    logger.info("scheduler reconnected")
                was_connected = True
                attempt = 0
                self.backend_pid = int(session.text(res, 0, 0) or 0)
                yield from self._serve(pgconn, self.backend_pid)
            except DatabaseConnectionError as exc:  # lost, or the server not ready yet
                lost = exc
            except HeraldError as exc:  # the LISTEN cancelled...: again, on a new connection
                if not _errormap.is_transient(exc.sqlstate):
                    raise
                lost = exc
            except pgwire.Abandoned:
                return  # stopped during a statement
            finally:
                self.backend_pid = None
                pgconn.finish()
            if lost is not None:
                attempt += 1
                why = pgwire.one_line(lost)
                if isinstance(lost, DatabaseConnectionError):
                    why = f"connection lost ({why})"
                yield from self._pause(attempt, why)

    def check(self) -> Generator[Request, Any, None]:
        """
        Connect once and check the schema, then hang up: what a scheduler's ``with`` does, so
        that an app's startup fails at once (`ConnectError`, `SchemaMissing`), not later in
        `run`'s retries.
        """
        config = self.config
        pgconn = yield from pgwire.connect(
            config.conninfo, time.monotonic() + config.connect_timeout
        )
        try:
            res = yield from self._statement(pgconn, "schema_installed", {}, "check the schema")
            if session.text(res, 0, 0) != "t":  # as the server's own error would say it
                raise _errormap.from_sqlstate(
                    "42P01", "pgherald's tables are not there", doing="check the schema"
                )
        finally:
            pgconn.finish()

    def _pause(self, attempt: int, why: str) -> Generator[Request, Any, None]:
        if self.stopping:
            return
        config = self.config
        delay = backoff_delay(
            attempt, initial=config.reconnect_initial_delay, cap=config.reconnect_max_delay
        )
        logger.warning("scheduler: %s; retrying in %.1fs", why, delay)
        yield (SLEEP, time.monotonic() + delay)

    def _serve(self, pgconn: Any, own: int) -> Generator[Request, Any, None]:
        attempt = 0  # transient failures in a row
        while not self.stopping:
            try:
                wait = yield from self._round(pgconn)
            except HeraldError as exc:
                if not _errormap.is_transient(exc.sqlstate):
                    raise
                attempt += 1  # a deadlock, a cancelled statement...: the next round may pass
                yield from self._pause(attempt, pgwire.one_line(exc))
                continue
            attempt = 0
            self.rounds += 1
            if self.stopping:
                return
            # Wake-ups read with the round's answers wait in libpq's queue, not on the socket:
            # one from another session (ours announce our own releases) means a round now.
            woken = False
            while (n := pgconn.notifies()) is not None:
                woken = woken or n.be_pid != own
            if woken:
                continue
            if (yield (WAIT, pgconn.socket, READ, time.monotonic() + wait)):
                try:
                    pgconn.consume_input()
                except Exception as exc:  # the server closed the connection
                    raise ConnectionLost(pgwire.one_line(exc) or "closed") from None
                while pgconn.notifies() is not None:
                    pass  # a wake-up: what it says, the next round finds out

    def _round(self, pgconn: Any) -> Generator[Request, Any, float]:
        """Release due delayed events, publish due ticks; the seconds until the next is due."""
        while True:
            res = yield from self._statement(
                pgconn, "release_scheduled", {"limit": str(RELEASE_LIMIT)},
                "release delayed events",
            )  # fmt: skip
            moved = int(session.text(res, 0, 0) or 0)
            self.released += moved
            if moved < RELEASE_LIMIT or self.stopping:  # a backlog: stop() between batches
                due = session.text(res, 0, 1)
                event_in = None if due is None else float(due)
                busy = self._busy.next(locked_out(moved, event_in))
                event_in = event_in if busy is None else busy
                break
        res = yield from self._statement(pgconn, "schedules_due", {"now": None}, "run schedules")
        now = datetime.now(tz=timezone.utc)
        for row in range(res.ntuples):
            if self.stopping:
                return 0.0
            name, cron, tz, _, tick = (session.text(res, row, c) or "" for c in range(5))
            following = due_tick(name, cron, tz, datetime.fromisoformat(tick), now)
            if following is None:
                continue
            params = {"name": name, "tick": tick, "following": following.isoformat()}
            done = yield from self._statement(
                pgconn, "schedule_tick", params, "publish a schedule's tick"
            )
            if done.ntuples:  # else another scheduler published this tick
                self.ticks += 1
        res = yield from self._statement(pgconn, "schedules_next", {}, "run schedules")
        tick_in = session.text(res, 0, 0)
        waits = [self.config.max_wait]
        if event_in is not None:
            waits.append(event_in)
        if tick_in is not None:
            # Still due after ticking: skipped (an invalid cron), or another's: not a spin.
            waits.append(float(tick_in) if float(tick_in) > 0 else self.config.max_wait)
        return max(0.001, min(waits))

    def _statement(
        self, pgconn: Any, name: str, params: session.Params, doing: str
    ) -> Generator[Request, Any, Any]:
        if self.stopping:  # no new statement once stopped: each would get a grace of its own
            raise pgwire.Abandoned()
        deadline = time.monotonic() + self.config.statement_timeout
        self.statement = name
        try:
            return (
                yield from pgwire.until_stopped(
                    session.named(pgconn, name, params, deadline, doing=doing), self._stopped
                )
            )
        finally:
            self.statement = None


__all__ = ["SchedulerConfig", "SchedulerEngine", "due_tick"]
