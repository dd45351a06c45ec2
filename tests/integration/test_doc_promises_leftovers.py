"""
Promises of docs/errors.md, docs/listen.md, docs/observability.md and docs/embedded.md that no
other test held the code to, each against a real server (never a mock):

- ``InvalidChannel`` (errors.md: "A channel name is not a `str`, is empty, contains a NUL
  character, or is longer than 63 bytes in UTF-8. pgherald checks this in `notify`, in the
  `channels=` option, in `on`, in `add_handler` and in `subscribe`"; listen.md: "Each name is
  checked (`InvalidChannel`)") from every entry point of `Listener` and `AsyncListener`
  (asyncio and trio), `unsubscribe` included, before any round trip to the server; the
  refused call changes nothing, and the listener goes on working with a valid channel. And the
  other side of it (errors.md: "Any other text is fine: upper case, spaces, quotes and
  non-ASCII characters are all quoted correctly"): such names, and one of exactly 63 bytes,
  LISTENed, sent with `pgherald.notify` and received, on each class and entry point.
- tracing (observability.md, the table): a batch handler's span is "`CONSUMER` `process
  <channel>` (`process` when a batch spans channels), one per call", "linked to the publishing
  span of each event (up to 128)".
- the embedded server (embedded.md): `stop()` "release[s] this process's handle. The server
  stops when the last process using it has released its handle"; `shut_down()` "ends the hold
  and stops the server even when other processes use it". Both with a real second process
  holding the server.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

import pgherald
import pgherald.tracing
from pgherald.embedded import KEEP_FILE, EmbeddedPostgres, running_dsn
from tests.fix_cli import cli_env
from tests.fix_durable import uncovered
from tests.fix_faults import await_until, wait_until
from tests.integration.test_tracing import instrumented

# -- InvalidChannel ------------------------------------------------------------------------

BAD: list[Any] = [
    pytest.param("", id="empty"),
    pytest.param("x" * 64, id="64-bytes"),
    pytest.param("é" * 32, id="64-bytes-in-32-characters"),
    pytest.param("a\x00b", id="nul"),
    pytest.param(7, id="not-a-str"),
]


def _exactly_63_bytes() -> str:
    name = 'Chat "Room" l\'été 🚀 '
    name += "x" * (63 - len(name.encode()))
    assert len(name.encode()) == 63
    return name


GOOD = ['He said "hi"', "chat room", "Commandes-Été-🚀", _exactly_63_bytes()]
GOOD_IDS = ["quotes", "spaces", "unicode", "63-bytes"]


def _ignore(n: pgherald.Notification) -> None:
    """A handler that is never meant to be called (its registration is refused)."""


def _activity(conn: psycopg.Connection, pid: int | None) -> tuple[Any, ...]:
    """What the server last saw from the session *pid*: any statement changes it."""
    row = conn.execute(
        "SELECT query, state_change, state FROM pg_stat_activity WHERE pid = %s", (pid,)
    ).fetchone()
    assert row is not None, f"no session {pid}"
    return tuple(row)


def _take_one(listener: pgherald.Listener, within: float = 10.0) -> pgherald.Notification | None:
    it = listener.notifications(timeout=within)
    try:
        for n in it:
            return n
        return None
    finally:
        it.close()  # type: ignore[attr-defined]


async def _atake_one(
    listener: pgherald.AsyncListener, within: float = 10.0
) -> pgherald.Notification | None:
    it = listener.notifications(timeout=within)
    try:
        async for n in it:
            return n
        return None
    finally:
        await it.aclose()  # type: ignore[attr-defined]


def _refused_options(dsn: str, bad: Any) -> None:
    """`channels=` refuses *bad*, alone, in a list, and as the lone str it counts as."""
    with pytest.raises(pgherald.InvalidChannel):
        pgherald.Listener(dsn, channels=[bad])
    with pytest.raises(pgherald.InvalidChannel):
        pgherald.Listener(dsn, channels=["fine", bad])
    with pytest.raises(pgherald.InvalidChannel):
        pgherald.AsyncListener(dsn, channels=["fine", bad])
    if isinstance(bad, str):
        with pytest.raises(pgherald.InvalidChannel):
            pgherald.Listener(dsn, channels=bad)
        with pytest.raises(pgherald.InvalidChannel):
            pgherald.AsyncListener(dsn, channels=bad)


@pytest.mark.parametrize("bad", BAD)
def test_listener_refuses_a_bad_channel_everywhere_before_the_server_and_goes_on(
    dsn: str, conn: psycopg.Connection, bad: Any
) -> None:
    _refused_options(dsn, bad)
    with pgherald.Listener(dsn, channels=["before"]) as listener:
        before = _activity(conn, listener.backend_pid)
        refusals: list[Callable[[], object]] = [
            lambda: listener.on(bad)(_ignore),
            lambda: listener.on("later", bad)(_ignore),
            lambda: listener.add_handler(bad, _ignore),
            lambda: listener.subscribe(bad),
            lambda: listener.subscribe("later", bad),
            lambda: listener.unsubscribe(bad),
            lambda: listener.unsubscribe("before", bad),
        ]
        for i, refuse in enumerate(refusals):
            with pytest.raises(pgherald.InvalidChannel) as info:
                refuse()
            assert isinstance(info.value, ValueError), i
        # No statement reached the server, and no refused call did half its work.
        assert _activity(conn, listener.backend_pid) == before
        assert listener.channels == ["before"]
        assert "later" not in listener.listening
        assert "before" in listener.listening

        # Still usable: iteration (no handler was left registered), then a new channel.
        pgherald.notify(conn, "before", "1")
        got = _take_one(listener)
        assert got is not None
        assert (got.channel, got.payload) == ("before", "1")
        listener.subscribe("after")
        pgherald.notify(conn, "after", "2")
        got = _take_one(listener)
        assert got is not None
        assert (got.channel, got.payload) == ("after", "2")


@pytest.mark.anyio
@pytest.mark.parametrize("bad", BAD)
async def test_async_listener_refuses_a_bad_channel_everywhere_before_the_server_and_goes_on(
    dsn: str, conn: psycopg.Connection, bad: Any
) -> None:
    _refused_options(dsn, bad)
    async with pgherald.AsyncListener(dsn, channels=["before"]) as listener:
        before = _activity(conn, listener.backend_pid)
        refusals: list[Callable[[], object]] = [
            lambda: listener.on(bad)(_ignore),
            lambda: listener.on("later", bad)(_ignore),
            lambda: listener.add_handler(bad, _ignore),
        ]
        for i, refuse in enumerate(refusals):
            with pytest.raises(pgherald.InvalidChannel) as info:
                refuse()
            assert isinstance(info.value, ValueError), i
        with pytest.raises(pgherald.InvalidChannel):
            await listener.subscribe(bad)
        with pytest.raises(pgherald.InvalidChannel):
            await listener.subscribe("later", bad)
        with pytest.raises(pgherald.InvalidChannel):
            await listener.unsubscribe(bad)
        with pytest.raises(pgherald.InvalidChannel):
            await listener.unsubscribe("before", bad)
        assert _activity(conn, listener.backend_pid) == before
        assert listener.channels == ["before"]
        assert "later" not in listener.listening

        pgherald.notify(conn, "before", "1")
        got = await _atake_one(listener)
        assert got is not None
        assert (got.channel, got.payload) == ("before", "1")
        await listener.subscribe("after")
        pgherald.notify(conn, "after", "2")
        got = await _atake_one(listener)
        assert got is not None
        assert (got.channel, got.payload) == ("after", "2")


@pytest.mark.parametrize("channel", GOOD, ids=GOOD_IDS)
def test_listener_hears_names_with_quotes_spaces_unicode_and_63_bytes(
    dsn: str, conn: psycopg.Connection, channel: str
) -> None:
    # channels=
    with pgherald.Listener(dsn, channels=[channel]) as listener:
        assert channel in listener.listening
        pgherald.notify(conn, channel, "by option")
        got = _take_one(listener)
        assert got is not None
        assert (got.channel, got.payload) == (channel, "by option")
    # subscribe(), then unsubscribe() takes the same name
    with pgherald.Listener(dsn) as listener:
        listener.subscribe(channel)
        assert channel in listener.listening
        pgherald.notify(conn, channel, "by subscribe")
        got = _take_one(listener)
        assert got is not None
        assert (got.channel, got.payload) == (channel, "by subscribe")
        listener.unsubscribe(channel)
        assert channel not in listener.listening
    # on(), handler style
    with pgherald.Listener(dsn) as listener:
        heard: list[tuple[str, str]] = []

        @listener.on(channel)
        def handle(n: pgherald.Notification) -> None:
            heard.append((n.channel, n.payload))
            listener.stop()

        assert channel in listener.listening  # on a connected Listener: at once
        pgherald.notify(conn, channel, "by on")
        t = threading.Thread(target=listener.run, daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive()
        assert heard == [(channel, "by on")]


@pytest.mark.anyio
@pytest.mark.parametrize("channel", GOOD, ids=GOOD_IDS)
async def test_async_listener_hears_names_with_quotes_spaces_unicode_and_63_bytes(
    dsn: str, conn: psycopg.Connection, channel: str
) -> None:
    async with pgherald.AsyncListener(dsn, channels=[channel]) as listener:
        assert channel in listener.listening
        pgherald.notify(conn, channel, "by option")
        got = await _atake_one(listener)
        assert got is not None
        assert (got.channel, got.payload) == (channel, "by option")
    async with pgherald.AsyncListener(dsn) as listener:
        await listener.subscribe(channel)
        assert channel in listener.listening
        pgherald.notify(conn, channel, "by subscribe")
        got = await _atake_one(listener)
        assert got is not None
        assert (got.channel, got.payload) == (channel, "by subscribe")
        await listener.unsubscribe(channel)
        assert channel not in listener.listening
    async with pgherald.AsyncListener(dsn) as listener:
        heard: list[tuple[str, str]] = []

        @listener.on(channel)
        async def handle(n: pgherald.Notification) -> None:
            heard.append((n.channel, n.payload))

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.run)  # LISTENs to the handlers' channels
                await await_until(lambda: channel in listener.listening, 10, "run() to LISTEN")
                pgherald.notify(conn, channel, "by on")
                await await_until(lambda: heard, 10, "the handler to run")
                listener.stop()
        assert heard == [(channel, "by on")]


# -- tracing: a batch handler's span ---------------------------------------------------------


@pytest.fixture
def linked_spans() -> Iterator[InMemorySpanExporter]:
    """Spans of pgherald, kept in memory; the SDK's own cap on links (128 by default) lifted,
    so that what is seen is pgherald's cap."""
    with instrumented(TracerProvider(span_limits=SpanLimits(max_links=1000))) as exporter:
        yield exporter


