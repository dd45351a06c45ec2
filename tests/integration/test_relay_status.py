"""
A relay's rate and lag in `pgherald status` and `list_groups` (`GroupInfo.relays`), against the
machine's PostgreSQL and Redis (no mocks): each relay writes a row in ``pgherald.settings_v1``
every ``stats_interval`` and removes it when it stops.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

import pgherald
from tests.fix_brokers import RelayProcess, publish_paced
from tests.fix_cli import run
from tests.fix_faults import wait_until
from tests.fix_quiet import database_dropper, server_dsn  # noqa: F401 (a server of our own)

redis = pytest.importorskip("redis", reason="the relay tests need the 'relay' extra (redis-py)")


@pytest.fixture
def stream(redis_url: str, unique: str) -> Iterator[str]:
    """A Redis stream key of this test's own, deleted afterwards."""
    yield unique
    client = redis.Redis.from_url(redis_url)
    try:
        client.delete(unique, f"{unique}:pgherald-positions")
    finally:
        client.close()


class Running:
    """A `Relay` on a thread of its own; `stop` joins it."""

    def __init__(self, relay: pgherald.Relay) -> None:
        self.relay = relay
        self.thread = threading.Thread(target=relay.run)
        self.thread.start()

    def stop(self) -> None:
        self.relay.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()


def relays(conn: psycopg.Connection, group: str = "relay") -> tuple[pgherald.RelayInfo, ...]:
    return next((g.relays for g in pgherald.list_groups(conn) if g.name == group), ())


def status(dsn: str) -> dict[str, dict[str, object]]:
    out = run(dsn, "status", "--json")
    assert out.returncode == 0, out.stderr
    return {g["group"]: g for g in json.loads(out.stdout)["groups"]}


def test_status_shows_a_running_relays_rate_and_no_entry_once_it_stopped(
    installed: str, conn: psycopg.Connection, redis_url: str, stream: str
) -> None:
    publish_paced(installed, "orders", 2000, 500, 0)  # a backlog, then a steady stream
    done = threading.Event()

    def publish() -> None:
        with psycopg.connect(installed, autocommit=True) as c:
            while not done.is_set():
                pgherald.publish_many(c, "orders", [{"n": n} for n in range(50)])
                done.wait(0.01)  # pacing the load, not synchronisation

    publisher = threading.Thread(target=publish)
    publisher.start()
    # Rates are over the last interval: a second of steady publishing always moves some.
    relay = Running(
        pgherald.Relay(
            installed, to=redis_url, channels=["orders"], stream=stream, stats_interval=1.0
        )
    )
    reports: list[dict[str, dict[str, object]]] = []

    def moving() -> bool:
        reports.append(status(installed))
        return any(r["rate"] > 0 for r in reports[-1]["relay"]["relays"])  # type: ignore[attr-defined]

    try:
        wait_until(lambda: any(r.rate > 0 for r in relays(conn)), 10, "a row with a rate")
        # The CLI reads the row a moment later: the interval it shows moved events too.
        wait_until(moving, 15, "`pgherald status --json` showing a rate")
        report = reports[-1]
    finally:
        done.set()
        publisher.join(10)
        relay.stop()
    [r] = report["relay"]["relays"]  # type: ignore[misc]
    assert (r["target"], r["host"], r["pid"]) == (redis_url, socket.gethostname(), os.getpid())
    assert r["live"] is True
    assert r["rate"] > 0
    assert r["relayed"] >= 2000
    assert r["lag_seconds"] >= 0
    assert (r["channels"], r["partitions"], r["interval"]) == (["orders"], 16, 1.0)
    assert isinstance(r["backend_pid"], int)

    assert status(installed)["relay"]["relays"] == []  # stopped: its row is gone


