"""What a new user or an operator meets first: consent, one-line errors, odd input (issue 16)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

import pgherald
from tests.fix_cli import cli_env, on_a_terminal, one_line_error, pgherald_cmd, run, schema_exists
from tests.fix_faults import free_port

UNREACHABLE = "host=127.0.0.1 port=1 connect_timeout=2"


def event_count(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT count(*) FROM pgherald.events_v1").fetchone()
    assert row is not None
    return int(row[0])


# -- (a) nothing destructive without consent --


@pytest.fixture
def installed(conn: psycopg.Connection) -> psycopg.Connection:
    pgherald.install(conn)
    pgherald.publish(conn, "orders", {"n": 1})
    return conn


@pytest.mark.parametrize("stdin", ["n\n", "y\n", "", None], ids=["n", "y", "empty", "devnull"])
def test_uninstall_without_yes_and_no_terminal_refuses(
    dsn: str, installed: psycopg.Connection, stdin: str | None
) -> None:
    line = one_line_error(run(dsn, "uninstall", input=stdin), status=2)
    assert "--yes" in line
    assert "not a terminal" in line
    assert schema_exists(installed)
    assert event_count(installed) == 1


def test_uninstall_with_yes_drops_the_schema(dsn: str, installed: psycopg.Connection) -> None:
    out = run(dsn, "uninstall", "--yes")
    assert (out.returncode, out.stdout) == (0, "uninstalled\n"), out.stderr
    assert not schema_exists(installed)


def test_uninstall_on_a_terminal_asks_and_no_keeps_the_schema(
    dsn: str, installed: psycopg.Connection
) -> None:
    status, err = on_a_terminal(dsn, b"n\n", "uninstall", timeout=30)
    assert status == 1, err
    assert "nothing was changed" in err
    assert "Traceback" not in err
    assert schema_exists(installed)
    status, err = on_a_terminal(dsn, b"y\n", "uninstall", timeout=30)
    assert status == 0, err
    assert not schema_exists(installed)


def _age_events(conn: psycopg.Connection) -> None:
    conn.execute("UPDATE pgherald.events_v1 SET created_at = now() - interval '30 days'")


def test_prune_force_without_yes_and_no_terminal_refuses(
    dsn: str, installed: psycopg.Connection
) -> None:
    _age_events(installed)
    line = one_line_error(run(dsn, "prune", "--force", input="y\n"), status=2)
    assert "--yes" in line
    assert event_count(installed) == 1
    ok = run(dsn, "prune", "--force", "--yes")
    assert ok.returncode == 0, ok.stderr
    assert event_count(installed) == 0


def test_plain_prune_needs_no_consent(dsn: str, installed: psycopg.Connection) -> None:
    out = run(dsn, "prune")  # deletes only what every group consumed: nothing to confirm
    assert out.returncode == 0, out.stderr


# -- (b) every failure is one line: a walk over every command --


def _leaf_commands() -> list[str]:
    """Every runnable command path below ``pgherald``, from the click tree itself."""
    import click

    from pgherald.cli import command_tree

    cli = command_tree()  # every command registered, as `pgherald` runs them

    paths: list[str] = []

    def walk(group: click.Group, prefix: str) -> None:
        for name, cmd in group.commands.items():
            path = f"{prefix}{name}"
            if isinstance(cmd, click.Group):
                walk(cmd, path + " ")
            else:
                paths.append(path)

    walk(cli, "")
    return sorted(paths)


SAMPLES: dict[str, list[str]] = {
    "cdc add": ["orders"],
    "cdc drop": ["--yes"],
    "cdc remove": ["orders"],
    "cdc run": [],
    "cdc status": [],
    "consume": ["--group", "g", "orders"],
    "ddl disable": [],
    "ddl enable": [],
    "dead list": [],
    "dead purge": ["g", "--all", "--yes"],
    "dead redeliver": ["g", "--all"],
    "dead show": ["g", "1"],
    "demo": ["--pause", "0"],
    "dev dsn": [],
    "dev start": [],
    "dev status": [],
    "dev stop": [],
    "groups delete": ["g", "--yes"],
    "groups reset": ["g", "--to", "now", "--yes"],
    "install": [],
    "listen": ["orders"],
    "maintain": [],
    "notify": ["orders", "x"],
    "partitions": ["32", "--yes"],
    "prune": ["--force", "--yes"],
    "publish": ["orders", "1"],
    "relay": ["--to", "redis://127.0.0.1:6379/0", "orders"],
    "retention off": [],
    "retention set": ["7d", "--abandon-after", "3d"],
    "schedule add": ["--cron", "* * * * *", "--channel", "orders", "s"],
    "schedule list": [],
    "schedule remove": ["s"],
    "schedule run": [],
    "serve": ["--allow-anonymous", "orders", "--durable-channel", "orders"],
    "sql install": [],
    "sql trigger add": ["orders"],
    "sql uninstall": [],
    "status": [],
    "trigger add": ["orders"],
    "trigger list": [],
    "trigger remove": ["orders"],
    "uninstall": ["--yes"],
    "watch": ["--yes", "orders"],
}
"""Arguments that get each command as far as its database: a new command must be added here."""

OFFLINE = {"sql install", "sql trigger add", "sql uninstall"} | {
    "dev dsn",
    "dev start",
    "dev status",
    "dev stop",
}
"""Commands that take no DSN (`dev` is tested on its own below)."""


def _walk_args(path: str) -> list[str]:
    args = [*path.split(), *SAMPLES[path]]
    return [*args, "--port", str(free_port())] if path == "serve" else args


def test_every_command_is_in_the_walk() -> None:
    assert _leaf_commands() == sorted(SAMPLES)


@pytest.mark.parametrize("path", sorted(set(SAMPLES) - OFFLINE))
def test_unreachable_database_is_one_line(path: str) -> None:
    line = one_line_error(run(UNREACHABLE, *_walk_args(path), timeout=60), status=1)
    assert "cannot connect to PostgreSQL at 127.0.0.1:1/" in line
    assert "Check the DSN" in line


OPTION_VARIANTS: list[list[str]] = [
    ["listen", "--json", "orders"],
    ["consume", "--group", "g", "--from", "now", "--json", "orders"],
    ["consume", "--group", "g", "--from", "2026-01-01T00:00:00Z", "orders"],
    ["status", "--json"],
    ["status", "--channel", "orders"],
    ["groups", "--json", "--channel", "orders"],
    ["prune", "--abandoned-after", "7d"],
    ["prune", "--older-than", "1h"],
    ["install", "--retention", "7d", "--partitions", "32"],
    ["maintain", "--json"],
    ["publish", "--key", "k", "orders", "-"],
    ["notify", "orders", "-"],
    ["trigger", "add", "--durable", "--columns", "id", "--events", "insert", "orders"],
    ["trigger", "list", "--json"],
    ["watch", "--temporary", "--json", "orders"],
    ["watch", "--cdc", "s", "--temporary", "orders"],
    ["serve", "--jwt-secret", "s" * 32, "--durable-channel", "orders", "--heartbeat", "1"],
    ["serve", "--allow-anonymous", "orders,other"],
    ["serve", "--allow-anonymous", "o", "--durable-channel", "o", "--source", "nats://127.0.0.1:1"],
]
"""Each command's options, walked too (stdin gives '1' where a payload is read)."""


