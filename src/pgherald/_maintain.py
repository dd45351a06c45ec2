"""
The durable log's upkeep: retention (`set_retention`, `retention`, `maintain`) and its
partition count (`repartition`).

The log (``pgherald.events_v1``) is partitioned by day (UTC). `maintain` (``pgherald
maintain``, and consumers once per ``maintain_interval``) runs ``pgherald.maintain_v1()``:
it creates the partitions of the next days and, past the retention setting, drops whole days
(no row ``DELETE``: nothing to vacuum, no bloat). A day a consumer group has not consumed yet
is kept ("pinned") unless the group is abandoned: no live member and no acknowledgement for
``abandon_after``. Without a retention setting nothing is dropped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import psycopg

from . import _checks, _errormap
from ._protocol.channels import check_channel
from .errors import HeraldError, UsageError
from .sql import query

__all__ = [
    "Maintenance",
    "Retention",
    "maintain",
    "partition_count",
    "repartition",
    "retention",
    "set_retention",
]

DEFAULT_ABANDON_AFTER = timedelta(days=7)


@dataclass(frozen=True)
class Maintenance:
    """
    One thing `maintain` did or found: *action* is ``created`` (a partition for a coming
    day), ``dropped`` (a day past retention), ``deleted`` (old events of the default
    partition, or of a channel with a shorter retention), ``pinned`` (a day past retention
    kept: a group has not consumed it), ``kept`` (kept for a channel with a longer one),
    ``abandoned`` (a group that no longer holds back retention), ``idle`` (a group that will
    be abandoned: a warning), ``busy`` (a drop that could not get its lock in time: next run)
    or ``skipped`` (another maintain was running).

    .. versionadded:: 0.1
    """

    action: str
    target: str
    """The partition (``pgherald.events_v1_p20261206``) or the consumer group."""
    detail: str

    @property
    def warning(self) -> bool:
        """Whether an operator should look at it (pinned, abandoned, idle)."""
        return self.action in {"pinned", "abandoned", "idle"}


@dataclass(frozen=True)
class Retention:
    """The log's retention settings (see `set_retention`)."""

    keep: timedelta | None
    """How long events are kept; None: forever."""
    abandon_after: timedelta
    """A group with no member and no acknowledgement for this long no longer holds back
    retention."""
    channels: dict[str, timedelta] = field(default_factory=dict)
    """Channels with a retention of their own: longer ones keep the days that hold their
    younger events; shorter ones have their older events deleted by row."""


def set_retention(
    conn: psycopg.Connection[Any],
    keep: timedelta | None,
    *,
    channel: str | None = None,
    abandon_after: timedelta | None = None,
) -> None:
    """
    Keep events for *keep* (whole days are dropped, so an event may live up to a day longer),
    or forever (None). With *channel*, that channel's own retention (None: the log's again):
    longer than the log's, it keeps the days holding its younger events; shorter, its older
    events are deleted by row. *abandon_after*, when given, sets how long a group without
    members holds back retention (default 7 days). Takes effect at the next `maintain`.
    Each is a positive timedelta of at most 100 years (else `UsageError`).

    .. versionadded:: 0.1
    """
    _checks.age("keep", keep, none=True)
    _checks.age("abandon_after", abandon_after, none=True)
    setting = "retention" if channel is None else f"retention:{check_channel(channel)}"
    with _mapped("set the log's retention"), conn.transaction():
        if keep is None:
            conn.execute(query("retention_delete"), {"name": setting})
        else:
            conn.execute(query("retention_set"), {"name": setting, "value": keep})
        if abandon_after is not None:
            conn.execute(query("retention_set"), {"name": "abandon_after", "value": abandon_after})


def retention(conn: psycopg.Connection[Any]) -> Retention:
    """The log's retention settings.

    .. versionadded:: 0.1
    """
    with _mapped("read the log's retention"):
        rows = dict(conn.execute(query("retention_get")).fetchall())
    channels = {
        name.removeprefix("retention:"): keep
        for name, keep in sorted(rows.items())
        if name.startswith("retention:")
    }
    return Retention(
        rows.get("retention"), rows.get("abandon_after") or DEFAULT_ABANDON_AFTER, channels
    )


def maintain(conn: psycopg.Connection[Any], *, now: datetime | None = None) -> list[Maintenance]:
    """
    Create the log's coming days' partitions and drop the days past retention (see the module
    docstring); returns what it did and found. Safe to run at any time, from anywhere: one
    run at a time (another returns ``skipped``). *now* (for tests and backfills) stands for
    the current time.

    .. versionadded:: 0.1
    """
    try:
        with _mapped("maintain the log"), conn.transaction():
            rows = conn.execute(query("maintain"), {"now": now}).fetchall()
    except HeraldError as exc:
        if isinstance(exc.__cause__, psycopg.errors.DatetimeFieldOverflow):
            raise _too_long(conn) from None
        raise
    return [Maintenance(*row) for row in rows]


def _too_long(conn: psycopg.Connection[Any]) -> UsageError:
    """Why `maintain` met a date before PostgreSQL's first: a setting stored before they were
    checked (past `_checks.MAX_AGE`, ``now() - keep`` is out of range)."""
    try:
        r = retention(conn)
        found = [("retention", r.keep), ("abandon_after", r.abandon_after)] + [
            (f"retention of {channel!r}", keep) for channel, keep in r.channels.items()
        ]
        named = ", ".join(
            f"{name} ({value.days:,} days)"
            for name, value in found
            if value and value > _checks.MAX_AGE
        )
    except HeraldError:
        named = ""
    return UsageError(
        f"cannot maintain the log: {named or 'a retention setting'} reaches back before "
        f"PostgreSQL's first date (at most {_checks.MAX_AGE_TEXT}): set it again with "
        "`pgherald retention set`, such as `pgherald retention set 30d --abandon-after 7d` "
        "(`--channel CH` for a channel's; set_retention in Python)"
    )


def partition_count(conn: psycopg.Connection[Any]) -> int:
    """How many partitions the log has: a consumer group has up to that many members at work.

    .. versionadded:: 0.1
    """
    with _mapped("read the log's partition count"):
        row = conn.execute(query("partition_count")).fetchone()
    return int(row[0]) if row else 16


def repartition(conn: psycopg.Connection[Any], count: int) -> int:
    """
    Spread the log over *count* partitions (1 to 256) from now on; returns the count before.

    Rewrites the log in one transaction (publishers wait until it commits) and needs every
    consumer stopped: `UsageError` while one runs. Each group's position in a channel becomes
    the earliest of its old partitions': events already handled in some partition but not in
    another may be delivered again; none is skipped.

    .. versionadded:: 0.1
    """
    from ._schema import _check_partitions

    _check_partitions(count)
    try:
        with _mapped("repartition the log"), conn.transaction():
            row = conn.execute(query("repartition"), {"count": count}).fetchone()
    except HeraldError as exc:
        if isinstance(exc.__cause__, psycopg.errors.LockNotAvailable):
            raise UsageError(
                "cannot repartition the log while consumers run (their groups are locked): "
                "stop every consumer first, then run this again"
            ) from None
        raise
    assert row is not None
    return int(row[0])


@contextlib.contextmanager
def _mapped(doing: str) -> Iterator[None]:
    try:
        yield
    except psycopg.Error as exc:
        raise _errormap.from_driver(exc, doing=doing) from exc
