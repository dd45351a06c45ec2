"""What every benchmark writes the same way: the machine it ran on and its docs section."""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path


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


def machine(
    dsn: str, *, settings: tuple[str, ...] = (), extra: dict[str, str] | None = None
) -> dict[str, str]:
    """The machine and server a benchmark ran on; *settings* are server settings to show."""
    import os

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
        "Load average at start": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
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
