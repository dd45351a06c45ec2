# pyright: strict
"""
Documented calls, as users write them: `mypy --strict` and `pyright --strict` must pass.

Checked by tests/typing/check.py (run by `scripts/dev.py test`); never executed.
"""

from __future__ import annotations

import psycopg
import sqlalchemy
from sqlalchemy.ext.asyncio import create_async_engine

import pgherald


def on_gap(gap: pgherald.Gap) -> None:
    print(gap.reason)


def listener(dsn: str) -> None:
    with pgherald.Listener(dsn, channels=["orders"], on_gap=on_gap) as listener:

        @listener.on("orders")
        def order(n: pgherald.Notification) -> None:
            print(n.channel, n.payload, n.json())

        listener.run()


def listener_on_lent_connection(dsn: str) -> None:
    with (
        psycopg.connect(dsn, autocommit=True) as conn,
        pgherald.Listener(conn, channels=["orders"], health_check_interval=5.0) as listener,
    ):
        for n in listener.notifications(timeout=1.0):
            print(n.payload)


def listener_on_sqlalchemy(url: str) -> None:
    engine = sqlalchemy.create_engine(url)
    with pgherald.Listener(engine, channels=["orders"], reconnect_max_attempts=5) as listener:
        for n in listener:
            print(n.payload)
    with engine.connect() as connection, pgherald.Listener(connection) as listener:
        listener.subscribe("more")
    pgherald.Listener("postgresql+psycopg2://app@db/shop", application_name="worker")
    pgherald.Listener()  # $PGHERALD_DSN


async def async_listener(dsn: str) -> None:
    async with pgherald.AsyncListener(dsn, channels=["orders"], on_gap=on_gap) as listener:

        @listener.on("orders")
        async def order(n: pgherald.Notification) -> None:
            print(n.payload)

        @listener.on()
        def every(n: pgherald.Notification) -> None:
            print(n.channel)

        await listener.run()
    async with pgherald.AsyncListener(create_async_engine("postgresql+asyncpg://app@db/shop")):
        pass
    async with (
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn,
        pgherald.AsyncListener(aconn, channels=["orders"]) as lent,
    ):
        async for n in lent:
            print(n.payload)


def notify_and_publish(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        pgherald.notify(conn, "orders", {"id": 1})
        pgherald.notify(conn, "orders", "plain text")
        event_id: int = pgherald.publish(conn, "orders", {"id": 1}, key="order-1")
        print(event_id)
        ids: list[int] = pgherald.publish_many(
            conn,
            "orders",
            [{"id": 1}, {"id": 2}, {"id": 3}],
            key=["customer-7", None, "customer-7"],
        )
        ids += pgherald.publish_many(conn, "orders", ({"id": i} for i in range(3)), key="order-1")
        ids += pgherald.publish_many(conn, "orders", [], headers={"v": 1})
        print(ids)


async def anotify_and_apublish(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn) as aconn:
        await pgherald.anotify(aconn, "orders", {"id": 1})
        event_id: int = await pgherald.apublish(aconn, "orders", {"id": 1}, headers={"v": 1})
        print(event_id)
        ids: list[int] = await pgherald.apublish_many(aconn, "orders", [{"id": 1}, {"id": 2}])
        print(ids)


def consumer(dsn: str) -> None:
    with pgherald.Consumer(dsn, group="billing", channels=["orders"], batch_size=100) as c:

        @c.on("orders")
        def handle(event: pgherald.Event) -> None:
            print(event.id, event.payload)

        c.run()


async def async_consumer(dsn: str) -> None:
    async with pgherald.AsyncConsumer(
        dsn, group="billing", channels=["orders"], max_attempts=5
    ) as c:

        @c.on("orders")
        async def handle(event: pgherald.Event) -> None:
            print(event.id, event.payload)

        await c.run()


def typed_payloads_metrics_tracing(dsn: str) -> None:
    import dataclasses

    import pgherald.metrics
    import pgherald.tracing

    @dataclasses.dataclass
    class Order:
        id: int
        state: str

    def refused(exc: Exception, n: pgherald.Notification) -> None:
        print(n.channel, exc)

    pgherald.tracing.instrument()
    with pgherald.Listener(dsn, on_error=refused) as listener:
        pgherald.metrics.register(listener, name="orders", port=9108)

        @listener.on("orders", model=Order)
        def paid(order: Order) -> None:
            print(order.id, order.state)

        listener.run()
    with pgherald.Consumer(dsn, group="billing") as c:

        @c.on("orders", model=Order)
        def bill(order: Order) -> None:
            print(order.id)

        c.run()
    order: Order = pgherald.parse_payload(Order, '{"id": 1, "state": "paid"}')
    print(order.state)
