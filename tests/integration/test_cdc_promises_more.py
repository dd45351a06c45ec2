"""
Promises of docs/cdc.md that no other test checked, on the private ``wal_level=logical``
server of `tests/integration/test_cdc.py` (each test has its own database; no mocks).

- "Schema changes": a table added to the publication while a reader runs (with `pgherald cdc
  add`, or `add_tables`) is picked up by the server: the running stream delivers its changes,
  with no restart, on a thread, asyncio and trio; its primary key is its ``key`` (the key's
  order, as a durable trigger and a reader started afterwards write it) when the table has the
  default replica identity; with another identity a restarted reader has the key.
- "Exactly once into the durable log": each event `into_log` stores carries the headers
  ``cdc_slot`` (the slot), ``cdc_lsn`` (the commit LSN: the WAL record of the transaction's
  commit, checked with pg_walinspect) and ``cdc_xid`` (the writer's transaction id); every
  change of one transaction carries the same values, however it is split into statements.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import psycopg
import pytest

import pgherald
from pgherald import ChangeEvent, ChangeStream
from pgherald._cdc import add_tables
from pgherald._protocol.pgoutput import lsn_to_int
from tests.fix_cli import run as cli
from tests.fix_faults import await_until, wait_until
from tests.fix_server import OwnServer
from tests.integration.test_cdc import (
    Reader,
    capture,
    current_lsn,
    one,
    slot_ready,
    sql,
)

# A table whose primary key's order (id, region) is not its columns' order (region, id, v):
# the key is the JSON array in the key's order, as a durable trigger writes it.
ORDERS = "CREATE TABLE orders (id int PRIMARY KEY, item text)"
LINES = "CREATE TABLE lines (region text, id int, v text, PRIMARY KEY (id, region))"
LINE_CHANGES = (
    "INSERT INTO lines VALUES ('eu', 2, 'x')",
    "UPDATE lines SET v = 'y' WHERE id = 2",
    "DELETE FROM lines WHERE id = 2",
    "INSERT INTO orders VALUES (2, 'jam')",
)


def add_lines(dsn: str, slot: str, how: str) -> None:
    """Add table ``lines`` to the publication of *slot* (it exists): `cdc add`, or the API."""
    if how == "cli":
        done = cli(dsn, "cdc", "add", "lines", "--slot", slot)
        assert done.returncode == 0, done.stderr
    else:
        with psycopg.connect(dsn, autocommit=True) as c:
            assert add_tables(c, ["lines"], slot=slot) == [("public", "lines")]
    assert one(
        dsn,
        "SELECT count(*) FROM pg_publication_tables WHERE pubname = %s AND tablename = 'lines'",
        slot,
    )


def check_lines_delivered(events: list[ChangeEvent]) -> None:
    """The changes of `LINE_CHANGES` after an insert into orders, as the stream gave them."""
    assert [(e.op, e.table, e.key) for e in events] == [
        ("INSERT", "orders", "1"),
        ("INSERT", "lines", '[2, "eu"]'),
        ("UPDATE", "lines", '[2, "eu"]'),
        ("DELETE", "lines", '[2, "eu"]'),
        ("INSERT", "orders", "2"),
    ]
    ins, upd, dele = events[1:4]
    assert ins.new == {"region": "eu", "id": 2, "v": "x"}
    assert upd.new == {"region": "eu", "id": 2, "v": "y"}
    assert dele.old == {"region": "eu", "id": 2}  # the key columns (default identity)


# -- a table added while the stream runs --


@pytest.fixture
def readers() -> Iterator[Callable[[ChangeStream], Reader]]:
    """Starts a `Reader` of a stream; stops each as the test ends."""
    started: list[Reader] = []

    def start(stream: ChangeStream) -> Reader:
        started.append(Reader(stream))
        return started[-1]

    yield start
    for r in started:
        r.stream.stop()
        r.thread.join(5)


@pytest.mark.parametrize("how", ["cli", "add_tables"])
def test_a_table_added_while_the_stream_runs_is_delivered_without_a_restart(
    cdc_dsn: str, readers: Callable[[ChangeStream], Reader], how: str
) -> None:
    """cdc.md "Schema changes": "A table added to the publication while a reader runs is
    picked up by the server. Its primary key is used for `key` when the table has the default
    replica identity." And cdc.md "What an event looks like": `key` is "the same text as a
    durable trigger's key"."""
    sql(cdc_dsn, ORDERS, LINES)
    with psycopg.connect(cdc_dsn, autocommit=True) as c:
        pgherald.install(c)
        pgherald.add_table_trigger(c, "lines", durable=True)
    r = readers(ChangeStream(cdc_dsn, slot="s_grow", tables=["orders"]))
    wait_until(lambda: slot_ready(cdc_dsn, "s_grow"), 10, "the stream to start")
    sql(cdc_dsn, "INSERT INTO orders VALUES (1, 'tea')")
    r.wait(1)
    add_lines(cdc_dsn, "s_grow", how)
    sql(cdc_dsn, *LINE_CHANGES)
    events = r.wait(5)
    check_lines_delivered(events)
    triggered = [row[1] for row in stored(cdc_dsn) if row[0] == "public.lines"]
    assert triggered == [e.key for e in events if e.table == "lines"]
    # The same stream, never restarted nor reconnected.
    assert r.thread.is_alive()
    assert r.stream._engine.reconnects == 0
    r.stop()
    # A reader started now (keys from the catalog) keys the table the same way.
    sql(cdc_dsn, "INSERT INTO lines VALUES ('us', 3, 'z')")
    again = readers(ChangeStream(cdc_dsn, slot="s_grow"))
    (event,) = again.wait(1)
    assert (event.op, event.table, event.key) == ("INSERT", "lines", '[3, "us"]')
    again.stop()


