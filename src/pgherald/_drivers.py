"""
Run one statement through whatever connection the application has: psycopg 3, psycopg2, or
SQLAlchemy (``Connection``, ``Session``, a raw pool connection), sync or async.

Queries use ``%(name)s`` placeholders; values are always bound, never formatted in. Driver
errors are mapped to `pgherald` errors by the callers, through `_errormap`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from .errors import UsageError
from .sql import PLACEHOLDER

DRIVERS = ("psycopg", "psycopg2", "sqlalchemy")


def kind_of(conn: Any, supported: tuple[str, ...], what: str) -> tuple[str, Any]:
    """Which driver *conn* belongs to, by its type's package (no driver is imported); an
    async connection's kind ends with " async"."""
    kind = _KINDS.get(type(conn))
    if kind is None:
        if type(conn).__module__.startswith("sqlalchemy.pool"):
            # engine.raw_connection() gives a pool proxy: use the DBAPI connection inside.
            conn = conn.driver_connection
        module = type(conn).__module__
        kind = module.split(".", 1)[0]
        if kind == "psycopg2" and not hasattr(conn, "cursor"):
            kind = "a psycopg2 cursor"  # we take the connection, whose transaction we join
        elif kind == "psycopg" and not hasattr(conn, "cursor"):
            kind = "a psycopg cursor"
        elif (
            kind in ("psycopg", "sqlalchemy")
            and hasattr(type(conn), "__aenter__")
            and not (hasattr(type(conn), "__enter__"))
        ):
            kind += " async"  # AsyncConnection, AsyncSession: their execute is a coroutine
        if kind in ("psycopg", "psycopg2", "psycopg async") and len(_KINDS) < 64:
            _KINDS[type(conn)] = kind  # the common types, remembered: a dict hit per call
    if kind not in supported:
        if kind in ASYNC_DRIVERS:
            raise UsageError(
                f"cannot {what} through a {type(conn).__module__}.{type(conn).__qualname__} with "
                "the sync call: it is an async connection; await the async one (anotify, "
                "apublish, apublish_many)"
            )
        if kind in DRIVERS:
            raise UsageError(
                f"cannot {what} through a {type(conn).__module__}.{type(conn).__qualname__} with "
                "the async call: it is a sync connection; call the sync one (notify, publish, "
                "publish_many), or pass an async connection"
            )
        raise UsageError(
            f"cannot {what} through a {type(conn).__module__}.{type(conn).__qualname__}: pass "
            "a psycopg 3, psycopg2 or SQLAlchemy connection (async: psycopg AsyncConnection or "
            "SQLAlchemy AsyncConnection)"
        )
    return kind, conn


_KINDS: dict[type, str] = {}
ASYNC_DRIVERS = ("psycopg async", "sqlalchemy async")


def _take_cursor(conn: Any) -> Any:
    """
    A cursor of psycopg connection *conn* that returns tuples, whatever the connection's row
    factory (``dict_row``...): the spare one the connection keeps for us, else a new one.

    Reusing it is what keeps ``publish`` near a plain INSERT with 16 writers on 2 cores
    (0.84-0.99x of it; a new cursor per call: 0.62-0.73x): a new cursor resolves its
    adapters again on every call. The spare lives in an attribute of the connection; a cache
    keyed by the connection would keep it alive forever (the cursor refers to it). The price:
    connection and cursor refer to each other, so a connection dropped without ``close()``
    (which psycopg warns about) is closed by the garbage collector rather than at once, and
    adapters registered on the connection after its first notify/publish are not seen by
    them. Taken with ``pop``, given back with ``append`` (atomic under the GIL): threads and
    tasks sharing a connection each get a cursor of their own.
    """
    spare: list[Any] | None = getattr(conn, _SPARE, None)
    if spare:
        try:
            return spare.pop()
        except IndexError:  # another thread took it first
            pass
    from psycopg.rows import tuple_row

    return conn.cursor(row_factory=tuple_row)


def _give_back(conn: Any, cur: Any) -> None:
    """Keep *cur* (after a successful statement only) as *conn*'s spare."""
    spare: list[Any] | None = getattr(conn, _SPARE, None)
    if spare is None:
        with contextlib.suppress(AttributeError):  # a class without a __dict__: no reuse
            setattr(conn, _SPARE, [cur])
    elif not spare:
        spare.append(cur)


_SPARE = "_pgherald_spare_cursor"


def _first(row: Any) -> Any:
    """The first value of a row from any psycopg2 cursor factory (tuple, list or dict rows)."""
    if isinstance(row, Mapping):  # RealDictCursor
        return next(iter(row.values()), None)
    return row[0]


def execute(conn: Any, query: str, params: Mapping[str, Any], *, what: str) -> Any:
    """Run *query* on *conn* and return the first column of the first row (or None)."""
    kind, conn = kind_of(conn, DRIVERS, what)
    if kind == "psycopg":
        cur = _take_cursor(conn)
        row = cur.execute(query, params).fetchone()
        _give_back(conn, cur)  # not after an error: the next call makes a new one
    elif kind == "psycopg2":
        # The connection's own cursor factory: logging and tracing connections see the call.
        with conn.cursor() as cur:
            cur.execute(query, params)
            row = cur.fetchone() if cur.description else None
        return _first(row) if row else None
    else:
        from sqlalchemy import text

        row = conn.execute(text(PLACEHOLDER.sub(r":\1", query)), dict(params)).first()
    return row[0] if row else None


async def aexecute(conn: Any, query: str, params: Mapping[str, Any], *, what: str) -> Any:
    """`execute` for psycopg's AsyncConnection and SQLAlchemy's async connections."""
    kind, conn = kind_of(conn, ASYNC_DRIVERS, what)
    if kind == "psycopg async":
        cur = _take_cursor(conn)
        await cur.execute(query, params)
        row = await cur.fetchone()
        _give_back(conn, cur)
    else:
        from sqlalchemy import text

        result = await conn.execute(text(PLACEHOLDER.sub(r":\1", query)), dict(params))
        row = result.first()
    return row[0] if row else None
