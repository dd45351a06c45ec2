"""Where the durable trigger's time goes: its generated function taken apart, in the server.

Usage::

    flock /tmp/pgherald-bench.lock python bench/trigger_breakdown.py [--dsn DSN] [--runs 5]

Method.  A fresh database (``pgherald_trigger_breakdown``, dropped and recreated, ``pgherald
install``ed) with trigger_bench.py's 10-column table. Each variant is a trigger function on
that table; 5,000 one-row transactions of INSERT, then of UPDATE, are looped inside the server
(a ``DO`` block that commits after each row, ``synchronous_commit=off``, no listener), and the
figure is the server process's CPU time per transaction (``/proc/PID/schedstat``), median of
``--runs``. Variants:

* ``none``: no trigger; ``seed``: the seed's hand-written trigger (trigger_bench.py's);
* ``ours``: the function ``pgherald trigger add --durable`` generates, as is;
* ``ours, no wake-up``: without its wake-up block (the advisory-lock gate of publish_v1);
* ``ours into an unpartitioned copy``: the same, inserting into ``LIKE events_v1 INCLUDING
  ALL`` (every index, default, generated column; no partition routing);
* ``... with only its primary key``: the copy without the ``events_v1_read`` index;
* ``ours into a minimal table``: (id identity primary key, channel, key, payload, created_at);
* ``the row only, minimal table`` / ``the row only, events_v1``: a trigger that inserts just
  ``to_jsonb(NEW)``, as the seed does, into the minimal table / into the log itself.

What it shows: what the log table costs per row (partitioning, its second index, its
generated and default columns) and what the event (both images, the diff, the envelope) costs,
against the seed's whole trigger.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "src"), str(HERE)]

import trigger_bench as tb  # noqa: E402  (this folder: the same table, seed and clock)

DBNAME = "pgherald_trigger_breakdown"
TX = 5000
WRITES = {
    "insert": f"INSERT INTO {tb.TABLE} ({tb.INSERT_COLUMNS}) "
    "VALUES (i, i, 'new', 'note ' || i, 'EUR', i % 7, 'eu-west', now(), now())",
    "update": f"UPDATE {tb.TABLE} SET amount = amount + 1, updated_at = now() WHERE id = 1 + i % 400",
}
ROW_ONLY = (
    "BEGIN INSERT INTO {} (channel, key, payload) "
    f"VALUES ('public.{tb.TABLE}', NEW.id::text, to_jsonb(NEW)); RETURN NULL; END"
)


def variants(conn: Any) -> dict[str, str | None]:
    """Variant name -> the body of its trigger function (None: no trigger)."""
    import pgherald

    pgherald.add_table_trigger(conn, tb.TABLE, durable=True)
    row = conn.execute(
        "SELECT p.prosrc FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid "
        "WHERE t.tgrelid = %s::regclass AND t.tgname = 'pgherald_change_v1'",
        (tb.TABLE,),
    ).fetchone()
    ours: str = row[0]
    pgherald.remove_table_trigger(conn, tb.TABLE)
    wake = ours[ours.index("    IF pg_try_advisory_lock") : ours.index("    RETURN NULL;\nEND")]
    log = "INSERT INTO pgherald.events_v1"
    seed = tb.SEED[tb.SEED.index("DECLARE") : tb.SEED.rindex("$$")].replace(
        "TG_ARGV[0]", f"'public.{tb.TABLE}'"
    )
    return {
        "none": None,
        "seed": seed,
        "ours": ours,
        "ours, no wake-up": ours.replace(wake, ""),
        "ours into an unpartitioned copy": ours.replace(wake, "").replace(
            log, "INSERT INTO ev_copy"
        ),
        "... with only its primary key": ours.replace(wake, "").replace(log, "INSERT INTO ev_pk"),
        "ours into a minimal table": ours.replace(wake, "").replace(log, "INSERT INTO ev_min"),
        "the row only, minimal table": ROW_ONLY.format("ev_min"),
        "the row only, events_v1": ROW_ONLY.format("pgherald.events_v1"),
    }


def setup(admin_dsn: str) -> str:
    import psycopg
    from psycopg.conninfo import make_conninfo

    import pgherald

    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {DBNAME} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {DBNAME}")
    dsn = make_conninfo(admin_dsn, dbname=DBNAME)
    with psycopg.connect(dsn, autocommit=True) as conn:
        pgherald.install(conn)
        conn.execute(f"CREATE TABLE {tb.TABLE} ({tb.COLUMNS})")
        conn.execute(tb.SEED.split("CREATE OR REPLACE FUNCTION")[0])  # notification_events
        conn.execute("CREATE TABLE ev_copy (LIKE pgherald.events_v1 INCLUDING ALL)")
        conn.execute(
            "CREATE TABLE ev_pk (LIKE pgherald.events_v1 INCLUDING DEFAULTS INCLUDING "
            "IDENTITY INCLUDING GENERATED INCLUDING CONSTRAINTS, PRIMARY KEY (id))"
        )
        conn.execute(
            "CREATE TABLE ev_min (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
            "channel text, key text, payload jsonb, created_at timestamptz NOT NULL DEFAULT now())"
        )
    return dsn


def measure(conn: Any, body: str | None, op: str) -> float:
    conn.execute(f"DROP TRIGGER IF EXISTS breakdown ON {tb.TABLE}")
    if body is not None:
        conn.execute(
            "CREATE OR REPLACE FUNCTION breakdown() RETURNS trigger LANGUAGE plpgsql AS $f$"
            + body
            + "$f$"
        )
        conn.execute(
            f"CREATE TRIGGER breakdown AFTER INSERT OR UPDATE OR DELETE ON {tb.TABLE} "
            "FOR EACH ROW EXECUTE FUNCTION breakdown()"
        )
    conn.execute(f"TRUNCATE {tb.TABLE} RESTART IDENTITY")
    conn.execute("TRUNCATE pgherald.events_v1, ev_copy, ev_pk, ev_min, notification_events")
    conn.execute(
        f"INSERT INTO {tb.TABLE} ({tb.INSERT_COLUMNS}) SELECT g, 0, 'seed', 'seed row', 'EUR', "
        "g % 7, 'eu-west', now(), now() FROM generate_series(1, 400) g"
    )
    conn.execute(f"VACUUM ANALYZE {tb.TABLE}")
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    clock = tb.backend_clock(int(row[0]))
    t0 = clock()
    conn.execute(f"DO $$ BEGIN FOR i IN 1..{TX} LOOP {WRITES[op]}; COMMIT; END LOOP; END $$")
    return (clock() - t0) / TX * 1e6


def main() -> None:
    import os

    import psycopg

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--dsn",
        default=os.environ.get("PGHERALD_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    dsn = setup(args.dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = off")
        bodies = variants(conn)
        results: dict[str, dict[str, list[float]]] = {k: {op: [] for op in WRITES} for k in bodies}
        for _ in range(args.runs):  # interleaved
            for name, body in bodies.items():
                for op in WRITES:
                    results[name][op].append(measure(conn, body, op))
    base = {op: statistics.median(results["none"][op]) for op in WRITES}
    print(f"load average: {' / '.join(f'{x:.2f}' for x in os.getloadavg())}; runs: {args.runs}")
    print("| Trigger | INSERT µs/tx (added) | UPDATE µs/tx (added) |")
    print("|---|---|---|")
    for name, by_op in results.items():
        cells = []
        for op in WRITES:
            m = statistics.median(by_op[op])
            lo, hi = min(by_op[op]), max(by_op[op])
            cells.append(f"{m:.1f} (+{m - base[op]:.1f}; {lo:.1f} to {hi:.1f})")
        print(f"| {name} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
