"""Commands for change data capture from the WAL: ``cdc add|remove|status|drop|run``."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from .._cdc import (
    ChangeStream,
    add_tables,
    check_logical,
    drop,
    format_bytes,
    remove_tables,
    slot_status,
    without_identity,
)
from ._commands import (
    cli,
    confirm_destructive,
    connection,
    dsn_option,
    finite_seconds,
    friendly,
    stop_on_signals,
)
from ._format import cdc_line

DEFAULT_MAX_RETAINED = 1024**3  # 1 GB


def _split(text: str | None) -> list[str]:
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def slot_option(func: Any) -> Any:
    func = click.option(
        "--publication",
        default=None,
        help="Publication name (default: the slot's name).",
    )(func)
    return click.option(
        "--slot",
        default="pgherald",
        show_default=True,
        help="Replication slot name (lower-case letters, digits, underscores).",
    )(func)


def _size(ctx: click.Context, param: click.Parameter, value: str) -> int:
    text = value.strip().upper().replace(" ", "")
    for unit, factor in (("TB", 1024**4), ("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if text.endswith(unit):
            text, scale = text[: -len(unit)], factor
            break
    else:
        text, scale = text.rstrip("B"), 1
    try:
        return int(float(text) * scale)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a size (e.g. 512MB, 2GB)") from None


@cli.group("cdc")
def cdc_group() -> None:
    """Change events read from the WAL (logical replication): no triggers, no write cost."""


@cdc_group.command("add")
@dsn_option
@slot_option
@click.option("--columns", default=None, help="Comma-separated columns to publish (default: all).")
@click.option(
    "--backfill",
    is_flag=True,
    help="Do not create the slot now: the first `cdc run --backfill` creates it and emits "
    "every existing row first (as READ events).",
)
@click.argument("tables", nargs=-1, required=True)
@friendly
def cdc_add(
    dsn: str | None,
    slot: str,
    publication: str | None,
    columns: str | None,
    backfill: bool,
    tables: tuple[str, ...],
) -> None:
    """Capture the changes of TABLES (schema.table and quoted names work)."""
    with connection(dsn) as conn:
        added = add_tables(
            conn,
            tables,
            slot=slot,
            publication=publication,
            columns=_split(columns),
            create_slot=not backfill,
        )
        bare = without_identity(conn, added)
    names = ", ".join(f"{s}.{t}" for s, t in added)
    cols = f" (columns {columns})" if columns else ""
    click.echo(f"{names}{cols}: captured in publication {publication or slot!r}, slot {slot!r}")
    for name in bare:
        click.echo(
            f"warning: {name} has no primary key (nor replica identity): PostgreSQL now refuses "
            f"its UPDATE and DELETE; add a primary key, or ALTER TABLE {name} REPLICA IDENTITY "
            "FULL",
            err=True,
        )


@cdc_group.command("remove")
@dsn_option
@slot_option
@click.argument("tables", nargs=-1, required=True)
@friendly
def cdc_remove(
    dsn: str | None, slot: str, publication: str | None, tables: tuple[str, ...]
) -> None:
    """Stop capturing TABLES (the slot stays: other tables go on)."""
    with connection(dsn) as conn:
        removed = remove_tables(conn, tables, publication=publication or slot)
    if removed:
        click.echo("removed " + ", ".join(f"{s}.{t}" for s, t in removed))
    else:
        click.echo(f"none of these tables is in publication {publication or slot!r}")


@cdc_group.command("status")
@dsn_option
@click.option("--slot", default=None, help="Only this slot (default: every pgoutput slot).")
@click.option(
    "--max-retained",
    default="1GB",
    show_default=True,
    callback=_size,
    help="Warn when a slot keeps more WAL than this.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per slot.")
@friendly
def cdc_status(dsn: str | None, slot: str | None, max_retained: int, as_json: bool) -> None:
    """Slots: reader active?, lag, and the WAL each keeps on the server's disk."""
    with connection(dsn) as conn:
        slots = slot_status(conn, slot)
    if not slots and not as_json:
        click.echo("no pgoutput replication slot" + (f" named {slot!r}" if slot else ""))
    for s in slots:
        over = s.retained_bytes is not None and s.retained_bytes > max_retained
        if as_json:
            record = dict(s.__dict__)
            record["tables"] = list(s.tables)
            record["over_limit"] = over
            click.echo(json.dumps(record))
        else:
            reader = f"read by pid {s.pid}" if s.active else "NOT READ"
            click.echo(
                f"{s.slot}: {reader}; acknowledged {s.confirmed_flush_lsn}; lag "
                f"{format_bytes(s.lag_bytes)}; retains {format_bytes(s.retained_bytes)} of WAL "
                f"({s.wal_status}); tables: {', '.join(s.tables) or 'none'}"
            )
        if over:
            click.echo(
                f"warning: slot {s.slot!r} keeps {format_bytes(s.retained_bytes)} of WAL (over "
                f"{format_bytes(max_retained)}) and the server cannot free it: start its reader "
                f"(`pgherald cdc run --slot {s.slot}`), or drop it (`pgherald cdc drop --slot "
                f"{s.slot}`); set max_slot_wal_keep_size so a forgotten slot cannot fill the disk",
                err=True,
            )


@cdc_group.command("drop")
@dsn_option
@slot_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@friendly
def cdc_drop(dsn: str | None, slot: str, publication: str | None, yes: bool) -> None:
    """Drop the slot and its publication: changes not yet read are gone, the WAL is freed."""
    confirm_destructive(
        f"Drop slot {slot!r} and publication {publication or slot!r}?",
        yes=yes,
        what=f"drop slot {slot!r}",
    )
    with connection(dsn) as conn:
        found = drop(conn, slot=slot, publication=publication)
    click.echo(f"dropped slot {slot!r}" if found else f"no slot or publication named {slot!r}")


@cdc_group.command("run")
@dsn_option
@slot_option
@click.option(
    "--into-log",
    is_flag=True,
    help="Store the changes in the durable log (channel schema.table), exactly once.",
)
@click.option(
    "--backfill", is_flag=True, help="When this creates the slot: emit existing rows first."
)
@click.option(
    "--read-coalesce",
    type=click.FloatRange(min=0),
    default=0.005,
    show_default=True,
    callback=finite_seconds,
    metavar="SECONDS",
    envvar="PGHERALD_CDC_READ_COALESCE",
    show_envvar=True,
    help="While changes keep coming, wait this long after handling what arrived before "
    "reading again: less CPU per change, up to this much more latency (0: read at once).",
)
@click.argument("tables", nargs=-1)
@friendly
def cdc_run(
    dsn: str | None,
    slot: str,
    publication: str | None,
    into_log: bool,
    backfill: bool,
    read_coalesce: float,
    tables: tuple[str, ...],
) -> None:
    """Read the slot until Ctrl-C or SIGTERM: print each change as JSON, or --into-log.

    TABLES, when given, are added to the publication first (as `cdc add`).
    """
    stream = ChangeStream(
        dsn,
        slot=slot,
        publication=publication,
        tables=tables,
        backfill=backfill,
        read_coalesce=read_coalesce,
    )
    with connection(dsn) as conn:  # fail before saying "reading" when it cannot work
        check_logical(conn)
    where = "into the durable log" if into_log else "to stdout"
    with stop_on_signals(stream.stop), stream:
        click.echo(f"reading slot {slot!r} {where} (Ctrl-C to stop)", err=True)
        if into_log:
            stream.into_log()
            return
        out = sys.stdout
        for event in stream:
            out.write(cdc_line(event))
            out.flush()
