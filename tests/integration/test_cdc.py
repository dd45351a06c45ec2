"""
Change data capture from the WAL (`pgherald.ChangeStream`), on a private server with
``wal_level=logical`` shared by the session (each test has its own database).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from decimal import Decimal
from typing import Any

import anyio
import psycopg
import pytest

import pgherald
from pgherald import ChangeEvent, ChangeStream
from pgherald._protocol.pgoutput import lsn_to_int
from tests.fix_faults import (
    FaultProxy,
    LogWatch,
    SilentServer,
    await_until,
    wait_until,
    watching,
)
from tests.fix_proxy import _target_of
from tests.fix_server import OwnServer


@pytest.fixture
def pg(logical_server: OwnServer) -> OwnServer:
    return logical_server


def sql(dsn: str, *statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        for s in statements:
            c.execute(s.encode())


async def into_log_on_a_thread(stream: ChangeStream, log_dsn: str | None) -> None:
    """`ChangeStream.into_log` on a worker thread of the test's task group; stopped as it ends."""
    try:
        await anyio.to_thread.run_sync(stream.into_log, log_dsn, abandon_on_cancel=True)
    finally:
        stream.stop()


async def into_log_async(stream: pgherald.AsyncChangeStream, log_dsn: str | None) -> None:
    await stream.into_log(log_dsn)


GATE = 4242  # the advisory lock of `add_gate`'s trigger


def add_gate(dsn: str, when: str) -> None:
    """
    A trigger on the log that makes each insert matching *when* wait for the advisory lock
    `GATE` (shared): a test holding it stops into_log's log connection at a chosen event.
    """
    sql(
        dsn,
        "CREATE FUNCTION gate() RETURNS trigger LANGUAGE plpgsql AS"
        f" $$BEGIN PERFORM pg_advisory_xact_lock_shared({GATE}); RETURN NEW; END$$",
        "CREATE TRIGGER gate BEFORE INSERT ON pgherald.events_v1 FOR EACH ROW"
        f" WHEN ({when}) EXECUTE FUNCTION gate()",
    )


@contextlib.asynccontextmanager
async def into_log_behind_the_gate(
    dsn: str, proxy: FaultProxy, into_log: Callable[[Any, str], Any], stream: Any
) -> AsyncIterator[tuple[LogWatch, list[BaseException], Callable[[], object]]]:
    """
    *into_log* of *stream* through *proxy*, run in a task group (40 s at most) with `GATE`
    closed: yields the ``pgherald.cdc`` log, into_log's errors (the test asserts them) and
    what opens the gate. Stops the stream as the block ends; closes the gate and thaws the
    proxy on the way out, whatever happened, so a failing test leaves no session waiting.
    """
    errors: list[BaseException] = []

    async def run() -> None:
        try:
            await into_log(stream, proxy.dsn_for(dsn))
        except Exception as exc:  # reported by the test
            errors.append(exc)

    gate = psycopg.connect(dsn, autocommit=True)
    try:
        gate.execute(f"SELECT pg_advisory_lock({GATE})".encode())  # closed
        with watching("pgherald.cdc") as log, anyio.fail_after(40):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                yield (
                    log,
                    errors,
                    lambda: gate.execute(f"SELECT pg_advisory_unlock({GATE})".encode()),
                )
                stream.stop()
    finally:
        gate.close()
        proxy.thaw()


def log_connection_losses(log: LogWatch) -> list[str]:
    """What into_log reported of each loss of its log connection, in order."""
    return [r.getMessage() for r in log.matching("durable log's connection was lost")]


def one(dsn: str, query: str, *params: Any) -> Any:
    """The first value of *query*'s first row (None: no row)."""
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute(query.encode(), params).fetchone()
    return None if row is None else row[0]


class Reader:
    """A ChangeStream run by a thread, recording every change."""

    def __init__(self, stream: ChangeStream, handler: Callable[[ChangeEvent], None] | None = None):
        self.stream = stream
        self.events: list[ChangeEvent] = []
        self.error: BaseException | None = None
        self._handler = handler
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for e in self.stream:
                if self._handler is not None:
                    self._handler(e)
                self.events.append(e)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def wait(self, n: int, timeout: float = 10) -> list[ChangeEvent]:
        wait_until(lambda: len(self.events) >= n or self.error, timeout, f"{n} changes")
        assert self.error is None, self.error
        return self.events

    def stop(self) -> None:
        self.stream.stop()
        self.thread.join(5)
        assert not self.thread.is_alive(), "stop() did not end the stream"
        assert self.error is None, self.error


@pytest.fixture
def reader() -> Iterator[Callable[..., Reader]]:
    started: list[Reader] = []

    def start(stream: ChangeStream, handler: Any = None) -> Reader:
        r = Reader(stream, handler)
        started.append(r)
        return r

    yield start
    for r in started:
        r.stream.stop()
        r.thread.join(5)


def slot_ready(dsn: str, slot: str) -> bool:
    """
    The slot is read, past its creation: a slot being created is active too, and a change
    committed before its consistent point (where confirmed_flush_lsn is set; it waits for
    transactions running then, of any database) is never decoded.
    """
    with psycopg.connect(dsn) as c:
        row = c.execute(
            "SELECT active AND confirmed_flush_lsn IS NOT NULL FROM pg_replication_slots "
            "WHERE slot_name = %s",
            (slot,),
        ).fetchone()
    return bool(row and row[0])


def slot_released(dsn: str, slot: str) -> bool:
    """No server process holds the slot (a reader that hung up lets go a moment later)."""
    with psycopg.connect(dsn) as c:
        row = c.execute(
            "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone()
    return row is not None and not row[0]


def confirmed(dsn: str, slot: str) -> int:
    with psycopg.connect(dsn) as c:
        row = c.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            (slot,),
        ).fetchone()
    assert row is not None
    return lsn_to_int(row[0])


def capture(dsn: str, slot: str, *tables: str) -> None:
    """Publication and slot now (as `pgherald cdc add`): changes from here on are kept."""
    from pgherald._cdc import add_tables

    with psycopg.connect(dsn, autocommit=True) as c:
        add_tables(c, tables, slot=slot)


def current_lsn(dsn: str) -> int:
    with psycopg.connect(dsn) as c:
        # The insert position: with synchronous_commit = off the write position lags behind.
        row = c.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert row is not None
    return lsn_to_int(row[0])


# -- the event shape --


