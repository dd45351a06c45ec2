"""
A table of events filled by a trigger that also calls pg_notify, done right.

Replaces the "receive NOTIFY events with psycopg2" tutorial (a ``notification_events`` table, a
``notify_event(event_name, event_data)`` function, and a ``conn.poll()`` loop). What goes wrong
in it:

- The "trigger function" declares arguments (``notify_event(event_name VARCHAR, ...) RETURNS
  TRIGGER``): PostgreSQL refuses that, trigger functions take their arguments from
  ``TG_ARGV``. And no ``CREATE TRIGGER`` attaches it to any table, so nothing would fire it.
- The payload is only the event name, so a listener cannot tell *which* row changed.
- The listening connection is not in autocommit: psycopg2 opens a transaction for the
  ``LISTEN``, which only takes effect at COMMIT, which never comes. Nothing is ever received.
- ``while True: conn.poll()`` with no ``select()`` spins a CPU core at 100%, and there is no
  reconnection: the first network hiccup ends the loop.

Here: a real ``RETURNS trigger`` function that stores the event and sends a small JSON
reference built with ``json_build_object`` (payloads must stay under 8000 bytes, rows may not),
the channel passed as ``TG_ARGV[0]`` so it is data, never SQL text, an ``AFTER INSERT`` trigger
on a business table, and a `pgherald.Listener` that decodes with ``n.json()`` and reads the full
event back by id. The event row and the notification share the inserting transaction: both
happen on COMMIT, neither on ROLLBACK.

Everything lives in a throw-away schema, dropped at the end.

Run it: ``python examples/notification_events_trigger.py`` (``$PGHERALD_DSN`` picks the
database).
"""

from __future__ import annotations

import os
import sys
import uuid

import psycopg
from psycopg import sql

import pgherald

DSN = os.environ.get("PGHERALD_DSN", "host=127.0.0.1 user=postgres dbname=postgres")

SCHEMA = f"pgherald_example_{uuid.uuid4().hex[:8]}"
CHANNEL = "Shop Events"  # any text works: it reaches pg_notify as a value

# {schema} and {channel} are filled in by psycopg.sql: an Identifier and a Literal, quoted.
SETUP = """
CREATE SCHEMA {schema};

CREATE TABLE {schema}.orders (
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer text NOT NULL,
    total    numeric(10, 2) NOT NULL
);

CREATE TABLE {schema}.notification_events (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_name text NOT NULL,
    event_data jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION {schema}.record_and_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    event_id bigint;
    name text := TG_TABLE_NAME || '.' || lower(TG_OP);
BEGIN
    INSERT INTO {schema}.notification_events (event_name, event_data)
    VALUES (name, to_jsonb(NEW))
    RETURNING id INTO event_id;

    -- A reference, not the row: the row may outgrow NOTIFY's 8000-byte limit.
    PERFORM pg_notify(
        TG_ARGV[0],
        json_build_object('event_id', event_id, 'event', name, 'row_id', NEW.id)::text
    );
    RETURN NULL;  -- the return value of an AFTER trigger is ignored
END
$$;

CREATE TRIGGER orders_notify
    AFTER INSERT ON {schema}.orders
    FOR EACH ROW EXECUTE FUNCTION {schema}.record_and_notify({channel});
"""


def main() -> int:
    setup = sql.SQL(SETUP).format(schema=sql.Identifier(SCHEMA), channel=sql.Literal(CHANNEL))
    orders = sql.SQL("INSERT INTO {}.orders (customer, total) VALUES (%s, %s)").format(
        sql.Identifier(SCHEMA)
    )
    read_event = sql.SQL(
        "SELECT event_name, event_data, created_at FROM {}.notification_events WHERE id = %s"
    ).format(sql.Identifier(SCHEMA))

    with psycopg.connect(DSN, autocommit=True) as admin:
        admin.execute(setup)
        print(f"created schema {SCHEMA}: orders, notification_events, trigger orders_notify")
        try:
            with (
                pgherald.Listener(DSN, channels=[CHANNEL]) as listener,
                psycopg.connect(DSN) as app,
            ):
                # The application only inserts orders; the trigger does the rest.
                with app.transaction():
                    app.execute(orders, ("ada", 12.50))
                    app.execute(orders, ("grace", 99.00))
                print("-> inserted 2 orders in one transaction, COMMIT")
                try:
                    with app.transaction():
                        app.execute(orders, ("mallory", 1_000_000))
                        raise ValueError("fraud check failed")
                except ValueError as exc:
                    print(f"-> inserted 1 order, then {exc}: ROLLBACK")
                with app.transaction():
                    app.execute(orders, ("linus", 7.25))
                print("-> inserted 1 order, COMMIT")

                seen = []
                # Iterator style; the timeout ends the loop if fewer events come than expected.
                for n in listener.notifications(timeout=5):
                    ref = n.json()
                    row = admin.execute(read_event, (ref["event_id"],)).fetchone()
                    assert row is not None
                    name, data, created = row
                    print(
                        f"<- {n.channel!r} {n.payload}\n"
                        f"   event {ref['event_id']} read back: {name} "
                        f"customer={data['customer']} total={data['total']} "
                        f"at {created:%H:%M:%S}"
                    )
                    seen.append(data["customer"])
                    if len(seen) == 3:
                        listener.stop()
            stored = admin.execute(
                sql.SQL("SELECT count(*) FROM {}.notification_events").format(
                    sql.Identifier(SCHEMA)
                )
            ).fetchone()
        finally:
            admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(SCHEMA)))
            print(f"dropped schema {SCHEMA}")

    count = stored[0] if stored else 0
    print(f"{len(seen)} events received, {count} stored; the rolled-back order left neither")
    return 0 if seen == ["ada", "grace", "linus"] and count == 3 else 1


if __name__ == "__main__":
    sys.exit(main())