def _span_id_in(headers: Any) -> int:
    """The span id of the traceparent in an event's headers."""
    return int(str(headers["traceparent"]).split("-")[2], 16)


def _batches(
    installed: str, conn: psycopg.Connection, group: str, *channels: str
) -> list[list[pgherald.Event]]:
    """Run a consumer with a batch handler until *group* has caught up; the calls' events."""
    calls: list[list[pgherald.Event]] = []
    with pgherald.Consumer(
        installed, group=group, poll_interval=0.1, rebalance_interval=0.2
    ) as consumer:
        consumer.add_batch_handler(lambda events: calls.append(list(events)), *channels)
        t = threading.Thread(target=consumer.run, daemon=True)
        t.start()
        try:
            wait_until(
                lambda: all(uncovered(conn, group, ch) == 0 for ch in channels or [None]),
                10,
                f"group {group} to catch up",
            )
        finally:
            consumer.stop()
            t.join(10)
        assert not t.is_alive()
    return calls


def test_a_batch_span_is_process_across_channels_and_keeps_128_links(
    installed: str, conn: psycopg.Connection, linked_spans: InMemorySpanExporter
) -> None:
    # 200 events, each from a publish of its own (a publishing span each), on two channels;
    # committed together, so that one read (one call) takes them all.
    with conn.transaction():
        ids = [pgherald.publish(conn, "ab"[i % 2], {"i": i}) for i in range(200)]
    publishes = {
        s.context.span_id
        for s in linked_spans.get_finished_spans()
        if s.name in ("publish a", "publish b") and s.context is not None
    }
    assert len(publishes) == 200
    linked_spans.clear()

    (batch,) = _batches(installed, conn, "both")
    assert [e.id for e in batch] == ids
    (span,) = [s for s in linked_spans.get_finished_spans() if s.kind == SpanKind.CONSUMER]
    assert span.name == "process"  # not "process a": the batch spans two channels
    assert span.attributes is not None
    assert span.attributes["messaging.batch.message_count"] == 200
    assert "messaging.destination.name" not in span.attributes
    linked = [link.context.span_id for link in span.links]
    assert len(linked) == 128
    assert linked == [_span_id_in(e.headers) for e in batch[:128]]  # the first 128 events
    assert set(linked) <= publishes

    # A batch of one channel is named after it, and under the cap every event is linked.
    linked_spans.clear()
    (batch,) = _batches(installed, conn, "only-a", "a")
    assert {e.channel for e in batch} == {"a"}
    assert len(batch) == 100
    spans: list[ReadableSpan] = [
        s for s in linked_spans.get_finished_spans() if s.kind == SpanKind.CONSUMER
    ]
    assert [s.name for s in spans] == ["process a"]
    assert [link.context.span_id for link in spans[0].links] == [
        _span_id_in(e.headers) for e in batch
    ]


