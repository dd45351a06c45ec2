"""
`notify` / `anotify`: NOTIFY from the caller's own connection, inside the caller's transaction.

Channel and payload travel as bound parameters of ``pg_notify(%s, %s)``; nothing is formatted
into SQL. The notification is delivered when the caller's transaction commits and dropped if it
rolls back (in autocommit mode it is delivered at once).
"""

from __future__ import annotations

from typing import Any

from . import _drivers, _errormap, _tracing
from ._protocol.channels import check_channel
from ._protocol.payload import JsonDumps, encode_payload

_QUERY = "SELECT pg_notify(%(channel)s, %(payload)s)"


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
    if _tracing.active is not None:  # pgherald.tracing.instrument()
        with _tracing.active.producer("notify", channel):
            _notify(conn, channel, payload, dumps)
        return
    _notify(conn, channel, payload, dumps)


def _notify(conn: Any, channel: str, payload: object, dumps: JsonDumps | None) -> None:
    params = {"channel": check_channel(channel), "payload": encode_payload(payload, dumps=dumps)}
    try:
        _drivers.execute(conn, _QUERY, params, what="NOTIFY")
    except Exception as exc:
        if _errormap.is_driver_error(exc):
            raise _errormap.from_driver(exc, doing=f"NOTIFY on channel {channel!r}") from exc
        raise


async def anotify(
    conn: Any, channel: str, payload: object = "", *, dumps: JsonDumps | None = None
) -> None:
    """
    Async `notify` for a psycopg 3 ``AsyncConnection`` or a SQLAlchemy ``AsyncConnection``
    / ``AsyncSession``.

    .. versionadded:: 0.1
    """
    if _tracing.active is not None:  # pgherald.tracing.instrument()
        with _tracing.active.producer("notify", channel):
            await _anotify(conn, channel, payload, dumps)
        return
    await _anotify(conn, channel, payload, dumps)


async def _anotify(conn: Any, channel: str, payload: object, dumps: JsonDumps | None) -> None:
    params = {"channel": check_channel(channel), "payload": encode_payload(payload, dumps=dumps)}
    try:
        await _drivers.aexecute(conn, _QUERY, params, what="NOTIFY")
    except Exception as exc:
        if _errormap.is_driver_error(exc):
            raise _errormap.from_driver(exc, doing=f"NOTIFY on channel {channel!r}") from exc
        raise
