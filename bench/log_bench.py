"""Durable log, second edition: publish cost at the SQL level (pgbench) against what a user
writes by hand, a quiet channel's read among a million others, backlog drain at 100 channels,
retention by dropping a day, and publish-to-handler latency against the seeds' LISTEN loop.

Usage::

    python bench/log_bench.py [--dsn DSN] [--quick] [--output docs/benchmarks.md]
    python bench/log_bench.py --parts publish,latency          # partial run, no report

Method.  The run creates a fresh database (``pgherald_bench_log``, dropped and recreated on
the server of ``--dsn``), installs pgherald (``pgherald.install``, then ``pgherald.maintain``
so today's day partition of the log exists) and a minimal table ``bench_minimal`` (id
identity primary key, channel, payload jsonb, created_at): what a user writes by hand.
Clients are their own processes (``pgbench``, ``bench/log_workers.py``); measurements run
one after another.

1. Publish, SQL level: ``pgbench -n -M prepared -T S -c W -j W -f script`` (S = 5 s, 2 s with
   ``--quick``) at W = 1, 4 and 16 writers, one ~100-byte event per transaction, literal
   values: (a) INSERT into the minimal table; (b) the seeds' INSERT + ``pg_notify`` (seed
   001), one statement; (c) the floor: a plain INSERT of the log's row into
   ``pgherald.events_v1``; (d) ``SELECT pgherald.publish_v1(...)``; (e) the statement
   ``pgherald.publish`` sends (queries.sql ``publish``). No consumer runs; then (d) and (e)
   again with one idle consumer waiting (a session holding the shared wake lock and
   LISTENing, as a waiting Consumer does). Tables truncated and CHECKPOINT before every trial;
   kinds interleaved; medians of 3 runs (1 with ``--quick``). Then, paired: (c), (e) and
   (f) (the floor as ``WITH ... RETURNING id``) mixed 1:1:1 in one pgbench run of 2 S per
   writer count, the ratio of their mean latencies (a disturbance slows all three alike).
2. Quiet channel: 3 events on channel ``quiet`` among the loaded log (1,000,000 events on 100
   channels ``c0``..``c99`` plus 200,000 on ``hot``; a tenth with ``--quick``): time from a
   fresh ``Consumer(group, channels=["quiet"])`` to its 3 events; EXPLAIN ANALYZE of its
   first ``read_batch``; ``pgherald.list_groups`` time and the lag it shows for a group at
   the start of ``quiet``.
3. Drain: a fresh Consumer (default options, handler style) of ``hot`` drains its 200,000
   against the keyset floor (a plain psycopg loop over ``WHERE channel = %s AND (tx, id) >
   (%s, %s) ORDER BY tx, id LIMIT 5000``, payloads decoded); then a Consumer of every channel
   drains the whole log. Interleaved, medians of 3 runs (1 with ``--quick``).
4. Retention: 10,000,000 events (1,000,000 with ``--quick``) in the day partition 40 days
   old (made by ``maintain(now=now - 40 days)``, filled by ``INSERT ... SELECT
   generate_series`` in chunks of 1,000,000), CHECKPOINT, ``set_retention(30 days)``, then
   ``maintain`` timed; the log's and the database's size before and after. The floor: such a
   day dropped by a hand-written ``DROP TABLE``. Twice each, interleaved (once with
   ``--quick``), a day loaded for each drop; a publisher runs during each drop (its longest
   publish: how long the drop keeps the log from publishers).
5. Latency: 1,000 events/s for 5 s (2 s with ``--quick``), one per autocommit transaction,
   ``time.time_ns()`` in the payload: ``pgherald.publish`` to a default Consumer's handler,
   against the seeds' INSERT + ``pg_notify`` (payload in the NOTIFY) to a psycopg 3 LISTEN
   loop. First 5% dropped; interleaved, medians of 3 runs (1 with ``--quick``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import re
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

import pgherald._protocol.consumer as _consumer_engine

HERE = Path(__file__).resolve().parent
WORKERS = str(HERE / "log_workers.py")
START, END = "<!-- log-bench:start -->", "<!-- log-bench:end -->"
DBNAME = "pgherald_bench_log"
PGBENCH = "/usr/bin/pgbench"
PARTS = ["publish", "read", "retention", "latency"]
WRITERS = [1, 4, 16]
Result = dict[str, Any]

CONSUMER_SETTINGS = _consumer_engine._SETTINGS  # a Consumer's session settings (planner)

MINIMAL_DDL = """
DROP TABLE IF EXISTS bench_minimal;
CREATE TABLE bench_minimal (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    channel text NOT NULL,
    payload jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
"""
# ~100 bytes, as the other benches' events.
PAYLOAD = json.dumps(
    {"i": 123456, "kind": "order.created", "ts": 1765000000000000000, "pad": "x" * 60},
    separators=(",", ":"),
)
# kind -> (label, waiting consumer?)
KINDS: dict[str, tuple[str, bool]] = {
    "minimal": ("(a) INSERT, minimal table", False),
    "seed": ("(b) seeds' INSERT + pg_notify, minimal table", False),
    "floor": ("(c) floor: INSERT of the log's row", False),
    "publish_v1": ("(d) SELECT pgherald.publish_v1(...)", False),
    "publish": ("(e) pgherald.publish's statement", False),
    # Diagnostic: (c) as publish writes it (a CTE returning the id), without the wake-up probe.
    "floor-returning": ("(f) diagnostic: (c) as WITH ... RETURNING id, no probe", False),
    "publish_v1-wait": ("(d) publish_v1, one consumer waiting", True),
    "publish-wait": ("(e) publish's statement, one consumer waiting", True),
}
PUBLISHERS = ["publish_v1", "publish"]


def log(msg: str) -> None:
    print(msg, flush=True)


def worker(*args: str) -> list[str]:
    return [sys.executable, WORKERS, *args]


def run_worker(args: list[str], timeout: float) -> Result:
    try:
        p = subprocess.run(worker(*args), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": "worker did not exit"}
    return parse_last(p.stdout, p.stderr, p.returncode)


def literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def scripts() -> dict[str, str]:
    """One pgbench script (a single statement, literal values) per kind."""
    from pgherald import sql

    p = literal(PAYLOAD)
    stmt = " ".join(
        ln.strip() for ln in sql.query("publish").splitlines() if not ln.strip().startswith("--")
    )
    values = {"channel": "'orders'", "key": "NULL", "payload": p, "headers": "NULL"}
    stmt = sql.PLACEHOLDER.sub(lambda m: values[m.group(1)], stmt)
    plain = f"INSERT INTO bench_minimal (channel, payload) VALUES ('orders', {p})"
    return {
        "minimal": plain,
        "seed": f"WITH i AS ({plain} RETURNING id) "
        "SELECT pg_notify('event_notification', 'orders') FROM i",
        "floor": f"INSERT INTO pgherald.events_v1 (channel, payload) VALUES ('orders', {p})",
        "publish_v1": f"SELECT pgherald.publish_v1('orders', {p})",
        "publish": stmt,
        "floor-returning": "WITH e AS (INSERT INTO pgherald.events_v1 (channel, key, payload, "
        f"headers) VALUES ('orders', NULL, CAST({p} AS jsonb), CAST(NULL AS jsonb)) RETURNING id) "
        "SELECT e.id FROM e",
    }


# -- setup ---------------------------------------------------------------------------------


def create_database(admin_dsn: str) -> str:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DBNAME} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DBNAME}")
    params = conninfo_to_dict(admin_dsn)
    params["dbname"] = DBNAME
    dsn = make_conninfo(**params)  # type: ignore[arg-type]
    import pgherald

    with psycopg.connect(dsn, autocommit=True) as conn:
        pgherald.install(conn)
        pgherald.maintain(conn)  # today's partition of the log (and the next days')
        conn.execute(MINIMAL_DDL)
    return dsn


def reset_tables(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE bench_minimal, pgherald.events_v1, pgherald.positions_v2")
        conn.execute("CHECKPOINT")


# -- 1. publish with pgbench ---------------------------------------------------------------


def pgbench_trial(
    dsn: str, script: Path, writers: int, seconds: float, wait: bool, sync_commit: str | None
) -> Result:
    reset_tables(dsn)
    waiter = None
    try:
        if wait:
            waiter = subprocess.Popen(
                worker("waiter", "--dsn", dsn, "--timeout", str(seconds + 120)),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            assert waiter.stdout is not None
            if waiter.stdout.readline().strip() != "READY":
                return {"ok": False, "error": "waiting consumer not ready"}
        cmd = [
            PGBENCH, "-n", "-M", "prepared", "-T", f"{seconds:g}", "-c", str(writers),
            "-j", str(writers), "-f", str(script), dsn,
        ]  # fmt: skip
        env = dict(os.environ)
        if sync_commit:  # a session setting of pgbench's connections, not the server's
            env["PGOPTIONS"] = f"-c synchronous_commit={sync_commit}"
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, env=env)
        m = re.search(r"^tps = ([\d.]+)", p.stdout, re.MULTILINE)
        if p.returncode != 0 or not m:
            tail = (p.stderr.strip().splitlines() or [f"pgbench exit code {p.returncode}"])[-1]
            return {"ok": False, "error": tail}
        lat = re.search(r"^latency average = ([\d.]+) ms", p.stdout, re.MULTILINE)
        res: Result = {"ok": True, "tps": float(m.group(1))}
        res["lat_ms"] = float(lat.group(1)) if lat else None
        if waiter is not None:
            assert waiter.stdin is not None
            waiter.stdin.write("STOP\n")
            waiter.stdin.flush()
            out, _ = waiter.communicate(timeout=30)
            res["wakeups"] = parse_last(out, "", waiter.returncode).get("wakeups")
        return res
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": "pgbench did not exit"}
    finally:
        if waiter is not None and waiter.poll() is None:
            waiter.kill()  # only the process this function started
            waiter.wait()


PAIRED = ["floor", "publish", "floor-returning"]
"""Kinds run mixed in one pgbench run (none notifies: they do not slow each other's commits)."""


def pgbench_paired(
    dsn: str, files: list[Path], writers: int, seconds: float, sync_commit: str | None
) -> Result:
    """
    One pgbench run that mixes *files* 1:1 (each transaction picks one at random): whatever
    disturbs the machine during the run disturbs every kind alike, so the ratio of their mean
    latencies measures what each costs more precisely than separate runs (whose spread on
    this machine is about 5%).
    """
    reset_tables(dsn)
    cmd = [PGBENCH, "-n", "-M", "prepared", "-T", f"{seconds:g}", "-c", str(writers),
           "-j", str(writers)]  # fmt: skip
    for f in files:
        cmd += ["-f", f"{f}@1"]
    env = dict(os.environ)
    if sync_commit:
        env["PGOPTIONS"] = f"-c synchronous_commit={sync_commit}"
    try:
        p = subprocess.run(
            [*cmd, dsn], capture_output=True, text=True, timeout=seconds + 60, env=env
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": "pgbench did not exit"}
    blocks = re.split(r"^SQL script \d+: ", p.stdout, flags=re.MULTILINE)[1:]
    lat: dict[str, float] = {}
    for f, block in zip(files, blocks, strict=False):
        m = re.search(r"latency average = ([\d.]+) ms", block)
        if m:
            lat[f.stem] = float(m.group(1))
    if p.returncode != 0 or len(lat) != len(files):
        tail = (p.stderr.strip().splitlines() or [f"pgbench exit code {p.returncode}"])[-1]
        return {"ok": False, "error": tail}
    return {"ok": True, "lat": lat}


# -- 2, 3. the loaded log: quiet channel, drain --------------------------------------------


def load_log(dsn: str, others: int, hot: int) -> float:
    """*others* events over channels c0..c99 and *hot* on "hot", interleaved in id order, in
    transactions of 100,000; 3 events on "quiet" among them (first, middle, last)."""
    reset_tables(dsn)
    total = others + hot
    every = total // hot if hot else 0  # every `every`-th event is on "hot"
    step = 100_000
    quiet_at = [0, total // 2, total]  # before the first event, in the middle, after the last
    quiet_sql = (
        "INSERT INTO pgherald.events_v1 (channel, payload) VALUES ('quiet', "
        "jsonb_build_object('i', %s::int, 'kind', 'order.created', 'pad', repeat('x', 60)))"
    )
    t0 = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        for lo in range(1, total + 1, step):
            hi = min(total, lo + step - 1)
            for q in quiet_at:
                if lo - 1 <= q < hi:
                    conn.execute(quiet_sql, (q,))
            conn.execute(
                "INSERT INTO pgherald.events_v1 (channel, payload) "
                "SELECT CASE WHEN %(every)s > 0 AND g %% %(every)s = 0 THEN 'hot' "
                "            ELSE 'c' || (g %% 100) END, "
                "       jsonb_build_object('i', g, 'kind', 'order.created', "
                "                          'ts', 1765000000000000000, 'pad', repeat('x', 60)) "
                "FROM generate_series(%(lo)s::int, %(hi)s::int) g",
                {"every": every, "lo": lo, "hi": hi},
            )
        conn.execute(quiet_sql, (total,))
        conn.execute("VACUUM ANALYZE pgherald.events_v1")
        conn.execute("CHECKPOINT")
    return time.perf_counter() - t0


def channel_counts(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT channel, count(*) FROM pgherald.events_v1 GROUP BY channel"
        ).fetchall()
    return {str(c): int(n) for c, n in rows}


def explain_quiet(dsn: str, group: str, channel: str) -> Result:
    """EXPLAIN ANALYZE a fresh group's first read_batch of *channel* (what a Consumer with
    default options asks first), and list_groups with the group at the channel's start."""
    import pgherald
    from pgherald import sql

    batch = 1000  # Consumer's default batch_size
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            sql.query("create_group"), {"group": group, "tx": "0", "event_id": 0, "skip": None}
        )
        conn.execute(sql.query("register_channels"), {"group": group, "channels": [channel]})
        parts = int(conn.execute("SELECT pgherald.partition_count_v1()").fetchone()[0])  # type: ignore[index]
        params = {
            "group": group,
            "channels": "{" + ",".join([channel] * parts) + "}",
            "partitions": "{" + ",".join(map(str, range(parts))) + "}",
            "txs": "{" + ",".join(["NULL"] * parts) + "}",
            "ids": "{" + ",".join(["NULL"] * parts) + "}",
            "limit": batch,
            "shares": [math.ceil(batch / parts)] * parts,  # what a Consumer asks at first
        }
        conn.execute(CONSUMER_SETTINGS)  # the consumer's session settings (planner)
        q = sql.query("read_batch")
        t0 = time.perf_counter()
        rows = conn.execute(q, params).fetchall()
        query_ms = (time.perf_counter() - t0) * 1000
        row = conn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + q, params).fetchone()
        assert row is not None
        plan = row[0][0]
        times = []
        infos: list[Any] = []
        for _ in range(3):
            t0 = time.perf_counter()
            infos = pgherald.list_groups(conn)
            times.append((time.perf_counter() - t0) * 1000)
    info = next((g for g in infos if g.name == group), None)
    return {
        "rows": len(rows),
        "query_ms": query_ms,
        "exec_ms": plan["Execution Time"],
        "planning_ms": plan.get("Planning Time"),
        "list_groups_ms": statistics.median(times),
        "list_groups_n": len(infos),
        "lag": info.lag_events if info else None,
        "lag_estimated": info.lag_estimated if info else None,
        "lag_by_channel": info.lag_by_channel if info else None,
    }


def explain_every(dsn: str, group: str) -> list[Result]:
    """Server time of a fresh every-channel group's read_batch over the log's channels (every
    (channel, partition) range), at the read sizes a Consumer uses: (limit, per_partition)."""
    from pgherald import sql

    out = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        chans = [str(c) for (c,) in conn.execute(sql.query("log_channels"), {"group": None})]
        conn.execute(
            sql.query("create_group"), {"group": group, "tx": "0", "event_id": 0, "skip": None}
        )
        conn.execute(sql.query("register_channels"), {"group": group, "channels": chans})
        parts = int(conn.execute("SELECT pgherald.partition_count_v1()").fetchone()[0])  # type: ignore[index]
        keys = [(c, p) for c in chans for p in range(parts)]
        q = sql.query("read_batch")
        for limit, share in ((1000, math.ceil(1000 / len(keys))), (1000, 63), (20000, 13)):
            params = {
                "group": group,
                "channels": [c for c, _ in keys],
                "partitions": [p for _, p in keys],
                "txs": [None] * len(keys),
                "ids": [None] * len(keys),
                "limit": limit,
                "shares": [share] * len(keys),
            }
            conn.execute(CONSUMER_SETTINGS)  # the consumer's session settings (planner)
            row = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + q, params).fetchone()
            assert row is not None
            plan = row[0][0]
            out.append(
                {
                    "ranges": len(keys),
                    "limit": limit,
                    "per_partition": share,
                    "rows": plan["Plan"].get("Actual Rows"),
                    "exec_ms": plan["Execution Time"],
                }
            )
    return out


def drain_trial(
    dsn: str, mode: str, group: str, channel: str | None, count: int, cap: float
) -> Result:
    args = [mode, "--dsn", dsn, "--group", group, "--count", str(count), "--timeout", str(cap)]
    if channel:
        args += ["--channel", channel]
    return run_worker(args, cap + 60)


# -- 4. retention --------------------------------------------------------------------------


def sizes(conn: psycopg.Connection[Any]) -> tuple[int, int, int]:
    row = conn.execute(
        "SELECT (SELECT sum(pg_total_relation_size(relid)) "
        "        FROM pg_partition_tree('pgherald.events_v1')), "
        "       pg_database_size(current_database()), "
        "       (SELECT count(*) FROM pg_partition_tree('pgherald.events_v1') WHERE isleaf)"
    ).fetchone()
    assert row is not None
    return int(row[0] or 0), int(row[1]), int(row[2])


class _Publisher(threading.Thread):
    """`pgherald.publish` about 1,000 times a second on a connection of its own, each call's
    start and length noted: what publishers meet while the log's day is dropped."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn, self.calls, self.error = dsn, list[tuple[float, float]](), ""
        self.done, self.started = threading.Event(), threading.Event()

    def run(self) -> None:
        import pgherald

        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self.done.is_set():
                    t = time.perf_counter()
                    pgherald.publish(conn, "retention-probe", {"i": len(self.calls)})
                    self.calls.append((t, time.perf_counter() - t))
                    self.started.set()
                    self.done.wait(0.001)
        except Exception as exc:
            self.error = repr(exc)
        finally:
            self.started.set()

    def during(self, t0: float, t1: float) -> tuple[int, float]:
        """Publishes that ran while [t0, t1] did, and the longest of them (ms)."""
        hit = [d for t, d in self.calls if t <= t1 and t + d >= t0]
        return len(hit), max(hit, default=0.0) * 1000


def retention_trial(dsn: str, n: int, how: str = "maintain") -> Result:
    """A day of *n* events dropped by `maintain` past retention, or by hand (``how`` =
    ``"by-hand"``: the ``DROP TABLE`` of the day partition a user of native partitioning
    writes), while a publisher runs."""
    import pgherald

    chunk = 1_000_000
    with psycopg.connect(dsn, autocommit=True) as conn:
        now = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
        old = now - dt.timedelta(days=40)
        pgherald.maintain(conn, now=old)
        day = dt.datetime.combine(
            old.astimezone(dt.timezone.utc).date(), dt.time(), dt.timezone.utc
        )
        name = f"events_v1_p{day:%Y%m%d}"
        t0 = time.perf_counter()
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk) - 1
            conn.execute(
                "INSERT INTO pgherald.events_v1 (channel, payload, created_at) "
                "SELECT 'old', jsonb_build_object('i', g, 'kind', 'order.created', "
                "                                 'pad', repeat('x', 60)), "
                "       %(day)s + make_interval(secs => g * 86399.0 / %(n)s) "
                "FROM generate_series(%(lo)s::int, %(hi)s::int) g",
                {"day": day, "n": n, "lo": lo, "hi": hi},
            )
        load_s = time.perf_counter() - t0
        in_day = conn.execute(
            f"SELECT count(*) FROM pgherald.{name}"  # our own partition name
        ).fetchone()[0]  # type: ignore[index]
        conn.execute(f"ANALYZE pgherald.{name}")
        conn.execute("CHECKPOINT")
        before = sizes(conn)
        day_size = conn.execute(
            "SELECT pg_total_relation_size(%s::regclass)", (f"pgherald.{name}",)
        ).fetchone()[0]  # type: ignore[index]
        if how == "maintain":
            pgherald.set_retention(conn, dt.timedelta(days=30))
        publisher = _Publisher(dsn)
        publisher.start()
        publisher.started.wait(10)
        t0 = time.perf_counter()
        if how == "maintain":
            actions = pgherald.maintain(conn)
        else:
            conn.execute(f"DROP TABLE pgherald.{name}")  # our own partition name
            actions = []
        t1 = time.perf_counter()
        publisher.done.wait(0.2)  # and a little after: a publish blocked till the end ends
        publisher.done.set()
        publisher.join(10)
        publishes, longest = publisher.during(t0, t1)
        after = sizes(conn)
        gone = conn.execute("SELECT to_regclass(%s) IS NULL", (f"pgherald.{name}",)).fetchone()[0]  # type: ignore[index]
        if how == "maintain":
            pgherald.set_retention(conn, None)
    error = publisher.error or (None if gone else f"{name} still there after maintain")
    return {
        "ok": bool(gone) and not publisher.error,
        "error": error,
        "how": how,
        "events": int(in_day),
        "partition": name,
        "load_s": load_s,
        "maintain_s": t1 - t0,
        "publishes": publishes,
        "longest_publish_ms": longest,
        "day_bytes": int(day_size),
        "log_before": before[0],
        "db_before": before[1],
        "parts_before": before[2],
        "log_after": after[0],
        "db_after": after[1],
        "parts_after": after[2],
        "actions": [(m.action, m.target, m.detail) for m in actions],
    }


# -- 5. latency ----------------------------------------------------------------------------


def latency_trial(dsn: str, kind: str, group: str, rate: int, seconds: float) -> Result:
    count = int(rate * seconds)
    timeout = seconds + 30.0
    recv_args = worker(
        "lat-recv", "--dsn", dsn, "--kind", kind, "--group", group, "--count", str(count),
        "--timeout", str(timeout),
    )  # fmt: skip
    with tempfile.TemporaryFile("w+") as err:
        recv = subprocess.Popen(recv_args, stdout=subprocess.PIPE, stderr=err, text=True)
        sender: Result = {}
        xacts: Result = {}
        try:
            assert recv.stdout is not None
            if recv.stdout.readline().strip() != "READY":
                raise RuntimeError("receiver not ready")
            watcher = threading.Thread(target=watch_xids, args=(dsn, seconds, xacts), daemon=True)
            watcher.start()
            sender = run_worker(
                ["lat-send", "--dsn", dsn, "--kind", kind, "--channel", group,
                 "--rate", str(rate), "--seconds", str(seconds)],
                timeout,
            )  # fmt: skip
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
    res["other_xact_ms"] = xacts.get("max_s", 0.0) * 1000
    return res


def watch_xids(dsn: str, seconds: float, out: Result) -> None:
    """Sample the oldest other transaction holding an xid on the cluster (another database
    too): while it runs, the log's readers cannot pass it (they read below the snapshot's
    xmin), so it delays pgherald's delivery, not a LISTEN loop's."""
    q = (
        "SELECT extract(epoch FROM now() - xact_start) FROM pg_stat_activity "
        "WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() "
        "AND datname IS DISTINCT FROM current_database() ORDER BY xact_start LIMIT 1"
    )
    end = time.monotonic() + seconds
    out["max_s"] = 0.0
    with contextlib.suppress(Exception), psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < end:
            row = conn.execute(q).fetchone()
            if row and row[0] is not None:
                out["max_s"] = max(out["max_s"], float(row[0]))
            time.sleep(0.02)


# -- report --------------------------------------------------------------------------------

table = _report.table


def med(results: list[Result], key: str) -> float | None:
    ok = [r[key] for r in results if r.get("ok") and r.get(key) is not None]
    return statistics.median(ok) if ok else None


def fx(v: float | None, f: str = "{:.2f}x") -> str:
    return f.format(v) if v is not None else "-"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024 / 1024:,.0f} MB"


def runs_col(rs: list[Result], key: str, f: str) -> str:
    return (
        f"{sum(bool(x.get('ok')) for x in rs)}/{len(rs)} ("
        + ", ".join(fx(x.get(key), f) for x in rs)
        + ")"
    )


def report(a: argparse.Namespace, info: dict[str, str], r: Result) -> str:
    out = [
        "## Durable log, second edition",
        "",
        f"Command: `{a.command}`  ",
        f"Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        "",
        f"Method: a fresh database (`{DBNAME}`) with `pgherald.install` and `maintain` (today's "
        "day partition of the log), plus `bench_minimal (id bigint GENERATED ALWAYS AS IDENTITY "
        "PRIMARY KEY, channel text NOT NULL, payload jsonb NOT NULL, created_at timestamptz NOT "
        "NULL DEFAULT now())`, the table a user writes by hand. Clients are their own processes "
        "(`pgbench`, `bench/log_workers.py`), measurements one after another; synchronous_commit "
        "is the server's (see above). Details of each part below and in the module docstring "
        "of `bench/log_bench.py`.",
        "",
    ]
    findings: list[str] = a.findings
    targets = [["Target", "Measured", "Result"]]

    # 1. publish
    writes: dict[tuple[str, int], list[Result]] = r.get("writes", {})
    if writes:
        out += [
            "### 1. Publish at the SQL level (pgbench, transactions/s)",
            "",
            f"`pgbench -n -M prepared -T {a.seconds:g} -c W -j W -f script`, one ~100-byte event "
            "per transaction, literal values (the scripts are printed by `--show-scripts`): "
            "(a) `INSERT INTO bench_minimal (channel, payload) VALUES ('orders', '{...}')`; "
            "(b) the seeds' shape (seed 001: INSERT into the event table, then "
            "`pg_notify('event_notification', event_name)` in the same transaction) as one "
            "statement, `WITH i AS (INSERT ... RETURNING id) SELECT pg_notify(...) FROM i`; "
            "(c) the floor: `INSERT INTO pgherald.events_v1 (channel, payload) VALUES (...)` "
            "(the log's row with its defaults, generated partition, primary key (id, "
            "created_at) and read index (channel, partition, tx, id), "
            "routed to today's partition; no function, no wake-up); (d) `SELECT "
            "pgherald.publish_v1('orders', '{...}')`; (e) the statement `pgherald.publish` "
            "sends (queries.sql `publish`). First with no consumer at all, then (d), (e) with "
            "one idle consumer waiting (a session holding the shared wake-up locks a waiting "
            "consumer holds, queries.sql `hold_wakeups`, and LISTENing on `pgherald_wake_v1`, reading "
            "its wake-ups). Every table truncated and CHECKPOINT before each trial; kinds "
            f"interleaved; median of {a.runs} run(s). Ratios against the same run's "
            "no-consumer baselines."
            + (
                f" pgbench's sessions ran with synchronous_commit={a.sync_commit} (PGOPTIONS)."
                if a.sync_commit
                else ""
            ),
            "",
        ]
        rows = [
            ["Writers", "Kind", "Median tx/s", "/ minimal", "/ seed", "/ floor", "Latency (ms)",
             "Wake-ups", "Runs"],
        ]  # fmt: skip
        for w in WRITERS:
            base = {k: med(writes.get((k, w), []), "tps") for k in ("minimal", "seed", "floor")}
            for k, (label, _) in KINDS.items():
                rs = writes.get((k, w), [])
                v = med(rs, "tps")
                wk = med(rs, "wakeups")
                rows.append(
                    [
                        str(w),
                        label,
                        fx(v, "{:,.0f}"),
                        fx(v / base["minimal"] if v and base["minimal"] else None),
                        fx(v / base["seed"] if v and base["seed"] else None),
                        fx(v / base["floor"] if v and base["floor"] else None),
                        fx(med(rs, "lat_ms"), "{:.3f}"),
                        fx(wk, "{:,.0f}") if k.endswith("wait") else "",
                        runs_col(rs, "tps", "{:,.0f}"),
                    ]
                )
        out += [table(rows), ""]
        for w in WRITERS:
            base = {k: med(writes.get((k, w), []), "tps") for k in ("minimal", "seed", "floor")}
            for k in ("publish", "publish_v1", "publish-wait", "publish_v1-wait"):
                v = med(writes.get((k, w), []), "tps")
                label = KINDS[k][0]
                for b, goal in (("minimal", 0.9), ("seed", 1.0), ("floor", 0.95)):
                    div = base[b]
                    ratio = v / div if v and div else None
                    targets.append(
                        [
                            f"{label} >= {goal}x {b}, {w} writer(s)",
                            fx(ratio),
                            verdict(None if ratio is None else ratio >= goal),
                        ]
                    )
        for w in WRITERS:
            fl = med(writes.get(("floor", w), []), "tps")
            mn = med(writes.get(("minimal", w), []), "tps")
            if fl and mn and fl / mn < 0.9:
                findings.append(
                    f"At {w} writer(s) the log's row alone (the floor, no function, no wake-up) "
                    f"keeps {fl / mn:.2f}x of the minimal table: publish cannot reach 0.9x of "
                    "the minimal table while the row keeps this shape (xid8 default, generated "
                    "partition, the read index, the (id, created_at) key, "
                    "tuple routing into the day partition); the floor target applies."
                )
        paired = r.get("paired", {})
        if any(paired.values()):
            out += [
                "Paired: the floor (c), publish's statement (e) and the diagnostic (f) mixed 1:1:1 "
                f"in one `pgbench ... -f floor.sql@1 -f publish.sql@1 -f floor-returning.sql@1` run of "
                f"{a.seconds * 2:g} s per writer count (each transaction picks one script), "
                "their mean latencies from pgbench's per-script report; median of "
                f"{a.runs} run(s). A disturbance of the machine during a run slows all three "
                "alike, so `floor / publish` (the throughput ratio the same cost per "
                "transaction gives) is measured without the run-to-run spread of the table "
                "above. None of them notifies, so mixing them changes no one's commits.",
                "",
            ]
            rows = [["Writers", "(c) floor (ms)", "(e) publish (ms)", "(f) returning id (ms)",
                     "(e) vs (c)", "(f) vs (c)", "Runs (e) vs (c)"]]  # fmt: skip
            for w in WRITERS:
                ok = [x["lat"] for x in paired.get(w, []) if x.get("ok")]
                if not ok:
                    continue
                ratios = sorted(x["floor"] / x["publish"] for x in ok)
                ret = sorted(x["floor"] / x["floor-returning"] for x in ok)
                rows.append(
                    [
                        str(w),
                        fx(statistics.median(x["floor"] for x in ok), "{:.3f}"),
                        fx(statistics.median(x["publish"] for x in ok), "{:.3f}"),
                        fx(statistics.median(x["floor-returning"] for x in ok), "{:.3f}"),
                        fx(statistics.median(ratios)),
                        fx(statistics.median(ret)),
                        f"{len(ok)}/{len(paired[w])} ("
                        + ", ".join(f"{v:.3f}" for v in ratios)
                        + ")",
                    ]
                )
                targets.append(
                    [
                        f"(e) pgherald.publish's statement >= 0.95x floor, {w} writer(s), paired",
                        fx(statistics.median(ratios)),
                        verdict(statistics.median(ratios) >= 0.95),
                    ]
                )
            out += [table(rows), ""]

    # 2. quiet channel
    quiet = r.get("quiet")
    if quiet is not None:
        ex = r.get("explain", {})
        out += [
            "### 2. A quiet channel among many",
            "",
            f"The log: {r['load_desc']} (loaded in {r['load_s']:.1f} s, then VACUUM ANALYZE). "
            'A fresh `Consumer(dsn, group=..., channels=["quiet"])` (default options, '
            "handler style): time from constructing it to its handler having the 3 events "
            "(includes connecting), and from `run()`; median of "
            f"{len(quiet)} run(s). Its first `read_batch` (fresh group, 16 (channel, partition) "
            "ranges, limit 1000) under EXPLAIN ANALYZE; `pgherald.list_groups(conn)` (median of "
            "3 calls) with a group at the start of `quiet`.",
            "",
        ]
        rows = [["Measure", "Value"]]
        rows.append(["Consumer() to 3 events (ms)", fx(med(quiet, "total_ms"), "{:.1f}")])
        rows.append(["  of which connect and join (ms)", fx(med(quiet, "connect_ms"), "{:.1f}")])
        rows.append(["  run() to 3 events (ms)", fx(med(quiet, "run_ms"), "{:.1f}")])
        rows.append(["read_batch: rows", fx(ex.get("rows"), "{:,}")])
        rows.append(["read_batch: server execution (ms)", fx(ex.get("exec_ms"), "{:.3f}")])
        rows.append(["read_batch: planning (ms)", fx(ex.get("planning_ms"), "{:.3f}")])
        rows.append(["read_batch: client round trip (ms)", fx(ex.get("query_ms"), "{:.2f}")])
        rows.append(
            [
                f"list_groups, {ex.get('list_groups_n', '?')} groups (ms)",
                fx(ex.get("list_groups_ms"), "{:.1f}"),
            ]
        )
        rows.append(
            [
                "list_groups: lag of the group on quiet",
                f"{ex.get('lag')} {'(estimated)' if ex.get('lag_estimated') else '(exact)'} "
                f"{ex.get('lag_by_channel')}",
            ]
        )
        out += [table(rows), ""]
        v = med(quiet, "total_ms")
        targets.append(
            ["quiet channel: 3 events in < 50 ms", fx(v, "{:.1f} ms"),
             verdict(None if v is None else v < 50)]
        )  # fmt: skip
        lg = ex.get("lag")
        targets.append(
            ["list_groups lag on quiet = 3", str(lg), verdict(None if lg is None else lg == 3)]
        )
        lgt = ex.get("list_groups_ms")
        targets.append(
            ["list_groups answers in < 1 s", fx(lgt, "{:.1f} ms"),
             verdict(None if lgt is None else lgt < 1000)]
        )  # fmt: skip

    # 3. drain
    drains: dict[str, list[Result]] = r.get("drains", {})
    if drains:
        out += [
            "### 3. Drain with 100 channels in the log",
            "",
            f"Same log. A fresh Consumer of `hot` (default options: batch_size 1000, reads "
            f"growing to 20,000; handler style, counting) drains its {r['hot']:,} events, "
            "against the keyset floor: a plain psycopg loop of `SELECT id, tx::text, payload "
            "FROM pgherald.events_v1 WHERE channel = %s AND (tx, id) > (%s, %s) ORDER BY tx, "
            "id LIMIT 5000` (payloads decoded by psycopg's jsonb loader). Then a fresh "
            "Consumer of every channel (no channels, no handlers; iterator) drains the whole "
            f"log ({r['total']:,} events). Wall time from `run()` (first read) to the last "
            f"event; interleaved, median of {a.runs} run(s).",
            "",
        ]
        rows = [
            ["Reader", "Events", "Median events/s", "vs floor", "CPU (s)", "Events per read",
             "Runs"]
        ]  # fmt: skip
        floor = med(drains.get("keyset", []), "rate")
        for k, label in (
            ("hot", "Consumer of `hot`"),
            ("keyset", "keyset floor on `hot`"),
            ("every", "Consumer of every channel"),
        ):
            rs = drains.get(k, [])
            v = med(rs, "rate")
            rows.append(
                [
                    label,
                    fx(med(rs, "count"), "{:,.0f}"),
                    fx(v, "{:,.0f}"),
                    fx(v / floor if v and floor and k == "hot" else None),
                    fx(med(rs, "cpu_s"), "{:.2f}"),
                    fx(med(rs, "per_read"), "{:,.1f}"),
                    runs_col(rs, "rate", "{:,.0f}")
                    + "".join(
                        f"; partial: {x['count']:,} in {x['wall']:.0f} s (capped)"
                        for x in rs
                        if x.get("partial")
                    ),
                ]
            )
        out += [table(rows), ""]
        ee = r.get("explain_every") or []
        if ee:
            out += [
                "A fresh every-channel group's `read_batch` over the whole log under EXPLAIN "
                f"ANALYZE ({ee[0]['ranges']:,} (channel, partition) ranges, each probing every "
                "day partition of the log):",
                "",
                table(
                    [["limit", "per_partition", "rows", "server execution (ms)"]]
                    + [
                        [
                            f"{x['limit']:,}",
                            str(x["per_partition"]),
                            fx(x["rows"], "{:,}"),
                            f"{x['exec_ms']:.1f}",
                        ]
                        for x in ee
                    ]
                ),
                "",
            ]
        every = med(drains.get("every", []), "rate")
        if every is not None and every < 200_000 and ee:
            findings.append(
                f"The consumer of every channel drains at {every:,.0f} events/s "
                f"({fx(med(drains.get('every', []), 'per_read'), '{:,.0f}')} events per read): "
                f"its read is one index range per (channel, partition), {ee[0]['ranges']:,} "
                "here, each probing every day partition of the log (today's and the days "
                f"ahead that maintain creates): {ee[0]['exec_ms']:.0f} ms of server time for "
                f"{ee[0]['limit']:,} rows at per_partition {ee[0]['per_partition']}, "
                f"{ee[1]['exec_ms']:.0f} ms at {ee[1]['per_partition']}; and a read delivers "
                "only up to the earliest last row of the ranges that gave their whole share."
            )
        v = med(drains.get("hot", []), "rate")
        targets.append(
            ["drain one channel >= 200,000 events/s", fx(v, "{:,.0f}/s"),
             verdict(None if v is None else v >= 200_000)]
        )  # fmt: skip
        ratio = v / floor if v and floor else None
        targets.append(
            ["drain one channel >= 0.9x the keyset floor", fx(ratio),
             verdict(None if ratio is None else ratio >= 0.9)]
        )  # fmt: skip

    # 4. retention
    drops = r.get("retention")
    if drops:
        ret = drops["maintain"][0]
        out += [
            "### 4. Retention: dropping a day",
            "",
            f"{ret.get('events', 0):,} events stored in the day partition "
            f"`{ret.get('partition')}`, 40 days old (created by `maintain(conn, now=now - 40 "
            "days)`, filled by `INSERT ... SELECT generate_series` in chunks of 1,000,000 "
            f"in {ret.get('load_s', 0):.0f} s; then ANALYZE and CHECKPOINT), the rest of the "
            "log as above, the groups of the previous parts present (maintain checks each "
            "group's position in the day before dropping it). `set_retention(conn, "
            "timedelta(days=30))`, then `maintain(conn)` timed from the client. The floor: "
            "another such day loaded, then dropped by the `DROP TABLE` a user of native "
            "partitioning writes by hand (no check of any group). During each, a publisher "
            "calls `pgherald.publish` about 1,000 times a second on a connection of its own: "
            f"how long the drop keeps the log from its publishers. {len(drops['maintain'])} "
            "drop(s) of each kind, interleaved, each of a day loaded for it; sizes and "
            "`maintain`'s answer below are of the first.",
            "",
        ]
        secs = {how: [x["maintain_s"] for x in runs if x.get("ok")] for how, runs in drops.items()}
        middle = {how: statistics.median(v) if v else None for how, v in secs.items()}
        rows = [["Measure", "Value"]]
        for how, label in (
            ("maintain", "maintain (s)"),
            ("by-hand", "the floor: `DROP TABLE` of the day by hand (s)"),
        ):
            each = ", ".join(f"{x:.3f}" for x in secs[how])
            rows.append([label, f"{fx(middle[how], '{:.3f}')} ({each})"])
        for how, label in (("maintain", "maintain"), ("by-hand", "the DROP TABLE by hand")):
            done = [x for x in drops[how] if x.get("ok")]
            rows.append(
                [f"publishes while {label} ran: how many, the longest (ms)",
                 ", ".join(
                     f"{x['publishes']:,} / {x['longest_publish_ms']:.1f}" for x in done
                 ) or "-"]
            )  # fmt: skip
        rows.append(["size of the dropped day (table + indexes)", mb(ret.get("day_bytes"))])
        rows.append(
            ["log size before / after (every partition)",
             f"{mb(ret.get('log_before'))} / {mb(ret.get('log_after'))}"]
        )  # fmt: skip
        rows.append(
            ["database size before / after",
             f"{mb(ret.get('db_before'))} / {mb(ret.get('db_after'))}"]
        )  # fmt: skip
        rows.append(
            ["log partitions before / after",
             f"{ret.get('parts_before')} / {ret.get('parts_after')}"]
        )  # fmt: skip
        out += [table(rows), ""]
        acts = ret.get("actions") or []
        if acts:
            out += ["`maintain` returned:", ""]
            out += [f"- {act} {tgt}: {det}" for act, tgt, det in acts]
            out += [""]
        v = middle["maintain"]
        targets.append(
            [f"drop a day of {ret.get('events', 0):,} events < 1 s", fx(v, "{:.3f} s"),
             verdict(None if v is None else v < 1)]
        )  # fmt: skip
        dropped_by_hand = middle["by-hand"]
        ratio = v / dropped_by_hand if v and dropped_by_hand else None
        targets.append(
            ["drop a day: maintain <= 1.1x the DROP TABLE by hand", fx(ratio),
             verdict(None if ratio is None else ratio <= 1.1)]
        )  # fmt: skip
        freed = (ret.get("db_before") or 0) - (ret.get("db_after") or 0)
        targets.append(
            ["no bloat: the day's space is gone",
             f"{mb(freed)} freed of {mb(ret.get('day_bytes'))}",
             verdict(bool(ret.get("ok")) and freed >= 0.95 * (ret.get("day_bytes") or 0))]
        )  # fmt: skip

    # 5. latency
    lats: dict[str, list[Result]] = r.get("latency", {})
    if lats:
        out += [
            "### 5. Publish to handler latency",
            "",
            f"{a.rate:,} events/s for {a.lat_seconds:g} s, one event per autocommit "
            "transaction, `time.time_ns()` in the payload just before the statement: "
            "`pgherald.publish` to a fresh default Consumer (handler style), against the seeds' "
            "INSERT + `pg_notify('event_notification', payload)` in one statement into the "
            "minimal table, to a psycopg 3 loop over `conn.notifies()` that decodes the payload. "
            f"First 5% dropped; interleaved, median of {a.runs} run(s). The last row is the "
            "floor of any consumer of pgherald's wake-up notes: the same `pgherald.publish`, "
            "to a bare psycopg loop that asks for notes as a waiting consumer does and decodes "
            "each note's payload, with no signature check, no order proof and no "
            "acknowledgement (what the publisher's durable row and signed note cost, and "
            "nothing of the Consumer).",
            "",
        ]
        rows = [
            ["Path", "p50 (ms)", "p99 (ms)", "max (ms)", "Sender achieved", "Reads per event",
             "Longest other xact (ms)", "Runs p50 / p99"]
        ]  # fmt: skip
        for k, label in (("pgherald", "pgherald publish -> Consumer"),
                         ("seed", "seeds' INSERT + NOTIFY -> LISTEN loop"),
                         ("seed-read", "seeds' INSERT + NOTIFY -> read by hand"),
                         ("note-floor", "pgherald publish -> bare loop over its notes")):  # fmt: skip
            rs = lats.get(k, [])
            rows.append(
                [
                    label,
                    fx(med(rs, "p50_ms"), "{:.3f}"),
                    fx(med(rs, "p99_ms"), "{:.3f}"),
                    fx(med(rs, "max_ms"), "{:.3f}"),
                    fx(med([x.get("sender", {}) for x in rs], "rate"), "{:,.0f}/s"),
                    fx(
                        med(
                            [{**x, "rpe": x["reads"] / x["count"]} for x in rs if x.get("reads")],
                            "rpe",
                        ),
                        "{:.2f}",
                    ),
                    fx(med(rs, "other_xact_ms"), "{:.0f}"),
                    f"{sum(bool(x.get('ok')) for x in rs)}/{len(rs)} ("
                    + ", ".join(
                        f"{fx(x.get('p50_ms'), '{:.2f}')} / {fx(x.get('p99_ms'), '{:.2f}')}"
                        for x in rs
                    )
                    + ")",
                ]
            )
        out += [table(rows), ""]
        p = {k: (med(lats.get(k, []), "p50_ms"), med(lats.get(k, []), "p99_ms")) for k in lats}
        floor, seed_p = p.get("note-floor", (None, None)), p.get("seed", (None, None))
        mine_p = p.get("pgherald", (None, None))
        if floor[0] and seed_p[0] and mine_p[0]:
            findings.append(
                f"Latency p50: the floor of a consumer of notes is {floor[0] / seed_p[0]:.2f}x the "
                f"seed's ({floor[0]:.3f} ms: the publisher's durable row and signed note); the "
                f"Consumer is {mine_p[0] / floor[0]:.2f}x that floor ({mine_p[0]:.3f} ms: it "
                "checks each note's signature and order before its handler)."
            )
        for i, (name, goal) in enumerate((("p50", 1.2), ("p99", 1.0))):
            mine, seed = p.get("pgherald", (None, None))[i], p.get("seed", (None, None))[i]
            ratio = mine / seed if mine and seed else None
            other = med(lats.get("pgherald", []), "other_xact_ms")
            if name == "p99" and ratio is not None and ratio > goal and other and mine:
                findings.append(
                    f"Latency p99 ({mine:.1f} ms against the seed's {seed:.1f} ms): a Consumer "
                    "only reads events of transactions older than every running one on the "
                    "cluster (the snapshot's xmin, any database); the longest other transaction "
                    f"seen during its runs lasted {other:.0f} ms (median of runs), and holds "
                    "delivery back while it runs; a LISTEN loop is not held back."
                )
            targets.append(
                [f"latency {name} <= {goal}x the seed's", fx(ratio),
                 verdict(None if ratio is None else ratio <= goal)]
            )  # fmt: skip

    out += ["### Targets", "", table(targets)]
    notes = [f"- {f}" for f in findings]
    for key in ("writes", "drains", "latency"):
        for name, rs in (r.get(key) or {}).items():
            notes += [f"- {key} {name} run failed: {x.get('error')}" for x in rs if not x.get("ok")]
    if notes:
        out += ["", "Notes:", "", *notes]
    return "\n".join(out)


def main() -> None:
    ap = _report.parser(
        __doc__,
        "1 run, 2 s trials, a tenth of the events",
        "server to use (a database on it is only used to create the bench database)",
    )
    ap.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated subset of {','.join(PARTS)} (partial runs cannot use --output)",
    )
    ap.add_argument("--show-scripts", action="store_true", help="print the pgbench scripts")
    ap.add_argument("--runs", type=int, help="repetitions (default 3, 1 with --quick)")
    ap.add_argument("--seconds", type=float, help="pgbench trial length (default 5, 2 quick)")
    ap.add_argument(
        "--sync-commit",
        choices=["on", "off"],
        help="synchronous_commit for pgbench's sessions (default: the server's); off takes "
        "the WAL flush, shared with everything else on the server, out of each transaction",
    )
    a = ap.parse_args()
    if a.show_scripts:
        for k, s in scripts().items():
            print(f"-- {k}\n{s};\n")
        return
    a.parts = [x.strip() for x in a.parts.split(",") if x.strip()]
    if unknown := set(a.parts) - set(PARTS):
        ap.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    if set(a.parts) != set(PARTS) and a.output:
        ap.error("--output needs every part (the report section is written whole)")
    a.command = _report.command()
    scale = 10 if a.quick else 1
    a.runs = a.runs or (1 if a.quick else 3)
    a.lat_seconds = 2.0 if a.quick else 5.0
    a.seconds = a.seconds or a.lat_seconds
    a.rate = 1000
    a.findings = []
    others, hot, old = 1_000_000 // scale, 200_000 // scale, 10_000_000 // scale

    try:
        dsn = create_database(a.dsn)
        info = _report.machine(
            dsn,
            settings=("synchronous_commit", "fsync", "shared_buffers", "wal_level"),
            extra={"pgherald": _report.version("pgherald"), "pgbench": _pgbench_version()},
        )
    except Exception as exc:
        sys.exit(f"cannot set up the bench database on {a.dsn!r}: {exc}")
    log(f"database {DBNAME} created and installed")
    r: Result = {}

    if "publish" in a.parts:
        writes: dict[tuple[str, int], list[Result]] = {(k, w): [] for k in KINDS for w in WRITERS}
        with tempfile.TemporaryDirectory() as tmp:
            files = {}
            for k, s in scripts().items():
                files[k] = Path(tmp) / f"{k}.sql"
                files[k].write_text(s + ";\n")
            for run in range(a.runs):
                for w in WRITERS:
                    for k, (_, wait) in KINDS.items():
                        res = pgbench_trial(
                            dsn, files[k.removesuffix("-wait")], w, a.seconds, wait, a.sync_commit
                        )
                        writes[(k, w)].append(res)
                        log(
                            f"publish run {run + 1} writers={w:2} {k:16} "
                            f"{res.get('tps', 0):>9,.0f} tx/s "
                            f"{'wake-ups ' + str(res['wakeups']) if 'wakeups' in res else ''}"
                            f"{res.get('error') or ''}"
                        )
            paired: dict[int, list[Result]] = {w: [] for w in WRITERS}
            for run in range(a.runs):
                for w in WRITERS:
                    res = pgbench_paired(
                        dsn, [files[k] for k in PAIRED], w, a.seconds * 2, a.sync_commit
                    )
                    paired[w].append(res)
                    log(f"paired run {run + 1} writers={w:2} {res.get('lat') or res}")
        r["writes"] = writes
        r["paired"] = paired

    if "read" in a.parts:
        r["load_s"] = load_log(dsn, others, hot)
        counts = channel_counts(dsn)
        r["hot"], r["total"] = counts.get("hot", 0), sum(counts.values())
        r["load_desc"] = (
            f"{sum(v for c, v in counts.items() if c.startswith('c')):,} events on 100 channels "
            f"c0..c99 (about {others // 100:,} each), {r['hot']:,} on `hot` interleaved with "
            f"them (every {(others + hot) // hot}th event), {counts.get('quiet', 0)} on `quiet` "
            f"(first, middle, last): {r['total']:,} events"
        )
        log(f"log loaded in {r['load_s']:.1f} s: {r['load_desc']}")
        quiet: list[Result] = []
        for run in range(a.runs):
            res = run_worker(
                ["quiet", "--dsn", dsn, "--group", f"quiet{run}", "--channel", "quiet",
                 "--count", "3", "--timeout", "30"],
                90,
            )  # fmt: skip
            quiet.append(res)
            log(f"quiet run {run + 1}: {res}")
        r["quiet"] = quiet
        r["explain"] = explain_quiet(dsn, "quiet-lag", "quiet")
        log(f"quiet read_batch / list_groups: {r['explain']}")
        drains: dict[str, list[Result]] = {"hot": [], "keyset": [], "every": []}
        cap = 120.0
        for run in range(a.runs):
            for k in drains:
                if k == "hot":
                    res = drain_trial(dsn, "drain", f"hot{run}", "hot", r["hot"], cap)
                elif k == "keyset":
                    res = drain_trial(dsn, "keyset", "", "hot", r["hot"], cap)
                else:  # capped shorter: a rate over what was consumed, marked partial
                    res = drain_trial(dsn, "drain", f"every{run}", None, r["total"], cap / 4)
                drains[k].append(res)
                log(
                    f"drain run {run + 1} {k:7} {res.get('rate', 0):>9,.0f} ev/s "
                    f"({res.get('count', 0):,} events, {res.get('wall', 0):.2f} s) "
                    f"{res.get('error') or ''}"
                )
        r["drains"] = drains
        r["explain_every"] = explain_every(dsn, "every-explain")
        log(f"every-channel read_batch: {r['explain_every']}")

    if "retention" in a.parts:
        # Interleaved (maintain, by hand, by hand, maintain): the disk's time to free 2.7 GB
        # varies by a third from one drop to the next.
        drops: dict[str, list[Result]] = {"maintain": [], "by-hand": []}
        order = ["maintain", "by-hand"] + ([] if a.quick else ["by-hand", "maintain"])
        for i, how in enumerate(order):
            drops[how].append(retention_trial(dsn, old, how))
            log(f"retention {i + 1} {how}: {drops[how][-1]}")
        r["retention"] = drops

    if "latency" in a.parts:
        lats: dict[str, list[Result]] = {
            "pgherald": [], "seed": [], "seed-read": [], "note-floor": []
        }  # fmt: skip
        for run in range(a.runs):
            for k in lats:
                res = latency_trial(dsn, k, f"lat{run}", a.rate, a.lat_seconds)
                lats[k].append(res)
                log(
                    f"latency run {run + 1} {k:8} p50 {res.get('p50_ms', 0):.3f} ms "
                    f"p99 {res.get('p99_ms', 0):.3f} ms {res.get('error') or ''}"
                )
        r["latency"] = lats

    info["Load average at end"] = _report.load_average()
    if _report.overloaded():
        a.findings.append(
            "The machine was not idle: its load average exceeded its core count during the "
            "run (other work shares the cores and the PostgreSQL server): compare kinds "
            "within a run (the runs columns) as well as medians."
        )
    body = report(a, info, r)
    if set(a.parts) != set(PARTS):
        print("\n" + body)
        log("partial run: not written")
        return
    _report.publish(body, a.output, START, END)


def _pgbench_version() -> str:
    try:
        out = subprocess.run([PGBENCH, "--version"], capture_output=True, text=True, timeout=10)
    except OSError as exc:
        return f"unavailable ({exc})"
    return out.stdout.strip()


if __name__ == "__main__":
    main()
