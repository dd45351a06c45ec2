"""
Host names are looked up by the runtime, not by libpq inside its connect: on an event loop,
libpq's own lookup (blocking) stood the whole loop still for as long as DNS took, and nothing
(no deadline, no stop()) could end it. The names here exist only in this process's resolver
(``socket.getaddrinfo`` made slow, failing or hanging for them: the resolver, not the
database, is what is faked); the server is real, reached through a proxy on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pgherald
from tests.fix_faults import FaultProxy, wait_until
from tests.fix_proxy import _target_of
from tests.fix_server import OwnServer
from tests.integration.test_cdc import slot_ready

SLOW = "slow.pgherald.test"  # answers after SLOW_FOR seconds: 127.0.0.1
HUNG = "hung.pgherald.test"  # answers after a minute
UNKNOWN = "unknown.pgherald.test"  # does not resolve
SLOW_FOR = 1.0

_real_getaddrinfo = socket.getaddrinfo


class Resolver:
    """The names looked up (`asked`); `release()` ends the lookups still hanging."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self._release = threading.Event()

    def release(self) -> None:
        # asyncio.run() waits for its resolver's threads as it ends: let them go first.
        self._release.set()

    def getaddrinfo(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, bytes):  # anyio passes the name IDNA-encoded
            host = host.decode()
        flags = kwargs.get("flags", args[3] if len(args) > 3 else 0)
        if host in (SLOW, HUNG, UNKNOWN):
            if flags & socket.AI_NUMERICHOST:  # "is it an address?" (trio asks first): no
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            self.asked.append(host)
            if host == UNKNOWN:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            self._release.wait(SLOW_FOR if host == SLOW else 60)
            host = "127.0.0.1"
        return _real_getaddrinfo(host, port, *args, **kwargs)


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Resolver]:
    """This process's resolver, with the names above."""
    fake = Resolver()
    monkeypatch.setattr(socket, "getaddrinfo", fake.getaddrinfo)
    yield fake
    fake.release()


