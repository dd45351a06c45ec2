"""The async runtime: carries out the engine's requests on asyncio or trio through anyio."""

from __future__ import annotations

import asyncio
import asyncio.selector_events
import contextlib
import os
import socket
import sys
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Generator
from typing import Any, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel

from ._protocol.pgwire import READ, RESOLVE, SLEEP, WAIT, Request, addresses

T = TypeVar("T")

_running_loop = asyncio._get_running_loop  # None outside asyncio; a C call, no exception


_readers: weakref.WeakValueDictionary[tuple[int, int], AsyncWaiter] = weakref.WeakValueDictionary()
"""Which waiter's reader each (event loop, socket number) has: a waiter removes its own only."""


def _watch(
    add: Callable[[int, Callable[[], None]], object],
    loop: asyncio.AbstractEventLoop,
    fd: int,
    callback: Callable[[], None],
) -> None:
    """`loop.add_reader` or `add_writer` (*add*) of *callback* for socket number *fd*."""
    try:
        add(fd, callback)
    except (RuntimeError, OSError):
        # The number is still registered for a socket closed without its reader removed (a
        # kept reader's: libpq closed the socket as the connection broke): the next socket to
        # get the number cannot be watched until that entry goes. The selector loop's epoll
        # forgot the closed socket, so adding to its entry fails (FileNotFoundError); uvloop
        # closed its watcher at the reset (RuntimeError). The number is ours now: it goes.
        for remove in (loop.remove_reader, loop.remove_writer):
            with contextlib.suppress(RuntimeError, OSError, ValueError):
                remove(fd)
        add(fd, callback)


class LoopCaller:
    """
    Runs a function on the event loop that `bind` found: at once on the loop's own thread (or
    before any `bind`), else scheduled from the other thread, never waited for. The caller
    (a ``stop()`` from a signal handler, a watchdog thread) must not wait on the loop: it may
    be busy in a handler, or not running at all (between ``run_until_complete`` calls), and
    then a wait for it has no end.
    """

    __slots__ = ("_soon", "_thread", "_token")

    def __init__(self) -> None:
        self._soon: Callable[[Callable[[], object]], object] | None = None  # thread-safe call
        self._thread: int | None = None
        self._token: Any = None

    def bind(self) -> None:
        """Remember the running event loop (asyncio, trio, or another anyio backend)."""
        self._thread = threading.get_ident()
        loop = _running_loop()
        if loop is not None:
            self._soon = loop.call_soon_threadsafe
            return
        trio = sys.modules.get("trio")
        if trio is not None and trio.lowlevel.in_trio_run():
            self._soon = trio.lowlevel.current_trio_token().run_sync_soon
            return
        self._soon = None
        self._token = anyio.lowlevel.current_token()

    def call(self, fn: Callable[[], object]) -> None:
        if self._thread is None or threading.get_ident() == self._thread:
            fn()
            return
        with contextlib.suppress(RuntimeError):  # the loop has finished: nothing to call
            soon = self._soon
            if soon is not None:
                soon(fn)
            else:  # another anyio backend: its own thread call (waits for the loop)
                anyio.from_thread.run_sync(fn, token=self._token)


_lookups: dict[tuple[asyncio.AbstractEventLoop, str, str], asyncio.Task[Any]] = {}
"""Host name lookups under way, per event loop: one at a time per name."""


def _lookup(loop: asyncio.AbstractEventLoop, host: str, port: str) -> asyncio.Task[Any]:
    """
    The loop's lookup of *host*, started now or already under way. A lookup cannot be
    stopped (the loop runs ``getaddrinfo`` on one of its few executor threads): one given
    up at a deadline goes on, and the next attempt waits for it rather than take another
    thread, so a resolver that hangs holds one thread per name, not one per attempt.
    """
    key = (loop, host, port)
    task = _lookups.get(key)
    if task is None:
        task = loop.create_task(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        )
        _lookups[key] = task

        def done(t: asyncio.Task[Any]) -> None:
            if _lookups.get(key) is t:
                del _lookups[key]
            if not t.cancelled():
                t.exception()  # taken: an answer nobody waits for any more is not an error

        task.add_done_callback(done)
    return task


