"""`Plan.bf16_layer_grads`: with one chunk (and no MLP or sequence tiles, one rank) each layer weight's step
gradient is one bf16 result, so holding it in bf16 on the GPU, over PCIe and in RAM loses nothing. On a CPU
device a run is bit-identical to the same plan with fp32 layer gradients, clipped or not, whichever AdamW
(compiled one-pass, torch's two passes, streamed on the device) updates the layer."""

from dataclasses import replace

import pytest
import torch

from slideformer.kernels import host_adamw
from slideformer.models import RandomWeights
from slideformer.runtime import AdamWConfig, Engine
from slideformer.runtime.disk import DeferredTensor
from slideformer.schedule.graph import build_step_graph, ops, unit_numels
from slideformer.schedule.memory import gpu_buffers, host_buffers
from slideformer.schedule.op import OpKind
from slideformer.schedule.plan import Plan, uniform_plan
from tests.runtime.test_streamed_updates import MID, batches

BATCH, SEQ = 4, 32


def one_chunk_plan(**kw) -> Plan:
    kw = {"window": 1, "activation": "recompute", "host_bf16_weights": True, "transfer_chunk_mb": 1} | kw
    return uniform_plan("mid", MID.num_layers, BATCH, SEQ, chunk=BATCH, device="cpu", **kw)


def train(plan: Plan, optim: AdamWConfig, disk_dir=None, steps: int = 3) -> tuple[list[float], dict]:
    if disk_dir is not None:
        disk_dir.mkdir()
    engine = Engine(MID, plan, RandomWeights(MID, seed=3), optim, disk_dir=disk_dir)
    held = {engine.buffers.gpu_grad[u].dtype for u in range(1, MID.num_layers + 1) if plan.placement[u] != "gpu"}
    assert held == {torch.bfloat16 if plan.bf16_layer_grads else torch.float32}
    losses = [engine.train_step(ids, labels).loss for ids, labels in batches(MID.vocab_size, steps)]
    out = {k: (v.load() if isinstance(v, DeferredTensor) else v).clone() for k, v in engine.training_state().items()}
    engine.close()
    return losses, out


PLANS = {
    "cpu-layers": dict(),
    "streamed-layers": dict(streamed_layers=(0, 2)),  # two pieces each: the fp32 piece cast twice
    "late-and-deferred": dict(late_updates=2, deferred_updates=2, streamed_layers=(1,)),
    "disk-layer": dict(disk_layers=1),
    "gpu-layer-beside": dict(gpu_layers=1, streamed_layers=(2,)),  # keeps its own fp32 gradient
}


@pytest.mark.parametrize("one_pass", [True, False], ids=["one-pass", "two-passes"])
@pytest.mark.parametrize("name", sorted(PLANS))
def test_bf16_layer_gradients_train_bit_identically_to_fp32_ones(name, one_pass, monkeypatch, tmp_path):
    if not one_pass:
        monkeypatch.setattr(host_adamw, "_step", host_adamw._two_passes)
    elif not host_adamw.prepare():
        pytest.skip("no C++ compiler for torch.compile here")
    kw = dict(PLANS[name])
    plan = one_chunk_plan(**kw)
    assert plan.bf16_layer_grads
    optim = AdamWConfig(lr=1e-3, weight_decay=0.01)
    disk = "disk_layers" in kw
    got = train(plan, optim, tmp_path / "bf16" if disk else None)
    monkeypatch.setattr(Plan, "bf16_layer_grads", property(lambda self: False))
    want = train(plan, optim, tmp_path / "fp32" if disk else None)
    assert got[0] == want[0]
    assert set(got[1]) == set(want[1])
    for k in want[1]:
        assert torch.equal(got[1][k], want[1][k]), k


def test_clipped_bf16_layer_gradients_train_bit_identically(monkeypatch):
    """The clip coefficient scales the bf16 gradient in fp32, as it scales the fp32 one; the global norm sums
    the same values."""
    plan = one_chunk_plan(update="after_norm")
    optim = AdamWConfig(lr=1e-3, max_grad_norm=0.05)  # small enough to clip every step
    got = train(plan, optim)
    monkeypatch.setattr(Plan, "bf16_layer_grads", property(lambda self: False))
    want = train(plan, optim)
    assert got[0] == want[0]
    for k in want[1]:
        assert torch.equal(got[1][k], want[1][k]), k


