"""``GET /ws``: the WebSocket JSON protocol (subscribe, unsubscribe, publish; events)."""

from __future__ import annotations

import contextlib
import json
from functools import partial
from typing import Any

import anyio
from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from ...errors import HeraldError
from .auth import Authenticator, AuthError, Principal, bearer_token
from .client import Client
from .cors import CorsPolicy
from .direct import DirectWebSocket
from .fanout import Hub, UnknownEventId
from .filters import Filter, FilterError, parse_filters
from .frames import Frame, Position, ws_reply
from .publishing import PublishRefused, publish_checked
from .sse import BadRequest, parse_channels


class WsEndpoint:
    def __init__(self, hub: Hub, auth: Authenticator, cors: CorsPolicy | None = None) -> None:
        self.hub = hub
        self.auth = auth
        self.cors = cors or CorsPolicy()

    async def handle(self, ws: WebSocket) -> None:
        try:
            # Browsers send Origin on every handshake and WebSockets have no CORS: a page of any
            # site could open one (with the user's cookies, were there any), so check it here.
            refused = self.cors.check(ws.headers)
            if refused is not None:
                raise AuthError(403, refused)
            principal = self.auth.authenticate(bearer_token(ws.headers, ws.query_params))
            if principal.anonymous and not principal.read:
                raise AuthError(401, "a token is needed (?token= or Authorization: Bearer)")
        except AuthError as exc:
            await _deny(ws, exc)
            return
        await ws.accept()
        client = self.hub.new_client("ws", principal.exp)
        client.can_read = principal.can_read

        resumed: dict[str, Position] = {}  # durable channel -> resumed after (dedupe)

        def say(text: str) -> None:
            # Replies queue behind events: the writer is the only task that sends.
            client.offer(ws_reply(text))

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._writer, ws, client, resumed, tg.cancel_scope)
                await self._reader(ws, client, principal, say, resumed)
                tg.cancel_scope.cancel()
        except (WebSocketDisconnect, OSError):
            pass
        finally:
            await self.hub.remove(client)

    async def _reader(
        self,
        ws: WebSocket,
        client: Client,
        principal: Principal,
        say: Any,
        resumed: dict[str, Position],
    ) -> None:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:  # a binary frame: answered, never a dead socket
                say(_error("messages are JSON text: a binary frame is not read"))
                continue
            try:
                msg = json.loads(text)
                if not isinstance(msg, dict):
                    raise ValueError("not an object")
            except RecursionError:  # hostile input is an error message, never a dead socket
                say(_error("the message is JSON nested too deeply"))
                continue
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
                        filter = parse_filters(_filters(msg.get("filter")))
                        await self._subscribe(
                            client, channels, filter, msg.get("after"), resumed, say
                        )
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
            except (BadRequest, PublishRefused, FilterError) as exc:
                say(_error(str(exc)))
            except TimeoutError:
                say(_error("the listener is not connected; try again"))
            except HeraldError:  # finding the resume point: the database is down or refuses
                say(_error("the database is not available; try again"))
            except RecursionError:  # a payload that parsed but cannot be encoded again
                say(_error("the payload is nested too deeply"))

    async def _subscribe(
        self,
        client: Client,
        channels: list[str],
        filter: Filter | None,
        after_id: Any,
        resumed: dict[str, Position],
        say: Any,
    ) -> None:
        reply = json.dumps({"type": "subscribed", "channels": channels})
        durable = self.hub.durable_matching(channels, client.can_read)
        if after_id is None or not durable:
            await self._add(client, channels, filter)
            say(reply)
            return
        if not isinstance(after_id, int) or isinstance(after_id, bool):
            raise BadRequest("'after' must be an event id (an integer)")
        try:
            after = await self.hub.resume_from(after_id)
        except UnknownEventId as exc:
            raise BadRequest(str(exc)) from None
        # Queued before the LISTENs so that it goes out before any live event of these
        # channels; the writer waits until the position the live events start after is known.
        resume = _Resume(reply, durable, after, filter)
        client.offer(resume, in_task=True)
        try:
            resume.upto = await self._add(client, channels, filter)
            for ch in durable:  # live events up to here come from the replay (see sse.py)
                resumed[ch] = max(after, resume.upto)
        finally:
            resume.known.set()

    async def _add(self, client: Client, channels: list[str], filter: Filter | None) -> Position:
        """`Hub.add`, undone when it fails: a refused subscribe leaves no half subscription."""
        try:
            return await self.hub.add(client, channels, filter)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.hub.remove(client, channels)
            raise

    async def _writer(
        self,
        ws: WebSocket,
        client: Client,
        resumed: dict[str, Position],
        done: anyio.CancelScope,
    ) -> None:
        direct = DirectWebSocket.of(ws.scope)
        try:
            with anyio.CancelScope() as scope:
                client.scope = scope
                await client.pump(
                    partial(self._send_frames, ws, client, resumed),
                    None if direct is None else partial(_write_now, direct, client, resumed),
                )
        except (WebSocketDisconnect, OSError):
            # The client went away mid-write: end quietly (raised from this task, the error
            # would reach the server wrapped in an exception group, as a crash).
            done.cancel()
            return
        if client.reason is not None:
            with (
                anyio.move_on_after(1.0),
                contextlib.suppress(WebSocketDisconnect, OSError, RuntimeError),
            ):
                # The connection may be gone by now, or closed by the server (see _send_text).
                await ws.close(client.close_code, client.reason[:120])
        done.cancel()

    async def _send_frames(
        self, ws: WebSocket, client: Client, resumed: dict[str, Position], frames: list[Frame]
    ) -> None:
        """One WebSocket message per frame (an event, or a reply to the client)."""
        events = 0
        for frame in frames:
            if client.reason is not None:
                break
            if isinstance(frame, _Resume):
                events += await self._replay(ws, client, frame)
                continue
            if _from_the_log(frame, resumed):
                continue
            await _send_text(ws, frame.ws)
            events += frame.channel != ""
        client.sent(events)

    async def _replay(self, ws: WebSocket, client: Client, resume: _Resume) -> int:
        """The `subscribed` reply, then the events after the resume point, from the log."""
        await resume.known.wait()
        if resume.upto is None:  # the subscribe failed; the reader said why
            return 0
        await _send_text(ws, resume.ws)
        sent = 0
        try:
            replay = self.hub.replay(resume.durable, resume.after, resume.upto, resume.filter)
            async for old in replay:
                if client.reason is not None:
                    break
                await _send_text(ws, old.ws)
                sent += 1
        except HeraldError as exc:  # the log cannot be read: the client resumes later
            self.hub.replay_failed(client, exc)
        return sent


