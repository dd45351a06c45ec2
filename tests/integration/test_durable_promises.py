"""
Promises of docs/durable.md and docs/errors.md that no other test checked, through a real server.

Each test names the sentence it holds the library to. They are the ones a demanding user meets
first: a consumer that cannot connect must say so at once (not retry a typo for ever), a
consumer handed a connection must not take it over, its payload decoder must be the one it was
given, a publish that cannot be stored must say why, retention must not stall publishers, a
dead letter whose event is gone must stop nothing, and a delayed event whose wake-up was never
sent must still be released.

The module runs on a server of its own: several tests wait for durable events, which another
test's open transaction on the shared server would hold back (tests/fix_quiet.py).
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import anyio
import psycopg
import psycopg2
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pgherald
from tests.fix_db import sqlalchemy_engine
from tests.fix_durable import FAST, ConsumerRun, drain, publish_each, uncovered, wait_until
from tests.fix_faults import FaultProxy
from tests.fix_quiet import database_dropper, server_dsn  # noqa: F401 (a server of our own)
from tests.integration.test_errormap import DRIVERS, Opener, run

RUNTIMES = ["sync", "asyncio", "trio"]
DAY = timedelta(days=1)


def is_driver_error(exc: BaseException | None) -> bool:
    return type(exc).__module__.split(".")[0] in ("psycopg", "psycopg2", "sqlalchemy")


# -- durable.md "Connection loss": "The first connection (`with`, `connect()`, or `run()` on a
# consumer never connected) fails at once with `ConnectError` instead." errors.md: "The message
# names the target as `user@host:port/dbname`, never with the password". --


def _first_connection(runtime: str, source: str, how: str) -> tuple[BaseException, float]:
    """What the consumer's first connection raised, *how* it was made; the seconds it took."""
    options: dict[str, Any] = {"group": "g", "channels": ["ch"], "reconnect_initial_delay": 0.05}
    started = time.monotonic()
    if runtime == "sync":
        consumer = pgherald.Consumer(source, **options)
        consumer.on("ch")(lambda e: None)
        try:
            if how == "with":
                with consumer:
                    pass
            elif how == "connect":
                consumer.connect()
            else:
                consumer.run()
        except Exception as exc:
            return exc, time.monotonic() - started
        finally:
            consumer.close()
        raise AssertionError(f"{how} on a consumer that cannot connect returned")

    async def main() -> BaseException:
        consumer = pgherald.AsyncConsumer(source, **options)
        consumer.on("ch")(lambda e: None)
        try:
            with anyio.fail_after(10):  # a consumer that retries for ever: fail, not hang
                if how == "with":
                    async with consumer:
                        pass
                elif how == "connect":
                    await consumer.connect()
                else:
                    await consumer.run()
        except Exception as exc:
            return exc
        finally:
            await consumer.aclose()
        raise AssertionError(f"{how} on a consumer that cannot connect returned")

    return anyio.run(main, backend=runtime), time.monotonic() - started


@pytest.mark.parametrize("how", ["with", "connect", "run"])
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_consumers_first_connection_fails_at_once_with_connect_error(
    runtime: str, how: str, dsn: str, fault_proxy: FaultProxy
) -> None:
    # A database that does not exist (what a typo in the DSN gives), with a password that the
    # message must not show: refused by the server itself.
    params = conninfo_to_dict(dsn)
    missing = make_conninfo(dsn, dbname="no_such_db_here", password="s3cret-pw")
    exc, took = _first_connection(runtime, missing, how)
    assert type(exc) is pgherald.ConnectError, repr(exc)  # not ConnectionLost after retries
    target = f"{params['user']}@{params['host']}:{params['port']}/no_such_db_here"
    assert f"cannot connect to PostgreSQL at {target}" in str(exc)
    assert 'database "no_such_db_here" does not exist' in str(exc)
    assert "s3cret-pw" not in str(exc)
    assert "s3cret-pw" not in repr(exc.args)
    assert took < 3, f"{how} took {took:.2f}s to fail"
    # A server that refuses connections (down): reconnecting would go on for ever by default
    # (reconnect_max_attempts=None), so only failing at once ends this.
    fault_proxy.refuse()
    exc, took = _first_connection(runtime, fault_proxy.dsn_for(dsn), how)
    assert type(exc) is pgherald.ConnectError, repr(exc)
    assert "cannot connect to PostgreSQL at" in str(exc)
    assert took < 3, f"{how} took {took:.2f}s to fail"


