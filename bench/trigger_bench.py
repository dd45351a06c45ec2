"""Table-change trigger benchmark: write throughput with and without pgherald's triggers.

Usage::

    python bench/trigger_bench.py [--dsn DSN] [--quick] [--output docs/benchmarks.md]

Method.  ``--dsn`` names an admin connection; the benchmark drops and recreates the database
``pgherald_trigger_bench`` on that server and runs ``pgherald.install`` in it.  The table has
6 columns (``id bigint identity primary key, account int, amount numeric(12,2), status text,
note text, updated_at timestamptz``).  Writer processes (this script with ``--worker write``)
each hold one autocommit connection and run one-row transactions as fast as they can for a
fixed time (5 s; 2 s with ``--quick``), all starting at the same wall-clock instant:

* INSERT: ``INSERT INTO bench_rows (account, amount, status, note, updated_at) VALUES (...)``;
* UPDATE: ``UPDATE bench_rows SET amount = amount + 1, updated_at = now() WHERE id = $1``,
  each writer cycling over 100 rows of its own (no row-lock waits between writers).

Each is measured with 1 and with 4 concurrent writers, for three setups: no trigger; the
pgherald trigger (NOTIFY, all columns, default channel) with a `pgherald.Listener` process
attached that decodes every event (its count is checked against the writes, so notifications
are really delivered); and the trigger with ``durable=True`` (events go to
``pgherald.events_v1``, keyed by the primary key ``id``; their count is checked too; no
consumer runs).  Before every run the
table and the event log are emptied and re-seeded (400 rows), vacuumed and checkpointed.
Setups are interleaved within each repetition; the reported figure is the median tx/s over 3
runs (1 with ``--quick``), and the cost ratio is plain tx/s / with-trigger tx/s.

Then the trigger's own cost without WAL-flush noise: 5,000 one-row transactions of each write,
looped inside the server by a ``DO`` block that commits after each row, with
``synchronous_commit=off`` and no listener; µs per transaction with and without each trigger,
median of 5 runs (1 with ``--quick``).

Every process has a deadline; the orchestrator kills any process it started that overstays.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _report  # bench/_report.py: shared by every benchmark

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
START, END = "<!-- trigger-bench:start -->", "<!-- trigger-bench:end -->"
DBNAME = "pgherald_trigger_bench"
TABLE = "bench_rows"
CHANNEL = f"public.{TABLE}"
ROWS_PER_WRITER = 100
MAX_WRITERS = 4
MODES = ["plain", "notify", "durable"]
# Diagnostics, no trigger: each write statement also sends a bare pg_notify of an event-sized
# payload (listener attached), or calls publish_v1 with it, in the same transaction. They are
# the floor any trigger that must deliver the event that way can reach.
FLOORS = ["notify-floor", "durable-floor"]
LISTENED = ("notify", "notify-floor")
OPS = ["insert", "update"]
APP_NAME = "pgherald-bench-writer"
SAMPLE_EVERY = 0.05  # seconds between pg_stat_activity samples of the writers
WRITERS = [1, 4]
TARGETS = {"notify": 1.3, "durable": 1.6}
Result = dict[str, Any]


def _import_pgherald() -> Any:
    try:
        import pgherald
    except ImportError:
        sys.path.insert(0, str(SRC))
        import pgherald
    return pgherald


# -- workers (this script, re-invoked) --


def sample_event(op: str, slot: int) -> str:
    """An event like the trigger's for this writer's rows (for the floor's bare NOTIFY)."""
    row = {"id": slot * ROWS_PER_WRITER + 1, "note": f"writer {slot} " + "x" * 40}
    row |= {"amount": 1.5, "status": "new", "account": 1}
    row["updated_at"] = "2026-11-25T08:00:00.123456+00:00"
    event = {"op": op.upper(), "ts": row["updated_at"], "tx": "123456"}
    event |= {"new": row, "old": dict(row, amount=0.5) if op == "update" else None}
    event |= {"table": TABLE, "schema": "public"}
    event["changed"] = ["amount", "updated_at"] if op == "update" else None
    return json.dumps(event)


def write_query(op: str, mode: str) -> str:
    if op == "insert":
        write = (
            f"INSERT INTO {TABLE} (account, amount, status, note, updated_at) "
            "VALUES (%s, %s, %s, %s, now())"
        )
    else:
        write = f"UPDATE {TABLE} SET amount = amount + 1, updated_at = now() WHERE id = %s"
    if mode == "notify-floor":  # one statement: the write and a NOTIFY, as a trigger would
        return f"WITH w AS ({write} RETURNING 1) SELECT pg_notify(%s, %s) FROM w"
    if mode == "durable-floor":
        return f"WITH w AS ({write} RETURNING 1) SELECT pgherald.publish_v1(%s, %s::jsonb) FROM w"
    return write


def worker_write(dsn: str, op: str, mode: str, slot: int, start: float, seconds: float) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True, application_name=APP_NAME) as conn:
        query = write_query(op, mode)
        extra: tuple[str, ...] = (CHANNEL, sample_event(op, slot)) if mode in FLOORS else ()
        base = slot * ROWS_PER_WRITER + 1
        warm = (1, 1.5, "new", "warm-up") if op == "insert" else (base,)
        conn.execute(query, warm + extra)
        late = time.time() > start
        while time.time() < start:
            time.sleep(min(0.01, max(0.0, start - time.time())))  # wait for the common start
        count = 0
        t0 = time.perf_counter()
        end = t0 + seconds
        if op == "insert":
            note = f"writer {slot} " + "x" * 40
            while time.perf_counter() < end:
                conn.execute(query, (count % 1000, count * 0.01, "new", note, *extra), prepare=True)
                count += 1
        else:
            while time.perf_counter() < end:
                conn.execute(query, (base + count % ROWS_PER_WRITER, *extra), prepare=True)
                count += 1
        elapsed = time.perf_counter() - t0
    print(json.dumps({"count": count, "elapsed": elapsed, "late": late}), flush=True)


