"""
Promises of docs/cli.md and docs/triggers.md about the ``pgherald`` command that no other test
held it to: error lines never show the DSN's password, a confirmation prompt goes ahead on
``y``/``yes`` in any case and on nothing else (Enter included), ``watch`` asks on a terminal
before it adds a trigger, and ``PGHERALD_JSON=1`` is ``--json``.

Each runs the command in a subprocess against the real test server, as a user runs it.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
from collections.abc import Iterator

import psycopg
import pytest

import pgherald
from tests.fix_cli import cli_env, on_a_terminal, one_line_error, pgherald_cmd, run, schema_exists
from tests.fix_faults import free_port

PASSWORD = "Zq7-s3cret-pw"  # distinctive: found in a message only if the message leaks it


# -- "Messages name the server as user@host:port/dbname and never include the password." --


@pytest.mark.parametrize(
    ("given", "says"),
    [
        # libpq quotes the offending part of a DSN it cannot parse: here, the password itself.
        (f"postgresql://app:{PASSWORD}%ZZ@db.internal/shop", "invalid DSN"),
        (f"postgresql://app:{PASSWORD}@[db.internal/shop", "invalid DSN"),
        (f"host=db.internal user=app password={PASSWORD} dbname", "invalid DSN"),
        # A well-formed DSN to a closed port: the server is named, the password is not.
        (
            f"postgresql://app:{PASSWORD}@127.0.0.1:{{port}}/shop?connect_timeout=2",
            "cannot connect to PostgreSQL at app@127.0.0.1:{port}/shop",
        ),
    ],
    ids=["bad-percent-escape", "bad-ipv6-host", "keyword-syntax", "refused"],
)
def test_error_lines_never_show_the_password(given: str, says: str) -> None:
    port = str(free_port())  # nothing listens there
    dsn, says = given.replace("{port}", port), says.replace("{port}", port)
    for args in (["notify", "--dsn", dsn, "c", "x"], ["status", "--dsn", dsn]):
        line = one_line_error(run(dsn, *args), status=1)
        assert says in line
        assert PASSWORD not in line


# -- Consent: "only `y` or `yes` (any case) goes ahead; anything else, Enter included, changes
# nothing" --


def test_enter_at_a_confirmation_keeps_everything_and_yes_in_capitals_goes_ahead(
    installed: str, conn: psycopg.Connection
) -> None:
    pgherald.publish(conn, "orders", {"n": 1})
    # Enter alone: the default is "no", so a stray key press never drops the event log.
    status, err = on_a_terminal(installed, b"\n", "uninstall")
    assert status == 1, err
    assert "nothing was changed" in err
    assert "Traceback" not in err
    assert schema_exists(conn)
    assert conn.execute("SELECT count(*) FROM pgherald.events_v1").fetchone() == (1,)
    # "any case": a user who types YES means it.
    status, err = on_a_terminal(installed, b"YES\n", "uninstall")
    assert status == 0, err
    assert not schema_exists(conn)


# -- `watch` on a table without a trigger "asks whether to add one (interactive)" --


@pytest.fixture
def orders(installed: str, conn: psycopg.Connection) -> str:
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, item text)")
    return installed


def _triggers_on_orders(conn: psycopg.Connection) -> list[str]:
    rows = conn.execute(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = 'orders'::regclass AND NOT tgisinternal "
        "ORDER BY 1"
    )
    return [r[0] for r in rows]


def test_watch_on_a_terminal_asks_and_no_adds_nothing(
    orders: str, conn: psycopg.Connection
) -> None:
    status, err = on_a_terminal(orders, b"n\n", "watch", "orders")
    assert status == 1, err
    assert "Traceback" not in err
    assert "orders has no pgherald trigger" in err
    assert _triggers_on_orders(conn) == []


@pytest.fixture
def terminal() -> Iterator[tuple[int, int]]:
    """A pseudo-terminal (main, child) for a process's stdin; closed afterwards."""
    main, child = pty.openpty()
    try:
        yield main, child
    finally:
        os.close(child)
        os.close(main)


def test_watch_on_a_terminal_asks_and_yes_adds_a_trigger_that_stays_and_watches_it(
    orders: str, conn: psycopg.Connection, terminal: tuple[int, int]
) -> None:
    main, child = terminal
    with subprocess.Popen(
        pgherald_cmd("watch", "orders"),
        env=cli_env(orders),
        stdin=child,
        stdout=subprocess.PIPE,  # the prompt goes here too, without a newline
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            os.write(main, b"y\n")
            assert proc.stderr is not None
            said = proc.stderr.readline()  # once it listens: "watching orders (Ctrl-C to stop)"
            assert said.startswith("watching orders"), said + proc.stderr.read()
            assert _triggers_on_orders(conn) == ["pgherald_change_v1", "pgherald_truncate_v1"]
            conn.execute("INSERT INTO orders VALUES (1, 'tea')")
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert "Add one?" in line  # the question was asked...
            assert "INSERT public.orders " in line  # ...and the change is shown after it
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()  # only the process this test started
    assert _triggers_on_orders(conn) == ["pgherald_change_v1", "pgherald_truncate_v1"]


# -- "`PGHERALD_JSON=1` | `--json` of `listen`, `consume`, `watch`" --


def test_pgherald_json_in_the_environment_makes_listen_print_json_lines(
    dsn: str, conn: psycopg.Connection
) -> None:
    env = cli_env(dsn) | {"PGHERALD_JSON": "1"}
    with subprocess.Popen(
        pgherald_cmd("listen", "orders"),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stderr is not None
            assert proc.stdout is not None
            said = proc.stderr.readline()  # written once it listens
            assert said.startswith("listening on 'orders'"), said + proc.stderr.read()
            pgherald.notify(conn, "orders", {"id": 42})
            line = proc.stdout.readline()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()  # only the process this test started
    # The documented shape: the payload as text, not decoded; no time, no colour.
    assert json.loads(line) == {
        "channel": "orders",
        "payload": '{"id":42}',
        "pid": conn.info.backend_pid,
    }


def test_any_option_can_be_set_as_pgherald_command_option(installed: str) -> None:
    """cli.md: "Every other option can be set as `PGHERALD_<COMMAND>_<OPTION>` too", named
    after the flag (tests/unit/test_cli_envvars.py checks every option; this one end to end)."""
    out = subprocess.run(
        pgherald_cmd("status"),
        env=cli_env(installed) | {"PGHERALD_STATUS_JSON": "1"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["groups"] == []
