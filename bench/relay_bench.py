"""Relay benchmark: `pgherald.AsyncRelay` into NATS JetStream and Redis Streams, against the floor
of publishing the same messages to the same broker from a plain loop.

Usage::

    python bench/relay_bench.py [--dsn DSN] [--nats URL] [--redis URL] [--quick]
                                [--output docs/benchmarks.md]

Method.  A fresh database (``pgherald_bench_relay``) with pgherald's schema and a backlog of N
events (200,000; 50,000 with ``--quick``) on channel ``bench``, ~100-byte JSON payloads, 1,000
keys, loaded with ``publish_v1`` over ``generate_series`` and VACUUM ANALYZEd.

* Throughput: an `AsyncRelay` (fresh group, start "beginning", defaults: reads of 1,000 growing
  to 20,000 over the backlog) relays the whole backlog into a fresh JetStream stream (file
  storage) or Redis stream; wall time from ``run()`` to the broker's acknowledgement of the
  last event.  The floor, in the same run: the same N messages (same subject/stream, same
  headers or fields, same payloads), already in memory, published from a plain loop in batches
  of 20,000 and every acknowledgement awaited: for JetStream with nats-py's public
  ``js.publish_async`` and with pipelined ``HPUB`` commands on a reply inbox (the relay's own
  technique); for Redis with the relay's script as ``EVALSHA`` commands encoded by hand and
  written at once on one connection (the relay's own technique), with a redis-py pipeline of
  the relay's script, and with a redis-py pipeline of plain ``XADD``. The payloads are the
  events' JSON text as the log holds it, which the relay passes through.
  Median of 3 runs (1 with ``--quick``), kinds interleaved.
* Latency: a publisher process commits one event per transaction at 1,000 events/s for 5 s
  (2 s with ``--quick``), ``time.time_ns()`` in the payload just before the statement; the relay
  runs in its own process; a subscriber in this process (a core NATS subscription on the
  subject; ``XREAD BLOCK`` on the stream) records ``time.time_ns() - ts`` on arrival.  The
  floor: the same publisher loop publishing straight to the broker (no database).  First 5%
  dropped; p50 and p99.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import statistics
import sys
import time
from typing import Any

import _report  # bench/_report.py: shared by every benchmark
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

START, END = "<!-- relay-bench:start -->", "<!-- relay-bench:end -->"
DBNAME = "pgherald_bench_relay"
PAYLOAD = {"order": 0, "customer": "c-0000000", "state": "paid", "note": "x" * 40}


def db_dsn(dsn: str) -> str:
    params = conninfo_to_dict(dsn)
    params["dbname"] = DBNAME
    return make_conninfo(**params)


def setup(dsn: str, n: int) -> str:
    import pgherald

    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {DBNAME} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {DBNAME}")
    target = db_dsn(dsn)
    with psycopg.connect(target, autocommit=True) as conn:
        pgherald.install(conn)
        payload = json.dumps(PAYLOAD)
        for start in range(0, n, 50_000):
            conn.execute(
                "SELECT pgherald.publish_v1('bench', (%s::jsonb || jsonb_build_object('order', i)),"
                " 'k' || (i %% 1000), NULL) FROM generate_series(%s::int, %s::int) AS i",
                (payload, start, min(n, start + 50_000) - 1),
            )
        conn.execute("VACUUM ANALYZE pgherald.events_v1")
    return target


def messages(dsn: str) -> list[tuple[int, str, bytes]]:
    """(event id, key, payload) as the relay sends them: the payload's JSON text from the log."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT id, key, payload::text FROM pgherald.events_v1 ORDER BY id"
        ).fetchall()
    return [(ident, key, payload.encode()) for ident, key, payload in rows]


# -- JetStream --


async def nats_reset(url: str, stream: str, subject: str) -> None:
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream()
    with contextlib.suppress(Exception):
        await js.delete_stream(stream)
    await js.add_stream(name=stream, subjects=[subject])
    await nc.close()


