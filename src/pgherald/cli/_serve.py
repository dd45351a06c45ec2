"""``pgherald serve``: the real-time gateway (SSE, WebSocket, HTTP publish) under uvicorn."""

from __future__ import annotations

from pathlib import Path

import click

from ._commands import cli, dsn_option, friendly


def _names(values: tuple[str, ...]) -> list[str]:
    """Repeatable options that also take comma-separated lists."""
    return [name.strip() for v in values for name in v.split(",") if name.strip()]


@cli.command()
@dsn_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=int, help="Port to listen on.")
@click.option(
    "--jwt-secret",
    envvar="PGHERALD_JWT_SECRET",
    show_envvar=True,
    default=None,
    help="Verify HS256 tokens with this shared secret (prefer the environment variable).",
)
@click.option(
    "--jwt-public-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Verify RS256/ES256 tokens with this PEM public key file.",
)
@click.option(
    "--allow-anonymous",
    "allow_anonymous",
    multiple=True,
    metavar="CHANNEL",
    help="Channels anyone may read without a token (repeat, or comma-separate; '*' patterns).",
)
@click.option(
    "--durable-channel",
    "durable_channels",
    multiple=True,
    metavar="CHANNEL",
    help="Channels served from the durable event log, resumable by Last-Event-ID (repeat).",
)
@click.option(
    "--heartbeat", default=15.0, show_default=True, help="Seconds between SSE ': ping' comments."
)
@friendly
def serve(
    dsn: str | None,
    host: str,
    port: int,
    jwt_secret: str | None,
    jwt_public_key: Path | None,
    allow_anonymous: tuple[str, ...],
    durable_channels: tuple[str, ...],
    heartbeat: float,
) -> None:
    """Serve events to browsers and services: GET /sse, /ws, POST /publish/CHANNEL, GET /.

    Access is denied by default: clients present a JWT (--jwt-secret or --jwt-public-key)
    whose claims name the channels they may read or write; --allow-anonymous opens channels
    for reading. With no DSN it starts an embedded PostgreSQL.
    """
    from .._conninfo import listener_conninfo
    from ..contrib.gateway import create_app
    from ..contrib.gateway.server import GatewayServer
    from ._demo import database

    if jwt_secret and jwt_public_key:
        raise click.UsageError("give --jwt-secret or --jwt-public-key, not both")
    anonymous, durable = _names(allow_anonymous), _names(durable_channels)
    if not (jwt_secret or jwt_public_key or anonymous):
        click.echo(
            "pgherald: warning: no --jwt-secret, --jwt-public-key or --allow-anonymous: every "
            "request will be refused",
            err=True,
        )
    with database(dsn, click.echo) as real_dsn:
        if durable:
            _ensure_schema(listener_conninfo(real_dsn), install=real_dsn != (dsn or ""))
        app = create_app(
            real_dsn,
            jwt_secret=jwt_secret,
            jwt_public_key=jwt_public_key,
            allow_anonymous=anonymous,
            durable_channels=durable,
            heartbeat=heartbeat,
        )
        click.echo(f"pgherald gateway on http://{host}:{port}/ (Ctrl-C to stop)")
        GatewayServer(app, host=host, port=port).run()


def _ensure_schema(conninfo: str, *, install: bool) -> None:
    """Durable channels need the schema: install it on an embedded server, else check it."""
    import psycopg

    from .. import install as do_install
    from .. import sql
    from .._conninfo import connect_error
    from .._schema import MISSING
    from ..errors import SchemaMissing

    try:
        conn = psycopg.connect(conninfo, autocommit=True)
    except psycopg.OperationalError as exc:
        raise connect_error(conninfo, " ".join(str(exc).split())) from None
    with conn:
        if install:
            do_install(conn)
            return
        row = conn.execute(sql.query("schema_installed")).fetchone()
        if not row or not row[0]:
            raise SchemaMissing(MISSING)
