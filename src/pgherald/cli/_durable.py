"""Commands of the durable log: install, uninstall, sql, publish, consume, status, prune,
maintain, retention."""

from __future__ import annotations

import json
import re
import sys
from datetime import datetime, timedelta, timezone
from typing import Any

import click
import psycopg

from .._checks import MAX_AGE, MAX_AGE_TEXT
from .._consumer import Consumer, Start
from .._dead import dead_letter_counts
from .._groups import RelayInfo, abandoned_groups, list_groups, log_size
from .._maintain import maintain, partition_count, repartition, retention, set_retention
from .._protocol.channels import check_channel
from .._publish import publish as do_publish
from .._schema import MISSING, install, install_sql, is_installed, uninstall, uninstall_sql
from ..errors import SchemaMissing, UsageError
from ..sql import query
from ._commands import (
    cli,
    confirm_destructive,
    connection,
    dsn_option,
    friendly,
    json_option,
    read_stdin,
    stop_on_signals,
)


def require_schema(conn: psycopg.Connection[Any]) -> None:
    if not is_installed(conn):
        raise SchemaMissing(MISSING)


@cli.command("install")
@dsn_option
@click.option(
    "--retention",
    "keep",
    default=None,
    help="Keep events this long (30s, 15m, 12h, 7d, 2w), then `maintain` drops them by the "
    "day; default: forever (see `pgherald retention`).",
)
@click.option(
    "--partitions",
    type=click.IntRange(1, 256),
    default=None,
    help="Spread the log over this many partitions (default 16): a consumer group has up to "
    "that many members at work.",
)
@friendly
def install_cmd(dsn: str | None, keep: str | None, partitions: int | None) -> None:
    """Create pgherald's schema (event log), or upgrade it; safe to run again."""
    age = None if keep is None else parse_age(keep, "--retention")
    with connection(dsn) as conn:
        if partitions is not None and is_installed(conn) and partition_count(conn) != partitions:
            raise UsageError(
                "the log already has another partition count: change it with "
                f"`pgherald partitions {partitions}` (it rewrites the log)"
            )
        applied = install(conn, partitions=partitions)
        if age is not None:
            set_retention(conn, age)
    click.echo(f"installed: {', '.join(applied)}" if applied else "already up to date")
    if age is not None:
        click.echo(f"retention: {keep}")


@cli.command("uninstall")
@dsn_option
@click.option(
    "--yes", is_flag=True, help="Confirm: needed when stdin is not a terminal (scripts, CI)."
)
@friendly
def uninstall_cmd(dsn: str | None, yes: bool) -> None:
    """Drop pgherald's schema, with every stored event and consumer position.

    Asks first on a terminal; without one it refuses (exit status 2) unless --yes is given.
    """
    confirm_destructive(
        "Drop the pgherald schema with every event and consumer position in it?",
        yes=yes,
        what="drop the pgherald schema with every stored event and consumer position",
    )
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
        payload = read_stdin()
    try:
        value = json.loads(payload)
    except ValueError as exc:
        raise UsageError(
            f"PAYLOAD is not JSON ({exc}); quote text as a JSON string, e.g. '\"hello\"'"
        ) from None
    except RecursionError:
        raise UsageError(_TOO_DEEP) from None
    with connection(dsn) as conn:
        try:
            event_id = do_publish(conn, channel, value, key=key)
        except RecursionError:
            raise UsageError(_TOO_DEEP) from None
    click.echo(event_id)


_TOO_DEEP = (
    "PAYLOAD is JSON nested too deeply to encode (Python's limit is about 1,000 levels): flatten it"
)


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
            click.echo(line, file=out)  # strips the colours unless out is a terminal
            out.flush()


@cli.command("status")
@dsn_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--channel",
    "channels",
    multiple=True,
    help="Count lag on this channel only (repeat for more); default: every channel.",
)
@friendly
def status_cmd(dsn: str | None, as_json: bool, channels: tuple[str, ...]) -> None:
    """Each consumer group's position and lag, each relay's rate, the NOTIFY queue usage.

    A group's lag counts every channel's events after its position unless --channel is
    given. "~" marks an estimate: large counts are not made event by event, so this answers
    quickly at any lag. A relay (`pgherald relay`) reports its events/s and lag every 10 s.
    """
    for channel in channels:
        check_channel(channel)
    with connection(dsn) as conn:
        require_schema(conn)
        groups = list_groups(conn, channels=channels or None)
        usage, events, events_estimated, last_id = log_size(conn)
        dead = dead_letter_counts(conn)
    report: dict[str, Any] = {
        "notify_queue_usage": usage,
        "events": events,
        "events_estimated": events_estimated,
        "last_event_id": last_id,
        "groups": [
            {
                "group": g.name,
                "members": len(g.members),
                "lag_events": g.lag_events,
                "lag_estimated": g.lag_estimated,
                "lag_seconds": g.lag_seconds,
                "position": g.position,
                "updated_at": g.last_activity.isoformat(),
                "dead_letters": dead.get(g.name, (0, 0))[0],
                "relays": [relay_json(r) for r in g.relays],
            }
            for g in groups
        ],
    }
    if as_json:
        click.echo(json.dumps(report))
        return
    stored = f"~{events:,}" if events_estimated else str(events)
    click.echo(f"events stored: {stored} (last id {last_id}); NOTIFY queue {usage:.2%} full")
    if not groups:
        click.echo("no consumer groups yet")
    for g in report["groups"]:
        lag = f"~{g['lag_events']:,}" if g["lag_estimated"] else str(g["lag_events"])
        click.echo(
            f"group {g['group']!r}: {lag} events behind "
            f"({g['lag_seconds']:.1f}s), position {g['position']}, "
            f"{g['members']} live member{'' if g['members'] == 1 else 's'}"
            + (f", {g['dead_letters']} dead letters" if g["dead_letters"] else "")
        )
        for r in g["relays"]:
            click.echo(describe_relay(r))


