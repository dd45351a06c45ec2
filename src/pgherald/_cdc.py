"""
Change data capture from the WAL: `ChangeStream` / `AsyncChangeStream`, thin runtimes over
`_protocol.replication`, plus what ``pgherald cdc`` needs (publication and slot management,
status, and `ChangeStream.into_log`).
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql as psql

from . import _errormap, sql
from ._conninfo import connect_error, describe, listener_conninfo
from ._protocol import pgwire
from ._protocol.backoff import backoff_delay
from ._protocol.pgoutput import ChangeEvent, Commit, dumps_value, lsn_to_int
from ._protocol.pgwire import SLEEP, PQGen
from ._protocol.replication import (
    ABORT,
    CHANGE,
    COMMIT,
    NOT_REPLICATION,
    REWIND,
    WAL_LEVEL_HINT,
    ReplicationConfig,
    ReplicationEngine,
    check_name,
    publication_statements,
    publication_undo_statements,
)
from ._protocol.replication import _Lost as _StreamLost
from ._publish import _many_params
from ._triggers import checked_default_channel, resolve_table
from ._waiting import Waiter
from ._waiting_async import AsyncWaiter
from .errors import ConnectError, ConnectionLost, HeraldError, PoolerError, UsageError

logger = logging.getLogger("pgherald.cdc")

Handler = Callable[[ChangeEvent], object]
AsyncHandler = Callable[[ChangeEvent], Awaitable[object] | object]

_REPORT = pgwire.REPORT


class _Base:
    def __init__(
        self,
        dsn: str | None,
        *,
        slot: str,
        tables: Iterable[str],
        publication: str | None,
        create: bool,
        backfill: bool,
        status_interval: float,
        health_check_interval: float,
        health_check_timeout: float,
        connect_timeout: float,
        reconnect_initial_delay: float,
        reconnect_max_delay: float,
        reconnect_max_attempts: int | None,
        read_coalesce: float,
        statement_timeout: float,
    ) -> None:
        if isinstance(tables, str):
            raise UsageError(f"tables must be a list of table names, got the str {tables!r}")
        if not read_coalesce >= 0:
            raise UsageError(f"read_coalesce must be 0 or more seconds, got {read_coalesce!r}")
        if not 0 < statement_timeout < math.inf:
            raise UsageError(
                f"statement_timeout must be a number of seconds above 0, got {statement_timeout!r}"
            )
        self.dsn = dsn
        self.config = ReplicationConfig(
            conninfo=listener_conninfo(dsn, application_name="pgherald-cdc"),
            slot=slot,
            publication=publication,
            tables=tuple(tables),
            create=create,
            backfill=backfill,
            status_interval=status_interval,
            health_check_interval=health_check_interval,
            health_check_timeout=health_check_timeout,
            connect_timeout=connect_timeout,
            reconnect_initial_delay=reconnect_initial_delay,
            reconnect_max_delay=reconnect_max_delay,
            reconnect_max_attempts=reconnect_max_attempts,
            read_coalesce=read_coalesce,
            statement_timeout=statement_timeout,
        )
        self._engine = ReplicationEngine(self.config)
        self._busy = False

    @property
    def slot(self) -> str:
        return self.config.slot

    @property
    def flushed_lsn(self) -> str:
        """The position acknowledged to the server: every transaction before it was handled."""
        return self._engine.flushed_lsn

    @property
    def changes(self) -> int:
        """Changes delivered so far."""
        return self._engine.changes

    @property
    def transactions(self) -> int:
        """Transactions whose changes were all delivered so far."""
        return self._engine.transactions

    def _claim(self) -> ReplicationEngine:
        if self._busy:
            raise UsageError("this change stream is already running: one reader per stream")
        self._busy = True
        return self._engine

    def _steps(self, engine: ReplicationEngine) -> Generator[Any, Any, None]:
        """The engine's run, its first connection's failure named as every command names it."""
        try:
            yield from engine.run()
        except ConnectError as exc:
            text = str(exc)
            if pgwire.POOLER_REFUSES_REPLICATION in text or NOT_REPLICATION in text:
                raise PoolerError(
                    f"cannot open a replication connection at {describe(self.config.conninfo)}: "
                    f"{pgwire.one_line(exc).rstrip('.')}. A pooler is in the way (PgBouncer "
                    "passes replication connections only from version 1.23 on): give the change "
                    "stream a direct DSN to PostgreSQL, or go through PgBouncer 1.23 or later, "
                    "which passes replication connections (and does not list replication in "
                    "ignore_startup_parameters); its log connection, into_log's dsn, may use "
                    "any pooler"
                ) from None
            raise connect_error(self.config.conninfo, text) from None

    def _release(self) -> None:
        """A run ended: the stream may run again (a stop() before a run ends it at once)."""
        self._engine.stopping = False
        self._busy = False


class ChangeStream(_Base):
    """
    Row changes read from a logical replication slot (``pgoutput``), in commit order.

    ``for event in stream`` or ``stream.run(handler)``: every change of a transaction, then the
    next transaction. The slot's position is acknowledged only once the handler returned (the
    iteration asked for the next change) for every change of a transaction, so a crash
    redelivers from the last acknowledged transaction and never skips one. A handler that
    raises stops the stream (its transaction is not acknowledged) and the error propagates.

    *tables* are added to the publication (named like the slot unless *publication*) when
    missing; with *create* (default) the publication and the slot are created when missing.
    *backfill*: when this creates the slot, every existing row is delivered first, as a
    ``READ`` event, from the slot's own snapshot. Reconnects by itself (a restarted server, a
    dropped connection) and resumes from the slot. After *health_check_interval* seconds
    without a message from the server it asks for one; no answer within
    *health_check_timeout* seconds means a half-open connection, which is replaced (and the
    server process that held the slot through it is ended). Reconnection attempts wait
    *reconnect_initial_delay* seconds, doubling up to *reconnect_max_delay* (with jitter).
    While changes keep coming, the stream pauses *read_coalesce* seconds after handling all
    that had arrived, so that one wake-up handles many transactions: less CPU per change, at
    most that much more latency (0: read as soon as anything arrives).

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        slot: str = "pgherald",
        tables: Iterable[str] = (),
        publication: str | None = None,
        create: bool = True,
        backfill: bool = False,
        status_interval: float = 10.0,
        health_check_interval: float = 15.0,
        health_check_timeout: float = 5.0,
        connect_timeout: float = 10.0,
        reconnect_initial_delay: float = 0.1,
        reconnect_max_delay: float = 10.0,
        reconnect_max_attempts: int | None = None,
        read_coalesce: float = 0.005,
        statement_timeout: float = 30.0,
    ) -> None:
        super().__init__(
            dsn,
            slot=slot,
            tables=tables,
            publication=publication,
            create=create,
            backfill=backfill,
            status_interval=status_interval,
            health_check_interval=health_check_interval,
            health_check_timeout=health_check_timeout,
            connect_timeout=connect_timeout,
            reconnect_initial_delay=reconnect_initial_delay,
            reconnect_max_delay=reconnect_max_delay,
            reconnect_max_attempts=reconnect_max_attempts,
            read_coalesce=read_coalesce,
            statement_timeout=statement_timeout,
        )
        self._waiter = Waiter()

    def __enter__(self) -> ChangeStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """End `run` or the iteration soon (from any thread or a signal handler)."""
        self._engine.stopping = True
        self._waiter.wake()

    def close(self) -> None:
        """`stop`: the twin of `AsyncChangeStream.aclose` (the iteration ends at its next step)."""
        self.stop()

    def __iter__(self) -> Iterator[ChangeEvent]:
        engine = self._claim()
        waiter = self._waiter
        waiter.open()
        gen = self._steps(engine)
        send: Any = None
        try:
            while True:
                try:
                    req = gen.send(send)
                except StopIteration:
                    return
                kind = req[0]
                send = None
                if kind == CHANGE:
                    yield req[1]
                elif kind == pgwire.WAIT:
                    send = waiter.wait(req[1], req[2], req[3])
                elif kind == pgwire.SLEEP:
                    waiter.sleep(req[1])
                elif kind == _REPORT:
                    logger.info("%s", req[1])
                elif kind == pgwire.RESOLVE:
                    send = waiter.resolve(req[1], req[2], req[3])
        finally:
            gen.close()
            waiter.close()
            self._release()

    def run(self, handler: Handler) -> None:
        """Call *handler* with every change until `stop`."""
        for event in self:
            handler(event)

    def into_log(self, dsn: str | None = None, *, batch: int = 1000) -> None:
        """
        Store every change in the durable log (`publish_many`, one database transaction per
        source transaction) until `stop`: on channel ``schema.table``, keyed by the primary
        key, with headers ``cdc_slot``, ``cdc_lsn`` and ``cdc_xid``. A transaction already
        stored (a crash after storing it, before acknowledging it) is not stored again: on
        start, the last ``cdc_lsn`` stored for this slot is read, and transactions that
        committed at or before it are skipped. A log connection lost later is opened again (the
        stream's backoff), and the stream starts over from what it acknowledged: nothing is
        stored twice.
        """
        store = _LogStore(dsn if dsn is not None else self.dsn, self.slot, batch, self.config)
        engine = self._claim()
        self._waiter.open()
        try:
            self._waiter.run(store.run(engine, self._steps(engine)))
        finally:
            self._waiter.close()
            self._release()


