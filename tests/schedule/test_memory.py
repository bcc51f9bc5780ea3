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


def test_host_updated_untied_edges_take_their_buffers_only_while_they_need_them():
    """No static GPU buffer for the embedding's weights or gradient or the head's weights: a load takes the
    weights and the forward's last lookup or the head's last piece gives them back, the embedding's backward
    takes its gradient and the copy to the host gives it back (the simulator's timeline), so each adds to the
    step's peak only there; tied or GPU-updated edges keep theirs."""
    from slideformer.schedule.memory import GiB, embedding_backward_bytes, gpu_buffers, gpu_bytes
    from slideformer.schedule.plan import uniform_plan
    from slideformer.schedule.profile import Profile
    from slideformer.simulator import simulate

    cfg, profile = load_model_config("llama-3.1-8b"), Profile.load("h200-2026-12-01")
    plan = uniform_plan("llama-3.1-8b", cfg.num_layers, 8, 1024)
    edges = {"grad:0", "edge_weights:0", f"edge_weights:{cfg.num_layers + 1}"}
    assert not edges & {b.name for b in gpu_buffers(cfg, plan)}
    assert f"grad:{cfg.num_layers + 1}" in {b.name for b in gpu_buffers(cfg, plan)}
    assert embedding_backward_bytes(cfg, plan) >= 4 * cfg.vocab_size * cfg.hidden_size
    sim = simulate(cfg, plan, profile)
    assert sim.peak_gpu_bytes == sum(gpu_bytes(cfg, plan, profile).values())
    assert sim.peak_gpu_bytes < 10 * GiB
    on_gpu = uniform_plan("llama-3.1-8b", cfg.num_layers, 8, 1024, gpu_units=1)
    tied = load_model_config("tiny-qwen2")
    assert tied.tie_word_embeddings
    for c, p in ((cfg, on_gpu), (tied, uniform_plan("tiny-qwen2", tied.num_layers, 8, 1024))):
        assert {"grad:0", "edge_weights:0", f"edge_weights:{c.num_layers + 1}"} <= {b.name for b in gpu_buffers(c, p)}


def test_layer_forward_workspace_meets_the_h200_measurements_of_three_shapes():
    """The forward without gradients, whole and in sequence tiles, against `bench.layer_memory --seq-tiles`."""
    from slideformer.schedule.memory import layer_forward_workspace

    rows = json.loads((REPO / "bench/results/h200-2026-12-01-layer-memory-seq-tiles.json").read_text())["rows"]
    forward = [r for r in rows if r["phase"] == "forward" and r["peak_extra_bytes"]]
    assert {r["model"] for r in forward} == {"llama-3.1-8b", "qwen3-14b", "qwen2.5-32b"} and len(forward) >= 10
    for r in forward:
        got = layer_forward_workspace(load_model_config(r["model"]), r["seq"], r["seq_tile"])
        assert abs(got / r["peak_extra_bytes"] - 1) < 0.01, r


def test_a_transient_head_gradient_is_gone_before_the_first_layer_backward():
    """transient_head_grad: no static buffer for it; the first layer's backward waits for its copy to the host,
    so it never meets a layer's workspace, and the simulated peak is the closed form's."""
    from slideformer.schedule.graph import build_step_graph
    from slideformer.schedule.memory import gpu_buffers, gpu_bytes
    from slideformer.schedule.plan import uniform_plan
    from slideformer.schedule.profile import Profile
    from slideformer.simulator import simulate

    cfg, profile = load_model_config("llama-3.1-8b"), Profile.load("h200-2026-12-01")
    L = cfg.num_layers
    plan = uniform_plan("llama-3.1-8b", L, 1, 32768, transient_head_grad=True)
    assert f"grad:{L + 1}" not in {b.name for b in gpu_buffers(cfg, plan)}
    assert f"grad_out:{L + 1}" in build_step_graph(cfg, plan).predecessors(f"bwd:{L - 1}:0")
    sim = simulate(cfg, plan, profile)
    assert sim.peak_gpu_bytes == sum(gpu_bytes(cfg, plan, profile).values())
    kept = uniform_plan("llama-3.1-8b", L, 1, 32768)
    assert sim.peak_gpu_bytes < sum(gpu_bytes(cfg, kept, profile).values())


