"""
pgherald in a Starlette or FastAPI app: listeners and consumers that live with the app, and
publishing inside the request's transaction.

- `running`: in the app's ``lifespan``, connects `AsyncListener` / `AsyncConsumer` /
  `AsyncScheduler` objects at startup, runs them while the app serves, and stops them on shutdown (``stop()``, then
  waits for them, within a deadline). A runner that fails while the app serves is logged at
  once, makes `Running.healthy` false, and its error is raised again at shutdown.
- `Publisher`, `request_publisher`: a FastAPI dependency that opens a transaction on the
  request's psycopg ``AsyncConnection``; what the endpoint notifies or publishes through it
  is delivered when that transaction commits, before the response is sent, and never when it
  rolls back.
- `with_gateway`: the gateway app (`pgherald.contrib.gateway.create_app`) served beside yours
  under a path prefix, without losing its direct-write fast path (see docs/frameworks.md).

Nothing here needs Starlette itself; `request_publisher` needs FastAPI (0.121 or newer).

.. versionadded:: 0.1
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime, timedelta
from typing import Any, TypeAlias

import anyio

from .._consumer import AsyncConsumer
from .._listener_async import AsyncListener
from .._notify import anotify
from .._protocol.payload import JsonDumps
from .._publish import apublish
from .._schedule import AsyncScheduler
from ..errors import HeraldError, UsageError

logger = logging.getLogger("pgherald.contrib.starlette")

Runner: TypeAlias = "AsyncListener | AsyncConsumer | AsyncScheduler"
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

__all__ = ["Publisher", "Running", "request_publisher", "running", "with_gateway"]


class Running:
    """
    What `running` yields: the runners, and whether they are all still running.

    Put it in the lifespan state (``yield {"herald": running}``) to report it in a health
    check: an orchestrator then restarts an app whose listener gave up.
    """

    def __init__(self, runners: tuple[Runner, ...]) -> None:
        self.runners = runners
        self.failures: list[tuple[Runner, BaseException]] = []
        """The runners that failed while the app was serving, with their errors."""
        self._done: list[Runner] = []
        self._all_done = anyio.Event()
        self._scopes: list[anyio.CancelScope] = []

    @property
    def healthy(self) -> bool:
        """True while every runner is running (false after a failure, and after shutdown)."""
        return not self._done

    async def _run(self, runner: Runner) -> None:
        # Shielded: a cancellation of the lifespan (a server that cancels its shutdown) would
        # reach this task too and cut the handler in progress short; `running` stops the
        # runners instead, and cancels this scope only for one still running at its deadline.
        with anyio.CancelScope(shield=True) as scope:
            self._scopes.append(scope)
            try:
                await runner.run()
            except Exception as exc:
                # Not re-raised here: in a task group it would cancel the server's lifespan
                # task mid-wait, and the app would go on serving with nothing said but a
                # traceback.
                logger.error("%r failed; it is no longer running", runner, exc_info=exc)
                self.failures.append((runner, exc))
            finally:
                self._done.append(runner)
                if len(self._done) == len(self.runners):
                    self._all_done.set()

    def __repr__(self) -> str:
        state = "healthy" if self.healthy else f"{len(self.failures)} failed"
        return f"<Running {len(self.runners)} runner(s), {state}>"


@asynccontextmanager
async def running(*runners: Runner, stop_timeout: float = 10.0) -> AsyncIterator[Running]:
    """
    Run *runners* (`AsyncListener`, `AsyncConsumer`, each with handlers; `AsyncScheduler`, for
    delayed and periodic events) for as long as the block lasts: the body of a Starlette /
    FastAPI ``lifespan``::

        @asynccontextmanager
        async def lifespan(app):
            async with running(listener, consumer) as herald:
                yield {"herald": herald}

    On entry every runner connects (a database that cannot be reached, or without pgherald's
    schema, fails the app's startup, with the runner's error); then each runs in its own task. On exit each is
    stopped with ``stop()``, which lets the handler in progress finish, and awaited for up to
    *stop_timeout* seconds; one still running then is cancelled and a `HeraldError` says so.
    Connections are closed in every case. A runner that fails while the app serves is logged
    (logger ``pgherald.contrib.starlette``) and its error is raised again on exit (the first
    one; with several, the rest are logged).

    .. versionadded:: 0.1
    """
    if not runners:
        raise UsageError(
            "running() needs at least one AsyncListener, AsyncConsumer or AsyncScheduler"
        )
    for runner in runners:
        if not isinstance(runner, (AsyncListener, AsyncConsumer, AsyncScheduler)):
            raise UsageError(
                f"running() takes AsyncListener, AsyncConsumer and AsyncScheduler objects, not "
                f"{type(runner).__name__}: a blocking Listener/Consumer/Scheduler would stall "
                "the app"
            )
    if not (isinstance(stop_timeout, (int, float)) and math.isfinite(stop_timeout)) or (
        stop_timeout <= 0
    ):
        raise UsageError(f"stop_timeout must be a number of seconds > 0, not {stop_timeout!r}")
    state = Running(tuple(runners))
    late: list[Runner] = []
    async with AsyncExitStack() as connections:
        for runner in runners:
            await connections.enter_async_context(runner)  # connect: startup fails if it cannot
        async with anyio.create_task_group() as tasks:
            for runner in runners:
                tasks.start_soon(state._run, runner)
            try:
                yield state
            finally:
                for runner in runners:
                    runner.stop()
                # Shielded: a shutdown that is itself being cancelled still stops them in order.
                with anyio.move_on_after(stop_timeout, shield=True):
                    await state._all_done.wait()
                if not state._all_done.is_set():
                    late = [r for r in runners if not any(r is d for d in state._done)]
                    # Said here too: a shutdown that is itself cancelled never reaches the
                    # HeraldError below.
                    logger.error(
                        "%s did not stop within %g s of stop(): cancelled",
                        ", ".join(map(repr, late)),
                        stop_timeout,
                    )
                    for scope in state._scopes:  # shielded from the task group's cancel
                        scope.cancel()
                    tasks.cancel_scope.cancel()
    if late:
        raise HeraldError(
            f"{', '.join(map(repr, late))} did not stop within {stop_timeout:g} s of stop() "
            "(a handler still running?): cancelled; raise stop_timeout or make handlers return"
        )
    if state.failures:
        for runner, exc in state.failures[1:]:
            logger.error("%r had failed too: %s", runner, exc)
        raise state.failures[0][1]


class Publisher:
    """
    Notify and publish through one connection, inside its current transaction: what is sent
    is delivered when that transaction commits and dropped when it rolls back.

    `request_publisher` gives an endpoint one bound to the request's connection and
    transaction; ``connection`` is that connection, for the endpoint's own statements.

    .. versionadded:: 0.1
    """

    __slots__ = ("connection",)

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        """The psycopg ``AsyncConnection`` (or SQLAlchemy async connection) it sends through."""

    async def notify(
        self, channel: str, payload: object = "", *, dumps: JsonDumps | None = None
    ) -> None:
        """`pgherald.anotify` through this connection."""
        await anotify(self.connection, channel, payload, dumps=dumps)

    async def publish(
        self,
        channel: str,
        payload: object,
        *,
        key: str | None = None,
        headers: Mapping[str, Any] | None = None,
        dumps: JsonDumps | None = None,
        deliver_at: datetime | None = None,
        deliver_after: timedelta | None = None,
    ) -> int:
        """`pgherald.apublish` through this connection; returns the event's id."""
        return await apublish(
            self.connection,
            channel,
            payload,
            key=key,
            headers=headers,
            dumps=dumps,
            deliver_at=deliver_at,
            deliver_after=deliver_after,
        )

    def __repr__(self) -> str:
        return f"<Publisher on {self.connection!r}>"


