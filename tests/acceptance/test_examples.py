"""Every script in ``examples/`` runs to completion against a fresh database, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.py"))

# What each example must print when it worked. A new example needs an entry here: the test
# fails until it has one, so no example goes unchecked.
EXPECTED: dict[str, list[str]] = {
    "asyncio_fastapi_style.py": [
        "alice <- [dev] deploy at 5",
        "bob <- [dev] deploy at 5",
        "-> 400 empty message (rolled back: nothing sent)",
        "received 3 notifications, handler errors 0",
    ],
    "delayed_and_periodic_events.py": [
        "-> 3 reminders stored, due in 0.3 s to 0.6 s; one withdrawn: True",
        "schedule 'standup': weekdays at 9:00 Paris, next ",
        "scheduler released 2 reminders while no consumer ran",
        "<- reminder: 'water the plants'",
        "heard ['water the plants', 'stretch'] in ",
    ],
    "fastapi_app.py": [
        "POST /orders teapot x40 -> 409",
        "GET /healthz -> 200",
        "shutdown: listener and consumer stopped",
        "heard ['scone', 'jam'], billed [1, 3]; 'teapot' was never sent",
    ],
    "notification_events_trigger.py": [
        "read back: orders.insert customer=linus",
        "3 events received, 3 stored",
    ],
    "psycopg2_callback_loop.py": [
        "<- 'Order Events': order 4 (scone)",
        "received orders [1, 2, 4]",
    ],
    "psycopg3_transactions.py": [
        "caught up from the table: job 3",
        "<- job 4",
        "handled jobs [1, 2, 3, 4] (1 by catching up); reconnects=1, gaps=1",
    ],
    "sqlalchemy_notify.py": [
        "<- invoices: {'batch_closed': True}",
        "rows in the table: [1, 3]; notifications heard: [1, 3]",
    ],
    "trio_listener.py": [
        "<- 'Sensor Readings': 'calibrating'",
        "stopped cleanly; stats: received=3, handler_errors=0",
    ],
}


def test_examples_are_found() -> None:
    assert EXAMPLES, f"no examples found in {EXAMPLES_DIR}"


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(example: Path, dsn: str) -> None:
    expected = EXPECTED.get(example.name)
    assert expected is not None, (
        f"{example.name} has no expected output: add a line it prints to EXPECTED in {__file__}"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGHERALD_DSN"] = dsn
    env["PYTHONUNBUFFERED"] = "1"
    result = subprocess.run(
        [sys.executable, str(example)],
        env=env,
        cwd=EXAMPLES_DIR.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    report = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, report
    assert "Traceback" not in result.stderr, report
    for line in expected:
        assert line in result.stdout, f"missing {line!r}\n{report}"
