"""
Change data capture: what `cdc status` names, float and numeric values and keys against the
trigger path (PostgreSQL's own to_jsonb), and a change stream pointed at PgBouncer 1.18, on the
private ``wal_level=logical`` server (each test has its own database).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import anyio
import psycopg
import pytest

import pgherald
from pgherald import ChangeEvent, ChangeStream
from pgherald._cdc import slot_status
from pgherald._protocol.pgoutput import dumps_value
from tests.fix_cli import run as cli
from tests.fix_faults import wait_until
from tests.fix_pgbouncer import PgBouncer, start_pgbouncer
from tests.integration.test_cdc import Reader, capture, reader, slot_ready, sql

__all__ = ["reader"]  # the fixture, shared with test_cdc

# -- gap 1: `cdc status` names the table that was added --


def test_status_names_the_partitioned_table_added_not_its_partitions(cdc_dsn: str) -> None:
    sql(
        cdc_dsn,
        "CREATE TABLE rp (id int, r text, PRIMARY KEY (id, r)) PARTITION BY LIST (r)",
        "CREATE TABLE rp_a PARTITION OF rp FOR VALUES IN ('a')",
        "CREATE TABLE rp_b PARTITION OF rp FOR VALUES IN ('b') PARTITION BY LIST (id)",
        "CREATE TABLE rp_b1 PARTITION OF rp_b FOR VALUES IN (1)",
        'CREATE TABLE "Plain" (id int PRIMARY KEY)',
    )
    capture(cdc_dsn, "s_status", "rp", '"Plain"')
    with psycopg.connect(cdc_dsn) as c:
        (status,) = slot_status(c, "s_status")
    assert status.tables == ("public.Plain", "public.rp")
    # The command shows the same, as text and as JSON.
    text = cli(cdc_dsn, "cdc", "status", "--slot", "s_status")
    assert text.returncode == 0, text.stderr
    assert text.stdout.rstrip().endswith("tables: public.Plain, public.rp"), text.stdout
    as_json = cli(cdc_dsn, "cdc", "status", "--slot", "s_status", "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["tables"] == ["public.Plain", "public.rp"]
    # A partition added later does not show either; a removed table goes.
    sql(cdc_dsn, "CREATE TABLE rp_c PARTITION OF rp FOR VALUES IN ('c')")
    assert cli(cdc_dsn, "cdc", "remove", "--slot", "s_status", '"Plain"').returncode == 0
    with psycopg.connect(cdc_dsn) as c:
        (status,) = slot_status(c, "s_status")
    assert status.tables == ("public.rp",)


@pytest.mark.parametrize("publish", ["FOR ALL TABLES", "FOR TABLES IN SCHEMA public, parts"])
def test_status_names_partitioned_tables_of_a_publication_for_all_tables(
    cdc_dsn: str, publish: str
) -> None:
    """
    A publication made by hand for all tables (or a schema's) publishes each partition of a
    partitioned table: `cdc status` names the partitioned table at the top of the tree (in
    whatever schema the partition sits), once, as for one that `cdc add` took.
    """
    sql(
        cdc_dsn,
        "CREATE SCHEMA parts",
        "CREATE TABLE rp (id int, r text, PRIMARY KEY (id, r)) PARTITION BY LIST (r)",
        "CREATE TABLE parts.rp_a PARTITION OF rp FOR VALUES IN ('a')",
        "CREATE TABLE rp_b PARTITION OF rp FOR VALUES IN ('b') PARTITION BY LIST (id)",
        "CREATE TABLE rp_b1 PARTITION OF rp_b FOR VALUES IN (1)",
        'CREATE TABLE "Plain" (id int PRIMARY KEY)',
        f"CREATE PUBLICATION s_all {publish}",
        "SELECT pg_create_logical_replication_slot('s_all', 'pgoutput')",
    )
    with psycopg.connect(cdc_dsn) as c:
        (status,) = slot_status(c, "s_all")
    assert [t for t in status.tables if not t.startswith("pgherald.")] == [
        "public.Plain",
        "public.rp",
    ]
    text = cli(cdc_dsn, "cdc", "status", "--slot", "s_all")
    assert text.returncode == 0, text.stderr
    assert "rp_a" not in text.stdout
    assert "rp_b" not in text.stdout
    sql(cdc_dsn, "SELECT pg_drop_replication_slot('s_all')")


# -- gap 2: float and numeric values and keys are the trigger path's (to_jsonb's) --

FLOATS = [
    "1e20",
    "0.1",
    "-0.0",
    "NaN",
    "Infinity",
    "-Infinity",
    "1.5e-10",
    "3",
    "1.2345678901234568e+20",
    "2.5",
    "1e-5",
]
NUMERICS = [
    "1.50",
    "0.00000001",
    "NaN",
    "Infinity",
    "-Infinity",
    "-0.0",
    "1e3",
    "12345678901234567890.000000001",
    "-2.5e-7",
]

NUMERIC_COLUMNS = {"nu": ("id",), "fc": ("c",)}


def _typed(value: Any) -> Any:
    """*value* with each scalar's type beside it: 3 and 3.0, or NaN and "NaN", differ."""
    if isinstance(value, dict):
        return {k: _typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(v) for v in value]
    return (type(value).__name__, value)


def _check_against_triggers(
    c: psycopg.Connection[Any], events: list[ChangeEvent], stored: list[tuple[Any, ...]]
) -> None:
    assert len(events) == len(stored)
    for event, (table, key, new_text) in zip(events, stored, strict=True):
        assert event.table == table
        assert event.new is not None
        where = f"{table} {event.new}"
        # The key: the same text, so the same log partition either way.
        assert event.key == key, where
        # The row, as JSON: what jsonb keeps of it (numbers' digits included) is the same.
        row = c.execute("SELECT %s::jsonb::text", (dumps_value(event.new),)).fetchone()
        assert row is not None
        (mine,) = row
        assert mine == new_text, where
        # The row, as Python values: what a consumer of the trigger events gets (json.loads),
        # types included (3 and 3.0, NaN and "NaN" differ); numeric columns read as Decimal,
        # as the stream gives them.
        plain = json.loads(new_text)
        exact = json.loads(new_text, parse_float=Decimal)
        assert event.new.keys() == plain.keys(), where
        for column, value in event.new.items():
            if column in NUMERIC_COLUMNS.get(table, ()):
                assert value == exact[column], f"{where}: {column}"
            else:
                assert _typed(value) == _typed(plain[column]), f"{where}: {column}"


def test_float_and_numeric_values_and_keys_are_the_triggers(
    cdc_dsn: str, reader: Callable[..., Reader]
) -> None:
    with psycopg.connect(cdc_dsn, autocommit=True) as c:
        pgherald.install(c)
        c.execute("CREATE TABLE fl (id float8 PRIMARY KEY, r real, fa float8[], seq int)")
        c.execute("CREATE TABLE nu (id numeric PRIMARY KEY, seq int)")
        c.execute("CREATE TABLE fc (a float8, b real, c numeric, seq int, PRIMARY KEY (a, b, c))")
        for table in ("fl", "nu", "fc"):
            pgherald.add_table_trigger(c, table, durable=True)
    capture(cdc_dsn, "s_floats", "fl", "nu", "fc")
    r = reader(ChangeStream(cdc_dsn, slot="s_floats"))
    wait_until(lambda: slot_ready(cdc_dsn, "s_floats"), 10, "the stream to start")
    with psycopg.connect(cdc_dsn, autocommit=True) as c:
        for i, v in enumerate(FLOATS):
            c.execute(
                "INSERT INTO fl VALUES (%s::float8, %s::real, ARRAY[%s::float8, 1.5], %s)",
                (v, v, v, i),
            )
        for i, v in enumerate(NUMERICS):
            c.execute("INSERT INTO nu VALUES (%s::numeric, %s)", (v, i))
        for i, (v, n) in enumerate(zip(FLOATS, NUMERICS * 2, strict=False)):
            c.execute("INSERT INTO fc VALUES (%s::float8, %s::real, %s::numeric, %s)", (v, v, n, i))
        stored = c.execute(
            "SELECT channel, key, (payload->'new')::text FROM pgherald.events_v1 ORDER BY id"
        ).fetchall()
        # What the trigger stored is to_jsonb's own rendering of the rows.
        rendered = c.execute(
            "SELECT array_agg((to_jsonb(t))::text ORDER BY seq) FROM fl t"
        ).fetchone()
        assert rendered is not None
        assert [s[2] for s in stored[: len(FLOATS)]] == rendered[0]
        events = r.wait(len(stored))
        _check_against_triggers(c, events, [(ch.split(".")[1], k, n) for ch, k, n in stored])
    r.stop()
    # The backfill (rows read by SQL, not from the WAL) gives the same.
    b = reader(ChangeStream(cdc_dsn, slot="s_floats_fill", tables=["fl"], backfill=True))
    fill = b.wait(len(FLOATS))
    assert {e.op for e in fill} == {"READ"}
    fill.sort(key=lambda e: e.new["seq"] if e.new else -1)
    with psycopg.connect(cdc_dsn) as c:
        _check_against_triggers(
            c, fill, [(ch.split(".")[1], k, n) for ch, k, n in stored[: len(FLOATS)]]
        )
    b.stop()


# -- gap 3: a change stream pointed at PgBouncer 1.18 --

FIX = ("direct DSN to PostgreSQL", "PgBouncer 1.23 or later")


def _ignoring_replication(bouncer: PgBouncer) -> None:
    """Restart *bouncer* with ``replication`` in ignore_startup_parameters: it then hands a
    replication connection an ordinary session, without a word."""
    bouncer.kill()
    ini = bouncer.dir / "pgbouncer.ini"
    text = ini.read_text()
    assert "ignore_startup_parameters = " in text
    ini.write_text(
        text.replace("ignore_startup_parameters = ", "ignore_startup_parameters = replication,")
    )
    bouncer.start()


def _no_slot(dsn: str) -> bool:
    with psycopg.connect(dsn) as c:
        # This database's: the private server, and its slots, serve the whole session.
        row = c.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()"
        ).fetchone()
        return row == (0,)


