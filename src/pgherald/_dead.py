"""
Dead letters: the events a consumer group gave up on, and what to do with them.

A consumer writes a dead letter when an event cannot be decoded, or when a handler failed on
it ``max_attempts`` times, and moves on (see ``_protocol/consumer.py``). The event stays in the
log; the dead letter refers to it by id. `redeliver` marks dead letters for the group's
consumers, which hand those events out again before their next read and delete each dead letter
once it is handled; `purge_dead_letters` deletes them for good.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from . import _checks, _errormap
from .sql import query


@dataclass(frozen=True)
class DeadLetter:
    """An event a consumer group gave up on (a row of ``pgherald.dead_letters_v1``)."""

    group: str
    event_id: int
    channel: str
    partition: int
    tx: str
    """The writing transaction's id: with `event_id`, the event's place in the group's order."""
    error: str
    """Why: the last handler error, or why the event could not be decoded."""
    attempts: int
    """Handler attempts in all (redeliveries included); 1 for an event not decodable."""
    first_failed_at: datetime
    last_failed_at: datetime
    dead_at: datetime
    """When it was (last) given up."""
    redeliver_at: datetime | None
    """When a redelivery was asked for, while it is pending; None otherwise."""
    redeliveries: int
    """Redeliveries asked for so far."""
    key: str | None
    created_at: datetime | None
    """When the event was published; None when it is no longer in the log."""
    in_log: bool
    """False once retention removed the event: it can no longer be redelivered."""


def dead_letters(
    conn: psycopg.Connection[Any],
    group: str | None = None,
    *,
    ids: Iterable[int] | None = None,
    limit: int = 1000,
) -> list[DeadLetter]:
    """
    Dead letters of *group* (every group: None), oldest first in each group's order, at most
    *limit*; only those of events *ids* when given.

    .. versionadded:: 0.1
    """
    if group is not None:
        _checks.group(group)
    _checks.integer("limit", limit, low=1, high=_checks.INT8_MAX)
    params = {"group": group, "ids": _checks.ids(ids), "limit": limit}
    with _errors("list dead letters"):
        rows = conn.execute(query("dead_letters"), params).fetchall()
    return [DeadLetter(*row) for row in rows]


def redeliver(
    conn: psycopg.Connection[Any], group: str, ids: Iterable[int] | None = None
) -> list[int]:
    """
    Ask *group*'s consumers to handle dead letters *ids* (None: all of the group's) once more;
    return the ids queued.

    The consumer holding an event's partition hands it out again within its
    ``rebalance_interval`` (1 s), before its next read, in the group's order, and deletes the
    dead letter once its handlers succeed (transactional handlers: in their transaction). If
    they fail ``max_attempts`` times again, the dead letter comes back with the attempts added.
    Events no longer in the log, and redeliveries already pending, are left out. Runs in the
    caller's transaction (commit it, unless *conn* is in autocommit mode).

    .. versionadded:: 0.1
    """
    _checks.group(group)
    with _errors("redeliver dead letters"):
        rows = conn.execute(
            query("redeliver_dead_letters"), {"group": group, "ids": _checks.ids(ids)}
        ).fetchall()
    return sorted(r[0] for r in rows)


def purge_dead_letters(
    conn: psycopg.Connection[Any], group: str, ids: Iterable[int] | None = None
) -> int:
    """
    Delete dead letters *ids* of *group* (None: all of the group's) for good; return how many.
    The events stay in the log (retention removes them). Runs in the caller's transaction.

    .. versionadded:: 0.1
    """
    _checks.group(group)
    with _errors("purge dead letters"):
        rows = conn.execute(
            query("purge_dead_letters"), {"group": group, "ids": _checks.ids(ids)}
        ).fetchall()
    return len(rows)


def dead_letter_counts(conn: psycopg.Connection[Any]) -> dict[str, tuple[int, int]]:
    """Per group: (dead letters, of which redeliveries pending); for `pgherald status`."""
    with _errors("count dead letters"):
        rows = conn.execute(query("dead_letter_counts")).fetchall()
    return {g: (int(n), int(pending)) for g, n, pending in rows}


def dead_event_text(conn: psycopg.Connection[Any], event_id: int) -> tuple[str, str | None] | None:
    """The event behind a dead letter as stored (payload, headers) JSON text, or None if gone."""
    with _errors("read a dead letter's event"):
        row = conn.execute(query("dead_letter_event"), {"id": event_id}).fetchone()
    return None if row is None else (row[0], row[1])


class _errors:
    """Driver errors as the HeraldError that names the fix (schema missing, privileges...)."""

    def __init__(self, doing: str) -> None:
        self.doing = doing

    def __enter__(self) -> None:
        return None

    def __exit__(self, t: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc is not None and _errormap.is_driver_error(exc):
            raise _errormap.from_driver(exc, doing=self.doing) from exc