@pytest.mark.anyio
async def test_async_a_table_added_while_the_stream_runs_is_delivered_without_a_restart(
    cdc_dsn: str,
) -> None:
    """The same for `AsyncChangeStream`, on asyncio and trio."""
    sql(cdc_dsn, ORDERS, LINES)
    stream = pgherald.AsyncChangeStream(cdc_dsn, slot="s_agrow", tables=["orders"])
    events: list[ChangeEvent] = []

    async def read() -> None:
        async for e in stream:
            events.append(e)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            await await_until(lambda: slot_ready(cdc_dsn, "s_agrow"), 10, "the stream")
            sql(cdc_dsn, "INSERT INTO orders VALUES (1, 'tea')")
            await await_until(lambda: len(events) >= 1, 10, "the first change")
            await anyio.to_thread.run_sync(add_lines, cdc_dsn, "s_agrow", "add_tables")
            sql(cdc_dsn, *LINE_CHANGES)
            await await_until(lambda: len(events) >= 5, 10, "the added table's changes")
            stream.stop()
    check_lines_delivered(events)
    assert stream._engine.reconnects == 0


def test_a_table_added_without_the_default_identity_is_delivered_and_keyed_after_a_restart(
    cdc_dsn: str, readers: Callable[[ChangeStream], Reader]
) -> None:
    """cdc.md: "Otherwise `key` needs a restart of the reader, which reads the keys from the
    catalog when it starts": the running stream delivers the table's changes all the same."""
    sql(
        cdc_dsn,
        ORDERS,
        "CREATE TABLE notes (id int PRIMARY KEY, body text)",
        "ALTER TABLE notes REPLICA IDENTITY FULL",
    )
    r = readers(ChangeStream(cdc_dsn, slot="s_full_grow", tables=["orders"]))
    wait_until(lambda: slot_ready(cdc_dsn, "s_full_grow"), 10, "the stream to start")
    with psycopg.connect(cdc_dsn, autocommit=True) as c:
        add_tables(c, ["notes"], slot="s_full_grow")
    sql(cdc_dsn, "INSERT INTO notes VALUES (1, 'a')", "UPDATE notes SET body = 'b'")
    ins, upd = r.wait(2)
    assert (ins.op, ins.table, ins.new) == ("INSERT", "notes", {"id": 1, "body": "a"})
    assert (upd.op, upd.old, upd.new, upd.changed) == (
        "UPDATE",
        {"id": 1, "body": "a"},
        {"id": 1, "body": "b"},
        ["body"],
    )
    assert r.stream._engine.reconnects == 0
    r.stop()
    sql(cdc_dsn, "INSERT INTO notes VALUES (2, 'c')")
    again = readers(ChangeStream(cdc_dsn, slot="s_full_grow"))
    (event,) = again.wait(1)
    assert (event.op, event.table, event.key) == ("INSERT", "notes", "2")
    again.stop()


