"""The runtime trains exactly like a plain PyTorch mixed-precision loop (within bf16 tolerance; with the Triton
kernels on, no farther from an fp32 loop than eager bf16 is: `tests.reference`)."""

import pytest

from slideformer.models import PRESETS, RandomWeights
from slideformer.schedule.plan import uniform_plan
from slideformer.runtime import AdamWConfig, Engine
from tests.reference import (
    WEIGHT_TOL,
    B,
    S,
    assert_no_farther_from_fp32_than_eager,
    assert_trains_like_reference,
    batches,
    reference_train,
    relative_weight_error,
)


def check_against_references(
    name: str, device: str, optim: AdamWConfig, lrs: list[float] | None = None, **plan_kw
) -> None:
    cfg = PRESETS[name]
    data = batches(cfg.vocab_size)
    src = RandomWeights(cfg, seed=3)
    chunk = plan_kw.pop("chunk", B)
    plan = uniform_plan(name, cfg.num_layers, B, S, chunk=chunk, device=device, **plan_kw)
    engine = Engine(cfg, plan, src, optim)
    losses = []
    for step, (ids, labels) in enumerate(data):
        if lrs is not None:
            engine.set_lr(lrs[step])
        losses.append(engine.train_step(ids, labels).loss)
    ours = engine.hf_state()
    engine.close()
    assert_trains_like_reference(cfg, src, data, optim, chunk, device, lrs, losses, ours)


PLANS = {
    "offload-w2": dict(window=2, activation="offload"),
    "recompute-w1": dict(window=1, activation="recompute"),
    "keep-last-2-w3": dict(window=3, activation="offload", keep_last=2),
    "gpu-placed-share": dict(window=2, activation="offload", gpu_units=2),
    "accumulate-4-chunks": dict(window=2, activation="offload", chunk=1),
    "ring-of-1": dict(window=2, activation="offload", grad_ring=1),
    "late-updates-3": dict(window=2, activation="offload", late_updates=3),  # embedding, layers 0-1 after bwd
    "mlp-in-tiles": dict(window=2, activation="recompute", mlp_tile_tokens=24),  # 128 tokens: 5 tiles + 8
    "transient-head-grad": dict(window=2, activation="offload", chunk=2, transient_head_grad=True),
    "streamed-layers": dict(window=2, activation="offload", streamed_layers=(0, 2, 3), late_updates=2),
    "host-bf16-weights": dict(window=2, activation="recompute", host_bf16_weights=True, streamed_layers=(1,)),
    "streamed-embedding": dict(window=2, activation="offload", chunk=2, streamed_embedding=True),
    # the head's update after the backward, beside the next forward; the first layer on the GPU, the rest streamed
    "deferred-head-gpu-layer": dict(
        window=2, activation="recompute", deferred_updates=1, gpu_layers=1, streamed_layers=(2,), host_bf16_weights=True
    ),
    "deferred-head-and-layer": dict(window=2, activation="offload", chunk=2, deferred_updates=2, late_updates=1),
    # the two layers below the window keep their forward's weights for their backward (slots of their own)
    "kept-weights-2": dict(window=2, activation="offload", chunk=2, kept_weights=2, streamed_layers=(1,)),
    "kept-weights-bf16-host": dict(window=1, activation="recompute", kept_weights=1, host_bf16_weights=True),
    # every layer's attention output saved for its backward; two of four beside a kept graph, in chunks
    "saved-attention-all": dict(window=2, activation="offload", saved_attention=4),
    "saved-attention-2-chunks": dict(window=2, activation="offload", chunk=1, saved_attention=3, keep_last=1),
    # the last two layers' saved attention stays on the GPU, the first's goes to RAM; then all four on the GPU
    "resident-attention": dict(window=2, activation="offload", saved_attention=1, resident_attention=2),
    "resident-attention-2-chunks": dict(window=2, activation="offload", chunk=1, resident_attention=4),
    # one chunk, bf16 weights in RAM: the layers' gradients held in bf16 (`Plan.bf16_layer_grads`)
    "bf16-layer-grads": dict(window=2, activation="recompute", host_bf16_weights=True, streamed_layers=(0, 2)),
    # streamed layers 0 and 1 load their fp32 masters for their backward into two GPU master slots, where their
    # updates read them; in chunks, then in one (bf16 layer gradients)
    "streamed-master-slots": dict(
        window=2, activation="offload", chunk=2, streamed_layers=(0, 1, 3), streamed_master_slots=2
    ),
    "streamed-master-slots-bf16-grads": dict(
        window=2, activation="recompute", host_bf16_weights=True, streamed_layers=(0, 1), streamed_master_slots=3
    ),
}


@pytest.mark.parametrize("plan_name", sorted(PLANS))
def test_runtime_matches_reference_loop(plan_name, device):
    check_against_references("tiny-llama", device, AdamWConfig(lr=1e-3, weight_decay=0.01), **dict(PLANS[plan_name]))


