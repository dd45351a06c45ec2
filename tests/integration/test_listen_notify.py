"""LISTEN/NOTIFY round trips through a real server: names, transactions, drivers, styles."""

from __future__ import annotations

import threading

import anyio
import anyio.lowlevel
import psycopg
import pytest

import pgherald
from tests.fix_db import sqlalchemy_engine
from tests.fix_faults import wait_until

AWKWARD = ["MyChan", 'we"ird', "with space", "ünïcode", "a;DROP TABLE x", "x" * 63]


def collect(listener: pgherald.Listener, timeout: float = 5.0) -> list[pgherald.Notification]:
    return list(listener.notifications(timeout=timeout))


def test_awkward_channel_names_arrive_exactly_as_spelled(
    dsn: str, conn: psycopg.Connection
) -> None:
    with pgherald.Listener(dsn, channels=AWKWARD) as listener:
        for ch in AWKWARD:
            pgherald.notify(conn, ch, f"to {ch}")
        # A case-folded twin must not be heard: LISTEN is quoted, not folded.
        pgherald.notify(conn, "mychan", "folded")
        got = collect(listener, timeout=1.0)
    assert [(n.channel, n.payload) for n in got] == [(ch, f"to {ch}") for ch in AWKWARD]


def test_unquoted_listen_would_have_missed_mixed_case(conn: psycopg.Connection) -> None:
    # The trap the seeds fall into, shown on the same server: f"LISTEN {channel}" folds case.
    conn.execute("LISTEN MyChan")
    pgherald.notify(conn, "MyChan", "lost")
    assert list(conn.notifies(timeout=0.5)) == []


def test_rollback_drops_and_commit_delivers(dsn: str) -> None:
    with pgherald.Listener(dsn, channels=["tx"]) as listener, psycopg.connect(dsn) as sender:
        pgherald.notify(sender, "tx", "rolled back")
        sender.rollback()
        pgherald.notify(sender, "tx", "committed")
        sender.commit()
        got = collect(listener, timeout=1.0)
    assert [n.payload for n in got] == ["committed"]


def test_duplicates_fold_within_one_transaction(dsn: str) -> None:
    with pgherald.Listener(dsn, channels=["dup"]) as listener, psycopg.connect(dsn) as sender:
        for payload in ["a", "a", "b", "a"]:
            pgherald.notify(sender, "dup", payload)
        sender.commit()
        got = collect(listener, timeout=1.0)
    # PostgreSQL delivers identical (channel, payload) pairs of one transaction once.
    assert [n.payload for n in got] == ["a", "b"]


def test_json_payload_and_decode(dsn: str, conn: psycopg.Connection) -> None:
    value = {"id": 7, "tags": ["x", "ü"], "ok": True, "none": None}
    with pgherald.Listener(dsn, channels=["json"]) as listener:
        pgherald.notify(conn, "json", value)
        pgherald.notify(conn, "json", "not json {")
        first, second = collect(listener, timeout=1.0)
    assert first.json() == value
    assert first.pid == conn.info.backend_pid
    with pytest.raises(pgherald.PayloadNotJSON, match="'json'"):
        second.json()


def test_notify_through_psycopg2_and_sqlalchemy(dsn: str) -> None:
    import psycopg2

    pg2 = psycopg2.connect(dsn)
    engine = sqlalchemy_engine(dsn)
    try:
        with pgherald.Listener(dsn, channels=["drivers"]) as listener:
            pgherald.notify(pg2, "drivers", {"from": "psycopg2"})
            pg2.rollback()  # dropped
            pgherald.notify(pg2, "drivers", {"from": "psycopg2", "n": 2})
            pg2.commit()
            with engine.begin() as sa_conn:
                pgherald.notify(sa_conn, "drivers", {"from": "sqlalchemy"})
            raw = engine.raw_connection()
            try:
                pgherald.notify(raw, "drivers", {"from": "raw"})
                raw.commit()
            finally:
                raw.close()
            got = [n.json() for n in collect(listener, timeout=1.0)]
    finally:
        pg2.close()
        engine.dispose()
    assert got == [{"from": "psycopg2", "n": 2}, {"from": "sqlalchemy"}, {"from": "raw"}]


