"""
The gateway (`create_app`) on trio under real faults of its database connections, and on
asyncio and trio across a real restart of its PostgreSQL server.

docs/gateway.md says the gateway runs on asyncio and trio alike, but every test that puts it
through faults serves it with uvicorn, which is asyncio. These run the app on the test's own
event loop, as an ASGI server would (its lifespan, then HTTP requests, SSE streams and
WebSockets as ASGI messages; no HTTP server: uvicorn runs asyncio only), while its three
database connections (the listener, ``pgherald-gateway-db``, ``pgherald-gateway-tail``) are
severed, frozen or refused by a `FaultProxy`, or lose their server to a restart. What the docs
promise must hold:

- a durable client, streaming or resuming with ``Last-Event-ID`` / ``after``, gets every event
  once, in log order, no gap, no duplicate;
- while the database is unreachable a resume or a publish is answered 503 / "the database is
  not available" (nothing stored), and ``/healthz`` is a 503, then a 200 once it is back,
  without a restart;
- a live client of a plain channel gets a ``gap`` with reason ``reconnect`` once the listener
  listens again, then every event sent after it.

The durable tests run on a server of this module's own (tests/fix_quiet.py): another test's
open transaction on the shared server would hold the log's events back. The restart tests run
on a server of their own (tests/fix_server.py): never the machine's.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import anyio
import anyio.to_thread
import httpx
import psycopg
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from starlette.applications import Starlette
from starlette.types import Message

import pgherald
from pgherald.contrib.gateway import create_app
from tests.fix_faults import OneWayProxy, await_until
from tests.fix_proxy import _target_of
from tests.fix_quiet import database_dropper, server_dsn  # noqa: F401 (a server of our own)
from tests.fix_server import OwnServer
from tests.integration.test_gateway import SECRET, hub_of, stored, token

UNAVAILABLE = "the database is not available"  # the documented answer while it is away

# The gateway's listener finds a dead connection and reconnects within a second or two (its
# defaults: a health check after 15 s idle, back-off up to 10 s).
FAST: dict[str, Any] = {
    "health_check_interval": 0.5,
    "health_check_timeout": 0.5,
    "reconnect_initial_delay": 0.05,
    "reconnect_max_delay": 0.5,
}

TRIO = pytest.mark.parametrize("anyio_backend", ["trio"])  # uvicorn's tests cover asyncio


def gateway(dsn: str, **options: Any) -> Starlette:
    """A gateway whose listener recovers fast (`FAST`) and whose log tail polls every 0.1 s."""
    return create_app(
        dsn,
        jwt_secret=SECRET,
        poll_interval=0.1,
        queue_check_interval=0,
        listener_options=FAST,
        **options,
    )


def bearer(mode: str = "r") -> dict[str, str]:
    return {"Authorization": f"Bearer {token(['orders', 'chat'], mode)}"}


# -- the app on the test's event loop, as an ASGI server runs it --


def _scope(
    kind: str, path: str, query: list[tuple[str, str]], headers: dict[str, str]
) -> dict[str, Any]:
    return {
        "type": kind,
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http" if kind == "http" else "ws",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": urlencode(query).encode(),
        "headers": [(b"host", b"gateway")]
        + [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("gateway", 80),
        "subprotocols": [],
    }


@contextlib.asynccontextmanager
async def serving(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway's lifespan entered (what a server, or an app it is mounted in, does), and
    a client for its plain requests (httpx's ASGI transport: a response read whole)."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://gateway", timeout=10.0
        ) as http:
            yield http


@contextlib.asynccontextmanager
async def _calling(app: Starlette, scope: Any, receive: Any, send: Any) -> AsyncIterator[None]:
    """*app* called in a task for the block; afterwards it must end by itself within 5 s."""
    done = anyio.Event()

    async def call() -> None:
        try:
            await app(scope, receive, send)
        finally:
            done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        yield
        with anyio.move_on_after(5):
            await done.wait()
        if not done.is_set():
            tg.cancel_scope.cancel()
            raise AssertionError(f"the gateway's {scope['path']} did not end when the client left")


class SseStream:
    """The events of one ``GET /sse`` response, parsed as EventSource does."""

    def __init__(self, messages: MemoryObjectReceiveStream[Message]) -> None:
        self._messages = messages
        self._text = ""
        self.ended = False

    async def _frame(self) -> list[str] | None:
        """The lines of the next frame (up to a blank line), None at the end of the body."""
        while "\n\n" not in self._text:
            if self.ended:
                return None
            message = await self._messages.receive()
            self._text += message.get("body", b"").decode()
            self.ended = not message.get("more_body", False)
        frame, self._text = self._text.split("\n\n", 1)
        return frame.split("\n")

    async def ready(self, within: float = 5.0) -> None:
        """Until ``: ready``: every LISTEN is in effect from here on."""
        with anyio.fail_after(within):
            while (lines := await self._frame()) is not None:
                if ": ready" in lines:
                    return
        raise AssertionError("the stream ended before ': ready'")

    async def next(self, within: float = 5.0) -> dict[str, str] | None:
        """The next event (``event``, ``data``, ``id``), None at the end of the stream."""
        with anyio.fail_after(within):
            while (lines := await self._frame()) is not None:
                event: dict[str, str] = {}
                data: list[str] = []
                for line in lines:
                    if line.startswith(":"):
                        continue  # ": ping", ": ready"
                    field, _, value = line.partition(":")
                    value = value.removeprefix(" ")
                    if field == "data":
                        data.append(value)
                    else:
                        event[field] = value
                if event or data:
                    event["data"] = "\n".join(data)
                    return event
        return None

    async def gap(self, within: float = 10.0) -> dict[str, Any]:
        """The next event, which must be a ``gap``: its fields."""
        event = await self.next(within)
        assert event is not None, "the stream ended"
        assert event.get("event") == "gap", event
        fields: dict[str, Any] = json.loads(event["data"])
        return fields

    async def durable(self, within: float = 5.0) -> tuple[int, Any]:
        """The next event, which must be one of channel ``orders``: (id, payload)."""
        event = await self.next(within)
        assert event is not None, "the stream ended"
        assert event.get("event") == "orders", event
        return int(event["id"]), json.loads(event["data"])


@contextlib.asynccontextmanager
async def sse(
    app: Starlette, *channels: str, headers: dict[str, str] | None = None
) -> AsyncIterator[SseStream]:
    """A ``GET /sse`` stream that must be answered 200; the client hangs up at the end."""
    scope = _scope("http", "/sse", [("channel", c) for c in channels], headers or {})
    sender: MemoryObjectSendStream[Message]
    sender, messages = anyio.create_memory_object_stream[Message](math.inf)
    gone = anyio.Event()
    asked = False

    async def receive() -> Message:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    with sender, messages:
        async with _calling(app, scope, receive, sender.send):
            try:
                with anyio.fail_after(10):
                    start = await messages.receive()
                assert start["type"] == "http.response.start"
                assert start["status"] == 200, await messages.receive()
                yield SseStream(messages)
            finally:
                gone.set()


class Closed(Exception):
    """The gateway closed the WebSocket: ``args`` are (code, reason)."""


class WebSocket:
    """A client's side of a ``/ws`` connection: JSON messages."""

    def __init__(
        self, out: MemoryObjectSendStream[Message], into: MemoryObjectReceiveStream[Message]
    ) -> None:
        self._out = out
        self._in = into

    async def send(self, message: dict[str, Any]) -> None:
        await self._out.send({"type": "websocket.receive", "text": json.dumps(message)})

    async def recv(self, within: float = 5.0) -> dict[str, Any]:
        with anyio.fail_after(within):
            message = await self._in.receive()
        if message["type"] == "websocket.close":
            raise Closed(message.get("code"), message.get("reason"))
        assert message["type"] == "websocket.send", message
        got: dict[str, Any] = json.loads(message["text"])
        return got

    async def durable(self, within: float = 5.0) -> tuple[int, Any]:
        """The next message, which must be an event of channel ``orders``: (id, payload)."""
        message = await self.recv(within)
        assert (message["type"], message["channel"]) == ("event", "orders"), message
        return int(message["id"]), message["payload"]

    async def subscribe(self, *channels: str, after: int | None = None) -> None:
        message: dict[str, Any] = {"type": "subscribe", "channels": list(channels)}
        if after is not None:
            message["after"] = after
        await self.send(message)
        assert await self.recv() == {"type": "subscribed", "channels": list(channels)}


