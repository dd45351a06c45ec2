"""`AsyncListener`: the same listener for asyncio and trio (through anyio)."""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Generator
from types import TracebackType
from typing import Any

import anyio
import anyio.lowlevel

from ._listener_base import ListenerBase, check_timeout
from ._models import Gap, Notification
from ._protocol.pgwire import DELIVER, REPORT, RESOLVE, SLEEP, WAIT, Request
from ._protocol.routing import Entry
from ._waiting_async import AsyncWaiter
from .errors import ConnectError, ListenError, PoolerError

logger = logging.getLogger("pgherald.listener")

_clock = time.monotonic

# Socket reads a delivery may do on its own while a burst streams in (see engine.dispatch)
# before going back through the event loop (a checkpoint, not a wait, while data keeps
# coming): 4 libpq reads of up to 64 KB, about what asyncio's own transports read per turn
# of the loop (256 KB).
_REREADS = 3
# An iteration whose data keeps coming never waits: once per this many batches (a batch: at
# most engine._TAKE_MAX notifications, or one libpq read) it lets the loop run other tasks
# (and deliver a cancellation), and the engine look at its flags (a subscribe).
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
                if self._engine.stopping:
                    return  # stop() came first: no connection for nothing
                self._waiter.bind()
                # The first connection too is made inside engine.run, where stop() ends it.
                try:
                    await self._waiter.run(self._engine.run(connect=True), self._on_request)
                except ConnectError as exc:
                    raise self._first_connect_failed(exc) from None
        finally:
            self._waiter.release()
            self._end()

    def _first_connect_failed(self, exc: ConnectError) -> ConnectError:
        """What `run` or an iteration raises when its first connection fails (as `connect`)."""
        if isinstance(exc, PoolerError):
            return exc  # its message already names the cause and the fix
        return self._connect_error(exc)

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
                if engine.streaming and not engine.stopping:
                    # The engine delivers again at once, without a wait: let the loop run
                    # other tasks (and deliver a cancellation) first.
                    await anyio.lowlevel.checkpoint()
                return
            await pending
            # An async handler that called subscribe/unsubscribe: the change goes out right
            # after it (listen.md), not after the rest of the burst.
            if engine.stopping or engine.sync_wanted or time.monotonic() > budget:
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

    def notifications(
        self,
        *,
        timeout: float | None = None,
    ) -> AsyncIterator[Notification]:
        """
        Yield notifications until `stop`, or until none arrives for *timeout* seconds
        (connecting included; ``inf`` or None: no timeout, nan is refused).

        Reading pauses while your loop body runs: nothing piles up in memory. Close an
        iteration you leave early with ``aclose()`` (``contextlib.aclosing``) or by dropping
        it: either hands the notifications it had read back to the listener.
        """
        return _Notifications(self, check_timeout(timeout))