def worker_listen(dsn: str, channel: str, timeout: float) -> None:
    pgherald = _import_pgherald()
    count = 0
    with pgherald.Listener(dsn, channels=[channel]) as listener:
        for n in listener.notifications(timeout=timeout):
            if n.payload == "PING":
                print("PONG", flush=True)
            elif n.payload == "STOP":
                break
            else:
                n.json()
                count += 1
    print(json.dumps({"received": count}), flush=True)


# -- orchestration --


def bench_dsn(admin_dsn: str) -> str:
    from psycopg.conninfo import make_conninfo

    return make_conninfo(admin_dsn, dbname=DBNAME)


def fresh_database(admin_dsn: str) -> str:
    import psycopg
    from psycopg import sql

    pgherald = _import_pgherald()
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        name = sql.Identifier(DBNAME)
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(name))
    dsn = bench_dsn(admin_dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        pgherald.install(conn)
        conn.execute(
            f"CREATE TABLE {TABLE} (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, "
            "account int NOT NULL, amount numeric(12,2) NOT NULL, status text NOT NULL, "
            "note text, updated_at timestamptz NOT NULL)"
        )
    return dsn


def prepare(dsn: str, mode: str) -> None:
    import psycopg

    pgherald = _import_pgherald()
    with psycopg.connect(dsn, autocommit=True) as conn:
        pgherald.remove_table_trigger(conn, TABLE)
        conn.execute(f"TRUNCATE {TABLE} RESTART IDENTITY")
        conn.execute("TRUNCATE pgherald.events_v1")
        conn.execute(
            f"INSERT INTO {TABLE} (account, amount, status, note, updated_at) "
            "SELECT g, 0, 'seed', 'seed row', now() FROM generate_series(1, %s) g",
            (ROWS_PER_WRITER * MAX_WRITERS,),
        )
        conn.execute(f"VACUUM ANALYZE {TABLE}")
        conn.execute("VACUUM ANALYZE pgherald.events_v1")
        conn.execute("CHECKPOINT")
        if mode in ("notify", "durable"):
            pgherald.add_table_trigger(conn, TABLE, durable=mode == "durable")


SERVER_TX = 5000  # one-row transactions per server-side loop


def server_cost(dsn: str, op: str, mode: str) -> float:
    """
    µs per one-row transaction of *op* under *mode*, looped inside the server.

    A ``DO`` block commits after every row (so PL/pgSQL sets the trigger's expressions up
    again each time, as for a client's one-row transactions) with ``synchronous_commit=off``:
    no client round trip and no WAL flush wait, so what is left is CPU, and the difference to
    no trigger is the trigger's own cost. No listener is attached.
    """
    import psycopg

    write = (
        f"INSERT INTO {TABLE} (account, amount, status, note, updated_at) "
        "VALUES (i, i, 'new', 'note ' || i, now())"
        if op == "insert"
        else f"UPDATE {TABLE} SET amount = amount + 1, updated_at = now() WHERE id = 1 + i % 400"
    )
    prepare(dsn, mode)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = off")
        t0 = time.perf_counter()
        conn.execute(f"DO $$ BEGIN FOR i IN 1..{SERVER_TX} LOOP {write}; COMMIT; END LOOP; END $$")
        return (time.perf_counter() - t0) / SERVER_TX * 1e6


def _kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()  # only a process this script started
    proc.wait()


def start_listener(dsn: str, env: dict[str, str]) -> subprocess.Popen[str]:
    import psycopg

    args = [sys.executable, __file__, "--worker", "listen", "--dsn", dsn, "--channel", CHANNEL]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:  # ping until the listener answers: it is LISTENing
            conn.execute("SELECT pg_notify(%s, 'PING')", (CHANNEL,))
            import select

            ready, _, _ = select.select([proc.stdout], [], [], 0.2)
            if ready and proc.stdout.readline().strip() == "PONG":
                return proc
            if proc.poll() is not None:
                break
    _kill(proc)
    raise RuntimeError("the listener process did not start")


def stop_listener(dsn: str, proc: subprocess.Popen[str], timeout: float) -> int | None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_notify(%s, 'STOP')", (CHANNEL,))
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        return None
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    return int(json.loads(lines[-1])["received"]) if lines else None


# What a writer's backend is doing, from pg_stat_activity: the notify lock is the heavyweight
# lock "object" (async.c's PreCommit_Notify locks "database 0" until the transaction ends).
WAITS = {
    "Lock:object": "notify lock",
    "IO:WALSync": "WAL flush",
    "LWLock:WALWrite": "WAL flush",
    "Client:ClientRead": "client",
    None: "CPU",
}


class WaitSampler(threading.Thread):
    """Counts the writers' wait events between *start* and *end* (wall clock)."""

    def __init__(self, dsn: str, start: float, end: float) -> None:
        super().__init__(daemon=True)
        self.dsn, self.start_at, self.end_at = dsn, start, end
        self.counts: dict[str, int] = {}

    def run(self) -> None:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while (now := time.time()) < self.end_at:
                if now >= self.start_at:
                    for event, n in conn.execute(
                        "SELECT wait_event_type || ':' || wait_event, count(*) "
                        "FROM pg_stat_activity WHERE application_name = %s "
                        "AND datname = current_database() GROUP BY 1",
                        (APP_NAME,),
                    ):
                        kind = WAITS.get(event, "other")
                        self.counts[kind] = self.counts.get(kind, 0) + n
                time.sleep(SAMPLE_EVERY)


def trial(
    dsn: str, env: dict[str, str], mode: str, op: str, writers: int, seconds: float
) -> Result:
    import psycopg

    prepare(dsn, mode)
    listener = start_listener(dsn, env) if mode in LISTENED else None
    procs: list[subprocess.Popen[str]] = []
    try:
        start = time.time() + 1.5 + 0.3 * writers
        sampler = WaitSampler(dsn, start + 0.2, start + seconds - 0.2)
        sampler.start()
        for slot in range(writers):
            args = [sys.executable, __file__, "--worker", "write", "--dsn", dsn, "--op", op]
            args += ["--mode", mode, "--slot", str(slot), "--start", repr(start)]
            args += ["--seconds", str(seconds)]
            procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, text=True))
        results = []
        for proc in procs:
            out, _ = proc.communicate(timeout=seconds + 60)
            if proc.returncode or not out.strip():
                return {"ok": False, "error": f"writer exited {proc.returncode}"}
            results.append(json.loads(out.strip().splitlines()[-1]))
        sampler.join(timeout=10)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": "a writer overstayed its deadline"}
    finally:
        for proc in procs:
            _kill(proc)
        if listener is not None and listener.poll() is not None:
            listener = None
    writes = sum(r["count"] for r in results)
    res: Result = {
        "ok": True,
        "writes": writes,
        "tps": sum(r["count"] / r["elapsed"] for r in results),
        "late": any(r["late"] for r in results),
        "waits": sampler.counts,
    }
    warmup = writers  # each writer's warm-up statement is a change too
    if listener is not None:
        received = stop_listener(dsn, listener, timeout=120)
        res["delivered"] = received
        if received != writes + warmup:
            res |= {"ok": False, "error": f"listener got {received} of {writes + warmup}"}
    if mode in ("durable", "durable-floor"):
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM pgherald.events_v1").fetchone()
        stored = int(row[0]) if row else 0
        res["stored"] = stored
        if stored != writes + warmup:
            res |= {"ok": False, "error": f"{stored} events stored for {writes + warmup} writes"}
    return res


