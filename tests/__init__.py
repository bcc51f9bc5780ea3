"""The test suite, laid out like the source: tests/<folder>/ tests that folder; project-wide checks (layers,
lint, types) sit here. Shared helpers: `tests.reference` (the independent training loop and the checks
against it); fixtures: `conftest.py`."""

from pathlib import Path

REPO = Path(__file__).parent.parent
