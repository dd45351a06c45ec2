"""Change data capture benchmark: what reading the WAL costs the writers, and how fast it reads.

Usage::

    python bench/cdc_bench.py [--quick] [--output docs/benchmarks.md]

Method.  A private PostgreSQL (the tests' ``tests/fix_server.py``: initdb in a temporary
directory, ``wal_level=logical``), set to the machine server's defaults for what matters here
(``fsync=on``, ``synchronous_commit=on``, ``shared_buffers=128MB``) and restarted; slots are
never made on the machine's own server.  Table ``bench_rows`` with 6 columns (``id bigint
identity primary key, account int, amount numeric(12,2), status text, note text, updated_at
timestamptz``).

1. Writer throughput: writer processes (1, then 4) run one-row autocommit INSERTs as fast as
   they can for a fixed time (4 s; 2 s with ``--quick``), all starting together, for each setup:
   no capture at all; CDC (a publication, a slot, and a `pgherald.ChangeStream` process reading
   it, whose count of changes is checked against the writes); pgherald's NOTIFY trigger with a
   `pgherald.Listener` process attached (count checked); the durable trigger (count checked).
   Setups interleaved; median tx/s of 3 runs (1 with ``--quick``).
2. Decode throughput: 100,000 rows written in 100 transactions while nobody reads the slot,
   then one `ChangeStream` (in this process) reads them all: changes per second from the
   first to the last change delivered (median of 3).
3. Commit-to-handler latency: a writer paced at 1,000 one-row transactions per second for 5 s
   (2 s with ``--quick``) while a `ChangeStream` process reads; for each change, the handler's
   wall clock minus the transaction's commit time (same machine, same clock): p50, p99, max.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _report  # bench/_report.py: shared by every benchmark

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
START, END = "<!-- cdc-bench:start -->", "<!-- cdc-bench:end -->"
TABLE = "bench_rows"
SETUPS = ["none", "cdc", "recvlogical", "notify", "durable"]
# "recvlogical": the slot read by PostgreSQL's own C client (pg_recvlogical, pgoutput, output to
# /dev/null): the floor any reader of the slot can reach; the rest of CDC's cost is the reader.
WRITERS = [1, 4]
CREATE = (
    f"CREATE TABLE {TABLE} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, account int, "
    "amount numeric(12,2), status text, note text, updated_at timestamptz)"
)
INSERT = (
    f"INSERT INTO {TABLE} (account, amount, status, note, updated_at) "
    "VALUES (%s, 12.50, 'open', 'a benchmark row', now())"
)


# -- worker processes --


def worker_write(dsn: str, seconds: float, start_at: float, rate: float) -> None:
    import psycopg

    n = 0
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SELECT 1")
        while time.time() < start_at:
            time.sleep(0.001)
        end = time.monotonic() + seconds
        t0 = time.monotonic()
        while (now := time.monotonic()) < end:
            if rate and n >= (now - t0) * rate:
                time.sleep(0.0002)
                continue
            c.execute(INSERT, (n,), prepare=True)
            n += 1
    print(json.dumps({"writes": n}), flush=True)


def worker_read(dsn: str, kind: str, expect_file: str, deadline: float) -> None:
    """Count (and time) changes until the count in *expect_file* is reached or the deadline."""
    import threading

    import pgherald

    count = 0
    lat: list[float] = []
    stream: Any
    if kind == "cdc":
        stream = pgherald.ChangeStream(dsn, slot="bench", status_interval=1.0)
    else:
        stream = pgherald.Listener(dsn, channels=[f"public.{TABLE}"])

    def watch() -> None:
        """Stop the reader once it has what the writers wrote (or at the deadline)."""
        stop_at = time.monotonic() + deadline
        want = None
        while time.monotonic() < stop_at:
            if want is None:
                text = Path(expect_file).read_text().strip() if os.path.exists(expect_file) else ""
                want = int(text) if text else None
            if want is not None and count >= want:
                break
            time.sleep(0.02)
        stream.stop()

    threading.Thread(target=watch, daemon=True).start()
    cpu0 = time.process_time()
    if kind == "cdc":
        print("ready", flush=True)
        clock = time.time
        for e in stream:
            lat.append(clock() - e.commit_time.timestamp())
            count += 1
    else:
        with stream:
            print("ready", flush=True)
            for _ in stream:
                count += 1
    cpu = time.process_time() - cpu0
    lat.sort()
    out: dict[str, Any] = {"count": count}
    if count:
        # A diagnostic (printed, not reported): the reader's CPU seconds per 10,000 changes.
        out["cpu_per_10k"] = round(cpu / count * 10_000, 3)
    if lat:
        out.update(
            p50=lat[len(lat) // 2] * 1000,
            p99=lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000,
            max=lat[-1] * 1000,
        )
    print(json.dumps(out), flush=True)


# -- orchestration --


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, *args],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])},
    )


def finish(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def reset(dsn: str, setup: str) -> None:
    import psycopg

    import pgherald

    with psycopg.connect(dsn, autocommit=True) as c:
        if c.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = 'bench'").fetchone():
            c.execute("SELECT pg_drop_replication_slot('bench')")
        c.execute("DROP PUBLICATION IF EXISTS bench")
        c.execute(f"DROP TABLE IF EXISTS {TABLE}")
        c.execute(CREATE)
        c.execute("TRUNCATE pgherald.events_v1")
        if setup in ("cdc", "recvlogical"):
            c.execute(f"CREATE PUBLICATION bench FOR TABLE {TABLE}")
            c.execute("SELECT pg_create_logical_replication_slot('bench', 'pgoutput')")
        elif setup in ("notify", "durable"):
            pgherald.add_table_trigger(c, TABLE, durable=setup == "durable")
        c.execute("CHECKPOINT")


def _cpu_seconds(pid: int) -> float | None:
    """A process's CPU seconds so far (user + system), from /proc (a Linux diagnostic)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def write_run(dsn: str, setup: str, writers: int, seconds: float, tmp: Path) -> dict[str, Any]:
    reset(dsn, setup)
    expect = tmp / "expect"
    expect.write_text("")
    reader = None
    if setup in ("cdc", "notify"):
        reader = spawn("--worker", "read", dsn, setup, str(expect), str(seconds + 60))
        assert reader.stdout is not None
        assert reader.stdout.readline().strip() == "ready"
    recv = None
    if setup == "recvlogical":
        from tests.fix_server import _bindir

        recv = subprocess.Popen(
            [
                str(_bindir() / "pg_recvlogical"),
                "-d",
                dsn,
                "--slot",
                "bench",
                "--start",
                "-o",
                "proto_version=1",
                "-o",
                "publication_names=bench",
                "-f",
                "/dev/null",
                "-F",
                "1",
                "-s",
                "1",
                "--no-loop",
            ]
        )
    start_at = time.time() + 0.5
    procs = [
        spawn("--worker", "write", dsn, str(seconds), str(start_at), "0") for _ in range(writers)
    ]
    writes = sum(finish(p, seconds + 30).get("writes", 0) for p in procs)
    ok = True
    if reader is not None:
        expect.write_text(str(writes))
        read = finish(reader, 60)
        got = read.get("count", 0)
        ok = got == writes
        if "cpu_per_10k" in read:
            return {"tps": writes / seconds, "ok": ok, "cpu_per_10k": read["cpu_per_10k"]}
    elif recv is not None:
        import psycopg

        with psycopg.connect(dsn, autocommit=True) as c:
            end = c.execute("SELECT pg_current_wal_insert_lsn()").fetchone()
            stop_at = time.monotonic() + 30
            ok = False
            while time.monotonic() < stop_at and not ok:
                row = c.execute(
                    "SELECT confirmed_flush_lsn >= %s FROM pg_replication_slots "
                    "WHERE slot_name = 'bench'",
                    end,
                ).fetchone()
                ok = bool(row and row[0])
                time.sleep(0.1)
        cpu = _cpu_seconds(recv.pid)
        recv.terminate()
        recv.wait(10)
        if cpu is not None and writes:
            return {"tps": writes / seconds, "ok": ok, "cpu_per_10k": round(cpu / writes * 1e4, 3)}
    elif setup == "durable":
        import psycopg

        with psycopg.connect(dsn) as c:
            row = c.execute("SELECT count(*) FROM pgherald.events_v1").fetchone()
        ok = row is not None and row[0] == writes
    return {"tps": writes / seconds, "ok": ok}