def relay_json(r: RelayInfo) -> dict[str, Any]:
    return {
        "target": r.target,
        "host": r.host,
        "pid": r.pid,
        "live": r.live,
        "rate": r.rate,
        "lag_seconds": r.lag_seconds,
        "relayed": r.relayed,
        "dead_lettered": r.dead_lettered,
        "retries": r.retries,
        "partitions": r.partitions,
        "channels": list(r.channels),
        "backend_pid": r.backend_pid,
        "started_at": r.started_at.isoformat(),
        "reported_at": r.reported_at.isoformat(),
        "interval": r.interval,
    }


def describe_relay(r: dict[str, Any]) -> str:
    where = f"  relay {r['host']}:{r['pid']} -> {r['target']}: "
    if not r["live"]:
        age = datetime.now(timezone.utc) - datetime.fromisoformat(r["reported_at"])
        return where + (
            f"stale: no report for {max(age.total_seconds(), 0):.0f}s (killed, or its session gone)"
        )
    return where + (
        f"{r['rate']:,.1f} events/s, lag {r['lag_seconds']:.1f}s, {r['relayed']:,} relayed, "
        f"{r['partitions']} partition{'' if r['partitions'] == 1 else 's'}"
        + (f", {r['dead_lettered']} dead-lettered" if r["dead_lettered"] else "")
    )


_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")


def parse_age(text: str, option: str, *, zero: bool = False) -> timedelta:
    """*text* (30s, 15m, 12h, 7d, 2w) as a timedelta: above 0 (or 0 with *zero*), at most
    `MAX_AGE` (100 years); else a usage error (exit status 2) naming *option*."""
    m = _AGE.match(text)
    if not m:
        raise click.BadParameter(
            "use a number and a unit: 30s, 15m, 12h, 7d, 2w", param_hint=f"'{option}'"
        )
    seconds = float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
    if not seconds <= MAX_AGE.total_seconds():  # inf too: a timedelta would overflow
        raise click.BadParameter(
            f"{text} is too long: at most {MAX_AGE_TEXT}, such as 30d or 52w",
            param_hint=f"'{option}'",
        )
    age = timedelta(seconds=seconds)
    if not zero and age <= timedelta(0):
        raise click.BadParameter(
            f"{text} is not above 0: give an age such as 30s or 7d", param_hint=f"'{option}'"
        )
    return age


@cli.command("prune")
@dsn_option
@click.option(
    "--older-than",
    default="7d",
    show_default=True,
    help="Age of the events to delete: 30s, 15m, 12h, 7d, 2w.",
)
@click.option(
    "--abandoned-after",
    default=None,
    help="Stop waiting for a group with no live member and no activity for this long "
    "(30s, 15m, 12h, 7d, 2w): it is named, then its unconsumed events are pruned too. "
    "Default: wait for every group.",
)
@click.option("--force", is_flag=True, help="Also delete events some group has not consumed.")
@click.option(
    "--yes",
    is_flag=True,
    help="Confirm --force: needed when stdin is not a terminal (scripts, CI).",
)
@friendly
def prune_cmd(
    dsn: str | None, older_than: str, abandoned_after: str | None, force: bool, yes: bool
) -> None:
    """Delete old events that every consumer group has already consumed.

    --abandoned-after stops waiting for groups that nobody consumes any more (each is named
    on stderr first). --force deletes unconsumed events too: it asks first on a terminal,
    and without one it refuses (exit status 2) unless --yes is given.
    """
    age = parse_age(older_than, "--older-than", zero=True)
    idle = (
        None
        if abandoned_after is None
        else parse_age(abandoned_after, "--abandoned-after", zero=True)
    )
    if force:
        confirm_destructive(
            f"Delete every event older than {older_than}, even those a group has not consumed?",
            yes=yes,
            what="delete events that a consumer group has not consumed yet (--force)",
        )
    with connection(dsn) as conn:
        require_schema(conn)
        before = conn.execute("SELECT now() - %s::interval", (age,)).fetchone()[0]  # type: ignore[index]
        ignore = [] if idle is None or force else abandoned_groups(conn, idle)
        for group, last in ignore:
            click.echo(
                f"pgherald: warning: consumer group {group!r} has no live member and no "
                f"activity since {last:%Y-%m-%d %H:%M:%S%z} (over {abandoned_after}): "
                "pruning its unconsumed events too; `pgherald groups delete` removes it",
                err=True,
            )
        params = {"before": before, "force": force, "ignore": [g for g, _ in ignore]}
        deleted = conn.execute(query("prune"), params).rowcount
    click.echo(f"deleted {deleted} events older than {older_than}")


