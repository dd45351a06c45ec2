"""
Polling and periodic task scheduling (seed 003), done with pgherald's durable log.

The seed names polling and periodic scheduling as the alternatives to LISTEN. Done by hand,
they are a ``while True: SELECT ...; sleep(n)`` loop per job table, a cron entry per machine
(each tick runs once per machine, not once), and reminders that are lost when the process that
held them in memory restarts.

Here:

- ``publish(..., deliver_after=...)`` stores a delayed event in the database, in the caller's
  transaction: nothing is lost when a process restarts, and a rollback leaves nothing behind.
- `pgherald.AsyncScheduler` (what ``pgherald schedule run`` runs) releases each event into the
  log once it is due, exactly once however many schedulers run, and publishes periodic cron
  ticks the same way. It waits on a wake-up, not a polling loop, and survives lost, frozen and
  refused connections. It runs on asyncio and trio.
- A consumer group started later still gets every released event: the log kept them.

Run it: ``python examples/delayed_and_periodic_events.py`` (``$PGHERALD_DSN`` picks the database;
periodic schedules need the ``schedule`` extra: ``pip install 'pgherald[schedule]'``).
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta

import anyio
import psycopg

import pgherald

DSN = os.environ.get("PGHERALD_DSN", "host=127.0.0.1 user=postgres dbname=postgres")
CHANNEL = "reminders"


async def main() -> int:
    with psycopg.connect(DSN, autocommit=True) as conn:
        pgherald.install(conn)
        with conn.transaction():  # stored with the caller's transaction, or not at all
            for say, seconds in [("water the plants", 0.3), ("stretch", 0.6)]:
                pgherald.publish(
                    conn, CHANNEL, {"say": say}, deliver_after=timedelta(seconds=seconds)
                )
            never = pgherald.publish(
                conn, CHANNEL, {"say": "never sent"}, deliver_after=timedelta(seconds=0.4)
            )
        withdrawn = pgherald.cancel_delayed(conn, never)
        print(f"-> 3 reminders stored, due in 0.3 s to 0.6 s; one withdrawn: {withdrawn}")
        # A periodic event: each tick published once, however many schedulers run.
        pgherald.add_schedule(
            conn, "standup", "0 9 * * 1-5", CHANNEL, {"say": "standup"},
            timezone="Europe/Paris", replace=True,
        )  # fmt: skip
        (standup,) = [s for s in pgherald.list_schedules(conn) if s.name == "standup"]
        print(
            f"schedule 'standup': weekdays at 9:00 Paris, next {standup.next_tick:%Y-%m-%d %H:%M} UTC"
        )

    # No consumer runs yet: the scheduler alone moves the due reminders into the log.
    # Here for 2.5 s; a worker runs it for good (``await scheduler.run()``, until stop() or
    # cancellation).
    scheduler = pgherald.AsyncScheduler(DSN)
    with anyio.move_on_after(2.5):
        await scheduler.run()
    print(f"scheduler released {scheduler.released} reminders while no consumer ran")

    # A consumer group started afterwards: the log kept them, in the order they fell due.
    heard: list[str] = []
    started = time.monotonic()
    async with pgherald.AsyncConsumer(DSN, group="phone", channels=[CHANNEL]) as consumer:

        @consumer.on(CHANNEL)
        async def remind(event: pgherald.Event) -> None:
            heard.append(event.payload["say"])
            print(f"<- reminder: {event.payload['say']!r}")
            if len(heard) == 2:
                consumer.stop()

        with anyio.fail_after(10):
            await consumer.run()
    print(f"heard {heard} in {time.monotonic() - started:.1f} s; 'never sent' never came")
    return 0 if heard == ["water the plants", "stretch"] else 1


if __name__ == "__main__":
    sys.exit(anyio.run(main))
