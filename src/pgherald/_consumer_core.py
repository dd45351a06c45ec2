"""
The blocking core of a durable consumer: one connection, its partition locks, reads and acks.

A core is confined to one thread at a time. `Consumer` drives it directly; `AsyncConsumer`
runs its short queries in a worker thread and does all waiting on the event loop. Waiting itself
is not done here: the runtimes wait on `socket` (wake-ups) with their own timeouts.

Consumer groups: the log has 16 fixed partitions; a consumer owns a partition while it holds a
session advisory lock on (group, partition), on this very connection. Membership is a shared
advisory lock, so the number of live members is read from ``pg_locks`` and a dead consumer's
locks vanish with its session: the others take its partitions at their next rebalance.

Read-ahead: while the caller decodes and handles a large batch, the server already runs the
read of the next one (sent with libpq's asynchronous API on the same connection, after the last
event handed out in each partition: our cursor). The group's stored position still moves only
with `ack`. Whatever could make the cursor wrong drops it, with any read in flight, so that the
next read starts from the stored positions again: events handed out but not all acknowledged,
a change of the partitions held, a reconnect.

Read size: a read asks for `batch_size` events. While reads come back full (the consumer is
behind), each next read asks for twice as many, up to `max_batch_size`, so that a backlog is read
in large reads and their fixed costs (a round trip, the query's start, an ack) are shared by many
events; a read that is not full (caught up) brings it back to `batch_size`. The price: the events
handed out but not yet acknowledged, which a crash delivers again, are up to one read.
"""

from __future__ import annotations

import json
import logging
import math
import re
import select
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, NamedTuple

import psycopg
from psycopg import abc, pq
from psycopg import sql as psql
from psycopg.adapt import Transformer

from . import sql
from ._conninfo import connect_error
from ._schema import MISSING
from .errors import SchemaMissing, UsageError

logger = logging.getLogger("pgherald.consumer")

PARTITIONS = 16
DEFAULT_MAX_BATCH_SIZE = 20_000
MEMBERSHIP = 1000  # second key of the shared membership lock (partitions use 0..15)
WAKE_CHANNEL = "pgherald_wake_v1"
READ_STATEMENT = b"pgherald_read_batch_v1"  # prepared on each consumer connection

Start = str | int | datetime


class Event(NamedTuple):
    """An event read from the durable log (a small immutable value, like `Notification`)."""

    id: int
    """Its id (ascending with insertion, not with commit order)."""
    channel: str
    payload: Any
    """The JSON value published, decoded."""
    key: str | None
    headers: dict[str, Any] | None
    created_at: datetime
    """When the publishing transaction started."""
    partition: int
    tx: str
    """The publishing transaction's id (``xid8``, as text): with `id`, the log position."""


class _Read(NamedTuple):
    """A read sent: how many rows it asked for in all, and per partition."""

    limit: int
    share: int


class CoreLost(Exception):
    """The consumer's connection failed (internal: the runtime reconnects)."""


def lock_name(group: str) -> str:
    return f"pgherald.group:{group}"