class AsyncChangeStream(_Base):
    """
    `ChangeStream` for asyncio and trio: ``async for event in stream`` or
    ``await stream.run(handler)`` (the handler may be async).

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        slot: str = "pgherald",
        tables: Iterable[str] = (),
        publication: str | None = None,
        create: bool = True,
        backfill: bool = False,
        status_interval: float = 10.0,
        health_check_interval: float = 15.0,
        health_check_timeout: float = 5.0,
        connect_timeout: float = 10.0,
        reconnect_initial_delay: float = 0.1,
        reconnect_max_delay: float = 10.0,
        reconnect_max_attempts: int | None = None,
        read_coalesce: float = 0.005,
        statement_timeout: float = 30.0,
    ) -> None:
        super().__init__(
            dsn,
            slot=slot,
            tables=tables,
            publication=publication,
            create=create,
            backfill=backfill,
            status_interval=status_interval,
            health_check_interval=health_check_interval,
            health_check_timeout=health_check_timeout,
            connect_timeout=connect_timeout,
            reconnect_initial_delay=reconnect_initial_delay,
            reconnect_max_delay=reconnect_max_delay,
            reconnect_max_attempts=reconnect_max_attempts,
            read_coalesce=read_coalesce,
            statement_timeout=statement_timeout,
        )
        self._waiter = AsyncWaiter()
        self._gen: Generator[Any, Any, Any] | None = None

    async def __aenter__(self) -> AsyncChangeStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()
        self._finish()

    def stop(self) -> None:
        """End `run` or the iteration soon (from any task or thread)."""
        self._engine.stopping = True
        self._waiter.wake()

    def __aiter__(self) -> AsyncChangeStream:
        return self

    async def __anext__(self) -> ChangeEvent:
        """The next change; the previous one counts as handled (see `ChangeStream`)."""
        gen = self._gen
        if gen is None:
            engine = self._claim()
            self._waiter.bind()
            gen = self._gen = self._steps(engine)
            send: Any = None
        else:
            send = None
        waiter = self._waiter
        try:
            while True:
                try:
                    req = gen.send(send)
                except StopIteration:
                    self._finish()
                    raise StopAsyncIteration from None
                kind = req[0]
                send = None
                if kind == CHANGE:
                    event: ChangeEvent = req[1]
                    return event
                if kind == pgwire.WAIT:
                    send = await waiter.wait(req[1], req[2], req[3])
                elif kind == pgwire.SLEEP:
                    await waiter.sleep(req[1])
                elif kind == _REPORT:
                    logger.info("%s", req[1])
                elif kind == pgwire.RESOLVE:
                    send = await waiter.resolve(req[1], req[2], req[3])
        except BaseException:
            self._finish()
            raise

    def _finish(self) -> None:
        gen, self._gen = self._gen, None
        if gen is not None:
            gen.close()
            self._waiter.release()
            self._release()

    async def aclose(self) -> None:
        """End the iteration now (what it handled of a transaction is not acknowledged)."""
        self._finish()

    async def run(self, handler: AsyncHandler) -> None:
        """Call (and await, when async) *handler* with every change until `stop`."""
        try:
            async for event in self:
                result = handler(event)
                if inspect.isawaitable(result):
                    await result
        finally:
            self._finish()

    async def into_log(self, dsn: str | None = None, *, batch: int = 1000) -> None:
        """`ChangeStream.into_log` on asyncio or trio: the same store, the same guarantees."""
        store = _LogStore(dsn if dsn is not None else self.dsn, self.slot, batch, self.config)
        engine = self._claim()
        self._waiter.bind()
        try:
            await self._waiter.run(store.run(engine, self._steps(engine)))
        finally:
            self._waiter.release()
            self._release()


class _LogLost(Exception):
    """The durable log's connection was lost, or gave no answer in time (internal)."""


