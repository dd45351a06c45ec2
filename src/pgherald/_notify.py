"""
`notify` / `anotify`: NOTIFY from the caller's own connection, inside the caller's transaction.

Channel and payload travel as bound parameters of ``pg_notify(%s, %s)``; nothing is formatted
into SQL. The notification is delivered when the caller's transaction commits and dropped if it
rolls back (in autocommit mode it is delivered at once).
"""

from __future__ import annotations

from typing import Any

from ._protocol.channels import check_channel
from ._protocol.payload import JsonDumps, encode_payload
from .errors import NotifyError, UsageError

_QUERY = "SELECT pg_notify(%s, %s)"
_SA_QUERY = "SELECT pg_notify(:channel, :payload)"
_DRIVERS = ("psycopg", "psycopg2", "sqlalchemy")


def notify(
    conn: Any, channel: str, payload: object = "", *, dumps: JsonDumps | None = None
) -> None:
    """
    Send a notification on *channel* through *conn*.

    *conn* is a psycopg 3 ``Connection``, a psycopg2 connection, or a SQLAlchemy ``Connection``
    or ``Session`` (also their raw DBAPI connections). *payload* is a str, sent as it is, or any
    JSON-serialisable value, sent as JSON (*dumps* replaces `json.dumps`).

    .. versionadded:: 0.1
    """
    channel = check_channel(channel)
    text = encode_payload(payload, dumps=dumps)
    kind, conn = _kind(conn, ("psycopg", "psycopg2", "sqlalchemy"))
    try:
        if kind == "psycopg":
            conn.execute(_QUERY, (channel, text))
        elif kind == "psycopg2":
            with conn.cursor() as cur:
                cur.execute(_QUERY, (channel, text))
        else:
            from sqlalchemy import text as sa_text

            conn.execute(sa_text(_SA_QUERY), {"channel": channel, "payload": text})
    except Exception as exc:
        if _is_driver_error(exc):
            raise _notify_error(exc, channel) from exc
        raise


async def anotify(
    conn: Any, channel: str, payload: object = "", *, dumps: JsonDumps | None = None
) -> None:
    """
    Async `notify` for a psycopg 3 ``AsyncConnection`` or a SQLAlchemy ``AsyncConnection``
    / ``AsyncSession``.

    .. versionadded:: 0.1
    """
    channel = check_channel(channel)
    text = encode_payload(payload, dumps=dumps)
    kind, conn = _kind(conn, ("psycopg", "sqlalchemy"))
    try:
        if kind == "psycopg":
            await conn.execute(_QUERY, (channel, text))
        else:
            from sqlalchemy import text as sa_text

            await conn.execute(sa_text(_SA_QUERY), {"channel": channel, "payload": text})
    except Exception as exc:
        if _is_driver_error(exc):
            raise _notify_error(exc, channel) from exc
        raise


def _kind(conn: Any, supported: tuple[str, ...]) -> tuple[str, Any]:
    """Which driver *conn* belongs to, by its type's package (no driver is imported)."""
    if type(conn).__module__.startswith("sqlalchemy.pool"):
        # engine.raw_connection() gives a pool proxy: use the DBAPI connection inside.
        conn = conn.driver_connection
    kind = type(conn).__module__.split(".", 1)[0]
    if kind == "psycopg2" and not hasattr(conn, "cursor"):
        kind = "a psycopg2 cursor"  # notify() takes the connection, whose transaction it joins
    if kind not in supported:
        raise UsageError(
            f"cannot NOTIFY through a {type(conn).__module__}.{type(conn).__qualname__}: pass "
            "a psycopg 3, psycopg2 or SQLAlchemy connection (async: psycopg AsyncConnection or "
            "SQLAlchemy AsyncConnection)"
        )
    return kind, conn


def _is_driver_error(exc: Exception) -> bool:
    return type(exc).__module__.split(".", 1)[0] in _DRIVERS


def _notify_error(exc: Exception, channel: str) -> NotifyError:
    """A driver error as a `NotifyError` that names the channel and, when known, the fix."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    hint = ""
    if "current transaction is aborted" in message or "InFailedSqlTransaction" in repr(exc):
        hint = ": the transaction already failed; roll it back before notifying"
    elif "closed" in message:
        hint = ": the connection is closed; open a new one"
    return NotifyError(f"NOTIFY on channel {channel!r} failed: {message}{hint}")
