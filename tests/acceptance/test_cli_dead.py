"""``pgherald dead list|show|redeliver|purge`` and dead letters in ``status``, in a subprocess."""

from __future__ import annotations

import json
from collections import Counter

import psycopg
import pytest

import pgherald
from tests.fix_cli import one_line_error, run
from tests.fix_durable import Running, wait_until


class Handler:
    def __init__(self) -> None:
        self.healed = False
        self.handled: Counter[int] = Counter()

    def __call__(self, event: pgherald.Event) -> None:
        if event.payload.get("fail") and not self.healed:
            raise ValueError("no such customer")
        self.handled[event.id] += 1


@pytest.fixture
def dead(installed: str, conn: psycopg.Connection) -> tuple[Running, Handler, list[int]]:
    """A running group "g" with two dead letters: a failing handler's and a poison event's."""
    ids = [
        pgherald.publish(conn, "orders", {"n": 1}),
        pgherald.publish(conn, "orders", {"fail": 1}),
    ]
    row = conn.execute(
        "SELECT pgherald.publish_v1('orders', (repeat('[', 3000) || repeat(']', 3000))::jsonb)"
    ).fetchone()
    assert row is not None
    ids.append(int(row[0]))
    handler = Handler()
    r = Running(installed, channels=("orders",), handler=handler, max_attempts=2, retry_delay=0.01)
    wait_until(lambda: len(pgherald.dead_letters(conn, "g")) == 2, 10, "two dead letters")
    yield r, handler, ids
    r.stop()


def test_list_show_status(installed: str, dead: tuple[Running, Handler, list[int]]) -> None:
    _, _, (ok, failing, poison) = dead
    out = run(installed, "dead", "list", "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["group"], r["event_id"], r["attempts"]) for r in rows] == [
        ("g", failing, 2),
        ("g", poison, 1),
    ]
    assert "ValueError: no such customer" in rows[0]["error"]
    assert "RecursionError" in rows[1]["error"]
    text = run(installed, "dead", "list", "--group", "g")
    assert text.returncode == 0, text.stderr
    assert f"g {failing} orders: 2 attempts" in text.stdout
    assert run(installed, "dead", "list", "--group", "other").stdout == (
        "no dead letters in group 'other'\n"
    )

    shown = run(installed, "dead", "show", "g", str(poison), "--json")
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["payload_text"].startswith("[[[[")
    assert report["in_log"] is True
    missing = run(installed, "dead", "show", "g", str(ok))
    assert "no dead letter for event" in one_line_error(missing, 1)

    status = run(installed, "status", "--json")
    assert status.returncode == 0, status.stderr
    (group,) = json.loads(status.stdout)["groups"]
    assert group["dead_letters"] == 2
    assert "2 dead letters" in run(installed, "status").stdout


def test_redeliver_is_handled_once(
    installed: str, conn: psycopg.Connection, dead: tuple[Running, Handler, list[int]]
) -> None:
    r, handler, (_, failing, poison) = dead
    assert "event IDS, or --all" in one_line_error(run(installed, "dead", "redeliver", "g"), 2)
    handler.healed = True
    out = run(installed, "dead", "redeliver", "g", str(failing), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"group": "g", "redelivered": [failing]}
    wait_until(lambda: handler.handled[failing], 5, "the redelivered event")
    wait_until(
        lambda: [d.event_id for d in pgherald.dead_letters(conn, "g")] == [poison],
        5,
        "its dead letter deleted",
    )
    # The consumer counts it once the statement that deleted the dead letter has answered,
    # a moment after the deletion is visible here.
    wait_until(lambda: r.consumer.stats.redelivered == 1, 5, "the redelivery counted")
    assert handler.handled[failing] == 1


def test_purge_needs_yes_without_a_terminal(
    installed: str, conn: psycopg.Connection, dead: tuple[Running, Handler, list[int]]
) -> None:
    _, _, (_, failing, poison) = dead
    refused = run(installed, "dead", "purge", "g", "--all")
    assert "--yes" in one_line_error(refused, 2)
    assert len(pgherald.dead_letters(conn, "g")) == 2  # nothing was changed
    one = run(installed, "dead", "purge", "g", str(failing), "--yes")
    assert (one.returncode, one.stdout) == (0, "purged 1 dead letters of group 'g'\n"), one.stderr
    rest = run(installed, "dead", "purge", "g", "--all", "--yes", "--json")
    assert json.loads(rest.stdout) == {"group": "g", "purged": 1}
    assert pgherald.dead_letters(conn) == []
    assert conn.execute(
        "SELECT count(*) FROM pgherald.events_v1 WHERE id = %s", (poison,)
    ).fetchone() == (1,)


def test_show_tells_empty_fields_from_an_event_gone_from_the_log(
    installed: str, conn: psycopg.Connection, dead: tuple[Running, Handler, list[int]]
) -> None:
    _, _, (_, failing, _) = dead
    shown = run(installed, "dead", "show", "g", str(failing))
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert "in_log: True" in lines
    # Published without key or headers: empty, not gone.
    assert "key: (none)" in lines
    assert "headers_text: (none)" in lines
    assert 'payload_text: {"fail": 1}' in lines
    assert "not in the log any more" not in shown.stdout
    # Gone from the log (as retention removes it): now the event's fields say so.
    conn.execute("DELETE FROM pgherald.events_v1 WHERE id = %s", (failing,))
    gone = run(installed, "dead", "show", "g", str(failing))
    assert gone.returncode == 0, gone.stderr
    lines = gone.stdout.splitlines()
    assert "in_log: False" in lines
    for name in ("key", "payload_text", "headers_text"):
        assert f"{name}: (not in the log any more)" in lines
    assert f"event_id: {failing}" in lines


def test_an_id_past_bigint_names_the_argument(
    installed: str, conn: psycopg.Connection, dead: tuple[Running, Handler, list[int]]
) -> None:
    huge = str(2**63)
    line = one_line_error(run(installed, "dead", "show", "g", huge), 2)
    assert "'EVENT_ID'" in line
    assert "9223372036854775807" in line
    assert "failed" not in line
    line = one_line_error(run(installed, "dead", "redeliver", "g", huge), 2)
    assert "IDS" in line
    line = one_line_error(run(installed, "dead", "purge", "g", "1", huge, "--yes"), 2)
    assert "IDS" in line
    assert len(pgherald.dead_letters(conn, "g")) == 2  # nothing was purged
