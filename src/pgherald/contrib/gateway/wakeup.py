"""
A wake-up signal for one waiting task, as cheap as the event loop allows.

The hub sets one for every subscriber of every burst of events, so its cost is multiplied
by the number of clients: on asyncio it is a bare future; elsewhere (trio) an `anyio.Event`.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import anyio


class Signal(Protocol):
    def set(self) -> None:
        """Wake the waiter (or let its next `wait` return at once)."""

    async def wait(self) -> None:
        """Return once set (at once if set already), and clear."""


def on_asyncio() -> bool:
    """Whether this runs in an asyncio event loop (rather than trio, through anyio)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def new_signal() -> Signal:
    """A `Signal` for the running event loop (call from inside it)."""
    if on_asyncio():
        return _FutureSignal(asyncio.get_running_loop())
    return _AnyioSignal()


class _FutureSignal:
    __slots__ = ("_flag", "_loop", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._flag = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        self._flag = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        if not self._flag:
            self._waiter = waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        self._flag = False


class _AnyioSignal:
    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = anyio.Event()
