"""Commands for change events: trigger add|list|remove, ddl enable|disable, watch, sql trigger."""

from __future__ import annotations

import json
import shlex
import sys
from typing import Any

import click

from .._listener import Listener
from .._triggers import (
    DDL_CHANNEL,
    EVENTS,
    SHARED_FUNCTION,
    TableTrigger,
    add_table_trigger,
    disable_ddl_events,
    enable_ddl_events,
    list_table_triggers,
    remove_table_trigger,
    resolve_table,
    trigger_sql,
)
from ..errors import UsageError
from ._commands import (
    cli,
    connection,
    dsn_option,
    friendly,
    json_option,
    stop_on_signals,
)
from ._durable import sql_cmd
from ._format import cdc_line, format_change, format_event


def _split(text: str | None) -> list[str]:
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def trigger_options(func: Any) -> Any:
    func = click.option(
        "--key",
        default=None,
        help="Comma-separated columns whose values key each event, keeping one row's events "
        "in order within a consumer group (default: the primary key).",
    )(func)
    func = click.option(
        "--durable",
        is_flag=True,
        help="Store full events in the durable log (NOTIFY only wakes readers).",
    )(func)
    func = click.option(
        "--columns", default=None, help="Comma-separated columns to include (default: all)."
    )(func)
    func = click.option(
        "--events",
        default=",".join(EVENTS),
        show_default=True,
        help="Comma-separated: insert,update,delete,truncate.",
    )(func)
    return click.option(
        "--channel",
        default=None,
        help="Channel to send on (default: schema.table, e.g. public.orders).",
    )(func)


@cli.group("trigger")
def trigger_group() -> None:
    """Add, list and remove change-event triggers on tables."""


@trigger_group.command("add")
@dsn_option
@trigger_options
@click.argument("table")
@friendly
def trigger_add(
    dsn: str | None,
    table: str,
    channel: str | None,
    events: str,
    columns: str | None,
    durable: bool,
    key: str | None,
) -> None:
    """Send a JSON event for every change of TABLE (schema-qualified and quoted names work)."""
    with connection(dsn) as conn:
        t = add_table_trigger(
            conn,
            table,
            channel=channel,
            events=_split(events),
            columns=_split(columns),
            durable=durable,
            key_columns=None if key is None else _split(key),
        )
    where = "the durable log" if t.durable else "NOTIFY"
    click.echo(
        f"{t.schema}.{t.table}: {','.join(t.events)} -> channel {t.channel!r} via {where}; "
        + (f"key {','.join(t.key_columns)}" if t.key_columns else "no key")
    )
    if t.durable and not t.key_columns and key is None:
        click.echo(
            f"note: {t.schema}.{t.table} has no primary key, so its events have no key and a "
            "consumer group with several members may handle one row's changes out of order; "
            "pass --key col1,col2 to key them",
            err=True,
        )


@trigger_group.command("list")
@dsn_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per table.")
@friendly
def trigger_list(dsn: str | None, as_json: bool) -> None:
    """Tables with pgherald triggers and their options."""
    with connection(dsn) as conn:
        triggers = list_table_triggers(conn)
    for t in triggers:
        shared = t.function == f"pgherald.{SHARED_FUNCTION}"
        if as_json:
            # The generated function's name follows from the table: only the shared one of
            # triggers from earlier versions is shown, as "function".
            options = {k: v for k, v in t.__dict__.items() if k != "function"}
            click.echo(json.dumps(options | ({"function": t.function} if shared else {})))
        else:
            cols = ",".join(t.columns) or "all columns"
            key = f"key {','.join(t.key_columns)}" if t.key_columns else "no key"
            click.echo(
                f"{t.schema}.{t.table}: {','.join(t.events)}; {cols}; {key}; channel "
                f"{t.channel!r}{' (durable)' if t.durable else ''}"
                + (
                    f"; the shared {t.function}() of an earlier version: `pgherald trigger add "
                    "TABLE` again generates the table's own, faster function"
                    if shared
                    else ""
                )
            )
    if not triggers and not as_json:
        click.echo("no pgherald triggers")


@trigger_group.command("remove")
@dsn_option
@click.argument("table")
@friendly
def trigger_remove(dsn: str | None, table: str) -> None:
    """Remove pgherald's triggers from TABLE."""
    with connection(dsn) as conn:
        existed = remove_table_trigger(conn, table)
    click.echo("removed" if existed else f"{table} had no pgherald trigger")


@cli.group("ddl")
def ddl_group() -> None:
    """DDL event triggers: schema changes as JSON on channel 'pgherald_ddl' (superuser)."""


@ddl_group.command("enable")
@dsn_option
@friendly
def ddl_enable(dsn: str | None) -> None:
    """Send {command_tag, object_type, schema, object_identity} for every DDL command."""
    with connection(dsn) as conn:
        enable_ddl_events(conn)
    click.echo(f"DDL events enabled on channel {DDL_CHANNEL!r}")


