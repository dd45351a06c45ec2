"""
Listening from trio, done with pgherald.

Replaces the trio + SQLAlchemy raw-connection recipe (``trio.lowlevel.wait_readable(conn)``,
``conn.poll()``, ``conn.notifies.pop(0)``). What goes wrong in it:

- It does not run: ``await`` inside a plain ``def main``, a Python 2 ``print`` statement, and
  ``sqlalchemy.Engine()`` (engines come from ``create_engine``).
- ``cur.execute(f'LISTEN {channel};')``: the channel name is pasted into SQL (injection) and
  folded to lower case, so ``LISTEN Orders`` never hears ``pg_notify('Orders', ...)``.
- The listening connection comes from the engine's pool and is put back into it still in
  autocommit and still LISTENing: the next user of that pooled connection inherits both.
- No reconnection, no detection of a dead connection, and ``json.loads(notify.payload)`` with
  no answer for a payload that is not JSON.

Here: `pgherald.AsyncListener` on its own connection (it runs on trio and asyncio alike), an
async handler, notifications sent from a worker thread with a plain psycopg ``Connection``
(psycopg's ``AsyncConnection`` runs on asyncio only, not on trio), and a clean shutdown with
``listener.stop()``.

Run it: ``python examples/trio_listener.py`` (``$PGHERALD_DSN`` picks the database).
"""

from __future__ import annotations

import os
import sys

import psycopg
import trio

import pgherald

DSN = os.environ.get("PGHERALD_DSN", "host=127.0.0.1 user=postgres dbname=postgres")

CHANNEL = "Sensor Readings"
READINGS = [{"sensor": "boiler", "celsius": 71.5}, {"sensor": "attic", "celsius": 18.0}]


def send_readings() -> None:
    """Runs in a worker thread: blocking psycopg is fine there, and works under trio."""
    with psycopg.connect(DSN) as conn, conn.transaction():
        for reading in READINGS:
            pgherald.notify(conn, CHANNEL, reading)
        pgherald.notify(conn, CHANNEL, "calibrating")  # plain text, not JSON
        # Printed before COMMIT: nothing can have been received yet.
        print(f"-> worker thread: {len(READINGS)} readings and 1 text message, COMMIT")


async def main() -> int:
    got: list[object] = []
    all_in = trio.Event()

    # channels=... LISTENs on entering the block, before anything is sent.
    async with pgherald.AsyncListener(DSN, channels=[CHANNEL]) as listener:

        @listener.on(CHANNEL)
        async def on_reading(n: pgherald.Notification) -> None:
            try:
                value: object = n.json()
            except pgherald.PayloadNotJSON:
                value = n.payload  # text is a valid payload too: no crash, no guessing
            await trio.sleep(0.001)  # stands for real async work: a write, an HTTP call...
            got.append(value)
            print(f"<- {n.channel!r}: {value!r}")
            if len(got) == len(READINGS) + 1:
                all_in.set()

        print(f"trio: listening on {CHANNEL!r} (backend pid {listener.backend_pid})")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(listener.run)
            await trio.to_thread.run_sync(send_readings)
            with trio.move_on_after(10):  # a safety net for the example
                await all_in.wait()
            listener.stop()  # run() returns, the nursery closes
        print(
            f"stopped cleanly; stats: received={listener.stats.received}, "
            f"handler_errors={listener.stats.handler_errors}"
        )

    return 0 if got == [*READINGS, "calibrating"] else 1


if __name__ == "__main__":
    sys.exit(trio.run(main))
