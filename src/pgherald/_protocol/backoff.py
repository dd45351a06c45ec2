"""Reconnection delays: exponential with jitter, so a fleet does not reconnect in lockstep."""

from __future__ import annotations

import random


def backoff_delay(
    attempt: int, *, initial: float, cap: float, rand: random.Random | None = None
) -> float:
    """
    Delay before reconnection *attempt* (1-based): "equal jitter".

    Half of ``min(cap, initial * 2**(attempt-1))`` is fixed and half is random, so the delay
    grows quickly but never collapses to zero.
    """
    base = min(cap, initial * (2.0 ** min(attempt - 1, 32)))
    r: float = (rand or random).random()
    return base / 2 + r * base / 2