class _LogStore:
    """
    Stores a change stream's transactions in the durable log (`ChangeStream.into_log`): a
    generator over libpq like the stream's engine, so that a thread (`Waiter`) and asyncio or
    trio (`AsyncWaiter`) drive the same code. One database transaction per source
    transaction, committed before the engine may acknowledge the source transaction.
    """

    def __init__(self, dsn: str | None, slot: str, batch: int, config: ReplicationConfig) -> None:
        self.conninfo = listener_conninfo(dsn, application_name="pgherald-cdc-log")
        self.slot = slot
        self.batch = max(1, batch)
        self.config = config
        self.pending: list[ChangeEvent] = []
        self.pgconn: Any = None
        self.in_tx = False
        self.session: tuple[int, str] | None = None  # (pid, application_name) of pgconn
        self.previous: tuple[int, str] | None = None  # the same, of a connection given up

    def run(
        self, engine: ReplicationEngine, steps: Generator[Any, Any, None]
    ) -> Generator[Any, Any, None]:
        """
        Connect, skip what the log already has, then store every change of *steps* (the
        engine's run) until `stop`. A log connection lost (or silent past the statement
        deadline) after the first is opened again, with the stream's backoff; the stream
        starts over from what it acknowledged, and what the log already has is skipped (during
        the backfill: the backfill starts again, in its snapshot).
        """
        stopping = lambda: engine.stopping  # noqa: E731  (read at every wait)
        gen = steps
        try:
            try:
                yield from self._open(engine, stopping)
            except ConnectError as exc:
                raise connect_error(self.conninfo, str(exc)) from None
            send: Any = None
            throw: BaseException | None = None
            while True:
                try:
                    req = gen.send(send) if throw is None else gen.throw(throw)
                except StopIteration:
                    return
                send = throw = None
                try:
                    send = yield from self._handle(req, engine, stopping)
                except _LogLost as lost:
                    yield from self._recover(engine, stopping, lost)
                    if engine.backfilling:
                        # The backfill is not in the log: it comes again from its first row,
                        # in its snapshot (a new slot's stream cannot go back to it).
                        send = REWIND
                        continue
                    # The transaction in hand is not in the log: the stream goes back to what
                    # it acknowledged (its own reconnection), and the log's last stored
                    # transaction tells what to skip.
                    throw = _StreamLost(f"the durable log's connection was lost ({lost})")
        except pgwire.Abandoned:
            pass  # stopped during a statement: its transaction is not acknowledged
        finally:
            gen.close()
            self._drop()

    def _handle(
        self, req: Any, engine: ReplicationEngine, stopping: Callable[[], bool]
    ) -> Generator[Any, Any, Any]:
        """Carry out one request of the engine; what to send back to it."""
        kind = req[0]
        if kind == CHANGE:
            self.pending.append(req[1])
            if len(self.pending) >= self.batch:
                yield from self._flush(stopping)
        elif kind == COMMIT:
            yield from self._flush(stopping)
            if self.in_tx:
                yield from self._execute(b"COMMIT", None, stopping)
                self.in_tx = False
            commit: Commit = req[1]
            engine.skip_through = max(engine.skip_through, commit.commit_lsn)
        elif kind == ABORT:
            self.pending.clear()
            if self.in_tx and self.pgconn is not None:
                yield from self._execute(b"ROLLBACK", None, stopping)
                self.in_tx = False
        elif kind == _REPORT:
            logger.info("%s", req[1])
        else:  # WAIT, SLEEP, RESOLVE: for the runtime
            return (yield req)
        return None

    def _open(self, engine: ReplicationEngine, stopping: Callable[[], bool]) -> PQGen:
        """Connect the log, and skip through the last transaction it has from this slot."""
        self.pgconn = yield from pgwire.until_stopped(
            pgwire.connect(self.conninfo, time.monotonic() + self.config.connect_timeout),
            stopping,
        )
        self.session = pgwire.identity(self.pgconn)
        yield from self._end_previous(stopping)
        (res,) = yield from self._execute("cdc_last_lsn", {"slot": self.slot}, stopping)
        last = res.get_value(0, 0) if res.ntuples else None
        if last is not None:
            engine.skip_through = max(engine.skip_through, lsn_to_int(last.decode()))

    def _end_previous(self, stopping: Callable[[], bool]) -> PQGen:
        """
        End the session of the connection given up, and wait until it is gone: it may be
        half-open with a COMMIT still on the way, which would store its transaction once more
        after the log was read. Still there after the wait: `_LogLost` (tried again).
        """
        if self.previous is None:
            return
        pid, name = self.previous
        wait = max(1, int(self.config.statement_timeout * 500))  # ms: answered in time
        params = {"wait_ms": wait, "pid": pid, "application_name": name}
        try:
            (res,) = yield from self._execute("end_previous_session", params, stopping)
        except HeraldError as exc:
            if exc.sqlstate not in ("42501", "42883"):  # not allowed; before PostgreSQL 14
                raise
            logger.warning(
                "could not end the durable log's previous session (pid %d): %s; a transaction "
                "it was committing when its connection was lost may be stored twice",
                pid,
                exc,
            )
        else:
            if res.ntuples and res.get_value(0, 0) != b"t":
                raise _LogLost(f"the previous session (pid {pid}) did not end in {wait} ms")
        self.previous = None

    def _recover(
        self, engine: ReplicationEngine, stopping: Callable[[], bool], lost: _LogLost
    ) -> PQGen:
        """Open the log's connection again, with backoff, until it works or `stop`."""
        cfg = self.config
        if self.pgconn is not None and self.session is not None:
            # Maybe half-open: its session may still commit what it was sent (see _open).
            self.previous = self.session
        self._drop()
        attempt = 0
        permanent = pgwire.PermanentFailures()
        error = str(lost)
        while not stopping():
            attempt += 1
            if cfg.reconnect_max_attempts is not None and attempt > cfg.reconnect_max_attempts:
                raise ConnectionLost(
                    f"the durable log's connection was lost and could not be opened again "
                    f"after {attempt - 1} attempts: {error}"
                )
            delay = backoff_delay(
                attempt, initial=cfg.reconnect_initial_delay, cap=cfg.reconnect_max_delay
            )
            logger.warning(
                "the durable log's connection was lost (%s); again in %.2fs", error, delay
            )
            yield (SLEEP, time.monotonic() + delay)
            if stopping():
                return
            try:
                yield from self._open(engine, stopping)
                return
            except (ConnectError, _LogLost) as exc:
                error = str(exc)
                self._drop()
                if permanent.give_up(error):
                    raise ConnectionLost(
                        f"the durable log's connection could not be opened again: {error}"
                    ) from None

    def _drop(self) -> None:
        """Forget the log's connection and the transaction in hand (the server rolls it back)."""
        pgconn, self.pgconn = self.pgconn, None
        self.pending.clear()
        self.in_tx = False
        if pgconn is not None:
            pgconn.finish()

    def _execute(
        self, query: bytes | str, params: dict[str, Any] | None, stopping: Callable[[], bool]
    ) -> Generator[Any, Any, list[Any]]:
        """*query*: a statement (bytes), or the name of a query of queries.sql with *params*."""
        deadline = time.monotonic() + self.config.statement_timeout
        try:
            if isinstance(query, bytes):
                statement = pgwire.execute(self.pgconn, query, deadline)
            else:
                text, values = sql.bound(query, params or {})
                statement = pgwire.execute_params(self.pgconn, text, values, deadline)
            results: list[Any] = yield from pgwire.until_stopped(statement, stopping)
            return results
        except pgwire.QueryFailed as exc:
            raise _errormap.from_sqlstate(
                exc.sqlstate, str(exc), doing="store the changes in the log"
            ) from None
        except pgwire.QueryTimeout:
            raise _LogLost(f"no answer in {self.config.statement_timeout:g}s") from None
        except Exception as exc:
            if pgwire.is_connection_error(exc):
                raise _LogLost(pgwire.one_line(exc)) from None
            raise

    def _flush(self, stopping: Callable[[], bool]) -> Generator[Any, Any, None]:
        """Publish the pending changes, one `publish_many` per run of one table (order kept)."""
        pending, self.pending = self.pending, []
        if pending and not self.in_tx:
            yield from self._execute(b"BEGIN", None, stopping)
            self.in_tx = True
        start = 0
        while start < len(pending):
            first = pending[start]
            end = start + 1
            while (
                end < len(pending)
                and pending[end].table == first.table
                and pending[end].schema == first.schema
            ):
                end += 1
            run = pending[start:end]
            params = _many_params(
                checked_default_channel(first.schema, first.table),
                [e.as_dict() for e in run],
                [e.key for e in run],
                {"cdc_slot": self.slot, "cdc_lsn": first.lsn, "cdc_xid": first.xid},
                dumps_value,
            )
            if params is not None:
                (res,) = yield from self._execute("publish_many", params, stopping)
                if res.get_value(0, 0) is None:  # pragma: no cover - dumps_value writes one each
                    raise UsageError("a change could not be stored as one JSON value")
            start = end