async def relay_run(dsn: str, to: str, n: int, group: str, **options: Any) -> float:
    import pgherald

    relay = pgherald.AsyncRelay(dsn, to=to, channels=["bench"], group=group, **options)
    t0 = time.perf_counter()
    task = asyncio.create_task(relay.run())
    while relay.stats.relayed < n:
        if task.done():
            task.result()
            raise RuntimeError("relay ended early")
        await asyncio.sleep(0.002)
    elapsed = time.perf_counter() - t0
    relay.stop()
    await task
    return n / elapsed


async def nats_floor(url: str, subject: str, msgs: list[Any], mode: str) -> float:
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream(publish_async_max_pending=20_000)
    created = b"2026-12-06T10:00:00+00:00"
    t0 = time.perf_counter()
    if mode == "publish_async":
        for start in range(0, len(msgs), 20_000):
            futures = []
            for ident, key, payload in msgs[start : start + 20_000]:
                headers = {
                    "Nats-Msg-Id": str(ident),
                    "Pgherald-Event-Id": str(ident),
                    "Pgherald-Channel": "bench",
                    "Pgherald-Created-At": created.decode(),
                    "Pgherald-Key": key,
                }
                futures.append(await js.publish_async(subject, payload, headers=headers))
            await asyncio.gather(*futures)
    else:
        inbox = nc.new_inbox()
        acked = [0]
        done = asyncio.Event()
        target = [0]

        async def on_ack(msg: Any) -> None:
            acked[0] += 1
            if acked[0] >= target[0]:
                done.set()

        await nc.subscribe(inbox + ".*", cb=on_ack, pending_msgs_limit=-1, pending_bytes_limit=-1)
        reply = (inbox + ".").encode()
        subj = subject.encode()
        for start in range(0, len(msgs), 20_000):
            batch = msgs[start : start + 20_000]
            target[0] += len(batch)
            done.clear()
            chunk = []
            for i, (ident, key, payload) in enumerate(batch):
                ident_b = str(ident).encode()
                head = b"".join(
                    [
                        b"NATS/1.0\r\nNats-Msg-Id: ",
                        ident_b,
                        b"\r\nPgherald-Event-Id: ",
                        ident_b,
                        b"\r\nPgherald-Channel: bench\r\nPgherald-Created-At: ",
                        created,
                        b"\r\nPgherald-Key: ",
                        key.encode(),
                        b"\r\n\r\n",
                    ]
                )
                chunk.append(
                    b"HPUB %s %s%d %d %d\r\n%s%s\r\n"
                    % (subj, reply, start + i, len(head), len(head) + len(payload), head, payload)
                )
                if len(chunk) >= 512:
                    await nc._send_command(b"".join(chunk))
                    await nc._flush_pending()
                    chunk = []
            if chunk:
                await nc._send_command(b"".join(chunk))
                await nc._flush_pending()
            await asyncio.wait_for(done.wait(), 60)
    elapsed = time.perf_counter() - t0
    await nc.close()
    return len(msgs) / elapsed


# -- Redis --


