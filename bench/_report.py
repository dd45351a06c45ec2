"""What every benchmark writes the same way: the machine it ran on and its docs section."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
from importlib import metadata
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def version(dist: str) -> str:
    """An installed distribution's version, or 'not installed'."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def write_section(path: Path, start: str, end: str, body: str) -> None:
    """Replace the text between the *start* and *end* markers of *path* (append if absent)."""
    section = f"{start}\n{body}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def parser(doc: str | None, quick: str, dsn_help: str | None = None) -> argparse.ArgumentParser:
    """The options every benchmark takes: --dsn, --quick (help *quick*) and --output."""
    ap = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    ap.add_argument(
        "--dsn",
        default=os.environ.get("PGHERALD_DSN", "host=127.0.0.1 user=postgres dbname=postgres"),
        help=dsn_help,
    )
    ap.add_argument("--quick", action="store_true", help=quick)
    ap.add_argument("--output", type=Path, help="markdown file whose bench section to replace")
    return ap


def command() -> str:
    """The command line this benchmark was started with, as the report shows it."""
    return "python " + shlex.join([os.path.relpath(sys.argv[0]), *sys.argv[1:]])


def load_average() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def overloaded() -> bool:
    """Whether the load average exceeds the core count (other work shares the cores)."""
    return max(os.getloadavg()) > (os.cpu_count() or 1)


def publish(body: str, output: Path | None, start: str, end: str) -> None:
    """Print the report *body*; with *output*, also write it as the section between markers."""
    print("\n" + body)
    if output:
        write_section(output, start, end, body)
        print(f"\nwrote section to {output}")


def machine(
    dsn: str, *, settings: tuple[str, ...] = (), extra: dict[str, str] | None = None
) -> dict[str, str]:
    """The machine and server a benchmark ran on; *settings* are server settings to show."""
    import psycopg

    with psycopg.connect(dsn) as conn:

        def show(name: str) -> str:
            row = conn.execute(f"SHOW {name}").fetchone()  # our own constant names
            return str(row[0]) if row else "?"

        server = show("server_version")
        shown = {s: show(s) for s in settings}
    if shown:
        listed = ", ".join(f"{k}={v}" for k, v in shown.items())
        server += f" ({listed}; server defaults, not changed by the benchmark)"
    mem_kb = next(
        (
            ln.split()[1]
            for ln in Path("/proc/meminfo").read_text().splitlines()
            if ln.startswith("MemTotal")
        ),
        "0",
    )
    libpq = psycopg.pq.version()
    info = {
        "CPU": cpu_model(),
        "Cores": f"{os.cpu_count()} (usable: {len(os.sched_getaffinity(0))}), "
        f"RAM {int(mem_kb) / 1024 / 1024:.0f} GB",
        "OS": platform.platform(),
        "Load average at start": load_average(),
        "Python": platform.python_version(),
        "PostgreSQL server": server,
        "psycopg": f"{psycopg.__version__} ({psycopg.pq.__impl__}, libpq {libpq // 10000}"
        f".{libpq % 100})",
    }
    info.update(extra or {})
    return info


def table(rows: list[list[str]]) -> str:
    """A markdown table, first row the header, columns padded."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    cells = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([f"| {cells[0]} |", sep, *(f"| {line} |" for line in cells[1:])])


def parse_last(out: str, err: str, rc: int | None) -> dict[str, Any]:
    """A worker's result: the last JSON line it printed, else its last error line."""
    lines = [ln for ln in out.strip().splitlines() if ln.startswith("{")]
    if not lines:
        tail = (err.strip().splitlines() or [f"exit code {rc}"])[-1]
        return {"ok": False, "error": tail}
    res: dict[str, Any] = json.loads(lines[-1])
    return res
