"""
`Consumer` and `AsyncConsumer`: read a consumer group's events from the durable log.

Both are thin runtimes over one `ConsumerEngine` (``_protocol/consumer.py``), which holds every
decision: reads, read-ahead, retries and their backoff, acknowledgements, rebalancing, probes
and reconnects. A runtime only carries out the engine's requests: wait on a socket or a clock
(`Waiter` on a thread, `AsyncWaiter` on asyncio or trio), call handlers, hand events to an
iteration. The two classes are written side by side so that they read line for line alike;
``tests/unit/test_front_ends.py`` checks that their public surfaces stay identical.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from datetime import datetime
from types import TracebackType
from typing import Any, ClassVar, Literal, TypeVar

import anyio
import psycopg
import sniffio

from . import _checks, _tracing
from ._conninfo import Source, connect_error, resolve_source
from ._models import Event, Gap, Stats
from ._protocol.channels import check_channel
from ._protocol.consumer import (
    ABANDONED,
    BATCH,
    DEFAULT_MAX_BATCH_SIZE,
    NEEDS_TX,
    TIMED_OUT,
    TX,
    ConsumerConfig,
    ConsumerEngine,
    Entry,
    Start,
    StatusRow,
    _Stopped,
)
from ._protocol.pgwire import REPORT, RESOLVE, SLEEP, WAIT, Request
from ._typed import parsers, typed_batch_handler, typed_consumer_handler
from ._waiting import ShutOnStop, Waiter
from ._waiting_async import AsyncWaiter, CancelOnStop
from .errors import ConnectError, UsageError

logger = logging.getLogger("pgherald.consumer")

H = TypeVar("H", bound=Callable[..., Any])
Mode = Literal["run", "iterate"]
BatchAnswer = tuple[int, "int | None", "BaseException | object | None"]

__all__ = ["AsyncConsumer", "Consumer", "Start"]


class _ConsumerBase:
    """Options, handlers, lifecycle bookkeeping: everything but the I/O."""

    _is_async: ClassVar[bool]

    def __init__(
        self,
        dsn: Source | None = None,
        *,
        group: str,
        channels: Iterable[str] = (),
        start: Start = "beginning",
        reset: bool = False,
        batch_size: int = 1000,
        max_batch_size: int | None = None,
        max_batch_bytes: int = 16 * 1024 * 1024,
        poll_interval: float = 0.5,
        linger: float = 0.02,
        rebalance_interval: float = 1.0,
        maintain_interval: float | None = 3600.0,
        synchronous_acks: bool = False,
        from_wakeups: bool = True,
        ack_delay: float = 0.05,
        max_attempts: int = 3,
        retry_delay: float = 0.2,
        retry_max_delay: float = 30.0,
        connect_timeout: float = 10.0,
        health_check_interval: float = 15.0,
        health_check_timeout: float = 5.0,
        reconnect_initial_delay: float = 0.1,
        reconnect_max_delay: float = 10.0,
        reconnect_max_attempts: int | None = None,
        stop_timeout: float | None = 30.0,
        transaction_timeout: float | None = None,
        on_reconnect: Callable[[Gap], Any] | None = None,
        application_name: str = "pgherald-consumer",
        json_loads: Callable[[str], Any] = json.loads,
        model: Any = None,
    ) -> None:
        _checks.group(group)
        _checks.integer("batch_size", batch_size, low=1, high=_checks.INT4_MAX)
        if max_batch_size is None:
            max_batch_size = max(batch_size, DEFAULT_MAX_BATCH_SIZE)
        elif (
            isinstance(max_batch_size, bool)
            or not isinstance(max_batch_size, int)
            or not batch_size <= max_batch_size <= _checks.INT4_MAX
        ):
            raise UsageError(
                f"max_batch_size must be an int from batch_size ({batch_size}) to "
                f"{_checks.INT4_MAX:,}, not {max_batch_size!r}: it caps how far reads grow "
                "while the consumer is behind"
            )
        if (
            isinstance(max_batch_bytes, bool)
            or not isinstance(max_batch_bytes, int)
            or not 1 <= max_batch_bytes <= _checks.INT8_MAX
        ):
            raise UsageError(
                f"max_batch_bytes must be an int >= 1, not {max_batch_bytes!r}: it bounds the "
                "memory a read of large events takes"
            )
        _checks.integer("max_attempts", max_attempts, low=1, high=_checks.INT4_MAX)
        _checks.integer(
            "reconnect_max_attempts", reconnect_max_attempts, low=0, high=2**31, none=True
        )
        for name, value in (
            ("poll_interval", poll_interval),
            ("rebalance_interval", rebalance_interval),
            ("connect_timeout", connect_timeout),
            ("health_check_interval", health_check_interval),
            ("health_check_timeout", health_check_timeout),
            ("reconnect_initial_delay", reconnect_initial_delay),
            ("reconnect_max_delay", reconnect_max_delay),
        ):
            _checks.seconds(name, value)
        _checks.seconds("maintain_interval", maintain_interval, none=True)
        _checks.seconds("stop_timeout", stop_timeout, zero=True, none=True)
        _checks.seconds("transaction_timeout", transaction_timeout, none=True)
        for name, value in (
            ("linger", linger),
            ("retry_delay", retry_delay),
            ("retry_max_delay", retry_max_delay),
        ):
            _checks.seconds(name, value, zero=True)
        if (
            isinstance(ack_delay, bool)
            or not isinstance(ack_delay, (int, float))
            or not 0 <= ack_delay <= 60
        ):
            raise UsageError(f"ack_delay must be seconds between 0 and 60, not {ack_delay!r}")
        if not (isinstance(start, (str, int, datetime)) and not isinstance(start, bool)) or (
            isinstance(start, str) and start not in ("beginning", "now")
        ):
            raise UsageError(
                f"start must be 'beginning', 'now', an event id or a datetime, not {start!r}"
            )
        if isinstance(start, int):
            _checks.integer("start (an event id)", start, low=0, high=_checks.INT8_MAX)
        if isinstance(start, datetime) and start.utcoffset() is None:
            raise UsageError(
                f"start must be a datetime with a time zone, not the naive {start!r} (which "
                "the server would read in its own time zone): datetime.now(timezone.utc), say"
            )
        if isinstance(channels, str):
            channels = [channels]  # a lone name, not its characters
        # A consumer always owns its connection (it holds session locks on it): from a lent
        # connection or engine it takes the parameters and opens its own.
        conninfo, _ = resolve_source(dsn, application_name=application_name, lend=False)
        self.stats = Stats()
        """Counters: received, handler errors, skipped, acknowledged, reconnects, gaps..."""
        self.on_reconnect = on_reconnect
        """Called with a `Gap` (the outage: nothing is lost) after each reconnection."""
        self._config = ConsumerConfig(
            conninfo=conninfo,
            group=group,
            channels=frozenset(check_channel(c) for c in channels),
            start=start,
            reset=reset,
            batch_size=batch_size,
            max_batch_size=max_batch_size,
            max_batch_bytes=max_batch_bytes,
            poll_interval=poll_interval,
            linger=linger,
            rebalance_interval=rebalance_interval,
            maintain_interval=maintain_interval,
            synchronous_acks=bool(synchronous_acks),
            from_wakeups=bool(from_wakeups),
            ack_delay=float(ack_delay),
            max_attempts=max_attempts,
            retry_delay=retry_delay,
            retry_max_delay=retry_max_delay,
            connect_timeout=connect_timeout,
            health_check_interval=health_check_interval,
            health_check_timeout=health_check_timeout,
            reconnect_initial_delay=reconnect_initial_delay,
            reconnect_max_delay=reconnect_max_delay,
            reconnect_max_attempts=reconnect_max_attempts,
            stop_timeout=stop_timeout,
            transaction_timeout=transaction_timeout,
            loads=json_loads,
        )
        if model is not None:
            parsers(model)  # not a model: UsageError now, not at the first handler
        self._model = model
        """The model of handlers registered without one of their own (see `on`)."""
        self._by_channel: dict[str | None, list[Entry]] = {}
        self._merged: dict[str, tuple[Entry, ...]] = {}
        self._batch: tuple[Callable[[list[Event]], Any], bool] | None = None
        self._engine = ConsumerEngine(self._config, self.stats, self._lookup)
        self._mode: Mode | None = None
        self._tx_guard: ShutOnStop | CancelOnStop | None = None  # a transactional handler's
        self._setup()

    # -- public, runtime-independent --

    @property
    def group(self) -> str:
        return self._config.group

    @property
    def channels(self) -> frozenset[str]:
        """The channels whose events reach handlers or the iteration (empty: all of them)."""
        return self._config.channels

    @property
    def partitions(self) -> list[int]:
        """The partitions this consumer holds now (out of 16)."""
        return list(self._engine.owned)

    @property
    def read_size(self) -> int:
        """
        How many events the next read asks for: ``batch_size`` when caught up; while reads come
        back full (a backlog), twice the last one's, up to ``max_batch_size``.
        """
        return self._engine.read_size

    @property
    def connected(self) -> bool:
        return self._engine.connected

    @property
    def backend_pid(self) -> int | None:
        """The server process of the consumer's connection (for `pg_terminate_backend`)."""
        pgconn = self._engine.pgconn
        return pgconn.backend_pid if pgconn is not None else None

    def on(
        self, *channels: str, transactional: bool = False, model: Any = None
    ) -> Callable[[H], H]:
        """
        Decorator: handle events of *channels* (every channel the consumer reads when none is
        given).

        With ``transactional=True`` the handler is called as ``handler(event, conn)`` inside a
        transaction on the consumer's connection that also acknowledges the event: its writes
        through *conn* and the acknowledgement commit together, or not at all (exactly-once
        effects). *conn* is a ``psycopg.Connection`` for `Consumer`, a
        ``psycopg.AsyncConnection`` for `AsyncConsumer` (asyncio only: psycopg's async
        connection does not run on trio). Do not commit or roll back *conn* yourself.

        With *model* (a pydantic v2 model, a dataclass, a ``msgspec.Struct``), the handler is
        called with the event's payload validated into it instead of the `Event`
        (``handler(obj)``, or ``handler(obj, conn)`` when transactional). An event whose payload
        does not validate never reaches it: it is dead-lettered at once (`PayloadInvalid`, no
        retries) and counted in ``stats.invalid_payloads``.
        """

        def register(func: H) -> H:
            self.add_handler(channels, func, transactional=transactional, model=model)
            return func

        return register

    def add_handler(
        self,
        channels: Iterable[str],
        handler: Callable[..., Any],
        *,
        transactional: bool = False,
        model: Any = None,
    ) -> None:
        """Register *handler* for *channels* (empty: every channel); see `on`."""
        if self._batch is not None:
            raise UsageError(
                "this consumer has a batch handler, which takes every event it reads: use "
                "another consumer (another group) for per-event handlers"
            )
        is_async = self._check_handler(handler)
        name = getattr(handler, "__name__", repr(handler))
        if transactional and self._is_async and not is_async:
            raise UsageError(
                f"transactional handler {name!r} of an AsyncConsumer must be async: it gets a "
                "psycopg.AsyncConnection (a plain function would block the event loop)"
            )
        # Wrapped here, once (a model refused raises before anything changes).
        if model is None:
            model = self._model
        if model is not None and model is not _VALIDATED:
            handler = typed_consumer_handler(handler, model, self._count_invalid)
        if _tracing.active is not None and not _tracing.is_traced(handler):
            handler = _tracing.active.consumer_handler(handler, is_async)
        names = [channels] if isinstance(channels, str) else _names(channels)
        added = {check_channel(c) for c in names}
        if added:  # a handler's channels are read too (no channels at all: every channel)
            self._config.channels = self._config.channels | added
        keys: list[str | None] = [*names] or [None]
        for ch in keys:
            self._by_channel.setdefault(ch, []).append((handler, is_async, transactional))
        self._merged.clear()

    def add_batch_handler(
        self, func: Callable[[list[Any]], Any], *channels: str, model: Any = None
    ) -> None:
        """
        Register *func* to handle the events of *channels* (none: every channel) a read at a
        time: ``func(events)`` gets the events of one read in log order (up to
        ``max_batch_size``) and its return means they are all handled; the group's position
        then moves past them in one acknowledgement. For work that is cheaper in bulk:
        publishing a read to a broker and waiting for all its acknowledgements at once (see
        `pgherald.Relay`).

        - Return ``None`` (or ``len(events)``): all are handled.
        - Return an int *n* below ``len(events)``: the first *n* are handled, the others are
          not and come again in a later read (no failure is counted). Meant for stopping: a
          batch handler that sees `stop` should return what it finished.
        - Raise: a failure of ``events[n]``, where *n* is the exception's ``done`` attribute
          when it has an int one (the first *n* were handled), else 0. It is retried from that
          event like a failing handler (``max_attempts``, backoff), and dead-lettered after
          the last attempt; the next call starts after it.

        A batch handler takes every event its consumer reads: it cannot share a consumer with
        other handlers, and a consumer has one at most. With `AsyncConsumer` it may be a
        coroutine function.

        With *model* (or the consumer's ``model=``), ``func`` gets the payloads validated into
        it, in the same order. A payload that does not validate is dead-lettered at once: the
        handler gets the events before it, and the next call starts after it.
        """
        if self._by_channel:
            raise UsageError(
                "this consumer already has handlers: a batch handler takes every event it "
                "reads; use another consumer (another group) for it"
            )
        is_async = self._check_handler(func)
        if model is None:
            model = self._model
        if model is not None:  # wrapped once, here (a model refused raises before any change)
            func = typed_batch_handler(func, model, self._count_invalid)
        if _tracing.active is not None:
            func = _tracing.active.batch_handler(func, is_async)
        self.add_handler(channels, func, model=_VALIDATED)
        self._batch = (func, is_async)

    def _count_invalid(self) -> None:
        self.stats.invalid_payloads += 1

    def _check_handler(self, handler: Callable[..., Any]) -> bool:
        """Whether *handler* is async; refused where it would never be awaited."""
        if not callable(handler):
            raise UsageError(f"a handler must be a function (callable), not {handler!r}")
        if self._mode == "iterate":
            raise UsageError("this consumer is being iterated: handlers and iteration do not mix")
        is_async = inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
            getattr(handler, "__call__", None)  # noqa: B004 - an async __call__ counts too
        )
        name = getattr(handler, "__name__", repr(handler))
        if is_async and not self._is_async:
            raise UsageError(
                f"handler {name!r} is async: use pgherald.AsyncConsumer for async handlers, or "
                "make it a plain function (a sync Consumer would never await it)"
            )
        return is_async

    def stop(self) -> None:
        """
        Make `run` return (or iteration end) after the current handler; any thread, a signal
        handler too. A `stop` before `run` makes the next `run` return at once. A transactional
        handler still running ``stop_timeout`` seconds later is given up: its connection is
        shut (sync) or it is cancelled (async); its transaction rolls back and the event comes
        again.
        """
        self._engine.stop()
        self._wake()
        guard = self._tx_guard
        if guard is not None:
            guard.arm()

    def _setup(self) -> None:
        """The runtime's own state (its waiter)."""
        raise NotImplementedError

    def _lookup(self, channel: str) -> tuple[Entry, ...]:
        try:
            return self._merged[channel]
        except KeyError:
            merged = (*self._by_channel.get(channel, ()), *self._by_channel.get(None, ()))
            self._merged[channel] = merged
            return merged

    def _wake(self) -> None:
        raise NotImplementedError

    def _begin(self, mode: Mode) -> None:
        if self._mode is not None:
            raise UsageError(
                f"this consumer is already in use ({self._mode}); one run or one iteration at a "
                "time per consumer"
            )
        if mode == "run" and not self._by_channel:
            raise UsageError("run() needs handlers: register one with @consumer.on(channel)")
        if mode == "iterate" and self._by_channel:
            raise UsageError("this consumer has handlers: call run(), or iterate one without")
        if mode == "iterate" and self._model is not None:
            raise UsageError(
                "model= types the payloads of handlers; an iteration yields Events: validate "
                "each with pgherald.parse_payload(model, event.payload), or use a handler"
            )
        self._mode = mode

    def _end(self) -> None:
        # Cleared on the way out: a stop() that comes before run() still stops it.
        self._engine.stopping = False
        self._mode = None

    def _connect_error(self, exc: ConnectError) -> ConnectError:
        if type(exc) is not ConnectError:
            return exc  # a more specific error (PoolerError) says it all already
        return connect_error(self._config.conninfo, str(exc))

    def _reported(self, gap: Gap) -> Any:
        if self.on_reconnect is None:
            return None
        try:
            return self.on_reconnect(gap)
        except Exception:
            logger.exception("on_reconnect hook failed")
            return None

    def __repr__(self) -> str:
        state = "connected" if self.connected else "not connected"
        return f"<{type(self).__name__} group={self.group!r} {state}>"


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

    _is_async = False

    def _setup(self) -> None:
        self._config.connection_class = psycopg.Connection
        self._waiter = Waiter()

    def connect(self) -> None:
        """Connect, join the group and take partitions now (done by ``with`` and `run`)."""
        # The wake-up socket exists before any wait; a stop() before it sets only the flag,
        # which the engine reads before it waits.
        self._waiter.open()
        if self._engine.connected:
            return
        try:
            self._waiter.run(self._engine.open())
        except ConnectError as exc:
            raise self._connect_error(exc) from None
        except _Stopped:
            return

    def close(self) -> None:
        """Stop, and close the connection (the group's partitions go to the other members)."""
        self.stop()
        self._engine.close()
        self._waiter.close()

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

    def _wake(self) -> None:
        self._waiter.wake()

    # -- handler style --

    def run(self) -> None:
        """Handle events until `stop`."""
        self._begin("run")
        try:
            self.connect()
            self._waiter.run(self._engine.run(), self._on_request)
        finally:
            self._end()

    def _on_request(self, req: Request) -> Any:
        kind = req[0]
        if kind == BATCH:
            return self._handle(req[1], req[2], req[3])
        if kind == TX:
            return self._transaction(req[2], req[1], req[3])
        if kind == REPORT:
            self._reported(req[1])
        return None

    def _transaction(self, handler: Callable[..., Any], event: Any, conn: Any) -> Any:
        """A transactional handler, given up if it outlasts stop()'s grace (`ABANDONED`) or
        transaction_timeout (`TIMED_OUT`)."""
        cfg = self._config
        guard = ShutOnStop(conn.pgconn.socket, cfg.stop_timeout, cfg.transaction_timeout)
        self._tx_guard = guard
        try:
            if self._engine.stopping:
                guard.arm()
            error: Exception | None = None
            try:
                handler(event, conn)
            except Exception as exc:
                error = exc
        finally:
            self._tx_guard = None
            guard.disarm()  # first: after it, `fired` no longer changes
        if guard.fired:
            return TIMED_OUT if guard.timed_out else ABANDONED
        return error

    def _handle(self, events: list[Event], first: int, handler: int) -> BatchAnswer:
        """Call the handlers of ``events[first:]``; stop at a failure or a transactional one."""
        if self._batch is not None:
            start = first + handler  # handler 1: events[first] was given up already
            if start >= len(events):
                return len(events), None, None
            part = events[start:] if start else events
            try:
                result = self._batch[0](part)
            except Exception as exc:
                return start + _failed_at(exc, len(part)), 0, exc
            return _batch_answer(start, result, len(part))
        merged, lookup = self._merged, self._lookup
        engine = self._engine
        for i in range(first, len(events)):
            event = events[i]
            entries = merged.get(event.channel)
            if entries is None:
                entries = lookup(event.channel)
            if len(entries) == 1 and not handler and not entries[0][2]:
                try:  # the usual case, per event: one plain handler
                    entries[0][0](event)
                except Exception as exc:
                    return i, 0, exc
            else:
                if not entries:
                    self.stats.unhandled += 1
                for h in range(handler, len(entries)):
                    func, _, transactional = entries[h]
                    if transactional:
                        return i, h, NEEDS_TX
                    try:
                        func(event)
                    except Exception as exc:
                        return i, h, exc
                handler = 0
            if engine.stopping:
                return i + 1, None, None
        return len(events), None, None

    # -- iterator style --

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
        self._begin("iterate")
        engine = self._engine
        waiter = self._waiter
        gen = engine.run()
        batch: list[Event] | None = None
        done = 0
        try:
            self.connect()
            send: Any = None
            while True:
                try:
                    req = gen.send(send)
                except StopIteration:
                    return
                send = None
                kind = req[0]
                if kind == WAIT:
                    send = waiter.wait(req[1], req[2], req[3])
                elif kind == BATCH:
                    batch, done = req[1], req[2]
                    while done < len(batch) and not engine.stopping:
                        yield batch[done]
                        done += 1
                    send, batch = (done, None, None), None
                elif kind == SLEEP:
                    waiter.sleep(req[1])
                elif kind == REPORT:
                    self._reported(req[1])
                elif kind == RESOLVE:
                    send = waiter.resolve(req[1], req[2], req[3])
        finally:
            gen.close()
            if batch is not None and done:  # left early: acknowledge what was finished
                waiter.run(engine.ack_handed_out(batch[:done]))
            self._end()


