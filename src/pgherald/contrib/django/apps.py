"""The Django app: add ``"pgherald.contrib.django"`` to ``INSTALLED_APPS``."""

from __future__ import annotations

from django.apps import AppConfig


class PgheraldConfig(AppConfig):
    """Brings the ``pgherald_run`` management command; no models, no migrations."""

    name = "pgherald.contrib.django"
    label = "pgherald"
    verbose_name = "pgherald"