def test_insert_update_delete_truncate(cdc_dsn: str, reader: Callable[..., Reader]) -> None:
    sql(cdc_dsn, "CREATE TABLE orders (id int PRIMARY KEY, item text, qty int)")
    r = reader(ChangeStream(cdc_dsn, slot="s_basic", tables=["orders"]))
    wait_until(lambda: slot_ready(cdc_dsn, "s_basic"), 10, "the stream to start")
    sql(
        cdc_dsn,
        "INSERT INTO orders VALUES (1, 'tea', 2)",
        "UPDATE orders SET qty = 3 WHERE id = 1",
        "DELETE FROM orders WHERE id = 1",
        "TRUNCATE orders",
    )
    ins, upd, dele, trunc = r.wait(4)
    assert [e.op for e in (ins, upd, dele, trunc)] == ["INSERT", "UPDATE", "DELETE", "TRUNCATE"]
    assert (ins.schema, ins.table, ins.key) == ("public", "orders", "1")
    assert ins.new == {"id": 1, "item": "tea", "qty": 2}
    assert ins.old is None
    assert upd.new == {"id": 1, "item": "tea", "qty": 3}
    assert upd.old is None
    assert upd.changed is None
    assert dele.new is None
    assert dele.old == {"id": 1}
    assert dele.key == "1"
    assert trunc.new is None
    assert trunc.old is None
    assert trunc.key is None
    # One transaction each, in commit order, with ids and commit times.
    lsns = [lsn_to_int(e.lsn) for e in (ins, upd, dele, trunc)]
    assert lsns == sorted(lsns)
    assert len(set(lsns)) == 4
    assert len({e.xid for e in (ins, upd, dele, trunc)}) == 4
    assert ins.commit_time.tzinfo is not None
    assert ins.as_dict()["tx"] == str(ins.xid)
    r.stop()
    # Everything handled was acknowledged at stop: the slot starts after it next time.
    assert confirmed(cdc_dsn, "s_basic") >= lsns[-1]


def test_replica_identity_full_old_rows(cdc_dsn: str, reader: Callable[..., Reader]) -> None:
    sql(
        cdc_dsn,
        "CREATE TABLE items (a int, b int, note text, PRIMARY KEY (a, b))",
        "ALTER TABLE items REPLICA IDENTITY FULL",
    )
    r = reader(ChangeStream(cdc_dsn, slot="s_full", tables=["items"]))
    wait_until(lambda: slot_ready(cdc_dsn, "s_full"), 10, "the stream to start")
    sql(
        cdc_dsn,
        "INSERT INTO items VALUES (1, 2, 'x')",
        "UPDATE items SET note = 'y'",
        "DELETE FROM items",
    )
    _, upd, dele = r.wait(3)
    assert upd.old == {"a": 1, "b": 2, "note": "x"}
    assert upd.changed == ["note"]
    assert upd.key == "[1, 2]"  # several key columns: the JSON array, as triggers write it
    assert dele.old == {"a": 1, "b": 2, "note": "y"}


def test_types_and_wide_rows(cdc_dsn: str, reader: Callable[..., Reader]) -> None:
    sql(
        cdc_dsn,
        "CREATE TABLE t (id bigint PRIMARY KEY, n numeric, ts timestamptz, ints int[], "
        "texts text[], nested int[], j jsonb, b bytea, f float8, ok bool, body text, u uuid)",
    )
    r = reader(ChangeStream(cdc_dsn, slot="s_types", tables=["t"]))
    wait_until(lambda: slot_ready(cdc_dsn, "s_types"), 10, "the stream to start")
    big = "x" * (1024 * 1024)
    with psycopg.connect(cdc_dsn, autocommit=True) as c:
        c.execute("SET TIME ZONE 'UTC'")
        c.execute(
            "INSERT INTO t VALUES (1, 12345678901234567890.000000001, "
            "'2026-11-25 08:00:00.123+00', '{1,2,NULL}', '{\"a b\",\"c\\\"d\",NULL}', "
            "'{{1,2},{3,4}}', '{\"k\": [1, 2.5, null]}', '\\x0102ff', 1.5, true, %s, "
            "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11')",
            (big,),
        )
        c.execute("INSERT INTO t (id) VALUES (2)")
        c.execute("UPDATE t SET ok = false WHERE id = 1")  # body is TOASTed and unchanged
    ins, nulls, upd = r.wait(3)
    assert ins.new is not None
    assert nulls.new is not None
    assert upd.new is not None
    assert ins.new["n"] == Decimal("12345678901234567890.000000001")
    assert ins.new["ts"] == "2026-11-25T08:00:00.123+00:00"
    assert ins.new["ints"] == [1, 2, None]
    assert ins.new["texts"] == ["a b", 'c"d', None]
    assert ins.new["nested"] == [[1, 2], [3, 4]]
    assert ins.new["j"] == {"k": [1, 2.5, None]}
    assert ins.new["b"] == "\\x0102ff"
    assert ins.new["f"] == 1.5
    assert ins.new["ok"] is True
    assert ins.new["body"] == big
    assert ins.new["u"] == "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
    assert nulls.new == {k: (2 if k == "id" else None) for k in ins.new}
    # An unchanged TOASTed value is not in the WAL: absent, not wrongly null.
    assert upd.new["ok"] is False
    assert "body" not in upd.new
    # Exact numerics survive the trip to JSON.
    assert '"n":12345678901234567890.000000001' in pgherald._protocol.pgoutput.dumps_value(
        ins.as_dict()
    ).replace(" ", "").replace('"new":{', "")


def test_column_added_mid_stream(cdc_dsn: str, reader: Callable[..., Reader]) -> None:
    sql(cdc_dsn, "CREATE TABLE t (id int PRIMARY KEY, a text)")
    r = reader(ChangeStream(cdc_dsn, slot="s_ddl", tables=["t"]))
    wait_until(lambda: slot_ready(cdc_dsn, "s_ddl"), 10, "the stream to start")
    sql(
        cdc_dsn,
        "INSERT INTO t VALUES (1, 'x')",
        "ALTER TABLE t ADD COLUMN b int DEFAULT 7",
        "INSERT INTO t VALUES (2, 'y', 8)",
        "ALTER TABLE t DROP COLUMN a",
        "INSERT INTO t VALUES (3, 9)",
    )
    first, second, third = r.wait(3)
    assert first.new == {"id": 1, "a": "x"}
    assert second.new == {"id": 2, "a": "y", "b": 8}
    assert third.new == {"id": 3, "b": 9}


def test_backfill_then_stream(cdc_dsn: str, reader: Callable[..., Reader]) -> None:
    sql(
        cdc_dsn,
        "CREATE TABLE t (id int PRIMARY KEY, v text)",
        "INSERT INTO t SELECT g, 'old' FROM generate_series(1, 2500) g",
    )
    r = reader(ChangeStream(cdc_dsn, slot="s_fill", tables=["t"], backfill=True))
    r.wait(2500)
    sql(cdc_dsn, "INSERT INTO t VALUES (9999, 'new')")
    events = r.wait(2501)
    assert [e.op for e in events[:2500]] == ["READ"] * 2500
    assert sorted(int(e.key or 0) for e in events[:2500]) == list(range(1, 2501))
    assert events[2500].op == "INSERT"
    assert events[2500].key == "9999"
    assert lsn_to_int(events[2500].lsn) > lsn_to_int(events[0].lsn)


