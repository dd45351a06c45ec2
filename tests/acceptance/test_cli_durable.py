"""The durable-log commands of ``pgherald`` in a subprocess, as a user runs them."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import pgherald
from tests.fix_cli import cli_env, pgherald_cmd, run
from tests.fix_durable import acknowledged, uncovered


class Lines:
    """A subprocess's stdout lines, read in a thread so that waiting on them is bounded."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.q: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.q.put(line)

    def get(self, timeout: float = 10.0) -> dict[str, Any]:
        try:
            line: dict[str, Any] = json.loads(self.q.get(timeout=timeout))
        except queue.Empty:
            stderr = self.proc.stderr.read() if self.proc.poll() is not None else ""  # type: ignore[union-attr]
            pytest.fail(f"no line from pgherald consume within {timeout}s {stderr}")
        return line


def consume(dsn: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        pgherald_cmd("consume", "--json", "--group", "g", *args),
        env=cli_env(dsn),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait()
        for f in (p.stdout, p.stderr):
            if f is not None:
                f.close()


def test_install_twice_and_uninstall(dsn: str, conn: psycopg.Connection) -> None:
    first = run(dsn, "install")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("installed: ")
    second = run(dsn, "install")
    assert (second.returncode, second.stdout.strip()) == (0, "already up to date")
    assert conn.execute("SELECT to_regclass('pgherald.events_v1') IS NOT NULL").fetchone() == (
        True,
    )
    gone = run(dsn, "uninstall", "--yes")
    assert gone.returncode == 0, gone.stderr
    assert conn.execute(
        "SELECT count(*) FROM pg_namespace WHERE nspname = 'pgherald'"
    ).fetchone() == (0,)


def test_sql_install_needs_no_database(dsn: str, conn: psycopg.Connection) -> None:
    out = run("host=127.0.0.1 port=1 connect_timeout=2", "sql", "install")
    assert out.returncode == 0, out.stderr
    assert "CREATE TABLE pgherald.events_v1" in out.stdout
    assert "CREATE FUNCTION pgherald.publish_v1" in out.stdout
    # and the printed DDL is a working install
    conn.execute(out.stdout)
    assert pgherald.install(conn) == []


def test_publish_prints_id_and_rejects_non_json(dsn: str, conn: psycopg.Connection) -> None:
    pgherald.install(conn)
    out = run(dsn, "publish", "--key", "k1", "orders", '{"n": 1}')
    assert out.returncode == 0, out.stderr
    event_id = int(out.stdout.strip())
    stdin = run(dsn, "publish", "orders", "-", input='[1, "two"]')
    assert stdin.returncode == 0, stdin.stderr
    rows = conn.execute(
        "SELECT id, channel, key, payload FROM pgherald.events_v1 ORDER BY id"
    ).fetchall()
    assert rows == [
        (event_id, "orders", "k1", {"n": 1}),
        (int(stdin.stdout), "orders", None, [1, "two"]),
    ]
    bad = run(dsn, "publish", "orders", "not json {")
    assert bad.returncode != 0
    assert bad.stdout == ""
    assert "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    assert "not JSON" in bad.stderr


def test_publish_before_install_says_how_to_fix(dsn: str) -> None:
    out = run(dsn, "publish", "orders", "1")
    assert out.returncode != 0
    assert "pgherald install" in out.stderr
    assert "Traceback" not in out.stderr


def test_consume_json_lines_and_sigterm_exit_0(
    dsn: str, conn: psycopg.Connection, procs: list[subprocess.Popen[str]]
) -> None:
    pgherald.install(conn)
    first = pgherald.publish(conn, "orders", {"n": 1}, key="k")
    pgherald.publish(conn, "other", "not ours")
    proc = consume(dsn, "orders")
    procs.append(proc)
    lines = Lines(proc)
    line = lines.get()
    assert set(line) == {"id", "channel", "payload", "key", "created_at"}
    assert (line["id"], line["channel"], line["payload"], line["key"]) == (
        first,
        "orders",
        {"n": 1},
        "k",
    )
    second = pgherald.publish(conn, "orders", "two")
    assert lines.get()["id"] == second
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert proc.stderr is not None
    assert "Traceback" not in proc.stderr.read()
    assert uncovered(conn, "g", "orders") == 0  # a clean stop acknowledged what it printed


def test_sigkill_then_restart_loses_nothing(
    dsn: str, conn: psycopg.Connection, procs: list[subprocess.Popen[str]]
) -> None:
    pgherald.install(conn)
    # Many events: the killed process blocks writing to its full pipe, mid-batch, unacked.
    conn.execute(
        "SELECT pgherald.publish_v1('ch', to_jsonb(g), NULL, NULL) FROM generate_series(1, 3000) g"
    )
    proc = consume(dsn, "ch")
    procs.append(proc)
    assert proc.stdout is not None
    seen1 = [json.loads(proc.stdout.readline())["id"] for _ in range(5)]
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    seen1 += [json.loads(line)["id"] for line in proc.stdout.read().splitlines() if line.strip()]
    acked = acknowledged(conn, "g")
    more = [pgherald.publish(conn, "ch", i) for i in range(20)]
    ids = [r[0] for r in conn.execute("SELECT id FROM pgherald.events_v1 ORDER BY id")]
    proc2 = consume(dsn, "ch")
    procs.append(proc2)
    lines2 = Lines(proc2)
    seen2: list[int] = []
    while not set(ids) <= set(seen1) | set(seen2):
        seen2.append(lines2.get()["id"])
    proc2.send_signal(signal.SIGTERM)
    assert proc2.wait(10) == 0
    assert len(seen1) < 3000, "the first run was killed before printing everything"
    assert set(more) <= set(seen2)
    again = set(seen1) & set(seen2)
    assert not again & acked, "an acknowledged event was delivered again"
    # At most the one read not yet acknowledged: reads grow while behind, 1000 then 2000
    # (batch_size, doubling up to max_batch_size), and the first was acknowledged.
    assert len(again) <= 2000
    assert len(seen2) == len(set(seen2)), "duplicates within one run"
    assert set(seen1) | set(seen2) == set(ids)
    assert uncovered(conn, "g") == 0


def test_status_shows_lag_and_queue_usage(dsn: str, conn: psycopg.Connection) -> None:
    pgherald.install(conn)
    with pgherald.Consumer(dsn, group="billing", start="now"):
        pass
    for i in range(3):
        pgherald.publish(conn, "ch", i)
    out = run(dsn, "status", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["events"] == 3
    assert isinstance(report["notify_queue_usage"], float)
    [group] = report["groups"]
    assert (group["group"], group["lag_events"]) == ("billing", 3)
    assert group["lag_seconds"] >= 0
    text = run(dsn, "status")
    assert text.returncode == 0, text.stderr
    assert "'billing': 3 events behind" in text.stdout
    assert "NOTIFY queue" in text.stdout


def test_prune_deletes_only_consumed_old_events(dsn: str, conn: psycopg.Connection) -> None:
    pgherald.install(conn)
    ids = [pgherald.publish(conn, "ch", i) for i in range(6)]
    with pgherald.Consumer(dsn, group="g", channels=["ch"], poll_interval=0.1) as c:
        for e in c:
            if e.id == ids[2]:
                c.stop()  # acks ids[0..2]... in their partitions
    consumed = acknowledged(conn, "g")
    assert set(ids[:3]) <= consumed
    kept = run(dsn, "prune", "--older-than", "1h")
    assert kept.returncode == 0, kept.stderr
    assert "deleted 0 events" in kept.stdout
    out = run(dsn, "prune", "--older-than", "0s")
    assert out.returncode == 0, out.stderr
    assert f"deleted {len(consumed)} events" in out.stdout
    left = {r[0] for r in conn.execute("SELECT id FROM pgherald.events_v1")}
    assert left == set(ids) - consumed
    forced = run(dsn, "prune", "--older-than", "0s", "--force", "--yes")
    assert forced.returncode == 0, forced.stderr
    assert conn.execute("SELECT count(*) FROM pgherald.events_v1").fetchone() == (0,)
