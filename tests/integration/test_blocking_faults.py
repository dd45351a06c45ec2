"""
No libpq call that waits without a deadline: each fault here once made a call hang for ever.

libpq's blocking calls (``PQgetResult`` on a statement not fully answered, ``PQcancel``) wait
on the socket with no deadline, and psycopg holds the GIL through them: a hang stops every
thread of the process, so no timeout inside the process (a thread join, ``anyio.fail_after``)
can end it. Such a call therefore runs in a child process here, and the test waits for the
child with a timeout: a hang fails the test, it does not hang it.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import anyio
import psycopg
import pytest

import pgherald
from pgherald import _log
from tests.fix_faults import FaultProxy, await_until

# What the child does: connect (through the proxy), say "ready", wait for the go (the fault is
# in place), then read the log on the connection, lent, and report how that ended.
_READ_LOG_CHILD = textwrap.dedent(
    """
    import json, sys, time
    import anyio, psycopg, pgherald

    dsn, mode = sys.argv[1], sys.argv[2]

    def report(started, outcome, conn):
        print(json.dumps({"seconds": time.monotonic() - started, "outcome": outcome,
                          "status": psycopg.pq.ConnStatus(conn.pgconn.status).name}), flush=True)

    if mode == "sync":
        conn = psycopg.connect(dsn, autocommit=True)
        print("ready", flush=True)
        sys.stdin.readline()
        started = time.monotonic()
        try:
            pgherald.read_log(conn, timeout=0.5)
            outcome = "returned"
        except pgherald.ConnectionLost:
            outcome = "ConnectionLost"
        report(started, outcome, conn)
    else:
        async def main():
            conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
            print("ready", flush=True)
            sys.stdin.readline()
            started = time.monotonic()
            try:
                if mode == "async-cancelled":
                    with anyio.move_on_after(0.5) as scope:
                        await pgherald.aread_log(conn, timeout=30)
                    outcome = "cancelled" if scope.cancelled_caught else "returned"
                else:
                    await pgherald.aread_log(conn, timeout=0.5)
                    outcome = "returned"
            except pgherald.ConnectionLost:
                outcome = "ConnectionLost"
            report(started, outcome, conn)
        anyio.run(main)
    """
)


def _line(proc: subprocess.Popen[str], timeout: float, what: str) -> str:
    """The child's next line of output, within *timeout* seconds."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError(f"the child printed no {what} within {timeout:g}s")
    return proc.stdout.readline()


def _run_child(code: str, *args: str, fault: Any, within: float) -> dict[str, Any]:
    """
    Run *code* in a child Python; once it prints "ready", inject *fault* and let it go on.
    Its last line (JSON) is returned; a child still running after *within* seconds is killed
    and the test fails (a call that hangs).
    """
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=root,
    )
    try:
        ready = _line(proc, 30.0, '"ready"')
        assert ready.strip() == "ready", ready + (proc.stderr.read() if proc.stderr else "")
        fault()
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        started = time.monotonic()
        try:
            out, err = proc.communicate(timeout=within)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise AssertionError(
                f"hung: the call had not returned {within:g}s after the fault (a libpq call "
                "that waits without a deadline)"
            ) from None
        assert proc.returncode == 0, err
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        result["wall"] = time.monotonic() - started
        return result
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("mode", ["sync", "async-timeout", "async-cancelled"])
def test_a_lent_connection_frozen_mid_read_is_handed_back_within_a_deadline(
    mode: str, dsn: str, conn: psycopg.Connection[Any], fault_proxy: FaultProxy
) -> None:
    """
    `read_log` / `aread_log` on a lent connection that freezes (half-open) during the read:
    the read times out (or is cancelled), and the connection, whose statement is still in
    flight, is handed back within `_log.HAND_BACK_GRACE` more seconds. Before, the hand-back
    called PQcancel and then get_result() in blocking mode, which waited for an answer that
    never comes: read_log never returned (nor did any other thread of the process run).
    """
    pgherald.install(conn)
    pgherald.publish(conn, "c", "x")
    limit = 0.5 + _log.HAND_BACK_GRACE
    result = _run_child(
        _READ_LOG_CHILD, fault_proxy.dsn_for(dsn), mode, fault=fault_proxy.freeze, within=15.0
    )
    expected = "cancelled" if mode == "async-cancelled" else "ConnectionLost"
    assert result["outcome"] == expected
    assert result["seconds"] < limit + 2.0, result  # the timeout, the grace, some slack
    # The statement is still in flight (no answer can come): the connection is left as it is,
    # for the application to find unusable, and close.
    assert result["status"] == "OK"


@pytest.mark.anyio
async def test_stop_from_another_thread_never_waits_for_the_event_loop(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    """
    `AsyncListener.stop()` (any async front end's: they share `AsyncWaiter.wake`) from another
    thread returns at once while the event loop is busy: here in a handler that waits for
    that very thread. Before, the wake-up was `anyio.from_thread.run_sync`, which waits for the
    loop to run it: stop() waited for the handler, the handler for stop(), a deadlock (ended
    only by the handler's own timeout here). A loop that is not running (between
    ``run_until_complete`` calls) held stop() just as long.
    """
    joined: list[bool] = []
    listener = pgherald.AsyncListener(dsn)

    @listener.on("ch")
    def handler(n: pgherald.Notification) -> None:
        # The loop runs this handler: nothing else runs on it until it returns.
        stopper = threading.Thread(target=listener.stop, name="stopper", daemon=True)
        stopper.start()
        stopper.join(5.0)
        joined.append(not stopper.is_alive())

    with anyio.fail_after(30):
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.run)
            await await_until(lambda: "ch" in listener.listening, 10, "the LISTEN")
            conn.execute("NOTIFY ch")
            await await_until(lambda: joined, 10, "the handler")
    assert joined == [True], "stop() from another thread waited for the busy event loop"


def test_a_lent_connection_terminated_before_the_read_raises_connection_lost(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    """The documented error, not psycopg's "setting nonblocking failed" from the clean-up."""
    pgherald.install(conn)
    with psycopg.connect(dsn, autocommit=True) as lent:
        conn.execute("SELECT pg_terminate_backend(%s)", (lent.info.backend_pid,))
        with pytest.raises(pgherald.ConnectionLost):
            pgherald.read_log(lent, timeout=5)


def test_a_statement_whose_connection_is_closed_under_it_is_a_connection_error(
    installed: str,
) -> None:
    # An aclose() from another task finishes the connection while a statement of the engine's
    # waits for its answer: the wait ends (woken), and the statement must not read as one that
    # answered nothing (a consumer's acknowledgement took that for a result and raised
    # ValueError from its iteration).
    from psycopg import pq

    from pgherald._protocol import pgwire

    with psycopg.connect(installed, autocommit=True) as conn:
        pgconn = conn.pgconn
        pgconn.nonblocking = 1
        pgconn.send_query(b"SELECT pg_sleep(0.5)")
        gen = pgwire.finish(pgconn, time.monotonic() + 5)
        assert next(gen)[0] == pgwire.WAIT  # waiting for the answer
        pgconn.finish()  # closed under it
        assert pgconn.status == pq.ConnStatus.BAD
        with pytest.raises(psycopg.OperationalError, match="closed before the statement's answer"):
            gen.send(False)  # woken
