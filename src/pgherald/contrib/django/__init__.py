"""
pgherald in a Django project: notify and publish inside Django's transactions, events on model
saves, and listeners and consumers run by ``manage.py pgherald_run``.

Add ``"pgherald.contrib.django"`` to ``INSTALLED_APPS`` (for the command). Connections come
from ``settings.DATABASES``: the alias in ``settings.PGHERALD["DATABASE"]`` (default
``"default"``), or the ``using`` argument.

- `notify`, `publish`: through Django's own connection, so inside ``transaction.atomic()``
  they are part of the transaction: delivered (stored) when it commits, dropped when it (or
  the savepoint around them) rolls back. That is ``transaction.on_commit`` semantics without
  its gap: an ``on_commit`` callback runs after the commit, and a crash in between loses the
  event; here the event commits with the rows or not at all.
- `publish_on_save`: the same, from a model's ``post_save`` (and ``post_delete``) signal.
- `listener`, `consumer`: a `pgherald.Listener` / `pgherald.Consumer` on the project's
  database, registered for ``pgherald_run`` (declare them in a ``herald.py`` module of an
  installed app: the command imports those).
- `database_dsn`: the libpq connection string of a ``DATABASES`` entry.

See docs/frameworks.md. Needs Django 4.2 or newer and its PostgreSQL backend (psycopg 3 or
psycopg2).

.. versionadded:: 0.1
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any, Literal, TypeVar

try:
    from django.conf import settings
    from django.db import close_old_connections, connections
    from django.db.models.signals import post_delete, post_save
except ImportError as exc:  # pragma: no cover - only without Django
    raise ImportError(
        f"pgherald.contrib.django needs Django: pip install 'pgherald[django]' ({exc})"
    ) from exc
from psycopg.conninfo import make_conninfo

from ... import _notify, _publish
from ..._consumer import Consumer
from ..._listener import Listener
from ..._protocol.payload import JsonDumps
from ..._schedule import Scheduler
from ...errors import UsageError

__all__ = [
    "consumer",
    "database_dsn",
    "db_handler",
    "listener",
    "notify",
    "publish",
    "publish_on_save",
    "runners",
    "scheduler",
]

Op = Literal["created", "updated", "deleted"]
F = TypeVar("F", bound=Callable[..., Any])

# OPTIONS keys that Django reads itself: not libpq parameters.
_DJANGO_OPTIONS = frozenset(
    {"isolation_level", "server_side_binding", "assume_role", "pool", "cursor_factory", "context"}
)

_runners: list[Listener | Consumer | Scheduler] = []


def _alias(using: str | None) -> str:
    if using is not None:
        return using
    config = getattr(settings, "PGHERALD", {}) or {}
    alias = config.get("DATABASE", "default")
    if not isinstance(alias, str):
        raise UsageError(f"settings.PGHERALD['DATABASE'] must be a DATABASES alias, not {alias!r}")
    return alias


def database_dsn(using: str | None = None) -> str:
    """
    The libpq connection string of ``settings.DATABASES[using]`` (NAME, USER, PASSWORD, HOST,
    PORT, and the libpq parameters among OPTIONS, such as ``sslmode`` or ``service``).

    .. versionadded:: 0.1
    """
    alias = _alias(using)
    databases = settings.DATABASES
    if alias not in databases:
        raise UsageError(
            f"no database {alias!r} in settings.DATABASES (it has {sorted(databases)}): set "
            "settings.PGHERALD['DATABASE'] or pass using="
        )
    entry = databases[alias]
    engine = entry.get("ENGINE", "")
    if "postgresql" not in engine and "postgis" not in engine:
        raise UsageError(
            f"DATABASES[{alias!r}] uses {engine or 'no ENGINE'}: pgherald needs PostgreSQL "
            "(django.db.backends.postgresql)"
        )
    params: dict[str, Any] = {}
    for key, param in (
        ("NAME", "dbname"),
        ("USER", "user"),
        ("PASSWORD", "password"),
        ("HOST", "host"),
        ("PORT", "port"),
    ):
        if entry.get(key):
            params[param] = str(entry[key])
    for key, value in (entry.get("OPTIONS") or {}).items():
        if key not in _DJANGO_OPTIONS and isinstance(value, (str, int)):
            params[key] = str(value)
    return make_conninfo(**params)


def _driver_connection(using: str | None) -> Any:
    """Django's driver connection for *using*, in whatever transaction Django has open."""
    wrapper = connections[_alias(using)]
    # Django's own checks: no statements in an atomic block that has already failed.
    wrapper.validate_no_broken_transaction()
    wrapper.ensure_connection()
    return wrapper.connection


def notify(
    channel: str,
    payload: object = "",
    *,
    using: str | None = None,
    dumps: JsonDumps | None = None,
) -> None:
    """
    `pgherald.notify` through Django's connection: in ``transaction.atomic()``, delivered when
    the transaction commits (never if it rolls back); outside one, at once.

    .. versionadded:: 0.1
    """
    _notify.notify(_driver_connection(using), channel, payload, dumps=dumps)