async def redis_floor(url: str, stream: str, msgs: list[Any], mode: str) -> float:
    import redis.asyncio

    from pgherald._relay_redis import SCRIPT

    client = redis.asyncio.Redis.from_url(url)
    await client.delete(stream, f"{stream}:pgherald-positions")
    script = client.register_script(SCRIPT)
    sha = (await client.script_load(SCRIPT)).encode()
    created = "2026-12-06T10:00:00+00:00"
    t0 = time.perf_counter()
    for start in range(0, len(msgs), 20_000):
        batch = msgs[start : start + 20_000]
        if mode == "resp":  # the relay's technique: EVALSHA encoded by hand, one write
            conn = await client.connection_pool.get_connection()
            commands = []
            head = b"".join(
                _bulk(a.encode())
                for a in (stream, f"{stream}:pgherald-positions", "bench-floor", "")
            )
            for c in range(0, len(batch), 500):
                part = batch[c : c + 500]
                args = [
                    b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n$1\r\n2\r\n%s"
                    % (7 + 8 * len(part), sha, head)
                ]
                for ident, key, payload in part:
                    ident_b = b"%d" % ident
                    key_b = b"=" + key.encode()
                    args.append(
                        b"$%d\r\n%d\r\n$41\r\n%020d:%020d\r\n$%d\r\n%s\r\n$5\r\nbench\r\n"
                        b"$%d\r\n%s\r\n$25\r\n%s\r\n$%d\r\n%s\r\n$0\r\n\r\n"
                        % (
                            len(b"%d" % (ident % 16)),
                            ident % 16,
                            ident,
                            ident,
                            len(ident_b),
                            ident_b,
                            len(key_b),
                            key_b,
                            created.encode(),
                            len(payload),
                            payload,
                        )
                    )
                commands.append(b"".join(args))
            await conn.send_packed_command(commands)
            for _ in commands:
                await conn.read_response()
            await client.connection_pool.release(conn)
            continue
        async with client.pipeline(transaction=False) as pipe:
            if mode == "xadd":
                for ident, key, payload in batch:
                    fields = {
                        "id": ident,
                        "channel": "bench",
                        "key": key,
                        "created_at": created,
                        "payload": payload,
                    }
                    pipe.xadd(stream, fields)  # type: ignore[arg-type]
            else:
                for c in range(0, len(batch), 500):
                    args: list[Any] = ["bench-floor", ""]
                    for ident, key, payload in batch[c : c + 500]:
                        args += (
                            str(ident % 16),
                            f"{ident:020d}:{ident:020d}",
                            str(ident),
                            "bench",
                            "=" + key,
                            created,
                            payload,
                            "",
                        )
                    await script(
                        keys=[stream, f"{stream}:pgherald-positions"], args=args, client=pipe
                    )
            await pipe.execute()
    elapsed = time.perf_counter() - t0
    await client.delete(stream, f"{stream}:pgherald-positions")
    await client.aclose()
    return len(msgs) / elapsed


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


async def redis_clean(url: str, *keys: str) -> None:
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(url)
    await client.delete(*keys)
    await client.aclose()


# -- latency --


def latency_publisher(dsn: str | None, to: str, rate: int, seconds: float) -> None:
    """Publish *rate* events/s for *seconds*: into the log (dsn), or straight to the broker."""
    if dsn is not None:
        import pgherald

        with psycopg.connect(dsn, autocommit=True) as conn:
            interval = 1.0 / rate
            nxt = time.perf_counter()
            end = nxt + seconds
            i = 0
            while nxt < end:
                pgherald.publish(conn, "lat", {"ts": time.time_ns(), "i": i}, key=f"k{i % 100}")
                i += 1
                nxt += interval
                delay = nxt - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
        return
    asyncio.run(_direct_publisher(to, rate, seconds))


async def _direct_publisher(to: str, rate: int, seconds: float) -> None:
    interval = 1.0 / rate
    if to.startswith("nats"):
        import nats

        nc = await nats.connect(to)
        js = nc.jetstream()
        nxt = time.perf_counter()
        end = nxt + seconds
        i = 0
        while nxt < end:
            body = json.dumps({"ts": time.time_ns(), "i": i}).encode()
            await js.publish("latfloor.lat", body, headers={"Nats-Msg-Id": f"f{i}"})
            i += 1
            nxt += interval
            await asyncio.sleep(max(0.0, nxt - time.perf_counter()))
        await nc.close()
    else:
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(to)
        nxt = time.perf_counter()
        end = nxt + seconds
        i = 0
        while nxt < end:
            body = json.dumps({"ts": time.time_ns(), "i": i})
            await client.xadd("latfloor:lat", {"id": i, "payload": body})
            i += 1
            nxt += interval
            await asyncio.sleep(max(0.0, nxt - time.perf_counter()))
        await client.aclose()


def latency_relay(dsn: str, to: str, group: str, stream: str | None, subject: str) -> None:
    import pgherald

    options: dict[str, Any] = {"stream": stream}
    if to.startswith("nats"):
        options["subject"] = subject
    relay = pgherald.Relay(dsn, to=to, channels=["lat"], group=group, start="now", **options)
    import signal

    signal.signal(signal.SIGTERM, lambda *_: relay.stop())
    relay.run()