# -- the headers of into_log's events --


class Written:
    """What the server says of a transaction the test wrote."""

    def __init__(self, xid: int, before_commit: int, after_commit: int) -> None:
        self.xid = xid
        self.before_commit = before_commit  # the WAL insert position just before COMMIT
        self.after_commit = after_commit  # and just after it


def write(dsn: str, *statements: str) -> Written:
    """*statements* in one transaction, with its id and the WAL positions around its commit."""
    with psycopg.connect(dsn) as c:
        row = c.execute("SELECT pg_current_xact_id()::text, txid_current()").fetchone()
        assert row is not None
        xid = int(row[0])
        assert row[1] == xid
        for s in statements:
            c.execute(s.encode())
        before = c.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        assert before is not None
        c.commit()
    return Written(xid, lsn_to_int(before[0]), current_lsn(dsn))


def commit_record_lsn(dsn: str, written: Written) -> str | None:
    """
    Where the WAL holds the COMMIT record of *written*'s transaction, as pg_lsn text, read
    with pg_walinspect (None: the server lacks it).
    """
    with psycopg.connect(dsn, autocommit=True) as c:
        try:
            c.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        except psycopg.errors.FeatureNotSupported:
            return None
        except psycopg.errors.UndefinedFile:
            return None
    # pg_walinspect reads only flushed WAL (synchronous_commit is off on the test server).
    wait_until(
        lambda: (
            lsn_to_int(one(dsn, "SELECT pg_current_wal_flush_lsn()::text")) >= written.after_commit
        ),
        10,
        "the WAL to be flushed",
    )
    with psycopg.connect(dsn, autocommit=True) as c:
        found = c.execute(
            "SELECT start_lsn::text FROM pg_get_wal_records_info(%s::pg_lsn, %s::pg_lsn) "
            "WHERE resource_manager = 'Transaction' AND record_type = 'COMMIT' "
            "AND xid::text = %s",
            (
                _lsn_text(written.before_commit),
                _lsn_text(written.after_commit),
                str(written.xid),
            ),
        ).fetchall()
    assert len(found) == 1, found
    return str(found[0][0])