def _with_port(args: list[str]) -> list[str]:
    return [*args, "--port", str(free_port())] if args[0] == "serve" else args


@pytest.mark.parametrize("args", OPTION_VARIANTS, ids=" ".join)
def test_options_with_unreachable_database_are_one_line(args: list[str]) -> None:
    line = one_line_error(run(UNREACHABLE, *_with_port(args), input="1", timeout=60), status=1)
    assert "cannot connect to PostgreSQL at 127.0.0.1:1/" in line


@pytest.fixture
def no_privilege_dsn(dsn: str, conn: psycopg.Connection) -> Iterator[str]:
    """A DSN for a role that may log in and nothing else (a DBA-managed database's app role)."""
    pgherald.install(conn)
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")
    role = f"pgherald_nopriv_{uuid.uuid4().hex[:8]}"
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        yield make_conninfo(dsn, user=role)
    finally:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


PRIVILEGED = {
    "consume",
    "dead list",
    "dead purge",
    "dead redeliver",
    "dead show",
    "groups delete",
    "groups reset",
    "install",
    "maintain",
    "partitions",
    "prune",
    "publish",
    "relay",
    "retention off",
    "retention set",
    "schedule add",
    "schedule list",
    "schedule remove",
    "schedule run",
    "serve",
    "status",
    "trigger add",
    "uninstall",
    "watch",
}
"""What the no-privilege role must be refused, each naming the missing privilege."""


