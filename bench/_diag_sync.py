"""Diagnostic for issue 11: where the sync listener's wall time goes (not a benchmark).

``python bench/_diag_sync.py [--clients a,b] [--runs N]`` runs ``listen_bench.trial`` with this
file as the receiver worker: the worker is ``bench/_workers.py`` plus counters, namely context
switches (getrusage) and wall/CPU between the first and the last notification for every client;
libpq reads, waits (select calls), time blocked in them and deliveries for pgherald's sync
clients and for instrumented copies of the pq loops (``pq-loop``, ``pq-loop-handler``).
The counters cost CPU themselves: compare the counts, not the rates, with the real bench.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _workers

C: dict[str, float] = {"reads": 0, "waits": 0, "wait_false": 0, "blocked_s": 0.0, "delivers": 0}
_SNAP: dict[str, Any] = {}


def _snap() -> dict[str, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    with open("/proc/thread-self/schedstat") as f:  # ns on CPU, ns runnable but waiting, slices
        on_cpu, queued, _ = map(int, f.read().split())
    return {
        "vcsw": ru.ru_nvcsw,
        "ivcsw": ru.ru_nivcsw,
        "oncpu_s": on_cpu / 1e9,
        "queued_s": queued / 1e9,
        **C,
    }


def _patch_tally() -> None:
    init = _workers.Tally.__init__

    def wrapped(self: Any, expected: int, latency: bool) -> None:
        init(self, expected, latency)
        inner = self.handler

        def handler(data: Any) -> bool:
            done = inner(data)
            if self.count == 1 and "first" not in _SNAP:
                _SNAP["first"] = _snap()
            elif self.count == expected:
                _SNAP["last"] = _snap()
            return done

        self.handler = handler

    _workers.Tally.__init__ = wrapped  # type: ignore[method-assign]
    result = _workers.Tally.result

    def res(self: Any) -> dict[str, Any]:
        out: dict[str, Any] = result(self)
        if "first" in _SNAP and "last" in _SNAP:
            n = max(1, self.count - 1)
            d = {k: _SNAP["last"][k] - _SNAP["first"][k] for k in _SNAP["first"]}
            out["per_1000"] = {
                k: round(v * 1000 / n, 3) for k, v in d.items() if not k.endswith("_s")
            }
            out["blocked_us_per_notif"] = round(d["blocked_s"] * 1e6 / n, 3)
            out["queued_us_per_notif"] = round(d["queued_s"] * 1e6 / n, 3)
            out["oncpu_us_per_notif"] = round(d["oncpu_s"] * 1e6 / n, 3)
            if d["reads"]:
                out["notifs_per_read"] = round(n / d["reads"], 1)
        return out

    _workers.Tally.result = res  # type: ignore[method-assign]


def _patch_pgherald() -> None:
    from pgherald import _listener, _waiting
    from pgherald._protocol import engine

    consume = engine.ListenerEngine._consume

    def counted_consume(self: Any, pgconn: Any) -> None:
        C["reads"] += 1
        consume(self, pgconn)

    engine.ListenerEngine._consume = counted_consume  # type: ignore[method-assign]
    wait = _waiting.Waiter.wait
    clock = time.perf_counter

    def counted_wait(self: Any, fd: int, events: int, deadline: float | None) -> bool:
        t = clock()
        r = wait(self, fd, events, deadline)
        C["blocked_s"] += clock() - t
        C["waits"] += 1
        C["wait_false"] += not r
        return r

    _waiting.Waiter.wait = counted_wait  # type: ignore[method-assign]
    deliver = _listener.Listener._deliver

    def counted_deliver(self: Any) -> None:
        C["delivers"] += 1
        deliver(self)

    _listener.Listener._deliver = counted_deliver  # type: ignore[method-assign]


def recv_pq_loop(dsn: str, handler: Any, deadline: float, with_notification: bool) -> None:
    import psycopg

    from pgherald import Notification

    make = tuple.__new__
    clock = time.perf_counter
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("LISTEN bench")
        pgconn = conn.pgconn
        sock = pgconn.socket
        _workers.emit("READY")
        while True:
            t = clock()
            ready = select.select([sock], [], [], _workers.remaining(deadline))[0]
            C["blocked_s"] += clock() - t
            C["waits"] += 1
            if not ready:
                C["wait_false"] += 1
                continue
            C["reads"] += 1
            pgconn.consume_input()
            while (n := pgconn.notifies()) is not None:
                if with_notification:
                    x = make(Notification, (n.relname.decode(), n.extra.decode(), n.be_pid))
                    payload = x.payload
                else:
                    payload = n.extra.decode()
                if payload == _workers.STOP or handler(json.loads(payload)):
                    return


def worker() -> None:
    _patch_tally()
    _patch_pgherald()
    _workers.RECEIVERS["pq-loop"] = lambda d, h, t: recv_pq_loop(d, h, t, False)
    _workers.RECEIVERS["pq-loop-handler"] = lambda d, h, t: recv_pq_loop(d, h, t, True)
    olds = [a for a in sys.argv if a.startswith("pgherald-") and a.endswith("-old")]
    if olds:  # CLIENT-old: CLIENT with the dispatch of the engine file $DIAG_OLD_ENGINE
        import importlib.util

        from pgherald._protocol import engine

        path = os.environ["DIAG_OLD_ENGINE"]
        spec = importlib.util.spec_from_file_location("pgherald._protocol._engine_old", path)
        assert spec is not None
        assert spec.loader is not None
        old = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = old
        spec.loader.exec_module(old)
        engine.ListenerEngine.dispatch = old.ListenerEngine.dispatch  # type: ignore[method-assign]
        sys.argv[sys.argv.index(olds[0])] = olds[0].removesuffix("-old")
    _workers.main()


def orchestrate() -> None:
    import listen_bench

    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn", default="host=127.0.0.1 user=postgres dbname=postgres")
    ap.add_argument("--clients", default="pq-loop,pq-loop-handler,pgherald-sync,pgherald-sync-iter")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--count", type=int, default=200_000)
    ap.add_argument("--size", type=int, default=0, help="payload bytes (0: ~100)")
    a = ap.parse_args()
    listen_bench.WORKERS = os.path.abspath(__file__)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")]
        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    print(f"load average: {os.getloadavg()}", flush=True)
    for run in range(a.runs):
        for c in a.clients.split(","):
            r = listen_bench.trial(
                c, a.dsn, env, a.count, cpu=listen_bench.receiver_cpu(), size=a.size
            )
            r.pop("sender", None)
            wall = 1e6 / r["rate"] if r.get("rate") else 0
            print(
                f"run {run + 1} {c:20} {r.get('rate', 0):>9,.0f}/s wall {wall:.2f} "
                f"cpu {r.get('cpu_us', 0):.2f} us/notif blocked {r.get('blocked_us_per_notif')} "
                f"queued {r.get('queued_us_per_notif')} oncpu {r.get('oncpu_us_per_notif')} "
                f"notifs/read {r.get('notifs_per_read')} per 1000: {r.get('per_1000')} "
                f"{r.get('error', '')}",
                flush=True,
            )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("send", "recv"):
        worker()
    else:
        orchestrate()