def machine(dsn: str) -> dict[str, str]:
    pgherald = _import_pgherald()
    return _report.machine(
        dsn,
        settings=("synchronous_commit", "fsync", "shared_buffers"),
        extra={"pgherald": f"{pgherald.__version__} ({Path(pgherald.__file__).parent})"},
    )


table = _report.table


def miss_notes(
    failed: dict[str, list[tuple[str, int]]],
    ratio: Callable[[str, int, str], float | None],
    waits: Callable[[str, str, int], dict[str, float]],
) -> list[str]:
    """Why each missed target was missed, from this run's own diagnostic setups."""
    notes = []
    for mode, floor in (("notify", "notify-floor"), ("durable", "durable-floor")):
        for op, w in failed.get(mode, []):
            cost, base = ratio(op, w, mode), ratio(op, w, floor)
            lock = waits(op, mode, w).get("notify lock", 0)
            what = "a bare pg_notify" if mode == "notify" else "a publish_v1 call"
            text = f"{mode} {op.upper()} x{w} missed ({cost:.2f}x)" if cost else f"{mode} failed"
            if cost and base:
                text += (
                    f": the write plus {what} in the same transaction, no trigger at all, "
                    f"already costs {base:.2f}x; the trigger's own work is the remaining "
                    f"{cost / base:.2f}x"
                )
                if base > TARGETS[mode]:
                    text += f" (in this run the floor alone is over the {TARGETS[mode]}x target)"
            if lock >= 5:
                text += (
                    f"; its writers spent {lock:.0f}% of the samples waiting for the notify "
                    "lock, which each notifying transaction holds through its commit's WAL "
                    "flush, so those commits run one at a time (no group commit)"
                )
            notes.append(text + ".")
    return notes


