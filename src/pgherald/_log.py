"""
`read_log` / `aread_log`: the durable log from a position, in order, without a consumer group.

Both run the sans-I/O reader (`_protocol.logread`): `read_log` with the blocking `Waiter`,
`aread_log` with `AsyncWaiter` on the event loop itself (asyncio or trio; no worker thread).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Generator, Iterable
from typing import Any

import anyio
import psycopg
from psycopg import pq

from ._conninfo import connect_error, listener_conninfo
from ._models import Event
from ._protocol import logread, pgwire
from ._protocol.channels import check_channel
from ._protocol.pgwire import Request
from ._waiting import Waiter
from ._waiting_async import AsyncWaiter
from .errors import ConnectError, UsageError

MAX_LIMIT = 100_000


def read_log(
    source: str | psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
    *,
    after: int = 0,
    channels: Iterable[str] | None = None,
    limit: int = 1000,
    timeout: float = 10.0,
) -> list[Event]:
    """
    Up to *limit* events of the durable log after event *after*, in log order.

    The log's order is (transaction, id): events of one transaction together, transactions in
    the order they started writing. *after* is an event id (one this returned, or any id the
    log has; 0: the start): the events that sort after it. Only events that can no longer be
    overtaken are returned: an event whose transaction is still open is held back, and so is
    everything that sorts after it, until it commits (or rolls back). So reading on from the
    last event returned misses nothing and repeats nothing, whatever commits meanwhile.
    Fewer than *limit* events (possibly none) means everything readable now has been read.

    *channels*: only these (None: all). *source*: a DSN (a connection is opened and closed),
    or a psycopg 3 connection, lent for the call (used as it is, even inside a transaction;
    no other thread may use it meanwhile). *timeout* bounds the whole call, connecting
    included.

    Raises `SchemaMissing` before ``pgherald install``, `UsageError` when the log has no event
    *after* (never stored, or pruned since), `ConnectError` / `ConnectionLost` when the
    server cannot be reached or does not answer within *timeout*.

    .. versionadded:: 0.1
    """
    query, conninfo, pgconn = _prepare(source, after, channels, limit, timeout)
    waiter = Waiter()
    gen = _read(conninfo, pgconn, query, time.monotonic() + timeout)
    try:
        read = waiter.run(gen)
    finally:
        gen.close()  # interrupted (KeyboardInterrupt): hand the connection back now
        try:
            if pgconn is not None:
                waiter.run(_hand_back(pgconn))
        finally:
            waiter.close()
    return _events(read, after)


async def aread_log(
    source: str | psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
    *,
    after: int = 0,
    channels: Iterable[str] | None = None,
    limit: int = 1000,
    timeout: float = 10.0,  # noqa: ASYNC109 - the same call as read_log's
) -> list[Event]:
    """
    Async `read_log` (same arguments, same answer), on asyncio or trio. It waits on the event
    loop itself: no worker thread, and a cancelled call leaves a lent connection idle.

    .. versionadded:: 0.1
    """
    query, conninfo, pgconn = _prepare(source, after, channels, limit, timeout)
    waiter = AsyncWaiter()
    gen = _read(conninfo, pgconn, query, time.monotonic() + timeout)
    try:
        read = await waiter.run(gen)
    finally:
        gen.close()  # cancelled: hand the connection back now, not when collected
        if pgconn is not None:
            # Within HAND_BACK_GRACE, even when cancelled: the connection is the caller's.
            with anyio.CancelScope(shield=True):
                await waiter.run(_hand_back(pgconn))
    return _events(read, after)


def _prepare(
    source: object, after: object, channels: object, limit: object, timeout: object
) -> tuple[logread.LogQuery, str | None, pq.abc.PGconn | None]:
    if isinstance(after, bool) or not isinstance(after, int) or after < 0:
        raise UsageError(f"after must be an event id (an int >= 0; 0: the start), got {after!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise UsageError(f"limit must be an int from 1 to {MAX_LIMIT}, got {limit!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise UsageError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    names: list[str] | None = None
    if channels is not None:
        if isinstance(channels, str | bytes) or not isinstance(channels, Iterable):
            raise UsageError(
                f"channels must be a list of channel names (or None: all), got {channels!r}"
            )
        names = [check_channel(c) for c in channels]
    query = logread.LogQuery(after=after, limit=limit, channels=names)
    if isinstance(source, str):
        return query, listener_conninfo(source, application_name="pgherald-read-log"), None
    if isinstance(source, psycopg.Connection | psycopg.AsyncConnection):
        if source.closed:
            raise UsageError("the connection is closed: pass an open connection, or a DSN")
        if source.pgconn.transaction_status == pq.TransactionStatus.ACTIVE:
            # Checked before the read: `_hand_back` must never cancel someone else's statement.
            raise UsageError(
                "read the log: the connection is busy with another statement (was it shared "
                "between threads or tasks?): give pgherald a connection no one else uses "
                "meanwhile"
            )
        return query, None, source.pgconn
    raise UsageError(
        f"source must be a DSN (str) or a psycopg 3 connection, got {type(source).__name__}"
    )


def _read(
    conninfo: str | None, lent: pq.abc.PGconn | None, query: logread.LogQuery, deadline: float
) -> Generator[Request, bool, logread.LogRead]:
    """Connect if we must, read once, and leave the connection as we found it."""
    if lent is None:
        assert conninfo is not None
        try:
            pgconn = yield from pgwire.connect(conninfo, deadline)
        except ConnectError as exc:
            raise connect_error(conninfo, str(exc)) from None
        try:
            return (yield from logread.read(pgconn, query, deadline))
        finally:
            pgconn.finish()
    blocking = lent.nonblocking
    lent.nonblocking = 1
    try:
        return (yield from logread.read(lent, query, deadline))
    finally:
        # A statement still running (timed out, cancelled, interrupted) is the caller's to
        # end: `_hand_back`, which can wait (a closed generator cannot). A connection broken
        # meanwhile refuses any mode: the read's own error (ConnectionLost) says it.
        with contextlib.suppress(psycopg.Error):
            lent.nonblocking = blocking


HAND_BACK_GRACE = 2.0
"""Seconds `_hand_back` may take: a healthy server answers a cancel at once; a frozen or
stopped one never does, and then the call must not hang."""


def _hand_back(pgconn: pq.abc.PGconn) -> Generator[Request, bool, None]:
    """
    Hand back a lent connection whose statement of ours is still running (timed out,
    cancelled, interrupted): ask the server to cancel it and take its answer, so that the
    connection is idle again; within `HAND_BACK_GRACE` seconds, waiting on the caller's
    waiter. No answer by then (a frozen or half-open connection, a stopped server): the
    statement stays in flight, and the application finds its connection unusable (libpq:
    "another command is already in progress") rather than waiting for ever.

    libpq's get_result() and PQcancel block, without a deadline (and psycopg holds the GIL
    through them: every thread of the process stops), so neither is called here; only on a
    libpq older than 17, which has no non-blocking cancel, the cancel itself is PQcancel.
    """
    if (
        pgconn.status != pq.ConnStatus.OK
        or pgconn.transaction_status != pq.TransactionStatus.ACTIVE
    ):
        return  # idle (the usual case), or broken: nothing to hand back
    deadline = time.monotonic() + HAND_BACK_GRACE
    blocking = pgconn.nonblocking
    pgconn.nonblocking = 1
    try:
        if pq.version() >= 170000:
            yield from pgwire.cancel(pgconn, deadline)
        else:  # pragma: no cover - libpq 17 and later have the non-blocking cancel
            pgconn.get_cancel().cancel()
        yield from pgwire.finish(pgconn, deadline)
    except (pgwire.QueryFailed, pgwire.QueryTimeout, psycopg.Error):
        pass  # cancelled (57014), no answer in time, or broken: as the docstring says
    finally:
        with contextlib.suppress(psycopg.Error):  # broken meanwhile: as the docstring says
            pgconn.nonblocking = blocking


def _events(read: logread.LogRead, after: int) -> list[Event]:
    if not read.found:
        raise UsageError(
            f"event {after} is not in the log (never stored, or pruned): read after an id "
            "the log has (one that read_log returned), or from 0"
        )
    return logread.events(read)
