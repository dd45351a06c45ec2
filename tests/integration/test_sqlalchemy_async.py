"""
SQLAlchemy's asyncio connections, as docs/notify.md, docs/durable.md and docs/listen.md promise:
`anotify`, `apublish` and `apublish_many` through a SQLAlchemy `AsyncConnection` or
`AsyncSession` go out in the caller's transaction (with its commit, not at all on a rollback);
an `AsyncListener` given an async engine opens a connection of its own.

SQLAlchemy's asyncio extension runs on asyncio only (greenlet): no trio here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import URL, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

import pgherald
from tests.fix_faults import await_until

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]


def _url(dsn: str, driver: str) -> URL:
    url = conninfo_to_dict(dsn)
    return URL.create(
        f"postgresql+{driver}",
        username=str(url.get("user") or ""),
        host=str(url.get("host") or ""),
        port=int(str(url.get("port") or 5432)),
        database=str(url["dbname"]),
    )


@pytest.fixture
async def engine(dsn: str) -> AsyncIterator[AsyncEngine]:
    """An async engine on psycopg 3 (the driver pgherald is built on), disposed afterwards."""
    e = create_async_engine(_url(dsn, "psycopg"))
    yield e
    await e.dispose()


@pytest.fixture
def listening(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """A plain psycopg session LISTENing on ``chat``: what reaches it was committed."""
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("LISTEN chat")
        yield c


def received(conn: psycopg.Connection[Any], expected: int = 0) -> list[str]:
    """The payloads delivered to *conn*: the *expected* ones (within 5 s), then whatever else
    comes within a quiet 0.3 s (a bound for what must not come, not synchronisation)."""
    got = [n.payload for n in conn.notifies(timeout=5, stop_after=expected)] if expected else []
    return got + [n.payload for n in conn.notifies(timeout=0.3)]


async def test_anotify_through_an_async_connection_joins_its_transaction(
    engine: AsyncEngine, listening: psycopg.Connection[Any]
) -> None:
    async with engine.connect() as aconn:
        await pgherald.anotify(aconn, "chat", "rolled back")
        await aconn.rollback()
        async with aconn.begin():
            await pgherald.anotify(aconn, "chat", {"n": 1})
            assert received(listening) == []  # not before the commit
        await pgherald.anotify(aconn, "chat", {"n": 2})  # SQLAlchemy begins by itself
        assert received(listening, 1) == ['{"n":1}']
        await aconn.commit()
    assert received(listening, 1) == ['{"n":2}']


async def test_anotify_through_an_async_session_waits_for_its_commit(
    engine: AsyncEngine, listening: psycopg.Connection[Any]
) -> None:
    async with AsyncSession(engine) as session:
        await pgherald.anotify(session, "chat", "rolled back")
        await session.rollback()
        await pgherald.anotify(session, "chat", "committed")
        assert received(listening) == []
        await session.commit()
    assert received(listening, 1) == ["committed"]


async def test_apublish_through_an_async_connection_and_session_is_stored_with_their_commit(
    installed: str, conn: psycopg.Connection[Any]
) -> None:
    engine = create_async_engine(_url(installed, "psycopg"))
    try:
        async with engine.connect() as aconn:
            await pgherald.apublish(aconn, "orders", {"rolled back": True})
            await pgherald.apublish_many(aconn, "orders", [{"rolled back": True}])
            await aconn.rollback()
            async with aconn.begin():
                ids = [await pgherald.apublish(aconn, "orders", {"n": 1})]
                ids += await pgherald.apublish_many(aconn, "orders", [{"n": 2}, {"n": 3}])
        async with AsyncSession(engine) as session:
            ids.append(await pgherald.apublish(session, "orders", {"n": 4}))
            await session.commit()
    finally:
        await engine.dispose()
    rows = conn.execute(
        "SELECT id, payload FROM pgherald.events_v1 WHERE channel = 'orders' ORDER BY id"
    ).fetchall()
    assert rows == [(i, {"n": n}) for i, n in zip(ids, range(1, 5), strict=True)]


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
async def test_an_async_listener_given_an_async_engine_opens_its_own_connection(
    dsn: str, conn: psycopg.Connection[Any], driver: str
) -> None:
    engine = create_async_engine(_url(dsn, driver))
    got: list[pgherald.Notification] = []
    try:
        async with pgherald.AsyncListener(engine, channels=["chat"]) as listener:
            listener.on("chat")(got.append)
            async with engine.connect() as aconn:  # the engine stays the caller's to use
                assert (await aconn.execute(text("SELECT 1"))).scalar() == 1
            async with _running(listener):
                pgherald.notify(conn, "chat", "hello")
                await await_until(lambda: got, 5, "the notification")
            assert listener.backend_pid not in (None, conn.info.backend_pid)
    finally:
        await engine.dispose()
    assert [n.payload for n in got] == ["hello"]


class _running:
    """Runs *listener* in a task while the block runs; stops it on the way out."""

    def __init__(self, listener: pgherald.AsyncListener) -> None:
        self.listener = listener

    async def __aenter__(self) -> None:
        import asyncio

        self.task = asyncio.create_task(self.listener.run())
        await await_until(lambda: self.listener.backend_pid is not None, 5, "listening")

    async def __aexit__(self, *exc: object) -> None:
        import asyncio

        self.listener.stop()
        await asyncio.wait_for(self.task, 5)