def test_backfill_on_a_slot_that_exists_does_not_backfill(
    cdc_dsn: str, reader: Callable[..., Reader]
) -> None:
    """cdc.md: "A backfill needs a new slot: a slot that already exists cannot export a
    snapshot, so adding a table to a running slot does not backfill it"."""
    sql(
        cdc_dsn,
        "CREATE TABLE t (id int PRIMARY KEY)",
        "CREATE TABLE u (id int PRIMARY KEY)",
        "INSERT INTO u SELECT generate_series(1, 5)",
    )
    capture(cdc_dsn, "s_refill", "t")  # the slot exists, for t only
    r = reader(ChangeStream(cdc_dsn, slot="s_refill", tables=["t", "u"], backfill=True))
    wait_until(lambda: slot_ready(cdc_dsn, "s_refill"), 10, "the slot read")
    sql(cdc_dsn, "INSERT INTO u VALUES (100)", "INSERT INTO t VALUES (1)")
    events = r.wait(2)
    # No READ of u's five rows: the added table's changes from now on, nothing before.
    assert [(e.op, e.table, e.key) for e in events] == [
        ("INSERT", "u", "100"),
        ("INSERT", "t", "1"),
    ]


# -- guarantees --


def test_ack_only_after_the_whole_transaction(cdc_dsn: str) -> None:
    """An iteration that ends mid-transaction leaves it unacknowledged: it comes again."""
    sql(cdc_dsn, "CREATE TABLE t (id int PRIMARY KEY)")
    capture(cdc_dsn, "s_ack", "t")
    with ChangeStream(cdc_dsn, slot="s_ack") as s:
        ev = iter(s)
        sql(cdc_dsn, "INSERT INTO t VALUES (1)")
        assert next(ev).key == "1"
        sql(cdc_dsn, "BEGIN; INSERT INTO t VALUES (2); INSERT INTO t VALUES (3); COMMIT")
        assert next(ev).key == "2"  # handled 2, not 3: the transaction is not done
        ev.close()  # type: ignore[attr-defined]
    with ChangeStream(cdc_dsn, slot="s_ack") as s:
        ev = iter(s)
        assert [next(ev).key, next(ev).key] == ["2", "3"]
        ev.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize(("stop_at", "again"), [("2", ["1", "2", "3"]), ("3", [])])
def test_stop_acknowledges_a_transaction_only_once_its_last_change_was_handled(
    cdc_dsn: str, stop_at: str, again: list[str]
) -> None:
    """cdc.md: "`stop()` in the middle of a transaction leaves that transaction
    unacknowledged, unless its last change was just handled"."""
    sql(cdc_dsn, "CREATE TABLE t (id int PRIMARY KEY)")
    capture(cdc_dsn, "s_stop", "t")
    sql(cdc_dsn, "BEGIN; INSERT INTO t VALUES (1), (2); INSERT INTO t VALUES (3); COMMIT")
    sql(cdc_dsn, "INSERT INTO t VALUES (4)")  # the next transaction: where the second read ends
    stream = ChangeStream(cdc_dsn, slot="s_stop")
    handled: list[str | None] = []

    def handler(e: ChangeEvent) -> None:
        handled.append(e.key)
        if e.key == stop_at:
            stream.stop()

    watchdog = threading.Timer(10, stream.stop)  # a stop that never comes fails, not hangs
    watchdog.start()
    try:
        stream.run(handler)
    finally:
        watchdog.cancel()
    assert handled == ["1", "2", "3"][: int(stop_at)]
    with ChangeStream(cdc_dsn, slot="s_stop") as second:
        watchdog = threading.Timer(10, second.stop)
        watchdog.start()
        try:
            keys = []
            for e in second:
                keys.append(e.key)
                if e.key == "4":
                    break
        finally:
            watchdog.cancel()
    assert keys == [*again, "4"]


@pytest.mark.anyio
@pytest.mark.parametrize(("stop_at", "again"), [("2", ["1", "2", "3"]), ("3", [])])
async def test_async_stop_acknowledges_a_transaction_only_once_its_last_change_was_handled(
    cdc_dsn: str, stop_at: str, again: list[str]
) -> None:
    sql(cdc_dsn, "CREATE TABLE t (id int PRIMARY KEY)")
    capture(cdc_dsn, "s_astop", "t")
    sql(cdc_dsn, "BEGIN; INSERT INTO t VALUES (1), (2); INSERT INTO t VALUES (3); COMMIT")
    sql(cdc_dsn, "INSERT INTO t VALUES (4)")
    stream = pgherald.AsyncChangeStream(cdc_dsn, slot="s_astop")
    handled: list[str | None] = []

    async def handler(e: ChangeEvent) -> None:
        handled.append(e.key)
        if e.key == stop_at:
            stream.stop()

    with anyio.fail_after(10):
        await stream.run(handler)
    assert handled == ["1", "2", "3"][: int(stop_at)]
    keys = []
    with anyio.fail_after(10):
        async with pgherald.AsyncChangeStream(cdc_dsn, slot="s_astop") as second:
            async for e in second:
                keys.append(e.key)
                if e.key == "4":
                    break
    assert keys == [*again, "4"]


def test_handler_error_stops_without_ack(cdc_dsn: str) -> None:
    sql(cdc_dsn, "CREATE TABLE t (id int PRIMARY KEY)")

    def handler(e: ChangeEvent) -> None:
        raise ValueError(f"cannot handle {e.key}")

    capture(cdc_dsn, "s_err", "t")
    sql(cdc_dsn, "INSERT INTO t VALUES (5)")
    with (
        ChangeStream(cdc_dsn, slot="s_err") as s,
        pytest.raises(ValueError, match="cannot handle 5"),
    ):
        s.run(handler)
    with ChangeStream(cdc_dsn, slot="s_err") as s:
        assert next(iter(s)).key == "5"


CONSUMER = """
import sys, pgherald
dsn, slot, out = sys.argv[1:4]
with open(out, "a") as f, pgherald.ChangeStream(dsn, slot=slot, status_interval=0.2) as s:
    for e in s:
        f.write(e.lsn + " " + (e.key or "") + "\\n"); f.flush()
        if e.key == "block":
            print("blocked", flush=True)
            sys.stdin.read()  # until killed, mid-transaction
"""