@contextlib.asynccontextmanager
async def websocket(app: Starlette, mode: str = "r") -> AsyncIterator[WebSocket]:
    """An accepted ``/ws`` connection with a token for ``orders`` and ``chat``."""
    query = [("token", token(["orders", "chat"], mode))]
    to_app, app_in = anyio.create_memory_object_stream[Message](math.inf)
    app_out, from_app = anyio.create_memory_object_stream[Message](math.inf)
    scope = _scope("websocket", "/ws", query, {})
    with to_app, app_in, app_out, from_app:
        await to_app.send({"type": "websocket.connect"})
        async with _calling(app, scope, app_in.receive, app_out.send):
            try:
                with anyio.fail_after(10):
                    accepted = await from_app.receive()
                assert accepted["type"] == "websocket.accept", accepted
                yield WebSocket(to_app, from_app)
            finally:
                await to_app.send({"type": "websocket.disconnect", "code": 1000})


# -- helpers --


async def healthz(http: httpx.AsyncClient) -> tuple[int, Any]:
    answer = await http.get("/healthz")
    return answer.status_code, answer.json()


def check_gap(gap: dict[str, Any], faulted_at: float) -> None:
    """A ``reconnect`` gap of channel ``chat`` whose span covers the fault."""
    assert gap["reason"] == "reconnect", gap
    assert gap["channels"] == ["chat"], gap
    # started: when the listener last knew its connection alive (at or before the fault);
    # ended: when it listened again (after it). Rounded to the millisecond.
    assert gap["started"] <= faulted_at + 0.001 <= gap["ended"] + 0.002 <= time.time() + 0.01, (
        gap,
        faulted_at,
    )


