"""The ``pgherald`` command in a subprocess, as a user runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

import pgherald
from tests.fix_cli import cli_env, pgherald_cmd
from tests.fix_faults import wait_until


@pytest.fixture
def listening(dsn: str, conn: psycopg.Connection) -> Iterator[subprocess.Popen[str]]:
    """`pgherald listen --json` on two channels, started and LISTENing."""
    with subprocess.Popen(
        pgherald_cmd("listen", "--json", "orders", "Mixed Case"),
        env=cli_env(dsn),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        yield from _until_listening(proc, conn)


def _until_listening(
    proc: subprocess.Popen[str], conn: psycopg.Connection
) -> Iterator[subprocess.Popen[str]]:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # until its backend has LISTENed on both channels
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity a "
            "WHERE a.datname = current_database() AND a.application_name LIKE 'pgherald%%' AND a.state = 'idle'"
            " AND a.query LIKE 'LISTEN%%'"
        ).fetchone()
        if row and row[0]:
            break
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)  # polling a condition, bounded by the deadline
    else:
        proc.kill()
        pytest.fail("pgherald listen did not start listening")
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_listen_json_lines_and_sigterm_exit_0(
    listening: subprocess.Popen[str], dsn: str, conn: psycopg.Connection
) -> None:
    pgherald.notify(conn, "orders", {"id": 1})
    pgherald.notify(conn, "Mixed Case", "plain text")
    pgherald.notify(conn, "mixed case", "not ours")  # folded name: a different channel
    assert listening.stdout is not None
    first = json.loads(listening.stdout.readline())
    second = json.loads(listening.stdout.readline())
    assert first == {"channel": "orders", "payload": '{"id":1}', "pid": conn.info.backend_pid}
    assert second == {
        "channel": "Mixed Case",
        "payload": "plain text",
        "pid": conn.info.backend_pid,
    }
    listening.send_signal(signal.SIGTERM)
    assert listening.wait(10) == 0
    assert listening.stdout.read() == ""


def test_listen_says_on_stderr_when_it_listens_again_and_goes_on(
    listening: subprocess.Popen[str], conn: psycopg.Connection
) -> None:
    # cli.md: a lost connection is a notice on stderr (what may have been missed), stdout keeps
    # the notifications alone, and the command goes on with them.
    assert listening.stdout is not None
    stderr = listening.stderr
    assert stderr is not None
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(stderr), daemon=True)
    reader.start()
    (pid,) = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name LIKE 'pgherald%%' AND query LIKE 'LISTEN%%'"
    ).fetchone() or (None,)
    assert conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
    wait_until(lambda: any("listening again" in line for line in err), 15, "the stderr notice")
    (notice,) = [line for line in err if line.startswith("-- listening again after")]
    assert "notifications sent meanwhile were missed" in notice
    pgherald.notify(conn, "orders", "after")
    assert json.loads(listening.stdout.readline())["payload"] == "after"
    listening.send_signal(signal.SIGTERM)
    assert listening.wait(10) == 0
    reader.join(5)
    assert not any("Traceback" in line for line in err), err


def test_listen_sigint_exits_0(listening: subprocess.Popen[str]) -> None:
    listening.send_signal(signal.SIGINT)
    assert listening.wait(10) == 0
    assert listening.stderr is not None
    assert "Traceback" not in listening.stderr.read()


def test_notify_from_argument_and_stdin(dsn: str) -> None:
    with pgherald.Listener(dsn, channels=["cli"]) as listener:
        subprocess.run(pgherald_cmd("notify", "cli", "from argv"), env=cli_env(dsn), check=True)
        subprocess.run(
            pgherald_cmd("notify", "--dsn", dsn, "cli", "-"),
            env=cli_env("host=invalid.invalid"),  # --dsn wins over $PGHERALD_DSN
            input='{"from": "stdin"}',
            text=True,
            check=True,
        )
        got = [n.payload for n in listener.notifications(timeout=1.0)]
    assert got == ["from argv", '{"from": "stdin"}']


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["notify", "--dsn", "host=127.0.0.1 port=1 connect_timeout=2", "c", "x"],
            "cannot connect",
        ),
        (["listen", "--dsn", "host=127.0.0.1 port=1 connect_timeout=2", "c"], "cannot connect"),
        (["notify", "--dsn", "nonsense", "c", "x"], "invalid DSN"),
        (["notify", "c" * 64, "x"], "at most 63 bytes"),
        (["notify", "c", "x" * 8000], "under 8000 bytes"),
    ],
)
def test_errors_are_one_line_without_traceback(dsn: str, args: list[str], message: str) -> None:
    result = subprocess.run(
        pgherald_cmd(*args), env=cli_env(dsn), capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr


def _signals_as_a_terminal_gives_them() -> None:
    """In the child before it runs: SIGINT and SIGTERM at their defaults and not blocked, as
    a shell starts a foreground command (a test runner's process may have either ignored or
    blocked, and both pass to its children; then Ctrl-C never reaches the command)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def _signal_the_demo_midway(cmd: list[str], dsn: str, signal_it: Callable[[int], None]) -> str:
    """Run the demo *cmd* (its own process group), signal it (``signal_it(pid)``) once its
    durable part has begun (schema installed, events consumed); its stderr once it ended."""
    proc = subprocess.Popen(
        cmd,
        env=cli_env(dsn),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal gives it
        preexec_fn=_signals_as_a_terminal_gives_them,
    )
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if "<- consumed" in line:
                break
        else:
            pytest.fail(f"the demo ended before its durable part: {proc.wait(10)}")
        signal_it(proc.pid)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert "Traceback" not in err, err
    assert "KeyboardInterrupt" not in err, err
    return f"{proc.returncode}: {err}"