def test_sigkill_mid_transaction_redelivers_from_last_ack(cdc_dsn: str, tmp_path: Any) -> None:
    sql(cdc_dsn, "CREATE TABLE t (id text PRIMARY KEY)")
    capture(cdc_dsn, "s_kill", "t")
    sql(cdc_dsn, "INSERT INTO t VALUES ('start')")
    out = tmp_path / "seen.txt"
    with subprocess.Popen(
        [sys.executable, "-c", CONSUMER, cdc_dsn, "s_kill", str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    ) as proc:
        try:
            sql(cdc_dsn, "INSERT INTO t VALUES ('tx1-a')")
            end_of_tx1 = current_lsn(cdc_dsn)
            wait_until(lambda: confirmed(cdc_dsn, "s_kill") >= end_of_tx1, 10, "tx1 acknowledged")
            sql(
                cdc_dsn,
                "BEGIN; INSERT INTO t VALUES ('tx2-a'); INSERT INTO t VALUES ('block'); "
                "INSERT INTO t VALUES ('tx2-c'); COMMIT",
            )
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "blocked"
            acked = confirmed(cdc_dsn, "s_kill")
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
    seen = [line.split()[1] for line in out.read_text().splitlines()]
    assert seen == ["start", "tx1-a", "tx2-a", "block"]
    assert acked >= end_of_tx1
    wait_until(lambda: not slot_ready(cdc_dsn, "s_kill"), 10, "the killed reader's session")
    # Restarted: tx2 again, whole, and nothing before it (tx1 was acknowledged).
    with ChangeStream(cdc_dsn, slot="s_kill") as s:
        it = iter(s)
        got = [next(it).key for _ in range(3)]
        it.close()  # type: ignore[attr-defined]
    assert got == ["tx2-a", "block", "tx2-c"]


def test_server_restart(cdc_dsn: str, pg: OwnServer, reader: Callable[..., Reader]) -> None:
    sql(cdc_dsn, "CREATE TABLE t (id int PRIMARY KEY)")
    r = reader(ChangeStream(cdc_dsn, slot="s_restart", tables=["t"], status_interval=0.5))
    wait_until(lambda: slot_ready(cdc_dsn, "s_restart"), 10, "the stream to start")
    # 30 transactions, all acknowledged. The slot's position on disk lags behind: the server
    # saves it only now and then (a checkpoint, a change of the slot's restart position), and an
    # immediate stop (a crash) saves nothing, so the server restarts at the saved position.
    sql(cdc_dsn, *(f"INSERT INTO t VALUES ({i})" for i in range(1, 31)))
    r.wait(30)
    end = current_lsn(cdc_dsn)
    wait_until(lambda: confirmed(cdc_dsn, "s_restart") >= end, 10, "all 30 acknowledged")
    pg.stop("immediate")
    pg.start()
    sql(cdc_dsn, "INSERT INTO t VALUES (31)")
    wait_until(
        lambda: bool(r.error) or (r.events and r.events[-1].key == "31"),
        30,
        "the change after the restart",
    )
    assert r.error is None, r.error
    # Nothing lost, in order, and what was acknowledged does not come again (at most the last
    # acknowledged transaction may: the documented guarantee).
    keys = [int(e.key or 0) for e in r.events]
    assert keys in (list(range(1, 32)), [*range(1, 31), 30, 31]), keys
    assert r.stream._engine.reconnects >= 1
    r.stop()


@pytest.mark.anyio
async def test_async_server_restart(cdc_dsn: str, pg: OwnServer) -> None:
    """`test_server_restart` for `AsyncChangeStream`, on asyncio and trio."""
    sql(cdc_dsn, "CREATE TABLE t (id int PRIMARY KEY)")
    stream = pgherald.AsyncChangeStream(
        cdc_dsn, slot="s_arestart", tables=["t"], status_interval=0.5
    )
    events: list[ChangeEvent] = []
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(stream.run, events.append)
            await await_until(lambda: slot_ready(cdc_dsn, "s_arestart"), 10, "the stream")
            # As in the sync test: all acknowledged, then a crash, so the server restarts at
            # the slot's older saved position and only the stream knows how far it got.
            sql(cdc_dsn, *(f"INSERT INTO t VALUES ({i})" for i in range(1, 31)))
            await await_until(lambda: len(events) >= 30, 10, "30 changes")
            end = current_lsn(cdc_dsn)
            await await_until(
                lambda: confirmed(cdc_dsn, "s_arestart") >= end, 10, "all 30 acknowledged"
            )
            await anyio.to_thread.run_sync(pg.stop, "immediate")
            await anyio.to_thread.run_sync(pg.start)
            sql(cdc_dsn, "INSERT INTO t VALUES (31)")
            await await_until(lambda: events[-1].key == "31", 30, "the change after the restart")
            stream.stop()
    keys = [int(e.key or 0) for e in events]
    assert keys in (list(range(1, 32)), [*range(1, 31), 30, 31]), keys
    assert stream._engine.reconnects >= 1


def test_partitioned_table_given_again(cdc_dsn: str, reader: Callable[..., Reader]) -> None:
    """A partitioned table already in the publication (published as its partitions) is
    recognised: the stream starts and reads its partitions' changes."""
    sql(
        cdc_dsn,
        "CREATE TABLE rp (id int, r text, PRIMARY KEY (id, r)) PARTITION BY LIST (r)",
        "CREATE TABLE rp_a PARTITION OF rp FOR VALUES IN ('a')",
    )
    capture(cdc_dsn, "s_parted", "rp")
    r = reader(ChangeStream(cdc_dsn, slot="s_parted", tables=["rp"]))
    wait_until(lambda: slot_ready(cdc_dsn, "s_parted"), 10, "the stream to start")
    sql(cdc_dsn, "INSERT INTO rp VALUES (1, 'a')")
    (event,) = r.wait(1)
    assert (event.op, event.table, event.key) == ("INSERT", "rp_a", '[1, "a"]')
    r.stop()


def test_composite_key_text_is_the_triggers(cdc_dsn: str, reader: Callable[..., Reader]) -> None:
    """A row's key is the same text by CDC as by a durable trigger (so the same partition)."""
    from pgherald._protocol.pgoutput import decode_key

    with psycopg.connect(cdc_dsn, autocommit=True) as c:
        pgherald.install(c)
        c.execute(
            "CREATE TABLE ck (name text, n numeric, id int, v text, PRIMARY KEY (name, n, id))"
        )
        pgherald.add_table_trigger(c, "ck", durable=True)
    capture(cdc_dsn, "s_ck", "ck")
    r = reader(ChangeStream(cdc_dsn, slot="s_ck"))
    wait_until(lambda: slot_ready(cdc_dsn, "s_ck"), 10, "the stream to start")
    rows = [('u"s\\', "8", 1), ("äé€ 😀", "1.50", -2), ("tab\tnl\n", "1e3", 3)]
    with psycopg.connect(cdc_dsn, autocommit=True) as c:
        for row in rows:
            c.execute("INSERT INTO ck (name, n, id) VALUES (%s, %s::numeric, %s)", row)
        stored = [k for (k,) in c.execute("SELECT key FROM pgherald.events_v1 ORDER BY id")]
        # NULL (a key of chosen columns may hold one) and the others, against jsonb itself.
        (server,) = c.execute(
            "SELECT to_jsonb(ARRAY[to_jsonb('a\"é'::text), 'null'::jsonb, to_jsonb(2.50), "
            "to_jsonb(-7)])::text"
        ).fetchone()
    events = r.wait(3)
    assert [e.key for e in events] == stored
    assert stored[0] == '["u\\"s\\\\", 8, 1]'
    values = {"a": 'a"é', "b": None, "c": Decimal("2.50"), "d": -7}
    assert decode_key(values, ("a", "b", "c", "d")) == server
    r.stop()


def test_wal_level_not_logical_says_what_to_set(replica_server: OwnServer) -> None:
    with pytest.raises(pgherald.UsageError) as info:
        for _ in ChangeStream(replica_server.dsn, slot="s_never", tables=()):
            pass
    message = str(info.value)
    assert "wal_level = logical" in message
    assert "wal_level = replica" in message
    assert "restart" in message


def test_stop_from_another_thread_while_idle(cdc_dsn: str, reader: Callable[..., Reader]) -> None:
    sql(cdc_dsn, "CREATE TABLE t (id int PRIMARY KEY)")
    r = reader(ChangeStream(cdc_dsn, slot="s_stop", tables=["t"]))
    wait_until(lambda: slot_ready(cdc_dsn, "s_stop"), 10, "the stream to start")
    r.stop()


# -- into the durable log --


def test_20000_changes_from_4_writers_into_the_log_exactly_once(cdc_dsn: str) -> None:
    with psycopg.connect(cdc_dsn, autocommit=True) as c:
        pgherald.install(c)
        c.execute("CREATE TABLE w (writer int, seq int, PRIMARY KEY (writer, seq))")
        c.execute("CREATE PUBLICATION s_log FOR TABLE w")
        c.execute("SELECT pg_create_logical_replication_slot('s_log', 'pgoutput')")
        # A copy at the same position: to replay everything again afterwards.
        c.execute("SELECT pg_copy_logical_replication_slot('s_log', 's_log_copy')")

    def writer(n: int) -> None:
        with psycopg.connect(cdc_dsn, autocommit=True) as c:
            for start in range(0, 5000, 25):
                with c.transaction():
                    c.execute(
                        "INSERT INTO w SELECT %s, g FROM generate_series(%s::int, %s::int) g",
                        (n, start, start + 24),
                    )

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    end = current_lsn(cdc_dsn)

    def run_until_caught_up() -> None:
        stream = ChangeStream(cdc_dsn, slot="s_log", create=False, status_interval=0.2)
        errors: list[BaseException] = []

        def into_log() -> None:
            try:
                stream.into_log()
            except BaseException as exc:  # reported below
                errors.append(exc)

        runner = threading.Thread(target=into_log, daemon=True)
        runner.start()
        try:
            wait_until(
                lambda: errors or confirmed(cdc_dsn, "s_log") >= end, 60, "the log to catch up"
            )
        finally:
            stream.stop()
            runner.join(10)
        assert not errors, errors
        assert not runner.is_alive()

    run_until_caught_up()
    # Replay from the start: the slot forgets, the log remembers (cdc_lsn): nothing twice.
    with psycopg.connect(cdc_dsn, autocommit=True) as c:
        # The stream hung up; its server process lets go of the slot a moment later.
        wait_until(lambda: slot_released(cdc_dsn, "s_log"), 10, "the slot to be released")
        c.execute("SELECT pg_drop_replication_slot('s_log')")
        c.execute("SELECT pg_copy_logical_replication_slot('s_log_copy', 's_log')")
    run_until_caught_up()

    with psycopg.connect(cdc_dsn) as c:
        rows = c.execute(
            "SELECT payload, key, headers FROM pgherald.events_v1 WHERE channel = 'public.w' "
            "ORDER BY id"
        ).fetchall()
        commits = c.execute(
            "SELECT count(DISTINCT headers->>'cdc_lsn') FROM pgherald.events_v1"
        ).fetchone()
    assert len(rows) == 20000
    seen = {(r[0]["new"]["writer"], r[0]["new"]["seq"]) for r in rows}
    assert len(seen) == 20000
    # Commit order: the LSN never goes back, and each writer's rows come in its order.
    lsns = [lsn_to_int(r[2]["cdc_lsn"]) for r in rows]
    assert lsns == sorted(lsns)
    for n in range(4):
        seqs = [r[0]["new"]["seq"] for r in rows if r[0]["new"]["writer"] == n]
        assert seqs == list(range(5000))
    assert rows[0][1] == json.dumps([rows[0][0]["new"]["writer"], rows[0][0]["new"]["seq"]])
    assert commits is not None
    assert commits[0] == 800


@pytest.mark.anyio
async def test_async_into_log_exactly_once(cdc_dsn: str) -> None:
    """`AsyncChangeStream.into_log`: in commit order, a replay stores nothing twice."""
    with psycopg.connect(cdc_dsn, autocommit=True) as c:
        pgherald.install(c)
    sql(
        cdc_dsn,
        "CREATE TABLE a (id int PRIMARY KEY)",
        "CREATE TABLE b (id int PRIMARY KEY)",
        "CREATE PUBLICATION s_alog FOR TABLE a, b",
        "SELECT pg_create_logical_replication_slot('s_alog', 'pgoutput')",
        "SELECT pg_copy_logical_replication_slot('s_alog', 's_alog_copy')",
        *(
            f"BEGIN; INSERT INTO a VALUES ({i}); INSERT INTO b VALUES ({i}), ({i + 100}); COMMIT"
            for i in range(20)
        ),
    )
    end = current_lsn(cdc_dsn)

    async def catch_up() -> None:
        stream = pgherald.AsyncChangeStream(
            cdc_dsn, slot="s_alog", create=False, status_interval=0.2
        )
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                # batch=2: a transaction of three changes is stored in two statements.
                tg.start_soon(functools.partial(stream.into_log, batch=2))
                await await_until(
                    lambda: confirmed(cdc_dsn, "s_alog") >= end, 8, "the log to catch up"
                )
                stream.stop()

    await catch_up()
    # Replay from the start: the slot forgets, the log remembers (cdc_lsn): nothing twice.
    await await_until(lambda: slot_released(cdc_dsn, "s_alog"), 10, "the slot to be released")
    sql(
        cdc_dsn,
        "SELECT pg_drop_replication_slot('s_alog')",
        "SELECT pg_copy_logical_replication_slot('s_alog_copy', 's_alog')",
    )
    await catch_up()
    with psycopg.connect(cdc_dsn) as c:
        rows = c.execute(
            "SELECT channel, key, payload->>'op', headers FROM pgherald.events_v1 ORDER BY id"
        ).fetchall()
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (f"public.{t}", str(k), "INSERT")
        for i in range(20)
        for t, k in (("a", i), ("b", i), ("b", i + 100))
    ]
    assert len({r[3]["cdc_lsn"] for r in rows}) == 20
    assert {r[3]["cdc_slot"] for r in rows} == {"s_alog"}