async def collect(to: str, where: str, expected: int, seconds: float) -> list[float]:
    """Latencies (ms) of messages arriving on *where* (a subject, or a Redis stream)."""
    lat: list[float] = []
    deadline = time.monotonic() + seconds + 5
    if to.startswith("nats"):
        import nats

        nc = await nats.connect(to)

        async def cb(msg: Any) -> None:
            lat.append((time.time_ns() - json.loads(msg.data)["ts"]) / 1e6)

        await nc.subscribe(where, cb=cb)
        await nc.flush()
        ready.set()
        while len(lat) < expected and time.monotonic() < deadline:  # noqa: ASYNC110 - a count
            await asyncio.sleep(0.05)
        await nc.close()
    else:
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(to)
        last = "$"
        ready.set()
        while len(lat) < expected and time.monotonic() < deadline:
            got = await client.xread({where: last}, block=200, count=1000)
            for _, entries in got:
                now = time.time_ns()
                for entry_id, fields in entries:
                    last = entry_id
                    lat.append((now - json.loads(fields[b"payload"])["ts"]) / 1e6)
        await client.aclose()
    return lat


ready = asyncio.Event()


def latency(dsn: str, to: str, kind: str, rate: int, seconds: float) -> tuple[float, float, int]:
    global ready
    is_nats = to.startswith("nats")
    stream = "LATENCY" if is_nats else "lat:{channel}"
    subject = "latrelay.{channel}"
    if is_nats:
        asyncio.run(nats_reset(to, "LATENCY", "latrelay.>"))
        asyncio.run(nats_reset(to, "LATFLOOR", "latfloor.>"))
        where = "latrelay.lat" if kind == "relay" else "latfloor.lat"
    else:
        asyncio.run(redis_clean(to, "lat:lat", "lat:lat:pgherald-positions", "latfloor:lat"))
        where = "lat:lat" if kind == "relay" else "latfloor:lat"
    ctx = multiprocessing.get_context("spawn")
    relay = None
    if kind == "relay":
        group = f"lat{time.time_ns()}"
        relay = ctx.Process(target=latency_relay, args=(dsn, to, group, stream, subject))
        relay.start()
        time.sleep(2.0)  # the relay connects and joins (start="now"): warm-up, not sync
    expected = int(rate * seconds)

    async def main() -> list[float]:
        global ready
        ready = asyncio.Event()
        task = asyncio.create_task(collect(to, where, expected, seconds))
        await ready.wait()
        pub = ctx.Process(
            target=latency_publisher,
            args=(dsn if kind == "relay" else None, to, rate, seconds),
        )
        pub.start()
        result = await task
        pub.join(30)
        return result

    lat = asyncio.run(main())
    if relay is not None:
        relay.terminate()
        relay.join(10)
    lat = lat[len(lat) // 20 :]
    lat.sort()
    if not lat:
        return float("nan"), float("nan"), 0
    return lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))], len(lat)


def method() -> list[str]:
    """The docstring's Method paragraph as markdown: its bullets kept, lines joined."""
    text = (__doc__ or "").split("Method.")[1]
    parts = [" ".join(p.split()) for p in text.split("\n* ")]
    return ["Method: " + parts[0], "", *(f"- {p}" for p in parts[1:])]


