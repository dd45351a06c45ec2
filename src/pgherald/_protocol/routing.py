"""Which handlers receive which channel (pure bookkeeping)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from ..errors import UsageError
from .channels import check_channel

Handler = Callable[[Any], Any]
#: (handler, is_async) pairs; the flag is computed once at registration, not per call.
Entry = tuple[Handler, bool]


class HandlerRegistry:
    """
    Handlers by channel, plus catch-all handlers for every channel.

    `lookup` is on the hot path: it is one dict lookup, with the catch-all handlers already
    merged into each channel's list.
    """

    def __init__(self, *, allow_async: bool) -> None:
        self._allow_async = allow_async
        self._by_channel: dict[str, list[Entry]] = {}
        self._catch_all: list[Entry] = []
        self._merged: dict[str, tuple[Entry, ...]] = {}
        #: channel -> its only handler, when that is one plain function: the fast path.
        self.single: dict[str, Handler] = {}

    def __bool__(self) -> bool:
        return bool(self._by_channel or self._catch_all)

    def add(self, channel: str | None, handler: Handler) -> None:
        is_async = inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
            getattr(handler, "__call__", None)  # noqa: B004 - an async __call__ counts too
        )
        if is_async and not self._allow_async:
            raise UsageError(
                f"handler {getattr(handler, '__name__', handler)!r} is async: use "
                "pgherald.AsyncListener for async handlers, or make it a plain function"
            )
        entry = (handler, is_async)
        if channel is None:
            self._catch_all.append(entry)
        else:
            self._by_channel.setdefault(check_channel(channel), []).append(entry)
        self._merged.clear()
        self.single.clear()

    def remove(self, channel: str | None, handler: Handler) -> None:
        entries = self._catch_all if channel is None else self._by_channel.get(channel, [])
        entries[:] = [e for e in entries if e[0] is not handler]
        if channel is not None and not entries:
            self._by_channel.pop(channel, None)
        self._merged.clear()
        self.single.clear()

    def channels(self) -> list[str]:
        """Channels that have at least one specific handler."""
        return list(self._by_channel)

    def lookup(self, channel: str) -> tuple[Entry, ...]:
        """Handlers for *channel*, specific ones first, then the catch-all ones."""
        try:
            return self._merged[channel]
        except KeyError:
            merged = (*self._by_channel.get(channel, ()), *self._catch_all)
            self._merged[channel] = merged
            if len(merged) == 1 and not merged[0][1]:
                self.single[channel] = merged[0][0]
            return merged
