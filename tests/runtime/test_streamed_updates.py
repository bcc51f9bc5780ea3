"""The 'streamed' placement: master and AdamW states stream to the GPU in pieces and back; the same maths
as the CPU's torch AdamW (the same fused kernel, piece by piece), so on a CPU device it is bit-identical."""

from dataclasses import replace

import pytest
import torch

from slideformer.checkpoint import STATE_FILE, write_safetensors
from slideformer.models import PRESETS, RandomWeights
from slideformer.runtime import AdamWConfig, Engine
from slideformer.schedule.graph import build_step_graph, op_of, ops, unit_numels
from slideformer.schedule.plan import PlanError, uniform_plan

# layers of 553,344 parameters: two pieces each at transfer_chunk_mb=1 (524,288 per piece)
MID = replace(PRESETS["tiny-llama"], hidden_size=192, intermediate_size=768, head_dim=48, num_layers=3, name="mid")
OPTIM = AdamWConfig(lr=1e-3, weight_decay=0.01)


def batches(vocab: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    ids = [torch.randint(0, vocab, (4, 32), generator=g) for _ in range(steps)]
    return [(x, torch.roll(x, -1, 1)) for x in ids]


def train(cfg, steps=4, state=None, **kw):
    plan = uniform_plan("mid", cfg.num_layers, 4, 32, **({"chunk": 2, "device": "cpu", "transfer_chunk_mb": 1} | kw))
    engine = Engine(cfg, plan, RandomWeights(cfg, seed=3), OPTIM)
    if state is not None:  # fresh tensors, as from a checkpoint file (host units adopt what they are given)
        engine.load_training_state(lambda name: state[name].clone(), set(state))
    data = batches(cfg.vocab_size, steps)
    losses = [engine.train_step(ids, labels).loss for ids, labels in data]
    out = engine.training_state()
    engine.close()
    return losses, {k: v.clone() for k, v in out.items()}


@pytest.mark.parametrize(
    "kw",
    [
        dict(streamed_layers=(0, 1, 2)),
        dict(streamed_layers=(1,), late_updates=3),
        dict(streamed_layers=(0, 2), activation="recompute", window=1),
        dict(streamed_embedding=True, late_updates=2),
        dict(streamed_embedding=True, streamed_layers=(1,), cfg=replace(MID, tie_word_embeddings=True)),
    ],
)
def test_streamed_layers_train_bit_identically_to_cpu_ones(kw):
    cfg = kw.pop("cfg", MID)
    plan = uniform_plan("mid", cfg.num_layers, 4, 32, device="cpu", transfer_chunk_mb=1, **kw)
    assert plan.streamed_units and all(plan.streamed_pieces(cfg.layer_params) == 2 for _ in plan.streamed_units)
    base = {k: v for k, v in kw.items() if k not in ("streamed_layers", "streamed_embedding")}
    want_losses, want = train(cfg, **base)
    got_losses, got = train(cfg, **kw)
    assert got_losses == want_losses
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name].reshape(-1), want[name].reshape(-1)), name


@pytest.mark.parametrize(
    "kw",
    [
        dict(streamed_layers=(0, 1, 2), window=1, streamed_master_slots=1),
        dict(streamed_layers=(0, 1, 2), window=1, streamed_master_slots=2, late_updates=2),
        # one chunk, bf16 weights in RAM: bf16 layer gradients too
        dict(streamed_layers=(0, 1), window=1, streamed_master_slots=1, chunk=4, host_bf16_weights=True),
        dict(streamed_layers=(0, 2), window=2, streamed_master_slots=1, streamed_embedding=True),
    ],
)
def test_streamed_masters_loaded_by_the_backward_train_bit_identically(kw):
    """A streamed layer whose backward loads its fp32 master into a GPU master slot, where its update reads and
    writes it (`Plan.streamed_master_slots`), trains bit for bit as without the slots."""
    plan = uniform_plan("mid", MID.num_layers, 4, 32, device="cpu", transfer_chunk_mb=1, **kw)
    assert any(plan.loads_streamed_master(u) for u in range(MID.num_layers + 2))
    want_losses, want = train(MID, **(kw | dict(streamed_master_slots=0)))
    got_losses, got = train(MID, **kw)
    assert got_losses == want_losses
    for name in want:
        assert torch.equal(got[name].reshape(-1), want[name].reshape(-1)), name


def test_master_loads_move_the_master_once_and_wait_for_their_slot():
    """A master-loading layer's backward load copies its fp32 master (4 bytes a parameter) into its slot once
    the previous layer there has been copied out, and its pieces bring in only the AdamW states (8 bytes)."""
    plan = uniform_plan(
        "mid", MID.num_layers, 4, 32, window=1, device="cpu", transfer_chunk_mb=1, streamed_layers=(0, 1, 2)
    )
    plan.streamed_master_slots = 1
    plan.validate(MID.num_layers)
    g, n = build_step_graph(MID, plan), unit_numels(MID)
    assert [u for u in range(5) if plan.loads_streamed_master(u)] == [1, 2]  # layer 2's weights stay for its backward
    for u in (1, 2):
        load = op_of(g, f"load:{u}:bwd")
        assert (load.nbytes, load.slot, load.staged) == (4 * n[u], 0, False)
        assert sum(o.nbytes for o in ops(g) if o.kind == "state_in" and o.unit == u) == 8 * n[u]
    assert sum(o.nbytes for o in ops(g) if o.kind == "state_in" and o.unit == 3) == 12 * n[3]
    last_out = max((o for o in ops(g) if o.kind == "state_out" and o.unit == 2), key=lambda o: o.seq).name
    assert g.has_edge(last_out, "load:1:bwd")  # layer 1 reuses layer 2's slot


