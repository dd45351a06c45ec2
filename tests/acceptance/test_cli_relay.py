"""``pgherald relay`` in a subprocess, as a user runs it."""

from __future__ import annotations

import itertools
import json
from datetime import datetime

import psycopg
import pytest

import pgherald
from tests.fix_brokers import RelayProcess
from tests.fix_cli import one_line_error, run
from tests.fix_durable import uncovered
from tests.fix_faults import wait_until

redis = pytest.importorskip("redis", reason="the relay tests need the 'relay' extra (redis-py)")


def test_help_names_the_targets_and_options(installed: str) -> None:
    r = run(installed, "relay", "--help")
    assert r.returncode == 0
    for option in (
        "--to",
        "--stream",
        "--subject",
        "--group",
        "--maxlen",
        "--secret",
        "--stats-interval",
    ):
        assert option in r.stdout
    assert "PGHERALD_WEBHOOK_SECRET" in r.stdout
    assert "PGHERALD_RELAY_STATS_INTERVAL" in r.stdout


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


# -- --stats-interval: how often the relay reports to `pgherald status` --


def relay_rows(conn: psycopg.Connection, pid: int) -> list[pgherald.RelayInfo]:
    """The status rows of the relay process *pid* (its group: relay)."""
    groups = [g for g in pgherald.list_groups(conn) if g.name == "relay"]
    return [r for g in groups for r in g.relays if r.pid == pid]


def status_relays(dsn: str) -> list[dict[str, object]]:
    out = run(dsn, "status", "--json")
    assert out.returncode == 0, out.stderr
    [group] = [g for g in json.loads(out.stdout)["groups"] if g["group"] == "relay"]
    return group["relays"]  # type: ignore[no-any-return]


def test_stats_interval_is_how_often_the_relay_reports(
    installed: str, conn: psycopg.Connection, redis_url: str, unique: str
) -> None:
    """Reports 0.3 s apart, not the default 10 s: four of them well within the wait."""
    pgherald.publish_many(conn, "orders", [{"n": n} for n in range(20)])
    relay = RelayProcess(
        installed, "--to", redis_url, "--stream", unique, "--stats-interval", "0.3", "orders"
    ).start()
    assert relay.proc is not None
    pid = relay.proc.pid
    client = redis.Redis.from_url(redis_url)
    # Each report's server time, as `status` shows it, by the relay's database session: a
    # relay that reconnects reports again at once (documented), so only reports on one
    # session are an interval apart.
    reports: list[tuple[int | None, datetime]] = []

    def gaps() -> list[float]:
        return [
            (b - a).total_seconds()
            for (pid_a, a), (pid_b, b) in itertools.pairwise(reports)
            if pid_a == pid_b
        ]

    def four_reports() -> bool:
        rows = relay_rows(conn, pid)
        if rows and rows[0].live and (rows[0].backend_pid, rows[0].reported_at) not in reports:
            reports.append((rows[0].backend_pid, rows[0].reported_at))
        return len(gaps()) >= 3

    try:
        wait_until(four_reports, 8, "four reports of the relay")  # the default: one in 10 s
        [row] = status_relays(installed)
        assert (row["pid"], row["interval"], row["live"]) == (pid, 0.3, True)
        assert relay.stop() == 0
    finally:
        relay.kill()
        client.delete(unique, f"{unique}:pgherald-positions")
        client.close()
    # never sooner than asked (a little clock slack)
    assert min(gaps()) >= 0.3 * 0.8, (reports, relay.output())
    assert relay_rows(conn, pid) == []  # its row removed when it stopped


