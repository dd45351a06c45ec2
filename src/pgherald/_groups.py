"""
Consumer groups as an operator sees them: `list_groups`, `reset_group`, `delete_group`.

A group is its rows in ``pgherald.positions_v2``: one per channel it reads and partition, and
its start (channel '') per partition. Its live members are
the sessions holding its advisory locks (see `_protocol.consumer`): nothing else records
them, so ``pg_locks`` is the truth and a crashed consumer drops out with its session.

Relays (`pgherald.Relay`) are consumer groups too; each running relay also keeps a row in
``pgherald.settings_v1`` (``relay:...``, written by its consumer between reads every
``stats_interval``) with its rate and lag, listed as `GroupInfo.relays`.

Lag is counted from each group's position along the read index, at most `SCAN` events per
channel and partition (fewer with many groups: `SCAN_BUDGET`): exact below that, above it
estimated from the ids the first events span, so that listing groups costs the same at any lag
(``status`` answers in well under a second with a group millions of events behind). Only the
group's own channels are scanned: other channels' events cost nothing.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg

from . import _checks, _errormap, sql
from ._protocol.consumer import Start, lock_name
from .errors import UsageError

__all__ = [
    "GroupInfo",
    "GroupMember",
    "RelayInfo",
    "abandoned_groups",
    "delete_group",
    "list_groups",
    "log_size",
    "reset_group",
]

SCAN = 1000
"""Events counted one by one per (group, channel, partition); past that the lag is estimated."""

SCAN_BUDGET = 200_000
"""Events counted one by one in all, at most: with many groups, each gets fewer (down to 100)."""

LEAVING = "1s"
"""How long a reset or delete waits for members to go: a consumer that has just closed its
connection holds its locks until the server has ended its session."""

STALE_AFTER = 3
"""A relay's row older than this many of its ``stats_interval`` (plus `STALE_SLACK`) is stale:
not `RelayInfo.live`."""

STALE_SLACK = 2.0
"""Seconds a relay's report may come late (a busy machine, a slow statement) and still count."""

EXACT_LOG_SIZE = 100_000
"""Events counted one by one for the log's size; past that, estimated."""


@dataclass(frozen=True)
class GroupMember:
    """
    A live consumer of a group: one database session.

    *application_name* and *client_addr* are None when this role may not see that session
    (``pg_stat_activity`` hides other roles' details from non-superusers), and *client_addr*
    is None for a Unix-socket connection too.

    .. versionadded:: 0.1
    """

    pid: int
    partitions: tuple[int, ...]
    """Partitions this member holds now (rebalanced every ``rebalance_interval``)."""
    application_name: str | None = None
    client_addr: str | None = None
    connected_at: datetime | None = None


@dataclass(frozen=True)
class RelayInfo:
    """
    A relay of a group, as it last reported itself (every ``stats_interval``, 10 s by default):
    its throughput and lag, for ``pgherald status``.

    *live* is false for a relay that has stopped reporting (three intervals and 2 s without a
    report) or whose database session is no longer a member of the group: one killed without a
    chance to remove its row. Such rows go after an hour (the next report of any relay removes
    them).

    .. versionadded:: 0.1
    """

    group: str
    target: str
    """Where it relays to (the URL without a password)."""
    host: str
    pid: int
    """The relay's process id on *host*."""
    rate: float
    """Events per second relayed over its last interval (0: caught up, or stuck)."""
    lag_seconds: float
    """Age of the last event it relayed, when it was acknowledged (0: caught up)."""
    relayed: int
    """Events relayed since it started."""
    dead_lettered: int
    retries: int
    partitions: int
    """Log partitions it held."""
    channels: tuple[str, ...]
    backend_pid: int | None
    """Its consumer's server process (see `GroupMember.pid`)."""
    started_at: datetime
    reported_at: datetime
    """When it wrote these numbers (the server's clock)."""
    interval: float
    """Its ``stats_interval``: seconds between reports."""
    live: bool