# -- durable.md "What it accepts": "a DSN or URL (SQLAlchemy-style `postgresql+psycopg2://`
# too), a psycopg 3 or psycopg2 connection, or a SQLAlchemy `Engine`/`Connection`: it takes the
# connection parameters and opens a connection of its own (it holds session locks, so it must
# own one)." --


@contextmanager
def _source(kind: str, dsn: str) -> Iterator[tuple[Any, int | None, Callable[[], Any]]]:
    """(what to give the consumer, the pid of the caller's own session, a check that it works)."""
    if kind == "psycopg":
        # An application's usual connection: not in autocommit mode, inside a transaction (a
        # listener refuses to be lent one; a consumer takes its parameters only).
        with psycopg.connect(dsn) as c:
            c.execute("SELECT 1")
            yield c, c.info.backend_pid, lambda: c.execute("SELECT 1").fetchone()
    elif kind == "psycopg2":
        c2 = psycopg2.connect(dsn)
        try:

            def check2() -> Any:
                cur = c2.cursor()
                cur.execute("SELECT 1")
                return cur.fetchone()

            yield c2, c2.get_backend_pid(), check2
        finally:
            c2.close()
    elif kind in ("sa_engine", "sa_connection"):
        engine = sqlalchemy_engine(dsn)
        try:
            with engine.connect() as sa_conn:
                pid = sa_conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
                sa_conn.commit()

                def check_sa() -> Any:
                    return sa_conn.exec_driver_sql("SELECT 1").fetchone()

                yield (engine if kind == "sa_engine" else sa_conn), pid, check_sa
        finally:
            engine.dispose()
    else:  # a SQLAlchemy-style URL
        p = conninfo_to_dict(dsn)
        url = f"postgresql+psycopg2://{p['user']}@{p['host']}:{p['port']}/{p['dbname']}"
        yield url, None, lambda: (1,)


@pytest.mark.parametrize("kind", ["psycopg", "psycopg2", "sa_engine", "sa_connection", "sa_url"])
def test_a_consumer_given_a_connection_or_an_engine_opens_its_own(
    kind: str, installed: str, conn: psycopg.Connection
) -> None:
    (event_id,) = publish_each(installed, [{"n": 1}])
    with _source(kind, installed) as (source, own_pid, still_works):
        with pgherald.Consumer(source, group="g", channels=["ch"], **FAST) as c:
            assert [e.id for e in drain(c, 1)] == [event_id]
            pid = c.backend_pid
            assert pid is not None
            assert pid != own_pid
            # Its session is a consumer's, holding the group's locks: not the caller's.
            row = conn.execute(
                "SELECT application_name FROM pg_stat_activity WHERE pid = %s", (pid,)
            ).fetchone()
            assert row is not None
            assert row[0].startswith("pgherald-consumer"), row
        # The caller's connection was not taken over: it works, its transaction left open.
        assert still_works() == (1,)
        if kind == "psycopg":
            assert source.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    assert uncovered(conn, "g", "ch") == 0  # acknowledged through its own session


