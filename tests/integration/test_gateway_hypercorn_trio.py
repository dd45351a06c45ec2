"""
The gateway served by a real HTTP server on trio (hypercorn's trio worker), end to end: its
lifespan, SSE, WebSocket and HTTP publish, durable and plain channels, then a clean shutdown.

Why: docs/gateway.md says the gateway runs on asyncio and trio alike, but uvicorn (what
`pgherald serve` and the other gateway tests use) is asyncio only, and the trio fault tests
(test_gateway_faults.py) drive the ASGI app on the test's own loop: this is the one test where
a trio server's own `send`/`receive` (and its cancel scopes) carry the gateway's streams.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import hypercorn.trio as hypercorn_trio
import psycopg
import trio
from starlette.applications import Starlette
from websockets.sync.client import connect as ws_connect

import pgherald
from pgherald.contrib.gateway import create_app
from tests.fix_faults import free_port, wait_until
from tests.integration.test_gateway import SECRET, sse, token


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def hypercorn_on_trio(app: Starlette) -> Iterator[str]:
    """Serve *app* with hypercorn on trio in a thread; yield its base URL; shut it down."""
    from hypercorn.config import Config

    port = free_port()
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.graceful_timeout = 3.0
    config.loglevel = "WARNING"
    handles: dict[str, Any] = {}
    errors: list[BaseException] = []

    async def main() -> None:
        stop = trio.Event()
        handles["token"], handles["stop"] = trio.lowlevel.current_trio_token(), stop
        await hypercorn_trio.serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_until(lambda: _accepts(port) or errors, 10, "hypercorn to listen")
    assert not errors, errors
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        trio.from_thread.run_sync(handles["stop"].set, trio_token=handles["token"])
        thread.join(15)
        assert not thread.is_alive(), "hypercorn did not shut down"
        assert not errors, errors


def test_the_gateway_under_hypercorn_on_trio(installed: str, conn: psycopg.Connection[Any]) -> None:
    first = pgherald.publish(conn, "orders", {"n": 0})  # before any client: resumed from
    app = create_app(installed, jwt_secret=SECRET, durable_channels=["orders"])
    with hypercorn_on_trio(app) as base:
        with httpx.Client(timeout=5) as http:
            assert http.get(f"{base}/healthz").json() == {"database": True, "listener": True}
        with sse(base, "orders", "chat", tok=token(["orders", "chat"])) as s:
            s.ready()
            # A durable publish over HTTP, a plain NOTIFY from the database.
            with httpx.Client(timeout=5) as http:
                r = http.post(
                    f"{base}/publish/orders",
                    json={"n": 1},
                    headers={"Authorization": "Bearer " + token(["orders"], "w")},
                )
            assert r.status_code == 200, r.text
            event_id = r.json()["id"]
            pgherald.notify(conn, "chat", "hi")
            got = [s.next(within=5), s.next(within=5)]
        by_channel = {e["event"]: e for e in got if e is not None}
        assert json.loads(by_channel["orders"]["data"]) == {"n": 1}
        assert by_channel["orders"]["id"] == str(event_id)
        assert by_channel["chat"]["data"] == "hi"

        url = base.replace("http", "ws") + "/ws?token=" + token(["orders", "chat"], "rw")
        with ws_connect(url) as ws:
            # A resume over WebSocket: the event published above, from the log, then live.
            ws.send(json.dumps({"type": "subscribe", "channels": ["orders"], "after": first}))
            assert json.loads(ws.recv(5)) == {"type": "subscribed", "channels": ["orders"]}
            replayed = json.loads(ws.recv(5))
            assert (replayed["id"], replayed["payload"]) == (event_id, {"n": 1})
            ws.send(json.dumps({"type": "publish", "channel": "orders", "payload": {"n": 2}}))
            replies = [json.loads(ws.recv(5)) for _ in range(2)]
            published = next(m for m in replies if m["type"] == "published")
            live = next(m for m in replies if m["type"] == "event")
            assert (live["id"], live["payload"]) == (published["id"], {"n": 2})
    # The lifespan ran its shutdown on trio: the gateway's sessions are gone.
    wait_until(
        lambda: (
            not conn.execute(
                "SELECT 1 FROM pg_stat_activity WHERE application_name LIKE 'pgherald-gateway%%'"
            ).fetchall()
        ),
        5,
        "the gateway's sessions to end",
    )