# -- 1. trio, its database connections severed, frozen, refused --


@pytest.mark.anyio
@TRIO
@pytest.mark.parametrize("fault", ["sever", "freeze", "refuse"])
async def test_on_trio_live_clients_get_a_reconnect_gap_then_every_event(
    dsn: str, conn: psycopg.Connection[Any], fault: str
) -> None:
    """
    The listener's connection is reset (the kernel says so at once), frozen (half-open: only
    the listener's health check finds it), or cut while new connections are refused (a server
    that is down, then back). SSE and WebSocket clients of a plain channel get a ``reconnect``
    gap once it listens again, then every event sent after it; /healthz follows.
    """
    with OneWayProxy(_target_of(dsn)) as proxy:
        app = gateway(proxy.dsn_for(dsn), allow_anonymous=["chat"])
        hub = hub_of(app)
        async with serving(app) as http, sse(app, "chat") as live, websocket(app) as ws:
            await live.ready()
            await ws.subscribe("chat")
            pgherald.notify(conn, "chat", "before")
            assert (await live.next() or {}).get("data") == "before"
            assert (await ws.recv())["payload"] == "before"
            assert await healthz(http) == (200, {"database": True, "listener": True})
            reconnects = hub.listener.stats.reconnects

            faulted_at = time.time()
            if fault == "sever":
                proxy.sever()
            elif fault == "freeze":
                assert proxy.freeze() >= 1  # (never thawed: only a new connection helps)
            else:
                proxy.refuse()
                proxy.sever()
                await await_until(lambda: not hub.healthy_listener, 5, "the listener to see it")
                # Neither connection can be made: /healthz says so (within its 3 s bound).
                assert await healthz(http) == (503, {"database": False, "listener": False})
                proxy.allow()

            check_gap(await live.gap(), faulted_at)
            ws_gap = await ws.recv(within=10)
            assert ws_gap["type"] == "gap", ws_gap
            check_gap(ws_gap, faulted_at)
            assert hub.listener.stats.reconnects == reconnects + 1
            # The gap comes once it listens again: what is sent from here on is delivered.
            pgherald.notify(conn, "chat", "after")
            assert await live.next() == {"event": "chat", "data": "after"}
            assert (await ws.recv())["payload"] == "after"
            await await_until(lambda: hub.healthy_listener, 5, "the listener to be healthy")
            if fault == "freeze":
                # The gateway-db connection is frozen too: the check gives up on it at its
                # bound (3 s) and drops it; the next check is made on a new connection.
                started = time.monotonic()
                assert await healthz(http) == (503, {"database": False, "listener": True})
                assert time.monotonic() - started < 4
            assert await healthz(http) == (200, {"database": True, "listener": True})