def test_an_async_consumer_given_an_async_connection_opens_its_own(
    installed: str, conn: psycopg.Connection
) -> None:
    """psycopg's AsyncConnection runs on asyncio only (psycopg issue #29): asyncio alone."""
    (event_id,) = publish_each(installed, [{"n": 1}])

    async def main() -> tuple[list[int], int | None, int]:
        async with await psycopg.AsyncConnection.connect(installed) as ac:
            await ac.execute("SELECT 1")  # inside a transaction of the caller's
            got: list[int] = []
            async with pgherald.AsyncConsumer(ac, group="g", channels=["ch"], **FAST) as c:
                with anyio.fail_after(10):
                    async for e in c:
                        got.append(e.id)
                        c.stop()
                pid = c.backend_pid
            assert await (await ac.execute("SELECT 1")).fetchone() == (1,)
            assert ac.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
            return got, pid, ac.info.backend_pid

    got, pid, own_pid = anyio.run(main, backend="asyncio")
    assert got == [event_id]
    assert pid is not None
    assert pid != own_pid
    assert uncovered(conn, "g", "ch") == 0


# -- durable.md, `Consumer` options: "`json_loads` | `json.loads` | payload decoder". An
# amount published as 19.99 must reach a handler given `parse_float=Decimal` as a Decimal,
# whether the event came by a read (a backlog: one parse for the batch) or from its wake-up. --


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_json_loads_decodes_every_payload_read_or_from_a_wakeup(
    runtime: str, installed: str, consumers: Callable[..., ConsumerRun]
) -> None:
    backlog = publish_each(installed, [{"amount": 19.99, "i": i} for i in range(5)])
    run = consumers(
        runtime,
        installed,
        json_loads=functools.partial(json.loads, parse_float=Decimal),
        poll_interval=3.0,  # the later events come from their wake-ups, not from polls
        rebalance_interval=0.2,
    )
    wait_until(lambda: len(run.seen) >= 5, 10, "the backlog")
    assert run.seen == backlog
    # One at a time while it waits, until one comes from its wake-up (a read before that).
    deadline = time.monotonic() + 20
    while run.consumer.stats.from_wakeups == 0:
        assert time.monotonic() < deadline, "no event came from its wake-up"
        n = len(run.seen)
        publish_each(installed, [{"amount": 0.1, "i": n}], key="k")
        wait_until(lambda n=n: len(run.seen) > n, 10, "the event")
    assert all(isinstance(p["amount"], Decimal) for p in run.payloads), run.payloads
    assert run.payloads[0]["amount"] == Decimal("19.99")
    assert run.payloads[-1]["amount"] == Decimal("0.1")


# -- errors.md `TransactionStateError`: "`notify`, `publish` (or their async forms) ran in a
# transaction where an earlier statement failed (`current transaction is aborted`)...
# SQLAlchemy's `PendingRollbackError` gives the same error." And "`notify`, `publish` and their
# async forms raise [`ConnectionLost`] too when your connection is closed or broke under them";
# "`exc.sqlstate` is ... a connection-class code (`08003`, `08006`) when the driver found the
# connection closed or broken and the server said nothing". --


def _publishes(c: Any) -> dict[str, Callable[[], object]]:
    return {
        "publish": lambda: pgherald.publish(c, "ch", {"n": 1}),
        "publish_many": lambda: pgherald.publish_many(c, "ch", [{"n": 2}, {"n": 3}]),
        "delayed": lambda: pgherald.publish(c, "ch", 4, deliver_after=timedelta(seconds=60)),
    }


@DRIVERS
def test_publish_in_a_failed_transaction_is_a_transaction_state_error(
    installed: str, conn: psycopg.Connection, opener: Opener
) -> None:
    with opener(installed) as c:
        with pytest.raises(Exception, match="division by zero"):
            run(c, "SELECT 1/0")
        for what, call in _publishes(c).items():
            with pytest.raises(pgherald.TransactionStateError, match="roll it back") as info:
                call()
            assert info.value.sqlstate == "25P02", what
            assert is_driver_error(info.value.__cause__), what
        # The fix the message gives works: roll back, redo.
        c.rollback()
        event_id = pgherald.publish(c, "ch", {"n": 5})
        c.commit()
    rows = conn.execute("SELECT id FROM pgherald.events_v1").fetchall()
    assert rows == [(event_id,)]  # nothing of the failed transaction
    assert conn.execute("SELECT count(*) FROM pgherald.scheduled_v1").fetchone() == (0,)


