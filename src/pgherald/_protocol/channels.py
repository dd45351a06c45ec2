"""Channel-name rules and the LISTEN/UNLISTEN statements built from them."""

from __future__ import annotations

from collections.abc import Iterable

from psycopg import sql

from ..errors import InvalidChannel

#: PostgreSQL identifiers hold at most NAMEDATALEN - 1 = 63 bytes; longer ones are truncated
#: silently by LISTEN, so a listener would never hear pg_notify() on the full name.
MAX_CHANNEL_BYTES = 63


def check_channel(channel: object) -> str:
    """
    Return *channel* if PostgreSQL can use it exactly as spelled, else raise `InvalidChannel`.

    Any text is allowed (quotes, spaces, upper case, non-ASCII): it is always quoted.
    """
    if type(channel) is str and channel in _CHECKED:  # publishers reuse a few names: skip
        return channel
    if not isinstance(channel, str):
        raise InvalidChannel(
            f"channel must be a str, got {type(channel).__name__}: pass the channel name as text"
        )
    if not channel:
        raise InvalidChannel("channel name is empty: give a non-empty channel name")
    if "\x00" in channel:
        raise InvalidChannel("channel name contains a NUL character, which PostgreSQL rejects")
    try:
        size = len(channel.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidChannel(
            f"channel name {channel!r} is not valid UTF-8 (it holds a lone surrogate): "
            "decode it properly, or use another name"
        ) from None
    if size > MAX_CHANNEL_BYTES:
        raise InvalidChannel(
            f"channel name {channel[:20]!r}... is {size} bytes; PostgreSQL allows at most "
            f"{MAX_CHANNEL_BYTES} bytes (it would silently truncate it): use a shorter name"
        )
    if type(channel) is str and len(_CHECKED) < 1024:
        _CHECKED[channel] = None
    return channel


_CHECKED: dict[str, None] = {}  # names already found valid (bounded: a per-call hit, no growth)


def listen_query(channel: str) -> bytes:
    """``LISTEN "channel"``, quoted so the case and every character are kept."""
    return sql.SQL("LISTEN {}").format(sql.Identifier(channel)).as_bytes(None)


def unlisten_query(channel: str) -> bytes:
    """``UNLISTEN "channel"``."""
    return sql.SQL("UNLISTEN {}").format(sql.Identifier(channel)).as_bytes(None)


def text_array(values: Iterable[str]) -> str:
    """A PostgreSQL text[] literal; every element quoted, so any channel name goes through."""
    quoted = ('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values)
    return "{" + ",".join(quoted) + "}"
