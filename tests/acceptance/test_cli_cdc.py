"""`pgherald cdc add|status|run|remove|drop` and `watch --cdc` in a subprocess, on a private
logical server."""

from __future__ import annotations

import json
import signal
import subprocess
import threading

import psycopg
import pytest

import pgherald
from pgherald._cdc import add_tables
from tests.fix_cli import cli_env, one_line_error, pgherald_cmd, run
from tests.fix_faults import wait_until
from tests.fix_server import OwnServer


@pytest.fixture
def pg(logical_server: OwnServer) -> OwnServer:
    return logical_server


def test_cdc_lifecycle(pg: OwnServer) -> None:
    dsn = pg.dsn
    with psycopg.connect(dsn, autocommit=True) as c:
        pgherald.install(c)
        c.execute("CREATE TABLE orders (id int PRIMARY KEY, item text, secret text)")
    added = run(dsn, "cdc", "add", "orders", "--columns", "id,item", "--slot", "shop")
    assert added.returncode == 0, added.stderr
    assert added.stdout == (
        "public.orders (columns id,item): captured in publication 'shop', slot 'shop'\n"
    )
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("INSERT INTO orders VALUES (1, 'tea', 'hidden')")

    status = run(dsn, "cdc", "status", "--slot", "shop", "--json", "--max-retained", "10")
    assert status.returncode == 0, status.stderr
    (record,) = [json.loads(line) for line in status.stdout.splitlines()]
    assert record["slot"] == "shop"
    assert record["active"] is False
    assert record["tables"] == ["public.orders"]
    assert record["retained_bytes"] > 0
    assert "warning: slot 'shop' keeps" in status.stderr  # over the 10-byte limit

    # run --into-log: the change lands in the durable log, once, without the unpublished column.
    with subprocess.Popen(
        pgherald_cmd("cdc", "run", "--slot", "shop", "--into-log", "--read-coalesce", "0"),
        env=cli_env(dsn),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            with psycopg.connect(dsn, autocommit=True) as c:
                wait_until(
                    lambda: (
                        c.execute(
                            "SELECT count(*) FROM pgherald.events_v1 WHERE channel = 'public.orders'"
                        ).fetchone()[0]
                        == 1
                    ),
                    20,
                    "the change in the log",
                )
                row = c.execute("SELECT key, payload FROM pgherald.events_v1").fetchone()
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert row is not None
    assert row[0] == "1"
    assert row[1]["new"] == {"id": 1, "item": "tea"}
    assert row[1]["op"] == "INSERT"

    removed = run(dsn, "cdc", "remove", "orders", "--slot", "shop")
    assert removed.stdout == "removed public.orders\n", removed.stderr
    refused = run(dsn, "cdc", "drop", "--slot", "shop")
    assert "pass --yes" in one_line_error(refused)
    dropped = run(dsn, "cdc", "drop", "--slot", "shop", "--yes")
    assert dropped.stdout == "dropped slot 'shop'\n", dropped.stderr
    gone = run(dsn, "cdc", "status", "--slot", "shop")
    assert gone.stdout == "no pgoutput replication slot named 'shop'\n"


@pytest.mark.parametrize("bad", ["-1", "nan", "inf", "ten"])
def test_a_bad_read_coalesce_is_a_usage_error(bad: str) -> None:
    # Refused before any connection is made (no server needed: the DSN is never used).
    r = run("host=127.0.0.1 port=1 dbname=none", "cdc", "run", "--read-coalesce", bad)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("pgherald: error: Invalid value for '--read-coalesce'"), r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr


def test_cdc_errors_are_one_line(pg: OwnServer) -> None:
    assert "does not exist" in one_line_error(run(pg.dsn, "cdc", "add", "no_such_table"))
    assert "invalid slot name" in one_line_error(run(pg.dsn, "cdc", "add", "x", "--slot", "A-b"))


def test_cdc_needs_wal_level_logical(replica_server: OwnServer) -> None:
    with psycopg.connect(replica_server.dsn, autocommit=True) as c:
        c.execute("CREATE TABLE IF NOT EXISTS t (id int PRIMARY KEY)")
    line = one_line_error(run(replica_server.dsn, "cdc", "add", "t"))
    watching = one_line_error(run(replica_server.dsn, "watch", "--cdc", "s", "t"))
    assert "wal_level = logical" in line
    assert "restart the server" in line
    assert watching == line


def test_cdc_add_warns_about_a_table_without_a_key(pg: OwnServer) -> None:
    with psycopg.connect(pg.dsn, autocommit=True) as c:
        c.execute("CREATE TABLE nokey (a int)")
    added = run(pg.dsn, "cdc", "add", "nokey", "--slot", "nokey")
    assert added.returncode == 0, added.stderr
    assert "public.nokey has no primary key" in added.stderr
    assert "REPLICA IDENTITY FULL" in added.stderr
    assert run(pg.dsn, "cdc", "drop", "--slot", "nokey", "--yes").returncode == 0


def _slot_active(dsn: str, slot: str) -> bool | None:
    """
    None: no such slot. True only past the slot's creation (during it the slot is active
    too, and a change committed before its consistent point is never decoded).
    """
    with psycopg.connect(dsn) as c:
        row = c.execute(
            "SELECT active AND confirmed_flush_lsn IS NOT NULL FROM pg_replication_slots "
            "WHERE slot_name = %s",
            (slot,),
        ).fetchone()
    return None if row is None else bool(row[0])


def _watch(dsn: str, *args: str, writes: list[str], lines: int) -> tuple[list[str], str]:
    """`pgherald watch ARGS` until it printed *lines* lines after *writes*, then SIGTERM."""
    out: list[str] = []
    with subprocess.Popen(
        pgherald_cmd("watch", *args),
        env=cli_env(dsn),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        stdout = proc.stdout
        reader = threading.Thread(target=lambda: out.extend(stdout), daemon=True)
        reader.start()
        try:
            slot = args[args.index("--cdc") + 1]
            wait_until(lambda: _slot_active(dsn, slot), 20, "watch to read its slot")
            with psycopg.connect(dsn, autocommit=True) as c:
                for w in writes:
                    c.execute(w.encode())
            wait_until(lambda: len(out) >= lines or proc.poll() is not None, 20, "the changes")
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=10)
            reader.join(5)
    assert proc.returncode == 0, err
    return out, err


def test_watch_cdc(pg: OwnServer) -> None:
    dsn = pg.dsn
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE TABLE pets (id int PRIMARY KEY, name text, price numeric)")
    # --temporary: the slot and publication watch creates are gone when it ends.
    out, err = _watch(
        dsn,
        "--cdc",
        "w_tmp",
        "--temporary",
        "pets",
        writes=[
            "INSERT INTO pets VALUES (1, 'Rex', 10.50)",
            "UPDATE pets SET name = 'Max' WHERE id = 1",
            "DELETE FROM pets WHERE id = 1",
        ],
        lines=3,
    )
    assert "watching pets through slot 'w_tmp'" in err
    assert out == [
        'INSERT public.pets {"id":1,"name":"Rex","price":10.50}\n',
        'UPDATE public.pets {"id":1,"name":"Max","price":10.50}\n',
        'DELETE public.pets {"id":1}\n',
    ]
    assert _slot_active(dsn, "w_tmp") is None
    with psycopg.connect(dsn) as c:
        left = c.execute("SELECT count(*) FROM pg_publication WHERE pubname = 'w_tmp'").fetchone()
    assert left == (0,)

    # --json, no --temporary: one JSON object per change, and the slot stays for next time.
    out, _ = _watch(
        dsn,
        "--cdc",
        "w_kept",
        "--json",
        "pets",
        writes=["INSERT INTO pets VALUES (2, 'Tom', 3)"],
        lines=1,
    )
    (record,) = [json.loads(line) for line in out]
    assert (record["op"], record["table"], record["key"]) == ("INSERT", "pets", "2")
    assert record["new"] == {"id": 2, "name": "Tom", "price": 3}
    assert _slot_active(dsn, "w_kept") is False
    assert run(dsn, "cdc", "drop", "--slot", "w_kept", "--yes").returncode == 0


def _publication(dsn: str, name: str) -> list[str] | None:
    """The tables given to publication *name* (None: no such publication)."""
    with psycopg.connect(dsn) as c:
        if not c.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (name,)).fetchone():
            return None
        rows = c.execute(
            "SELECT r.prrelid::regclass::text FROM pg_publication_rel r "
            "JOIN pg_publication p ON p.oid = r.prpubid WHERE p.pubname = %s ORDER BY 1",
            (name,),
        ).fetchall()
    return [r[0] for r in rows]


