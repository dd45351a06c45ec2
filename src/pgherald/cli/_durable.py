"""Commands of the durable log: install, uninstall, sql, publish, consume, status, prune."""

from __future__ import annotations

import json
import re
import sys
from datetime import datetime, timedelta, timezone
from typing import Any

import click
import psycopg

from .._consumer import Consumer
from .._consumer_core import Start
from .._publish import publish as do_publish
from .._schema import MISSING, install, install_sql, is_installed, uninstall, uninstall_sql
from ..errors import SchemaMissing, UsageError
from ..sql import query
from ._commands import cli, connection, dsn_option, friendly, json_option, stop_on_signals


def require_schema(conn: psycopg.Connection[Any]) -> None:
    if not is_installed(conn):
        raise SchemaMissing(MISSING)


@cli.command("install")
@dsn_option
@friendly
def install_cmd(dsn: str | None) -> None:
    """Create pgherald's schema (event log), or upgrade it; safe to run again."""
    with connection(dsn) as conn:
        applied = install(conn)
    click.echo(f"installed: {', '.join(applied)}" if applied else "already up to date")


@cli.command("uninstall")
@dsn_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@friendly
def uninstall_cmd(dsn: str | None, yes: bool) -> None:
    """Drop pgherald's schema, with every stored event and consumer position."""
    if not yes and sys.stdin.isatty():
        click.confirm("Drop the pgherald schema and every event in it?", abort=True)
    with connection(dsn) as conn:
        uninstall(conn)
    click.echo("uninstalled")


@cli.group("sql")
def sql_cmd() -> None:
    """Print pgherald's DDL without connecting (for your own migration tool)."""


@sql_cmd.command("install")
def sql_install() -> None:
    """The DDL of `pgherald install` on an empty database."""
    click.echo(install_sql(), nl=False)


@sql_cmd.command("uninstall")
def sql_uninstall() -> None:
    """The DDL of `pgherald uninstall`."""
    click.echo(uninstall_sql(), nl=False)


@cli.command("publish")
@dsn_option
@click.option("--key", default=None, help="Events with the same key stay in order.")
@click.argument("channel")
@click.argument("payload")
@friendly
def publish_cmd(dsn: str | None, key: str | None, channel: str, payload: str) -> None:
    """Store PAYLOAD (a JSON value; '-' reads stdin) on CHANNEL; print the event id."""
    if payload == "-":
        payload = sys.stdin.read()
    try:
        value = json.loads(payload)
    except ValueError as exc:
        raise UsageError(
            f"PAYLOAD is not JSON ({exc}); quote text as a JSON string, e.g. '\"hello\"'"
        ) from None
    with connection(dsn) as conn:
        event_id = do_publish(conn, channel, value, key=key)
    click.echo(event_id)


def parse_start(text: str) -> Start:
    if text in {"beginning", "now"}:
        return text
    if text.isdigit():
        return int(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(
            "use 'beginning', 'now', an event id or an ISO timestamp (2026-11-25T08:00:00Z)"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


@cli.command("consume")
@dsn_option
@click.option(
    "--group",
    required=True,
    envvar="PGHERALD_GROUP",
    show_envvar=True,
    help="Consumer group: its position is kept in the database.",
)
@click.option(
    "--from",
    "start",
    default="beginning",
    show_default=True,
    help="Where a new group starts: beginning, now, an event id or an ISO timestamp.",
)
@json_option("One JSON object per line: id, channel, payload, key, created_at.")
@click.argument("channels", nargs=-1, required=True)
@friendly
def consume_cmd(
    dsn: str | None, group: str, start: str, as_json: bool, channels: tuple[str, ...]
) -> None:
    """Print the group's events on CHANNELS, then new ones as they come, until Ctrl-C/SIGTERM.

    The group's position advances only after an event's line is written.
    """
    out = sys.stdout
    consumer = Consumer(dsn, group=group, channels=list(channels), start=parse_start(start))
    with consumer, stop_on_signals(consumer.stop):
        for e in consumer:
            if as_json:
                line = json.dumps(
                    {
                        "id": e.id,
                        "channel": e.channel,
                        "payload": e.payload,
                        "key": e.key,
                        "created_at": e.created_at.isoformat(),
                    }
                )
            else:
                line = (
                    f"{click.style(str(e.id), dim=True)} "
                    f"{click.style(e.channel, fg='cyan', bold=True)} "
                    f"{json.dumps(e.payload)}" + (f" (key {e.key})" if e.key else "")
                )
            out.write(line + "\n")
            out.flush()


@cli.command("status")
@dsn_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@friendly
def status_cmd(dsn: str | None, as_json: bool) -> None:
    """Each consumer group's position and lag, and the NOTIFY queue usage."""
    with connection(dsn) as conn:
        require_schema(conn)
        groups = conn.execute(query("status")).fetchall()
        usage, events, last_id = conn.execute(query("queue_usage")).fetchone()  # type: ignore[misc]
    report: dict[str, Any] = {
        "notify_queue_usage": usage,
        "events": events,
        "last_event_id": last_id,
        "groups": [
            {
                "group": g,
                "lag_events": lag,
                "lag_seconds": float(secs or 0),
                "position": pos,
                "updated_at": upd.isoformat(),
            }
            for g, lag, secs, upd, pos in groups
        ],
    }
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(f"events stored: {events} (last id {last_id}); NOTIFY queue {usage:.2%} full")
    if not groups:
        click.echo("no consumer groups yet")
    for g in report["groups"]:
        click.echo(
            f"group {g['group']!r}: {g['lag_events']} events behind "
            f"({g['lag_seconds']:.1f}s), position {g['position']}"
        )


_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")


def parse_age(text: str) -> timedelta:
    m = _AGE.match(text)
    if not m:
        raise click.BadParameter("use a number and a unit: 30s, 15m, 12h, 7d, 2w")
    seconds = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
    return timedelta(seconds=float(m.group(1)) * seconds)


@cli.command("prune")
@dsn_option
@click.option(
    "--older-than",
    default="7d",
    show_default=True,
    help="Age of the events to delete: 30s, 15m, 12h, 7d, 2w.",
)
@click.option("--force", is_flag=True, help="Also delete events some group has not consumed.")
@friendly
def prune_cmd(dsn: str | None, older_than: str, force: bool) -> None:
    """Delete old events that every consumer group has already consumed."""
    age = parse_age(older_than)
    with connection(dsn) as conn:
        require_schema(conn)
        before = conn.execute("SELECT now() - %s::interval", (age,)).fetchone()[0]  # type: ignore[index]
        deleted = conn.execute(query("prune"), {"before": before, "force": force}).rowcount
    click.echo(f"deleted {deleted} events older than {older_than}")