@ddl_group.command("disable")
@dsn_option
@friendly
def ddl_disable(dsn: str | None) -> None:
    """Remove the DDL event triggers."""
    with connection(dsn) as conn:
        disable_ddl_events(conn)
    click.echo("DDL events disabled")


@sql_cmd.group("trigger")
def sql_trigger() -> None:
    """Print trigger DDL without connecting."""


@sql_trigger.command("add")
@trigger_options
@click.argument("table")
@friendly
def sql_trigger_add(
    table: str,
    channel: str | None,
    events: str,
    columns: str | None,
    durable: bool,
    key: str | None,
) -> None:
    """The DDL of `pgherald trigger add TABLE`: the table's generated function and its
    triggers (needs `pgherald install` applied first; without a connection the primary key
    and the columns are unknown: pass --key to key the events)."""
    click.echo(
        trigger_sql(
            table,
            channel=channel,
            events=_split(events),
            columns=_split(columns),
            durable=durable,
            key_columns=_split(key),
        ),
        nl=False,
    )


@cli.command("watch")
@dsn_option
@json_option("Print each change event as one JSON line.")
@click.option(
    "--temporary",
    is_flag=True,
    help="Add a trigger to tables that have none, and remove it on exit.",
)
@click.option("--yes", is_flag=True, help="Add missing triggers without asking (kept on exit).")
@click.option(
    "--cdc",
    "slot",
    metavar="SLOT",
    default=None,
    help="Read the changes from the WAL through the logical replication slot SLOT instead of "
    "triggers (see `pgherald cdc`): TABLES are added to its publication, and the slot and "
    "publication are created when missing. With --temporary, what this creates is dropped "
    "on exit.",
)
@click.argument("tables", nargs=-1, required=True)
@friendly
def watch(
    dsn: str | None,
    as_json: bool,
    temporary: bool,
    yes: bool,
    slot: str | None,
    tables: tuple[str, ...],
) -> None:
    """Live tail of row changes of TABLES, until Ctrl-C or SIGTERM."""
    if slot is not None:
        _watch_cdc(dsn, slot, tables, as_json=as_json, temporary=temporary)
        return
    with connection(dsn) as conn:
        existing = {(t.schema, t.table): t for t in list_table_triggers(conn)}
        channels: list[str] = []
        added: list[str] = []
        for table in tables:
            trigger = _find(conn, existing, table)
            if trigger is None:
                if not (temporary or yes) and not (
                    sys.stdin.isatty()
                    and click.confirm(f"{table} has no pgherald trigger. Add one?", default=True)
                ):
                    raise UsageError(
                        f"{table} has no pgherald trigger: run `pgherald trigger add "
                        f"{shlex.quote(table)}`, "
                        "or pass --temporary (removed on exit) or --yes"
                    )
                trigger = add_table_trigger(conn, table)
                if temporary:
                    added.append(table)
            if trigger.durable:
                raise UsageError(
                    f"{table}'s trigger is durable: read it with `pgherald consume "
                    f"--group NAME {shlex.quote(trigger.channel)}`"
                )
            channels.append(trigger.channel)
        try:
            listener = Listener(dsn, channels=channels)
            with stop_on_signals(listener.stop), listener:  # handler first: no SIGTERM race
                click.echo(f"watching {', '.join(tables)} (Ctrl-C to stop)", err=True)
                for n in listener:
                    click.echo(n.payload if as_json else format_change(n))
                    sys.stdout.flush()
        finally:
            for table in added:
                remove_table_trigger(conn, table)


def _watch_cdc(
    dsn: str | None, slot: str, tables: tuple[str, ...], *, as_json: bool, temporary: bool
) -> None:
    """`watch --cdc SLOT`: the changes of TABLES read from a logical replication slot."""
    from .._cdc import ChangeStream, check_logical, drop_created
    from .._protocol.pgoutput import dumps_value

    stream = ChangeStream(dsn, slot=slot, tables=tables)
    created = None
    with connection(dsn) as conn:  # fail before saying "watching" when it cannot work
        check_logical(conn)
        if temporary:
            created = drop_created(conn, slot=slot)  # what exists now stays on exit
    try:
        with stop_on_signals(stream.stop), stream:
            click.echo(
                f"watching {', '.join(tables)} through slot {slot!r} (Ctrl-C to stop)", err=True
            )
            for event in stream:
                if as_json:
                    sys.stdout.write(cdc_line(event))
                else:
                    click.echo(format_event(event.as_dict(), dumps_value))
                sys.stdout.flush()
    finally:
        if created is not None:
            with connection(dsn) as conn:
                created(conn)


def _find(
    conn: Any, existing: dict[tuple[str, str], TableTrigger], table: str
) -> TableTrigger | None:
    schema, name = resolve_table(conn, table)

    return existing.get((schema, name))
