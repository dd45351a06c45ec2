"""
Where every CLI command connects (``connection()`` in cli/_commands.py): a server that accepts
TCP and never answers (hung at start-up, a black-holed proxy) costs at most the connect timeout,
and Ctrl-C or SIGTERM during the attempt ends the command at once, in one line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from pgherald._conninfo import CONNECT_TIMEOUT, with_connect_timeout
from tests.fix_cli import cli_env, pgherald_cmd, run
from tests.fix_faults import SilentServer, wait_until

# One command per kind: a one-shot query, a notify, and a command that runs until stopped
# (its check before it starts). relay's target is never reached: the database check fails first.
COMMANDS = [
    pytest.param(["status"], id="status"),
    pytest.param(["notify", "orders", "x"], id="notify"),
    pytest.param(["relay", "--to", "nats://127.0.0.1:4222", "orders"], id="relay"),
]


def _silent_dsn(server: SilentServer, query: str = "") -> str:
    return f"postgresql://postgres@127.0.0.1:{server.port}/x{query}"


def _where(server: SilentServer) -> str:
    return f"cannot connect to PostgreSQL at postgres@127.0.0.1:{server.port}/x"


@pytest.mark.parametrize("args", COMMANDS)
def test_a_server_that_never_answers_is_one_line_within_the_dsns_connect_timeout(
    silent_server: SilentServer, args: list[str]
) -> None:
    started = time.monotonic()
    result = run(_silent_dsn(silent_server, "?connect_timeout=2"), *args, timeout=30)
    took = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    assert result.stderr == (
        f"pgherald: error: {_where(silent_server)}: no answer within 2 s (set connect_timeout "
        "in the DSN to wait longer). Check the DSN (--dsn or $PGHERALD_DSN) and that the "
        "server is running and reachable\n"
    )
    assert silent_server.accepted, "the command never reached the server"
    assert took < 2 + 8, f"took {took:.1f}s with connect_timeout=2"


def test_pgconnect_timeout_is_honoured(silent_server: SilentServer) -> None:
    env = cli_env(_silent_dsn(silent_server)) | {"PGCONNECT_TIMEOUT": "2"}
    result = subprocess.run(
        pgherald_cmd("status"),
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1, result.stderr
    assert "no answer within 2 s" in result.stderr, result.stderr


def test_a_dsn_without_connect_timeout_gets_the_default() -> None:
    """libpq alone waits forever; what `connection()` adds, and what it leaves as given."""
    assert CONNECT_TIMEOUT == 10
    assert "connect_timeout=10" in with_connect_timeout("host=db dbname=shop")
    assert "connect_timeout=3" in with_connect_timeout("postgresql://db/shop?connect_timeout=3")
    assert "connect_timeout=10" not in with_connect_timeout("host=db connect_timeout=3")


@pytest.mark.slow
def test_the_default_connect_timeout_ends_the_wait(silent_server: SilentServer) -> None:
    """The probe's case: no connect_timeout anywhere; it hung for good (130 s at best)."""
    started = time.monotonic()
    result = run(_silent_dsn(silent_server), "status", timeout=60)
    took = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    assert f"{_where(silent_server)}: no answer within {CONNECT_TIMEOUT} s" in result.stderr
    assert took < CONNECT_TIMEOUT + 10, f"took {took:.1f}s"


@pytest.mark.parametrize(
    ("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
@pytest.mark.parametrize("args", COMMANDS)
def test_a_signal_while_connecting_ends_the_command_at_once(
    silent_server: SilentServer, args: list[str], sig: signal.Signals, status: int
) -> None:
    # No connect_timeout: only the signal can end it before 10 s. SIGINT as Ctrl-C sends it, and
    # as a background job gets it (started with SIGINT ignored: a shell's `cmd &`).
    with subprocess.Popen(
        pgherald_cmd(*args),
        env=cli_env(_silent_dsn(silent_server)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    ) as proc:
        try:
            # Accepted: the command is inside its connection attempt (handlers set before it).
            wait_until(lambda: silent_server.accepted, 20, "the command to connect")
            signalled = time.monotonic()
            os.kill(proc.pid, sig)
            _, err = proc.communicate(timeout=5)
        finally:
            if proc.poll() is None:
                proc.kill()
    took = time.monotonic() - signalled
    assert proc.returncode == status, err
    assert err == (
        f"pgherald: error: interrupted ({sig.name}) while connecting to PostgreSQL at "
        f"postgres@127.0.0.1:{silent_server.port}/x\n"
    )
    assert took < 2, f"took {took:.1f}s to end after {sig.name}"
