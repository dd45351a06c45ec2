"""
Typed payloads: ``model=`` on listener and consumer handlers (batch handlers too).

A handler registered with a model is wrapped once, at registration: the wrapper validates the
payload into the model and calls the handler with the validated object, or raises
`PayloadInvalid` (the handler is not called). Handlers without a model are not wrapped, so the
listener's hot path (`ListenerEngine.dispatch`) and the consumer's loop cost what they did.

Models: a pydantic v2 ``BaseModel`` (its own JSON parser validates a notification's text), a
``msgspec.Struct`` when msgspec is installed, a dataclass (validated by pydantic's
``TypeAdapter`` when pydantic is installed, else by msgspec, else built from the payload's keys
with no type checks), or with pydantic any type a ``TypeAdapter`` takes (``TypedDict``,
``list[int]``...). pydantic and msgspec are imported only when a model needs them.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import typing
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import PayloadInvalid, UsageError

T = TypeVar("T")

Parse = Callable[[Any], Any]


class _Parsers:
    """How to validate one model: from JSON text (notifications), from a decoded value (events)."""

    __slots__ = ("from_text", "from_value", "model")

    def __init__(self, model: Any, from_text: Parse, from_value: Parse) -> None:
        self.model, self.from_text, self.from_value = model, from_text, from_value


def parsers(model: Any) -> _Parsers:
    """The validators of *model* (built once per model; UsageError when it is not a model)."""
    try:
        hash(model)
    except TypeError:
        raise _not_a_model(model) from None
    return _parsers(model)


@functools.lru_cache(maxsize=256)
def _parsers(model: Any) -> _Parsers:
    pydantic = _optional("pydantic")
    if pydantic is not None and isinstance(model, type) and issubclass(model, pydantic.BaseModel):
        base: Any = model
        return _Parsers(model, base.model_validate_json, base.model_validate)
    msgspec = _optional("msgspec")
    if msgspec is not None and isinstance(model, type) and issubclass(model, msgspec.Struct):
        decoder = msgspec.json.Decoder(model)
        return _Parsers(model, decoder.decode, functools.partial(msgspec.convert, type=model))
    if isinstance(model, (str, typing.ForwardRef)):  # pydantic would fail at each event
        raise UsageError(
            f"model={model!r} is a name, not a model: pass the class itself (defined before "
            "the consumer or listener that uses it)"
        )
    if pydantic is not None:
        try:
            adapter = pydantic.TypeAdapter(model)
        except pydantic.PydanticSchemaGenerationError as exc:
            raise _not_a_model(model) from exc
        except pydantic.PydanticUserError as exc:  # typing.TypedDict before 3.12, say
            raise UsageError(
                f"model={model!r} cannot be used: {' '.join(str(exc).split())}"
            ) from exc
        if not getattr(adapter, "pydantic_complete", True):  # types it refers to are missing
            raise UsageError(
                f"model={model!r} is not fully defined (pydantic cannot build it yet: define "
                "every type it refers to before using it)"
            )
        return _Parsers(model, adapter.validate_json, adapter.validate_python)
    if msgspec is not None and dataclasses.is_dataclass(model):
        decoder = msgspec.json.Decoder(model)
        return _Parsers(model, decoder.decode, functools.partial(msgspec.convert, type=model))
    if isinstance(model, type) and dataclasses.is_dataclass(model):
        build = functools.partial(_build_dataclass, model)
        return _Parsers(model, lambda text: build(json.loads(text)), build)
    raise _not_a_model(model)


def _not_a_model(model: Any) -> UsageError:
    return UsageError(
        f"model={model!r} is not a model pgherald can validate: give a pydantic v2 BaseModel, "
        "a dataclass or a msgspec.Struct (any other type needs pydantic installed: "
        "pip install 'pgherald[pydantic]')"
    )


def _optional(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError:
        return None


def _build_dataclass(model: type[Any], value: Any) -> Any:
    """A dataclass from a JSON object's keys (no pydantic nor msgspec: names only, no types)."""
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object, got {type(value).__name__}")
    names = {f.name for f in dataclasses.fields(model) if f.init}
    unknown = value.keys() - names
    if unknown:
        raise TypeError(f"unexpected fields {sorted(unknown)}")
    return model(**value)


