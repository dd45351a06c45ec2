"""
One statement with parameters on a connection, its failures as `HeraldError`: the step that
the log reader and the gateway's own connections share (sans-I/O, see `pgwire`).
"""

from __future__ import annotations

from collections.abc import Generator, Mapping

import psycopg
from psycopg import pq

from .. import _errormap, sql
from ..errors import ConnectionLost, UsageError
from . import pgwire
from .pgwire import Request

Params = Mapping[str, str | None]


def named(
    pgconn: pq.abc.PGconn,
    name: str,
    params: Params,
    deadline: float,
    *,
    doing: str,
    binary: bool = False,
) -> Generator[Request, bool, pq.abc.PGresult]:
    """
    Run the named query *name* of ``queries.sql`` with *params* (text values, by name) and
    return its last result. Errors: the `_errormap` class for the server's answer; a
    connection that breaks, or gives no answer by *deadline*, is `ConnectionLost` (the
    statement may still be in flight then: the caller drops or cancels the connection).
    """
    query, values = sql.bound(name, params)
    if pgconn.transaction_status == pq.TransactionStatus.ACTIVE:
        raise UsageError(
            f"{doing}: the connection is busy with another statement (was it shared between "
            "threads or tasks?): give pgherald a connection no one else uses meanwhile"
        )
    try:
        results = yield from pgwire.execute_params(pgconn, query, values, deadline, binary=binary)
    except pgwire.QueryFailed as exc:
        raise _errormap.from_sqlstate(exc.sqlstate, str(exc), doing=doing) from None
    except pgwire.QueryTimeout:
        raise ConnectionLost(
            f"{doing} got no answer in time: the server is overloaded or unreachable (a "
            "larger timeout, or a look at the server, helps)"
        ) from None
    except psycopg.OperationalError as exc:
        raise _errormap.from_sqlstate("08006", str(exc), doing=doing) from exc
    if not results:
        raise ConnectionLost(f"{doing}: the server sent no result")
    return results[-1]


def text(res: pq.abc.PGresult, row: int, col: int) -> str | None:
    """One value of a result, as text (text columns in either format)."""
    value = res.get_value(row, col)
    return None if value is None else value.decode()
