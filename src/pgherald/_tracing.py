"""
Where pgherald looks to see whether tracing is on (`pgherald.tracing.instrument`).

``active`` is None unless tracing was turned on: publish and notify test it once per call,
handlers are wrapped at registration only while it is set. This module imports nothing, so
that pgherald costs the same without the ``tracing`` extra.
"""

from __future__ import annotations

from typing import Any

active: Any = None
"""`pgherald.tracing._Tracing` while instrumented, else None."""


def is_traced(handler: Any) -> bool:
    """Whether *handler* is a tracing wrapper already (a batch handler's)."""
    return getattr(handler, "_pgherald_traced", False) is True