def test_bad_input_is_refused_before_the_database(conn: psycopg.Connection) -> None:
    with pytest.raises(pgherald.InvalidChannel, match="empty"):
        pgherald.notify(conn, "", "x")
    with pytest.raises(pgherald.InvalidChannel, match="at most 63 bytes"):
        pgherald.notify(conn, "é" * 32, "x")  # 64 bytes
    with pytest.raises(pgherald.PayloadTooLarge, match="under 8000 bytes"):
        pgherald.notify(conn, "ok", "x" * 8000)
    with pytest.raises(pgherald.PayloadNotSerializable):
        pgherald.notify(conn, "ok", {"when": object()})
    with pytest.raises(pgherald.UsageError, match="psycopg 3, psycopg2 or SQLAlchemy"):
        pgherald.notify(object(), "ok", "x")
    with pytest.raises(pgherald.UsageError, match=r"psycopg\.Cursor"):
        pgherald.notify(conn.cursor(), "ok", "x")  # the connection is what we need
    pgherald.notify(conn, "ok", "x" * 7999)  # the largest payload PostgreSQL accepts


def test_notify_in_failed_transaction_is_a_clear_error(dsn: str) -> None:
    with psycopg.connect(dsn) as c:
        with pytest.raises(psycopg.errors.DivisionByZero):
            c.execute("SELECT 1/0")
        with pytest.raises(pgherald.TransactionStateError, match="roll it back") as info:
            pgherald.notify(c, "x", "y")
        assert isinstance(info.value.__cause__, psycopg.Error)


def test_wrong_dsn_is_a_clear_connect_error() -> None:
    with pytest.raises(pgherald.ConnectError, match=r"cannot connect to PostgreSQL at .*:1/"):
        pgherald.Listener("host=127.0.0.1 port=1 user=nobody connect_timeout=2").connect()
    with pytest.raises(pgherald.ConnectError, match="invalid DSN"):
        pgherald.Listener("this is not a dsn")


def test_application_name_is_visible_to_operators(dsn: str, conn: psycopg.Connection) -> None:
    with pgherald.Listener(dsn, channels=["x"]) as listener:
        name = conn.execute(
            "SELECT application_name FROM pg_stat_activity WHERE pid = %s", (listener.backend_pid,)
        ).fetchone()
    assert name is not None
    assert name[0].startswith("pgherald")


def test_subscribe_and_unsubscribe_while_running(dsn: str, conn: psycopg.Connection) -> None:
    got: list[str] = []
    with pgherald.Listener(dsn) as listener:

        @listener.on()
        def every(n: pgherald.Notification) -> None:
            got.append(f"{n.channel}:{n.payload}")
            if n.payload == "first":
                listener.unsubscribe("a")
                listener.subscribe("b")
                # The change is applied before the next read; this round trip proves it.
                threading.Thread(target=send_second_round).start()
            if n.payload == "end":
                listener.stop()

        def send_second_round() -> None:
            with psycopg.connect(dsn, autocommit=True) as c:

                def listening_on_b() -> bool:
                    row = c.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND state = 'idle'",
                        (listener.backend_pid,),
                    ).fetchone()
                    return bool(row and row[0] and "b" in listener._engine._active)

                try:
                    # Wait until the listener's backend really listens on "b"; a timeout fails
                    # the test (an exception in a thread), after the sends that end listener.run().
                    wait_until(listening_on_b, 5.0, 'the listener LISTENing on "b"')
                finally:
                    pgherald.notify(c, "a", "unheard")
                    pgherald.notify(c, "b", "end")

        listener.subscribe("a")
        pgherald.notify(conn, "a", "first")
        listener.run()
    assert got == ["a:first", "b:end"]