def test_too_few_master_slots_are_refused():
    plan = uniform_plan("mid", MID.num_layers, 4, 32, window=2, device="cpu", streamed_layers=(0, 1, 2))
    plan.streamed_master_slots = 1
    plan.validate(MID.num_layers)  # only layer 0 is loaded again for its backward
    plan.window = 1
    plan.validate(MID.num_layers)
    wide = uniform_plan("tiny-llama", 4, 4, 32, window=3, device="cpu", streamed_layers=(1, 3))
    wide.streamed_master_slots = 1
    with pytest.raises(PlanError, match="streamed_master_slots must be 0: no streamed decoder layer is loaded"):
        wide.validate(4)
    four = uniform_plan("tiny-llama", 4, 4, 32, window=2, device="cpu", streamed_layers=(0, 1))
    four.streamed_master_slots = 1
    with pytest.raises(PlanError, match="must be 0 or at least 2"):
        four.validate(4)
    four.streamed_master_slots = 2
    four.validate(4)


def test_a_streamed_checkpoint_resumes_on_the_cpu_placement_and_back(tmp_path):
    from safetensors.torch import load_file

    _, after_two = train(MID, steps=2, streamed_layers=(0, 2))
    write_safetensors(tmp_path / STATE_FILE, after_two.items())
    state = load_file(tmp_path / STATE_FILE)
    straight, _ = train(MID, steps=2, state=state, streamed_layers=(0, 2))
    on_cpu, cpu_state = train(MID, steps=2, state=state)
    assert on_cpu == straight
    back, _ = train(MID, steps=1, state=cpu_state, streamed_layers=(1,))
    assert back == train(MID, steps=1, state=cpu_state)[0]


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(update="after_norm", streamed_layers=(1,)), "'streamed' placement needs update 'during_backward'"),
    ],
)
def test_streamed_plans_that_cannot_run_are_refused(kw, message):
    plan = uniform_plan("tiny-llama", 4, 4, 32, device="cpu", **kw)
    with pytest.raises(PlanError, match=message):
        plan.validate(4)
    plan = uniform_plan("tiny-llama", 4, 4, 32, device="cpu")
    plan.placement[0] = "streamed"
    plan.validate(4)  # a streamed embedding is fine
    plan.placement[-1] = "streamed"
    with pytest.raises(PlanError, match="'streamed' for them and the embedding; the head is 'cpu' or 'gpu'"):
        plan.validate(4)


def test_streamed_pieces_cycle_through_the_gpu_slots_in_order():
    """Each piece goes in, is updated and goes out on one slot; a slot is refilled only after it went out."""
    from slideformer.schedule.plan import STATE_STAGING_BUFFERS

    plan = uniform_plan("mid", MID.num_layers, 4, 32, device="cpu", transfer_chunk_mb=1, streamed_layers=(0, 1, 2))
    g = build_step_graph(MID, plan)
    ins = [o.name for o in ops(g) if o.kind == "state_in"]
    assert len(ins) == 6
    for j, n in enumerate(ins):
        unit, piece = n.split(":")[1:]
        assert op_of(g, n).slot == j % STATE_STAGING_BUFFERS
        assert g.has_edge(n, f"state_update:{unit}:{piece}") and g.has_edge(
            f"state_update:{unit}:{piece}", f"state_out:{unit}:{piece}"
        )
        if j >= STATE_STAGING_BUFFERS:
            assert g.has_edge(ins[j - STATE_STAGING_BUFFERS].replace("state_in", "state_out"), n)
    assert sum(o.params for o in ops(g) if o.kind == "state_update") == 3 * MID.layer_params


def test_a_streamed_embedding_gives_its_gradient_back_after_its_last_piece():
    """The embedding's fp32 gradient is taken by its backward and given back by the update of its last piece
    (no copy to the host), so the GPU holds it only between the two."""
    plan = uniform_plan("mid", MID.num_layers, 4, 32, chunk=2, transfer_chunk_mb=1, streamed_embedding=True)
    g = build_step_graph(MID, plan)
    grad = 4 * unit_numels(MID)[0]
    taken = [o.name for o in ops(g) if o.gpu_alloc == grad]
    given = [o.name for o in ops(g) if o.gpu_free == grad]
    pieces = [o.name for o in ops(g) if o.kind == "state_update" and o.unit == 0]
    assert taken == ["embed_bwd:0"] and given == [pieces[-1]] and len(pieces) == plan.streamed_pieces(grad // 4)
    assert not any(o.kind == "grad_out" and o.unit == 0 for o in ops(g))
