"""`publish` / `apublish`: store an event in the durable log, in the caller's transaction."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from . import _drivers, sql
from ._protocol.channels import check_channel
from ._protocol.payload import JsonDumps
from ._schema import missing_schema_error
from .errors import HeraldError, PayloadNotSerializable, PublishError

# Made once (json.dumps with options builds an encoder per call); NaN/Infinity are not JSON.
_QUERY = sql.query("publish")
_strict_dumps: JsonDumps = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def _params(
    channel: str,
    payload: object,
    key: str | None,
    headers: Mapping[str, Any] | None,
    dumps: JsonDumps | None,
) -> dict[str, Any]:
    encode = dumps or _strict_dumps
    try:
        text = encode(payload)
        header_text = None if headers is None else encode(dict(headers))
    except (TypeError, ValueError) as exc:
        raise PayloadNotSerializable(
            f"payload of type {type(payload).__name__} cannot be stored as JSON ({exc}): use "
            "dict/list/str/int/float/bool/None (no NaN or infinity)"
        ) from exc
    if key is not None and not isinstance(key, str):
        raise PublishError(f"key must be a str or None, got {type(key).__name__}")
    return {"channel": check_channel(channel), "payload": text, "key": key, "headers": header_text}


def publish(
    conn: Any,
    channel: str,
    payload: object,
    *,
    key: str | None = None,
    headers: Mapping[str, Any] | None = None,
    dumps: JsonDumps | None = None,
) -> int:
    """
    Store an event in the durable log through *conn*; return its id.

    The event exists if and only if the caller's transaction commits. Any JSON value, of any
    size. Events with the same *key* are consumed in order within a consumer group. Consumers
    are woken without a NOTIFY in every transaction (see docs/durable.md), and a full NOTIFY
    queue never makes this fail. Same connection types as `notify`.

    .. versionadded:: 0.1
    """
    params = _params(channel, payload, key, headers, dumps)
    try:  # not a context manager: this runs once per event and try costs nothing
        return int(_drivers.execute(conn, _QUERY, params, what="publish"))
    except Exception as exc:
        if not _drivers.is_driver_error(exc):
            raise
        raise _error(exc) from exc


async def apublish(
    conn: Any,
    channel: str,
    payload: object,
    *,
    key: str | None = None,
    headers: Mapping[str, Any] | None = None,
    dumps: JsonDumps | None = None,
) -> int:
    """
    Async `publish` for psycopg's ``AsyncConnection`` and SQLAlchemy's async connections.

    .. versionadded:: 0.1
    """
    params = _params(channel, payload, key, headers, dumps)
    try:
        return int(await _drivers.aexecute(conn, _QUERY, params, what="publish"))
    except Exception as exc:
        if not _drivers.is_driver_error(exc):
            raise
        raise _error(exc) from exc


def _error(exc: Exception) -> HeraldError:
    """A driver's error as SchemaMissing or PublishError."""
    return missing_schema_error(exc) or _drivers.wrap(
        exc, lambda m: PublishError(f"publish failed: {m}")
    )