class _TrioLookup:
    """A lookup under way on trio, which a system task runs: its answer, for every waiter."""

    def __init__(self, done: Any) -> None:
        self.done = done  # a trio.Event
        self.infos: Any = None
        self.error: BaseException | None = None


_trio_lookups: dict[tuple[object, str, str], _TrioLookup] = {}
"""Host name lookups under way, per trio run: one at a time per name."""


def _trio_lookup(host: str, port: str) -> _TrioLookup:
    """
    `_lookup` for trio: trio runs ``getaddrinfo`` on a thread that a cancel abandons, and an
    abandoned thread keeps its token of trio's default thread limiter (40) until it returns:
    against a resolver that hangs, attempts of their own would take them all, for every
    `to_thread` call of the application. A system task (not cancelled with the attempt) runs
    one lookup per name, and attempts wait for its answer.
    """
    import trio

    key = (trio.lowlevel.current_trio_token(), host, port)
    lookup = _trio_lookups.get(key)
    if lookup is None:
        lookup = _TrioLookup(trio.Event())
        _trio_lookups[key] = lookup
        this = lookup

        async def run() -> None:
            try:
                this.infos = await trio.socket.getaddrinfo(
                    host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
                )
            except Exception as exc:  # the waiters' answer (a system task must not raise)
                this.error = exc
            finally:  # (trio.Cancelled, at the end of the run, goes on up)
                if _trio_lookups.get(key) is this:
                    del _trio_lookups[key]
                this.done.set()

        trio.lowlevel.spawn_system_task(run)
    return lookup


class CancelOnStop:
    """
    Gives *scope* a deadline *timeout* seconds after `arm` (None: never), or *limit* seconds
    after it is made (None: never; made on the event loop): how `stop()` (and a consumer's
    ``transaction_timeout``) ends a transactional handler that still runs then (a frozen
    connection holds it, say). `arm` is safe from any thread: it runs on the event loop
    through *caller*.
    """

    def __init__(
        self,
        scope: anyio.CancelScope,
        timeout: float | None,
        caller: LoopCaller,
        limit: float | None = None,
    ) -> None:
        self._scope = scope
        self._timeout = timeout
        self._caller = caller
        # The loop's clock, as monotonic() + offset: `_arm_here` runs as a loop callback,
        # where anyio cannot tell which loop it is on.
        self._offset = anyio.current_time() - time.monotonic()
        self.done = False
        self.stopped = False
        """The deadline is stop()'s (else, once the scope is cancelled, it was *limit*)."""
        if limit is not None:
            scope.deadline = anyio.current_time() + limit

    def arm(self) -> None:
        if self._timeout is not None:
            self._caller.call(self._arm_here)

    def _arm_here(self) -> None:
        if self.done or self._timeout is None or self._scope.cancel_called:
            return
        at = time.monotonic() + self._offset + self._timeout
        if at < self._scope.deadline:
            self._scope.deadline, self.stopped = at, True


