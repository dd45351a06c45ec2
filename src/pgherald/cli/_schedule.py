"""``pgherald schedule``: periodic events (add, list, remove) and the process that runs them."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import click

from .._schedule import (
    Schedule,
    Scheduler,
    add_schedule,
    delayed_pending,
    list_schedules,
    remove_schedule,
)
from ..errors import UsageError
from ._commands import cli, connection, dsn_option, friendly, json_option, stop_on_signals
from ._durable import require_schema

OVERDUE_AFTER = 60.0
"""Seconds past its due time after which `schedule list` says nothing is publishing a tick or
releasing delayed events (a running scheduler does it within a second; clocks may differ)."""


def overdue(due: datetime) -> float | None:
    """Seconds *due* is overdue by, past `OVERDUE_AFTER` (None: not overdue)."""
    late = (datetime.now(timezone.utc) - due).total_seconds()
    return late if late > OVERDUE_AFTER else None


def as_dict(s: Schedule) -> dict[str, Any]:
    return {
        "name": s.name,
        "cron": s.cron,
        "timezone": s.timezone,
        "channel": s.channel,
        "key": s.key,
        "payload": s.payload,
        "headers": s.headers,
        "next_tick": s.next_tick.isoformat(),
        "last_tick": s.last_tick.isoformat() if s.last_tick else None,
        "overdue_seconds": overdue(s.next_tick),
    }


@cli.group("schedule")
def schedule_cmd() -> None:
    """Periodic events: publish on a channel at every tick of a cron expression."""


@schedule_cmd.command("add")
@dsn_option
@click.option("--cron", required=True, help="Five fields: minute hour day month weekday.")
@click.option("--channel", required=True, help="The channel to publish on.")
@click.option("--payload", default="{}", show_default=True, help="The event's payload (JSON).")
@click.option("--key", default=None, help="The events' key (ordering within a group).")
@click.option("--timezone", "tz", default="UTC", show_default=True, help="The cron's time zone.")
@click.option("--replace", is_flag=True, help="Replace a schedule of the same name.")
@click.argument("name")
@friendly
def add_cmd(
    dsn: str | None,
    cron: str,
    channel: str,
    payload: str,
    key: str | None,
    tz: str,
    replace: bool,
    name: str,
) -> None:
    """Publish --payload on --channel at every tick of --cron, as schedule NAME.

    Each tick is published once however many `pgherald schedule run` processes run; nothing
    is published unless one runs.
    """
    try:
        value = json.loads(payload)
    except ValueError as exc:
        raise UsageError(
            f"--payload is not JSON ({exc}): for a string, quote it: '\"text\"'"
        ) from None
    with connection(dsn) as conn:
        require_schema(conn)
        s = add_schedule(conn, name, cron, channel, value, key=key, timezone=tz, replace=replace)
    click.echo(f"schedule {s.name!r} added: next tick {s.next_tick.isoformat()}")


@schedule_cmd.command("list")
@dsn_option
@json_option("One JSON object per schedule.")
@friendly
def list_cmd(dsn: str | None, as_json: bool) -> None:
    """List schedules and their next tick; and delayed events waiting, if any."""
    with connection(dsn) as conn:
        require_schema(conn)
        found = list_schedules(conn)
        waiting, first_due = delayed_pending(conn)
    if as_json:
        for s in found:
            click.echo(json.dumps(as_dict(s)))
    else:
        if not found:
            click.echo("no schedules")
        for s in found:
            last = s.last_tick.isoformat() if s.last_tick else "never"
            click.echo(
                f"{s.name}: '{s.cron}' ({s.timezone}) -> {s.channel}, next "
                f"{s.next_tick.isoformat()}, last {last}"
            )
        if waiting and first_due is not None:
            click.echo(f"{waiting:,} delayed events waiting, the first due {first_due.isoformat()}")
    # On stderr, in both formats: a schedule added with nothing running it is the usual slip.
    for s in found:
        if (late := overdue(s.next_tick)) is not None:
            warn(
                f"schedule {s.name!r} is {_span(late)} overdue: ticks are published only while "
                "a scheduler runs (`pgherald schedule run`, or pgherald.Scheduler)"
            )
    if waiting and first_due is not None and (late := overdue(first_due)) is not None:
        warn(
            f"delayed events are {_span(late)} overdue: they are released by running consumers "
            "of any group, or by `pgherald schedule run`; none is running"
        )


def warn(message: str) -> None:
    click.echo(f"pgherald: warning: {message}", err=True)


def _span(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


@schedule_cmd.command("remove")
@dsn_option
@click.argument("name")
@friendly
def remove_cmd(dsn: str | None, name: str) -> None:
    """Remove schedule NAME."""
    with connection(dsn) as conn:
        require_schema(conn)
        if not remove_schedule(conn, name):
            raise UsageError(f"no schedule named {name!r}: see `pgherald schedule list`")
    click.echo(f"schedule {name!r} removed")


@schedule_cmd.command("run")
@dsn_option
@friendly
def run_cmd(dsn: str | None) -> None:
    """Publish schedules' ticks and release due delayed events, until Ctrl-C or SIGTERM.

    Run one or more (each tick and delayed event goes out once). Consumers release delayed
    events by themselves: this is for ticks, and for delayed events with no consumer running.
    """
    with connection(dsn) as conn:  # fails in one line now, not in the retry loop
        require_schema(conn)
    scheduler = Scheduler(dsn)
    click.echo("pgherald: running schedules (Ctrl-C to stop)", err=True)
    with stop_on_signals(scheduler.stop):
        scheduler.run()
