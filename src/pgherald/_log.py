"""
`read_log` / `aread_log`: the durable log from a position, in order, without a consumer group.

Both run the sans-I/O reader (`_protocol.logread`): `read_log` with the blocking `Waiter`,
`aread_log` with `AsyncWaiter` on the event loop itself (asyncio or trio; no worker thread).
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterable
from typing import Any

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
        waiter.close()
    return _events(read, after)


async def aread_log(
    source: str | psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
    *,
    after: int = 0,
    channels: Iterable[str] | None = None,
    limit: int = 1000,
    timeout: float = 10.0,
) -> list[Event]:
    """
    Async `read_log` (same arguments, same answer), on asyncio or trio. It waits on the event
    loop itself: no worker thread, and a cancelled call leaves a lent connection idle.

    .. versionadded:: 0.1
    """
    query, conninfo, pgconn = _prepare(source, after, channels, limit, timeout)
    gen = _read(conninfo, pgconn, query, time.monotonic() + timeout)
    try:
        read = await AsyncWaiter().run(gen)
    finally:
        gen.close()  # cancelled: hand the connection back now, not when collected
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
    if lent.transaction_status == pq.TransactionStatus.ACTIVE:
        # (Checked here too, before the cleanup below could cancel someone else's statement.)
        raise UsageError(
            "read the log: the connection is busy with another statement (was it shared "
            "between threads or tasks?): give pgherald a connection no one else uses meanwhile"
        )
    blocking = lent.nonblocking
    lent.nonblocking = 1
    try:
        return (yield from logread.read(lent, query, deadline))
    finally:
        try:
            if (
                lent.status == pq.ConnStatus.OK
                and lent.transaction_status == pq.TransactionStatus.ACTIVE
            ):
                _abandon(lent)
        finally:
            lent.nonblocking = blocking


def _abandon(pgconn: pq.abc.PGconn) -> None:
    """
    Hand back a lent connection whose statement is still running (timed out, or cancelled):
    ask the server to cancel it and take its answer, so that the connection is idle again.
    Blocking, but only on this failure path, and the server answers a cancel at once.
    """
    try:
        pgconn.get_cancel().cancel()
        pgconn.nonblocking = 0
        while pgconn.get_result() is not None:
            pass
    except psycopg.Error:
        pass  # the connection is broken: the application will find it so


def _events(read: logread.LogRead, after: int) -> list[Event]:
    if not read.found:
        raise UsageError(
            f"event {after} is not in the log (never stored, or pruned): read after an id "
            "the log has (one that read_log returned), or from 0"
        )
    return logread.events(read)