@dataclass(frozen=True)
class GroupInfo:
    """
    A consumer group: who consumes it, how far behind it is, when it last moved.

    *lag_events* counts the events after the group's position on the channels it reads (or
    only *channels*, when `list_groups` was given some): positions are per channel, so other
    channels' events never count. When *lag_estimated* is true, *lag_events* and
    *lag_by_channel* are estimates (a group far behind is not counted event by event).

    .. versionadded:: 0.1
    """

    name: str
    members: tuple[GroupMember, ...]
    lag_events: int
    lag_estimated: bool
    lag_by_channel: dict[str, int] = field(hash=False)
    """Lag per channel, largest first (estimated with *lag_estimated*)."""
    lag_seconds: float
    """Age of the oldest event the group has not consumed (0.0 when caught up)."""
    last_activity: datetime
    """The group's last acknowledgement (or its creation or reset)."""
    position: int
    """The highest event id the group has passed, in any partition."""
    relays: tuple[RelayInfo, ...] = ()
    """The group's relays (live and stale, by target, host and pid): empty for a group that no
    `Relay` consumes."""


def list_groups(
    conn: psycopg.Connection[Any],
    *,
    channels: Iterable[str] | None = None,
    groups: Iterable[str] | None = None,
) -> list[GroupInfo]:
    """
    Every consumer group (or those named in *groups*), by name: live members with the
    partitions they hold, lag (on *channels* only, when given), last activity, and the relays
    that consume it with their rate (`GroupInfo.relays`).

    Cost is bounded whatever the lag (see `GroupInfo.lag_estimated`). Reads only: in a
    caller's transaction it leaves nothing behind.

    .. versionadded:: 0.1
    """
    with _mapped("list consumer groups"):
        return _list_groups(conn, channels, groups)