class AsyncWaiter:
    """
    Waits on a connection socket, cancellable by `wake`, on asyncio or trio.

    `wake` may be called from the event loop's thread (a handler, another task) or from any
    other thread; it interrupts the current wait so the engine can look at its flags.

    A wait is the listener's per-read cost, so each event loop gets its own path rather than
    `anyio.wait_readable` inside an `anyio.CancelScope` (28 µs CPU per wait on asyncio, 21 on
    trio, with the byte's send and recv, on the benchmark machine): on asyncio a future
    resolved by `loop.add_reader` and one timer re-armed only when a deadline comes earlier
    (7 µs with *keep_reader*: the reader stays registered between the reads of a stream,
    17 µs without); on trio `trio.lowlevel.wait_readable` in a `trio.CancelScope` (17 µs). Any other loop (or asyncio without `add_reader`) takes
    the anyio path. Cancellation works as for any await: the future or the trio wait is
    cancelled with the task.
    """

    def __init__(self, *, keep_reader: bool = False) -> None:
        self._scope: Any = None  # the anyio or trio cancel scope of the current wait
        self._woken = False
        self._caller = LoopCaller()
        # asyncio path: the wait's future, its deadline (time.monotonic) and a lazy timer.
        self._keep = keep_reader
        self._fut: asyncio.Future[bool] | None = None
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # time.monotonic() the timer fires at
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._reader: tuple[asyncio.AbstractEventLoop, int, int] | None = None  # (loop, fd, ino)
        self._stale = False  # the reader's next call reports what woke us already
        self._selector = False  # the reader's loop is a selector loop (see _on_readable)

    def bind(self) -> None:
        """Remember the running event loop, so other threads can reach it."""
        self._caller.bind()

    def wake(self) -> None:
        self._caller.call(self._wake_here)

    @property
    def caller(self) -> LoopCaller:
        """Runs a function on this waiter's event loop, from any thread (see `LoopCaller`)."""
        return self._caller

    def _wake_here(self) -> None:
        self._woken = True
        if self._scope is not None:
            self._scope.cancel()
        fut = self._fut
        if fut is not None and not fut.done():
            fut.set_result(False)

    async def wait(self, fd: int, events: int, deadline: float | None) -> bool:
        if self._woken:
            self._woken = False
            await anyio.lowlevel.checkpoint()
            return False
        loop = _running_loop()
        if loop is not None:
            try:
                return await self._wait_asyncio(loop, fd, events, deadline)
            except NotImplementedError:  # a loop without add_reader (Windows' proactor)
                self._fut = None
        else:
            trio = sys.modules.get("trio")
            if trio is not None and trio.lowlevel.in_trio_run():
                return await self._wait_trio(trio, fd, events, deadline)
        return await self._wait_anyio(fd, events, deadline)

    # -- asyncio --

    async def _wait_asyncio(
        self, loop: asyncio.AbstractEventLoop, fd: int, events: int, deadline: float | None
    ) -> bool:
        fut: asyncio.Future[bool] = loop.create_future()
        self._fut = fut
        self._deadline = deadline
        if deadline is not None and (
            self._timer is None or self._timer_at > deadline or self._timer_loop is not loop
        ):
            self._arm(loop, deadline)
        if events & READ:
            kept = self._keep
            reader = self._reader
            if reader is None or reader[0] is not loop or reader[1] != fd:
                self.release()
                self._add_reader(loop, fd)
            elif os.fstat(fd).st_ino != reader[2]:
                # The same number, another socket (reconnected): epoll forgot the old one.
                self.release()
                self._add_reader(loop, fd)
        else:
            self.release()
            _watch(loop.add_writer, loop, fd, self._on_writable)
            kept = False
        try:
            ready = await fut
        finally:
            self._fut = None
            if not events & READ:
                loop.remove_writer(fd)
            if not kept:
                self.release()
        if not ready:  # woken or timed out
            self._woken = False
        return ready

    def _on_readable(self) -> None:
        if self._stale:
            # The selector loop's first look after it woke us: the socket is still readable
            # because our task has not run yet, and by the time this runs it has read the data
            # and may be waiting again. Waking it would be for nothing (level-triggered: data
            # that did come meanwhile is reported again at the next look).
            self._stale = False
            return
        fut = self._fut
        if fut is None:
            # Nobody waits (the task is busy elsewhere): stop watching, or a level-triggered
            # reader would spin the loop until the data is read.
            self.release()
        elif not fut.done():
            fut.set_result(True)
            # Only a selector loop looks again before our task runs. uvloop runs it in the
            # same turn: its next call is the next readiness itself, and after a reset (RST)
            # libuv reports that once and stops watching: dropped, a connection's end would go
            # unseen until the health check.
            self._stale = self._selector

    def _on_writable(self) -> None:
        fut = self._fut
        if fut is not None and not fut.done():
            fut.set_result(True)

    def _arm(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer_loop = loop
        self._timer = loop.call_at(
            loop.time() + max(0.0, deadline - time.monotonic()), self._on_timer, loop
        )

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        fut, deadline = self._fut, self._deadline
        if fut is None or fut.done() or deadline is None:
            return
        if time.monotonic() < deadline:  # armed for an earlier wait: wait on
            self._arm(loop, deadline)
        else:
            fut.set_result(False)

    def _add_reader(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        _watch(loop.add_reader, loop, fd, self._on_readable)
        self._selector = isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop)
        # The socket's identity, for a kept reader only (a reconnection may reuse the number).
        self._reader = (loop, fd, os.fstat(fd).st_ino if self._keep else 0)
        _readers[(id(loop), fd)] = self

    def release(self) -> None:
        """Stop watching the socket (the listener's loop ends, or its socket changes)."""
        reader, self._reader = self._reader, None
        self._stale = False
        if reader is not None:
            loop, fd = reader[0], reader[1]
            # Only our own registration: once our socket is closed, its number may be another
            # waiter's socket, with that waiter's reader there: removing "fd's reader" would
            # leave it deaf (a gateway's log tail was, after its listener reconnected).
            if _readers.get((id(loop), fd)) is self:
                del _readers[(id(loop), fd)]
                with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to remove
                    loop.remove_reader(fd)
        if self._fut is None and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- trio --

    async def _wait_trio(self, trio: Any, fd: int, events: int, deadline: float | None) -> bool:
        with trio.CancelScope() as scope:
            if deadline is not None:
                scope.deadline = trio.current_time() + max(0.0, deadline - time.monotonic())
            self._scope = scope
            try:
                if events & READ:
                    await trio.lowlevel.wait_readable(fd)
                else:
                    await trio.lowlevel.wait_writable(fd)
            finally:
                self._scope = None
            return True
        self._woken = False
        return False

    # -- any other anyio backend --

    async def _wait_anyio(self, fd: int, events: int, deadline: float | None) -> bool:
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

    async def resolve(self, host: str, port: str, deadline: float | None) -> Any:
        """
        Look *host* up with the event loop's own resolver (`RESOLVE`): its addresses; None on
        a wake-up or at *deadline*; the OSError when the name does not resolve. A lookup
        given up goes on, and the next one for the name waits for it (`_lookup`,
        `_trio_lookup`).
        """
        if self._woken:
            self._woken = False
            await anyio.lowlevel.checkpoint()
            return None
        with anyio.CancelScope() as scope:
            if deadline is not None:
                scope.deadline = anyio.current_time() + max(0.0, deadline - time.monotonic())
            self._scope = scope
            try:
                loop = _running_loop()
                if loop is not None:
                    infos = await asyncio.shield(_lookup(loop, host, port))
                else:  # trio (anyio's one other backend)
                    lookup = _trio_lookup(host, port)
                    await lookup.done.wait()
                    if lookup.error is not None:
                        raise lookup.error
                    infos = lookup.infos
            except (OSError, UnicodeError) as exc:  # a name IDNA cannot encode: UnicodeError
                return exc if isinstance(exc, OSError) else OSError(str(exc))
            finally:
                self._scope = None
            return addresses(infos)
        self._woken = False
        return None

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
            elif kind == RESOLVE:
                send = await self.resolve(req[1], req[2], req[3])
            elif on_request is not None:
                send = await on_request(req)
            else:  # pragma: no cover - a programming error in the engine
                raise RuntimeError(f"unexpected request {req!r}")
