"""
The idle poll of the gateway's log tail (and of `read_log`) at 1 K and 10 M stored events.

An idle gateway reads the log every poll_interval (0.25 s): that read must cost the same
however long the log is. This loads a fresh database (created and dropped here) with
``INSERT ... SELECT generate_series`` and reads the server's own figures for one poll that
finds nothing, from ``EXPLAIN (ANALYZE, BUFFERS)``: planning and execution time, buffers.

Two idle polls: the gateway tail's (caught up: after the horizon, one durable channel) and
`read_log`'s (after the last event id, every channel). For contrast, the query the tail ran
before it read per partition (a range over the whole (partition, tx, id) index).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql as psql

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _report

import pgherald
from pgherald import sql

START = "<!-- gateway-tail-bench:start -->"
END = "<!-- gateway-tail-bench:end -->"
DB = "pgherald_bench_tail"
CHUNK = 1_000_000

OLD_TAIL = b"""
SELECT id, tx::text, channel, payload::text FROM pgherald.events_v1
WHERE channel = ANY($1::text[])
  AND (tx, id) > ($2::xid8, $3::bigint)
  AND tx < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY tx, id
LIMIT 500
"""


def explain(
    conn: psycopg.Connection[Any], query: bytes, params: list[bytes | None]
) -> dict[str, float]:
    res = conn.pgconn.exec_params(b"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + query, params)
    value = res.get_value(0, 0)
    if value is None:
        raise RuntimeError(res.error_message.decode())
    top = json.loads(value)[0]
    plan = top["Plan"]
    return {
        "planning": top["Planning Time"],
        "execution": top["Execution Time"],
        "buffers": plan["Shared Hit Blocks"] + plan["Shared Read Blocks"],
        "rows": plan["Actual Rows"],
    }


def read_log_params(values: dict[str, str | None]) -> list[bytes | None]:
    _, names = sql.numbered("read_log")
    return [None if (v := values.get(n)) is None else v.encode() for n in names]


def measure(conn: psycopg.Connection[Any], polls: int) -> dict[str, dict[str, float]]:
    """Median (and worst) server figures of the idle polls, at the log's current size."""
    query, _ = sql.numbered("read_log")
    horizon = conn.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text").fetchone()
    last = conn.execute(
        "SELECT e.id, e.tx::text FROM pgherald.events_v1 AS e ORDER BY e.tx DESC, e.id DESC LIMIT 1"
    ).fetchone()
    assert horizon is not None
    assert last is not None
    tail = read_log_params(
        {
            "after_tx": horizon[0],
            "after_id": "0",
            "channels": "{orders}",
            "limit": "500",
            "per_partition": "63",
        }
    )
    after_last = read_log_params(
        {"after_tx": last[1], "after_id": str(last[0]), "limit": "1000", "per_partition": "125"}
    )
    old = [b"{orders}", horizon[0].encode(), b"0"]
    out = {}
    for name, q, params, n in (
        ("tail", query, tail, polls),
        ("read_log", query, after_last, polls),
        ("old tail query", OLD_TAIL, old, max(3, polls // 40)),
    ):
        for _ in range(3):
            explain(conn, q, params)  # warm: plan cache, buffers
        runs = [explain(conn, q, params) for _ in range(n)]
        assert all(r["rows"] <= 1 for r in runs), runs[0]  # idle: nothing (one NULL row)
        execs = sorted(r["execution"] for r in runs)
        out[name] = {
            "runs": n,
            "execution": statistics.median(execs),
            "worst": execs[-1],
            "planning": statistics.median(r["planning"] for r in runs),
            "buffers": statistics.median(r["buffers"] for r in runs),
        }
    # What a client sees: `read_log` on a lent connection, round trip included.
    t = []
    for _ in range(polls):
        t0 = time.perf_counter()
        assert pgherald.read_log(conn, after=int(last[0])) == []
        t.append((time.perf_counter() - t0) * 1000)
    out["read_log"]["client"] = statistics.median(t)
    return out


def load(conn: psycopg.Connection[Any], total: int) -> float:
    """Fill the log up to *total* events (1 in 10 on `orders`); seconds it took, VACUUM included."""
    t0 = time.monotonic()
    have_row = conn.execute("SELECT count(*) FROM pgherald.events_v1").fetchone()
    have = int(have_row[0]) if have_row else 0
    while have < total:
        n = min(CHUNK, total - have)
        conn.execute(
            "INSERT INTO pgherald.events_v1 (channel, payload) "
            "SELECT CASE WHEN g %% 10 = 0 THEN 'orders' ELSE 'other' END, "
            "jsonb_build_object('n', g, 'text', 'an event of about a hundred bytes, as JSON') "
            "FROM generate_series(%s::bigint, %s::bigint) AS g",
            (have + 1, have + n),
        )
        have += n
        print(f"  {have:,} events ({time.monotonic() - t0:.0f} s)", flush=True)
    conn.execute("VACUUM ANALYZE pgherald.events_v1")
    return time.monotonic() - t0


def main() -> None:
    ap = _report.parser(__doc__, "1 M events instead of 10 M")
    ap.add_argument("--events", type=int, default=10_000_000, help="stored events, large log")
    ap.add_argument("--polls", type=int, default=200, help="idle polls measured per case")
    ap.add_argument("--keep", action="store_true", help="keep the database, to look at plans")
    args = ap.parse_args()
    total = 1_000_000 if args.quick else args.events
    info = _report.machine(args.dsn, settings=("shared_buffers",))
    with psycopg.connect(args.dsn, autocommit=True) as admin:
        admin.execute(
            psql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(psql.Identifier(DB))
        )
        admin.execute(psql.SQL("CREATE DATABASE {}").format(psql.Identifier(DB)))
    params = psycopg.conninfo.conninfo_to_dict(args.dsn)
    params["dbname"] = DB
    dsn = psycopg.conninfo.make_conninfo(**params)
    results: list[tuple[int, float, dict[str, dict[str, float]]]] = []
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            pgherald.install(conn)
            for size in (1_000, total):
                print(f"loading {size:,} events...", flush=True)
                took = load(conn, size)
                results.append((size, took, measure(conn, args.polls)))
                print(results[-1], flush=True)
    finally:
        if args.keep:
            print(f"kept database {DB}")
        else:
            with psycopg.connect(args.dsn, autocommit=True) as admin:
                admin.execute(
                    psql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(psql.Identifier(DB))
                )
    _report.publish(report(info, results, args.polls), args.output, START, END)


def report(
    info: dict[str, str], results: list[tuple[int, float, dict[str, dict[str, float]]]], polls: int
) -> str:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "## Gateway log tail: the idle poll",
        "",
        f"Command: `{_report.command()}`  ",
        f"Date: {now}",
        "",
        *(f"- {k}: {v}" for k, v in info.items()),
        "",
        "Method: a fresh database (`" + DB + "`, dropped afterwards) with `pgherald.install`, "
        "filled with `INSERT ... SELECT generate_series` (1,000,000 events per statement, one "
        "in ten on the durable channel `orders`, ~100-byte JSON payloads), then `VACUUM "
        "ANALYZE`; *Load* is the time of both, up to that size. At each size, the server's own figures of an idle poll from `EXPLAIN "
        f"(ANALYZE, BUFFERS)`, {polls} polls after 3 unrecorded ones, median (worst execution "
        "in brackets): **tail**, the gateway's caught-up poll (the `read_log` query after the "
        "horizon, channel `orders`, limit 500, 63 per partition); **read_log**, `pgherald.read_log(conn, "
        "after=<last id>)` (every channel, limit 1000, 125 per partition: the read, after the primary-key lookup "
        "of the event's position that precedes it; *client* is the whole call's median round "
        "trip in Python on a lent connection, both statements); **old tail query**, the gateway's query before this "
        "change (one range over the whole index), for contrast.",
        "",
    ]
    rows = [
        [
            "Stored events",
            "Load (s)",
            "Poll",
            "Execution (ms)",
            "Planning (ms)",
            "Buffers",
            "Client (ms)",
        ]
    ]
    for size, took, out in results:
        for name, m in out.items():
            client = f"{m['client']:.3f}" if "client" in m else ""
            rows.append(
                [
                    f"{size:,}",
                    f"{took:.0f}",
                    name,
                    f"{m['execution']:.3f} ({m['worst']:.3f})",
                    f"{m['planning']:.3f}",
                    f"{m['buffers']:.0f}",
                    client,
                ]
            )
    lines.append(_report.table(rows))
    big = results[-1][2]
    ok = big["tail"]["execution"] < 1.0 and big["read_log"]["execution"] < 1.0
    lines += [
        "",
        f"Target: an idle poll under 1 ms of server execution time at {results[-1][0]:,} "
        f"events: **{'met' if ok else 'NOT met'}** (tail {big['tail']['execution']:.3f} ms, "
        f"read_log {big['read_log']['execution']:.3f} ms).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
