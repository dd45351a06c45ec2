"""Argument checks shared by the front ends: a clear `UsageError` at construction, not a
server's "out of range" (or a busy loop) at the first statement."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

from .errors import UsageError

INT4_MAX = 2**31 - 1
"""PostgreSQL's integer: read sizes are sent as one."""
INT8_MAX = 2**63 - 1
"""PostgreSQL's bigint: event ids, byte counts."""
MAX_AGE = timedelta(days=36525)
"""The longest retention or age: 100 years (``now() - age`` must stay a date PostgreSQL has;
its timestamps go back to 4713 BC, and past that every `maintain` would fail)."""
MAX_AGE_TEXT = "100 years (36525d)"


def seconds(name: str, value: Any, *, zero: bool = False, none: bool = False) -> None:
    """*value* is a finite number of seconds above 0 (or 0 with *zero*; None with *none*)."""
    if value is None and none:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (value >= 0 if zero else value > 0)
        or not math.isfinite(value)
    ):
        floor = ">= 0" if zero else "above 0"
        raise UsageError(
            f"{name} must be a number of seconds {floor} (finite){' or None' if none else ''}, "
            f"not {value!r}"
        )


def integer(name: str, value: Any, *, low: int, high: int, none: bool = False) -> None:
    """*value* is an int from *low* to *high* (None with *none*)."""
    if value is None and none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UsageError(
            f"{name} must be an int from {low:,} to {high:,}{' or None' if none else ''}, "
            f"not {value!r}"
        )


def group(value: Any) -> None:
    """*value* names a consumer group."""
    if not isinstance(value, str) or not value:
        raise UsageError(f"group must be a non-empty str: the consumer group's name, not {value!r}")


def ids(values: Any) -> list[int] | None:
    """Event ids (None: None): an iterable of ints in bigint's range."""
    if values is None:
        return None
    if isinstance(values, (str, bytes)):
        raise UsageError("ids must be event ids (ints), not a string")
    try:
        out = list(values)
    except TypeError:
        raise UsageError(
            f"ids must be a list of event ids (ints), not {values!r}: [{values!r}] for one"
        ) from None
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= INT8_MAX for i in out):
        raise UsageError(f"ids must be event ids (ints from 0 to {INT8_MAX:,}), not {out!r}")
    return out


def age(name: str, value: Any, *, zero: bool = False, none: bool = False) -> None:
    """*value* is a timedelta above 0 (or 0 with *zero*; None with *none*) of at most
    `MAX_AGE`."""
    if value is None and none:
        return
    if (
        not isinstance(value, timedelta)
        or not (value >= timedelta(0) if zero else value > timedelta(0))
        or value > MAX_AGE
    ):
        floor = ">= 0" if zero else "positive"
        raise UsageError(
            f"{name} must be a {floor} timedelta of at most {MAX_AGE_TEXT}, such as "
            f"timedelta(days=7){' or None' if none else ''}, not {value!r}"
        )
