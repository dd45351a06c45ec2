"""``pgherald relay`` in a subprocess, as a user runs it."""

from __future__ import annotations

import psycopg
import pytest

import pgherald
from tests.fix_brokers import RelayProcess
from tests.fix_cli import run
from tests.fix_durable import uncovered
from tests.fix_faults import wait_until

redis = pytest.importorskip("redis", reason="the relay tests need the 'relay' extra (redis-py)")


def test_help_names_the_targets_and_options(installed: str) -> None:
    r = run(installed, "relay", "--help")
    assert r.returncode == 0
    for option in ("--to", "--stream", "--subject", "--group", "--maxlen", "--secret"):
        assert option in r.stdout
    assert "PGHERALD_WEBHOOK_SECRET" in r.stdout


def test_relays_into_redis_until_sigterm(
    installed: str, conn: psycopg.Connection, redis_url: str, unique: str
) -> None:
    ids = pgherald.publish_many(conn, "orders", [{"n": n} for n in range(50)], key="k")
    relay = RelayProcess(installed, "--to", redis_url, "--stream", unique, "orders").start()
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        wait_until(lambda: uncovered(conn, "relay") == 0, 15, "the relay to catch up")
        assert relay.stop() == 0
        entries = client.xrange(unique)
        assert [int(fields["id"]) for _, fields in entries] == ids
        out = relay.output()
        assert f"relaying 'orders' to {redis_url}" in out
        assert "relayed 50 events" in out
    finally:
        relay.kill()
        client.delete(unique, f"{unique}:pgherald-positions")
        client.close()


def test_errors_are_one_line(installed: str) -> None:
    r = run(installed, "relay", "--to", "kafka://127.0.0.1:9092", "orders")
    assert r.returncode == 1
    assert r.stderr.startswith("pgherald: error: relay target 'kafka://127.0.0.1:9092' is not")
    assert "Traceback" not in r.stderr
    r = run(installed, "relay", "orders")
    assert r.returncode == 2
    assert "--to" in r.stderr
    r = run(installed, "relay", "--to", "http://example.com/x", "orders")
    assert r.returncode == 1
    assert "use https://" in r.stderr
