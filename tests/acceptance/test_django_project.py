"""
pgherald.contrib.django in a real Django project, made in a temporary directory: events
published on model saves inside Django's transactions, and ``manage.py pgherald_run`` running a
listener and a consumer whose handlers use the ORM. Every command runs in a subprocess, as a
user runs it, against the test database.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgherald
from tests.fix_durable import wait_until

pytest.importorskip("django")  # the `test` extra has it (a skip fails on CI)

FILES = {
    "manage.py": """
        import os, sys
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "site_settings")
        from django.core.management import execute_from_command_line
        execute_from_command_line(sys.argv)
    """,
    "site_settings.py": """
        import os
        from psycopg.conninfo import conninfo_to_dict

        params = conninfo_to_dict(os.environ["SHOP_DSN"])
        SECRET_KEY = "not-a-secret"
        USE_TZ = True
        DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
        INSTALLED_APPS = ["pgherald.contrib.django", "shop"]
        DATABASES = {
            "default": {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": params["dbname"],
                "USER": params.get("user", ""),
                "PASSWORD": params.get("password", ""),
                "HOST": params.get("host", ""),
                "PORT": params.get("port", ""),
                "OPTIONS": {"application_name": "shop"},
            }
        }
    """,
    "shop/__init__.py": "",
    "shop/apps.py": """
        from django.apps import AppConfig

        class ShopConfig(AppConfig):
            name = "shop"

            def ready(self):
                from pgherald.contrib.django import publish_on_save
                from .models import Order

                publish_on_save(Order, "orders", delete=True)
                publish_on_save(
                    Order, "order-notes", durable=False,
                    payload=lambda order, op: f"{op} {order.item}",
                )
    """,
    "shop/models.py": """
        from django.db import models

        class Order(models.Model):
            item = models.CharField(max_length=50)

        class Shipment(models.Model):   # written by the consumer's handler
            order_pk = models.IntegerField()
            op = models.CharField(max_length=10)

        class Note(models.Model):       # written by the listener's handler
            text = models.CharField(max_length=50)
    """,
    "shop/herald.py": """
        from pgherald.contrib.django import consumer, db_handler, listener
        from .models import Note, Shipment

        notes = listener()
        shipping = consumer(group="shipping", channels=["orders"], poll_interval=0.1)

        @notes.on("order-notes")
        @db_handler
        def note(n):
            Note.objects.create(text=n.payload)

        @shipping.on("orders")
        @db_handler
        def ship(event):
            Shipment.objects.create(order_pk=event.payload["pk"], op=event.payload["op"])
    """,
    # What a view or a task does: saves, in and out of transactions.
    "shop_writes.py": """
        import django
        django.setup()
        from django.db import transaction
        from pgherald.contrib.django import database_dsn, notify, publish
        from shop.models import Order

        with transaction.atomic():
            scone = Order.objects.create(item="scone")            # 1: committed
        try:
            with transaction.atomic():
                Order.objects.create(item="teapot")               # rolled back: no event
                raise ValueError("out of stock")
        except ValueError:
            pass
        with transaction.atomic():
            jam = Order.objects.create(item="jam")                # committed
            try:
                with transaction.atomic():                        # a savepoint...
                    Order.objects.create(item="cup")
                    raise ValueError("broken")                    # ...rolled back: no event
            except ValueError:
                pass
        jam.item = "jam (large)"
        jam.save()                                                # autocommit: updated
        scone.delete()                                            # deleted
        with transaction.atomic():
            event_id = publish("orders", {"pk": 0, "op": "manual"}, key="0")
        print("published", event_id)
        print("dsn", database_dsn())
    """,
}


def _write_project(root: Path) -> None:
    for name, text in FILES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())


def _env(dsn: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "DJANGO"))}
    env["SHOP_DSN"] = dsn
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _manage(root: Path, dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=root,
        env=_env(dsn),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def project(tmp_path: Path, dsn: str, conn: psycopg.Connection[Any]) -> Path:
    _write_project(tmp_path)
    result = _manage(tmp_path, dsn, "migrate", "--run-syncdb", "-v", "0")
    assert result.returncode == 0, result.stderr
    pgherald.install(conn)
    return tmp_path


def _start_pgherald_run(project: Path, dsn: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "manage.py", "pgherald_run", "--stop-timeout", "5"],
        cwd=project,
        env=_env(dsn),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _first_line(run: subprocess.Popen[str]) -> str:
    assert run.stdout is not None
    return run.stdout.readline()


def _kill(run: subprocess.Popen[str]) -> None:
    if run.poll() is None:
        run.kill()
    run.communicate()


def _stop_pgherald_run(run: subprocess.Popen[str]) -> None:
    """SIGTERM: it must stop cleanly (exit 0, "stopped", no traceback); killed if it does not."""
    run.send_signal(signal.SIGTERM)
    try:
        out, err = run.communicate(timeout=20)
    except BaseException:
        _kill(run)
        raise
    assert run.returncode == 0, err
    assert "pgherald_run: stopped" in out
    assert "Traceback" not in err


def _rows(conn: psycopg.Connection[Any], query: str) -> list[tuple[Any, ...]]:
    return conn.execute(query).fetchall()  # type: ignore[arg-type]


def test_saves_publish_in_the_transaction_and_pgherald_run_handles_them(
    project: Path, dsn: str, conn: psycopg.Connection[Any]
) -> None:
    run = _start_pgherald_run(project, dsn)
    try:
        first = _first_line(run)  # printed once every runner is connected and listening
        assert first.startswith("pgherald_run: running"), first

        writes = subprocess.run(
            [sys.executable, "shop_writes.py"],
            cwd=project,
            env=_env(dsn) | {"DJANGO_SETTINGS_MODULE": "site_settings"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert writes.returncode == 0, writes.stderr

        # The durable log: only what committed, in commit order, keyed by primary key.
        log = _rows(conn, "SELECT channel, payload, key FROM pgherald.events_v1 ORDER BY id")
        ids = dict(_rows(conn, "SELECT item, id FROM shop_order"))
        scone_pk, jam_pk = 1, ids["jam (large)"]
        assert log == [
            ("orders", {"model": "shop.order", "pk": scone_pk, "op": "created"}, str(scone_pk)),
            ("orders", {"model": "shop.order", "pk": jam_pk, "op": "created"}, str(jam_pk)),
            ("orders", {"model": "shop.order", "pk": jam_pk, "op": "updated"}, str(jam_pk)),
            ("orders", {"model": "shop.order", "pk": scone_pk, "op": "deleted"}, str(scone_pk)),
            ("orders", {"pk": 0, "op": "manual"}, "0"),
        ]
        assert sorted(ids) == ["jam (large)"]  # teapot and cup rolled back, scone deleted
        # The consumer's handler wrote through the ORM, once per event.
        wait_until(
            lambda: len(_rows(conn, "SELECT 1 FROM shop_shipment")) == 5,
            timeout=10,
            what="five shipments",
        )
        assert _rows(conn, "SELECT order_pk, op FROM shop_shipment ORDER BY id") == [
            (scone_pk, "created"),
            (jam_pk, "created"),
            (jam_pk, "updated"),
            (scone_pk, "deleted"),
            (0, "manual"),
        ]
        # The listener heard the NOTIFYs of committed saves only.
        wait_until(
            lambda: len(_rows(conn, "SELECT 1 FROM shop_note")) == 3,
            timeout=10,
            what="three notes",
        )
        assert _rows(conn, "SELECT text FROM shop_note ORDER BY id") == [
            ("created scone",),
            ("created jam",),
            ("updated jam (large)",),
        ]
        assert f"dbname={conninfo_dbname(dsn)}" in writes.stdout

        # frameworks.md: "Saves with `raw=True` (`loaddata` fixtures) publish nothing".
        (project / "orders.json").write_text(
            json.dumps([{"model": "shop.order", "pk": 100, "fields": {"item": "fixture"}}])
        )
        loaded = _manage(project, dsn, "loaddata", "orders.json", "-v", "0")
        assert loaded.returncode == 0, loaded.stderr
        assert _rows(conn, "SELECT item FROM shop_order WHERE id = 100") == [("fixture",)]
        assert len(_rows(conn, "SELECT 1 FROM pgherald.events_v1")) == len(log)

    except BaseException:
        _kill(run)  # the failure is reported, not hidden behind a stop's
        raise
    _stop_pgherald_run(run)


def conninfo_dbname(dsn: str) -> str:
    return str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])


def test_pgherald_run_says_what_is_wrong_in_one_line(
    project: Path, dsn: str, conn: psycopg.Connection[Any]
) -> None:
    (project / "shop/herald.py").write_text("")  # nothing declared
    result = _manage(project, dsn, "pgherald_run")
    assert result.returncode == 1
    assert "nothing to run" in result.stderr
    assert "Traceback" not in result.stderr

    (project / "shop/herald.py").write_text(
        "from pgherald.contrib.django import listener\nlistener().on('x')(print)\n"
    )
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    unreachable = psycopg.conninfo.make_conninfo(
        **(params | {"host": "127.0.0.1", "port": "1"})  # refused at once
    )
    result = _manage(project, unreachable, "pgherald_run")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("CommandError: <Listener"), lines[0]


def test_pgherald_run_runs_a_declared_scheduler(
    project: Path, dsn: str, conn: psycopg.Connection[Any]
) -> None:
    (project / "shop/herald.py").write_text(
        "from pgherald.contrib.django import scheduler\nscheduler(max_wait=0.2)\n"
    )
    run = _start_pgherald_run(project, dsn)
    try:
        first = _first_line(run)
        assert first.startswith("pgherald_run: running <Scheduler "), first
        # No consumer runs: the scheduler alone moves the due event into the log.
        pgherald.publish(conn, "later", {"n": 1}, deliver_after=timedelta(seconds=0.2))
        wait_until(
            lambda: _rows(conn, "SELECT payload FROM pgherald.events_v1") == [({"n": 1},)],
            timeout=10,
            what="the delayed event in the log",
        )
    except BaseException:
        _kill(run)  # the failure is reported, not hidden behind a stop's
        raise
    _stop_pgherald_run(run)
