"""The linter (ruff, rules in pyproject.toml) finds nothing: undefined names, unused imports, syntax errors."""
import subprocess
import sys
from pathlib import Path


def test_ruff_finds_nothing():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", "."],
                          cwd=Path(__file__).parent.parent, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # 'No module named ruff': pip install -e ".[test]"
