"""LISTEN/NOTIFY receive benchmark: pgherald against raw psycopg 3, psycopg2 and asyncpg.

Usage::

    python bench/listen_bench.py [--dsn DSN] [--quick] [--runs N] [--no-pin] [--clients A,B]
                                 [--big-bytes 4096] [--output docs/benchmarks.md]

Method.  Each client runs in its own receiver process (``bench/_workers.py recv CLIENT``) and
a separate sender process (``bench/_workers.py send``) produces the notifications; clients
run one after the other, never concurrently, and throughput repetitions are interleaved
across clients.  A receiver LISTENs on channel ``bench``, reports ``READY``, and only then is
the sender started. Each receiver is pinned to one CPU (the last usable one; ``--no-pin`` to
leave it to the scheduler; the other processes are not pinned): unpinned, one client's runs
spread by up to 25% on the 2-core machine of 2026-11-25, pinned by about 3%. Each payload is
~100 bytes of JSON; every client decodes it and calls a plain Python handler, which counts
(and, for latency, records ``time.time_ns() - ts``).

* Throughput: the sender sends N notifications (200,000; 50,000 with ``--quick``) as fast as
  it can, 1,000 per transaction (one autocommit ``SELECT count(pg_notify(...)) FROM
  unnest($1::text[])`` statement, binary array parameter).  The receiver times first to last
  notification, in wall time and in its own CPU time (``time.process_time``); the reported
  figures are medians over the runs (3, or ``--runs``; 1 with ``--quick``).
  The sender's rate alone (no listener) is measured first, to show it is not the bottleneck.
* Latency: the sender commits on a fixed schedule, one transaction every 1 ms (1 notification
  per tx at 1,000/s, 20 per tx at 20,000/s) for 5 s (1.5 s with ``--quick``).  The payload
  carries ``time.time_ns()`` taken right before the statement that notifies and commits is
  sent; the handler computes commit-to-handler latency.  The first 5% are dropped as warm-up;
  p50 and p99 are reported.
* Large payloads: the throughput trial again with 4 KB payloads (``--big-bytes``; 0 skips it),
  40,000 notifications (10,000 with ``--quick``), for pgherald's clients beside asyncpg,
  psycopg 3 and the pq loop in the same run.  The figure is CPU per notification (the
  receiver's process CPU time, first to last notification): with 4 KB payloads the cost of
  getting bytes off the socket, not of building a notification, dominates.

Every process has a deadline: receivers stop at the expected count, at a ``STOP`` sentinel
sent after the data, or at their timeout (then the run counts as failed), and the
orchestrator kills any process it started that overstays.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import _report  # bench/_report.py: shared by every benchmark

HERE = Path(__file__).resolve().parent
WORKERS = str(HERE / "_workers.py")
SRC = HERE.parent / "src"
START, END = "<!-- listen-bench:start -->", "<!-- listen-bench:end -->"
RAW = ["psycopg3-notifies", "pq-loop", "psycopg2-poll", "asyncpg"]
FLOOR = ["pq-loop-handler"]  # diagnostic: the pq loop + one Notification and one call each
# Handler style and iterator style (``-iter``), sync and async on both event loops.
HERALD = [
    "pgherald-sync",
    "pgherald-sync-iter",
    "pgherald-async-asyncio",
    "pgherald-asyncio-iter",
    "pgherald-async-trio",
    "pgherald-trio-iter",
]
ASYNC_HERALD = [c for c in HERALD if "-sync" not in c]
# pgherald.tracing (an SDK tracer: a span per notification) and pgherald.metrics on: only
# when named in --clients; the report gives their cost beside the plain client's.
OBSERVED = {
    "pgherald-sync-observed": "pgherald-sync",
    "pgherald-asyncio-observed": "pgherald-async-asyncio",
}
BIG_RAW = ["psycopg3-notifies", "pq-loop", "asyncpg"]  # beside pgherald in the 4 KB case
RATES = {1000: 1, 20000: 20}  # notifications/s -> notifications per transaction (1 tx/ms)
Result = dict[str, Any]


def _run_json(args: list[str], env: dict[str, str], timeout: float) -> Result:
    """Run a worker to completion and parse the JSON line it prints."""
    try:
        proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"sender timed out after {timeout:.0f}s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        return {"ok": False, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    res: Result = {"ok": True} | json.loads(lines[-1])
    return res


def uses_herald(client: str) -> bool:
    return "herald" in client or client in FLOOR


def receiver_cpu() -> int | None:
    """The CPU receivers are pinned to: the last usable one, when there are two or more."""
    usable = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return usable[-1] if len(usable) >= 2 else None


def trial(
    client: str,
    dsn: str,
    env: dict[str, str],
    count: int,
    rate: int = 0,
    cpu: int | None = None,
    size: int = 0,
) -> Result:
    """One receiver process for ``client`` plus one sender process; returns the receiver's
    result with the sender's under ``"sender"``. *size*: payload bytes (0: ~100)."""
    per_tx = RATES.get(rate, 1000)
    timeout = 60.0 + count / 20000 if rate == 0 else count / rate + 30.0
    common = ["--dsn", dsn, "--count", str(count), "--per-tx", str(per_tx)]
    common += ["--payload-bytes", str(size)]
    recv_args = [sys.executable, WORKERS, "recv", client, *common, "--timeout", str(timeout)]
    if cpu is not None:
        recv_args += ["--cpu", str(cpu)]
    if rate:
        recv_args.append("--latency")
    lines: queue.Queue[str | None] = queue.Queue()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(recv_args, env=env, stdout=subprocess.PIPE, stderr=err, text=True)

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line.strip())
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()

        def next_line(wait: float) -> str | None:
            try:
                return lines.get(timeout=wait)
            except queue.Empty:
                return None

        sender: Result = {}
        try:
            first = next_line(30.0)
            if first == "READY":
                sender = _run_json(
                    [sys.executable, WORKERS, "send", *common, "--rate", str(rate)], env, timeout
                )
                first = next_line(timeout + 15.0)
            res: Result = json.loads(first) if first else {"ok": False}
            if not res.get("ok"):
                res.setdefault("error", "receiver gave no result")
            proc.wait(10.0)
        except subprocess.TimeoutExpired:
            res = {"ok": False, "error": "receiver did not exit"}
        finally:
            if proc.poll() is None:
                proc.kill()  # only the process this function started
                proc.wait()
            err.seek(0)
            stderr = err.read().strip().splitlines()
        if not res.get("ok") and stderr:
            res["error"] = f"{res.get('error', '')} | {stderr[-1]}"
        res["sender"] = sender
        return res


