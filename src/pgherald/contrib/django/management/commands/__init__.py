"""Django management commands of pgherald (``pgherald_run``)."""

from __future__ import annotations
