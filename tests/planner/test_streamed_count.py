"""The planner's refinement of the streamed-layer count between its grid's counts (`planner.search`)."""

from dataclasses import replace

from slideformer.models import load_model_config
from slideformer.planner.search import Budgets, _refined_streamed_count, with_streamed_layers
from slideformer.schedule.plan import uniform_plan
from slideformer.schedule.profile import Profile
from slideformer.simulator import simulate

CFG = load_model_config("llama-3.1-8b")
L = CFG.num_layers
BUDGETS = Budgets(23708219473, 129904115712)  # the H200 capped at 24 GiB, its RAM


def grid_plan(count: int):
    """A 24 GiB plan of the kind the planner picks at 1024 x 8: two GPU layers, `count` layers spread from layer
    0 up streamed, bf16 weights in RAM."""
    streamed = tuple(i * L // count for i in range(count))
    return uniform_plan(
        "llama-3.1-8b", L, 8, 1024, window=3, activation="recompute", gpu_layers=2, streamed_layers=streamed,
        streamed_embedding=True, host_bf16_weights=True, deferred_updates=1,
    )  # fmt: skip


def test_spreading_keeps_other_placements():
    plan = grid_plan(16)
    for k in (8, 13, 14, 16):
        q = with_streamed_layers(plan, k)
        assert q.placement[:3] == ["streamed", "gpu", "gpu"] and q.placement[-1] == plan.placement[-1]
        want = {i * L // k for i in range(k)} - {0, 1}  # the GPU layers stay on the GPU
        assert {lay for lay in range(L) if q.placement[lay + 1] == "streamed"} == want
    assert with_streamed_layers(plan, 16) == plan


def test_refinement_takes_a_faster_count_between_the_grids_and_fits():
    # a CPU update 15% faster than the profile's AdamW + cast: the balance moves off the grid's 16
    profile = Profile.load("h200-2026-12-01")
    two_passes = 1 / profile.cpu_adamw_rate() + 4 / profile.host_cast_bandwidth  # seconds per parameter
    profile = replace(profile, cpu_adamw_cast_busy_params_per_s=1 / (0.85 * two_passes))
    start = grid_plan(16)
    refined, simulation = _refined_streamed_count(CFG, start, profile, BUDGETS)
    count = sum(p == "streamed" for p in refined.placement[1 : L + 1])
    assert refined != start and 12 < count + 2 < 20  # + the two GPU layers the spread skips
    assert simulation.step_s == simulate(CFG, refined, profile).step_s < simulate(CFG, start, profile).step_s
    all_cpu = replace(start, placement=["cpu"] * (L + 2))
    assert _refined_streamed_count(CFG, all_cpu, profile, BUDGETS)[0] == all_cpu


def test_master_slots_are_taken_where_they_simulate_faster_and_fit():
    """At 1024 x 8 on the H200's profile (PCIe-bound) the planner's plan gains from loading the streamed layers'
    masters for their backward; a GPU budget without room for a slot leaves the plan as it was."""
    from slideformer.planner.search import _refined_master_slots, gpu_need, shortfalls

    profile = Profile.load("h200-2026-12-02-F")
    start = replace(grid_plan(16), window=2, deferred_updates=0, late_updates=8, kept_weights=9)
    before = simulate(CFG, start, profile)
    plan, simulation = _refined_master_slots(CFG, start, before, profile, BUDGETS)
    assert plan.streamed_master_slots >= plan.min_streamed_master_slots > 0
    assert not shortfalls(CFG, plan, profile, BUDGETS)
    assert simulation.step_s == simulate(CFG, plan, profile).step_s < before.step_s
    kept_none = replace(start, kept_weights=0)
    low = simulate(CFG, kept_none, profile)
    tight = replace(BUDGETS, gpu_bytes=gpu_need(CFG, kept_none, profile) + 2**28)  # a slot is 0.8 GiB
    assert not shortfalls(CFG, kept_none, profile, tight)
    assert _refined_master_slots(CFG, kept_none, low, profile, tight)[0] == kept_none
