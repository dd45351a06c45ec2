"""`AsyncListener`: the same listener for asyncio and trio (through anyio)."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from types import TracebackType
from typing import Any

import anyio
import anyio.lowlevel

from ._listener_base import ListenerBase
from ._models import Gap, Notification
from ._protocol.pgwire import DELIVER, REPORT, SLEEP, WAIT, Request
from ._protocol.routing import Entry
from ._waiting_async import AsyncWaiter
from .errors import ConnectError, ListenError, PoolerError

logger = logging.getLogger("pgherald.listener")

# Socket reads a delivery may do on its own while a burst streams in (see engine.dispatch)
# before going back through the event loop; 16 libpq reads are ~256 KB, what asyncio's own
# transports read at once (64 measured no better at 4 KB payloads, and holds the loop longer).
_REREADS = 16
# An iteration whose data keeps coming never waits: once per this many batches (a batch: one
# libpq read, ~16 KB) it lets the loop run other tasks (and deliver a cancellation), and the
# engine look at its flags (a subscribe).
_BATCHES_PER_CHECKPOINT = 16


class AsyncListener(ListenerBase):
    """
    The async `Listener`: same options, same behaviour, on asyncio or trio.

    Handlers may be plain functions or coroutine functions::

        async with pgherald.AsyncListener(dsn) as listener:
            @listener.on("orders")
            async def order(n: pgherald.Notification) -> None: ...
            await listener.run()    # until listener.stop()

    or iterate: ``async for n in listener: ...``.

    .. versionadded:: 0.1
    """

    _allow_async_handlers = True
    _loop_task: int | None = None  # the task running run() or the iteration

    def _setup(self) -> None:  # called by ListenerBase.__init__, whose signature users see
        self._waiter = AsyncWaiter(keep_reader=True)
        self._dispatching = False  # handlers are running: the loop cannot serve a subscribe
        # One task at a time drives the connection: a run/iteration, or a subscribe outside one.
        self._io_lock = anyio.Lock()

    # -- connection --

    async def connect(self) -> None:
        """Connect and LISTEN now (done by ``async with`` and by `run` when needed)."""
        self._waiter.bind()
        if self._engine.connected:
            return
        try:
            await self._waiter.run(self._engine.open())
        except PoolerError:
            raise  # its message already names the cause and the fix
        except ConnectError as exc:
            raise self._connect_error(exc) from None

    async def aclose(self) -> None:
        """Stop and close the connection (a lent connection is handed back, UNLISTENed)."""
        self.stop()
        self._waiter.release()
        if self._engine.adopted_in_use:
            with anyio.CancelScope(shield=True):
                await self._waiter.run(self._engine.release())
        self._engine.close()

    async def __aenter__(self) -> AsyncListener:
        await self.connect()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def subscribe(self, *channels: str) -> None:
        """
        LISTEN to more *channels*; returns once the server listens.

        While `run` is going in another task, the running loop applies it and this waits for
        that; from inside a handler of this listener it cannot wait (the loop is busy running
        the handler), so it returns at once and the LISTEN follows right after the handler.
        """
        self._request_channels(add=channels)
        await self._sync_now()

    async def unsubscribe(self, *channels: str) -> None:
        """UNLISTEN *channels* (same timing as `subscribe`)."""
        self._request_channels(remove=channels)
        await self._sync_now()

    async def _sync_now(self) -> None:
        engine = self._engine
        if self._mode is None:
            async with self._io_lock:
                if self._mode is None:  # still nobody running: do it here
                    if engine.connected:
                        await self._waiter.run(engine.sync_channels())
                    return
        if self._dispatching and anyio.get_current_task().id == self._loop_task:
            return  # called by a handler or the loop body: the loop applies it right after
        # Only a sync that starts after this request counts: see engine.after_sync.
        done = anyio.Event()
        engine.after_sync(done.set)
        self._wake()
        timeout = engine.config.health_check_timeout + 10.0
        with anyio.move_on_after(timeout):
            await done.wait()
        if not done.is_set():
            raise ListenError(
                f"LISTEN/UNLISTEN not confirmed within {timeout:g}s: the listener's loop did "
                "not get to it (connection down and reconnecting, or a handler blocking the "
                "loop); the change stays requested and is applied when the loop resumes"
            )

    def _wake(self) -> None:
        self._waiter.wake()

    # -- handler style --

    async def run(self) -> None:
        """Dispatch notifications to handlers until `stop` is called (or the task is cancelled)."""
        self._begin("run")
        self._loop_task = anyio.get_current_task().id
        try:
            async with self._io_lock:
                await self.connect()
                await self._waiter.run(self._engine.run(), self._on_request)
        finally:
            self._waiter.release()
            self._end()

    async def _on_request(self, req: Request) -> None:
        if req[0] == DELIVER:
            self._dispatching = True
            try:
                await self._deliver()
            finally:
                self._dispatching = False
        elif req[0] == REPORT:
            await self._report(req[1])

    async def _deliver(self) -> None:
        engine = self._engine
        budget = time.monotonic() + engine.config.delivery_budget
        single = self._handlers.single
        while True:
            pending = engine.dispatch(
                single, self._dispatch_slow, self._handler_failed, budget, _REREADS
            )
            if pending is None:
                return
            await pending
            if engine.stopping or time.monotonic() > budget:
                return

    def _dispatch_slow(self, n: Notification) -> Awaitable[None] | None:
        """Channels with several handlers, none, or async ones: a coroutine if any is async."""
        entries = self._handlers.lookup(n.channel)
        if not entries:
            self.stats.unhandled += 1
            return None
        if not any(is_async for _, is_async in entries):
            for handler, _ in entries:
                try:
                    handler(n)
                except Exception:
                    self._handler_failed(handler, n)
            return None
        return self._call_all(entries, n)

    async def _call_all(self, entries: tuple[Entry, ...], n: Notification) -> None:
        for handler, is_async in entries:
            try:
                if is_async:
                    await handler(n)
                else:
                    handler(n)
            except Exception:
                self._handler_failed(handler, n)

    async def _report(self, gap: Gap) -> None:
        if self.on_gap is not None:
            try:
                result = self.on_gap(gap)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("on_gap hook failed")

    # -- iterator style --

    def __aiter__(self) -> AsyncIterator[Notification]:
        return self.notifications()

    async def notifications(
        self,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - an idle timeout, not a deadline
    ) -> AsyncIterator[Notification]:
        """Yield notifications until `stop`, or until none arrives for *timeout* seconds."""
        self._begin("iterate")
        self._loop_task = anyio.get_current_task().id
        gen = self._engine.run()
        engine = self._engine
        clock = time.monotonic
        waiter = self._waiter
        stats = self.stats
        try:
            async with self._io_lock:
                pass  # a subscribe that began before this iteration finishes first
            await self.connect()
            idle_until = None if timeout is None else clock() + timeout
            send: Any = None
            while True:
                try:
                    req = gen.send(send)
                except StopIteration:
                    return
                send = None
                kind = req[0]
                if kind == WAIT:
                    deadline = req[3]
                    if idle_until is not None and (deadline is None or idle_until < deadline):
                        deadline = idle_until
                    send = await waiter.wait(req[1], req[2], deadline)
                    if not send and idle_until is not None and clock() >= idle_until:
                        return
                elif kind == DELIVER:
                    budget = clock() + engine.config.delivery_budget
                    before = stats.received
                    batches = 0
                    # A batch at a time (engine.take): no await and no engine call per
                    # notification; what the loop body does not take goes back (unread).
                    while batch := engine.take():
                        # The loop body runs now, not the engine: a subscribe from it must
                        # not wait for the engine (see _sync_now).
                        self._dispatching = True
                        k = 0
                        try:
                            for n in batch:
                                k += 1
                                yield n
                                if engine.stopping or (not k & 7 and clock() > budget):
                                    break
                        finally:
                            self._dispatching = False
                            stats.received += k  # once per batch, not per notification
                            if k < len(batch):
                                engine.unread(batch[k:])
                        if engine.stopping or clock() > budget:
                            break
                        batches += 1
                        if batches == _BATCHES_PER_CHECKPOINT:
                            await anyio.lowlevel.checkpoint()
                            break  # back to the engine: a subscribe may have come meanwhile
                    if idle_until is not None and stats.received != before:
                        idle_until = clock() + timeout  # type: ignore[operator]
                elif kind == SLEEP:
                    deadline = req[1]
                    if idle_until is not None and idle_until < deadline:
                        deadline = idle_until
                    await waiter.sleep(deadline)
                    if idle_until is not None and clock() >= idle_until:
                        return
                elif kind == REPORT:
                    await self._report(req[1])
        finally:
            gen.close()
            waiter.release()
            self._end()
