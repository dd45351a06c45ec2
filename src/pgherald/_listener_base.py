"""What the sync and async listeners share: configuration, handlers, channels, stats."""

from __future__ import annotations

import inspect
import logging
import math
import sys
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Literal, TypeVar

from . import _tracing
from ._conninfo import Source, connect_error, resolve_source
from ._models import Gap, ListenerStats, Notification
from ._protocol.channels import check_channel
from ._protocol.engine import ListenerConfig, ListenerEngine
from ._protocol.routing import Handler, HandlerRegistry
from ._typed import is_async, typed_listener_handler
from .errors import ConnectError, UsageError

logger = logging.getLogger("pgherald.listener")

H = TypeVar("H", bound=Callable[..., Any])
Mode = Literal["run", "iterate"]


def check_timeout(timeout: float | None) -> float | None:
    """An iteration's *timeout*: None (or ``inf``) for none; nan is refused."""
    if timeout is None:
        return None
    if timeout != timeout:  # nan: every comparison with it is false, so it meant "forever"
        raise UsageError(
            "timeout is nan: pass a number of seconds, or None (or math.inf) for no timeout"
        )
    if timeout == math.inf:
        return None
    return timeout


class ListenerBase:
    """Configuration and bookkeeping; the I/O lives in the sync and async subclasses."""

    _allow_async_handlers: ClassVar[bool]

    def __init__(
        self,
        dsn: Source = None,
        *,
        channels: Iterable[str] = (),
        on_gap: Callable[[Gap], Any] | None = None,
        on_error: Callable[[Exception, Notification], Any] | None = None,
        application_name: str = "pgherald-listener",
        connect_timeout: float = 10.0,
        health_check_interval: float = 15.0,
        health_check_timeout: float = 5.0,
        reconnect_initial_delay: float = 0.1,
        reconnect_max_delay: float = 10.0,
        reconnect_max_attempts: int | None = None,
        queue_check_interval: float = 5.0,
        queue_warn_usage: float = 0.5,
        queue_max_usage: float = 0.8,
    ) -> None:
        if isinstance(channels, str):
            channels = [channels]  # a lone name, not its characters
        conninfo, lent = resolve_source(dsn, application_name=application_name)
        config = ListenerConfig(
            conninfo=conninfo,
            connect_timeout=connect_timeout,
            health_check_interval=health_check_interval,
            health_check_timeout=health_check_timeout,
            reconnect_initial_delay=reconnect_initial_delay,
            reconnect_max_delay=reconnect_max_delay,
            reconnect_max_attempts=reconnect_max_attempts,
            queue_check_interval=queue_check_interval,
            queue_warn_usage=queue_warn_usage,
            queue_max_usage=queue_max_usage,
        )
        self.stats = ListenerStats()
        """Counters: received, handler errors, reconnects, gaps, queue readings."""
        self.on_gap = on_gap
        """Called with a `Gap` each time the listener is listening again after missing out."""
        if on_error is not None and inspect.iscoroutinefunction(on_error):
            raise UsageError(
                "on_error must be a plain function (it runs inside the delivery loop, on "
                "AsyncListener too): hand the work to a task of yours if it must await"
            )
        self.on_error = on_error
        """
        Called as ``on_error(exc, notification)`` when a handler raises, or when a payload does
        not validate as its handler's ``model=`` (`PayloadInvalid`); instead of the log line.
        """
        self._engine = ListenerEngine(config, self.stats)
        self._engine.want(channels)
        if lent is not None:
            self._engine.adopt(lent)
        self._handlers = HandlerRegistry(allow_async=self._allow_async_handlers)
        # (channel, id(handler)) -> the wrappers registered for it (a model, tracing)
        self._wrapped: dict[tuple[str | None, int], list[Handler]] = {}
        self._mode: Mode | None = None
        self._setup()

    def _setup(self) -> None:
        """The runtime's own state (the subclasses' signature is this one, typed, not theirs)."""

    # -- public, runtime-independent --

    @property
    def channels(self) -> list[str]:
        """The channels this listener listens to (or will, once connected)."""
        return self._engine.channels

    @property
    def listening(self) -> frozenset[str]:
        """The channels the server is LISTENing to right now (empty while disconnected)."""
        return self._engine.listening

    @property
    def connected(self) -> bool:
        return self._engine.connected

    @property
    def backend_pid(self) -> int | None:
        """The server process of the listening connection (for `pg_terminate_backend`)."""
        pgconn = self._engine.pgconn
        return pgconn.backend_pid if pgconn is not None else None

    def on(self, *channels: str, model: Any = None) -> Callable[[H], H]:
        """
        Decorator: call the function with each `Notification` on *channels*.

        With no channel, the function receives notifications from every channel. Registering
        a handler also subscribes to its channels: at once on a connected `Listener`; on an
        `AsyncListener` when `run` starts (``await listener.subscribe(...)`` to LISTEN sooner).

        With *model* (a pydantic v2 model, a dataclass, a ``msgspec.Struct``), the function is
        called with the payload validated into it instead of the `Notification`; a payload that
        does not validate never reaches it: it goes to ``on_error`` as `PayloadInvalid`.
        """

        for ch in channels:  # all of them first: a refused name registers nothing
            check_channel(ch)

        def register(func: H) -> H:
            if channels:
                for ch in channels:
                    self.add_handler(ch, func, model=model)
            else:
                self.add_handler(None, func, model=model)
            return func

        return register

    def add_handler(self, channel: str | None, handler: Handler, *, model: Any = None) -> None:
        """Register *handler* for *channel* (None: every channel) and subscribe to it."""
        if channel is not None:
            check_channel(channel)  # before anything is registered (InvalidChannel)
        if self._mode == "iterate":
            raise UsageError(
                "this listener is being iterated: handlers and iteration do not mix; "
                "use one listener per style"
            )
        wrapped = handler  # wrapped here, once: the delivery loop calls what it is given
        if model is not None:
            wrapped = typed_listener_handler(wrapped, model, self._count_invalid)
        if _tracing.active is not None:
            wrapped = _tracing.active.listener_handler(wrapped, is_async(wrapped))
        self._handlers.add(channel, wrapped)
        if wrapped is not handler:
            self._wrapped.setdefault((channel, id(handler)), []).append(wrapped)
        if channel is not None and channel not in self._engine.channels:
            self._request_channels(add=[channel])
            self._handler_channel_added()

    def remove_handler(self, channel: str | None, handler: Handler) -> None:
        """Forget *handler*; the channel stays subscribed until `unsubscribe`."""
        self._handlers.remove(channel, handler)
        for wrapped in self._wrapped.pop((channel, id(handler)), ()):
            self._handlers.remove(channel, wrapped)

    def _count_invalid(self) -> None:
        self.stats.invalid_payloads += 1

    def stop(self) -> None:
        """
        Make `run` return (or iteration end) as soon as the current handler returns.

        Safe from any thread and from a signal handler.
        """
        self._engine.stopping = True
        self._wake()

    # -- for subclasses --

    def _request_channels(self, add: Iterable[str] = (), remove: Iterable[str] = ()) -> None:
        # Every name checked before any is applied: a refused call (InvalidChannel) changes
        # nothing, so it neither subscribes nor unsubscribes the valid names it came with.
        add = [check_channel(ch) for ch in add]
        remove = [check_channel(ch) for ch in remove]
        self._engine.want(add)
        self._engine.unwant(remove)
        if self._mode is not None:
            self._wake()

    def _wake(self) -> None:
        raise NotImplementedError

    def _handler_channel_added(self) -> None:
        """A handler brought a new channel: LISTEN now if the runtime can do so here."""

    def _begin(self, mode: Mode) -> None:
        if self._mode is not None:
            raise UsageError(
                f"this listener is already in use ({self._mode}); one run or one iteration at a "
                "time per listener"
            )
        if mode == "iterate" and self._handlers:
            raise UsageError(
                "this listener has handlers: call run() to dispatch to them, or iterate a "
                "listener without handlers"
            )
        if mode == "run" and not self._handlers:
            raise UsageError(
                "run() needs handlers: register one with @listener.on(channel), or iterate "
                "the listener instead"
            )
        self._mode = mode

    def _end(self) -> None:
        # Cleared on the way out, not on the way in: a stop() that comes before run() (say,
        # SIGTERM during start-up) still stops it.
        self._engine.stopping = False
        self._mode = None

    def _connect_error(self, exc: ConnectError) -> ConnectError:
        return connect_error(self._engine.config.conninfo, str(exc))

    def _handler_failed(self, handler: Handler, n: Notification) -> None:
        # Called inside the `except` that caught the handler's exception.
        self.stats.handler_errors += 1
        if self.on_error is not None:
            exc = sys.exc_info()[1]
            try:
                self.on_error(exc, n)  # type: ignore[arg-type]
            except Exception:
                logger.exception("on_error hook failed")
            return
        logger.exception(
            "handler %s failed on a notification from channel %r (the listener goes on)",
            getattr(handler, "__qualname__", handler),
            n.channel,
        )

    def __repr__(self) -> str:
        state = "connected" if self.connected else "not connected"
        return f"<{type(self).__name__} {state} channels={self.channels!r}>"
