"""Who keeps the embedded PostgreSQL running: killed processes do not, ``pgherald dev start`` does.

Each test starts its own server in a temporary data directory and stops it in cleanup.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pgherald.embedded import EmbeddedPostgres, running_dsn
from tests.fix_cli import cli_env, pgherald_cmd

pytest.importorskip("pgserver", reason="needs the 'embedded' extra")

HOLDER = """
import sys
from pgherald.embedded import EmbeddedPostgres

with EmbeddedPostgres(sys.argv[1]) as pg:  # as `pgherald demo` does
    print("ready", pg.dsn, flush=True)
    sys.stdin.read()  # until the test closes stdin (or kills this process)
"""


def _env(datadir: Path) -> dict[str, str]:
    return cli_env(None) | {"PGHERALD_EMBEDDED_DIR": str(datadir)}


def _holder(datadir: Path) -> subprocess.Popen[str]:
    """A process that uses the server in *datadir* until its stdin closes; started and ready."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(datadir)],
        env=_env(datadir),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until the server is up (or the process died)
    if not line.startswith("ready"):
        proc.kill()
        _, err = proc.communicate(timeout=30)
        pytest.fail(f"the holder did not start the server: {line!r} {err}")
    return proc


def _dev(datadir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        pgherald_cmd("dev", *args),
        env=_env(datadir),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_user_does_not_keep_the_server_running(datadir: Path, sig: signal.Signals) -> None:
    holder = _holder(datadir)
    try:
        holder.send_signal(sig)
        holder.wait(timeout=30)
    finally:
        holder.kill()
        holder.communicate(timeout=30)
    assert running_dsn(datadir) is not None  # the killed process did not stop it...
    assert holder.pid in json.loads((datadir / ".handle_pids.json").read_text())  # nor let go
    with EmbeddedPostgres(datadir) as pg:
        assert pg.dsn
    assert running_dsn(datadir) is None  # the last living user stopped it
    assert json.loads((datadir / ".handle_pids.json").read_text()) == []


def test_a_malformed_list_of_users_is_no_obstacle(datadir: Path) -> None:
    with EmbeddedPostgres(datadir):  # initdb: it refuses a directory with files in it
        pass
    (datadir / ".handle_pids.json").write_text("not json")
    with EmbeddedPostgres(datadir) as pg:
        assert running_dsn(datadir) == pg.dsn
    assert running_dsn(datadir) is None


def test_dev_start_keeps_the_server_another_process_started(datadir: Path) -> None:
    demo = _holder(datadir)
    try:
        started = _dev(datadir, "start")
        assert started.returncode == 0, started.stderr
        assert "already running" in started.stderr
        assert started.stdout.startswith("export PGHERALD_DSN=")
    finally:
        demo.communicate(input="", timeout=60)  # the demo ends: leaves its block, exits
    assert demo.returncode == 0
    assert running_dsn(datadir) is not None  # `dev start` still holds it
    with EmbeddedPostgres(datadir):  # as does any later user that ends
        pass
    assert running_dsn(datadir) is not None
    stopped = _dev(datadir, "stop")
    assert stopped.stdout.startswith("stopped"), stopped.stderr
    assert running_dsn(datadir) is None
    # The hold ended with `dev stop`: the next user that starts it stops it again.
    with EmbeddedPostgres(datadir):
        pass
    assert running_dsn(datadir) is None


def test_a_hold_on_a_server_that_is_gone_is_ignored(datadir: Path) -> None:
    with EmbeddedPostgres(datadir, keep_running=True) as pg:
        assert pg.dsn
    assert (datadir / ".pgherald-keep-running").exists()
    assert running_dsn(datadir) is not None
    # Stopped behind pgherald's back (pg_ctl, a reboot): the file names the old server.
    pg_ctl = Path(__import__("pgserver").__file__).parent / "pginstall" / "bin" / "pg_ctl"
    subprocess.run(
        [str(pg_ctl), "-D", str(datadir), "-w", "stop"],
        user="pgserver" if os.geteuid() == 0 else None,
        check=True,
        capture_output=True,
    )
    assert running_dsn(datadir) is None
    with EmbeddedPostgres(datadir):
        pass
    assert running_dsn(datadir) is None


@pytest.mark.parametrize("kind", ["under /proc", "a regular file"])
def test_dev_start_in_a_directory_that_cannot_be_made_says_so(tmp_path: Path, kind: str) -> None:
    if kind == "a regular file":
        datadir = tmp_path / "pgdata"
        datadir.write_text("")
    else:
        datadir = Path("/proc/pgherald-cannot-be-made")
    out = _dev(datadir, "start")
    assert out.returncode == 1, out
    assert "Traceback" not in out.stderr
    *progress, error = out.stderr.strip().splitlines()  # "starting ... in DIR...", the error
    assert [line.startswith("starting") for line in progress] == [True], out.stderr
    assert error.startswith(
        f"pgherald: error: cannot create the embedded PostgreSQL's data directory {datadir} ("
    )
    assert error.endswith("): set PGHERALD_EMBEDDED_DIR to a writable directory")
