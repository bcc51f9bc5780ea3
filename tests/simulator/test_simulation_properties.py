"""Property-based tests of the simulator over random model shapes, plans and machine profiles: it honours the
graph's dependencies and resources, a disk ring serves one unit at a time, layers compute on their own weights,
and a copy shares the PCIe duplex limit."""

from hypothesis import given, settings
from hypothesis import strategies as st

from slideformer.schedule.graph import build_step_graph, op_of, unit_numels
from slideformer.simulator import simulate
from slideformer.simulator.costs import (
    CostModel,
    forward_pipeline_bound,
    late_update_bound,
    step_lower_bound,
    streamed_embedding_bound,
)
from slideformer.simulator.simulate import _Busy, _shared_copy_end
from tests.strategies import models, plans, profiles


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


@settings(max_examples=200, deadline=None)
@given(data=st.data(), cfg=models(), profile=profiles(), steps=st.integers(2, 3))
def test_the_pipeline_bounds_never_exceed_a_simulated_step(data, cfg, profile, steps):
    """Each on its own (the step bound's other terms often hide them): the planner prunes by them."""
    plan = data.draw(plans(cfg))
    sim = simulate(cfg, plan, profile, steps=steps)
    cost = CostModel(profile, cfg, plan.seq)
    for bound in (forward_pipeline_bound, late_update_bound, streamed_embedding_bound):
        assert bound(cfg, plan, cost) <= sim.step_s * (1 + 1e-9), bound.__name__


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
    """A weight slot (the window's or a kept layer's) is never overwritten while a layer that reads it runs, and
    holds that layer's weights."""
    plan = data.draw(plans(cfg))
    sim = simulate(cfg, plan, profile, steps=2)
    loads = [s for s in sim.spans if s.kind == "load" and 0 < int(s.name.split(":")[1]) <= cfg.num_layers]
    for op in (s for s in sim.spans if s.kind in ("fwd", "bwd")):
        layer = int(op.name.split(":")[1])
        same_slot = [s for s in loads if plan.weight_slot(int(s.name.split(":")[1]) - 1) == plan.weight_slot(layer)]
        before = [s for s in same_slot if s.end <= op.start + 1e-12]
        assert before and int(max(before, key=lambda s: s.end).name.split(":")[1]) == layer + 1
        assert not [s for s in same_slot if s.start < op.end - 1e-12 and s.end > op.start + 1e-12]


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
    other = _spans(gaps)
    own = _Busy()
    end = _shared_copy_end(start, nbytes, rate, own, other, duplex)
    pieces = _check_pieces(own, start, end, nbytes)
    for s, e, r in pieces:
        assert r <= rate * (1 + 1e-12)
        for os, oe, o_rate in zip(other.starts, other.ends, other.rates):
            if min(e, oe) - max(s, os) > 1e-9:
                assert r <= max(duplex - o_rate, 1e-3 * rate) * (1 + 1e-12)


def _spans(gaps: list[tuple[float, float, float]]) -> _Busy:
    busy, t = _Busy(), 0.0
    for gap, length, rate in gaps:
        busy.add(t + gap, t + gap + length, rate)
        t += gap + length
    return busy


def _check_pieces(own: _Busy, start: float, end: float, nbytes: int) -> list[tuple[float, float, float]]:
    """The copy's pieces run back to back from its start to its end and move all its bytes."""
    pieces = list(zip(own.starts, own.ends, own.rates))
    assert pieces[0][0] == start and abs(pieces[-1][1] - end) <= 1e-9 * max(1, end)
    assert all(abs(a[1] - b[0]) <= 1e-9 * max(1, b[0]) for a, b in zip(pieces, pieces[1:]))
    assert abs(sum((e - s) * r for s, e, r in pieces) - nbytes) <= 1e-6 * nbytes
    return pieces


@settings(max_examples=200, deadline=None)
@given(
    gaps=st.lists(st.tuples(st.floats(0, 2), st.floats(0.01, 2), st.floats(1, 100)), max_size=6),
    updates=st.lists(st.tuples(st.floats(0, 2), st.floats(0.01, 2), st.just(0.0)), max_size=6),
    start=st.floats(0, 8),
    nbytes=st.integers(1, 500),
    rate=st.floats(1, 100),
    duplex=st.floats(1, 150),
    alone=st.none() | st.floats(1, 100),
    duplexed=st.none() | st.floats(1, 100),
)
def test_a_copy_in_beside_the_cpu_update_moves_at_most_the_rate_measured_so(
    gaps, updates, start, nbytes, rate, duplex, alone, duplexed
):
    """While the CPU updates, a host-to-GPU copy moves at most the rate measured beside the update (with the
    other direction idle, or copying); elsewhere exactly as without the CPU; and never faster than without
    it."""
    other, cpu = _spans(gaps), _spans(updates)
    own, free = _Busy(), _Busy()
    end = _shared_copy_end(start, nbytes, rate, own, other, duplex, cpu, (alone, duplexed))
    assert end >= _shared_copy_end(start, nbytes, rate, free, other, duplex) - 1e-9 * max(1, end)
    for s, e, r in _check_pieces(own, start, end, nbytes):
        if e - s <= 1e-9 * max(1, e):  # too short to say which side of a boundary its middle is on
            continue
        mid = (s + e) / 2
        copying = any(os <= mid < oe for os, oe in zip(other.starts, other.ends))
        cap = (duplexed if copying else alone) if any(cs <= mid < ce for cs, ce in zip(cpu.starts, cpu.ends)) else None
        limit = min(rate, cap or rate)
        if copying:
            o_rate = next(r for os, oe, r in zip(other.starts, other.ends, other.rates) if os <= mid < oe)
            limit = max(min(limit, duplex - o_rate), 1e-3 * rate)
        assert abs(r - limit) <= 1e-9 * limit