@pytest.mark.anyio
@TRIO
async def test_on_trio_while_the_database_is_unreachable_resume_and_publish_are_503_until_back(
    installed: str, conn: psycopg.Connection[Any]
) -> None:
    """
    Every connection of the gateway cut, and new ones refused: /healthz is a 503, a resume
    (SSE ``Last-Event-ID``, WebSocket ``after``) and a publish (HTTP, WebSocket) are answered
    "the database is not available" and store nothing. Once the database is reachable again,
    without a restart: /healthz 200; the stream that stayed open gets what was published
    meanwhile, once each; resumes get every event after their id, then live ones.
    """
    first = pgherald.publish(conn, "orders", {"n": 1})
    with OneWayProxy(_target_of(installed)) as proxy:
        app = gateway(proxy.dsn_for(installed), durable_channels=["orders"])
        hub = hub_of(app)
        async with (
            serving(app) as http,
            sse(app, "orders", headers=bearer()) as follower,
            websocket(app, "rw") as ws,
        ):
            await follower.ready()
            await ws.subscribe("orders")
            second = pgherald.publish(conn, "orders", {"n": 2})
            assert await follower.durable() == (second, {"n": 2})
            assert await ws.durable() == (second, {"n": 2})

            proxy.refuse()
            proxy.sever()
            await await_until(lambda: not hub.healthy_listener, 5, "the listener to see the cut")
            assert await healthz(http) == (503, {"database": False, "listener": False})
            resume = await http.get(
                "/sse",
                params={"channel": "orders"},
                headers={**bearer(), "Last-Event-ID": str(first)},
            )
            assert (resume.status_code, resume.json()) == (503, {"error": UNAVAILABLE})
            refused = await http.post(
                "/publish/orders", json={"n": "refused"}, headers=bearer("rw")
            )
            assert (refused.status_code, refused.json()) == (503, {"error": UNAVAILABLE})
            await ws.send({"type": "subscribe", "channels": ["orders"], "after": first})
            assert await ws.recv() == {"type": "error", "message": f"{UNAVAILABLE}; try again"}
            await ws.send({"type": "publish", "channel": "orders", "payload": {"n": "refused"}})
            assert await ws.recv() == {"type": "error", "message": UNAVAILABLE}
            meanwhile = [pgherald.publish(conn, "orders", {"n": n}) for n in (3, 4)]

            proxy.allow()
            await await_until(lambda: hub.healthy_listener, 10, "the listener to reconnect")
            assert await healthz(http) == (200, {"database": True, "listener": True})
            published = await http.post("/publish/orders", json={"n": 5}, headers=bearer("rw"))
            assert published.status_code == 200, published.text
            fifth = published.json()["id"]
            expected = [(meanwhile[0], {"n": 3}), (meanwhile[1], {"n": 4}), (fifth, {"n": 5})]
            assert [await follower.durable(10) for _ in expected] == expected
            assert [await ws.durable(10) for _ in expected] == expected
            # Resumes after the first event: from the log, then live, each event once.
            async with (
                sse(app, "orders", headers={**bearer(), "Last-Event-ID": str(first)}) as again,
                websocket(app) as ws_again,
            ):
                await again.ready()
                await ws_again.subscribe("orders", after=first)
                since_first = [(second, {"n": 2}), *expected]
                assert [await again.durable() for _ in since_first] == since_first
                assert [await ws_again.durable() for _ in since_first] == since_first
                last = pgherald.publish(conn, "orders", {"n": 6})
                for client in (follower, ws, again, ws_again):
                    assert await client.durable() == (last, {"n": 6})
    assert stored(conn, {"n": "refused"}) == 0  # a 503 is "nothing was stored"


@pytest.mark.anyio
@TRIO
@pytest.mark.parametrize("fault", ["sever", "freeze"])
async def test_on_trio_durable_streams_through_a_severed_or_frozen_path_get_every_event_once(
    installed: str, conn: psycopg.Connection[Any], fault: str
) -> None:
    """
    The gateway's connections are reset, or frozen (a network stall) while a publish through
    the gateway is on its way, then thawed. Streaming clients get every event once, in log
    order, those published meanwhile included; a resume does too; a publish stores its event
    once (a 503 after a reset stored nothing and may be sent again).
    """
    first = pgherald.publish(conn, "orders", {"n": 1})
    with OneWayProxy(_target_of(installed)) as proxy:
        app = gateway(proxy.dsn_for(installed), durable_channels=["orders"])
        async with (
            serving(app) as http,
            sse(app, "orders", headers={**bearer(), "Last-Event-ID": str(first)}) as follower,
            websocket(app) as ws,
        ):
            await follower.ready()
            await ws.subscribe("orders", after=first)
            second = pgherald.publish(conn, "orders", {"n": 2})
            assert await follower.durable() == (second, {"n": 2})
            assert await ws.durable() == (second, {"n": 2})

            if fault == "sever":
                proxy.sever()
                meanwhile = [pgherald.publish(conn, "orders", {"n": n}) for n in (3, 4)]
                # The first call on a connection found broken may fail (it is reopened on the
                # next): "the database is not available", nothing stored, publish again.
                for _ in range(2):
                    answer = await http.post("/publish/orders", json={"n": 5}, headers=bearer("rw"))
                    if answer.status_code != 503:
                        break
                    assert answer.json() == {"error": UNAVAILABLE}
            else:
                assert proxy.freeze() >= 3  # the listener, gateway-db, gateway-tail
                meanwhile = [pgherald.publish(conn, "orders", {"n": n}) for n in (3, 4)]
                body = {"n": 5}
                held = json.dumps(body, separators=(",", ":")).encode()  # as the gateway sends it
                answers: list[httpx.Response] = []
                async with anyio.create_task_group() as tg:

                    async def post() -> None:
                        answers.append(
                            await http.post("/publish/orders", json=body, headers=bearer("rw"))
                        )

                    tg.start_soon(post)
                    # The publish is held in the frozen connection: thawed, it goes through.
                    await await_until(lambda: held in proxy.held(), 5, "the publish to be held")
                    assert not answers
                    proxy.thaw()
                answer = answers[0]
            assert answer.status_code == 200, answer.text
            fifth = answer.json()["id"]
            expected = [(meanwhile[0], {"n": 3}), (meanwhile[1], {"n": 4}), (fifth, {"n": 5})]
            assert [await follower.durable(10) for _ in expected] == expected
            assert [await ws.durable(10) for _ in expected] == expected
            async with sse(
                app, "orders", headers={**bearer(), "Last-Event-ID": str(second)}
            ) as again:
                await again.ready()
                assert [await again.durable() for _ in expected] == expected
                last = pgherald.publish(conn, "orders", {"n": 6})
                for client in (follower, ws, again):
                    assert await client.durable() == (last, {"n": 6})
    assert stored(conn, {"n": 5}) == 1


