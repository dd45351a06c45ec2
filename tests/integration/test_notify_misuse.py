"""What a caller gets wrong on the sending side is a clear `HeraldError`, raised before anything
is sent: the sync call with an async connection and the other way round, text that is not
Unicode, a custom ``dumps`` that fails or returns bytes, a model pydantic refuses."""

from __future__ import annotations

import sys
import typing

import psycopg
import pytest

import pgherald

SENTINEL = "-- the end --"


def sent(conn: psycopg.Connection, channel: str) -> list[str]:
    """
    What reached a listener of *channel* meanwhile (LISTEN on *conn*, autocommit, beforehand):
    everything before a sentinel notified now, which arrives after whatever came before it.
    """
    conn.execute("SELECT pg_notify(%s, %s)", (channel, SENTINEL))
    got = []
    for n in conn.notifies(timeout=5):
        if n.channel == channel:
            if n.payload == SENTINEL:
                return got
            got.append(n.payload)
    raise AssertionError("the sentinel did not come back within 5 s")


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # psycopg's AsyncConnection: asyncio
async def test_the_wrong_call_for_the_connection_sends_nothing(
    installed: str, conn: psycopg.Connection, anyio_backend: str
) -> None:
    conn.execute('LISTEN "misuse"')
    with psycopg.connect(installed, autocommit=True) as sync_conn:
        with pytest.raises(pgherald.UsageError, match="it is a sync connection"):
            await pgherald.anotify(sync_conn, "misuse", "from anotify")
        with pytest.raises(pgherald.UsageError, match="it is a sync connection"):
            await pgherald.apublish(sync_conn, "misuse", 1)
    async with await psycopg.AsyncConnection.connect(installed, autocommit=True) as aconn:
        with pytest.raises(pgherald.UsageError, match="it is an async connection"):
            pgherald.notify(aconn, "misuse", "from notify")
        with pytest.raises(pgherald.UsageError, match="it is an async connection"):
            pgherald.publish_many(aconn, "misuse", [1])
    assert sent(conn, "misuse") == []  # a retry after the error sends no duplicate
    assert conn.execute("SELECT count(*) FROM pgherald.events_v1").fetchone() == (0,)


def test_text_that_is_not_unicode_and_failing_dumps(conn: psycopg.Connection) -> None:
    with pytest.raises(pgherald.InvalidChannel, match="lone surrogate"):
        pgherald.notify(conn, "a\ud800b", "x")
    with pytest.raises(pgherald.InvalidChannel, match="lone surrogate"):
        pgherald.Listener(conn.info.dsn, channels=["a\ud800b"])
    for payload in ("x\udcff", "x\udcff" * 3000):
        with pytest.raises(pgherald.PayloadNotSerializable, match="lone surrogate"):
            pgherald.notify(conn, "a", payload)
    with pytest.raises(pgherald.PayloadNotSerializable, match="ZeroDivisionError"):
        pgherald.notify(conn, "a", {"a": 1}, dumps=lambda o: 1 / 0)
    with pytest.raises(pgherald.PayloadNotSerializable, match="dumps returned bytes"):
        pgherald.notify(conn, "a", {"a": 1}, dumps=lambda o: b"x" * 3000)  # type: ignore[arg-type,return-value]
    with pytest.raises(pgherald.PayloadNotSerializable, match="division by zero"):
        pgherald.publish(conn, "a", {"a": 1}, dumps=lambda o: 1 / 0)  # type: ignore[arg-type,return-value]


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="pydantic takes typing.TypedDict there")
def test_a_model_pydantic_refuses_is_a_usage_error() -> None:
    pytest.importorskip("pydantic")

    class Order(typing.TypedDict):
        id: int

    with pytest.raises(pgherald.UsageError, match="cannot be used: Please use"):
        pgherald.Listener("host=127.0.0.1", channels=["c"]).on("c", model=Order)(print)
    with pytest.raises(pgherald.UsageError, match="cannot be used"):
        pgherald.Consumer("host=127.0.0.1", group="g", model=Order)
