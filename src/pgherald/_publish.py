"""
`publish` / `apublish` (and `publish_many` / `apublish_many`): store events in the durable
log, in the caller's transaction.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from . import _drivers, _errormap, _tracing, sql
from ._protocol.channels import check_channel
from ._protocol.payload import JsonDumps
from .errors import PayloadNotSerializable, PublishError

# Made once (json.dumps with options builds an encoder per call); NaN/Infinity are not JSON.
_QUERY = sql.query("publish")
_MANY = sql.query("publish_many")
_LATER = sql.query("publish_later")
_strict_dumps: JsonDumps = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
"""A JSON text's escaped NUL (not an escaped backslash followed by "u0000")."""


_SUSPECT = re.compile(
    r"\\u0000"
    r"|\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])"
    r"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)
"""An escape jsonb may refuse: a NUL, or a lone surrogate (not half of a pair: an emoji's
escapes are fine). A cheap look, then the exact checks below."""


def _jsonb(text: str, what: str) -> str:
    """*text* (JSON), refused as PostgreSQL's jsonb would refuse it, in words that say why."""
    if "\\u" not in text:  # the usual case (json.dumps escapes all but ASCII: cheap looks)
        return text
    if "\\u0000" not in text and "\\ud" not in text and "\\uD" not in text:
        return text
    if not _SUSPECT.search(text):  # surrogates in pairs (an emoji): fine
        return text
    if _NUL_ESCAPE.search(text):
        raise PayloadNotSerializable(
            f"{what} holds a NUL character (\\u0000), which PostgreSQL's jsonb cannot store: "
            "remove it, or send binary data encoded (base64)"
        )
    try:
        json.dumps(json.loads(text), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise PayloadNotSerializable(
            f"{what} holds a lone surrogate (text that is not Unicode, such as a file name "
            "decoded with errors='surrogateescape'), which PostgreSQL's jsonb cannot store: "
            "decode it properly, or replace it"
        ) from None
    except ValueError:  # not JSON at all (a custom dumps): the server says so
        pass
    return text


def _headers(headers: Mapping[str, Any] | None, encode: JsonDumps) -> str | None:
    if headers is None:
        return None
    if not isinstance(headers, Mapping):
        raise PayloadNotSerializable(
            f"headers must be a dict of JSON values (or None), not {type(headers).__name__}"
        )
    try:
        text: Any = encode(dict(headers))
        if type(text) is not str:
            text = _as_str(text)
    except Exception as exc:  # a custom dumps may raise anything
        raise PayloadNotSerializable(
            f"headers cannot be stored as JSON ({exc}): use a dict of JSON values "
            "(dict/list/str/int/float/bool/None, no NaN or infinity)"
        ) from exc
    return _jsonb(text, "headers")


def _key(key: object, what: str = "key") -> None:
    if key is not None and not isinstance(key, str):
        raise PublishError(f"{what} must be a str or None, got {type(key).__name__}")
    if key is not None and "\x00" in key:
        raise PublishError(f"{what} holds a NUL character, which PostgreSQL's text cannot store")


def _params(
    channel: str,
    payload: object,
    key: str | None,
    headers: Mapping[str, Any] | None,
    dumps: JsonDumps | None,
) -> dict[str, Any]:
    encode = dumps or _strict_dumps
    try:
        text: Any = encode(payload)
        if type(text) is not str:
            text = _as_str(text)  # orjson and friends: UTF-8 bytes
    except Exception as exc:  # a custom dumps may raise anything
        raise PayloadNotSerializable(
            f"payload of type {type(payload).__name__} cannot be stored as JSON ({exc}): use "
            "dict/list/str/int/float/bool/None (no NaN or infinity)"
        ) from exc
    text = _jsonb(text, "payload")
    header_text = _headers(headers, encode)
    _key(key)
    return {"channel": check_channel(channel), "payload": text, "key": key, "headers": header_text}


def publish(
    conn: Any,
    channel: str,
    payload: object,
    *,
    key: str | None = None,
    headers: Mapping[str, Any] | None = None,
    dumps: JsonDumps | None = None,
    deliver_at: datetime | None = None,
    deliver_after: timedelta | None = None,
) -> int:
    """
    Store an event in the durable log through *conn*; return its id.

    The event exists if and only if the caller's transaction commits. Any JSON value, of any
    size. Events with the same *key* are consumed in order within a consumer group. Consumers
    are woken without a NOTIFY in every transaction (see docs/durable.md), and a full NOTIFY
    queue never makes this fail. Same connection types as `notify`.

    *deliver_at* (a timezone-aware datetime, by the server's clock) or *deliver_after* (from
    now): the event waits outside the log and enters it when due, released by any running
    consumer or `pgherald schedule run`; it then gets its log id (this returns the id of the
    waiting entry, in ``pgherald.scheduled_v1``). See docs/durable.md.

    .. versionadded:: 0.1
    """
    if _tracing.active is not None:  # pgherald.tracing.instrument()
        with _tracing.active.producer("publish", channel, headers) as traced:
            return _publish(conn, channel, payload, key, traced, dumps, deliver_at, deliver_after)
    return _publish(conn, channel, payload, key, headers, dumps, deliver_at, deliver_after)


def _publish(
    conn: Any,
    channel: str,
    payload: object,
    key: str | None,
    headers: Mapping[str, Any] | None,
    dumps: JsonDumps | None,
    deliver_at: datetime | None,
    deliver_after: timedelta | None,
) -> int:
    params = _params(channel, payload, key, headers, dumps)
    query = _QUERY
    if deliver_at is not None or deliver_after is not None:
        params.update(_when(deliver_at, deliver_after))
        query = _LATER
    try:  # not a context manager: this runs once per event and try costs nothing
        return int(_drivers.execute(conn, query, params, what="publish"))
    except Exception as exc:
        if not _errormap.is_driver_error(exc):
            raise
        raise _errormap.from_driver(exc, doing="publish") from exc


async def apublish(
    conn: Any,
    channel: str,
    payload: object,
    *,
    key: str | None = None,
    headers: Mapping[str, Any] | None = None,
    dumps: JsonDumps | None = None,
    deliver_at: datetime | None = None,
    deliver_after: timedelta | None = None,
) -> int:
    """
    Async `publish` for psycopg's ``AsyncConnection`` and SQLAlchemy's async connections.

    .. versionadded:: 0.1
    """
    if _tracing.active is not None:  # pgherald.tracing.instrument()
        with _tracing.active.producer("publish", channel, headers) as traced:
            return await _apublish(
                conn, channel, payload, key, traced, dumps, deliver_at, deliver_after
            )
    return await _apublish(conn, channel, payload, key, headers, dumps, deliver_at, deliver_after)


async def _apublish(
    conn: Any,
    channel: str,
    payload: object,
    key: str | None,
    headers: Mapping[str, Any] | None,
    dumps: JsonDumps | None,
    deliver_at: datetime | None,
    deliver_after: timedelta | None,
) -> int:
    params = _params(channel, payload, key, headers, dumps)
    query = _QUERY
    if deliver_at is not None or deliver_after is not None:
        params.update(_when(deliver_at, deliver_after))
        query = _LATER
    try:
        return int(await _drivers.aexecute(conn, query, params, what="publish"))
    except Exception as exc:
        if not _errormap.is_driver_error(exc):
            raise
        raise _errormap.from_driver(exc, doing="publish") from exc


def _when(deliver_at: object, deliver_after: object) -> dict[str, Any]:
    """The due time of a delayed event, checked: an absolute time, or seconds from now."""
    if deliver_at is not None and deliver_after is not None:
        raise PublishError("pass deliver_at or deliver_after, not both")
    if deliver_at is not None:
        if not isinstance(deliver_at, datetime):
            raise PublishError(
                f"deliver_at must be a datetime, got {type(deliver_at).__name__}: for a delay, "
                "use deliver_after=timedelta(...)"
            )
        if deliver_at.tzinfo is None or deliver_at.utcoffset() is None:
            raise PublishError(
                "deliver_at must be timezone-aware (a naive datetime has no single meaning): "
                "use datetime.now(timezone.utc) + ..., or deliver_after=timedelta(...)"
            )
        return {"deliver_at": deliver_at.isoformat(), "deliver_after": None}
    if not isinstance(deliver_after, timedelta):
        raise PublishError(
            f"deliver_after must be a timedelta, got {type(deliver_after).__name__}: "
            "for example timedelta(seconds=30)"
        )
    if deliver_after < timedelta(0):
        raise PublishError(f"deliver_after must not be negative, got {deliver_after}")
    return {"deliver_at": None, "deliver_after": repr(deliver_after.total_seconds())}


def _many_params(
    channel: str,
    payloads: Iterable[object],
    key: str | Iterable[str | None] | None,
    headers: Mapping[str, Any] | None,
    dumps: JsonDumps | None,
) -> dict[str, Any] | None:
    """The parameters of `publish_many` (None: nothing to publish), every input checked first."""
    checked = check_channel(channel)
    encode = dumps or _strict_dumps
    if isinstance(payloads, (str, bytes, bytearray, Mapping)) or not isinstance(
        payloads, Iterable
    ):  # a str or dict here is one event passed where a list of them was meant
        raise PublishError(
            f"payloads must be an iterable of events (a list...), got {type(payloads).__name__}:"
            " to publish one event, use publish()"
        )
    texts: list[str] = []
    for index, payload in enumerate(payloads):
        try:
            text: Any = encode(payload)
            if type(text) is not str:
                text = _as_str(text)
        except Exception as exc:  # a custom dumps may raise anything
            raise PayloadNotSerializable(
                f"payload at index {index} (of type {type(payload).__name__}) cannot be stored "
                f"as JSON ({exc}): use dict/list/str/int/float/bool/None (no NaN or infinity)"
            ) from exc
        texts.append(_jsonb(text, f"payload at index {index}"))
    one_key: str | None = None
    keys: list[str | None] | None = None
    if isinstance(key, str) or key is None:
        _key(key)
        one_key = key
    elif isinstance(key, (bytes, bytearray, Mapping)) or not isinstance(key, Iterable):
        raise PublishError(
            f"key must be a str, None, or an iterable of them (one per payload), got "
            f"{type(key).__name__}"
        )
    else:
        keys = list(key)
        if len(keys) != len(texts):
            raise PublishError(
                f"{len(keys)} keys for {len(texts)} payloads: pass one key per payload, or "
                "a single key for all"
            )
        for index, k in enumerate(keys):
            _key(k, f"key at index {index}")
    if not texts:
        return None
    header_text = _headers(headers, encode)
    # One JSON array each (see queries.sql): joined, not encoded again; the count catches a
    # custom dumps that wrote something other than one JSON value.
    return {
        "channel": checked,
        "payloads": "[" + ",".join(texts) + "]",
        "count": len(texts),
        "key": one_key,
        "keys": None if keys is None else json.dumps(keys),
        "headers": header_text,
    }


def _as_str(text: Any) -> str:
    """What a custom dumps returned, as str: orjson.dumps and friends return UTF-8 bytes."""
    if isinstance(text, (bytes, bytearray)):
        return text.decode()  # UnicodeDecodeError is a ValueError: reported as not JSON
    if isinstance(text, str):
        return str(text)
    raise TypeError(f"dumps returned {type(text).__name__}, not str or bytes")


def _ids(ids: Any, count: int) -> list[int]:
    if ids is None:
        raise PayloadNotSerializable(
            f"dumps did not return one JSON value for each of the {count} payloads: nothing "
            "was stored; pass a dumps that returns exactly one JSON document per call"
        )
    return [int(i) for i in ids]


def publish_many(
    conn: Any,
    channel: str,
    payloads: Iterable[object],
    *,
    key: str | Iterable[str | None] | None = None,
    headers: Mapping[str, Any] | None = None,
    dumps: JsonDumps | None = None,
) -> list[int]:
    """
    Store one event per payload in the durable log through *conn*, in one statement; return
    their ids, in payload order.

    As `publish` (same connections, the caller's transaction, at most one wake-up), at a
    fraction of the cost per event. *key* is one key for every event, or an iterable of one key
    (or None) per payload; *headers* go with every event. No payload: ``[]``, no round trip.

    .. versionadded:: 0.1
    """
    if _tracing.active is not None:  # pgherald.tracing.instrument()
        with _tracing.active.producer("publish", channel, headers) as traced:
            return _publish_many(conn, channel, payloads, key, traced, dumps)
    return _publish_many(conn, channel, payloads, key, headers, dumps)


def _publish_many(
    conn: Any,
    channel: str,
    payloads: Iterable[object],
    key: str | Iterable[str | None] | None,
    headers: Mapping[str, Any] | None,
    dumps: JsonDumps | None,
) -> list[int]:
    params = _many_params(channel, payloads, key, headers, dumps)
    if params is None:
        return []
    try:
        ids = _drivers.execute(conn, _MANY, params, what="publish")
    except Exception as exc:
        if not _errormap.is_driver_error(exc):
            raise
        raise _errormap.from_driver(exc, doing="publish") from exc
    return _ids(ids, params["count"])


async def apublish_many(
    conn: Any,
    channel: str,
    payloads: Iterable[object],
    *,
    key: str | Iterable[str | None] | None = None,
    headers: Mapping[str, Any] | None = None,
    dumps: JsonDumps | None = None,
) -> list[int]:
    """
    Async `publish_many` for psycopg's ``AsyncConnection`` and SQLAlchemy's async connections.

    .. versionadded:: 0.1
    """
    if _tracing.active is not None:  # pgherald.tracing.instrument()
        with _tracing.active.producer("publish", channel, headers) as traced:
            return await _apublish_many(conn, channel, payloads, key, traced, dumps)
    return await _apublish_many(conn, channel, payloads, key, headers, dumps)


async def _apublish_many(
    conn: Any,
    channel: str,
    payloads: Iterable[object],
    key: str | Iterable[str | None] | None,
    headers: Mapping[str, Any] | None,
    dumps: JsonDumps | None,
) -> list[int]:
    params = _many_params(channel, payloads, key, headers, dumps)
    if params is None:
        return []
    try:
        ids = await _drivers.aexecute(conn, _MANY, params, what="publish")
    except Exception as exc:
        if not _errormap.is_driver_error(exc):
            raise
        raise _errormap.from_driver(exc, doing="publish") from exc
    return _ids(ids, params["count"])
