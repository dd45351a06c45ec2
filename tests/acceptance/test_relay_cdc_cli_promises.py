"""
``pgherald relay`` promises of docs/relay.md that no other test checked, in a subprocess
against the machine's NATS (JetStream) and a real PostgreSQL:

- "The stream is created if missing ... with JetStream's defaults overridden by
  ``--stream-option KEY=VALUE`` (repeat; values as JSON)";
- ``--from now``: a new group starts at the end of the log (the backlog is not relayed);
- the output: "relaying ... (group 'relay'; Ctrl-C to stop)", "connected to JetStream at ...
  (stream ...)", and after Ctrl-C (SIGINT) exit status 0 and how many events it relayed;
- exit status 1 with a one-line error for "a stream that cannot be created", 2 for wrong usage
  (a ``--stream-option`` that is not ``KEY=VALUE``).
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import psycopg
import pytest

import pgherald
from tests.fix_brokers import RelayProcess
from tests.fix_cli import run
from tests.fix_durable import uncovered
from tests.fix_faults import wait_until

nats = pytest.importorskip("nats", reason="the relay tests need the 'relay' extra (nats-py)")

from tests.integration.test_relay_nats import delete_stream, messages, stream_count  # noqa: E402


def stream_config(url: str, stream: str) -> Any:
    async def info() -> Any:
        nc = await nats.connect(url)
        try:
            return (await nc.jetstream().stream_info(stream)).config
        finally:
            await nc.close()

    return asyncio.run(info())


def test_relay_from_now_creates_its_stream_with_the_stream_options_and_says_so(
    installed: str, conn: psycopg.Connection, nats_url: str, unique: str
) -> None:
    stream = unique.upper()
    backlog = pgherald.publish_many(conn, "orders", [{"n": n} for n in range(3)])
    relay = RelayProcess(
        installed,
        "--to",
        nats_url,
        "--stream",
        stream,
        "--subject",
        f"{unique}.{{channel}}",
        "--from",
        "now",
        "--stream-option",
        "max_age=3600",  # JSON: a number of seconds
        "--stream-option",
        "storage=memory",  # not JSON: the text
        "--stream-option",
        "duplicate_window=600",
        "orders",
    ).start()
    assert relay.proc is not None
    try:
        # The group created (its start fixed): what is published from here on is after "now".
        # The stream is made when the relay starts, before it has anything to relay.
        wait_until(
            lambda: any(g.name == "relay" for g in pgherald.list_groups(conn)),
            15,
            "the relay's group created",
        )
        wait_until(lambda: stream_count(nats_url, stream) == 0, 15, "the stream made, empty")
        live = pgherald.publish_many(conn, "orders", [{"n": n} for n in range(3, 8)])
        wait_until(lambda: stream_count(nats_url, stream) >= 5, 15, "the live events relayed")
        relay.proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert relay.proc.wait(10) == 0, relay.output()
        out = relay.output()
        assert f"relaying 'orders' to {nats_url} (group 'relay'; Ctrl-C to stop)" in out, out
        assert f"connected to JetStream at {nats_url} (stream {stream})" in out, out
        assert "relayed 5 events" in out, out
        assert "Traceback" not in out, out
        config = stream_config(nats_url, stream)
        assert config.max_age == 3600
        assert config.duplicate_window == 600
        assert getattr(config.storage, "value", config.storage) == "memory"
        assert config.subjects == [f"{unique}.orders"]
        ids = [int(m.headers["Pgherald-Event-Id"]) for m in messages(nats_url, stream)]
        assert ids == live  # the backlog before "now" was not relayed
        assert not set(ids) & set(backlog)
    finally:
        relay.kill()
        delete_stream(nats_url, stream)


def test_a_stream_that_cannot_be_created_and_a_bad_stream_option_are_one_line(
    installed: str, conn: psycopg.Connection, nats_url: str, unique: str
) -> None:
    stream = unique.upper()
    common = ["relay", "--to", nats_url, "--stream", stream, "--subject", f"{unique}.{{channel}}"]
    try:
        # Said when the relay starts, on an idle log as with an event to relay.
        for idle in (True, False):
            if not idle:
                pgherald.publish(conn, "orders", {"n": 1})
            r = run(installed, *common, "--stream-option", "no_such_setting=1", "orders")
            assert r.returncode == 1, r.stderr
            assert "Traceback" not in r.stderr, r.stderr
            errors = [ln for ln in r.stderr.splitlines() if ln.startswith("pgherald: error:")]
            assert len(errors) == 1, r.stderr
            assert f"cannot create JetStream stream {stream!r}" in errors[0]
            assert "no_such_setting" in errors[0]
            assert "fix --stream-option" in errors[0]
            assert stream_count(nats_url, stream) == -1  # nothing was created
        # Not the event's fault: it is neither dead-lettered nor passed by the group.
        assert uncovered(conn, "relay") == 1
        assert pgherald.dead_letters(conn, "relay") == []

        r = run(installed, *common, "--stream-option", "max_age", "orders")
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith("pgherald: error: Invalid value: 'max_age': use KEY=VALUE")
    finally:
        delete_stream(nats_url, stream)
