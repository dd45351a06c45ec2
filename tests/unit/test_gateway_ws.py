"""The WebSocket endpoint's sends when the server has closed the connection by itself."""

from __future__ import annotations

import pytest
from starlette.websockets import WebSocketDisconnect

from pgherald.contrib.gateway import ws


class ClosedByServer:
    """Stands for a WebSocket that uvicorn closed after unanswered keepalive pings."""

    async def send_text(self, text: str) -> None:
        # What uvicorn raises for any message after it sent the close frame itself.
        raise RuntimeError(
            "Unexpected ASGI message 'websocket.send', after sending 'websocket.close'."
        )


@pytest.mark.anyio
async def test_a_send_refused_after_the_servers_close_is_a_disconnect() -> None:
    with pytest.raises(WebSocketDisconnect) as info:
        await ws._send_text(ClosedByServer(), "{}")  # type: ignore[arg-type]
    assert info.value.code == 1006
    assert isinstance(info.value.__cause__, RuntimeError)


class Broken:
    async def send_text(self, text: str) -> None:
        raise RuntimeError("something else went wrong")


@pytest.mark.anyio
async def test_other_runtime_errors_are_not_taken_for_a_disconnect() -> None:
    with pytest.raises(RuntimeError, match="something else"):
        await ws._send_text(Broken(), "{}")  # type: ignore[arg-type]
