"""
The sync and async front ends are thin runtimes over one engine each; this keeps them twins.

`Listener`, `Consumer`, `Scheduler`, `ChangeStream` and their async twins must offer the same
public names with the same parameters (the async side's coroutine functions standing for the
sync side's plain ones, ``aclose``/``__aiter__``/``__aenter__`` for
``close``/``__iter__``/``__enter__``), and the same documented options. A change to one that is
not made to the other fails here.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest

import pgherald

PAIRS = [
    (pgherald.Listener, pgherald.AsyncListener),
    (pgherald.Consumer, pgherald.AsyncConsumer),
    (pgherald.Scheduler, pgherald.AsyncScheduler),
    (pgherald.ChangeStream, pgherald.AsyncChangeStream),
]
# Names that differ only because one side is async.
RENAMED = {
    "close": "aclose",
    "__iter__": "__aiter__",
    "__enter__": "__aenter__",
    "__exit__": "__aexit__",
}


def public(cls: type) -> dict[str, Any]:
    names = {n for n in dir(cls) if not n.startswith("_")} | set(RENAMED) | set(RENAMED.values())
    return {n: getattr(cls, n) for n in names if hasattr(cls, n)}


def parameters(obj: Any) -> list[tuple[str, Any, Any]]:
    if isinstance(obj, property):
        return [("<property>", None, None)]
    sig = inspect.signature(obj)
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


@pytest.mark.parametrize(("sync", "async_"), PAIRS, ids=lambda c: c.__name__)
def test_same_public_names(sync: type, async_: type) -> None:
    sync_names = {RENAMED.get(n, n) for n in public(sync)}
    async_names = set(public(async_))
    assert sync_names == async_names, (
        f"only in {sync.__name__}: {sorted(sync_names - async_names)}; "
        f"only in {async_.__name__}: {sorted(async_names - sync_names)}"
    )


@pytest.mark.parametrize(("sync", "async_"), PAIRS, ids=lambda c: c.__name__)
def test_same_parameters_and_sync_or_async_as_the_side_requires(sync: type, async_: type) -> None:
    sync_members = public(sync)
    async_members = public(async_)
    for name, member in sync_members.items():
        twin = async_members[RENAMED.get(name, name)]
        if name not in ("__exit__", "__aexit__", "__iter__", "__enter__"):
            assert parameters(member) == parameters(twin), f"{name} differs"
        if inspect.iscoroutinefunction(member):
            pytest.fail(f"{sync.__name__}.{name} is a coroutine function on the sync side")


@pytest.mark.parametrize(("sync", "async_"), PAIRS, ids=lambda c: c.__name__)
def test_same_constructor(sync: type, async_: type) -> None:
    assert parameters(sync.__init__) == parameters(async_.__init__)
    sig = inspect.signature(sync.__init__)
    # Every option is keyword-only and typed, so a misspelled one is an error (not **kwargs).
    kinds = {p.kind for n, p in sig.parameters.items() if n not in ("self", "dsn")}
    assert kinds == {inspect.Parameter.KEYWORD_ONLY}
    assert all(
        p.annotation is not inspect.Parameter.empty
        for p in sig.parameters.values()
        if p.name != "self"
    )


@pytest.mark.parametrize("cls", [pgherald.AsyncListener, pgherald.AsyncConsumer])
def test_async_side_awaits(cls: type) -> None:
    for name in ("run", "connect", "aclose", "__aenter__", "__aexit__"):
        assert inspect.iscoroutinefunction(getattr(cls, name)), name
    for name in ("stop", "on"):
        assert not inspect.iscoroutinefunction(getattr(cls, name)), name


def test_one_stats_type() -> None:
    assert pgherald.ListenerStats is pgherald.Stats
    listener = pgherald.Listener("host=nowhere")
    consumer = pgherald.Consumer("host=nowhere", group="g")
    assert type(listener.stats) is type(consumer.stats) is pgherald.Stats
    listener.close()
    consumer.close()
