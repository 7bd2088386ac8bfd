"""The code is formatted and linted as pyproject.toml's [tool.ruff] says (`ruff format`, `ruff check`)."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import REPO

RUFF = Path(sys.executable).with_name("ruff")


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff(command):
    proc = subprocess.run([str(RUFF), *command, "."], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (
        f"ruff {' '.join(command)} .: fix with `ruff {command[0]} .`\n{proc.stdout}{proc.stderr}"
    )
