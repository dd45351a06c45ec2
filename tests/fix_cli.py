"""Running the ``pgherald`` command in a subprocess, as a user runs it."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from typing import Any


def pgherald_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pgherald.cli", *args]


def cli_env(dsn: str | None) -> dict[str, str]:
    """
    The caller's environment without libpq's ``PG*`` variables, pointed at ``dsn``.

    With ``None``, no DSN at all (no ``PGHERALD_DSN`` either): what a command finds then is
    the ``pgherald dev`` server, or the embedded one.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if dsn is not None:
        env["PGHERALD_DSN"] = dsn
    env["PYTHONUNBUFFERED"] = "1"
    env["NO_COLOR"] = "1"
    return env


def run(
    dsn: str, *args: str, input: str | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """``pgherald ARGS`` to completion; stdin is ``input``, or empty (never the terminal)."""
    return subprocess.run(
        pgherald_cmd(*args),
        env=cli_env(dsn),
        input=input,
        stdin=subprocess.DEVNULL if input is None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line_error(proc: subprocess.CompletedProcess[str], status: int | None = None) -> str:
    """The single stderr line of a failed command (no traceback): its exit status is *status*
    (None: any but 0)."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    if status is None:
        assert proc.returncode != 0, proc.stdout
    else:
        assert lines[0].startswith("pgherald: error: "), proc.stderr
        assert proc.returncode == status, (proc.returncode, proc.stderr)
    return lines[0]


def on_a_terminal(dsn: str, answer: bytes, *args: str, timeout: float = 15) -> tuple[int, str]:
    """``pgherald ARGS`` with stdin and stdout on a pseudo-terminal, typing *answer*: its exit
    status and stderr. Still running *timeout* s after the answer (it took it for a yes, or
    hung): killed, and the test fails."""
    import pytest

    main, child = pty.openpty()
    try:
        with subprocess.Popen(
            pgherald_cmd(*args),
            env=cli_env(dsn),
            stdin=child,
            stdout=child,
            stderr=subprocess.PIPE,
            text=True,
        ) as proc:
            os.write(main, answer)
            try:
                _, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()  # only the process this helper started
                _, err = proc.communicate()
                pytest.fail(
                    f"pgherald {' '.join(args)} still ran {timeout:g} s after the answer: {err}"
                )
    finally:
        os.close(child)
        os.close(main)
    return proc.returncode, err


def schema_exists(conn: Any) -> bool:
    """Whether pgherald's schema is in *conn*'s database."""
    row = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'pgherald'").fetchone()
    return bool(row == (1,))
