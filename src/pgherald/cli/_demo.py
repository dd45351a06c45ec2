"""``pgherald demo``: what pgherald does, shown live on a real server in a few seconds."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
from psycopg import sql as psql

from .. import notify
from .._conninfo import connect_error, listener_conninfo
from .._listener import Listener
from .._models import Gap, Notification
from ..errors import HeraldError
from ._format import format_change

Echo = Callable[..., None]
Style = Callable[..., str]

CHANNELS = ["orders", "Chat Room", "alerts"]


@contextlib.contextmanager
def database(dsn: str | None, echo: Echo) -> Iterator[str]:
    """The DSN to use: the given one, else libpq's environment, else an embedded server."""
    if dsn or os.environ.get("PGHOST") or os.environ.get("PGSERVICE"):
        yield dsn or ""
        return
    from ..embedded import EmbeddedPostgres

    echo("No DSN given: starting an embedded PostgreSQL (pgserver)...")
    with EmbeddedPostgres() as server:
        echo(f"  running in {server.datadir}\n  DSN (while this runs): {server.dsn}\n")
        yield server.dsn


def run_demo(dsn: str | None, *, pause: float, echo: Echo, style: Style) -> None:
    with database(dsn, echo) as real_dsn:
        _tour(real_dsn, pause=pause, echo=echo, style=style)


class _Inbox:
    """What the listener received, with a way to wait for it (no sleeps)."""

    def __init__(self) -> None:
        self.items: list[Notification] = []
        self.gaps: list[Gap] = []
        self._cond = threading.Condition()

    def add(self, item: Notification | Gap) -> None:
        with self._cond:
            (self.items if isinstance(item, Notification) else self.gaps).append(item)  # type: ignore[arg-type]
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = 10.0, gaps: int = 0) -> None:
        with self._cond:
            self._cond.wait_for(
                lambda: len(self.items) >= count and len(self.gaps) >= gaps, timeout
            )


def _tour(dsn: str, *, pause: float, echo: Echo, style: Style) -> None:
    def step(title: str) -> None:
        time.sleep(pause)  # pacing for human eyes only; every wait below is on events
        echo(style(f"\n== {title}", fg="magenta", bold=True))

    def show(prefix: str, text: str, color: str = "white") -> None:
        echo(f"  {style(prefix, fg=color, bold=True)} {text}")

    inbox = _Inbox()
    listener = Listener(dsn, channels=CHANNELS, on_gap=inbox.add, reconnect_initial_delay=0.05)

    @listener.on()
    def received(n: Notification) -> None:
        show("<- heard", f"{style(n.channel, fg='cyan')}: {n.payload}", "green")
        inbox.add(n)

    with listener:
        step(f"A listener on its own connection, LISTENing to {', '.join(map(repr, CHANNELS))}")
        show("..", f"backend pid {listener.backend_pid}, application_name pgherald-listener")
        thread = threading.Thread(target=listener.run, name="demo-listener", daemon=True)
        thread.start()

        conninfo = listener_conninfo(dsn, application_name="pgherald-demo")
        try:
            sender = psycopg.connect(conninfo)
        except psycopg.OperationalError as exc:
            raise connect_error(conninfo, " ".join(str(exc).split())) from None
        with sender:
            step("A transaction sends two notifications; they arrive at COMMIT")
            notify(sender, "orders", {"id": 1, "item": "tea", "qty": 2})
            show("->", "notify orders {id: 1, ...} (in transaction)", "yellow")
            notify(sender, "Chat Room", "hello from a mixed-case channel with a space")
            show("->", "notify 'Chat Room' (in transaction)", "yellow")
            show("..", f"received before COMMIT: {len(inbox.items)}")
            show("->", "COMMIT", "yellow")
            sender.commit()
            inbox.wait_for(2)

            step("A transaction that rolls back: its notification is never delivered")
            notify(sender, "alerts", "this is rolled back")
            sender.rollback()
            show("->", "notify alerts ... ROLLBACK", "yellow")
            notify(sender, "alerts", {"level": "info", "msg": "only this one arrives"})
            sender.commit()
            inbox.wait_for(3)

            step("Duplicates within one transaction fold into one")
            for _ in range(3):
                notify(sender, "orders", {"id": 2, "item": "cake"})
            show("->", "3 identical notifications, one COMMIT", "yellow")
            sender.commit()
            inbox.wait_for(4)

            step("Bad input is refused with a clear error, before reaching the server")
            checks: list[tuple[str, Callable[[], None]]] = [
                ("8000-byte payload", lambda: notify(sender, "orders", "x" * 8000)),
                ("64-byte channel", lambda: notify(sender, "c" * 64, "x")),
                ("non-JSON value", lambda: notify(sender, "orders", {"when": object()})),
            ]
            for label, call in checks:
                try:
                    call()
                except HeraldError as exc:
                    show("!!", f"{label}: {type(exc).__name__}: {exc}", "red")

            step("The listener's connection is killed (pg_terminate_backend)")
            sender.autocommit = True
            old_pid = listener.backend_pid
            sender.execute("SELECT pg_terminate_backend(%s)", (old_pid,))
            show("..", f"terminated backend {old_pid}; the listener reconnects and re-LISTENs")
            inbox.wait_for(4, gaps=1)
            gap = inbox.gaps[0]
            show(
                "..",
                f"back after {gap.ended - gap.started:.2f}s on backend {listener.backend_pid} "
                "(the on_gap hook fired: re-read state, or use the durable log)",
            )
            notify(sender, "orders", {"id": 3, "item": "after the reconnect"})
            inbox.wait_for(5)

        listener.stop()
        thread.join(5)
    _durable_tour(
        conninfo,
        step=step,
        show=show,
        style=style,
        then=lambda: _changes_tour(conninfo, step=step, show=show),  # needs the schema too
    )
    step("Done")
    show(
        "..",
        f"received {listener.stats.received} notifications, {listener.stats.reconnects} reconnect",
    )
    echo(
        "\nNext: `pgherald listen orders` in one terminal, `pgherald notify orders hi` in another;"
        "\nor `pgherald serve --allow-anonymous orders` and open http://127.0.0.1:8080/"
        "\n(no server of your own? `pgherald dev start` keeps an embedded one running for them)"
    )


