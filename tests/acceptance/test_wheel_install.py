"""A new user's first steps: the wheel, in a fresh venv, with only ``[binary,cli]``.

The README's Quickstart installs exactly that; every documented command must then work or
fail in one line (no traceback from a missing extra or an undeclared dependency), and no
schema is dropped without ``--yes``. Builds the wheel from this checkout (pip may use its cache
and the index for the build backend and the dependencies).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psycopg
import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def installed_venv(tmp: Path) -> Path:
    """A fresh venv with the checkout's wheel and its [binary,cli] extras; its bin directory."""
    pip = ("-m", "pip", "--disable-pip-version-check", "-q")
    subprocess.run(
        [sys.executable, *pip, "wheel", "--no-deps", "-w", str(tmp / "dist"), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = (tmp / "dist").glob("pgherald-*.whl")
    subprocess.run(
        [sys.executable, "-m", "venv", str(tmp / "venv")], check=True, capture_output=True
    )
    bin_dir = tmp / "venv" / "bin"
    subprocess.run(
        [str(bin_dir / "python"), *pip, "install", f"{wheel}[binary,cli]"],
        check=True,
        capture_output=True,
        timeout=180,
    )
    return bin_dir


def env(tmp: Path, dsn: str | None) -> dict[str, str]:
    """No libpq or pgherald settings from the caller, no `pgherald dev` server to find."""
    drop = ("PG", "PYTHON", "VIRTUAL_ENV")
    e = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    e.update(NO_COLOR="1", PGHERALD_EMBEDDED_DIR=str(tmp / "no-dev-server"))
    if dsn is not None:
        e["PGHERALD_DSN"] = dsn
    return e


def one_line_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("pgherald: error: "), lines[0]
    return lines[0]


def schema_exists(conn: psycopg.Connection) -> bool:
    row = conn.execute("SELECT to_regnamespace('pgherald') IS NOT NULL").fetchone()
    return bool(row and row[0])


def test_a_fresh_venv_with_binary_cli_runs_every_documented_command(
    tmp_path: Path, dsn: str, conn: psycopg.Connection
) -> None:
    bin_dir = installed_venv(tmp_path)

    def run(
        *args: str, dsn: str | None = dsn, exe: str = "pgherald"
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(bin_dir / exe), *args],
            env=env(tmp_path, dsn),
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,  # never a terminal: nothing may be asked
            capture_output=True,
            text=True,
            timeout=30,
        )

    where = run("-c", "import pgherald; print(pgherald.__file__)", exe="python")
    assert where.stdout.startswith(str(tmp_path / "venv")), where  # the wheel, not the checkout
    for help_ in (run("--help"), run("-m", "pgherald", "--help", exe="python")):
        assert (help_.returncode, help_.stderr) == (0, ""), help_
        assert help_.stdout.startswith("Usage: "), help_.stdout

    installed = run("install")
    assert installed.returncode == 0, installed.stderr
    assert installed.stdout.startswith("installed: "), installed.stdout
    published = run("publish", "orders", '{"n": 1}')
    assert published.returncode == 0, published.stderr
    first_id = int(published.stdout.strip())

    consumer = subprocess.Popen(
        [str(bin_dir / "pgherald"), "consume", "--json", "--group", "g", "orders"],
        env=env(tmp_path, dsn),
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:  # in a thread, so that waiting for a line is bounded
        assert consumer.stdout is not None
        for line in consumer.stdout:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    try:
        event = json.loads(lines.get(timeout=20))  # the event published before it started
        assert (event["id"], event["payload"]) == (first_id, {"n": 1})
        assert run("publish", "orders", '{"n": 2}').returncode == 0
        assert json.loads(lines.get(timeout=20))["payload"] == {"n": 2}  # and a live one
        consumer.send_signal(signal.SIGTERM)
        _, stderr = consumer.communicate(timeout=15)
    finally:
        if consumer.poll() is None:
            consumer.kill()
            consumer.communicate()
    assert consumer.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr

    status = run("status")
    assert status.returncode == 0, status.stderr
    assert "group 'g': 0 events behind" in status.stdout, status.stdout

    ddl = run("sql", "install", dsn=None)
    assert (ddl.returncode, "CREATE SCHEMA" in ddl.stdout) == (0, True), ddl.stderr
    assert run("notify", "news", "hello").returncode == 0
    conn.execute("CREATE TABLE items (id int PRIMARY KEY)")
    assert run("trigger", "add", "items").returncode == 0
    listed = run("trigger", "list")
    assert (listed.returncode, "public.items" in listed.stdout) == (0, True), listed

    # No terminal, no --yes: refused in one line, and nothing is dropped.
    refused = one_line_error(run("uninstall"), 2)
    assert "--yes" in refused, refused
    assert schema_exists(conn)
    gone = run("uninstall", "--yes")
    assert gone.returncode == 0, gone.stderr
    assert not schema_exists(conn)

    # Extras the Quickstart did not install: one line naming the extra to add.
    assert "pgherald[gateway]" in one_line_error(run("serve"), 2)
    assert "pgherald[embedded]" in one_line_error(run("demo", dsn=None), 1)