def probe_pgherald(env: dict[str, str]) -> tuple[dict[str, str] | None, str]:
    """Return the environment in which ``import pgherald`` works (or None) and a note."""
    code = "import pgherald as p; p.Listener, p.AsyncListener; print(p.__dict__.get('__version__'))"
    reason = ""
    for extra, where in ((None, "installed"), (str(SRC), "from src/, not installed")):
        e = dict(env)
        if extra:
            e["PYTHONPATH"] = os.pathsep.join(filter(None, [extra, env.get("PYTHONPATH")]))
        p = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True)
        if p.returncode == 0:
            return e, f"pgherald {p.stdout.strip()} ({where})"
        reason = reason or (p.stderr.strip().splitlines() or ["import failed"])[-1]
    return None, reason


def machine(dsn: str) -> dict[str, str]:
    ver = _report.version
    return _report.machine(
        dsn,
        extra={
            "psycopg2-binary": ver("psycopg2-binary"),
            "asyncpg": ver("asyncpg"),
            "anyio / trio": f"{ver('anyio')} / {ver('trio')}",
        },
    )


table = _report.table


def report(
    a: argparse.Namespace,
    shown: list[str],
    info: dict[str, str],
    tput: dict[str, list[Result]],
    lat: dict[tuple[str, int], Result],
    sender_alone: Result,
    skipped: dict[str, str],
    herald_note: str,
    big: dict[str, list[Result]],
) -> str:
    def median(c: str, key: str) -> float | None:
        ok = [r[key] for r in tput.get(c, []) if r.get("ok") and key in r]
        return statistics.median(ok) if ok else None

    rates = {c: median(c, "rate") for c in shown}

    def ratio(c: str, ref: str) -> float | None:
        x, y = rates[c], rates[ref]
        return x / y if x and y else None

    def cpu_ratio(c: str, ref: str) -> float | None:
        """How many times fewer CPU µs per notification than *ref* (higher is better)."""
        x, y = median(c, "cpu_us"), median(ref, "cpu_us")
        return y / x if x and y else None

    def fx(v: float | None, f: str = "{:.2f}x") -> str:
        return f.format(v) if v is not None else "-"

    def latcell(c: str, rate: int, key: str) -> str:
        r = lat.get((c, rate), {})
        return f"{r[key]:.3f}" if r.get("ok") and key in r else ("fail" if r else "-")

    head = ["Client", "Throughput (notif/s)", "CPU µs/notif", "Runs ok", "vs asyncpg", "vs pq-loop"]
    head += ["vs asyncpg (CPU)"]
    head += [f"p{q} @{k // 1000}k/s (ms)" for k in RATES for q in (50, 99)]
    rows = [head]
    for c in shown:
        if c in skipped:
            rows.append([c, "skipped", *["-"] * (len(head) - 2)])
            continue
        runs = tput.get(c, [])
        n_ok = sum(bool(r.get("ok")) for r in runs)
        rows.append(
            [
                c,
                fx(rates[c], "{:,.0f}"),
                fx(median(c, "cpu_us"), "{:.2f}"),
                f"{n_ok}/{len(runs)}",
                fx(ratio(c, "asyncpg")),
                fx(ratio(c, "pq-loop")),
                fx(cpu_ratio(c, "asyncpg")),
                *[latcell(c, k, f"p{q}_ms") for k in RATES for q in (50, 99)],
            ]
        )

    def verdict(v: float | None, ok: bool) -> str:
        return "n/a" if v is None else ("PASS" if ok else "FAIL")

    targets = [["Target", "Measured", "Result"]]
    wanted = [("pgherald-sync", "pq-loop", 0.9)]
    wanted += [(c, "asyncpg", 1.2) for c in HERALD if c in shown and c not in skipped]
    for c, ref, want in wanted:
        v = ratio(c, ref)
        targets.append([f"{c} >= {want}x {ref}", fx(v), verdict(v, v is not None and v >= want)])

    def big_median(c: str, key: str) -> float | None:
        ok = [r[key] for r in big.get(c, []) if r.get("ok") and key in r]
        return statistics.median(ok) if ok else None

    big_cpu = {c: big_median(c, "cpu_us") for c in big}
    big_ref = big_cpu.get("asyncpg")
    big_rows = [["Client", "CPU µs/notif", "vs asyncpg (CPU)", "Throughput (notif/s)", "Runs"]]
    for c in big:
        cpu, runs = big_cpu[c], big[c]
        vs = cpu / big_ref if cpu and big_ref else None
        per_run = ", ".join(f"{r['cpu_us']:.1f}" if r.get("ok") else "fail" for r in runs)
        big_rows.append(
            [
                c,
                fx(cpu, "{:.2f}"),
                fx(vs),
                fx(big_median(c, "rate"), "{:,.0f}"),
                f"{sum(bool(r.get('ok')) for r in runs)}/{len(runs)} ({per_run})",
            ]
        )
        if c in ASYNC_HERALD:
            targets.append(
                [
                    f"{c} CPU/notif <= 1.1x asyncpg at {a.big_bytes:,} B",
                    fx(vs),
                    verdict(vs, vs is not None and vs <= 1.1),
                ]
            )
    for c in [c for c in shown if c.startswith("pgherald")]:
        for rate, limit in ((1000, 1.0), (20000, 5.0)):
            r = lat.get((c, rate), {})
            v = r.get("p99_ms") if r.get("ok") else None
            targets.append(
                [
                    f"{c} p99 < {limit:g} ms at {rate:,}/s",
                    fx(v, "{:.3f} ms"),
                    verdict(v, v is not None and v < limit),
                ]
            )

    attached = [
        r["sender"]["rate"] for rs in tput.values() for r in rs if r.get("sender", {}).get("ok")
    ]
    out = [
        "## LISTEN/NOTIFY receive benchmark",
        "",
        f"Command: `{a.command}`  ",
        f"Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        f"- pgherald: {herald_note}",
        "",
        f"Throughput: {a.count:,} notifications of ~100 B JSON, 1,000 per transaction, sent as "
        "fast as possible; receiver wall time first to last notification, including "
        f"`json.loads` and a handler call; median of {a.runs} run(s) per client. CPU µs/notif is "
        "the receiver process's own CPU time over the same span (steadier than wall time on a "
        "small machine, where sender, receiver and their two backends share the cores); "
        "`vs asyncpg (CPU)` is asyncpg's CPU µs/notif over the client's (higher is better). "
        f"Latency: commit-to-handler, one transaction per ms for {a.lat_seconds:g} s per rate, "
        "first 5% dropped. Each client runs alone in its own process; the sender is another. "
        + (
            f"Every receiver is pinned to CPU {a.cpu} (`os.sched_setaffinity`), so that the "
            "scheduler does not move it between cores; the sender and the server processes "
            "are not pinned and may share that CPU."
            if a.cpu is not None
            else "No process is pinned to a CPU (`--no-pin`, or a single usable core)."
        ),
        "",
        "`pq-loop-handler` is a diagnostic, not a driver: the pq loop plus one "
        "`pgherald.Notification` built and one function called per notification, with no "
        "reconnection, budget or stop checks. "
        f"pgherald-sync / pq-loop-handler: {fx(ratio('pgherald-sync', 'pq-loop-handler'))}; "
        f"pq-loop-handler / pq-loop: {fx(ratio('pq-loop-handler', 'pq-loop'))}.",
        "",
        f"Sender alone (no listener): {fx(sender_alone.get('rate'), '{:,.0f}')} notif/s; "
        f"while a listener is attached (median): "
        f"{fx(statistics.median(attached) if attached else None, '{:,.0f}')} notif/s.",
        "",
        table(rows),
        "",
        *[
            f"{c}: {fx(median(c, 'cpu_us'), '{:.2f}')} CPU µs/notif against "
            f"{fx(median(plain, 'cpu_us'), '{:.2f}')} for {plain}: tracing (an SDK span per "
            "notification, exported by a BatchSpanProcessor to an exporter that drops them) and "
            f"metrics cost {fx(_diff(median(c, 'cpu_us'), median(plain, 'cpu_us')), '{:.2f}')} "
            "µs per notification."
            for c, plain in OBSERVED.items()
            if c in shown and c not in skipped
        ],
        "",
        *(
            [
                f"Large payloads: {a.big_count:,} notifications of {a.big_bytes:,} B, 1,000 per "
                "transaction, sent as fast as possible; CPU µs/notif is the receiver process's "
                f"CPU time first to last notification, median of {a.runs} run(s) (each run's "
                "figure in brackets).",
                "",
                table(big_rows),
                "",
            ]
            if big
            else []
        ),
        "Targets:",
        "",
        table(targets),
    ]
    notes = [f"- {c} skipped: {why}" for c, why in skipped.items()]
    notes += [
        f"- {c} throughput run failed: {r.get('error')}"
        for c, rs in tput.items()
        for r in rs
        if not r.get("ok")
    ]
    notes += [
        f"- {c} latency at {k:,}/s failed: {r.get('error')}"
        for (c, k), r in lat.items()
        if not r.get("ok")
    ]
    notes += [
        f"- {c} {a.big_bytes:,} B run failed: {r.get('error')}"
        for c, rs in big.items()
        for r in rs
        if not r.get("ok")
    ]
    return "\n".join(out + (["", *notes] if notes else []))


