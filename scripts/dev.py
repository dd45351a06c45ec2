#!/usr/bin/env python3
"""
One entry point for developers and CI; needs only Python 3.10+.

    python3 scripts/dev.py demo [ARGS]   # pgherald demo (embedded PostgreSQL when no DSN)
    python3 scripts/dev.py test [ARGS]   # lint, types, the whole test suite
    python3 scripts/dev.py bench [--quick]  # all benchmarks, results in docs/benchmarks.md
    python3 scripts/dev.py shell         # print how to activate the virtualenv

It creates ``.venv`` beside it on first use and reinstalls the project there whenever
pyproject.toml changes. Tests find PostgreSQL as DEVELOPERS.md says: $PGHERALD_TEST_DSN, else
the server on 127.0.0.1:5432, else an embedded one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
STAMP = VENV / ".pgherald-installed"
EXTRAS = "all,test,lint,bench"  # everything: tests, linters, benchmarks
DEMO_EXTRAS = "binary,cli,embedded"  # what the demo needs, and nothing more (a fast first run)


def run(*cmd: str | Path) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        # Ctrl-C reached the command too (one process group): let it finish its clean-up
        # (the demo drops what it made, stops its server), then leave quietly.
        try:
            proc.wait(60)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        sys.exit(130)
    if code:
        sys.exit(code)


def ensure_venv(extras: str = EXTRAS) -> None:
    """
    ``.venv`` with pgherald installed (editable) with *extras*; again whenever pyproject.toml
    changes. The stamp records what was installed: the full set serves the demo too.
    """
    if sys.version_info < (3, 10):
        sys.exit(f"pgherald needs Python 3.10 or newer; this is {sys.version.split()[0]}")
    if not PY.exists():
        print(f"creating {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    done = STAMP.read_text().split() if STAMP.exists() else []
    if done[:1] == [digest] and (extras in done[1:] or EXTRAS in done[1:]):
        return
    what = "everything the tests, linters and benchmarks use" if extras == EXTRAS else "the demo"
    print(f"installing pgherald[{extras}] into {VENV} ({what})", flush=True)
    run(PY, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e", f".[{extras}]")
    STAMP.write_text(f"{digest} {extras}")


def ensure_debian(binaries: list[str], packages: list[str], why: str) -> None:
    """Debian *packages* for the tests that run *binaries*: installed when missing and we can
    (as root, with apt-get); else the tests that need them fail and say how to install them."""
    if all(shutil.which(b) or os.path.exists(f"/usr/sbin/{b}") for b in binaries):
        return
    if os.name != "posix" or os.geteuid() != 0 or not shutil.which("apt-get"):
        print(f"note: {'/'.join(binaries)} not found; {why} will say so", flush=True)
        return
    print(f"installing Debian's {' and '.join(packages)}: for {why}", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", *packages]
    if subprocess.run(cmd, env=env).returncode:
        subprocess.run(["apt-get", "update", "-q"], env=env)
        run(*cmd)


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in {"demo", "test", "bench", "shell"}:
        sys.exit(__doc__)
    command, args = argv[0], argv[1:]
    ensure_venv(DEMO_EXTRAS if command == "demo" else EXTRAS)
    if command == "demo":
        run(BIN / "pgherald", "demo", *args)
    elif command == "test":
        ensure_debian(
            ["chromium", "chromedriver"], ["chromium", "chromium-driver"], "the browser test"
        )
        ensure_debian(["pgbouncer"], ["pgbouncer"], "the pooler tests")
        ensure_debian(["nft"], ["nftables"], "the dead-path tests (they drop packets)")
        run(BIN / "ruff", "check", "src", "tests", "examples", "bench", "scripts")
        run(BIN / "mypy")
        # The public API as users type it: documented calls pass, misspelled options fail.
        run(PY, "tests/typing/check.py")
        run(BIN / "lint-imports")
        # Three workers on two cores: most tests wait (for servers, timeouts, other processes),
        # so the suite takes about half the time of one worker. `-n 0` runs it in one process.
        # A file's tests stay on one worker (its module fixtures, its own servers).
        run(PY, "-m", "pytest", "-n", "3", "--dist", "loadfile", *args)
    elif command == "bench":
        # One at a time: each measures a machine that nothing else is loading.
        for name in (
            "listen", "durable", "log", "trigger", "gateway", "gateway_tail", "publish_many",
            "scheduled", "relay", "cdc",
        ):  # fmt: skip
            run(PY, f"bench/{name}_bench.py", "--output", "docs/benchmarks.md", *args)
    else:
        print(f"source {BIN / 'activate'}")


if __name__ == "__main__":
    main(sys.argv[1:])