def _names(channels: Any) -> list[Any]:
    try:
        return list(channels)
    except TypeError:
        raise UsageError(f"channels must be channel names (str), not {channels!r}") from None


class AsyncConsumer(_ConsumerBase):
    """
    The async `Consumer`: same options, same behaviour, on asyncio or trio.

    Handlers may be plain functions or coroutine functions; transactional handlers are
    coroutine functions that get a ``psycopg.AsyncConnection`` (asyncio only). No worker
    threads: every wait is on the event loop.

    .. versionadded:: 0.1
    """

    _is_async = True

    def _setup(self) -> None:
        self._waiter = AsyncWaiter()
        self._iteration: _AsyncIteration | None = None  # the loop over events(), if any

    async def connect(self) -> None:
        """Connect, join the group and take partitions now (done by ``async with`` and `run`)."""
        self._waiter.bind()
        if self._engine.connected:
            return
        self._config.connection_class = _async_connection_class()
        try:
            await self._waiter.run(self._engine.open())
        except ConnectError as exc:
            raise self._connect_error(exc) from None
        except _Stopped:
            return

    async def aclose(self) -> None:
        """Stop, and close the connection (the group's partitions go to the other members)."""
        await self._end_iteration()  # one left by break: acknowledged while connected
        self.stop()  # one running in another task ends at its next step
        self._engine.close()

    async def __aenter__(self) -> AsyncConsumer:
        try:
            await self.connect()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def _wake(self) -> None:
        self._waiter.wake()

    # -- handler style --

    async def run(self) -> None:
        """Handle events until `stop` (or cancellation)."""
        self._begin("run")
        try:
            await self.connect()
            if self._has_transactional() and self._config.connection_class is psycopg.Connection:
                raise UsageError(
                    "transactional handlers need asyncio: psycopg's AsyncConnection, which they "
                    "receive, does not run on trio"
                )
            await self._waiter.run(self._engine.run(), self._on_request)
        finally:
            self._end()

    async def _on_request(self, req: Request) -> Any:
        kind = req[0]
        if kind == BATCH:
            return await self._handle(req[1], req[2], req[3])
        if kind == TX:
            return await self._transaction(req[2], req[1], req[3])
        if kind == REPORT:
            result = self._reported(req[1])
            if inspect.isawaitable(result):
                try:
                    await result
                except Exception:
                    logger.exception("on_reconnect hook failed")
        return None

    async def _transaction(self, handler: Callable[..., Any], event: Any, conn: Any) -> Any:
        """A transactional handler, given up if it outlasts stop()'s grace (`ABANDONED`) or
        transaction_timeout (`TIMED_OUT`)."""
        error: Exception | None = None
        cfg = self._config
        with anyio.CancelScope() as scope:
            guard = CancelOnStop(
                scope, cfg.stop_timeout, self._waiter.caller, cfg.transaction_timeout
            )
            self._tx_guard = guard
            try:
                if self._engine.stopping:
                    guard.arm()
                await handler(event, conn)
            except Exception as exc:
                error = exc
            finally:
                self._tx_guard = None
                guard.done = True
        if scope.cancel_called:
            return ABANDONED if guard.stopped else TIMED_OUT
        return error

    async def _handle(self, events: list[Event], first: int, handler: int) -> BatchAnswer:
        """Call the handlers of ``events[first:]``; stop at a failure or a transactional one."""
        if self._batch is not None:
            start = first + handler  # handler 1: events[first] was given up already
            if start >= len(events):
                return len(events), None, None
            part = events[start:] if start else events
            try:
                result = self._batch[0](part)
                if self._batch[1]:
                    result = await result
            except Exception as exc:
                return start + _failed_at(exc, len(part)), 0, exc
            return _batch_answer(start, result, len(part))
        merged, lookup = self._merged, self._lookup
        engine = self._engine
        for i in range(first, len(events)):
            event = events[i]
            entries = merged.get(event.channel)
            if entries is None:
                entries = lookup(event.channel)
            if len(entries) == 1 and not handler and not entries[0][2]:
                func, is_async, _ = entries[0]
                try:  # the usual case, per event: one plain handler
                    if is_async:
                        await func(event)
                    else:
                        func(event)
                except Exception as exc:
                    return i, 0, exc
            else:
                if not entries:
                    self.stats.unhandled += 1
                for h in range(handler, len(entries)):
                    func, is_async, transactional = entries[h]
                    if transactional:
                        return i, h, NEEDS_TX
                    try:
                        if is_async:
                            await func(event)
                        else:
                            func(event)
                    except Exception as exc:
                        return i, h, exc
                handler = 0
            if engine.stopping:
                return i + 1, None, None
        return len(events), None, None

    def _has_transactional(self) -> bool:
        return any(tx for entries in self._by_channel.values() for _, _, tx in entries)

    # -- iterator style --

    def __aiter__(self) -> AsyncIterator[Event]:
        return self.events()

    def events(self) -> AsyncIterator[Event]:
        """
        Yield events until `stop`; acknowledged as in `Consumer.events`. Leaving the loop by
        ``break`` ends the iteration at the consumer's next use (another loop, `aclose`,
        leaving ``async with``): what was finished is acknowledged then, the event in hand
        comes again.
        """
        return _AsyncIteration(self)

    async def _end_iteration(self) -> None:
        """End an iteration left by ``break`` (an async generator would end only when the
        garbage collector finalizes it: after the connection is gone, and the consumer would
        stay in use meanwhile). One that is running (another task waits in it) is left alone:
        `stop` ends it, and it ends itself."""
        it = self._iteration
        if it is not None and not it._running:
            await it.aclose()