# -- async --


@pytest.mark.anyio
async def test_async_stream(cdc_dsn: str) -> None:
    sql(cdc_dsn, "CREATE TABLE t (id int PRIMARY KEY)")
    got: list[ChangeEvent] = []
    stream = pgherald.AsyncChangeStream(cdc_dsn, slot="s_async", tables=["t"])

    async def handler(e: ChangeEvent) -> None:
        got.append(e)
        if len(got) == 2:
            stream.stop()

    async def write() -> None:
        await await_until(lambda: slot_ready(cdc_dsn, "s_async"), 10, "the stream to start")
        sql(cdc_dsn, "INSERT INTO t VALUES (1)", "INSERT INTO t VALUES (2)")

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(write)
            await stream.run(handler)
    assert [e.key for e in got] == ["1", "2"]
    sql(cdc_dsn, "INSERT INTO t VALUES (3)")
    with anyio.fail_after(10):
        async with pgherald.AsyncChangeStream(cdc_dsn, slot="s_async") as stream:
            async for e in stream:
                assert e.key == "3"  # 1 and 2 were acknowledged
                break


def test_stop_while_connecting_to_a_server_that_never_answers(
    silent_server: SilentServer,
) -> None:
    stream = ChangeStream(
        f"postgresql://postgres@127.0.0.1:{silent_server.port}/x",
        slot="s_hung",
        connect_timeout=60,
    )
    done = threading.Event()
    errors: list[BaseException] = []

    def read() -> None:
        try:
            for _ in stream:
                pass
        except BaseException as exc:  # reported below
            errors.append(exc)
        done.set()

    threading.Thread(target=read, daemon=True).start()
    wait_until(lambda: silent_server.accepted, 5, "a connection attempt to the hung server")
    stream.stop()
    assert done.wait(2), "stop() did not end a connection attempt within 2 s"
    assert errors == []


