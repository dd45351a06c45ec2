"""
A FastAPI app with pgherald: a listener and a consumer that live with the app, endpoints that
notify and publish inside their own transaction, and the real-time gateway served beside it.

- ``lifespan`` runs an `AsyncListener` (live notifications) and an `AsyncConsumer` (the
  durable log) with `pgherald.contrib.starlette.running`: they connect at startup (a database
  that cannot be reached fails the startup), run while the app serves, and are stopped and
  awaited on shutdown. ``/healthz`` reports them.
- ``POST /orders`` inserts a row, notifies ``orders`` and publishes an ``invoices`` event
  through the request's connection (`request_publisher`): all three commit together, before
  the response is sent; an order refused after the notify (409) sends nothing.
- The gateway (`pgherald.contrib.gateway.create_app`) answers under ``/events`` (a browser
  opens ``/events/sse?channel=orders``). `with_gateway` puts it in front of the FastAPI app
  rather than inside it, so its writes go straight to the socket (see docs/frameworks.md).

Run it: ``python examples/fastapi_app.py`` (``$PGHERALD_DSN`` picks the database). It serves
on a free port, plays a browser and a few API clients against it, then shuts down. To serve
it yourself: ``uvicorn examples.fastapi_app:asgi`` (needs ``pip install fastapi
'pgherald[gateway]'``).
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
import psycopg
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel

import pgherald
from pgherald.contrib.gateway import create_app
from pgherald.contrib.starlette import Publisher, request_publisher, running, with_gateway

DSN = os.environ.get("PGHERALD_DSN", "host=127.0.0.1 user=postgres dbname=postgres")

# -- what the app runs in the background --

listener = pgherald.AsyncListener(DSN, channels=["orders"])
billing = pgherald.AsyncConsumer(DSN, group="billing", channels=["invoices"])
heard: list[dict[str, Any]] = []
billed: list[dict[str, Any]] = []
all_done = asyncio.Event()  # (for the demo below: set once both have seen two orders)


@listener.on("orders")
async def order_placed(n: pgherald.Notification) -> None:
    heard.append(n.json())
    print(f"listener <- order {heard[-1]['id']} ({heard[-1]['item']})")
    if len(heard) == 2 and len(billed) == 2:
        all_done.set()


@billing.on("invoices")
async def bill(event: pgherald.Event) -> None:
    billed.append(event.payload)
    print(f"billing <- invoice for order {event.payload['order']}: {event.payload['amount']}")
    if len(heard) == 2 and len(billed) == 2:
        all_done.set()


gateway = create_app(DSN, allow_anonymous=["orders"])


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    async with (
        gateway.router.lifespan_context(gateway),  # the gateway's own listener
        running(listener, billing, stop_timeout=10) as herald,
    ):
        yield {"herald": herald}
    print("shutdown: listener and consumer stopped")


app = FastAPI(lifespan=lifespan)


# -- the request's connection and transaction --


async def get_conn() -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """One connection per request (in a real app: ``async with pool.connection() as conn``)."""
    async with await psycopg.AsyncConnection.connect(DSN) as conn:
        yield conn


Herald = Annotated[Publisher, request_publisher(get_conn)]


class Order(BaseModel):
    item: str
    quantity: int


@app.post("/orders", status_code=201)
async def create_order(order: Order, herald: Herald) -> dict[str, int]:
    cur = await herald.connection.execute(
        "INSERT INTO orders (item, quantity) VALUES (%s, %s) RETURNING id",
        (order.item, order.quantity),
    )
    row = await cur.fetchone()
    assert row is not None
    await herald.notify("orders", {"id": row[0], "item": order.item})  # live: browsers, listener
    await herald.publish(
        "invoices", {"order": row[0], "amount": 3 * order.quantity}, key=str(row[0])
    )
    if order.quantity > 10:
        # After the notify and the publish: the rollback takes them with the row.
        raise HTTPException(409, f"only 10 {order.item}s in stock")
    return {"id": row[0]}


@app.get("/healthz")
async def healthz(request: Request) -> dict[str, bool]:
    herald = request.state.herald
    if not herald.healthy:
        raise HTTPException(503, "a listener or consumer stopped")
    return {"ok": True}


asgi = with_gateway(app, gateway, "/events")  # what the server runs


# -- the demo: serve, play the clients, shut down --


async def browser(base: str, ready: asyncio.Event, expect: int) -> None:
    """An EventSource on /events/sse: prints the orders it is pushed."""
    async with (
        httpx.AsyncClient(timeout=10) as client,
        client.stream("GET", f"{base}/events/sse", params={"channel": "orders"}) as stream,
    ):
        got = 0
        async for line in stream.aiter_lines():
            if line == ": ready":
                ready.set()  # the gateway listens: what is committed from now on reaches us
            elif line.startswith("data: "):
                print(f"browser <- {line[6:]}")
                got += 1
                if got == expect:
                    return


async def play_clients(base: str) -> None:
    print(f"serving on {base}")
    ready = asyncio.Event()
    watching = asyncio.create_task(browser(base, ready, expect=2))
    await ready.wait()
    async with httpx.AsyncClient(base_url=base) as client:
        for item, quantity in [("scone", 2), ("teapot", 40), ("jam", 1)]:
            r = await client.post("/orders", json={"item": item, "quantity": quantity})
            print(f"POST /orders {item} x{quantity} -> {r.status_code} {r.json()}")
        print(f"GET /healthz -> {(await client.get('/healthz')).status_code}")
    await watching
    await all_done.wait()


async def main() -> int:
    with psycopg.connect(DSN, autocommit=True) as conn:
        pgherald.install(conn)  # the durable log (idempotent)
        conn.execute("DROP TABLE IF EXISTS orders")
        conn.execute("CREATE TABLE orders (id serial PRIMARY KEY, item text, quantity int)")

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)  # connections wait in the backlog until the server accepts them
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(asgi, log_level="warning"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await asyncio.wait_for(play_clients(base), 20)  # a safety net for the example
    finally:
        server.should_exit = True
        await serving
        sock.close()
    items = [o["item"] for o in heard]
    print(f"heard {items}, billed {[b['order'] for b in billed]}; 'teapot' was never sent")
    return 0 if items == ["scone", "jam"] and len(billed) == 2 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