def _durable_tour(
    conninfo: str,
    *,
    step: Callable[[str], None],
    show: Callable[..., None],
    style: Style,
    then: Callable[[], None],
) -> None:
    """The durable log's steps, then *then*; the demo's schema, events and group go after."""
    from .._consumer import Consumer
    from .._publish import publish as do_publish
    from .._schema import install, is_installed

    def take(consumer: Consumer, count: int) -> list[str]:
        seen: list[str] = []
        for e in consumer:
            seen.append(f"#{e.id} {e.channel} {json.dumps(e.payload)[:60]}")
            show("<- consumed", seen[-1], "green")
            if len(seen) == count:
                consumer.stop()  # ends the loop after this event, which is acknowledged
        return seen

    published: list[int] = []

    def publish(conn: psycopg.Connection[Any], *args: Any, **kwargs: Any) -> None:
        published.append(do_publish(conn, *args, **kwargs))

    with psycopg.connect(conninfo, autocommit=True) as conn:
        step("The durable event log: nothing is lost while a consumer is down")
        existed = is_installed(conn)
        applied = install(conn)
        show("..", f"pgherald install: {', '.join(applied) or 'already up to date'}")
        group = f"demo-{os.getpid()}"
        try:
            _durable_steps(conn, conninfo, group, publish, take, show)
            then()
        finally:
            _clean_up(conn, existed=existed, group=group, events=published, show=show)


def _clean_up(
    conn: psycopg.Connection[Any],
    *,
    existed: bool,
    group: str,
    events: list[int],
    show: Callable[..., None],
) -> None:
    """Leave the database as the demo found it: on a server of yours, nothing stays behind."""
    from .._schema import uninstall

    try:
        if not existed:
            uninstall(conn)
            show("..", "cleaned up: the demo installed pgherald's schema, and dropped it again")
            return
        with conn.transaction():
            conn.execute("DELETE FROM pgherald.events_v1 WHERE id = ANY(%s)", (events,))
            conn.execute("DELETE FROM pgherald.positions_v2 WHERE group_name = %s", (group,))
        show("..", f"cleaned up: the demo's {len(events)} events and group {group!r} removed")
    except psycopg.Error as exc:
        show("..", f"could not clean up ({' '.join(str(exc).split())}); group {group!r} stays")


def _durable_steps(
    conn: psycopg.Connection[Any],
    conninfo: str,
    group: str,
    publish: Callable[..., None],
    take: Callable[..., list[str]],
    show: Callable[..., None],
) -> None:
    from .._consumer import Consumer

    consumer = Consumer(
        conninfo, group=group, channels=["invoices"], start="now", poll_interval=0.1
    )
    with consumer:
        show("..", f"consumer group {group!r} holds partitions {consumer.partitions}")
        with conn.transaction():
            publish(conn, "invoices", {"invoice": 1, "total": 9.5}, key="alice")
        try:
            with conn.transaction():
                publish(conn, "invoices", {"invoice": 2, "total": 0})
                raise RuntimeError("rolled back")
        except RuntimeError:
            show("->", "published invoice 2 in a transaction that rolled back", "yellow")
        publish(conn, "invoices", {"invoice": 3, "total": 12.0}, key="bob")
        take(consumer, 2)
    show(
        "..",
        "consumer stopped; three events are published while it is down, one of "
        "them 20 KB (too big for NOTIFY)",
    )
    for n, payload in enumerate(
        [{"invoice": 4}, {"invoice": 5, "pdf": "x" * 20_000}, {"invoice": 6}], start=4
    ):
        publish(conn, "invoices", payload, key=f"customer-{n}")
    with Consumer(conninfo, group=group, channels=["invoices"], poll_interval=0.1) as again:
        show("..", "consumer restarted: it continues where its group left off")
        take(again, 3)


def _changes_tour(conninfo: str, *, step: Callable[[str], None], show: Callable[..., None]) -> None:
    from .._triggers import add_table_trigger, remove_table_trigger

    ident = psql.Identifier(f"Demo Orders {os.getpid()}")
    with psycopg.connect(conninfo, autocommit=True) as conn:

        def run(query: str, *params: object) -> None:
            conn.execute(psql.SQL(query).format(ident), params)

        table = ident.as_string(conn)
        step("Table changes as events: a trigger pgherald generates (no plpgsql to write)")
        run("CREATE TABLE {} (id int PRIMARY KEY, item text, qty int)")
        try:
            trigger = add_table_trigger(conn, table)
            show("..", f"pgherald trigger add {table}: events on channel {trigger.channel!r}")
            with Listener(conninfo, channels=[trigger.channel]) as listener:
                run("INSERT INTO {} VALUES (1, 'tea', 2), (2, 'cake', 1)")
                run("UPDATE {} SET qty = 3 WHERE id = 1")
                run("UPDATE {} SET qty = 3 WHERE id = 1")  # no change: no event
                run("UPDATE {} SET item = %s WHERE id = 2", "x" * 9000)  # too wide for NOTIFY
                run("DELETE FROM {} WHERE id = 1")
                for n in listener.notifications(timeout=1.0):
                    show("<- change", format_change(n), "green")
        finally:
            remove_table_trigger(conn, table)
            run("DROP TABLE {}")