def test_apublish_in_a_failed_transaction_is_a_transaction_state_error(
    installed: str, conn: psycopg.Connection
) -> None:
    """The async form, on psycopg's AsyncConnection (asyncio only: psycopg issue #29)."""

    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(installed) as ac:
            with pytest.raises(psycopg.errors.DivisionByZero):
                await ac.execute("SELECT 1/0")
            with pytest.raises(pgherald.TransactionStateError, match="roll it back") as info:
                await pgherald.apublish(ac, "ch", {"n": 1})
            assert info.value.sqlstate == "25P02"
            with pytest.raises(pgherald.TransactionStateError, match="roll it back"):
                await pgherald.apublish_many(ac, "ch", [1, 2])

    anyio.run(main, backend="asyncio")
    assert conn.execute("SELECT count(*) FROM pgherald.events_v1").fetchone() == (0,)


@DRIVERS
def test_publish_on_a_closed_or_broken_connection_is_connection_lost(
    installed: str, conn: psycopg.Connection, opener: Opener
) -> None:
    with opener(installed) as c:
        c.close()
        for what, call in _publishes(c).items():
            with pytest.raises(pgherald.ConnectionLost, match="open a new one") as info:
                call()
            # The driver found it closed, the server said nothing: a connection-class code.
            assert info.value.sqlstate == "08003", what
            assert is_driver_error(info.value.__cause__), what
    with opener(installed) as c:
        pid = run(c, "SELECT pg_backend_pid()")
        c.commit()
        assert conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
        wait_until(
            lambda: (
                not conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
            ),
            5,
            "the terminated session to end",
        )
        with pytest.raises(pgherald.ConnectionLost, match="open a new one") as info:
            pgherald.publish(c, "ch", {"n": 1})
        # The server's own code when it said why (57P01), else a connection-class one.
        assert info.value.sqlstate in ("57P01", "08003", "08006"), info.value.sqlstate
    assert conn.execute("SELECT count(*) FROM pgherald.events_v1").fetchone() == (0,)


# -- durable.md "Retention": "Dropping a partition locks the log for a moment; `maintain` waits
# for that lock at most 500 ms and leaves a busy day for the next run (`busy`)." and "publishers
# wait at most tens of milliseconds meanwhile". --


def _day_name(at: datetime) -> str:
    return "events_v1_p" + at.astimezone(timezone.utc).strftime("%Y%m%d")


def _old_days(conn: psycopg.Connection, days: range) -> list[str]:
    """One event in each of *days* (days ago), each day its own partition; their names."""
    today = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
    for d in days:
        pgherald.maintain(conn, now=today - d * DAY)  # its partition (and the next three)
        conn.execute(
            "INSERT INTO pgherald.events_v1 (channel, payload, created_at) VALUES ('ch', '1', %s)",
            (today - d * DAY,),
        )
    return [_day_name(today - d * DAY) for d in days]


def _partitions(conn: psycopg.Connection) -> set[str]:
    rows = conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'pgherald.events_v1'::regclass"
    )
    return {r[0] for r in rows}


