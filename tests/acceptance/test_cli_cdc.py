"""`pgherald cdc add|status|run|remove|drop` in a subprocess, on a private logical server."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator

import psycopg
import pytest

import pgherald
from tests.fix_cli import cli_env, pgherald_cmd, run
from tests.fix_faults import wait_until
from tests.fix_server import OwnServer, own_server


@pytest.fixture(scope="module")
def pg() -> Iterator[OwnServer]:
    with own_server() as server:
        yield server


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


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
        pgherald_cmd("cdc", "run", "--slot", "shop", "--into-log"),
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


def test_cdc_errors_are_one_line(pg: OwnServer) -> None:
    assert "does not exist" in one_line_error(run(pg.dsn, "cdc", "add", "no_such_table"))
    assert "invalid slot name" in one_line_error(run(pg.dsn, "cdc", "add", "x", "--slot", "A-b"))


def test_cdc_needs_wal_level_logical() -> None:
    with own_server(wal_level="replica") as server:
        with psycopg.connect(server.dsn, autocommit=True) as c:
            c.execute("CREATE TABLE t (id int PRIMARY KEY)")
        line = one_line_error(run(server.dsn, "cdc", "add", "t"))
    assert "wal_level = logical" in line
    assert "restart the server" in line


def test_cdc_add_warns_about_a_table_without_a_key(pg: OwnServer) -> None:
    with psycopg.connect(pg.dsn, autocommit=True) as c:
        c.execute("CREATE TABLE nokey (a int)")
    added = run(pg.dsn, "cdc", "add", "nokey", "--slot", "nokey")
    assert added.returncode == 0, added.stderr
    assert "public.nokey has no primary key" in added.stderr
    assert "REPLICA IDENTITY FULL" in added.stderr
    assert run(pg.dsn, "cdc", "drop", "--slot", "nokey", "--yes").returncode == 0
