"""Running the gateway under uvicorn, with streams ended before uvicorn waits for them."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
from collections import Counter
from typing import Any

import uvicorn
from starlette.applications import Starlette
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .app import Gateway


def _query_key(name: str) -> str:
    """A regex (to compile case-insensitive) for query key *name* as a client may send it: any
    character percent-encoded, in either case (``%74oken``, ``t%6Fken``, ``%54OKEN``: the
    server decodes keys before it looks them up)."""
    return "".join(
        "(?:" + "|".join([re.escape(c)] + [f"%{ord(v):02x}" for v in {c.lower(), c.upper()}]) + ")"
        for c in name
    )


_TOKEN = re.compile(rf"(?i)((?:^|[?&]){_query_key('token')}=)[^&\s\"]*")

HEADER_TIMEOUT = 10.0
"""Seconds a connection has to send a request's headers (slowloris), in `GatewayServer`."""
KEEP_ALIVE_TIMEOUT = 5.0
"""Seconds an idle keep-alive connection stays open between requests (uvicorn's own)."""
MAX_HEADER_BYTES = 64 * 1024
"""The request line and headers of one request, at most (a 431 beyond)."""
MAX_CONNECTIONS_PER_CLIENT = 100
"""Open connections from one client address, at most (a 429 beyond); 0: no limit."""
REFUSED_LINGER = 1.0
"""Seconds a connection over the per-address limit has to send its request (to get a 429)."""


REDACTED_LOGGERS = ("uvicorn.access", "uvicorn.error")
"""Where uvicorn logs request paths: HTTP access lines, and WebSocket handshakes
(``"WebSocket /ws?token=..." [accepted]``, on its error logger): `GatewayServer` redacts both."""


class RedactTokens(logging.Filter):
    """Log lines show ``?token=...`` as ``?token=[redacted]``: tokens never reach logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _TOKEN.sub(r"\1[redacted]", a) if isinstance(a, str) else a for a in record.args
            )
        if isinstance(record.msg, str) and "=" in record.msg:
            record.msg = _TOKEN.sub(r"\1[redacted]", record.msg)  # a line formatted already
        return True


class QuietClientMistakes(logging.Filter):
    """uvicorn logs a WebSocket text frame that is not UTF-8 at ERROR, with a traceback, though
    it is the client's mistake and the socket is closed properly (1007): one INFO line."""

    MESSAGES = frozenset({"Invalid UTF-8 sequence received from client."})

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.msg in self.MESSAGES:
            record.msg = f"{record.msg} Closed with 1007 (invalid frame payload data)."
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info, record.exc_text = None, None
        return True


class _Limits:
    """What `_GuardedHttp` enforces, and the open connections per client address."""

    def __init__(self, header_timeout: float, max_header_bytes: int, per_client: int) -> None:
        self.header_timeout = header_timeout
        self.max_header_bytes = max_header_bytes
        self.per_client = per_client
        self.open: Counter[str] = Counter()
        self.warned: set[str] = set()  # addresses at their limit, logged once


def _refusal(status: bytes, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
    )


