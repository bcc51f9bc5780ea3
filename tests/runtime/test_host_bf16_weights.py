"""`Plan.host_bf16_weights`: host-updated units keep bf16 weights in RAM, cast by the CPU after each update, and
the GPU's loads copy them instead of casting the streamed fp32 master: the same rounding of the same master, so
on a CPU device training is bit-identical to the plain 'cpu' placement, through checkpoints too, when the update
is torch's AdamW followed by the cast. (The one-pass AdamW + cast these units use where a compiler is found
rounds a few ulps apart from torch's kernel: `tests/kernels/test_host_adamw.py`, and the reference loop in
`tests/runtime/test_exactness.py`.)"""

import pytest
import torch

from slideformer.checkpoint import STATE_FILE, write_safetensors
from slideformer.kernels import host_adamw
from slideformer.schedule.graph import build_step_graph, ops, unit_numels
from slideformer.schedule.memory import gpu_bytes, host_bytes
from slideformer.schedule.op import OpKind
from slideformer.schedule.plan import uniform_plan
from tests.runtime.test_streamed_updates import MID, train


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(late_updates=3, activation="recompute", window=1),
        dict(streamed_layers=(1,)),
    ],
)
def test_host_bf16_weights_train_bit_identically_to_streaming_the_master(kw, monkeypatch):
    monkeypatch.setattr(host_adamw, "_step", host_adamw._two_passes)
    want_losses, want = train(MID, **kw)
    got_losses, got = train(MID, host_bf16_weights=True, **kw)
    assert got_losses == want_losses
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name].reshape(-1), want[name].reshape(-1)), name


def test_a_restored_checkpoint_refreshes_the_bf16_weights(tmp_path, monkeypatch):
    """The weights in RAM follow a restored master (else the next forward would load the initial weights)."""
    monkeypatch.setattr(host_adamw, "_step", host_adamw._two_passes)
    from safetensors.torch import load_file

    _, after_two = train(MID, steps=2)
    write_safetensors(tmp_path / STATE_FILE, after_two.items())
    state = load_file(tmp_path / STATE_FILE)
    plain, _ = train(MID, steps=2, state=state)
    assert train(MID, steps=2, state=state, host_bf16_weights=True)[0] == plain


def test_graph_and_memory_count_the_bf16_copies():
    plan = uniform_plan("mid", MID.num_layers, 4, 32, chunk=2, streamed_layers=(1,), host_bf16_weights=True)
    plain = uniform_plan("mid", MID.num_layers, 4, 32, chunk=2, streamed_layers=(1,))
    n = unit_numels(MID)
    on_cpu = [u for u, where in enumerate(plan.placement) if where == "cpu"]
    assert len(on_cpu) == MID.num_layers + 1  # every unit but the streamed layer
    g = build_step_graph(MID, plan)
    loads = [o for o in ops(g) if o.kind == OpKind.LOAD]
    assert loads and all(not o.staged and o.nbytes == 2 * n[o.unit] for o in loads)
    updates = {o.unit: o for o in ops(g) if o.kind == OpKind.UPDATE}
    assert sorted(updates) == on_cpu and all(o.cast for o in updates.values())
    assert not any(o.cast for o in ops(build_step_graph(MID, plain)) if o.kind == OpKind.UPDATE)
    # 2 bytes per parameter more in RAM; no fp32 staging ring on the GPU
    extra = host_bytes(MID, plan)["bf16_weights"] - host_bytes(MID, plain)["bf16_weights"]
    assert extra == sum(2 * n[u] for u in on_cpu)
    assert gpu_bytes(MID, plain)["transfer_staging"] > 0 == gpu_bytes(MID, plan)["transfer_staging"]
