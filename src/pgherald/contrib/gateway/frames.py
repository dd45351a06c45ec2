"""One event as it goes out: encoded once, shared by every client that receives it."""

from __future__ import annotations

import json
import re

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')

MAX_JSON_DEPTH = 500
"""A JSON payload nested deeper than this is sent as text: clients' parsers (and Python's
json, whose limit is the recursion limit) must never choke on an event."""

Position = tuple[int, int]
"""A place in the durable log: (transaction id, event id), the log's commit-safe order."""


class Frame:
    """An event for the clients of one channel; the SSE and WebSocket encodings are cached."""

    __slots__ = ("_chunk", "_sse", "_ws", "_ws_frame", "channel", "id", "payload", "pos")

    def __init__(self, channel: str, payload: str, pos: Position | None = None) -> None:
        self.channel = channel
        self.payload = payload
        self.pos = pos
        self.id = None if pos is None else pos[1]
        self._sse: bytes | None = None
        self._chunk: bytes | None = None
        self._ws: str | None = None
        self._ws_frame: bytes | None = None

    @property
    def sse(self) -> bytes:
        """``event: <channel>`` [``id: <id>``] ``data: <line>``... as bytes, built once."""
        if self._sse is None:
            parts = [f"event: {self.channel}\n"]
            if self.id is not None:
                parts.append(f"id: {self.id}\n")
            parts.extend(f"data: {line}\n" for line in _LINE_BREAK.split(self.payload))
            parts.append("\n")
            self._sse = "".join(parts).encode()
        return self._sse

    @property
    def sse_chunk(self) -> bytes:
        """`sse` as one HTTP/1.1 chunk (``<size>CRLF<data>CRLF``), for direct writes."""
        if self._chunk is None:
            sse = self.sse
            self._chunk = b"%x\r\n%b\r\n" % (len(sse), sse)
        return self._chunk

    @property
    def ws(self) -> str:
        """``{"type": "event", "channel", "payload", ["id"]}``: a JSON payload stays JSON.

        Payloads are untrusted (any role may NOTIFY): see `json_or_text`.
        """
        if self._ws is None:
            payload = json_or_text(self.payload)
            extra = "" if self.id is None else f',"id":{self.id}'
            self._ws = f'{{"type":"event","channel":{json.dumps(self.channel)},"payload":{payload}{extra}}}'
        return self._ws

    @property
    def ws_frame(self) -> bytes:
        """`ws` as a complete, unmasked WebSocket text frame (server to client), for direct writes."""
        if self._ws_frame is None:
            data = self.ws.encode()
            n = len(data)
            if n < 126:
                head = bytes((0x81, n))
            elif n < 65536:
                head = bytes((0x81, 126)) + n.to_bytes(2, "big")
            else:
                head = bytes((0x81, 127)) + n.to_bytes(8, "big")
            self._ws_frame = head + data
        return self._ws_frame


def json_or_text(payload: str) -> str:
    """*payload* itself if it is strict JSON nested at most `MAX_JSON_DEPTH` deep, else the
    payload as a JSON string. Never raises: ``NaN``/``Infinity`` (which browsers' ``JSON.parse``
    rejects) and a 4,000-deep array (a `RecursionError`) are text like any other."""
    if (
        payload.count("[") + payload.count("{") > MAX_JSON_DEPTH
        and _depth(payload) > MAX_JSON_DEPTH
    ):
        return json.dumps(payload)
    try:
        json.loads(payload, parse_constant=_not_json)
    except (ValueError, RecursionError):
        return json.dumps(payload)
    return payload


def _not_json(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _depth(text: str) -> int:
    """The deepest nesting of brackets outside strings (only for payloads with many brackets)."""
    depth = deepest = 0
    for ch in _STRING.sub("", text):
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _comment(text: str) -> Frame:
    frame = Frame("", "")
    frame._sse = f": {text}\n\n".encode()
    return frame


PING = _comment("ping")
"""The SSE heartbeat: a comment line, ignored by EventSource, that keeps proxies from timing out."""


def ws_reply(message: str) -> Frame:
    """A WebSocket message that is not an event (a reply): queued like events, so one writer."""
    frame = Frame("", "")
    frame._ws = message
    return frame


def sse_error(message: str) -> bytes:
    """The last frame of a stream the gateway ends: ``event: error`` with the reason."""
    data = "".join(f"data: {line}\n" for line in _LINE_BREAK.split(message))
    return f"event: error\n{data}\n".encode()


def control(event: str, fields: dict[str, object]) -> Frame:
    """
    A message of the gateway's own, queued like events (so it keeps its place among them):
    SSE ``event: <event>`` with *fields* as JSON data, WebSocket ``{"type": <event>, ...}``.
    """
    frame = Frame("", "")
    data = json.dumps(fields, separators=(",", ":"))
    frame._sse = f"event: {event}\ndata: {data}\n\n".encode()
    frame._ws = json.dumps({"type": event} | fields, separators=(",", ":"))
    return frame
