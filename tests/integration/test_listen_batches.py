"""
The async listener's fast paths: batches in `notifications()`, reads that follow a stream,
the asyncio reader kept between waits. Each must keep what the slow path guaranteed.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from contextlib import aclosing

import anyio
import anyio.lowlevel
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
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                # Sent while the iteration waits on the socket, so that it registers a reader.
                tg.start_soon(anyio.to_thread.run_sync, _burst, dsn, "r", ["1", "2"])
                async with aclosing(listener.notifications()) as it:
                    async for _n in it:
                        break
                # At once: a later loop turn could see the socket readable and drop it.
                assert not loop.remove_reader(fd), "the iteration left its reader registered"

        listener.on("r")(lambda n: listener.stop())
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.to_thread.run_sync, _burst, dsn, "r", ["3"])
                await listener.run()
                assert not loop.remove_reader(fd), "run() left its reader registered"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_kept_reader_is_not_taken_for_a_new_socket_with_the_same_number() -> None:
    # What a reconnection can do: the old socket closes with its reader kept, and the new
    # one gets the same descriptor number. epoll forgot the old one; asyncio did not.
    from pgherald._protocol.pgwire import READ
    from pgherald._waiting_async import AsyncWaiter

    waiter = AsyncWaiter(keep_reader=True)
    a, b = socket.socketpair()
    b.send(b"x")
    assert await waiter.wait(a.fileno(), READ, time.monotonic() + 5)
    a.recv(1)
    await anyio.lowlevel.checkpoint()  # no readiness of the old socket left to be reported
    fd = a.fileno()
    a.close()
    b.close()
    c, d = socket.socketpair()
    try:
        new = c if c.fileno() == fd else d
        assert new.fileno() == fd, "the descriptor number was not reused: nothing to test"
        (d if new is c else c).send(b"y")
        started = time.monotonic()
        assert await waiter.wait(fd, READ, time.monotonic() + 2), "never saw the new socket"
        assert time.monotonic() - started < 1.0
    finally:
        waiter.release()
        c.close()
        d.close()


@pytest.mark.anyio
async def test_iteration_hears_at_once_after_a_reconnect(
    dsn: str, conn: psycopg.Connection
) -> None:
    # A reconnection inside one iteration: the old socket goes away while its reader is
    # kept; the new connection must be heard at once (not at the health check, 30 s here).
    async with pgherald.AsyncListener(
        dsn, channels=["re"], health_check_interval=30.0, reconnect_initial_delay=0.01
    ) as listener:
        got: list[str] = []
        old_pid = listener.backend_pid

        async def terminate_then_send() -> None:
            await anyio.to_thread.run_sync(_burst, dsn, "re", ["before"])
            await await_until(lambda: got, 5.0, "the first notification")
            await anyio.to_thread.run_sync(
                lambda: conn.execute("SELECT pg_terminate_backend(%s)", (old_pid,))
            )
            # Listening again (counted once the new connection's LISTEN is done), not only
            # connected again: a NOTIFY sent between the two is not the new session's to hear.
            await await_until(lambda: listener.stats.reconnects == 1, 5.0, "listening again")
            assert listener.backend_pid not in (None, old_pid)
            await anyio.to_thread.run_sync(_burst, dsn, "re", ["after"])

        # Well under the health check's 30 s, with room for a loaded machine (a CI run once
        # took over 5 s here while other suites shared the two cores).
        with anyio.fail_after(12):
            async with anyio.create_task_group() as tg:
                tg.start_soon(terminate_then_send)
                async with aclosing(listener.notifications()) as it:
                    async for n in it:
                        got.append(n.payload)
                        if len(got) == 2:
                            break
    assert got == ["before", "after"]
    assert listener.stats.reconnects == 1


def test_sync_breaking_out_of_a_batch_keeps_the_rest_in_order(dsn: str) -> None:
    sent = [str(i) for i in range(50)]
    with pgherald.Listener(dsn, channels=["b"]) as listener:
        _burst(dsn, "b", sent)
        first: list[str] = []
        for n in listener.notifications(timeout=5.0):
            first.append(n.payload)
            if len(first) == 3:
                break  # the generator closes here: the other 47 go back
        rest = [n.payload for n in listener.notifications(timeout=0.5)]
    assert first + rest == sent
    assert listener.stats.received == len(sent)


SEND_MIXED = "SELECT count(pg_notify(c, p)) FROM unnest(%s::text[], %s::text[]) AS t(c, p)"


def _mixed(dsn: str, rows: list[tuple[str, str]]) -> None:
    """One transaction of notifications on several channels, in this order."""
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(SEND_MIXED, ([ch for ch, _ in rows], [p for _, p in rows]))


def _interleaved(mixed: bool, count: int) -> list[tuple[str, str]]:
    if not mixed:
        return [("a", str(i)) for i in range(count)]
    # Two handled channels and, every 7th, one without a handler (the slow path).
    return [("c" if i % 7 == 6 else "ab"[i % 2], str(i)) for i in range(count)]


# 20: below engine._CONVERT_MIN (converted item by item); 60: converted as a batch.
@pytest.mark.parametrize("count", [20, 60])
@pytest.mark.parametrize("mixed", [False, True], ids=["one-channel", "mixed"])
def test_sync_handler_stop_inside_a_batch_keeps_the_rest_in_order(
    dsn: str, mixed: bool, count: int
) -> None:
    # The handler path takes notifications from libpq a batch at a time: a stop() inside one
    # must leave the rest for the next run(), in order, none lost or delivered twice.
    rows = _interleaved(mixed, count)
    handled = [r for r in rows if r[0] != "c"]
    got: list[tuple[str, str]] = []
    want = [3]
    with pgherald.Listener(dsn, channels=["a", "b", "c"]) as listener:

        def handler(n: pgherald.Notification) -> None:
            got.append((n.channel, n.payload))
            if len(got) >= want[0]:
                listener.stop()

        listener.on("a")(handler)
        listener.on("b")(handler)
        _mixed(dsn, rows)
        safety = threading.Timer(5.0, listener.stop)
        safety.start()
        try:
            listener.run()
            assert got == handled[:3]
            want[0] = len(handled)
            listener.run()
        finally:
            safety.cancel()
    assert got == handled
    assert listener.stats.received == len(rows)
    assert listener.stats.unhandled == len(rows) - len(handled)


@pytest.mark.anyio
@pytest.mark.parametrize("count", [20, 60])
async def test_async_handler_inside_a_batch_keeps_the_order(dsn: str, count: int) -> None:
    # An async handler hands the batch back to the runtime at each of its notifications (to
    # be awaited): the rest of the batch waits, in order, also across a stop() and a new run.
    rows = _interleaved(True, count)
    handled = [r for r in rows if r[0] != "c"]
    got: list[tuple[str, str]] = []
    want = [5]
    async with pgherald.AsyncListener(dsn, channels=["a", "b", "c"]) as listener:

        @listener.on("a")
        def on_a(n: pgherald.Notification) -> None:
            got.append((n.channel, n.payload))
            if len(got) >= want[0]:
                listener.stop()

        @listener.on("b")
        async def on_b(n: pgherald.Notification) -> None:
            await anyio.lowlevel.checkpoint()
            got.append((n.channel, n.payload))
            if len(got) >= want[0]:
                listener.stop()

        await anyio.to_thread.run_sync(_mixed, dsn, rows)
        with anyio.fail_after(5):
            await listener.run()
            assert got == handled[:5]
            want[0] = len(handled)
            await listener.run()
    assert got == handled
    assert listener.stats.received == len(rows)
    assert listener.stats.unhandled == len(rows) - len(handled)
