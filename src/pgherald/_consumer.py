"""`Consumer` and `AsyncConsumer`: read a consumer group's events from the durable log."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from ._conninfo import listener_conninfo
from ._consumer_core import ConsumerCore, CoreLost, Event, Start
from ._protocol.backoff import backoff_delay
from ._protocol.channels import check_channel
from ._protocol.pgwire import READ
from ._waiting import Waiter
from ._waiting_async import AsyncWaiter
from .errors import ConnectionLost, UsageError

logger = logging.getLogger("pgherald.consumer")

H = TypeVar("H", bound=Callable[..., Any])
_Entry = tuple[Callable[..., Any], bool, bool]  # handler, is_async, transactional


class _ConsumerBase:
    """Options, handlers and the retry policy shared by both runtimes."""

    def __init__(
        self,
        dsn: str | None = None,
        *,
        group: str,
        channels: Iterable[str] = (),
        start: Start = "beginning",
        reset: bool = False,
        batch_size: int = 1000,
        max_batch_size: int | None = None,
        poll_interval: float = 0.5,
        linger: float = 0.02,
        rebalance_interval: float = 1.0,
        max_attempts: int = 3,
        retry_delay: float = 0.2,
        reconnect_max_attempts: int | None = None,
        json_loads: Callable[[str], Any] = json.loads,
    ) -> None:
        if isinstance(channels, str):
            channels = [channels]
        self.channels = {check_channel(c) for c in channels}
        self._core = ConsumerCore(
            listener_conninfo(dsn, application_name="pgherald-consumer"),
            group=group,
            start=start,
            reset=reset,
            batch_size=batch_size,
            max_batch_size=max_batch_size,
            rebalance_interval=rebalance_interval,
        )
        self.poll_interval = poll_interval
        self.linger = linger
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay
        self.reconnect_max_attempts = reconnect_max_attempts
        self._loads = json_loads
        self._handlers: dict[str | None, list[_Entry]] = {}
        self._stopping = False
        self._done: list[Event] = []  # handled events of the current batch, to acknowledge
        self.stats = {"received": 0, "handler_errors": 0, "skipped": 0, "reconnects": 0}

    @property
    def group(self) -> str:
        return self._core.group

    @property
    def partitions(self) -> list[int]:
        """The partitions this consumer holds now (out of 16)."""
        return list(self._core.owned)

    @property
    def read_size(self) -> int:
        """
        How many events the next read asks for: ``batch_size`` when caught up; while reads come
        back full (a backlog), twice the last one's, up to ``max_batch_size``.
        """
        return self._core.read_size

    @property
    def backend_pid(self) -> int | None:
        conn = self._core.conn
        return conn.pgconn.backend_pid if conn is not None else None

    def on(self, *channels: str, transactional: bool = False) -> Callable[[H], H]:
        """
        Decorator: handle events of *channels* (all subscribed channels when none is given).

        With ``transactional=True`` the handler is called as ``handler(event, conn)`` inside a
        transaction on the consumer's connection that also acknowledges the event: its writes
        through *conn* and the acknowledgement commit together, or not at all (exactly-once
        effects). Transactional handlers must be plain functions.
        """

        def register(func: H) -> H:
            is_async = inspect.iscoroutinefunction(func)
            if transactional and is_async:
                raise UsageError("transactional handlers must be plain functions (not async)")
            for ch in channels or (None,):
                if ch is not None:
                    self.channels.add(check_channel(ch))
                self._handlers.setdefault(ch, []).append((func, is_async, transactional))
            return func

        return register

    def stop(self) -> None:
        """Return from `run` (or end iteration) after the current event; any thread."""
        self._stopping = True
        self._wake()

    def _wake(self) -> None:
        raise NotImplementedError

    def _entries(self, event: Event) -> list[_Entry]:
        return self._handlers.get(event.channel, []) + self._handlers.get(None, [])

    def _wanted(self, events: list[Event]) -> list[Event]:
        self.stats["received"] += len(events)
        channels = self.channels
        return [e for e in events if e.channel in channels] if channels else events

    def _failed(self, event: Event, attempt: int) -> bool:
        """Log a handler failure; True when the event should be tried again."""
        self.stats["handler_errors"] += 1
        if attempt < self.max_attempts:
            logger.warning(
                "handler failed on event %d (%s), attempt %d of %d; retrying",
                event.id,
                event.channel,
                attempt,
                self.max_attempts,
                exc_info=True,
            )
            return True
        self.stats["skipped"] += 1
        logger.error(
            "handler failed on event %d (%s) %d times; skipping it",
            event.id,
            event.channel,
            attempt,
            exc_info=True,
        )
        return False

    def _ack_done(self, batch: list[Event], events: list[Event]) -> None:
        done = self._done
        self._done = []
        # All we wanted was handled: move past the whole read, other channels' events too.
        self._core.ack(events if len(done) == len(batch) else done)

    def _reconnect_delay(self, attempt: int, exc: CoreLost) -> float:
        """The wait before reconnect *attempt*, logged; ConnectionLost past the last one."""
        if self.reconnect_max_attempts is not None and attempt > self.reconnect_max_attempts:
            raise ConnectionLost(f"could not reconnect after {attempt - 1} attempts: {exc}")
        delay = backoff_delay(attempt, initial=0.1, cap=5.0)
        logger.warning("consumer connection lost (%s); reconnecting in %.2fs", exc, delay)
        return delay

    def _begin_run(self) -> None:
        if not self._handlers:
            raise UsageError("run() needs handlers: register one with @consumer.on(channel)")
        self._stopping = False

    def _begin_events(self) -> None:
        if self._handlers:
            raise UsageError("this consumer has handlers: call run(), or iterate one without")
        self._stopping = False


class Consumer(_ConsumerBase):
    """
    Consume a group's events, sync: ``with Consumer(dsn, group="billing") as c: ...``.

    Delivery is at least once, in (commit-safe) log order; the group's position advances after
    the handler returns (or, iterating, once you ask for the next event). Several consumers of
    one group share its 16 partitions; events with the same key stay in order.

    Events are read ``batch_size`` (1000) at a time; while a read comes back full (a backlog),
    the next asks for twice as many, up to ``max_batch_size`` (default 20,000, or
    ``batch_size`` if larger; equal to ``batch_size``: no growth), and the first read that is
    not full brings it back to ``batch_size``. Positions are acknowledged once per read, so a
    crash (even SIGKILL) delivers again at most one read: up to ``max_batch_size`` events.
    Transactional handlers (``on(..., transactional=True)``) are exactly-once regardless.

    .. versionadded:: 0.1
    """

    def __init__(self, dsn: str | None = None, **kwargs: Any) -> None:
        super().__init__(dsn, **kwargs)
        self._waiter = Waiter()
        self._waiter.open()  # now, so that a stop() from another thread is never lost

    def __enter__(self) -> Consumer:
        try:
            self.connect()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def connect(self) -> None:
        if self._core.conn is None:
            self._core.connect()

    def close(self) -> None:
        self._core.close()
        self._waiter.close()

    def _wake(self) -> None:
        self._waiter.wake()

    def _wait(self, seconds: float) -> bool:
        """Wait for a wake-up notification, a stop, or the timeout; True if woken by the server."""
        if not self._waiter.wait(self._core.socket, READ, time.monotonic() + seconds):
            return False
        self._core.drain_wakes()
        return True

    def _batches(self) -> Iterator[list[Event]]:
        """Batches of wanted events until stopped; reconnects on connection loss."""
        core = self._core
        self.connect()
        linger_until = 0.0
        attempt = 0
        while not self._stopping:
            try:
                core.rebalance()
                events = core.fetch(self._loads)
                attempt = 0
                if events:
                    batch = self._wanted(events)
                    self._done = []
                    yield batch
                    self._ack_done(batch, events)
                    linger_until = time.monotonic() + self.linger
                    continue
                now = time.monotonic()
                if now < linger_until:
                    # Writers that did not send a wake-up may commit just after one that did.
                    self._wait(min(0.002, linger_until - now))
                    continue
                if self._wait(self.poll_interval):
                    linger_until = time.monotonic() + self.linger
            except CoreLost as exc:
                attempt += 1
                core.close()
                delay = self._reconnect_delay(attempt, exc)
                self._wait_stop(delay)
                try:
                    core.connect()
                    self.stats["reconnects"] += 1
                except Exception as exc2:  # retried at the next turn
                    logger.warning("reconnect failed: %s", exc2)

    def _wait_stop(self, delay: float) -> None:
        self._waiter.sleep(time.monotonic() + delay)

    def run(self) -> None:
        """Handle events until `stop`."""
        self._begin_run()
        for batch in self._batches():
            try:
                for event in batch:
                    self._handle(event)
                    self._done.append(event)
                    if self._stopping:
                        break
            except CoreLost:
                # Lost mid-batch: what was handled cannot be acknowledged, so it comes again
                # (at least once); the batches loop reconnects at its next turn.
                self._done = []
                self._core.close()

    def _handle(self, event: Event) -> None:
        for handler, _, transactional in self._entries(event):
            attempt = 1
            while True:
                try:
                    if transactional:
                        self._core.in_transaction(event, handler)
                    else:
                        handler(event)
                    break
                except CoreLost:
                    raise
                except Exception:
                    if not self._failed(event, attempt):
                        break
                    attempt += 1
                    self._wait_stop(self.retry_delay)

    def __iter__(self) -> Iterator[Event]:
        return self.events()

    def events(self) -> Iterator[Event]:
        """
        Yield events until `stop`. An event is acknowledged once you ask for the next one, or
        when the loop ends after `stop()`; leaving the loop by ``break`` or an exception does
        not acknowledge the event in hand (it comes again: at least once). Acknowledgements
        are written once per read, so a crash redelivers at most one read (at most
        ``max_batch_size`` events, see the class docstring).
        """
        self._begin_events()
        try:
            for batch in self._batches():
                for event in batch:
                    yield event
                    self._done.append(event)
                    if self._stopping:
                        break
        finally:
            # Left early (break, exception, close): acknowledge what was finished.
            if self._done:
                with contextlib.suppress(CoreLost):
                    self._core.ack(self._done)
                self._done = []


class AsyncConsumer(_ConsumerBase):
    """
    The async `Consumer`, for asyncio and trio: queries run in a worker thread (psycopg's
    async connection is asyncio-only), all waiting happens on the event loop.

    .. versionadded:: 0.1
    """

    def __init__(self, dsn: str | None = None, **kwargs: Any) -> None:
        super().__init__(dsn, **kwargs)
        self._waiter = AsyncWaiter()

    async def __aenter__(self) -> AsyncConsumer:
        await self.connect()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._core.close)

    async def connect(self) -> None:
        self._waiter.bind()
        if self._core.conn is None:
            await anyio.to_thread.run_sync(self._core.connect)

    def _wake(self) -> None:
        self._waiter.wake()

    async def _wait(self, seconds: float) -> bool:
        if not await self._waiter.wait(self._core.socket, READ, time.monotonic() + seconds):
            return False
        await anyio.to_thread.run_sync(self._core.drain_wakes)
        return True

    async def _batches(self) -> AsyncIterator[list[Event]]:
        core = self._core
        await self.connect()
        linger_until = 0.0
        attempt = 0
        while not self._stopping:
            try:
                events = await anyio.to_thread.run_sync(self._fetch)
                attempt = 0
                if events:
                    batch = self._wanted(events)
                    self._done = []
                    yield batch
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(self._ack_done, batch, events)
                    linger_until = time.monotonic() + self.linger
                    continue
                now = time.monotonic()
                if now < linger_until:
                    await self._waiter.sleep(min(now + 0.002, linger_until))
                    continue
                if await self._wait(self.poll_interval):
                    linger_until = time.monotonic() + self.linger
            except CoreLost as exc:
                attempt += 1
                await anyio.to_thread.run_sync(core.close)
                delay = self._reconnect_delay(attempt, exc)
                await self._waiter.sleep(time.monotonic() + delay)
                try:
                    await anyio.to_thread.run_sync(core.connect)
                    self.stats["reconnects"] += 1
                except Exception as exc2:
                    logger.warning("reconnect failed: %s", exc2)

    def _fetch(self) -> list[Event]:
        self._core.rebalance()
        return self._core.fetch(self._loads)

    async def run(self) -> None:
        """Handle events until `stop` (or cancellation)."""
        self._begin_run()
        async for batch in self._batches():
            try:
                for event in batch:
                    await self._handle(event)
                    self._done.append(event)
                    if self._stopping:
                        break
            except CoreLost:
                self._done = []  # see Consumer.run
                await anyio.to_thread.run_sync(self._core.close)

    async def _handle(self, event: Event) -> None:
        for handler, is_async, transactional in self._entries(event):
            attempt = 1
            while True:
                try:
                    if transactional:
                        await anyio.to_thread.run_sync(self._core.in_transaction, event, handler)
                    elif is_async:
                        await handler(event)
                    else:
                        handler(event)
                    break
                except CoreLost:
                    raise
                except Exception:
                    if not self._failed(event, attempt):
                        break
                    attempt += 1
                    await self._waiter.sleep(time.monotonic() + self.retry_delay)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self.events()

    async def events(self) -> AsyncIterator[Event]:
        """Yield events until `stop`; acknowledged as in `Consumer.events`."""
        self._begin_events()
        try:
            async for batch in self._batches():
                for event in batch:
                    yield event
                    self._done.append(event)
                    if self._stopping:
                        break
        finally:
            if self._done:
                with anyio.CancelScope(shield=True), contextlib.suppress(CoreLost):
                    await anyio.to_thread.run_sync(self._core.ack, self._done)
                self._done = []
