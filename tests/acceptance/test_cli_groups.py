"""``pgherald groups``, and what groups do to ``status`` and ``prune``, in a subprocess."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import psycopg
import pytest

import pgherald
from tests.fix_cli import run
from tests.fix_durable import Running, wait_until


def create(dsn: str, name: str, start: str = "beginning") -> None:
    with pgherald.Consumer(dsn, group=name, start=start):
        pass


def positions(conn: psycopg.Connection) -> list[tuple[object, ...]]:
    return conn.execute("SELECT * FROM pgherald.positions_v2 ORDER BY 1, 2").fetchall()


def test_groups_lists_members_partitions_lag_and_activity(
    installed: str, conn: psycopg.Connection, running: Callable[..., Running]
) -> None:
    dsn = installed
    for ch in ("orders", "orders", "audit"):
        pgherald.publish(conn, ch, {})
    create(dsn, "reporting")
    running(group="live", channels=("orders",))
    wait_until(
        lambda: (
            [
                len(m.partitions)
                for g in pgherald.list_groups(conn, groups=["live"])
                for m in g.members
            ]
            == [16]
        ),
        5,
        "the live member to hold every partition",
    )
    out = run(dsn, "groups")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "group 'live': 1 live member," in text
    assert "(pgherald-consumer, 127.0.0.1): partitions 0, 1, 2," in text
    assert "group 'reporting': 0 live members, 3 events behind" in text
    assert "lag: orders 2, audit 1" in text
    assert "s ago)" in text

    lines = run(dsn, "groups", "--json", "--channel", "audit").stdout.splitlines()
    report = {g["group"]: g for g in map(json.loads, lines)}
    assert report["reporting"]["lag_events"] == 1
    assert report["reporting"]["lag_by_channel"] == {"audit": 1}
    assert report["reporting"]["members"] == []
    [member] = report["live"]["members"]
    assert member["partitions"] == list(range(16))
    assert member["client_addr"] == "127.0.0.1"


def test_reset_and_delete_need_consent_and_no_live_member(
    installed: str, conn: psycopg.Connection, running: Callable[..., Running]
) -> None:
    dsn = installed
    ids = [pgherald.publish(conn, "ch", i) for i in range(3)]
    create(dsn, "g", start="now")
    before = positions(conn)

    for args in (("reset", "g", "--to", "beginning"), ("delete", "g")):
        refused = run(dsn, "groups", *args)  # stdin is not a terminal, no --yes
        assert refused.returncode == 2, refused.stderr
        assert "pass --yes to confirm" in refused.stderr
        assert positions(conn) == before

    bad = run(dsn, "groups", "reset", "g", "--to", "tomorrow", "--yes")
    assert bad.returncode == 2
    assert "use 'beginning', 'now'" in bad.stderr

    done = run(dsn, "groups", "reset", "g", "--to", str(ids[1]), "--yes")
    assert done.returncode == 0, done.stderr
    assert f"group 'g' reset to {ids[1]}" in done.stdout
    [g] = json.loads(run(dsn, "status", "--json").stdout)["groups"]
    assert g["lag_events"] == 2

    r = running(group="g")
    wait_until(lambda: pgherald.list_groups(conn)[0].members, 5, "a live member")
    for busy_args in (["reset", "g", "--to", "now", "--yes"], ["delete", "g", "--yes"]):
        busy = run(dsn, "groups", *busy_args)
        assert busy.returncode == 1, busy.stderr
        assert "while it has live members" in busy.stderr
        assert "stop its consumers first" in busy.stderr
    r.stop()

    unknown = run(dsn, "groups", "delete", "nope", "--yes")
    assert unknown.returncode == 1
    assert "no consumer group 'nope' to delete: the groups are 'g'" in unknown.stderr
    gone = run(dsn, "groups", "delete", "g", "--yes")
    assert gone.returncode == 0, gone.stderr
    assert positions(conn) == []
    assert run(dsn, "groups").stdout.strip() == "no consumer groups yet"


def test_groups_delete_then_prune_frees_the_log(installed: str, conn: psycopg.Connection) -> None:
    dsn = installed
    for i in range(50):
        pgherald.publish(conn, "ch", i)
    create(dsn, "forgotten")
    pinned = run(dsn, "prune", "--older-than", "0s")
    assert pinned.returncode == 0, pinned.stderr
    assert "deleted 0 events" in pinned.stdout
    assert run(dsn, "groups", "delete", "forgotten", "--yes").returncode == 0
    freed = run(dsn, "prune", "--older-than", "0s")
    assert "deleted 50 events" in freed.stdout, freed.stderr
    assert conn.execute("SELECT count(*) FROM pgherald.events_v1").fetchone() == (0,)


def test_prune_stops_waiting_for_abandoned_groups_after_a_warning(
    installed: str, conn: psycopg.Connection
) -> None:
    """(A live member pins the log however old its activity: see tests/integration.)"""
    dsn = installed
    for i in range(20):
        pgherald.publish(conn, "ch", i)
    create(dsn, "abandoned")
    create(dsn, "recent")
    conn.execute(
        "UPDATE pgherald.positions_v2 SET updated_at = now() - interval '8 days' "
        "WHERE group_name = 'abandoned'"
    )
    kept = run(dsn, "prune", "--older-than", "0s", "--abandoned-after", "7d")
    assert "deleted 0 events" in kept.stdout, kept.stderr  # 'recent' still pins them
    assert "consumer group 'abandoned' has no live member" in kept.stderr

    conn.execute("UPDATE pgherald.positions_v2 SET updated_at = now() - interval '8 days'")
    default = run(dsn, "prune", "--older-than", "0s")
    assert "deleted 0 events" in default.stdout  # off by default: every group pins
    assert default.stderr == ""
    out = run(dsn, "prune", "--older-than", "0s", "--abandoned-after", "7d")
    assert out.returncode == 0, out.stderr
    assert "'abandoned'" in out.stderr
    assert "'recent'" in out.stderr
    assert "deleted 20 events" in out.stdout
    bad = run(dsn, "prune", "--abandoned-after", "soon")
    assert bad.returncode == 2
    assert "30s, 15m" in bad.stderr


def test_status_channel_filter_and_members(installed: str, conn: psycopg.Connection) -> None:
    dsn = installed
    for ch in ("a", "a", "b"):
        pgherald.publish(conn, ch, {})
    create(dsn, "g")
    report = json.loads(run(dsn, "status", "--json").stdout)
    assert (report["events"], report["events_estimated"]) == (3, False)
    [g] = report["groups"]
    assert (g["lag_events"], g["lag_estimated"], g["members"]) == (3, False, 0)
    [g] = json.loads(run(dsn, "status", "--json", "--channel", "b").stdout)["groups"]
    assert g["lag_events"] == 1
    text = run(dsn, "status", "--channel", "a", "--channel", "b").stdout
    assert "group 'g': 3 events behind" in text


@pytest.mark.slow
def test_status_answers_fast_with_a_group_2m_events_behind(
    installed: str, conn: psycopg.Connection
) -> None:
    dsn = installed
    n = 2_000_000
    # In transactions of 20,000: a log reader anywhere on the server (other tests' consumers,
    # run side by side) waits for every transaction older than its snapshot's xmin.
    step = 20_000
    for lo in range(1, n + 1, step):
        conn.execute(
            "INSERT INTO pgherald.events_v1 (channel, payload) "
            "SELECT 'ch' || (i %% 10), '{\"n\": 1}' FROM generate_series(%s::int, %s::int) AS i",
            (lo, lo + step - 1),
        )
        if not conn.autocommit:
            conn.commit()
    create(dsn, "behind")
    started = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as c:
        [g] = pgherald.list_groups(c)
        _ = pgherald._groups.log_size(c)
    in_process = time.monotonic() - started
    started = time.monotonic()
    out = run(dsn, "status")
    command = time.monotonic() - started
    assert out.returncode == 0, out.stderr
    # The command's own start-up (Python, click, psycopg, a connection: 0.4 s on a quiet
    # machine, over 1 s on a loaded one), measured with a command that reads the catalog only.
    started = time.monotonic()
    assert run(dsn, "trigger", "list").returncode == 0
    start_up = time.monotonic() - started
    print(
        f"status at {n:,} behind: {in_process:.3f}s in process, {command:.3f}s as a command "
        f"({start_up:.3f}s for trigger list)"
    )
    assert in_process < 1.0
    assert command - start_up < 1.0
    assert g.lag_estimated
    assert abs(g.lag_events - n) < n * 0.05
    assert "'behind': ~2,0" in out.stdout or "'behind': ~1,9" in out.stdout
    assert "events stored: ~" in out.stdout


def test_status_and_groups_refuse_a_channel_name_postgresql_would_truncate(
    installed: str, conn: psycopg.Connection
) -> None:
    """They reported a lag of 0 on it, where every other command refuses the name."""
    pgherald.publish(conn, "a" * 63, {})
    create(installed, "g")
    for command in ("status", "groups"):
        for flags in ((), ("--json",)):
            out = run(installed, command, *flags, "--channel", "a" * 64)
            assert out.returncode == 1, (command, out.stdout, out.stderr)
            assert out.stdout == ""
            assert out.stderr.startswith("pgherald: error: channel name 'aaaaaaaaaaaaaaaaaaaa'")
            assert "is 64 bytes; PostgreSQL allows at most 63 bytes" in out.stderr
            assert len(out.stderr.strip().splitlines()) == 1
        assert run(installed, command, "--channel", "").returncode == 1
    [g] = json.loads(run(installed, "status", "--json", "--channel", "a" * 63).stdout)["groups"]
    assert g["lag_events"] == 1