@pytest.mark.parametrize("ignored", [False, True], ids=["refused", "ignored"])
@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_cdc_run_behind_pgbouncer_fails_at_once_naming_the_fix(
    cdc_dsn: str, mode: str, ignored: bool
) -> None:
    with psycopg.connect(cdc_dsn, autocommit=True) as c:
        pgherald.install(c)
        c.execute("CREATE TABLE t (id int PRIMARY KEY)")
    with start_pgbouncer(cdc_dsn, mode) as bouncer:
        if ignored:
            _ignoring_replication(bouncer)
        for args in (["cdc", "run", "t"], ["cdc", "run", "--into-log", "--backfill", "t"]):
            t0 = time.monotonic()
            try:
                done = cli(bouncer.dsn, *args, timeout=15)
            except subprocess.TimeoutExpired:
                pytest.fail(f"`pgherald {' '.join(args)}` hung behind the pooler")
            elapsed = time.monotonic() - t0
            assert done.returncode == 1, (args, done.stdout, done.stderr)
            error = done.stderr.strip().splitlines()[-1]
            assert error.startswith("pgherald: error: cannot open a replication connection")
            assert "Traceback" not in done.stderr
            assert "pooler is in the way" in error
            for fix in FIX:
                assert fix in error, error
            assert elapsed < 10, f"{args} took {elapsed:.2f}s"
    # Nothing was created through the pooler's session (no slot without its backfill).
    assert _no_slot(cdc_dsn)


