"""
Writing frames straight to the server's transport: the fan-out's hot path.

Every delivery pays for one socket write; going through the ASGI ``send`` adds a coroutine
per middleware layer and the server's own per-message work (HTTP chunk framing, WebSocket
frame building), which together cost more than the write itself when one event goes to
thousands of subscribers. When the app runs directly under uvicorn (what ``pgherald serve``
does: the httptools HTTP protocol and the websockets-sansio WebSocket protocol), the bytes
can be written to the transport as they are: each event is encoded once, as an HTTP chunk
(`Frame.sse_chunk`) or as an unmasked WebSocket text frame (`Frame.ws_frame`), and shared by
every subscriber. Anything else (another server, middleware that wraps ``send``, a
compressed WebSocket, a client that reads too slowly, a connection going away) makes
`write` return False, and the ASGI ``send`` is used, which waits and handles disconnects.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

from starlette.types import Scope

SERVER_SEND = "pgherald.server_send"
"""Scope key of the ``send`` the server called the app with (set by the app, see `app`)."""

_D = TypeVar("_D", bound="_Direct")


class _Direct:
    __slots__ = ()

    SERVER_CLASS: ClassVar[tuple[str, str]]
    """(module, class) of the uvicorn object whose bound method the server's ``send`` is."""

    def __init__(self, owner: Any) -> None:
        raise NotImplementedError

    @classmethod
    def of(cls: type[_D], scope: Scope) -> _D | None:
        """The direct writer of *scope*'s stream, or None where the ASGI ``send`` must do."""
        owner: Any = getattr(scope.get(SERVER_SEND), "__self__", None)
        if (type(owner).__module__, type(owner).__name__) != cls.SERVER_CLASS:
            return None
        try:
            return cls(owner) if cls._usable(owner) else None
        except AttributeError:  # a uvicorn unlike the one this was written for
            return None

    @staticmethod
    def _usable(owner: Any) -> bool:
        raise NotImplementedError


class DirectBody(_Direct):
    """The chunked body of one streaming HTTP response, written to uvicorn's transport."""

    __slots__ = ("_cycle", "_flow", "_transport")
    SERVER_CLASS = ("uvicorn.protocols.http.httptools_impl", "RequestResponseCycle")

    def __init__(self, cycle: Any) -> None:
        self._cycle = cycle
        self._flow = cycle.flow
        self._transport = cycle.transport

    @staticmethod
    def _usable(cycle: Any) -> bool:
        # Once the head is sent, and with a chunked body (not for HEAD). Every attribute that
        # `write` reads is read here too: a uvicorn without one is an AttributeError in `of`.
        cycle.disconnected, cycle.response_complete, cycle.flow.write_paused  # noqa: B018
        return cycle.response_started is True and cycle.chunked_encoding is True

    def write(self, chunks: bytes) -> bool:
        """Write *chunks* (complete HTTP chunks) now; False if they must go through ``send``."""
        cycle = self._cycle
        if (
            cycle.disconnected
            or cycle.response_complete
            or self._flow.write_paused
            or self._transport.is_closing()
        ):
            return False
        self._transport.write(chunks)
        return True


class DirectWebSocket(_Direct):
    """An accepted, uncompressed WebSocket, written to uvicorn's transport."""

    __slots__ = ("_conn", "_open", "_protocol", "_transport", "_writable")
    SERVER_CLASS = (
        "uvicorn.protocols.websockets.websockets_sansio_impl",
        "WebSocketsSansIOProtocol",
    )

    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol
        self._conn = protocol.conn
        self._open = type(protocol.conn.state).OPEN
        self._writable = protocol.writable
        self._transport = protocol.transport

    @staticmethod
    def _usable(protocol: Any) -> bool:
        # Once accepted, and without permessage-deflate (every client has its own compressor).
        # Every attribute that `write` reads is read here too (see DirectBody._usable).
        protocol.disconnected, protocol.close_sent, protocol.writable.is_set  # noqa: B018
        return protocol.handshake_complete is True and not protocol.conn.extensions

    def write(self, frames: bytes) -> bool:
        """Write *frames* (complete text frames) now; False if they must go through ``send``."""
        protocol = self._protocol
        if (
            protocol.disconnected
            or protocol.close_sent
            or not self._writable.is_set()
            or self._conn.state is not self._open
            or self._transport.is_closing()
        ):
            return False
        self._transport.write(frames)
        return True