# -- management: ``pgherald cdc add | remove | status | drop`` --


@dataclass(frozen=True)
class SlotStatus:
    """A pgoutput replication slot of the database, as ``pgherald cdc status`` shows it."""

    slot: str
    active: bool
    pid: int | None
    confirmed_flush_lsn: str | None
    restart_lsn: str | None
    lag_bytes: int | None
    """WAL written since the reader acknowledged (how far behind it is)."""
    retained_bytes: int | None
    """WAL the server keeps for this slot (disk it cannot free)."""
    wal_status: str | None
    safe_wal_size: int | None
    tables: tuple[str, ...]


def check_logical(conn: psycopg.Connection[Any]) -> None:
    """Raise `UsageError` saying what to set unless the server has ``wal_level = logical``."""
    level = conn.execute("SELECT current_setting('wal_level')").fetchone()
    if level is None or level[0] != "logical":
        raise UsageError(WAL_LEVEL_HINT.format(level=level[0] if level else "unknown"))


def add_tables(
    conn: psycopg.Connection[Any],
    tables: Sequence[str],
    *,
    slot: str = "pgherald",
    publication: str | None = None,
    columns: Sequence[str] = (),
    create_slot: bool = True,
) -> list[tuple[str, str]]:
    """
    Add *tables* to the publication (created if missing) and create the slot if missing.

    *conn* in autocommit mode (the slot cannot be created in a transaction that has written).
    It changes nothing when it fails: a publication it changed is put back when the slot
    cannot be created. *columns* must include each table's replica identity (its primary key).
    """
    check_name(slot, "slot")
    pub = check_name(publication or slot, "publication")
    check_logical(conn)
    resolved = [resolve_table(conn, t) for t in tables]
    wanted = list(dict.fromkeys(resolved))
    state = conn.execute(
        sql.query("cdc_server_state"), {"slot": slot, "publication": pub}
    ).fetchone()
    assert state is not None
    if state[1] is not None and state[1] != "pgoutput":
        raise UsageError(
            f"replication slot {slot!r} uses the plugin {state[1]!r}, not pgoutput: pick "
            "another slot name (--slot)"
        )
    if columns:
        _check_identity_covered(conn, wanted, columns)
    present, explicit, published = _members(conn, pub)
    # A table already published gets its column list replaced (SET TABLE would drop others).
    replaced = [t for t in wanted if columns and t in explicit]
    missing = [t for t in wanted if t in replaced or t not in present]
    statements = [
        psql.SQL("ALTER PUBLICATION {} DROP TABLE {}")
        .format(psql.Identifier(pub), psql.Identifier(s, t))
        .as_string(conn)
        for s, t in replaced
    ]
    statements += publication_statements(pub, bool(state[2]), missing, tuple(columns))
    if statements:
        with conn.transaction():  # all or nothing
            for statement in statements:
                conn.execute(statement.encode())
    if state[1] is None and create_slot:
        try:
            conn.execute(
                "SELECT pg_create_logical_replication_slot(%(slot)s, 'pgoutput')", {"slot": slot}
            )
        except psycopg.Error:
            # Leave nothing behind: put the publication back as it was.
            if statements:
                _undo_publication(conn, pub, bool(state[2]), missing, replaced, published)
            raise
    return resolved


