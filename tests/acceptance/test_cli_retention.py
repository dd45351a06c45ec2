"""`pgherald install --retention/--partitions`, `maintain`, `retention`, `partitions`."""

from __future__ import annotations

import json
import subprocess
from datetime import timedelta

import psycopg
import pytest

import pgherald
from pgherald._schema import is_installed
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


def one_usage_line(out: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert lines[0].startswith("pgherald: error: Invalid value for "), out.stderr
    return lines[0]


TOO_LONG = [
    # (arguments, the option named): past 100 years, or past what a timedelta holds at all
    (("install", "--retention", "99999999w"), "'--retention'"),
    (("install", "--retention", "99999999999w"), "'--retention'"),
    (
        ("install", "--retention", "7d", "--partitions", "64", "--retention", "36526d"),
        "'--retention'",
    ),
    (("retention", "set", "9999999w"), "'KEEP'"),
    (("retention", "set", "99999999999w"), "'KEEP'"),
    (("retention", "set", "7d", "--abandon-after", "9999999w"), "'--abandon-after'"),
    (("retention", "set", "7d", "--abandon-after", "99999999999w"), "'--abandon-after'"),
    (("prune", "--older-than", "9999999w"), "'--older-than'"),
    (("prune", "--older-than", "99999999999w"), "'--older-than'"),
    (("prune", "--abandoned-after", "99999999999w"), "'--abandoned-after'"),
]


def test_ages_past_100_years_are_refused_where_given(dsn: str, conn: psycopg.Connection) -> None:
    """Once stored, such an age made every `maintain` fail ("timestamp out of range"); a
    larger one was a traceback (OverflowError)."""
    for args, option in TOO_LONG:
        line = one_usage_line(run(dsn, *args))
        assert option in line, line
        assert "at most 100 years" in line, line
        assert "30d" in line, line
    assert not is_installed(conn)  # install refused before doing anything
    pgherald.install(conn)
    for args, option in TOO_LONG[3:7]:
        line = one_usage_line(run(dsn, *args))
        assert option in line, line
    assert pgherald.retention(conn) == pgherald.Retention(None, timedelta(days=7))
    ok = run(dsn, "retention", "set", "36525d", "--abandon-after", "5217w")
    assert ok.returncode == 0, ok.stderr
    done = run(dsn, "maintain")
    assert done.returncode == 0, done.stderr
    assert run(dsn, "prune", "--older-than", "36525d").returncode == 0


def test_zero_ages_are_refused_before_connecting(dsn: str, conn: psycopg.Connection) -> None:
    line = one_usage_line(run(dsn, "install", "--retention", "0s", "--partitions", "64"))
    assert "'--retention'" in line
    assert "30s or 7d" in line
    assert not is_installed(conn)  # refused before installing anything
    pgherald.install(conn)
    for args, option in [
        (("retention", "set", "0s"), "'KEEP'"),
        (("retention", "set", "0.0000001s"), "'KEEP'"),  # rounds to 0 microseconds
        (("retention", "set", "7d", "--abandon-after", "0s"), "'--abandon-after'"),
    ]:
        line = one_usage_line(run(dsn, *args))
        assert option in line, line
        assert "not above 0" in line, line
    assert pgherald.retention(conn).keep is None
    # prune's ages may be 0: every consumed event, every group without a live member.
    assert run(dsn, "prune", "--older-than", "0s", "--abandoned-after", "0s").returncode == 0


def test_maintain_names_the_fix_for_a_retention_stored_too_long(
    dsn: str, conn: psycopg.Connection
) -> None:
    """A database where such a value was set before it was refused."""
    pgherald.install(conn)
    conn.execute(
        "INSERT INTO pgherald.settings_v1 (name, value) VALUES ('retention', '9999999 weeks')"
    )
    out = run(dsn, "maintain")
    assert out.returncode == 1, out.stderr
    assert "timestamp out of range" not in out.stderr
    assert "retention (69,999,993 days)" in out.stderr
    assert "`pgherald retention set`" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    with pytest.raises(pgherald.UsageError, match="pgherald retention set"):
        pgherald.maintain(conn)
    assert run(dsn, "retention", "set", "30d").returncode == 0
    fixed = run(dsn, "maintain")
    assert fixed.returncode == 0, fixed.stderr
