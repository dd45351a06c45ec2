"""Typed payloads (``model=``) on listeners and consumers, through a real server."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import msgspec
import psycopg
import pydantic
import pytest

import pgherald
import pgherald._typed
from tests.fix_durable import FAST, acknowledged, wait_until


class Order(pydantic.BaseModel):
    id: int
    state: str


@dataclasses.dataclass
class Point:
    x: int
    y: int


def notify_all(dsn: str, items: list[tuple[str, Any]]) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        for channel, payload in items:
            pgherald.notify(c, channel, payload)


def publish_all(dsn: str, items: list[tuple[str, Any]]) -> list[int]:
    with psycopg.connect(dsn, autocommit=True) as c:
        return [pgherald.publish(c, channel, payload) for channel, payload in items]


# -- listeners --


def test_listener_model_validates_and_refuses_to_on_error(dsn: str) -> None:
    got: list[Any] = []
    errors: list[tuple[Exception, pgherald.Notification]] = []
    with pgherald.Listener(dsn, on_error=lambda exc, n: errors.append((exc, n))) as listener:

        @listener.on("orders", model=Order)
        def paid(order: Order) -> None:
            got.append(order)

        @listener.on("points", model=Point)
        def point(p: Point) -> None:
            got.append(p)

        @listener.on("plain")
        def plain(n: pgherald.Notification) -> None:  # no model: the Notification, as ever
            got.append(n)
            listener.stop()

        notify_all(
            dsn,
            [
                ("orders", {"id": 1, "state": "paid"}),
                ("orders", {"id": "not a number", "state": "paid"}),  # wrong type
                ("orders", "not json at all"),
                ("points", {"x": 1, "y": 2}),
                ("points", {"x": 1}),  # a field missing
                ("plain", "end"),
            ],
        )
        with_timeout(listener.run)

    assert got[:2] == [Order(id=1, state="paid"), Point(x=1, y=2)]
    assert isinstance(got[2], pgherald.Notification)
    assert got[2].payload == "end"
    assert len(got) == 3, "an invalid payload reached a handler"
    assert [n.channel for _, n in errors] == ["orders", "orders", "points"]
    assert all(isinstance(exc, pgherald.PayloadInvalid) for exc, _ in errors)
    assert "as Order" in str(errors[0][0])
    assert "'orders'" in str(errors[0][0])
    assert errors[1][1].payload == "not json at all"
    assert listener.stats.invalid_payloads == 3
    assert listener.stats.handler_errors == 3


def test_listener_on_error_gets_handler_exceptions_and_must_be_plain(dsn: str) -> None:
    errors: list[Exception] = []
    with pgherald.Listener(dsn, on_error=lambda exc, n: errors.append(exc)) as listener:

        @listener.on("a", model=Order)
        def broken(order: Order) -> None:
            listener.stop()
            raise RuntimeError(f"bug on {order.id}")

        notify_all(dsn, [("a", {"id": 7, "state": "new"})])
        with_timeout(listener.run)
    assert [str(e) for e in errors] == ["bug on 7"]
    assert listener.stats.invalid_payloads == 0

    async def hook(exc: Exception, n: pgherald.Notification) -> None: ...

    with pytest.raises(pgherald.UsageError, match="on_error must be a plain function"):
        pgherald.AsyncListener(dsn, on_error=hook)


def test_remove_typed_handler(dsn: str) -> None:
    with pgherald.Listener(dsn) as listener:

        def h(order: Order) -> None: ...

        listener.add_handler("orders", h, model=Order)
        assert listener._handlers
        listener.remove_handler("orders", h)
        assert not listener._handlers
        with pytest.raises(pgherald.UsageError, match="not a model"):
            listener.add_handler("orders", h, model=object())
        assert not listener._handlers
    consumer = pgherald.Consumer(dsn, group="g")
    with pytest.raises(pgherald.UsageError, match="not a model"):
        consumer.on("orders", model=object())(h)
    assert consumer.channels == frozenset()  # nothing registered


@pytest.mark.anyio
async def test_async_listener_model_async_and_sync_handlers(dsn: str) -> None:
    got: list[Any] = []
    errors: list[Exception] = []
    async with pgherald.AsyncListener(dsn, on_error=lambda e, n: errors.append(e)) as listener:

        @listener.on("orders", model=Order)
        async def paid(order: Order) -> None:
            await anyio.lowlevel.checkpoint()
            got.append(("async", order.id))

        @listener.on("orders", model=Order)
        def also(order: Order) -> None:
            got.append(("sync", order.id))
            if order.id == 2:
                listener.stop()

        await listener.subscribe("orders")
        await anyio.to_thread.run_sync(
            notify_all,
            dsn,
            [
                ("orders", {"id": 1, "state": "x"}),
                ("orders", {"id": []}),
                ("orders", {"id": 2, "state": "y"}),
            ],
        )
        with anyio.fail_after(10):
            await listener.run()
    assert got == [("async", 1), ("sync", 1), ("async", 2), ("sync", 2)]
    assert len(errors) == 2
    assert all(isinstance(e, pgherald.PayloadInvalid) for e in errors)
    assert listener.stats.invalid_payloads == 2


# -- consumers --


def test_consumer_model_dead_letters_invalid_at_once(
    installed: str, conn: psycopg.Connection
) -> None:
    ids = publish_all(
        installed,
        [
            ("orders", {"id": 1, "state": "paid"}),
            ("orders", {"id": "x", "state": "paid"}),
            ("orders", {"id": 3, "state": "shipped"}),
        ],
    )
    got: list[Order] = []
    # A retry would sleep retry_delay (30 s) first: the test's timeout proves there is none.
    consumer = pgherald.Consumer(
        installed, group="g", max_attempts=5, retry_delay=30.0, retry_max_delay=30.0, **FAST
    )

    @consumer.on("orders", model=Order)
    def handle(order: Order) -> None:
        got.append(order)
        if order.id == 3:
            consumer.stop()

    with consumer:
        with_timeout(consumer.run, 10)
    assert [o.id for o in got] == [1, 3]
    assert all(isinstance(o, Order) for o in got)
    (dead,) = pgherald.dead_letters(conn, "g")
    assert dead.event_id == ids[1]
    assert dead.attempts == 1
    assert "PayloadInvalid" in dead.error
    assert "does not validate as Order" in dead.error
    assert consumer.stats.invalid_payloads == 1
    assert acknowledged(conn, "g") >= set(ids)


def test_consumer_wide_model_types_handlers_without_their_own(
    installed: str, conn: psycopg.Connection
) -> None:
    """`Consumer(..., model=)`: the model of every handler registered without one."""
    publish_all(installed, [("orders", {"id": 1, "state": "paid"}), ("points", {"x": 1, "y": 2})])
    got: list[Any] = []
    consumer = pgherald.Consumer(installed, group="g", model=Order, **FAST)

    @consumer.on("orders")
    def order(o: Order) -> None:
        got.append(o)

    @consumer.on("points", model=Point)  # its own model wins
    def point(p: Point) -> None:
        got.append(p)
        consumer.stop()

    with consumer:
        with_timeout(consumer.run, 10)
    assert got == [Order(id=1, state="paid"), Point(1, 2)]
    with pytest.raises(pgherald.UsageError, match="model"):
        pgherald.Consumer(installed, group="g", model=42)
    iterated = pgherald.Consumer(installed, group="h", model=Order, **FAST)
    with iterated, pytest.raises(pgherald.UsageError, match="parse_payload"):
        next(iter(iterated))


def test_transactional_consumer_with_model(installed: str, conn: psycopg.Connection) -> None:
    conn.execute("CREATE TABLE seen (id int PRIMARY KEY)")
    conn.commit()
    ids = publish_all(installed, [("orders", {"id": 1, "state": "a"}), ("orders", {"id": 2})])
    consumer = pgherald.Consumer(installed, group="tx", **FAST)

    @consumer.on("orders", transactional=True, model=Order)
    def handle(order: Order, c: psycopg.Connection) -> None:
        c.execute("INSERT INTO seen VALUES (%s)", (order.id,))

    with consumer:
        thread = threading.Thread(target=consumer.run)
        thread.start()
        try:
            wait_until(lambda: pgherald.dead_letters(conn, "tx"), 10, "the dead letter")
            wait_until(lambda: set(ids) <= acknowledged(conn, "tx"), 10, "acknowledgements")
        finally:
            consumer.stop()
            thread.join(10)
    assert [r[0] for r in conn.execute("SELECT id FROM seen")] == [1]
    (dead,) = pgherald.dead_letters(conn, "tx")
    assert dead.event_id == ids[1]
    assert dead.attempts == 1


@pytest.mark.anyio
async def test_async_consumer_model(installed: str, conn: psycopg.Connection) -> None:
    await anyio.to_thread.run_sync(
        publish_all, installed, [("p", {"x": 1, "y": 2}), ("p", [1, 2]), ("p", {"x": 3, "y": 4})]
    )
    got: list[Point] = []
    async with pgherald.AsyncConsumer(installed, group="ag", **FAST) as consumer:

        @consumer.on("p", model=Point)
        async def handle(p: Point) -> None:
            got.append(p)
            if p.x == 3:
                consumer.stop()

        with anyio.fail_after(10):
            await consumer.run()
    assert got == [Point(1, 2), Point(3, 4)]
    assert consumer.stats.invalid_payloads == 1
    assert len(pgherald.dead_letters(conn, "ag")) == 1


def test_batch_handler_with_model_gets_models_and_dead_letters_invalid_at_once(
    installed: str, conn: psycopg.Connection
) -> None:
    ids = publish_all(
        installed,
        [
            ("orders", {"id": 1, "state": "paid"}),
            ("orders", {"id": 2, "state": "paid"}),
            ("orders", {"id": "x", "state": "paid"}),
            ("orders", {"id": 4, "state": "shipped"}),
        ],
    )
    calls: list[list[Any]] = []
    # One partition: the four events come in one read, in order. A retry would sleep
    # retry_delay (30 s) first: the test's timeout proves there is none.
    consumer = pgherald.Consumer(
        installed,
        group="g",
        model=Order,  # the consumer's model types its batch handler too
        max_attempts=5,
        retry_delay=30.0,
        retry_max_delay=30.0,
        **FAST,
    )

    def handle(orders: list[Any]) -> None:
        calls.append(orders)
        if any(o.id == 4 for o in orders):
            consumer.stop()

    consumer.add_batch_handler(handle, "orders")
    with consumer:
        with_timeout(consumer.run, 10)
    got = [o for call in calls for o in call]
    assert [o.id for o in got] == [1, 2, 4]
    assert all(isinstance(o, Order) for o in got)
    assert [o.id for o in calls[0]] == [1, 2]  # the events before the invalid one, then it failed
    (dead,) = pgherald.dead_letters(conn, "g")
    assert dead.event_id == ids[2]
    assert dead.attempts == 1
    assert "does not validate as Order" in dead.error
    assert consumer.stats.invalid_payloads == 1
    assert acknowledged(conn, "g") >= set(ids)


@pytest.mark.anyio
async def test_async_batch_handler_with_its_own_model(
    installed: str, conn: psycopg.Connection
) -> None:
    await anyio.to_thread.run_sync(
        publish_all, installed, [("p", [1, 2]), ("p", {"x": 1, "y": 2}), ("p", {"x": 3, "y": 4})]
    )
    got: list[Point] = []
    async with pgherald.AsyncConsumer(installed, group="ab", **FAST) as consumer:

        async def handle(points: list[Point]) -> None:
            got.extend(points)
            if any(p.x == 3 for p in points):
                consumer.stop()

        consumer.add_batch_handler(handle, "p", model=Point)
        with anyio.fail_after(10):
            await consumer.run()
    assert got == [Point(1, 2), Point(3, 4)]  # the first, invalid, never reached the handler
    assert consumer.stats.invalid_payloads == 1
    assert len(pgherald.dead_letters(conn, "ab")) == 1
    with pytest.raises(pgherald.UsageError, match="model"):
        pgherald.AsyncConsumer(installed, group="ab2").add_batch_handler(handle, model=42)


# -- the validators --


def test_parse_payload_text_and_values() -> None:
    assert pgherald.parse_payload(Order, '{"id": 1, "state": "a"}') == Order(id=1, state="a")
    assert pgherald.parse_payload(Point, {"x": 1, "y": 2}) == Point(1, 2)
    assert pgherald.parse_payload(list[int], [1, 2]) == [1, 2]
    with pytest.raises(pgherald.PayloadInvalid, match="as Point"):
        pgherald.parse_payload(Point, {"x": "nope", "y": 2})
    with pytest.raises(pgherald.UsageError, match="not a model"):
        pgherald.parse_payload(object(), {})  # type: ignore[arg-type]
    with pytest.raises(pgherald.UsageError, match="not a model"):
        pgherald.parse_payload({}, {})  # type: ignore[arg-type]


@pytest.fixture
def without_pydantic(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    pgherald._typed._parsers.cache_clear()
    monkeypatch.setattr(pgherald._typed, "_optional", lambda name: None)
    yield
    pgherald._typed._parsers.cache_clear()


def test_dataclass_without_pydantic_or_msgspec(without_pydantic: None) -> None:
    assert pgherald.parse_payload(Point, '{"x": 1, "y": 2}') == Point(1, 2)
    assert pgherald.parse_payload(Point, {"x": 1, "y": 2}) == Point(1, 2)
    for bad in ({"x": 1}, {"x": 1, "y": 2, "z": 3}, [1, 2], "[1"):
        with pytest.raises(pgherald.PayloadInvalid):
            pgherald.parse_payload(Point, bad)
    with pytest.raises(pgherald.UsageError, match="pgherald\\[pydantic\\]"):
        pgherald.parse_payload(list[int], [1])


class Tick(msgspec.Struct):
    n: int


def test_msgspec_struct_on_a_listener(dsn: str) -> None:
    got: list[Tick] = []
    errors: list[Exception] = []
    with pgherald.Listener(dsn, on_error=lambda exc, n: errors.append(exc)) as listener:

        @listener.on("ticks", model=Tick)
        def tick(t: Tick) -> None:
            got.append(t)
            if t.n == 2:
                listener.stop()

        notify_all(dsn, [("ticks", {"n": 1}), ("ticks", {"n": "one"}), ("ticks", {"n": 2})])
        with_timeout(listener.run)
    assert got == [Tick(1), Tick(2)]
    assert len(errors) == 1
    assert "as Tick" in str(errors[0])
    assert isinstance(errors[0].__cause__, msgspec.ValidationError)


def test_dataclass_through_msgspec_without_pydantic(monkeypatch: pytest.MonkeyPatch) -> None:
    pgherald._typed._parsers.cache_clear()
    only_msgspec = {"msgspec": msgspec}
    monkeypatch.setattr(pgherald._typed, "_optional", only_msgspec.get)
    try:
        assert pgherald.parse_payload(Point, '{"x": 1, "y": 2}') == Point(1, 2)
        with pytest.raises(pgherald.PayloadInvalid) as info:
            pgherald.parse_payload(Point, {"x": "1", "y": 2})  # types checked, by msgspec
        assert isinstance(info.value.__cause__, msgspec.ValidationError)
        assert pgherald.parse_payload(Tick, {"n": 3}) == Tick(3)
    finally:
        pgherald._typed._parsers.cache_clear()


def with_timeout(run: Any, timeout: float = 10.0) -> None:
    """Run *run* (a listener's or consumer's run) in this thread; fail if it outlives *timeout*."""
    fired: list[bool] = []
    stopper = threading.Timer(timeout, lambda: (fired.append(True), run.__self__.stop()))
    stopper.start()
    try:
        run()
    finally:
        stopper.cancel()
    assert not fired, f"run() did not return within {timeout}s"