def _diff(x: float | None, y: float | None) -> float | None:
    return x - y if x is not None and y is not None else None


def main() -> None:
    ap = _report.parser(__doc__, "1 run, 50,000 notifications, 1.5 s")
    ap.add_argument("--clients", help="comma-separated subset of clients (default: all)")
    ap.add_argument(
        "--runs", type=int, help="throughput runs per client (default 3, 1 with --quick)"
    )
    ap.add_argument(
        "--no-pin", action="store_true", help="do not pin receivers to a CPU of their own"
    )
    ap.add_argument(
        "--big-bytes",
        type=int,
        default=4096,
        help="payload size of the large-payload CPU case (default 4096; 0 skips it)",
    )
    ap.add_argument("--skip-latency", action="store_true", help="throughput runs only")
    a = ap.parse_args()
    a.cpu = None if a.no_pin else receiver_cpu()
    a.command = _report.command()
    runs, a.count, a.lat_seconds = (1, 50_000, 1.5) if a.quick else (3, 200_000, 5.0)
    a.big_count = 10_000 if a.quick else 40_000
    if a.runs is not None and a.runs < 1:
        ap.error("--runs must be at least 1")
    a.runs = a.runs or runs
    clients = a.clients.split(",") if a.clients else RAW + FLOOR + HERALD
    if unknown := set(clients) - {*RAW, *FLOOR, *HERALD, *OBSERVED}:
        ap.error(f"unknown clients: {', '.join(sorted(unknown))}")
    shown = RAW + FLOOR + HERALD + [c for c in OBSERVED if c in clients]
    env = dict(os.environ)

    try:
        info = machine(a.dsn)
    except Exception as exc:
        sys.exit(f"cannot query the server at {a.dsn!r}: {exc}")
    herald_env, herald_note = probe_pgherald(env)
    skipped = {c: "not selected (--clients)" for c in shown if c not in clients}
    if herald_env is None:
        skipped |= {c: f"`import pgherald` failed: {herald_note}" for c in shown if uses_herald(c)}
    todo = [c for c in shown if c not in skipped]
    envs = {c: herald_env if herald_env and uses_herald(c) else env for c in todo}
    print(f"clients: {', '.join(todo)}; {herald_note}", flush=True)

    sender_alone = _run_json(
        [sys.executable, WORKERS, "send", "--dsn", a.dsn, "--count", str(a.count)], env, 120.0
    )
    print(f"sender alone: {sender_alone.get('rate', 0):,.0f} notif/s", flush=True)

    tput: dict[str, list[Result]] = {c: [] for c in todo}
    for run in range(a.runs):
        for c in todo:
            r = trial(c, a.dsn, envs[c], a.count, cpu=a.cpu)
            tput[c].append(r)
            print(
                f"throughput run {run + 1} {c:24} {r.get('rate', 0):>10,.0f} notif/s "
                f"(sender {r['sender'].get('rate', 0):,.0f}/s) {r.get('error', '')}",
                flush=True,
            )
    big: dict[str, list[Result]] = {}
    if a.big_bytes:
        big = {c: [] for c in todo if c in BIG_RAW or c in HERALD}
    for run in range(a.runs if big else 0):
        for c in big:
            r = trial(c, a.dsn, envs[c], a.big_count, cpu=a.cpu, size=a.big_bytes)
            big[c].append(r)
            print(
                f"{a.big_bytes} B run {run + 1} {c:24} {r.get('cpu_us', 0):7.2f} µs/notif "
                f"{r.get('rate', 0):>10,.0f} notif/s {r.get('error', '')}",
                flush=True,
            )
    lat: dict[tuple[str, int], Result] = {}
    for rate in RATES if not a.skip_latency else ():
        for c in todo:
            r = lat[c, rate] = trial(c, a.dsn, envs[c], int(rate * a.lat_seconds), rate, a.cpu)
            print(
                f"latency {rate:>6,}/s {c:24} p50 {r.get('p50_ms', 0):7.3f} ms  "
                f"p99 {r.get('p99_ms', 0):7.3f} ms {r.get('error', '')}",
                flush=True,
            )

    body = report(a, shown, info, tput, lat, sender_alone, skipped, herald_note, big)
    _report.publish(body, a.output, START, END)


if __name__ == "__main__":
    main()
