"""
Consumers under real faults, on every runtime: a frozen (half-open) connection, refused
reconnections, a terminated backend, a restarted server, a stop in every state.

Each consumer runs on a thread of its own: `Consumer.run()` there directly, `AsyncConsumer.run()`
inside ``anyio.run`` on asyncio or trio. The test thread injects the fault and calls `stop()`,
which is documented as safe from any thread.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

import pgherald
from tests.fix_durable import ConsumerOnAThread, ConsumerRun, publish_each, uncovered
from tests.fix_faults import FaultProxy, OneWayProxy, SilentServer, black_hole, wait_until
from tests.fix_proxy import _target_of
from tests.fix_quiet import database_dropper, server_dsn  # noqa: F401 (a server of our own)
from tests.fix_server import OwnServer

RUNTIMES = ["sync", "asyncio", "trio"]


def publish(dsn: str, values: list[Any], channel: str = "ch") -> list[int]:
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        return [pgherald.publish(conn, channel, v) for v in values]


FAST = {"poll_interval": 0.2, "rebalance_interval": 0.2}


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_frozen_connection_is_detected_and_nothing_is_lost(
    runtime: str, installed: str, fault_proxy: FaultProxy, consumers: Callable[..., ConsumerRun]
) -> None:
    run = consumers(
        runtime,
        fault_proxy.dsn_for(installed),
        health_check_interval=1.0,
        health_check_timeout=1.0,
        reconnect_initial_delay=0.05,
        **FAST,
    )
    first = publish(installed, list(range(5)))
    wait_until(lambda: len(run.seen) >= 5, 5, "the first events")
    assert fault_proxy.freeze() >= 1
    second = publish(installed, list(range(5, 10)))
    # The read after the freeze gets no answer: found within poll_interval + timeout (+ slack).
    took = wait_until(lambda: len(run.seen) >= 10, 6, "the events published after the freeze")
    assert took < 0.2 + 1.0 + 3.0, f"found the frozen connection after {took:.2f}s"
    assert sorted(set(run.seen)) == sorted(first + second)
    assert run.consumer.stats.reconnects >= 1
    assert run.gaps
    assert run.gaps[0].started <= time.time()
    run.stop()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_frozen_while_taking_events_from_wakeups(
    runtime: str, installed: str, fault_proxy: FaultProxy, consumers: Callable[..., ConsumerRun]
) -> None:
    # Handing out events from wake-ups (no reads), the connection freezes: the liveness probe
    # finds it, the consumer comes back, and what was published meanwhile comes once.
    run = consumers(
        runtime,
        fault_proxy.dsn_for(installed),
        health_check_interval=1.0,
        health_check_timeout=1.0,
        reconnect_initial_delay=0.05,
        poll_interval=3.0,
        rebalance_interval=0.2,
    )
    ids: list[int] = []
    deadline = time.monotonic() + 20
    while run.consumer.stats.from_wakeups == 0:  # one at a time, past the linger each time
        assert time.monotonic() < deadline, "no event came from its wake-up"
        ids += publish_each(installed, [len(ids)])
        wanted = len(ids)
        wait_until(lambda n=wanted: len(run.seen) >= n, 10, "the event")
        time.sleep(0.05)  # past the linger: the consumer then asks for wake-ups
    assert fault_proxy.freeze() >= 1
    ids += publish_each(installed, list(range(5)))
    took = wait_until(
        lambda: set(ids) <= set(run.seen), 10, "the events published after the freeze"
    )
    assert took < 1.0 + 1.0 + 3.0, f"found the frozen connection after {took:.2f}s"
    assert run.consumer.stats.reconnects >= 1
    assert list(dict.fromkeys(run.seen)) == ids  # at least once, in order
    run.stop()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_three_rounds_of_refused_reconnects(
    runtime: str, installed: str, fault_proxy: FaultProxy, consumers: Callable[..., ConsumerRun]
) -> None:
    run = consumers(
        runtime,
        fault_proxy.dsn_for(installed),
        reconnect_initial_delay=0.05,
        reconnect_max_delay=0.2,
        **FAST,
    )
    expected: list[int] = []
    for round_ in range(3):
        failures = run.consumer.stats.connect_failures
        fault_proxy.refuse()
        fault_proxy.sever()
        expected += publish(installed, [round_])
        # Refused for a while: several attempts fail, none of them fatal.
        wait_until(
            lambda f=failures: run.consumer.stats.connect_failures >= f + 3,
            5,
            f"3 refusals in round {round_} ({run.consumer.stats})",
        )
        assert run.thread.is_alive(), f"run() ended: {run.error!r}"
        assert run.consumer.stats.reconnects == round_
        fault_proxy.allow()
        wanted = len(expected)
        wait_until(lambda n=wanted: len(set(run.seen)) == n, 10, f"round {round_}'s event")
    assert run.consumer.stats.reconnects == 3
    assert [g.attempts > 1 for g in run.gaps] == [True, True, True]
    run.stop()
    assert run.error is None


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_terminated_backend_reconnects(
    runtime: str, installed: str, conn: psycopg.Connection, consumers: Callable[..., ConsumerRun]
) -> None:
    run = consumers(runtime, installed, reconnect_initial_delay=0.05, **FAST)
    ids = publish(installed, [1, 2])
    wait_until(lambda: len(run.seen) >= 2, 5, "the first events")
    conn.execute("SELECT pg_terminate_backend(%s)", (run.consumer.backend_pid,))
    ids += publish(installed, [3, 4])
    wait_until(lambda: set(ids) <= set(run.seen), 10, "the events after the termination")
    assert run.consumer.stats.reconnects == 1
    run.stop()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_cancelled_read_is_retried_not_fatal(
    runtime: str, installed: str, conn: psycopg.Connection, consumers: Callable[..., ConsumerRun]
) -> None:
    # A read cancelled (pg_cancel_backend, or a statement_timeout set on the role): 57014 used
    # to end run() with "consume failed". Now it starts over from a fresh session.
    run = consumers(runtime, installed, from_wakeups=False, reconnect_initial_delay=0.05, **FAST)
    ids = publish(installed, [1])
    wait_until(lambda: len(run.seen) >= 1, 5, "the first event")
    pid = run.consumer.backend_pid

    def state() -> Any:
        row = conn.execute(
            "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)
        ).fetchone()
        return row[0] if row else "gone"

    with psycopg.connect(installed) as locker:
        locker.execute("LOCK TABLE pgherald.events_v1 IN ACCESS EXCLUSIVE MODE")
        wait_until(lambda: state() == "Lock", 5, "a read to wait on the lock")
        conn.execute("SELECT pg_cancel_backend(%s)", (pid,))
        wait_until(lambda: state() == "gone", 5, "the consumer to leave that session")
    ids += publish(installed, [2])
    wait_until(lambda: set(ids) <= set(run.seen) or run.error, 10, "the event after")
    assert run.error is None, repr(run.error)
    assert run.consumer.stats.reconnects == 1
    run.stop()


# -- stop() within a second, in every state --


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_stop_while_reading_a_frozen_connection(
    runtime: str, installed: str, fault_proxy: FaultProxy, consumers: Callable[..., ConsumerRun]
) -> None:
    run = consumers(
        runtime, fault_proxy.dsn_for(installed), health_check_timeout=30, poll_interval=0.1
    )
    publish(installed, [1])
    with psycopg.connect(installed, autocommit=True) as conn:
        wait_until(lambda: uncovered(conn, "g") == 0, 5, "the event to be acknowledged")
    fault_proxy.freeze()
    # Within 0.1 s its next poll (or a rebalance query) waits on the frozen connection, for up
    # to 30 s. No counter marks every kind of statement it may be stuck in (a read in flight, a
    # rebalance query), so give it that time rather than wait on one of them.
    time.sleep(0.5)
    assert run.consumer.stats.reconnects == 0
    run.stop()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_stop_while_backing_off(
    runtime: str, installed: str, fault_proxy: FaultProxy, consumers: Callable[..., ConsumerRun]
) -> None:
    run = consumers(runtime, fault_proxy.dsn_for(installed), reconnect_initial_delay=60, **FAST)
    fault_proxy.refuse()
    fault_proxy.sever()
    wait_until(lambda: not run.consumer.connected, 5, "the consumer to lose its connection")
    run.stop()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_stop_while_connecting_to_a_server_that_never_answers(
    runtime: str,
    installed: str,
    fault_proxy: FaultProxy,
    silent_server: SilentServer,
    consumers: Callable[..., ConsumerRun],
) -> None:
    # Connected through the proxy first; then its reconnections go to a hung server.
    run = consumers(
        runtime, fault_proxy.dsn_for(installed), connect_timeout=60, reconnect_initial_delay=0.01
    )
    fault_proxy._target = ("127.0.0.1", silent_server.port)
    fault_proxy.sever()
    wait_until(lambda: not run.consumer.connected, 5, "the consumer to lose its connection")
    # Inside its (60 s) connection attempt once the hung server has accepted it.
    wait_until(lambda: silent_server.accepted, 5, "a connection attempt to the hung server")
    run.stop()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_stop_while_waiting_for_events(
    runtime: str, installed: str, consumers: Callable[..., ConsumerRun]
) -> None:
    run = consumers(runtime, installed, poll_interval=60)
    publish(installed, [1])
    wait_until(lambda: run.seen, 5, "an event")
    run.stop()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_stop_during_a_retry_delay(
    runtime: str, installed: str, consumers: Callable[..., ConsumerRun]
) -> None:
    attempts: list[int] = []

    def fail(e: pgherald.Event) -> None:
        attempts.append(e.id)
        raise RuntimeError("always fails")

    run = consumers(runtime, installed, handler=fail, retry_delay=60, max_attempts=5, **FAST)
    (event_id,) = publish(installed, [1])
    wait_until(lambda: attempts, 5, "the first attempt")
    run.stop()
    assert attempts == [event_id]
    run.close()  # its session (and partitions) gone
    # Not acknowledged: it comes again.
    with pgherald.Consumer(installed, group="g", channels=["ch"]) as c:
        assert next(iter(c)).id == event_id


@pytest.mark.parametrize("runtime", ["asyncio", "trio"])
def test_cancellation_inside_a_frozen_connection(
    runtime: str, installed: str, fault_proxy: FaultProxy
) -> None:
    publish(installed, [1])

    async def main() -> float:
        seen: list[int] = []
        async with pgherald.AsyncConsumer(
            fault_proxy.dsn_for(installed),
            group="g",
            channels=["ch"],
            health_check_timeout=30,
            poll_interval=0.1,
        ) as c:

            def handle(e: pgherald.Event) -> None:
                seen.append(e.id)
                c.stop()

            c.on("ch")(handle)
            with anyio.fail_after(10):  # on a busy server, the first read may take a while
                await c.run()
            assert seen
            fault_proxy.freeze()
            started = time.monotonic()
            with anyio.move_on_after(1.0):
                await c.run()  # blocked on the frozen connection after 0.1 s
            return time.monotonic() - started

    took = anyio.run(main, backend=runtime)
    assert took < 2.0, f"cancellation took {took:.2f}s"


def test_stop_before_run_is_honoured(installed: str) -> None:
    c = pgherald.Consumer(installed, group="g", channels=["ch"], poll_interval=60)
    c.on("ch")(lambda e: None)
    c.stop()
    started = time.monotonic()
    c.run()
    c.close()
    assert time.monotonic() - started < 1


@pytest.mark.anyio
async def test_async_stop_before_run_and_one_run_at_a_time(installed: str) -> None:
    c = pgherald.AsyncConsumer(installed, group="g", channels=["ch"], poll_interval=60)
    c.on("ch")(lambda e: None)
    c.stop()
    with anyio.fail_after(2):
        await c.run()
    async with anyio.create_task_group() as tg:
        tg.start_soon(c.run)
        await anyio.sleep(0.2)  # let the first run begin: nothing to wait on from outside
        with pytest.raises(pgherald.UsageError, match="already in use"):
            await c.run()
        c.stop()
    await c.aclose()


def test_sync_consumer_refuses_an_async_handler(installed: str) -> None:
    c = pgherald.Consumer(installed, group="g")

    async def handler(e: pgherald.Event) -> None:
        pass

    with pytest.raises(pgherald.UsageError, match="AsyncConsumer"):
        c.on("ch")(handler)


# -- transactional handlers --


@pytest.mark.parametrize("runtime", ["sync", "asyncio"])
def test_transactional_handler_that_fails_once_keeps_reading(
    runtime: str, installed: str, conn: psycopg.Connection
) -> None:
    """After a rollback, psycopg used to DEALLOCATE ALL, and the next read failed."""
    conn.execute("CREATE TABLE effects (id bigint PRIMARY KEY)")
    failed: list[int] = []
    options: dict[str, Any] = {"group": "g", "channels": ["ch"], "retry_delay": 0.01, **FAST}

    def check(e: pgherald.Event) -> None:
        if e.payload == 1 and not failed:
            failed.append(e.id)
            raise RuntimeError("fails once")

    if runtime == "sync":
        c: Any = pgherald.Consumer(installed, **options)

        @c.on("ch", transactional=True)
        def handle(e: pgherald.Event, tx: psycopg.Connection) -> None:
            tx.execute("INSERT INTO effects VALUES (%s)", (e.id,))
            check(e)
            if e.payload == 4:
                c.stop()

        target: Callable[[], None] = c.run
    else:
        c = pgherald.AsyncConsumer(installed, **options)

        @c.on("ch", transactional=True)
        async def ahandle(e: pgherald.Event, tx: psycopg.AsyncConnection) -> None:
            await tx.execute("INSERT INTO effects VALUES (%s)", (e.id,))
            check(e)
            if e.payload == 4:
                c.stop()

        def target() -> None:
            anyio.run(c.run, backend="asyncio")

    first = publish(installed, [1, 2])
    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def effects() -> list[int]:
        return [r[0] for r in conn.execute("SELECT id FROM effects ORDER BY id")]

    wait_until(lambda: effects() == first, 5, "the first two events' effects")
    later = publish(installed, [3, 4])  # read after the rollback: the read must still work
    thread.join(10)
    assert not thread.is_alive()
    assert effects() == first + later
    assert failed == [first[0]]
    assert c.stats.handler_errors == 1
    if runtime == "sync":
        c.close()
    else:
        anyio.run(c.aclose, backend="asyncio")


def test_a_handler_that_deallocates_all_leaves_the_statements_it_prepares_working(
    installed: str, conn: psycopg.Connection
) -> None:
    """
    The consumer prepares its recurring statements once per connection (the read, the
    acknowledgement, the membership and dead-letter looks); a transactional handler that
    runs DEALLOCATE ALL on that connection drops them: each is prepared again, no error.
    """
    c = pgherald.Consumer(installed, group="g", channels=["ch", "tx"], **FAST)
    seen: list[int] = []

    @c.on("ch")
    def plain(e: pgherald.Event) -> None:
        seen.append(e.id)

    @c.on("tx", transactional=True)
    def deallocates(e: pgherald.Event, tx: psycopg.Connection) -> None:
        before = tx.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()
        tx.execute("DEALLOCATE ALL")
        seen.append(e.id)
        assert before is not None
        assert before[0] >= 2  # the read's and the acknowledgement's

    thread = threading.Thread(target=c.run, daemon=True)
    thread.start()
    try:
        published: list[int] = []
        for round_ in range(3):
            for channel in ("ch", "tx", "ch"):
                (new,) = publish(installed, [round_], channel=channel)
                published.append(new)
                wait_until(lambda n=new: n in seen, 5, f"event on {channel} handled")
            time.sleep(0.25)  # time for a rebalance (the membership look) in each round
        wait_until(lambda: uncovered(conn, "g") == 0, 5, "every event acknowledged")
        assert seen == published
        assert c.stats.handler_errors == 0
        assert c.stats.reconnects == 0
    finally:
        c.stop()
        thread.join(10)
        c.close()
    assert not thread.is_alive()


class _Stuck:
    """
    A consumer of one runtime (sync or asyncio: transactional handlers) whose handler inserts
    each event's effect and, on its first call, sets `inside`, waits for `release`, then sends
    a statement into whatever fault the test made meanwhile (`failed`: how long it took to
    fail, and how). `calls`: when each call began.
    """

    def __init__(self, runtime: str, dsn: str, **options: Any) -> None:
        self.inside, self.release = threading.Event(), threading.Event()
        self.calls: list[float] = []
        self.failed: list[tuple[float, BaseException]] = []
        options = {"group": "g", "channels": ["ch"], "health_check_timeout": 30, **FAST, **options}
        if runtime == "sync":
            self.consumer: Any = pgherald.Consumer(dsn, **options)

            @self.consumer.on("ch", transactional=True)
            def handle(e: pgherald.Event, tx: psycopg.Connection) -> None:
                self.calls.append(time.monotonic())
                tx.execute("INSERT INTO effects VALUES (%s)", (e.id,))
                if len(self.calls) == 1:
                    self.inside.set()
                    self.release.wait(10)
                    with self._timed():
                        tx.execute("SELECT 1")  # into the fault

        else:
            self.consumer = pgherald.AsyncConsumer(dsn, **options)

            @self.consumer.on("ch", transactional=True)
            async def ahandle(e: pgherald.Event, tx: psycopg.AsyncConnection) -> None:
                self.calls.append(time.monotonic())
                await tx.execute("INSERT INTO effects VALUES (%s)", (e.id,))
                if len(self.calls) == 1:
                    self.inside.set()
                    await anyio.to_thread.run_sync(self.release.wait, 10)  # not our thread
                    with self._timed():
                        await tx.execute("SELECT 1")

    @contextlib.contextmanager
    def _timed(self) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        except BaseException as exc:
            self.failed.append((time.monotonic() - started, exc))
            raise


@pytest.mark.parametrize("runtime", ["sync", "asyncio"])
def test_stop_while_a_transactional_handler_waits_on_a_frozen_connection(
    runtime: str, installed: str, conn: psycopg.Connection, fault_proxy: FaultProxy
) -> None:
    """
    The handler's statement waits on a frozen connection (in psycopg, not in the engine):
    stop() gives it ``stop_timeout``, then shuts its connection (sync) or cancels it (async).
    run() returns, nothing is committed, and the event comes again, handled once.
    """
    conn.execute("CREATE TABLE effects (id bigint PRIMARY KEY)")
    stuck = _Stuck(runtime, fault_proxy.dsn_for(installed), stop_timeout=0.5)
    c = stuck.consumer

    def target() -> None:
        c.run() if runtime == "sync" else anyio.run(c.run, backend="asyncio")

    (event_id,) = publish(installed, [1])
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    assert stuck.inside.wait(10), "the handler never ran"
    fault_proxy.freeze()
    stuck.release.set()
    c.stop()
    started = time.monotonic()
    thread.join(10)
    took = time.monotonic() - started
    assert not thread.is_alive(), "run() did not return: the handler still waits"
    assert 0.4 <= took < 5, f"run() returned {took:.2f}s after stop() (stop_timeout 0.5)"
    fault_proxy.sever()  # the abandoned session (and its partitions) ends on the server too
    if runtime == "sync":
        c.close()
    else:
        anyio.run(c.aclose, backend="asyncio")
    assert conn.execute("SELECT count(*) FROM effects").fetchone() == (0,)
    # It comes again, to a consumer on a sound connection, and is handled once.
    seen: list[int] = []
    with pgherald.Consumer(installed, group="g", channels=["ch"], **FAST) as again:

        @again.on("ch", transactional=True)
        def redo(e: pgherald.Event, tx: psycopg.Connection) -> None:
            tx.execute("INSERT INTO effects VALUES (%s)", (e.id,))
            seen.append(e.id)
            again.stop()

        timer = threading.Timer(15, again.stop)  # a bound: the assertion below says why
        timer.start()
        again.run()
        timer.cancel()
    assert seen == [event_id]
    assert conn.execute("SELECT id FROM effects").fetchall() == [(event_id,)]


@pytest.mark.parametrize("runtime", ["sync", "asyncio"])
def test_a_transactional_handler_on_a_dead_path_fails_within_the_tcp_user_timeout(
    runtime: str, installed: str, conn: psycopg.Connection, fault_proxy: FaultProxy
) -> None:
    """
    The handler's statement goes into a path that died (the kernel drops every packet, so
    nothing it sends is acknowledged), and nobody calls stop(). The statement waits in
    psycopg, where no deadline of ours reaches; pgherald's connections set
    ``tcp_user_timeout=10000``, so it fails after about 10 s, not after Linux's 15 minutes of
    retransmissions. The transaction rolls back; once the path is back, the consumer
    reconnects and the event comes again, handled once. (Transactional handlers are sync or
    asyncio: see durable.md.)
    """
    conn.execute("CREATE TABLE effects (id bigint PRIMARY KEY)")
    stuck = _Stuck(runtime, fault_proxy.dsn_for(installed))
    c, failed = stuck.consumer, stuck.failed
    (event_id,) = publish(installed, [1])
    with ConsumerOnAThread(runtime, c) as running:
        assert stuck.inside.wait(10), "the handler never ran"
        with black_hole(fault_proxy.port):
            stuck.release.set()
            wait_until(lambda: failed, 20, "the handler's statement to fail on the dead path")
        took, exc = failed[0]
        assert isinstance(exc, psycopg.OperationalError), repr(exc)
        # tcp_user_timeout, rounded up to the next retransmission (their gaps double from 0.2 s)
        assert 9 <= took < 15, f"the statement failed after {took:.1f}s (tcp_user_timeout 10 s)"

        def committed() -> list[tuple[Any, ...]]:
            return conn.execute("SELECT id FROM effects").fetchall()

        wait_until(committed, 30, "the event to come again and its effect to commit")
        assert running.alive()
        assert len(stuck.calls) == 2, stuck.calls
        assert committed() == [(event_id,)]
        running.stop(within=5.0)
        assert running.error is None, repr(running.error)


@pytest.mark.parametrize("runtime", ["sync", "asyncio"])
def test_a_transactional_handler_frozen_past_its_transaction_timeout_is_given_up_and_comes_again(
    runtime: str, installed: str, conn: psycopg.Connection, fault_proxy: FaultProxy
) -> None:
    """
    The handler's statement waits on a frozen connection (a server process that hangs while
    its kernel still acknowledges: no TCP timeout fires), and nobody calls stop().
    ``transaction_timeout`` gives it up: its connection is shut (sync) or it is cancelled
    (async), the attempt counts as failed, run() goes on, and the event comes again on a new
    connection, its effect committed once.
    """
    conn.execute("CREATE TABLE effects (id bigint PRIMARY KEY)")
    stuck = _Stuck(runtime, fault_proxy.dsn_for(installed), transaction_timeout=1.0)
    c, calls = stuck.consumer, stuck.calls
    (event_id,) = publish(installed, [1])
    with ConsumerOnAThread(runtime, c) as running:
        assert stuck.inside.wait(10), "the handler never ran"
        fault_proxy.freeze()
        stuck.release.set()
        wait_until(lambda: c.stats.handler_errors, 10, "the handler to be given up")
        took = time.monotonic() - calls[0]
        assert took < 4, f"given up {took:.1f}s after the handler began (transaction_timeout 1)"
        # The frozen server process comes back and finds its client gone: its transaction
        # (and the row lock of its insert) goes.
        fault_proxy.sever()

        def committed() -> list[tuple[Any, ...]]:
            return conn.execute("SELECT id FROM effects").fetchall()

        wait_until(committed, 20, "the event to come again and its effect to commit")
        assert running.alive()
        assert len(calls) == 2, calls
        assert committed() == [(event_id,)]
        assert c.stats.handler_errors == 1
        assert pgherald.dead_letters(conn, "g") == []
        running.stop(within=5.0)
        assert running.error is None, repr(running.error)


def _sleeping(conn: psycopg.Connection) -> int:
    """Sessions running a handler's ``SELECT pg_sleep(60)`` on the server."""
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'"
    ).fetchone()
    return row[0] if row else 0


