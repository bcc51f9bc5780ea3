"""The type checker (mypy, settings in pyproject.toml) finds nothing in the installed package.

The package's subpackages live in top-level folders (pyproject's package-dir mapping), which mypy cannot
follow through an editable install; the test lays out the package as installed, with links, and checks that."""

import subprocess
import sys
import tomllib

from tests import REPO


def test_mypy_finds_nothing(tmp_path):
    mapping = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    package = tmp_path / "slideformer"
    package.mkdir()
    for source in (REPO / mapping["slideformer"]).iterdir():  # the application's own modules and recipes
        (package / source.name).symlink_to(source)
    for name, folder in mapping.items():
        if name != "slideformer":
            (package / name.split(".", 1)[1]).symlink_to(REPO / folder)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(REPO / "pyproject.toml"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "-p",
            "slideformer",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr  # 'No module named mypy': pip install -e ".[test]"
