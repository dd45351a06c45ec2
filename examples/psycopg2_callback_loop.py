"""
A notification callback with psycopg2, done with pgherald.

Replaces the "custom notification callback" tutorials for psycopg2 (a ``select()`` loop that
pops ``conn.notifies`` and calls ``process_notification``). What goes wrong in them:

- ``conn.execute("LISTEN %s;" % channel)``: psycopg2 connections have no ``execute`` method
  (only cursors do), and if they had, the channel name would be pasted into SQL. That is an
  injection hole, and unquoted names fold to lower case, so ``LISTEN MyChannel`` never hears
  ``pg_notify('MyChannel', ...)``.
- ``conn.execute("NOTIFY %s, '%s';" % (channel, message))``: the payload is formatted into
  SQL too; a message containing a quote breaks the statement (or rewrites it).
- ``while True: conn.poll()`` without ``select()`` spins a CPU core at 100%; with
  ``select(..., 5)`` it is fine until the connection drops: then the loop dies with an
  exception, or waits forever on a half-open connection that will never be readable again.
- The loop never ends: there is no way to stop it cleanly.

Here, sending stays in psycopg2 and inside your own transaction (``pgherald.notify`` with bound
parameters, delivered on commit, dropped on rollback), and receiving is a `pgherald.Listener`
on its own connection: handlers registered with ``@listener.on(channel)``, channel names
quoted exactly as spelled, reconnection and health checks built in, and ``listener.stop()``.

Run it: ``python examples/psycopg2_callback_loop.py`` (``$PGHERALD_DSN`` picks the database).
"""

from __future__ import annotations

import os
import sys
import threading

import psycopg2

import pgherald

DSN = os.environ.get("PGHERALD_DSN", "host=127.0.0.1 user=postgres dbname=postgres")

# Upper case and a space: LISTEN "Order Events" keeps both, an unquoted LISTEN would not.
CHANNEL = "Order Events"


def send_orders() -> None:
    """The application side: psycopg2, a normal transaction, notify() next to the writes."""
    conn = psycopg2.connect(DSN)
    try:
        # psycopg2's `with conn:` is one transaction: COMMIT on success, ROLLBACK on error.
        with conn:
            pgherald.notify(conn, CHANNEL, {"order": 1, "item": "tea", "note": "it's hot"})
            pgherald.notify(conn, CHANNEL, {"order": 2, "item": "cake"})
            print("-> orders 1 and 2 sent in one transaction, COMMIT")

        try:
            with conn:
                pgherald.notify(conn, CHANNEL, {"order": 3, "item": "never sent"})
                raise RuntimeError("payment declined")
        except RuntimeError as exc:
            print(f"-> order 3 sent, then the transaction failed ({exc}), ROLLBACK")

        with conn:
            pgherald.notify(conn, CHANNEL, {"order": 4, "item": "scone", "last": True})
            print("-> order 4 sent, COMMIT")
    finally:
        conn.close()


def main() -> int:
    received: list[dict[str, object]] = []

    with pgherald.Listener(DSN) as listener:
        # Registering the handler also LISTENs (at once, since the listener is connected).
        @listener.on(CHANNEL)
        def process_notification(n: pgherald.Notification) -> None:
            order = n.json()
            received.append(order)
            print(f"<- {n.channel!r}: order {order['order']} ({order['item']}) from pid {n.pid}")
            if order.get("last"):
                listener.stop()

        print(f"listening on {CHANNEL!r} (backend pid {listener.backend_pid})")
        sender = threading.Thread(target=send_orders)
        sender.start()
        # A safety net for the example only: a real service runs until it is told to stop.
        watchdog = threading.Timer(15, listener.stop)
        watchdog.start()
        try:
            listener.run()  # returns after listener.stop()
        finally:
            watchdog.cancel()
            sender.join()

    orders = [o["order"] for o in received]
    print(f"received orders {orders}; order 3 was rolled back, so it never arrived")
    return 0 if orders == [1, 2, 4] else 1


if __name__ == "__main__":
    sys.exit(main())
