"""``pgherald relay``: a consumer group of the durable log published into a broker."""

from __future__ import annotations

import json
import logging
from typing import Any

import click

from .._relay import Relay
from ._commands import cli, connection, dsn_option, finite_seconds, friendly, stop_on_signals
from ._durable import parse_start, require_schema


def parse_stream_options(values: tuple[str, ...]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; a VALUE that is JSON (a number, true, a list) is taken as such."""
    options: dict[str, Any] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(
                f"{item!r}: use KEY=VALUE, e.g. max_age=86400 or duplicate_window=300"
            )
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value
    return options


def parse_stats_interval(ctx: click.Context, param: click.Parameter, value: float) -> float | None:
    """``--stats-interval``: 0 is `Relay`'s None (no status row); nan and inf are refused here,
    as a usage error, not by `Relay` (FloatRange lets them through)."""
    try:
        return finite_seconds(ctx, param, value) or None
    except click.BadParameter as exc:
        raise click.BadParameter(f"{exc.message}: use e.g. 10, or 0 for none") from None


@cli.command("relay")
@dsn_option
@click.option(
    "--to",
    "to",
    required=True,
    envvar="PGHERALD_RELAY_TO",
    show_envvar=True,
    help="nats://HOST:PORT (JetStream), redis://HOST:PORT/DB (Redis Streams), or https://... "
    "(webhooks; http:// on loopback).",
)
@click.option(
    "--stream",
    default=None,
    envvar="PGHERALD_RELAY_STREAM",
    show_envvar=True,
    help="JetStream stream (default PGHERALD, created if missing), or the Redis stream key "
    "(default 'pgherald:{channel}'; without {channel}: one stream for all).",
)
@click.option(
    "--subject",
    default="pgherald.{channel}",
    show_default=True,
    envvar="PGHERALD_RELAY_SUBJECT",
    show_envvar=True,
    help="JetStream subject of each channel's events.",
)
@click.option(
    "--group",
    default="relay",
    show_default=True,
    envvar="PGHERALD_GROUP",
    show_envvar=True,
    help="Consumer group: the relay's position; relays of one group share the partitions.",
)
@click.option(
    "--from",
    "start",
    default="beginning",
    show_default=True,
    help="Where a new group starts: beginning, now, an event id or an ISO timestamp.",
)
@click.option(
    "--stream-option",
    "stream_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="JetStream setting of a stream the relay creates (repeat): max_age=86400, "
    "duplicate_window=300, max_bytes=..., num_replicas=3.",
)
@click.option(
    "--maxlen",
    type=click.IntRange(min=1),
    default=None,
    envvar="PGHERALD_RELAY_MAXLEN",
    show_envvar=True,
    help="Redis: trim each stream to about this many entries (XADD MAXLEN ~).",
)
@click.option(
    "--secret",
    default=None,
    envvar="PGHERALD_WEBHOOK_SECRET",
    show_envvar=True,
    help="Webhooks: HMAC-SHA256 key of the Pgherald-Signature header.",
)
@click.option(
    "--webhook-batch",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Webhooks: events per POST (1: a JSON object per request; more: a JSON array).",
)
@click.option(
    "--max-attempts",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Attempts for an event the broker refuses (or a failing webhook) before it is "
    "dead-lettered; an unreachable broker is retried for ever.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Events per read when caught up (reads grow to 20,000 over a backlog).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=0, max=65535),
    default=None,
    envvar="PGHERALD_RELAY_METRICS_PORT",
    show_envvar=True,
    help="Serve Prometheus metrics (events, rate, lag, retries) on this port at /metrics.",
)
@click.option(
    "--metrics-host",
    default="127.0.0.1",
    show_default=True,
    envvar="PGHERALD_RELAY_METRICS_HOST",
    show_envvar=True,
    help="Address of the metrics endpoint (0.0.0.0: every interface).",
)
@click.option(
    "--stats-interval",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    callback=parse_stats_interval,
    metavar="SECONDS",
    envvar="PGHERALD_RELAY_STATS_INTERVAL",
    show_envvar=True,
    help="Seconds between the relay's reports of its rate, lag and totals, which pgherald "
    "status shows (0: none).",
)
@click.argument("channels", nargs=-1, required=True)
@friendly
def relay_cmd(
    dsn: str | None,
    to: str,
    stream: str | None,
    subject: str,
    group: str,
    start: str,
    stream_options: tuple[str, ...],
    maxlen: int | None,
    secret: str | None,
    webhook_batch: int,
    max_attempts: int,
    batch_size: int,
    metrics_port: int | None,
    metrics_host: str,
    stats_interval: float | None,
    channels: tuple[str, ...],
) -> None:
    """Publish the events of CHANNELS into NATS JetStream, Redis Streams or webhooks.

    A consumer group of the durable log: the group's position advances only after the broker
    acknowledged the events (at least once; effectively once with JetStream's and the Redis
    script's de-duplication). Run several with one --group to share the work. Until Ctrl-C or
    SIGTERM.
    """
    logging.getLogger("pgherald.relay").setLevel(logging.INFO)
    relay = Relay(
        dsn,
        to=to,
        channels=list(channels),
        group=group,
        start=parse_start(start),
        stream=stream,
        subject=subject,
        stream_config=parse_stream_options(stream_options),
        maxlen=maxlen,
        secret=secret,
        webhook_batch=webhook_batch,
        max_attempts=max_attempts,
        batch_size=batch_size,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        stats_interval=stats_interval,
    )
    # Fail before saying "relaying" when the database cannot be reached or the log used.
    with connection(dsn) as conn:
        require_schema(conn)
    with stop_on_signals(relay.stop):
        click.echo(
            f"relaying {', '.join(map(repr, channels))} to {relay.target} "
            f"(group {group!r}; Ctrl-C to stop)",
            err=True,
        )
        relay.run()
    s = relay.stats
    click.echo(
        f"relayed {s.relayed} events in {s.batches} batches"
        + (f" ({s.duplicates} duplicates dropped by the broker)" if s.duplicates else "")
        + (f", {s.dead_lettered} dead-lettered" if s.dead_lettered else ""),
        err=True,
    )
