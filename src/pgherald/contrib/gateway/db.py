"""
The gateway's own database connections: one statement at a time, on the event loop.

Statements are sans-I/O generators (`pgherald._protocol`) driven by `AsyncWaiter`, so they
wait on the loop itself, asyncio or trio, with a deadline: no worker thread, and a cancelled
request costs the connection (it is dropped), never a blocked thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from typing import TypeVar

import anyio
from psycopg import pq

from ..._conninfo import connect_error, listener_conninfo
from ..._protocol import pgwire, session
from ..._protocol.pgwire import Request
from ..._waiting_async import AsyncWaiter
from ...errors import ConnectError, ConnectionLost, DatabaseConnectionError, HeraldError

T = TypeVar("T")

Statement = Callable[[pq.abc.PGconn, float], Generator[Request, bool, T]]
"""A statement to run: called with the connection and the deadline, returns the generator."""

CANCEL_GRACE = 2.0
"""Seconds a statement still running at its deadline has, once cancelled, to answer: the
cancel request and the statement's last answer, bounded together."""

QUERY_CANCELED = "57014"


class OutcomeUnknown(ConnectionLost):
    """
    A statement still running at its deadline could not be confirmed cancelled (no answer to
    the cancel, or the connection broke): it may have taken effect, or may yet.
    """


class Db:
    """A lazily (re)connected connection of the gateway's: calls are serialised."""

    def __init__(
        self,
        dsn: str,
        *,
        application_name: str,
        connect_timeout: float = 5.0,
        statement_timeout: float = 10.0,
        on_connect: str | None = None,
    ) -> None:
        self._conninfo = listener_conninfo(dsn, application_name=application_name)
        self._on_connect = on_connect
        """A named query run on every new connection (session state, such as a lock)."""
        self.connect_timeout = connect_timeout
        self.statement_timeout = statement_timeout
        self._pgconn: pq.abc.PGconn | None = None
        self._lock = anyio.Lock()

    async def run(self, statement: Statement[T], *, seconds: float | None = None) -> T:
        """
        Run *statement*, connecting first if needed. Raises the statement's `HeraldError`;
        `ConnectError` when no connection can be made. After any failure but a plain error
        answer (the connection idle and sound), the connection is dropped: the next call opens
        a new one.
        """
        async with self._lock:
            pgconn = self._pgconn
            if pgconn is None or pgconn.status != pq.ConnStatus.OK:
                self.close()
                pgconn = await self._connect()
            deadline = time.monotonic() + (self.statement_timeout if seconds is None else seconds)
            done = False
            state = pgwire.Cancelling()
            try:
                gen = statement(pgconn, deadline + CANCEL_GRACE)
                result = await AsyncWaiter().run(
                    pgwire.cancel_at(pgconn, gen, deadline, CANCEL_GRACE, state)
                )
                done = True
                return result
            except HeraldError as exc:
                if not state.cancelled:
                    raise
                if exc.sqlstate == QUERY_CANCELED:  # confirmed: the statement did nothing
                    done = True  # (the connection is idle again)
                    raise ConnectionLost(
                        "the statement got no answer in time and was cancelled: the server is "
                        "overloaded, or the data it needs is locked"
                    ) from None
                if isinstance(exc, DatabaseConnectionError):  # no answer, or a broken one
                    raise OutcomeUnknown(
                        "the statement got no answer in time, nor did its cancel: it may "
                        "have taken effect"
                    ) from None
                raise  # another error of the statement's: it did nothing either
            finally:
                if not done and (
                    pgconn.status != pq.ConnStatus.OK
                    or pgconn.transaction_status != pq.TransactionStatus.IDLE
                ):
                    self.close()

    async def named(
        self, name: str, params: session.Params, *, doing: str, seconds: float | None = None
    ) -> pq.abc.PGresult:
        """Named query *name* (``queries.sql``) with *params*: its result (text format)."""

        def statement(
            pgconn: pq.abc.PGconn, deadline: float
        ) -> Generator[Request, bool, pq.abc.PGresult]:
            return session.named(pgconn, name, params, deadline, doing=doing)

        return await self.run(statement, seconds=seconds)

    async def _connect(self) -> pq.abc.PGconn:
        deadline = time.monotonic() + self.connect_timeout
        try:
            pgconn = await AsyncWaiter().run(pgwire.connect(self._conninfo, deadline))
        except ConnectError as exc:
            raise connect_error(self._conninfo, str(exc)) from None
        if self._on_connect is not None:
            try:
                await AsyncWaiter().run(
                    session.named(pgconn, self._on_connect, {}, deadline, doing="connect")
                )
            except BaseException:
                pgconn.finish()
                raise
        self._pgconn = pgconn
        return pgconn

    def close(self) -> None:
        pgconn, self._pgconn = self._pgconn, None
        if pgconn is not None:
            pgconn.finish()