def request_publisher(connection: Callable[..., Any]) -> Any:
    """
    A FastAPI dependency: a `Publisher` on the connection that the dependency *connection*
    gives (a psycopg ``AsyncConnection``), inside a transaction that commits when the endpoint
    returns, before the response is sent, and rolls back when it raises::

        async def get_conn():                       # yours: from a pool, or a connect()
            async with pool.connection() as conn:
                yield conn

        Herald = Annotated[Publisher, request_publisher(get_conn)]

        @app.post("/orders")
        async def create_order(order: Order, herald: Herald):
            await herald.connection.execute("INSERT ...", ...)
            await herald.publish("orders", order.model_dump())

    Returns ``Depends(..., scope="function")``: with FastAPI's default scope the transaction
    would end after the response is sent, and a client could read a 201 whose commit then
    failed. Needs FastAPI 0.121 or newer.

    .. versionadded:: 0.1
    """
    try:
        from fastapi import Depends
    except ImportError:  # pragma: no cover - only without FastAPI
        raise UsageError(
            "request_publisher needs FastAPI: pip install 'fastapi>=0.121' (in Starlette, use "
            "Publisher(conn) inside `async with conn.transaction():`)"
        ) from None

    conn_dependency = Depends(connection, scope="function")

    async def publisher(conn: Any = conn_dependency) -> AsyncIterator[Any]:
        transaction = getattr(conn, "transaction", None)
        if transaction is None:
            raise UsageError(
                f"request_publisher needs a psycopg AsyncConnection from {connection.__name__}, "
                f"not {type(conn).__name__}"
            )
        async with transaction():
            yield Publisher(conn)

    return Depends(publisher, scope="function")


def with_gateway(app: ASGIApp, gateway: ASGIApp, prefix: str = "/events") -> ASGIApp:
    """
    An ASGI app that sends requests under *prefix* straight to *gateway* (from
    `pgherald.contrib.gateway.create_app`) and everything else, lifespan included, to *app*.

    Serve what it returns (``uvicorn main:asgi``). Unlike Starlette's ``Mount``, the gateway
    gets the server's own ``send``, past *app*'s middleware, so its direct writes to the
    socket stay on. The gateway's lifespan still has to run: enter
    ``gateway.router.lifespan_context(gateway)`` in *app*'s lifespan (docs/frameworks.md).

    .. versionadded:: 0.1
    """
    if not prefix.startswith("/") or prefix.endswith("/") or len(prefix) < 2:
        raise UsageError(
            f"prefix must look like '/events' (a leading /, no trailing /), not {prefix!r}"
        )

    async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            root = scope.get("root_path", "")
            path: str = scope["path"]
            # ASGI: `path` includes `root_path` (what Starlette's routing expects too).
            inner = path[len(root) :] if path.startswith(root) else path
            if inner == prefix or inner.startswith(prefix + "/"):
                await gateway({**scope, "root_path": root + prefix}, receive, send)
                return
        await app(scope, receive, send)

    return dispatch
