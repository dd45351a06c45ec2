"""Gateway fan-out benchmark: ``pgherald serve`` pushing NOTIFY events to thousands of SSE clients.

Usage::

    python bench/gateway_bench.py [--dsn DSN] [--quick] [--output docs/benchmarks.md]
                                  [--profile]

Method.  The gateway runs in its own process (``python -m pgherald.cli serve --allow-anonymous
ch0,...,ch99``: anonymous read, so no JWT is verified per connection; the measurement is the
fan-out, not auth).  The client load is two other processes (``bench/gateway_workers.py
clients``), each holding half of the connections as real HTTP/1.1 SSE streams on loopback
(raw asyncio protocols, no HTTP library).  A publisher process (``gateway_workers.py
publish``) sends NOTIFY at a fixed rate with ``time.time_ns()`` in every payload (~100 B).

Two shapes: (A) N clients over 100 channels (N/100 per channel), (B) N clients on one hot
channel; N = 5,000 (1,000 with ``--quick``).  For each shape the event rate is stepped up so
that the target deliveries/s (= events/s x subscribers per channel) follows ``LADDER`` (2.5k,
5k, 10k, 15k, ... 100k, 110k, 125k, 150k) for 5 s per step (2 s with ``--quick``), stopping after the first step
that fails.  Per step: deliveries/s actually received (frames / first-to-last arrival),
commit-to-client latency p50/p99 (exact for every event received by every 10th client), drops
(clients the gateway disconnected, and events a client got fewer of than were published on its
channel), and the gateway's peak RSS (``VmRSS`` from ``/proc``, sampled every 0.2 s).  A step
passes with p99 < 100 ms, no drops, RSS < 500 MB and >= 95% of the offered deliveries/s.  Each
shape is then run over WebSocket (JSON ``subscribe``), same ladder.

The floor: each shape's SSE ladder is run once more against ``bench/gateway_raw.py`` (asyncpg
on uvloop, a hand-written HTTP response, one ``transport.write`` per event per client), the
least a Python process can do for the same fan-out (``--no-floor`` skips it).  Read the
gateway's figures against it: where the floor fails too, the machine is the limit.

Everything shares one machine: gateway, PostgreSQL, publisher and client processes compete
for the same cores, so the figures are a lower bound for a gateway with cores of its own.
``--runs N`` repeats each shape's SSE and floor ladders (the WebSocket ladder runs once); the
targets then use the median over runs of the sustained rate (the offered deliveries/s of the
highest step that passed).  ``--profile`` adds one shape-A step at 100k deliveries/s with the gateway under cProfile and
prints its top functions.  Every process has a deadline; the orchestrator kills only the
processes it started.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import pstats
import queue
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _report  # noqa: E402 - bench/_report.py, shared by every benchmark
from gateway_workers import raise_nofile  # noqa: E402

WORKERS = str(HERE / "gateway_workers.py")
RAW = str(HERE / "gateway_raw.py")
SRC = HERE.parent / "src"
START, END = "<!-- gateway-bench:start -->", "<!-- gateway-bench:end -->"
LADDER = [
    2_500,
    5_000,
    10_000,
    15_000,
    20_000,
    25_000,
    30_000,
    35_000,
    40_000,
    50_000,
    75_000,
    100_000,
    110_000,
    125_000,
    150_000,
]
TARGET = 100_000
P99_LIMIT_MS, RSS_LIMIT_MB = 100.0, 500.0
Result = dict[str, Any]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_s(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of *pid* so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return (0.0, 0.0)
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) / tick, int(fields[12]) / tick)


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Proc:
    """A child process with its stdout lines on a queue (stdin kept open for commands)."""

    def __init__(self, args: list[str], env: dict[str, str], stdin: bool = False) -> None:
        self.err = tempfile.TemporaryFile("w+")  # noqa: SIM115 (lives as long as the process)
        self.p = subprocess.Popen(
            args,
            env=env,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self.err,
            text=True,
            preexec_fn=raise_nofile,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def line(self, wait: float) -> str | None:
        try:
            return self.lines.get(timeout=wait)
        except queue.Empty:
            return None

    def send(self, text: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(text + "\n")
        self.p.stdin.flush()

    def stderr_tail(self, n: int = 3) -> str:
        self.err.seek(0)
        return " | ".join(self.err.read().strip().splitlines()[-n:])

    def stop(self, sig: int = signal.SIGINT, wait: float = 10.0) -> None:
        if self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(wait)
            except subprocess.TimeoutExpired:
                self.p.kill()  # only the process this object started
                self.p.wait()


def start_gateway(
    dsn: str, port: int, env: dict[str, str], profile: str | None = None, raw: bool = False
) -> Proc:
    """``pgherald serve`` (or, with *raw*, the floor server `gateway_raw.py`) on *port*."""
    chans = ",".join(f"ch{i}" for i in range(100))
    pre = ["-m", "cProfile", "-o", profile] if profile else []
    args = [sys.executable, *pre, "-m", "pgherald.cli", "serve", "--dsn", dsn]
    args += ["--port", str(port), "--allow-anonymous", chans]
    args += ["--max-connections-per-client", "0"]  # every benchmark client is on 127.0.0.1
    if raw:
        args = [sys.executable, RAW, "--dsn", dsn, "--port", str(port), "--channels", "100"]
    g = Proc(args, env)
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        if g.p.poll() is not None:
            raise RuntimeError(f"gateway exited: {g.stderr_tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                if r.status == 200:
                    return g
        except OSError:
            time.sleep(0.2)
    g.stop(signal.SIGKILL)
    raise RuntimeError("gateway did not become healthy within 30 s")


def start_clients(
    port: int, proto: str, n: int, channels: int, procs: int, env: dict[str, str]
) -> tuple[list[Proc], float]:
    per = n // procs
    out = []
    t0 = time.monotonic()
    for k in range(procs):
        args = [sys.executable, WORKERS, "clients", "--port", str(port), "--proto", proto]
        args += ["--channels", str(channels), "--start", str(k * per), "--count", str(per)]
        out.append(Proc(args, env, stdin=True))
    for c in out:
        first = c.line(180.0)
        if not first or not first.startswith("READY"):
            for x in out:
                x.stop(signal.SIGKILL)
            raise RuntimeError(f"clients not ready: {first} {c.stderr_tail()}")
    return out, time.monotonic() - t0


def merge_pct(parts: list[Result], q: float) -> float | None:
    pts: list[tuple[float, float]] = []
    for r in parts:
        qs, n = r.get("quantiles") or [], r.get("lat_n", 0)
        pts += [(v, n / len(qs)) for v in qs] if qs else []
    if not pts:
        return None
    pts.sort()
    total = sum(w for _, w in pts)
    acc = 0.0
    for v, w in pts:
        acc += w
        if acc >= q * total:
            return v
    return pts[-1][0]


def run_step(
    dsn: str,
    gw: Proc,
    clients: list[Proc],
    channels: int,
    per_channel: int,
    deliveries: int,
    seconds: float,
    env: dict[str, str],
) -> Result:
    rate = deliveries / per_channel
    peak = [rss_mb(gw.p.pid)]
    cpu0 = cpu_s(gw.p.pid)
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            peak.append(rss_mb(gw.p.pid))

    threading.Thread(target=sample, daemon=True).start()
    args = [sys.executable, WORKERS, "publish", "--dsn", dsn, "--rate", str(rate)]
    args += ["--seconds", str(seconds), "--channels", str(channels)]
    try:
        p = subprocess.run(args, env=env, capture_output=True, text=True, timeout=seconds + 60)
        pub: Result = json.loads(p.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, IndexError, ValueError) as exc:
        done.set()
        return {"ok": False, "error": f"publisher failed: {exc}"}
    for c in clients:
        c.send("REPORT " + json.dumps(pub["counts"]))
    parts = []
    for c in clients:
        line = c.line(30.0)
        parts.append(json.loads(line) if line else {"ok": False})
    done.set()
    peak.append(rss_mb(gw.p.pid))
    cpu1 = cpu_s(gw.p.pid)
    if not all(r.get("ok") for r in parts):
        return {"ok": False, "error": f"client report missing: {clients[0].stderr_tail()}"}
    frames = sum(r["frames"] for r in parts)
    firsts = [r["first_ns"] for r in parts if r["first_ns"]]
    lasts = [r["last_ns"] for r in parts if r["last_ns"]]
    span = (max(lasts) - min(firsts)) / 1e9 if firsts and lasts else 0.0
    expected = sum(pub["counts"].values()) * per_channel
    res: Result = {
        "ok": True,
        "target": deliveries,
        "events_per_s": pub["rate"],
        "pub_lag_ms": pub["max_lag_ms"],
        "offered": pub["rate"] * per_channel,
        "expected": expected,
        "frames": frames,
        "received_per_s": frames / span if span > 0 else 0.0,
        "p50_ms": merge_pct(parts, 0.50),
        "p99_ms": merge_pct(parts, 0.99),
        "missing": sum(r["missing"] for r in parts),
        "short_clients": sum(r["short_clients"] for r in parts),
        "closed": sum(r["closed"] for r in parts),
        "errors": sum(r["errors"] for r in parts),
        "open": sum(r["open"] for r in parts),
        "rss_mb": max(peak),
        "cpu_user_us": (cpu1[0] - cpu0[0]) / max(frames, 1) * 1e6,
        "cpu_sys_us": (cpu1[1] - cpu0[1]) / max(frames, 1) * 1e6,
    }
    res["drops"] = res["missing"] > 0 or res["closed"] > 0 or res["errors"] > 0
    res["pass"] = (
        res["p99_ms"] is not None
        and res["p99_ms"] < P99_LIMIT_MS
        and not res["drops"]
        and res["rss_mb"] < RSS_LIMIT_MB
        and res["received_per_s"] >= 0.95 * res["offered"]
    )
    return res


def show(label: str, r: Result) -> None:
    if not r.get("ok"):
        print(f"{label}: FAILED {r.get('error')}", flush=True)
        return
    print(
        f"{label}: target {r['target']:>7,} offered {r['offered']:>9,.0f} received "
        f"{r['received_per_s']:>9,.0f}/s p50 {fmt(r['p50_ms'])} p99 {fmt(r['p99_ms'])} ms "
        f"missing {r['missing']:,} (clients {r['short_clients']}) closed {r['closed']} "
        f"rss {r['rss_mb']:.0f} MB cpu {r['cpu_user_us']:.0f}+{r['cpu_sys_us']:.0f} us/dlv pub-lag {r['pub_lag_ms']:.0f} ms "
        f"{'PASS' if r['pass'] else 'FAIL'}",
        flush=True,
    )


def fmt(v: float | None, f: str = "{:.1f}") -> str:
    return "-" if v is None else f.format(v)


def run_shape(
    a: argparse.Namespace,
    name: str,
    channels: int,
    env: dict[str, str],
    ws_rates: list[int],
    raw: bool = False,
) -> Result:
    port = free_port()
    per_channel = a.clients // channels
    out: Result = {"name": name, "channels": channels, "per_channel": per_channel, "steps": []}
    gw = start_gateway(a.dsn, port, env, raw=raw)
    clients: list[Proc] = []

    def climb(steps: list[Result], rates: list[int], label: str) -> None:
        """Run the steps at *rates* in order, stopping after the first that fails."""
        # Warm-up, not recorded: the first events after thousands of connections open meet
        # cold caches and sleeping client processes (one such step failed p99 at 0.5 events/s
        # while the same ladder later passed 100,000 deliveries/s).
        warm = run_step(a.dsn, gw, clients, channels, per_channel, rates[0], 2.0, env)
        show(f"{label} warm-up (not recorded)", warm)
        for d in rates:
            r = run_step(a.dsn, gw, clients, channels, per_channel, d, a.seconds, env)
            steps.append(r)
            show(label, r)
            if r.get("ok") and r["open"] < a.clients:
                # Connections were lost: the gateway's log says whether it cut them, and why.
                print(f"{label} connections lost; gateway log: {gw.stderr_tail(60)}", flush=True)
            if not r.get("ok") or not r["pass"] or r["open"] < a.clients:
                break

    try:
        out["rss_idle"] = rss_mb(gw.p.pid)
        clients, out["connect_s"] = start_clients(port, "sse", a.clients, channels, 2, env)
        out["rss_connected"] = rss_mb(gw.p.pid)
        print(
            f"shape {name}: {a.clients} SSE clients connected in {out['connect_s']:.1f}s, "
            f"gateway RSS {out['rss_connected']:.0f} MB",
            flush=True,
        )
        climb(out["steps"], LADDER, f"  {name} {'raw' if raw else 'sse'}")
        for c in clients:
            c.send("QUIT")
            c.stop(signal.SIGTERM, 10.0)
        clients = []
        if ws_rates:
            time.sleep(1.0)
            clients, out["ws_connect_s"] = start_clients(port, "ws", a.clients, channels, 2, env)
            out["ws"] = []
            climb(out["ws"], ws_rates, f"  {name} ws ")
    except RuntimeError as exc:
        out["error"] = str(exc)
        print(f"shape {name}: {exc}", flush=True)
    finally:
        for c in clients:
            c.stop(signal.SIGKILL)
        gw.stop(signal.SIGINT, 15.0)
    return out


def headline(steps: list[Result]) -> float | None:
    """The deliveries/s offered at the highest step that passed (every event arrived)."""
    ok = [r["offered"] for r in steps if r.get("ok") and r["pass"]]
    return max(ok) if ok else None


def median_headline(runs: list[Result]) -> float | None:
    """The median over runs of `headline` (a run where no step passed counts as 0)."""
    values = [headline(r["steps"]) or 0.0 for r in runs]
    return statistics.median(values) if values and any(values) else None


def profile_step(a: argparse.Namespace, env: dict[str, str]) -> str:
    """One shape-A step at 100k deliveries/s with the gateway under cProfile: top functions."""
    port = free_port()
    path = os.path.join(tempfile.gettempdir(), f"gateway-bench-{os.getpid()}.prof")
    gw = start_gateway(a.dsn, port, env, profile=path)
    clients: list[Proc] = []
    try:
        clients, _ = start_clients(port, "sse", a.clients, 100, 2, env)
        r = run_step(a.dsn, gw, clients, 100, a.clients // 100, TARGET, a.seconds, env)
        show("  profile A sse", r)
    finally:
        for c in clients:
            c.stop(signal.SIGKILL)
        gw.stop(signal.SIGINT, 30.0)
    if not os.path.exists(path):
        return "(no profile written)"
    buf = io.StringIO()
    st = pstats.Stats(path, stream=buf)
    st.sort_stats("tottime").print_stats(25)
    st.sort_stats("cumulative").print_stats(30)
    buf.write(by_package(st))
    os.unlink(path)
    return buf.getvalue()


def by_package(st: pstats.Stats) -> str:
    """Own time (tottime) of the profiled gateway grouped by where the code lives."""
    groups: dict[str, float] = {}
    for (file, _line, func), (_cc, _nc, tt, _ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        if "socket" in func and ("send" in func or "recv" in func):
            key = "socket send/recv (kernel)"
        elif "epoll" in func or "select" in func:
            key = "epoll (idle/wait)"
        elif "site-packages/" in file:
            key = file.split("site-packages/", 1)[1].split("/", 1)[0]
        elif "/pgherald/" in file:
            key = "pgherald/" + file.rsplit("/pgherald/", 1)[1]
        elif file == "~":
            key = "builtins: " + func.split(" of ")[0].strip("{<>")[:40]
        else:
            key = "stdlib: " + Path(file).name
        groups[key] = groups.get(key, 0.0) + tt
    total = sum(groups.values())
    lines = ["", f"Own time by package (total {total:.2f} s):"]
    for k, v in sorted(groups.items(), key=lambda kv: -kv[1])[:20]:
        lines.append(f"  {v:7.2f} s {100 * v / total:5.1f}%  {k}")
    return "\n".join(lines) + "\n"


def machine(dsn: str) -> dict[str, str]:
    ver = _report.version
    return _report.machine(
        dsn,
        extra={
            "uvicorn / starlette / anyio": f"{ver('uvicorn')} / {ver('starlette')} / {ver('anyio')}",
            "HTTP / WS implementation": f"h11 {ver('h11')} (httptools: {ver('httptools')}), "
            f"websockets {ver('websockets')} (sansio); event loop: asyncio (uvloop: {ver('uvloop')})",
        },
    )


table = _report.table


def step_rows(steps: list[Result]) -> list[list[str]]:
    rows = [
        [
            "Target deliveries/s",
            "Events/s sent",
            "Deliveries/s received",
            "p50 (ms)",
            "p99 (ms)",
            "Missed events (clients)",
            "Disconnected",
            "Gateway RSS (MB)",
            "Gateway CPU µs/delivery (user+sys)",
            "Step",
        ]
    ]
    for r in steps:
        if not r.get("ok"):
            rows.append(["?", "-", "-", "-", "-", "-", "-", "-", "-", f"error: {r.get('error')}"])
            continue
        rows.append(
            [
                f"{r['target']:,}",
                f"{r['events_per_s']:,.1f}"
                if r["events_per_s"] < 10
                else f"{r['events_per_s']:,.0f}",
                f"{r['received_per_s']:,.0f}",
                fmt(r["p50_ms"]),
                fmt(r["p99_ms"]),
                f"{r['missing']:,} ({r['short_clients']:,})",
                f"{r['closed']:,}",
                f"{r['rss_mb']:.0f}",
                f"{r['cpu_user_us']:.0f}+{r['cpu_sys_us']:.0f}",
                "pass" if r["pass"] else "fail",
            ]
        )
    return rows


def report(a: argparse.Namespace, info: dict[str, str], shapes: list[Result], prof: str) -> str:
    out = [
        "## Gateway fan-out benchmark (`pgherald serve`)",
        "",
        f"Command: `{a.command}`  ",
        f"Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        "",
        f"Method: the gateway (`python -m pgherald.cli serve --allow-anonymous ch0,...,ch99`, "
        "default settings: client buffer 1,000 events) runs in its own process; the channels "
        "are anonymous-read, so no JWT is verified (the measurement is the fan-out, not auth). "
        f"{a.clients:,} real SSE connections (HTTP/1.1 on loopback) are held by two client "
        "processes with a lean asyncio client on uvloop when installed (raw protocol, frames counted with "
        "`bytes.count`); a third process publishes NOTIFY on a fixed schedule (one "
        "transaction per ms or per event, whichever is longer), ~100 B JSON payloads carrying "
        "`time.time_ns()` taken just before the statement that notifies and commits. "
        f"Each ladder starts with an unrecorded 2 s warm-up at its first rate; each step runs {a.seconds:g} s; the step ladder stops after the first failing step. "
        "Deliveries/s received = frames received by all clients / first-to-last arrival "
        "(a little under the offered rate: the span includes the last event's fan-out). "
        "Sustained deliveries/s = the offered rate of the highest step that passed (one that "
        "delivered every event it offered); with `--runs`, the targets use the median over runs. "
        "Latency = client receive time - payload timestamp (same machine clock), for every "
        "event received by every 10th client. Missed events = events published on a client's "
        "channel during the step minus the events it received (counted once every client has all its events and the streams have been quiet for 0.5 s, at most 5 s after the publisher stops: under overload, events still queued then count as missed); "
        "Disconnected = streams the gateway ended (cumulative). RSS = peak `VmRSS` of the "
        "gateway process, sampled every 0.2 s; gateway CPU = its user + system CPU time during "
        "the step (publish + drain) / deliveries received. A step passes with p99 < "
        f"{P99_LIMIT_MS:g} ms, no missed event, no disconnect, RSS < {RSS_LIMIT_MB:g} MB and "
        ">= 95% of the offered deliveries/s received. All processes (gateway, PostgreSQL, "
        "publisher, clients) share the same cores: the client processes' own CPU use is part "
        "of the load, so these are lower bounds for a gateway running on its own cores.",
    ]
    targets = [["Target", "Measured", "Floor, same run", "Result"]]
    reading: list[str] = []
    for s in shapes:
        desc = (
            f"Shape {s['name']}: {a.clients:,} clients over {s['channels']} channel(s), "
            f"{s['per_channel']:,} per channel"
        )
        out += ["", f"### {desc}", ""]
        if "connect_s" in s:
            out.append(
                f"Connect: {s['connect_s']:.1f} s for all clients; gateway RSS "
                f"{s.get('rss_idle', 0):.0f} MB idle, {s.get('rss_connected', 0):.0f} MB with "
                "every client connected."
            )
            out.append("")
        if s.get("error"):
            out += [f"Error: {s['error']}", ""]
        if s["steps"]:
            out.append(table(step_rows(s["steps"])))
            ok = [r for r in s["steps"] if r.get("ok")]
            if ok:
                us = min(r["cpu_user_us"] + r["cpu_sys_us"] for r in ok)
                out += [
                    "",
                    f"One event on a channel with {s['per_channel']:,} subscribers costs the "
                    f"gateway about {s['per_channel']:,} x {us:.0f} µs = "
                    f"{s['per_channel'] * us / 1e3:,.0f} ms of CPU (lowest per-delivery CPU "
                    "measured above); the last subscriber cannot get it sooner, whatever the "
                    f"event rate. p99 < {P99_LIMIT_MS:g} ms at this fan-out needs < "
                    f"{P99_LIMIT_MS * 1e3 / s['per_channel']:.0f} µs per delivery; "
                    f"{TARGET:,} deliveries/s needs < {1e6 / TARGET:.0f} µs per delivery on one "
                    "core.",
                ]
        floor = s.get("floor")
        if floor and floor["steps"]:
            out += [
                "",
                "Floor, same clients and ladder: `bench/gateway_raw.py` (asyncpg on uvloop, a "
                "hand-written HTTP response, one `transport.write` per event per client; no "
                "framework, auth, buffer or backpressure):",
                "",
                table(step_rows(floor["steps"])),
            ]
            fh, gh = headline(floor["steps"]), headline(s["steps"])
            out += [
                "",
                f"Sustained deliveries/s at p99 < {P99_LIMIT_MS:g} ms (this run): gateway "
                f"{fmt(gh, '{:,.0f}') if gh else 'none'}, floor {fmt(fh, '{:,.0f}') if fh else 'none'}"
                + (f" (gateway / floor = {gh / fh:.2f}x)." if gh and fh else "."),
            ]
        if len(s.get("runs", [])) > 1:

            def per_run(runs: list[Result]) -> str:
                rates = [headline(r["steps"]) for r in runs]
                return " / ".join(f"{h:,.0f}" if h else "none" for h in rates)

            out += [
                "",
                f"All {len(s['runs'])} runs (the tables above are the first): sustained "
                f"deliveries/s, gateway {per_run(s['runs'])}"
                + (f"; floor {per_run(floor['runs'])}" if floor else "")
                + ".",
            ]
        if s.get("ws"):
            out += [
                "",
                f"WebSocket, same shape (JSON subscribe), connect {s['ws_connect_s']:.1f} s:",
                "",
            ]
            out.append(table(step_rows(s["ws"])))
        h = median_headline(s.get("runs") or [s])
        fh = median_headline(floor.get("runs") or [floor]) if floor else None
        targets.append(
            [
                f"Shape {s['name']} (SSE): sustained deliveries/s with p99 < {P99_LIMIT_MS:g} ms, "
                f"no drops, RSS < {RSS_LIMIT_MB:g} MB >= {TARGET:,}"
                + (f" (median of {len(s['runs'])} runs)" if len(s.get("runs", [])) > 1 else ""),
                fmt(h, "{:,.0f}/s") if h else "none passed",
                (fmt(fh, "{:,.0f}/s") if fh else "none passed") if floor else "not run",
                "PASS" if h and h >= TARGET else "FAIL",
            ]
        )
        if floor and (fh or 0) < TARGET:
            reading.append(
                f"- Shape {s['name']}: the floor server itself sustains "
                f"{fmt(fh, '{:,.0f}') if fh else 'no step'} deliveries/s at p99 < "
                f"{P99_LIMIT_MS:g} ms here, below the {TARGET:,} target: with the clients on "
                "the same cores, the target is out of reach on this machine for a Python "
                "process that makes one `send` per client per event"
                + (f"; the gateway reaches {h / fh:.0%} of the floor." if h and fh else ".")
            )
    out += ["", "Targets:", "", table(targets)]
    if reading:
        out += ["", "Reading the targets:", "", *reading]
    if prof:
        out += ["", "Profile: see the benchmark's console output (`--profile`)."]
    return "\n".join(out)


def main() -> None:
    ap = _report.parser(__doc__, "1,000 clients, 2 s steps")
    ap.add_argument("--clients", type=int, help="connections per shape (default 5,000)")
    ap.add_argument("--seconds", type=float, help="seconds per step (default 5)")
    ap.add_argument("--shapes", default="A,B", help="A, B or A,B")
    ap.add_argument(
        "--runs",
        type=int,
        default=1,
        help="SSE (and floor) ladders per shape; the targets use the median headline",
    )
    ap.add_argument("--profile", action="store_true", help="also profile one step (cProfile)")
    ap.add_argument(
        "--no-floor", action="store_true", help="skip the raw floor server (gateway_raw.py)"
    )
    a = ap.parse_args()
    a.command = _report.command()
    a.clients = a.clients or (1000 if a.quick else 5000)
    a.seconds = a.seconds or (2.0 if a.quick else 5.0)
    raise_nofile()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    try:
        info = machine(a.dsn)
    except Exception as exc:
        sys.exit(f"cannot query the server at {a.dsn!r}: {exc}")
    shapes = []
    for name in a.shapes.split(","):
        channels = 100 if name == "A" else 1
        runs, floors = [], []
        for i in range(a.runs):  # the WebSocket ladder in the first run only
            runs.append(run_shape(a, name, channels, env, LADDER if i == 0 else []))
            if not a.no_floor:
                floors.append(run_shape(a, name, channels, env, [], raw=True))
        shape = runs[0]
        shape["runs"] = runs
        if floors:
            shape["floor"] = floors[0]
            shape["floor"]["runs"] = floors
        shapes.append(shape)
    prof = ""
    if a.profile:
        prof = profile_step(a, env)
        print(prof)
    info["Load average at end"] = _report.load_average()
    info["Note"] = (
        "other work on the machine raises the load average above the core count; the CPU "
        "figures then include time lost to contention"
        if _report.overloaded()
        else "machine otherwise idle"
    )
    body = report(a, info, shapes, prof)
    _report.publish(body, a.output, START, END)


if __name__ == "__main__":
    main()