@pytest.mark.parametrize("path", sorted(PRIVILEGED))
def test_role_without_privileges_is_one_line(
    no_privilege_dsn: str, conn: psycopg.Connection, path: str
) -> None:
    line = one_line_error(run(no_privilege_dsn, *_walk_args(path), timeout=60), status=1)
    assert "privilege" in line or "USAGE" in line, line
    assert schema_exists(conn)  # nothing was dropped


@pytest.mark.parametrize("path", ["ddl enable", "ddl disable"])
def test_ddl_triggers_without_a_superuser_are_one_line(no_privilege_dsn: str, path: str) -> None:
    # Event triggers are a superuser's: no grant makes them possible, so the line says so.
    line = one_line_error(run(no_privilege_dsn, *_walk_args(path), timeout=60), status=1)
    assert "need a superuser" in line, line


def test_removing_a_trigger_of_a_table_the_role_does_not_own_is_one_line(
    dsn: str, no_privilege_dsn: str, conn: psycopg.Connection
) -> None:
    # (`trigger list` and `remove` of a table without one need no privilege: the catalog.)
    assert run(dsn, "trigger", "add", "orders").returncode == 0
    line = one_line_error(
        run(no_privilege_dsn, "trigger", "remove", "orders", timeout=60), status=1
    )
    assert "must be owner of" in line, line
    assert run(dsn, "trigger", "list").stdout.startswith("public.orders:")  # still there


@pytest.mark.parametrize(
    "args",
    [
        a
        for a in OPTION_VARIANTS
        if a[0] not in ("listen", "notify")
        and a[-1] != "orders,other"
        and a[:2] != ["trigger", "list"]
        and "--cdc" not in a  # needs wal_level = logical and REPLICATION, not table privileges
    ],
    ids=" ".join,
)
def test_options_as_role_without_privileges_are_one_line(
    no_privilege_dsn: str, conn: psycopg.Connection, args: list[str]
) -> None:
    line = one_line_error(run(no_privilege_dsn, *_with_port(args), input="1", timeout=60), status=1)
    assert "privilege" in line or "USAGE" in line, line
    assert schema_exists(conn)


@pytest.mark.parametrize("path", ["ddl disable", "ddl enable"])
def test_ddl_without_superuser_is_one_line(no_privilege_dsn: str, path: str) -> None:
    line = one_line_error(run(no_privilege_dsn, *_walk_args(path)), status=1)
    assert line.endswith("or ask your DBA to run it")


@pytest.mark.parametrize("path", ["trigger list", "trigger remove", "notify"])
def test_what_needs_no_privilege_works(no_privilege_dsn: str, path: str) -> None:
    out = run(no_privilege_dsn, *_walk_args(path))
    assert out.returncode == 0, out.stderr


def test_demo_as_role_without_privileges_has_no_traceback(no_privilege_dsn: str) -> None:
    out = run(no_privilege_dsn, *_walk_args("demo"), timeout=90)
    assert "Traceback" not in out.stderr + out.stdout
    if out.returncode:
        one_line_error(out, status=1)


