"""Delayed events benchmark: how late a delayed event reaches its handler, with a running consumer.

Usage::

    python bench/scheduled_bench.py [--dsn DSN] [--quick] [--output docs/benchmarks.md]

Method.  The run creates a fresh database (``pgherald_bench_scheduled``, dropped and recreated
on the server of ``--dsn``) and installs pgherald's schema.  A sync `Consumer` (default
options: ``poll_interval`` 0.5 s, so an event on time proves the consumer's own release
timing, not its poll) runs in a thread of this process and records ``time.time()`` in its
handler.  Lateness = handler time - ``deliver_at`` (the client's clock, which on this machine is
the server's); "release" is the event's ``created_at`` in the log (when it entered the log) -
``deliver_at``.

* Trickle: events published one every 10 ms, each with ``deliver_at`` = now + a uniform
  random 50-500 ms (seed 1): the consumer is idle between them, woken by the 'scheduled'
  wake-up and by its own timer.
* Burst: 1,000 events published in one transaction, all due at the same instant 1 s later:
  one release statement moves them; lateness of every event (the last one handled is the
  p100).

The target (issue 12): a delayed event's lateness p99 < 100 ms.
"""

from __future__ import annotations

import datetime as dt
import random
import statistics
import threading
import time
from typing import Any

import _report  # bench/_report.py: shared by every benchmark
import psycopg
from psycopg.conninfo import make_conninfo

import pgherald

START, END = "<!-- scheduled-bench:start -->", "<!-- scheduled-bench:end -->"
DBNAME = "pgherald_bench_scheduled"


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


class Consuming:
    """A Consumer in a thread, recording (payload, handler time)."""

    def __init__(self, dsn: str) -> None:
        self.got: dict[int, float] = {}
        self.consumer = pgherald.Consumer(dsn, group="bench", channels=["bench"])

        @self.consumer.on("bench")
        def handle(event: pgherald.Event) -> None:
            self.got[event.payload["n"]] = time.time()

        self.consumer.connect()
        self.thread = threading.Thread(target=self.consumer.run, daemon=True)
        self.thread.start()

    def wait(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.got) < n:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {len(self.got)} of {n} delayed events arrived")
            time.sleep(0.01)

    def stop(self) -> None:
        self.consumer.stop()
        self.thread.join(10)
        self.consumer.close()


def released(conn: psycopg.Connection[Any], due: dict[int, float]) -> list[float]:
    rows = conn.execute(
        "SELECT (payload->>'n')::int, extract(epoch FROM created_at) FROM pgherald.events_v1 "
        "WHERE channel = 'bench'"
    ).fetchall()
    return [float(at) - due[n] for n, at in rows]


def trickle(dsn: str, count: int) -> dict[str, list[float]]:
    rng = random.Random(1)
    due: dict[int, float] = {}
    run = Consuming(dsn)
    try:
        time.sleep(0.5)  # connected and idle
        with psycopg.connect(dsn, autocommit=True) as conn:
            for n in range(count):
                at = time.time() + rng.uniform(0.05, 0.5)
                due[n] = at
                when = dt.datetime.fromtimestamp(at, dt.timezone.utc)
                pgherald.publish(conn, "bench", {"n": n}, deliver_at=when)
                time.sleep(0.01)  # pacing the publisher, not synchronisation
            run.wait(count, 30)
            rel = released(conn, due)
    finally:
        run.stop()
    return {"handler": [run.got[n] - due[n] for n in due], "release": rel}


def burst(dsn: str, count: int) -> dict[str, list[float]]:
    run = Consuming(dsn)
    try:
        time.sleep(0.5)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("TRUNCATE pgherald.events_v1")
            at = time.time() + 1.0
            when = dt.datetime.fromtimestamp(at, dt.timezone.utc)
            with conn.transaction():
                for n in range(count):
                    pgherald.publish(conn, "bench", {"n": n}, deliver_at=when)
            run.wait(count, 30)
            rel = released(conn, dict.fromkeys(range(count), at))
    finally:
        run.stop()
    return {"handler": [run.got[n] - at for n in range(count)], "release": rel}


def report(results: dict[str, dict[str, list[float]]], info: dict[str, str]) -> str:
    rows = [["Scenario", "Events", "Measured", "p50 (ms)", "p99 (ms)", "max (ms)", "min (ms)"]]
    for name, got in results.items():
        for what, values in got.items():
            ms = [v * 1000 for v in values]
            rows.append(
                [
                    name,
                    f"{len(values):,}",
                    "to the handler" if what == "handler" else "into the log",
                    f"{statistics.median(ms):.1f}",
                    f"{pct(ms, 99):.1f}",
                    f"{max(ms):.1f}",
                    f"{min(ms):.1f}",
                ]
            )
    p99 = max(pct(v["handler"], 99) for v in results.values()) * 1000
    lines = [
        "## Delayed events benchmark (`publish(..., deliver_at=...)`)",
        "",
        f"Command: `flock /tmp/pgherald-bench.lock {_report.command()}`  ",
        f"Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        *(f"- {k}: {v}" for k, v in info.items()),
        f"- Load average at end: {_report.load_average()}",
        "",
        "Method: see `bench/scheduled_bench.py`. One sync `Consumer` with default options "
        "(`poll_interval` 0.5 s); lateness = time - `deliver_at`, to the handler and into the "
        "log (the event's `created_at`, when a consumer released it). Trickle: one delayed "
        "event every 10 ms, each due 50-500 ms later; burst: 1,000 events due at one instant.",
        "",
        _report.table(rows),
        "",
        f"**Lateness p99 to the handler: {p99:.1f} ms** (target < 100 ms). No event arrived "
        "before its `deliver_at` when min >= 0.",
        "",
        "Into the log is what the release controls; to the handler adds the log's usual rule: "
        "an event is read once every transaction older than it has ended, anywhere on the "
        "server. On a server shared with other work (CREATE DATABASE, long transactions) that "
        "rule, not the release, sets the lateness: run it against a server of its own for the "
        "release's cost alone.",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = _report.parser(__doc__, "100 trickle events instead of 500")
    args = ap.parse_args()
    info = _report.machine(
        args.dsn,
        settings=("synchronous_commit", "fsync"),
        extra={"pgherald": pgherald.__version__},
    )
    with psycopg.connect(args.dsn, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {DBNAME} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {DBNAME}")
    dsn = make_conninfo(args.dsn, dbname=DBNAME)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            pgherald.install(conn)
        results = {
            "trickle": trickle(dsn, 100 if args.quick else 500),
            "burst": burst(dsn, 1000),
        }
    finally:
        with psycopg.connect(args.dsn, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {DBNAME} WITH (FORCE)")
    _report.publish(report(results, info), args.output, START, END)


if __name__ == "__main__":
    main()