def invalid(model: Any, where: str, exc: Exception) -> PayloadInvalid:
    name = getattr(model, "__qualname__", repr(model))
    text = " ".join(str(exc).split())
    if len(text) > 500:
        text = text[:500] + "..."
    where = f" {where}" if where else ""
    return PayloadInvalid(
        f"payload{where} does not validate as {name}: {text} (the handler was not called)"
    )


def parse_payload(model: type[T], payload: Any) -> T:
    """
    Validate *payload* into *model* as a handler registered with ``model=`` would get it.

    A ``str`` is parsed as JSON text (a `Notification`'s payload); anything else is taken as an
    already decoded JSON value (an `Event`'s payload). Raises `PayloadInvalid` when it does
    not validate, `UsageError` when *model* is not a model pgherald can validate. For
    iterations, where no handler validates for you.

    .. versionadded:: 0.1
    """
    p = parsers(model)
    try:
        return p.from_text(payload) if isinstance(payload, str) else p.from_value(payload)  # type: ignore[no-any-return]
    except Exception as exc:
        raise invalid(model, "", exc) from exc


def typed_listener_handler(
    handler: Callable[..., Any], model: Any, count: Callable[[], None]
) -> Callable[..., Any]:
    """Wrap a listener handler: validate ``n.payload`` (JSON text) and call ``handler(obj)``."""
    from_text = parsers(model).from_text

    def parse(n: Any) -> Any:
        try:
            return from_text(n.payload)
        except Exception as exc:
            count()
            raise invalid(model, f"on channel {n.channel!r}", exc) from exc

    return _calling_with(handler, parse)


def typed_consumer_handler(
    handler: Callable[..., Any], model: Any, count: Callable[[], None]
) -> Callable[..., Any]:
    """Wrap a consumer handler: validate ``event.payload`` and call ``handler(obj[, conn])``."""
    from_value = parsers(model).from_value

    def parse(event: Any) -> Any:
        try:
            return from_value(event.payload)
        except Exception as exc:
            count()
            raise invalid(model, f"of event {event.id} ({event.channel})", exc) from exc

    return _calling_with(handler, parse)


def typed_batch_handler(
    handler: Callable[..., Any], model: Any, count: Callable[[], None]
) -> Callable[..., Any]:
    """
    Wrap a consumer's batch handler: validate each event's payload and call ``handler(objs)``.
    At the first payload that does not validate, the handler gets the events before it (if
    any); then `PayloadInvalid` with ``done`` at that event fails it alone (dead-lettered, no
    retries), and the next call starts after it. A handler that finished fewer (returned *n*)
    is answered as it said: the rest come again.
    """
    from_value = parsers(model).from_value

    def parse(events: list[Any]) -> tuple[list[Any], PayloadInvalid | None]:
        objs = []
        for e in events:
            try:
                objs.append(from_value(e.payload))
            except Exception as exc:
                count()
                error = invalid(model, f"of event {e.id} ({e.channel})", exc)
                error.__cause__ = exc
                error.done = len(objs)  # type: ignore[attr-defined]  # the batch's failed index
                return objs, error
        return objs, None

    def answer(objs: list[Any], done: Any, error: PayloadInvalid) -> Any:
        if isinstance(done, int) and not isinstance(done, bool) and done < len(objs):
            return done  # it stopped early: the rest come again, the invalid one with them
        raise error

    if is_async(handler):

        async def typed_async(events: list[Any]) -> Any:
            objs, error = parse(events)
            if error is None:
                return await handler(objs)
            return answer(objs, await handler(objs) if objs else None, error)

        return functools.update_wrapper(typed_async, handler)

    def typed(events: list[Any]) -> Any:
        objs, error = parse(events)
        if error is None:
            return handler(objs)
        return answer(objs, handler(objs) if objs else None, error)

    return functools.update_wrapper(typed, handler)


def _calling_with(handler: Callable[..., Any], parse: Callable[[Any], Any]) -> Callable[..., Any]:
    """*handler* called with ``parse(first)`` instead of its first argument, the rest passed
    through (a transactional handler's connection); async when *handler* is."""
    if is_async(handler):

        async def typed_async(first: Any, *rest: Any) -> Any:
            return await handler(parse(first), *rest)

        return functools.update_wrapper(typed_async, handler)

    def typed(first: Any, *rest: Any) -> Any:
        return handler(parse(first), *rest)

    return functools.update_wrapper(typed, handler)


def is_async(handler: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004 - an async __call__ counts too
    )