class _AsyncIteration(AsyncIterator[Event]):
    """`AsyncConsumer.events`: an iterator object that the consumer can end itself."""

    def __init__(self, consumer: AsyncConsumer) -> None:
        self._consumer = consumer
        self._gen: Any = None  # the engine's run(), once started
        self._batch: list[Event] | None = None
        self._done = 0  # events of the batch finished (the one in hand is not)
        self._in_hand = False  # an event was handed out and the loop has not asked again
        self._send: Any = None
        self._closed = False
        self._running = False  # inside __anext__ (a task waits in it)

    def __aiter__(self) -> _AsyncIteration:
        return self

    async def __anext__(self) -> Event:
        if self._running:
            raise RuntimeError("this iteration is already running in another task")
        self._running = True
        try:
            return await self._next()
        finally:
            self._running = False

    async def _next(self) -> Event:
        if self._closed:
            raise StopAsyncIteration
        consumer = self._consumer
        engine = consumer._engine
        waiter = consumer._waiter
        if self._gen is None:
            await consumer._end_iteration()  # one left by break
            consumer._begin("iterate")
            consumer._iteration = self
            self._gen = engine.run()
            try:
                await consumer.connect()
            except BaseException:
                await self.aclose()
                raise
        try:
            if self._in_hand:  # asked again: the event handed out last is finished
                self._in_hand = False
                self._done += 1
            while True:
                batch = self._batch
                if batch is not None:
                    if self._done < len(batch) and not engine.stopping:
                        self._in_hand = True
                        return batch[self._done]
                    self._send, self._batch = (self._done, None, None), None
                gen = self._gen
                if gen is None:  # ended meanwhile (the consumer closed under another task)
                    raise StopAsyncIteration
                try:
                    req = gen.send(self._send)
                except StopIteration:
                    raise StopAsyncIteration from None
                self._send = None
                kind = req[0]
                if kind == WAIT:
                    self._send = await waiter.wait(req[1], req[2], req[3])
                elif kind == BATCH:
                    self._batch, self._done = req[1], req[2]
                elif kind == SLEEP:
                    await waiter.sleep(req[1])
                elif kind == REPORT:
                    await consumer._on_request(req)
                elif kind == RESOLVE:
                    self._send = await waiter.resolve(req[1], req[2], req[3])
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """End the iteration: acknowledge what was finished (not the event in hand)."""
        if self._closed:
            return
        self._closed = True
        consumer = self._consumer
        gen, self._gen = self._gen, None
        batch, self._batch = self._batch, None
        if gen is None:
            return  # never started: the consumer was not taken
        try:
            gen.close()
            if batch is not None and self._done:  # left early: acknowledge what was finished
                with anyio.CancelScope(shield=True):
                    await consumer._waiter.run(consumer._engine.ack_handed_out(batch[: self._done]))
        finally:
            if consumer._iteration is self:
                consumer._iteration = None
            consumer._end()


