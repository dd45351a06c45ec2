"""Worker processes for ``durable_bench.py`` (one job per process).

Run as ``python bench/durable_workers.py MODE ...``:

* ``write --kind plain|notify|publish``: connect (autocommit), print ``READY``, wait for ``GO``
  on stdin, then commit one event per transaction for ``--seconds``; print a JSON result.
* ``consume --style handler|iter``: consume ``--count`` events of a backlog with a fresh group;
  print ``READY`` once connected, then a JSON result (wall time, where the time went).
* ``lat-recv``: a default `Consumer` (handler style) that records commit-to-handler latency.
* ``lat-send``: publish ``--rate`` events/s, one per autocommit transaction, for ``--seconds``.

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

PLAIN_SQL = (
    "INSERT INTO bench_plain (channel, key, payload, headers) VALUES (%s, %s, %s::jsonb, %s::jsonb)"
)
# The naive approach: the INSERT and a NOTIFY in the same (single-statement) transaction.
NOTIFY_SQL = (
    "WITH i AS (INSERT INTO bench_plain (channel, key, payload, headers) "
    "VALUES (%s, %s, %s::jsonb, %s::jsonb) RETURNING id) "
    "SELECT pg_notify('x', '') FROM i"
)


def emit(obj: object) -> None:
    sys.stdout.write((obj if isinstance(obj, str) else json.dumps(obj)) + "\n")
    sys.stdout.flush()


def payload(i: int, ts: int) -> dict[str, Any]:
    return {"i": i, "kind": "order.created", "ts": ts, "pad": PAD}


# -- writers -------------------------------------------------------------------------------


def write(dsn: str, kind: str, seconds: float) -> dict[str, Any]:
    import psycopg

    import pgherald

    # publish-nowake: publish with its wake-up NOTIFY switched off (the documented setting
    # pgherald.wake_max_queue_usage=0), to separate the NOTIFY's cost from the rest.
    options = "-c pgherald.wake_max_queue_usage=0" if kind == "publish-nowake" else ""
    with psycopg.connect(dsn, autocommit=True, options=options) as conn:
        cur = conn.cursor()
        dumps = json.dumps
        if kind.startswith("publish"):

            def one(i: int) -> None:
                pgherald.publish(conn, "bench", payload(i, 0))

        else:
            q = PLAIN_SQL if kind == "plain" else NOTIFY_SQL

            def one(i: int) -> None:
                # Same work on the client as publish: encode the payload, one statement.
                cur.execute(q, ("bench", None, dumps(payload(i, 0), separators=(",", ":")), None))
                if kind == "notify":
                    cur.fetchone()

        for i in range(20):  # warm up: prepared statements, caches
            one(-i)
        emit("READY")
        if sys.stdin.readline().strip() != "GO":
            return {"ok": False, "error": "no GO"}
        n = 0
        t0 = time.perf_counter()
        end = t0 + seconds
        lat: list[float] = []
        while True:
            s = time.perf_counter()
            if s >= end:
                break
            one(n)
            lat.append(time.perf_counter() - s)
            n += 1
        wall = time.perf_counter() - t0
    return {
        "ok": True,
        "count": n,
        "wall": wall,
        "tx_ms_median": statistics.median(lat) * 1000 if lat else None,
    }


# -- backlog consumer ----------------------------------------------------------------------


def consume(
    dsn: str, style: str, group: str, count: int, batch: int, max_batch: int | None, timeout: float
) -> dict:
    """Drain *count* events. Styles: handler, iter (Consumer), async-handler, async-iter
    (AsyncConsumer on asyncio)."""
    import pgherald

    kwargs: dict[str, Any] = {"group": group, "channels": ["bench"], "batch_size": batch}
    if max_batch is not None:
        kwargs["max_batch_size"] = max_batch
    is_async = style.startswith("async")
    consumer: Any = (pgherald.AsyncConsumer if is_async else pgherald.Consumer)(dsn, **kwargs)
    # Instrumentation only: time the engine's read and ack steps from the outside (each is a
    # generator driven by the runtime: the time includes waiting for the server).
    engine = consumer._engine
    spent = {"fetch": 0.0, "ack": 0.0, "fetches": 0, "max_read": 0}
    fetch, ack = engine.fetch, engine.ack

    def timed_fetch(*a: Any, **k: Any) -> Any:
        s = time.perf_counter()
        events = None
        try:
            events = yield from fetch(*a, **k)
            return events
        finally:
            spent["fetch"] += time.perf_counter() - s
            if events:  # reads that returned events (empty polls are not counted)
                spent["fetches"] += 1
                spent["max_read"] = max(spent["max_read"], len(events))

    def timed_ack(*a: Any, **k: Any) -> Any:
        s = time.perf_counter()
        try:
            return (yield from ack(*a, **k))
        finally:
            spent["ack"] += time.perf_counter() - s

    engine.fetch = timed_fetch
    engine.ack = timed_ack
    n = 0
    timer = threading.Timer(timeout, consumer.stop)
    timer.daemon = True

    def handle(event: Any) -> None:
        nonlocal n
        n += 1
        if n >= count:
            consumer.stop()

    async def amain() -> tuple[float, float]:
        nonlocal n
        async with consumer:
            emit("READY")
            timer.start()
            t0, c0 = time.perf_counter(), time.process_time()
            if style == "async-handler":
                consumer.on("bench")(handle)
                await consumer.run()
            else:
                async for _event in consumer:
                    n += 1
                    if n >= count:
                        break
            return time.perf_counter() - t0, time.process_time() - c0

    if is_async:
        import asyncio

        wall, cpu = asyncio.run(amain())
    else:
        with consumer:
            emit("READY")
            timer.start()
            t0, c0 = time.perf_counter(), time.process_time()
            if style == "handler":
                consumer.on("bench")(handle)
                consumer.run()
            else:
                for _event in consumer:
                    n += 1
                    if n >= count:
                        break
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    timer.cancel()
    return {
        # Stopped by the time cap: still a measurement (events/s so far), marked partial.
        "ok": n > 0,
        "partial": n < count,
        "error": None if n else "no event consumed",
        "count": n,
        "wall": wall,
        "rate": n / wall if wall else 0.0,
        "cpu_s": cpu,
        "fetch_s": spent["fetch"],
        "ack_s": spent["ack"],
        "fetches": spent["fetches"],
        "max_read": spent["max_read"],
    }


# -- latency -------------------------------------------------------------------------------


def lat_recv(dsn: str, group: str, count: int, timeout: float) -> dict[str, Any]:
    import pgherald

    consumer = pgherald.Consumer(dsn, group=group, channels=["lat"])  # default options
    lats: list[int] = []
    timer = threading.Timer(timeout, consumer.stop)
    timer.daemon = True

    @consumer.on("lat")
    def handle(event: Any) -> None:
        lats.append(time.time_ns() - event.payload["ts"])
        if len(lats) >= count:
            consumer.stop()

    with consumer:
        emit("READY")
        timer.start()
        consumer.run()
        timer.cancel()
    if len(lats) < count:
        return {"ok": False, "error": f"got {len(lats):,} of {count:,} events before timeout"}
    kept = sorted(lats[len(lats) // 20 :])  # drop the first 5% (warm-up)
    ms = [x / 1e6 for x in kept]
    q = statistics.quantiles(ms, n=100)
    return {"ok": True, "count": len(lats), "p50_ms": q[49], "p99_ms": q[98], "max_ms": ms[-1]}


def lat_send(dsn: str, rate: float, seconds: float) -> dict[str, Any]:
    import psycopg

    import pgherald

    total = int(rate * seconds)
    max_lag = 0.0
    with psycopg.connect(dsn, autocommit=True) as conn:
        t0 = time.perf_counter()
        for i in range(total):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            else:
                max_lag = max(max_lag, -delay)
            # autocommit: the statement that inserts also commits, right after this timestamp
            pgherald.publish(conn, "lat", payload(i, time.time_ns()))
        wall = time.perf_counter() - t0
    return {"ok": True, "count": total, "rate": total / wall, "max_lag_ms": max_lag * 1000}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["write", "consume", "lat-recv", "lat-send"])
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--kind", default="publish")
    ap.add_argument("--style", default="handler")
    ap.add_argument("--group", default="bench")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--count", type=int, default=0)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--max-batch", type=int, default=None)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--timeout", type=float, default=120.0)
    a = ap.parse_args()
    try:
        if a.mode == "write":
            res = write(a.dsn, a.kind, a.seconds)
        elif a.mode == "consume":
            res = consume(a.dsn, a.style, a.group, a.count, a.batch, a.max_batch, a.timeout)
        elif a.mode == "lat-recv":
            res = lat_recv(a.dsn, a.group, a.count, a.timeout)
        else:
            res = lat_send(a.dsn, a.rate, a.seconds)
    except Exception as exc:  # reported, not raised: the orchestrator prints it
        res = {"ok": False, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())}"}
    emit(res)


if __name__ == "__main__":
    main()
