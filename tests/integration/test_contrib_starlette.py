"""pgherald.contrib.starlette: runners that live with an app, the request's publisher, the
gateway beside an app. Real server; the lifespan helper on asyncio and trio."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

import anyio
import httpx
import psycopg
import pytest
import uvicorn
from fastapi import FastAPI, HTTPException
from starlette.applications import Starlette
from starlette.routing import Mount

import pgherald
from pgherald.contrib.gateway import create_app, direct
from pgherald.contrib.starlette import Publisher, request_publisher, running, with_gateway
from tests.fix_durable import FAST
from tests.fix_faults import await_until, free_port

# -- running() --


@pytest.mark.anyio
async def test_runs_listener_and_consumer_and_stops_them(
    installed: str, conn: psycopg.Connection[Any], anyio_backend: str
) -> None:
    listener = pgherald.AsyncListener(installed, channels=["live"])
    consumer = pgherald.AsyncConsumer(installed, group="g", channels=["log"], **FAST)
    heard, consumed = anyio.Event(), anyio.Event()
    listener.on("live")(lambda n: heard.set())
    consumer.on("log")(lambda e: consumed.set())
    async with running(listener, consumer) as state:
        assert listener.connected  # connected before the app serves
        assert consumer.connected
        assert state.healthy
        pgherald.notify(conn, "live", "x")
        pgherald.publish(conn, "log", {"n": 1})
        with anyio.fail_after(5):
            await heard.wait()
            await consumed.wait()
    assert not listener.connected
    assert not consumer.connected
    assert not state.healthy
    assert state.failures == []
    assert listener.stats.received == 1
    assert consumer.stats.received == 1


@pytest.mark.anyio
async def test_startup_fails_when_the_database_cannot_be_reached(anyio_backend: str) -> None:
    port = free_port()  # a port nobody listens on
    listener = pgherald.AsyncListener(
        f"host=127.0.0.1 port={port} user=postgres connect_timeout=2", channels=["c"]
    )
    listener.on("c")(lambda n: None)
    entered = False
    with pytest.raises(pgherald.ConnectError), anyio.fail_after(10):
        async with running(listener):
            entered = True
    assert not entered


@pytest.mark.anyio
async def test_a_runner_that_fails_is_reported_and_raised_at_shutdown(
    dsn: str, anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    good = pgherald.AsyncListener(dsn, channels=["a"])
    good.on("a")(lambda n: None)
    bad = pgherald.AsyncListener(dsn, channels=["b"])  # no handler: run() refuses
    seen: list[object] = []

    async def serve() -> None:
        async with running(good, bad) as state:
            with anyio.fail_after(5):
                while not state.failures:  # noqa: ASYNC110 - its state, polled within a deadline
                    await anyio.sleep(0.01)
            seen.extend([state.healthy, state.failures[0][0], good.connected])

    with pytest.raises(pgherald.UsageError, match=r"run\(\) needs handlers"):
        await serve()
    assert seen == [False, bad, True]  # unhealthy; the other one went on
    assert any(
        r.name == "pgherald.contrib.starlette" and r.levelno == logging.ERROR
        for r in caplog.records
    )
    assert not good.connected


@pytest.mark.anyio
async def test_a_handler_that_does_not_return_is_cancelled_after_the_deadline(
    dsn: str, conn: psycopg.Connection[Any], anyio_backend: str
) -> None:
    listener = pgherald.AsyncListener(dsn, channels=["c"])
    in_handler = anyio.Event()

    @listener.on("c")
    async def stuck(n: pgherald.Notification) -> None:
        in_handler.set()
        await anyio.sleep_forever()

    async def serve() -> None:
        async with running(listener, stop_timeout=0.3):
            pgherald.notify(conn, "c", "x")
            await in_handler.wait()

    with (
        anyio.fail_after(10),
        pytest.raises(pgherald.HeraldError, match=r"did not stop within 0\.3 s"),
    ):
        await serve()
    assert not listener.connected


@pytest.mark.anyio
async def test_runs_a_scheduler_with_the_app(
    installed: str, conn: psycopg.Connection[Any], anyio_backend: str
) -> None:
    scheduler = pgherald.AsyncScheduler(installed, max_wait=0.1)
    async with running(scheduler) as state:
        pgherald.publish(conn, "later", {"n": 1}, deliver_after=timedelta(seconds=0.1))
        await await_until(lambda: scheduler.released >= 1, 5, "the delayed event released")
        assert state.healthy
    assert scheduler.backend_pid is None  # stopped, its connection closed
    assert state.failures == []
    async with running(scheduler):  # the same one again (an app's second lifespan, in tests)
        pgherald.publish(conn, "later", {"n": 2}, deliver_after=timedelta(seconds=0.1))
        await await_until(lambda: scheduler.released >= 2, 5, "the delayed event released")


@pytest.mark.anyio
async def test_startup_fails_when_a_scheduler_finds_no_schema(dsn: str, anyio_backend: str) -> None:
    entered = False
    with pytest.raises(pgherald.SchemaMissing, match="pgherald install"), anyio.fail_after(10):
        async with running(pgherald.AsyncScheduler(dsn)):
            entered = True
    assert not entered


@pytest.mark.anyio
async def test_refuses_bad_arguments(dsn: str, anyio_backend: str) -> None:
    with pytest.raises(pgherald.UsageError, match="at least one"):
        async with running():
            pass
    with pytest.raises(pgherald.UsageError, match="blocking Listener"):
        async with running(pgherald.Listener(dsn)):  # type: ignore[arg-type]
            pass
    with pytest.raises(pgherald.UsageError, match="stop_timeout"):
        async with running(pgherald.AsyncListener(dsn), stop_timeout=0):
            pass


# -- request_publisher --


def _orders_app(dsn: str) -> FastAPI:
    async def get_conn() -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        async with await psycopg.AsyncConnection.connect(dsn) as c:
            yield c

    app = FastAPI()

    herald_dependency = request_publisher(get_conn)

    @app.post("/orders/{item}")
    async def create(item: str, herald: Publisher = herald_dependency) -> dict[str, int]:
        await herald.connection.execute("INSERT INTO orders (item) VALUES (%s)", (item,))
        await herald.notify("orders", item)
        event_id = await herald.publish("log", {"item": item}, key=item)
        if item == "refused":
            raise HTTPException(409, "no")
        return {"id": event_id}

    return app


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # psycopg's AsyncConnection: asyncio
async def test_request_publisher_commits_before_the_response(
    installed: str, conn: psycopg.Connection[Any]
) -> None:
    conn.execute("CREATE TABLE orders (item text)")
    seen_at_response: list[int] = []
    app = _orders_app(installed)

    async def spy(scope: Any, receive: Any, send: Any) -> None:
        async def spying_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                with psycopg.connect(installed) as other:  # what another session sees now
                    row = other.execute("SELECT count(*) FROM orders").fetchone()
                    seen_at_response.append(row[0] if row else -1)
            await send(message)

        await app(scope, receive, spying_send)

    async with pgherald.AsyncListener(installed, channels=["orders"]) as listener:
        transport = httpx.ASGITransport(app=spy)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.post("/orders/scone")).status_code == 200
            assert (await client.post("/orders/refused")).status_code == 409
            assert (await client.post("/orders/jam")).status_code == 200
        got = []
        with anyio.fail_after(5):
            async for n in listener:
                got.append(n.payload)
                if len(got) == 2:
                    break
    assert seen_at_response == [1, 1, 2]  # committed before each response started
    assert got == ["scone", "jam"]  # the refused order's notification was rolled back
    # (the table, not read_log: that waits for older transactions anywhere on the server)
    stored = conn.execute("SELECT payload FROM pgherald.events_v1 ORDER BY id").fetchall()
    assert stored == [({"item": "scone"},), ({"item": "jam"},)]


# -- with_gateway --


@contextlib.contextmanager
def _serve(app: Any) -> Iterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
        assert not thread.is_alive(), "the server did not shut down"


def _count_direct_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    count = [0]
    for cls in (direct.DirectBody, direct.DirectWebSocket):
        write = cls.write

        def counted(obj: Any, data: bytes, write: Any = write) -> bool:
            done: bool = write(obj, data)
            count[0] += done
            return done

        monkeypatch.setattr(cls, "write", counted)
    return count


def _outer_app(gateway: Starlette, *, mount: bool) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with gateway.router.lifespan_context(gateway):
            yield

    async def hello(request: Any) -> Any:
        from starlette.responses import PlainTextResponse

        return PlainTextResponse("hello")

    from starlette.routing import Route

    routes: list[Any] = [Route("/hello", hello)]
    if mount:
        routes.append(Mount("/events", gateway))
    return Starlette(routes=routes, lifespan=lifespan)


@pytest.mark.parametrize("how", ["with_gateway", "mount"])
def test_with_gateway_keeps_the_direct_writes(
    dsn: str, conn: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    count = _count_direct_writes(monkeypatch)
    gateway = create_app(dsn, allow_anonymous=["feed"])
    outer = _outer_app(gateway, mount=how == "mount")
    asgi = with_gateway(outer, gateway, "/events") if how == "with_gateway" else outer
    with (
        _serve(asgi) as base,
        httpx.Client(base_url=base, timeout=5) as client,
    ):
        assert client.get("/hello").text == "hello"  # the app's own routes
        assert client.get("/events/healthz").json() == {"database": True, "listener": True}
        with client.stream("GET", "/events/sse", params={"channel": "feed"}) as resp:
            lines = resp.iter_lines()
            assert next(line for line in lines if line.startswith(":")) == ": ready"
            for i in range(3):
                pgherald.notify(conn, "feed", str(i))
            got = []
            for line in lines:
                if line.startswith("data:"):
                    got.append(line)
                    if len(got) == 3:
                        break
        assert got == ["data: 0", "data: 1", "data: 2"]
    if how == "with_gateway":
        assert count[0] >= 1  # straight to the socket
    else:
        assert count[0] == 0  # Mount: the outer app's middleware wraps send


def test_with_gateway_refuses_a_bad_prefix() -> None:
    with pytest.raises(pgherald.UsageError, match="prefix"):
        with_gateway(Starlette(), Starlette(), "/events/")