def test_list_groups_tells_live_relays_from_stale_rows_and_drops_old_ones(
    installed: str, conn: psycopg.Connection, redis_url: str, stream: str
) -> None:
    """Rows of relays that were killed: stale at once (session gone) or by age; an hour: gone."""
    now = conn.execute("SELECT extract(epoch FROM now())::float8").fetchone()[0]  # type: ignore[index]
    fake = {
        "group": "relay",
        "host": "elsewhere",
        "channels": ["orders"],
        "rate": 12.5,
        "relayed": 100,
        "lag_seconds": 0.5,
        "started_at": now - 50,
        "interval": 10.0,
        "target": "nats://10.0.0.1:4222",
    }
    rows = {
        "relay:old": {**fake, "pid": 1, "backend_pid": None, "at": now - 7200},  # killed long ago
        "relay:aged": {**fake, "pid": 2, "backend_pid": None, "at": now - 33},  # 3 intervals + 2 s
        "relay:gone": {**fake, "pid": 3, "backend_pid": 999_999, "at": now},  # no such member
        "relay:other": {**fake, "pid": 4, "backend_pid": None, "at": now, "group": "other"},
    }
    for name, value in rows.items():
        conn.execute(
            "INSERT INTO pgherald.settings_v1 (name, value) VALUES (%s, %s)",
            (name, json.dumps(value)),
        )
    conn.execute("INSERT INTO pgherald.settings_v1 VALUES ('relay:junk', 'not json')")
    pgherald.publish(conn, "orders", {"n": 1})
    relay = Running(
        pgherald.Relay(
            installed, to=redis_url, channels=["orders"], stream=stream, stats_interval=0.1
        )
    )
    try:
        wait_until(lambda: relays(conn) and relays(conn)[0].live, 10, "the relay's row")
        found = relays(conn)
        member_pids = {m.pid for m in pgherald.list_groups(conn, groups=["relay"])[0].members}
        running = run(installed, "status").stdout
    finally:
        relay.stop()
    line = f"  relay {socket.gethostname()}:{os.getpid()} -> {redis_url}: "
    assert line in running
    assert "events/s, lag " in running.split(line)[1].splitlines()[0]
    live, *stale = found
    assert (live.host, live.pid, live.target, live.group) == (
        socket.gethostname(),
        os.getpid(),
        redis_url,
        "relay",
    )
    assert live.backend_pid in member_pids
    assert live.interval == 0.1
    assert live.started_at <= live.reported_at
    assert sorted(r.pid for r in stale) == [2, 3]  # the hour-old row went with the first report
    assert not any(r.live for r in stale)
    names = {r[0] for r in conn.execute("SELECT name FROM pgherald.settings_v1")}
    assert "relay:old" not in names
    assert {"relay:aged", "relay:gone", "relay:other", "relay:junk"} <= names
    assert [r.pid for r in relays(conn)] == [2, 3]  # its own row removed at stop
    text = run(installed, "status").stdout
    assert "relay elsewhere:2 -> nats://10.0.0.1:4222: stale: no report for" in text
    assert line not in text


def test_a_killed_relay_is_stale_at_once(
    installed: str, conn: psycopg.Connection, redis_url: str, stream: str
) -> None:
    """`pgherald relay` SIGKILLed: no chance to remove its row, but its session is gone."""
    pgherald.publish_many(conn, "orders", [{"n": n} for n in range(20)])
    relay = RelayProcess(installed, "--to", redis_url, "--stream", stream, "orders").start()
    try:
        wait_until(lambda: any(r.live for r in relays(conn)), 15, "the relay's row")
        [r] = relays(conn)
        relay.kill()
        wait_until(lambda: not pgherald.list_groups(conn)[0].members, 5, "its session to end")
    finally:
        relay.kill()
    assert r.pid == relay.proc.pid  # type: ignore[union-attr]
    assert r.interval == 10.0  # the command's
    [g] = status(installed).values()
    assert [(x["pid"], x["live"]) for x in g["relays"]] == [(r.pid, False)]  # type: ignore[attr-defined]


def test_no_relay_shows_nothing_new(installed: str, conn: psycopg.Connection) -> None:
    with pgherald.Consumer(installed, group="billing", start="now"):
        pass
    [g] = status(installed).values()
    assert g["relays"] == []
    assert pgherald.list_groups(conn)[0].relays == ()
    text = run(installed, "status").stdout
    assert text.count("\n") == 2  # the log's line and the group's: nothing about relays


@pytest.fixture
def role_dsn(installed: str, conn: psycopg.Connection) -> Iterator[tuple[str, str]]:
    """A role that may use every table of pgherald's schema but not write settings_v1."""
    role = f"pgherald_relay_{uuid.uuid4().hex[:8]}"
    ident = sql.Identifier(role)
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(ident))
    for grant in (
        "GRANT USAGE ON SCHEMA pgherald TO {}",
        "GRANT ALL ON ALL TABLES IN SCHEMA pgherald TO {}",
        "GRANT ALL ON ALL SEQUENCES IN SCHEMA pgherald TO {}",
        "GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA pgherald TO {}",
        "REVOKE INSERT, UPDATE, DELETE ON pgherald.settings_v1 FROM {}",
    ):
        conn.execute(sql.SQL(grant).format(ident))  # type: ignore[arg-type]
    try:
        yield make_conninfo(installed, user=role), role
    finally:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,)
        )
        conn.execute(sql.SQL("DROP OWNED BY {}").format(ident))
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(ident))