_START: Position = (0, 0)


def _from_the_log(frame: Frame, resumed: dict[str, Position]) -> bool:
    """Whether *frame* was sent already, by the replay of a resumed durable channel."""
    return (
        frame.pos is not None and bool(resumed) and frame.pos <= resumed.get(frame.channel, _START)
    )


def _write_now(
    direct: DirectWebSocket, client: Client, resumed: dict[str, Position], frames: list[Frame]
) -> bool:
    """`WsEndpoint._send_frames` straight to the socket, if it can be done now (see direct.py)."""
    data: list[bytes] = []
    events = 0
    for frame in frames:
        if isinstance(frame, _Resume):
            return False  # reads the log: the client's own task does it
        if _from_the_log(frame, resumed):
            continue
        data.append(frame.ws_frame)
        events += frame.channel != ""
    if data and not direct.write(data[0] if len(data) == 1 else b"".join(data)):
        return False
    client.sent(events)
    return True


class _Resume(Frame):
    """Stands for a subscribe that resumes after an event id, in the client's queue."""

    __slots__ = ("after", "durable", "filter", "known", "upto")

    def __init__(
        self, reply: str, durable: list[str], after: Position, filter: Filter | None
    ) -> None:
        super().__init__("", "")
        self._ws = reply
        self.durable = durable
        self.after = after
        self.filter = filter
        self.upto: Position | None = None
        self.known = anyio.Event()


async def _send_text(ws: WebSocket, text: str) -> None:
    try:
        await ws.send_text(text)
    except RuntimeError as exc:
        # The server closed the connection on its own (uvicorn does when the client leaves
        # its keepalive pings unanswered) and refuses any further message, before the
        # disconnect reaches the reader: the client is gone, as after a reset. Any other
        # RuntimeError is a bug, and stays one.
        if "close" not in str(exc):
            raise
        raise WebSocketDisconnect(1006) from exc


def _filters(raw: Any) -> list[str]:
    """The subscribe message's ``filter``: one ``FIELD=OP.VALUE`` string, or a list of them."""
    if raw is None:
        return []
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and all(isinstance(f, str) for f in raw):
        return raw
    raise BadRequest("'filter' must be a string (status=eq.paid) or a list of them")


def _error(message: str) -> str:
    return json.dumps({"type": "error", "message": message})


async def _deny(ws: WebSocket, exc: AuthError) -> None:
    try:
        await ws.send_denial_response(JSONResponse({"error": exc.message}, exc.status))
    except RuntimeError:  # the server cannot answer a handshake with HTTP: close instead
        await ws.close(1008, exc.message[:120])