# -- the embedded server with another process holding it ---------------------------------------

HOLDER = """
import sys
import tempfile
import psycopg
from pgherald.embedded import EmbeddedPostgres

with EmbeddedPostgres(sys.argv[1]) as pg:  # as `pgherald demo` does
    print("ready", pg.dsn, flush=True)
    for line in sys.stdin:  # each line: use the server once; until stdin closes
        try:
            with psycopg.connect(pg.dsn, connect_timeout=5) as c:
                print("ok", c.execute("SELECT 1").fetchone()[0], flush=True)
        except psycopg.Error as exc:
            print("error", type(exc).__name__, flush=True)
print("released", flush=True)
"""


class Holder:
    """Another process using the embedded server of a data directory (`EmbeddedPostgres`)."""

    def __init__(self, datadir: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(datadir)],
            env=cli_env(None) | {"PGHERALD_EMBEDDED_DIR": str(datadir)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self._line()  # blocks until the server is up (or the process died)
        if not line.startswith("ready "):
            self.proc.kill()
            _, err = self.proc.communicate(timeout=30)
            pytest.fail(f"the holder did not start the server: {line!r} {err}")
        self.dsn = line.split()[1]

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def query(self) -> str:
        """Have the holder connect to its server and run a statement: "ok 1" or "error ..."."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("query\n")
        self.proc.stdin.flush()
        return self._line()

    def release(self) -> str:
        """Close its stdin: it leaves its `with` block and exits. What it printed last."""
        out, err = self.proc.communicate(input="", timeout=60)
        assert self.proc.returncode == 0, err
        return out.strip()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=30)


@pytest.fixture
def holders(datadir: Path) -> Iterator[Callable[[], Holder]]:
    made: list[Holder] = []

    def make() -> Holder:
        made.append(Holder(datadir))
        return made[-1]

    try:
        yield make
    finally:
        for h in made:
            h.kill()


def _users(datadir: Path) -> list[int]:
    return list(json.loads((datadir / ".handle_pids.json").read_text()))


def test_stop_releases_only_this_process_the_server_stays_for_another(
    datadir: Path, holders: Callable[[], Holder]
) -> None:
    holder = holders()
    with EmbeddedPostgres(datadir) as pg:  # reuses the server the holder started
        assert pg.dsn == holder.dsn
        with psycopg.connect(pg.dsn) as c:
            assert c.execute("SELECT 1").fetchone() == (1,)
    # This process let go: the server runs on for the other, which still uses it.
    assert running_dsn(datadir) == holder.dsn
    assert _users(datadir) == [holder.proc.pid]
    assert holder.query() == "ok 1"
    assert holder.release() == "released"
    assert running_dsn(datadir) is None  # the last user let go: stopped
    assert _users(datadir) == []


def test_shut_down_stops_the_server_another_process_uses_and_ends_the_hold(
    datadir: Path, holders: Callable[[], Holder]
) -> None:
    holder = holders()
    assert EmbeddedPostgres(datadir).keep()  # held as by `pgherald dev start`
    assert (datadir / KEEP_FILE).exists()

    assert EmbeddedPostgres(datadir).shut_down() is True
    assert running_dsn(datadir) is None
    assert not (datadir / KEEP_FILE).exists()
    assert holder.query().startswith("error ")  # gone for the other process too
    assert EmbeddedPostgres(datadir).shut_down() is False  # nothing runs now

    # The handles on the server that was shut down hold no server started afterwards: its
    # only user stops it on letting go, while the old holder still lives.
    with EmbeddedPostgres(datadir) as pg:
        assert running_dsn(datadir) == pg.dsn
        with psycopg.connect(pg.dsn) as c:
            assert c.execute("SELECT 1").fetchone() == (1,)
    assert running_dsn(datadir) is None
    assert holder.release() == "released"  # the old holder ends cleanly
    assert running_dsn(datadir) is None


def test_shut_down_waits_for_pgservers_lock_within_a_deadline(
    datadir: Path, holders: Callable[[], Holder], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A process holding pgserver's lock (one starting the server, or suspended) does not make
    # shut_down() hang: it waits embedded.LOCK_TIMEOUT, then says why, and changes nothing.
    import pgherald.embedded as embedded

    holder = holders()
    lock_holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, pgserver.postgres_server as ps; ps.PostgresServer._lock.acquire(); "
            "print('held', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert lock_holder.stdout is not None
        assert lock_holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(embedded, "LOCK_TIMEOUT", 0.5)
        started = time.monotonic()
        with pytest.raises(pgherald.ConnectError, match="holds pgserver's lock"):
            EmbeddedPostgres(datadir).shut_down()
        assert time.monotonic() - started < 5
        assert running_dsn(datadir) == holder.dsn  # nothing was stopped
    finally:
        assert lock_holder.stdin is not None
        assert lock_holder.stdout is not None
        lock_holder.stdin.close()
        lock_holder.wait(10)
        lock_holder.stdout.close()
    assert EmbeddedPostgres(datadir).shut_down() is True  # with the lock free, it does
    assert running_dsn(datadir) is None
