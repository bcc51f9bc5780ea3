"""The planner's saved-attention variants (`planner.search._saved_attention_variants`): each fits, each saves as
many layers as fit (in RAM, then on the GPU), a smaller gradient ring is taken only where it lets more layers
save, and a profile that never measured the saved backward gets none."""

import json
from dataclasses import replace

from slideformer.models import load_model_config
from slideformer.planner.search import Budgets, _refined_memory_trade, _saved_attention_variants, shortfalls
from slideformer.simulator import simulate
from slideformer.schedule.plan import Plan
from slideformer.schedule.profile import Profile
from tests import REPO

CFG = load_model_config("llama-3.1-8b")
SAVED = REPO / "bench/plans/llama-3.1-8b-24gib-65536x1-h200-2026-12-02-F.json"  # lease F's 64K plan


def plain_plan() -> tuple[Plan, Budgets]:
    chosen = json.loads(SAVED.read_text())
    return replace(Plan(**chosen["plan"]), saved_attention=0, grad_ring=4, kept_weights=0), Budgets(**chosen["budgets"])


def test_variants_fit_save_the_most_and_trade_the_ring_only_for_more_saved_layers():
    plan, budgets = plain_plan()
    profile = Profile.load("h200-2026-12-02-F")
    variants = [q for q in _saved_attention_variants(CFG, plan, profile, budgets) if not q.resident_attention]
    assert variants and variants[0].grad_ring == plan.grad_ring
    saved = [q.saved_attention for q in variants]
    assert saved == sorted(set(saved)) and saved[0] > 0  # each smaller ring saves more layers
    assert [q.grad_ring for q in variants] == sorted((q.grad_ring for q in variants), reverse=True)
    for q in variants:
        assert not shortfalls(CFG, q, profile, budgets)
        more = replace(q, saved_attention=q.saved_attention + 1)
        assert q.saved_attention == CFG.num_layers or shortfalls(CFG, more, profile, budgets)


def test_no_variant_without_a_measured_saved_backward():
    plan, budgets = plain_plan()
    assert _saved_attention_variants(CFG, plan, Profile.load("h200-2026-12-02-D"), budgets) == []


def test_resident_variants_keep_the_most_on_the_gpu_beside_the_ram_saved():
    plan, budgets = plain_plan()
    profile = Profile.load("h200-2026-12-02-F")
    resident = [q for q in _saved_attention_variants(CFG, plan, profile, budgets) if q.resident_attention]
    assert resident
    for q in resident:
        assert not shortfalls(CFG, q, profile, budgets)
        assert q.saved_attention + q.resident_attention <= CFG.num_layers
        more = replace(q, resident_attention=q.resident_attention + 1)
        assert q.saved_attention + q.resident_attention == CFG.num_layers or shortfalls(CFG, more, profile, budgets)


def test_the_memory_trade_after_the_grid_fits_and_is_never_slower():
    """From lease F's 64K plan (20 layers saved in RAM, 5 kept weights), giving back the ring's memory saves more
    layers, in RAM and on the GPU: faster, and within the budgets."""
    chosen = json.loads(SAVED.read_text())
    plan, budgets = Plan(**chosen["plan"]), Budgets(**chosen["budgets"])
    profile = Profile.load("h200-2026-12-02-F")
    before = simulate(CFG, plan, profile)
    traded, sim = _refined_memory_trade(CFG, plan, before, profile, budgets)
    assert not shortfalls(CFG, traded, profile, budgets)
    assert sim.step_s < before.step_s and traded.saved_attention + traded.resident_attention > plan.saved_attention
    assert _refined_memory_trade(CFG, traded, sim, profile, budgets)[0] == traded  # a fixed point