class _GuardedHttp(HttpToolsProtocol):
    """
    uvicorn's httptools protocol, bounded: what uvicorn leaves open to a flood of sockets.

    uvicorn times out idle keep-alive connections only after a first response: a connection
    that never completes its headers stays open forever, and enough of them (1,024 with the
    default file limit) lock everyone out. Here every request has *header_timeout* seconds
    and *max_header_bytes* for its headers, and one address holds at most *per_client*
    connections (WebSockets included); the next ones are answered a 429 as soon as their
    request's head is in, and closed within a second anyway, so that a flood from one address
    holds no more. Requests themselves go through uvicorn's code unchanged (the direct writes
    of direct.py see uvicorn's own `RequestResponseCycle`).
    """

    limits: _Limits  # set on the subclass `GatewayServer` makes

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0  # since the end of the last request's headers
        self._head_tail = b""  # the last bytes counted there (a head's end may span two reads)
        self._in_headers = self._in_message = False
        self._refused: str | None = None  # the address, once over its limit
        self._seen = b""  # the last bytes of a refused connection's request (see data_received)
        self._address: str | None = None
        self._upgraded = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        limits = self.limits
        address = self.client[0] if self.client else None
        if address is not None and limits.per_client:
            if limits.open[address] >= limits.per_client:
                if address not in limits.warned:  # once per flood, not once per socket
                    limits.warned.add(address)
                    self.logger.warning(
                        "%s: refusing connections, %d open already",
                        address,
                        limits.per_client,
                    )
                # Answered once its request's head is in (clients take an answer before their
                # request badly), within a second: closed then in any case.
                self._refused = address
                self._header_timer = self.loop.call_later(
                    min(REFUSED_LINGER, limits.header_timeout), self._header_timeout
                )
                return
            limits.open[address] += 1
            self._address = address
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._headers_done()
        self._release()
        super().connection_lost(exc)

    def _release(self) -> None:
        if self._address is not None:
            open_ = self.limits.open
            open_[self._address] -= 1
            if open_[self._address] <= 0:
                del open_[self._address]
            self.limits.warned.discard(self._address)
            self._address = None

    def data_received(self, data: bytes) -> None:
        if self._refused is not None:  # over the limit: only the end of the head is sought
            seen, self._seen = self._seen + data, data[-3:]
            self._header_bytes += len(data)
            if b"\r\n\r\n" in seen or self._header_bytes > self.limits.max_header_bytes:
                self._headers_done()
                if not self.transport.is_closing():
                    self.transport.write(
                        _refusal(b"429 Too Many Requests", _too_many(self._refused, self.limits))
                    )
                    self.transport.close()
            return
        if self._in_headers or not self._in_message:
            before = self._header_bytes
            self._header_bytes += len(data)
            if self._header_bytes > self.limits.max_header_bytes:
                # A head that ends in these bytes is over the limit too, though it arrived
                # whole: refused before the parser sees it (no request reaches the app).
                end = (self._head_tail + data).find(b"\r\n\r\n")
                if end >= 0 and before - len(self._head_tail) + end + 4 > (
                    self.limits.max_header_bytes
                ):
                    self._too_large()
                    return
            self._head_tail = data[-3:]
        super().data_received(data)
        if self._upgraded:
            return
        if self._in_headers and self._header_bytes > self.limits.max_header_bytes:
            # Still no end of headers after that many bytes: stop reading them.
            self._too_large()
        elif self.timeout_keep_alive_task is None and (
            self.cycle is None or self.cycle.response_complete
        ):
            # uvicorn dropped its keep-alive timer at these bytes, and they completed no
            # request (the start of one, the rest of a body answered early): bound them too.
            self._await_headers()

    def _too_large(self) -> None:
        self._headers_done()
        if not self.transport.is_closing():
            self.transport.write(
                _refusal(
                    b"431 Request Header Fields Too Large",
                    f"the request headers exceed {self.limits.max_header_bytes} bytes",
                )
            )
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_message = self._in_headers = True
        self._await_headers()

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._header_bytes = 0
        self._head_tail = b""
        self._headers_done()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_message = False
        super().on_message_complete()

    def handle_websocket_upgrade(self) -> None:
        self._upgraded = True  # no more requests on this connection: no more header timeout
        super().handle_websocket_upgrade()
        if self._address is None:
            return
        # The WebSocket protocol takes the connection over: its loss ends the count.
        protocol = self.transport.get_protocol()
        lost = protocol.connection_lost

        def connection_lost(exc: Exception | None) -> None:
            self._release()
            lost(exc)

        protocol.connection_lost = connection_lost  # type: ignore[method-assign]

    def _await_headers(self) -> None:
        if self._header_timer is None and not self.transport.is_closing():
            self._header_timer = self.loop.call_later(
                self.limits.header_timeout, self._header_timeout
            )

    def _headers_done(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def _too_many(address: str, limits: _Limits) -> str:
    return (
        f"too many connections from {address} (at most {limits.per_client}): close some, or "
        "raise pgherald serve --max-connections-per-client"
    )


class GatewayServer(uvicorn.Server):
    """
    A uvicorn server that ends SSE/WebSocket streams first when it shuts down, and bounds
    what a client can hold: *header_timeout* seconds and *max_header_bytes* for a request's
    headers, *max_connections_per_client* connections per address (0: no limit); the other
    keyword arguments are uvicorn's (``timeout_keep_alive``: idle time between requests).
    """

    def __init__(
        self,
        app: Starlette,
        *,
        header_timeout: float = HEADER_TIMEOUT,
        max_header_bytes: int = MAX_HEADER_BYTES,
        max_connections_per_client: int = MAX_CONNECTIONS_PER_CLIENT,
        **config: Any,
    ) -> None:
        self.gateway: Gateway = app.state.gateway
        config.setdefault("log_level", "info")
        config.setdefault("ws", "websockets-sansio")
        # No permessage-deflate: an event's WebSocket frame is then built once and written as
        # is to every subscriber (see direct.py); compression would cost a zlib pass per client.
        config.setdefault("ws_per_message_deflate", False)
        config.setdefault("lifespan", "on")
        config.setdefault("timeout_keep_alive", KEEP_ALIVE_TIMEOUT)
        # A WebSocket message is at most a publish of the largest body (uvicorn: 16 MiB).
        config.setdefault("ws_max_size", self.gateway.max_body + 64 * 1024)
        # A client that stopped reading can hold its connection open: do not wait forever.
        config.setdefault("timeout_graceful_shutdown", 5)
        if "http" not in config:
            limits = _Limits(header_timeout, max_header_bytes, max_connections_per_client)
            config["http"] = type("GuardedHttp", (_GuardedHttp,), {"limits": limits})
        super().__init__(uvicorn.Config(app, **config))
        for name in REDACTED_LOGGERS:  # (a logger's filters see its own records only)
            logger = logging.getLogger(name)
            if not any(isinstance(f, RedactTokens) for f in logger.filters):
                logger.addFilter(RedactTokens())
        errors = logging.getLogger("uvicorn.error")
        if not any(isinstance(f, QuietClientMistakes) for f in errors.filters):
            errors.addFilter(QuietClientMistakes())

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn waits for open responses before the lifespan ends: end the streams now.
        self.gateway.close_streams()
        await super().shutdown(sockets)