@pytest.mark.anyio
async def test_async_cancel_and_stop_while_connecting(silent_server: SilentServer) -> None:
    dsn = f"postgresql://postgres@127.0.0.1:{silent_server.port}/x"
    stream = pgherald.AsyncChangeStream(dsn, slot="s_hung", connect_timeout=60)
    with anyio.move_on_after(0.3) as scope:
        await stream.run(lambda e: None)
    assert scope.cancelled_caught  # cancellation reaches the connection attempt
    stream2 = pgherald.AsyncChangeStream(dsn, slot="s_hung", connect_timeout=60)
    with anyio.fail_after(3):
        async with anyio.create_task_group() as tg:
            tg.start_soon(stream2.run, lambda e: None)
            await await_until(lambda: len(silent_server.accepted) >= 2, 5, "a second attempt")
            stream2.stop()


# -- faults: behind a proxy that freezes, severs and refuses (tests/fix_faults.py) --

INTERVAL, TIMEOUT = 0.3, 0.3
FAST: dict[str, Any] = {
    "health_check_interval": INTERVAL,
    "health_check_timeout": TIMEOUT,
    "status_interval": 0.2,
    "reconnect_initial_delay": 0.05,
    "reconnect_max_delay": 0.15,
}


@pytest.fixture
def cdc_proxy(pg: OwnServer) -> Iterator[FaultProxy]:
    with FaultProxy(_target_of(pg.dsn)) as p:
        yield p


@pytest.fixture
def cdc_log() -> Iterator[LogWatch]:
    """The ``pgherald.cdc`` log records (INFO and up) of this test."""
    with watching("pgherald.cdc") as watch:
        yield watch


def _losses(log: LogWatch) -> list[str]:
    return [r.getMessage() for r in log.matching("change stream lost")]


async def _fault_rounds(
    dsn: str, slot: str, proxy: FaultProxy, log: LogWatch, events: list[ChangeEvent]
) -> None:
    """
    Frozen, severed, then refused for three rounds: each time the stream notices, comes back
    through the proxy and delivers what was written meanwhile, once. Every write is
    acknowledged before the next fault, so nothing may come twice.
    """

    async def write(key: int) -> None:
        sql(dsn, f"INSERT INTO t VALUES ({key})")
        end = current_lsn(dsn)
        await await_until(lambda: str(key) in [e.key for e in events], 5, f"change {key}")
        await await_until(lambda: confirmed(dsn, slot) >= end, 5, f"change {key} acknowledged")

    await await_until(lambda: slot_ready(dsn, slot), 10, "the stream to start")
    await write(1)

    # Frozen (half-open): found by the health check within interval + timeout.
    assert proxy.freeze() >= 1  # the replication connection (and a closing control one)
    accepted = proxy.accepted
    t0 = time.monotonic()
    await await_until(lambda: _losses(log), 5, "the half-open connection to be found")
    detected = time.monotonic() - t0
    assert detected < INTERVAL + TIMEOUT + 0.5, f"found after {detected:.2f}s"
    assert "half-open" in _losses(log)[0]
    await write(2)
    assert proxy.accepted > accepted, "did not reconnect through the proxy"

    # Severed (RST): reconnects at once.
    before = len(_losses(log))
    proxy.sever()
    t0 = time.monotonic()
    await write(3)
    assert time.monotonic() - t0 < 2.0
    assert len(_losses(log)) > before

    # Refused for three rounds: the stream waits and tries again, it does not give up.
    before = len(_losses(log))
    proxy.refuse()
    proxy.sever()
    await await_until(lambda: len(_losses(log)) >= before + 4, 5, "three refused attempts")
    assert sum("refused" in m for m in _losses(log)[before:]) >= 3, _losses(log)[before:]
    proxy.allow()
    await write(4)
    assert [e.key for e in events] == ["1", "2", "3", "4"]


def test_faults_frozen_severed_refused(
    cdc_dsn: str, cdc_proxy: FaultProxy, cdc_log: LogWatch, reader: Callable[..., Reader]
) -> None:
    sql(cdc_dsn, "CREATE TABLE t (id int PRIMARY KEY)")
    stream = ChangeStream(cdc_proxy.dsn_for(cdc_dsn), slot="s_faults", tables=["t"], **FAST)
    r = reader(stream)
    anyio.run(_fault_rounds, cdc_dsn, "s_faults", cdc_proxy, cdc_log, r.events)
    assert stream._engine.reconnects >= 3
    r.stop()


