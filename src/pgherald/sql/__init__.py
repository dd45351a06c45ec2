"""
pgherald's SQL, kept in ``.sql`` files: ``schema.sql`` (the current schema), ``queries.sql``
(named queries) and ``migrations/`` (every schema change since the first release, in order).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from importlib import resources
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from typing_extensions import LiteralString

_NAME = re.compile(r"^-- name: (\w+) --$", re.MULTILINE)

PLACEHOLDER = re.compile(r"%\((\w+)\)s")
"""A ``%(name)s`` parameter of the named queries (for drivers that spell them otherwise)."""


def read(name: str) -> str:
    """A file of this package, as text."""
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


@functools.cache
def queries() -> dict[str, LiteralString]:
    """Every named query of ``queries.sql``."""
    text = read("queries.sql")
    parts = _NAME.split(text)[1:]
    return {
        name: cast("LiteralString", body.strip())
        for name, body in zip(parts[::2], parts[1::2], strict=True)
    }


def query(name: str) -> LiteralString:
    return queries()[name]


@functools.cache
def numbered(name: str) -> tuple[bytes, tuple[str, ...]]:
    """
    Named query *name* with its ``%(name)s`` placeholders as libpq's ``$1, $2...`` (each name
    one number, however often it appears), and the names in number order: for the
    sans-I/O engines, which send parameters themselves (`pgwire.execute_params`).
    """
    names: list[str] = []

    def number(m: re.Match[str]) -> str:
        if m.group(1) not in names:
            names.append(m.group(1))
        return f"${names.index(m.group(1)) + 1}"

    text = PLACEHOLDER.sub(number, query(name))
    return text.encode(), tuple(names)


def bound(name: str, params: Mapping[str, object]) -> tuple[bytes, list[bytes | None]]:
    """`numbered` query *name*, and *params* as its text values in number order (None: NULL)."""
    text, names = numbered(name)
    return text, [None if (v := params[n]) is None else str(v).encode() for n in names]


def migrations() -> list[tuple[str, str]]:
    """``(name, sql)`` of every migration, oldest first (file names sort in order)."""
    folder = resources.files(__name__).joinpath("migrations")
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".sql"))
    return [(n[: -len(".sql")], folder.joinpath(n).read_text(encoding="utf-8")) for n in names]
