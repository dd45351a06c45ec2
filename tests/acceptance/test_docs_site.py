"""The documentation site builds with ``mkdocs build --strict``: a broken link, a missing
anchor, a page left out of the nav or a bad API reference fails the suite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")  # mkdocs brings it (the `lint` extra; a skip fails on CI)

ROOT = Path(__file__).resolve().parents[2]


def _build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's end-of-life banner
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_site_builds_strict(tmp_path: Path) -> None:
    result = _build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    api = (tmp_path / "site/api/index.html").read_text()
    for name in (
        "pgherald.AsyncListener",
        "pgherald.publish",
        "pgherald.contrib.starlette.running",
    ):
        assert f'id="{name}"' in api, f"{name} missing from the API reference"
    assert (tmp_path / "site/frameworks/index.html").exists()


def test_a_broken_link_fails_the_build(tmp_path: Path) -> None:
    """The same validation settings, on a page with a broken link: the check is live."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\nSee [the missing page](missing.md).\n")
    config.update(docs_dir=str(docs), nav=[{"Home": "index.md"}], plugins=["search"])
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    result = _build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert "missing.md" in result.stdout + result.stderr