def _left_by_the_demo(dsn: str) -> list[tuple[str]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname = 'pgherald' UNION ALL "
            "SELECT relname FROM pg_class WHERE relname LIKE 'Demo Orders%%'"
        ).fetchall()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_demo_stopped_midway_leaves_the_database_as_it_found_it(
    dsn: str, sig: signal.Signals
) -> None:
    # Stopped during the durable part, by a service manager's SIGTERM as by Ctrl-C: its
    # clean-up runs.
    ended = _signal_the_demo_midway(
        pgherald_cmd("demo", "--pause", "0.3"), dsn, lambda pid: os.kill(pid, sig)
    )
    assert ended.startswith("0: "), ended
    assert _left_by_the_demo(dsn) == []


def test_ctrl_c_on_the_readmes_demo_command_is_quiet(dsn: str) -> None:
    # `python3 scripts/dev.py demo`, Ctrl-C in its terminal: the signal reaches the whole
    # process group; the script lets the demo clean up, then leaves without a traceback.
    script = Path(__file__).resolve().parents[2] / "scripts" / "dev.py"
    ended = _signal_the_demo_midway(
        [sys.executable, str(script), "demo", "--pause", "0.3"],
        dsn,
        lambda pid: os.killpg(pid, signal.SIGINT),
    )
    assert ended.startswith("130: "), ended
    assert _left_by_the_demo(dsn) == []


def test_demo_runs_end_to_end(dsn: str) -> None:
    result = subprocess.run(
        pgherald_cmd("demo", "--pause", "0"),
        env=cli_env(dsn),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "heard orders" in out
    assert "heard Chat Room" in out
    assert "this is rolled back" not in out.split("ROLLBACK", 1)[1]
    assert "PayloadTooLarge" in out
    assert "InvalidChannel" in out
    assert "after the reconnect" in out
    assert "received 5 notifications, 1 reconnect" in out
    # The durable part: two consumed, then three caught up after a restart, none twice.
    consumed = [line for line in out.splitlines() if "<- consumed" in line]
    assert len(consumed) == 5
    assert len(set(consumed)) == 5
    assert 'invoice": 2' not in out  # rolled back
    # Table changes: the no-op UPDATE sends nothing, the too-wide row is reduced to its key.
    changes = [line for line in out.splitlines() if "<- change" in line]
    assert len(changes) == 5
    assert "qty: 2 -> 3" in out
    assert "row too wide for NOTIFY" in out