def main() -> None:
    ap = _report.parser(__doc__, "50,000 events, 1 run, 2 s latency runs")
    ap.add_argument("--nats", default="nats://127.0.0.1:4222")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--runs", type=int, default=None)
    args = ap.parse_args()
    n = 50_000 if args.quick else 200_000
    runs = args.runs or (1 if args.quick else 3)
    seconds = 2.0 if args.quick else 5.0
    info = _report.machine(args.dsn)
    import nats as nats_mod
    import redis as redis_mod

    info["nats-py"] = (
        nats_mod.__version__ if hasattr(nats_mod, "__version__") else _report.version("nats-py")
    )
    info["redis-py"] = redis_mod.__version__
    import subprocess

    info["nats-server"] = subprocess.run(
        ["nats-server", "--version"], capture_output=True, text=True
    ).stdout.strip()
    info["redis-server"] = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True
    ).stdout.split(" sha")[0]
    print(f"loading {n:,} events ...", file=sys.stderr)
    dsn = setup(args.dsn, n)
    msgs = messages(dsn)
    results: dict[str, list[float]] = {}

    def record(kind: str, value: float) -> None:
        results.setdefault(kind, []).append(value)
        print(f"  {kind}: {value:,.0f} events/s", file=sys.stderr)

    for run in range(runs):
        asyncio.run(nats_reset(args.nats, "BENCH", "bench.>"))
        record(
            "relay -> JetStream",
            asyncio.run(
                relay_run(dsn, args.nats, n, f"n{run}", stream="BENCH", subject="bench.{channel}")
            ),
        )
        for mode in ("hpub", "publish_async"):
            asyncio.run(nats_reset(args.nats, "BENCH", "bench.>"))
            record(
                f"floor JetStream ({mode})",
                asyncio.run(nats_floor(args.nats, "bench.bench", msgs, mode)),
            )
        asyncio.run(redis_clean(args.redis, "bench:bench", "bench:bench:pgherald-positions"))
        record(
            "relay -> Redis",
            asyncio.run(relay_run(dsn, args.redis, n, f"r{run}", stream="bench:{channel}")),
        )
        asyncio.run(redis_clean(args.redis, "bench:bench", "bench:bench:pgherald-positions"))
        for mode in ("resp", "script", "xadd"):
            record(
                f"floor Redis ({mode})",
                asyncio.run(redis_floor(args.redis, "bench:floor", msgs, mode)),
            )
    asyncio.run(nats_reset(args.nats, "BENCH", "bench.>"))
    asyncio.run(redis_clean(args.redis, "bench:bench", "bench:bench:pgherald-positions"))

    lat_rows = []
    for to in (args.nats, args.redis):
        broker = "JetStream" if to.startswith("nats") else "Redis"
        for kind in ("relay", "floor"):
            p50, p99, count = latency(dsn, to, kind, 1000, seconds)
            label = f"{'relay (commit -> broker)' if kind == 'relay' else 'floor (plain loop -> broker)'}"
            lat_rows.append([broker, label, f"{p50:.1f}", f"{p99:.1f}", f"{count:,}"])
            print(f"  latency {broker} {kind}: p50 {p50:.1f} ms p99 {p99:.1f} ms", file=sys.stderr)

    rows = [["Kind", "Median events/s", "vs floor (HPUB / RESP)", "Runs (events/s)"]]
    floor_of = {
        "relay -> JetStream": "floor JetStream (hpub)",
        "relay -> Redis": "floor Redis (resp)",
    }
    for kind, values in results.items():
        med = statistics.median(values)
        ref = floor_of.get(kind)
        ratio = f"{med / statistics.median(results[ref]):.2f}" if ref else ""
        rows.append([kind, f"{med:,.0f}", ratio, ", ".join(f"{v:,.0f}" for v in values)])
    body = [
        "## Relay benchmark (`pgherald relay` into NATS JetStream and Redis Streams)",
        "",
        f"Command: `{_report.command()}` (under `flock /tmp/pgherald-bench.lock`).",
        "",
        *(f"- {k}: {v}" for k, v in info.items()),
        f"- Load average at the end: {_report.load_average()}",
        "",
        *method(),
        "",
        f"### Throughput ({n:,} events, backlog)",
        "",
        _report.table(rows),
        "",
        "### Publish-to-broker latency at 1,000 events/s",
        "",
        _report.table([["Broker", "Path", "p50 (ms)", "p99 (ms)", "Samples"], *lat_rows]),
    ]
    _report.publish("\n".join(body), args.output, START, END)


if __name__ == "__main__":
    main()