def _members(
    conn: psycopg.Connection[Any], publication: str
) -> tuple[set[tuple[str, str]], set[tuple[str, str]], dict[tuple[str, str], list[str]]]:
    """
    A publication's tables: those it publishes or was given (a partitioned table and its
    partitions), those it was given (what ALTER PUBLICATION ... DROP TABLE takes), and the
    published columns of those it publishes.
    """
    present: set[tuple[str, str]] = set()
    explicit: set[tuple[str, str]] = set()
    published: dict[tuple[str, str], list[str]] = {}
    for schema, table, added, cols in conn.execute(
        sql.query("cdc_publication_members"), {"publication": publication}
    ):
        present.add((schema, table))
        if added:
            explicit.add((schema, table))
        elif cols is not None:
            published[(schema, table)] = list(cols)
    return present, explicit, published


def _check_identity_covered(
    conn: psycopg.Connection[Any], tables: Sequence[tuple[str, str]], columns: Sequence[str]
) -> None:
    """
    Refuse a column list without a table's replica identity columns: PostgreSQL would accept
    it, then refuse every UPDATE and DELETE of the table.
    """
    given = set(columns)
    for schema, table in tables:
        row = conn.execute(
            sql.query("cdc_identity_columns"),
            {"name": psql.Identifier(schema, table).as_string(conn)},
        ).fetchone()
        if row is None:
            continue
        identity, needed = row[0], list(row[1] or ())
        lacking = [c for c in needed if c not in given]
        if not lacking:
            continue
        if identity == "f":
            raise UsageError(
                f"{schema}.{table} has REPLICA IDENTITY FULL, so its UPDATE and DELETE need "
                f"every column published and the columns leave out {', '.join(lacking)}: "
                "publish all its columns (leave out --columns)"
            )
        what = "primary key" if identity == "d" else "replica identity"
        raise UsageError(
            f"the columns leave out the {what} of {schema}.{table} ({', '.join(lacking)}), "
            "and PostgreSQL would then refuse every UPDATE and DELETE of it: add them, "
            f"--columns {','.join([*columns, *lacking])}"
        )