def _list_groups(
    conn: psycopg.Connection[Any], channels: Iterable[str] | None, groups: Iterable[str] | None
) -> list[GroupInfo]:
    wanted = None if groups is None else list(groups)
    only = None if channels is None else set(channels)
    params = {"groups": wanted}
    activity = conn.execute(sql.query("group_activity"), params).fetchall()
    if not activity:
        return []
    sessions = conn.execute(sql.query("group_sessions")).fetchall()
    relay_rows = conn.execute(sql.query("relay_rows")).fetchall()
    heads = {(c, p): head for c, p, head in conn.execute(sql.query("partition_heads"))}
    with conn.transaction():
        conn.execute(sql.query("plan_group_lag"))
        scan = max(100, min(SCAN, SCAN_BUDGET // max(1, len(activity) * len(heads))))
        lag_rows = conn.execute(sql.query("group_lag"), {**params, "scan": scan}).fetchall()
        raise psycopg.Rollback  # undoes the planner settings, in a caller's transaction too

    lags: dict[str, _Lag] = {}
    for group, channel, partition, n, lo, hi, oldest in lag_rows:
        lag = lags.setdefault(group, _Lag())
        if only is not None and channel not in only:
            continue
        if n < scan:  # the range's whole lag was read
            count, estimated = float(n), False
        else:
            head = max(hi, heads.get((channel, partition)) or hi)
            # The range's events after the position, at the density of its first ones.
            count, estimated = n * (head - lo + 1) / (hi - lo + 1), True
        lag.add(channel, count, estimated, oldest)

    out = []
    now = activity[0][3]
    for group, last_activity, position, _ in activity:
        lag = lags.get(group, _Lag())
        by_channel = {
            ch: round(v) for ch, v in sorted(lag.by_channel.items(), key=lambda kv: (-kv[1], kv[0]))
        }
        out.append(
            GroupInfo(
                name=group,
                members=_members(group, sessions),
                lag_events=round(sum(lag.by_channel.values())),
                lag_estimated=lag.estimated,
                lag_by_channel=by_channel,
                lag_seconds=max(0.0, (now - lag.oldest).total_seconds()) if lag.oldest else 0.0,
                last_activity=last_activity,
                position=int(position),
                relays=_relays(group, relay_rows, sessions),
            )
        )
    return out


def _relays(group: str, rows: Sequence[Any], sessions: Sequence[Any]) -> tuple[RelayInfo, ...]:
    """*group*'s relays from their status rows (text of JSON objects; see ``status_row_set``)."""
    members = {pid for g, pid, _, member, *_ in sessions if g == group and member}
    out = []
    for value, now in rows:
        try:
            r = json.loads(value)
            if r.get("group") != group:
                continue
            interval, at = float(r["interval"]), float(r["at"])
            backend = r.get("backend_pid")
            info = RelayInfo(
                group=group,
                target=str(r["target"]),
                host=str(r["host"]),
                pid=int(r["pid"]),
                rate=float(r["rate"]),
                lag_seconds=float(r["lag_seconds"]),
                relayed=int(r["relayed"]),
                dead_lettered=int(r.get("dead_lettered", 0)),
                retries=int(r.get("retries", 0)),
                partitions=int(r.get("partitions", 0)),
                channels=tuple(r.get("channels", ())),
                backend_pid=None if backend is None else int(backend),
                started_at=datetime.fromtimestamp(float(r["started_at"]), timezone.utc),
                reported_at=datetime.fromtimestamp(at, timezone.utc),
                interval=interval,
                live=now - at <= STALE_AFTER * interval + STALE_SLACK
                and (backend is None or backend in members),
            )
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError):
            continue  # not a row a relay wrote: nothing to show
        if math.isfinite(info.rate):
            out.append(info)
    return tuple(sorted(out, key=lambda i: (not i.live, i.target, i.host, i.pid)))


class _Lag:
    def __init__(self) -> None:
        self.by_channel: dict[str, float] = {}
        self.estimated = False
        self.oldest: datetime | None = None

    def add(self, channel: str, count: float, estimated: bool, oldest: datetime) -> None:
        self.by_channel[channel] = self.by_channel.get(channel, 0.0) + count
        self.estimated |= estimated
        if self.oldest is None or oldest < self.oldest:
            self.oldest = oldest


def _members(group: str, sessions: Sequence[Any]) -> tuple[GroupMember, ...]:
    found: dict[int, tuple[bool, list[int], Any]] = {}
    for g, pid, key2, member, app, addr, started in sessions:
        if g != group:
            continue
        is_member, held, _ = found.get(pid, (False, [], None))
        if not member and key2 != 1000:  # a partition (1000: a reset or delete running)
            held.append(key2)
        found[pid] = (is_member or member, held, (app, addr, started))
    return tuple(
        GroupMember(pid, tuple(sorted(held)), *info)
        for pid, (is_member, held, info) in sorted(found.items())
        if is_member
    )


def reset_group(conn: psycopg.Connection[Any], group: str, *, to: Start = "beginning") -> None:
    """
    Move *group* to *to* in every partition, as a new group with ``start=to`` would begin:
    ``"beginning"``, ``"now"``, an event id (that event is delivered again, and what follows)
    or a datetime (the first event stored at or after it).

    Refuses (`UsageError`) while the group has a live member, whose acknowledgements would
    overwrite the reset, and when no such group exists. Consumers cannot join while it runs.
    Done when this returns on an autocommit connection; else when the caller commits (until
    then, consumers of the group wait to join).

    .. versionadded:: 0.1
    """
    _checks.group(group)
    with _mapped(f"reset consumer group {group!r}"), conn.transaction():
        _lock_out(conn, group, "reset")
        tx, event_id, skip = _start_position(conn, to)
        conn.execute(
            sql.query("reset_group"),
            {"group": group, "tx": tx, "event_id": event_id, "skip": skip},
        )


def delete_group(conn: psycopg.Connection[Any], group: str) -> None:
    """
    Delete *group*'s positions: it no longer holds back ``prune``. A consumer that joins the
    group later starts it again at its ``start``.

    Refuses (`UsageError`) while the group has a live member, and when no such group exists.
    Committed as `reset_group` is.

    .. versionadded:: 0.1
    """
    _checks.group(group)
    with _mapped(f"delete consumer group {group!r}"), conn.transaction():
        _lock_out(conn, group, "delete")
        conn.execute(sql.query("delete_group"), {"group": group})


def _lock_out(conn: psycopg.Connection[Any], group: str, doing: str) -> None:
    """In a transaction: no member connected now, none can join until it ends."""
    if not _scalar(conn, "group_exists", {"group": group}):
        known = [r[0] for r in conn.execute(sql.query("group_activity"), {"groups": None})]
        raise UsageError(
            f"no consumer group {group!r} to {doing}: "
            + (f"the groups are {', '.join(map(repr, known))}" if known else "there is none yet")
            + " (see `pgherald groups`)"
        )
    try:
        with conn.transaction():  # a savepoint: what a lock timeout rolls back
            old = _scalar(conn, "set_lock_timeout", {"timeout": LEAVING})
            conn.execute(sql.query("lock_out_group"), {"lock_name": lock_name(group)})
            conn.execute(sql.query("set_lock_timeout"), {"timeout": old})
    except psycopg.errors.LockNotAvailable:
        pids = [
            m.pid for m in _members(group, conn.execute(sql.query("group_sessions")).fetchall())
        ]
        raise UsageError(
            f"cannot {doing} consumer group {group!r} while it has live members "
            f"(server pids {', '.join(map(str, pids)) or 'unknown'}): their acknowledgements "
            "would undo it; stop its consumers first, then run this again"
        ) from None


def _start_position(conn: psycopg.Connection[Any], start: Start) -> tuple[str, int, str | None]:
    """(tx, event id, snapshot to skip): the same rules as a consumer's ``start``."""
    if start == "beginning":
        return "0", 0, None
    if start == "now":
        row = conn.execute(sql.query("position_now")).fetchone()
    elif isinstance(start, int) and not isinstance(start, bool):
        row = conn.execute(sql.query("position_before_id"), {"id": start}).fetchone()
        if row is None:
            raise UsageError(f"no event with id {start} in the log: reset to another one")
    elif isinstance(start, datetime):
        if start.tzinfo is None:
            raise UsageError(f"reset to a datetime with a time zone, not the naive {start}")
        row = conn.execute(sql.query("position_before_time"), {"at": start}).fetchone()
        if row is None:  # nothing that recent: the end
            row = conn.execute(sql.query("position_now")).fetchone()
    else:
        raise UsageError(f"reset to 'beginning', 'now', an event id or a datetime, not {start!r}")
    assert row is not None
    return str(row[0]), int(row[1] or 0), (row[2] if len(row) > 2 else None)


def abandoned_groups(conn: psycopg.Connection[Any], idle: timedelta) -> list[tuple[str, datetime]]:
    """(group, last activity) of every group with no live member and no activity for *idle*."""
    return [(g, at) for g, at in conn.execute(sql.query("abandoned_groups"), {"idle": idle})]


def log_size(conn: psycopg.Connection[Any]) -> tuple[float, int, bool, int | None]:
    """(NOTIFY queue usage, events stored, whether that is an estimate, last event id)."""
    row = conn.execute(sql.query("log_size"), {"exact": EXACT_LOG_SIZE}).fetchone()
    assert row is not None
    usage, counted, stats, last_id, first_id = row
    if counted <= EXACT_LOG_SIZE:
        return usage, int(counted), False, last_id
    span = last_id - first_id + 1
    estimate = span if stats is None else min(span, stats)
    return usage, max(int(estimate), EXACT_LOG_SIZE), True, last_id


@contextlib.contextmanager
def _mapped(doing: str) -> Iterator[None]:
    """Driver errors as the `HeraldError` that names the fix (SchemaMissing, PrivilegeError...)."""
    try:
        yield
    except psycopg.Error as exc:
        raise _errormap.from_driver(exc, doing=doing) from exc


def _scalar(conn: psycopg.Connection[Any], name: str, params: dict[str, Any]) -> Any:
    row = conn.execute(sql.query(name), params).fetchone()
    return None if row is None else row[0]