def relay_consumer(
    dsn: Source | None,
    *,
    raw_payloads: bool,
    status_row: StatusRow | None,
    **options: Any,
) -> AsyncConsumer:
    """
    An `AsyncConsumer` (*options*: its public ones) with the two engine options only a relay
    sets, which are deliberately no constructor parameters (`Consumer` and `AsyncConsumer`
    keep their documented, twin signatures): *raw_payloads* hands each payload and headers
    on as the log's JSON text, not decoded; *status_row* is the relay's row for ``pgherald
    status`` (None: none). The engine reads both only once it runs.
    """
    consumer = AsyncConsumer(dsn, **options)
    consumer._config.raw_payloads = raw_payloads
    consumer._config.status_row = status_row
    return consumer


_VALIDATED: Any = object()
"""``add_handler(model=_VALIDATED)``: a batch handler, validated by its own wrapper already."""


def _failed_at(exc: BaseException, count: int) -> int:
    """The index of the event a batch handler's exception fails: its ``done``, else 0."""
    done = getattr(exc, "done", 0)
    if isinstance(done, bool) or not isinstance(done, int):
        return 0
    return min(max(done, 0), count - 1)


def _batch_answer(start: int, result: object, count: int) -> BatchAnswer:
    """A batch handler's return value as the engine's answer (see `add_batch_handler`)."""
    if result is None:
        return start + count, None, None
    if isinstance(result, bool) or not isinstance(result, int) or not 0 <= result <= count:
        error = UsageError(
            f"a batch handler returned {result!r}: return None (all handled) or how many of "
            f"the {count} events it handled"
        )
        return start, 0, error
    return start + result, None, None


def _async_connection_class() -> type[Any]:
    """psycopg's AsyncConnection on asyncio; on trio a plain wrapper, for decoding only."""
    return (
        psycopg.AsyncConnection
        if sniffio.current_async_library() == "asyncio"
        else psycopg.Connection
    )
