"""
When a consumer moves due delayed events into the log (no I/O: the consumer engine runs the
statement, ``queries.sql`` release_scheduled, and hands its answer to `Releases`).

A delayed event waits in ``pgherald.scheduled_v1``, never in the log: a group's position passes
every transaction older than every running one, so an event stored before it is due would be
skipped. Every running consumer releases due events (the statement takes each one exactly once,
whoever runs it): it learns when the next one is due from the statement's answer and from the
'scheduled' wake-up that `publish(..., deliver_at=...)` sends, and caps its idle wait there.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from ..errors import UsageError

WAKE_PAYLOAD = b"scheduled"
"""The payload of the wake-up sent with a delayed event (and by `schedule add`)."""

RELEASE_LIMIT = 1000
"""Events moved per statement; a full batch means more are due: release again at once."""

RESCAN = 5.0
"""Seconds between checks when no delayed event is known: catches a wake-up missed (while
reconnecting, or not sent because the NOTIFY queue was half full)."""

EARLY = 0.001
"""Waking this much late: the server's clock, not ours, says what is due (never spin early)."""

CHASE = (0.002, 0.25)
"""After a release, until the log's read horizon passes it (a transaction older than the
release, anywhere on the server, holds it back), check again after this delay, doubling."""

BUSY = (0.002, 0.25)
"""Another releaser holds the release lock (one at a time: see queries.sql release_scheduled):
try again after this delay, doubling while it lasts (a caller's open transaction may hold it)."""


def locked_out(released: int, next_in: float | None) -> bool:
    """The release statement's answer when another releaser was at work: none moved, next due
    at once (a releaser that held the lock moved every due event, or a full batch)."""
    return released == 0 and next_in is not None and next_in <= 0


class Busy:
    """The delay before trying again while the release lock is taken (doubling)."""

    def __init__(self) -> None:
        self.delay = BUSY[0]

    def next(self, locked: bool) -> float | None:
        """The delay to wait (None: not locked out, and the delay starts afresh)."""
        if not locked:
            self.delay = BUSY[0]
            return None
        delay, self.delay = self.delay, min(BUSY[1], self.delay * 2)
        return delay


class Releases:
    """When to run the release statement next."""

    def __init__(self) -> None:
        self.chasing: int | None = None  # the id of our release transaction not yet readable
        self.chase = CHASE[0]
        self.busy = Busy()

    def next(self, now: float, row: list[bytes | None]) -> float:
        """The monotonic time of the next release, from the release statement's answer
        (released, seconds to the next due or NULL, its transaction id, the read horizon)."""
        released = int(row[0] or b"0")
        next_in = None if row[1] is None else float(row[1])
        horizon = int(row[3] or b"0")
        if self.chasing is not None and horizon > self.chasing:
            self.chasing = None  # the reads now see what we released
        if released:
            self.chasing, self.chase = int(row[2] or b"0"), CHASE[0]
        if released >= RELEASE_LIMIT:
            return now
        busy = self.busy.next(locked_out(released, next_in))
        if busy is not None:
            at = now + busy
        else:
            at = now + RESCAN if next_in is None else now + min(RESCAN, max(0.0, next_in) + EARLY)
        if self.chasing is not None:  # the next turn's read may then see the events
            at = min(at, now + self.chase)
            self.chase = min(CHASE[1], self.chase * 2)
        return at


# -- cron: when a periodic schedule ticks (the 'schedule' extra: cronsim) --


def require_cronsim() -> Any:
    try:
        import cronsim
    except ImportError:
        raise UsageError(
            "cron schedules need the 'schedule' extra (cronsim is not installed): "
            "pip install 'pgherald[schedule]'"
        ) from None
    return cronsim


def zone(name: str) -> Any:
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
    cronsim = require_cronsim()
    if not isinstance(cron, str):
        raise UsageError(f"cron must be a str such as '*/5 * * * *', not {type(cron).__name__}")
    fields = len(cron.split())
    if fields != 5:  # cronsim reads a sixth field as seconds: a tick every second
        raise UsageError(
            f"invalid cron expression {cron!r} ({fields} field{'' if fields == 1 else 's'}): "
            "use five fields, minute hour day-of-month month day-of-week, such as "
            "'*/5 * * * *' (every five minutes); there is no seconds field"
        )
    start = after.astimezone(zone(tz))
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
