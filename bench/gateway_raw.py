"""The floor for ``gateway_bench.py``: the least a Python process can do for the same fan-out.

``python bench/gateway_raw.py --dsn DSN --port P --channels N`` LISTENs to ``ch0..ch{N-1}``
with asyncpg on uvloop and serves ``GET /sse?channel=...`` with a hand-written HTTP/1.1
response (no framework, no chunked encoding, no auth, no per-client buffer or backpressure):
each notification is encoded once and written to every subscriber's transport at once, one
write per event per client. ``GET`` of anything else answers ``ok`` (the harness's health
check). Not a product: it only shows what the kernel and the interpreter cost on this machine,
so that the gateway's figures can be read against it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from urllib.parse import parse_qs, urlsplit

import asyncpg
import uvloop
from psycopg.conninfo import conninfo_to_dict

_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\r\n"
    b": ready\n\n"
)
_OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"

Subscribers = dict[str, set[asyncio.Transport]]


class SseConn(asyncio.Protocol):
    def __init__(self, subs: Subscribers) -> None:
        self.subs = subs
        self.buf = b""
        self.channels: list[str] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.channels or self.transport is None:
            return
        self.buf += data
        if b"\r\n\r\n" not in self.buf:
            return
        target = self.buf.split(b"\r\n", 1)[0].split(b" ")[1].decode()
        url = urlsplit(target)
        if url.path != "/sse":
            self.transport.write(_OK)
            self.transport.close()
            return
        self.channels = parse_qs(url.query).get("channel", [])
        for ch in self.channels:
            self.subs.setdefault(ch, set()).add(self.transport)
        self.transport.write(_SSE_HEAD)

    def connection_lost(self, exc: Exception | None) -> None:
        for ch in self.channels:
            self.subs.get(ch, set()).discard(self.transport)  # type: ignore[arg-type]


async def serve(dsn: str, port: int, channels: int) -> None:
    subs: Subscribers = {}

    def on_notify(_conn: object, _pid: int, channel: str, payload: str) -> None:
        frame = f"event: {channel}\ndata: {payload}\n\n".encode()
        for transport in subs.get(channel, ()):
            transport.write(frame)

    params = conninfo_to_dict(dsn)  # libpq keywords or a URI, as the harness passes them
    conn = await asyncpg.connect(
        host=params.get("host"),
        port=int(params.get("port") or 5432),
        user=params.get("user"),
        password=params.get("password"),
        database=params.get("dbname"),
    )
    for i in range(channels):
        await conn.add_listener(f"ch{i}", on_notify)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SseConn(subs), "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--channels", type=int, default=100)
    a = ap.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(a.dsn, a.port, a.channels))


if __name__ == "__main__":
    main()
