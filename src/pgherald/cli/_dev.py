"""``pgherald dev start|stop|status|dsn``: an embedded PostgreSQL that outlives the command.

Every other command uses it when no DSN is given (see `dsn_or_dev_server`).
"""

from __future__ import annotations

import shlex
import sys

import click

from ._commands import cli, fail, friendly

NOT_RUNNING = 3
"""`dev status` / `dev dsn` when no server runs (as ``pg_ctl status`` does)."""


@cli.group("dev")
def dev_group() -> None:
    """An embedded PostgreSQL kept running in the background (needs the 'embedded' extra).

    While it runs, every command without --dsn, $PGHERALD_DSN, $PGHOST or $PGSERVICE uses it.
    Its data directory is $PGHERALD_EMBEDDED_DIR, else the default of docs/embedded.md.
    """


@dev_group.command("start")
@friendly
def dev_start() -> None:
    """Start it (or find it running) and print the DSN to export."""
    from ..embedded import EmbeddedPostgres, running_dsn

    server = EmbeddedPostgres(keep_running=True)
    if running_dsn(server.datadir) is None:
        click.echo(f"starting an embedded PostgreSQL in {server.datadir}...", err=True)
    else:
        click.echo(f"already running in {server.datadir}", err=True)
    # Even when it runs already (a demo may be using it): hold it, so that it keeps running
    # when that other process ends, until `pgherald dev stop` (EmbeddedPostgres.keep).
    with server:
        dsn = server.dsn
    click.echo(f"export PGHERALD_DSN={shlex.quote(dsn)}")
    click.echo("pgherald commands use it while it runs; stop it with: pgherald dev stop", err=True)


@dev_group.command("stop")
@friendly
def dev_stop() -> None:
    """Stop it (the data stays for the next start)."""
    from ..embedded import EmbeddedPostgres

    server = EmbeddedPostgres()
    if server.shut_down():
        click.echo(f"stopped the embedded PostgreSQL in {server.datadir}")
    else:
        click.echo(f"no embedded PostgreSQL runs in {server.datadir}")


@dev_group.command("status")
def dev_status() -> None:
    """Say whether it runs, where, and its DSN; exit status 3 when it does not run."""
    from ..embedded import default_dir, running_dsn

    dsn = running_dsn()
    if dsn is None:
        click.echo(f"not running (data directory {default_dir()}); start it: pgherald dev start")
        sys.exit(NOT_RUNNING)
    click.echo(f"running in {default_dir()}: {dsn}")


@dev_group.command("dsn")
def dev_dsn() -> None:
    """Print its DSN alone, for: export PGHERALD_DSN=$(pgherald dev dsn)."""
    from ..embedded import running_dsn

    dsn = running_dsn()
    if dsn is None:
        fail("no embedded PostgreSQL runs: start one with `pgherald dev start`", NOT_RUNNING)
    click.echo(dsn)
