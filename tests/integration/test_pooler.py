"""
Behind a real PgBouncer, every class: transaction mode fails at once and clearly where it cannot
work (listeners, consumers, the relay; a change stream in any mode), works where it can
(publishing, the scheduler, a change stream's log connection); session mode works; a pooler
killed and started again is survived like a lost server.

In transaction mode every statement may run on a different server connection, so a LISTEN
does not stay in effect: a listener that passed ``SELECT 1`` health checks used to receive
nothing, silently. The start-up delivery check (a NOTIFY from a second connection that must
reach the listening one) turns that into `PoolerError` within 5 s.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import psycopg
import pytest

import pgherald
from tests.fix_durable import (
    ConsumerRun,
    Running,
    SchedulerRun,
    log_payloads,
    publish_delayed,
    publish_each,
    wait_until,
)
from tests.fix_pgbouncer import start_pgbouncer

POOLER_MESSAGE = r"pool_mode=transaction.*session-mode pool.*direct DSN"


@pytest.mark.parametrize("mode", ["transaction", "statement"])
def test_listener_behind_transaction_pooler_fails_at_once_with_the_fix(dsn: str, mode: str) -> None:
    with start_pgbouncer(dsn, mode) as bouncer:
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


@pytest.mark.parametrize("mode", ["transaction", "statement"])
def test_consumer_behind_transaction_pooler_fails_at_once(installed: str, mode: str) -> None:
    with start_pgbouncer(installed, mode) as bouncer:
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


@pytest.mark.parametrize("runtime", ["asyncio", "trio"])
def test_async_consumer_behind_session_pooler_works(
    runtime: str, installed: str, consumers: Callable[..., ConsumerRun]
) -> None:
    with start_pgbouncer(installed, "session") as bouncer:
        run = consumers(runtime, bouncer.dsn, poll_interval=0.1)
        ids = publish_each(installed, [0, 1, 2])
        wait_until(lambda: len(run.seen) >= 3, 5, "3 events through the pooler")
        run.stop()
    assert run.seen == ids


# -- the pooler killed and started again: every class comes back through it --


RUNTIMES = ["sync", "asyncio", "trio"]
BACK = {"reconnect_initial_delay": 0.05, "reconnect_max_delay": 0.2}


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_consumer_survives_a_pooler_restart(
    runtime: str, installed: str, consumers: Callable[..., ConsumerRun]
) -> None:
    with start_pgbouncer(installed, "session") as bouncer:
        run = consumers(runtime, bouncer.dsn, poll_interval=0.2, rebalance_interval=0.2, **BACK)
        ids = publish_each(installed, [0, 1])
        wait_until(lambda: len(run.seen) >= 2, 5, "the first events")
        bouncer.kill()
        ids += publish_each(installed, [2, 3])  # while the pooler is down
        wait_until(lambda: run.consumer.stats.connect_failures >= 2, 5, "refused reconnections")
        bouncer.start()
        wait_until(lambda: set(ids) <= set(run.seen), 10, "the events published meanwhile")
        ids += publish_each(installed, [4])
        wait_until(lambda: set(ids) <= set(run.seen), 10, "the event after")
        assert run.consumer.stats.reconnects == 1
        run.stop()
    assert list(dict.fromkeys(run.seen)) == ids  # each at least once (the last ack may be lost)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_listener_survives_a_pooler_restart(runtime: str, dsn: str) -> None:
    heard: list[str] = []
    gaps: list[pgherald.Gap] = []
    with start_pgbouncer(dsn, "session") as bouncer:
        options: dict[str, Any] = {"on_gap": gaps.append, **BACK}
        cls: Any = pgherald.Listener if runtime == "sync" else pgherald.AsyncListener
        listener = cls(bouncer.dsn, **options)
        listener.on("orders")(lambda n: heard.append(n.payload))
        errors: list[BaseException] = []

        def main() -> None:
            try:
                listener.run() if runtime == "sync" else anyio.run(listener.run, backend=runtime)
            except BaseException as exc:  # kept for the test
                errors.append(exc)

        thread = threading.Thread(target=main, daemon=True)
        thread.start()
        try:
            wait_until(lambda: "orders" in listener.listening or errors, 10, "LISTEN")
            _notify(dsn, "orders", "before")
            wait_until(lambda: heard == ["before"], 5, "the first notification")
            bouncer.kill()
            wait_until(lambda: listener.stats.connect_failures >= 2 or errors, 5, "refusals")
            bouncer.start()
            wait_until(lambda: listener.stats.reconnects == 1 or errors, 10, "the reconnection")
            wait_until(lambda: "orders" in listener.listening, 5, "LISTEN again")
            _notify(dsn, "orders", "after")
            wait_until(lambda: heard == ["before", "after"], 5, "the notification after")
        finally:
            listener.stop()
            thread.join(5)
            if runtime == "sync":
                listener.close()
            else:
                anyio.run(listener.aclose, backend="asyncio")
        assert not errors, errors
    assert len(gaps) == 1  # the outage is reported once, as a gap
    assert gaps[0].attempts >= 2


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_scheduler_survives_a_pooler_restart(
    runtime: str, installed: str, schedulers: Callable[..., SchedulerRun]
) -> None:
    with start_pgbouncer(installed, "session") as bouncer:
        run = schedulers(runtime, bouncer.dsn, max_wait=0.2, **BACK)
        bouncer.kill()
        publish_delayed(installed, "during")
        wait_until(lambda: run.scheduler.connect_failures >= 2, 5, "refused reconnections")
        bouncer.start()
        wait_until(lambda: log_payloads(installed) == ["during"], 10, "the delayed event")
        assert run.scheduler.reconnects == 1
        run.stop()


# -- what works through a transaction- or statement-mode pooler, and what says why not --


@pytest.mark.parametrize("mode", ["transaction", "statement"])
@pytest.mark.parametrize("runtime", ["sync", "asyncio"])  # psycopg's AsyncConnection: not trio
def test_publishing_through_a_pooler_wakes_a_waiting_consumer(
    runtime: str, mode: str, installed: str, running: Callable[..., Running]
) -> None:
    # publish / publish_many and their async twins, on connections through the pooler, one
    # statement each (so statement mode too); a consumer connected directly, which reads only
    # every 60 s by itself, gets each event within 5 s: its wake-ups pass through the pooler.
    consumer = running(poll_interval=60, rebalance_interval=60)
    with start_pgbouncer(installed, mode) as bouncer:
        ids: list[int] = []

        def publish_one(i: int) -> None:
            # More statements than psycopg's prepare threshold (5): no prepared statement
            # outlives its transaction, so prepare_threshold=None as psycopg advises.
            if runtime == "sync":
                with psycopg.connect(bouncer.dsn, autocommit=True, prepare_threshold=None) as c:
                    if i % 2:
                        ids.extend(pgherald.publish_many(c, "ch", [i, -i]))
                    else:
                        ids.append(pgherald.publish(c, "ch", i))
                return

            async def main() -> None:
                async with await psycopg.AsyncConnection.connect(
                    bouncer.dsn, autocommit=True, prepare_threshold=None
                ) as c:
                    if i % 2:
                        ids.extend(await pgherald.apublish_many(c, "ch", [i, -i]))
                    else:
                        ids.append(await pgherald.apublish(c, "ch", i))

            anyio.run(main, backend=runtime)

        i = 0
        # Each kind, then single events until one comes from its note (the event itself, in
        # the wake-up: a consumer takes notes once it has proven it may, see test_wakeup_events).
        while i < 8 or consumer.consumer.stats.from_wakeups == 0:
            assert i < 60, "no event came from its note through the pooler"
            publish_one(i if i < 8 else 2 * i)
            wanted = len(ids)
            wait_until(lambda n=wanted: len(consumer.seen) >= n, 5, f"event {i} from its wake-up")
            i += 1
    assert consumer.ids == ids


def test_publishing_in_a_transaction_through_a_transaction_pooler(installed: str) -> None:
    with (
        start_pgbouncer(installed, "transaction") as bouncer,
        psycopg.connect(bouncer.dsn, autocommit=True, prepare_threshold=None) as c,
    ):
        with c.transaction():
            kept = [pgherald.publish(c, "ch", i) for i in range(7)]
        with contextlib.suppress(RuntimeError), c.transaction():
            pgherald.publish(c, "ch", "rolled back")
            raise RuntimeError("roll back")
    assert log_payloads(installed) == list(range(7))
    assert len(kept) == 7


@pytest.mark.parametrize("mode", ["transaction", "statement"])
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_scheduler_through_a_pooler(
    runtime: str, mode: str, installed: str, schedulers: Callable[..., SchedulerRun]
) -> None:
    # Its LISTEN does not stay behind such a pooler: it finds due work every max_wait instead.
    with start_pgbouncer(installed, mode) as bouncer:
        run = schedulers(runtime, bouncer.dsn, max_wait=0.2)
        publish_delayed(installed, "due")
        wait_until(lambda: log_payloads(installed) == ["due"], 5, "the delayed event")
        with psycopg.connect(installed, autocommit=True) as conn:
            pgherald.add_schedule(conn, "yearly", "0 0 1 1 *", channel="ticks")
            conn.execute("UPDATE pgherald.schedules_v1 SET next_tick = now() - interval '1 s'")
        wait_until(lambda: run.scheduler.ticks == 1, 5, "the tick")
        run.stop()


@pytest.mark.parametrize("mode", ["session", "transaction"])
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_change_stream_behind_a_pooler_fails_at_once_with_the_fix(
    runtime: str, mode: str, cdc_dsn: str
) -> None:
    with psycopg.connect(cdc_dsn, autocommit=True) as c:
        c.execute("CREATE TABLE t (id int PRIMARY KEY)")
    with start_pgbouncer(cdc_dsn, mode) as bouncer:
        t0 = time.monotonic()
        with pytest.raises(pgherald.PoolerError) as info:
            _first_change(runtime, bouncer.dsn)
        elapsed = time.monotonic() - t0
    assert elapsed < 5, f"took {elapsed:.2f}s"
    message = str(info.value)
    assert "unsupported startup parameter: replication" in message
    assert "direct DSN" in message


def test_change_stream_into_the_log_through_a_transaction_pooler(cdc_dsn: str) -> None:
    # The replication connection goes direct; the log's connection may use the pooler.
    with psycopg.connect(cdc_dsn, autocommit=True) as c:
        pgherald.install(c)
        c.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    with start_pgbouncer(cdc_dsn, "transaction") as bouncer:
        stream = pgherald.ChangeStream(cdc_dsn, slot="s", tables=["t"], read_coalesce=0)
        errors: list[BaseException] = []

        def main() -> None:
            try:
                stream.into_log(bouncer.dsn)
            except BaseException as exc:  # kept for the test
                errors.append(exc)

        thread = threading.Thread(target=main, daemon=True)
        thread.start()
        try:
            with psycopg.connect(cdc_dsn, autocommit=True) as c:
                wait_until(
                    lambda: (
                        c.execute(
                            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 's' "
                            "AND active AND confirmed_flush_lsn IS NOT NULL"
                        ).fetchone()
                        == (1,)
                        or errors
                    ),
                    10,
                    "the stream to start",
                )
                for i in range(3):
                    with c.transaction():
                        c.execute("INSERT INTO t VALUES (%s, 'x')", (i,))
                        c.execute("UPDATE t SET v = 'y' WHERE id = %s", (i,))
                wait_until(
                    lambda: (
                        c.execute("SELECT count(*) FROM pgherald.events_v1").fetchone() == (6,)
                        or errors
                    ),
                    10,
                    "6 changes in the log",
                )
                rows = c.execute(
                    "SELECT payload->>'op', payload->'new'->>'id' FROM pgherald.events_v1 "
                    "ORDER BY id"
                ).fetchall()
        finally:
            stream.stop()
            thread.join(5)
    assert not errors, errors
    assert rows == [(op, str(i)) for i in range(3) for op in ("INSERT", "UPDATE")]


def test_relay_behind_a_transaction_pooler_fails_at_once(installed: str) -> None:
    with start_pgbouncer(installed, "transaction") as bouncer:
        relay = pgherald.Relay(bouncer.dsn, to="https://127.0.0.1:9/hook", channels=["ch"])
        t0 = time.monotonic()
        with pytest.raises(pgherald.PoolerError, match=POOLER_MESSAGE):
            relay.run()
    assert time.monotonic() - t0 < 5.5


def _first_change(runtime: str, dsn: str) -> None:
    options: dict[str, Any] = {"slot": "s", "tables": ["t"]}
    if runtime == "sync":
        with pgherald.ChangeStream(dsn, **options) as stream:
            next(iter(stream))
        return

    async def main() -> None:
        async with pgherald.AsyncChangeStream(dsn, **options) as stream:
            await stream.__anext__()

    anyio.run(main, backend=runtime)
