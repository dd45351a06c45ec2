"""Batch publish benchmark: pgherald.apublish_many against pgqueuer's batch enqueue, 1,000 events.

Usage::

    flock /tmp/pgherald-bench.lock python bench/publish_many_bench.py [--dsn DSN] [--quick]
        [--runs N] [--output docs/benchmarks.md]

Method.  The run creates a fresh database (``pgherald_bench_many``, dropped and recreated on the
server of ``--dsn``, dropped again at the end), installs pgherald's schema with
``pgherald.install`` and pgqueuer's with its Python API (``Queries.install()``, what ``pgq
install`` runs; default settings: durable tables, like pgherald's), and a minimal table
``bench_plain (id identity primary key, channel, payload jsonb, created_at)``.  One process,
one connection per kind, kinds measured one after another.  A batch is 1,000 events, each a
~100-byte dict, encoded to JSON inside the timed call for every kind (a caller has objects, not
JSON); each batch is one autocommit statement (it commits itself: one round trip):

* ``pgherald.apublish_many(conn, "bench", payloads)`` on a psycopg ``AsyncConnection``
  (autocommit), and the same inside ``async with conn.transaction()`` (its commit included);
* pgqueuer's ``Queries.enqueue(entrypoints, payloads, priorities)`` with lists of 1,000 on an
  asyncpg connection (``Queries.from_asyncpg_connection``, its fastest documented driver);
* floors, raw asyncpg into ``bench_plain``: one ``INSERT ... SELECT FROM unnest($2::jsonb[])
  RETURNING id``, and ``copy_records_to_table`` (COPY; no ids back).

Each run: the tables are truncated and a CHECKPOINT taken, every kind runs one warm-up batch,
then 20 rounds (5 with ``--quick``) of one timed batch per kind, interleaved (order rotated
from run to run) so that a change in the machine's load weighs on every kind alike.  The
report gives, per kind, the median over runs of the run's events/s, and the median batch time;
the ratio is pgherald's events/s over pgqueuer's.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import _report  # bench/_report.py: shared by every benchmark
import asyncpg
import psycopg
from pgqueuer.queries import Queries
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pgherald

START, END = "<!-- publish-many-bench:start -->", "<!-- publish-many-bench:end -->"
DBNAME = "pgherald_bench_many"
N = 1000
KINDS = ["pgherald", "pgherald-tx", "pgqueuer", "asyncpg-unnest", "asyncpg-copy"]
LABEL = {
    "pgherald": "pgherald.apublish_many (psycopg async, autocommit)",
    "pgherald-tx": "pgherald.apublish_many in a transaction + commit",
    "pgqueuer": "pgqueuer Queries.enqueue, lists of 1,000 (asyncpg)",
    "asyncpg-unnest": "floor: asyncpg INSERT ... unnest RETURNING id, minimal table",
    "asyncpg-copy": "floor: asyncpg COPY (copy_records_to_table), minimal table",
}
PLAIN = """
CREATE TABLE bench_plain (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    channel text NOT NULL,
    payload jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
)
"""


def payloads(batch: int) -> list[dict[str, Any]]:
    """1,000 distinct ~100-byte events."""
    base = batch * N
    return [
        {
            "order": base + i,
            "sku": f"SKU-{(base + i) % 9973:05d}",
            "qty": i % 7 + 1,
            "note": "shipped to warehouse 3",
            "ok": True,
        }
        for i in range(N)
    ]


def dsn_for(dsn: str, dbname: str) -> str:
    return make_conninfo(**{**conninfo_to_dict(dsn), "dbname": dbname})


def url_for(dsn: str) -> str:
    """asyncpg takes a URL (or keywords): the same server and database as *dsn*."""
    d = conninfo_to_dict(dsn)
    return (
        f"postgresql://{d.get('user') or 'postgres'}@{d.get('host') or '127.0.0.1'}:"
        f"{d.get('port') or 5432}/{d['dbname']}"
    )


async def measure(dsn: str, runs: int, batches: int) -> dict[str, list[dict[str, float]]]:
    db = dsn_for(dsn, DBNAME)
    with psycopg.connect(db, autocommit=True) as setup:
        pgherald.install(setup)
        setup.execute(PLAIN)
    apg = await asyncpg.connect(url_for(db))
    floor = await asyncpg.connect(url_for(db))
    aconn = await psycopg.AsyncConnection.connect(db, autocommit=True)
    txconn = await psycopg.AsyncConnection.connect(db)
    admin = await psycopg.AsyncConnection.connect(db, autocommit=True)
    try:
        queries = Queries.from_asyncpg_connection(apg)
        await queries.install()
        q = queries.qbe.settings
        truncate = {
            "pgherald": "TRUNCATE pgherald.events_v1",
            "pgherald-tx": "TRUNCATE pgherald.events_v1",
            "pgqueuer": f"TRUNCATE {q.queue_table}, {q.queue_table_log}",
            "asyncpg-unnest": "TRUNCATE bench_plain",
            "asyncpg-copy": "TRUNCATE bench_plain",
        }

        async def herald(events: list[dict[str, Any]]) -> int:
            return len(await pgherald.apublish_many(aconn, "bench", events))

        async def herald_tx(events: list[dict[str, Any]]) -> int:
            async with txconn.transaction():
                ids = await pgherald.apublish_many(txconn, "bench", events)
            return len(ids)

        async def pgq(events: list[dict[str, Any]]) -> int:
            ids = await queries.enqueue(
                ["bench"] * len(events), [json.dumps(e).encode() for e in events], [0] * len(events)
            )
            return len(ids)

        async def unnest(events: list[dict[str, Any]]) -> int:
            rows = await floor.fetch(
                "INSERT INTO bench_plain (channel, payload) SELECT $1, p "
                "FROM unnest($2::jsonb[]) WITH ORDINALITY AS v(p, n) ORDER BY n RETURNING id",
                "bench",
                [json.dumps(e) for e in events],
            )
            return len(rows)

        async def copy(events: list[dict[str, Any]]) -> int:
            await floor.copy_records_to_table(
                "bench_plain",
                records=[("bench", json.dumps(e)) for e in events],
                columns=["channel", "payload"],
            )
            return len(events)

        call: dict[str, Callable[[list[dict[str, Any]]], Awaitable[int]]] = {
            "pgherald": herald,
            "pgherald-tx": herald_tx,
            "pgqueuer": pgq,
            "asyncpg-unnest": unnest,
            "asyncpg-copy": copy,
        }
        data = [payloads(b) for b in range(batches + 1)]
        results: dict[str, list[dict[str, float]]] = {k: [] for k in KINDS}
        for run in range(runs):
            # Kinds interleaved batch by batch (order rotated): a machine whose load changes
            # during the run (other work on it) weighs on every kind alike.
            order = KINDS[run % len(KINDS) :] + KINDS[: run % len(KINDS)]
            for sql in dict.fromkeys(truncate.values()):
                await admin.execute(sql)
            await admin.execute("CHECKPOINT")
            for kind in order:
                assert await call[kind](data[0]) == N  # warm-up: plans, caches, codecs
            times: dict[str, list[float]] = {k: [] for k in KINDS}
            for events in data[1:]:
                for kind in order:
                    t0 = time.perf_counter()
                    got = await call[kind](events)
                    times[kind].append(time.perf_counter() - t0)
                    assert got == N, (kind, got)
            for kind in KINDS:
                results[kind].append(
                    {
                        "eps": batches * N / sum(times[kind]),
                        "batch_ms": statistics.median(times[kind]) * 1e3,
                    }
                )
            print(
                f"run {run + 1}/{runs}: "
                + ", ".join(f"{k} {results[k][-1]['eps']:,.0f}" for k in KINDS)
                + " events/s",
                flush=True,
            )
        return results
    finally:
        for c in (aconn, txconn, admin):
            await c.close()
        await apg.close()
        await floor.close()


def report(
    results: dict[str, list[dict[str, float]]], info: dict[str, str], runs: int, batches: int
) -> str:
    eps = {k: statistics.median(r["eps"] for r in v) for k, v in results.items()}
    rows = [["Kind", "Median events/s", "Median batch (ms)", "vs pgqueuer", "Runs (events/s)"]]
    for k in KINDS:
        rows.append(
            [
                LABEL[k],
                f"{eps[k]:,.0f}",
                f"{statistics.median(r['batch_ms'] for r in results[k]):.2f}",
                f"{eps[k] / eps['pgqueuer']:.2f}x",
                ", ".join(f"{r['eps']:,.0f}" for r in results[k]),
            ]
        )
    ratios = [
        h["eps"] / q["eps"] for h, q in zip(results["pgherald"], results["pgqueuer"], strict=True)
    ]
    lines = [
        "## Batch publish benchmark (`publish_many` vs pgqueuer's batch enqueue)",
        "",
        f"Command: `flock /tmp/pgherald-bench.lock {_report.command()}`  ",
        f"Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        *(f"- {k}: {v}" for k, v in info.items()),
        f"- Load average at end: {_report.load_average()}",
        "",
        f"Method: see `bench/publish_many_bench.py`. Batches of {N:,} ~100-byte JSON events "
        "(dicts, encoded inside the timed call for every kind), one autocommit statement per "
        f"batch; per run the tables are truncated, a CHECKPOINT taken, one warm-up batch per kind, "
        f"then {batches} rounds of one timed batch per kind (interleaved, order rotated between "
        f"runs); median of {runs} runs.",
        "",
        _report.table(rows),
        "",
        f"**Ratio apublish_many / pgqueuer enqueue: {eps['pgherald'] / eps['pgqueuer']:.2f}x** "
        f"(target >= 1.0x); in a transaction with its commit: "
        f"{eps['pgherald-tx'] / eps['pgqueuer']:.2f}x. Per run (same batches, interleaved): "
        + ", ".join(f"{r:.2f}x" for r in ratios)
        + f"; median {statistics.median(ratios):.2f}x, lowest {min(ratios):.2f}x.",
        "",
        "What differs: pgqueuer's enqueue also writes one row per job to its log table "
        "(`pgqueuer_log`); pgherald sends the batch as one JSON array (`jsonb_array_elements` "
        "on the server) rather than a `text[]` of JSON documents, whose quoting doubled the "
        "statement's time in a first version (about 0.9x of pgqueuer).",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = _report.parser(__doc__, "5 runs of 5 batches")
    ap.add_argument("--runs", type=int, default=None, help="runs (default 7; 5 with --quick)")
    args = ap.parse_args()
    runs = args.runs or (5 if args.quick else 7)
    batches = 5 if args.quick else 20
    info = _report.machine(
        args.dsn,
        settings=("synchronous_commit", "fsync", "shared_buffers"),
        extra={
            "pgherald": pgherald.__version__,
            "pgqueuer": _report.version("pgqueuer"),
            "asyncpg": _report.version("asyncpg"),
        },
    )
    with psycopg.connect(args.dsn, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {DBNAME} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {DBNAME}")
    try:
        results = asyncio.run(measure(args.dsn, runs, batches))
    finally:
        with psycopg.connect(args.dsn, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {DBNAME} WITH (FORCE)")
    _report.publish(report(results, info, runs, batches), args.output, START, END)


if __name__ == "__main__":
    main()