def publish(
    channel: str,
    payload: object,
    *,
    key: str | None = None,
    headers: Mapping[str, Any] | None = None,
    using: str | None = None,
    dumps: JsonDumps | None = None,
    deliver_at: datetime | None = None,
    deliver_after: timedelta | None = None,
) -> int:
    """
    `pgherald.publish` through Django's connection: the event is stored if and only if the
    surrounding transaction commits. Returns its id. Needs ``pgherald install`` once.

    .. versionadded:: 0.1
    """
    return _publish.publish(
        _driver_connection(using),
        channel,
        payload,
        key=key,
        headers=headers,
        dumps=dumps,
        deliver_at=deliver_at,
        deliver_after=deliver_after,
    )


def _default_payload(instance: Any, op: Op) -> dict[str, Any]:
    pk = instance.pk
    return {
        "model": instance._meta.label_lower,
        "pk": pk if isinstance(pk, (int, str)) or pk is None else str(pk),
        "op": op,
    }


def publish_on_save(
    model: type[Any],
    channel: str,
    *,
    payload: Callable[[Any, Op], object] | None = None,
    key: Callable[[Any], str | None] | None = None,
    durable: bool = True,
    delete: bool = False,
) -> Callable[[], None]:
    """
    Publish an event on *channel* each time an instance of *model* is saved (and deleted,
    with *delete*), through the connection that saved it, in the same transaction.

    *payload* ``(instance, op)`` returns the event's JSON value, *op* being ``"created"``,
    ``"updated"`` or ``"deleted"`` (default: ``{"model": "app.model", "pk": ..., "op": ...}``).
    *key* ``(instance)``: the event's key (default: the primary key as a str), which keeps
    the events of one object in order within a consumer group. ``durable=False`` sends a
    NOTIFY (`notify`) instead of storing an event. Saves with ``raw=True`` (``loaddata``)
    publish nothing. Returns a function that disconnects the signals.

    Inside ``transaction.atomic()`` (or with ``ATOMIC_REQUESTS``) the event commits with the
    save or not at all. In autocommit mode Django commits the save on its own, and the event
    follows in a statement of its own right after it.

    .. versionadded:: 0.1
    """
    make_payload = payload or _default_payload
    make_key = key or (lambda instance: None if instance.pk is None else str(instance.pk))
    uid = f"pgherald:{model._meta.label_lower}:{channel}:{id(make_payload)}"

    def send(instance: Any, op: Op, using: str) -> None:
        body = make_payload(instance, op)
        if durable:
            publish(channel, body, key=make_key(instance), using=using)
        else:
            notify(channel, body, using=using)

    def on_save(sender: Any, instance: Any, created: bool, raw: bool, using: str, **_: Any) -> None:
        if not raw:
            send(instance, "created" if created else "updated", using)

    def on_delete(sender: Any, instance: Any, using: str, **_: Any) -> None:
        send(instance, "deleted", using)

    post_save.connect(on_save, sender=model, weak=False, dispatch_uid=uid + ":save")
    if delete:
        post_delete.connect(on_delete, sender=model, weak=False, dispatch_uid=uid + ":delete")

    def disconnect() -> None:
        post_save.disconnect(sender=model, dispatch_uid=uid + ":save")
        post_delete.disconnect(sender=model, dispatch_uid=uid + ":delete")

    return disconnect


def listener(*, channels: Iterable[str] = (), using: str | None = None, **options: Any) -> Listener:
    """
    A `pgherald.Listener` on the project's database, run by ``manage.py pgherald_run``.
    *options* are `Listener`'s. Register handlers on it with ``@listener.on(channel)``.

    .. versionadded:: 0.1
    """
    runner = Listener(database_dsn(using), channels=channels, **options)
    _runners.append(runner)
    return runner


def consumer(*, group: str, using: str | None = None, **options: Any) -> Consumer:
    """
    A `pgherald.Consumer` of consumer group *group* on the project's database, run by
    ``manage.py pgherald_run``. *options* are `Consumer`'s (``channels=``...).

    .. versionadded:: 0.1
    """
    runner = Consumer(database_dsn(using), group=group, **options)
    _runners.append(runner)
    return runner


def scheduler(*, using: str | None = None, **options: Any) -> Scheduler:
    """
    A `pgherald.Scheduler` on the project's database, run by ``manage.py pgherald_run``: it
    publishes the schedules' ticks and releases due delayed events (each once, however many
    run). *options* are `Scheduler`'s.

    .. versionadded:: 0.1
    """
    runner = Scheduler(database_dsn(using), **options)
    _runners.append(runner)
    return runner


def runners() -> list[Listener | Consumer | Scheduler]:
    """What `listener`, `consumer` and `scheduler` made, in that order."""
    return list(_runners)


def db_handler(func: F) -> F:
    """
    Decorator for handlers that use the ORM: Django's stale or broken connections of the
    handler's thread are closed before and after each call, as Django does around a request.

    .. versionadded:: 0.1
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        close_old_connections()
        try:
            return func(*args, **kwargs)
        finally:
            close_old_connections()

    return wrapper  # type: ignore[return-value]
