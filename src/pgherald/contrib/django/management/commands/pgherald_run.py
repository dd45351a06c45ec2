"""``manage.py pgherald_run``: run the project's pgherald listeners, consumers and schedulers."""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections
from django.utils.module_loading import autodiscover_modules

from pgherald._schedule import Scheduler
from pgherald.contrib.django import runners
from pgherald.errors import HeraldError


class Command(BaseCommand):
    help = (
        "Run the pgherald listeners, consumers and schedulers declared in the `herald` modules "
        "of the installed apps (pgherald.contrib.django.listener / consumer / scheduler), until "
        "SIGINT or SIGTERM."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--stop-timeout",
            type=float,
            default=10.0,
            help="seconds the handlers in progress get to finish on shutdown (default 10)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        stop_timeout: float = options["stop_timeout"]
        autodiscover_modules("herald")
        todo = runners()
        if not todo:
            raise CommandError(
                "nothing to run: declare pgherald.contrib.django.listener(), consumer() or "
                "scheduler() in a herald.py module of an app in INSTALLED_APPS"
            )
        for runner in todo:
            try:
                # Fails here, with one clear line, rather than in a thread.
                runner.check() if isinstance(runner, Scheduler) else runner.connect()
            except HeraldError as exc:
                for r in todo:
                    _close(r)
                raise CommandError(
                    f"{runner!r}: {exc} (pgherald_run connects with settings.DATABASES)"
                ) from None

        ended = threading.Event()
        failures: list[str] = []

        def run(runner: Any) -> None:
            try:
                runner.run()
            except Exception as exc:
                failures.append(f"{runner!r} failed: {exc}")
            finally:
                connections.close_all()  # this thread's Django connections (ORM handlers)
                ended.set()

        signalled: list[int] = []

        def stop(signum: int, frame: FrameType | None) -> None:
            # Only what is safe in a signal handler: a flag, and stop() (made for this).
            signalled.append(signum)
            for runner in todo:
                runner.stop()

        previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        threads = [
            threading.Thread(target=run, args=(r,), name=f"pgherald {r!r}", daemon=True)
            for r in todo
        ]
        try:
            for thread in threads:
                thread.start()
            self.stdout.write(f"pgherald_run: running {', '.join(map(repr, todo))}", ending="\n")
            self.stdout.flush()
            while not (signalled or ended.is_set()):  # a signal, or a runner that ended
                ended.wait(0.5)  # (the wait a signal handler can interrupt safely)
            for runner in todo:
                runner.stop()
            deadline = time.monotonic() + stop_timeout
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        late = [r for r, t in zip(todo, threads, strict=True) if t.is_alive()]
        if not late:
            for runner in todo:
                _close(runner)
        if late:
            raise CommandError(
                f"{', '.join(map(repr, late))} did not stop within {stop_timeout:g} s (a handler "
                "still running?): raise --stop-timeout or make handlers return"
            )
        if failures:
            raise CommandError("; ".join(failures))
        self.stdout.write("pgherald_run: stopped", ending="\n")


def _close(runner: Any) -> None:
    """Close a listener's or consumer's connection (a scheduler holds none once stopped)."""
    if not isinstance(runner, Scheduler):
        runner.close()
