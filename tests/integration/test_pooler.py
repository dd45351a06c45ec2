"""
Behind a real PgBouncer: transaction mode fails at once and clearly, session mode works.

In transaction mode every statement may run on a different server connection, so a LISTEN
does not stay in effect: a listener that passed ``SELECT 1`` health checks used to receive
nothing, silently. The start-up delivery check (a NOTIFY from a second connection that must
reach the listening one) turns that into `PoolerError` within 5 s.
"""

from __future__ import annotations

import contextlib
import threading
import time

import anyio
import psycopg
import pytest

import pgherald
from tests.fix_pgbouncer import start_pgbouncer

POOLER_MESSAGE = r"pool_mode=transaction.*session-mode pool.*direct DSN"


def test_listener_behind_transaction_pooler_fails_at_once_with_the_fix(dsn: str) -> None:
    with start_pgbouncer(dsn, "transaction") as bouncer:
        t0 = time.monotonic()
        with pytest.raises(pgherald.PoolerError, match=POOLER_MESSAGE) as info:
            pgherald.Listener(bouncer.dsn, channels=["orders"]).connect()
        elapsed = time.monotonic() - t0
    assert elapsed < 5.5, f"the pooler was found after {elapsed:.2f}s"
    assert isinstance(info.value, pgherald.ConnectError)  # existing `except ConnectError` holds


def test_listener_run_behind_transaction_pooler_raises(dsn: str) -> None:
    with start_pgbouncer(dsn, "transaction") as bouncer:
        listener = pgherald.Listener(bouncer.dsn, connect_timeout=2.0)
        listener.on("orders")(lambda n: None)
        t0 = time.monotonic()
        with pytest.raises(pgherald.PoolerError, match=POOLER_MESSAGE):
            listener.run()
        assert time.monotonic() - t0 < 2.5  # min(5, connect_timeout)
        listener.close()


@pytest.mark.anyio
async def test_async_listener_behind_transaction_pooler_fails_at_once(dsn: str) -> None:
    with start_pgbouncer(dsn, "transaction") as bouncer:
        t0 = time.monotonic()
        with pytest.raises(pgherald.PoolerError, match=POOLER_MESSAGE):
            async with pgherald.AsyncListener(bouncer.dsn, channels=["orders"]):
                pass
        elapsed = time.monotonic() - t0
    assert elapsed < 5.5, f"the pooler was found after {elapsed:.2f}s"


def test_listener_behind_session_pooler_works(dsn: str, conn: psycopg.Connection) -> None:
    with (
        start_pgbouncer(dsn, "session") as bouncer,
        pgherald.Listener(bouncer.dsn, channels=["orders"], health_check_interval=0.2) as listener,
    ):
        got: list[str] = []
        done = threading.Event()

        @listener.on("orders")
        def order(n: pgherald.Notification) -> None:
            got.append(n.payload)
            if len(got) == 5:
                done.set()

        runner = threading.Thread(target=listener.run)
        runner.start()
        try:
            # Past a few liveness probes (every 0.2 s), which must pass through the pooler.
            deadline = time.monotonic() + 5
            while listener.stats.health_checks < 3 and time.monotonic() < deadline:
                time.sleep(0.01)  # bounded polling
            assert listener.stats.health_checks >= 3
            for i in range(5):
                pgherald.notify(conn, "orders", str(i))
            assert done.wait(5), f"got {got} through a session-mode pooler"
        finally:
            listener.stop()
            runner.join(5)
    assert got == ["0", "1", "2", "3", "4"]
    assert listener.stats.reconnects == 0


@pytest.mark.anyio
async def test_async_listener_behind_session_pooler_works(dsn: str) -> None:
    with start_pgbouncer(dsn, "session") as bouncer:
        async with pgherald.AsyncListener(bouncer.dsn, channels=["orders"]) as listener:
            await anyio.to_thread.run_sync(_notify, dsn, "orders", "hello")
            got = []
            async with contextlib.aclosing(listener.notifications(timeout=5)) as stream:
                async for n in stream:
                    got.append(n.payload)
                    break
    assert got == ["hello"]


def _notify(dsn: str, channel: str, payload: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        pgherald.notify(c, channel, payload)


# -- consumers: their wake-ups are notifications, and their partitions session locks --


def test_consumer_behind_transaction_pooler_fails_at_once(installed: str) -> None:
    with start_pgbouncer(installed, "transaction") as bouncer:
        t0 = time.monotonic()
        with (
            pytest.raises(pgherald.PoolerError, match=POOLER_MESSAGE),
            pgherald.Consumer(bouncer.dsn, group="g", channels=["ch"]),
        ):
            pass
        elapsed = time.monotonic() - t0
    assert elapsed < 5.5, f"the pooler was found after {elapsed:.2f}s"


@pytest.mark.anyio
async def test_async_consumer_behind_transaction_pooler_fails_at_once(installed: str) -> None:
    with start_pgbouncer(installed, "transaction") as bouncer:
        t0 = time.monotonic()
        with pytest.raises(pgherald.PoolerError, match=POOLER_MESSAGE):
            async with pgherald.AsyncConsumer(bouncer.dsn, group="g", channels=["ch"]):
                pass
        elapsed = time.monotonic() - t0
    assert elapsed < 5.5, f"the pooler was found after {elapsed:.2f}s"


def test_consumer_behind_session_pooler_works(installed: str, conn: psycopg.Connection) -> None:
    with start_pgbouncer(installed, "session") as bouncer:
        ids = [pgherald.publish(conn, "ch", i) for i in range(3)]
        with pgherald.Consumer(bouncer.dsn, group="g", channels=["ch"], poll_interval=0.1) as c:
            got = []
            for e in c:
                got.append(e.id)
                if len(got) == 3:
                    c.stop()
    assert got == ids
