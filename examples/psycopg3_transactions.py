"""
Transactional NOTIFY with psycopg 3, and a listener that survives losing its connection.

Replaces the "LISTEN/NOTIFY in psycopg3" article (``pool.connection()`` for the listener,
``conn.execute("LISTEN channel_name")`` in a transaction, ``for n in conn.notifies()``, and
``conn.execute("NOTIFY channel_name, '...'")``). What goes wrong in it:

- The listener borrows a connection from a pool. A pooled connection is meant to go back to
  the pool; if it does, it keeps its LISTEN, and if the pool recycles it, the listener is
  silently deaf. The article itself advises a dedicated connection, then uses the pool.
- ``for n in conn.notifies()`` ends with an exception the first time the connection drops, and
  says nothing about what was missed meanwhile. "Add error handling" is left to the reader.
- The payload is written into the NOTIFY statement. With a variable that becomes string
  formatting, and a quote in the message breaks (or rewrites) the SQL.
- It calls the wait until COMMIT "a delay". It is the point: the notification goes out only
  if the transaction commits, and identical notifications of one transaction fold into one.

Here: the sender wraps its writes and `pgherald.notify` in ``with conn.transaction():``; the
listener is a dedicated `pgherald.Listener` (not from a pool) read in iterator style,
``for n in listener.notifications(timeout=...)``. Midway, the listener's server process is
killed with ``pg_terminate_backend(listener.backend_pid)``: the listener reconnects and
re-LISTENs by itself, and its ``on_gap`` hook catches up on the job sent while it was away by
reading the jobs table, the durable state the notifications only point to.

Run it: ``python examples/psycopg3_transactions.py`` (``$PGHERALD_DSN`` picks the database).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import uuid

import psycopg
from psycopg import sql

import pgherald

DSN = os.environ.get("PGHERALD_DSN", "host=127.0.0.1 user=postgres dbname=postgres")

CHANNEL = "jobs"
TABLE = sql.Identifier(f"pgherald_example_jobs_{uuid.uuid4().hex[:8]}")


def add_job(conn: psycopg.Connection, title: str) -> int:
    """Insert a job and announce it, in one transaction: both happen, or neither."""
    with conn.transaction():
        row = conn.execute(
            sql.SQL("INSERT INTO {} (title) VALUES (%s) RETURNING id").format(TABLE), (title,)
        ).fetchone()
        assert row is not None
        pgherald.notify(conn, CHANNEL, {"job": row[0]})
    return int(row[0])


def add_job_when_back(back: threading.Event) -> None:
    """Another client, adding a job once the listener is back (as told by on_gap)."""
    if back.wait(10):
        with psycopg.connect(DSN) as conn:
            print("-> adding 1 job after the reconnect")
            add_job(conn, "after the reconnect")


def main() -> int:
    # Show the library's own reconnect messages, briefly.
    logging.basicConfig(level=logging.WARNING, format="   [log] %(message)s")

    done: list[int] = []  # job ids handled, in order
    caught_up: list[int] = []  # of those, the ones found by re-reading after a gap
    back = threading.Event()  # set by on_gap: the listener is listening again
    late_sender = threading.Thread(target=add_job_when_back, args=(back,))

    with psycopg.connect(DSN, autocommit=True) as sender:
        sender.execute(sql.SQL("CREATE TABLE {} (id serial PRIMARY KEY, title text)").format(TABLE))
        try:

            def on_gap(gap: pgherald.Gap) -> None:
                # Called once the listener is LISTENing again. Anything sent while it was away
                # is lost as a notification, but not as data: re-read the table.
                print(
                    f"!! gap ({gap.reason}): listening again after "
                    f"{gap.ended - gap.started:.2f}s, {gap.attempts} attempt(s)"
                )
                last = max(done, default=0)
                rows = sender.execute(
                    sql.SQL("SELECT id, title FROM {} WHERE id > %s ORDER BY id").format(TABLE),
                    (last,),
                ).fetchall()
                for job_id, title in rows:
                    print(f"   caught up from the table: job {job_id} ({title})")
                    done.append(job_id)
                    caught_up.append(job_id)
                back.set()

            # A dedicated connection, not one from a pool; a short backoff for the demo.
            listener = pgherald.Listener(
                DSN, channels=[CHANNEL], on_gap=on_gap, reconnect_initial_delay=0.05
            )
            with listener, psycopg.connect(DSN) as app:
                first_pid = listener.backend_pid
                print(f"listening on {CHANNEL!r}, backend pid {first_pid}")

                add_job(app, "resize image")
                add_job(app, "send invoice")
                print("-> 2 jobs added, 2 transactions committed")

                with app.transaction():
                    for _ in range(3):
                        pgherald.notify(app, CHANNEL, "wake up")
                print("-> 'wake up' notified 3 times in 1 transaction (they fold into 1)")

                with app.transaction():
                    pgherald.notify(app, CHANNEL, {"job": -1})
                    raise psycopg.Rollback()  # leaves the block quietly, rolling back
                print("-> a notification in a rolled-back transaction (never delivered)")

                killed = False
                for n in listener.notifications(timeout=5):
                    if n.payload == "wake up":
                        print(f"<- {n.payload!r}")
                        continue
                    job_id = n.json()["job"]
                    if job_id in done:
                        continue  # already handled during a catch-up
                    done.append(job_id)
                    print(f"<- job {job_id} (from backend {n.pid})")
                    if len(done) == 2 and not killed:
                        killed = True
                        # Kill the listener's server process, and wait until it is gone.
                        sender.execute("SELECT pg_terminate_backend(%s, 5000)", (first_pid,))
                        print(f"xx terminated listener backend {first_pid}")
                        # The listener reads nothing until this loop body returns, so this
                        # job is committed while it is certainly disconnected.
                        add_job(app, "sent while nobody listened")
                        print("-> 1 job added while the listener is disconnected")
                        late_sender.start()
                    elif len(done) == 4:
                        print(f"   listener now on backend {listener.backend_pid}")
                        listener.stop()
            stats = listener.stats
            if late_sender.ident is not None:  # started
                late_sender.join()
        finally:
            sender.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(TABLE))

    print(
        f"handled jobs {done} ({len(caught_up)} by catching up); "
        f"reconnects={stats.reconnects}, gaps={len(stats.gaps)}"
    )
    return 0 if done == [1, 2, 3, 4] and caught_up == [3] and stats.reconnects == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
