"""Worker processes for ``listen_bench.py``: one sender and one receiver per client.

Run as ``python bench/_workers.py send ...`` or ``python bench/_workers.py recv CLIENT ...``.
A receiver LISTENs, prints ``READY`` on stdout, consumes notifications until it has seen the
expected count (or the ``STOP`` sentinel, or its deadline), then prints one JSON line with its
result.  Every client decodes each payload with the same ``json.loads`` and calls
``handler(data)``; that cost is part of what is measured.  pgherald's clients do it inside the
handler they register (``loads(n.payload)``), so what differs between clients is only how a
notification gets from the socket to that call.  (``Notification.json()`` does the same plus a
method call, about 0.07 us more per notification.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from json import loads
from typing import Any

CHANNEL = "bench"
STOP = "STOP"
TX_SQL = "SELECT count(pg_notify('bench', p)) FROM unnest(%b::text[]) AS p"
_PAD = "x" * 23  # brings a payload to ~100 bytes

Handler = Callable[[dict[str, Any]], bool]


def make_payload(i: int, ts: int, size: int = 0) -> str:
    """A JSON payload of ~100 bytes, or of *size* bytes (padded) when larger."""
    text = f'{{"id": {i}, "kind": "order.created", "ts": {ts}, "pad": "{_PAD}"}}'
    return text if size <= len(text) else text.replace(_PAD, "x" * (size - len(text) + 23))


def emit(obj: object) -> None:
    sys.stdout.write((obj if isinstance(obj, str) else json.dumps(obj)) + "\n")
    sys.stdout.flush()


# -- sender --------------------------------------------------------------------------------


def send(dsn: str, total: int, per_tx: int, rate: float, size: int = 0) -> dict[str, Any]:
    """Send ``total`` notifications, ``per_tx`` per autocommit statement (= one transaction).

    ``rate == 0``: as fast as possible, payloads built up front.  Otherwise paced on a fixed
    schedule (no bursts to catch up beyond the schedule), the payload timestamp being
    ``time.time_ns()`` taken right before the statement that notifies *and* commits is sent.
    """
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.cursor()
        max_lag = 0.0
        if rate <= 0:
            ts = time.time_ns()
            batches = [
                [make_payload(i, ts, size) for i in range(s, min(s + per_tx, total))]
                for s in range(0, total, per_tx)
            ]
            t0 = time.perf_counter()
            for batch in batches:
                cur.execute(TX_SQL, (batch,))
        else:
            interval = per_tx / rate
            t0 = time.perf_counter()
            for k, s in enumerate(range(0, total, per_tx)):
                delay = t0 + k * interval - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                else:
                    max_lag = max(max_lag, -delay)
                ts = time.time_ns()
                cur.execute(TX_SQL, ([make_payload(i, ts, size) for i in range(s, s + per_tx)],))
        elapsed = time.perf_counter() - t0
        cur.execute("SELECT pg_notify('bench', %s)", (STOP,))
    return {"sent": total, "seconds": elapsed, "rate": total / elapsed, "max_lag_ms": max_lag * 1e3}


# -- handlers (the "application code") -----------------------------------------------------


class Tally:
    """Builds the handler and keeps what it observed."""

    def __init__(self, expected: int, latency: bool) -> None:
        self.expected = expected
        self.count = 0
        self.t_first = self.t_last = self.cpu_first = self.cpu_last = 0.0
        self.lat_ns: list[int] = []
        self.handler: Handler = self._latency() if latency else self._throughput()

    def _throughput(self) -> Handler:
        expected, perf, cpu = self.expected, time.perf_counter, time.process_time
        count = 0

        def handler(data: dict[str, Any]) -> bool:
            nonlocal count
            count += 1
            if count == 1:
                self.t_first, self.cpu_first = perf(), cpu()
            elif count == expected:
                self.t_last, self.cpu_last = perf(), cpu()
            self.count = count
            return count >= expected

        return handler

    def _latency(self) -> Handler:
        expected, now, record = self.expected, time.time_ns, self.lat_ns.append

        def handler(data: dict[str, Any]) -> bool:
            record(now() - data["ts"])
            self.count = len(self.lat_ns)
            return self.count >= expected

        return handler

    def result(self) -> dict[str, Any]:
        res: dict[str, Any] = {"ok": self.count >= self.expected, "count": self.count}
        if self.count < self.expected:
            res["error"] = f"received {self.count} of {self.expected} notifications"
        if self.lat_ns:
            lat = sorted(self.lat_ns[len(self.lat_ns) // 20 :])  # drop the first 5% (warm-up)
            res |= {f"p{q}_ms": lat[min(len(lat) - 1, len(lat) * q // 100)] / 1e6 for q in (50, 99)}
            res["max_ms"] = lat[-1] / 1e6
        elif self.t_last > self.t_first:
            res["seconds"] = self.t_last - self.t_first
            res["rate"] = (self.count - 1) / res["seconds"]
            res["cpu_us"] = (self.cpu_last - self.cpu_first) / (self.count - 1) * 1e6
        return res


def remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("receiver deadline reached")
    return left


# -- receivers -----------------------------------------------------------------------------


def recv_psycopg3_notifies(dsn: str, handler: Handler, deadline: float) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("LISTEN bench")
        emit("READY")
        for n in conn.notifies(timeout=remaining(deadline)):
            if n.payload == STOP or handler(json.loads(n.payload)):
                break


def recv_pq_loop(dsn: str, handler: Handler, deadline: float) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("LISTEN bench")
        pgconn = conn.pgconn
        sock = pgconn.socket
        emit("READY")
        while True:
            if not select.select([sock], [], [], remaining(deadline))[0]:
                continue
            pgconn.consume_input()
            while (n := pgconn.notifies()) is not None:
                channel = n.relname.decode()  # noqa: F841  (a real client routes on it)
                payload = n.extra.decode()
                if payload == STOP or handler(json.loads(payload)):
                    return


def recv_pq_loop_handler(dsn: str, handler: Handler, deadline: float) -> None:
    """A diagnostic: the pq loop plus what a handler API adds per notification, one
    `pgherald.Notification` built and one function called (the same handler as pgherald's
    clients), with no reconnection, budget or stop checks."""
    import psycopg

    from pgherald import Notification

    make = tuple.__new__

    class Done(Exception):
        pass

    def on_notify(n: Notification) -> None:
        if n.payload == STOP or handler(loads(n.payload)):
            raise Done

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("LISTEN bench")
        pgconn = conn.pgconn
        sock, notifies = pgconn.socket, pgconn.notifies
        emit("READY")
        with contextlib.suppress(Done):
            while True:
                if not select.select([sock], [], [], remaining(deadline))[0]:
                    continue
                pgconn.consume_input()
                for relname, pid, extra in iter(notifies, None):
                    on_notify(make(Notification, (relname.decode(), extra.decode(), pid)))


def recv_psycopg2_poll(dsn: str, handler: Handler, deadline: float) -> None:
    import psycopg2

    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        notifies: deque[Any] = deque()
        conn.notifies = notifies  # any object with .append() works since psycopg2 2.7
        conn.cursor().execute("LISTEN bench")
        emit("READY")
        while True:
            if not select.select([conn], [], [], remaining(deadline))[0]:
                continue
            conn.poll()
            while notifies:
                payload = notifies.popleft().payload
                if payload == STOP or handler(json.loads(payload)):
                    return
    finally:
        conn.close()


def recv_asyncpg(dsn: str, handler: Handler, deadline: float) -> None:
    import asyncpg
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(dsn)
    kwargs: dict[str, Any] = {
        k: params[k] for k in ("host", "port", "user", "password") if k in params
    }
    kwargs["database"] = params.get("dbname", kwargs.get("user", "postgres"))

    async def main() -> None:
        conn = await asyncpg.connect(**kwargs)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def callback(_conn: object, _pid: int, _channel: str, payload: str) -> None:
            if not done.done() and (payload == STOP or handler(json.loads(payload))):
                done.set_result(None)

        try:
            await conn.add_listener(CHANNEL, callback)
            emit("READY")
            await asyncio.wait_for(done, remaining(deadline))
        finally:
            await conn.close()

    asyncio.run(main())


def recv_pgherald_sync(dsn: str, handler: Handler, deadline: float) -> None:
    import pgherald

    with pgherald.Listener(dsn, channels=[CHANNEL]) as listener:

        @listener.on(CHANNEL)
        def on_notify(n: pgherald.Notification) -> None:
            if n.payload == STOP or handler(loads(n.payload)):
                listener.stop()

        emit("READY")
        with _stop_at(deadline, listener.stop):  # stop() is documented as thread-safe
            listener.run()


def recv_pgherald_sync_iter(dsn: str, handler: Handler, deadline: float) -> None:
    import pgherald

    with pgherald.Listener(dsn, channels=[CHANNEL]) as listener:
        emit("READY")
        with _stop_at(deadline, listener.stop):
            for n in listener:
                if n.payload == STOP or handler(loads(n.payload)):
                    break


@contextlib.contextmanager
def _stop_at(deadline: float, stop: Callable[[], None]) -> Iterator[None]:
    timer = threading.Timer(remaining(deadline), stop)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _recv_pgherald_async(backend: str) -> Callable[[str, Handler, float], None]:
    def recv(dsn: str, handler: Handler, deadline: float) -> None:
        import anyio

        import pgherald

        async def main() -> None:
            async with pgherald.AsyncListener(dsn, channels=[CHANNEL]) as listener:

                @listener.on(CHANNEL)
                def on_notify(n: pgherald.Notification) -> None:
                    if n.payload == STOP or handler(loads(n.payload)):
                        listener.stop()

                emit("READY")
                with anyio.fail_after(remaining(deadline)):
                    await listener.run()

        anyio.run(main, backend=backend)

    return recv


def _recv_pgherald_async_iter(backend: str) -> Callable[[str, Handler, float], None]:
    def recv(dsn: str, handler: Handler, deadline: float) -> None:
        import anyio

        import pgherald

        async def main() -> None:
            async with pgherald.AsyncListener(dsn, channels=[CHANNEL]) as listener:
                emit("READY")
                with anyio.fail_after(remaining(deadline)):
                    async for n in listener:
                        if n.payload == STOP or handler(loads(n.payload)):
                            break

        anyio.run(main, backend=backend)

    return recv


def _observed(recv: Callable[[str, Handler, float], None]) -> Callable[[str, Handler, float], None]:
    """*recv* with pgherald.tracing (an SDK tracer, spans exported to nowhere) and metrics on."""

    def observed(dsn: str, handler: Handler, deadline: float) -> None:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )

        import pgherald
        import pgherald.metrics
        import pgherald.tracing

        class Discard(SpanExporter):
            def export(self, spans: Any) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(Discard()))
        pgherald.tracing.instrument(tracer_provider=provider)
        listener_classes = (pgherald.Listener, pgherald.AsyncListener)
        for cls in listener_classes:  # every listener made from now on exports its metrics
            cls.__init__ = _registering(cls.__init__)  # type: ignore[method-assign]
        try:
            recv(dsn, handler, deadline)
        finally:
            provider.shutdown()

    return observed


def _registering(init: Callable[..., None]) -> Callable[..., None]:
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> None:
        import pgherald.metrics

        init(self, *args, **kwargs)
        pgherald.metrics.register(self, name=f"bench-{id(self)}")

    return wrapped


RECEIVERS: dict[str, Callable[[str, Handler, float], None]] = {
    "psycopg3-notifies": recv_psycopg3_notifies,
    "pq-loop": recv_pq_loop,
    "pq-loop-handler": recv_pq_loop_handler,
    "psycopg2-poll": recv_psycopg2_poll,
    "asyncpg": recv_asyncpg,
    "pgherald-sync": recv_pgherald_sync,
    "pgherald-async-asyncio": _recv_pgherald_async("asyncio"),
    "pgherald-async-trio": _recv_pgherald_async("trio"),
    # iterator style instead of handlers
    "pgherald-sync-iter": recv_pgherald_sync_iter,
    "pgherald-asyncio-iter": _recv_pgherald_async_iter("asyncio"),
    "pgherald-trio-iter": _recv_pgherald_async_iter("trio"),
    # tracing (a span per notification) and metrics on
    "pgherald-sync-observed": _observed(recv_pgherald_sync),
    "pgherald-asyncio-observed": _observed(_recv_pgherald_async("asyncio")),
}


def receive(
    client: str, dsn: str, expected: int, latency: bool, timeout: float, cpu: int | None = None
) -> None:
    if cpu is not None:
        # Only this process is pinned: the sender and the server processes may still run on
        # this CPU, but the receiver no longer moves between cores.
        os.sched_setaffinity(0, {cpu})
    tally = Tally(expected, latency)

    def watchdog() -> None:  # last resort so that the process always exits by itself
        time.sleep(timeout + 5)
        emit(tally.result() | {"ok": False, "error": f"watchdog: no exit after {timeout:.0f}s"})
        os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        RECEIVERS[client](dsn, tally.handler, time.monotonic() + timeout)
        res = tally.result()
    except BaseException as exc:  # reported to the orchestrator, which decides
        res = tally.result() | {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    emit(res)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["send", "recv"])
    ap.add_argument("client", nargs="?", choices=sorted(RECEIVERS))
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--per-tx", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=0.0, help="0 = as fast as possible")
    ap.add_argument("--latency", action="store_true")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--cpu", type=int, help="pin the receiver to this CPU")
    ap.add_argument("--payload-bytes", type=int, default=0, help="payload size (default ~100)")
    a = ap.parse_args()
    if a.role == "send":
        emit(send(a.dsn, a.count, a.per_tx, a.rate, a.payload_bytes))
    else:
        receive(a.client, a.dsn, a.count, a.latency, a.timeout, a.cpu)


if __name__ == "__main__":
    main()
