"""``GET /sse``: Server-Sent Events, written as a plain ASGI app (it owns its disconnects)."""

from __future__ import annotations

from typing import Any

import anyio
import psycopg
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import Message, Receive, Scope, Send

from .auth import Authenticator, AuthError, Principal, bearer_token, seconds_left
from .fanout import Client, Hub, UnknownEventId
from .frames import Frame, Position, sse_error

_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # no proxy buffering (nginx)
]


class BadRequest(Exception):
    pass


def parse_channels(values: list[str]) -> list[str]:
    """``?channel=a&channel=b`` (``a,b`` works too); names are checked, never altered."""
    channels = [c for v in values for c in v.split(",") if c]
    if not channels:
        raise BadRequest("name at least one channel: ?channel=NAME")
    for ch in channels:
        if any(c in ch for c in "\r\n\x00") or len(ch.encode()) > 63:
            raise BadRequest(f"invalid channel name {ch[:70]!r}")
    return list(dict.fromkeys(channels))


class SseEndpoint:
    def __init__(self, hub: Hub, auth: Authenticator, heartbeat: float) -> None:
        self.hub = hub
        self.auth = auth
        self.heartbeat = heartbeat

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            channels = parse_channels(request.query_params.getlist("channel"))
            principal = self.auth.authenticate(bearer_token(request.headers, request.query_params))
            principal.check_read(channels)
            last_id = request.headers.get("last-event-id") or request.query_params.get(
                "last_event_id"
            )
            durable = [ch for ch in channels if ch in self.hub.durable]
            after: Position | None = None
            if last_id and durable:
                try:
                    after = await self.hub.resume_from(int(last_id))
                except ValueError:
                    raise BadRequest("Last-Event-ID must be an event id (an integer)") from None
        except AuthError as exc:
            return await _error(scope, receive, send, exc.status, exc.message)
        except (BadRequest, UnknownEventId) as exc:
            return await _error(scope, receive, send, 400, str(exc))
        except psycopg.Error:
            return await _error(scope, receive, send, 503, "the database is not available")

        client = self.hub.new_client("sse")
        try:
            try:
                upto = await self.hub.add(client, channels)
            except TimeoutError:
                return await _error(scope, receive, send, 503, "the listener is not connected")
            await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
            async with anyio.create_task_group() as tg:
                tg.start_soon(_watch_disconnect, receive, tg.cancel_scope)
                await self._stream(client, send, principal, durable, after, upto)
                tg.cancel_scope.cancel()
        finally:
            await self.hub.remove(client)

    async def _stream(
        self,
        client: Client,
        send: Send,
        principal: Principal,
        durable: list[str],
        after: Position | None,
        upto: Position,
    ) -> None:
        frames_out = self.hub.metrics.frames_out

        async def body(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        try:
            with anyio.CancelScope() as scope:
                client.scope = scope
                await body(b": ready\n\n")
                if after is not None:
                    async for old in self.hub.replay(durable, after, upto):
                        if client.reason is not None:
                            break
                        await body(old.sse)
                        frames_out.inc()
                while client.reason is None:
                    left = seconds_left(principal)
                    if left is not None and left <= 0:
                        client.end("token expired", 1008)
                        break
                    wait = self.heartbeat if left is None else min(self.heartbeat, left)
                    frame: Frame | None = None
                    with anyio.move_on_after(wait):
                        frame = await client.frames.receive()
                    if client.reason is not None:
                        break
                    if frame is None:
                        if left is None or left > self.heartbeat:
                            await body(b": ping\n\n")
                        continue
                    chunk = [frame]
                    # Whatever else is already waiting goes out in the same write: one ASGI
                    # send and one syscall for many frames when events come fast.
                    while len(chunk) < 64:
                        try:
                            chunk.append(client.frames.receive_nowait())
                        except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                            break
                    if after is not None:  # already sent from the log
                        chunk = [f for f in chunk if f.pos is None or f.pos > after]
                    if chunk:
                        await body(b"".join(f.sse for f in chunk))
                        frames_out.inc(len(chunk))
        except anyio.EndOfStream:
            pass  # ended by the hub: client.reason says why
        except OSError:
            return  # the client went away
        if client.reason is not None:
            with anyio.move_on_after(1.0):
                await body(sse_error(client.reason))
                await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _watch_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


async def _error(scope: Scope, receive: Receive, send: Send, status: int, message: str) -> None:
    headers: dict[str, Any] = {}
    if status == 401:
        headers["www-authenticate"] = "Bearer"
    await JSONResponse({"error": message}, status, headers=headers)(scope, receive, send)