@pytest.mark.anyio
async def test_async_faults_frozen_severed_refused(
    cdc_dsn: str, cdc_proxy: FaultProxy, cdc_log: LogWatch
) -> None:
    sql(cdc_dsn, "CREATE TABLE t (id int PRIMARY KEY)")
    events: list[ChangeEvent] = []
    stream = pgherald.AsyncChangeStream(
        cdc_proxy.dsn_for(cdc_dsn), slot="s_faults", tables=["t"], **FAST
    )
    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            tg.start_soon(stream.run, events.append)
            await _fault_rounds(cdc_dsn, "s_faults", cdc_proxy, cdc_log, events)
            stream.stop()
    assert stream._engine.reconnects >= 3


# -- stop() ends the stream within 1 s, whatever it is doing --

STATES = ("idle", "in_transaction", "frozen", "backing_off")


async def _enter(state: str, dsn: str, slot: str, proxy: FaultProxy, stream: Any) -> None:
    """Bring *stream* (started, reading through *proxy*) into *state*."""
    await await_until(lambda: slot_ready(dsn, slot), 10, "the stream to start")
    if state == "in_transaction":
        # The handler stops the stream at the first change of a two-row transaction.
        sql(dsn, "BEGIN; INSERT INTO t VALUES (1); INSERT INTO t VALUES (2); COMMIT")
    elif state == "frozen":
        assert proxy.freeze() >= 1
    elif state == "backing_off":
        stream._engine.config = replace(
            stream._engine.config, reconnect_initial_delay=60.0, reconnect_max_delay=60.0
        )
        with watching("pgherald.cdc") as log:
            proxy.refuse()
            proxy.sever()
            await await_until(lambda: log.matching("again in"), 5, "a reconnection delay")


@pytest.mark.parametrize("state", STATES)
def test_stop_within_1s(
    state: str, cdc_dsn: str, cdc_proxy: FaultProxy, reader: Callable[..., Reader]
) -> None:
    sql(cdc_dsn, "CREATE TABLE t (id int PRIMARY KEY)")
    stream = ChangeStream(cdc_proxy.dsn_for(cdc_dsn), slot="s_stop1", tables=["t"], **FAST)
    stopped_at: list[float] = []

    def handler(e: ChangeEvent) -> None:
        stopped_at.append(time.monotonic())
        stream.stop()

    r = reader(stream, handler if state == "in_transaction" else None)
    anyio.run(_enter, state, cdc_dsn, "s_stop1", cdc_proxy, stream)
    if state == "in_transaction":
        wait_until(lambda: stopped_at, 5, "the handler to stop the stream")
    else:
        stopped_at.append(time.monotonic())
        stream.stop()
    r.thread.join(1.0)
    assert not r.thread.is_alive(), f"stop() did not end the stream within 1 s ({state})"
    assert time.monotonic() - stopped_at[0] < 1.0
    assert r.error is None, r.error
    if state == "in_transaction":
        # Stopped after the first change: the transaction is given up, not acknowledged.
        assert [e.key for e in r.events] == ["1"]
        with ChangeStream(cdc_dsn, slot="s_stop1") as again:
            it = iter(again)
            assert [next(it).key, next(it).key] == ["1", "2"]
            it.close()  # type: ignore[attr-defined]


@pytest.mark.anyio
@pytest.mark.parametrize("state", STATES)
async def test_async_stop_within_1s(state: str, cdc_dsn: str, cdc_proxy: FaultProxy) -> None:
    sql(cdc_dsn, "CREATE TABLE t (id int PRIMARY KEY)")
    stream = pgherald.AsyncChangeStream(
        cdc_proxy.dsn_for(cdc_dsn), slot="s_stop1", tables=["t"], **FAST
    )
    events: list[ChangeEvent] = []
    stopped_at: list[float] = []

    def handler(e: ChangeEvent) -> None:
        events.append(e)
        if state == "in_transaction":
            stopped_at.append(time.monotonic())
            stream.stop()

    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:

            async def run() -> None:
                await stream.run(handler)
                stopped_at.append(time.monotonic())

            tg.start_soon(run)
            await _enter(state, cdc_dsn, "s_stop1", cdc_proxy, stream)
            if state != "in_transaction":
                stopped_at.append(time.monotonic())
                stream.stop()
            with anyio.fail_after(1.0):
                await await_until(lambda: len(stopped_at) == 2, 1.0, "run() to return")
    assert stopped_at[1] - stopped_at[0] < 1.0, f"stop() took too long ({state})"
    if state == "in_transaction":
        assert [e.key for e in events] == ["1"]


# -- read_coalesce: a busy stream is read in gulps --

WINDOW = 1.0  # long: a busy machine's delays stay well inside it


def test_read_coalesce_gathers_a_busy_stream_whole_in_order_within_the_window(
    cdc_dsn: str, reader: Callable[..., Reader]
) -> None:
    """
    Idle, a commit is delivered at once. Busy (a change was just handled), the stream waits
    out the window before reading again: what commits meanwhile comes then, every
    transaction whole and in commit order, none later than the window allows, acknowledged.
    """
    with pytest.raises(pgherald.UsageError, match="read_coalesce"):
        ChangeStream(cdc_dsn, slot="s_gulp", read_coalesce=-1)
    sql(cdc_dsn, "CREATE TABLE t (id int PRIMARY KEY)")
    handled: list[float] = []
    stream = ChangeStream(cdc_dsn, slot="s_gulp", tables=["t"], read_coalesce=WINDOW)
    r = reader(stream, lambda e: handled.append(time.time()))
    wait_until(lambda: slot_ready(cdc_dsn, "s_gulp"), 10, "the stream to start")
    with psycopg.connect(cdc_dsn, autocommit=True) as c:
        c.execute("INSERT INTO t VALUES (0)")
        (first,) = r.wait(1)
        idle = handled[0] - first.commit_time.timestamp()
        assert idle < WINDOW / 2, f"idle, yet it waited {idle:.3f}s"
        for i in range(1, 41, 2):  # 20 two-row transactions, committed during the window
            with c.transaction():
                c.execute("INSERT INTO t VALUES (%s)", (i,))
                c.execute("INSERT INTO t VALUES (%s)", (i + 1,))
    events = r.wait(41)
    assert [e.key for e in events] == [str(i) for i in range(41)]
    assert [e.xid for e in events[1::2]] == [e.xid for e in events[2::2]]  # whole transactions
    assert len({e.xid for e in events}) == 21
    # The first of the busy transactions came when the window was over, not when it committed.
    assert handled[1] - handled[0] >= WINDOW * 0.9, f"no pause ({handled[1] - handled[0]:.3f}s)"
    latency = max(h - e.commit_time.timestamp() for h, e in zip(handled, events, strict=True))
    assert latency < WINDOW + 0.5, f"a change waited {latency:.3f}s"
    end = lsn_to_int(events[-1].lsn)
    wait_until(lambda: confirmed(cdc_dsn, "s_gulp") > end, 5, "the gulp to be acknowledged")
    r.stop()


