"""Time to first event: the README's first command (``python3 scripts/dev.py demo``) on a fresh clone.

Usage::

    python bench/first_run_bench.py [--dsn DSN] [--quick] [--output docs/benchmarks.md]

Method.  The repository's committed tree (``git archive HEAD``, what a fresh clone holds) is
unpacked into a scratch directory under the system temp dir; nothing of the working checkout,
its ``.venv`` or the user's caches is used or touched.  Each run starts
``python3 scripts/dev.py demo`` in that copy as a subprocess (stdout and stderr merged,
``PYTHONUNBUFFERED=1`` so that every line is written when printed, ``NO_COLOR=1``), reads its
output line by line and timestamps each line on arrival (``time.monotonic()`` since the
subprocess was started).  The first event is the demo's first ``<- heard`` line: a
notification the demo's listener received.  The run then goes on to the demo's end (its whole
wall time and exit status are reported too); a run that fails or takes longer than its timeout
stops the benchmark.

The phases come from the lines ``scripts/dev.py`` and the demo print on the way: ``creating
.venv`` (venv created next), ``installing pgherald[...]`` (pip next), ``+ .../pgherald demo``
(pip done, the demo starts), ``No DSN given: starting an embedded PostgreSQL`` (the demo's
imports done) and ``running in`` (the embedded server is up).

Cases, in this order:

* cold, embedded (2 runs, each in a copy of its own): no ``.venv``, an empty pip cache (a
  fresh ``PIP_CACHE_DIR``), an empty embedded data directory (a fresh
  ``PGHERALD_EMBEDDED_DIR``): venv, pip, ``initdb``, start;
* warm, embedded (3 runs): ``.venv`` and the data directory exist (the demo stopped the server
  at its end, so each run starts it again);
* cold, with a server (2 runs): a new scratch copy, no ``.venv``, an empty pip cache; the
  demo is given ``--dsn`` for a database of its own on the server of ``--dsn``
  (``pgherald_bench_first_run``, dropped and created again, dropped at the end);
* warm, with a server (3 runs).

pip's own configuration (index, find-links) is the machine's: where the packages come from is
printed with the results.  ``--quick``: one run per case.  About 2 minutes in all.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import _report  # bench/_report.py: shared by every benchmark
import psycopg
from psycopg.conninfo import make_conninfo

START, END = "<!-- first-run-bench:start -->", "<!-- first-run-bench:end -->"
ROOT = Path(__file__).resolve().parent.parent
DBNAME = "pgherald_bench_first_run"  # the 'with a server' runs' own database (created, dropped)
FIRST_EVENT = "<- heard"
BR = "  "  # a markdown line break
PHASES: dict[str, Callable[[str], bool]] = {  # phase mark -> whether a line starts it
    "venv": lambda line: line.startswith("creating "),
    "pip": lambda line: line.startswith("installing pgherald["),
    "demo": lambda line: line.startswith("+ ") and "pgherald demo" in line,
    "embedded": lambda line: line.startswith("No DSN given"),
    "server up": lambda line: line.startswith("  running in "),
}


@dataclass
class Run:
    case: str
    marks: dict[str, float] = field(default_factory=dict)
    first_event: float = 0.0
    total: float = 0.0
    output: list[tuple[float, str]] = field(default_factory=list)


def scratch_copy(parent: Path, name: str) -> Path:
    """The committed tree of the repository, unpacked into *parent*/*name*."""
    dest = parent / name
    dest.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "HEAD"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def run_demo(
    case: str, repo: Path, python: str, env: dict[str, str], args: list[str], timeout: float
) -> Run:
    """``python3 scripts/dev.py demo ARGS`` in *repo*; every output line timestamped."""
    result = Run(case)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [python, "scripts/dev.py", "demo", *args],
        cwd=repo,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = t0 + timeout
    assert proc.stdout is not None
    try:
        # Reading blocks until the next line; the demo prints a line every step, and the
        # timer below ends a run that hangs (it kills the process group, closing the pipe).
        killer = _Killer(proc, timeout)
        for line in proc.stdout:
            now = time.monotonic() - t0
            result.output.append((now, line.rstrip("\n")))
            for mark, starts in PHASES.items():
                if mark not in result.marks and starts(line):
                    result.marks[mark] = now
            if FIRST_EVENT in line and not result.first_event:
                result.first_event = now
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        killer.cancel()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(10)
    result.total = time.monotonic() - t0
    if rc != 0 or not result.first_event:
        tail = "\n".join(f"  {t:7.2f} {line}" for t, line in result.output[-25:])
        raise SystemExit(f"{case}: exit {rc}, first event {result.first_event or 'never'}:\n{tail}")
    return result


class _Killer:
    """Kills the process group of *proc* after *timeout* seconds, unless cancelled."""

    def __init__(self, proc: subprocess.Popen[str], timeout: float) -> None:
        self._timer = threading.Timer(timeout, self._kill, args=(proc,))
        self._timer.daemon = True
        self._timer.start()

    @staticmethod
    def _kill(proc: subprocess.Popen[str]) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)

    def cancel(self) -> None:
        self._timer.cancel()


def base_env(scratch: Path, *, pip_cache: Path, datadir: Path) -> dict[str, str]:
    """The caller's environment without any DSN, with its own pip cache and data directory."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PG") and k not in {"PGHERALD_DSN", "VIRTUAL_ENV"}
    }
    env.update(
        PIP_CACHE_DIR=str(pip_cache),
        PGHERALD_EMBEDDED_DIR=str(datadir),
        PYTHONUNBUFFERED="1",
        NO_COLOR="1",
        TMPDIR=str(scratch / "tmp"),
    )
    # The demo should not find .venv/bin of the caller's environment first.
    venv_bin = os.path.dirname(sys.executable)
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if p and p != venv_bin
    )
    return env


def pip_cache_size(pip_cache: Path) -> str:
    """What pip kept in its (empty before) cache during the cold install."""
    size = sum(f.stat().st_size for f in pip_cache.rglob("*") if f.is_file())
    return f"pip's cache (empty before) held {size / 1e6:.1f} MB after the cold install"


def installed(repo: Path) -> str:
    """The distributions pip put into the clone's ``.venv`` (besides pip, setuptools, pgherald)."""
    out = subprocess.run(
        [str(repo / ".venv" / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
    ).stdout
    names = [
        ln.split("==")[0]
        for ln in out.splitlines()
        if "==" in ln and ln.split("==")[0].lower() not in {"pip", "setuptools", "pgherald"}
    ]
    return f"installed {len(names)} distributions: {', '.join(sorted(names, key=str.lower))}"


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def phase_row(r: Run) -> list[str]:
    m = r.marks
    pip_start = m.get("pip")
    pip_end = m.get("demo")
    venv = (pip_start or pip_end or 0) - m["venv"] if "venv" in m else None
    pip = pip_end - pip_start if pip_start is not None and pip_end is not None else None
    imports = (m.get("embedded") or 0) - pip_end if "embedded" in m and pip_end else None
    server = m["server up"] - m["embedded"] if "server up" in m and "embedded" in m else None
    tour = r.first_event - m.get("server up", pip_end or 0)
    return [
        r.case,
        fmt(venv),
        fmt(pip),
        fmt(imports),
        fmt(server),
        fmt(tour),
        f"**{r.first_event:.1f}**",
        fmt(r.total),
    ]


def main() -> None:
    ap = _report.parser(
        __doc__,
        quick="one run per case",
        dsn_help="the server for the 'with a server' runs (default: the local one)",
    )
    ap.add_argument(
        "--python",
        default=shutil.which("python3") or sys.executable,
        help="the python3 a new user types (default: the first python3 on PATH)",
    )
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run at most")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    opts = ap.parse_args()
    warm_runs = 1 if opts.quick else 3
    cold_runs = 1 if opts.quick else 2

    info = _report.machine(
        opts.dsn,
        extra={
            "pip configuration": _pip_config(opts.python),
            "python3": f"{opts.python} ({_python_version(opts.python)})",
        },
    )
    scratch = Path(tempfile.mkdtemp(prefix="pgherald-firstrun-"))
    (scratch / "tmp").mkdir()
    runs: list[Run] = []
    notes: list[str] = []
    with psycopg.connect(opts.dsn, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {DBNAME} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {DBNAME}")
    server_dsn = make_conninfo(opts.dsn, dbname=DBNAME)
    try:
        for where, args in (("embedded", []), ("with a server", ["--dsn", server_dsn])):
            for n in range(cold_runs):  # each in a clone of its own, with caches of its own
                tag = f"{'emb' if not args else 'srv'}-{n}"
                repo = scratch_copy(scratch, f"clone-{tag}")
                pip_cache = scratch / f"pip-cache-{tag}"
                env = base_env(scratch, pip_cache=pip_cache, datadir=scratch / f"pgdata-{tag}")
                cold = run_demo(f"cold, {where}", repo, opts.python, env, args, opts.timeout)
                runs.append(cold)
                if n == 0:
                    notes.append(f"{cold.case}: {pip_cache_size(pip_cache)}; {installed(repo)}")
                print(f"{cold.case}: first event {cold.first_event:.1f} s", flush=True)
            for _ in range(warm_runs):  # in the last clone: its .venv and data directory
                warm = run_demo(f"warm, {where}", repo, opts.python, env, args, opts.timeout)
                runs.append(warm)
                print(f"{warm.case}: first event {warm.first_event:.1f} s", flush=True)
    finally:
        with psycopg.connect(opts.dsn, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {DBNAME} WITH (FORCE)")
        if opts.keep:
            print(f"scratch directory kept: {scratch}")
        else:
            _remove(scratch)
    info["Load average at end"] = _report.load_average()
    print("\n".join(notes))
    _report.publish(report(runs, info, notes), opts.output, START, END)


def _remove(scratch: Path) -> None:
    """The scratch tree; as root its data directories belong to pgserver's user: still ours."""
    shutil.rmtree(scratch, ignore_errors=True)


def _pip_config(python: str) -> str:
    out = subprocess.run(
        [python, "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout
    keep = [ln for ln in out.splitlines() if any(k in ln for k in ("index", "find-links"))]
    return "; ".join(keep) or "defaults (PyPI)"


def _python_version(python: str) -> str:
    return subprocess.run(
        [python, "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
    ).stdout.strip()


def report(runs: list[Run], info: dict[str, str], notes: list[str]) -> str:
    cases = list(dict.fromkeys(r.case for r in runs))
    summary = [["Case", "Runs", "First event, median (s)", "min-max (s)", "Whole demo, median (s)"]]
    for case in cases:
        mine = [r for r in runs if r.case == case]
        firsts = [r.first_event for r in mine]
        summary.append(
            [
                case,
                str(len(mine)),
                f"**{statistics.median(firsts):.1f}**",
                f"{min(firsts):.1f}-{max(firsts):.1f}",
                f"{statistics.median(r.total for r in mine):.1f}",
            ]
        )
    phases = [
        [
            "Run",
            "venv",
            "pip install",
            "start-up + imports",
            "embedded server start",
            "to first event",
            "first event",
            "whole demo",
        ],
        *(phase_row(r) for r in runs),
    ]
    machine = "\n".join(f"- {k}: {v}" for k, v in info.items())
    return f"""## Time to first event: the README's first command (`python3 scripts/dev.py demo`)

Command: `flock /tmp/pgherald-bench.lock {_report.command()}`{BR}
Date: {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

{machine}

Method: see `bench/first_run_bench.py`. A fresh copy of the committed tree (`git archive HEAD`)
in a scratch directory; `python3 scripts/dev.py demo` run there, its output timestamped line by
line; the first event is the demo's first `<- heard` line, in seconds from the command's start.
Cold: no `.venv`, an empty pip cache, an empty embedded data directory (`initdb` runs). Warm:
`.venv` and the data directory are there from the run before. With a server: `--dsn` given,
no embedded server.

{_report.table(summary)}

Where the time goes, every run (seconds; from the lines `scripts/dev.py` and the demo print):

{_report.table(phases)}

{chr(10).join(f"- {n}" for n in notes)}"""


if __name__ == "__main__":
    main()
