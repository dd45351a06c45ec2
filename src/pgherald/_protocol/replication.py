"""
The change-data-capture state machine: a logical replication slot read with ``pgoutput``.

`ReplicationEngine.run` is a generator that never blocks, like the listener's engine: it yields
`pgwire` requests (WAIT, SLEEP) and its own (CHANGE, COMMIT, ABORT, REPORT), and a runtime
(`_cdc.ChangeStream` on a thread, `_cdc.AsyncChangeStream` on asyncio or trio) carries them
out. Over libpq through ``psycopg.pq``: a ``replication=database`` connection,
``START_REPLICATION ... LOGICAL``, then the COPY BOTH stream read with ``get_copy_data`` and
answered with ``put_copy_data`` (standby status updates).

The one guarantee: the flush position acknowledged to the server only moves past a
transaction once the runtime has returned from its COMMIT request, that is, after every change
of it was handled. A crash therefore redelivers from the last acknowledged transaction and never
skips one. While nothing is in flight, the positions of keepalives are acknowledged too, so a
slot whose tables are quiet does not hold back the server's WAL.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Generator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from psycopg import pq
from psycopg import sql as psql

from .. import sql
from ..errors import ConnectError, ConnectionLost, HeraldError, UsageError
from . import pgwire
from .backoff import backoff_delay
from .pgoutput import (
    ChangeEvent,
    Commit,
    DecodeError,
    Decoder,
    Relation,
    decode_key,
    lsn_to_int,
    lsn_to_str,
    pg_micros,
    read_row,
)
from .pgwire import READ, SLEEP, WAIT, WRITE, PQGen

logger = logging.getLogger("pgherald.cdc")

CHANGE = 10  # (CHANGE, ChangeEvent) -> None: hand the change to the application
COMMIT = 11  # (COMMIT, Commit) -> None: the transaction's changes were all handed over
ABORT = 12  # (ABORT,) -> None: the transaction under way will come again; forget its changes
REWIND = 13
"""The runtime's answer to a CHANGE or the COMMIT of the backfill: what it was handed of the
backfill is lost (`_cdc.ChangeStream.into_log`: the log's connection); hand it all over again."""
CHANGES = frozenset(b"IUD")  # pgoutput's Insert, Update and Delete messages
STOP_GRACE = 0.5  # seconds a stop waits for the Commit of a transaction being handled
REPORT = pgwire.REPORT  # (REPORT, str) -> None: the stream was lost and is back (a message)

_NAME = re.compile(r"^[a-z0-9_]{1,63}$")

NOT_REPLICATION = "the server took the connection as an ordinary one, not a replication connection"
"""What `ReplicationEngine` raises (a `ConnectError`) when ``replication=database`` was dropped
on the way (a pooler that ignores the parameter)."""

WAL_LEVEL_HINT = (
    "change data capture needs wal_level = logical, and this server has wal_level = {level}: "
    "set it (ALTER SYSTEM SET wal_level = logical, or in postgresql.conf; on a managed "
    "service, its logical replication setting) and restart the server, which it needs for "
    "this setting to take effect"
)


def check_name(name: str, what: str) -> str:
    """A slot or publication name: lower-case letters, digits and underscores (as slots need)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise UsageError(
            f"invalid {what} name {name!r}: use 1 to 63 lower-case letters, digits and "
            "underscores (PostgreSQL's rule for replication slots)"
        )
    return name


@dataclass(frozen=True)
class ReplicationConfig:
    """What to read and how; every default is what a production service wants."""

    conninfo: str
    slot: str = "pgherald"
    publication: str | None = None
    """Default: the slot's name."""
    tables: tuple[str, ...] = ()
    """Tables (``schema.table`` as SQL writes them) to add to the publication when missing."""
    create: bool = True
    """Create the publication and the slot when they are missing."""
    backfill: bool = False
    """When this creates the slot: first deliver every existing row as a READ event."""
    status_interval: float = 10.0
    """Seconds between standby status updates when nothing else prompts one."""
    health_check_interval: float = 15.0
    """After this many seconds without a message from the server, ask it for one (a status
    update with its reply flag set), to find out whether the connection still works."""
    health_check_timeout: float = 5.0
    """No answer within this many seconds: the connection is half-open; reconnect."""
    ack_delay: float = 0.05
    """Once idle, acknowledge what was handled within this many seconds (not per transaction:
    each acknowledgement wakes the server's walsender)."""
    read_coalesce: float = 0.005
    """While changes keep coming, wait this many seconds after handling all that had arrived
    before reading again, so that one wake-up handles many transactions (less CPU per
    change; adds at most this much latency). 0: read as soon as anything arrives."""
    connect_timeout: float = 10.0
    statement_timeout: float = 30.0
    reconnect_initial_delay: float = 0.1
    reconnect_max_delay: float = 10.0
    reconnect_max_attempts: int | None = None
    """Give up (raise `ConnectionLost`) after this many failed attempts in a row; None: never."""
    backfill_batch: int = 1000

    @property
    def publication_name(self) -> str:
        return self.publication or self.slot


class _Lost(Exception):
    """The replication connection failed; reconnect (internal)."""


class ReplicationEngine:
    """The state of one change stream, independent of any runtime."""

    def __init__(self, config: ReplicationConfig) -> None:
        check_name(config.slot, "slot")
        check_name(config.publication_name, "publication")
        self.config = config
        self.stopping = False
        self.pgconn: pq.abc.PGconn | None = None
        self.flushed = 0
        """The LSN acknowledged to the server (or about to be: see `_acknowledge`)."""
        self.skip_through = 0
        """Transactions that commit at or before this LSN are acknowledged, not delivered."""
        self.backfilling = False
        """The backfill is being handed over (its CHANGE and COMMIT may be answered REWIND)."""
        self.primary_keys: dict[tuple[str, str], tuple[str, ...]] = {}
        self._keys_by_oid: dict[int, tuple[str, ...]] = {}
        """The primary keys read from the catalog (at the start, or by `_learn_key`), by oid;
        the stream's decoder reads this same dict."""
        self.key_lookups = 0
        """Primary keys read from the catalog while streaming (a diagnostic)."""
        self.changes = 0
        self.transactions = 0
        self.reconnects = 0
        self._sent_flush = 0
        self._sent_at = 0.0
        self._received = 0
        self._in_tx = False
        self._skipping = False
        self._slot_known = False
        self._server_flush = 0
        """How far the server's WAL goes (flushed, or replayed on a standby), at the last open."""
        self._next_xid = 0
        """The server's next transaction id (64 bits) at the last open: widens the stream's."""
        self._tables: list[tuple[str, str, list[str]]] = []
        self._streaming_pid: int | None = None
        """The server process of the replication connection, once it streams."""
        self._stale_pid: int | None = None
        """The server process of a stream we lost: it may hold the slot until the server
        notices (a half-open connection: wal_sender_timeout, 60 s by default)."""
        self._undo: list[str] = []
        """DDL that takes back what this open did to the publication, until the slot exists."""

    # -- the state machine --

    def run(self) -> PQGen:
        """Connect, set up, stream; reconnect after a loss; return once `stopping`."""
        try:
            yield from self._run()
        except pgwire.Abandoned:
            pass  # stopped while a statement was in flight
        finally:
            self._close()

    def _run(self) -> PQGen:
        attempt = 0
        first = True
        while not self.stopping:
            try:
                yield from pgwire.until_stopped(self._open(first), lambda: self.stopping)
                if attempt:
                    self.reconnects += 1
                    yield (REPORT, f"change stream back after {attempt} attempt(s)")
                attempt = 0
                first = False
                yield from self._stream()
            except _Lost as lost:
                if self._streaming_pid is not None:
                    self._stale_pid = self._streaming_pid
                self._close()
                if self._in_tx:
                    self._in_tx = False
                    yield (ABORT,)
                if self.stopping:
                    break
                attempt += 1
                cfg = self.config
                if cfg.reconnect_max_attempts is not None and attempt > cfg.reconnect_max_attempts:
                    raise ConnectionLost(
                        f"the change stream was lost and could not be resumed after "
                        f"{attempt - 1} attempts: {lost}"
                    ) from None
                delay = backoff_delay(
                    attempt, initial=cfg.reconnect_initial_delay, cap=cfg.reconnect_max_delay
                )
                logger.warning("change stream lost (%s); again in %.2fs", lost, delay)
                yield (SLEEP, time.monotonic() + delay)

    def _open(self, first: bool) -> PQGen:
        """Set up (publication, slot, backfill) and start streaming from the slot."""
        cfg = self.config
        try:
            ctl = yield from self._connect(cfg.conninfo)
        except ConnectError as exc:
            if first:
                raise
            raise _Lost(str(exc)) from None
        try:
            if self._stale_pid is not None:
                # Our lost session may still hold the slot: end it (it is ours, and dead to us).
                try:
                    yield from self._query(
                        ctl, "cdc_end_stale_reader", slot=cfg.slot, pid=self._stale_pid
                    )
                except pgwire.QueryFailed as exc:  # not allowed: the server ends it in time
                    logger.warning("could not end the lost session's process: %s", exc)
                    self._stale_pid = None
            backfill = yield from self._prepare(ctl)
            start_lsn = self._start_lsn(self._slot_known)
            try:
                repl = yield from self._start_session(ctl, backfill)
            except Exception:
                # No slot came of it: leave no publication behind either (what `cdc add` does).
                if self._undo and not self._slot_known:
                    yield from self._undo_publication(ctl)
                raise
            finally:
                self._undo = []
        except ConnectError as exc:
            if first:
                raise
            raise _Lost(str(exc)) from None
        except pgwire.QueryFailed as exc:
            if exc.sqlstate is not None and exc.sqlstate.startswith("08"):
                raise _Lost(str(exc)) from None
            raise _failed(exc) from None
        except pgwire.QueryTimeout:
            raise _Lost("no answer to a statement in time") from None
        except Exception as exc:
            if pgwire.is_connection_error(exc):
                raise _Lost(pgwire.one_line(exc)) from None
            raise
        finally:
            ctl.finish()
        publication = psql.Literal(cfg.publication_name).as_string(None)
        start = (
            f"START_REPLICATION SLOT {cfg.slot} LOGICAL {lsn_to_str(start_lsn)} "
            f"(proto_version '1', publication_names {publication})"
        )
        try:
            repl.send_query(start.encode())
            deadline = time.monotonic() + cfg.statement_timeout
            while repl.flush():
                ready = yield (WAIT, repl.socket, WRITE, deadline)
                if not ready and time.monotonic() >= deadline:
                    raise _Lost("could not send START_REPLICATION in time")
            deadline = time.monotonic() + cfg.statement_timeout
            while repl.is_busy():
                ready = yield (WAIT, repl.socket, READ, deadline)
                if ready:
                    repl.consume_input()
                elif time.monotonic() >= deadline:
                    raise _Lost("START_REPLICATION got no answer in time")
            res = repl.get_result()
        except pgwire.Abandoned:
            raise
        except Exception as exc:
            if pgwire.is_connection_error(exc):
                raise _Lost(pgwire.one_line(exc)) from None
            raise
        if res is None or res.status != pq.ExecStatus.COPY_BOTH:
            error = pgwire.result_error(res) if res is not None else None
            if error is not None and error.sqlstate == "55006":  # the slot is in use
                raise _Lost(f"{error}: another reader holds slot {cfg.slot!r}")
            if error is not None:
                raise _failed(error)
            raise _Lost("START_REPLICATION did not start streaming")
        self._received = 0
        self._sent_flush = 0  # tell the new session where we are at the first chance
        self._streaming_pid = repl.backend_pid
        self._stale_pid = None

    def _start_session(
        self, ctl: pq.abc.PGconn, backfill: str | None
    ) -> Generator[Any, Any, pq.abc.PGconn]:
        """Open the replication connection; create the slot (and backfill) when it is new."""
        cfg = self.config
        try:
            repl = yield from self._connect(_replication_conninfo(cfg.conninfo))
        except ConnectError as exc:
            # The server refuses a walsender to a role without REPLICATION at connection
            # time: a privilege no retry fixes, not an unreachable server.
            if any(refusal in str(exc) for refusal in _NO_REPLICATION_ROLE):
                raise _needs_replication_role(pgwire.one_line(exc)) from None
            raise
        self.pgconn = repl
        yield from self._check_replication(repl)
        if backfill is not None:
            try:
                yield from self._create_slot_and_backfill(repl, ctl)
            except (pgwire.QueryFailed, pgwire.QueryTimeout, OSError) as exc:
                raise _incomplete_backfill(cfg.slot, exc) from None
            except Exception as exc:
                if pgwire.is_connection_error(exc):
                    raise _incomplete_backfill(cfg.slot, exc) from None
                raise
        elif not self._slot_known:
            yield from self._create_slot(repl)
        return repl

    def _undo_publication(self, ctl: pq.abc.PGconn) -> PQGen:
        """Take back what `_prepare` did to the publication (best effort: it logs a failure)."""
        try:
            for statement in self._undo:
                yield from pgwire.execute(
                    ctl, statement.encode(), time.monotonic() + self.config.statement_timeout
                )
        except Exception as exc:
            logger.warning(
                "could not take back the change to publication %r: %s",
                self.config.publication_name,
                pgwire.one_line(exc),
            )
        else:
            logger.info("took back the change to publication %r", self.config.publication_name)

    def _start_lsn(self, slot_existed: bool) -> int:
        """
        Where to ask the stream to start. The server starts at the later of this and the
        slot's confirmed position, and that position is only saved to disk now and then
        (checkpoints, or before PostgreSQL 17 not even at a clean shutdown): after the server
        restarts it can be far behind what this stream acknowledged. So on a reconnect ask for
        what was acknowledged (`flushed`: the end of the last acknowledged transaction, which
        the server then skips), not 0/0, which would redeliver every transaction since.
        0/0 (the slot's position) when this stream has acknowledged nothing, when the slot is
        new (made by this open), or when the server's WAL ends before `flushed` (another
        server, or WAL lost): never skip what the server has not sent us.
        """
        if not slot_existed or not self.flushed:
            return 0
        if self._server_flush and self.flushed > self._server_flush:
            logger.warning(
                "the server's WAL ends at %s, before what this stream acknowledged (%s): "
                "starting from the slot's position",
                lsn_to_str(self._server_flush),
                lsn_to_str(self.flushed),
            )
            return 0
        return self.flushed

    def _prepare(self, ctl: pq.abc.PGconn) -> Generator[Any, Any, str | None]:
        """Check the server, make the publication; returns "backfill" when the slot is new."""
        cfg = self.config
        pub = cfg.publication_name
        (res,) = yield from self._query(ctl, "cdc_server_state", slot=cfg.slot, publication=pub)
        level = _text(res.get_value(0, 0))
        if level != "logical":
            raise UsageError(WAL_LEVEL_HINT.format(level=level))
        plugin = res.get_value(0, 1)
        if plugin is not None and plugin != b"pgoutput":
            raise UsageError(
                f"replication slot {cfg.slot!r} uses the plugin {_text(plugin)!r}, not pgoutput: "
                "pick another slot name (slot=..., --slot)"
            )
        self._slot_known = plugin is not None
        self._server_flush = lsn_to_int(_text(res.get_value(0, 4)) or "0/0")
        self._next_xid = int(_text(res.get_value(0, 5)) or 0)
        pub_exists = res.get_value(0, 2) == b"t"
        if cfg.tables:
            wanted = []
            for name in cfg.tables:
                (r,) = yield from self._query(ctl, "cdc_resolve_table", name=_sql_name(name))
                if r.ntuples == 0:
                    raise UsageError(
                        f"table {name!r} does not exist; check the name and quote mixed case: "
                        "'\"Orders\"'"
                    )
                wanted.append((_text(r.get_value(0, 0)), _text(r.get_value(0, 1))))
            present: set[tuple[str, str]] = set()
            if pub_exists:
                # Those it was given too: a partitioned table is published as its partitions.
                (r,) = yield from self._query(ctl, "cdc_publication_members", publication=pub)
                present = {
                    (_text(r.get_value(i, 0)), _text(r.get_value(i, 1))) for i in range(r.ntuples)
                }
            missing = [t for t in wanted if t not in present]
            if missing and not cfg.create:
                raise UsageError(
                    f"publication {pub!r} lacks {', '.join('.'.join(t) for t in missing)}: run "
                    "`pgherald cdc add TABLE...`, or pass create=True"
                )
            for statement in publication_statements(pub, pub_exists, missing):
                yield from pgwire.execute(
                    ctl, statement.encode(), time.monotonic() + cfg.statement_timeout
                )
                self._undo = publication_undo_statements(pub, pub_exists, missing)
                pub_exists = True
        if not pub_exists:
            raise UsageError(
                f"publication {pub!r} does not exist: run `pgherald cdc add TABLE... --slot "
                f"{cfg.slot}`, or pass tables=[...]"
            )
        (r,) = yield from self._query(ctl, "cdc_publication_tables", publication=pub)
        self.primary_keys = {
            (_text(r.get_value(i, 0)), _text(r.get_value(i, 1))): tuple(
                _text_array(r.get_value(i, 3))
            )
            for i in range(r.ntuples)
        }
        self._keys_by_oid = {
            int(_text(r.get_value(i, 4))): tuple(_text_array(r.get_value(i, 3)))
            for i in range(r.ntuples)
        }
        self._tables = [
            (_text(r.get_value(i, 0)), _text(r.get_value(i, 1)), _text_array(r.get_value(i, 2)))
            for i in range(r.ntuples)
        ]
        if not self._slot_known:
            if not cfg.create:
                raise UsageError(
                    f"replication slot {cfg.slot!r} does not exist: run `pgherald cdc add "
                    f"TABLE... --slot {cfg.slot}`, or pass create=True"
                )
            if cfg.backfill:
                return "backfill"
        return None

    def _check_replication(self, repl: pq.abc.PGconn) -> PQGen:
        """
        Make sure *repl* is a replication connection, before anything is created through it:
        a pooler told to ignore the ``replication`` parameter (PgBouncer's
        ``ignore_startup_parameters``) hands out an ordinary session instead, which answers
        every replication command with a syntax error.
        """
        try:
            yield from pgwire.execute(
                repl, b"IDENTIFY_SYSTEM", time.monotonic() + self.config.statement_timeout
            )
        except pgwire.QueryFailed as exc:
            if exc.sqlstate == "42601":  # syntax error: not a replication connection
                raise ConnectError(f"{NOT_REPLICATION} (IDENTIFY_SYSTEM: {exc})") from None
            raise

    def _create_slot(self, repl: pq.abc.PGconn) -> PQGen:
        yield from pgwire.execute(
            repl,
            f"CREATE_REPLICATION_SLOT {self.config.slot} LOGICAL pgoutput NOEXPORT_SNAPSHOT".encode(),
            time.monotonic() + self.config.statement_timeout,
        )
        self._slot_known = True
        logger.info("created replication slot %r", self.config.slot)

    def _create_slot_and_backfill(self, repl: pq.abc.PGconn, ctl: pq.abc.PGconn) -> PQGen:
        """
        Create the slot with an exported snapshot and deliver every row it sees as READ events,
        before the stream (which starts where the snapshot ends) delivers anything.
        """
        cfg = self.config
        deadline = time.monotonic() + cfg.statement_timeout
        (res,) = yield from pgwire.execute(
            repl,
            f"CREATE_REPLICATION_SLOT {cfg.slot} LOGICAL pgoutput EXPORT_SNAPSHOT".encode(),
            deadline,
        )
        self._slot_known = True
        consistent = _text(res.get_value(0, 1))
        snapshot = _text(res.get_value(0, 2))
        logger.info("created replication slot %r; backfilling from snapshot %s", cfg.slot, snapshot)
        when = datetime.now(timezone.utc)
        yield from pgwire.execute(
            ctl,
            b"BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT "
            + psql.Literal(snapshot).as_string(None).encode(),
            time.monotonic() + cfg.statement_timeout,
        )
        self._in_tx = True
        end = lsn_to_int(consistent)
        self.backfilling = True
        try:
            # Handed over again from the start, in the same snapshot (ctl's transaction), as
            # long as the runtime answers REWIND: unless what it lost was the answer to the
            # COMMIT, and it had kept the backfill after all (into_log finds it in the log).
            while (yield from self._backfill(ctl, consistent, when)) == REWIND:
                if self.skip_through >= end:
                    logger.info(
                        "the backfill of slot %r is in the log already (the answer to its "
                        "commit was lost): not sent again",
                        cfg.slot,
                    )
                    break
                if self.stopping:
                    raise _stopped_in_backfill(cfg.slot)
                logger.warning(
                    "the backfill of slot %r starts again, from the same snapshot", cfg.slot
                )
        finally:
            self.backfilling = False
        # ctl's read-only transaction ends with its connection (`_open`).
        self._in_tx = False
        self.flushed = max(self.flushed, end)

    def _backfill(self, ctl: pq.abc.PGconn, consistent: str, when: datetime) -> PQGen:
        """
        Every row of the snapshot (ctl's transaction) as a READ event, then their COMMIT; the
        runtime's answer to the COMMIT, or REWIND as soon as it answers a change so.
        """
        cfg = self.config
        for schema, table, columns in self._tables:
            key = self.primary_keys.get((schema, table), ())
            select = psql.SQL(
                "DECLARE pgherald_backfill NO SCROLL CURSOR FOR SELECT {} FROM {}"
            ).format(
                psql.SQL(", ").join(map(psql.Identifier, columns)) if columns else psql.SQL("*"),
                psql.Identifier(schema, table),
            )
            yield from pgwire.execute(
                ctl, select.as_string(None).encode(), time.monotonic() + cfg.statement_timeout
            )
            fetch = f"FETCH {int(cfg.backfill_batch)} FROM pgherald_backfill".encode()
            close = b"CLOSE pgherald_backfill"
            while True:
                (rows,) = yield from pgwire.execute(
                    ctl, fetch, time.monotonic() + cfg.statement_timeout
                )
                if rows.ntuples == 0:
                    break
                names = [_text(rows.fname(c)) for c in range(rows.nfields)]
                types = [rows.ftype(c) for c in range(rows.nfields)]
                for i in range(rows.ntuples):
                    values = [rows.get_value(i, c) for c in range(rows.nfields)]
                    row = read_row(names, types, values)
                    event = ChangeEvent(
                        "READ",
                        schema,
                        table,
                        row,
                        None,
                        None,
                        decode_key(row, key),
                        consistent,
                        0,
                        when,
                    )
                    self.changes += 1
                    if (yield (CHANGE, event)) == REWIND:
                        yield from pgwire.execute(
                            ctl, close, time.monotonic() + cfg.statement_timeout
                        )
                        return REWIND
                    if self.stopping:
                        # Unfinished: the next start cannot backfill from this slot again.
                        raise _stopped_in_backfill(cfg.slot)
            yield from pgwire.execute(ctl, close, time.monotonic() + cfg.statement_timeout)
        end = lsn_to_int(consistent)
        return (yield (COMMIT, Commit(end, end, when)))

    # -- streaming --

    def _stream(self) -> PQGen:
        pgconn = self.pgconn
        assert pgconn is not None
        cfg = self.config
        decoder = Decoder(self._keys_by_oid, next_xid=self._next_xid)
        decode, change = decoder.decode, decoder.change
        begin_of, commit_of, relation = decoder.begin_of, decoder.commit_of, decoder.relation
        next_status = time.monotonic() + cfg.status_interval
        quiet_since = time.monotonic()  # when the server was last heard from (about)
        probe_deadline = 0.0  # a health check awaits an answer until then (0: none)
        heard = False
        window = cfg.read_coalesce
        coalesce = window > 0
        fresh = False  # coalescing: the last read brought messages (the socket may hold more)
        busy = False  # coalescing: a transaction was handled since the last wait
        get = pgconn.get_copy_data
        while True:
            if self.stopping:
                yield from self._send_status(pgconn)
                return
            try:
                n, data = get(1)
            except Exception as exc:
                raise _Lost(pgwire.one_line(exc)) from None
            if n > 0:
                heard = True
                fresh = coalesce
                kind = data[0]
                if kind == 0x77:  # w: XLogData
                    tag = data[25]
                    if tag in CHANGES:  # the common case first: a row
                        try:
                            event = change(bytes(data[25:]))
                        except DecodeError as exc:
                            raise UsageError(f"cannot read the change stream: {exc}") from None
                        if not self._skipping:
                            self.changes += 1
                            yield (CHANGE, event)
                        if self.stopping and self._in_tx:
                            yield from self._stop_in_transaction(pgconn)
                    elif tag == 0x42:  # Begin
                        begin = begin_of(bytes(data[25:]))
                        self._in_tx = True
                        self._skipping = begin.final_lsn <= self.skip_through
                    elif tag == 0x43:  # Commit
                        commit = commit_of(bytes(data[25:]))
                        if not self._skipping:
                            self.transactions += 1
                            yield (COMMIT, commit)
                        self._in_tx = False
                        self._skipping = False
                        self._acknowledge(commit.end_lsn)
                        busy = coalesce
                        # What the server has sent is only reported in status updates: reading
                        # it once per transaction is enough.
                        received = int.from_bytes(data[9:17], "big")
                        if received > self._received:
                            self._received = received
                    elif tag == 0x52:  # Relation: a table's columns (new to the stream, or altered)
                        # Sent again after the table changed (ALTER, VACUUM, ANALYZE, ...).
                        again = int.from_bytes(data[26:30], "big") in decoder.relations
                        rel = relation(bytes(data[25:]))
                        if (
                            len(rel.key_columns) > 1
                            and rel.identity == "d"
                            and (again or self._keys_by_oid.get(rel.oid) != rel.key_columns)
                        ):
                            # A key of several columns that the start did not read (a table
                            # new to the stream), or that may have changed (its order too):
                            # the server waits meanwhile, told where we are.
                            yield from self._send_status(pgconn)
                            yield from self._learn_key(rel)
                    else:
                        try:
                            for event in decode(data[25:]):
                                if self._skipping:
                                    continue
                                self.changes += 1
                                yield (CHANGE, event)
                        except DecodeError as exc:
                            raise UsageError(f"cannot read the change stream: {exc}") from None
                        if self.stopping and self._in_tx:
                            yield from self._stop_in_transaction(pgconn)
                elif kind == 0x6B:  # k: keepalive
                    wal_end = int.from_bytes(data[1:9], "big")
                    self._received = max(self._received, wal_end)
                    if not self._in_tx:
                        self._acknowledge(wal_end)
                    if data[17]:
                        yield from self._send_status(pgconn)
                        next_status = time.monotonic() + cfg.status_interval
                continue
            if n < 0:  # the server ended the stream (shutting down) or an error
                message = "the server ended the change stream"
                res = None if pgconn.is_busy() else pgconn.get_result()  # never blocks
                if res is not None and res.status == pq.ExecStatus.FATAL_ERROR:
                    message = str(pgwire.result_error(res))
                raise _Lost(message)
            # Nothing buffered: acknowledge what was handled (at most every `ack_delay`: each
            # update wakes the server's walsender), then read on, pause, or wait for the socket.
            now = time.monotonic()
            if heard:
                heard = False
                quiet_since = now
                probe_deadline = 0.0
            if probe_deadline:
                if now >= probe_deadline:
                    raise _Lost(
                        "half-open connection: the server did not answer a health check "
                        f"within {cfg.health_check_timeout:g}s"
                    )
            elif now >= quiet_since + cfg.health_check_interval:
                # Quiet for a while: ask the server for a keepalive (the reply flag).
                yield from self._send_status(pgconn, reply=True)
                probe_deadline = now + cfg.health_check_timeout
            wake_at = min(next_status, probe_deadline or quiet_since + cfg.health_check_interval)
            if now >= next_status or (
                self.flushed > self._sent_flush and now >= self._sent_at + cfg.ack_delay
            ):
                yield from self._send_status(pgconn)
                next_status = now + cfg.status_interval
                wake_at = min(wake_at, next_status)
            elif self.flushed > self._sent_flush:
                wake_at = min(wake_at, self._sent_at + cfg.ack_delay)
            if fresh:
                # libpq reads at most its buffer's room at a time: read on before any pause, so
                # that a backlog is read at full speed.
                fresh = False
                ready = True
            elif busy and not self._in_tx:
                # Caught up with a busy stream, between transactions (the rest of one under
                # way follows at once): let the next ones gather for a moment rather than wake
                # for each. A stop() ends the pause.
                busy = False
                if self.stopping:
                    continue
                yield (SLEEP, now + window)
                ready = True
            else:
                ready = yield (WAIT, pgconn.socket, READ, wake_at)
            if ready:
                try:
                    pgconn.consume_input()
                except Exception as exc:
                    raise _Lost(pgwire.one_line(exc)) from None

    def _learn_key(self, rel: Relation) -> PQGen:
        """
        The key's order of a table with a primary key of several columns that came into the
        publication while the stream runs (the start read the others' from the catalog), or
        whose key changed: its Relation message flags them in the table's column order, and
        `key` is the JSON array in the key's order (as a durable trigger, or a stream started
        later, writes it). Read it from the catalog, on a short connection of its own (the
        replication connection is streaming), within `health_check_timeout`: the server ends
        a stream that says nothing for `wal_sender_timeout`. A lookup that fails is a warning:
        the table stays keyed as the server flags it until it is described again.
        """
        cfg = self.config
        name = f"{rel.schema}.{rel.table}"
        deadline = time.monotonic() + cfg.health_check_timeout
        ctl: pq.abc.PGconn | None = None
        try:
            ctl = yield from pgwire.until_stopped(
                pgwire.connect(cfg.conninfo, deadline), lambda: self.stopping
            )
            text, values = sql.bound("cdc_primary_key", {"oid": rel.oid})
            (res,) = yield from pgwire.until_stopped(
                pgwire.execute_params(ctl, text, values, deadline), lambda: self.stopping
            )
        except pgwire.Abandoned:
            return  # stopping: the loop sends the last status update and ends
        except Exception as exc:
            failed = (pgwire.QueryFailed, pgwire.QueryTimeout, ConnectError)
            if not (isinstance(exc, failed) or pgwire.is_connection_error(exc)):
                raise
            # The stream goes on (a reconnection would describe the table the same way): keyed
            # as the server flags the key, and asked again when the table is described again.
            logger.warning(
                "could not read the primary key of %s (%s): its changes are keyed by %s",
                name,
                pgwire.one_line(exc),
                ", ".join(rel.key_columns),
            )
            return
        finally:
            if ctl is not None:
                ctl.finish()
        self.key_lookups += 1
        key = tuple(_text(res.get_value(i, 0)) for i in range(res.ntuples))
        if sorted(key) == sorted(rel.key_columns):  # the same columns: the key's order
            rel.key_columns = key
        else:  # gone (dropped meanwhile) or changed again: keyed as the server flags it
            logger.warning(
                "the primary key of %s is not what the stream describes (%s, catalog: %s): "
                "its changes are keyed by the columns in the table's order",
                name,
                ", ".join(rel.key_columns),
                ", ".join(key) or "none",
            )
        self._keys_by_oid[rel.oid] = rel.key_columns  # the decoder's too: shared

    def _stop_in_transaction(self, pgconn: pq.abc.PGconn) -> PQGen:
        """
        Stopped after a change: when the transaction's Commit is already here (the change was
        its last), finish it, so that it is acknowledged; else give the transaction up.
        """
        # The server sends a decoded transaction whole, so its Commit follows the last change
        # at once; libpq may not have read it yet. Wait for it briefly (stop() ends in < 1 s).
        deadline = time.monotonic() + STOP_GRACE
        n, data = 0, memoryview(b"")
        while True:
            try:
                n, data = pgconn.get_copy_data(1)
            except Exception:
                n = -1
            if n != 0 or time.monotonic() >= deadline:
                break
            if (yield (WAIT, pgconn.socket, READ, deadline)):
                try:
                    pgconn.consume_input()
                except Exception:
                    break
        if n > 0 and data[0] == 0x77 and data[25] == 0x43:
            commit = Decoder().commit_of(bytes(data[25:]))
            if not self._skipping:
                self.transactions += 1
                yield (COMMIT, commit)
            self._acknowledge(commit.end_lsn)
        else:
            yield (ABORT,)
        self._in_tx = False
        self._skipping = False

    def _acknowledge(self, lsn: int) -> None:
        if lsn > self.flushed:
            self.flushed = lsn

    def _send_status(self, pgconn: pq.abc.PGconn, *, reply: bool = False) -> PQGen:
        """
        A standby status update: written and flushed = what was handled (`flushed`); with
        *reply*, the server answers at once with a keepalive (a health check).
        """
        flushed = self.flushed
        written = max(self._received, flushed)
        now = pg_micros(datetime.now(timezone.utc))
        msg = (
            b"r"
            + written.to_bytes(8, "big")
            + flushed.to_bytes(8, "big")
            + flushed.to_bytes(8, "big")
            + now.to_bytes(8, "big", signed=True)
            + (b"\1" if reply else b"\0")
        )
        try:
            if pgconn.put_copy_data(msg) != 1:
                return  # libpq's buffer is full: the next update says the same, later
            deadline = time.monotonic() + self.config.statement_timeout
            while pgconn.flush():
                ready = yield (WAIT, pgconn.socket, WRITE, deadline)
                if not ready and time.monotonic() >= deadline:
                    raise _Lost("could not send a status update in time")
        except _Lost:
            raise
        except Exception as exc:
            raise _Lost(pgwire.one_line(exc)) from None
        self._sent_flush = flushed
        self._sent_at = time.monotonic()

    # -- helpers --

    def _connect(self, conninfo: str) -> Generator[Any, Any, pq.abc.PGconn]:
        deadline = time.monotonic() + self.config.connect_timeout
        return (yield from pgwire.connect(conninfo, deadline))

    def _query(self, pgconn: pq.abc.PGconn, query: str, /, **params: Any) -> PQGen:
        text, values = sql.bound(query, params)
        return (
            yield from pgwire.execute_params(
                pgconn, text, values, time.monotonic() + self.config.statement_timeout
            )
        )

    def _close(self) -> None:
        self._streaming_pid = None
        pgconn, self.pgconn = self.pgconn, None
        if pgconn is not None:
            pgconn.finish()

    @property
    def flushed_lsn(self) -> str:
        return lsn_to_str(self.flushed)


def publication_statements(
    publication: str, exists: bool, tables: list[tuple[str, str]], columns: tuple[str, ...] = ()
) -> list[str]:
    """The DDL that adds *tables* (schema, name) to *publication*, creating it if need be."""
    if not tables:
        return []
    targets = psql.SQL(", ").join(
        psql.SQL("{} ({})").format(
            psql.Identifier(s, t), psql.SQL(", ").join(map(psql.Identifier, columns))
        )
        if columns
        else psql.Identifier(s, t)
        for s, t in tables
    )
    if exists:
        q = psql.SQL("ALTER PUBLICATION {} ADD TABLE {}")
    else:
        q = psql.SQL("CREATE PUBLICATION {} FOR TABLE {}")
    return [q.format(psql.Identifier(publication), targets).as_string(None)]


def publication_undo_statements(
    publication: str, existed: bool, tables: list[tuple[str, str]]
) -> list[str]:
    """The DDL that takes back `publication_statements` (the publication, or the tables added)."""
    pub = psql.Identifier(publication)
    if not existed:
        return [psql.SQL("DROP PUBLICATION IF EXISTS {}").format(pub).as_string(None)]
    return [
        psql.SQL("ALTER PUBLICATION {} DROP TABLE {}")
        .format(pub, psql.Identifier(s, t))
        .as_string(None)
        for s, t in tables
    ]


def _replication_conninfo(conninfo: str) -> str:
    return f"{conninfo} replication=database"


def _sql_name(name: str) -> str:
    """A table name as SQL writes it, quoted part by part (for to_regclass)."""
    from .._triggers import parse_table

    schema, table = parse_table(name)
    ident = psql.Identifier(table) if schema is None else psql.Identifier(schema, table)
    return ident.as_string(None)


def _text(raw: bytes | None) -> str:
    return "" if raw is None else raw.decode()


def _text_array(raw: bytes | None) -> list[str]:
    from .pgoutput import parse_array

    return [] if raw is None else [str(x) for x in parse_array(raw.decode(), bytes.decode)]


def _incomplete_backfill(slot: str, exc: BaseException) -> UsageError:
    """The backfill broke off: the slot exists, so a retry would not backfill again."""
    return UsageError(
        f"the backfill of slot {slot!r} failed ({pgwire.one_line(exc)}): the slot exists but its "
        f"backfill is incomplete; drop it (`pgherald cdc drop --slot {slot}`) and start again"
    )


def _stopped_in_backfill(slot: str) -> UsageError:
    return UsageError(
        f"stopped during the backfill of slot {slot!r}: drop it (`pgherald cdc drop`) and start "
        "again to backfill"
    )


def _failed(exc: pgwire.QueryFailed) -> HeraldError:
    """A server error met while setting up, as a `HeraldError` that names the fix."""
    error = _failed_setup(exc)
    error.sqlstate = exc.sqlstate
    return error


_NO_REPLICATION_ROLE = (
    "must be superuser or replication role",  # PostgreSQL 15 and before
    "permission denied to start WAL sender",  # 16 and later
)


def _needs_replication_role(reason: str) -> UsageError:
    return UsageError(
        f"the server refused ({reason}): change data capture needs a role with the "
        "REPLICATION attribute (ALTER ROLE ... REPLICATION) that owns the tables, or a "
        "superuser"
    )


def _failed_setup(exc: pgwire.QueryFailed) -> HeraldError:
    from .._errormap import from_sqlstate

    if exc.sqlstate == "42501" or any(r in str(exc) for r in _NO_REPLICATION_ROLE):
        return _needs_replication_role(str(exc))
    if exc.sqlstate == "53400":  # all replication slots are in use
        return UsageError(
            f"the server refused ({exc}): raise max_replication_slots (needs a restart), or "
            "drop a slot no longer read (`pgherald cdc status`, `pgherald cdc drop`)"
        )
    return from_sqlstate(exc.sqlstate, str(exc), doing="start the change stream")