def _first_change(runtime: str, dsn: str) -> None:
    if runtime == "sync":
        with ChangeStream(dsn, slot="s", tables=["t"], backfill=True) as stream:
            next(iter(stream))
        return

    async def main() -> None:
        async with pgherald.AsyncChangeStream(dsn, slot="s", tables=["t"]) as stream:
            await stream.__anext__()

    anyio.run(main, backend=runtime)


@pytest.mark.parametrize("runtime", ["sync", "asyncio", "trio"])
def test_change_stream_behind_a_pooler_ignoring_replication_raises_pooler_error(
    cdc_dsn: str, runtime: str
) -> None:
    sql(cdc_dsn, "CREATE TABLE t (id int PRIMARY KEY)")
    with start_pgbouncer(cdc_dsn, "session") as bouncer:
        _ignoring_replication(bouncer)
        t0 = time.monotonic()
        with pytest.raises(pgherald.PoolerError) as info:
            _first_change(runtime, bouncer.dsn)
        elapsed = time.monotonic() - t0
    assert isinstance(info.value, pgherald.HeraldError)
    message = str(info.value)
    assert "not a replication connection" in message
    for fix in FIX:
        assert fix in message, message
    assert elapsed < 5, f"took {elapsed:.2f}s"
    assert _no_slot(cdc_dsn)


def test_into_log_with_the_stream_behind_pgbouncer_raises_pooler_error(cdc_dsn: str) -> None:
    with psycopg.connect(cdc_dsn, autocommit=True) as c:
        pgherald.install(c)
        c.execute("CREATE TABLE t (id int PRIMARY KEY)")
    with start_pgbouncer(cdc_dsn, "session") as bouncer:
        stream = ChangeStream(bouncer.dsn, slot="s", tables=["t"])
        t0 = time.monotonic()
        with pytest.raises(pgherald.PoolerError) as info:
            stream.into_log(cdc_dsn)
    assert time.monotonic() - t0 < 5
    for fix in FIX:
        assert fix in str(info.value)