def test_maintain_leaves_busy_days_for_the_next_run_without_holding_publishers(
    installed: str, conn: psycopg.Connection
) -> None:
    oldest, *busy = _old_days(conn, range(46, 39, -1))  # 7 days, 40 to 46 days old
    pgherald.set_retention(conn, timedelta(days=30))
    done: list[list[pgherald.Maintenance]] = []
    took: list[float] = []
    with psycopg.connect(installed) as reader:
        # A long transaction that read six of the old days (a report, say) holds them: the
        # oldest day is free and goes; each of the others cannot be dropped now.
        for name in busy:
            reader.execute(f"LOCK TABLE pgherald.{name} IN ACCESS SHARE MODE")  # type: ignore[arg-type]

        def maintain() -> None:
            with psycopg.connect(installed, autocommit=True) as m:
                started = time.monotonic()
                done.append(pgherald.maintain(m))
                took.append(time.monotonic() - started)

        t = threading.Thread(target=maintain, daemon=True)
        t.start()
        # Once maintain waits for a day's lock, a publisher comes.
        wait_until(
            lambda: conn.execute(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'relation'"
            ).fetchone()[0],  # type: ignore[index]
            5,
            "maintain to wait for a busy day",
        )
        started = time.monotonic()
        (event_id,) = publish_each(installed, [{"during": "maintain"}])
        published_in = time.monotonic() - started
        t.join(15)
        assert not t.is_alive()
        # Still inside the reader's transaction: nothing waited for it to end.
    actions = {m.target.removeprefix("pgherald."): m.action for m in done[0]}
    assert actions[oldest] == "dropped"
    assert {actions[name] for name in busy} == {"busy"}
    assert published_in < 1.5, f"a publisher waited {published_in:.2f}s for maintain"
    assert took[0] < 2.0, f"maintain took {took[0]:.2f}s with its days busy"
    assert set(busy) <= _partitions(conn)
    # The next run, once the reader is gone, drops them; the event published meanwhile stays.
    again = {m.target.removeprefix("pgherald."): m.action for m in pgherald.maintain(conn)}
    assert {again[name] for name in busy} == {"dropped"}
    assert conn.execute("SELECT array_agg(id) FROM pgherald.events_v1").fetchone() == ([event_id],)


# -- durable.md "Dead letters": "it does not keep the event from retention: `in_log` turns false
# once the event is pruned, and it can then no longer be redelivered (`redeliver` leaves it
# out)"; "redeliver ... (returns the ids queued; pending ones and events no longer in the log
# are left out)". And a group never stops for one event. --


def test_a_dead_letter_whose_event_retention_removed_is_left_out_and_stops_nothing(
    installed: str, conn: psycopg.Connection
) -> None:
    today = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
    old = [
        r[0]
        for r in conn.execute(
            "INSERT INTO pgherald.events_v1 (channel, payload, created_at)"
            " SELECT 'ch', jsonb_build_object('fail', i), %s FROM generate_series(1, 2) AS i"
            " RETURNING id",
            (today - 3 * DAY,),
        )
    ]
    handled: list[int] = []

    def fail_old(e: pgherald.Event) -> None:
        if "fail" in e.payload:
            raise RuntimeError("cannot handle it")
        handled.append(e.id)

    options = {"group": "g", "channels": ["ch"], "max_attempts": 1, **FAST}
    c = pgherald.Consumer(installed, **options)
    c.on("ch")(fail_old)
    with c:
        t = threading.Thread(target=c.run, daemon=True)
        t.start()
        wait_until(lambda: len(pgherald.dead_letters(conn, "g")) == 2, 10, "two dead letters")
        wait_until(lambda: uncovered(conn, "g", "ch") == 0, 5, "the group past them")
        c.stop()
        t.join(5)
    # One of them asked for again before retention removes both (consumed: nothing pins them).
    assert pgherald.redeliver(conn, "g", [old[1]]) == [old[1]]
    pgherald.set_retention(conn, DAY, channel="ch")
    assert ("deleted", "ch") in {(m.action, m.target) for m in pgherald.maintain(conn)}
    dead = pgherald.dead_letters(conn, "g")
    assert [(d.event_id, d.in_log) for d in dead] == [(old[0], False), (old[1], False)]
    assert pgherald.redeliver(conn, "g") == []  # gone from the log: left out
    assert pgherald.redeliver(conn, "g", [old[0]]) == []
    assert pgherald.dead_letters(conn, "g", ids=[old[0]])[0].redeliver_at is None
    # The redelivery asked for before the event went has nothing to hand out: the group reads
    # on, never stopping for it.
    c = pgherald.Consumer(installed, **options)
    c.on("ch")(fail_old)
    with c:
        t = threading.Thread(target=c.run, daemon=True)
        t.start()
        later = publish_each(installed, [{"n": 1}, {"n": 2}])
        wait_until(lambda: handled == later or not t.is_alive(), 10, "the later events")
        assert t.is_alive(), "run() ended"
        c.stop()
        t.join(5)
    # Nothing handed out, failed or restarted for it; both dead letters stay as they were.
    stats = c.stats
    assert (stats.redelivered, stats.skipped, stats.handler_errors, stats.reconnects) == (0,) * 4
    assert [(d.event_id, d.attempts) for d in pgherald.dead_letters(conn, "g")] == [
        (old[0], 1),
        (old[1], 1),
    ]


