"""Data-parallel ranks in the plan, the graph, the simulator and the planner: every unit's gradient is summed
across ranks on the compute stream before it leaves the GPU or is updated (all-reduced for GPU-updated units,
reduce-scattered for host-updated ones, which copy out their rank's shard only), each collective costs a
ring's time, a step trains every rank's tokens, the ranks' host memory counts the shared masters once,
and `slideformer plan --gpus N` reports the scaling against one GPU."""

import json
from dataclasses import replace

import pytest

from slideformer.cli import main
from slideformer.models import PRESETS, load_model_config
from slideformer.schedule.graph import build_step_graph, op_of, ops, unit_numels
from slideformer.schedule.memory import SHARED_HOST_KINDS, host_bytes, host_bytes_all_ranks
from slideformer.schedule.op import COLLECTIVES, OpKind, Resource
from slideformer.schedule.plan import Plan, PlanError, uniform_plan
from slideformer.schedule.profile import Profile
from slideformer.simulator import simulate
from slideformer.simulator.costs import COLLECTIVE_LATENCY_S, DEFAULT_GPU_LINK_BANDWIDTH, CostModel, op_seconds

CFG = load_model_config("llama-3.1-8b").with_layers(4)
MODEL = "llama-3.1-8b:4"
PROFILE = Profile.load("h200-2026-12-01")

GRAPH_PLANS = {
    "host-updated": dict(activation="offload"),
    "late updates and a transient head gradient": dict(late_updates=2, transient_head_grad=True),
    "GPU-placed units": dict(gpu_units=2),
    "after_norm": dict(update="after_norm", gpu_units=1),
}