def _sleeper(
    runtime: str,
    dsn: str,
    calls: list[int],
    sleeps: Callable[[pgherald.Event], bool],
    *,
    fail_first: bool = False,
    **options: Any,
) -> Any:
    """
    A consumer (sync or asyncio) whose transactional handler notes each event's id in *calls*,
    inserts its effect (when *fail_first* is off; the first call raises when it is on), then
    runs ``SELECT pg_sleep(60)`` for the events *sleeps* names.
    """
    options = {"group": "g", "channels": ["ch"], **FAST, **options}
    if runtime == "sync":
        c: Any = pgherald.Consumer(dsn, **options)

        @c.on("ch", transactional=True)
        def handle(e: pgherald.Event, tx: psycopg.Connection) -> None:
            calls.append(e.id)
            if fail_first and len(calls) == 1:
                raise RuntimeError("fails")
            if not fail_first:
                tx.execute("INSERT INTO effects VALUES (%s)", (e.id,))
            if sleeps(e):
                tx.execute("SELECT pg_sleep(60)")

        return c
    c = pgherald.AsyncConsumer(dsn, **options)

    @c.on("ch", transactional=True)
    async def ahandle(e: pgherald.Event, tx: psycopg.AsyncConnection) -> None:
        calls.append(e.id)
        if fail_first and len(calls) == 1:
            raise RuntimeError("fails")
        if not fail_first:
            await tx.execute("INSERT INTO effects VALUES (%s)", (e.id,))
        if sleeps(e):
            await tx.execute("SELECT pg_sleep(60)")

    return c