class _Notifications:
    """
    `AsyncListener.notifications()`: an async iterator class rather than an async generator.

    ``async for`` costs one ``__anext__`` per notification, and an async generator's is the
    dearer one (an ``asend`` object, a wrapped value and a ``StopIteration`` per item). Here
    ``__anext__`` hands out the next notification of the batch taken from libpq (`take`) in
    a few bytecodes, and goes to `_next` (the engine, the waiter, the checks) once per batch.
    The behaviour is the generator's: a batch at a time, what the loop body does not take
    goes back (unread), a checkpoint every `_BATCHES_PER_CHECKPOINT` batches of a stream that
    never lets it wait, stop() and the delivery budget looked at every 8 notifications, and
    any exception (cancellation) or ``aclose()`` ends the iteration and releases the listener.
    """

    __slots__ = (
        "_batch",
        "_batches",
        "_before",
        "_budget",
        "_delivering",
        "_engine",
        "_gen",
        "_i",
        "_idle_until",
        "_listener",
        "_send",
        "_state",
        "_timeout",
    )

    def __init__(self, listener: AsyncListener, timeout: float | None) -> None:
        self._listener = listener
        self._engine = listener._engine
        self._timeout = timeout
        self._gen: Generator[Request, Any, Any] | None = None
        self._state = 0  # 0: not started, 1: iterating, 2: finished
        self._batch: list[Notification] = []  # taken from the engine; handed out up to _i
        self._i = 0
        self._budget = 0.0  # time.monotonic() deadline of the current delivery
        self._delivering = False  # inside a DELIVER request: batches until none is left
        self._batches = 0
        self._before = 0  # stats.received when the delivery began
        self._idle_until: float | None = None
        self._send: Any = None  # what the engine gets for its last request

    def __aiter__(self) -> _Notifications:
        return self

    async def __anext__(self) -> Notification:
        # The hot path: the next notification of the batch, unless stop() was called or the
        # delivery budget is spent (looked at every 8th time: the clock costs more than this).
        i = self._i
        batch = self._batch
        if i < len(batch) and not self._engine.stopping and (i & 7 or _clock() <= self._budget):
            self._i = i + 1
            return batch[i]
        return await self._next()

    async def _next(self) -> Notification:
        if self._state != 1:
            if self._state == 2:
                raise StopAsyncIteration
            await self._start()
        try:
            n = await self._advance()
        except BaseException:
            self._finish()  # an error, a cancellation, or the end (StopAsyncIteration)
            raise
        return n

    async def _start(self) -> None:
        listener = self._listener
        try:
            listener._begin("iterate")
        except BaseException:
            self._state = 2  # as a generator that failed: it is over
            raise
        self._state = 1
        try:
            listener._loop_task = anyio.get_current_task().id
            async with listener._io_lock:
                pass  # a subscribe that began before this iteration finishes first
            if self._engine.stopping:
                raise StopAsyncIteration  # stop() came first: no connection for nothing
            listener._waiter.bind()
            # The first connection is made by the engine (see run), within the timeout.
            self._gen = self._engine.run(connect=True)
            if self._timeout is not None:
                self._idle_until = _clock() + self._timeout
        except BaseException:
            self._finish()
            raise

    async def _advance(self) -> Notification:
        """The end of the current batch, then the engine's requests until the next batch."""
        listener = self._listener
        engine = self._engine
        stats = listener.stats
        if self._delivering:
            batch = self._batch
            if batch:  # done with it: count what was handed out, put back the rest
                i = self._i
                listener._dispatching = False
                stats.received += i
                if i < len(batch):
                    engine.unread(batch[i:])
                self._batch = []
                self._i = 0
                if engine.stopping or _clock() > self._budget:
                    self._end_delivery()
                else:
                    self._batches += 1
                    if self._batches == _BATCHES_PER_CHECKPOINT:
                        await anyio.lowlevel.checkpoint()
                        self._end_delivery()  # back to the engine: a subscribe may wait
        gen = self._gen
        assert gen is not None
        waiter = listener._waiter
        idle_until = self._idle_until
        while True:
            if self._delivering:
                # A batch at a time (engine.take): no engine call per notification.
                batch = engine.take()
                if batch:
                    # The loop body runs now, not the engine: a subscribe from it must not
                    # wait for the engine (see _sync_now).
                    listener._dispatching = True
                    self._batch = batch
                    self._i = 1
                    return batch[0]
                self._end_delivery()
                idle_until = self._idle_until
            try:
                req = gen.send(self._send)
            except StopIteration:
                raise StopAsyncIteration from None
            except ConnectError as exc:
                raise listener._first_connect_failed(exc) from None
            self._send = None
            kind = req[0]
            if kind == WAIT:
                deadline = req[3]
                if idle_until is not None and (deadline is None or idle_until < deadline):
                    deadline = idle_until
                ready = await waiter.wait(req[1], req[2], deadline)
                self._send = ready
                if not ready and idle_until is not None and _clock() >= idle_until:
                    raise StopAsyncIteration
            elif kind == DELIVER:
                self._delivering = True
                self._budget = _clock() + engine.config.delivery_budget
                self._before = stats.received
                self._batches = 0
            elif kind == SLEEP:
                deadline = req[1]
                if idle_until is not None and idle_until < deadline:
                    deadline = idle_until
                await waiter.sleep(deadline)
                if idle_until is not None and _clock() >= idle_until:
                    raise StopAsyncIteration
            elif kind == REPORT:
                await listener._report(req[1])
            elif kind == RESOLVE:
                self._send = await waiter.resolve(req[1], req[2], req[3])

    def _end_delivery(self) -> None:
        self._delivering = False
        if self._idle_until is not None and self._listener.stats.received != self._before:
            self._idle_until = _clock() + self._timeout  # type: ignore[operator]

    def _finish(self) -> None:
        """End the iteration: put back what was not handed out, release the listener."""
        if self._state != 1:
            self._state = 2
            return
        self._state = 2
        listener = self._listener
        batch, i = self._batch, self._i
        self._batch = []
        if batch:
            listener._dispatching = False
            listener.stats.received += i
            if i < len(batch):
                self._engine.unread(batch[i:])
        gen, self._gen = self._gen, None
        try:
            if gen is not None:
                gen.close()
            listener._waiter.release()
        finally:
            listener._end()

    async def aclose(self) -> None:
        """End the iteration now (what ``contextlib.aclosing`` calls)."""
        self._finish()

    def __del__(self) -> None:
        # Dropped without aclose() (a `break` out of ``async for``): release the listener
        # now, rather than when a garbage-collection hook would have closed a generator.
        if self._state == 1:
            with contextlib.suppress(Exception):
                self._finish()