# -- durable.md "Redelivery": "Every handler of the event runs again, also those that had
# succeeded." "Handler errors": "then the event goes to the group's dead letters, is logged at
# ERROR with its id, and the group moves on." --


def test_a_redelivered_event_runs_every_handler_again_and_its_failure_is_logged_with_its_id(
    installed: str, conn: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    (event_id,) = publish_each(installed, [{"order": 7}])
    calls: Counter[str] = Counter()
    healed = threading.Event()
    c = pgherald.Consumer(
        installed, group="g", channels=["ch"], max_attempts=2, retry_delay=0.01, **FAST
    )

    @c.on("ch")
    def send_mail(e: pgherald.Event) -> None:
        calls["send_mail"] += 1

    @c.on("ch")
    def bill(e: pgherald.Event) -> None:
        calls["bill"] += 1
        if not healed.is_set():
            raise RuntimeError("billing is down")

    caplog.set_level(logging.ERROR, logger="pgherald.consumer")
    with c:
        t = threading.Thread(target=c.run, daemon=True)
        t.start()
        wait_until(lambda: pgherald.dead_letters(conn, "g"), 10, "the dead letter")
        given_up = [
            r
            for r in caplog.records
            if r.levelno == logging.ERROR and str(event_id) in r.getMessage()
        ]
        assert given_up, [r.getMessage() for r in caplog.records]
        assert calls == {"send_mail": 1, "bill": 2}  # the failing handler alone was retried
        healed.set()
        assert pgherald.redeliver(conn, "g") == [event_id]
        wait_until(lambda: not pgherald.dead_letters(conn, "g"), 10, "the redelivery")
        c.stop()
        t.join(5)
    # Redelivered: the handler that had succeeded ran again too.
    assert calls == {"send_mail": 2, "bill": 3}
    assert c.stats.redelivered == 1


# -- durable.md "Delayed events": "A consumer that missed the wake-up (reconnecting; the NOTIFY
# queue half full) checks at least every 5 s." --


def test_a_delayed_event_whose_wakeup_was_not_sent_is_released_within_5_s(
    installed: str, conn: psycopg.Connection, consumers: Callable[..., ConsumerRun]
) -> None:
    handled_at: dict[int, float] = {}
    run = consumers(
        "sync",
        installed,
        handler=lambda e: handled_at.setdefault(e.id, time.time()),
        poll_interval=30.0,  # no poll of its own meanwhile: only the 5 s check can find it
        rebalance_interval=30.0,
        health_check_interval=30.0,
    )
    with psycopg.connect(installed, autocommit=True) as c:
        # What a publisher does while the NOTIFY queue is half full: store it, send nothing.
        c.execute("SET pgherald.wake_max_queue_usage = 0")
        pgherald.publish(c, "ch", {"remind": 7}, deliver_after=timedelta(seconds=0.2))
        due = c.execute("SELECT extract(epoch FROM max(deliver_at)) FROM pgherald.scheduled_v1")
        (due_at,) = due.fetchone()  # type: ignore[misc]
    wait_until(lambda: run.seen, 8, "the delayed event")
    (event_id,) = run.seen
    assert run.payloads == [{"remind": 7}]
    assert float(due_at) <= handled_at[event_id] < float(due_at) + 5 + 1.5
    assert conn.execute("SELECT count(*) FROM pgherald.scheduled_v1").fetchone() == (0,)
