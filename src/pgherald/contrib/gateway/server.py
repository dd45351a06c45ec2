"""Running the gateway under uvicorn, with streams ended before uvicorn waits for them."""

from __future__ import annotations

import logging
import re
import socket
from typing import Any

import uvicorn
from starlette.applications import Starlette

from .app import Gateway

_TOKEN = re.compile(r"(?i)((?:^|[?&])token=)[^&\s]*")


class RedactTokens(logging.Filter):
    """Access-log lines show ``?token=...`` as ``?token=[redacted]``: tokens never reach logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _TOKEN.sub(r"\1[redacted]", a) if isinstance(a, str) else a for a in record.args
            )
        return True


class GatewayServer(uvicorn.Server):
    """A uvicorn server that ends SSE/WebSocket streams first when it shuts down."""

    def __init__(self, app: Starlette, **config: Any) -> None:
        config.setdefault("log_level", "info")
        config.setdefault("ws", "websockets-sansio")
        # No permessage-deflate: an event's WebSocket frame is then built once and written as
        # is to every subscriber (see direct.py); compression would cost a zlib pass per client.
        config.setdefault("ws_per_message_deflate", False)
        config.setdefault("lifespan", "on")
        # A client that stopped reading can hold its connection open: do not wait forever.
        config.setdefault("timeout_graceful_shutdown", 5)
        super().__init__(uvicorn.Config(app, **config))
        access = logging.getLogger("uvicorn.access")
        if not any(isinstance(f, RedactTokens) for f in access.filters):
            access.addFilter(RedactTokens())
        self.gateway: Gateway = app.state.gateway

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn waits for open responses before the lifespan ends: end the streams now.
        self.gateway.close_streams()
        await super().shutdown(sockets)
