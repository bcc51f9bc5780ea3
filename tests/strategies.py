"""Hypothesis strategies shared by the property tests: real-sized model shapes (nothing is allocated), machine
profiles and plans."""

from dataclasses import replace

from hypothesis import strategies as st

from slideformer.models import PRESETS
from slideformer.schedule.memory import GiB
from slideformer.schedule.plan import uniform_plan
from slideformer.schedule.profile import Disk, Link, Profile


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
        host_cast_bandwidth=rate(1e8, 1e11),
        disk=Disk("-", "spec", rate(1e7, 1e10), rate(1e7, 1e10), rate(0, 0.1), rate(0, 0.1)),
        compute_slowdown_under_copies=rate(1.0, 1.3),
        duplex_bandwidth=draw(st.none() | st.floats(1e7, 1e11)),
        h2d_beside_update_bandwidth=draw(st.none() | st.floats(1e7, 6e10)),
        h2d_beside_update_duplex_bandwidth=draw(st.none() | st.floats(1e7, 6e10)),
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
    activation = draw(st.sampled_from(["offload", "recompute", "disk"] if ranks == 1 else ["offload", "recompute"]))
    keep_last = draw(st.integers(0, window))
    saved = draw(st.integers(0, L - keep_last)) if activation == "offload" else 0
    resident = draw(st.integers(0, L - saved)) if activation == "offload" and not keep_last else 0
    plan = uniform_plan(
        "random",
        L,
        chunk * draw(st.integers(1, 3)),
        draw(st.sampled_from([16, 64])),
        chunk=chunk,
        window=window,
        activation=activation,
        keep_last=keep_last,
        saved_attention=saved,
        resident_attention=resident,
        kept_weights=draw(st.integers(0, L - window)),
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
    if plan.min_streamed_master_slots:  # streamed layers loaded for their backward: their masters, or not
        plan.streamed_master_slots = draw(st.sampled_from([0, plan.min_streamed_master_slots, L]))
    return plan
