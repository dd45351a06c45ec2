"""
The plugin's fixtures inside pgherald's own suite (the server is the suite's: see conftest.py):
what a capture sees and refuses, waits on every kind of target, on asyncio and trio.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

import pgherald
from pgherald.testing import ANY, Capture, CaptureFactory, WaitTimeout


def test_only_committed_work_is_captured(
    herald_installed: str, herald_capture: CaptureFactory
) -> None:
    with psycopg.connect(herald_installed, autocommit=True) as conn:
        pgherald.publish(conn, "orders", {"id": 0})  # before the block: not captured
        with herald_capture("orders") as cap:
            with conn.transaction(force_rollback=True):
                pgherald.notify(conn, "orders", "rolled back")
                pgherald.publish(conn, "orders", {"id": 1})
            pgherald.notify(conn, "orders", "kept")
            pgherald.publish(conn, "orders", {"id": 2}, headers={"trace": "t"})
    cap.assert_notified("orders", "kept", times=1)
    cap.assert_not_notified("orders", "rolled back")
    assert [e.payload for e in cap.published()] == [{"id": 2}]
    cap.assert_published("orders", {"id": ANY}, headers={"trace": "t"}, key=None)
    cap.assert_not_published("orders", {"id": 1})
    with pytest.raises(AssertionError, match=r"expected 2 notification\(s\) on 'orders', got 1"):
        cap.assert_notified("orders", times=2)


def test_a_channel_not_listened_to_is_named_in_the_error(
    herald_conn: psycopg.Connection[Any], herald_capture: CaptureFactory
) -> None:
    with herald_capture("orders") as cap:
        pgherald.notify(herald_conn, "payments", "x")
    with pytest.raises(
        pgherald.HeraldError, match=r"did not LISTEN on 'payments'.*herald_capture\('payments'\)"
    ):
        cap.assert_notified("payments")
    cap.assert_not_notified()  # 'payments' was not captured at all


def test_publish_assertions_say_when_the_schema_is_missing(
    herald_conn: psycopg.Connection[Any], herald_capture: CaptureFactory
) -> None:
    with herald_capture() as cap:
        pass
    with pytest.raises(AssertionError, match=r"schema is not installed.*herald_installed"):
        cap.assert_published("orders")


def test_wait_inside_the_block_for_work_of_another_thread(
    herald_installed: str, herald_capture: CaptureFactory, herald_wait: Callable[..., Any]
) -> None:
    go = threading.Event()

    def worker() -> None:
        go.wait(10)
        with psycopg.connect(herald_installed, autocommit=True) as conn:
            pgherald.publish(conn, "jobs", {"n": 1}, key="k")
            pgherald.notify(conn, "jobs", {"n": 1})

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        with herald_capture("jobs") as cap:
            go.set()
            n = herald_wait(cap, channel="jobs", payload={"n": 1}, timeout=10)
            e = cap.wait_published("jobs", key="k", timeout=10)
    finally:
        thread.join(10)
    assert json.loads(n.payload) == {"n": 1}
    assert e.payload == {"n": 1}
    with herald_capture("jobs") as cap, pytest.raises(WaitTimeout, match=r"0\.2s.*'jobs'"):
        cap.wait_notified("jobs", timeout=0.2)


def test_each_capture_is_used_once(herald_db: str) -> None:
    cap = Capture(herald_db)
    with cap, pytest.raises(pgherald.HeraldError, match="already started"):
        cap.start()


def test_predicate_wait(herald_wait: Callable[..., Any]) -> None:
    start = time.monotonic()
    assert herald_wait(lambda: time.monotonic() - start > 0.05 and "ok", timeout=5) == "ok"
    with pytest.raises(WaitTimeout, match=r"timed out after 0.1s waiting for the cache to be true"):
        herald_wait(lambda: False, timeout=0.1, what="the cache")


@pytest.mark.anyio
async def test_async_capture_and_waits(
    herald_installed: str, herald_capture: CaptureFactory, herald_await: Callable[..., Any]
) -> None:
    # psycopg's AsyncConnection runs on asyncio only: the sends are sync, the waits are not.
    with psycopg.connect(herald_installed, autocommit=True) as conn:
        async with pgherald.AsyncListener(herald_installed, channels=["orders"]) as listener:
            with herald_capture("orders") as cap:
                pgherald.notify(conn, "orders", {"id": 1})
                pgherald.publish(conn, "orders", {"id": 1}, key="1")
            n = await herald_await(listener, channel="orders", payload={"id": 1}, timeout=10)
            assert n.json() == {"id": 1}
            with pytest.raises(WaitTimeout, match=r"0\.2s waiting for a notification on 'orders'"):
                await herald_await(listener, channel="orders", timeout=0.2)
        cap.assert_notified("orders", {"id": 1})
        cap.assert_published("orders", {"id": 1}, key="1")
        async with pgherald.AsyncConsumer(herald_installed, group="g") as consumer:
            event = await herald_await(consumer, channel="orders", key="1", timeout=10)
            assert event.payload == {"id": 1}
        # The event was acknowledged: the group has nothing left for a new consumer.
        async with pgherald.AsyncConsumer(herald_installed, group="g") as consumer:
            with pytest.raises(WaitTimeout, match="nothing arrived"):
                await herald_await(consumer, channel="orders", timeout=0.5)

    async def never() -> bool:
        return False

    with pytest.raises(WaitTimeout, match="waiting for never to be true"):
        await herald_await(never, timeout=0.1)


def test_the_plugin_imports_no_optional_extra() -> None:
    code = (
        "import sys, time; t = time.perf_counter(); import pgherald.testing; "
        "print(round((time.perf_counter() - t) * 1000)); "
        "print(sorted(m for m in ('pgserver', 'sqlalchemy', 'psycopg2', 'trio', 'click', "
        "'starlette', 'uvicorn', 'jwt', 'prometheus_client') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60
    ).stdout.split("\n")
    assert out[1] == "[]", f"pgherald.testing imported optional extras: {out[1]}"


def test_waiting_on_the_wrong_kind_says_which_helper(
    herald_db: str, herald_wait: Callable[..., Any]
) -> None:
    listener = pgherald.AsyncListener(herald_db, channels=["orders"])
    with pytest.raises(pgherald.HeraldError, match=r"AsyncListener is waited on with await"):
        herald_wait(listener, channel="orders")
    with pytest.raises(TypeError, match="cannot wait on int"):
        herald_wait(3)
