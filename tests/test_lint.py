"""The linter and the formatter (ruff, settings in pyproject.toml) find nothing: undefined names, unused
imports, syntax errors, code not as `ruff format` lays it out."""

import subprocess
import sys

import pytest

from tests import REPO


@pytest.mark.parametrize("command", [["check", "--output-format", "concise"], ["format", "--check"]])
def test_ruff_finds_nothing(command):
    proc = subprocess.run([sys.executable, "-m", "ruff", *command, "."], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # 'No module named ruff': pip install -e ".[test]"