# -- 2. a real restart of the gateway's PostgreSQL server, on asyncio and trio --


@pytest.mark.anyio
async def test_across_a_server_restart_live_clients_get_a_gap_and_durable_ones_lose_nothing(
    server: OwnServer, anyio_backend: str
) -> None:
    """
    The gateway's server is stopped (``pg_ctl stop -m fast``: every session ended) and started
    again, its data kept. While it is down: /healthz 503, a resume and a publish 503. Once it
    is back, without restarting the gateway: a live client gets a ``reconnect`` gap, then the
    live events; durable clients that stayed connected get what was published since, once
    each; a resume gets every event after its id with no duplicate; publishing works.
    """
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        pgherald.install(conn)
        first = pgherald.publish(conn, "orders", {"n": 1})
    app = gateway(server.dsn, allow_anonymous=["chat"], durable_channels=["orders"])
    hub = hub_of(app)
    async with (
        serving(app) as http,
        sse(app, "chat") as live,
        sse(app, "orders", headers={**bearer(), "Last-Event-ID": str(first)}) as follower,
        websocket(app) as ws,
    ):
        await live.ready()
        await follower.ready()
        await ws.subscribe("orders", after=first)
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            second = pgherald.publish(conn, "orders", {"n": 2})
            pgherald.notify(conn, "chat", "before")
        assert await follower.durable() == (second, {"n": 2})
        assert await ws.durable() == (second, {"n": 2})
        assert (await live.next() or {}).get("data") == "before"

        stopped_at = time.time()
        await anyio.to_thread.run_sync(server.stop)
        await await_until(lambda: not hub.healthy_listener, 5, "the listener to see the stop")
        assert await healthz(http) == (503, {"database": False, "listener": False})
        refused = await http.post("/publish/orders", json={"n": "refused"}, headers=bearer("rw"))
        assert (refused.status_code, refused.json()) == (503, {"error": UNAVAILABLE})
        resume = await http.get(
            "/sse", params={"channel": "orders"}, headers={**bearer(), "Last-Event-ID": str(first)}
        )
        assert (resume.status_code, resume.json()) == (503, {"error": UNAVAILABLE})

        await anyio.to_thread.run_sync(server.start)
        check_gap(await live.gap(), stopped_at)
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            pgherald.notify(conn, "chat", "after")
            third = pgherald.publish(conn, "orders", {"n": 3})
            assert await live.next() == {"event": "chat", "data": "after"}
            assert await healthz(http) == (200, {"database": True, "listener": True})
            published = await http.post("/publish/orders", json={"n": 4}, headers=bearer("rw"))
            assert published.status_code == 200, published.text
            expected = [(third, {"n": 3}), (published.json()["id"], {"n": 4})]
            assert [await follower.durable(10) for _ in expected] == expected
            assert [await ws.durable(10) for _ in expected] == expected
            async with sse(
                app, "orders", headers={**bearer(), "Last-Event-ID": str(first)}
            ) as again:
                await again.ready()
                since_first = [(second, {"n": 2}), *expected]
                assert [await again.durable() for _ in since_first] == since_first
                last = pgherald.publish(conn, "orders", {"n": 5})
                for client in (follower, ws, again):
                    assert await client.durable() == (last, {"n": 5})
            assert stored(conn, {"n": "refused"}) == 0