def test_handler_exception_is_logged_counted_and_survived(
    dsn: str, conn: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []
    with pgherald.Listener(dsn) as listener:

        @listener.on("h")
        def handler(n: pgherald.Notification) -> None:
            seen.append(n.payload)
            if n.payload == "boom":
                raise RuntimeError("handler bug")
            if n.payload == "last":
                listener.stop()

        for p in ["one", "boom", "last"]:
            pgherald.notify(conn, "h", p)
        listener.run()
    assert seen == ["one", "boom", "last"]
    assert listener.stats.handler_errors == 1
    assert "handler bug" in caplog.text


def test_mixing_handlers_and_iteration_is_refused(dsn: str) -> None:
    with pgherald.Listener(dsn, channels=["m"]) as listener:
        listener.on("m")(lambda n: None)
        with pytest.raises(pgherald.UsageError, match="has handlers"):
            next(iter(listener))
    with (
        pgherald.Listener(dsn) as listener,
        pytest.raises(pgherald.UsageError, match="needs handlers"),
    ):
        listener.run()


def test_async_handler_refused_on_sync_listener(dsn: str) -> None:
    async def handler(n: pgherald.Notification) -> None: ...

    with (
        pgherald.Listener(dsn) as listener,
        pytest.raises(pgherald.UsageError, match="AsyncListener"),
    ):
        listener.on("x")(handler)


def test_stop_from_another_thread(dsn: str) -> None:
    with pgherald.Listener(dsn) as listener:
        listener.on("never")(lambda n: None)
        timer = threading.Timer(0.2, listener.stop)
        timer.start()
        listener.run()  # returns because of stop(), not a timeout
        timer.join()
    assert listener.stats.received == 0


# -- async: every test below runs on asyncio and on trio --


def _send_in_thread(dsn: str, channel: str, payloads: list[object]) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        for p in payloads:
            pgherald.notify(c, channel, p)


@pytest.mark.anyio
async def test_async_iteration_and_awkward_names(dsn: str) -> None:
    async with pgherald.AsyncListener(dsn, channels=AWKWARD) as listener:
        for ch in AWKWARD:
            await anyio.to_thread.run_sync(_send_in_thread, dsn, ch, [ch])
        got = [n async for n in listener.notifications(timeout=1.0)]
    assert [(n.channel, n.payload) for n in got] == [(ch, ch) for ch in AWKWARD]


@pytest.mark.anyio
async def test_async_handlers_sync_and_async_and_errors(dsn: str) -> None:
    seen: list[tuple[str, object]] = []
    async with pgherald.AsyncListener(dsn) as listener:

        @listener.on("a")
        async def on_a(n: pgherald.Notification) -> None:
            await anyio.lowlevel.checkpoint()
            seen.append(("async", n.json()))
            if n.json() == 2:
                raise ValueError("async handler bug")

        @listener.on("a")
        def on_a_sync(n: pgherald.Notification) -> None:
            seen.append(("sync", n.json()))
            if n.json() == 3:
                listener.stop()

        await listener.subscribe("a")
        await anyio.to_thread.run_sync(_send_in_thread, dsn, "a", [1, 2, 3])
        with anyio.fail_after(10):
            await listener.run()
    assert seen == [("async", 1), ("sync", 1), ("async", 2), ("sync", 2), ("async", 3), ("sync", 3)]
    assert listener.stats.handler_errors == 1


@pytest.mark.anyio
async def test_async_stop_from_another_thread(dsn: str) -> None:
    async with pgherald.AsyncListener(dsn) as listener:
        listener.on("never")(lambda n: None)

        async def stop_later() -> None:
            await anyio.to_thread.run_sync(lambda: threading.Event().wait(0.2) or listener.stop())

        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_later)
            with anyio.fail_after(10):
                await listener.run()


@pytest.mark.anyio
async def test_async_listener_is_cancellable(dsn: str) -> None:
    async with pgherald.AsyncListener(dsn) as listener:
        listener.on("never")(lambda n: None)
        with anyio.move_on_after(0.2) as scope:
            await listener.run()
        assert scope.cancelled_caught
        # still usable after cancellation
        await anyio.to_thread.run_sync(_send_in_thread, dsn, "after", ["x"])
        await listener.subscribe("after")
        await anyio.to_thread.run_sync(_send_in_thread, dsn, "after", ["y"])
        listener.remove_handler("never", listener._handlers.lookup("never")[0][0])
        got = [n.payload async for n in listener.notifications(timeout=1.0)]
    assert got == ["y"]


