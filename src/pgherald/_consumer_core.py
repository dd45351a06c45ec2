"""
The blocking core of a durable consumer: one connection, its partition locks, reads and acks.

A core is confined to one thread at a time. `Consumer` drives it directly; `AsyncConsumer`
runs its short queries in a worker thread and does all waiting on the event loop. Waiting itself
is not done here: the runtimes wait on `socket` (wake-ups) with their own timeouts.

Consumer groups: the log has 16 fixed partitions; a consumer owns a partition while it holds a
session advisory lock on (group, partition), on this very connection. Membership is a shared
advisory lock, so the number of live members is read from ``pg_locks`` and a dead consumer's
locks vanish with its session: the others take its partitions at their next rebalance.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, NamedTuple

import psycopg
from psycopg import sql as psql

from . import sql
from ._conninfo import connect_error
from ._schema import MISSING
from .errors import SchemaMissing, UsageError

logger = logging.getLogger("pgherald.consumer")

PARTITIONS = 16
MEMBERSHIP = 1000  # second key of the shared membership lock (partitions use 0..15)
WAKE_CHANNEL = "pgherald_wake_v1"

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
        rebalance_interval: float = 1.0,
    ) -> None:
        if not isinstance(group, str) or not group:
            raise UsageError("group must be a non-empty str: the consumer group's name")
        self.conninfo = conninfo
        self.group = group
        self.start = start
        self.reset = reset
        self.batch_size = batch_size
        self.rebalance_interval = rebalance_interval
        self.conn: psycopg.Connection[Any] | None = None
        self.owned: list[int] = []
        self._lock_key = lock_name(group)
        self._next_rebalance = 0.0
        self._busy_partitions = 0  # partitions that had events at the last read (see fetch)

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
        except BaseException:
            conn.close()
            raise
        self.conn = conn
        self.owned = []
        self._next_rebalance = 0.0
        self.rebalance()

    def close(self) -> None:
        conn, self.conn = self.conn, None
        self.owned = []
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

    # -- reading and acknowledging --

    def fetch(self, loads: Callable[[str], Any] = json.loads) -> list[Event]:
        """The next events of our partitions, oldest first (no waiting)."""
        if not self.owned:
            return []
        conn = self._conn()
        try:
            rows = conn.execute(
                sql.query("read_batch"),
                {
                    "group": self.group,
                    "partitions": self.owned,
                    "limit": self.batch_size,
                    "per_partition": self._per_partition(),
                },
            ).fetchall()
        except psycopg.OperationalError as exc:
            raise CoreLost(str(exc)) from None
        rows = self._adapt(rows)
        if not rows:
            return []
        # One parse for the whole batch: payloads are jsonb as text, always valid JSON, so they
        # join into an array; per call, json.loads costs more than the parsing itself.
        payloads = loads("[" + ",".join([r[4] for r in rows]) + "]")
        make = tuple.__new__  # skips NamedTuple's Python-level __new__: this is per event
        return [
            make(
                Event,
                (r[0], r[2], p, r[3], None if r[5] is None else loads(r[5]), r[6], r[7], r[1]),
            )
            for r, p in zip(rows, payloads, strict=True)
        ]

    def _per_partition(self) -> int:
        """How many rows each partition may give: about batch_size in all, spread over the
        partitions that had events last time (all of ours at first)."""
        busy = self._busy_partitions or len(self.owned) or 1
        return max(1, math.ceil(self.batch_size / busy))

    def _adapt(self, rows: list[Any]) -> list[Any]:
        """
        Keep the log order across partitions, and tune the next read.

        A partition that gave its whole share may have more rows that sort before other
        partitions' later rows: so deliver only up to the smallest last row of such
        partitions (the rest comes next time, in order). Then give those partitions the
        share of the idle ones, so one hot key does not mean tiny batches.
        """
        if not rows:
            self._busy_partitions = 0
            return rows
        share = self._per_partition()
        counts: dict[int, int] = {}
        last: dict[int, tuple[int, int]] = {}
        for r in rows:
            counts[r[7]] = counts.get(r[7], 0) + 1
            last[r[7]] = (int(r[1]), r[0])
        full = [p for p, n in counts.items() if n >= share]
        self._busy_partitions = len(full) if full else len(counts)
        if not full:
            return rows
        boundary = min(last[p] for p in full)
        cut = len(rows)
        while cut and (int(rows[cut - 1][1]), rows[cut - 1][0]) > boundary:
            cut -= 1
        return rows[:cut]

    def ack(self, events: Sequence[Event]) -> None:
        """Move the group past *events* (the last of each partition counts)."""
        if not events:
            return
        last: dict[int, Event] = {}
        for e in events:
            last[e.partition] = e
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

    def in_transaction(self, event: Event, handler: Callable[[Event, Any], Any]) -> None:
        """Run *handler* and the ack of *event* in one transaction: both happen, or neither."""
        conn = self._conn()
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


def _drop(_: object) -> None:
    pass
