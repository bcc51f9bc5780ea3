"""Property-based tests of the schedule: the graph, its simulation and the planner, over random model
shapes, plans, budgets and machine profiles."""

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from slideformer.schedule.profile import Disk, Link, Profile
from slideformer.models import PRESETS
from slideformer.schedule.graph import build_step_graph, op_of, unit_numels
from slideformer.schedule.plan import uniform_plan
from slideformer.schedule.memory import GiB, host_bytes_all_ranks
from slideformer.planner.search import TIE, Budgets, choose_plan, gpu_need, least_needs
from slideformer.simulator import simulate
from slideformer.simulator.costs import CostModel, step_lower_bound
from slideformer.simulator.simulate import _Link, _shared_copy_end


@st.composite
def models(draw):
    """Real-sized shapes (nothing is allocated: the simulator and planner only count bytes and flops)."""
    heads = draw(st.sampled_from([8, 16, 32]))
    return replace(
        PRESETS["llama-3.1-8b"],
        num_layers=draw(st.integers(1, 6)),
        num_heads=heads,
        num_kv_heads=draw(st.sampled_from([h for h in (1, 2, 4, 8) if heads % h == 0])),
        hidden_size=heads * 128,
        intermediate_size=draw(st.sampled_from([2, 3, 4])) * heads * 128,
        vocab_size=draw(st.sampled_from([32000, 128256])),
        name="random",
    )


@st.composite
def profiles(draw):
    rate = lambda lo, hi: draw(st.floats(lo, hi))  # noqa: E731
    return Profile(
        name="random",
        source="spec",
        device="random",
        date="-",
        host_memory_bytes=64 * GiB,
        host_cores=8,
        cpu_adamw_threads=[8],
        cpu_adamw_params_per_s=[rate(1e6, 1e10)],
        runtime_threads=8,
        gpu_memory_bytes=80 * GiB,
        gpu_bf16_flops=rate(1e9, 1e15),
        gpu_memory_bandwidth=rate(1e9, 3e12),
        gpu_adamw_params_per_s=rate(1e7, 1e11),
        issue_s=rate(0, 1e-3),
        h2d=Link(rate(1e7, 6e10), rate(0, 1e-4)),
        d2h=Link(rate(1e7, 6e10), rate(0, 1e-4)),
        staged_load_bandwidth=draw(st.none() | st.floats(1e7, 6e10)),
        host_cast_bandwidth=rate(1e8, 1e11),
        disk=Disk("-", "spec", rate(1e7, 1e10), rate(1e7, 1e10), rate(0, 0.1), rate(0, 0.1)),
        compute_slowdown_under_copies=rate(1.0, 1.3),
        duplex_bandwidth=draw(st.none() | st.floats(1e7, 1e11)),
        gpu_link_bandwidth=draw(st.none() | st.floats(1e9, 1e11)),
    )


@st.composite
def plans(draw, cfg):
    L = cfg.num_layers
    window = draw(st.integers(1, min(4, L)))
    chunk = draw(st.sampled_from([1, 2]))
    update = draw(st.sampled_from(["during_backward", "after_norm"]))
    ranks = draw(st.sampled_from([1, 2]))  # several ranks: no disk or streamed placements, no disk activations
    streams = update == "during_backward" and ranks == 1
    return uniform_plan(
        "random",
        L,
        chunk * draw(st.integers(1, 3)),
        draw(st.sampled_from([16, 64])),
        chunk=chunk,
        window=window,
        activation=draw(st.sampled_from(["offload", "recompute", "disk"] if ranks == 1 else ["offload", "recompute"])),
        keep_last=draw(st.integers(0, window)),
        gpu_units=draw(st.integers(0, L + 2)),
        update=update,
        late_updates=draw(st.integers(0, L + 1)) if update == "during_backward" else 0,
        deferred_updates=draw(st.integers(0, L + 1)) if update == "during_backward" else 0,
        gpu_layers=draw(st.integers(0, L)),
        grad_ring=draw(st.integers(1, 4)),
        disk_layers=draw(st.integers(0, L)) if ranks == 1 else 0,
        disk_ring=draw(st.integers(1, 3)),
        transfer_chunk_mb=1,
        device="cpu",
        streamed_layers=tuple(draw(st.sets(st.integers(0, L - 1)))) if streams else (),
        streamed_embedding=streams and draw(st.booleans()),
        host_bf16_weights=draw(st.booleans()),
        ranks=ranks,
    )