@pytest.mark.parametrize(
    "change",
    [
        dict(chunk=2),  # two chunks: a sum of two bf16 results
        dict(mlp_tile_tokens=64),  # 128 tokens in two MLP tiles
        dict(seq_tile_tokens=16),
        dict(host_bf16_weights=False),  # torch's AdamW would need an fp32 copy of the gradient
        dict(compute_dtype="float32"),
    ],
)
def test_only_single_bf16_gradients_are_held_in_bf16(change):
    plan = replace(one_chunk_plan(), **change)
    plan.validate(MID.num_layers)
    assert not plan.bf16_layer_grads
    assert all(plan.grad_itemsize(u) == 4 for u in range(MID.num_layers + 2))
    assert replace(one_chunk_plan(), mlp_tile_tokens=BATCH * SEQ).bf16_layer_grads  # one tile is the whole chunk
    assert not replace(one_chunk_plan(), ranks=2).bf16_layer_grads


def test_the_buffers_and_copies_count_two_bytes_per_layer_parameter():
    plan = one_chunk_plan(streamed_layers=(1,), gpu_layers=1)
    n, L = unit_numels(MID), MID.num_layers
    assert [plan.grad_itemsize(u) for u in range(L + 2)] == [4, 4, 2, 2, 4]  # edges and the GPU layer fp32
    gpu = {s.name: s.nbytes for s in gpu_buffers(MID, plan)}
    assert gpu["layer_grad:0"] == gpu["layer_grad:1"] == 2 * n[1]
    assert gpu["grad:1"] == 4 * n[1] and gpu["grad:4"] == 4 * n[L + 1]  # the GPU layer's, the head's
    assert gpu["state_grad"] == 4 * plan.state_piece_numel  # the streamed layer's pieces, cast for the AdamW
    host = {s.name: s for s in host_buffers(MID, plan)}
    for spec in host.values():
        if spec.kind == "gradients":
            assert spec.nbytes == max(plan.grad_itemsize(u) * n[u] for u in spec.users)
    assert any(s.kind == "gradients" and 3 in s.users and s.nbytes == 2 * n[3] for s in host.values())
    outs = {o.unit: o.nbytes for o in ops(build_step_graph(MID, plan)) if o.kind == OpKind.GRAD_OUT}
    assert outs == {0: 4 * n[0], 3: 2 * n[3], L + 1: 4 * n[L + 1]}
    fp32 = {s.name: s.nbytes for s in gpu_buffers(MID, replace(plan, chunk=2))}
    assert fp32["layer_grad:0"] == 4 * n[1] and "state_grad" not in fp32


def test_a_second_gradient_under_a_bf16_plan_is_an_error(monkeypatch):
    """The runtime holds the invariant the plan relies on: a bf16 layer gradient is never summed into."""
    plan = one_chunk_plan()
    engine = Engine(MID, plan, RandomWeights(MID, seed=3), AdamWConfig())
    ids, labels = batches(MID.vocab_size, 1)[0]
    numerics = engine.ops.numerics
    backward = numerics.layer_backward

    def twice(layer, params, x, dy, pos, tile, accumulate, *rest):
        def both(name, g):
            accumulate(name, g)
            accumulate(name, g)

        return backward(layer, params, x, dy, pos, tile, both, *rest)

    monkeypatch.setattr(numerics, "layer_backward", twice)
    with pytest.raises(RuntimeError, match="second gradient under a bf16-gradient plan"):
        engine.train_step(ids, labels)
    engine.close()


@pytest.mark.gpu
def test_the_gpu_sums_a_bf16_gradients_squares_in_fp32_without_an_fp32_copy():
    from slideformer.runtime.gradient_ops import squared_norm

    g = torch.randn(50_000_000, device="cuda").to(torch.bfloat16)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    got = squared_norm(g)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < g.numel()  # not the 200 MB an fp32 copy takes
    want = g.double().square().sum()
    assert abs(got.item() - want.item()) <= 1e-5 * want.item()


def test_the_cpu_sums_a_bf16_gradients_squares_in_pieces():
    from slideformer.runtime.gradient_ops import squared_norm

    g = torch.randn(9_000_000).to(torch.bfloat16)  # three pieces
    want = g.double().square().sum()  # fp32 sums of 9M terms are this far off (a bf16 sum: 4e-3)
    assert abs(squared_norm(g).item() - want.item()) <= 1e-4 * want.item()
