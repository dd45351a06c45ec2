"""``pgherald serve``: the real-time gateway (SSE, WebSocket, HTTP publish) under uvicorn."""

from __future__ import annotations

import contextlib
import errno
import socket
from pathlib import Path

import click

from ..errors import UsageError
from ._commands import cli, connection, dsn_option, fail, friendly

MIN_SECRET_BYTES = 32
"""HS256 wants a key of at least 256 bits (RFC 7518, 3.2): a short one can be brute-forced."""


def _names(values: tuple[str, ...]) -> list[str]:
    """Repeatable options that also take comma-separated lists."""
    return [name.strip() for v in values for name in v.split(",") if name.strip()]


@cli.command()
@dsn_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=8080,
    show_default=True,
    type=click.IntRange(1, 65535),
    help="Port to listen on (1-65535).",
)
@click.option(
    "--jwt-secret",
    envvar="PGHERALD_JWT_SECRET",
    show_envvar=True,
    default=None,
    help="Verify HS256 tokens with this shared secret, at least 32 bytes (prefer the "
    "environment variable).",
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
    "--source",
    envvar="PGHERALD_GATEWAY_SOURCE",
    show_envvar=True,
    default=None,
    metavar="URL",
    help="Take durable channels' live events from the JetStream stream of 'pgherald relay' "
    "(nats://HOST:PORT) instead of tailing the log: replicas add no polling to the database.",
)
@click.option(
    "--source-stream",
    default="PGHERALD",
    show_default=True,
    help="With --source: the relay's JetStream stream (its --stream).",
)
@click.option(
    "--source-subject",
    default="pgherald.{channel}",
    show_default=True,
    help="With --source: the relay's subject per channel (its --subject).",
)
@click.option(
    "--cors-origin",
    "cors_origins",
    multiple=True,
    metavar="ORIGIN",
    help="Web pages of this origin may use the gateway from the browser (repeat, or "
    "comma-separate; exact, https://app.example.com, or a pattern, https://*.example.com). "
    "Without it, browser requests from other origins are refused.",
)
@click.option(
    "--channel",
    "channels",
    multiple=True,
    metavar="CHANNEL",
    help="A plain channel wildcard subscriptions may match (repeat, or comma-separate); change "
    "triggers' and durable channels are known without it.",
)
@click.option(
    "--heartbeat", default=15.0, show_default=True, help="Seconds between SSE ': ping' comments."
)
@click.option(
    "--header-timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds a connection has to send a request's headers.",
)
@click.option(
    "--keep-alive-timeout",
    default=5.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds an idle connection stays open between requests.",
)
@click.option(
    "--max-body",
    default=1024 * 1024,
    show_default=True,
    type=click.IntRange(min=1),
    help="Bytes of a POST /publish body or WebSocket message, at most (413 beyond).",
)
@click.option(
    "--max-connections-per-client",
    default=100,
    show_default=True,
    type=click.IntRange(min=0),
    help="Open connections from one client address, at most (429 beyond; 0: no limit). "
    "Behind a reverse proxy every client has its address: use 0 and limit at the proxy.",
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
    source: str | None,
    source_stream: str,
    source_subject: str,
    cors_origins: tuple[str, ...],
    channels: tuple[str, ...],
    heartbeat: float,
    header_timeout: float,
    keep_alive_timeout: float,
    max_body: int,
    max_connections_per_client: int,
) -> None:
    """Serve events to browsers and services: GET /sse, /ws, POST /publish/CHANNEL, GET /.

    Access is denied by default: clients present a JWT (--jwt-secret or --jwt-public-key)
    whose claims name the channels they may read or write; --allow-anonymous opens channels
    for reading. With no DSN it starts an embedded PostgreSQL.
    """
    # The gateway extra first: without it, say so before starting anything (see friendly).
    from .._conninfo import describe, listener_conninfo
    from ..contrib.gateway import create_app
    from ..contrib.gateway.cors import CorsPolicy
    from ..contrib.gateway.server import GatewayServer
    from ._demo import database

    if jwt_secret and jwt_public_key:
        raise click.UsageError("give --jwt-secret or --jwt-public-key, not both")
    if jwt_secret and len(jwt_secret.encode()) < MIN_SECRET_BYTES:
        raise click.BadParameter(
            f"is {len(jwt_secret.encode())} bytes; HS256 needs at least {MIN_SECRET_BYTES}: "
            "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'",
            param_hint="'--jwt-secret' / PGHERALD_JWT_SECRET",
        )
    anonymous, durable = _names(allow_anonymous), _names(durable_channels)
    origins, known = _names(cors_origins), _names(channels)
    try:
        CorsPolicy(origins)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--cors-origin'") from None
    patterns = [ch for ch in known if any(c in ch for c in "*?[")]
    if patterns:
        raise click.BadParameter(
            f"{patterns[0]!r} is a pattern: name plain channels here (subscriptions take patterns)",
            param_hint="'--channel'",
        )
    if source is not None and not source.lower().startswith(("nats://", "tls://")):
        raise click.BadParameter(
            f"{source!r}: the source is the JetStream stream of pgherald relay, nats://HOST:PORT",
            param_hint="'--source'",
        )
    if source is not None and not durable:
        raise click.BadParameter(
            "takes durable channels' events from the relay: name them with --durable-channel",
            param_hint="'--source'",
        )
    if not (jwt_secret or jwt_public_key or anonymous):
        click.echo(
            "pgherald: warning: no --jwt-secret, --jwt-public-key or --allow-anonymous: every "
            "request will be refused",
            err=True,
        )
    key = jwt_public_key.read_bytes() if jwt_public_key else None
    sock = _bind(host, port)  # before the database: a taken port fails at once
    with sock, database(dsn, click.echo) as real_dsn:
        _check_database(real_dsn, durable=bool(durable), install=real_dsn != (dsn or ""))
        try:
            app = create_app(
                real_dsn,
                jwt_secret=jwt_secret,
                jwt_public_key=key,
                allow_anonymous=anonymous,
                durable_channels=durable,
                source=source,
                source_stream=source_stream,
                source_subject=source_subject,
                cors_origins=origins,
                channels=known,
                heartbeat=heartbeat,
                max_body=max_body,
            )
        except ValueError as exc:  # a key that is not one: refuse now, not 500 on every token
            raise UsageError(f"--jwt-public-key {jwt_public_key}: {exc}") from None
        where = describe(listener_conninfo(real_dsn))
        click.echo(f"pgherald gateway on http://{host}:{port}/, database {where} (Ctrl-C to stop)")
        _raise_file_limit()
        GatewayServer(
            app,
            host=host,
            port=port,
            header_timeout=header_timeout,
            timeout_keep_alive=keep_alive_timeout,
            max_connections_per_client=max_connections_per_client,
        ).run(sockets=[sock])


