"""`Listener`: LISTEN on a dedicated connection, from a thread."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any

from ._listener_base import ListenerBase, check_timeout
from ._models import Gap, Notification
from ._protocol.pgwire import DELIVER, REPORT, RESOLVE, SLEEP, WAIT, Request
from ._waiting import Waiter
from .errors import ConnectError, ListenError, PoolerError

logger = logging.getLogger("pgherald.listener")


class Listener(ListenerBase):
    """
    Listen to channels on a connection of its own, reconnecting whenever it is lost.

    Use it as a context manager, then either register handlers and `run`::

        with pgherald.Listener(dsn) as listener:
            @listener.on("orders")
            def order(n: pgherald.Notification) -> None: ...
            listener.run()          # until listener.stop()

    or iterate: ``for n in listener: ...``.

    .. versionadded:: 0.1
    """

    _allow_async_handlers = False

    def _setup(self) -> None:  # called by ListenerBase.__init__, whose signature users see
        self._waiter = Waiter()
        self._loop_thread: int | None = None  # the thread running run() or the iteration
        # One thread at a time drives the connection: a run/iteration, or a subscribe outside.
        self._io_lock = threading.Lock()

    # -- connection --

    def connect(self) -> None:
        """Connect and LISTEN now (done by ``with`` and by `run` when needed)."""
        if self._engine.connected:
            return
        self._waiter.open()
        try:
            self._waiter.run(self._engine.open())
        except PoolerError:
            self._waiter.close()
            raise  # its message already names the cause and the fix
        except ConnectError as exc:
            self._waiter.close()
            raise self._connect_error(exc) from None

    def close(self) -> None:
        """Stop and close the connection (a lent connection is handed back, UNLISTENed)."""
        self.stop()
        if self._engine.adopted_in_use:
            self._waiter.run(self._engine.release())
        self._engine.close()
        self._waiter.close()

    def __enter__(self) -> Listener:
        self.connect()
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def subscribe(self, *channels: str) -> None:
        """
        LISTEN to more *channels*.

        Returns once the server listens, also from another thread while `run` goes on; from
        inside a handler it cannot wait (the loop is running the handler), so it returns at
        once and the LISTEN is sent right after the handler.
        """
        self._request_channels(add=channels)
        self._sync_now()

    def unsubscribe(self, *channels: str) -> None:
        """UNLISTEN *channels* (same timing as `subscribe`)."""
        self._request_channels(remove=channels)
        self._sync_now()

    def _sync_now(self) -> None:
        engine = self._engine
        if self._mode is None:
            with self._io_lock:
                if self._mode is None:  # still nobody running: do it here
                    if engine.connected:
                        self._waiter.run(engine.sync_channels())
                    return
        if threading.get_ident() != self._loop_thread:
            # Running in another thread: it applies the change; wait until the server has it
            # (only a sync that starts after this request counts: see engine.after_sync).
            done = threading.Event()
            engine.after_sync(done.set)
            self._wake()
            timeout = engine.config.health_check_timeout + 10.0
            if not done.wait(timeout):
                raise ListenError(
                    f"LISTEN/UNLISTEN not confirmed within {timeout:g}s: the listener's loop "
                    "did not get to it (connection down and reconnecting, or a handler "
                    "blocking the loop); the change stays requested and is applied when the "
                    "loop resumes"
                )

    def _wake(self) -> None:
        self._waiter.wake()

    def _handler_channel_added(self) -> None:
        self._sync_now()

    # -- handler style --

    def run(self) -> None:
        """Dispatch notifications to handlers until `stop` is called."""
        self._begin("run")
        self._loop_thread = threading.get_ident()
        try:
            with self._io_lock:
                if self._engine.stopping:
                    return  # stop() came first: no connection for nothing
                self._waiter.open()
                # The first connection too is made inside engine.run, where stop() ends it.
                try:
                    self._waiter.run(self._engine.run(connect=True), self._on_request)
                except ConnectError as exc:
                    raise self._first_connect_failed(exc) from None
        finally:
            self._end()

    def _first_connect_failed(self, exc: ConnectError) -> ConnectError:
        """What `run` or an iteration raises when its first connection fails (as `connect`)."""
        self._waiter.close()
        if isinstance(exc, PoolerError):
            return exc  # its message already names the cause and the fix
        return self._connect_error(exc)

    def _on_request(self, req: Request) -> None:
        if req[0] == DELIVER:
            self._deliver()
        elif req[0] == REPORT:
            self._report(req[1])

    def _deliver(self) -> None:
        engine = self._engine
        budget = time.monotonic() + engine.config.delivery_budget
        engine.dispatch(self._handlers.single, self._dispatch_slow, self._handler_failed, budget)

    def _dispatch_slow(self, n: Notification) -> None:
        """Channels with several handlers, or none."""
        entries = self._handlers.lookup(n.channel)
        if not entries:
            self.stats.unhandled += 1
        for handler, _ in entries:
            try:
                handler(n)
            except Exception:
                self._handler_failed(handler, n)

    def _report(self, gap: Gap) -> None:
        if self.on_gap is not None:
            try:
                self.on_gap(gap)
            except Exception:
                logger.exception("on_gap hook failed")

    # -- iterator style --

    def __iter__(self) -> Iterator[Notification]:
        return self.notifications()

    def notifications(self, *, timeout: float | None = None) -> Iterator[Notification]:
        """
        Yield notifications until `stop`, or until none arrives for *timeout* seconds
        (connecting included; ``inf`` or None: no timeout, nan is refused).

        Reading pauses while your loop body runs: nothing piles up in memory.
        """
        timeout = check_timeout(timeout)
        return self._notifications(timeout)

    def _notifications(self, timeout: float | None) -> Iterator[Notification]:
        self._begin("iterate")
        self._loop_thread = threading.get_ident()
        gen = self._engine.run(connect=True)
        engine = self._engine
        clock = time.monotonic
        waiter = self._waiter
        stats = self.stats
        try:
            with self._io_lock:
                pass  # a subscribe that began before this iteration finishes first
            if engine.stopping:
                return  # stop() came first: no connection for nothing
            waiter.open()
            # The first connection is made by the engine (see run), within the timeout.
            idle_until = None if timeout is None else clock() + timeout
            send: Any = None
            while True:
                try:
                    req = gen.send(send)
                except StopIteration:
                    return
                except ConnectError as exc:
                    raise self._first_connect_failed(exc) from None
                send = None
                kind = req[0]
                if kind == WAIT:
                    deadline = req[3]
                    if idle_until is not None and (deadline is None or idle_until < deadline):
                        deadline = idle_until
                    send = waiter.wait(req[1], req[2], deadline)
                    if not send and idle_until is not None and clock() >= idle_until:
                        return
                elif kind == DELIVER:
                    budget = clock() + engine.config.delivery_budget
                    before = stats.received
                    batches = 0
                    # A batch at a time (engine.take), as in AsyncListener.notifications: what
                    # the loop body does not take goes back (unread).
                    while batch := engine.take():
                        k = 0
                        try:
                            for n in batch:
                                k += 1
                                stats.received += 1
                                yield n
                                if engine.stopping or (not k & 7 and clock() > budget):
                                    break
                        finally:
                            if k < len(batch):
                                engine.unread(batch[k:])
                        batches += 1
                        if engine.stopping or clock() > budget or batches == 16:
                            break  # back to the engine now and then: a subscribe may wait
                    if idle_until is not None and stats.received != before:
                        idle_until = clock() + timeout  # type: ignore[operator]
                elif kind == SLEEP:
                    deadline = req[1]
                    if idle_until is not None and idle_until < deadline:
                        deadline = idle_until
                    waiter.sleep(deadline)
                    if idle_until is not None and clock() >= idle_until:
                        return
                elif kind == REPORT:
                    self._report(req[1])
                elif kind == RESOLVE:
                    send = waiter.resolve(req[1], req[2], req[3])
        finally:
            gen.close()
            self._end()
