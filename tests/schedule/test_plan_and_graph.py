"""The Plan round-trips through JSON; the operation graph is well formed for every plan shape."""

from dataclasses import replace

import networkx as nx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slideformer.models import PRESETS
from slideformer.schedule.graph import build_step_graph, op_of, ops
from slideformer.schedule.plan import Plan, PlanError, uniform_plan


def test_plan_json_round_trip(tmp_path):
    plan = uniform_plan("llama-3.1-8b", 32, 8, 2048, chunk=4, window=3, keep_last=2, gpu_units=3, update="after_norm")
    plan.save(tmp_path / "p.json")
    assert Plan.load(tmp_path / "p.json") == plan


@settings(max_examples=60, deadline=None)
@given(
    layers=st.integers(1, 7),
    window=st.integers(1, 4),
    chunks=st.integers(1, 3),
    ring=st.integers(1, 4),
    policy=st.sampled_from(["offload", "recompute"]),
    keep=st.integers(0, 2),
    gpu_units=st.integers(0, 3),
    gpu_layers=st.integers(0, 2),
    late=st.integers(0, 3),
    deferred=st.integers(0, 3),
    update=st.sampled_from(["during_backward", "after_norm"]),
)
def test_graph_is_acyclic_and_updates_each_unit_once(
    layers, window, chunks, ring, policy, keep, gpu_units, gpu_layers, late, deferred, update
):
    cfg = replace(PRESETS["tiny-llama"], num_layers=layers)
    window = min(window, layers)
    plan = uniform_plan(
        "tiny-llama",
        layers,
        2 * chunks,
        16,
        chunk=2,
        window=window,
        activation=policy,
        keep_last=min(keep, window),
        gpu_units=gpu_units,
        gpu_layers=gpu_layers,
        grad_ring=ring,
        update=update,
        late_updates=min(late, layers + 1) if update == "during_backward" else 0,
        deferred_updates=min(deferred, layers + 1) if update == "during_backward" else 0,
        device="cpu",
    )
    plan.validate(layers)
    g = build_step_graph(cfg, plan)
    assert nx.is_directed_acyclic_graph(g)
    updates = [o.unit for o in ops(g) if o.kind == "update"]
    assert sorted(updates) == list(range(layers + 2))
    # the issue order is a topological order: every dependency is issued before its dependant
    for u, v in g.edges:
        assert op_of(g, u).seq < op_of(g, v).seq
    # every layer's forward and backward reads weights loaded into its slot, never overwritten in between
    for lay in range(layers):
        loads = [n for n in g.nodes if n.startswith(f"load:{lay + 1}:")]
        assert loads, f"layer {lay} never loaded"
    # units updated after the backward run after the embedding's gradient is out, in the plan's order
    seq = {o.name: o.seq for o in ops(g)}
    late_updates = [f"update:{u}" for u in plan.late_units]
    assert all(seq[a] < seq[b] for a, b in zip(late_updates, late_updates[1:]))
    assert all(seq[n] > seq["embed_bwd:0"] for n in late_updates)
    if layers + 1 in plan.late_units:  # a deferred head is loaded after every layer's forward load
        layer_loads = [
            seq[n] for n in seq if n.startswith("load:") and n.endswith(":fwd") and n != f"load:{layers + 1}:fwd"
        ]
        assert seq[f"load:{layers + 1}:fwd"] > max(layer_loads)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(chunk=3), "chunk 3 must divide batch 4"),
        (dict(window=9), "window 9"),
        (dict(activations=["keep", "offload", "offload", "offload"]), "'keep' is allowed only"),
        (dict(update="sometimes"), "update must be one of"),
        # resident attention on the last layers, overlapping the first layers' saved in RAM, or on a kept layer
        (dict(activations=["offload"] * 4, saved_attention=3, resident_attention=2), "none of them among"),
        (dict(activations=["offload"] * 3 + ["keep"], resident_attention=1), "resident_attention 1 needs"),
    ],
)
def test_bad_plans_are_refused_with_reasons(bad, message):
    plan = uniform_plan("tiny-llama", 4, 4, 32, chunk=2, device="cpu")
    for k, v in bad.items():
        setattr(plan, k, v)
    with pytest.raises(PlanError, match=message):
        plan.validate(4)


def test_the_engine_has_a_body_for_every_kind_of_op_the_graph_builds():
    from slideformer.models import RandomWeights
    from slideformer.runtime import Engine

    cfg = PRESETS["tiny-llama"]
    kinds = set()
    for kw in (
        dict(activation="offload"),
        dict(update="after_norm"),
        dict(activation="disk", disk_layers=2),
        dict(streamed_layers=(1,)),
        dict(saved_attention=2),
        dict(ranks=2),  # host units reduce-scattered
        dict(ranks=2, gpu_units=1),  # GPU units all-reduced
    ):
        plan = uniform_plan("tiny-llama", cfg.num_layers, 2, 16, device="cpu", **kw)
        kinds |= {o.kind for o in ops(build_step_graph(cfg, plan))}
    engine = Engine(cfg, uniform_plan("tiny-llama", cfg.num_layers, 2, 16, device="cpu"), RandomWeights(cfg))
    assert kinds == set(engine.executor.bodies)
    engine.close()
