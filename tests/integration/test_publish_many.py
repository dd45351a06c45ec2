"""`publish_many` / `apublish_many` against a real server: one statement, ids in order, every driver."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import anyio
import psycopg
import pytest

import pgherald
from tests.fix_db import sqlalchemy_engine
from tests.fix_durable import FAST, drain


def stored(conn: psycopg.Connection) -> list[tuple[Any, ...]]:
    """The log as (id, channel, key, payload, headers), by id (a fresh connection's view)."""
    return conn.execute(
        "SELECT id, channel, key, payload, headers FROM pgherald.events_v1 ORDER BY id"
    ).fetchall()


def consume(dsn: str, n: int, channel: str = "ch") -> list[pgherald.Event]:
    with pgherald.Consumer(dsn, group="g", channels=[channel], **FAST) as c:
        return drain(c, n)


def assert_in_key_order(events: list[pgherald.Event]) -> None:
    """A group's promise: events of one key (one partition) come in publish (id) order."""
    by_partition: dict[Any, list[int]] = defaultdict(list)
    for e in events:
        by_partition[e.key if e.key is not None else ("id", e.id)].append(e.id)
    for ids in by_partition.values():
        assert ids == sorted(ids)


def test_ids_in_payload_order_and_every_event_consumed(
    installed: str, conn: psycopg.Connection
) -> None:
    payloads = [{"n": i, "text": "é" * (i % 5)} for i in range(1000)]
    keys = [None if i % 3 == 0 else f"k{i % 7}" for i in range(1000)]
    ids = pgherald.publish_many(conn, "ch", payloads, key=keys, headers={"src": "batch"})
    pgherald.publish(conn, "other", {"not": "this channel"})
    conn.commit()
    assert len(set(ids)) == 1000
    assert ids == sorted(ids)
    rows = [r for r in stored(conn) if r[1] == "ch"]
    # Ids follow payload order: the i-th id holds the i-th payload with the i-th key.
    assert [(r[0], r[2], r[3], r[4]) for r in rows] == [
        (i, k, p, {"src": "batch"}) for i, k, p in zip(ids, keys, payloads, strict=True)
    ]
    got = consume(installed, 1000)
    assert sorted(e.id for e in got) == ids
    assert_in_key_order(got)
    by_id = {e.id: e for e in got}
    assert [by_id[i].payload for i in ids] == payloads
    assert [by_id[i].key for i in ids] == keys


def test_one_key_for_all_keeps_the_batch_in_order(installed: str, conn: psycopg.Connection) -> None:
    ids = pgherald.publish_many(conn, "ch", (i for i in range(50)), key="order-1")
    conn.commit()
    got = consume(installed, 50)
    assert [e.id for e in got] == ids  # one key: one partition, consumed in publish order
    assert [(e.payload, e.key, e.headers) for e in got] == [(i, "order-1", None) for i in range(50)]


def test_rollback_stores_none(installed: str, conn: psycopg.Connection) -> None:
    def fail_after_publishing(c: psycopg.Connection) -> None:
        with c.transaction():
            pgherald.publish_many(c, "ch", [4, 5])
            raise RuntimeError

    with psycopg.connect(installed) as c:
        pgherald.publish_many(c, "ch", [{"a": 1}, {"a": 2}])
        c.rollback()
        with pytest.raises(RuntimeError):
            fail_after_publishing(c)
        assert stored(conn) == []
        ids = pgherald.publish_many(c, "ch", [1, 2, 3])
        assert stored(conn) == []  # not before the caller's commit
        c.commit()
    assert [(r[0], r[3]) for r in stored(conn)] == list(zip(ids, [1, 2, 3], strict=True))


def test_empty_input_makes_no_round_trip(installed: str) -> None:
    c = psycopg.connect(installed)
    c.close()  # any statement would fail now
    assert pgherald.publish_many(c, "ch", []) == []
    assert pgherald.publish_many(c, "ch", iter(()), key=[]) == []


def test_through_psycopg2(installed: str, conn: psycopg.Connection) -> None:
    import psycopg2

    pg2 = psycopg2.connect(installed)
    try:
        pgherald.publish_many(pg2, "ch", [{"rolled": "back"}])
        pg2.rollback()
        ids = pgherald.publish_many(pg2, "ch", ["a", None, {"b": [1]}], key=[None, "k", None])
        pg2.commit()
    finally:
        pg2.close()
    assert [(r[0], r[2], r[3]) for r in stored(conn)] == list(
        zip(ids, [None, "k", None], ["a", None, {"b": [1]}], strict=True)
    )
    got = consume(installed, 3)
    assert sorted(e.id for e in got) == ids


def test_through_sqlalchemy(installed: str, conn: psycopg.Connection) -> None:
    engine = sqlalchemy_engine(installed)
    try:
        with engine.connect() as sa_conn:
            pgherald.publish_many(sa_conn, "ch", [{"rolled back": True}])
            sa_conn.rollback()
        with engine.begin() as sa_conn:
            ids = pgherald.publish_many(sa_conn, "ch", [{"from": "sqlalchemy"}, 2], key="k")
        raw = engine.raw_connection()
        try:
            ids += pgherald.publish_many(raw, "ch", [{"from": "raw"}])
            raw.commit()
        finally:
            raw.close()
    finally:
        engine.dispose()
    got = consume(installed, 3)
    assert [e.id for e in got if e.key == "k"] == ids[:2]
    assert sorted(e.id for e in got) == ids
    assert [r[3] for r in stored(conn)] == [{"from": "sqlalchemy"}, 2, {"from": "raw"}]


@pytest.mark.anyio
async def test_apublish_many_psycopg_async_connection(installed: str, anyio_backend: str) -> None:
    if anyio_backend == "trio":
        pytest.xfail("psycopg's AsyncConnection runs on asyncio only (psycopg issue #29)")
    async with await psycopg.AsyncConnection.connect(installed) as aconn:
        await pgherald.apublish_many(aconn, "ch", [{"k": 0}])
        await aconn.rollback()
        assert await pgherald.apublish_many(aconn, "ch", []) == []
        ids = await pgherald.apublish_many(aconn, "ch", [{"k": i} for i in range(100)], key="x")
        await aconn.commit()
        with pytest.raises(pgherald.PayloadNotSerializable, match="index 1"):
            await pgherald.apublish_many(aconn, "ch", [1, {2}])
    assert len(ids) == 100
    assert ids == sorted(ids)
    async with pgherald.AsyncConsumer(installed, group="g", channels=["ch"], **FAST) as c:
        got = []
        with anyio.fail_after(10):
            async for e in c:
                got.append(e)
                if len(got) == 100:
                    c.stop()
    assert [(e.id, e.payload) for e in got] == [(i, {"k": n}) for n, i in enumerate(ids)]


def test_bad_input_names_the_problem_and_stores_nothing(
    installed: str, conn: psycopg.Connection
) -> None:
    bad: list[tuple[Any, ...]] = [
        ("ch", [1, 2, 3, {1, 2}], {}, pgherald.PayloadNotSerializable, "index 3"),
        ("ch", [{"x": math.nan}], {}, pgherald.PayloadNotSerializable, "index 0"),
        ("ch", [{"x": math.inf}], {}, pgherald.PayloadNotSerializable, "NaN or infinity"),
        ("", [1], {}, pgherald.InvalidChannel, "empty"),
        ("c" * 64, [1], {}, pgherald.InvalidChannel, "at most 63 bytes"),
        ("ch", "not a list", {}, pgherald.PublishError, "publish()"),
        ("ch", {"a": 1}, {}, pgherald.PublishError, "iterable of events"),
        ("ch", 42, {}, pgherald.PublishError, "got int"),
        ("ch", [1, 2], {"key": ["a"]}, pgherald.PublishError, "1 keys for 2 payloads"),
        ("ch", [1, 2], {"key": ["a", 7]}, pgherald.PublishError, "key at index 1"),
        ("ch", [1], {"key": b"k"}, pgherald.PublishError, "got bytes"),
        ("ch", [1], {"key": 3}, pgherald.PublishError, "got int"),
        ("ch", [1], {"headers": {"h": {1}}}, pgherald.PayloadNotSerializable, "headers"),
        # A custom dumps that writes two values for one payload would shift every event after
        # it: refused by the server-side count, nothing stored.
        ("ch", [1, 2], {"dumps": lambda o: "1,2"}, pgherald.PayloadNotSerializable, "one JSON"),
        ("ch", [1], {"dumps": lambda o: 5}, pgherald.PayloadNotSerializable, "returned int"),
    ]
    for channel, payloads, kwargs, error, words in bad:
        with pytest.raises(error, match=words):
            pgherald.publish_many(conn, channel, payloads, **kwargs)
    assert issubclass(pgherald.PublishError, pgherald.HeraldError)
    conn.commit()
    assert stored(conn) == []
    # A dumps that returns one valid document per payload is used as it is; bytes (orjson's
    # way) are UTF-8.
    ids = pgherald.publish_many(conn, "ch", [1, 2], dumps=lambda o: f'{{"v": {o}}}')
    ids += pgherald.publish_many(conn, "ch", ["é"], dumps=lambda o: f'"{o}"'.encode())
    assert [(r[0], r[3]) for r in stored(conn)] == list(
        zip(ids, [{"v": 1}, {"v": 2}, "é"], strict=True)
    )


def test_schema_missing_is_a_herald_error(conn: psycopg.Connection) -> None:
    with pytest.raises(pgherald.HeraldError, match="install"):
        pgherald.publish_many(conn, "ch", [1])
