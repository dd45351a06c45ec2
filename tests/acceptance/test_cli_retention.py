"""`pgherald install --retention/--partitions`, `maintain`, `retention`, `partitions`."""

from __future__ import annotations

import json
from datetime import timedelta

import psycopg

import pgherald
from tests.fix_cli import run


def test_install_with_retention_and_partitions_then_maintain(
    dsn: str, conn: psycopg.Connection
) -> None:
    out = run(dsn, "install", "--retention", "30d", "--partitions", "32")
    assert out.returncode == 0, out.stderr
    assert "retention: 30d" in out.stdout
    assert pgherald.retention(conn).keep == timedelta(days=30)
    assert pgherald.partition_count(conn) == 32
    shown = run(dsn, "retention")
    assert shown.returncode == 0, shown.stderr
    assert "retention: 30d" in shown.stdout
    assert "abandon after: 1w" in shown.stdout
    # A day 40 days old, one group pinning it: named on stderr, kept; then consumed, dropped.
    today = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
    pgherald.maintain(conn, now=today - timedelta(days=40))
    conn.execute(
        "INSERT INTO pgherald.events_v1 (channel, payload, created_at) VALUES ('o', '1', %s)",
        (today - timedelta(days=40),),
    )
    with pgherald.Consumer(dsn, group="late", channels=["o"]):
        pass
    pinned = run(dsn, "maintain")
    assert pinned.returncode == 0, pinned.stderr
    assert "pgherald: warning: pinned pgherald.events_v1_p" in pinned.stderr
    assert "not consumed yet by late" in pinned.stderr
    assert run(dsn, "groups", "delete", "late", "--yes").returncode == 0
    dropped = run(dsn, "maintain", "--json")
    assert dropped.returncode == 0, dropped.stderr
    actions = [json.loads(line) for line in dropped.stdout.splitlines()]
    assert {"dropped"} <= {a["action"] for a in actions}
    assert conn.execute("SELECT count(*) FROM pgherald.events_v1").fetchone() == (0,)


def test_retention_set_and_off(dsn: str, conn: psycopg.Connection) -> None:
    pgherald.install(conn)
    out = run(dsn, "retention", "set", "7d", "--abandon-after", "3d")
    assert out.returncode == 0, out.stderr
    assert pgherald.retention(conn) == pgherald.Retention(timedelta(days=7), timedelta(days=3))
    bad = run(dsn, "retention", "set", "soon")
    assert bad.returncode == 2
    assert "30s, 15m, 12h, 7d, 2w" in bad.stderr
    assert run(dsn, "retention", "off").returncode == 0
    assert pgherald.retention(conn).keep is None


def test_partitions_needs_consent_and_refuses_while_consumers_run(
    dsn: str, conn: psycopg.Connection
) -> None:
    pgherald.install(conn)
    assert run(dsn, "partitions").stdout.strip() == "partitions: 16"
    refused = run(dsn, "partitions", "64")  # no terminal, no --yes
    assert refused.returncode == 2
    assert "--yes" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert pgherald.partition_count(conn) == 16
    with pgherald.Consumer(dsn, group="g", channels=["x"]):
        busy = run(dsn, "partitions", "64", "--yes")
    assert busy.returncode == 1
    assert "stop every consumer first" in busy.stderr
    done = run(dsn, "partitions", "64", "--yes")
    assert done.returncode == 0, done.stderr
    assert "partitions: 64 (was 16)" in done.stdout
    assert pgherald.partition_count(conn) == 64
    again = run(dsn, "install", "--partitions", "16")
    assert again.returncode == 1
    assert "pgherald partitions 16" in again.stderr
