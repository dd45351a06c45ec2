"""
pgherald: PostgreSQL LISTEN/NOTIFY as a dependable real-time event system.

- `notify` / `anotify`: NOTIFY from your own connection, inside your transaction.
- `Listener` / `AsyncListener`: LISTEN on a dedicated connection, with handlers or iteration,
  reconnection, dead-connection detection and backpressure; `AsyncListener` runs on asyncio and
  trio.
- `publish` / `apublish`, `Consumer` / `AsyncConsumer`: the durable event log (after
  `install`): nothing lost while consumers are down, consumer groups, replay.
"""

from __future__ import annotations

from ._consumer import AsyncConsumer, Consumer
from ._consumer_core import Event
from ._listener import Listener
from ._listener_async import AsyncListener
from ._models import Gap, ListenerStats, Notification
from ._notify import anotify, notify
from ._publish import apublish, publish
from ._schema import install, uninstall
from ._triggers import (
    TableTrigger,
    add_table_trigger,
    disable_ddl_events,
    enable_ddl_events,
    list_table_triggers,
    remove_table_trigger,
)
from .errors import (
    ConnectError,
    ConnectionLost,
    DatabaseConnectionError,
    HeraldError,
    InvalidChannel,
    ListenError,
    NotifyError,
    PayloadError,
    PayloadNotJSON,
    PayloadNotSerializable,
    PayloadTooLarge,
    PrivilegeError,
    PublishError,
    SchemaMissing,
    TransactionStateError,
    UsageError,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "AsyncConsumer",
    "AsyncListener",
    "ConnectError",
    "ConnectionLost",
    "Consumer",
    "DatabaseConnectionError",
    "Event",
    "Gap",
    "HeraldError",
    "InvalidChannel",
    "ListenError",
    "Listener",
    "ListenerStats",
    "Notification",
    "NotifyError",
    "PayloadError",
    "PayloadNotJSON",
    "PayloadNotSerializable",
    "PayloadTooLarge",
    "PrivilegeError",
    "PublishError",
    "SchemaMissing",
    "TableTrigger",
    "TransactionStateError",
    "UsageError",
    "add_table_trigger",
    "anotify",
    "apublish",
    "disable_ddl_events",
    "enable_ddl_events",
    "install",
    "list_table_triggers",
    "notify",
    "publish",
    "remove_table_trigger",
    "uninstall",
]

# Public names show as pgherald.X in reprs, tracebacks and docs, not as private modules.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("pgherald."):
        _obj.__module__ = "pgherald"
del _name, _obj