@pytest.mark.parametrize("runtime", ["sync", "asyncio"])
def test_a_transactional_handler_that_always_outlasts_transaction_timeout_is_dead_lettered(
    runtime: str, installed: str, conn: psycopg.Connection
) -> None:
    """
    An event whose handler outlasts ``transaction_timeout`` every time is dead-lettered after
    ``max_attempts``, and the group moves on to the next event. Each given-up statement ends on
    the server within about a second (the consumer's sessions set
    ``client_connection_check_interval``), not when its pg_sleep(60) would have.
    """
    conn.execute("CREATE TABLE effects (id bigint PRIMARY KEY)")
    calls: list[int] = []
    slow, fine = publish(installed, [1, 2])
    c = _sleeper(
        runtime, installed, calls, lambda e: e.id == slow, transaction_timeout=0.5, max_attempts=2
    )

    with ConsumerOnAThread(runtime, c) as running:

        def committed() -> list[tuple[Any, ...]]:
            return conn.execute("SELECT id FROM effects ORDER BY id").fetchall()

        wait_until(lambda: committed() == [(fine,)], 20, "the next event's effect")
        assert running.alive()
        assert calls == [slow, slow, fine]
        (dead,) = pgherald.dead_letters(conn, "g")
        assert (dead.event_id, dead.attempts) == (slow, 2)
        assert dead.first_failed_at < dead.last_failed_at  # the first attempt's, not the last
        assert "transaction_timeout" in dead.error, dead.error
        assert c.stats.handler_errors == 2
        wait_until(lambda: _sleeping(conn) == 0, 3, "the given-up statements to end on the server")
        running.stop(within=5.0)
        assert running.error is None, repr(running.error)


