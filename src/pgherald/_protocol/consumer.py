"""
The durable consumer's state machine: connect, join the group, hold partitions, read, hand
out, retry, acknowledge, wait for wake-ups, probe, reconnect.

`ConsumerEngine.run` is a generator that never blocks, like `ListenerEngine.run`: it yields
requests (see `pgwire`) and a thin runtime (a thread, asyncio or trio) carries them out. Every
statement has a deadline, every wait ends at a deadline or a wake-up, so `stop()` and
cancellation work in every state: connecting, backing off, reading, waiting, retrying.

Consumer groups: the log has 16 partitions (or as many as set at install, up to 256); a
consumer owns a partition while it holds a session advisory lock on (group, partition), on this
very connection. Positions are per
(group, channel, partition): a read covers the group's channels in the partitions held, one
index range each, and a channel new to the group starts at the group's start (its rows are
registered from the group's start rows, channel '', before the first read of it). A consumer
of every channel learns the log's channels once per rebalance. Membership is a shared
advisory lock, so the number of live members is read from ``pg_locks`` and a dead consumer's
locks vanish with its session: the others take its partitions at their next rebalance.

Read-ahead: while the runtime hands a large batch to handlers, the server already runs the read
of the next one (sent with libpq's asynchronous API, after the last event handed out in each
channel and partition: our cursor). The group's stored position still moves only with the acknowledgement.
Whatever could make the cursor wrong drops it, with any read in flight, so that the next read
starts from the stored positions again: events handed out but not all acknowledged, a change of
the partitions held, a reconnect.

Read size: a read asks for `batch_size` events. While reads come back full (a backlog), each
next read asks for twice as many, up to `max_batch_size`; a read that is not full brings it back
to `batch_size`. The price: the events handed out but not yet acknowledged, which a crash
delivers again, are up to one read.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any, NamedTuple

import psycopg
from psycopg import pq
from psycopg.adapt import Transformer

from .. import _errormap, sql
from .._models import Event, Gap, Stats
from ..errors import (
    ConnectError,
    ConnectionLost,
    HeraldError,
    PayloadInvalid,
    SchemaMissing,
    UsageError,
)
from . import liveness, pgwire, scheduled
from .backoff import backoff_delay
from .channels import listen_query, text_array
from .pgwire import REPORT, SLEEP, WAIT, PQGen

logger = logging.getLogger("pgherald.consumer")

PARTITIONS = 16  # the log's partitions, unless set otherwise at install (partition_count_v1)
DEFAULT_MAX_BATCH_SIZE = 20_000
WAKE_CHANNEL = "pgherald_wake_v1"
_WAKE = WAKE_CHANNEL.encode()
MAINTAIN_TIMEOUT = 60.0  # moving a day of events out of the default partition takes a while

# Requests of the consumer engine, beside pgwire's WAIT / SLEEP / REPORT.
BATCH = 4
"""(BATCH, events, first, handler) -> (done, failed_handler | None, error | None).