@pytest.mark.parametrize("seq_tile", [5, 16])
def test_sequence_tiles_train_as_close_to_fp32_as_eager_bf16(seq_tile, device):
    """Sequence tiles sum each key's gradient from several bf16 pieces (the same maths, other rounding): the
    run stays as close to an fp32 loop as the eager bf16 loop is."""
    cfg, optim = PRESETS["tiny-llama"], AdamWConfig(lr=1e-3, weight_decay=0.01)
    data, src = batches(cfg.vocab_size), RandomWeights(cfg, seed=3)
    plan = uniform_plan("tiny-llama", cfg.num_layers, B, S, device=device, seq_tile_tokens=seq_tile, mlp_tile_tokens=8)
    engine = Engine(cfg, plan, src, optim)
    losses = [engine.train_step(ids, labels).loss for ids, labels in data]
    ours = engine.hf_state()
    engine.close()
    assert_no_farther_from_fp32_than_eager(cfg, src, data, optim, B, device, None, losses, ours)


@pytest.mark.parametrize("family", ["tiny-qwen2", "tiny-qwen3", "tiny-mistral"])
def test_every_family_trains_exactly(family, device):
    check_against_references(family, device, AdamWConfig(lr=1e-3), window=2, activation="offload", chunk=2)


@pytest.mark.parametrize("max_norm", [0.05, 1e9])  # clipping active, and inactive
def test_global_norm_clipping_after_norm_schedule(max_norm, device):
    optim = AdamWConfig(lr=1e-3, max_grad_norm=max_norm)
    check_against_references(
        "tiny-llama", device, optim, window=2, activation="offload", update="after_norm", chunk=2, gpu_units=1
    )


@pytest.mark.parametrize("update", ["during_backward", "after_norm"])
def test_learning_rate_schedule_applies_to_the_step_it_was_set_for(update, device):
    """A schedule changes the rate every step while the last updates of the step before still run."""
    check_against_references(
        "tiny-llama",
        device,
        AdamWConfig(lr=1e-3),
        lrs=[3e-3, 1e-4, 2e-3, 5e-4],
        window=2,
        activation="offload",
        update=update,
        chunk=2,
    )


def test_tolerance_detects_a_real_difference():
    """The weight check is not vacuous: a run at a different learning rate fails it."""
    cfg = PRESETS["tiny-llama"]
    data = batches(cfg.vocab_size)
    src = RandomWeights(cfg, seed=3)
    plan = uniform_plan("tiny-llama", cfg.num_layers, B, S, device="cpu")
    engine = Engine(cfg, plan, src, AdamWConfig(lr=1.1e-3))
    for ids, labels in data:
        engine.train_step(ids, labels)
    ours = engine.hf_state()
    engine.close()
    _, ref = reference_train(cfg, src, data, AdamWConfig(lr=1e-3), micro_batch=B)
    assert relative_weight_error(ours, ref, {n: src.get(n) for n in ref}) > WEIGHT_TOL


@pytest.mark.gpu
@pytest.mark.parametrize(
    "streamed_layers, host_bf16_weights, chunk, master_slots",
    [((), False, 2, 0), ((0, 2), False, 2, 0), ((1,), True, 2, 0), ((0, 2), True, B, 0), ((0, 2), True, B, 1)],
)
def test_weights_streamed_in_many_pieces_match_reference(streamed_layers, host_bf16_weights, chunk, master_slots):
    """Units larger than the staging buffer stream through it piece by piece (the large-model path), and so do
    streamed layers' states through the GPU's AdamW; or the host units' bf16 weights come from RAM whole (in
    one chunk: with bf16 layer gradients, cast to fp32 piece by piece for the streamed AdamW); or a streamed
    layer's backward loads its fp32 master into a GPU master slot, where its update reads it."""
    streamed_embedding = host_bf16_weights  # with the host units' bf16 weights, the embedding streamed too
    from dataclasses import replace

    cfg = replace(
        PRESETS["tiny-llama"],
        vocab_size=4096,
        hidden_size=512,
        intermediate_size=1408,
        num_heads=8,
        num_kv_heads=2,
        head_dim=64,
        num_layers=3,
        name="mid-llama",
    )
    data = batches(cfg.vocab_size)
    src = RandomWeights(cfg, seed=3)
    optim = AdamWConfig(lr=1e-3)
    plan = uniform_plan(
        "tiny-llama",
        cfg.num_layers,
        B,
        S,
        chunk=chunk,
        window=2,
        transfer_chunk_mb=1,
        streamed_layers=streamed_layers,
        host_bf16_weights=host_bf16_weights,
        streamed_embedding=streamed_embedding,
        streamed_master_slots=master_slots,
        device="cuda",
    )
    assert cfg.layer_params * 4 > 3 * 2**20  # each layer crosses PCIe in several pieces
    assert all(plan.streamed_pieces(cfg.layer_params) > 2 for _ in plan.streamed_units)
    assert plan.bf16_layer_grads == (chunk == B)
    engine = Engine(cfg, plan, src, optim)
    losses = [engine.train_step(ids, labels).loss for ids, labels in data]
    ours = engine.hf_state()
    engine.close()
    assert_trains_like_reference(cfg, src, data, optim, chunk, "cuda", None, losses, ours)