def _undo_publication(
    conn: psycopg.Connection[Any],
    pub: str,
    existed: bool,
    added: Sequence[tuple[str, str]],
    replaced: Sequence[tuple[str, str]],
    published: dict[tuple[str, str], list[str]],
) -> None:
    """Put a publication back as it was before `add_tables` changed it (best effort)."""
    try:
        if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
            conn.rollback()
        with conn.transaction():
            explicit = _members(conn, pub)[1] if existed else set()
            undo = publication_undo_statements(pub, existed, [t for t in added if t in explicit])
            if existed:  # the replaced tables, back with the columns they had
                for t in replaced:
                    undo += publication_statements(pub, True, [t], tuple(published.get(t) or ()))
            for statement in undo:
                conn.execute(statement.encode())
    except psycopg.Error as exc:
        logger.warning("could not put publication %r back as it was: %s", pub, exc)


def without_identity(conn: psycopg.Connection[Any], tables: Sequence[tuple[str, str]]) -> list[str]:
    """The tables whose UPDATE and DELETE PostgreSQL refuses once published (no identity)."""
    out = []
    for schema, table in tables:
        row = conn.execute(
            "SELECT c.relreplident, EXISTS (SELECT FROM pg_index i WHERE i.indrelid = c.oid "
            "AND (i.indisprimary OR i.indisreplident)) FROM pg_class c WHERE c.oid = "
            "to_regclass(%(name)s)",
            {"name": psql.Identifier(schema, table).as_string(conn)},
        ).fetchone()
        if row is not None and (row[0] == "n" or (row[0] in ("d", "i") and not row[1])):
            out.append(f"{schema}.{table}")
    return out


