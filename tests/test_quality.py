"""The repository's own checks, run with the suite so CI enforces them:
ruff (lint and format), mypy --strict, the import-linter contracts in
pyproject.toml (the layers), and the example specs validating."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-m", "ruff", "check", "reconciler", "tests", "bench"],
        [sys.executable, "-m", "ruff", "format", "--check", "reconciler", "tests", "bench"],
        [sys.executable, "-m", "mypy"],
        [str(Path(sys.executable).with_name("lint-imports"))],
        [sys.executable, "-m", "reconciler", "validate", "--specs", "specs"],
    ],
    ids=["ruff", "ruff-format", "mypy", "import-layers", "example-specs"],
)
def test_repository_check_passes(command: list[str]) -> None:
    proc = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, check=False, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