def test_a_role_that_may_not_write_the_row_relays_all_the_same_and_status_says_what_to_grant(
    role_dsn: tuple[str, str],
    conn: psycopg.Connection,
    redis_url: str,
    stream: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dsn, role = role_dsn
    pgherald.publish_many(conn, "orders", [{"n": n} for n in range(10)])
    caplog.set_level(logging.WARNING, "pgherald.consumer")
    relay = Running(
        pgherald.Relay(dsn, to=redis_url, channels=["orders"], stream=stream, stats_interval=0.1)
    )
    try:
        wait_until(lambda: relay.relay.stats.relayed == 10, 10, "10 relayed")
        wait_until(lambda: "will not show this relay's rate" in caplog.text, 5, "the warning")
    finally:
        relay.stop()
    assert "GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE pgherald.settings_v1" in caplog.text
    assert relays(conn) == ()

    conn.execute(
        sql.SQL("REVOKE SELECT ON pgherald.settings_v1 FROM {}").format(sql.Identifier(role))
    )
    out = run(dsn, "status")
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("pgherald: error: ")
    assert "GRANT SELECT ON TABLE pgherald.settings_v1 TO <role>" in out.stderr


def test_stats_interval_is_checked() -> None:
    to = "redis://127.0.0.1:6379/0"
    for bad in (0, -1, float("inf"), float("nan"), "10", True):
        with pytest.raises(pgherald.UsageError, match="stats_interval"):
            pgherald.Relay("dbname=x", to=to, channels=["a"], stats_interval=bad)  # type: ignore[arg-type]
    for fine in (None, 1, 0.5):
        pgherald.AsyncRelay("dbname=x", to=to, channels=["a"], stats_interval=fine)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://s3cret@127.0.0.1:4222", "nats://***@127.0.0.1:4222"),  # a NATS token
        ("nats://user:s3cret@127.0.0.1:4222", "nats://user:***@127.0.0.1:4222"),
        ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("redis://127.0.0.1:6379/0?password=s3cret", "redis://127.0.0.1:6379/0?password=***"),
        (
            "https://h.example/p?token=s3cret&region=eu&api_key=s3cret&X-Amz-Signature=s3cret",
            "https://h.example/p?token=***&region=eu&api_key=***&X-Amz-Signature=***",
        ),
        (
            "https://h.example/p?access_token=s3cret&sig=s3cret&secret=s3cret&key=s3cret",
            "https://h.example/p?access_token=***&sig=***&secret=***&key=***",
        ),
        ("https://user@h.example/p?monkey=1", "https://user@h.example/p?monkey=1"),
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
    ],
)
def test_safe_url_masks_every_secret_form(url: str, shown: str) -> None:
    from pgherald._relay_sink import safe_url

    assert safe_url(url) == shown


@pytest.mark.parametrize(
    "to", ["nats://s3cret@127.0.0.1:1", "redis://127.0.0.1:1/0?password=s3cret"]
)
def test_a_secret_in_the_target_is_in_no_log_status_or_row(
    installed: str, conn: psycopg.Connection, to: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker unreachable: the relay reports (and logs its retries) all the same."""
    relay = pgherald.Relay(
        installed, to=to, channels=["orders"], retry_delay=0.01, retry_max_delay=0.05
    )
    pgherald.publish(conn, "orders", {"n": 1})
    with caplog.at_level(logging.INFO, "pgherald"):
        running = Running(relay)
        try:
            wait_until(lambda: relays(conn), 10, "the relay's status row")
            wait_until(lambda: relay.stats.retries >= 2, 10, "two retries")
            [info] = relays(conn)
            assert "***" in info.target
            assert "s3cret" not in json.dumps(status(installed))
            rows = conn.execute(
                "SELECT name || value::text FROM pgherald.settings_v1 WHERE name LIKE 'relay:%'"
            ).fetchall()
            assert rows
            assert not [r for r in rows if "s3cret" in r[0]]
        finally:
            running.stop()
    assert "s3cret" not in relay.target
    assert "***" in caplog.text
    assert "s3cret" not in caplog.text