def remove_tables(
    conn: psycopg.Connection[Any], tables: Sequence[str], *, publication: str = "pgherald"
) -> list[tuple[str, str]]:
    """Take *tables* out of the publication (their changes stop; the slot stays)."""
    pub = check_name(publication, "publication")
    _, explicit, _ = _members(conn, pub)
    removed = []
    for name in tables:
        s, t = resolve_table(conn, name)
        if (s, t) in explicit and (s, t) not in removed:
            conn.execute(
                psql.SQL("ALTER PUBLICATION {} DROP TABLE {}").format(
                    psql.Identifier(pub), psql.Identifier(s, t)
                )
            )
            removed.append((s, t))
    return removed


def slot_status(conn: psycopg.Connection[Any], slot: str | None = None) -> list[SlotStatus]:
    """
    Every pgoutput slot of the database (or one), with its lag and retained WAL, and the
    tables of its publication as they were added (a partitioned table, not its partitions).
    """
    out = []
    for row in conn.execute(sql.query("cdc_status"), {"slot": slot}).fetchall():
        tables = tuple(
            f"{r[0]}.{r[1]}"
            for r in conn.execute(sql.query("cdc_status_tables"), {"publication": row[0]})
        )
        out.append(
            SlotStatus(
                row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8], tables
            )
        )
    return out