class ConsumerCore:
    def __init__(
        self,
        conninfo: str,
        *,
        group: str,
        start: Start = "beginning",
        reset: bool = False,
        batch_size: int = 1000,
        max_batch_size: int | None = None,
        rebalance_interval: float = 1.0,
    ) -> None:
        if not isinstance(group, str) or not group:
            raise UsageError("group must be a non-empty str: the consumer group's name")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UsageError(f"batch_size must be an int >= 1, not {batch_size!r}")
        if max_batch_size is None:
            max_batch_size = max(batch_size, DEFAULT_MAX_BATCH_SIZE)
        elif (
            isinstance(max_batch_size, bool)
            or not isinstance(max_batch_size, int)
            or max_batch_size < batch_size
        ):
            raise UsageError(
                f"max_batch_size must be an int >= batch_size ({batch_size}), not "
                f"{max_batch_size!r}: it caps how far reads grow while the consumer is behind"
            )
        self.conninfo = conninfo
        self.group = group
        self.start = start
        self.reset = reset
        self.batch_size = batch_size
        self.max_batch_size = max_batch_size
        self.read_size = batch_size  # events the next read asks for (see the module docstring)
        self.rebalance_interval = rebalance_interval
        self.conn: psycopg.Connection[Any] | None = None
        self.owned: list[int] = []
        self._lock_key = lock_name(group)
        self._next_rebalance = 0.0
        self._busy_partitions = 0  # partitions that had events at the last read (see fetch)
        self._read_params: list[str] = []  # read_batch's parameters, in $n order
        self._rows: abc.Transformer | None = None  # decodes read results (binary format)
        self._forget_reads()

    def _forget_reads(self) -> None:
        """Drop the cursor and any read ahead: the next read starts from the stored positions."""
        self._cursor: dict[int, tuple[str, int]] = {}  # partition -> (tx, id) last handed out
        self._in_flight: _Read | None = None  # the read sent, not received yet
        self._ready: tuple[pq.abc.PGresult, _Read] | None = None  # received, not used yet
        self._handed_out: dict[int, tuple[str, int]] = {}  # last of the batch not yet acked
        self._saturated = False  # the last read may have left events behind (see _deliverable)
        self.read_size = self.batch_size  # start small again: we may be caught up by now

    # -- connection --

    def connect(self) -> None:
        try:
            conn = psycopg.connect(self.conninfo, autocommit=True)
        except psycopg.OperationalError as exc:
            raise connect_error(self.conninfo, " ".join(str(exc).split())) from None
        try:
            if not conn.execute(sql.query("schema_installed")).fetchone()[0]:  # type: ignore[index]
                raise SchemaMissing(MISSING)
            # Wake-ups that arrive during our queries are hints we drop; without a handler
            # psycopg would keep them all in a backlog that only notifies() empties.
            conn.add_notify_handler(_drop)
            conn.execute(psql.SQL("LISTEN {}").format(psql.Identifier(WAKE_CHANNEL)))
            conn.execute(
                "SELECT pg_advisory_lock_shared(hashtext(%s), %s)", (self._lock_key, MEMBERSHIP)
            )
            self._create_group(conn)
            self._prepare_read(conn)
        except BaseException:
            conn.close()
            raise
        self.conn = conn
        self.owned = []
        self._next_rebalance = 0.0
        self._forget_reads()
        self.rebalance()

    def _prepare_read(self, conn: psycopg.Connection[Any]) -> None:
        """Prepare read_batch for the asynchronous sends of `fetch` (results in binary)."""
        names: list[str] = []

        def number(m: re.Match[str]) -> str:
            if m.group(1) not in names:
                names.append(m.group(1))
            return f"${names.index(m.group(1)) + 1}"

        text = sql.PLACEHOLDER.sub(number, sql.query("read_batch"))
        res = conn.pgconn.prepare(READ_STATEMENT, text.encode())
        if res.status != pq.ExecStatus.COMMAND_OK:
            raise psycopg.errors.error_from_result(res, encoding=conn.info.encoding)
        self._read_params = names
        self._rows = Transformer(conn)

    def close(self) -> None:
        conn, self.conn = self.conn, None
        self.owned = []
        self._forget_reads()
        if conn is not None:
            conn.close()  # the session's advisory locks go with it

    @property
    def socket(self) -> int:
        assert self.conn is not None
        return self.conn.pgconn.socket

    def _create_group(self, conn: psycopg.Connection[Any]) -> None:
        tx, event_id, skip = self._start_position(conn)
        params = {"group": self.group, "tx": tx, "event_id": event_id, "skip": skip}
        conn.execute(sql.query("create_group"), params)
        if self.reset:
            conn.execute(sql.query("reset_group"), params)
            self.reset = False  # once, not again at every reconnect

    def _start_position(self, conn: psycopg.Connection[Any]) -> tuple[str, int, str | None]:
        """(tx, event id, snapshot of events to skip) where the group starts."""
        start = self.start
        row: Any
        if start == "beginning":
            return "0", 0, None
        if start == "now":
            row = conn.execute(sql.query("position_now")).fetchone()
        elif isinstance(start, int):
            row = conn.execute(sql.query("position_before_id"), {"id": start}).fetchone()
            if row is None:
                raise UsageError(f"no event with id {start} in the log: start from another one")
        elif isinstance(start, datetime):
            row = conn.execute(sql.query("position_before_time"), {"at": start}).fetchone()
            if row is None:  # nothing that recent: start at the end
                row = conn.execute(sql.query("position_now")).fetchone()
        else:
            raise UsageError(
                f"start must be 'beginning', 'now', an event id or a datetime, not {start!r}"
            )
        assert row is not None
        return str(row[0]), int(row[1]), (row[2] if len(row) > 2 else None)

    # -- partitions --

    def rebalance(self, *, force: bool = False) -> None:
        """Hold our fair share of partitions: ceil(16 / live members)."""
        now = time.monotonic()
        if not force and now < self._next_rebalance:
            return
        self._next_rebalance = now + self.rebalance_interval
        conn = self._conn()
        self._settle()
        held = set(self.owned)
        try:
            members = conn.execute(
                sql.query("group_members"), {"lock_name": self._lock_key}
            ).fetchone()[0]  # type: ignore[index]
            target = math.ceil(PARTITIONS / max(1, members))
            while len(self.owned) > target:
                p = self.owned.pop()
                conn.execute("SELECT pg_advisory_unlock(hashtext(%s), %s)", (self._lock_key, p))
            if len(self.owned) < target:
                # Start the search at a place of our own, so members do not all race for 0, 1...
                offset = conn.pgconn.backend_pid % PARTITIONS
                for i in range(PARTITIONS):
                    p = (offset + i) % PARTITIONS
                    if p in self.owned:
                        continue
                    got = conn.execute(
                        "SELECT pg_try_advisory_lock(hashtext(%s), %s)", (self._lock_key, p)
                    ).fetchone()[0]  # type: ignore[index]
                    if got:
                        self.owned.append(p)
                        if len(self.owned) >= target:
                            break
        except psycopg.OperationalError as exc:
            raise CoreLost(str(exc)) from None
        self.owned.sort()
        if set(self.owned) != held:
            # A read ahead covers the old partitions; a released one may move on without us.
            self._ready = None
            self._cursor = {p: c for p, c in self._cursor.items() if p in self.owned}

    # -- reading and acknowledging --

    def fetch(self, loads: Callable[[str], Any] = json.loads) -> list[Event]:
        """The next events of our partitions, oldest first (no waiting)."""
        if not self.owned:
            return []
        if self._handed_out:
            # The last batch was not all acknowledged: what was not must come again.
            self._settle()
            self._forget_reads()
        res, read = self._take_read()
        n, batch_last = self._deliverable(res, read)
        # Behind (the read came back full): read twice as much next time, up to the maximum;
        # caught up: back to the normal size.
        if self._saturated:
            self.read_size = min(self.max_batch_size, read.limit * 2)
        else:
            self.read_size = self.batch_size
        if not n:
            return []
        self._cursor.update(batch_last)
        self._handed_out = batch_last
        if self._saturated:
            self._send_read()  # more is waiting: the server reads it while we decode and handle
        assert self._rows is not None
        self._rows.set_pgresult(res, set_loaders=True, format=pq.Format.BINARY)
        return _events(self._rows.load_rows(0, n, tuple), loads)

    def _take_read(self) -> tuple[pq.abc.PGresult, _Read]:
        """The result of the read ahead if there is one, else of a read sent now."""
        if self._in_flight is None and self._ready is None:
            self._send_read()
        self._settle()
        assert self._ready is not None
        (res, read), self._ready = self._ready, None
        if res.status != pq.ExecStatus.TUPLES_OK:
            assert self.conn is not None
            if self.conn.pgconn.status != pq.ConnStatus.OK:
                raise CoreLost(res.get_error_message())
            raise psycopg.errors.error_from_result(res, encoding=self.conn.info.encoding)
        return res, read

    def _send_read(self) -> None:
        """Send read_batch without waiting for its result (see `_settle`)."""
        conn = self._conn()
        limit = self.read_size
        share = self._per_partition(limit)
        cursors = [self._cursor.get(p) for p in self.owned]
        values = {
            "group": self.group,
            "partitions": _array(self.owned),
            "txs": _array(c and c[0] for c in cursors),
            "ids": _array(c and c[1] for c in cursors),
            "limit": str(limit),
            "per_partition": str(share),
        }
        params: list[bytes | None] = [values[n].encode() for n in self._read_params]
        try:
            conn.pgconn.send_query_prepared(READ_STATEMENT, params, result_format=pq.Format.BINARY)
        except psycopg.OperationalError as exc:
            raise CoreLost(str(exc)) from None
        self._in_flight = _Read(limit, share)

    def _settle(self) -> None:
        """Receive the read in flight, if any (the connection is free for other queries then)."""
        read, self._in_flight = self._in_flight, None
        if read is None:
            return
        pgconn = self._conn().pgconn
        try:
            while True:
                pgconn.consume_input()
                if not pgconn.is_busy():
                    break
                select.select([pgconn.socket], [], [])
            first = None
            while (res := pgconn.get_result()) is not None:
                first = res if first is None else first
        except psycopg.OperationalError as exc:
            raise CoreLost(str(exc)) from None
        while pgconn.notifies() is not None:
            pass  # wake-ups read meanwhile: hints only (see connect)
        if first is None:
            raise CoreLost("the server sent no result")
        self._ready = (first, read)

    def _per_partition(self, limit: int) -> int:
        """How many rows each partition may give: about *limit* in all, spread over the
        partitions that had events last time (all of ours at first)."""
        busy = self._busy_partitions or len(self.owned) or 1
        return max(1, math.ceil(limit / busy))

    def _deliverable(
        self, res: pq.abc.PGresult, read: _Read
    ) -> tuple[int, dict[int, tuple[str, int]]]:
        """
        How many rows of a read to hand out, and the (tx, id) of the last of each partition
        among them; tunes the next read. Works on the raw result (three columns, no decoding),
        so that the read ahead is sent before the batch is decoded.

        A partition that gave its whole share may have more rows that sort before other
        partitions' later rows: so deliver only up to the smallest last row of such
        partitions (the rest comes next time, in order). Then give those partitions the
        share of the idle ones, so one hot key does not mean tiny batches.
        """
        n = res.ntuples
        share = read.share
        self._saturated = n >= read.limit
        if not n:
            self._busy_partitions = 0
            return 0, {}
        get = res.get_value
        parts = [get(i, 7) for i in range(n)]  # binary int2: the bytes serve as keys

        def position(i: int) -> tuple[int, int]:
            return int(get(i, 1) or b"0"), int.from_bytes(get(i, 0) or b"", "big", signed=True)

        counts = Counter(parts)
        full = [p for p, k in counts.items() if k >= share]
        # Busy: partitions that may have more. When the read's overall limit cut the result,
        # that is every partition in it (counting only the full ones would leave out those the
        # limit cut, and the next read would give the few counted a huge share each).
        self._busy_partitions = len(counts) if n >= read.limit else (len(full) or len(counts))
        last = {p: i for i, p in enumerate(parts)}
        if full:
            self._saturated = True
            boundary = min(position(last[p]) for p in full)
            while n and position(n - 1) > boundary:
                n -= 1
            last = {p: i for i, p in enumerate(parts[:n])}
        cursors = {}
        for p, i in last.items():
            tx, event_id = position(i)
            cursors[int.from_bytes(p or b"", "big")] = (str(tx), event_id)
        return n, cursors

    def ack(self, events: Sequence[Event]) -> None:
        """Move the group past *events* (the last of each partition counts)."""
        if not events:
            return
        last: dict[int, Event] = {}
        for e in events:
            last[e.partition] = e
        self._settle()
        params = {
            "group": self.group,
            "partitions": list(last),
            "txs": [e.tx for e in last.values()],
            "ids": [e.id for e in last.values()],
        }
        try:
            self._conn().execute(sql.query("ack"), params)
        except psycopg.OperationalError as exc:
            raise CoreLost(str(exc)) from None
        if all(p in last and (last[p].tx, last[p].id) == at for p, at in self._handed_out.items()):
            self._handed_out = {}  # all acknowledged: the cursor is the stored position

    def in_transaction(self, event: Event, handler: Callable[[Event, Any], Any]) -> None:
        """Run *handler* and the ack of *event* in one transaction: both happen, or neither."""
        conn = self._conn()
        self._settle()
        try:
            with conn.transaction():
                handler(event, conn)
                conn.execute(
                    sql.query("ack"),
                    {
                        "group": self.group,
                        "partitions": [event.partition],
                        "txs": [event.tx],
                        "ids": [event.id],
                    },
                )
        except psycopg.OperationalError as exc:
            raise CoreLost(str(exc)) from None

    def drain_wakes(self) -> None:
        """Read and drop pending wake-up notifications (they are hints, not data)."""
        conn = self._conn()
        self._settle()
        try:
            conn.pgconn.consume_input()
        except psycopg.OperationalError as exc:
            raise CoreLost(str(exc)) from None
        while conn.pgconn.notifies() is not None:
            pass

    def _conn(self) -> psycopg.Connection[Any]:
        if self.conn is None:
            raise CoreLost("not connected")
        return self.conn


def _events(rows: list[Any], loads: Callable[[str], Any]) -> list[Event]:
    # One parse for the whole batch: payloads are jsonb as text, always valid JSON, so they
    # join into an array; per call, json.loads costs more than the parsing itself.
    payloads = loads("[" + ",".join([r[4] for r in rows]) + "]")
    make = tuple.__new__  # skips NamedTuple's Python-level __new__: this is per event
    return [
        make(Event, (r[0], r[2], p, r[3], None if r[5] is None else loads(r[5]), r[6], r[7], r[1]))
        for r, p in zip(rows, payloads, strict=True)
    ]


def _array(values: Iterable[object]) -> str:
    """A PostgreSQL array literal of ints, or digit strings, or NULLs."""
    return "{" + ",".join("NULL" if v is None else str(v) for v in values) + "}"


def _drop(_: object) -> None:
    pass
