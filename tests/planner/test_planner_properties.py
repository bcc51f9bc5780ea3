"""Property-based tests of the planner over random model shapes, budgets and machine profiles: it never returns
a plan over budget, and more memory or bandwidth never makes its choice slower."""

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from slideformer.planner.search import TIE, Budgets, choose_plan, gpu_need, least_needs
from slideformer.schedule.memory import host_bytes_all_ranks
from slideformer.schedule.profile import Link
from tests.strategies import models, profiles

scales = st.floats(0.9, 3.0)


def budget_for(cfg, profile, batch, gpu_scale, host_scale) -> Budgets:
    """Budgets around the least this model needs, so that some fit and some do not."""
    gpu, host = least_needs(cfg, "random", batch, 64, profile, Budgets(0, 0))
    return Budgets(int(gpu * gpu_scale), int(host * host_scale))


@settings(max_examples=40, deadline=None)
@given(
    cfg=models(),
    profile=profiles(),
    gpu_scale=scales,
    host_scale=scales,
    batch=st.sampled_from([1, 2, 4]),
    ranks=st.sampled_from([1, 2]),
)
def test_planner_never_returns_a_plan_over_budget(cfg, profile, gpu_scale, host_scale, batch, ranks):
    budget = budget_for(cfg, profile, batch, gpu_scale, host_scale)
    verdict = choose_plan(cfg, "random", 64, batch, profile, budget, ranks=ranks)
    if not verdict.fits:
        assert verdict.shortfalls and verdict.plan is None
        return
    plan, sim = verdict.plan, verdict.simulation
    assert gpu_need(cfg, plan, profile) <= budget.gpu_bytes
    assert plan.ranks == ranks and host_bytes_all_ranks(cfg, plan, profile) <= budget.host_bytes
    assert sim.peak_gpu_bytes <= budget.gpu_bytes  # no tier over budget at any time of the simulation
    assert sim.host_memory_bytes <= budget.host_bytes


@settings(max_examples=30, deadline=None)
@given(
    cfg=models(),
    profile=profiles(),
    gpu_scale=scales,
    host_scale=scales,
    more=st.floats(1.0, 4.0),
    faster=st.floats(1.0, 4.0),
)
def test_more_memory_or_bandwidth_never_makes_the_chosen_plan_slower(cfg, profile, gpu_scale, host_scale, more, faster):
    budget = budget_for(cfg, profile, 2, gpu_scale, host_scale)
    base = choose_plan(cfg, "random", 64, 2, profile, budget)
    if not base.fits:
        return
    roomier = choose_plan(
        cfg, "random", 64, 2, profile, Budgets(int(budget.gpu_bytes * more), int(budget.host_bytes * more))
    )
    quicker_profile = replace(
        profile,
        h2d=Link(profile.h2d.bandwidth * faster, profile.h2d.latency_s),
        d2h=Link(profile.d2h.bandwidth * faster, profile.d2h.latency_s),
    )
    quicker = choose_plan(cfg, "random", 64, 2, quicker_profile, budget)
    assert roomier.fits and quicker.fits
    # the planner takes the fewest chunks among predictions within TIE of the fastest
    assert roomier.simulation.step_s <= base.simulation.step_s * (1 + TIE + 1e-9)
    assert quicker.simulation.step_s <= base.simulation.step_s * (1 + TIE + 1e-9)