def drop(
    conn: psycopg.Connection[Any], *, slot: str = "pgherald", publication: str | None = None
) -> bool:
    """Drop the slot (the server frees its WAL) and its publication; False: neither existed."""
    check_name(slot, "slot")
    pub = check_name(publication or slot, "publication")
    found = False
    row = conn.execute(
        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %(slot)s", {"slot": slot}
    ).fetchone()
    if row is not None:
        if row[0] is not None:
            raise UsageError(f"slot {slot!r} is being read (pid {row[0]}): stop its reader first")
        conn.execute("SELECT pg_drop_replication_slot(%(slot)s)", {"slot": slot})
        found = True
    exists = conn.execute(
        "SELECT EXISTS (SELECT FROM pg_publication WHERE pubname = %(p)s)", {"p": pub}
    ).fetchone()
    if exists and exists[0]:
        conn.execute(psql.SQL("DROP PUBLICATION {}").format(psql.Identifier(pub)))
        found = True
    return found


def drop_created(
    conn: psycopg.Connection[Any],
    *,
    slot: str = "pgherald",
    publication: str | None = None,
    wait: float = 5.0,
) -> Callable[[psycopg.Connection[Any]], None]:
    """
    Note what exists now of *slot* and its publication; return a function that drops, later,
    whichever of them did not exist (``watch --cdc --temporary``). It waits up to *wait*
    seconds for the slot's reader to end.
    """
    check_name(slot, "slot")
    pub = check_name(publication or slot, "publication")
    state = conn.execute(
        sql.query("cdc_server_state"), {"slot": slot, "publication": pub}
    ).fetchone()
    assert state is not None
    had_slot, had_publication = state[1] is not None, bool(state[2])

    def undo(c: psycopg.Connection[Any]) -> None:
        deadline = time.monotonic() + wait
        while not had_slot:
            row = c.execute(
                "SELECT active FROM pg_replication_slots WHERE slot_name = %(slot)s",
                {"slot": slot},
            ).fetchone()
            if row is None:
                break
            if not row[0]:
                c.execute("SELECT pg_drop_replication_slot(%(slot)s)", {"slot": slot})
                break
            if time.monotonic() >= deadline:
                raise UsageError(
                    f"slot {slot!r} is still being read, so it was not dropped: drop it with "
                    f"`pgherald cdc drop --slot {slot}` (it keeps WAL until then)"
                )
            time.sleep(0.05)  # the server ends the reader's process: nothing to wait on
        if not had_publication:
            c.execute(psql.SQL("DROP PUBLICATION IF EXISTS {}").format(psql.Identifier(pub)))

    return undo


def format_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(size) < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover
