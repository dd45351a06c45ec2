"""
Reading the durable log from a position: the engine of `read_log` / `aread_log` and of the
gateway's log tail and ``Last-Event-ID`` replay (sans-I/O: one generator, any runtime).

The log's order is (tx, id): the writing transaction's id, then the event id. A read returns
only events of transactions older than every transaction still running (the snapshot's xmin,
the *horizon*), so nothing that commits later can ever sort before what was returned: reading
on from the last event returned misses nothing. The query reads each of the 16 partitions of
each channel over the read index (see ``read_log`` in ``queries.sql``): a read that finds
nothing costs 16 short index probes per channel, however long the log, and other channels'
events cost nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, NamedTuple

from psycopg import pq

from .._models import Event
from . import session
from .channels import text_array
from .pgwire import Request

Position = tuple[int, int]
"""A place in the log: (transaction id, event id); events after it sort above it."""

START: Position = (0, 0)

DOING = "read the log"

_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)  # PostgreSQL's binary timestamp origin
_INFINITY = 2**63 - 1

# Columns of read_log (binary results).
_HORIZON, _ID, _TX, _CHANNEL, _KEY, _PAYLOAD, _HEADERS, _CREATED, _PARTITION = range(9)


class LogQuery(NamedTuple):
    """What to read: after a position or after an event, up to a position, which channels."""

    after: Position | int
    """A position, or an event id (0: the start of the log): events after it are read."""
    limit: int
    channels: Sequence[str] | None = None
    """None: every channel."""
    upto: Position | None = None
    """Read nothing after this position (inclusive bound); None: no bound."""


class LogRead(NamedTuple):
    """One read's answer (the results of its statements); decode it with `events` or
    `frame_rows`."""

    parts: tuple[tuple[pq.abc.PGresult, int], ...]
    """Results, each with how many of its first rows are events of the answer."""
    n: int
    """Events in all (fewer than the limit: everything before ``(horizon, 0)`` was read)."""
    horizon: int
    """The snapshot's xmin: every transaction before it had ended when the read ran."""
    found: bool
    """False when `LogQuery.after` is an event id the log lacks (never stored, or pruned)."""


NOT_FOUND = LogRead((), 0, 0, False)

PARTITIONS = 16


def read(
    pgconn: pq.abc.PGconn, query: LogQuery, deadline: float
) -> Generator[Request, bool, LogRead]:
    """
    Read up to `LogQuery.limit` events on *pgconn* (idle); errors as `session.named` raises
    them. After an event id, its position is looked up first, in a statement of its own: the
    read then names its position as values, which the planner can estimate (see ``read_log``).

    Each (channel, partition) range gives at most a share of the limit (about twice its even
    part), so that a read of a long backlog does not fetch many times what it returns. A range
    that gives its whole share may have more that sorts before other ranges' later events: the
    answer stops at the earliest last event of such ranges (everything up to there is
    complete) and the read goes on from there, with twice the share, until it has `limit`
    events or no range was cut.
    """
    after = query.after
    if isinstance(after, tuple):
        position = after
    elif after == 0:
        position = START
    else:
        found = yield from session.named(
            pgconn, "event_position", {"id": str(after)}, deadline, doing=DOING
        )
        if not found.ntuples:
            return NOT_FOUND
        position = (int(session.text(found, 0, 0) or "0"), after)
    upto = query.upto
    params = {
        "upto_tx": None if upto is None else str(upto[0]),
        "upto_id": None if upto is None else str(upto[1]),
        "channels": None if query.channels is None else text_array(query.channels),
    }
    remaining = query.limit
    ranges = PARTITIONS * (len(query.channels) if query.channels else 1)
    share = -(-2 * remaining // ranges)
    parts: list[tuple[pq.abc.PGresult, int]] = []
    while True:
        k = min(share, remaining)
        params |= {
            "after_tx": str(position[0]),
            "after_id": str(position[1]),
            "per_partition": str(k),
            "limit": str(remaining),
        }
        res = yield from session.named(
            pgconn, "read_log", params, deadline, doing=DOING, binary=True
        )
        horizon = int(res.get_value(0, _HORIZON) or b"0")
        n, cut = _complete(res, k)
        if n:
            parts.append((res, n))
            remaining -= n
            position = _position(res, n - 1)
        if not cut or not remaining:
            return LogRead(tuple(parts), query.limit - remaining, horizon, True)
        share *= 2  # events are not spread evenly: the next read asks more of each range


def _complete(res: pq.abc.PGresult, k: int) -> tuple[int, bool]:
    """
    How many of the first rows of *res* are certainly the log's next events, and whether a
    (channel, partition) range was cut (gave its whole share *k*, so may have more).
    """
    get = res.get_value
    n = res.ntuples
    if n == 1 and get(0, _ID) is None:
        return 0, False
    counts: dict[tuple[bytes | None, bytes | None], int] = {}
    last: dict[tuple[bytes | None, bytes | None], int] = {}
    for i in range(n):
        p = (get(i, _CHANNEL), get(i, _PARTITION))
        counts[p] = counts.get(p, 0) + 1
        last[p] = i
    full = [last[p] for p, c in counts.items() if c >= k]
    if not full:
        return n, False
    return min(full) + 1, True  # rows are in log order: a prefix is complete


def _position(res: pq.abc.PGresult, i: int) -> Position:
    return int(res.get_value(i, _TX) or b"0"), _int(res.get_value(i, _ID))


def events(read: LogRead, loads: Callable[[str], Any] = json.loads) -> list[Event]:
    """The events of a read, payloads and headers decoded by *loads*."""
    if not read.n:
        return []
    rows = [(res.get_value, i) for res, n in read.parts for i in range(n)]
    # One parse for the whole batch: payloads are jsonb as text, always valid JSON, so they
    # join into one array (per call, json.loads costs more than the parsing itself).
    payloads = loads("[" + ",".join([_str(get(i, _PAYLOAD)) for get, i in rows]) + "]")
    out = []
    for (get, i), payload in zip(rows, payloads, strict=True):
        key = get(i, _KEY)
        headers = get(i, _HEADERS)
        out.append(
            Event(
                _int(get(i, _ID)),
                _str(get(i, _CHANNEL)),
                payload,
                None if key is None else key.decode(),
                None if headers is None else loads(headers.decode()),
                _timestamp(get(i, _CREATED)),
                _int(get(i, _PARTITION)),
                _str(get(i, _TX)),
            )
        )
    return out


def frame_rows(read: LogRead) -> list[tuple[int, int, str, str]]:
    """``(tx, id, channel, payload as JSON text)`` per event: what the gateway sends."""
    return [
        (
            int(get(i, _TX) or b"0"),
            _int(get(i, _ID)),
            _str(get(i, _CHANNEL)),
            _str(get(i, _PAYLOAD)),
        )
        for res, n in read.parts
        for get in (res.get_value,)
        for i in range(n)
    ]


def next_position(read: LogRead, limit: int, current: Position) -> Position:
    """
    Where the next read of a tail starts: after the last event when the read was full (more
    may wait), else ``(horizon, 0)``: everything before it was read, so events of other
    channels, which the filter skipped, are not scanned again.
    """
    last = current
    if read.n:  # (parts hold events only: none is empty)
        res, n = read.parts[-1]
        last = _position(res, n - 1)
    if read.n >= limit:
        return last
    return max(last, (read.horizon, 0))


def _int(value: bytes | None) -> int:
    return int.from_bytes(value or b"", "big", signed=True)


def _str(value: bytes | None) -> str:
    return "" if value is None else value.decode()


def _timestamp(value: bytes | None) -> datetime:
    micros = _int(value)
    if micros >= _INFINITY:
        return datetime.max.replace(tzinfo=timezone.utc)
    if micros <= -_INFINITY - 1:
        return datetime.min.replace(tzinfo=timezone.utc)
    return _EPOCH + timedelta(microseconds=micros)
