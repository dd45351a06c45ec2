"""How the commands print events: one readable line per notification or change."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

import click

from .._models import Notification
from .._protocol.pgoutput import ChangeEvent, dumps_value


def format_notification(n: Notification) -> str:
    stamp = datetime.now().strftime("%H:%M:%S.%f")[:-3]
    return (
        f"{click.style(stamp, dim=True)} {click.style(n.channel, fg='cyan', bold=True)} "
        f"{n.payload} {click.style(f'(pid {n.pid})', dim=True)}"
    )


def format_change(n: Notification) -> str:
    """One readable line per change; UPDATE shows the changed columns old -> new."""
    try:
        e = n.json()
        return format_event(e)
    except (ValueError, KeyError, TypeError, RecursionError):  # anyone may NOTIFY anything
        return format_notification(n)


def format_event(e: dict[str, Any], dumps: Callable[[Any], str] = json.dumps) -> str:
    """A change event (a trigger's, or a `ChangeEvent.as_dict`) as one readable line."""
    op, table = e["op"], f"{e['schema']}.{e['table']}"
    head = f"{click.style(op, fg={'INSERT': 'green', 'UPDATE': 'yellow', 'DELETE': 'red'}.get(op, 'magenta'), bold=True)} {click.style(table, fg='cyan')}"
    if e.get("truncated"):
        return f"{head} key {dumps(e.get('key'))} (row too wide for NOTIFY: fetch it)"
    if op == "UPDATE":
        new, old = e.get("new") or {}, e.get("old") or {}
        if e.get("changed") is None:  # CDC without REPLICA IDENTITY FULL: the new row only
            return f"{head} {dumps(new)}"
        changes = ", ".join(
            f"{c}: {dumps(old.get(c))} -> {dumps(new.get(c))}" for c in e.get("changed") or []
        )
        return f"{head} {changes}"
    row = e.get("new") if op in ("INSERT", "READ") else e.get("old")
    return f"{head} {dumps(row)}" if row is not None else head


def cdc_line(event: ChangeEvent) -> str:
    """A change as one JSON line: its `ChangeEvent.as_dict` plus its key."""
    record = event.as_dict()
    record["key"] = event.key
    return dumps_value(record) + "\n"
