"""
The gateway (``pgherald serve``'s app, under `GatewayServer`) in a storm of real faults.

The gateway's database connections (its listener, ``pgherald-gateway-db`` and
``pgherald-gateway-tail``) go through a `FaultProxy`; so do its clients' connections, through
another. A publisher stores durable events (`pgherald.publish`, straight to the database) at a
steady pace, while SSE and WebSocket clients follow the durable channel and, whenever their
stream breaks or is refused, reconnect and resume after the last event id they saw, as
docs/gateway.md tells a browser to (``Last-Event-ID``; a WebSocket ``subscribe`` with
``after``). Meanwhile faults come one after the other, picked at random: the gateway's backends
terminated (``pg_terminate_backend``, in this test's database only), its database connections
severed, frozen for a while then thawed (half-open), or its proxy refusing new connections for
a while; and the clients' connections dropped. Then the faults stop and everything must catch
up. What docs/gateway.md promises for durable channels must hold through all of it:

    "A client that reconnects with `Last-Event-ID` [...] first gets every event after N on its
    durable channels from the log, up to where the tail was when it subscribed, then the live
    stream: no gap, no duplicate" (and the WebSocket's ``after``: "with no gap and no
    duplicate").

So each client's events, over all its connections, are exactly the events published, in log
order, each once, with the payloads stored; while the database is unreachable a resume is
answered "the database is not available" (503, or that `error` message) and nothing else; and
at the end the gateway is healthy (``/healthz`` 200), publishes again, delivers live, and shuts
down cleanly.

Seeded and replayable as every storm test (tests/fix_chaos.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
from websockets.exceptions import WebSocketException
from websockets.sync.client import connect as ws_connect

import pgherald
from pgherald.contrib.gateway import create_app
from tests.fix_chaos import Fault, Paced, chaos_seed, proxy_faults, storm
from tests.fix_faults import FaultProxy, LogWatch, wait_until, watching
from tests.fix_proxy import _target_of
from tests.integration.test_gateway import SECRET
from tests.integration.test_gateway import serve as gateway_serve
from tests.integration.test_gateway import token as gateway_token

CHANNEL = "orders"
Sent = tuple[int, int]  # (event id, n)
SESSIONS = ("pgherald-gateway", "pgherald-gateway-db", "pgherald-gateway-tail")
UNAVAILABLE = "the database is not available"  # the documented answer while it is away


def token(mode: str = "r") -> str:
    return gateway_token([CHANNEL], mode)


@contextlib.contextmanager
def serve(app: Any, **config: Any) -> Iterator[tuple[int, None]]:
    """`test_gateway.serve`, as the port (uvicorn's *config*: the event loop of `pgherald
    serve` by default, uvloop when installed)."""
    with gateway_serve(app, **config) as url:
        yield int(url.rsplit(":", 1)[1]), None


def publish_step(conn: psycopg.Connection[Any], rng: random.Random, n: int) -> list[Sent]:
    """One to three durable events (n from 1: event 0 is the clients' start)."""
    return [
        (pgherald.publish(conn, CHANNEL, {"n": k}), k)
        for k in range(n + 1, n + 1 + rng.randint(1, 3))
    ]


class Follower:
    """
    A client of the durable channel, SSE or WebSocket, on a thread: whenever its stream breaks
    (or is refused), it connects again and resumes after the last event id it saw.
    """

    def __init__(self, kind: str, name: str, port: int, after: int) -> None:
        self.kind = kind
        self.name = name
        self.port = port
        self.last = after
        self.got: list[tuple[int, str, str]] = []  # (id, channel, data), as received
        self.streams = 0  # streams opened (`: ready`, or `subscribed`)
        self.ends: list[str] = []  # why each stream ended
        self.refusals: list[str] = []  # resumes the gateway answered with an error
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.thread.start()

    def _main(self) -> None:
        try:
            with httpx.Client(timeout=httpx.Timeout(5.0)) as http:
                while not self._stop.is_set():
                    try:
                        why = self._sse(http) if self.kind == "sse" else self._ws()
                    except (httpx.TransportError, OSError, WebSocketException) as exc:
                        why = f"{type(exc).__name__}: {exc}"
                    self.ends.append(why)
                    self._stop.wait(0.05)  # the reconnection's pace (EventSource's retry)
        except BaseException as exc:  # kept for the test: a thread must not raise
            self.error = exc

    def _event(self, event_id: str, channel: str, data: str) -> None:
        self.got.append((int(event_id), channel, data))
        self.last = int(event_id)

    def _sse(self, http: httpx.Client) -> str:
        url = f"http://127.0.0.1:{self.port}/sse"
        params = {"channel": CHANNEL, "token": token()}
        headers = {"Last-Event-ID": str(self.last)}  # what EventSource sends by itself
        with http.stream("GET", url, params=params, headers=headers) as resp:
            if resp.status_code != 200:
                self.refusals.append(f"{resp.status_code} {resp.read().decode()}")
                return f"refused: {resp.status_code}"
            event: dict[str, str] = {}
            data: list[str] = []
            for line in resp.iter_lines():  # heartbeats keep lines coming: stop is seen
                if self._stop.is_set():
                    return "stopped"
                if line == ": ready":
                    self.streams += 1
                elif line == "":
                    if event.get("event") == "error":
                        return "ended by the gateway: " + "\n".join(data)
                    if "id" in event:
                        self._event(event["id"], event.get("event", ""), "\n".join(data))
                    event, data = {}, []
                elif not line.startswith(":"):
                    field, _, value = line.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    if field == "data":
                        data.append(value)
                    else:
                        event[field] = value
        return "the stream ended"

    def _ws(self) -> str:
        url = f"ws://127.0.0.1:{self.port}/ws?token={token()}"
        with ws_connect(url, open_timeout=5, close_timeout=1) as ws:
            ws.send(json.dumps({"type": "subscribe", "channels": [CHANNEL], "after": self.last}))
            while not self._stop.is_set():
                try:
                    msg = json.loads(ws.recv(timeout=0.25))
                except TimeoutError:
                    continue  # (to look at the stop flag)
                if msg["type"] == "subscribed":
                    self.streams += 1
                elif msg["type"] == "event":
                    self._event(msg["id"], msg["channel"], json.dumps(msg["payload"]))
                else:
                    self.refusals.append(json.dumps(msg))
                    return f"refused: {msg}"  # then connect again, and resume
        return "stopped"

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive(), f"{self.name} did not stop"
        assert self.error is None, f"{self.name}: {self.error!r}"


def terminate(conn: psycopg.Connection[Any], names: tuple[str, ...]) -> int:
    """End the gateway's sessions named *names*, in this test's database only; how many."""
    row = conn.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        " AND application_name = ANY(%s)",
        (list(names),),
    ).fetchone()
    return int(row[0]) if row else 0


def gateway_faults(
    conn: psycopg.Connection[Any], db_proxy: FaultProxy, client_proxy: FaultProxy
) -> dict[str, Fault]:
    """The gateway's sessions ended (one or all), its database connections cut, frozen or
    refused, its clients' connections dropped."""

    def end(names: tuple[str, ...] | None) -> Fault:
        def fault(rng: random.Random) -> str:
            chosen = names or (rng.choice(SESSIONS),)
            return f"{'+'.join(chosen)} ({terminate(conn, chosen)})"

        return fault

    def drop(rng: random.Random) -> str:
        client_proxy.sever()
        return ""

    return proxy_faults(db_proxy) | {
        "terminate": end(None),
        "terminate all": end(SESSIONS),
        "drop": drop,
    }


def test_durable_clients_of_the_gateway_get_every_event_once_in_order_through_a_storm(
    installed: str, conn: psycopg.Connection[Any]
) -> None:
    seed = chaos_seed()
    rng = random.Random(seed)
    report = f"seed {seed}"
    start = pgherald.publish(conn, CHANNEL, {"n": 0})  # clients resume after it from the start
    db_proxy = FaultProxy(_target_of(installed))
    app = create_app(
        db_proxy.dsn_for(installed),
        jwt_secret=SECRET,
        durable_channels=[CHANNEL],
        heartbeat=0.25,  # SSE clients see a line at least this often
        poll_interval=0.1,
    )
    hub = app.state.gateway.hub
    followers: list[Follower] = []
    with contextlib.ExitStack() as stack:
        stack.callback(db_proxy.close)
        port, _ = stack.enter_context(serve(app))
        # (uvicorn configured its loggers when the server was made: watched from here on, at
        # the level it set)
        errors = LogWatch()
        logging.getLogger("uvicorn.error").addHandler(errors)
        stack.callback(logging.getLogger("uvicorn.error").removeHandler, errors)
        client_proxy = FaultProxy(("127.0.0.1", port))
        stack.callback(client_proxy.close)
        kinds = ["sse", "ws", "sse", "ws"]
        followers = [
            Follower(kind, f"{kind}-{i}", client_proxy.port, start) for i, kind in enumerate(kinds)
        ]
        stack.callback(lambda: [f._stop.set() for f in followers])
        wait_until(lambda: all(f.streams for f in followers), 10, "every client's first stream")
        publisher = Paced(installed, publish_step)
        stack.callback(publisher.stop)
        # Every client's stream breaks, every gateway session ends, every connection is cut, at
        # least once; then faults at random.
        faults = gateway_faults(conn, db_proxy, client_proxy)
        done = storm(rng, faults, first=["drop", "terminate all", "sever"])
        published = publisher.stop()
        report = f"seed {seed}; faults: {', '.join(done)}"

        def state() -> str:
            return "; ".join(
                f"{f.name}: {len(f.got)} events (last {f.last}), {f.streams} streams,"
                f" refusals {f.refusals[-3:]}, ends {f.ends[-3:]}"
                for f in followers
            )

        last = published[-1][0]
        wait_until(
            lambda: all(f.last >= last for f in followers),
            20,
            f"every client to catch up to event {last} ({report}) [{state()}]",
        )

        # The gateway is healthy again: /healthz, a publish through it, delivered live.
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5.0) as http:
            wait_until(
                lambda: http.get("/healthz").status_code == 200, 20, f"/healthz 200 ({report})"
            )
            assert http.get("/healthz").json() == {"database": True, "listener": True}, report
            answer = http.post(
                f"/publish/{CHANNEL}",
                json={"n": "after"},
                headers={"Authorization": f"Bearer {token('rw')}"},
            )
            assert answer.status_code == 200, f"{answer.text} ({report})"
            after = int(answer.json()["id"])
        wait_until(
            lambda: all(f.last >= after for f in followers),
            10,
            f"every client to get event {after}, published after the storm ({report}) [{state()}]",
        )
        for f in followers:
            f.stop()

        expected = [(i, CHANNEL, json.dumps({"n": n}, separators=(",", ":"))) for i, n in published]
        expected.append((after, CHANNEL, '{"n":"after"}'))
        for f in followers:
            got = [(i, ch, json.dumps(json.loads(d), separators=(",", ":"))) for i, ch, d in f.got]
            ids = [i for i, _, _ in got]
            twice = sorted({i for i in ids if ids.count(i) > 1})
            assert not twice, f"{f.name} got events more than once: {twice[:10]} ({report})"
            missing = sorted({i for i, _, _ in expected} - set(ids))
            assert not missing, f"{f.name} missed events: {missing[:10]} ({report})"
            assert ids == sorted(ids), f"{f.name} got events out of log order ({report})"
            assert got == expected, f"{f.name} got other events than published ({report})"
            odd = [r for r in f.refusals if UNAVAILABLE not in r]
            assert not odd, f"{f.name}: resumes refused for another reason: {odd[:3]} ({report})"
            # Its stream broke (the first fault drops every client) and it resumed.
            assert f.streams >= 2, f"{f.name} never resumed ({report})"
        assert hub.listener.stats.reconnects >= 1, report
        crashed = [r.getMessage() for r in errors.records if r.levelno >= logging.ERROR]
        assert not crashed, f"the gateway logged errors: {crashed[:3]} ({report})"


# uvloop is the loop `pgherald serve` runs when installed (the gateway extra brings it). Under
# it, a reset was missed until the health check (15 s + 5 s): libuv reports a socket's error
# to a reader once, and AsyncWaiter took that one call for a stale one (found by the storm).
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_reset_of_the_gateways_connection_is_a_reconnect_gap_at_once(
    loop: str, installed: str, conn: psycopg.Connection[Any]
) -> None:
    """
    The storm's sever, alone, on each event loop: the listener's connection is reset (the
    kernel says so at once, unlike a half-open connection, which only the health check finds).
    docs/gateway.md: a `reconnect` gap is sent when "the gateway's listening connection to the
    database was lost and re-established (a restart, a failover, a network cut, ...)", "once
    it listens again, so every event after the gap message is delivered"; and /healthz says
    whether the listener is connected.
    """
    proxy = FaultProxy(_target_of(installed))
    app = create_app(
        proxy.dsn_for(installed),
        allow_anonymous=["chat", CHANNEL],
        durable_channels=[CHANNEL],
        heartbeat=0.25,  # a line at least this often: the read below sees its deadline
    )
    hub = app.state.gateway.hub
    try:
        with (
            serve(app, loop=loop) as (port, _),
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5.0) as http,
            http.stream("GET", "/sse", params={"channel": "chat"}) as resp,
        ):
            assert resp.status_code == 200
            lines = resp.iter_lines()
            assert next(line for line in lines if line == ": ready")
            pgherald.notify(conn, "chat", "before")
            assert next(line for line in lines if line.startswith("data:")) == "data: before"
            proxy.sever()  # every connection of the gateway's reset (RST)
            deadline = time.monotonic() + 5.0  # well within the health check's 15 s + 5 s
            for line in lines:
                if line == "event: gap":
                    break
                assert time.monotonic() < deadline, (
                    f"no gap within 5 s of a reset; /healthz: {http.get('/healthz').json()},"
                    f" listener reconnects: {hub.listener.stats.reconnects}, gateway sessions:"
                    f" {gateway_sessions(conn)}"
                )
            gap = json.loads(next(lines).removeprefix("data: "))
            assert gap["reason"] == "reconnect", gap
            assert gap["channels"] == ["chat"], gap
            pgherald.notify(conn, "chat", "after")
            assert next(line for line in lines if line.startswith("data:")) == "data: after"
            assert "pgherald-gateway" in gateway_sessions(conn)
            assert http.get("/healthz").json() == {"database": True, "listener": True}
    finally:
        proxy.close()


def gateway_sessions(conn: psycopg.Connection[Any]) -> list[str]:
    """The application names of the gateway's sessions in this test's database."""
    rows = conn.execute(
        "SELECT application_name FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name LIKE 'pgherald-gateway%' ORDER BY 1"
    ).fetchall()
    return [r[0] for r in rows]


def test_a_hub_task_that_fails_unexpectedly_starts_again(
    installed: str, conn: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A bug in one of the hub's background tasks (here the log tail, made to raise once) must
    not end the hub under a server that keeps accepting clients (uvicorn only logs a lifespan
    error): the task is logged with its traceback and started again, and durable streams go on.
    """
    from pgherald.contrib.gateway import fanout

    real = fanout._reader  # the tail's statement, and only the tail's
    failures: list[int] = []

    def fails_once(query: Any) -> Any:
        if not failures:
            failures.append(1)
            raise RuntimeError("a bug in the tail")
        return real(query)

    monkeypatch.setattr(fanout, "RESTART_AFTER", 0.1)
    start = pgherald.publish(conn, CHANNEL, {"n": 0})
    app = create_app(installed, allow_anonymous=[CHANNEL], durable_channels=[CHANNEL])
    with (
        watching("pgherald.gateway") as log,
        serve(app) as (port, _),
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10.0) as http,
        http.stream(
            "GET", "/sse", params={"channel": CHANNEL}, headers={"Last-Event-ID": str(start)}
        ) as resp,
    ):
        assert resp.status_code == 200
        lines = resp.iter_lines()
        monkeypatch.setattr(fanout, "_reader", fails_once)
        first = pgherald.publish(conn, CHANNEL, {"n": 1})
        assert next(line for line in lines if line.startswith("id:")) == f"id: {first}"
        assert failures == [1]  # the tail did fail on it, and came back for it
        second = pgherald.publish(conn, CHANNEL, {"n": 2})
        assert next(line for line in lines if line.startswith("id:")) == f"id: {second}"
        assert http.get("/healthz").json() == {"database": True, "listener": True}
    (failed,) = [r for r in log.records if "task failed" in r.getMessage()]
    assert failed.levelno == logging.ERROR
    assert failed.exc_info is not None