@pytest.mark.anyio
async def test_anotify_psycopg_async_connection(dsn: str, anyio_backend: str) -> None:
    if anyio_backend == "trio":
        pytest.xfail("psycopg's AsyncConnection runs on asyncio only (psycopg issue #29)")
    async with pgherald.AsyncListener(dsn, channels=["an"]) as listener:
        async with await psycopg.AsyncConnection.connect(dsn) as aconn:
            await pgherald.anotify(aconn, "an", {"k": 1})
            await aconn.rollback()
            await pgherald.anotify(aconn, "an", {"k": 2})
            await aconn.commit()
        got = [n.json() async for n in listener.notifications(timeout=1.0)]
    assert got == [{"k": 2}]


# -- a connection lent by the application --


def test_lent_connection_is_used_then_handed_back_clean(dsn: str, conn: psycopg.Connection) -> None:
    with psycopg.connect(dsn, autocommit=True) as mine:
        pid = mine.info.backend_pid
        with pgherald.Listener(mine, channels=["Lent"]) as listener:
            assert listener.backend_pid == pid
            pgherald.notify(conn, "Lent", "via the lent connection")
            got = [n.payload for n in listener.notifications(timeout=1.0)]
        assert got == ["via the lent connection"]
        # Handed back usable, in blocking mode, and no longer listening (safe for a pool).
        assert mine.execute("SELECT count(*) FROM pg_listening_channels()").fetchone() == (0,)
        assert not mine.pgconn.nonblocking


def test_lent_connection_must_be_idle_in_autocommit(dsn: str) -> None:
    with psycopg.connect(dsn) as in_tx:
        with pytest.raises(pgherald.TransactionStateError, match="autocommit"):
            pgherald.Listener(in_tx)
        in_tx.execute("SELECT 1")
        with pytest.raises(pgherald.TransactionStateError, match=r"in a transaction \(INTRANS\)"):
            pgherald.Listener(in_tx)


def test_lent_connection_lost_then_pgherald_reconnects_on_its_own(
    dsn: str, conn: psycopg.Connection
) -> None:
    gaps: list[pgherald.Gap] = []
    with psycopg.connect(dsn, autocommit=True) as mine:
        lent_pid = mine.info.backend_pid
        with pgherald.Listener(mine, channels=["L"], on_gap=gaps.append) as listener:
            conn.execute("SELECT pg_terminate_backend(%s)", (lent_pid,))
            for _ in listener.notifications(timeout=2.0):
                pass  # nothing is sent: this only runs the listener until it has recovered
            assert [g.reason for g in gaps] == ["reconnect"]
            assert listener.backend_pid not in (None, lent_pid)
            pgherald.notify(conn, "L", "after")
            got = [n.payload for n in listener.notifications(timeout=1.0)]
        assert got == ["after"]


# The same on AsyncListener: a sync connection is lent on asyncio and trio, a psycopg
# AsyncConnection on asyncio (psycopg runs it there only).


async def _listening_channels(conn: psycopg.Connection) -> int:
    row = await anyio.to_thread.run_sync(
        lambda: conn.execute("SELECT count(*) FROM pg_listening_channels()").fetchone()
    )
    assert row is not None
    return int(row[0])