@settings(max_examples=80, deadline=None)
@given(data=st.data(), cfg=models(), profile=profiles())
def test_simulation_honours_dependencies_resources_and_updates(data, cfg, profile):
    plan = data.draw(plans(cfg))
    g = build_step_graph(cfg, plan)
    sim = simulate(cfg, plan, profile, steps=3)  # terminating at all is part of the property
    at = {(s.step, s.name): s for s in sim.spans}
    for step in range(3):
        for u, v in g.edges:  # every op starts after its inputs are produced
            assert at[(step, v)].start >= at[(step, u)].end - 1e-12
        this_step = [op_of(g, name) for (k, name) in at if k == step]
        updated = sorted(o.unit for o in this_step if o.kind == "update")
        pieces = [(o.unit, o.params) for o in this_step if o.kind == "state_update"]
        for u in plan.streamed_units:  # a streamed unit's pieces cover its parameters once
            assert sum(n for v, n in pieces if v == u) == unit_numels(cfg)[u]
        # each unit updated exactly once per step
        assert sorted(updated + plan.streamed_units) == list(range(cfg.num_layers + 2))
        if step:  # the next step's weights are the updated ones
            for unit, op in g.graph["updates"].items():
                for n in g.nodes:
                    if n.startswith(f"load:{unit}:"):
                        assert at[(step, n)].start >= at[(step - 1, op)].end - 1e-12
    for res in ("gpu", "h2d", "d2h", "cpu", "disk", "opt"):  # one op at a time per resource
        spans = sorted((s for s in sim.spans if s.resource == res), key=lambda s: s.start)
        for a, b in zip(spans, spans[1:]):
            assert b.start >= a.end - 1e-12
    assert all(b > a for a, b in zip(sim.step_ends, sim.step_ends[1:]))
    # the planner's branch and bound is exact only if its bound never exceeds a simulated step
    assert step_lower_bound(cfg, plan, CostModel(profile, cfg, plan.seq)) <= sim.step_s * (1 + 1e-9)


@settings(max_examples=80, deadline=None)
@given(data=st.data(), cfg=models(), profile=profiles())
def test_a_disk_ring_buffer_serves_one_unit_or_layer_at_a_time(data, cfg, profile):
    """From its read to the end of its write-back a disk unit owns its ring buffer; from the first save to
    the write, and from the read to the last fetch, a disk-bound layer's activations own theirs; across
    steps too."""
    plan = data.draw(plans(cfg))
    sim = simulate(cfg, plan, profile, steps=2)
    g = build_step_graph(cfg, plan)
    slot = g.graph["disk_slot"]
    at = {(s.step, s.name): s for s in sim.spans}
    held = [
        (at[(k, f"disk_read:{u}")].start, at[(k, f"disk_write:{u}")].end, "state", slot[u])
        for k in range(2)
        for u in plan.disk_units
    ]
    C = plan.chunks
    for lay in (lay for lay, p in enumerate(plan.activations) if p == "disk"):
        for k in range(2):
            held.append(
                (at[(k, f"save:{lay}:0")].start, at[(k, f"act_write:{lay}")].end, "act", op_of(g, f"save:{lay}:0").slot)
            )
            held.append(
                (
                    at[(k, f"act_read:{lay}")].start,
                    at[(k, f"fetch:{lay}:{C - 1}")].end,
                    "act",
                    op_of(g, f"act_read:{lay}").slot,
                )
            )
    for ring in {(kind, s) for _, _, kind, s in held}:
        spans = sorted((a, b) for a, b, kind, s in held if (kind, s) == ring)
        for (a0, b0), (a1, b1) in zip(spans, spans[1:]):
            assert a1 >= b0 - 1e-12
        for u in plan.disk_units:  # the update runs inside its unit's hold
            for step in range(2):
                assert at[(step, f"disk_read:{u}")].end <= at[(step, f"update:{u}")].start + 1e-12
                assert at[(step, f"update:{u}")].end <= at[(step, f"disk_write:{u}")].start + 1e-12


