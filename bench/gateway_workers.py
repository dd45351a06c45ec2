"""Worker processes for ``gateway_bench.py``: a client-load process and a publisher.

``python bench/gateway_workers.py clients --port P --proto sse|ws --channels 100 --start 0
--count 2500 ...`` opens ``count`` real connections on loopback (client ``i`` of the whole run
is on channel ``ch{i % channels}``), prints ``READY`` once every stream is open, then obeys
one command per stdin line:

* ``REPORT {"ch0": n, ...}``: wait until every client has its channel's count, then until
  the streams are quiet (no byte for 0.5 s; both at most ``--drain`` s in all), then print one JSON line for the step just published: frames received,
  first/last arrival, latency percentiles, and per-client shortfall against the expected
  counts; counters are then reset for the next step.
* ``QUIT``: close everything and exit.

The client is lean on purpose (raw ``asyncio`` protocols, no HTTP library): it finds frame
boundaries with ``bytes.count``/``rfind``; every ``--sample``-th client also extracts the
``"ts":`` of *every* frame it gets (exact commit-to-client latency for that sample).

``python bench/gateway_workers.py publish --dsn ... --rate R --seconds S --channels N``
sends R NOTIFY/s for S s on a fixed schedule (one transaction per tick of max(1 ms, 1/R)),
round-robin over ``ch0..ch{N-1}``; each payload carries ``time.time_ns()`` taken right before
the statement that notifies and commits is sent.  Prints per-channel counts as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import resource
import sys
import time
from typing import Any

_TS = re.compile(rb'"ts":(\d+)')
_PAD = "x" * 40  # payload ~100 bytes


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def emit(obj: object) -> None:
    sys.stdout.write((obj if isinstance(obj, str) else json.dumps(obj)) + "\n")
    sys.stdout.flush()


# -- clients ------------------------------------------------------------------------------


class Stats:
    def __init__(self) -> None:
        self.reset()
        self.closed = 0  # connections the server ended (cumulative)
        self.errors = 0  # `event: error` frames / WS close frames seen (cumulative)
        self.last_byte = 0.0

    def reset(self) -> None:
        self.frames = 0
        self.first = 0.0
        self.last = 0.0
        self.lat: list[int] = []


class _Conn(asyncio.Protocol):
    """What the SSE and WebSocket clients share: state, the HTTP response head, the close."""

    STATUS = b""  # the response status line that accepts the connection

    def __init__(self, stats: Stats, channel: str, sample: bool, ready: asyncio.Future) -> None:
        self.stats, self.channel, self.sample, self.ready = stats, channel, sample, ready
        self.buf = b""
        self.headers_done = False
        self.got = 0
        self.alive = True
        self.transport: asyncio.Transport | None = None

    def _handshake(self, buf: bytes) -> bytes | None:
        """The bytes after the response head once it is complete and accepted, else None."""
        i = buf.find(b"\r\n\r\n")
        if i < 0:
            self.buf = buf
            return None
        if not buf.startswith(self.STATUS):
            if not self.ready.done():
                self.ready.set_exception(RuntimeError(buf[:200].decode("latin-1")))
            return None
        self.headers_done = True
        return buf[i + 4 :]

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        self.stats.closed += 1
        if not self.ready.done():
            self.ready.set_exception(RuntimeError(f"connection lost before ready: {exc}"))


class SseConn(_Conn):
    STATUS = b"HTTP/1.1 200"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        req = (
            f"GET /sse?channel={self.channel} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Accept: text/event-stream\r\n\r\n"
        )
        self.transport.write(req.encode())  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        st = self.stats
        buf = self.buf + data if self.buf else data
        if not self.headers_done:
            rest = self._handshake(buf)
            if rest is None:
                return
            buf = rest
        cut = buf.rfind(b"\n\n")
        if cut < 0:
            self.buf = buf
            return
        done, self.buf = buf[: cut + 2], buf[cut + 2 :]
        n = done.count(b"event: ")
        if not self.ready.done() and b": ready" in done:
            self.ready.set_result(None)
        if n:
            if b"event: error" in done:
                st.errors += 1
                n -= done.count(b"event: error")
            self.got += n
            st.frames += n
            if not st.first:
                st.first = now
            st.last = now
            if self.sample:
                st.lat.extend(now - int(t) for t in _TS.findall(done))
        st.last_byte = time.monotonic()


class WsConn(_Conn):
    """Minimal RFC 6455 client: handshake, one masked text frame out, unmasked frames in,
    pings answered (uvicorn closes a connection whose pings go unanswered for 40 s)."""

    STATUS = b"HTTP/1.1 101"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        key = base64.b64encode(os.urandom(16)).decode()
        req = (
            "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.transport.write(req.encode())  # type: ignore[union-attr]

    def _send_text(self, text: str) -> None:
        self._send(0x81, text.encode())

    def _send(self, first: int, data: bytes) -> None:
        """One masked frame (*first*: FIN and opcode), as a client must send it."""
        mask = os.urandom(4)
        n = len(data)
        head = bytes([first, 0x80 | n]) if n < 126 else bytes([first, 0xFE]) + n.to_bytes(2, "big")
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        self.transport.write(head + mask + masked)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        st = self.stats
        buf = self.buf + data if self.buf else data
        if not self.headers_done:
            rest = self._handshake(buf)
            if rest is None:
                return
            buf = rest
            self._send_text(json.dumps({"type": "subscribe", "channels": [self.channel]}))
        pos, end, n = 0, len(buf), 0
        texts = []
        while end - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1] & 0x7F
            hl = 2
            if b1 == 126:
                if end - pos < 4:
                    break
                b1, hl = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif b1 == 127:
                if end - pos < 10:
                    break
                b1, hl = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            if end - pos < hl + b1:
                break
            payload = buf[pos + hl : pos + hl + b1]
            pos += hl + b1
            op = b0 & 0x0F
            if op == 1:
                if payload.startswith(b'{"type":"event"'):
                    n += 1
                    if self.sample:
                        texts.append(payload)
                elif b'"subscribed"' in payload and not self.ready.done():
                    self.ready.set_result(None)
                elif b'"error"' in payload:
                    st.errors += 1
            elif op == 9:  # ping: a client that does not answer is closed by the server
                self._send(0x8A, bytes(payload))
            elif op == 8:
                st.errors += 1
        self.buf = buf[pos:]
        if n:
            self.got += n
            st.frames += n
            if not st.first:
                st.first = now
            st.last = now
            for t in texts:
                m = _TS.search(t)
                if m:
                    st.lat.append(now - int(m.group(1)))
        st.last_byte = time.monotonic()


def pct(values: list[int], q: float) -> float | None:
    if not values:
        return None
    values.sort()
    return values[min(len(values) - 1, int(q * len(values)))] / 1e6


async def run_clients(a: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stats = Stats()
    conns: list[Any] = []
    proto = SseConn if a.proto == "sse" else WsConn
    sem = asyncio.Semaphore(a.concurrency)

    async def open_one(i: int) -> None:
        g = a.start + i
        ready: asyncio.Future = loop.create_future()
        async with sem:
            conn = proto(stats, f"ch{g % a.channels}", g % a.sample == 0, ready)
            conns.append(conn)
            await loop.create_connection(lambda: conn, "127.0.0.1", a.port)
            await asyncio.wait_for(ready, 30.0)

    t0 = time.monotonic()
    try:
        await asyncio.wait_for(asyncio.gather(*(open_one(i) for i in range(a.count))), a.timeout)
    except Exception as exc:
        emit({"ok": False, "error": f"connect failed: {type(exc).__name__}: {exc}"})
        return
    emit(f"READY {time.monotonic() - t0:.2f}")
    stats.reset()
    for c in conns:
        c.got = 0
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    deadline = time.monotonic() + a.timeout
    while True:
        try:
            line = (await asyncio.wait_for(reader.readline(), deadline - time.monotonic())).decode()
        except TimeoutError:
            break
        if not line or line.startswith("QUIT"):
            break
        if line.startswith("REPORT"):
            expected: dict[str, int] = json.loads(line.split(" ", 1)[1])
            stop = time.monotonic() + a.drain
            # Drain: wait (bounded by --drain) until every client has what was published on its
            # channel, then until no byte has arrived for 0.5 s (extras would show up then).
            while time.monotonic() < stop and any(  # noqa: ASYNC110
                c.got < expected.get(c.channel, 0) for c in conns
            ):
                await asyncio.sleep(0.05)
            while time.monotonic() < stop and time.monotonic() - stats.last_byte < 0.5:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            short_clients = missing = extra = 0
            for c in conns:
                want = expected.get(c.channel, 0)
                if c.got < want:
                    short_clients += 1
                    missing += want - c.got
                elif c.got > want:
                    extra += c.got - want
                c.got = 0
            lat = stats.lat
            lat.sort()
            step = max(1, len(lat) // 1000)
            emit(
                {
                    "ok": True,
                    "frames": stats.frames,
                    "first_ns": stats.first,
                    "last_ns": stats.last,
                    "lat_n": len(lat),
                    "quantiles": [v / 1e6 for v in lat[::step]],
                    "p50_ms": pct(lat, 0.50),
                    "p99_ms": pct(lat, 0.99),
                    "max_ms": lat[-1] / 1e6 if lat else None,
                    "short_clients": short_clients,
                    "missing": missing,
                    "extra": extra,
                    "closed": stats.closed,
                    "errors": stats.errors,
                    "open": sum(c.alive for c in conns),
                }
            )
            stats.reset()
    for c in conns:
        if c.transport is not None:
            c.transport.close()


# -- publisher ----------------------------------------------------------------------------

PUB_SQL = "SELECT count(pg_notify(c, p)) FROM unnest(%b::text[], %b::text[]) AS t(c, p)"


def publish(a: argparse.Namespace) -> dict[str, Any]:
    import psycopg

    names = [f"ch{i}" for i in range(a.channels)]
    counts = dict.fromkeys(names, 0)
    tick = max(0.001, 1.0 / a.rate)
    ticks = int(a.seconds / tick)
    sent, k_ch, max_lag = 0, 0, 0.0
    with psycopg.connect(a.dsn, autocommit=True) as conn:
        cur = conn.cursor()
        t0 = time.perf_counter()
        for k in range(ticks):
            n = int(a.rate * (k + 1) * tick) - int(a.rate * k * tick)
            delay = t0 + k * tick - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            else:
                max_lag = max(max_lag, -delay)
            if n <= 0:
                continue
            chs = [names[(k_ch + j) % a.channels] for j in range(n)]
            k_ch += n
            ts = time.time_ns()
            payloads = [f'{{"ts":{ts},"i":{sent + j},"pad":"{_PAD}"}}' for j in range(n)]
            cur.execute(PUB_SQL, (chs, payloads))
            for ch in chs:
                counts[ch] += 1
            sent += n
        elapsed = max(ticks * tick, time.perf_counter() - t0)
    return {
        "ok": True,
        "sent": sent,
        "rate": sent / elapsed,
        "max_lag_ms": max_lag * 1e3,
        "counts": counts,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("clients")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--proto", choices=["sse", "ws"], default="sse")
    c.add_argument("--channels", type=int, default=100)
    c.add_argument("--start", type=int, default=0)
    c.add_argument("--count", type=int, default=2500)
    c.add_argument("--sample", type=int, default=10)
    c.add_argument("--concurrency", type=int, default=200)
    c.add_argument("--drain", type=float, default=5.0)
    c.add_argument("--timeout", type=float, default=900.0)
    p = sub.add_parser("publish")
    p.add_argument("--dsn", required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--channels", type=int, default=100)
    a = ap.parse_args()
    raise_nofile()
    if a.cmd == "clients":
        # The load generator shares the cores with the gateway: the leanest loop available.
        try:
            import uvloop
        except ImportError:
            asyncio.run(run_clients(a))
        else:
            uvloop.run(run_clients(a))
    else:
        emit(publish(a))


if __name__ == "__main__":
    main()
