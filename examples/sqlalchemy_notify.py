"""
NOTIFY from SQLAlchemy, inside the transaction that writes the data, done with pgherald.

Replaces the SQLAlchemy part of the "PostgreSQL LISTEN/NOTIFY with SQLAlchemy" recipe
(``engine.raw_connection()``, ``set_isolation_level(AUTOCOMMIT)``, ``cur.execute(f'LISTEN
{channel};')``, ``conn.poll()``). What goes wrong in it:

- The listening connection is borrowed from the engine's pool, switched to autocommit, and
  handed back still LISTENing: whoever checks it out next gets an autocommit connection with
  a subscription nobody reads, and notifications pile up for it on the server.
- ``f'LISTEN {channel};'`` pastes the channel into SQL (injection) and folds its case.
- ``sqlalchemy.Engine()`` is not how an engine is made (``create_engine`` is), and there is
  no reconnection when the raw connection dies.
- Nothing shows the sending side, where the real question is: does the notification go out
  with the data, or before it, or even when the write fails?

Here: `pgherald.notify` takes the SQLAlchemy ``Connection``, ``Session`` or raw connection
you already write with, so the notification is part of the same transaction:
``engine.begin()`` commits both the row and the notification; a block that raises rolls back
both. The listener is a
`pgherald.Listener` on its own connection, not a pooled one.

Run it: ``python examples/sqlalchemy_notify.py`` (``$PGHERALD_DSN`` picks the database).
"""

from __future__ import annotations

import os
import sys
import uuid

import psycopg
import sqlalchemy as sa
from sqlalchemy.orm import Session

import pgherald

DSN = os.environ.get("PGHERALD_DSN", "host=127.0.0.1 user=postgres dbname=postgres")

CHANNEL = "invoices"

metadata = sa.MetaData()
# A name of its own, so the example never touches a table of yours.
invoices = sa.Table(
    f"pgherald_example_invoices_{uuid.uuid4().hex[:8]}",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("customer", sa.Text, nullable=False),
    sa.Column("amount", sa.Numeric(10, 2), nullable=False),
)


def main() -> int:
    # psycopg 3 as the SQLAlchemy driver, connecting with the same libpq DSN as pgherald.
    engine = sa.create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(DSN))
    metadata.create_all(engine)
    print(f"created table {invoices.name}")
    try:
        with pgherald.Listener(DSN, channels=[CHANNEL]) as listener:
            # 1. engine.begin(): one transaction, committed when the block ends.
            with engine.begin() as conn:
                new_id = conn.execute(
                    invoices.insert().values(customer="ada", amount=120).returning(invoices.c.id)
                ).scalar_one()
                pgherald.notify(conn, CHANNEL, {"invoice": new_id, "customer": "ada"})
            print(f"-> invoice {new_id} inserted and notified in engine.begin(): COMMIT")

            # 2. The same, but the block fails: the row and the notification both vanish.
            try:
                with engine.begin() as conn:
                    bad_id = conn.execute(
                        invoices.insert().values(customer="bob", amount=-5).returning(invoices.c.id)
                    ).scalar_one()
                    pgherald.notify(conn, CHANNEL, {"invoice": bad_id, "customer": "bob"})
                    raise ValueError("negative amount")
            except ValueError as exc:
                print(f"-> invoice {bad_id} inserted and notified, then {exc}: ROLLBACK")

            # 3. An ORM Session works the same way (session.begin() commits on success).
            with Session(engine) as session, session.begin():
                orm_id = session.execute(
                    invoices.insert().values(customer="cy", amount=42).returning(invoices.c.id)
                ).scalar_one()
                pgherald.notify(session, CHANNEL, {"invoice": orm_id, "customer": "cy"})
            print(f"-> invoice {orm_id} inserted and notified through a Session: COMMIT")

            # 4. The seed's engine.raw_connection() is fine for sending: a DBAPI connection in
            #    its normal transactional mode, returned to the pool unchanged by close().
            raw = engine.raw_connection()
            try:
                pgherald.notify(raw, CHANNEL, {"batch_closed": True})
                raw.commit()
            finally:
                raw.close()
            print("-> batch_closed notified through engine.raw_connection(): COMMIT")

            # Iterator style: read what arrived; the loop ends after 1 s of silence.
            heard = []
            for n in listener.notifications(timeout=1.0):
                event = n.json()
                if "invoice" in event:
                    heard.append(event["invoice"])
                    print(f"<- {n.channel}: invoice {event['invoice']} for {event['customer']}")
                else:
                    print(f"<- {n.channel}: {event}")

        with engine.connect() as conn:
            stored = conn.execute(sa.select(invoices.c.id).order_by(invoices.c.id)).scalars()
            rows = list(stored)
        print(f"rows in the table: {rows}; notifications heard: {heard}")
    finally:
        metadata.drop_all(engine)
        engine.dispose()
        print(f"dropped table {invoices.name}")

    return 0 if heard == rows == [new_id, orm_id] else 1


if __name__ == "__main__":
    sys.exit(main())