@pytest.mark.anyio
async def test_async_listener_lent_connection_is_used_then_handed_back_clean(
    dsn: str, conn: psycopg.Connection
) -> None:
    with psycopg.connect(dsn, autocommit=True) as mine:
        pid = mine.info.backend_pid
        async with pgherald.AsyncListener(mine, channels=["Lent"]) as listener:
            assert listener.backend_pid == pid
            await anyio.to_thread.run_sync(pgherald.notify, conn, "Lent", "lent")
            got = [n.payload async for n in listener.notifications(timeout=1.0)]
        assert got == ["lent"]
        assert await _listening_channels(mine) == 0
        assert not mine.pgconn.nonblocking
        assert not mine.closed


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_async_listener_lent_async_connection_is_used_then_handed_back_clean(
    dsn: str, conn: psycopg.Connection
) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as mine:
        pid = mine.info.backend_pid
        async with pgherald.AsyncListener(mine, channels=["Lent"]) as listener:
            assert listener.backend_pid == pid
            await anyio.to_thread.run_sync(pgherald.notify, conn, "Lent", "lent")
            got = [n.payload async for n in listener.notifications(timeout=1.0)]
        assert got == ["lent"]
        cur = await mine.execute("SELECT count(*) FROM pg_listening_channels()")
        assert await cur.fetchone() == (0,)
        assert not mine.closed


@pytest.mark.anyio
async def test_async_listener_lent_connection_must_be_idle_in_autocommit(dsn: str) -> None:
    with psycopg.connect(dsn) as in_tx:
        with pytest.raises(pgherald.TransactionStateError, match="autocommit"):
            pgherald.AsyncListener(in_tx)
        in_tx.execute("SELECT 1")
        with pytest.raises(pgherald.TransactionStateError, match=r"in a transaction \(INTRANS\)"):
            pgherald.AsyncListener(in_tx)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_async_listener_lent_async_connection_must_be_idle_in_autocommit(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn) as in_tx:
        with pytest.raises(pgherald.TransactionStateError, match="autocommit"):
            pgherald.AsyncListener(in_tx)


@pytest.mark.anyio
async def test_async_listener_lent_connection_lost_then_it_reconnects_on_its_own(
    dsn: str, conn: psycopg.Connection
) -> None:
    gaps: list[pgherald.Gap] = []
    with psycopg.connect(dsn, autocommit=True) as mine:
        lent_pid = mine.info.backend_pid
        async with pgherald.AsyncListener(mine, channels=["L"], on_gap=gaps.append) as listener:
            await anyio.to_thread.run_sync(
                lambda: conn.execute("SELECT pg_terminate_backend(%s)", (lent_pid,))
            )
            async for _ in listener.notifications(timeout=2.0):
                pass  # nothing is sent: this only runs the listener until it has recovered
            assert [g.reason for g in gaps] == ["reconnect"]
            assert listener.backend_pid not in (None, lent_pid)
            await anyio.to_thread.run_sync(pgherald.notify, conn, "L", "after")
            got = [n.payload async for n in listener.notifications(timeout=1.0)]
        assert got == ["after"]
        assert not mine.closed  # lost, but the application's to close, never ours


def test_subscribe_from_another_thread_returns_once_listening(
    dsn: str, conn: psycopg.Connection
) -> None:
    got: list[str] = []
    done = threading.Event()
    with pgherald.Listener(dsn, channels=["first"]) as listener:

        @listener.on()
        def every(n: pgherald.Notification) -> None:
            got.append(n.channel)
            if n.channel == "late":
                done.set()

        runner = threading.Thread(target=listener.run)
        runner.start()
        try:
            listener.subscribe("late")  # from this thread while run() goes on in the other
            assert "late" in listener.listening
            pgherald.notify(conn, "late", "sent right after subscribe returned")
            assert done.wait(5), "a notification sent after subscribe() returned was missed"
        finally:
            listener.stop()
            runner.join(5)
    assert got == ["late"]


@pytest.mark.anyio
async def test_async_subscribe_from_another_task_returns_once_listening(dsn: str) -> None:
    got: list[str] = []
    arrived = anyio.Event()
    async with pgherald.AsyncListener(dsn, channels=["first"]) as listener:

        @listener.on()
        def every(n: pgherald.Notification) -> None:
            got.append(n.channel)
            arrived.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.run)
            await listener.subscribe("late")
            assert "late" in listener.listening
            await anyio.to_thread.run_sync(_send_in_thread, dsn, "late", ["x"])
            with anyio.fail_after(5):
                await arrived.wait()
            listener.stop()
    assert got == ["late"]
