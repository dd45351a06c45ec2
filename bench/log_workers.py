"""Worker processes for ``log_bench.py`` (one job per process).

Run as ``python bench/log_workers.py MODE ...``:

* ``waiter``: an idle consumer waiting for a wake-up, as pgherald's consumers wait: holds the
  shared advisory locks of queries.sql ``hold_wakeups`` and LISTENs on
  ``pgherald_wake_v1``; prints ``READY``, then reads (and counts) wake-ups until ``STOP`` on
  stdin, without ever reading the log; prints a JSON result.
* ``quiet``: a fresh `Consumer` of ``--channel`` (default options, handler style); the time
  from constructing it to having ``--count`` events.
* ``drain``: a fresh `Consumer` (default options, handler style) of ``--channel`` (none: every
  channel) drains ``--count`` events; events/s from ``run()``.
* ``keyset``: the hand-written floor: a plain psycopg loop of ``SELECT ... WHERE channel = %s
  AND (tx, id) > (%s, %s) ORDER BY tx, id LIMIT 5000``, payloads decoded, until ``--count``.
* ``lat-recv --kind pgherald|seed|seed-read|note-floor``: a default `Consumer` (handler
  style), a psycopg 3 LISTEN loop on the seeds' channel, the durable reader a user writes by
  hand, or a bare loop over pgherald's wake-up notes (the floor of a consumer of notes);
  records publish-to-handler latency of ``--count`` events.
* ``lat-send --kind pgherald|seed|...``: ``--rate`` events/s on ``--channel`` for ``--seconds``,
  one per autocommit transaction: ``pgherald.publish``, or the seeds' INSERT + ``pg_notify``
  in one statement. (``lat-recv``'s Consumer reads the channel named like its group.)

Every worker has a deadline and exits by itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from typing import Any

PAD = "x" * 60  # with the other fields, a ~100-byte JSON payload
SEED_CHANNEL = "event_notification"  # the seeds' LISTEN channel (seed 001)
# The seeds' shape (seed 001: INSERT into the event table, then pg_notify in the same
# transaction), as one statement: one round trip, like publish. The NOTIFY carries the
# payload, so the listener needs no read (the cheapest a hand-written listener can be).
SEED_SQL = (
    "WITH i AS (INSERT INTO bench_minimal (channel, payload) VALUES (%s, %s::jsonb) RETURNING id) "
    "SELECT pg_notify('event_notification', %s) FROM i"
)
KEYSET_SQL = (
    "SELECT id, tx::text, payload FROM pgherald.events_v1 "
    "WHERE channel = %s AND (tx, id) > (%s::xid8, %s) ORDER BY tx, id LIMIT 5000"
)


def emit(obj: object) -> None:
    sys.stdout.write((obj if isinstance(obj, str) else json.dumps(obj)) + "\n")
    sys.stdout.flush()


def payload(i: int, ts: int) -> dict[str, Any]:
    return {"i": i, "kind": "order.created", "ts": ts, "pad": PAD}


def stop_on_stdin() -> threading.Event:
    """An event set when the orchestrator writes STOP (or closes stdin)."""
    done = threading.Event()

    def read() -> None:
        for line in sys.stdin:
            if line.strip() == "STOP":
                break
        done.set()

    threading.Thread(target=read, daemon=True).start()
    return done


# -- an idle waiting consumer --------------------------------------------------------------


def waiter(dsn: str, timeout: float) -> dict[str, Any]:
    import psycopg

    from pgherald import sql as pgherald_sql

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("LISTEN pgherald_wake_v1")
        conn.execute(pgherald_sql.query("hold_wakeups"))  # as a waiting consumer holds them
        done = stop_on_stdin()
        emit("READY")
        n = 0
        end = time.monotonic() + timeout
        while not done.is_set() and time.monotonic() < end:
            for _ in conn.notifies(timeout=0.1):
                n += 1
    return {"ok": True, "wakeups": n}


# -- reads ---------------------------------------------------------------------------------


def quiet(dsn: str, group: str, channel: str, count: int, timeout: float) -> dict[str, Any]:
    import pgherald

    got: list[float] = []
    t0 = time.perf_counter()
    consumer = pgherald.Consumer(dsn, group=group, channels=[channel])  # default options
    timer = threading.Timer(timeout, consumer.stop)
    timer.daemon = True

    @consumer.on(channel)
    def handle(event: Any) -> None:
        got.append(time.perf_counter())
        if len(got) >= count:
            consumer.stop()

    with consumer:
        t_conn = time.perf_counter()
        timer.start()
        consumer.run()
        timer.cancel()
    if len(got) < count:
        return {"ok": False, "error": f"got {len(got)} of {count} events in {timeout:g} s"}
    return {
        "ok": True,
        "count": len(got),
        "total_ms": (got[count - 1] - t0) * 1000,  # from Consumer(...) to the last event
        "connect_ms": (t_conn - t0) * 1000,
        "run_ms": (got[count - 1] - t_conn) * 1000,  # from run() to the last event
    }


def drain(dsn: str, group: str, channel: str | None, count: int, timeout: float) -> dict[str, Any]:
    import pgherald

    channels = [channel] if channel else []
    consumer = pgherald.Consumer(dsn, group=group, channels=channels)  # default options
    n = 0
    timer = threading.Timer(timeout, consumer.stop)
    timer.daemon = True

    def handle(event: Any) -> None:
        nonlocal n
        n += 1
        if n >= count:
            consumer.stop()

    if channel:
        consumer.on(channel)(handle)
    with consumer:
        emit("READY")
        timer.start()
        t0, c0 = time.perf_counter(), time.process_time()
        if channel:
            consumer.run()
        else:  # every channel: no channels and no handlers (see docs/durable.md)
            for _event in consumer:
                handle(_event)
                if n >= count:
                    break
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        timer.cancel()
    return {
        "ok": n > 0,
        "partial": n < count,
        "error": None if n else "no event consumed",
        "count": n,
        "wall": wall,
        "rate": n / wall if wall else 0.0,
        "cpu_s": cpu,
        "reads": consumer.stats.reads,
        "per_read": n / consumer.stats.reads if consumer.stats.reads else None,
    }


def keyset(dsn: str, channel: str, count: int, timeout: float) -> dict[str, Any]:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        emit("READY")
        tx, last, n, reads = "0", 0, 0, 0
        t0, c0 = time.perf_counter(), time.process_time()
        end = t0 + timeout
        while n < count and time.perf_counter() < end:
            rows = conn.execute(KEYSET_SQL, (channel, tx, last)).fetchall()  # payloads decoded
            if not rows:
                break
            reads += 1
            n += len(rows)
            last, tx = rows[-1][0], rows[-1][1]
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "ok": n > 0,
        "partial": n < count,
        "count": n,
        "wall": wall,
        "rate": n / wall if wall else 0.0,
        "cpu_s": cpu,
        "reads": reads,
        "per_read": n / reads if reads else None,
    }


# -- latency -------------------------------------------------------------------------------


def summary(lats: list[int], count: int) -> dict[str, Any]:
    if len(lats) < count:
        return {"ok": False, "error": f"got {len(lats):,} of {count:,} events before timeout"}
    kept = sorted(lats[len(lats) // 20 :])  # drop the first 5% (warm-up)
    ms = [x / 1e6 for x in kept]
    q = statistics.quantiles(ms, n=100)
    return {"ok": True, "count": len(lats), "p50_ms": q[49], "p99_ms": q[98], "max_ms": ms[-1]}


def lat_recv(dsn: str, kind: str, group: str, count: int, timeout: float) -> dict[str, Any]:
    lats: list[int] = []
    if kind == "seed":
        import psycopg

        loads = json.loads
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"LISTEN {SEED_CHANNEL}")  # our own constant name
            emit("READY")
            end = time.monotonic() + timeout
            while len(lats) < count and time.monotonic() < end:
                for n in conn.notifies(timeout=0.5):
                    lats.append(time.time_ns() - loads(n.payload)["ts"])
                    if len(lats) >= count:
                        break
        return summary(lats, count)

    if kind == "seed-read":
        return lat_recv_by_hand(dsn, group, count, timeout)
    if kind == "note-floor":
        return lat_recv_notes(dsn, count, timeout)

    import pgherald

    # A fresh channel per run (the group's name): a fresh group starts at the beginning, so a
    # channel shared with earlier runs would hand it their (old) events first.
    consumer = pgherald.Consumer(dsn, group=group, channels=[group])  # default options
    timer = threading.Timer(timeout, consumer.stop)
    timer.daemon = True

    @consumer.on(group)
    def handle(event: Any) -> None:
        lats.append(time.time_ns() - event.payload["ts"])
        if len(lats) >= count:
            consumer.stop()

    with consumer:
        emit("READY")
        timer.start()
        consumer.run()
        timer.cancel()
    res = summary(lats, count)
    res["reads"] = consumer.stats.reads  # reads sent (wake-ups, lingering, polls)
    return res


def lat_recv_by_hand(dsn: str, channel: str, count: int, timeout: float) -> dict[str, Any]:
    """The durable reader a user writes by hand on the seeds' table (the floor of a consumer
    that reads its events from a table): LISTEN; at each notification, read the rows after
    the last one handled (prepared, on the primary key), handle them, store the position
    (one autocommit UPDATE, as an acknowledgement). No commit-order safety (a row id can
    commit after a larger one): a lower bound, not a design to copy."""
    import psycopg

    lats: list[int] = []
    reads = 0
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS bench_position (name text PRIMARY KEY, last_id bigint)"
        )
        conn.execute(
            "INSERT INTO bench_position VALUES (%s, 0) ON CONFLICT (name) DO NOTHING", (channel,)
        )
        (last,) = conn.execute("SELECT coalesce(max(id), 0) FROM bench_minimal").fetchone() or (0,)
        conn.execute(f"LISTEN {SEED_CHANNEL}")  # our own constant name
        emit("READY")
        read = "SELECT id, payload FROM bench_minimal WHERE channel = %s AND id > %s ORDER BY id"
        ack = "UPDATE bench_position SET last_id = %s WHERE name = %s"
        end = time.monotonic() + timeout
        while len(lats) < count and time.monotonic() < end:
            # (a query inside the notifies() loop would wait for the connection's lock)
            if not list(conn.notifies(timeout=0.5, stop_after=1)):
                continue
            if True:
                reads += 1
                rows = conn.execute(read, (channel, last)).fetchall()
                for row_id, data in rows:
                    lats.append(time.time_ns() - data["ts"])
                    last = row_id
                if rows:
                    conn.execute(ack, (last, channel))
    res = summary(lats, count)
    res["reads"] = reads
    return res


def lat_recv_notes(dsn: str, count: int, timeout: float) -> dict[str, Any]:
    """The floor of any consumer of wake-up notes: a psycopg loop that asks for notes as a
    waiting consumer does (the shared wake-up locks, queries.sql hold_wakeups, and the notes'
    key 18), and takes the payload out of each note: no signature check, no order proof, no
    acknowledgement. What ``pgherald.publish`` and its note cost, and nothing of the Consumer."""
    import psycopg

    lats: list[int] = []
    loads = json.loads
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT count(pg_advisory_lock_shared(hashtext('pgherald.wake_v1'), s)) "
            "FROM generate_series(1, 18) AS s"
        )
        conn.execute("LISTEN pgherald_wake_v1")
        emit("READY")
        end = time.monotonic() + timeout
        while len(lats) < count and time.monotonic() < end:
            for n in conn.notifies(timeout=0.5):
                # n1|mac|id|tx|partition|created|older|skips|len_ch|len_key|len_hdr|rest
                f = n.payload.split("|", 11)
                if len(f) < 12:
                    continue  # a plain wake-up (a note too large, or past 16 in a transaction)
                skip = int(f[8]) + max(int(f[9]), 0) + max(int(f[10]), 0)
                lats.append(time.time_ns() - loads(f[11][skip:])["ts"])
                if len(lats) >= count:
                    break
    return summary(lats, count)


def lat_send(dsn: str, kind: str, channel: str, rate: float, seconds: float) -> dict[str, Any]:
    import psycopg

    import pgherald

    total = int(rate * seconds)
    max_lag = 0.0
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.cursor()
        t0 = time.perf_counter()
        for i in range(total):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            else:
                max_lag = max(max_lag, -delay)
            # autocommit: the statement that inserts also commits, right after this timestamp
            if kind.startswith("seed"):
                text = dumps(payload(i, time.time_ns()))
                cur.execute(SEED_SQL, (channel, text, text))
            else:
                pgherald.publish(conn, channel, payload(i, time.time_ns()))
        wall = time.perf_counter() - t0
    return {"ok": True, "count": total, "rate": total / wall, "max_lag_ms": max_lag * 1000}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["waiter", "quiet", "drain", "keyset", "lat-recv", "lat-send"])
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--kind", default="pgherald")
    ap.add_argument("--group", default="bench")
    ap.add_argument("--channel", default=None)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--count", type=int, default=0)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--timeout", type=float, default=120.0)
    a = ap.parse_args()
    try:
        if a.mode == "waiter":
            res = waiter(a.dsn, a.timeout)
        elif a.mode == "quiet":
            res = quiet(a.dsn, a.group, a.channel, a.count, a.timeout)
        elif a.mode == "drain":
            res = drain(a.dsn, a.group, a.channel, a.count, a.timeout)
        elif a.mode == "keyset":
            res = keyset(a.dsn, a.channel, a.count, a.timeout)
        elif a.mode == "lat-recv":
            res = lat_recv(a.dsn, a.kind, a.group, a.count, a.timeout)
        else:
            res = lat_send(a.dsn, a.kind, a.channel or "lat", a.rate, a.seconds)
    except Exception as exc:  # reported, not raised: the orchestrator prints it
        res = {"ok": False, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())}"}
    emit(res)


if __name__ == "__main__":
    main()
