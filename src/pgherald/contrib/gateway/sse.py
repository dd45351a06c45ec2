"""``GET /sse``: Server-Sent Events, written as a plain ASGI app (it owns its disconnects)."""

from __future__ import annotations

from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Message, Receive, Scope, Send

from ..._protocol.channels import check_channel
from ...errors import HeraldError, InvalidChannel
from .auth import Authenticator, AuthError, bearer_token
from .client import Client
from .cors import CorsPolicy
from .direct import DirectBody
from .fanout import Hub, UnknownEventId
from .filters import Filter, FilterError, parse_filters
from .frames import PING, Frame, Position, control, sse_error

_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # no proxy buffering (nginx)
]


class BadRequest(HeraldError):
    pass


def parse_channels(values: list[str]) -> list[str]:
    """``?channel=a&channel=b`` (``a,b`` works too); names are checked, never altered.

    A name with ``*``, ``?`` or ``[`` is a pattern (fnmatch, as in tokens' claims).
    """
    channels = [c for v in values for c in v.split(",") if c]
    if not channels:
        raise BadRequest("name at least one channel: ?channel=NAME")
    for ch in channels:
        try:
            check_channel(ch)  # what notify and publish check: one rule, one message
        except InvalidChannel as exc:
            raise BadRequest(str(exc)) from None
        if "\r" in ch or "\n" in ch:  # an SSE event name is one line
            raise BadRequest(
                f"channel name {ch[:20]!r} contains a line break, which the gateway cannot "
                "send as an event name: use a name without one"
            )
    return list(dict.fromkeys(channels))


class SseEndpoint:
    def __init__(self, hub: Hub, auth: Authenticator, cors: CorsPolicy | None = None) -> None:
        self.hub = hub
        self.auth = auth
        self.cors = cors or CorsPolicy()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        cors = self.cors.headers(request.headers)
        if request.method == "OPTIONS":
            status, headers, why = self.cors.preflight(request.headers, ("GET",))
            return await _error(scope, receive, send, status, why, headers)
        refused = self.cors.check(request.headers)
        if refused is not None:
            return await _error(scope, receive, send, 403, refused, cors)
        try:
            channels = parse_channels(request.query_params.getlist("channel"))
            filter = parse_filters(request.query_params.getlist("filter"))
            principal = self.auth.authenticate(bearer_token(request.headers, request.query_params))
            principal.check_read(channels)
            last_id = request.headers.get("last-event-id") or request.query_params.get(
                "last_event_id"
            )
            durable = self.hub.durable_matching(channels, principal.can_read)
            after: Position | None = None
            if last_id and durable:
                try:
                    after = await self.hub.resume_from(int(last_id))
                except ValueError:
                    raise BadRequest("Last-Event-ID must be an event id (an integer)") from None
        except AuthError as exc:
            return await _error(scope, receive, send, exc.status, exc.message, cors)
        except (BadRequest, UnknownEventId, FilterError) as exc:
            return await _error(scope, receive, send, 400, str(exc), cors)
        except HeraldError:  # finding the resume point: the database is down or refuses
            return await _error(scope, receive, send, 503, "the database is not available", cors)

        client = self.hub.new_client("sse", principal.exp)
        client.can_read = principal.can_read
        try:
            try:
                upto = await self.hub.add(client, channels, filter)
            except TimeoutError:
                return await _error(
                    scope, receive, send, 503, "the listener is not connected", cors
                )
            head = _HEADERS + [(k.encode(), v.encode()) for k, v in cors]
            await send({"type": "http.response.start", "status": 200, "headers": head})
            async with anyio.create_task_group() as tg:
                tg.start_soon(_watch_disconnect, receive, tg.cancel_scope)
                await self._stream(client, send, DirectBody.of(scope), durable, after, upto, filter)
                tg.cancel_scope.cancel()
        finally:
            await self.hub.remove(client)

    async def _stream(
        self,
        client: Client,
        send: Send,
        direct: DirectBody | None,
        durable: list[str],
        after: Position | None,
        upto: Position,
        filter: Filter | None = None,
    ) -> None:
        async def body(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        # Live events at or before this came from the log (the replay) or were sent before.
        # (The log tail's live events all follow upto; a NATS source's may not: see Hub.)
        seen = None if after is None else max(after, upto)

        def unsent(frames: list[Frame]) -> list[Frame]:
            if seen is None:
                return frames
            return [f for f in frames if f.pos is None or f.pos > seen]  # else: from the log

        def write_now(frames: list[Frame]) -> bool:
            # The hot path: the frames' chunks, encoded once per event, straight to the socket.
            frames = unsent(frames)
            if not frames:
                return True
            assert direct is not None
            chunks = (
                frames[0].sse_chunk if len(frames) == 1 else b"".join([f.sse_chunk for f in frames])
            )
            if not direct.write(chunks):
                return False
            client.sent(len(frames) - frames.count(PING))
            return True

        async def write(frames: list[Frame]) -> None:
            frames = unsent(frames)
            if frames:
                data = b"".join([f.sse for f in frames])
                await send({"type": "http.response.body", "body": data, "more_body": True})
                client.sent(len(frames) - frames.count(PING))

        try:
            with anyio.CancelScope() as scope:
                client.scope = scope
                # Then the channels the patterns matched (see Hub.add), before any event.
                matched = sorted(client.channels - client.named)
                announce = control("subscribed", {"channels": matched}).sse if matched else b""
                await body(b": ready\n\n" + announce)
                if after is not None:
                    try:
                        async for old in self.hub.replay(durable, after, upto, filter):
                            if client.reason is not None:
                                break
                            await body(old.sse)
                            client.sent(1)
                    except HeraldError as exc:  # the log cannot be read: it resumes later
                        self.hub.replay_failed(client, exc)
                await client.pump(write, None if direct is None else write_now)
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


async def _error(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    message: str | None,
    extra: list[tuple[str, str]] = [],  # noqa: B006 (never changed)
) -> None:
    """A JSON ``{"error": message}`` answer (*message* None: an empty one, for a preflight)."""
    headers: dict[str, Any] = dict(extra)
    if status == 401:
        headers["www-authenticate"] = "Bearer"
    if message is None:
        await Response(None, status, headers=headers)(scope, receive, send)
        return
    await JSONResponse({"error": message}, status, headers=headers)(scope, receive, send)