def test_a_kept_layer_backward_meets_the_h200_measurements_and_never_meets_a_recomputed_layer():
    """A kept layer's backward beyond its graph, against `bench.layer_memory --kept` on the H200 (one shape, two
    token counts); its graph lives through the head and its own backward, not through the recomputed layers'
    backward (which come after), and the simulated peak is the closed form's."""
    from slideformer.schedule.memory import gpu_bytes, kept_backward_workspace, plan_layer_workspace
    from slideformer.schedule.plan import uniform_plan
    from slideformer.schedule.profile import Profile
    from slideformer.simulator import simulate

    rows = json.loads((REPO / "bench/results/h200-2026-12-01-kept-layer-memory.json").read_text())["rows"]
    assert len({r["tokens"] for r in rows}) >= 2
    for r in rows:
        got = kept_backward_workspace(load_model_config(r["model"]), r["tokens"])
        assert abs(got / r["backward_peak_beyond_graph_bytes"] - 1) < 0.01, r
    cfg, profile = load_model_config("llama-3.1-8b"), Profile.load("h200-2026-12-01")
    plan = uniform_plan("llama-3.1-8b", cfg.num_layers, 32, 1024, activation="offload", keep_last=1)
    need = gpu_bytes(cfg, plan, profile)
    assert need["kept_graphs"] > 0 and need["workspace"] < plan_layer_workspace(cfg, plan)
    assert simulate(cfg, plan, profile).peak_gpu_bytes == sum(need.values())


def test_an_architectures_own_layer_is_costed_from_calibrates_measurement():
    """Our formulas do not know an architecture's own layer's autograd: where the profile has calibrate's
    measurement of that layer (its kind, at this length) the memory model and the simulator read it, else the
    formula. The kind keeps such an entry apart from one of our layers of the same widths."""
    import dataclasses

    from slideformer.calibrate.measure import layer_timings
    from slideformer.models import ModelConfig
    from slideformer.schedule.memory import gpu_bytes, layer_workspace, plan_forward_workspace, plan_layer_workspace
    from slideformer.schedule.plan import uniform_plan
    from slideformer.schedule.profile import LayerTiming, Profile
    from slideformer.simulator import simulate

    hf = dict(model_type="olmo2", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3)
    cfg = ModelConfig.from_hf(hf | dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    assert cfg.layer_kind.startswith("olmo2/") and cfg.layer_shape()[-1] == cfg.layer_kind
    timed = layer_timings(cfg, 32, [1], "cpu")
    assert {t.layer for t in timed} == {cfg.layer_kind} and timed[0].bwd_workspace_bytes == 0  # GPU-only figure
    plan = uniform_plan("olmo2", 3, 2, 32, chunk=1, activation="recompute")
    big = 10 * 2**30

    def entry(tokens: int, kind: str) -> LayerTiming:
        return LayerTiming(64, 96, 4, 2, 16, 32, tokens, 1e-4, 3e-4, 2e-4, layer=kind, fwd_workspace_bytes=tokens,
                           bwd_workspace_bytes=big // 32 * tokens)  # fmt: skip

    base = Profile.load("h100-80gb")
    measured = dataclasses.replace(base, layers=[entry(32, cfg.layer_kind), entry(64, cfg.layer_kind)])
    assert plan_layer_workspace(cfg, plan, measured) == big and plan_forward_workspace(cfg, plan, measured) == 32
    assert gpu_bytes(cfg, plan, measured)["workspace"] == big
    assert simulate(cfg, plan, measured).peak_gpu_allocated_bytes > big
    ours_only = dataclasses.replace(base, layers=[entry(32, ""), entry(64, "")])
    assert plan_layer_workspace(cfg, plan, ours_only) == layer_workspace(cfg, 32, plan.mlp_tile_tokens)