Run the handlers of ``events[first:]``, starting at handler index *handler* of the first event.
The runtime answers how many events it finished; when a handler raised, also which one and
the exception; when it reached a transactional handler, which one and `NEEDS_TX`. Iterating
runtimes hand the events to the application and answer (done, None, None)."""
TX = 5
"""(TX, event, handler, connection) -> exception | None: call ``handler(event, connection)``
inside the transaction the engine opened; the engine then acknowledges and commits."""

NEEDS_TX = object()
"""The answer to BATCH that asks the engine for a transaction around a transactional handler."""

ABANDONED = object()
"""The answer to TX when the runtime gave up on the handler: still running ``stop_timeout``
seconds after `stop()` (its connection was shut, or the handler cancelled). The engine then
drops the connection: the transaction rolls back and the event comes again."""

TIMED_OUT = object()
"""The answer to TX when the handler's transaction outlasted ``transaction_timeout`` (its
connection was shut, or the handler cancelled): as `ABANDONED`, and a failed attempt."""

Start = str | int | datetime
Entry = tuple[Callable[..., Any], bool, bool]  # handler, is_async, transactional


@dataclass(frozen=True)
class StatusRow:
    """
    A row the consumer keeps in ``pgherald.settings_v1`` while it runs, for ``pgherald
    status`` (a relay's throughput): written between reads right after each (re)connection and
    every *interval* seconds, removed when `ConsumerEngine.run` returns after a stop.
    """

    name: str
    interval: float
    value: Callable[[int], str]
    """The row's JSON object (text), given the connection's backend pid; the statement adds
    ``"at"``, the server's clock (epoch seconds)."""


@dataclass
class ConsumerConfig:
    """A consumer's settings, checked once; every default is what a production service wants."""

    conninfo: str
    group: str
    channels: frozenset[str] = frozenset()
    """Only events of these channels go to handlers (empty: every channel)."""
    start: Start = "beginning"
    reset: bool = False
    batch_size: int = 1000
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_batch_bytes: int = 16 * 1024 * 1024
    """Reads are sized to hold about this many bytes of events (after the first read)."""
    poll_interval: float = 0.5
    linger: float = 0.02
    rebalance_interval: float = 1.0
    maintain_interval: float | None = 3600.0
    """How often to run the log's maintenance (`pgherald.maintain`); None: never."""
    max_attempts: int = 3
    retry_delay: float = 0.2
    retry_max_delay: float = 30.0
    connect_timeout: float = 10.0
    health_check_interval: float = 15.0
    health_check_timeout: float = 5.0
    reconnect_initial_delay: float = 0.1
    reconnect_max_delay: float = 10.0
    reconnect_max_attempts: int | None = None
    transaction_timeout: float | None = None
    """Seconds a transactional handler's transaction may last; past them it is given up as
    after `stop_timeout`, and counts as a failed attempt (`max_attempts` of them: a dead letter).
    None: no limit."""
    stop_timeout: float | None = 30.0
    """Seconds a transactional handler may still run after `stop()`; past them its connection
    is shut (its statement fails, the transaction rolls back, the event comes again). None:
    wait for it, however long (a frozen connection: for ever)."""
    synchronous_acks: bool = False
    """False: the consumer's own statements (acknowledgements, dead letters) commit without
    waiting for the WAL flush (synchronous_commit = off for its session): a server crash may
    forget the last ones (up to 3 x wal_writer_delay), whose events then come again; a
    transactional handler's transaction keeps the server's setting. True: wait for each."""
    loads: Callable[[str], Any] = json.loads
    raw_payloads: bool = False
    """Hand each event's payload and headers on as the JSON text the log holds (jsonb's text
    form, headers None when absent), not decoded: for a relay that forwards them as they are."""
    connection_class: type[Any] = psycopg.Connection
    """Wraps our libpq connection for transactional handlers and result decoding."""
    check_delivery: bool = True
    """At the first connection, prove that notifications reach it (no transaction pooler)."""
    from_wakeups: bool = True
    """While caught up and waiting, hand out an event straight from its wake-up (which then
    carries it, signed) when its order is proven, without reading the log (see
    `ConsumerEngine._note_events`); False: always read."""
    ack_delay: float = 0.05
    """Events handed out from wake-ups are acknowledged together, at most this long after the
    first of them (and before any other statement): a commit per event would cost the
    publishers' commits more than the events' own. A crash within it delivers them again.
    0: each at once."""
    lent: Any = None
    status_row: StatusRow | None = None
    """A relay's row for ``pgherald status`` (see `StatusRow`); None: none."""
    extra: dict[str, Any] = field(default_factory=dict)


class _Lost(Exception):
    """The connection failed (internal: the engine reconnects)."""


_Stopped = pgwire.Abandoned  # a statement abandoned after stop(): run() returns


class _Ack(NamedTuple):
    """Acknowledgements sent without waiting (`ConsumerEngine._send_acks`)."""

    last: dict[tuple[str, int], Event]
    number: int  # of events acknowledged
    deadline: float


def _statement(name: str) -> bytes:
    """The name of query *name* prepared on a consumer's connection."""
    return f"pgherald_{name}_v1".encode()


class _Read(NamedTuple):
    """A read sent: how many rows it asked for in all, and of each (channel, partition)."""

    limit: int
    shares: dict[tuple[str, int], int]
    seq: int = 0  # the how-manieth read of the connection
    notes: int = 0  # wake-ups heard before it was sent (of ConsumerEngine._notes)


class _Note(NamedTuple):
    """A wake-up that carries its event (schema.sql wake_note_v1), checked and parsed."""

    id: int
    tx: int
    partition: int
    created_us: int
    older: frozenset[int] | None  # older transactions running when it was stored (None: many)
    skips: int  # pgherald.wake_skips_v1 then
    channel: str
    key: str | None
    headers: str | None
    payload: str


_NOTE_PREFIX = "n1|"
_NOTE_BYTES = _NOTE_PREFIX.encode()
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_NONE_OLDER: frozenset[int] = frozenset()
_make_note = tuple.__new__


def _older(field: str) -> frozenset[int] | None:
    """A note's older running transactions; None: too many to list ("*")."""
    return None if field == "*" else frozenset(int(x) for x in field.split(",") if x)


_MAX_NOTES = 10_000  # wake-ups kept before they are looked at; past it, one unknown stands for all


def lock_name(group: str) -> str:
    return f"pgherald.group:{group}"


class ConsumerEngine:
    """The state of one consumer connection, independent of any runtime."""

    def __init__(
        self,
        config: ConsumerConfig,
        stats: Stats,
        entries: Callable[[str], tuple[Entry, ...]],
    ) -> None:
        self.config = config
        self.stats = stats
        self._entries = entries
        self.stopping = False
        self.pgconn: pq.abc.PGconn | None = None
        self.conn: Any = None  # config.connection_class around pgconn
        self.owned: list[int] = []
        self.partitions = PARTITIONS
        self.read_size = config.batch_size
        self._lock_key = lock_name(config.group)
        self._ping = liveness.new_ping_channel()
        self._delivery_checked = not config.check_delivery
        self._reset = config.reset
        self._broken = False
        self._woken = False  # a wake-up arrived: something may have committed since our read
        self._waiting = False  # we hold the lock that asks publishers for wake-ups
        self._unsafe_before: str | None = None  # writers before this xid may not wake us
        self._next_rebalance = 0.0
        self._next_probe = 0.0
        self._busy_partitions = 0
        self._seen: dict[tuple[str, int], int] = {}  # rows per range in the last delivered read
        self._seen_total = 0
        self._fitting = config.max_batch_size  # events of the last read's size that fit
        self._prepared: set[str] = set()  # names of queries prepared on this connection
        self._rows: Any = None  # a psycopg Transformer: decodes read results (binary)
        self._alive_at = time.time()
        self._outage: tuple[float, str] | None = None
        self._session: tuple[int, str] | None = None  # pgwire.identity of pgconn
        self._previous: tuple[int, str] | None = None  # the same, of a connection given up
        self._undecodable: dict[int, str] = {}  # event id -> error, for the batch in hand
        self._redelivering = False  # the batch in hand is dead letters redelivered
        # Event id: attempts given up at transaction_timeout, and when the first was.
        self._timeouts: dict[int, tuple[int, float]] = {}
        self._next_redelivery = 0.0
        self._no_dead_letters = False  # the schema predates pgherald.dead_letters_v1
        self._release_at = 0.0  # when to move due delayed events into the log (scheduled.py)
        self._maintain_at = 0.0 if config.maintain_interval is not None else math.inf
        self._status_at = math.inf  # when to write config.status_row (after connecting)
        self._status_off = False  # it could not be written (no privilege, say)
        self._releases = scheduled.Releases()
        self._registered: frozenset[str] = frozenset()  # channels with rows of their own
        self._every: tuple[str, ...] = ()  # the log's channels, for a consumer of every channel
        # Events from wake-ups (see _note_events): whether this connection may (a secret to
        # check notes with, no schema function that skips wake-ups uncounted), whether it does
        # now, the wake-ups heard (notes as text, None: a wake-up without its event).
        self._secret: bytes | None = None
        self._notes_key = False  # we hold (wake_v1, 18): publishers send us notes
        self._tz: tzinfo = timezone.utc
        self._direct = False
        self._notes: list[str | None] = []
        self._need_horizon = False  # prove wake-ups complete again before handing out any
        self._horizon_after = 0.0
        self._horizon_delay = 0.0
        self._skips = -1  # pgherald.wake_skips_v1 when we started to prove them complete
        self._horizon_tx = 0  # a transaction id taken after that
        self._own_txs: list[int] = []  # our own recent transactions (acknowledgements...)
        self._read_seq = 0
        self._safe_seq = 0  # reads sent before wake-ups were proven to cover everything
        self._horizon_seq = 0  # reads sent before the horizon
        self._last_read: _Read | None = None
        self._deferred: dict[tuple[str, int], Event] = {}  # events from wake-ups, not acked
        self._deferred_count = 0
        self._ack_due = math.inf
        self._poll_at = 0.0  # in direct mode: when to read all the same
        self._skips_check_at = math.inf  # in direct mode: when to look for uncounted skips
        self._forget_reads()

    def _forget_reads(self) -> None:
        """Drop the cursor and any read ahead: the next read starts from the stored positions."""
        # (channel, partition) -> (tx, id) of the last event handed out
        self._cursor: dict[tuple[str, int], tuple[str, int]] = {}
        self._in_flight: _Read | None = None
        self._ack_in_flight: _Ack | None = None  # acknowledgements sent, answer not read
        self._ack_first = False  # a note waits for the answer to the acknowledgements sent
        self._ready: tuple[pq.abc.PGresult, _Read] | None = None
        self._handed_out: dict[tuple[str, int], tuple[str, int]] = {}  # last of each, not acked
        self._saturated = False
        self.read_size = max(1, min(self.config.batch_size, self._fitting))
        self._leave_direct()  # notes are checked against the cursor

    @property
    def redelivering(self) -> bool:
        """Whether the batch in hand is dead letters redelivered (behind the group's position)."""
        return self._redelivering

    @property
    def connected(self) -> bool:
        return self.pgconn is not None

    def stop(self) -> None:
        """Ask `run` to return (the runtime then wakes whatever it waits on)."""
        self.stopping = True

    # -- connecting --

    def open(self) -> PQGen:
        """Connect, check the schema, join the group and take partitions."""
        self.close()
        cfg = self.config
        deadline = time.monotonic() + cfg.connect_timeout
        pgconn = yield from self._guard(pgwire.connect(cfg.conninfo, deadline))
        self.pgconn = pgconn
        self._session = pgwire.identity(pgconn)
        self._broken = False
        self._prepared = set()
        try:
            self.conn = cfg.connection_class(pgconn)
            self.conn.prepare_threshold = None  # no DEALLOCATE ALL after a handler's rollback
            self.conn.add_notify_handler(self._heard)
            self._rows = Transformer(self.conn)
            (res,) = yield from self._query("schema_installed", {})
            if res.get_value(0, 0) != b"t":
                raise SchemaMissing(
                    "pgherald's schema is not installed in this database: run `pgherald install` "
                    "(or pgherald.install(conn)) once, as a role that may create a schema"
                )
            yield from self._run(
                pgwire.execute(
                    pgconn, _session_settings(cfg, pgconn.server_version), self._deadline()
                )
            )
            listen = listen_query(WAKE_CHANNEL) + b";" + listen_query(self._ping)
            yield from self._run(pgwire.execute(pgconn, listen, self._deadline()))
            yield from self._end_previous_session()
            (res,) = yield from self._query("partition_count", {})
            self.partitions = int(res.get_value(0, 0) or PARTITIONS)
            yield from self._query("join_group", {"lock_name": self._lock_key})
            yield from self._create_group()
            every = "false" if cfg.channels else "true"
            yield from self._query("every_channel", {"group": cfg.group, "every": every})
            self._registered = frozenset()
            yield from self._run(self._prepare(pgconn, "read_batch"))
            yield from self._check_from_wakeups()
            if not self._delivery_checked:
                check_deadline = time.monotonic() + min(5.0, cfg.connect_timeout)
                yield from self._run(
                    liveness.check_delivery(
                        cfg.conninfo, pgconn, self._ping, check_deadline, self._heard
                    )
                )
                self._delivery_checked = True
            self.owned = []
            self._forget_reads()
            self._next_rebalance = 0.0
            self._release_at = 0.0  # wake-ups were missed while away
            # The status row at the first turn: a new backend pid, and `status` waits for it.
            off = cfg.status_row is None or self._status_off
            self._status_at = math.inf if off else 0.0
            self._next_probe = time.monotonic() + cfg.health_check_interval
            self._alive_at = time.time()
            yield from self.rebalance()
        except _Lost as exc:
            self.close()
            raise ConnectError(f"connected, then lost the connection: {exc}") from None
        except BaseException:
            self.close()
            raise

    def _end_previous_session(self) -> PQGen:
        previous, self._previous = self._previous, None
        if previous is None:
            return
        pid, name = previous
        params = {"pid": pid, "application_name": name, "wait_ms": 1000}
        try:
            yield from self._query("end_previous_session", params)
        except HeraldError as exc:  # not allowed, say: its locks go when the server notices
            logger.info("could not end the previous session %d: %s", pid, exc)

    def close(self) -> None:
        """Drop the connection (its advisory locks go with the session); idempotent."""
        pgconn, self.pgconn = self.pgconn, None
        self.conn = None
        self.owned = []
        self._waiting = False  # a session lock: it goes with the session
        self._unsafe_before = None
        self._secret = None
        self._notes_key = False
        self._notes = []
        self._read_seq = self._safe_seq = self._horizon_seq = 0
        self._deferred, self._deferred_count, self._ack_due = {}, 0, math.inf
        self._last_read = None
        self._forget_reads()
        if pgconn is not None:
            pgconn.finish()

    def _deadline(self) -> float:
        return time.monotonic() + self.config.health_check_timeout

    def _create_group(self) -> PQGen:
        tx, event_id, skip = yield from self._start_position()
        params = {"group": self.config.group, "tx": tx, "event_id": str(event_id), "skip": skip}
        yield from self._query("create_group", params)
        if self._reset:
            yield from self._query("reset_group", params)
            self._reset = False  # once, not again at every reconnect

    def _start_position(self) -> PQGen:
        """(tx, event id, snapshot of events to skip) where the group starts."""
        start = self.config.start
        if start == "beginning":
            return "0", 0, None
        if start == "now":
            (res,) = yield from self._query("position_now", {})
        elif isinstance(start, int) and not isinstance(start, bool):
            (res,) = yield from self._query("position_before_id", {"id": str(start)})
            if not res.ntuples:
                raise UsageError(f"no event with id {start} in the log: start from another one")
        elif isinstance(start, datetime):
            (res,) = yield from self._query("position_before_time", {"at": start.isoformat()})
            if not res.ntuples:  # nothing that recent: start at the end
                (res,) = yield from self._query("position_now", {})
        else:
            raise UsageError(
                f"start must be 'beginning', 'now', an event id or a datetime, not {start!r}"
            )
        values = [res.get_value(0, i) for i in range(res.nfields)]
        text = [None if v is None else v.decode() for v in values]
        return text[0], int(text[1] or 0), (text[2] if len(text) > 2 else None)

    # -- statements --

    def _guard(self, gen: PQGen) -> PQGen:
        """Drive *gen*; after `stop()`, abandon it (and the connection) past the grace time."""
        try:
            return (yield from pgwire.until_stopped(gen, self._is_stopping))
        except pgwire.Abandoned:
            self._broken = True
            raise

    def _is_stopping(self) -> bool:
        return self.stopping

    def _run(self, gen: PQGen) -> PQGen:
        """Drive a pgwire generator: connection trouble and timeouts become `_Lost`."""
        try:
            return (yield from self._guard(gen))
        except pgwire.QueryTimeout:
            raise _Lost(
                f"no answer from the server within {self.config.health_check_timeout:g}s "
                "(half-open connection?)"
            ) from None
        except pgwire.QueryFailed as exc:
            pgconn = self.pgconn
            if pgconn is None or pgconn.status == pq.ConnStatus.BAD or _is_connection_state(exc):
                raise _Lost(str(exc)) from None
            if _errormap.is_transient(exc.sqlstate):  # try again, from a fresh session
                raise _Lost(f"{exc} (transient: starting over)") from None
            raise _failed(exc) from None
        except GeneratorExit:
            self._broken = True  # abandoned mid-statement: the connection's state is unknown
            raise
        except psycopg.OperationalError as exc:
            raise _Lost(pgwire.one_line(exc)) from None
        finally:
            # A wake-up read with the statement's answer sits in libpq's queue, and no more
            # data would make us look there: note it now, or it waits for poll_interval.
            self._drain()

    def _query(
        self,
        name: str,
        params: dict[str, Any],
        *,
        timeout: float | None = None,
        prepared: bool = False,
    ) -> PQGen:
        """
        Run named query *name* (text parameters and results) with the usual deadline;
        *prepared*: as a statement prepared once per connection, for the statements that
        recur while events flow (acknowledgements, the membership and dead-letter looks):
        planning them each time doubled their time, and a wake-up arriving meanwhile waits.
        """
        pgconn = self.pgconn
        if pgconn is None:
            raise _Lost("not connected")
        text, values = sql.bound(name, params)
        deadline = self._deadline() if timeout is None else time.monotonic() + timeout
        if prepared:
            gen = self._execute_prepared(pgconn, name, values, deadline)
        else:
            gen = pgwire.execute_params(pgconn, text, values, deadline)
        return (yield from self._run(gen))

    def _prepare(self, pgconn: Any, name: str) -> PQGen:
        pgconn.send_prepare(_statement(name), sql.numbered(name)[0])
        yield from pgwire.finish(pgconn, self._deadline())
        self._prepared.add(name)

    def _execute_prepared(
        self, pgconn: Any, name: str, values: list[bytes | None], deadline: float
    ) -> PQGen:
        for again in (False, True):
            if name not in self._prepared:
                yield from self._prepare(pgconn, name)
            pgconn.send_query_prepared(_statement(name), values)
            try:
                return (yield from pgwire.finish(pgconn, deadline))
            except pgwire.QueryFailed as exc:
                if exc.sqlstate != "26000" or again:
                    raise
                self._prepared.discard(name)  # gone (a handler ran DEALLOCATE ALL): again
        raise AssertionError("unreachable")

    def _heard(self, n: Any) -> None:
        """
        A notification read with a statement's answer (libpq's, or psycopg's during a
        transactional handler): a wake-up counts, anything else (a ping) is done with.
        """
        if getattr(n, "relname", None) == _WAKE:  # libpq's
            self._wake(n.extra)
        elif getattr(n, "channel", None) == WAKE_CHANNEL:  # psycopg's
            self._wake(n.payload.encode())

    def _drain(self) -> None:
        pgconn = self.pgconn
        if pgconn is None:
            return
        while (n := pgconn.notifies()) is not None:
            if n.relname == _WAKE:
                self._wake(n.extra)

    def _wake(self, payload: bytes) -> None:
        self._woken = True
        if payload == scheduled.WAKE_PAYLOAD:  # a delayed event: when is it due?
            self._release_at = 0.0  # (not in the log yet: its release wakes us again)
        elif self._secret is not None:
            notes = self._notes
            if len(notes) >= _MAX_NOTES:
                notes[:] = [None]
            try:
                notes.append(payload.decode() if payload.startswith(_NOTE_BYTES) else None)
            except UnicodeDecodeError:
                notes.append(None)

    # -- partitions --

    def rebalance(self, *, force: bool = False) -> PQGen:
        """Hold our fair share of partitions: partitions / live members, rounded by rank."""
        now = time.monotonic()
        if not force and now < self._next_rebalance:
            return
        self._next_rebalance = now + self.config.rebalance_interval
        pgconn = self.pgconn
        if pgconn is None:
            raise _Lost("not connected")
        yield from self._settle()
        held = set(self.owned)
        (res,) = yield from self._query(
            "group_members", {"lock_name": self._lock_key}, prepared=True
        )
        members = max(1, int(res.get_value(0, 0) or b"1"))
        rank = int(res.get_value(0, 1) or b"0")
        count = self.partitions
        # partitions // members each, one more for the first partitions % members (by pid):
        # every member at work, however the count divides.
        target = count // members + (1 if rank < count % members else 0)
        if len(self.owned) > target:
            yield from self._flush_acks()  # before a partition goes to another member
        while len(self.owned) > target:
            p = self.owned.pop()
            yield from self._query(
                "unlock_partition", {"lock_name": self._lock_key, "partition": p}
            )
        if len(self.owned) < target:
            # Start the search at a place of our own, so members do not all race for 0, 1...
            offset = pgconn.backend_pid % count
            for i in range(count):
                p = (offset + i) % count
                if p in self.owned:
                    continue
                (res,) = yield from self._query(
                    "try_lock_partition", {"lock_name": self._lock_key, "partition": p}
                )
                if res.get_value(0, 0) == b"t":
                    self.owned.append(p)
                    if len(self.owned) >= target:
                        break
        self.owned.sort()
        logger.debug("rebalanced: %d members, holding %s", members, self.owned)
        if set(self.owned) != held:
            # A read ahead covers the old partitions; a released one may move on without us.
            self._ready = None
            self._cursor = {k: c for k, c in self._cursor.items() if k[1] in self.owned}
            self._leave_direct()  # a new partition's events before our wake-ups: read them
        if not self.config.channels:
            yield from self._learn_channels()
        yield from self._channels()  # registered at once: `status` shows the group's lag

    # -- channels --

    def _channels(self) -> PQGen:
        """The channels to read, each registered (a position of its own) before it is read."""
        wanted = self.config.channels or frozenset(self._every)
        if not wanted <= self._registered:
            new = wanted - self._registered
            yield from self._settle()
            params = {"group": self.config.group, "channels": text_array(sorted(new))}
            yield from self._query("register_channels", params)
            self._registered = self._registered | new
            self._ready = None  # a read ahead would not cover them
        return sorted(wanted)

    def _learn_channels(self) -> PQGen:
        """A consumer of every channel: the log's channels now (and those the group read)."""
        yield from self._settle()
        (res,) = yield from self._query("log_channels", {"group": self.config.group})
        every = tuple(sorted(v.decode() for i in range(res.ntuples) if (v := res.get_value(i, 0))))
        if every != self._every:
            self._every = every
            self._ready = None
            self._leave_direct()

    # -- reading --

    def fetch(self) -> PQGen:
        """The next events of our channels and partitions, oldest first (decoded), or []."""
        if not self.owned:
            return []
        yield from self._flush_acks()
        if self._handed_out:
            # The last batch was not all acknowledged: what was not must come again.
            yield from self._settle()
            self._forget_reads()
        channels = yield from self._channels()
        if not channels:
            return []
        res, read = yield from self._take_read(channels)
        n, batch_last = self._deliverable(res, read)
        logger.debug("read %d rows, delivering %d", res.ntuples, n)
        if self._saturated:
            self.read_size = min(self.config.max_batch_size, read.limit * 2)
        else:
            self.read_size = self.config.batch_size
        # Large events: as many as fit in max_batch_bytes at the last read's average size.
        self.read_size = max(1, min(self.read_size, self._fitting))
        if not n:
            return []
        self._cursor.update(batch_last)
        self._handed_out = batch_last
        if self._saturated:
            self._send_read(channels)  # more is waiting: the server reads it meanwhile
        assert self._rows is not None
        self._rows.set_pgresult(res, set_loaders=True, format=pq.Format.BINARY)
        return self._decode(self._rows.load_rows(0, n, tuple))

    def _decode(self, rows: list[Any]) -> list[Event]:
        """
        Events from read rows: one parse for the batch; if that fails, event by event, and an
        event that cannot be decoded (jsonb accepts what Python's json refuses: 3,000 nested
        arrays, a 5,000-digit number) is noted in `_undecodable`, for `_deliver` to dead-letter.
        """
        self._undecodable = {}
        if self.config.raw_payloads:
            return _events(rows, None)
        loads = self.config.loads
        try:
            return _events(rows, loads)
        except Exception:  # RecursionError, ValueError, a custom loads' own: one by one
            pass
        events = []
        for r in rows:
            try:
                payload, headers = loads(r[4]), None if r[5] is None else loads(r[5])
            except Exception as exc:  # as above
                self._undecodable[r[0]] = f"cannot decode the event: {_error_text(exc)}"
                payload = headers = None
            events.append(Event(r[0], r[2], payload, r[3], headers, r[6], r[7], r[1]))
        return events

    def _take_read(self, channels: list[str]) -> PQGen:
        if self._in_flight is None and self._ready is None:
            self._send_read(channels)
        yield from self._settle()
        assert self._ready is not None
        (res, read), self._ready = self._ready, None
        self._last_read = read
        if res.status != pq.ExecStatus.TUPLES_OK:
            pgconn = self.pgconn
            if pgconn is None or pgconn.status != pq.ConnStatus.OK:
                raise _Lost(res.get_error_message() or "connection lost during a read")
            state = res.error_field(pq.DiagnosticField.SQLSTATE)
            if state == b"26000":  # our prepared read is gone (a handler ran DEALLOCATE ALL)
                yield from self._run(self._prepare(pgconn, "read_batch"))
                self._send_read(channels)
                return (yield from self._take_read(channels))
            error = pgwire.result_error(res)
            if _errormap.is_transient(error.sqlstate):  # as for any statement (see _run)
                raise _Lost(f"{error} (transient: starting over)")
            raise _failed(error)
        return res, read

    def _send_read(self, channels: list[str]) -> None:
        pgconn = self.pgconn
        if pgconn is None:
            raise _Lost("not connected")
        assert self._ack_in_flight is None, "a read sent before the acknowledgements' answer"
        limit = self.read_size
        keys = [(c, p) for c in channels for p in self.owned]
        shares = self._shares(limit, keys)
        cursors = [self._cursor.get(k) for k in keys]
        values = {
            "group": self.config.group,
            "channels": text_array(c for c, _ in keys),
            "partitions": _array(p for _, p in keys),
            "txs": _array(c and c[0] for c in cursors),
            "ids": _array(c and c[1] for c in cursors),
            "limit": str(limit),
            "shares": _array(shares.values()),
        }
        _, params = sql.bound("read_batch", values)
        try:
            pgconn.send_query_prepared(
                _statement("read_batch"), params, result_format=pq.Format.BINARY
            )
        except psycopg.OperationalError as exc:
            raise _Lost(pgwire.one_line(exc)) from None
        self._read_seq += 1
        self._in_flight = _Read(limit, shares, self._read_seq, len(self._notes))
        self.stats.reads += 1

    def _settle(self) -> PQGen:
        """Receive the statement in flight, if any (the connection is free for others)."""
        yield from self._settle_ack()
        yield from self._settle_read()

    def _settle_read(self) -> PQGen:
        read, self._in_flight = self._in_flight, None
        if read is not None:
            yield from self._guard(self._receive(read))

    def _receive(self, read: _Read) -> PQGen:
        pgconn = self.pgconn
        assert pgconn is not None
        timeout = self.config.health_check_timeout
        deadline = time.monotonic() + timeout
        try:
            while pgconn.flush():
                ready = yield (WAIT, pgconn.socket, pgwire.WRITE, deadline)
                if not ready and time.monotonic() >= deadline:
                    raise _Lost(f"could not send a read within {timeout:g}s")
            # Every get_result() after is_busy() says it will not block: libpq's get_result()
            # reads the socket itself, blocking, when the next result has not fully arrived
            # (the end of the statement after its rows, on a connection cut meanwhile).
            first = None
            pgconn.consume_input()
            while True:
                if pgconn.is_busy():
                    ready = yield (WAIT, pgconn.socket, pgwire.READ, deadline)
                    now = time.monotonic()
                    if ready:
                        deadline = now + timeout  # data is flowing: the deadline is for silence
                        pgconn.consume_input()
                    elif now >= deadline:
                        raise _Lost(
                            f"no answer to a read within {timeout:g}s (half-open connection?)"
                        )
                    continue
                if (res := pgconn.get_result()) is None:
                    break
                first = res if first is None else first
        except GeneratorExit:
            self._broken = True
            raise
        except psycopg.OperationalError as exc:
            raise _Lost(pgwire.one_line(exc)) from None
        self._drain()
        if first is None:
            raise _Lost("the server sent no result")
        self._ready = (first, read)
        self._alive_at = time.time()

    def _shares(self, limit: int, keys: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """
        How many rows to read at most from each (channel, partition) range: in proportion to
        the rows each gave in the last read's delivered window (with a quarter more), at least
        an even split. Channels differ in rate (a busy one beside quiet ones): with even
        shares the busy ranges fill theirs first, and a read delivers only up to the earliest
        of them (see `_deliverable`): a few hundred rows of a read of 20,000.
        """
        even = max(1, math.ceil(limit / (self._busy_partitions or len(keys) or 1)))
        seen, total = self._seen, self._seen_total
        if not total:
            return dict.fromkeys(keys, even)
        scale = limit * 1.25 / total
        return {k: min(limit, max(even, math.ceil(seen.get(k, 0) * scale))) for k in keys}

    def _deliverable(
        self, res: pq.abc.PGresult, read: _Read
    ) -> tuple[int, dict[tuple[str, int], tuple[str, int]]]:
        """
        How many rows of a read to hand out, and the (tx, id) of the last of each (channel,
        partition) among them; tunes the next read. Works on the raw result (no decoding), so
        that the read ahead is sent before the batch is decoded.

        A range that gave its whole share may have more rows that sort before other ranges'
        later rows: so deliver only up to the smallest last row of such ranges (the rest comes
        next time, in order).
        """
        n = res.ntuples
        self._saturated = n >= read.limit
        if not n:
            self._busy_partitions = 0
            self._seen, self._seen_total = {}, 0
            return 0, {}
        get = res.get_value
        # Each row's range, as the read numbered it (binary int8: the bytes serve as keys):
        # one value per row, counted in C.
        ranges = [get(i, 8) for i in range(n)]
        # The average event size, from up to 64 rows of the read (a copy of each sampled payload).
        sample = range(0, n, max(1, n // 64))
        average = sum([len(get(i, 4) or b"") for i in sample]) // len(sample) + 200
        self._fitting = max(1, self.config.max_batch_bytes // average)
        keys = list(read.shares)

        def position(i: int) -> tuple[int, int]:
            return int(get(i, 1) or b"0"), int.from_bytes(get(i, 0) or b"", "big", signed=True)

        def key(number: bytes | None) -> tuple[str, int]:
            return keys[int.from_bytes(number or b"", "big") - 1]

        counts = Counter(ranges)
        shares = read.shares
        full = [r for r, k in counts.items() if k >= shares.get(key(r), 0)]
        self._busy_partitions = len(counts) if n >= read.limit else (len(full) or len(counts))
        last = _lasts(ranges, n, len(counts))
        if full:
            self._saturated = True
            boundary = min(position(last[r]) for r in full)
            while n and position(n - 1) > boundary:
                n -= 1
            counts = Counter(ranges[:n])
            last = _lasts(ranges, n, len(counts))
        # The delivered window holds every row of every range up to its end: each range's
        # part of it is its rate, for the next read's shares.
        self._seen = {key(r): k for r, k in counts.items()}
        self._seen_total = n
        cursors = {}
        for r, i in last.items():
            tx, event_id = position(i)
            cursors[key(r)] = (str(tx), event_id)
        return n, cursors

    # -- acknowledging --

    def ack(self, events: Sequence[Event], *, count: int | None = None) -> PQGen:
        """Move the group past *events* (the last of each channel and partition counts)."""
        if not events:
            return
        last: dict[tuple[str, int], Event] = {}
        for e in events:
            last[e.channel, e.partition] = e
        yield from self._settle()
        params = _ack_params(self.config.group, last.values())
        (res,) = yield from self._query("ack", params, prepared=True)
        self._acknowledged(res, last, len(events) if count is None else count)

    def _acknowledged(
        self, res: pq.abc.PGresult, last: dict[tuple[str, int], Event], count: int
    ) -> None:
        if (tx := res.get_value(0, 0)) is not None:
            self._own(int(tx))
        self.stats.acknowledged += count
        # Key by key: acknowledgements sent without waiting (`_send_acks`) cover what was
        # handed out before them, while more is handed out meanwhile.
        handed_out = self._handed_out
        for k, e in last.items():
            if handed_out.get(k) == (e.tx, e.id):
                del handed_out[k]  # acknowledged: the cursor is the stored position

    def _send_acks(self) -> PQGen:
        """
        `_flush_acks` without waiting for the answer: events from wake-ups go on being handed
        out meanwhile (a wake-up that arrived during the round trip waited for it). The
        answer is taken by `_wait` when it comes, or by `_settle` before any other statement.
        """
        pgconn = self.pgconn
        if not self._deferred or pgconn is None:
            return
        if self._ack_in_flight is not None:  # one at a time: these go once it is answered
            self._ack_due = time.monotonic() + self.config.ack_delay
            return
        yield from self._settle()
        if "ack" not in self._prepared:
            yield from self._run(self._prepare(pgconn, "ack"))
        deferred, count = self._deferred, self._deferred_count
        self._deferred, self._deferred_count, self._ack_due = {}, 0, math.inf
        events = list(deferred.values())
        _, values = sql.bound("ack", _ack_params(self.config.group, events))
        try:
            pgconn.send_query_prepared(_statement("ack"), values)
            flushed = pgconn.flush() == 0
        except psycopg.OperationalError as exc:
            raise _Lost(pgwire.one_line(exc)) from None
        deadline = time.monotonic() + self.config.health_check_timeout
        self._ack_in_flight = _Ack(deferred, count, deadline)
        if not flushed:  # a full socket buffer (rare): no point in going on meanwhile
            yield from self._settle()

    def _settle_ack(self) -> PQGen:
        ack, self._ack_in_flight = self._ack_in_flight, None
        if ack is None:
            return
        pgconn = self.pgconn
        assert pgconn is not None
        try:
            (res,) = yield from self._run(pgwire.finish(pgconn, ack.deadline))
        except HeraldError as exc:
            if exc.sqlstate != "26000":
                raise
            self._prepared.discard("ack")  # gone (a handler ran DEALLOCATE ALL): again
            yield from self.ack(list(ack.last.values()), count=ack.number)
            return
        self._acknowledged(res, ack.last, ack.number)

    def _flush_acks(self) -> PQGen:
        """Acknowledge the events from wake-ups not acknowledged yet (see `ack_delay`)."""
        yield from self._settle_ack()  # (those sent already)
        if not self._deferred:
            return
        deferred, count = self._deferred, self._deferred_count
        self._deferred, self._deferred_count, self._ack_due = {}, 0, math.inf
        yield from self.ack(list(deferred.values()), count=count)

    def ack_handed_out(self, events: Sequence[Event]) -> PQGen:
        """After the application left an iteration early: acknowledge what it finished."""
        if self.pgconn is None or self._broken:
            return
        try:
            yield from self._flush_acks()
            if not events:
                return
            if self._redelivering:  # dead letters: no position to move (it is past them)
                yield from self._settle()
                params = _redelivered_params(self.config.group, events)
                yield from self._query("redelivered", params)
            else:
                yield from self.ack(events)
        except (_Lost, _Stopped) as exc:
            logger.info("could not acknowledge on the way out (%r): they come again", exc)

    # -- the loop --

    def run(self) -> PQGen:
        """Read, hand out and acknowledge until `stopping`, reconnecting whenever needed."""
        linger_until = 0.0
        step = 0.002
        while not self.stopping:
            try:
                if self.pgconn is None or self._broken:
                    yield from self._recover(_Lost("not connected"))
                    continue
                # One clock reading for the chores (this runs once per wake-up: a wake-up that
                # carries its event goes from here to its handler).
                now = time.monotonic()
                if now >= self._next_rebalance:
                    yield from self.rebalance()
                if now >= self._release_at:
                    yield from self._release()
                if now >= self._maintain_at:
                    yield from self._maintain()
                if now >= self._status_at:
                    yield from self._write_status()
                if now >= self._next_redelivery and (yield from self._redeliver()):
                    continue
                if self._direct:
                    if self._notes:
                        rows = self._note_events()
                        if rows:
                            yield from self._deliver_rows(rows)
                        if self._ack_first:
                            self._ack_first = False
                            yield from self._settle()
                        if self._direct:
                            continue
                    else:
                        now = time.monotonic()
                        if now >= self._skips_check_at:
                            yield from self._check_skips()
                            continue
                        if now >= self._ack_due:
                            yield from self._send_acks()
                            continue
                        if now < self._poll_at:
                            until = min(self._poll_at, self._ack_due, self._skips_check_at)
                            yield from self._wait(until)
                            continue
                        self._poll_at = now + self.config.poll_interval  # read all the same
                if (
                    self._need_horizon
                    and self._waiting
                    and self._secret is not None
                    and time.monotonic() >= self._horizon_after
                ):
                    yield from self._horizon()
                    step = 0.002  # then read at growing intervals until it is safe
                events = yield from self.fetch()
                if events:
                    if self._waiting and self._saturated:
                        yield from self._busy()  # behind: no wake-ups needed for a while
                    yield from self._deliver(events)
                    yield from self._maybe_direct()
                    now = time.monotonic()
                    linger_until = now + self.config.linger
                    if not self._saturated and self._waiting and not self._woken:
                        # Caught up, and publishers announce commits: the next read comes with
                        # a wake-up, or the linger's next step, not at once (an empty round
                        # trip that a wake-up arriving meanwhile would wait behind).
                        yield from self._wait(min(now + 0.002, linger_until))
                    continue
                yield from self._maybe_direct()
                if self._direct:
                    continue
                if self._woken:  # a commit was announced while we read: read again now
                    self._woken = False
                    linger_until = time.monotonic() + self.config.linger
                    continue
                now = time.monotonic()
                if now < linger_until:
                    # Writers that did not send a wake-up may commit just after one that did.
                    yield from self._wait(min(now + 0.002, linger_until))
                    continue
                if not self._waiting:
                    # Ask publishers for wake-ups, then read once more: one that committed
                    # before we asked sent none.
                    if not (yield from self._ask_for_wakeups()):
                        yield from self._wait(now + 0.002)  # a publisher's probe: retry
                    step = 0.002
                    continue
                if self._unsafe_before is not None:
                    # A writer that looked before we asked may still commit, unannounced: read
                    # again (at growing intervals) until every such transaction has ended.
                    if (yield from self._wakeups_safe()):
                        continue  # one last read, then wake-ups cover everything
                    yield from self._wait(now + step)
                    step = min(step * 2, self.config.poll_interval)
                    continue
                until = now + self.config.poll_interval
                if self._need_horizon and self._secret is not None:
                    # A wake-up we could not use: an event it announced may wait behind an
                    # older transaction, which may end unannounced. The horizon's reads
                    # (above) find it when it has ended.
                    until = min(until, self._horizon_after)
                if (yield from self._wait(until)):
                    linger_until = time.monotonic() + self.config.linger
            except _Stopped:
                break
            except _Lost as lost:
                if self.stopping:
                    break
                yield from self._recover(lost)
        try:
            # One stop grace for all of it (each statement would have its own).
            yield from self._guard(self._way_out())
        except _Stopped:
            logger.info("stopped before the last acknowledgements: they come again")

    def _way_out(self) -> PQGen:
        yield from self._ack_on_the_way_out()
        yield from self._remove_status()

    def _ack_on_the_way_out(self) -> PQGen:
        sent = self._ack_in_flight is not None
        if (self._deferred or sent) and self.pgconn is not None and not self._broken:
            try:
                yield from self._flush_acks()
            except (_Lost, _Stopped, HeraldError) as exc:
                logger.info("could not acknowledge on the way out (%r): they come again", exc)

    def _wait(self, until: float) -> PQGen:
        """Wait for a wake-up until *until*; probe the connection when it has been quiet."""
        pgconn = self.pgconn
        assert pgconn is not None
        yield from self._settle_read()  # (not an acknowledgement's answer: taken below)
        if self._woken:  # heard while settling: no need to wait
            self._woken = False
            return True
        ack = self._ack_in_flight
        if ack is not None and ack.deadline < until:
            until = ack.deadline
        if self._next_probe <= until:
            until = max(time.monotonic(), self._next_probe)
        if self._release_at < until:  # a delayed event falls due
            until = max(time.monotonic(), self._release_at)
        if self._status_at < until:  # the status row is due
            until = max(time.monotonic(), self._status_at)
        ready = yield (WAIT, pgconn.socket, pgwire.READ, until)
        if ready:
            try:
                pgconn.consume_input()
            except psycopg.OperationalError as exc:
                raise _Lost(pgwire.one_line(exc)) from None
            if pgconn.status == pq.ConnStatus.BAD:
                raise _Lost(pgwire.error_text(pgconn))
            self._alive_at = time.time()
            self._drain()
            if ack is not None and not pgconn.is_busy():
                yield from self._settle_ack()  # its answer is in: this does not wait
        elif ack is not None and time.monotonic() >= ack.deadline:
            # No answer: _Lost. (While wake-ups keep coming, the next statement's _settle
            # enforces the deadline: a read at poll_interval, a rebalance.)
            yield from self._settle_ack()
        elif time.monotonic() >= self._next_probe and not self.stopping:
            yield from self._probe()
        woken, self._woken = self._woken, False
        return woken

    def _ask_for_wakeups(self) -> PQGen:
        yield from self._settle()
        (res,) = yield from self._query("wait_for_wakeups", {})
        self._waiting = res.get_value(0, 0) == b"t"
        if self._waiting:
            self._unsafe_before = (res.get_value(0, 1) or b"0").decode()
            self._own(int(self._unsafe_before))
            self._safe_seq = self._read_seq
            if self._secret is not None:
                yield from self._horizon()
        return self._waiting

    def _wakeups_safe(self) -> PQGen:
        yield from self._settle()
        (res,) = yield from self._query("wakeups_safe", {"xmax": self._unsafe_before})
        if res.get_value(0, 0) == b"t":
            self._unsafe_before = None
            self._safe_seq = self._read_seq  # the reads from now on see all the unannounced
        return self._unsafe_before is None

    def _busy(self) -> PQGen:
        yield from self._settle()
        yield from self._query("busy", {})
        self._waiting = False
        self._leave_direct()
        if self._notes_key:
            yield from self._query("no_notes", {})
            self._notes_key = False

    # -- events from wake-ups --
    #
    # A waiting consumer that is caught up gets a wake-up for each commit, which carries the
    # event (a "note", see schema.sql wake_note_v1). Handing it out without a read saves a
    # round trip and the read's time, when nothing that sorts before it (in its channel and
    # partition) can still be missing:
    # * each event older than the horizon's transaction id W was read, by a read sent after
    #   every such transaction had ended (wakeups_safe, or a note newer than W with "alone");
    # * each event newer than W, a publisher saw us waiting for: it sent a wake-up, or it
    #   counted a skip (the note's skips would differ from ours, read before W);
    # * so, for a note that says "alone" (every transaction older than it had ended when it
    #   was stored) and no skip: every older event's wake-up came before it. Each of those we
    #   handed out ourselves, or a read sent after its wake-up covered it (when that note said
    #   "alone" too), or we stopped handing out from wake-ups.
    # Anything else (a wake-up without its event, a note that is not "alone" or counts a skip,
    # a note that does not check out, a change of partitions or channels) ends it: read as
    # before, take a new horizon, and start again once a read covers what was heard.

    def _check_from_wakeups(self) -> PQGen:
        """At connection: may events come from wake-ups (a secret to check notes with)?"""
        self._secret = None
        if not self.config.from_wakeups or self.conn is None:
            return
        try:
            (res,) = yield from self._query("blind_wake_senders", {})
            blind = int(res.get_value(0, 0) or b"0")
            if blind:
                logger.info(
                    "events come from reads only: %d function(s) in schema pgherald send "
                    "wake-ups the old way (triggers added by an earlier version: add them again)",
                    blind,
                )
                return
            (res,) = yield from self._query("wake_secret", {})
        except HeraldError as exc:  # no SELECT on wake_secret_v1, an older schema
            logger.info("events come from reads only: %s", exc)
            return
        if res.ntuples != 1 or not res.get_value(0, 0):
            return
        self._secret = res.get_value(0, 0)
        self._tz = self.conn.info.timezone

    def _horizon(self) -> PQGen:
        """
        Start proving wake-ups complete: ask for notes, read the skip count, then take a
        transaction id after it.
        """
        yield from self._settle()
        held = "true" if self._notes_key else "false"
        (res,) = yield from self._query("wake_horizon", {"held": held})
        if res.get_value(0, 0) != b"t":  # a publisher held key 18 this instant
            self._horizon_after = time.monotonic() + 0.002
            return
        self._notes_key = True
        self._skips = int(res.get_value(0, 1) or b"-1")
        tx = res.get_value(0, 2) or b"0"
        self._horizon_tx = int(tx)
        self._own(self._horizon_tx)
        self._unsafe_before = tx.decode()
        self._safe_seq = self._horizon_seq = self._read_seq
        self._notes = []  # their commits came before: the reads from now on cover them
        self._need_horizon = False

    def _leave_direct(self) -> None:
        if self._direct:
            self._direct = False
            self._woken = True  # read what the wake-ups left unused announced
        self._need_horizon = True
        self._skips_check_at = math.inf

    def _doubt(self) -> None:
        """A wake-up we cannot use: a new horizon, after a pause that grows while it lasts."""
        self._leave_direct()
        self._horizon_delay = min(max(0.002, self._horizon_delay * 2), self.config.poll_interval)
        self._horizon_after = time.monotonic() + self._horizon_delay

    def _maybe_direct(self) -> PQGen:
        """
        After a read that left nothing behind: start handing out from wake-ups, if every
        wake-up heard before the read was sent is covered by it, and the read came after
        every transaction older than the horizon had ended.
        """
        read = self._last_read
        if (
            self._direct
            or self._secret is None
            or not self._waiting
            or self._need_horizon
            or self._saturated
            or self._handed_out
            or read is None
            or read.seq <= self._horizon_seq  # sent before the horizon: notes were reset
        ):
            return
        safe = self._unsafe_before is None and read.seq > self._safe_seq
        wanted = self._wanted()
        for text in self._notes[: read.notes]:
            note = self._parse_note(text)
            if note is None:
                self._doubt()
                return
            if note.tx < self._horizon_tx:
                continue  # a read after safe covers it
            alone = self._alone(note)
            if note.skips != self._skips or (
                not alone and note.channel in wanted and note.partition in self.owned
            ):
                self._doubt()
                return
            if alone and note.tx > self._horizon_tx:
                safe = True  # every transaction older than the horizon had ended
        if not safe:
            return
        missing = [k for k in ((c, p) for c in wanted for p in self.owned) if k not in self._cursor]
        if missing:
            yield from self._settle()
            params = {
                "group": self.config.group,
                "channels": text_array(sorted({c for c, _ in missing})),
                "partitions": _array(sorted({p for _, p in missing})),
            }
            (res,) = yield from self._query("positions_of", params)
            for i in range(res.ntuples):
                channel = (res.get_value(i, 0) or b"").decode()
                partition = int(res.get_value(i, 1) or b"0")
                tx = (res.get_value(i, 2) or b"0").decode()
                self._cursor.setdefault(
                    (channel, partition), (tx, int(res.get_value(i, 3) or b"0"))
                )
            if any(k not in self._cursor for k in missing):
                return  # not registered yet
        self._unsafe_before = None
        self._notes = self._notes[read.notes :]
        self._poll_at = time.monotonic() + self.config.poll_interval
        self._direct = True
        self._horizon_delay = 0.0
        logger.debug("handing out events from wake-ups")

    def _own(self, tx: int) -> None:
        """Note a transaction of our own: it publishes nothing (see `_alone`)."""
        own = self._own_txs
        own.append(tx)
        if len(own) > 32:
            del own[:16]

    def _alone(self, note: _Note) -> bool:
        """Had every transaction older than *note*'s that may publish ended when it was stored?"""
        return note.older is not None and note.older.issubset(self._own_txs)

    def _wanted(self) -> frozenset[str]:
        return self.config.channels or frozenset(self._every)

    def _note_events(self) -> list[tuple[Any, ...]]:
        """The rows (as a read gives them) of the notes heard, up to one we cannot use."""
        rows: list[tuple[Any, ...]] = []
        notes, self._notes = self._notes, []
        wanted = self._wanted()
        owned = self.owned
        cursor = self._cursor
        if notes:
            # A publisher that sent no wake-up (another was sending one) may commit just
            # after: once the linger is over, a look at the skip count tells. A later note
            # tells as well (each carries the count, read after any such skip), so every note
            # puts the look off: a steady stream of notes needs none.
            self._skips_check_at = time.monotonic() + self.config.linger
        for i, text in enumerate(notes):
            note = self._parse_note(text)
            if note is None or note.skips != self._skips:  # a wake-up not sent: read
                self._doubt()
                break
            if note.channel not in wanted or note.partition not in owned:
                continue
            if note.tx < self._horizon_tx:
                continue  # a read after every such transaction had ended covered it
            k = (note.channel, note.partition)
            at = cursor.get(k)
            if at is None:
                self._doubt()
                break
            if (note.tx, note.id) <= (int(at[0]), at[1]):
                continue  # a read handed it out already
            if not self._alone(note):  # (its skip count was checked above)
                if self._ack_in_flight is not None:
                    # It may list our acknowledgement's transaction, whose id its answer
                    # tells: look again once it is in.
                    self._notes = notes[i:]
                    self._ack_first = True
                    break
                self._doubt()
                break
            tx = str(note.tx)
            created = _EPOCH + timedelta(microseconds=note.created_us)
            if self._tz is not timezone.utc:
                created = created.astimezone(self._tz)
            rows.append(
                (
                    note.id,
                    tx,
                    note.channel,
                    note.key,
                    note.payload,
                    note.headers,
                    created,
                    note.partition,
                )
            )
            cursor[k] = (tx, note.id)
        return rows

    def _deliver_rows(self, rows: list[tuple[Any, ...]]) -> PQGen:
        events = self._decode(rows)
        for e in events:
            self._handed_out[e.channel, e.partition] = (e.tx, e.id)
        self.stats.from_wakeups += len(events)
        yield from self._deliver(events, defer=True)

    def _check_skips(self) -> PQGen:
        self._skips_check_at = math.inf
        yield from self._settle()
        (res,) = yield from self._query("wake_skips", {})
        if int(res.get_value(0, 0) or b"-1") != self._skips:
            self._doubt()

    def _parse_note(self, text: str | None) -> _Note | None:
        """A note checked against the secret and parsed; None: not one (or not ours)."""
        secret = self._secret
        if text is None or secret is None or not text.startswith(_NOTE_PREFIX):
            return None
        try:
            mac, body = text[len(_NOTE_PREFIX) :].split("|", 1)
            raw = body.encode()
            inner = hashlib.sha256(secret + raw).hexdigest().encode()
            if not hmac.compare_digest(hashlib.sha256(secret + inner).hexdigest(), mac):
                return None
            f = body.split("|", 9)
            lc, lk, lh = int(f[6]), int(f[7]), int(f[8])
            tail = f[9]
            key_at, headers_at = lc, lc + max(lk, 0)
            payload_at = headers_at + max(lh, 0)
            older = f[4]
            return _make_note(  # per wake-up: no NamedTuple __new__ in Python
                _Note,
                (
                    int(f[0]),
                    int(f[1]),
                    int(f[2]),
                    int(f[3]),
                    _older(older) if older else _NONE_OLDER,  # usually none
                    int(f[5]),
                    tail[:lc],
                    None if lk < 0 else tail[key_at:headers_at],
                    None if lh < 0 else tail[headers_at:payload_at],
                    tail[payload_at:],
                ),
            )
        except (ValueError, IndexError):
            return None

    def _release(self) -> PQGen:
        """Move due delayed events into the log (any consumer may: each moves exactly once)."""
        yield from self._settle()
        try:
            (res,) = yield from self._query("release_scheduled", {"limit": scheduled.RELEASE_LIMIT})
        except HeraldError as exc:  # an older schema, no privilege: `schedule run` can do it
            self._release_at = math.inf
            logger.warning("this consumer does not release delayed events: %s", exc)
            return
        row = [res.get_value(0, i) for i in range(4)]
        self._release_at = self._releases.next(time.monotonic(), row)
        released = int(row[0] or b"0")
        if released:
            self._woken = True  # our own wake-up is on its way: read now
            self._leave_direct()  # events of our own transaction: no note announces them
            logger.debug("released %d delayed events", released)

    def _maintain(self) -> PQGen:
        """
        The log's maintenance (partitions ahead, retention: see ``_maintain.py``), by any
        consumer once per ``maintain_interval`` (the server runs one at a time).
        """
        interval = self.config.maintain_interval
        self._maintain_at = math.inf if interval is None else time.monotonic() + interval
        yield from self._settle()
        try:
            (res,) = yield from self._query("maintain", {"now": None}, timeout=MAINTAIN_TIMEOUT)
        except HeraldError as exc:  # no privilege, say: `pgherald maintain` from cron can
            self._maintain_at = math.inf
            if exc.sqlstate == "22008":  # datetime_field_overflow: now() - a retention
                logger.warning(
                    "this consumer does not maintain the log: a retention setting reaches back "
                    "before PostgreSQL's first date (stored before they were checked): set it "
                    "again with `pgherald retention set` (`pgherald maintain` names it)"
                )
            else:
                logger.warning("this consumer does not maintain the log: %s", exc)
            return
        for i in range(res.ntuples):
            action, target, detail = (
                (res.get_value(i, j) or b"").decode("utf-8", "replace") for j in range(3)
            )
            level = logging.WARNING if action in {"pinned", "abandoned", "idle"} else logging.INFO
            logger.log(level, "maintain: %s %s: %s", action, target, detail)

    def _write_status(self) -> PQGen:
        """Write our `StatusRow` (between reads; a statement of well under a millisecond)."""
        row = self.config.status_row
        pgconn = self.pgconn
        assert row is not None
        assert pgconn is not None
        self._status_at = time.monotonic() + row.interval
        yield from self._settle()
        params = {"name": row.name, "value": row.value(pgconn.backend_pid)}
        try:
            yield from self._query("status_row_set", params)
        except HeraldError as exc:  # no privilege on settings_v1, say: relaying goes on
            self._status_at, self._status_off = math.inf, True
            logger.warning("`pgherald status` will not show this relay's rate: %s", exc)

    def _remove_status(self) -> PQGen:
        """On the way out of `run`: remove our `StatusRow` (within the stop's grace time)."""
        row = self.config.status_row
        if row is None or self._status_off or self.pgconn is None or self._broken:
            return
        try:
            yield from self._settle()
            yield from self._query("status_row_delete", {"name": row.name})
        except (_Lost, _Stopped, HeraldError) as exc:
            logger.info("could not remove the status row %r (%s): it goes stale", row.name, exc)

    def _probe(self) -> PQGen:
        pgconn = self.pgconn
        assert pgconn is not None
        self.stats.health_checks += 1
        yield from self._settle()
        deadline = self._deadline()
        yield from self._run(liveness.probe(pgconn, self._ping, deadline, self._heard))
        self._alive_at = time.time()
        self._next_probe = time.monotonic() + self.config.health_check_interval

    def _deliver(
        self, events: list[Event], *, redelivery: bool = False, defer: bool = False
    ) -> PQGen:
        """
        Hand *events* to the runtime; retry failed handlers with backoff; dead-letter what
        cannot be decoded or keeps failing; acknowledge what is done (for a *redelivery*:
        delete its dead letters).
        """
        self._redelivering = redelivery
        channels = self.config.channels
        wanted = [e for e in events if e.channel in channels] if channels else events
        poison = self._undecodable
        self.stats.received += (
            len(wanted) - sum(e.id in poison for e in wanted) if poison else len(wanted)
        )
        cfg = self.config
        first, handler = 0, 0
        attempts, failed_at, at = 0, 0.0, (-1, -1)
        while first < len(wanted):
            if poison and wanted[first].id in poison:
                if self.stopping:
                    break
                event = wanted[first]
                logger.error(
                    "event %d (%s) cannot be decoded; dead-lettered (%s)",
                    event.id,
                    event.channel,
                    poison[event.id],
                )
                yield from self._dead_letter(event, poison[event.id], 1, time.time())
                first, handler = first + 1, 0
                continue
            end = len(wanted)
            if poison:  # hand out up to the next event that cannot be decoded
                end = next((i for i in range(first, end) if wanted[i].id in poison), end)
            batch = wanted if end == len(wanted) else wanted[:end]
            done, failed, error = yield (BATCH, batch, first, handler)
            if failed is None:
                first, handler = done, 0
                if done < end:
                    break  # stopping
                continue
            first, handler = done, failed
            event = wanted[first]
            if (first, handler) != at:  # another handler, or event, fails: count afresh
                attempts, failed_at, at = 0, time.time(), (first, handler)
            entry = self._entries(event.channel)[failed][0]
            counted = False
            if error is NEEDS_TX:
                timeouts, first_at = self._timeouts.get(event.id, (0, 0.0))
                if timeouts > attempts:  # attempts given up on earlier connections count
                    attempts, failed_at = timeouts, first_at
                if attempts < cfg.max_attempts:
                    error = yield from self._transaction(event, entry, attempts, failed_at)
                    if error is None:
                        self._timeouts.pop(event.id, None)
                        handler += 1
                        attempts, at = 0, (-1, -1)
                        continue
                else:  # each attempt was counted when given up: dead-lettered below
                    attempts, counted = attempts - 1, True
                    error = TimeoutError(
                        f"its transaction outlasted transaction_timeout "
                        f"({cfg.transaction_timeout:g}s)"
                    )
            attempts += 1
            if not counted:
                self.stats.handler_errors += 1
            # A payload that does not validate as the handler's model fails every time.
            retry = not isinstance(error, PayloadInvalid)
            if retry and attempts < cfg.max_attempts and not self.stopping:
                delay = backoff_delay(attempts, initial=cfg.retry_delay, cap=cfg.retry_max_delay)
                logger.warning(
                    "handler failed on event %d (%s), attempt %d of %d (%s); retrying in %.2fs",
                    event.id,
                    event.channel,
                    attempts,
                    cfg.max_attempts,
                    pgwire.one_line(error),
                    delay,
                    exc_info=error,
                )
                yield (SLEEP, time.monotonic() + delay)
                if self.stopping:
                    break  # not acknowledged: it comes again
                continue
            if self.stopping:
                break
            self.stats.skipped += 1
            logger.error(
                "handler failed on event %d (%s) %d times; dead-lettered",
                event.id,
                event.channel,
                attempts,
                exc_info=error,
            )
            name = getattr(entry, "__qualname__", None) or repr(entry)
            text = f"handler {name} failed {attempts} times: {_error_text(error)}"
            yield from self._dead_letter(event, text, attempts, failed_at)
            self._timeouts.pop(event.id, None)
            handler += 1
            attempts, at = 0, (-1, -1)
        if redelivery:
            if first:
                yield from self._settle()
                params = _redelivered_params(cfg.group, wanted[:first])
                (res,) = yield from self._query("redelivered", params)
                self.stats.redelivered += res.command_tuples or 0  # not those dead again
        elif first >= len(wanted) and defer and self.config.ack_delay > 0:
            for e in events:  # acknowledged by _flush_acks
                self._deferred[e.channel, e.partition] = e
            self._deferred_count += len(events)
            self._ack_due = min(self._ack_due, time.monotonic() + self.config.ack_delay)
        elif first >= len(wanted):
            # Everything we wanted is done (a read holds the channels we read only).
            yield from self.ack(events)
        else:
            yield from self._flush_acks()
            yield from self.ack(wanted[:first])

    def _dead_letter(
        self, event: Event, error: str, attempts: int, first_failed_at: float
    ) -> PQGen:
        """Store *event*'s dead letter and move the group past it: one statement, both or none."""
        yield from self._flush_acks()
        yield from self._settle()
        params = {
            "group": self.config.group,
            "event_id": event.id,
            "tx": event.tx,
            "channel": event.channel,
            "partition": event.partition,
            "error": error[:_MAX_ERROR],
            "attempts": attempts,
            "first_failed_at": repr(first_failed_at),
        }
        if self._no_dead_letters:  # an older schema: give up as before, with the log line
            yield from self.ack([event])
            return
        try:
            yield from self._query("dead_letter", params)
        except SchemaMissing as exc:
            self._schema_too_old(exc)
            yield from self.ack([event])
            return
        self.stats.dead_lettered += 1

    def _schema_too_old(self, exc: SchemaMissing) -> None:
        """No dead-letter table (the schema predates it): keep consuming, say how to upgrade."""
        self._no_dead_letters = True
        logger.warning("dead letters are off: %s (until then, events given up are logged)", exc)

    def _redeliver(self) -> PQGen:
        """
        Hand out again the group's dead letters asked to be redelivered (`pgherald.redeliver`),
        in our partitions, in the group's order: checked once per ``rebalance_interval``, before
        the next read. Only the member holding an event's partition hands it out, so each one is
        handled once more (at least once across a crash, like every event).
        """
        now = time.monotonic()
        if now < self._next_redelivery or not self.owned or self._no_dead_letters:
            return False
        self._next_redelivery = now + self.config.rebalance_interval
        yield from self._settle()
        limit = self.config.batch_size
        params = {
            "group": self.config.group,
            "partitions": _array(self.owned),
            "channels": text_array(self.config.channels) if self.config.channels else None,
            "limit": limit,
        }
        try:
            (res,) = yield from self._query("pending_redeliveries", params, prepared=True)
        except SchemaMissing as exc:
            self._schema_too_old(exc)
            return False
        if not res.ntuples:
            return False
        if res.ntuples >= limit:
            self._next_redelivery = 0.0  # more are waiting: next turn
        assert self._rows is not None
        self._rows.set_pgresult(res, set_loaders=True, format=pq.Format.TEXT)
        events = self._decode(self._rows.load_rows(0, res.ntuples, tuple))
        logger.info("redelivering %d dead letters", len(events))
        yield from self._deliver(events, redelivery=True)
        return True

    def _transaction(
        self, event: Event, handler: Callable[..., Any], attempts: int, failed_at: float
    ) -> PQGen:
        """
        BEGIN, the handler, the acknowledgement, COMMIT: all of it, or none of it. *attempts*
        failed before (the first at *failed_at*): a give-up at transaction_timeout adds one.
        """
        pgconn = self.pgconn
        assert pgconn is not None
        yield from self._flush_acks()
        yield from self._settle()
        yield from self._run(pgwire.execute(pgconn, _BEGIN, self._deadline()))
        error = yield (TX, event, handler, self.conn)
        if error is ABANDONED:
            logger.warning(
                "a transactional handler still ran on event %d (%s) %gs after stop(): its "
                "transaction was abandoned (rolled back), the event comes again",
                event.id,
                event.channel,
                self.config.stop_timeout,
            )
            self._broken = True  # the connection's state is unknown: it goes
            raise _Lost("transactional handler abandoned after stop()")
        if error is TIMED_OUT:
            timeouts = self._timeouts
            n = attempts + 1  # with the failed attempts before it (given up ones included)
            timeouts.pop(event.id, None)  # to the end: the oldest go first
            timeouts[event.id] = (n, failed_at if attempts else time.time())
            if len(timeouts) > 1000:  # events whose partition went to another member
                del timeouts[next(iter(timeouts))]
            self.stats.handler_errors += 1
            logger.warning(
                "a transactional handler ran on event %d (%s) for transaction_timeout (%gs): "
                "its transaction was given up (rolled back), attempt %d of %d",
                event.id,
                event.channel,
                self.config.transaction_timeout,
                n,
                self.config.max_attempts,
            )
            self._broken = True  # as above; the event comes again on a new connection
            raise _Lost("transactional handler outlasted transaction_timeout")
        if self.pgconn is pgconn and pgconn.transaction_status == pq.TransactionStatus.ACTIVE:
            self._broken = True  # a statement of the handler's still in flight
            raise _Lost("a transactional handler returned with a statement still running")
        if self.pgconn is not pgconn or pgconn.status == pq.ConnStatus.BAD:
            raise _Lost("connection lost in a transactional handler")
        if error is None:
            try:
                gone = 0
                if self._redelivering:  # a dead letter: done with it, exactly once
                    params = _redelivered_params(self.config.group, [event])
                    (res,) = yield from self._query("redelivered", params)
                    gone = res.command_tuples or 0
                else:
                    yield from self._query("ack", _ack_params(self.config.group, [event]))
                yield from self._run(pgwire.execute(pgconn, b"COMMIT", self._deadline()))
                self.stats.redelivered += gone
            except HeraldError as exc:
                error = exc
        if error is not None and pgconn.transaction_status != pq.TransactionStatus.IDLE:
            yield from self._run(pgwire.execute(pgconn, b"ROLLBACK", self._deadline()))
        self._drain()
        return error

    def _recover(self, lost: _Lost) -> PQGen:
        cfg = self.config
        if self._outage is None:
            self._outage = (self._alive_at, str(lost))
        logger.warning("consumer connection lost (%s); reconnecting", lost)
        if self.pgconn is not None and self._session is not None:
            # Maybe half-open: the server may keep the session, and its locks, for a long time.
            self._previous = self._session
        self.close()
        error = str(lost)
        attempt = 0
        permanent = pgwire.PermanentFailures()
        while True:
            if self.stopping:
                return
            if cfg.reconnect_max_attempts is not None and attempt >= cfg.reconnect_max_attempts:
                raise ConnectionLost(
                    f"consumer connection lost and not recovered after {attempt} reconnect "
                    f"attempts (reconnect_max_attempts={cfg.reconnect_max_attempts}): {error}"
                )
            attempt += 1
            delay = backoff_delay(
                attempt, initial=cfg.reconnect_initial_delay, cap=cfg.reconnect_max_delay
            )
            yield (SLEEP, time.monotonic() + delay)
            if self.stopping:
                return
            try:
                yield from self.open()
                break
            except (ConnectError, _Lost) as exc:
                error = str(exc)
                self.stats.connect_failures += 1
                if permanent.give_up(error):
                    raise ConnectionLost(
                        f"could not reconnect after {attempt} attempts: {error}"
                    ) from None
                logger.info("reconnect attempt %d failed (%s)", attempt, error)
        started, first_error = self._outage
        self._outage = None
        gap = Gap("reconnect", started, time.time(), first_error, attempt)
        self.stats.reconnects += 1
        self.stats.gaps.append(gap)
        logger.info("consumer reconnected after %.2fs", gap.ended - gap.started)
        yield (REPORT, gap)


# The consumer's session is tuned for its own statements (open): its read is one short range
# per (channel, partition), each a LIMIT over an ordered index scan of every day partition.
# Left to itself the planner takes a bitmap scan of each range's whole remaining backlog (and
# a sequential scan of the empty day partitions ahead, which rules out a merge of ordered
# scans), then sorts: a read of 1,000 rows from a long backlog fetches all of it, every time.
# work_mem: the read's final sort holds up to max_batch_bytes of rows. Acknowledgements need
# no WAL flush of their own (a lost one only redelivers; `synchronous_acks`). No JIT: with
# sequential scans off, a scan of a one-row table (the wake-up skip count, settings) costs
# 1e10 to the planner, past jit_above_cost, and every such statement compiled for 5 to 50 ms.
_SETTINGS = (
    b"SET enable_bitmapscan = off; SET enable_seqscan = off; SET jit = off; "
    b"SELECT set_config('work_mem', CASE WHEN pg_size_bytes(current_setting('work_mem')) "
    b"< 33554432 THEN '32MB' ELSE current_setting('work_mem') END, false)"
)
# A transactional handler's transaction runs the application's statements: with the settings
# the session would have without ours (the server's, role's, database's, connection's).
_BEGIN = (
    b"BEGIN; SET LOCAL enable_bitmapscan TO DEFAULT; SET LOCAL enable_seqscan TO DEFAULT; "
    b"SET LOCAL jit TO DEFAULT; "
    b"SET LOCAL work_mem TO DEFAULT; SET LOCAL synchronous_commit TO DEFAULT"
)


# PostgreSQL 14+: a statement whose client went away ends within a second (a transactional
# handler's, given up by stop_timeout or transaction_timeout: its locks go with it), not when
# it next writes to the socket. Kept in the handler's transaction (not in _BEGIN's resets).
# Only where nothing set it (a role, the DSN, the server's file may turn it off on purpose);
# a server that cannot check on its platform refuses a value (22023): then without it.
_CHECK_CLIENT = (
    b"; DO $$BEGIN IF (SELECT source FROM pg_settings "
    b"WHERE name = 'client_connection_check_interval') = 'default' THEN "
    b"PERFORM set_config('client_connection_check_interval', '1s', false); END IF; "
    b"EXCEPTION WHEN invalid_parameter_value OR undefined_object THEN NULL; END$$"
)


def _session_settings(cfg: ConsumerConfig, server_version: int) -> bytes:
    settings = _SETTINGS + (_CHECK_CLIENT if server_version >= 140000 else b"")
    if cfg.synchronous_acks:
        return settings
    return settings + b"; SET synchronous_commit = off"


def _ack_params(group: str, events: Iterable[Event]) -> dict[str, Any]:
    events = list(events)
    return {
        "group": group,
        "channels": text_array(e.channel for e in events),
        "partitions": _array(e.partition for e in events),
        "txs": _array(e.tx for e in events),
        "ids": _array(e.id for e in events),
    }


def _redelivered_params(group: str, events: Iterable[Event]) -> dict[str, Any]:
    return {"group": group, "ids": _array(e.id for e in events)}


_MAX_ERROR = 4000
"""Characters of an error kept in a dead letter."""


def _error_text(exc: BaseException | object | None) -> str:
    """A dead letter's error, as text the server stores whatever the exception held: a NUL
    (which PostgreSQL's text refuses, and libpq would cut the text at) or a lone surrogate (an
    OSError about a file name that is not UTF-8) is written as a backslash escape."""
    if isinstance(exc, BaseException):
        text = f"{type(exc).__name__}: {pgwire.one_line(exc)}"
    else:
        try:
            text = repr(exc)
        except Exception:
            text = type(exc).__name__
    text = text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")
    return text[:_MAX_ERROR]


def _events(rows: list[Any], loads: Callable[[str], Any] | None) -> list[Event]:
    make = tuple.__new__  # skips NamedTuple's Python-level __new__: this is per event
    if loads is None:  # raw_payloads: the JSON text as read
        return [make(Event, (r[0], r[2], r[4], r[3], r[5], r[6], r[7], r[1])) for r in rows]
    # One parse for the whole batch: payloads are jsonb as text, always valid JSON, so they
    # join into an array; per call, json.loads costs more than the parsing itself.
    payloads = loads("[" + ",".join([r[4] for r in rows]) + "]")
    return [
        make(Event, (r[0], r[2], p, r[3], None if r[5] is None else loads(r[5]), r[6], r[7], r[1]))
        for r, p in zip(rows, payloads, strict=True)
    ]


def _lasts(values: list[Any], n: int, distinct: int) -> dict[Any, int]:
    """The index of the last of each value among ``values[:n]`` (*distinct* values): from the
    end, so a read's rows are looked at until each range's last is found, usually a few."""
    last: dict[Any, int] = {}
    for i in range(n - 1, -1, -1):
        if values[i] not in last:
            last[values[i]] = i
            if len(last) == distinct:
                break
    return last


def _array(values: Iterable[object]) -> str:
    """A PostgreSQL array literal of ints, or digit strings, or NULLs."""
    return "{" + ",".join("NULL" if v is None else str(v) for v in values) + "}"


def _is_connection_state(exc: pgwire.QueryFailed) -> bool:
    """Errors after which the session is gone or going (shutdown, terminated, crash)."""
    return bool(exc.sqlstate and (exc.sqlstate.startswith("08") or exc.sqlstate.startswith("57P")))


def _failed(exc: pgwire.QueryFailed) -> HeraldError:
    """A statement of ours refused by the server: a HeraldError that says what to do."""
    return _errormap.from_sqlstate(exc.sqlstate, str(exc), doing="consume")