def _notify(dsn: str, channel: str, payload: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        pgherald.notify(conn, channel, payload)


def _named(dsn: str, host: str, **more: Any) -> str:
    params = conninfo_to_dict(dsn)
    params.pop("hostaddr", None)
    params.update(host=host, **more)
    return make_conninfo("", **params)


@pytest.mark.parametrize("runtime", ["asyncio", "trio"])
def test_an_event_loop_runs_on_while_a_host_name_is_looked_up(
    runtime: str, dsn: str, fault_proxy: FaultProxy, resolver: Resolver
) -> None:
    """The lookup takes a second; the loop's other tasks go on meanwhile, and it connects."""
    named = _named(fault_proxy.dsn_for(dsn), SLOW)

    async def main() -> tuple[int, float, list[Any]]:
        ticks = 0
        got: list[Any] = []

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await anyio.sleep(0.01)
                ticks += 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            started = time.monotonic()
            async with pgherald.AsyncListener(named, channels=["orders"]) as listener:
                took = time.monotonic() - started
                await anyio.to_thread.run_sync(_notify, dsn, "orders", "hello")
                with anyio.fail_after(10):
                    async for n in listener.notifications():
                        got.append(n.payload)
                        break
            tg.cancel_scope.cancel()
        return ticks, took, got

    ticks, took, got = anyio.run(main, backend=runtime)
    assert set(resolver.asked) == {SLOW}  # the listener and its monitor connection
    assert got == ["hello"]
    assert took >= SLOW_FOR
    # 10 ms ticks for a second: a loop that stood still for the lookup ticks about once.
    assert ticks >= 40, f"the event loop stood still: {ticks} ticks in {took:.2f}s"


@pytest.mark.parametrize("runtime", ["sync", "asyncio", "trio"])
def test_a_consumer_connects_by_host_name(
    runtime: str, installed: str, fault_proxy: FaultProxy, resolver: Resolver
) -> None:
    named = _named(fault_proxy.dsn_for(installed), SLOW)
    with psycopg.connect(installed, autocommit=True) as conn:
        (event_id,) = conn.execute("SELECT pgherald.publish_v1('ch', '1')").fetchone() or (0,)
    if runtime == "sync":
        with pgherald.Consumer(named, group="g", channels=["ch"]) as c:
            first = next(iter(c))
    else:

        async def main() -> Any:
            async with pgherald.AsyncConsumer(named, group="g", channels=["ch"]) as ac:
                async for e in ac:
                    return e
            return None

        first = anyio.run(main, backend=runtime)
    assert first.id == event_id
    assert set(resolver.asked) == {SLOW}


@pytest.mark.parametrize("runtime", ["sync", "asyncio", "trio"])
def test_a_name_that_does_not_resolve_says_so(
    runtime: str, dsn: str, fault_proxy: FaultProxy, resolver: Resolver
) -> None:
    named = _named(fault_proxy.dsn_for(dsn), UNKNOWN)
    if runtime == "sync":
        with pytest.raises(pgherald.ConnectError) as info:
            pgherald.Listener(named, channels=["orders"]).connect()
    else:

        async def main() -> None:
            listener = pgherald.AsyncListener(named, channels=["orders"])
            try:
                await listener.connect()
            finally:
                await listener.aclose()

        with pytest.raises(pgherald.ConnectError) as info:
            anyio.run(main, backend=runtime)
    assert f'could not translate host name "{UNKNOWN}" to address' in str(info.value)
    assert resolver.asked == [UNKNOWN]


@pytest.mark.parametrize("runtime", ["sync", "asyncio", "trio"])
def test_a_hung_lookup_ends_at_the_connect_timeout(
    runtime: str, dsn: str, fault_proxy: FaultProxy, resolver: Resolver
) -> None:
    named = _named(fault_proxy.dsn_for(dsn), HUNG)
    started = time.monotonic()
    failed: list[float] = []
    if runtime == "sync":
        listener = pgherald.Listener(named, channels=["orders"], connect_timeout=1)
        with pytest.raises(pgherald.ConnectError) as info:
            listener.connect()
        failed.append(time.monotonic())
        listener.close()
    else:

        async def main() -> None:
            listener = pgherald.AsyncListener(named, channels=["orders"], connect_timeout=1)
            try:
                await listener.connect()
            finally:
                failed.append(time.monotonic())
                resolver.release()
                await listener.aclose()

        with pytest.raises(pgherald.ConnectError) as info:
            anyio.run(main, backend=runtime)
    took = failed[0] - started
    assert f'timed out while looking up host name "{HUNG}"' in str(info.value)
    assert 0.9 < took < 3, f"gave up after {took:.2f}s (connect_timeout=1)"


@pytest.mark.parametrize("runtime", ["sync", "asyncio", "trio"])
def test_stop_ends_a_hung_lookup(
    runtime: str, installed: str, fault_proxy: FaultProxy, resolver: Resolver
) -> None:
    """A consumer reconnecting while DNS hangs: stop() still ends run() within a second."""
    named = _named(fault_proxy.dsn_for(installed), HUNG)
    options: dict[str, Any] = {"group": "g", "channels": ["ch"], "connect_timeout": 30}
    ended: list[float] = []
    if runtime == "sync":
        consumer: Any = pgherald.Consumer(named, **options)
        consumer.on("ch")(lambda e: None)

        def target() -> None:
            with contextlib.suppress(pgherald.ConnectError):
                consumer.run()
            ended.append(time.monotonic())

    else:
        consumer = pgherald.AsyncConsumer(named, **options)
        consumer.on("ch")(lambda e: None)

        def target() -> None:
            async def main() -> None:
                with contextlib.suppress(pgherald.ConnectError):
                    await consumer.run()
                ended.append(time.monotonic())
                resolver.release()

            anyio.run(main, backend=runtime)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    wait_until(lambda: resolver.asked, 5, "the lookup to start")
    stopped = time.monotonic()
    consumer.stop()
    thread.join(5)
    assert not thread.is_alive(), "run() did not return: the lookup held it"
    assert ended, "run() raised"
    assert ended[0] - stopped < 1.5, f"returned {ended[0] - stopped:.2f}s after stop()"
    if runtime == "sync":
        consumer.close()
    else:
        anyio.run(consumer.aclose, backend=runtime)


@pytest.mark.parametrize("runtime", ["sync", "asyncio", "trio"])
def test_a_change_stream_connects_by_host_name(
    runtime: str, cdc_dsn: str, logical_server: OwnServer, resolver: Resolver
) -> None:
    """Its replication connection, driven by the stream's own loops, looks the name up too."""
    with psycopg.connect(cdc_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    proxy = FaultProxy(_target_of(logical_server.dsn))
    try:
        named = _named(proxy.dsn_for(cdc_dsn), SLOW)
        stream_options: dict[str, Any] = {"slot": f"s_{runtime}", "tables": ["t"]}

        def write() -> None:
            # Past the slot's creation: a change before its consistent point is never decoded.
            wait_until(lambda: slot_ready(cdc_dsn, stream_options["slot"]), 15, "the stream")
            with psycopg.connect(cdc_dsn, autocommit=True) as conn:
                conn.execute("INSERT INTO t VALUES (1)")

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        if runtime == "sync":
            with pgherald.ChangeStream(named, **stream_options) as stream:
                first = next(iter(stream))
        else:

            async def main() -> Any:
                with anyio.fail_after(20):
                    async with pgherald.AsyncChangeStream(named, **stream_options) as astream:
                        async for e in astream:
                            return e
                return None

            first = anyio.run(main, backend=runtime)
        writer.join(5)
        assert (first.op, first.key) == ("INSERT", "1")
        assert set(resolver.asked) == {SLOW}
    finally:
        proxy.close()


@pytest.mark.parametrize("runtime", ["sync", "asyncio", "trio"])
def test_a_name_that_cannot_be_encoded_says_so_at_once(
    runtime: str, dsn: str, fault_proxy: FaultProxy, resolver: Resolver
) -> None:
    """A label over 63 characters: the lookup fails (UnicodeError in IDNA), it does not hang."""
    bad = "a" * 64 + ".pgherald.test"
    named = _named(fault_proxy.dsn_for(dsn), bad)
    started = time.monotonic()
    if runtime == "sync":
        listener = pgherald.Listener(named, channels=["orders"], connect_timeout=10)
        with pytest.raises(pgherald.ConnectError) as info:
            listener.connect()
        listener.close()
    else:

        async def main() -> None:
            alistener = pgherald.AsyncListener(named, channels=["orders"], connect_timeout=10)
            try:
                await alistener.connect()
            finally:
                await alistener.aclose()

        with pytest.raises(pgherald.ConnectError) as info:
            anyio.run(main, backend=runtime)
    took = time.monotonic() - started
    assert f'could not translate host name "{bad}"' in str(info.value)
    assert took < 3, f"took {took:.2f}s (connect_timeout 10)"


@pytest.mark.parametrize("runtime", ["asyncio", "trio"])
def test_attempts_wait_for_the_lookup_under_way(
    runtime: str, dsn: str, fault_proxy: FaultProxy, resolver: Resolver
) -> None:
    """
    A hung lookup cannot be stopped: attempts after it wait for it instead of taking a thread
    each (asyncio's resolver has 6 on 2 cores; an abandoned thread holds one of trio's 40
    `to_thread` tokens until it returns: a few attempts, or a few dozen, would hold them all).
    """
    named = _named(fault_proxy.dsn_for(dsn), HUNG)

    async def main() -> list[str]:
        errors = []
        for _ in range(3):
            listener = pgherald.AsyncListener(named, channels=["orders"], connect_timeout=1)
            try:
                await listener.connect()
            except pgherald.ConnectError as exc:
                errors.append(str(exc))
            finally:
                await listener.aclose()
        resolver.release()
        return errors

    errors = anyio.run(main, backend=runtime)
    assert len(errors) == 3
    assert all(f'timed out while looking up host name "{HUNG}"' in e for e in errors)
    assert resolver.asked == [HUNG]  # one lookup for the three attempts