def report(
    a: argparse.Namespace,
    info: dict[str, str],
    res: dict[tuple[str, str, int], list[Result]],
    server: dict[tuple[str, str], list[float]],
) -> str:
    def median(key: tuple[str, str, int]) -> float | None:
        ok = [r["tps"] for r in res.get(key, []) if r.get("ok")]
        return statistics.median(ok) if ok else None

    def ratio(op: str, w: int, mode: str) -> float | None:
        plain, other = median((op, "plain", w)), median((op, mode, w))
        return plain / other if plain and other else None

    def n(v: float | None) -> str:
        return f"{v:,.0f}" if v is not None else "fail"

    def x(v: float | None) -> str:
        return f"{v:.2f}x" if v is not None else "-"

    def waits(op: str, mode: str, w: int) -> dict[str, float]:
        total: dict[str, int] = {}
        for r in res.get((op, mode, w), []):
            for kind, count in r.get("waits", {}).items() if r.get("ok") else ():
                total[kind] = total.get(kind, 0) + count
        all_ = sum(total.values())
        return {k: 100 * v / all_ for k, v in total.items()} if all_ else {}

    def pct(op: str, mode: str, w: int, kind: str) -> str:
        share = waits(op, mode, w)
        return f"{share.get(kind, 0):.0f}%" if share else "-"

    runs = a.runs
    ops, writers = a.ops, [int(w) for w in a.writers]
    rows = [
        [
            "Write",
            "Writers",
            "No trigger (tx/s)",
            "Trigger, NOTIFY (tx/s)",
            "Cost",
            "Trigger, durable (tx/s)",
            "Cost",
            "Runs ok",
        ]
    ]
    for op in ops:
        for w in writers:
            ok = sum(r.get("ok", False) for m in MODES for r in res.get((op, m, w), []))
            rows.append(
                [
                    op.upper(),
                    str(w),
                    n(median((op, "plain", w))),
                    n(median((op, "notify", w))),
                    x(ratio(op, w, "notify")),
                    n(median((op, "durable", w))),
                    x(ratio(op, w, "durable")),
                    f"{ok}/{runs * len(MODES)}",
                ]
            )
    targets = [["Target", "Measured", "Result"]]
    failed: dict[str, list[tuple[str, int]]] = {}
    for mode, limit in TARGETS.items():
        for op in ops:
            for w in writers:
                r = ratio(op, w, mode)
                passed = r is not None and r <= limit
                kind = "durable" if mode == "durable" else "NOTIFY"
                name = f"{kind} trigger cost, {op.upper()}, {w} writer{'s' if w > 1 else ''}"
                targets.append([f"{name} <= {limit}x", x(r), "PASS" if passed else "FAIL"])
                if not passed:
                    failed.setdefault(mode, []).append((op, w))
    kinds = ["notify lock", "WAL flush", "CPU", "client", "other"]
    diag = [["Write", "Writers", "Setup", "tx/s", "Cost", *(f"{k} %" for k in kinds)]]
    labels = {
        "plain": "no trigger",
        "notify": "trigger, NOTIFY",
        "notify-floor": "no trigger + bare pg_notify",
        "durable": "trigger, durable",
        "durable-floor": "no trigger + publish_v1",
    }
    for op in ops:
        for w in writers:
            for mode in ["plain", "notify", "notify-floor", "durable", "durable-floor"]:
                if (op, mode, w) in res:
                    diag.append(
                        [op.upper(), str(w), labels[mode], n(median((op, mode, w)))]
                        + [x(ratio(op, w, mode))]
                        + [pct(op, mode, w, k) for k in kinds]
                    )
    lines = [
        "## Table-change trigger benchmark",
        "",
        f"Command: `{a.command}`  ",
        f"Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        *(f"- {k}: {v}" for k, v in info.items()),
        "",
        f"Method: a fresh database (`{DBNAME}`, dropped, recreated, `pgherald.install`ed); table "
        f"`{TABLE}` with 6 columns (`id bigint identity primary key, account int, amount "
        "numeric(12,2), status text, note text, updated_at timestamptz`). Each writer process "
        "runs one-row autocommit transactions as fast as it can on its own connection for "
        f"{a.seconds:g} s, all writers starting together: INSERT of a new row, or UPDATE of "
        "`amount` and `updated_at` of one of its own 100 rows (no row-lock waits). Setups: no "
        "trigger; `pgherald trigger add` (NOTIFY, all columns, with a `pgherald.Listener` "
        "process attached that decodes every event; its count is checked against the writes); "
        "`--durable` (events stored in `pgherald.events_v1`, keyed by `id`, count checked; no "
        "consumer). The "
        "table and the log are emptied, re-seeded, vacuumed and checkpointed before each run; "
        f"setups are interleaved; figures are the median of {runs} run(s). Cost = no-trigger "
        "tx/s / with-trigger tx/s (1.00x = free).",
        "",
        table(rows),
        "",
        "Targets:",
        "",
        table(targets),
        "",
        "Diagnostics: the same runs, plus two setups without any trigger whose write statement "
        "also calls, in the same transaction, a bare `pg_notify` of an event-sized payload "
        "(listener attached, count checked), or `pgherald.publish_v1` with it (count checked). "
        "They are the floor for a trigger that must deliver the event that way. The % columns "
        "are what the writers' server processes were doing, sampled from `pg_stat_activity` "
        f"every {SAMPLE_EVERY * 1000:.0f} ms: waiting for the notify lock (`Lock:object`: "
        "PostgreSQL's PreCommit_Notify locks object 0 of database 0, cluster-wide, to keep the "
        "queue in commit order, and holds it until the transaction ends, after its commit "
        "record is flushed), for a WAL flush (`IO:WALSync`, `LWLock:WALWrite`), running (CPU), "
        "waiting "
        "for the client's next statement (`Client:ClientRead`), or other.",
        "",
        table(diag),
    ]
    if server:
        reps = max(len(v) for v in server.values())
        cost = [["Write", "No trigger (µs/tx)", "NOTIFY trigger (µs/tx)", "Its own cost (µs)"]]
        cost[0] += ["Durable trigger (µs/tx)", "Its own cost (µs)"]
        for op in OPS:
            med = {m: statistics.median(server[op, m]) for m in MODES if (op, m) in server}
            if "plain" not in med:
                continue
            row = [op.upper(), f"{med['plain']:.1f}"]
            for m in ("notify", "durable"):
                row += [f"{med[m]:.1f}", f"{med[m] - med['plain']:.1f}"] if m in med else ["-", "-"]
            cost.append(row)
        lines += [
            "",
            "The trigger's own cost, without the noise of WAL flushes: "
            f"{SERVER_TX:,} one-row transactions looped inside the server (a `DO` block that "
            "commits after each row, `synchronous_commit=off`, no listener attached), "
            f"median of {reps} run(s). This is CPU time per transaction; the difference to no "
            "trigger is what the trigger itself costs.",
            "",
            table(cost),
        ]
    notes = [*miss_notes(failed, ratio, waits)]
    spreads = {
        key: max(ok) / min(ok)
        for key, rs in res.items()
        if len(ok := [r["tps"] for r in rs if r.get("ok")]) > 1 and min(ok) > 0
    }
    if spreads:
        worst = max(spreads, key=lambda k: spreads[k])
        notes.append(
            f"Noise: the same setup varied by up to {spreads[worst]:.1f}x between runs "
            f"({worst[0].upper()} {worst[1]} x{worst[2]}); one-row transactions with "
            "synchronous_commit=on are bound by WAL flushes, which other work on this machine "
            "(see the load average) disturbs. Ratios closer to 1 than that spread are within "
            "noise; the per-run figures are below."
        )
        notes.append(
            "Per-run tx/s: "
            + "; ".join(
                f"{op.upper()} x{w} {mode}: "
                + " / ".join(
                    f"{r['tps']:,.0f}" if r.get("ok") else "fail" for r in res[op, mode, w]
                )
                for op in OPS
                for w in WRITERS
                for mode in MODES + FLOORS
                if (op, mode, w) in res
            )
            + "."
        )
    bad = [
        f"{op} {mode} x{w} run {i + 1}: {r.get('error')}"
        for (op, mode, w), rs in sorted(res.items())
        for i, r in enumerate(rs)
        if not r.get("ok")
    ]
    if any(r.get("late") for rs in res.values() for r in rs):
        notes.append("Some writer connected after the common start (its time is still its own).")
    if bad:
        notes.append("Failed runs: " + "; ".join(bad))
    return "\n".join(lines + (["", *(f"- {note}" for note in notes)] if notes else []))