def _lsn_text(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


@contextlib.contextmanager
def into_log_running(stream: ChangeStream, **kwargs: Any) -> Iterator[list[BaseException]]:
    """`ChangeStream.into_log` on a thread for the block; its errors (the test asserts them)."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            stream.into_log(**kwargs)
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    runner = threading.Thread(target=target, daemon=True)
    runner.start()
    try:
        yield errors
    finally:
        stream.stop()
        runner.join(10)
    assert not runner.is_alive(), "stop() did not end into_log"


def stored(dsn: str) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    with psycopg.connect(dsn) as c:
        return [
            (r[0], r[1], r[2], r[3])
            for r in c.execute(
                "SELECT channel, key, payload, headers FROM pgherald.events_v1 ORDER BY id"
            )
        ]


TWO_TABLES = ("CREATE TABLE a (id int PRIMARY KEY)", "CREATE TABLE b (id int PRIMARY KEY)")
# One transaction of three changes in three runs of one table (three `publish_many`s; with
# batch=1, three flushes as well), then one of one change.
FIRST = ("INSERT INTO a VALUES (1)", "INSERT INTO b VALUES (1)", "INSERT INTO a VALUES (2)")
SECOND = ("INSERT INTO b VALUES (2)",)


def check_headers(
    dsn: str,
    slot: str,
    rows: list[tuple[str, str, dict[str, Any], dict[str, Any]]],
    first: Written,
    second: Written,
) -> None:
    """The events of `FIRST` and `SECOND` carry the slot, their commit LSN and xid."""
    assert [(r[0], r[1]) for r in rows] == [
        ("public.a", "1"),
        ("public.b", "1"),
        ("public.a", "2"),
        ("public.b", "2"),
    ]
    headers = [{k: r[3].get(k) for k in ("cdc_slot", "cdc_lsn", "cdc_xid")} for r in rows]
    lsn1, lsn2 = headers[0]["cdc_lsn"], headers[3]["cdc_lsn"]
    # Every change of one transaction: the same three values.
    assert headers == [
        {"cdc_slot": slot, "cdc_lsn": lsn1, "cdc_xid": first.xid},
        {"cdc_slot": slot, "cdc_lsn": lsn1, "cdc_xid": first.xid},
        {"cdc_slot": slot, "cdc_lsn": lsn1, "cdc_xid": first.xid},
        {"cdc_slot": slot, "cdc_lsn": lsn2, "cdc_xid": second.xid},
    ]
    for lsn, written in ((lsn1, first), (lsn2, second)):
        # PostgreSQL's pg_lsn text, and the commit's place: after every change of the
        # transaction (all written before `before_commit`), before what followed the commit.
        assert one(dsn, "SELECT %s::pg_lsn::text", lsn) == lsn
        assert written.before_commit <= lsn_to_int(lsn) < written.after_commit, (
            lsn,
            _lsn_text(written.before_commit),
            _lsn_text(written.after_commit),
        )
        record = commit_record_lsn(dsn, written)
        if record is not None:  # exactly the transaction's COMMIT record
            assert lsn == record
    # The payload's own lsn and tx say the same.
    assert [(r[2]["lsn"], r[2]["tx"]) for r in rows] == [
        (h["cdc_lsn"], str(h["cdc_xid"])) for h in headers
    ]


def setup_log(dsn: str, slot: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        pgherald.install(c)
    sql(dsn, *TWO_TABLES)
    capture(dsn, slot, "a", "b")


@pytest.mark.parametrize("batch", [1, 1000])
def test_into_log_headers_are_the_slot_the_commit_lsn_and_the_xid(cdc_dsn: str, batch: int) -> None:
    """cdc.md "Exactly once into the durable log": "with headers `cdc_slot`, `cdc_lsn` (the
    commit LSN) and `cdc_xid`"."""
    setup_log(cdc_dsn, "s_headers")
    first = write(cdc_dsn, *FIRST)
    second = write(cdc_dsn, *SECOND)
    stream = ChangeStream(cdc_dsn, slot="s_headers", create=False, status_interval=0.2)
    with into_log_running(stream, batch=batch) as errors:
        wait_until(lambda: errors or len(stored(cdc_dsn)) >= 4, 20, "both transactions stored")
    assert not errors, errors
    check_headers(cdc_dsn, "s_headers", stored(cdc_dsn), first, second)


@pytest.mark.anyio
async def test_async_into_log_headers_are_the_slot_the_commit_lsn_and_the_xid(
    cdc_dsn: str,
) -> None:
    """The same for `AsyncChangeStream.into_log`, on asyncio and trio."""
    setup_log(cdc_dsn, "s_aheaders")
    first = write(cdc_dsn, *FIRST)
    second = write(cdc_dsn, *SECOND)
    stream = pgherald.AsyncChangeStream(
        cdc_dsn, slot="s_aheaders", create=False, status_interval=0.2
    )
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(stream.into_log)
            await await_until(lambda: len(stored(cdc_dsn)) >= 4, 20, "both transactions stored")
            stream.stop()
    check_headers(cdc_dsn, "s_aheaders", stored(cdc_dsn), first, second)


