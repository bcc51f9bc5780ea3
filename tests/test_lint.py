"""The linter (ruff, rules in pyproject.toml) finds nothing: undefined names, unused imports, syntax errors."""
import subprocess
import sys

from tests import REPO


def test_ruff_finds_nothing():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", "."],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # 'No module named ruff': pip install -e ".[test]"