def _choices(allowed: list[str]) -> Any:
    def parse(text: str) -> list[str]:
        chosen = [c.strip() for c in text.split(",") if c.strip()]
        if not chosen or set(chosen) - set(allowed):
            raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)}")
        return chosen

    return parse


def main() -> None:
    ap = _report.parser(
        __doc__, "1 run of 2 s per setup", "admin DSN; the benchmark database is created next to it"
    )
    ap.add_argument("--runs", type=int, help="repetitions (default 3, 1 with --quick)")
    ap.add_argument("--ops", type=_choices(OPS), default=OPS, help="e.g. update (default: all)")
    ap.add_argument("--writers", type=_choices(["1", "4"]), default=["1", "4"], help="e.g. 4")
    ap.add_argument(
        "--modes",
        type=_choices(MODES + FLOORS),
        default=MODES + FLOORS,
        help=f"some of {','.join(MODES + FLOORS)} (default: all)",
    )
    ap.add_argument(
        "--server-only", action="store_true", help="only the in-server cost loop, no writers"
    )
    ap.add_argument("--worker", choices=["write", "listen"], help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=MODES + FLOORS, help=argparse.SUPPRESS)
    ap.add_argument("--op", choices=OPS, help=argparse.SUPPRESS)
    ap.add_argument("--slot", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--start", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, help="per run (default 5, 2 with --quick)")
    ap.add_argument("--channel", default=CHANNEL, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker == "write":
        worker_write(a.dsn, a.op, a.mode, a.slot, a.start, a.seconds)
        return
    if a.worker == "listen":
        worker_listen(a.dsn, a.channel, timeout=300.0)
        return

    a.command = _report.command()
    a.runs = a.runs or (1 if a.quick else 3)
    a.seconds = a.seconds or (2.0 if a.quick else 5.0)
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", str(SRC))
    try:
        dsn = fresh_database(a.dsn)
        info = machine(dsn)
    except Exception as exc:
        sys.exit(f"cannot prepare the benchmark database at {a.dsn!r}: {exc}")

    res: dict[tuple[str, str, int], list[Result]] = {}
    for run in range(0 if a.server_only else a.runs):
        for w in map(int, a.writers):
            for op in a.ops:
                for mode in a.modes:
                    r = trial(dsn, env, mode, op, w, a.seconds)
                    res.setdefault((op, mode, w), []).append(r)
                    print(
                        f"run {run + 1} {op:6} writers={w} {mode:8} {r.get('tps', 0):>9,.0f} tx/s "
                        f"{r.get('error', '')}",
                        flush=True,
                    )
    server: dict[tuple[str, str], list[float]] = {}
    for _ in range(a.runs if a.quick else max(a.runs, 5)):
        for op in a.ops:
            for mode in [m for m in MODES if m == "plain" or m in a.modes]:
                server.setdefault((op, mode), []).append(server_cost(dsn, op, mode))
    print(
        "server-side µs/tx: "
        + ", ".join(f"{op} {m} {statistics.median(v):.1f}" for (op, m), v in server.items()),
        flush=True,
    )
    body = report(a, info, res, server)
    _report.publish(body, a.output, START, END)


if __name__ == "__main__":
    main()
