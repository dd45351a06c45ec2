"""
Type-check pgherald's public API as users see it, with mypy --strict and pyright --strict.

- ``documented.py`` (documented calls) must pass both checkers;
- ``misspelled.py`` must fail both: each line marked ``# error: REGEX`` gets an error whose
  message matches REGEX, and no unmarked line gets one.

Run by ``scripts/dev.py test`` with the virtualenv's Python: ``python tests/typing/check.py``.
pyright fetches its Node.js runtime on first use (``pip install pyright`` in the lint extra).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
GOOD = HERE / "documented.py"
BAD = HERE / "misspelled.py"
MARK = re.compile(r"\)\s+#\s*error:\s*(.+?)\s*$")  # after a call, not in the docstring


def mypy(path: Path) -> tuple[int, dict[int, list[str]]]:
    cmd = [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", str(path)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    errors: dict[int, list[str]] = {}
    for line in out.stdout.splitlines():
        m = re.match(rf"{re.escape(str(path.relative_to(ROOT)))}:(\d+): error: (.*)", line)
        if m:
            errors.setdefault(int(m.group(1)), []).append(m.group(2))
    if out.returncode and not errors:  # a crash or a config error, not a type error
        sys.exit(f"mypy failed to run on {path.name}:\n{out.stdout}{out.stderr}")
    return out.returncode, errors


def pyright(path: Path) -> tuple[int, dict[int, list[str]]]:
    cmd = [
        sys.executable, "-m", "pyright", "--outputjson", "--pythonpath", sys.executable, str(path)
    ]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    try:
        report = json.loads(out.stdout)
    except json.JSONDecodeError:
        sys.exit(f"pyright failed to run on {path.name} (it needs npm's registry on first "
                 f"use):\n{out.stdout[-2000:]}{out.stderr[-2000:]}")  # fmt: skip
    errors: dict[int, list[str]] = {}
    for d in report.get("generalDiagnostics", []):
        if d.get("severity") == "error":
            line = int(d["range"]["start"]["line"]) + 1
            errors.setdefault(line, []).append(" ".join(d["message"].split()))
    return out.returncode, errors


def marks(path: Path) -> dict[int, re.Pattern[str]]:
    found = {}
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        m = MARK.search(text)
        if m:
            found[number] = re.compile(m.group(1))
    return found


def check(name: str, run: object) -> list[str]:
    assert callable(run)
    problems: list[str] = []
    code, errors = run(GOOD)
    for line, messages in sorted(errors.items()):
        problems.append(f"{name}: {GOOD.name}:{line}: a documented call fails: {messages}")
    if code and not errors:
        problems.append(f"{name}: {GOOD.name}: exit status {code}")
    code, errors = run(BAD)
    if code == 0:
        problems.append(f"{name}: {BAD.name} passed: misspelled options are not caught")
    expected = marks(BAD)
    for line, pattern in sorted(expected.items()):
        got = errors.get(line, [])
        if not any(pattern.search(message) for message in got):
            problems.append(
                f"{name}: {BAD.name}:{line}: expected an error matching {pattern.pattern!r}, "
                f"got {got or 'none'}"
            )
    for line in sorted(set(errors) - set(expected)):
        problems.append(f"{name}: {BAD.name}:{line}: unexpected error {errors[line]}")
    print(f"{name}: {GOOD.name} passes; {BAD.name}: {len(expected)} expected errors checked")
    return problems


def main() -> None:
    problems = check("mypy --strict", mypy) + check("pyright --strict", pyright)
    if problems:
        sys.exit("\n".join(problems))


if __name__ == "__main__":
    main()