@pytest.mark.parametrize("kw", sorted(GRAPH_PLANS))
@pytest.mark.parametrize("cfg", [CFG, PRESETS["tiny-qwen2"]], ids=["untied", "tied"])
def test_each_unit_gradient_is_summed_across_ranks_before_it_leaves_or_is_updated(cfg, kw):
    plan = uniform_plan(cfg.name, cfg.num_layers, 4, 64, chunk=2, ranks=2, **GRAPH_PLANS[kw])
    g = build_step_graph(cfg, plan)
    L, last = cfg.num_layers, plan.chunks - 1
    ready = {0: f"embed_bwd:{last}", L + 1: f"head:{last}"} | {lay + 1: f"bwd:{lay}:{last}" for lay in range(L)}
    reductions = [o for o in ops(g) if o.kind in COLLECTIVES]
    assert sorted(o.unit for o in reductions) == list(range(L + 2))  # one per unit
    for o in reductions:
        u = o.unit
        kind = OpKind.ALLREDUCE if plan.placement[u] == "gpu" else OpKind.REDUCE_SCATTER
        assert o.name == f"{kind}:{u}" and o.kind == kind and o.resource == Resource.GPU
        assert o.nbytes == 4 * unit_numels(cfg)[u] and list(g.predecessors(o.name)) == [ready[u]]
        if plan.host_updated(u):  # only this rank's shard leaves the GPU
            assert op_of(g, f"grad_out:{u}").nbytes == 4 * -(-unit_numels(cfg)[u] // 2)
        # what reads the gradient next (its copy to the host, its GPU update) reads the sum
        readers = [n for n in g.successors(o.name) if op_of(g, n).kind in (OpKind.GRAD_OUT, OpKind.UPDATE)]
        if plan.update == "during_backward" or plan.host_updated(u):
            assert readers, f"nothing reads unit {u}'s summed gradient"
        for n in readers:
            assert ready[u] not in g.predecessors(n) and op_of(g, n).seq > o.seq
    if plan.update == "after_norm":
        assert {o.name for o in reductions} <= set(g.predecessors("norm"))
    one = build_step_graph(cfg, replace(plan, ranks=1))
    assert not any(o.kind in COLLECTIVES for o in ops(one))


@pytest.mark.parametrize("op, passes", [("allreduce:1", 2), ("reduce_scatter:2", 1)])
def test_a_collective_costs_a_ring_over_the_gpu_link(op, passes):
    """An all-reduce moves 2 (N - 1) / N of the bytes over each link, a reduce-scatter half that."""
    plan = uniform_plan(MODEL, 4, 8, 1024, chunk=4, ranks=2, gpu_units=2)  # units 0, 1 and the head on the GPU
    g = build_step_graph(CFG, plan)
    nbytes = 4 * unit_numels(CFG)[1]
    ring = lambda link: COLLECTIVE_LATENCY_S + passes * (2 - 1) / 2 * nbytes / link  # noqa: E731
    assert PROFILE.gpu_link_bandwidth is None  # unmeasured: the assumed PCIe link
    assert op_seconds(g, op, CostModel(PROFILE, CFG, plan.seq)) == pytest.approx(ring(DEFAULT_GPU_LINK_BANDWIDTH))
    measured = replace(PROFILE, gpu_link_bandwidth=100e9)
    assert op_seconds(g, op, CostModel(measured, CFG, plan.seq)) == pytest.approx(ring(100e9))


def scaling(batch: int, **kw) -> tuple[float, dict, dict]:
    """tokens/s at 2 ranks over 1 rank's, and each one's work per step by resource."""
    plans = (uniform_plan(MODEL, 4, batch, 1024, chunk=4, ranks=r, **kw) for r in (1, 2))
    one, two = (simulate(CFG, p, PROFILE) for p in plans)
    assert two.tokens_per_step == 2 * one.tokens_per_step and two.flops_per_step == 2 * one.flops_per_step
    return two.tokens_per_s / one.tokens_per_s, one.work_per_step, two.work_per_step


def test_a_gpu_bound_plan_scales_by_less_than_the_ranks_its_allreduces_add_to_the_gpu():
    plan = uniform_plan(MODEL, 4, 64, 1024, chunk=4, ranks=2, gpu_units=6, activation="recompute")
    g, cost = build_step_graph(CFG, plan), CostModel(PROFILE, CFG, plan.seq)
    reductions = sum(op_seconds(g, o.name, cost) for o in ops(g) if o.kind in COLLECTIVES)
    ratio, one, two = scaling(64, gpu_units=6, activation="recompute")
    assert 1 < ratio < 2
    assert two["gpu"] == pytest.approx(one["gpu"] + reductions)  # the step's other GPU work is one rank's
    assert two["cpu"] == one["cpu"] == 0


def test_a_cpu_bound_plan_shares_the_host_optimizer_between_the_ranks():
    """Each rank updates its shard while the others update theirs, bound by the host's memory bandwidth: the
    CPU's work per step is one process's, and the step trains twice the tokens."""
    ratio, one, two = scaling(16, activation="recompute")
    assert one["cpu"] > one["gpu"]  # CPU-bound on one GPU
    assert two["cpu"] == pytest.approx(one["cpu"])
    assert 1 < ratio <= 2


def test_the_ranks_host_memory_counts_the_shared_masters_and_bf16_weights_once():
    plan = uniform_plan(MODEL, 4, 8, 1024, chunk=4, activation="offload", host_bf16_weights=True, gpu_units=1)
    one = host_bytes(CFG, plan, PROFILE)
    two = host_bytes(CFG, replace(plan, ranks=2), PROFILE)
    assert all(one[k] == two[k] > 0 for k in SHARED_HOST_KINDS)
    assert two["optimizer_states"] == one["optimizer_states"] // 2  # each rank's shard (even unit sizes here)
    per_rank = sum(v for k, v in one.items() if k not in (*SHARED_HOST_KINDS, "optimizer_states"))
    assert host_bytes_all_ranks(CFG, plan, PROFILE) == sum(one.values())
    assert host_bytes_all_ranks(CFG, replace(plan, ranks=2), PROFILE) == sum(one.values()) + per_rank
    sim = simulate(CFG, replace(plan, ranks=2), PROFILE)
    assert sim.host_memory_bytes == sum(one.values()) + per_rank and sim.host_static == two


REFUSED = "'disk' and 'streamed' placements and 'disk' activations are not supported with several ranks"


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(streamed_layers=(1,), ranks=2), REFUSED),
        (dict(streamed_embedding=True, ranks=2), REFUSED),
        (dict(disk_layers=1, ranks=2), REFUSED),
        (dict(activation="disk", ranks=2), REFUSED),
        (dict(ranks=0), "ranks 0 must be >= 1"),
    ],
)
def test_placements_the_ranks_cannot_run_are_refused(kw, message):
    with pytest.raises(PlanError, match=message):
        uniform_plan(MODEL, 4, 8, 1024, **kw).validate(4)


def test_a_plan_of_ranks_round_trips_and_the_runtime_refuses_it_in_one_process():
    from slideformer.models import RandomWeights
    from slideformer.runtime import Engine

    cfg = PRESETS["tiny-llama"]
    plan = uniform_plan("tiny-llama", cfg.num_layers, 2, 16, device="cpu", ranks=2)
    assert Plan.from_json(plan.to_json()) == plan
    with pytest.raises(PlanError, match="plan.ranks 2 does not match the 1 processes of the run"):
        Engine(cfg, plan, RandomWeights(cfg))


def test_the_planner_for_two_gpus_reports_the_scaling_against_one(capsys):
    argv = ["plan", "--model", "tiny-llama", "--seq", "64", "--batch", "4", "--profile", "h200-2026-12-01"]
    assert main([*argv, "--gpus", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fits"] and report["ranks"] == report["plan"]["ranks"] == 2 and report["batch"] == 4
    assert not {"disk", "streamed"} & set(report["plan"]["placement"])
    assert report["predicted_tokens_per_s"] == 2 * 4 * 64 / report["predicted_step_s"]
    assert report["predicted_scaling"] == pytest.approx(
        report["predicted_tokens_per_s"] / report["predicted_tokens_per_s_one_gpu"]
    )
    assert main([*argv, "--gpus", "0"]) == 2
    assert "--gpus must be >= 1, got 0" in capsys.readouterr().err