@pytest.mark.parametrize("runtime", ["sync", "asyncio"])
def test_failures_and_timeouts_of_one_event_count_together(
    runtime: str, installed: str, conn: psycopg.Connection
) -> None:
    """A failure, then an attempt past transaction_timeout: with max_attempts=2 the event is
    dead-lettered after those two attempts (the count survives the reconnection)."""
    calls: list[int] = []
    (event_id,) = publish(installed, [1])
    c = _sleeper(
        runtime,
        installed,
        calls,
        lambda e: True,
        fail_first=True,
        transaction_timeout=0.5,
        max_attempts=2,
        retry_delay=0.01,
    )

    with ConsumerOnAThread(runtime, c) as running:
        wait_until(lambda: pgherald.dead_letters(conn, "g"), 20, "the dead letter")
        (dead,) = pgherald.dead_letters(conn, "g")
        assert (dead.event_id, dead.attempts) == (event_id, 2)
        assert "transaction_timeout" in dead.error, dead.error
        assert dead.first_failed_at < dead.last_failed_at  # the failure's, before the timeout
        assert calls == [event_id, event_id]
        assert c.stats.handler_errors == 2
        running.stop(within=5.0)


@pytest.mark.parametrize(("own", "expected"), [(None, "1s"), ("0", "0"), ("250ms", "250ms")])
def test_the_client_check_is_set_only_where_the_session_has_none(
    installed: str, own: str | None, expected: str
) -> None:
    """A DSN (or role, or server file) that sets client_connection_check_interval keeps it."""
    if own is not None:
        installed = make_conninfo(installed, options=f"-c client_connection_check_interval={own}")
    seen: list[str] = []
    with pgherald.Consumer(installed, group="g", channels=["ch"], **FAST) as c:

        @c.on("ch", transactional=True)
        def handle(e: pgherald.Event, tx: psycopg.Connection) -> None:
            row = tx.execute("SHOW client_connection_check_interval").fetchone()
            seen.append(row[0] if row else "")
            c.stop()

        publish(installed, [1])
        timer = threading.Timer(15, c.stop)  # a bound: the assertion below says why
        timer.start()
        c.run()
        timer.cancel()
    assert seen == [expected]


