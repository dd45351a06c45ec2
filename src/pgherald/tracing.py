"""
OpenTelemetry tracing (the ``tracing`` extra: ``opentelemetry-api``).

::

    pgherald.tracing.instrument()          # once, at start-up, before handlers are registered

Spans (kind, name; attributes follow OpenTelemetry's messaging conventions, with
``messaging.system = "postgresql"``):

- `publish` / `apublish`: ``PRODUCER`` ``publish <channel>``, whose context is written into
  the event's headers (``traceparent``, ``tracestate``: the W3C trace context, through the
  global propagator), so the trace goes on wherever the event goes. `publish_many`: one span
  for the statement, its context in every event's headers.
- `notify` / `anotify`: ``PRODUCER`` ``notify <channel>`` (the payload is left as it is: a
  plain notification carries no trace context).
- a consumer's handler: ``CONSUMER`` ``process <channel>``, a child of the publishing span
  (the context read from the event's headers); a batch handler (`Relay`): ``CONSUMER``
  ``process <channel>`` (or ``process``) per call, linked to every event's publishing span. A
  relay forwards the headers: the receiving side continues the same trace.
- a listener's handler: ``CONSUMER`` ``process <channel>`` per notification.

A handler that raises (or a payload that does not validate as its ``model=``) ends its span
with an error status and the exception recorded.

Only handlers registered while instrumented are traced, so nothing is added to the
listener's or the consumer's per-event path otherwise; `uninstrument` stops new spans in
publish and notify and for handlers registered afterwards.

.. versionadded:: 0.1
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any

from . import _tracing

try:
    from opentelemetry import propagate, trace
    from opentelemetry.trace import Link, SpanKind
except ImportError as exc:  # pragma: no cover - the extra is installed in the tests
    raise ImportError(
        "pgherald.tracing needs opentelemetry-api: pip install 'pgherald[tracing]'"
    ) from exc

__all__ = ["instrument", "instrumented", "uninstrument"]

MAX_LINKS = 128
"""Links a batch span keeps (to the first events' publishing spans)."""

_SYSTEM = "postgresql"


def instrument(*, tracer_provider: trace.TracerProvider | None = None) -> None:
    """
    Turn tracing on (see the module docstring) with *tracer_provider* (default: the global
    one). Call it before listeners' and consumers' handlers are registered (before a `Relay`
    is made): handlers are wrapped when registered.

    .. versionadded:: 0.1
    """
    from . import __version__

    tracer = trace.get_tracer("pgherald", __version__, tracer_provider=tracer_provider)
    _tracing.active = _Tracing(tracer)


def uninstrument() -> None:
    """Turn tracing off for publish, notify and handlers registered from now on."""
    _tracing.active = None


def instrumented() -> bool:
    """Whether `instrument` is in effect."""
    return _tracing.active is not None


def _carrier(headers: Any) -> Mapping[str, Any]:
    """An event's headers as a propagation carrier (a relay reads them as JSON text)."""
    if isinstance(headers, str):
        try:
            headers = json.loads(headers)
        except ValueError:
            return {}
    return headers if isinstance(headers, Mapping) else {}


class _Tracing:
    """The hooks pgherald calls while instrumented (``_tracing.active``)."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self.tracer = tracer

    @contextmanager
    def producer(
        self, operation: str, channel: str, headers: Mapping[str, Any] | None = None
    ) -> Iterator[Mapping[str, Any] | None]:
        """A PRODUCER span around a publish (or a notify); yields the headers to store."""
        attributes = {
            "messaging.system": _SYSTEM,
            "messaging.operation.type": "send" if operation == "notify" else "publish",
            "messaging.operation.name": operation,
            "messaging.destination.name": channel,
        }
        with self.tracer.start_as_current_span(
            f"{operation} {channel}", kind=SpanKind.PRODUCER, attributes=attributes
        ):
            if operation == "notify":
                yield headers
                return
            carrier: dict[str, Any] = {}
            propagate.inject(carrier)
            if headers:
                carrier.update(headers)  # the caller's own headers win
            yield carrier

    def listener_handler(self, handler: Callable[..., Any], is_async: bool) -> Callable[..., Any]:
        start = self.tracer.start_as_current_span

        def attributes(n: Any) -> dict[str, Any]:
            return {
                "messaging.system": _SYSTEM,
                "messaging.operation.type": "process",
                "messaging.destination.name": n.channel,
            }

        if is_async:

            async def traced_async(n: Any) -> Any:
                with start(
                    f"process {n.channel}", kind=SpanKind.CONSUMER, attributes=attributes(n)
                ):
                    return await handler(n)

            return _named(traced_async, handler)

        def traced(n: Any) -> Any:
            with start(f"process {n.channel}", kind=SpanKind.CONSUMER, attributes=attributes(n)):
                return handler(n)

        return _named(traced, handler)

    def consumer_handler(self, handler: Callable[..., Any], is_async: bool) -> Callable[..., Any]:
        start = self.tracer.start_as_current_span
        extract = propagate.extract

        def span(event: Any) -> Any:
            attributes = {
                "messaging.system": _SYSTEM,
                "messaging.operation.type": "process",
                "messaging.destination.name": event.channel,
                "messaging.message.id": str(event.id),
                "messaging.destination.partition.id": str(event.partition),
            }
            if event.key is not None:
                attributes["messaging.message.conversation_id"] = event.key
            return start(
                f"process {event.channel}",
                context=extract(_carrier(event.headers)),
                kind=SpanKind.CONSUMER,
                attributes=attributes,
            )

        if is_async:

            async def traced_async(event: Any, *conn: Any) -> Any:
                with span(event):
                    return await handler(event, *conn)

            return _named(traced_async, handler)

        def traced(event: Any, *conn: Any) -> Any:
            with span(event):
                return handler(event, *conn)

        return _named(traced, handler)

    def batch_handler(self, func: Callable[..., Any], is_async: bool) -> Callable[..., Any]:
        start = self.tracer.start_as_current_span
        extract = propagate.extract
        get_span = trace.get_current_span

        def span(events: list[Any]) -> Any:
            links = []
            for e in events[:MAX_LINKS]:
                ctx = get_span(extract(_carrier(e.headers))).get_span_context()
                if ctx.is_valid:
                    links.append(Link(ctx))
            channels = {e.channel for e in events}
            name = f"process {next(iter(channels))}" if len(channels) == 1 else "process"
            attributes: dict[str, Any] = {
                "messaging.system": _SYSTEM,
                "messaging.operation.type": "process",
                "messaging.batch.message_count": len(events),
            }
            return start(name, kind=SpanKind.CONSUMER, links=links, attributes=attributes)

        if is_async:

            async def traced_async(events: list[Any]) -> Any:
                with span(events):
                    return await func(events)

            return _named(traced_async, func)

        def traced(events: list[Any]) -> Any:
            with span(events):
                return func(events)

        return _named(traced, func)


def _named(wrapper: Callable[..., Any], handler: Callable[..., Any]) -> Callable[..., Any]:
    """The wrapper under the handler's name (logs, dead letters), without its signature."""
    for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
        with suppress(AttributeError, TypeError):
            setattr(wrapper, attr, getattr(handler, attr))
    wrapper._pgherald_traced = True  # type: ignore[attr-defined]
    return wrapper
