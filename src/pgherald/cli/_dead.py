"""``pgherald dead``: list, show, redeliver and purge dead letters (events a group gave up on)."""

from __future__ import annotations

import json
from typing import Any

import click

from .._checks import INT8_MAX
from .._dead import (
    DeadLetter,
    dead_event_text,
    dead_letters,
    purge_dead_letters,
    redeliver,
)
from ..errors import UsageError
from ._commands import cli, confirm_destructive, connection, dsn_option, friendly, json_option
from ._durable import require_schema

EVENT_ID = click.IntRange(0, INT8_MAX)
"""An event id: PostgreSQL's bigint (a larger one is a usage error naming the argument)."""

EVENT_FIELDS = ("key", "payload_text", "headers_text")
"""What `dead show` reads from the event: None there is "gone" once the event left the log."""


def as_dict(d: DeadLetter) -> dict[str, Any]:
    return {
        "group": d.group,
        "event_id": d.event_id,
        "channel": d.channel,
        "partition": d.partition,
        "key": d.key,
        "error": d.error,
        "attempts": d.attempts,
        "first_failed_at": d.first_failed_at.isoformat(),
        "last_failed_at": d.last_failed_at.isoformat(),
        "dead_at": d.dead_at.isoformat(),
        "redeliver_pending": d.redeliver_at is not None,
        "redeliveries": d.redeliveries,
        "in_log": d.in_log,
    }


def _targets(ids: tuple[int, ...], every: bool, verb: str) -> list[int] | None:
    """IDS, or None for --all; one of the two is needed (never all by accident)."""
    if ids and every:
        raise click.UsageError(f"give event IDS or --all, not both, to {verb}")
    if not ids and not every:
        raise click.UsageError(f"say which dead letters to {verb}: event IDS, or --all")
    return None if every else list(ids)


@cli.group("dead")
def dead_cmd() -> None:
    """Dead letters: events a consumer group gave up on (undecodable, or a handler kept failing)."""


@dead_cmd.command("list")
@dsn_option
@click.option("--group", default=None, help="Only this consumer group's (default: every group).")
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(min=1))
@json_option("One JSON object per line: group, event_id, channel, error, attempts, ...")
@friendly
def list_cmd(dsn: str | None, group: str | None, limit: int, as_json: bool) -> None:
    """List dead letters, oldest first within each group."""
    with connection(dsn) as conn:
        require_schema(conn)
        found = dead_letters(conn, group, limit=limit)
    if as_json:
        for d in found:
            click.echo(json.dumps(as_dict(d)))
        return
    if not found:
        click.echo("no dead letters" + (f" in group {group!r}" if group else ""))
    for d in found:
        state = " (redelivery pending)" if d.redeliver_at is not None else ""
        gone = " (no longer in the log)" if not d.in_log else ""
        click.echo(
            f"{d.group} {d.event_id} {d.channel}: {d.attempts} attempts, dead since "
            f"{d.dead_at.isoformat(timespec='seconds')}{state}{gone}: {d.error}"
        )


@dead_cmd.command("show")
@dsn_option
@click.argument("group")
@click.argument("event_id", type=EVENT_ID)
@json_option("One JSON object: the dead letter, with the event's payload and headers as text.")
@friendly
def show_cmd(dsn: str | None, group: str, event_id: int, as_json: bool) -> None:
    """Show GROUP's dead letter of event EVENT_ID, with the stored event (JSON text as stored)."""
    with connection(dsn) as conn:
        require_schema(conn)
        found = dead_letters(conn, group, ids=[event_id], limit=1)
        if not found:
            raise UsageError(
                f"group {group!r} has no dead letter for event {event_id}: see `pgherald dead list`"
            )
        stored = dead_event_text(conn, event_id)
    report = as_dict(found[0])
    report["payload_text"], report["headers_text"] = stored if stored else (None, None)
    if as_json:
        click.echo(json.dumps(report))
        return
    for name, value in report.items():
        if value is None:
            gone = name in EVENT_FIELDS and not report["in_log"]
            value = "(not in the log any more)" if gone else "(none)"
        click.echo(f"{name}: {value}")


@dead_cmd.command("redeliver")
@dsn_option
@click.argument("group")
@click.argument("ids", nargs=-1, type=EVENT_ID)
@click.option("--all", "every", is_flag=True, help="Every dead letter of GROUP.")
@json_option('One JSON object: {"group": ..., "redelivered": [ids]}.')
@friendly
def redeliver_cmd(
    dsn: str | None, group: str, ids: tuple[int, ...], every: bool, as_json: bool
) -> None:
    """Hand dead letters IDS (or --all) of GROUP to its consumers once more, in order.

    The group's running consumers take them within a second; each one is handled once, and its
    dead letter goes away (it comes back if the handler fails again).
    """
    targets = _targets(ids, every, "redeliver")
    with connection(dsn) as conn:
        require_schema(conn)
        queued = redeliver(conn, group, targets)
    if as_json:
        click.echo(json.dumps({"group": group, "redelivered": queued}))
        return
    missing = sorted(set(targets or ()) - set(queued))
    click.echo(f"queued {len(queued)} dead letters of group {group!r} for redelivery")
    if missing:
        click.echo(
            f"not queued (no dead letter, one already pending, or no longer in the log): "
            f"{' '.join(map(str, missing))}",
            err=True,
        )


@dead_cmd.command("purge")
@dsn_option
@click.argument("group")
@click.argument("ids", nargs=-1, type=EVENT_ID)
@click.option("--all", "every", is_flag=True, help="Every dead letter of GROUP.")
@click.option(
    "--yes", is_flag=True, help="Confirm: needed when stdin is not a terminal (scripts, CI)."
)
@json_option('One JSON object: {"group": ..., "purged": count}.')
@friendly
def purge_cmd(
    dsn: str | None, group: str, ids: tuple[int, ...], every: bool, yes: bool, as_json: bool
) -> None:
    """Delete dead letters IDS (or --all) of GROUP for good: they can no longer be redelivered.

    Asks first on a terminal; without one it refuses (exit status 2) unless --yes is given.
    """
    targets = _targets(ids, every, "purge")
    which = "every dead letter" if targets is None else f"{len(targets)} dead letters"
    confirm_destructive(
        f"Delete {which} of group {group!r} for good?",
        yes=yes,
        what=f"delete {which} of group {group!r}",
    )
    with connection(dsn) as conn:
        require_schema(conn)
        purged = purge_dead_letters(conn, group, targets)
    if as_json:
        click.echo(json.dumps({"group": group, "purged": purged}))
        return
    click.echo(f"purged {purged} dead letters of group {group!r}")