# -- serve: every refusal before serving is one line --


BLOCK_STARLETTE = (
    "import sys; sys.modules['starlette'] = None; "  # as if the gateway extra were missing
    "from pgherald.cli import main; main()"
)


def test_serve_without_the_gateway_extra_is_one_line(dsn: str) -> None:
    out = subprocess.run(
        [pgherald_cmd()[0], "-c", BLOCK_STARLETTE, "serve", "--allow-anonymous", "x"],
        env=cli_env(dsn),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    line = one_line_error(out, status=2)
    assert "pip install 'pgherald[gateway]'" in line
    assert "starlette" in line


def test_the_command_without_the_cli_extra_says_how_to_get_it(dsn: str) -> None:
    # cli.md: without click (the `cli` extra) the command is one line and exit status 2.
    out = subprocess.run(
        [
            pgherald_cmd()[0],
            "-c",
            "import sys; sys.modules['click'] = None; from pgherald.cli import main; main()",
            "listen",
            "ch",
        ],
        env=cli_env(dsn),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (out.returncode, out.stdout, out.stderr) == (
        2,
        "",
        "pgherald: the command line needs the 'cli' extra: pip install 'pgherald[cli]'\n",
    )


def test_serve_with_a_file_that_is_not_a_key_refuses_to_start(dsn: str, tmp_path: object) -> None:
    from pathlib import Path

    bad = Path(str(tmp_path)) / "key.pem"
    bad.write_text("not a key\n")
    port = str(free_port())
    line = one_line_error(run(dsn, "serve", "--jwt-public-key", str(bad), "--port", port), status=1)
    assert "not a PEM public key" in line
    assert "BEGIN PUBLIC KEY" in line


def test_serve_with_a_private_key_says_to_give_the_public_half(dsn: str, tmp_path: object) -> None:
    from pathlib import Path

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    key = Path(str(tmp_path)) / "private.pem"
    key.write_bytes(pem)
    line = one_line_error(run(dsn, "serve", "--jwt-public-key", str(key)), status=1)
    assert "give its public half" in line


@pytest.mark.parametrize("port", ["99999", "0", "-1"])
def test_serve_port_out_of_range_is_refused(dsn: str, port: str) -> None:
    line = one_line_error(run(dsn, "serve", "--allow-anonymous", "x", "--port", port), status=2)
    assert "1<=x<=65535" in line


def test_serve_short_jwt_secret_is_refused_with_a_hint(dsn: str) -> None:
    line = one_line_error(run(dsn, "serve", "--jwt-secret", "abc"), status=2)
    assert "at least 32" in line
    assert "secrets.token_urlsafe" in line


def test_serve_with_durable_channels_and_no_schema_is_one_line(
    dsn: str, conn: psycopg.Connection
) -> None:
    """On a server of the user's (a DSN given), serve does not install the schema: it names
    the fix and exits before serving."""
    from pgherald._schema import MISSING

    port = str(free_port())
    args = ["serve", "--allow-anonymous", "orders", "--durable-channel", "orders", "--port", port]
    out = run(dsn, *args)
    assert one_line_error(out, status=1) == f"pgherald: error: {MISSING}"
    assert "pgherald gateway on" not in out.stdout  # it never got as far as serving
    assert not schema_exists(conn)
    # Plain channels need no schema: the same database serves them (so the line above was
    # about the durable channel, not the database).
    with serving(dsn, "--allow-anonymous", "orders"):
        pass


def test_serve_port_taken_is_one_line_with_a_hint(dsn: str) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        line = one_line_error(run(dsn, "serve", "--allow-anonymous", "x", "--port", port), status=1)
    assert f"port {port} on 127.0.0.1 is already in use" in line
    assert "--port" in line


# -- (c) small things a newcomer notices --


def test_python_dash_m_pgherald_runs_the_cli() -> None:
    out = subprocess.run(
        [pgherald_cmd()[0], "-m", "pgherald", "--help"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert "Usage: pgherald" in out.stdout


def test_usage_errors_are_one_line(dsn: str) -> None:
    line = one_line_error(run(dsn, "notify"), status=2)
    assert "Missing argument 'CHANNEL'" in line
    assert "pgherald notify --help" in line


def test_consume_writes_no_colour_codes_into_a_pipe(dsn: str, conn: psycopg.Connection) -> None:
    pgherald.install(conn)
    pgherald.publish(conn, "orders", {"n": 1})
    env = {k: v for k, v in cli_env(dsn).items() if k != "NO_COLOR"}
    with subprocess.Popen(
        pgherald_cmd("consume", "--group", "g", "orders"),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        proc.terminate()
        proc.wait(10)
    assert line.endswith(' orders {"n": 1}\n'), line
    assert "\x1b" not in line


def test_listen_says_where_it_listens_on_stderr(dsn: str) -> None:
    with subprocess.Popen(
        pgherald_cmd("listen", "orders", "Chat Room"),
        env=cli_env(dsn),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stderr is not None
        first = proc.stderr.readline()
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    db = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    assert first.startswith("listening on 'orders', 'Chat Room' at "), first
    assert f"127.0.0.1:5432/{db}" in first or f"/{db}" in first
    assert out == ""  # stdout is for notifications only


# -- (d) odd input to the CLI --


def test_channel_that_is_not_utf8_is_one_line(dsn: str) -> None:
    channel = os.fsdecode(b"\xff\xfe")  # what the shell hands over: surrogate escapes
    for args in (["notify", channel, "x"], ["publish", channel, "1"], ["listen", channel]):
        line = one_line_error(run(dsn, *args), status=1)
        assert "not valid UTF-8" in line


def test_stdin_that_is_not_utf8_is_one_line(dsn: str, conn: psycopg.Connection) -> None:
    pgherald.install(conn)
    for command in ("notify", "publish"):
        out = subprocess.run(
            pgherald_cmd(command, "orders", "-"),
            env=cli_env(dsn),
            input=b"\xff\xfe{}",
            capture_output=True,
            timeout=30,
        )
        err = out.stderr.decode()
        assert out.returncode == 1, err
        assert "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
        assert "not valid UTF-8" in err


def test_publish_of_json_nested_5000_deep_is_one_line(dsn: str, conn: psycopg.Connection) -> None:
    pgherald.install(conn)
    line = one_line_error(
        run(dsn, "publish", "orders", "-", input="[" * 5000 + "]" * 5000), status=1
    )
    assert "nested too deeply" in line
    assert event_count(conn) == 0


# -- (d) hostile payloads through `pgherald serve` --

SECRET = "new-user-test-secret-0123456789-abcdef"


@contextlib.contextmanager
def serving(dsn: str, *args: str) -> Iterator[str]:
    """`pgherald serve ARGS` in a subprocess: its base URL once /healthz answers 200."""
    import urllib.request

    port = free_port()
    with subprocess.Popen(
        pgherald_cmd("serve", "--port", str(port), *args),
        env=cli_env(dsn),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:  # bounded polling until it serves
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "pgherald serve did not become healthy"
            time.sleep(0.1)
        try:
            yield url
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=20)
    assert "Traceback" not in err, err


@pytest.fixture
def gateway(dsn: str) -> Iterator[str]:
    with serving(dsn, "--allow-anonymous", "orders", "--jwt-secret", SECRET) as url:
        yield url


def _strict(text: str) -> object:
    """JSON as a browser's JSON.parse reads it: NaN and Infinity are errors."""

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


HOSTILE = [
    "[" * 3999 + "]" * 3999,  # 7,998 bytes: a RecursionError in a naive encoder
    "NaN",
    "[Infinity, -Infinity]",
    '{"a": NaN}',
    "{" * 600 + "}" * 600,  # not even JSON, but deep
    '"unterminated',
    "line one\nline two",
]


def test_hostile_payloads_reach_websocket_clients_as_strict_json(
    gateway: str, conn: psycopg.Connection
) -> None:
    from websockets.sync.client import connect

    with connect(gateway.replace("http", "ws") + "/ws", open_timeout=10) as ws:
        ws.send(json.dumps({"type": "subscribe", "channels": ["orders"]}))
        assert _strict(str(ws.recv(timeout=10))) == {"type": "subscribed", "channels": ["orders"]}
        for payload in HOSTILE:
            pgherald.notify(conn, "orders", payload)
        pgherald.notify(conn, "orders", '{"after": "all of them"}')
        got = [_strict(str(ws.recv(timeout=10))) for _ in range(len(HOSTILE) + 1)]
    # Each is the payload as text (a JSON string), and the subscriber is still there after.
    assert [m["payload"] for m in got[:-1]] == HOSTILE  # type: ignore[index]
    assert got[-1] == {"type": "event", "channel": "orders", "payload": {"after": "all of them"}}


def test_hostile_payloads_keep_the_sse_stream(gateway: str, conn: psycopg.Connection) -> None:
    import httpx

    with httpx.stream("GET", f"{gateway}/sse?channel=orders", timeout=10) as response:
        assert response.status_code == 200
        lines = response.iter_lines()  # 200 comes after the gateway's LISTEN: no race
        pgherald.notify(conn, "orders", HOSTILE[0])
        pgherald.notify(conn, "orders", "NaN")
        data: list[str] = []
        for line in lines:
            if line.startswith("data: "):
                data.append(line[6:])
            if len(data) == 2:
                break
    assert data == [HOSTILE[0], "NaN"]  # SSE data is text: passed through unchanged


def test_token_whose_exp_is_a_digit_string_ends_the_stream_at_expiry(gateway: str) -> None:
    import httpx
    import jwt

    exp = int(time.time()) + 2
    token = jwt.encode({"channels": ["private"], "exp": str(exp)}, SECRET, algorithm="HS256")
    started = time.monotonic()
    with httpx.stream(
        "GET",
        f"{gateway}/sse?channel=private",
        headers={"Authorization": f"Bearer {token}"},
        timeout=15,
    ) as response:
        assert response.status_code == 200
        text = "".join(response.iter_text())  # until the gateway ends the stream
    assert "token expired" in text
    assert time.monotonic() - started < 12


# -- (e) the embedded server as root changes no permission without a message --


def test_embedded_default_dir_as_root_is_outside_the_home(monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    from pgherald import embedded

    monkeypatch.delenv("PGHERALD_EMBEDDED_DIR", raising=False)
    home = Path("~").expanduser()
    if os.geteuid() == 0:
        assert embedded.default_dir() == embedded.ROOT_DIR
        assert home not in embedded.default_dir().parents
    else:
        assert embedded.default_dir() == home / ".cache/pgherald/pgdata"
    monkeypatch.setenv("PGHERALD_EMBEDDED_DIR", "/srv/pg")
    assert embedded.default_dir() == Path("/srv/pg")


@pytest.mark.skipif(os.geteuid() != 0, reason="pgserver changes permissions only as root")
def test_embedded_as_root_names_every_directory_it_opens(caplog: pytest.LogCaptureFixture) -> None:
    import shutil
    import stat
    import tempfile
    from pathlib import Path

    from pgherald.embedded import EmbeddedPostgres

    base = Path(tempfile.mkdtemp(prefix="pgherald-embedded-"))
    base.chmod(0o755)
    closed = base / "closed"
    closed.mkdir(mode=0o700)
    try:
        with (
            caplog.at_level("WARNING", logger="pgherald.embedded"),
            EmbeddedPostgres(closed / "pgdata") as pg,
            psycopg.connect(pg.dsn) as c,
        ):
            assert c.execute("SELECT 1").fetchone() == (1,)
        warned = [r.getMessage() for r in caplog.records if r.name == "pgherald.embedded"]
        assert len(warned) == 1, warned
        assert f"{closed}," in warned[0] or f"{closed}." in warned[0]
        assert stat.S_IMODE(closed.stat().st_mode) == 0o755  # what the message said
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_consume_passes_an_event_nested_too_deep_to_the_dead_letters(
    dsn: str, conn: psycopg.Connection
) -> None:
    import signal

    pgherald.install(conn)
    # Written with SQL, as any role with INSERT can: jsonb takes it, Python's json cannot.
    (poison,) = conn.execute(
        "SELECT pgherald.publish_v1('orders', (repeat('[', 3000) || repeat(']', 3000))::jsonb)"
    ).fetchone()  # type: ignore[misc]
    good = pgherald.publish(conn, "orders", {"n": 1})
    proc = subprocess.Popen(
        pgherald_cmd("consume", "--json", "--group", "g", "orders"),
        env=cli_env(dsn),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = json.loads(proc.stdout.readline())  # the stream goes on past the poison
        assert line["id"] == good
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert proc.stderr is not None
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()
    (dead,) = pgherald.dead_letters(conn, group="g")
    assert dead.event_id == poison


def test_live_page_keeps_lines_shows_ids_only_on_durable_events_and_says_why_refused(
    dsn: str, conn: psycopg.Connection, tmp_path: object
) -> None:
    import shutil
    from pathlib import Path

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        if os.environ.get("CI"):
            pytest.fail("chromium/chromedriver missing on CI: scripts/dev.py should install them")
        pytest.skip(
            "chromium/chromedriver not installed (apt-get install chromium chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    pgherald.install(conn)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    args = ["--allow-anonymous", "orders,plain", "--durable-channel", "orders"]
    with serving(dsn, *args) as base:
        browser = webdriver.Chrome(service=Service(driver_path), options=options)
        try:
            wait = WebDriverWait(browser, 15)
            browser.get(base + "/")
            channels = browser.find_element(By.ID, "channels")
            channels.clear()  # (prefilled with the channels the server allows)
            channels.send_keys("orders, plain")
            browser.find_element(By.ID, "connect").click()
            wait.until(lambda b: b.find_element(By.ID, "status").text.startswith("connected"))
            event_id = pgherald.publish(conn, "orders", {"n": 1})
            wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#events li")) == 1)
            pgherald.notify(conn, "plain", "line one\nline two")
            wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#events li")) == 2)
            plain, durable = browser.find_elements(By.CSS_SELECTOR, "#events li")  # newest first
            assert f"#{event_id}" in durable.text
            assert "#" not in plain.find_element(By.CSS_SELECTOR, ".meta").text
            assert plain.find_element(By.CSS_SELECTOR, ".data").text == "line one\nline two"
            browser.find_element(By.ID, "disconnect").click()
            channels = browser.find_element(By.ID, "channels")
            channels.clear()
            channels.send_keys("secret")
            browser.find_element(By.ID, "connect").click()
            wait.until(lambda b: "401: a token is needed" in b.find_element(By.ID, "events").text)
            shot = Path(str(tmp_path)) / "live-page.png"  # kept by pytest for a look
            assert browser.save_screenshot(str(shot))
        finally:
            browser.quit()


# -- the docs match the code --


def _all_options() -> dict[str, list[object]]:
    import click

    from pgherald.cli._commands import cli

    _leaf_commands()  # registers every command
    found: dict[str, list[object]] = {}

    def walk(group: click.Group, prefix: str) -> None:
        for name, cmd in group.commands.items():
            if isinstance(cmd, click.Group):
                walk(cmd, f"{prefix}{name} ")
            else:
                found[f"{prefix}{name}"] = [p for p in cmd.params if isinstance(p, click.Option)]

    walk(cli, "")
    return found


def test_documented_environment_variables_are_the_real_ones() -> None:
    import re
    from pathlib import Path

    docs = (Path(__file__).parents[2] / "docs" / "cli.md").read_text()
    real = {"PGHERALD_EMBEDDED_DIR"}  # read by pgherald.embedded
    generic = set()  # PGHERALD_<COMMAND>_<OPTION>: documented once, as a rule
    for path, options in _all_options().items():
        for option in options:
            envvar = getattr(option, "envvar", None)
            flag = max(option.opts, key=len).lstrip("-")  # type: ignore[attr-defined]
            generic.add(f"PGHERALD_{path} {flag}".upper().replace(" ", "_").replace("-", "_"))
            if isinstance(envvar, str):
                real.add(envvar)
    documented = set(re.findall(r"`(PGHERALD_[A-Z_]+)", docs)) - {"PGHERALD_"}
    assert real - generic - documented == set(), "undocumented"
    assert documented - real - generic == set(), "documented but not real"


def test_every_option_is_documented() -> None:
    from pathlib import Path

    docs = "\n".join(p.read_text() for p in (Path(__file__).parents[2] / "docs").glob("*.md"))
    missing = [
        f"{path} {flag}"
        for path, options in _all_options().items()
        for option in options
        for flag in option.opts  # type: ignore[attr-defined]
        if flag.startswith("--") and flag not in ("--help", "--dsn") and flag not in docs
    ]
    assert missing == []


# -- the demo on a server of yours leaves nothing behind --


def test_demo_on_an_empty_database_drops_the_schema_it_installed(
    dsn: str, conn: psycopg.Connection
) -> None:
    out = run(dsn, "demo", "--pause", "0", timeout=90)
    assert out.returncode == 0, out.stderr
    assert "dropped it again" in out.stdout
    assert not schema_exists(conn)
    tables = conn.execute(
        "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
    ).fetchone()
    assert tables == (0,)


def test_demo_where_pgherald_is_installed_removes_only_its_own(
    dsn: str, installed: psycopg.Connection
) -> None:
    out = run(dsn, "demo", "--pause", "0", timeout=90)
    assert out.returncode == 0, out.stderr
    assert event_count(installed) == 1  # the fixture's event, not the demo's
    groups = installed.execute("SELECT count(*) FROM pgherald.positions_v2").fetchone()
    assert groups == (0,)


# -- an embedded server you can keep using: pgherald dev --


def test_dev_start_status_dsn_stop_and_commands_use_it() -> None:
    import shutil
    import tempfile
    from pathlib import Path

    base = Path(tempfile.mkdtemp(prefix="pgherald-dev-"))
    base.chmod(0o755)  # as root, pgserver opens the parents: keep them to this directory
    env = cli_env(None) | {"PGHERALD_EMBEDDED_DIR": str(base / "pgdata")}

    def dev(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            pgherald_cmd(*args),
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )

    try:
        down = dev("dev", "status")
        assert (down.returncode, down.stdout.startswith("not running")) == (3, True)
        assert one_line_error(dev("dev", "dsn"), status=3).endswith("`pgherald dev start`")
        started = dev("dev", "start")
        assert started.returncode == 0, started.stderr
        assert started.stdout.startswith("export PGHERALD_DSN=")
        dsn = dev("dev", "dsn").stdout.strip()
        assert dsn.startswith("postgresql://")
        assert dev("dev", "status").returncode == 0
        again = dev("dev", "start")  # finds it running
        assert "already running" in again.stderr
        # Commands without any DSN use it: a notification sent by the CLI arrives.
        with pgherald.Listener(dsn, channels=["dev"]) as listener:
            sent = dev("notify", "dev", "through the dev server")
            assert sent.returncode == 0, sent.stderr
            got = [n.payload for n in listener.notifications(timeout=2)]
        assert got == ["through the dev server"]
        stopped = dev("dev", "stop")
        assert stopped.stdout.startswith("stopped"), stopped.stderr
        assert dev("dev", "status").returncode == 3
    finally:
        dev("dev", "stop")
        shutil.rmtree(base, ignore_errors=True)
