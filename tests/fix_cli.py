"""Running the ``pgherald`` command in a subprocess, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys


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
