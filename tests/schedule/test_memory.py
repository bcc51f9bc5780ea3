"""The memory model's workspace formula against the H100's and the H200's measurements."""

import json

from slideformer.models import load_model_config
from slideformer.schedule.memory import layer_workspace
from tests import REPO


def test_layer_workspace_formula_meets_the_h100_measurements_of_three_shapes():
    """The recomputed layer's workspace, from dimensions alone, against `bench.layer_memory` on the H100."""
    rows = json.loads((REPO / "bench/results/h100-2026-11-25-layer-memory.json").read_text())["rows"]
    tiled = [r for r in rows if r["variant"].startswith("tile") and r["peak_extra_bytes"]]
    assert {r["model"] for r in tiled} == {"llama-3.1-8b", "qwen3-14b", "qwen2.5-32b"} and len(tiled) >= 20
    for r in tiled:
        got = layer_workspace(load_model_config(r["model"]), r["tokens"], int(r["variant"][4:]))
        assert abs(got / r["peak_extra_bytes"] - 1) < 0.015, r


def test_layer_workspace_in_sequence_tiles_meets_the_h200_measurements_of_three_shapes():
    """Long single sequences, whole and in sequence tiles (MLP tile 2048), against `bench.layer_memory
    --seq-tiles` on the H200."""
    rows = json.loads((REPO / "bench/results/h200-2026-12-01-layer-memory-seq-tiles.json").read_text())["rows"]
    backward = [r for r in rows if r["phase"] == "backward" and r["peak_extra_bytes"]]
    assert {r["model"] for r in backward if r["seq_tile"]} == {"llama-3.1-8b", "qwen3-14b", "qwen2.5-32b"}
    for r in backward:
        got = layer_workspace(load_model_config(r["model"]), r["seq"], 2048, r["seq_tile"])
        assert abs(got / r["peak_extra_bytes"] - 1) < 0.015, r
