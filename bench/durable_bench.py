"""Durable event log benchmark: pgherald.publish against a plain INSERT, Consumer throughput
from a backlog, and commit-to-handler latency.

Usage::

    python bench/durable_bench.py [--dsn DSN] [--quick] [--output docs/benchmarks.md]
    python bench/durable_bench.py --parts consume [--batch N] [--max-batch N]   # partial run

Method.  The run creates a fresh database (``pgherald_bench_durable``, dropped and recreated
on the server of ``--dsn``) and installs pgherald's schema with ``pgherald.install``.  Every
client is its own process (``bench/durable_workers.py``); measurements run one after another.

* Publish throughput: W writer processes (1 and 16) each commit one event per transaction
  (autocommit, one statement, ~100-byte JSON payload encoded with ``json.dumps`` per event)
  for a fixed time (5 s; 2 s with ``--quick``) after all are connected and warmed up:
  (a) a plain ``INSERT`` into ``bench_plain``, a table with exactly the shape of
  ``pgherald.events_v1`` (columns, identity, generated partition, indexes);
  (b) the same INSERT plus ``pg_notify('x', '')`` in the same statement/transaction;
  (c) ``pgherald.publish(conn, "bench", payload)``.
  Both tables are truncated and a CHECKPOINT is taken before each trial; the kinds are
  interleaved; medians over 3 runs (1 with ``--quick``).
* Consume throughput: a backlog of 1,000,000 events (100,000 with ``--quick``) is loaded with
  ``INSERT ... SELECT generate_series`` (100,000 per transaction) and VACUUM ANALYZEd; then a
  `Consumer` with a fresh group (start "beginning", ``--batch`` 5000, ``--max-batch`` the
  Consumer's default: reads grow while they come back full) consumes all of it, handler style
  and iterator style, sync (`Consumer`) and async (`AsyncConsumer` on asyncio), the handler/loop
  body only counting.  A sweep over the first 200,000
  events compares fixed read sizes (max_batch_size = batch_size) with growth.  Wall time from ``run()`` (or the first
  ``next``) to the last event; the time spent in the core's fetch and ack is measured by
  wrapping them, and one ``read_batch`` query is EXPLAIN ANALYZEd.
* Latency: a publisher process commits one event per transaction at 1,000 events/s for 5 s
  (2 s with ``--quick``), ``time.time_ns()`` in the payload taken just before the autocommit
  statement that inserts and commits; a consumer process (handler style, default options)
  records ``time.time_ns() - ts`` in its handler.  First 5% dropped; p50 and p99.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _report  # bench/_report.py: shared by every benchmark
import psycopg
from _report import parse_last
from psycopg.conninfo import conninfo_to_dict, make_conninfo

HERE = Path(__file__).resolve().parent
WORKERS = str(HERE / "durable_workers.py")
START, END = "<!-- durable-bench:start -->", "<!-- durable-bench:end -->"
DBNAME = "pgherald_bench_durable"
KINDS = ["plain", "notify", "publish", "publish-nowake"]
KIND_LABEL = {
    "plain": "plain INSERT",
    "notify": "INSERT + pg_notify (naive)",
    "publish": "pgherald.publish",
    "publish-nowake": "publish, wake NOTIFY off (diagnostic)",
}
WRITERS = [1, 16]
PARTS = ["publish", "consume", "latency"]
DEFAULT_MAX = 20_000  # Consumer's default max_batch_size (pgherald._protocol.consumer)
# Consume styles: label -> the worker's --style.
STYLES = {
    "handler": "handler",
    "iterator": "iter",
    "async handler": "async-handler",
    "async iterator": "async-iter",
}
# Consume sweep: (batch_size, max_batch_size); max = batch_size means fixed-size reads, None the
# Consumer's default (reads grow while they come back full).
SWEEP: list[tuple[int, int | None]] = [
    (1000, 1000),
    (5000, 5000),
    (20000, 20000),
    (1000, None),
    (5000, None),
]
Result = dict[str, Any]

PLAIN_DDL = """
DROP TABLE IF EXISTS bench_plain;
CREATE TABLE bench_plain (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tx xid8 NOT NULL DEFAULT pg_current_xact_id(),
    channel text NOT NULL CHECK (channel <> '' AND octet_length(channel) <= 63),
    key text,
    partition smallint GENERATED ALWAYS AS (hashtext(coalesce(key, id::text)) & 15) STORED,
    payload jsonb NOT NULL,
    headers jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX bench_plain_read ON bench_plain (partition, tx, id);
CREATE INDEX bench_plain_created_at ON bench_plain USING brin (created_at);
"""


def log(msg: str) -> None:
    print(msg, flush=True)


def worker(*args: str) -> list[str]:
    return [sys.executable, WORKERS, *args]


# -- setup ---------------------------------------------------------------------------------


def create_database(admin_dsn: str) -> str:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DBNAME} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DBNAME}")
    params = conninfo_to_dict(admin_dsn)
    params["dbname"] = DBNAME
    dsn = make_conninfo(**params)
    import pgherald

    with psycopg.connect(dsn, autocommit=True) as conn:
        pgherald.install(conn)
        conn.execute(PLAIN_DDL)
    return dsn


def reset_tables(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE bench_plain, pgherald.events_v1, pgherald.positions_v2")
        conn.execute("CHECKPOINT")


# -- 1. publish throughput -----------------------------------------------------------------


def write_trial(dsn: str, kind: str, writers: int, seconds: float) -> Result:
    reset_tables(dsn)
    args = worker("write", "--dsn", dsn, "--kind", kind, "--seconds", str(seconds))
    procs: list[tuple[subprocess.Popen[str], Any]] = []
    try:
        for _ in range(writers):
            err = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in finally)
            p = subprocess.Popen(
                args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True
            )
            procs.append((p, err))
        for p, _ in procs:  # all connected and warmed up
            assert p.stdout is not None
            line = p.stdout.readline().strip()
            if line != "READY":
                raise RuntimeError(f"writer not ready: {line or 'no output'}")
        for p, _ in procs:
            assert p.stdin is not None
            p.stdin.write("GO\n")
            p.stdin.flush()
        results = []
        for p, err in procs:
            out, _ = p.communicate(timeout=seconds + 60)
            err.seek(0)
            results.append(parse_last(out, err.read(), p.returncode))
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        return {"ok": False, "error": str(exc)}
    finally:
        for p, err in procs:
            if p.poll() is None:
                p.kill()  # only processes this function started
                p.wait()
            err.close()
    bad = [r for r in results if not r.get("ok")]
    if bad:
        return {"ok": False, "error": bad[0].get("error")}
    walls = [r["wall"] for r in results]
    count = sum(r["count"] for r in results)
    return {
        "ok": True,
        "count": count,
        "tps": sum(r["count"] / r["wall"] for r in results),
        "wall": max(walls),
        "tx_ms": statistics.median(r["tx_ms_median"] for r in results),
    }


# -- 2. consume throughput -----------------------------------------------------------------


def load_backlog(dsn: str, n: int) -> float:
    reset_tables(dsn)
    t0 = time.perf_counter()
    step = 100_000
    with psycopg.connect(dsn, autocommit=True) as conn:
        for lo in range(1, n + 1, step):
            hi = min(n, lo + step - 1)
            conn.execute(
                "INSERT INTO pgherald.events_v1 (channel, payload) "
                "SELECT 'bench', jsonb_build_object('i', g, 'pad', repeat('x', 60)) "
                "FROM generate_series(%s::int, %s::int) g",
                (lo, hi),
            )
        conn.execute("VACUUM ANALYZE pgherald.events_v1")
        conn.execute("CHECKPOINT")
    return time.perf_counter() - t0


def consume_trial(
    dsn: str, style: str, group: str, count: int, batch: int, max_batch: int | None, cap: float
) -> Result:
    timeout = cap
    args = worker(
        "consume", "--dsn", dsn, "--style", style, "--group", group,
        "--count", str(count), "--batch", str(batch), "--timeout", str(timeout),
    )  # fmt: skip
    if max_batch is not None:
        args += ["--max-batch", str(max_batch)]
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=timeout + 60)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": "consumer did not exit"}
    return parse_last(p.stdout, p.stderr, p.returncode)


def explain_read(dsn: str, batch: int) -> Result:
    """EXPLAIN ANALYZE the consumer's read_batch query at the start of a fresh group."""
    from pgherald import sql

    q = sql.query("read_batch")
    group = "bench-explain"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            sql.query("create_group"), {"group": group, "tx": "0", "event_id": 0, "skip": None}
        )
        # Positions are per (group, channel, partition): the channel's rows begin at the start.
        conn.execute(sql.query("register_channels"), {"group": group, "channels": ["bench"]})
        parts = int(conn.execute("SELECT pgherald.partition_count_v1()").fetchone()[0])  # type: ignore[index]
        params = {
            "group": group,
            # One entry per (channel, partition) range read: here one channel, every partition.
            "channels": "{" + ",".join(["bench"] * parts) + "}",
            "partitions": "{" + ",".join(map(str, range(parts))) + "}",
            "txs": "{" + ",".join(["NULL"] * parts) + "}",  # from the stored positions
            "ids": "{" + ",".join(["NULL"] * parts) + "}",
            "limit": batch,
            "shares": [-(-batch // parts)] * parts,  # what a Consumer asks for at first
        }
        # The consumer's session settings (its planner: ordered index scans, see consumer.py).
        from pgherald._protocol.consumer import _SETTINGS

        conn.execute(_SETTINGS)
        t0 = time.perf_counter()
        rows = conn.execute(q, params).fetchall()
        query_s = time.perf_counter() - t0
        row = conn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + q, params).fetchone()
        assert row is not None
        plan = row[0][0]
        conn.execute("DELETE FROM pgherald.positions_v2 WHERE group_name = %s", (group,))

    def walk(node: dict[str, Any]) -> int:
        """Rows produced by the per-partition index scans (all loops)."""
        own = 0
        # The log is partitioned by day: its scans are on events_v1_pYYYYMMDD / _default.
        if "Scan" in node.get("Node Type", "") and str(node.get("Relation Name", "")).startswith(
            "events_v1"
        ):
            own = int(node.get("Actual Rows", 0) * node.get("Actual Loops", 1))
            heap[0] += int(node.get("Exact Heap Blocks", 0))
        return own + sum(walk(c) for c in node.get("Plans", []))

    heap = [0]
    scanned = walk(plan["Plan"])

    return {
        "rows": len(rows),
        "query_ms": query_s * 1000,
        "exec_ms": plan["Execution Time"],
        "scanned": scanned,
        "heap_blocks": heap[0],
    }


# -- 3. latency ----------------------------------------------------------------------------


def latency_trial(dsn: str, rate: int, seconds: float) -> Result:
    reset_tables(dsn)
    count = int(rate * seconds)
    timeout = seconds + 30.0
    recv_args = worker(
        "lat-recv", "--dsn", dsn, "--group", "lat", "--count", str(count),
        "--timeout", str(timeout),
    )  # fmt: skip
    with tempfile.TemporaryFile("w+") as err:
        recv = subprocess.Popen(recv_args, stdout=subprocess.PIPE, stderr=err, text=True)
        sender: Result = {}
        res_x: Result = {}
        try:
            assert recv.stdout is not None
            if recv.stdout.readline().strip() != "READY":
                raise RuntimeError("consumer not ready")
            watcher = threading.Thread(target=watch_xids, args=(dsn, seconds, res_x), daemon=True)
            watcher.start()
            s = subprocess.run(
                worker("lat-send", "--dsn", dsn, "--rate", str(rate), "--seconds", str(seconds)),
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            sender = parse_last(s.stdout, s.stderr, s.returncode)
            out, _ = recv.communicate(timeout=timeout + 15)
            err.seek(0)
            res = parse_last(out, err.read(), recv.returncode)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            res = {"ok": False, "error": str(exc)}
        finally:
            if recv.poll() is None:
                recv.kill()  # only the process this function started
                recv.wait()
    res["sender"] = sender
    res["other_xact_max_s"] = res_x.get("max_s")
    res["other_xact_where"] = res_x.get("where")
    return res


def watch_xids(dsn: str, seconds: float, out: Result) -> None:
    """Sample the oldest other transaction holding an xid, anywhere on the cluster: while it
    runs, the snapshot xmin the consumer reads up to cannot pass it."""
    q = (
        "SELECT extract(epoch FROM now() - xact_start), datname, left(query, 60) "
        "FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() "
        "AND datname IS DISTINCT FROM current_database() ORDER BY xact_start LIMIT 1"
    )
    end = time.monotonic() + seconds
    out["max_s"] = 0.0
    with contextlib.suppress(Exception), psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < end:
            row = conn.execute(q).fetchone()
            if row and row[0] is not None and float(row[0]) > out["max_s"]:
                out["max_s"], out["where"] = float(row[0]), f"{row[1]}: {row[2]}"
            time.sleep(0.02)


# -- report --------------------------------------------------------------------------------


def machine(dsn: str) -> dict[str, str]:
    return _report.machine(
        dsn,
        settings=("synchronous_commit", "fsync", "shared_buffers", "wal_level"),
        extra={"pgherald": _report.version("pgherald")},
    )


table = _report.table


def med(results: list[Result], key: str) -> float | None:
    ok = [r[key] for r in results if r.get("ok") and r.get(key) is not None]
    return statistics.median(ok) if ok else None


def max_label(a: argparse.Namespace) -> str:
    return str(a.max_batch) if a.max_batch is not None else f"{max(a.batch, DEFAULT_MAX)} (default)"


def fx(v: float | None, f: str = "{:.2f}x") -> str:
    return f.format(v) if v is not None else "-"


def verdict(v: float | None, ok: bool) -> str:
    return "n/a" if v is None else ("PASS" if ok else "FAIL")


def report(
    a: argparse.Namespace,
    info: dict[str, str],
    writes: dict[tuple[str, int], list[Result]],
    load_s: float,
    consumes: dict[str, list[Result]],
    sweep: dict[tuple[int, int | None], Result],
    explain: Result,
    lat: Result,
) -> str:
    out = [
        "## Durable event log benchmark",
        "",
        f"Command: `{a.command}`  ",
        f"Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        "",
        f"Method: a fresh database (`{DBNAME}`) with `pgherald.install`; every client is its "
        "own process (`bench/durable_workers.py`), measurements one after another. "
        f"**Publish**: 1 and 16 writer processes, each committing one event per transaction "
        f"(autocommit, one statement, ~100-byte JSON payload `json.dumps`ed per event) for "
        f"{a.seconds:g} s after all are connected and warmed up; plain INSERT into a table "
        "of exactly the shape of `pgherald.events_v1` (columns, identity, generated "
        "partition, the same three indexes), the same INSERT with `pg_notify('x', '')` in the "
        "same statement, and `pgherald.publish`. Tables truncated and CHECKPOINT before each "
        f"trial; kinds interleaved; median of {a.runs} run(s). "
        "synchronous_commit is left at the server default (see above), so every commit "
        "waits for its WAL flush. "
        f"**Consume**: a backlog of {a.backlog:,} events (`INSERT ... SELECT "
        "generate_series`, 100,000 per transaction, then VACUUM ANALYZE), consumed by one "
        f'`Consumer` (fresh group, start "beginning", batch_size={a.batch}, '
        f"max_batch_size={max_label(a)}: reads double while they come back full, so over the "
        "backlog they grow to max_batch_size) whose handler "
        "(or loop body) only counts (the consumer reads the next batch ahead while one is "
        'handled: "In ack" includes waiting for that read); wall time from `run()` / first '
        "`next()` to the last "
        f"event, capped at {a.cap:g} s per run (then events/s over what was consumed, marked "
        f"partial); {a.consume_runs} run(s) per style. "
        f"**Latency**: one publisher at {a.rate:,}/s (one event per autocommit transaction, "
        f"`time.time_ns()` in the payload just before the statement) for {a.lat_seconds:g} s, "
        "one consumer process (handler style, default options) records `time.time_ns() - ts`; "
        "first 5% dropped.",
        "",
        "### Publish throughput (transactions/s, one event per transaction)",
        "",
    ]
    rows = [["Writers", "Kind", "Median tx/s", "vs plain INSERT", "Median tx time (ms)", "Runs"]]
    ratios: dict[int, float | None] = {}
    for w in WRITERS:
        plain = med(writes[("plain", w)], "tps")
        for k in KINDS:
            rs = writes[(k, w)]
            v = med(rs, "tps")
            r = v / plain if v and plain else None
            if k == "publish":
                ratios[w] = r
            rows.append(
                [
                    str(w),
                    KIND_LABEL[k],
                    fx(v, "{:,.0f}"),
                    fx(r),
                    fx(med(rs, "tx_ms"), "{:.3f}"),
                    f"{sum(bool(x.get('ok')) for x in rs)}/{len(rs)} ("
                    + ", ".join(fx(x.get("tps"), "{:,.0f}") for x in rs)
                    + ")",
                ]
            )
    out += [table(rows), ""]

    out += ["### Consume throughput from a backlog", ""]
    out.append(f"Backlog of {a.backlog:,} events loaded in {load_s:.1f} s.")
    out.append("")
    rows = [
        [
            "Style",
            "batch_size",
            "max_batch_size",
            "Median events/s",
            "Consumer CPU (s)",
            "In fetch (s)",
            "In ack (s)",
            "Wall (s)",
            "Reads (largest)",
            "Runs",
        ]
    ]
    for style, rs in consumes.items():
        best = [r for r in rs if r.get("ok")]
        mid = sorted(best, key=lambda r: r["rate"])[len(best) // 2] if best else {}
        rows.append(
            [
                style,
                str(a.batch),
                max_label(a),
                fx(med(rs, "rate"), "{:,.0f}"),
                fx(mid.get("cpu_s"), "{:.2f}"),
                fx(mid.get("fetch_s"), "{:.2f}"),
                fx(mid.get("ack_s"), "{:.2f}"),
                fx(mid.get("wall"), "{:.2f}"),
                f"{fx(mid.get('fetches'), '{:,}')} ({fx(mid.get('max_read'), '{:,}')})",
                f"{len(best)}/{len(rs)} ("
                + ", ".join(fx(x.get("rate"), "{:,.0f}") for x in rs)
                + ")"
                + "".join(
                    f"; partial: {x['count']:,} of {a.backlog:,} in {x['wall']:.0f} s"
                    for x in rs
                    if x.get("partial")
                ),
            ]
        )
    out += [table(rows), ""]
    if sweep:
        rows = [
            [
                "batch_size (handler style, 1 run)",
                "max_batch_size",
                "events/s",
                "In fetch (s)",
                "Wall (s)",
                "Reads (largest)",
                "Events",
            ]
        ]
        for (b, mb), r in sweep.items():
            rows.append(
                [
                    str(b),
                    f"{mb} (fixed reads)" if mb == b else f"{mb or DEFAULT_MAX} (default)",
                    fx(r.get("rate"), "{:,.0f}"),
                    fx(r.get("fetch_s"), "{:.2f}"),
                    fx(r.get("wall"), "{:.2f}"),
                    f"{fx(r.get('fetches'), '{:,}')} ({fx(r.get('max_read'), '{:,}')})",
                    fx(r.get("count"), "{:,}") + (" (capped)" if r.get("partial") else ""),
                ]
            )
        out += [
            f"Read-size sweep, first {a.sweep_count:,} events of the backlog each (fixed "
            "reads: max_batch_size = batch_size, no growth):",
            "",
        ]
        out += [table(rows), ""]
    if explain:
        out += [
            f"One `read_batch` query (fresh group at the start of the backlog, all 16 "
            f"partitions, limit {a.batch}): {explain['rows']:,} rows returned, "
            f"{explain['scanned']:,} rows read by the 16 per-partition scans "
            f"({explain['heap_blocks']:,} heap blocks visited), "
            f"{explain['exec_ms']:.1f} ms server execution (EXPLAIN ANALYZE), "
            f"{explain['query_ms']:.1f} ms from the client including transfer.",
            "",
        ]

    out += ["### End-to-end latency (commit to handler)", ""]
    rows = [["Rate", "Events", "p50 (ms)", "p99 (ms)", "max (ms)", "Sender achieved"]]
    rows.append(
        [
            f"{a.rate:,}/s",
            fx(lat.get("count"), "{:,}"),
            fx(lat.get("p50_ms"), "{:.3f}"),
            fx(lat.get("p99_ms"), "{:.3f}"),
            fx(lat.get("max_ms"), "{:.3f}"),
            fx(lat.get("sender", {}).get("rate"), "{:,.0f}/s"),
        ]
    )
    out += [table(rows), ""]
    if lat.get("other_xact_max_s") is not None:
        out += [
            "Longest-running other transaction holding an xid on the cluster during the "
            f"latency run (sampled every 20 ms): {lat['other_xact_max_s'] * 1000:.0f} ms"
            + (f" ({lat.get('other_xact_where')})" if lat.get("other_xact_where") else "")
            + ".",
            "",
        ]

    p99 = lat.get("p99_ms") if lat.get("ok") else None
    targets = [["Target", "Measured", "Result"]]
    for w in WRITERS:
        v = ratios.get(w)
        targets.append(
            [
                f"publish >= 0.85x plain INSERT, {w} writer(s)",
                fx(v),
                verdict(v, bool(v and v >= 0.85)),
            ]
        )
    rates = {style: med(consumes.get(style, []), "rate") for style in STYLES}
    for style, rate in rates.items():
        targets.append(
            [
                f"Consumer drains a backlog at >= 200,000 events/s ({style})",
                fx(rate, "{:,.0f}/s"),
                verdict(rate, bool(rate and rate >= 200_000)),
            ]
        )
    targets.append(
        [
            f"commit-to-handler p99 < 20 ms at {a.rate:,}/s",
            fx(p99, "{:.3f} ms"),
            verdict(p99, bool(p99 is not None and p99 < 20)),
        ]
    )
    out += ["### Targets", "", table(targets)]
    nowake = {w: med(writes.get(("publish-nowake", w), []), "tps") for w in WRITERS}
    for w in WRITERS:
        v, plain = ratios.get(w), med(writes[("plain", w)], "tps")
        if v is not None and v < 0.85 and plain and nowake[w]:
            nv = nowake[w] / plain
            why = (
                "so the wake-up NOTIFY is the likely reason (with one writer the gate is always "
                "free: every transaction notifies, like the naive kind)."
                if nv >= 0.85
                else "so the NOTIFY is not the main cost: publish is one plain statement "
                "(INSERT ... RETURNING plus the gated NOTIFY), so what remains is the gate's "
                "server work (advisory-lock try, queue-usage check), the client's work per call "
                "(driver dispatch, a cursor, reading the id back) on a CPU-bound 2-core "
                "machine, or noise (see the spread of the runs)."
            )
            tps = [r["tps"] for k in ("plain", "publish") for r in writes[(k, w)] if r.get("ok")]
            spread = (max(tps) - min(tps)) / plain if tps else 0.0
            if spread > 1 - v:
                why += (
                    f" But the runs of plain INSERT and publish spread by {spread:.0%} of the "
                    f"plain median, more than the {1 - v:.0%} gap: not conclusive on this "
                    "loaded machine."
                )
            a.findings.append(
                f"publish at {w} writer(s) FAILS its target ({v:.2f}x). With its wake-up "
                f"NOTIFY switched off it reaches {nv:.2f}x, {why}"
            )
    for style, rate in rates.items():
        rs = [r for r in consumes.get(style, []) if r.get("ok")]
        if rate is not None and rate < 200_000 and rs and explain:
            share = statistics.median((r["fetch_s"] + r["ack_s"]) / r["wall"] for r in rs)
            a.findings.append(
                f"Consumer ({style}) FAILS its target ({rate:,.0f}/s): {share:.0%} of the wall "
                "time is in the engine's read and ack. The next read runs on the server while a "
                "batch is decoded and handled, and the ack waits for it: when ack time is "
                "large the server's read is the bottleneck (one read_batch query: "
                f"{explain['scanned']:,} rows read for {explain['rows']:,}, "
                f"{explain['exec_ms']:.0f} ms on the server), else the client's decoding."
            )
    notes = [
        f"- {k} x{w} run failed: {r.get('error')}"
        for (k, w), rs in writes.items()
        for r in rs
        if not r.get("ok")
    ]
    notes += [
        f"- consume ({s}) run failed: {r.get('error')}"
        for s, rs in consumes.items()
        for r in rs
        if not r.get("ok")
    ]
    if not lat.get("ok"):
        notes.append(f"- latency run failed: {lat.get('error')}")
    if p99 is not None and p99 >= 20:
        a.findings.append(
            f"Latency FAILS its target (p99 {p99:.1f} ms). "
            + (
                "The consumer only reads events older than the snapshot xmin of the whole "
                "cluster, so any other transaction holding an xid (in any database) delays "
                "delivery until it ends; the longest one seen during the run lasted "
                f"{lat['other_xact_max_s'] * 1000:.0f} ms."
                if (lat.get("other_xact_max_s") or 0) * 1000 >= p99 / 2
                else "No long other transaction was seen during the run, so the likely "
                "reason is CPU contention on the loaded 2-core machine (see the load "
                "average above)."
            )
        )
    if a.findings:
        notes += [f"- {f}" for f in a.findings]
    if notes:
        out += ["", "Notes:", "", *notes]
    return "\n".join(out)


def main() -> None:
    ap = _report.parser(
        __doc__,
        "1 run, 2 s trials, 100,000 backlog",
        "server to use (a database on it is only used to create the bench database)",
    )
    ap.add_argument("--batch", type=int, default=5000, help="Consumer batch_size (backlog)")
    ap.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="Consumer max_batch_size (backlog; default: the Consumer's default)",
    )
    ap.add_argument(
        "--runs", type=int, help="publish repetitions (default 3, 1 with --quick; median shown)"
    )
    ap.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated subset of {','.join(PARTS)} (partial runs print no report "
        "and cannot use --output)",
    )
    a = ap.parse_args()
    a.parts = [x.strip() for x in a.parts.split(",") if x.strip()]
    if unknown := set(a.parts) - set(PARTS):
        ap.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    partial = set(a.parts) != set(PARTS)
    if partial and a.output:
        ap.error("--output needs every part (the report section is written whole)")
    a.command = _report.command()
    if a.quick:
        runs, a.seconds, a.backlog, a.lat_seconds = 1, 2.0, 100_000, 2.0
    else:
        runs, a.seconds, a.backlog, a.lat_seconds = 3, 5.0, 1_000_000, 5.0
    a.runs = a.runs or runs
    a.rate = 1000
    # Consume runs are capped in time (events/s so far is reported, marked partial); 3 runs per
    # style, interleaved: single runs spread by +-15% on the shared 2-core machine.
    a.consume_runs, a.cap = (1, 60.0) if a.quick else (3, 90.0)
    a.sweep_count = min(a.backlog, 200_000)
    a.findings = []

    try:
        dsn = create_database(a.dsn)
        info = machine(dsn)
    except Exception as exc:
        sys.exit(f"cannot set up the bench database on {a.dsn!r}: {exc}")
    log(f"database {DBNAME} created and installed")

    writes: dict[tuple[str, int], list[Result]] = {(k, w): [] for k in KINDS for w in WRITERS}
    for run in range(a.runs if "publish" in a.parts else 0):
        for w in WRITERS:
            for k in KINDS:
                r = write_trial(dsn, k, w, a.seconds)
                writes[(k, w)].append(r)
                log(
                    f"publish run {run + 1} writers={w:2} {k:8} {r.get('tps', 0):>9,.0f} tx/s "
                    f"{r.get('error') or ''}"
                )

    load_s = 0.0
    explain: Result = {}
    consumes: dict[str, list[Result]] = {style: [] for style in STYLES}
    sweep: dict[tuple[int, int | None], Result] = {}
    if "consume" in a.parts:
        load_s = load_backlog(dsn, a.backlog)
        log(f"backlog of {a.backlog:,} loaded in {load_s:.1f} s")
        explain = explain_read(dsn, a.batch)
        log(f"read_batch: {explain}")
        g = 0
        for run in range(a.consume_runs):
            for style, worker_style in STYLES.items():
                g += 1
                r = consume_trial(
                    dsn,
                    worker_style,
                    f"g{g}",
                    a.backlog,
                    a.batch,
                    a.max_batch,
                    a.cap,
                )
                consumes[style].append(r)
                log(
                    f"consume run {run + 1} {style:14} {r.get('rate', 0):>9,.0f} ev/s "
                    f"(fetch {r.get('fetch_s', 0):.2f} s, ack {r.get('ack_s', 0):.2f} s, "
                    f"wall {r.get('wall', 0):.2f} s, {r.get('count', 0):,} events, "
                    f"{r.get('fetches', 0):,} reads, largest {r.get('max_read', 0):,}) "
                    f"{r.get('error') or ''}"
                )
        # (batch_size, max_batch_size): fixed sizes (max = batch: no growth), then growth.
        for b, mb in SWEEP:
            g += 1
            r = consume_trial(dsn, "handler", f"g{g}", a.sweep_count, b, mb, a.cap / 3)
            sweep[(b, mb)] = r
            log(
                f"sweep batch_size={b:6} max_batch_size={mb or 'default':>7} "
                f"{r.get('rate', 0):>9,.0f} ev/s ({r.get('fetches', 0):,} reads) "
                f"{r.get('error') or ''}"
            )

    lat: Result = {}
    if "latency" in a.parts:
        lat = latency_trial(dsn, a.rate, a.lat_seconds)
        log(
            f"latency p50 {lat.get('p50_ms', 0):.3f} ms p99 {lat.get('p99_ms', 0):.3f} ms "
            f"max {lat.get('max_ms', 0):.3f} ms {lat.get('error') or ''}"
        )
    if partial:
        log("partial run: no report")
        return

    info["Load average at end"] = _report.load_average()
    with psycopg.connect(dsn, autocommit=True) as conn:
        others = conn.execute(
            "SELECT count(DISTINCT datname) FROM pg_stat_activity "
            "WHERE datname IS NOT NULL AND datname <> current_database()"
        ).fetchone()[0]  # type: ignore[index]
    info["Other databases with sessions at end"] = str(others)
    if _report.overloaded():
        a.findings.append(
            "The machine was not idle: its load average exceeded its core count during the "
            "run (other work shares the cores and the PostgreSQL server), so expect wide "
            "spreads between runs; compare kinds within a run (the runs column) as well as "
            "medians."
        )
    body = report(a, info, writes, load_s, consumes, sweep, explain, lat)
    _report.publish(body, a.output, START, END)


if __name__ == "__main__":
    main()
