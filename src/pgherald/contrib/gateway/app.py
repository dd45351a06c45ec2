"""`create_app`: the gateway as a Starlette app (mount it, or run it with ``pgherald serve``)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import Receive, Scope, Send

from .auth import Authenticator, AuthError, bearer_token
from .cors import CorsPolicy
from .direct import SERVER_SEND
from .fanout import Hub
from .publishing import PublishRefused, publish_checked
from .sse import SseEndpoint
from .ws import WsEndpoint

MAX_BODY = 1024 * 1024
"""Bytes of a ``POST /publish`` body, at most (a 413 beyond)."""
BODY_TIMEOUT = 30.0
"""Seconds a ``POST /publish`` body has to arrive (a 408 beyond)."""


class Gateway:
    """What a running gateway holds; ``app.state.gateway`` (for tests and shutdown hooks)."""

    def __init__(
        self,
        hub: Hub,
        auth: Authenticator,
        max_body: int = MAX_BODY,
        body_timeout: float = BODY_TIMEOUT,
        cors: CorsPolicy | None = None,
    ) -> None:
        self.hub = hub
        self.auth = auth
        self.max_body = max_body
        self.body_timeout = body_timeout
        self.cors = cors or CorsPolicy()

    def close_streams(self, reason: str = "server shutting down") -> None:
        """End every client stream now (call before a server waits for connections to end)."""
        self.hub.close_all(reason)

    async def _cross_origin(
        self, request: Request, methods: tuple[str, ...], handler: Any
    ) -> Response:
        """*handler*'s answer with CORS headers; preflights and refused origins answered here."""
        if request.method == "OPTIONS":
            status, headers, why = self.cors.preflight(request.headers, methods)
            if why is None:
                return Response(None, status, headers=dict(headers))
            return JSONResponse({"error": why}, status, headers=dict(headers))
        refused = self.cors.check(request.headers)
        response: Response = (
            JSONResponse({"error": refused}, 403) if refused is not None else await handler(request)
        )
        for name, value in self.cors.headers(request.headers):
            response.headers[name] = value
        return response

    async def publish(self, request: Request) -> Response:
        return await self._cross_origin(request, ("POST",), self._publish)

    async def channels(self, request: Request) -> Response:
        return await self._cross_origin(request, ("GET",), self._channels)

    async def _channels(self, request: Request) -> Response:
        """What the caller (its token, or none) may read and write, and the channels known."""
        try:
            principal = self.auth.authenticate(bearer_token(request.headers, request.query_params))
        except AuthError as exc:
            return JSONResponse({"error": exc.message}, exc.status)
        with anyio.move_on_after(3.0):
            await self.hub.discover(at_most_every=5.0)
        return JSONResponse(
            {
                "read": list(dict.fromkeys(principal.read)),
                "write": list(dict.fromkeys(principal.write)),
                "durable": sorted(self.hub.durable),
                "channels": sorted(ch for ch in self.hub.known if principal.can_read(ch)),
            }
        )

    async def _publish(self, request: Request) -> Response:
        channel = request.path_params["channel"]
        try:
            principal = self.auth.authenticate(bearer_token(request.headers, request.query_params))
            principal.check_write(channel)
            body = await self._body(request)
            if isinstance(body, Response):
                return body
            try:
                payload = json.loads(body)
            except (ValueError, RecursionError):
                return JSONResponse({"error": "the body must be JSON"}, 400)
            event_id = await publish_checked(self.hub, principal, channel, payload)
        except AuthError as exc:
            return JSONResponse({"error": exc.message}, exc.status)
        except PublishRefused as exc:
            return JSONResponse({"error": str(exc)}, exc.status)
        if event_id is None:
            return JSONResponse({"ok": True})
        return JSONResponse({"id": event_id})

    async def _body(self, request: Request) -> bytes | Response:
        """The request body, or the error response when it is too large or too slow."""
        too_large = JSONResponse(
            {"error": f"the body is larger than {self.max_body} bytes (the gateway's --max-body)"},
            413,
        )
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return too_large  # refused before reading any of it
        chunks: list[bytes] = []
        size = 0
        with anyio.move_on_after(self.body_timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_body:
                    return too_large
                chunks.append(chunk)
            return b"".join(chunks)
        return JSONResponse(
            {"error": f"the body did not arrive within {self.body_timeout:g} s"},
            408,
            headers={"connection": "close"},
        )

    async def healthz(self, request: Request) -> Response:
        state = {"database": await self.hub.database_ok(), "listener": self.hub.healthy_listener}
        if self.hub.source is not None and self.hub.durable:
            state["source"] = self.hub.source_ok
        return JSONResponse(state, 200 if all(state.values()) else 503)

    async def metrics(self, request: Request) -> Response:
        with contextlib.suppress(Exception):  # a scrape must not fail when the DB is down
            self.hub.metrics.queue_usage.set(await self.hub.queue_usage())
        return Response(
            self.hub.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    async def page(self, request: Request) -> Response:
        return HTMLResponse(_page())


class _GatewayApp(Starlette):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan" and not self.user_middleware:
            # The server's own send: streams write to its transport directly when they can
            # (see direct.py). Not past middleware added to this app: it sees every byte.
            scope[SERVER_SEND] = send
        await super().__call__(scope, receive, send)


def _page() -> str:
    return resources.files(__package__).joinpath("static/index.html").read_text("utf-8")


def create_app(
    dsn: str,
    *,
    jwt_secret: str | None = None,
    jwt_public_key: str | bytes | Path | None = None,
    allow_anonymous: Iterable[str] = (),
    durable_channels: Iterable[str] = (),
    heartbeat: float = 15.0,
    client_buffer: int = 1000,
    poll_interval: float = 0.25,
    inline_writes: bool = True,
    max_body: int = MAX_BODY,
    body_timeout: float = BODY_TIMEOUT,
    cors_origins: Iterable[str] = (),
    channels: Iterable[str] = (),
    queue_check_interval: float = 1.0,
    source: str | None = None,
    source_stream: str = "PGHERALD",
    source_subject: str = "pgherald.{channel}",
    listener_options: Mapping[str, Any] | None = None,
) -> Starlette:
    """
    The real-time gateway: SSE, WebSocket and HTTP publish over one LISTEN connection.

    *jwt_public_key* is PEM text or bytes, or a `Path` to a PEM file. *inline_writes*: let
    the fan-out start client writes itself (asyncio); turn it off when mounting the app behind
    middleware whose ``send`` enters cancel scopes. *max_body*: bytes of a publish body (a
    WebSocket message under `GatewayServer`), *body_timeout*: seconds it may take to arrive.
    *cors_origins*: origins (``https://app.example.com``, or patterns) whose pages may use the
    gateway; other origins' browser requests are refused. *channels*: plain channels wildcard
    subscriptions may match (besides change triggers' and durable ones). *queue_check_interval*:
    seconds between reads of the NOTIFY queue usage (a ``gap`` when change triggers skip
    notifications; 0: never). *source*: ``nats://HOST:PORT`` takes the durable channels' live
    events from the JetStream stream *source_stream* (subjects *source_subject*) that
    `pgherald relay` fills, instead of tailing the log (resuming still reads the log).
    *listener_options*: keyword arguments of the gateway's `AsyncListener` (health checks,
    reconnect delays, NOTIFY queue limits). See docs/gateway.md.
    """
    cors = CorsPolicy(cors_origins)  # ValueError for an origin without a scheme
    if isinstance(jwt_public_key, Path):
        jwt_public_key = jwt_public_key.read_bytes()
    auth = Authenticator(
        jwt_secret=jwt_secret, jwt_public_key=jwt_public_key, allow_anonymous=allow_anonymous
    )
    hub = Hub(
        dsn,
        durable_channels=durable_channels,
        client_buffer=client_buffer,
        heartbeat=heartbeat,
        poll_interval=poll_interval,
        inline_writes=inline_writes,
        channels=channels,
        queue_check_interval=queue_check_interval,
        source=source,
        source_stream=source_stream,
        source_subject=source_subject,
        listener_options=listener_options,
    )
    gateway = Gateway(hub, auth, max_body, body_timeout, cors)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with hub.running():
            yield

    app = _GatewayApp(
        routes=[
            Route("/", gateway.page, methods=["GET"]),
            Route("/sse", SseEndpoint(hub, auth, cors), methods=["GET", "OPTIONS"]),
            WebSocketRoute("/ws", WsEndpoint(hub, auth, cors).handle),
            Route("/publish/{channel}", gateway.publish, methods=["POST", "OPTIONS"]),
            Route("/channels", gateway.channels, methods=["GET", "OPTIONS"]),
            Route("/healthz", gateway.healthz, methods=["GET"]),
            Route("/metrics", gateway.metrics, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    return app
