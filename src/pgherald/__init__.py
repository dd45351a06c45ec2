"""
pgherald: PostgreSQL LISTEN/NOTIFY as a dependable real-time event system.

- `notify` / `anotify`: NOTIFY from your own connection, inside your transaction.
- `Listener` / `AsyncListener`: LISTEN on a dedicated connection, with handlers or iteration,
  reconnection, dead-connection detection and backpressure; `AsyncListener` runs on asyncio and
  trio.
- `publish` / `apublish` (`publish_many` / `apublish_many`), `Consumer` / `AsyncConsumer`: the
  durable event log (after `install`): nothing lost while consumers are down, consumer groups,
  replay.
"""

from __future__ import annotations

from ._cdc import AsyncChangeStream, ChangeStream
from ._consumer import AsyncConsumer, Consumer
from ._dead import DeadLetter, dead_letters, purge_dead_letters, redeliver
from ._groups import (
    GroupInfo,
    GroupMember,
    RelayInfo,
    delete_group,
    list_groups,
    reset_group,
)
from ._listener import Listener
from ._listener_async import AsyncListener
from ._log import aread_log, read_log
from ._maintain import (
    Maintenance,
    Retention,
    maintain,
    partition_count,
    repartition,
    retention,
    set_retention,
)
from ._models import Event, Gap, ListenerStats, Notification, Stats
from ._notify import anotify, notify
from ._protocol.pgoutput import ChangeEvent
from ._publish import apublish, apublish_many, publish, publish_many
from ._relay import AsyncRelay, Relay, RelayStats
from ._schedule import (
    AsyncScheduler,
    Schedule,
    Scheduler,
    add_schedule,
    cancel_delayed,
    list_schedules,
    release_due_events,
    remove_schedule,
    run_scheduler,
    tick_schedules,
)
from ._schema import install, uninstall
from ._triggers import (
    TableTrigger,
    add_table_trigger,
    disable_ddl_events,
    enable_ddl_events,
    list_table_triggers,
    remove_table_trigger,
)
from ._typed import parse_payload
from .errors import (
    ConnectError,
    ConnectionLost,
    DatabaseConnectionError,
    HeraldError,
    InvalidChannel,
    ListenError,
    NotifyError,
    PayloadError,
    PayloadInvalid,
    PayloadNotJSON,
    PayloadNotSerializable,
    PayloadTooLarge,
    PoolerError,
    PrivilegeError,
    PublishError,
    SchemaMissing,
    TransactionStateError,
    UsageError,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "AsyncChangeStream",
    "AsyncConsumer",
    "AsyncListener",
    "AsyncRelay",
    "AsyncScheduler",
    "ChangeEvent",
    "ChangeStream",
    "ConnectError",
    "ConnectionLost",
    "Consumer",
    "DatabaseConnectionError",
    "DeadLetter",
    "Event",
    "Gap",
    "GroupInfo",
    "GroupMember",
    "HeraldError",
    "InvalidChannel",
    "ListenError",
    "Listener",
    "ListenerStats",
    "Maintenance",
    "Notification",
    "NotifyError",
    "PayloadError",
    "PayloadInvalid",
    "PayloadNotJSON",
    "PayloadNotSerializable",
    "PayloadTooLarge",
    "PoolerError",
    "PrivilegeError",
    "PublishError",
    "Relay",
    "RelayInfo",
    "RelayStats",
    "Retention",
    "Schedule",
    "Scheduler",
    "SchemaMissing",
    "Stats",
    "TableTrigger",
    "TransactionStateError",
    "UsageError",
    "add_schedule",
    "add_table_trigger",
    "anotify",
    "apublish",
    "apublish_many",
    "aread_log",
    "cancel_delayed",
    "dead_letters",
    "delete_group",
    "disable_ddl_events",
    "enable_ddl_events",
    "install",
    "list_groups",
    "list_schedules",
    "list_table_triggers",
    "maintain",
    "notify",
    "parse_payload",
    "partition_count",
    "publish",
    "publish_many",
    "purge_dead_letters",
    "read_log",
    "redeliver",
    "release_due_events",
    "remove_schedule",
    "remove_table_trigger",
    "repartition",
    "reset_group",
    "retention",
    "run_scheduler",
    "set_retention",
    "tick_schedules",
    "uninstall",
]

# Public names show as pgherald.X in reprs, tracebacks and docs, not as private modules.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("pgherald."):
        _obj.__module__ = "pgherald"
del _name, _obj