def _raise_file_limit() -> None:
    """Every connection is a file: take the hard limit, not the 1,024 soft default."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a taken port is one line with the fix."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        fail(f"--host {host}: cannot resolve it ({exc}): give an IP address or a local host name")
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            fail(
                f"port {port} on {host} is already in use (another pgherald serve?): stop "
                "that server, or pick a free port with --port"
            )
        if exc.errno == errno.EACCES:
            fail(f"no permission to listen on port {port}: use a port above 1023 with --port")
        fail(f"cannot listen on {host}:{port} ({exc.strerror}): check --host and --port")
    sock.set_inheritable(True)
    return sock


def _check_database(dsn: str, *, durable: bool, install: bool) -> None:
    """Connect once before serving: an unreachable database or a missing schema is one line.

    Durable channels need the schema: installed on an embedded server (*install*), else checked.
    """
    from .. import install as do_install
    from .. import sql
    from .._schema import MISSING
    from ..errors import PrivilegeError, SchemaMissing

    with connection(dsn, application_name="pgherald-gateway") as conn:
        if not durable:
            return
        if install:
            do_install(conn)
            return
        row = conn.execute(sql.query("schema_installed")).fetchone()
        if not row or not row[0]:
            usable = conn.execute(
                "SELECT has_schema_privilege(oid, 'USAGE') FROM pg_namespace "
                "WHERE nspname = 'pgherald'"
            ).fetchone()
            if usable is not None and not usable[0]:  # there, but this role may not see it
                raise PrivilegeError(
                    "pgherald serve --durable-channel: the database role has no USAGE on "
                    "schema pgherald: use the role that owns it, or ask your DBA for the "
                    "grants in docs/cli.md#privileges"
                )
            raise SchemaMissing(MISSING)