def _slots(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as c:
        return [
            r[0]
            for r in c.execute(
                "SELECT slot_name FROM pg_replication_slots WHERE database = current_database()"
            ).fetchall()
        ]


def test_cdc_add_columns_without_the_key_is_refused(cdc_dsn: str) -> None:
    with psycopg.connect(cdc_dsn, autocommit=True) as c:
        c.execute("CREATE TABLE cust (id int PRIMARY KEY, name text, email text)")
        c.execute("INSERT INTO cust VALUES (1, 'a', 'a@x')")
    line = one_line_error(run(cdc_dsn, "cdc", "add", "cust", "--columns", "name,email"))
    assert "primary key of public.cust (id)" in line, line
    assert "--columns name,email,id" in line, line
    assert _publication(cdc_dsn, "pgherald") is None
    assert _slots(cdc_dsn) == []
    with psycopg.connect(cdc_dsn, autocommit=True) as c:
        c.execute("UPDATE cust SET name = 'b' WHERE id = 1")  # the application's writes work
        c.execute("DELETE FROM cust WHERE id = 1")
        # The Python API refuses it the same way.
        with pytest.raises(pgherald.UsageError, match=r"primary key of public\.cust \(id\)"):
            add_tables(c, ["cust"], columns=["name"])
    assert _publication(cdc_dsn, "pgherald") is None
    # With the key, it is accepted.
    added = run(cdc_dsn, "cdc", "add", "cust", "--columns", "id,name", "--backfill")
    assert added.returncode == 0, added.stderr
    assert _publication(cdc_dsn, "pgherald") == ["cust"]
    with psycopg.connect(cdc_dsn, autocommit=True) as c:
        row = c.execute(
            "SELECT attnames::text[] FROM pg_publication_tables"
            " WHERE pubname = 'pgherald' AND tablename = 'cust'"
        ).fetchone()
        assert row is not None
        assert sorted(row[0]) == ["id", "name"]
        # Writes work: a column list without the replica identity would fail this UPDATE.
        c.execute("INSERT INTO cust VALUES (2, 'c', 'c@x')")
        c.execute("UPDATE cust SET name = 'd' WHERE id = 2")


def test_a_failed_cdc_add_leaves_nothing_behind(cdc_dsn: str) -> None:
    with psycopg.connect(cdc_dsn, autocommit=True) as c:
        c.execute("CREATE TABLE lo (id int PRIMARY KEY, v text)")
        c.execute("CREATE TABLE lo2 (id int PRIMARY KEY, v text)")
    # A publication without a slot yet (`cdc add --backfill`), holding lo.
    assert run(cdc_dsn, "cdc", "add", "lo", "--slot", "kept", "--backfill").returncode == 0
    fillers: list[str] = []
    with psycopg.connect(cdc_dsn, autocommit=True) as c:
        try:
            row = c.execute(
                "SELECT current_setting('max_replication_slots')::int - count(*) "
                "FROM pg_replication_slots"
            ).fetchone()
            assert row is not None
            for i in range(row[0]):  # every slot in use
                fillers.append(f"filler_{i}")
                c.execute("SELECT pg_create_physical_replication_slot(%s)", (fillers[-1],))
            line = one_line_error(run(cdc_dsn, "cdc", "add", "lo", "--slot", "leftover"))
            assert "max_replication_slots" in line, line
            assert _publication(cdc_dsn, "leftover") is None  # nothing left behind
            # An existing publication is put back as it was: lo2 not added, lo's columns kept.
            line = one_line_error(run(cdc_dsn, "cdc", "add", "lo2", "--slot", "kept"))
            assert "max_replication_slots" in line, line
            line = one_line_error(
                run(cdc_dsn, "cdc", "add", "lo", "--columns", "id", "--slot", "kept")
            )
            assert "max_replication_slots" in line, line
            assert _publication(cdc_dsn, "kept") == ["lo"]
            cols = c.execute(
                "SELECT attnames::text[] FROM pg_publication_tables WHERE pubname = 'kept'"
            ).fetchone()
            assert cols is not None
            assert cols[0] == ["id", "v"]
            c.execute("INSERT INTO lo VALUES (1, 'a')")
            c.execute("UPDATE lo SET v = 'b'")
        finally:
            for name in fillers:
                c.execute("SELECT pg_drop_replication_slot(%s)", (name,))
    assert _slots(cdc_dsn) == []


def test_cdc_add_run_remove_a_partitioned_table(cdc_dsn: str) -> None:
    with psycopg.connect(cdc_dsn, autocommit=True) as c:
        c.execute(
            "CREATE TABLE rp (id int, r text, PRIMARY KEY (id, r)) PARTITION BY LIST (r); "
            "CREATE TABLE rp_a PARTITION OF rp FOR VALUES IN ('a')"
        )
    for _ in range(2):  # adding again is fine
        added = run(cdc_dsn, "cdc", "add", "rp", "--slot", "rpslot", "--backfill")
        assert added.returncode == 0, added.stderr
    assert _publication(cdc_dsn, "rpslot") == ["rp"]
    removed = run(cdc_dsn, "cdc", "remove", "rp", "--slot", "rpslot")
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout == "removed public.rp\n"
    assert _publication(cdc_dsn, "rpslot") == []
