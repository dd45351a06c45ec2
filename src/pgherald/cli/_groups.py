"""``pgherald groups``: list consumer groups, reset or delete one."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import click

from .._groups import GroupInfo, GroupMember, delete_group, list_groups, reset_group
from .._protocol.channels import check_channel
from ._commands import cli, confirm_destructive, connection, dsn_option, friendly, json_option
from ._durable import parse_start, require_schema


@cli.group("groups", invoke_without_command=True)
@dsn_option
@json_option("One JSON object per group.")
@click.option(
    "--channel",
    "channels",
    multiple=True,
    help="Count lag on this channel only (repeat for more); default: every channel.",
)
@click.pass_context
@friendly
def groups_cmd(
    ctx: click.Context, dsn: str | None, as_json: bool, channels: tuple[str, ...]
) -> None:
    """List consumer groups: live members, partitions held, lag per channel, last activity.

    Lag counts every channel's events after the group's position unless --channel is given.
    "~" marks an estimate: a group far behind is not counted event by event.
    """
    if ctx.invoked_subcommand is not None:
        return
    for channel in channels:
        check_channel(channel)
    with connection(dsn) as conn:
        require_schema(conn)
        groups = list_groups(conn, channels=channels or None)
    if as_json:
        for g in groups:
            click.echo(json.dumps(group_json(g)))
        return
    if not groups:
        click.echo("no consumer groups yet")
    for g in groups:
        click.echo(describe(g))


def group_json(g: GroupInfo) -> dict[str, Any]:
    return {
        "group": g.name,
        "members": [
            {
                "pid": m.pid,
                "application_name": m.application_name,
                "client_addr": m.client_addr,
                "connected_at": m.connected_at.isoformat() if m.connected_at else None,
                "partitions": list(m.partitions),
            }
            for m in g.members
        ],
        "lag_events": g.lag_events,
        "lag_estimated": g.lag_estimated,
        "lag_by_channel": g.lag_by_channel,
        "lag_seconds": g.lag_seconds,
        "last_activity": g.last_activity.isoformat(),
        "position": g.position,
    }


def count(n: int, estimated: bool) -> str:
    return f"~{n:,}" if estimated else f"{n:,}"


def describe(g: GroupInfo) -> str:
    members = f"{len(g.members)} live member{'s' if len(g.members) != 1 else ''}"
    lines = [
        f"group {g.name!r}: {members}, {count(g.lag_events, g.lag_estimated)} events behind "
        f"({g.lag_seconds:.1f}s), last activity {_ago(g.last_activity)}, position {g.position}"
    ]
    lines += [f"  {_member(m)}" for m in g.members]
    if g.lag_by_channel:
        lines.append(
            "  lag: "
            + ", ".join(f"{ch} {count(n, g.lag_estimated)}" for ch, n in g.lag_by_channel.items())
        )
    return "\n".join(lines)


def _member(m: GroupMember) -> str:
    who = ", ".join(x for x in (m.application_name, m.client_addr or "local") if x)
    held = ", ".join(map(str, m.partitions)) or "none yet"
    return f"pid {m.pid} ({who}): partitions {held}"


def _ago(when: datetime) -> str:
    secs = max(0.0, (datetime.now(timezone.utc) - when).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{when:%Y-%m-%d %H:%M:%S%z} ({secs / size:.0f}{unit} ago)"
    return f"{when:%Y-%m-%d %H:%M:%S%z} ({secs:.0f}s ago)"


_YES = click.option(
    "--yes", is_flag=True, help="Confirm: needed when stdin is not a terminal (scripts, CI)."
)


@groups_cmd.command("reset")
@dsn_option
@click.option(
    "--to",
    "to",
    required=True,
    help="Where the group starts again: beginning, now, an event id (delivered again) or an "
    "ISO timestamp.",
)
@_YES
@click.argument("group")
@friendly
def reset_cmd(dsn: str | None, to: str, yes: bool, group: str) -> None:
    """Move GROUP's position to --to, in every partition.

    Refused while the group has live members: stop its consumers first. Asks first on a
    terminal; without one it refuses (exit status 2) unless --yes is given.
    """
    start = parse_start(to)
    confirm_destructive(
        f"Move consumer group {group!r} to {to}?",
        yes=yes,
        what=f"move consumer group {group!r} to {to}",
    )
    with connection(dsn) as conn:
        require_schema(conn)
        reset_group(conn, group, to=start)
    click.echo(f"group {group!r} reset to {to}")


@groups_cmd.command("delete")
@dsn_option
@_YES
@click.argument("group")
@friendly
def delete_cmd(dsn: str | None, yes: bool, group: str) -> None:
    """Delete GROUP's positions: it no longer holds back `prune`.

    Refused while the group has live members: stop its consumers first. Asks first on a
    terminal; without one it refuses (exit status 2) unless --yes is given.
    """
    confirm_destructive(
        f"Delete consumer group {group!r} and its positions?",
        yes=yes,
        what=f"delete consumer group {group!r}",
    )
    with connection(dsn) as conn:
        require_schema(conn)
        delete_group(conn, group)
    click.echo(f"group {group!r} deleted")