def decode_run(dsn: str, rows: int) -> float:
    import psycopg

    import pgherald

    reset(dsn, "cdc")
    with psycopg.connect(dsn, autocommit=True) as c:
        per = rows // 100
        for _ in range(100):
            c.execute(
                f"INSERT INTO {TABLE} (account, amount, status, note, updated_at) "
                "SELECT g, 12.50, 'open', 'a benchmark row', now() FROM generate_series(1, %s) g",
                (per,),
            )
    count = 0
    first = 0.0
    with pgherald.ChangeStream(dsn, slot="bench") as stream:
        for _ in stream:
            if count == 0:
                first = time.perf_counter()
            count += 1
            if count == rows:
                break
    return (rows - 1) / (time.perf_counter() - first)


def latency_run(dsn: str, seconds: float, tmp: Path) -> dict[str, Any]:
    reset(dsn, "cdc")
    expect = tmp / "expect"
    expect.write_text("")
    reader = spawn("--worker", "read", dsn, "cdc", str(expect), str(seconds + 60))
    assert reader.stdout is not None
    assert reader.stdout.readline().strip() == "ready"
    time.sleep(0.5)  # the reader's slot is streaming before the first write
    w = spawn("--worker", "write", dsn, str(seconds), str(time.time() + 0.2), "1000")
    writes = finish(w, seconds + 30).get("writes", 0)
    expect.write_text(str(writes))
    result = finish(reader, 60)
    result["writes"] = writes
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind = sys.argv[2]
        if kind == "write":
            worker_write(sys.argv[3], float(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6]))
        else:
            worker_read(sys.argv[3], sys.argv[4], sys.argv[5], float(sys.argv[6]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    reps = 1 if args.quick else 3
    seconds = 2.0 if args.quick else 4.0

    import psycopg
    from tests.fix_server import own_server

    import pgherald

    with own_server() as server:
        with psycopg.connect(server.dsn, autocommit=True) as c:
            c.execute("ALTER SYSTEM SET fsync = on")
            c.execute("ALTER SYSTEM SET synchronous_commit = on")
            c.execute("ALTER SYSTEM SET full_page_writes = on")
            c.execute("ALTER SYSTEM SET shared_buffers = '128MB'")
        server.restart()
        dsn = server.dsn
        with psycopg.connect(dsn, autocommit=True) as c:
            pgherald.install(c)
            version = c.execute("SHOW server_version").fetchone()
        tmp = server.dir
        results: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for rep in range(reps):
            for writers in WRITERS:
                for setup in SETUPS:
                    r = write_run(dsn, setup, writers, seconds, tmp)
                    results.setdefault((setup, writers), []).append(r)
                    print(f"run {rep + 1}: {setup:8} {writers} writer(s): {r}", flush=True)
        decode = []
        for _ in range(reps):
            decode.append(decode_run(dsn, 100_000))
            print(f"decode: {decode[-1]:,.0f} changes/s", flush=True)
        latency = latency_run(dsn, 2.0 if args.quick else 5.0, tmp)
        print(f"latency: {latency}", flush=True)

    def tps(setup: str, writers: int) -> float:
        return statistics.median(r["tps"] for r in results[(setup, writers)])

    def oks(setup: str, writers: int) -> str:
        runs = results[(setup, writers)]
        return f"{sum(r['ok'] for r in runs)}/{len(runs)}"

    rows = []
    for writers in WRITERS:
        base = tps("none", writers)
        cells = [f"{writers}", f"{base:,.0f}"]
        for setup in ("cdc", "recvlogical", "notify", "durable"):
            v = tps(setup, writers)
            cells += [f"{v:,.0f} ({v / base:.2f}x)", oks(setup, writers)]
        rows.append("| " + " | ".join(cells) + " |")
    dec = statistics.median(decode)
    cdc1 = tps("cdc", 1) / tps("none", 1)
    cdc4 = tps("cdc", 4) / tps("none", 4)
    p99 = float(latency.get("p99", float("nan")))

    BR = "  "  # a Markdown line break

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    body = f"""## Change data capture benchmark (`pgherald cdc`, `ChangeStream`)

Command: `python bench/cdc_bench.py{" --quick" if args.quick else ""}`{BR}
Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC

- CPU: {_report.cpu_model()}; cores: {os.cpu_count()}; load average at start: {" / ".join(f"{x:.2f}" for x in os.getloadavg())}
- PostgreSQL: {version[0] if version else "?"} (private server: wal_level=logical, fsync=on, synchronous_commit=on, shared_buffers=128MB)
- psycopg: {_report.version("psycopg")}; Python {sys.version.split()[0]}

Method: see the docstring of `bench/cdc_bench.py`. One-row autocommit INSERTs into a 6-column
table, {seconds:g} s per run, median of {reps} run(s), setups interleaved. Ratios are against
no capture at all in the same run (1.00x = the writers pay nothing). "Checked" = runs in which
the reader got exactly as many changes as were written. The `pg_recvlogical` column is a
diagnostic: the same slot read by PostgreSQL's own C client (output thrown away), the floor of
any reader of the slot; what CDC costs beyond it is the Python reader's CPU on a 2-core machine.

| Writers | No capture (tx/s) | CDC, `ChangeStream` (tx/s) | Checked | Slot read by `pg_recvlogical` (tx/s) | Caught up | Trigger, NOTIFY + listener (tx/s) | Checked | Trigger, durable (tx/s) | Checked |
|---------|-------------------|----------------------------|---------|--------------------------------------|-----------|-----------------------------------|---------|-------------------------|---------|
{chr(10).join(rows)}

Decode throughput (100,000 changes in 100 transactions, read by one `ChangeStream`): median
**{dec:,.0f} changes/s** (runs: {", ".join(f"{d:,.0f}" for d in decode)}).

Commit-to-handler latency at 1,000 changes/s ({latency.get("writes", 0):,} one-row transactions,
{latency.get("count", 0):,} delivered): p50 {latency.get("p50", float("nan")):.1f} ms, p99
**{p99:.1f} ms**, max {latency.get("max", float("nan")):.1f} ms.

| Target | Measured | Result |
|--------|----------|--------|
| CDC writer throughput, 1 writer >= 0.95x | {cdc1:.2f}x | {verdict(cdc1 >= 0.95)} |
| CDC writer throughput, 4 writers >= 0.95x | {cdc4:.2f}x | {verdict(cdc4 >= 0.95)} |
| Decode throughput >= 50,000 changes/s | {dec:,.0f} | {verdict(dec >= 50_000)} |
| Commit-to-handler p99 at 1,000/s < 20 ms | {p99:.1f} ms | {verdict(p99 < 20)} |
"""
    print(body)
    if args.output is not None:
        _report.write_section(args.output, START, END, body)


if __name__ == "__main__":
    main()
