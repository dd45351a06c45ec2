"""
The plugin as a user meets it: a project of its own (a temporary directory, no pgherald
conftest), run by ``pytest`` in a subprocess, that finds the plugin through its ``pytest11``
entry point and uses only its fixtures.
"""

from __future__ import annotations

import re
from pathlib import Path

import psycopg
import pytest

pytest_plugins = ["pytester"]

USER_TESTS = """
import threading

import psycopg
import pytest
import pgherald

SEEN = []  # databases of the tests that ran, in order


def test_capture_sees_a_notify_and_a_publish(herald_installed, herald_capture):
    with psycopg.connect(herald_installed, autocommit=True) as conn:
        with herald_capture("orders") as cap:
            pgherald.notify(conn, "orders", {"id": 1})
            with conn.transaction():
                pgherald.publish(conn, "orders.placed", {"id": 1}, key="order-1")
    assert cap.assert_notified("orders", {"id": 1}).channel == "orders"
    event = cap.assert_published("orders.placed", {"id": 1}, key="order-1")
    assert (event.channel, event.payload, event.key) == ("orders.placed", {"id": 1}, "order-1")
    cap.assert_notified("orders", times=1)
    cap.assert_not_published("orders.cancelled")


def test_capture_sees_other_threads(herald_db, herald_capture):
    def send():
        with psycopg.connect(herald_db, autocommit=True) as conn:
            pgherald.notify(conn, "jobs", "done")

    with herald_capture("jobs") as cap:
        thread = threading.Thread(target=send)
        thread.start()
        thread.join()
    cap.assert_notified("jobs", "done")


def test_a_database_of_its_own(herald_conn):
    name = herald_conn.execute("SELECT current_database()").fetchone()[0]
    SEEN.append(name)
    herald_conn.execute("CREATE TABLE mine (x int)")


def test_another_database_of_its_own(herald_conn, herald_dsn):
    name = herald_conn.execute("SELECT current_database()").fetchone()[0]
    assert SEEN and name != SEEN[-1]
    assert herald_conn.execute("SELECT to_regclass('mine')").fetchone()[0] is None
    with psycopg.connect(herald_dsn) as admin:
        # Retired: closed to new sessions, none left; dropped with the next few.
        left = admin.execute(
            "SELECT d.datallowconn, (SELECT count(*) FROM pg_stat_activity AS a"
            " WHERE a.datname = d.datname) FROM pg_database AS d WHERE d.datname = %s",
            (SEEN[-1],),
        ).fetchone()
    assert left in (None, (False, 0)), f"the previous test's database is still open: {left}"
    with open("databases.txt", "w") as f:
        f.write(" ".join(SEEN + [name]))


def test_waits_for_a_listener(herald_conn, herald_db, herald_wait):
    with pgherald.Listener(herald_db, channels=["orders"]) as listener:
        pgherald.notify(herald_conn, "orders", {"id": 0})
        pgherald.notify(herald_conn, "orders", {"id": 7})
        n = herald_wait(listener, channel="orders", payload={"id": 7}, timeout=10)
    assert n.json() == {"id": 7}


def test_waits_for_a_consumer(herald_installed, herald_wait):
    with psycopg.connect(herald_installed, autocommit=True) as conn:
        pgherald.publish(conn, "orders", {"id": 1}, key="a")
        pgherald.publish(conn, "orders", {"id": 2}, key="a")
    with pgherald.Consumer(herald_installed, group="billing") as consumer:
        event = herald_wait(consumer, channel="orders", payload={"id": 2}, timeout=10)
    assert (event.payload, event.key) == ({"id": 2}, "a")
    # Both were acknowledged (the one passed over too): nothing is left for the group.
    with pgherald.Consumer(herald_installed, group="billing") as consumer:
        with pytest.raises(AssertionError, match="nothing arrived"):
            herald_wait(consumer, timeout=0.5)


def test_fails_missing_notification(herald_conn, herald_capture):
    with herald_capture("orders") as cap:
        pgherald.notify(herald_conn, "orders", {"id": 1})
    cap.assert_notified("orders", {"id": 2})


def test_fails_missing_publish(herald_installed, herald_capture):
    with psycopg.connect(herald_installed, autocommit=True) as conn:
        with herald_capture() as cap:
            pgherald.publish(conn, "orders", {"id": 1}, key="order-1")
    cap.assert_published("orders", {"id": 1}, key="order-2")


def test_fails_wait_timeout(herald_db, herald_wait):
    with pgherald.Listener(herald_db, channels=["orders"]) as listener:
        herald_wait(listener, channel="orders", timeout=0.3)
"""