@pytest.mark.parametrize("runtime", ["sync", "asyncio"])
def test_a_transactional_handler_given_up_after_stop_ends_on_the_server_too(
    runtime: str, installed: str, conn: psycopg.Connection
) -> None:
    """
    stop() gives up a transactional handler in a long statement after ``stop_timeout``, and
    run() returns without a reconnection (which would end the old session). The statement's
    session ends on the server within about a second too, its transaction and locks with it
    (the consumer's sessions set ``client_connection_check_interval``), not after pg_sleep(60).
    """
    conn.execute("CREATE TABLE effects (id bigint PRIMARY KEY)")
    (event_id,) = publish(installed, [1])
    c = _sleeper(runtime, installed, [], lambda e: True, stop_timeout=0.3)
    with ConsumerOnAThread(runtime, c) as running:
        wait_until(lambda: _sleeping(conn), 10, "the handler's statement")
        running.stop(within=3.0)
        wait_until(lambda: _sleeping(conn) == 0, 4, "the given-up statement to end on the server")
        # The lock on the row its handler inserted went with it: the row can be written now.
        conn.execute("SET lock_timeout = '1s'")
        conn.execute("INSERT INTO effects VALUES (%s)", (event_id,))


# -- a server that restarts under a stream of 20,000 events --


def _publisher(dsn: str, total: int, batch: int, done: threading.Event) -> None:
    """Publish 0..total-1 in transactions of *batch*, surviving restarts, each value once."""
    conn: psycopg.Connection | None = None
    b = 0
    while b * batch < total:
        try:
            if conn is None or conn.closed or conn.broken:
                conn = psycopg.connect(dsn, autocommit=True, connect_timeout=2)
            with conn.transaction():
                for v in range(b * batch, min(total, (b + 1) * batch)):
                    pgherald.publish(conn, "ch", v)
            b += 1
        except (psycopg.OperationalError, pgherald.DatabaseConnectionError):
            conn = None
            # Did the batch commit before the connection went? Then do not publish it again.
            while True:
                try:
                    with psycopg.connect(dsn, autocommit=True, connect_timeout=2) as check:
                        row = check.execute(
                            "SELECT count(*) FROM pgherald.events_v1 WHERE payload = %s::jsonb",
                            (str(b * batch),),
                        ).fetchone()
                    break
                except psycopg.OperationalError:
                    time.sleep(0.05)  # the server is restarting: nothing to wait on but time
            if row and row[0]:
                b += 1
    if conn is not None:
        conn.close()
    done.set()


