"""Imports point one way: models (and kernels) <- schedule <- runtime, simulator, calibrate (side by side, never
each other) <- planner <- the application (CLI, recipes, data, checkpoints). A module importing against that
direction fails here."""

import ast
from pathlib import Path

import pytest

from tests import REPO

# layer folder -> the project layers its modules may import (beyond themselves)
ALLOWED = {
    "kernels": set(),
    "models": {"kernels"},
    "schedule": {"models"},
    "runtime": {"schedule", "models", "kernels"},
    "simulator": {"schedule", "models"},
    # calibrate times the runtime's weight stream and disk tier, which the application hands it
    "calibrate": {"schedule", "models", "kernels"},
    "planner": {"schedule", "models", "simulator"},
}
LAYERS = set(ALLOWED) | {"recipes"}


def imported_layers(path: Path) -> set[str]:
    """The project layers a module imports (`slideformer.X...` or `from slideformer import X`)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"slideformer.{a.name}" for a in node.names] if node.module == "slideformer" else [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "slideformer":
                out.add(parts[1] if len(parts) > 1 and parts[1] in LAYERS else "application")
    return out


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_layer_imports_only_the_layers_below_it(layer):
    wrong = {
        f"{p.relative_to(REPO)} imports {sorted(imported_layers(p) - ALLOWED[layer] - {layer})}"
        for p in sorted((REPO / layer).rglob("*.py"))
        if imported_layers(p) - ALLOWED[layer] - {layer}
    }
    assert not wrong, "imports against the layers' direction:\n" + "\n".join(sorted(wrong))