@cli.command("maintain")
@dsn_option
@json_option("One JSON object per action: action, target, detail.")
@friendly
def maintain_cmd(dsn: str | None, as_json: bool) -> None:
    """Create the log's next days' partitions; drop days past retention (cron-friendly).

    Days a consumer group has not consumed yet are kept and named on stderr ("pinned"), unless
    the group has had no member and no acknowledgement for abandon_after (see `pgherald
    retention`). Consumers run this on their own once an hour; run it from cron when none
    runs. Exit status 0 whatever it found.
    """
    with connection(dsn) as conn:
        require_schema(conn)
        done = maintain(conn)
    for m in done:
        if as_json:
            click.echo(json.dumps({"action": m.action, "target": m.target, "detail": m.detail}))
        elif m.warning:
            click.echo(f"pgherald: warning: {m.action} {m.target}: {m.detail}", err=True)
        else:
            click.echo(f"{m.action} {m.target}: {m.detail}")
    if not done and not as_json:
        click.echo("nothing to do")


@cli.group("retention", invoke_without_command=True)
@dsn_option
@click.pass_context
@friendly
def retention_cmd(ctx: click.Context, dsn: str | None) -> None:
    """Show how long the log keeps events (`retention set 7d` / `retention off` change it)."""
    if ctx.invoked_subcommand is not None:
        return
    with connection(dsn) as conn:
        require_schema(conn)
        r = retention(conn)
    click.echo(f"retention: {_human(r.keep) if r.keep else 'forever (none set)'}")
    for channel, keep in r.channels.items():
        click.echo(f"retention of {channel!r}: {_human(keep)}")
    click.echo(f"abandon after: {_human(r.abandon_after)}")


@retention_cmd.command("set")
@dsn_option
@click.argument("keep")
@click.option(
    "--abandon-after",
    default=None,
    help="A group with no member and no acknowledgement for this long (30s ... 2w) no longer "
    "holds back retention (default 7d).",
)
@click.option(
    "--channel",
    default=None,
    help="This channel's own retention: longer than the log's, it keeps the days holding its "
    "events; shorter, its older events are deleted by row.",
)
@friendly
def retention_set_cmd(
    dsn: str | None, keep: str, abandon_after: str | None, channel: str | None
) -> None:
    """Keep events for KEEP (30s, 15m, 12h, 7d, 2w; at most 100 years); `maintain` drops
    older days."""
    age = parse_age(keep, "KEEP")
    idle = None if abandon_after is None else parse_age(abandon_after, "--abandon-after")
    if channel is not None:
        check_channel(channel)
    with connection(dsn) as conn:
        require_schema(conn)
        set_retention(conn, age, channel=channel, abandon_after=idle)
    what = "retention" if channel is None else f"retention of {channel!r}"
    click.echo(f"{what}: {keep} (applied by the next `pgherald maintain`)")


@retention_cmd.command("off")
@dsn_option
@click.option("--channel", default=None, help="Drop this channel's own retention only.")
@friendly
def retention_off_cmd(dsn: str | None, channel: str | None) -> None:
    """Keep events forever (`prune` can still delete consumed ones)."""
    with connection(dsn) as conn:
        require_schema(conn)
        set_retention(conn, None, channel=channel)
    click.echo("retention: forever" if channel is None else f"retention of {channel!r}: the log's")


def _human(age: timedelta) -> str:
    seconds = age.total_seconds()
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


@cli.command("partitions")
@dsn_option
@click.argument("count", type=click.IntRange(1, 256), required=False)
@click.option(
    "--yes", is_flag=True, help="Confirm: needed when stdin is not a terminal (scripts, CI)."
)
@friendly
def partitions_cmd(dsn: str | None, count: int | None, yes: bool) -> None:
    """Show the log's partition count, or change it to COUNT (1 to 256).

    A consumer group has up to that many members at work. Changing it rewrites the log in one
    transaction (publishers wait) and needs every consumer stopped; events some partition of a
    group had passed may be delivered again, none is skipped. Asks first on a terminal;
    without one it refuses (exit status 2) unless --yes is given.
    """
    with connection(dsn) as conn:
        require_schema(conn)
        current = partition_count(conn)
        if count is None or count == current:
            click.echo(f"partitions: {current}")
            return
        confirm_destructive(
            f"Rewrite the log from {current} to {count} partitions (consumers must be stopped)?",
            yes=yes,
            what=f"rewrite the log from {current} to {count} partitions",
        )
        repartition(conn, count)
    click.echo(f"partitions: {count} (was {current})")
