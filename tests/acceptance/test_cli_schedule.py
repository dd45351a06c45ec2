"""``pgherald schedule``: add, list, remove, and several ``schedule run`` processes at once."""

from __future__ import annotations

import json
import signal
import subprocess
from collections import Counter
from datetime import timedelta

import psycopg

import pgherald
from tests.fix_cli import cli_env, one_line_error, pgherald_cmd, run
from tests.fix_durable import wait_until


def test_add_list_remove(installed: str, conn: psycopg.Connection) -> None:
    out = run(installed, "schedule", "add", "--cron", "*/5 * * * *", "--channel", "reports",
              "--payload", '{"kind": "daily"}', "--key", "r", "every5")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("schedule 'every5' added: next tick ")
    (s,) = pgherald.list_schedules(conn)
    assert (s.cron, s.channel, s.payload, s.key, s.timezone) == (
        "*/5 * * * *",
        "reports",
        {"kind": "daily"},
        "r",
        "UTC",
    )
    assert s.next_tick.minute % 5 == 0
    assert s.next_tick.second == 0

    text = run(installed, "schedule", "list").stdout
    assert text.startswith("every5: '*/5 * * * *' (UTC) -> reports, next ")
    assert text.rstrip().endswith("last never")
    [line] = run(installed, "schedule", "list", "--json").stdout.splitlines()
    assert json.loads(line)["payload"] == {"kind": "daily"}

    again = run(installed, "schedule", "add", "--cron", "* * * * *", "--channel", "x", "every5")
    assert again.returncode == 1
    assert "exists already" in again.stderr
    out = run(installed, "schedule", "add", "--replace", "--cron", "0 9 * * 1-5",
              "--timezone", "Europe/Paris", "--channel", "x", "every5")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert [(s.cron, s.timezone) for s in pgherald.list_schedules(conn)] == [
        ("0 9 * * 1-5", "Europe/Paris")
    ]

    out = run(installed, "schedule", "remove", "every5")
    assert (out.returncode, out.stdout) == (0, "schedule 'every5' removed\n")
    assert pgherald.list_schedules(conn) == []
    assert run(installed, "schedule", "list").stdout == "no schedules\n"
    pgherald.publish(conn, "ch", 1, deliver_after=timedelta(hours=1))
    assert run(installed, "schedule", "list").stdout.startswith(
        "no schedules\n1 delayed events waiting, the first due "
    )
    gone = run(installed, "schedule", "remove", "every5")
    assert gone.returncode == 1
    assert gone.stderr.startswith("pgherald: error: no schedule named 'every5'")


def ticks(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT count(*) FROM pgherald.events_v1 WHERE channel = 'ticks'").fetchone()
    assert row is not None
    return int(row[0])


def test_bad_input_is_one_line(installed: str, conn: psycopg.Connection) -> None:
    add = ["schedule", "add", "--channel", "ch"]
    line = one_line_error(run(installed, *add, "--cron", "*/5 * * *", "s"))
    assert line.startswith("pgherald: error: invalid cron expression '*/5 * * *'")
    assert "five fields" in line
    # cronsim reads a sixth field as seconds: it was accepted, then ticked every second.
    line = one_line_error(run(installed, *add, "--cron", "* * * * * *", "s"))
    assert line.startswith("pgherald: error: invalid cron expression '* * * * * *' (6 fields)")
    assert "five fields, minute hour day-of-month month day-of-week" in line
    line = one_line_error(run(installed, *add, "--cron", "99 * * * *", "s"))
    assert "invalid cron expression" in line
    line = one_line_error(run(installed, *add, "--cron", "* * * * *", "--payload", "{", "s"))
    assert "--payload is not JSON" in line
    line = one_line_error(run(installed, *add, "--cron", "* * * * *", "--timezone", "X/Y", "s"))
    assert "unknown time zone 'X/Y'" in line
    assert pgherald.list_schedules(conn) == []


def test_two_runners_publish_each_tick_once_and_release_delayed_events(
    installed: str, conn: psycopg.Connection
) -> None:
    names = [f"s{i}" for i in range(20)]
    for name in names:
        # Due once a year: only the rounds below make them due (an every-minute schedule
        # also ticked by itself when a minute began during the test, and the counts were off).
        pgherald.add_schedule(conn, name, "0 0 1 1 *", "ticks", {"name": name})
    runners = [
        subprocess.Popen(
            pgherald_cmd("schedule", "run"),
            env=cli_env(installed),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        wait_until(
            lambda: (
                conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                    "'pgherald-schedule'"
                ).fetchone()
                == (2,)
            ),
            20,
            "both runners to connect",
        )
        for round_ in range(1, 4):  # make every schedule due now, three times over
            conn.execute("UPDATE pgherald.schedules_v1 SET next_tick = now()")
            conn.execute("SELECT pg_notify('pgherald_wake_v1', 'scheduled')")
            wait_until(
                lambda n=20 * round_: ticks(conn) == n,
                10,
                f"round {round_} of ticks",
            )
        pgherald.publish(conn, "later", 1, deliver_after=timedelta(seconds=0.2))
        wait_until(
            lambda: (
                conn.execute(
                    "SELECT count(*) FROM pgherald.events_v1 WHERE channel = 'later'"
                ).fetchone()
                == (1,)
            ),
            5,
            "the delayed event, with no consumer running",
        )
    finally:
        for p in runners:
            p.send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=10) for p in runners]
    assert [p.returncode for p in runners] == [0, 0], outs
    rows = conn.execute(
        "SELECT headers->>'pgherald_schedule', headers->>'pgherald_tick' "
        "FROM pgherald.events_v1 WHERE channel = 'ticks'"
    ).fetchall()
    per_tick = Counter(rows)
    assert set(per_tick.values()) == {1}, "a tick was published twice"
    assert Counter(name for name, _ in rows) == dict.fromkeys(names, 3)
    assert conn.execute("SELECT count(*) FROM pgherald.scheduled_v1").fetchone() == (0,)


def test_list_warns_when_nothing_publishes_ticks_or_releases_delayed_events(
    installed: str, conn: psycopg.Connection
) -> None:
    added = run(installed, "schedule", "add", "--cron", "0 0 1 1 *", "--channel", "c", "yearly")
    assert added.returncode == 0, added.stderr
    fresh = run(installed, "schedule", "list")
    assert fresh.returncode == 0, fresh.stderr
    assert "warning" not in fresh.stderr  # due next year: nothing is late
    pgherald.publish(conn, "c", 1, deliver_after=timedelta(0))
    # Nothing runs: the tick and the delayed event stay where they are, ten minutes late.
    conn.execute("UPDATE pgherald.schedules_v1 SET next_tick = now() - interval '10 min'")
    conn.execute("UPDATE pgherald.scheduled_v1 SET deliver_at = now() - interval '2 h'")
    late = run(installed, "schedule", "list")
    assert late.returncode == 0, late.stderr
    assert "warning: schedule 'yearly' is 10 min overdue" in late.stderr
    assert "`pgherald schedule run`" in late.stderr
    assert "warning: delayed events are 2.0 h overdue" in late.stderr
    (record,) = [
        json.loads(line)
        for line in run(installed, "schedule", "list", "--json").stdout.splitlines()
    ]
    assert 590 < record["overdue_seconds"] < 700
    # A scheduler catches up: the tick is published, the event released, and no warning left.
    pgherald.tick_schedules(conn)
    pgherald.release_due_events(conn)
    after = run(installed, "schedule", "list")
    assert "warning" not in after.stderr, after.stderr