@settings(max_examples=80, deadline=None)
@given(data=st.data(), cfg=models(), profile=profiles())
def test_layers_compute_only_on_their_own_resident_weights(data, cfg, profile):
    """A window slot is never overwritten while a layer that reads it runs, and holds that layer's weights."""
    plan = data.draw(plans(cfg))
    sim = simulate(cfg, plan, profile, steps=2)
    W = plan.window
    loads = [s for s in sim.spans if s.kind == "load" and 0 < int(s.name.split(":")[1]) <= cfg.num_layers]
    for op in (s for s in sim.spans if s.kind in ("fwd", "bwd")):
        layer = int(op.name.split(":")[1])
        same_slot = [s for s in loads if (int(s.name.split(":")[1]) - 1) % W == layer % W]
        before = [s for s in same_slot if s.end <= op.start + 1e-12]
        assert before and int(max(before, key=lambda s: s.end).name.split(":")[1]) == layer + 1
        assert not [s for s in same_slot if s.start < op.end - 1e-12 and s.end > op.start + 1e-12]


def budget_for(cfg, profile, batch, gpu_scale, host_scale) -> Budgets:
    """Budgets around the least this model needs, so that some fit and some do not."""
    gpu, host = least_needs(cfg, "random", batch, 64, profile, Budgets(0, 0))
    return Budgets(int(gpu * gpu_scale), int(host * host_scale))


scales = st.floats(0.9, 3.0)


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
        staged_load_bandwidth=profile.staged_load_bandwidth and profile.staged_load_bandwidth * faster,
    )
    quicker = choose_plan(cfg, "random", 64, 2, quicker_profile, budget)
    assert roomier.fits and quicker.fits
    # the planner takes the fewest chunks among predictions within TIE of the fastest
    assert roomier.simulation.step_s <= base.simulation.step_s * (1 + TIE + 1e-9)
    assert quicker.simulation.step_s <= base.simulation.step_s * (1 + TIE + 1e-9)


@settings(max_examples=200, deadline=None)
@given(
    gaps=st.lists(st.tuples(st.floats(0, 2), st.floats(0.01, 2), st.floats(1, 100)), max_size=6),
    start=st.floats(0, 8),
    nbytes=st.integers(1, 500),
    rate=st.floats(1, 100),
    duplex=st.floats(1, 150),
)
def test_a_copy_shares_the_duplex_limit_with_the_other_direction(gaps, start, nbytes, rate, duplex):
    """A copy moves all its bytes, never faster than its own rate, and while the other direction copies at most
    what that leaves of the duplex limit (a thousandth of its rate at least, so that it ends)."""
    other, t = _Link(), 0.0
    for gap, length, other_rate in gaps:
        other.add(t + gap, t + gap + length, other_rate)
        t += gap + length
    own = _Link()
    end = _shared_copy_end(start, nbytes, rate, other, duplex, own)
    pieces = list(zip(own.starts, own.ends, own.rates))
    assert pieces[0][0] == start and abs(pieces[-1][1] - end) <= 1e-9 * max(1, end)
    assert all(abs(a[1] - b[0]) <= 1e-9 * max(1, b[0]) for a, b in zip(pieces, pieces[1:]))
    assert abs(sum((e - s) * r for s, e, r in pieces) - nbytes) <= 1e-6 * nbytes
    for s, e, r in pieces:
        assert r <= rate * (1 + 1e-12)
        for os, oe, o_rate in zip(other.starts, other.ends, other.rates):
            if min(e, oe) - max(s, os) > 1e-9:
                assert r <= max(duplex - o_rate, 1e-3 * rate) * (1 + 1e-12)
