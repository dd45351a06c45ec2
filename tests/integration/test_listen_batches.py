"""
The async listener's fast paths: batches in `notifications()`, reads that follow a stream,
the asyncio reader kept between waits. Each must keep what the slow path guaranteed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import aclosing

import anyio
import psycopg
import pytest

import pgherald
from tests.fix_faults import await_until

SEND_BURST = "SELECT count(pg_notify(%s, p)) FROM unnest(%s::text[]) AS p"


def _burst(dsn: str, channel: str, payloads: list[str]) -> None:
    """All *payloads* in one transaction: they reach the listener as one batch."""
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(SEND_BURST, (channel, payloads))


@pytest.mark.anyio
async def test_breaking_out_of_a_batch_keeps_the_rest_in_order(dsn: str) -> None:
    sent = [str(i) for i in range(50)]
    async with pgherald.AsyncListener(dsn, channels=["b"]) as listener:
        await anyio.to_thread.run_sync(_burst, dsn, "b", sent)
        first: list[str] = []
        with anyio.fail_after(5):
            async with aclosing(listener.notifications()) as it:
                async for n in it:
                    first.append(n.payload)
                    if len(first) == 3:
                        break  # the other 47 were taken from libpq in the same batch
        rest = [n.payload async for n in listener.notifications(timeout=0.5)]
    assert first + rest == sent
    assert listener.stats.received == len(sent)


@pytest.mark.anyio
@pytest.mark.parametrize("style", ["iterate", "run"])
async def test_cancellable_while_a_stream_never_lets_it_wait(dsn: str, style: str) -> None:
    # The sender outpaces the receiver, so libpq and the socket always hold more: the loop
    # never reaches a wait. Cancellation must still get through.
    stop = threading.Event()

    def stream() -> None:
        payloads = [f"{i:040d}" for i in range(2000)]  # distinct: duplicates would fold
        give_up = time.monotonic() + 10.0  # a listener that cannot be cancelled: fail, not hang
        with psycopg.connect(dsn, autocommit=True) as c:
            while not stop.is_set() and time.monotonic() < give_up:
                c.execute(SEND_BURST, ("s", payloads))

    sender = threading.Thread(target=stream, daemon=True)
    received = 0
    try:
        async with pgherald.AsyncListener(dsn, channels=["s"]) as listener:
            sender.start()

            def count(n: pgherald.Notification) -> None:
                nonlocal received
                received += 1

            await await_until(lambda: listener.backend_pid is not None, 5.0, "connected")
            started = time.monotonic()
            with anyio.move_on_after(1.0) as scope:
                if style == "iterate":
                    async with aclosing(listener.notifications()) as it:
                        async for n in it:
                            count(n)
                else:
                    listener.on("s")(count)
                    await listener.run()
            elapsed = time.monotonic() - started
    finally:
        stop.set()
        sender.join(10)
    assert scope.cancelled_caught
    assert received > 1000, "the stream never reached the listener"
    assert elapsed < 2.0, f"cancellation took {elapsed:.2f}s to get through a stream"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_asyncio_reader_is_released_when_the_loop_ends(dsn: str) -> None:
    # Kept between waits while the listener reads; left behind, it would outlive the socket
    # and break the next add_reader on a reused descriptor number.
    loop = asyncio.get_running_loop()
    async with pgherald.AsyncListener(dsn, channels=["r"]) as listener:
        assert listener._engine.pgconn is not None
        fd = listener._engine.pgconn.socket
        await anyio.to_thread.run_sync(_burst, dsn, "r", ["1", "2"])
        with anyio.fail_after(5):
            async with aclosing(listener.notifications()) as it:
                async for _n in it:
                    break
        assert not loop.remove_reader(fd), "the iteration left its reader registered"

        listener.on("r")(lambda n: listener.stop())
        await anyio.to_thread.run_sync(_burst, dsn, "r", ["3"])
        with anyio.fail_after(5):
            await listener.run()
        assert not loop.remove_reader(fd), "run() left its reader registered"


@pytest.mark.anyio
async def test_iteration_hears_at_once_after_a_reconnect(dsn: str, conn: psycopg.Connection) -> None:
    # The new socket often gets the old one's descriptor number: a reader kept for the old
    # socket must not be taken for one on the new (it would hear nothing until the health
    # check, 30 s here).
    async with pgherald.AsyncListener(
        dsn, channels=["re"], health_check_interval=30.0, reconnect_initial_delay=0.01
    ) as listener:
        got: list[str] = []
        await anyio.to_thread.run_sync(_burst, dsn, "re", ["before"])
        with anyio.fail_after(5):
            async with aclosing(listener.notifications()) as it:
                async for n in it:
                    got.append(n.payload)
                    old_pid = listener.backend_pid
                    conn.execute("SELECT pg_terminate_backend(%s)", (old_pid,))
                    break
        async with anyio.create_task_group() as tg:

            async def send_after_reconnect() -> None:
                await await_until(
                    lambda: listener.backend_pid not in (None, old_pid), 5.0, "a reconnection"
                )
                await anyio.to_thread.run_sync(_burst, dsn, "re", ["after"])

            tg.start_soon(send_after_reconnect)
            with anyio.fail_after(5):
                async with aclosing(listener.notifications()) as it:
                    async for n in it:
                        got.append(n.payload)
                        break
    assert got == ["before", "after"]
    assert listener.stats.reconnects == 1
