"""The async runtime: carries out the engine's requests on asyncio or trio through anyio."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Generator
from typing import Any, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel

from ._protocol.pgwire import READ, SLEEP, WAIT, Request

T = TypeVar("T")


class AsyncWaiter:
    """
    Waits on a connection socket with `anyio.wait_readable`, cancellable by `wake`.

    `wake` may be called from the event loop's thread (a handler, another task) or from any
    other thread; it interrupts the current wait so the engine can look at its flags.
    """

    def __init__(self) -> None:
        self._scope: anyio.CancelScope | None = None
        self._woken = False
        self._token: Any = None
        self._thread: int | None = None

    def bind(self) -> None:
        """Remember the running event loop, so other threads can reach it."""
        self._thread = threading.get_ident()
        self._token = anyio.lowlevel.current_token()

    def wake(self) -> None:
        if self._thread is None or threading.get_ident() == self._thread:
            self._wake_here()
            return
        with contextlib.suppress(RuntimeError):  # the loop has finished: nothing to wake
            anyio.from_thread.run_sync(self._wake_here, token=self._token)

    def _wake_here(self) -> None:
        self._woken = True
        if self._scope is not None:
            self._scope.cancel()

    async def wait(self, fd: int, events: int, deadline: float | None) -> bool:
        if self._woken:
            self._woken = False
            await anyio.lowlevel.checkpoint()
            return False
        with anyio.CancelScope() as scope:
            if deadline is not None:
                # Our deadlines are time.monotonic(); trio's clock has its own origin.
                scope.deadline = anyio.current_time() + max(0.0, deadline - time.monotonic())
            self._scope = scope
            try:
                if events & READ:
                    await anyio.wait_readable(fd)
                else:
                    await anyio.wait_writable(fd)
            finally:
                self._scope = None
            return True
        self._woken = False
        return False

    async def sleep(self, deadline: float) -> None:
        with anyio.CancelScope() as scope:
            scope.deadline = anyio.current_time() + max(0.0, deadline - time.monotonic())
            self._scope = scope
            try:
                await anyio.sleep_forever()
            finally:
                self._scope = None
        self._woken = False

    async def run(
        self,
        gen: Generator[Request, Any, T],
        on_request: Callable[[Request], Awaitable[Any]] | None = None,
    ) -> T:
        """Drive *gen* to completion; requests other than WAIT/SLEEP go to *on_request*."""
        send: Any = None
        while True:
            try:
                req = gen.send(send)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            kind = req[0]
            if kind == WAIT:
                send = await self.wait(req[1], req[2], req[3])
            elif kind == SLEEP:
                await self.sleep(req[1])
                send = None
            elif on_request is not None:
                send = await on_request(req)
            else:  # pragma: no cover - a programming error in the engine
                raise RuntimeError(f"unexpected request {req!r}")
