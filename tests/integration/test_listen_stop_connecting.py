"""
`stop()` and `close()` end a listener's *first* connection attempt too (made inside `run()` or
an iteration) within a second, on every runtime; a `stop()` before `run()` makes that run return
at once without connecting; an iteration's timeout bounds its first connection; and a nan
timeout is refused. The server accepts TCP and never answers (`SilentServer`).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest

import pgherald
from tests.fix_faults import SilentServer, wait_until

RUNTIMES = ["sync", "asyncio", "trio"]
CONNECT_TIMEOUT = 8  # far longer than any of the bounds checked here


def _dsn(server: SilentServer) -> str:
    return f"host=127.0.0.1 port={server.port} user=postgres dbname=x"


class Run:
    """*body(listener)* (run or iterate) of a listener of *runtime*, on a thread of its own."""

    def __init__(self, runtime: str, listener: Any, body: Callable[[Any], Any]) -> None:
        self.runtime = runtime
        self.listener = listener
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.ended: float | None = None
        self._body = body
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()

    def _main(self) -> None:
        try:
            if self.runtime == "sync":
                try:
                    self._body(self.listener)
                finally:
                    self.ended = time.monotonic()
                    self.listener.close()
            else:
                anyio.run(self._main_async, backend=self.runtime)
        except BaseException as exc:  # kept for the test
            self.error = exc

    async def _main_async(self) -> None:
        try:
            await self._body(self.listener)
        finally:
            self.ended = time.monotonic()
            await self.listener.aclose()

    def took_after(self, since: float, within: float) -> float:
        self.thread.join(within + CONNECT_TIMEOUT + 5)
        assert not self.thread.is_alive(), "the listener never returned"
        assert self.ended is not None
        took = self.ended - since
        assert self.error is None, repr(self.error)
        assert took < within, f"returned {took:.2f}s later (at most {within}s)"
        return took


def _listener(runtime: str, server: SilentServer, **options: Any) -> Any:
    cls = pgherald.Listener if runtime == "sync" else pgherald.AsyncListener
    return cls(_dsn(server), channels=["orders"], connect_timeout=CONNECT_TIMEOUT, **options)


def _run(listener: Any) -> Any:
    return listener.run()  # a coroutine on an AsyncListener: anyio.run awaits it


def _iterate(timeout: float | None = None) -> Callable[[Any], Any]:
    def sync_body(listener: Any) -> None:
        for _ in listener.notifications(timeout=timeout):
            pass

    async def async_body(listener: Any) -> None:
        async for _ in listener.notifications(timeout=timeout):
            pass

    def body(listener: Any) -> Any:
        if isinstance(listener, pgherald.Listener):
            return sync_body(listener)
        return async_body(listener)

    return body


def _with_handler(listener: Any) -> Any:
    listener.on("orders")(lambda n: None)
    return listener


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("style", ["run", "iterate"])
def test_stop_ends_the_first_connection_attempt(
    runtime: str, style: str, silent_server: SilentServer
) -> None:
    listener = _listener(runtime, silent_server)
    if style == "run":
        _with_handler(listener)
    run = Run(runtime, listener, _run if style == "run" else _iterate())
    wait_until(lambda: silent_server.accepted, 5, "the first connection attempt")
    stopped = time.monotonic()
    listener.stop()
    run.took_after(stopped, 1.0)
    assert not listener.connected


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("style", ["run", "iterate"])
def test_stop_before_run_returns_at_once_without_connecting(
    runtime: str, style: str, silent_server: SilentServer
) -> None:
    listener = _listener(runtime, silent_server)
    if style == "run":
        _with_handler(listener)
    listener.stop()
    started = time.monotonic()
    run = Run(runtime, listener, _run if style == "run" else _iterate())
    run.took_after(started, 0.5)
    assert silent_server.accepted == []  # not even a connection attempt


def test_close_from_another_thread_ends_the_first_connection_attempt(
    silent_server: SilentServer,
) -> None:
    listener = _with_handler(_listener("sync", silent_server))
    run = Run("sync", listener, _run)
    wait_until(lambda: silent_server.accepted, 5, "the first connection attempt")
    closed = time.monotonic()
    listener.close()
    run.took_after(closed, 1.0)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_iteration_timeout_bounds_the_first_connection(
    runtime: str, silent_server: SilentServer
) -> None:
    listener = _listener(runtime, silent_server)
    run = Run(runtime, listener, _iterate(timeout=1.0))
    took = run.took_after(run.started, 2.0)
    assert took >= 1.0
    assert silent_server.accepted  # it did try
    assert not listener.connected


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_nan_timeout_is_refused_and_inf_means_none(
    runtime: str, silent_server: SilentServer
) -> None:
    listener = _listener(runtime, silent_server)
    with pytest.raises(pgherald.UsageError, match="nan"):
        listener.notifications(timeout=math.nan)
    assert listener._mode is None  # refused before the iteration began
    # inf: no timeout at all; stop() ends it (while it is connecting).
    run = Run(runtime, listener, _iterate(timeout=math.inf))
    wait_until(lambda: silent_server.accepted, 5, "the first connection attempt")
    stopped = time.monotonic()
    listener.stop()
    run.took_after(stopped, 1.0)