def test_a_user_project_runs_with_the_plugin(
    pytester: pytest.Pytester, server_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGHERALD_TEST_DSN", server_dsn)
    pytester.makepyfile(test_orders=USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", timeout=120)
    result.assert_outcomes(passed=6, failed=3)
    # Every test's database is gone at the session's end (dropped in batches meanwhile).
    names = (pytester.path / "databases.txt").read_text().split()
    assert len(names) == 2
    with psycopg.connect(server_dsn) as admin:
        left = admin.execute(
            "SELECT datname FROM pg_database WHERE datname = ANY(%s)", (names,)
        ).fetchall()
    assert left == []
    result.stdout.fnmatch_lines(
        [
            "*test_fails_missing_notification*",
            "E * AssertionError: no notification on 'orders' with payload {'id': 2}; captured 1:",
            "E *   'orders': '{\"id\":1}'",
        ],
        consecutive=False,
    )
    result.stdout.fnmatch_lines(
        [
            "*test_fails_missing_publish*",
            "E * AssertionError: no event published on 'orders' with payload {'id': 1} key "
            "'order-2'; published 1:",
            "E *   id=1 'orders' key='order-1' payload={'id': 1}",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*test_fails_wait_timeout*",
            "E *.WaitTimeout: timed out after 0.3s waiting for a notification on 'orders' on "
            "<Listener*>; nothing arrived",
        ]
    )


def test_without_a_dsn_the_plugin_starts_an_embedded_server(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("pgserver", reason="the embedded extra is part of the dev install")
    monkeypatch.delenv("PGHERALD_TEST_DSN", raising=False)
    pytester.makepyfile(
        test_embedded="""
        def test_one(herald_conn):
            print("data dir:", herald_conn.execute("SHOW data_directory").fetchone()[0])

        def test_two(herald_conn, herald_dsn):
            print("same server:", herald_dsn)
        """
    )
    # --herald-embedded: the local server on 127.0.0.1:5432 answers here, so skip it.
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s", "--herald-embedded")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        ["*data dir: /*/herald_pgdata*", "*same server: postgresql://*host=/*"]
    )


def test_the_examples_of_docs_testing_md_pass(
    pytester: pytest.Pytester, server_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGHERALD_TEST_DSN", server_dsn)
    text = (Path(__file__).resolve().parents[2] / "docs" / "testing.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.DOTALL) if "def test_" in b]
    tests = "\n\n".join(blocks)
    assert tests.count("def test_") == 3
    pytester.makepyfile(test_docs="import pytest\nimport pgherald\n\n" + tests)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", timeout=120)
    outcomes = result.parseoutcomes()  # anyio may run the async one on asyncio and on trio
    assert outcomes.get("passed", 0) >= 3, result.stdout.str()
    assert not outcomes.get("failed"), result.stdout.str()
    assert not outcomes.get("errors"), result.stdout.str()


def test_a_dsn_that_does_not_connect_fails_the_tests_and_says_so(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_x="def test_x(herald_db):\n    pass\n")
    bad = "host=127.0.0.1 port=1 user=postgres connect_timeout=2"
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--herald-dsn={bad}")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*the test DSN does not connect: *port=1*--herald-dsn*"])