def test_stats_interval_0_reports_nothing(
    installed: str, conn: psycopg.Connection, redis_url: str, unique: str
) -> None:
    """No row at all: a relay writes its first report right after connecting, before reading."""
    pgherald.publish_many(conn, "orders", [{"n": n} for n in range(20)])
    relay = RelayProcess(
        installed, "--to", redis_url, "--stream", unique, "--stats-interval", "0", "orders"
    ).start()
    assert relay.proc is not None
    client = redis.Redis.from_url(redis_url)
    try:
        wait_until(lambda: uncovered(conn, "relay") == 0, 15, "the relay to catch up")
        assert relay_rows(conn, relay.proc.pid) == []
        assert status_relays(installed) == []
        assert relay.stop() == 0
        assert client.xlen(unique) == 20
    finally:
        relay.kill()
        client.delete(unique, f"{unique}:pgherald-positions")
        client.close()


@pytest.mark.parametrize("bad", ["-1", "nan", "inf", "ten", ""])
def test_a_bad_stats_interval_is_a_usage_error(installed: str, bad: str) -> None:
    r = run(installed, "relay", "--to", "redis://127.0.0.1:6379/0", "--stats-interval", bad, "o")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("pgherald: error: Invalid value for '--stats-interval'")
    assert r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr


def test_a_refused_event_is_one_line_and_its_redelivery_reaches_the_stream(
    installed: str, conn: psycopg.Connection, redis_url: str, unique: str
) -> None:
    """Redis refuses (a key of another type): each dead letter is one line, no traceback;
    ``pgherald dead redeliver`` then puts it in the stream, after the later events."""
    client = redis.Redis.from_url(redis_url)
    client.set(unique, "not a stream")
    refused = pgherald.publish_many(conn, "orders", [{"n": n} for n in range(2)], key="k")
    relay = RelayProcess(
        installed, "--to", redis_url, "--stream", unique, "--max-attempts", "1", "orders"
    ).start()
    try:
        wait_until(lambda: len(pgherald.dead_letters(conn, "relay")) == 2, 15, "two dead letters")
        client.delete(unique)
        later = pgherald.publish(conn, "orders", {"n": 2}, key="k")
        wait_until(lambda: client.xlen(unique) == 1, 15, "the later event relayed")
        r = run(installed, "dead", "redeliver", "relay", *map(str, refused))
        assert r.returncode == 0, r.stderr
        wait_until(lambda: client.xlen(unique) == 3, 15, "the dead letters redelivered")
        assert relay.stop() == 0
        ids = [int(fields[b"id"]) for _, fields in client.xrange(unique)]
        assert ids == [later, *refused]
        out = relay.output()
        assert "Traceback" not in out, out
        lines = [line for line in out.splitlines() if "dead-lettered:" in line]
        assert len(lines) == 2, out
        assert lines[0].startswith(f"pgherald: event {refused[0]} (orders) dead-lettered: Redis")
        assert "WRONGTYPE" in lines[0]
        assert "duplicates dropped" not in out, out
    finally:
        relay.kill()
        client.delete(unique, f"{unique}:pgherald-positions", f"{unique}:pgherald-redelivered")
        client.close()


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("redis://127.0.0.1:6379/0?socket_timeout=x", "socket_timeout"),
        ("redis://user:s3cret@127.0.0.1:abc/0", "its host part cannot be read"),
        # A "/" in a password ends urllib's host part: nothing after the scheme is shown.
        ("redis://app:s3cret/x@redis.internal:6379/0", "redis://***"),
    ],
)
def test_a_malformed_redis_url_stops_the_relay_at_once(installed: str, url: str, why: str) -> None:
    # Refused by every connection attempt: said once, at the start, not retried for ever.
    r = run(installed, "relay", "--to", url, "orders", timeout=20)
    line = one_line_error(r, 1)
    assert "invalid Redis URL" in line, line
    assert why in line, line
    assert "s3cret" not in r.stderr
    assert "s3cr" not in r.stderr


def test_a_target_urllib_cannot_read_is_a_usage_error(installed: str) -> None:
    r = run(installed, "relay", "--to", "redis://:pw@[::1", "orders", timeout=20)
    line = one_line_error(r, 1)
    assert line.startswith("pgherald: error: invalid relay target redis://***: "), line
    assert "pw" not in line