def test_xid_is_the_64_bit_transaction_id_on_a_server_past_its_first_epoch(
    server: OwnServer,
) -> None:
    """
    The stream's Begin messages carry 32 bits of the transaction id. On a server whose ids have
    passed 2**32 (here: epoch 1, set with pg_resetwal as after 4 billion transactions), a
    change's ``xid``, its ``tx`` and into_log's ``cdc_xid`` are still the writer's
    ``pg_current_xact_id()``, the id a durable trigger stores for the same row.
    """
    server.stop()
    server._run("pg_resetwal", "-e", "1", "-D", str(server.data))
    server.start()
    dsn = server.dsn
    epoch = one(dsn, "SELECT pg_current_xact_id()::text::bigint >> 32")
    assert epoch == 1
    with psycopg.connect(dsn, autocommit=True) as c:
        pgherald.install(c)
        c.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        pgherald.add_table_trigger(c, "t", durable=True, channel="t_trigger")
    capture(dsn, "epoch", "t")

    def write(i: int) -> int:
        with psycopg.connect(dsn) as c:
            xid = c.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()
            c.execute("INSERT INTO t VALUES (%s, 'x')", (i,))
        assert xid is not None
        return int(xid[0])

    writers = [write(i) for i in range(3)]
    assert all(x >> 32 == 1 for x in writers)
    stream = ChangeStream(dsn, slot="epoch")
    r = Reader(stream)
    try:
        events = r.wait(3)
    finally:
        stream.stop()
        r.thread.join(10)
    assert [e.xid for e in events] == writers
    assert [e.as_dict()["tx"] for e in events] == [str(x) for x in writers]
    with psycopg.connect(dsn) as c:
        stored = c.execute(
            "SELECT payload->>'tx' FROM pgherald.events_v1 WHERE channel = 't_trigger' ORDER BY id"
        ).fetchall()
    assert [row[0] for row in stored] == [str(x) for x in writers]

    into = ChangeStream(dsn, slot="epoch_log", tables=["t"], backfill=False)
    done = threading.Thread(target=into.into_log, daemon=True)
    done.start()
    try:
        wait_until(lambda: slot_ready(dsn, "epoch_log"), 10, "the stream to start")
        last = write(3)
        wait_until(
            lambda: (
                one(
                    dsn,
                    "SELECT headers->>'cdc_xid' FROM pgherald.events_v1 "
                    "WHERE headers->>'cdc_slot' = 'epoch_log'",
                )
                is not None
            ),
            10,
            "into_log to store the change",
        )
    finally:
        into.stop()
        done.join(10)
    assert one(
        dsn,
        "SELECT headers->>'cdc_xid' FROM pgherald.events_v1 WHERE headers->>'cdc_slot' = 'epoch_log'",
    ) == str(last)


def test_a_table_made_again_or_rekeyed_while_the_stream_runs_is_keyed_by_its_new_key(
    cdc_dsn: str, readers: Callable[[ChangeStream], Reader]
) -> None:
    """The key's order is known per table (its oid), not per name: a table dropped and made
    again under the same name with another key order, then added again, is keyed by the new
    key; so is a table whose primary key changes to other columns while the stream runs."""
    sql(cdc_dsn, ORDERS, LINES)
    r = readers(ChangeStream(cdc_dsn, slot="s_remade", tables=["orders", "lines"]))
    wait_until(lambda: slot_ready(cdc_dsn, "s_remade"), 10, "the stream to start")
    sql(cdc_dsn, "INSERT INTO lines VALUES ('eu', 1, 'x')")
    assert [e.key for e in r.wait(1)] == ['[1, "eu"]']  # (id, region), read at the start
    sql(
        cdc_dsn,
        "DROP TABLE lines",
        "CREATE TABLE lines (region text, id int, v text, PRIMARY KEY (region, id))",
    )
    with psycopg.connect(cdc_dsn, autocommit=True) as c:
        add_tables(c, ["lines"], slot="s_remade")
    sql(cdc_dsn, "INSERT INTO lines VALUES ('us', 2, 'y')")
    assert r.wait(2)[1].key == '["us", 2]'  # (region, id): the new table's key
    sql(
        cdc_dsn,
        "ALTER TABLE lines DROP CONSTRAINT lines_pkey",
        "ALTER TABLE lines ADD PRIMARY KEY (v, id)",
        "INSERT INTO lines VALUES ('eu', 3, 'z')",
    )
    assert r.wait(3)[2].key == '["z", 3]'  # (v, id), not the columns' order (id, v)
    # The same columns in another order: the server describes the table as before.
    sql(
        cdc_dsn,
        "ALTER TABLE lines DROP CONSTRAINT lines_pkey",
        "ALTER TABLE lines ADD PRIMARY KEY (id, v)",
        "INSERT INTO lines VALUES ('eu', 4, 'w')",
    )
    assert r.wait(4)[3].key == '[4, "w"]'
    # A table described again with its key unchanged (VACUUM, ANALYZE) keeps it, asked once.
    asked = r.stream._engine.key_lookups
    sql(cdc_dsn, "VACUUM ANALYZE lines", "INSERT INTO lines VALUES ('eu', 5, 'v')")
    assert r.wait(5)[4].key == '[5, "v"]'
    assert r.stream._engine.key_lookups <= asked + 1
    assert r.stream._engine.reconnects == 0