def test_stop_during_the_read_coalesce_wait(cdc_dsn: str, reader: Callable[..., Reader]) -> None:
    sql(cdc_dsn, "CREATE TABLE t (id int PRIMARY KEY)")
    stream = ChangeStream(cdc_dsn, slot="s_gulp_stop", tables=["t"], read_coalesce=60.0)
    pausing = threading.Event()
    waiter_sleep = stream._waiter.sleep

    def sleep(deadline: float) -> None:
        pausing.set()
        waiter_sleep(deadline)

    stream._waiter.sleep = sleep  # type: ignore[method-assign]
    r = reader(stream)
    wait_until(lambda: slot_ready(cdc_dsn, "s_gulp_stop"), 10, "the stream to start")
    sql(cdc_dsn, "INSERT INTO t VALUES (1)")
    (event,) = r.wait(1)
    assert pausing.wait(5), "no pause after a busy read"
    stopped_at = time.monotonic()
    stream.stop()
    r.thread.join(1.0)
    assert not r.thread.is_alive(), "stop() did not end the 60 s pause within 1 s"
    assert time.monotonic() - stopped_at < 1.0
    assert r.error is None, r.error
    # Handled before the pause: acknowledged at stop.
    assert confirmed(cdc_dsn, "s_gulp_stop") > lsn_to_int(event.lsn)


@pytest.mark.anyio
async def test_async_stop_during_the_read_coalesce_wait(cdc_dsn: str) -> None:
    sql(cdc_dsn, "CREATE TABLE t (id int PRIMARY KEY)")
    stream = pgherald.AsyncChangeStream(
        cdc_dsn, slot="s_gulp_stop", tables=["t"], read_coalesce=60.0
    )
    pauses: list[float] = []
    waiter_sleep = stream._waiter.sleep

    async def sleep(deadline: float) -> None:
        pauses.append(deadline)
        await waiter_sleep(deadline)

    stream._waiter.sleep = sleep  # type: ignore[method-assign]
    events: list[ChangeEvent] = []
    stopped_at: list[float] = []
    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:

            async def run() -> None:
                await stream.run(events.append)
                stopped_at.append(time.monotonic())

            tg.start_soon(run)
            await await_until(lambda: slot_ready(cdc_dsn, "s_gulp_stop"), 10, "the stream")
            sql(cdc_dsn, "INSERT INTO t VALUES (1)")
            await await_until(lambda: events and pauses, 5, "a pause after a busy read")
            stopped_at.append(time.monotonic())
            stream.stop()
            with anyio.fail_after(1.0):
                await await_until(lambda: len(stopped_at) == 2, 1.0, "run() to return")
    assert stopped_at[1] - stopped_at[0] < 1.0
    assert [e.key for e in events] == ["1"]
    assert confirmed(cdc_dsn, "s_gulp_stop") > lsn_to_int(events[0].lsn)


# -- into_log's own connection to the log --


def _stored(dsn: str) -> list[int]:
    with psycopg.connect(dsn, autocommit=True) as c:
        rows = c.execute(
            "SELECT (payload -> 'new' ->> 'id')::int FROM pgherald.events_v1"
            " WHERE channel = 'public.t' ORDER BY id"
        ).fetchall()
    return [r[0] for r in rows]


async def _log_connection_fault(
    dsn: str,
    proxy: FaultProxy,
    into_log: Callable[[Any, str | None], Any],
    make: Any,
    fault: str,
    slot: str,
) -> None:
    """
    The log's connection (through *proxy*) is severed, or frozen (no answer within the
    statement deadline, 1 s here): into_log opens it again and goes on, the change in hand
    stored once, after the stream went back to what it acknowledged. Refused from the start
    (the first connection): into_log ends with `ConnectError`, and a new run stores the change.
    """
    with psycopg.connect(dsn, autocommit=True) as c:
        pgherald.install(c)
    sql(dsn, "CREATE TABLE t (id int PRIMARY KEY)")
    errors: list[BaseException] = []

    async def run(stream: Any, log_dsn: str | None) -> None:
        try:
            await into_log(stream, log_dsn)
        except (pgherald.ConnectionLost, pgherald.ConnectError) as exc:
            errors.append(exc)

    stream = make(dsn, slot=slot, tables=["t"], statement_timeout=1.0, **FAST)
    if fault == "refuse":
        capture(dsn, slot, "t")  # the slot first: change 1 is kept for the stream
        sql(dsn, "INSERT INTO t VALUES (1)")
        proxy.refuse()
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run, stream, proxy.dsn_for(dsn))
                await await_until(lambda: errors, 5, "into_log to end")
        assert isinstance(errors[0], pgherald.ConnectError)
        assert "cannot connect" in str(errors[0])
        proxy.allow()
        end = current_lsn(dsn)
        again = make(dsn, slot=slot, create=False, **FAST)
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run, again, None)
                await await_until(lambda: confirmed(dsn, slot) >= end, 10, "a catch-up")
                again.stop()
        assert _stored(dsn) == [1]
        assert len(errors) == 1
        return
    with watching("pgherald.cdc") as log, anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, stream, proxy.dsn_for(dsn))
            await await_until(lambda: slot_ready(dsn, slot), 10, "the stream to start")
            sql(dsn, "INSERT INTO t VALUES (1)")
            await await_until(lambda: _stored(dsn) == [1], 5, "change 1 in the log")
            accepted = proxy.accepted
            proxy.sever() if fault == "sever" else proxy.freeze()
            sql(dsn, "INSERT INTO t VALUES (2)")
            await await_until(lambda: proxy.accepted > accepted, 5, "a new log connection")
            sql(dsn, "INSERT INTO t VALUES (3)")
            end = current_lsn(dsn)
            await await_until(lambda: confirmed(dsn, slot) >= end, 10, "a catch-up")
            stream.stop()
    assert errors == []
    lost = log_connection_losses(log)
    assert lost, "the lost log connection was not reported"
    if fault == "freeze":
        assert "no answer in 1s" in lost[0]
    assert _stored(dsn) == [1, 2, 3]  # each once: the one in hand was stored after it came again
    proxy.thaw()


FAULTS = ["sever", "freeze", "refuse"]


@pytest.mark.parametrize("fault", FAULTS)
def test_into_log_with_its_log_connection_at_fault(
    cdc_dsn: str, cdc_proxy: FaultProxy, fault: str
) -> None:
    anyio.run(
        _log_connection_fault,
        cdc_dsn,
        cdc_proxy,
        into_log_on_a_thread,
        ChangeStream,
        fault,
        f"s_log_{fault}",
    )


@pytest.mark.anyio
@pytest.mark.parametrize("fault", FAULTS)
async def test_async_into_log_with_its_log_connection_at_fault(
    cdc_dsn: str, cdc_proxy: FaultProxy, fault: str
) -> None:
    await _log_connection_fault(
        cdc_dsn, cdc_proxy, into_log_async, pgherald.AsyncChangeStream, fault, f"s_log_{fault}"
    )