@pytest.mark.slow
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_twenty_thousand_events_across_two_server_restarts(
    runtime: str, server: OwnServer, consumers: Callable[..., ConsumerRun]
) -> None:
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        pgherald.install(conn)
    total, max_read = 20_000, 500
    run = consumers(
        runtime,
        server.dsn,
        batch_size=100,
        max_batch_size=max_read,
        reconnect_initial_delay=0.05,
        reconnect_max_delay=0.5,
        **FAST,
    )
    done = threading.Event()
    publisher = threading.Thread(target=_publisher, args=(server.dsn, total, 200, done))
    publisher.start()
    for at in (total // 4, total // 2):
        wait_until(lambda at=at: len(run.payloads) >= at, 60, f"{at} events")
        server.restart()
    publisher.join(120)
    assert done.is_set()
    wait_until(lambda: len(set(run.payloads)) >= total, 60, "every event")
    run.stop()
    assert sorted(set(run.payloads)) == list(range(total))  # none lost
    duplicates = len(run.payloads) - total
    assert duplicates <= 2 * max_read, f"{duplicates} events delivered twice"
    assert run.consumer.stats.reconnects >= 2


# -- what ends run(): only what retrying cannot fix --


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_dropped_database_ends_run_after_three_attempts(
    runtime: str, server: OwnServer, consumers: Callable[..., ConsumerRun]
) -> None:
    with psycopg.connect(server.dsn, autocommit=True) as admin:
        admin.execute("CREATE DATABASE doomed")
    dsn = server.dsn.rsplit("/", 1)[0] + "/doomed"
    with psycopg.connect(dsn, autocommit=True) as conn:
        pgherald.install(conn)
    run = consumers(runtime, dsn, reconnect_initial_delay=0.05, reconnect_max_delay=0.1, **FAST)
    with psycopg.connect(server.dsn, autocommit=True) as admin:
        admin.execute("DROP DATABASE doomed WITH (FORCE)")
    run.thread.join(10)
    assert not run.thread.is_alive()
    assert isinstance(run.error, pgherald.ConnectionLost), repr(run.error)
    assert 'database "doomed" does not exist' in str(run.error)
    assert run.consumer.stats.connect_failures == 3


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_schema_dropped_under_a_running_consumer_says_install(
    runtime: str, installed: str, conn: psycopg.Connection, consumers: Callable[..., ConsumerRun]
) -> None:
    run = consumers(runtime, installed, **FAST)
    pgherald.uninstall(conn)
    run.thread.join(10)
    assert not run.thread.is_alive()
    assert isinstance(run.error, pgherald.SchemaMissing), repr(run.error)
    assert "pgherald install" in str(run.error)


_QUIET = {  # a consumer that sends nothing but acknowledgements while wake-ups flow
    "poll_interval": 30.0,
    "rebalance_interval": 30.0,
    "health_check_interval": 30.0,
    "health_check_timeout": 20.0,
    "linger": 30.0,
}


def _one_way(dsn: str) -> OneWayProxy:
    with psycopg.connect(dsn, autocommit=True) as conn:
        pgherald.install(conn)
    return OneWayProxy(_target_of(dsn))


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_stop_while_an_acknowledgement_waits_for_its_answer(
    runtime: str, server: OwnServer, consumers: Callable[..., ConsumerRun]
) -> None:
    """
    stop() with an acknowledgement sent and its answer held (a link broken one way), more
    events handed out since: run() returns within a second (one stop grace for the way out),
    and what was not acknowledged comes again.
    """
    proxy = _one_way(server.dsn)
    try:
        run = consumers(runtime, proxy.dsn_for(server.dsn), **_QUIET)
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            published: list[int] = []
            while run.consumer.stats.from_wakeups < 3:
                assert len(published) < 200, "no events came from their wake-ups"
                published.append(pgherald.publish(conn, "ch", len(published)))
                wait_until(lambda: published[-1] in run.seen, 10, "the event handled")
            wait_until(lambda: uncovered(conn, "g") == 0, 5, "the first acknowledgements")
            assert proxy.freeze_requests() >= 1
            published.append(pgherald.publish(conn, "ch", "held"))
            wait_until(lambda: b"pgherald_ack_v1" in proxy.held(), 5, "an acknowledgement sent")
            published.append(pgherald.publish(conn, "ch", "after"))
            wait_until(lambda: published[-1] in run.seen, 10, "the last event handled")
            run.stop(within=1.0)
            assert run.seen == published
            assert uncovered(conn, "g") == 2
    finally:
        proxy.close()
    again = consumers(runtime, server.dsn)
    wait_until(lambda: len(again.seen) == 2, 10, "the two events again")
    assert again.seen == published[-2:]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_events_from_wakeups_do_not_wait_for_an_acknowledgement(
    runtime: str, server: OwnServer, consumers: Callable[..., ConsumerRun]
) -> None:
    """
    Handing out events from their wake-ups, a consumer sends its (deferred) acknowledgements
    without waiting for the answer: a wake-up that arrives meanwhile is handed out at once.
    Here what the consumer sends is held (a link broken one way: the server's wake-ups still
    arrive), so an acknowledgement gets no answer for a second; events published meanwhile
    are all handled. Once released, everything is acknowledged, on the same connection.
    A private server: a transaction of another test's (any database) running when an event
    is stored makes the consumer read, which the broken link holds.
    """
    installed = server.dsn
    proxy = _one_way(installed)
    try:
        run = consumers(runtime, proxy.dsn_for(installed), **_QUIET)
        with psycopg.connect(installed, autocommit=True) as conn:
            published: list[int] = []

            def publish_and_wait(i: int, key: str | None = None) -> None:
                published.append(pgherald.publish(conn, "ch", {"i": i}, key=key))
                wait_until(lambda: published[-1] in run.seen, 10, f"event {i} handled")

            while run.consumer.stats.from_wakeups < 3:
                assert len(published) < 200, "no events came from their wake-ups"
                publish_and_wait(len(published))
            wait_until(lambda: uncovered(conn, "g") == 0, 5, "the first acknowledgements")
            # Two keys of two partitions: the held acknowledgement covers the first one's, the
            # next one the second's only.
            keys = conn.execute(
                "SELECT 'a', (SELECT k FROM (VALUES ('b'), ('c'), ('d'), ('e')) AS v(k)"
                "             WHERE hashtext(k) & 15 <> hashtext('a') & 15 LIMIT 1)"
            ).fetchone()
            assert keys is not None
            assert proxy.freeze_requests() >= 1
            frozen_at = time.monotonic()
            during = len(published)
            publish_and_wait(during, keys[0])
            wait_until(lambda: b"pgherald_ack_v1" in proxy.held(), 5, "an acknowledgement sent")
            while time.monotonic() < frozen_at + 1.0:
                publish_and_wait(len(published), keys[1])
            # An acknowledgement went out meanwhile, and is held: no answer yet.
            assert b"pgherald_ack_v1" in proxy.held()  # (prepared: its name in the Bind)
            assert uncovered(conn, "g") == len(published) - during
            proxy.thaw_requests()
            wait_until(lambda: uncovered(conn, "g") == 0, 5, "the held acknowledgement")
            # Once all is acknowledged, nothing counts as handed out but unacknowledged (which
            # would make the next poll drop the cursor and stop taking events from wake-ups).
            engine = run.consumer._engine
            wait_until(
                lambda: engine._ack_in_flight is None and not engine._deferred, 5, "the answers"
            )
            assert engine._handed_out == {}
        assert run.seen == published
        assert run.consumer.stats.reconnects == 0
        assert len(published) - during >= 20  # (1 ms apart on an idle machine)
    finally:
        proxy.close()
