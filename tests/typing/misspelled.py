# pyright: strict
"""
Misspelled and mistyped options: every line marked ``# error: REGEX`` must FAIL type checking
with mypy and pyright (tests/typing/check.py asserts each marked line gets an error matching
REGEX, and that no other line gets one).
"""

from __future__ import annotations

import psycopg

import pgherald


def wrong(dsn: str, conn: psycopg.Connection[tuple[object, ...]]) -> None:
    pgherald.Listener(dsn, chanels=["orders"])  # error: chanels
    pgherald.AsyncListener(dsn, on_gaps=print)  # error: on_gaps
    pgherald.Listener(dsn, health_check_interval="5")  # error: health_check_interval
    pgherald.Listener(dsn, channel=["orders"])  # error: channel
    pgherald.Listener(5432)  # error: Argument.*(int|5432)
    pgherald.Listener(dsn, ["orders"])  # error: positional
    pgherald.notify(conn, "orders", "x", dump=str)  # error: dump
    pgherald.publish(conn, "orders", {}, keys="k")  # error: keys
    pgherald.Consumer(dsn, group="g", chanels=["orders"])  # error: chanels
    pgherald.Consumer(dsn, channels=["orders"])  # error: group
    pgherald.AsyncConsumer(dsn, group="g", batchsize=10)  # error: batchsize
