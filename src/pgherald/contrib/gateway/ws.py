"""``GET /ws``: the WebSocket JSON protocol (subscribe, unsubscribe, publish; events)."""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import anyio
from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from .auth import Authenticator, AuthError, Principal, bearer_token
from .client import Client
from .fanout import Hub
from .frames import Frame, ws_reply
from .publishing import PublishRefused, publish_checked
from .sse import BadRequest, parse_channels


class WsEndpoint:
    def __init__(self, hub: Hub, auth: Authenticator) -> None:
        self.hub = hub
        self.auth = auth

    async def handle(self, ws: WebSocket) -> None:
        try:
            principal = self.auth.authenticate(bearer_token(ws.headers, ws.query_params))
            if principal.anonymous and not principal.read:
                raise AuthError(401, "a token is needed (?token= or Authorization: Bearer)")
        except AuthError as exc:
            await _deny(ws, exc)
            return
        await ws.accept()
        client = self.hub.new_client("ws", principal.exp)

        def say(text: str) -> None:
            # Replies queue behind events: the writer is the only task that sends.
            client.offer(ws_reply(text))

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._writer, ws, client, tg.cancel_scope)
                await self._reader(ws, client, principal, say)
                tg.cancel_scope.cancel()
        except (WebSocketDisconnect, OSError):
            pass
        finally:
            await self.hub.remove(client)

    async def _reader(self, ws: WebSocket, client: Client, principal: Principal, say: Any) -> None:
        while True:
            try:
                text = await ws.receive_text()
            except WebSocketDisconnect:
                return
            try:
                msg = json.loads(text)
                if not isinstance(msg, dict):
                    raise ValueError("not an object")
            except ValueError:
                say(_error("messages are JSON objects with a 'type'"))
                continue
            kind = msg.get("type")
            try:
                if kind in ("subscribe", "unsubscribe"):
                    raw = msg.get("channels")
                    if not isinstance(raw, list) or not all(isinstance(c, str) for c in raw):
                        raise BadRequest("'channels' must be a list of channel names")
                    channels = parse_channels(raw)
                    if kind == "subscribe":
                        principal.check_read(channels)
                        await self.hub.add(client, channels)
                        say(json.dumps({"type": "subscribed", "channels": channels}))
                    else:
                        await self.hub.remove(client, channels)
                        say(json.dumps({"type": "unsubscribed", "channels": channels}))
                elif kind == "publish":
                    channel = msg.get("channel")
                    if not isinstance(channel, str) or "payload" not in msg:
                        raise BadRequest("publish needs 'channel' (a name) and 'payload'")
                    event_id = await publish_checked(self.hub, principal, channel, msg["payload"])
                    say(json.dumps({"type": "published", "channel": channel, "id": event_id}))
                else:
                    raise BadRequest("'type' must be subscribe, unsubscribe or publish")
            except AuthError as exc:
                say(_error(exc.message))
            except (BadRequest, PublishRefused) as exc:
                say(_error(str(exc)))
            except TimeoutError:
                say(_error("the listener is not connected; try again"))

    async def _writer(self, ws: WebSocket, client: Client, done: anyio.CancelScope) -> None:
        with anyio.CancelScope() as scope:
            client.scope = scope
            await client.pump(partial(_send_frames, ws, client))
        if client.reason is not None:
            with anyio.move_on_after(1.0):
                await ws.close(client.close_code, client.reason[:120])
        done.cancel()


async def _send_frames(ws: WebSocket, client: Client, frames: list[Frame]) -> None:
    """One WebSocket message per frame (an event, or a reply to the client)."""
    events = 0
    for frame in frames:
        if client.reason is not None:
            break
        await ws.send_text(frame.ws)
        events += frame.channel != ""
    client.sent(events)


def _error(message: str) -> str:
    return json.dumps({"type": "error", "message": message})


async def _deny(ws: WebSocket, exc: AuthError) -> None:
    try:
        await ws.send_denial_response(JSONResponse({"error": exc.message}, exc.status))
    except RuntimeError:  # the server cannot answer a handshake with HTTP: close instead
        await ws.close(1008, exc.message[:120])
