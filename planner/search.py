"""Choose the plan with the highest simulated throughput that fits the GPU, host-RAM and disk budgets.

The space: batch (given, or the best of powers of two up to the largest that fits), chunk, window,
activation policy (offload, recompute or disk, with the last layers keeping their graphs), how many units
keep their optimizer on the GPU (from the embedding, with the head; or the first layers alone, as many as fit
at no other cost), how many layers are updated by the streamed GPU AdamW (spread evenly; the best plan's
count is then refined between the grid's counts next to it), which CPU updates
wait for the end of the backward,
how many layers keep their states in the disk tier, whether host-updated units keep bf16 weights in RAM, the
loss piece size, and (only where the plan does not fit without them) sequence tiles and a transient head
gradient, on a fixed grid. Memory rules candidates out in closed form; the simulator scores every one left, so
the choice is the best of the grid. With several data-parallel ranks on the host every candidate is each
rank's plan (batch per rank, the GPU budget per GPU, the host budget for all the ranks' processes together)
and none uses the disk tier or streamed updates.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import product

from slideformer.schedule.profile import Profile
from slideformer.models.config import GENERIC, ModelConfig
from slideformer.schedule.plan import SEQ_TILES, ActivationPolicy, Plan, uniform_plan
from slideformer.simulator import Simulation, simulate
from slideformer.simulator.costs import CostModel, step_lower_bound

from slideformer.schedule.memory import GiB, disk_bytes, gpu_bytes, host_bytes_all_ranks, padded

LOSS_PIECES = (4096, 2048, 1024, 512)
GRAD_RINGS = (4, 2)  # pinned fp32 gradient buffers shared by the host-updated layers
MLP_TILES = (0, 8192, 4096, 2048, 1024)  # 0: the whole chunk at once; each tile costs an MLP-gradient accumulate
# Predictions this close count as a tie, won by the plan with the fewest chunks: fewer ops for the one thread
# that issues them, which the CPU optimizer's threads slow down and the simulator does not model (on the H100,
# 1024 x 8 predicted 2.19 s at chunk 1 and chunk 8 alike measured 3.10 and 2.44 s in one lease).
TIE = 0.01
# Chunks per step at most: more only add ops (each layer's weights are loaded once per step whatever the chunk),
# and a tiny model's huge batch would otherwise build graphs of tens of thousands of chunks.
MAX_CHUNKS = 64
PARALLEL_FROM = 64  # grid points or candidates from which the checks or simulations run in worker processes
MAX_WORKERS = 16


# What a plan may use by default: of the GPU's free memory (allocator fragmentation, other processes), of
# the available RAM, and of the disk's free space (a fuller disk slowed the tier on the H100).
GPU_BUDGET_FRACTION = 0.92
HOST_BUDGET_FRACTION = 0.9
DISK_BUDGET_FRACTION = 0.9


@dataclass(frozen=True)
class Budgets:
    gpu_bytes: int
    host_bytes: int
    disk_bytes: int = 0  # for the disk tier's files (0: no layer's states on disk)


@dataclass
class Verdict:
    fits: bool
    plan: Plan | None
    simulation: Simulation | None
    max_batch: int  # the largest batch any plan fits at this seq (0: none)
    shortfalls: list[str] = field(default_factory=list)  # what does not fit, with numbers


def gpu_need(cfg: ModelConfig, plan: Plan, profile: Profile | None) -> int:
    """GPU bytes the plan needs: the larger of the runtime's own pre-check and the profile's measured workspace."""
    return max(sum(gpu_bytes(cfg, plan, None).values()), sum(gpu_bytes(cfg, plan, profile).values()))


def _over_budget(gpu: int, host: int, disk: int, budgets: Budgets, needs: str) -> list[str]:
    out = []
    if gpu > budgets.gpu_bytes:
        out.append(f"GPU {needs} {gpu / GiB:.1f} GiB, budget {budgets.gpu_bytes / GiB:.1f} GiB")
    if host > budgets.host_bytes:
        out.append(f"host RAM {needs} {host / GiB:.1f} GiB, budget {budgets.host_bytes / GiB:.1f} GiB")
    if disk > budgets.disk_bytes:
        out.append(f"disk {needs} {disk / GiB:.1f} GiB, budget {budgets.disk_bytes / GiB:.1f} GiB")
    return out


def shortfalls(cfg: ModelConfig, plan: Plan, profile: Profile | None, budgets: Budgets) -> list[str]:
    """What the plan needs beyond the budgets: each rank's GPU, the host RAM of every rank's process, the disk."""
    return _over_budget(
        gpu_need(cfg, plan, profile),
        host_bytes_all_ranks(cfg, plan, profile),
        disk_bytes(cfg, plan),
        budgets,
        "needs",
    )


def disk_layers_that_fit(cfg: ModelConfig, budgets: Budgets, ranks: int = 1) -> int:
    """Layers whose states the disk budget holds; none with several ranks (the runtime refuses 'disk' there)."""
    if ranks > 1:
        return 0
    return min(cfg.num_layers, budgets.disk_bytes // padded(12 * cfg.layer_params))


def seq_tiles(cfg: ModelConfig, seq: int) -> tuple[int, ...]:
    """Sequence tiles to consider: the whole sequence, then tiles shorter than it (our own numerics only)."""
    return (0,) if cfg.family == GENERIC else (0, *(t for t in SEQ_TILES if t < seq))


def head_grad_options(cfg: ModelConfig, gpu_units: int) -> tuple[bool, ...]:
    """Whether the head's gradient may be transient (`Plan.transient_head_grad`): not first, since the first
    layer's backward then waits for its copy; only for a host-updated (no GPU-placed units), untied head."""
    return (False,) if gpu_units or cfg.tie_word_embeddings else (False, True)


def lean_plans(
    cfg: ModelConfig, model: str, batch: int, seq: int, update: str, budgets: Budgets, ranks: int = 1
) -> list[Plan]:
    """The plans with the least GPU memory at this batch and seq (window 2, chunk 1, smallest loss piece) for
    each activation policy, each number of GPU-updated units on the grid (they trade GPU for host memory),
    and no layer or as many layers as the disk budget holds on disk: one of them fits if any plan does."""
    L = cfg.num_layers
    return [
        uniform_plan(
            model,
            L,
            batch,
            seq,
            chunk=1,
            window=min(2, L),
            activation=act,
            update=update,
            loss_chunk_tokens=LOSS_PIECES[-1],
            mlp_tile_tokens=MLP_TILES[-1],
            seq_tile_tokens=seq_tiles(cfg, seq)[-1],
            transient_head_grad=head_grad_options(cfg, units)[-1],
            grad_ring=GRAD_RINGS[-1],
            gpu_units=units,
            disk_layers=disk,
            host_bf16_weights=host_bf16,
            ranks=ranks,
        )
        for act in activation_policies(budgets, ranks)
        for units in gpu_unit_grid(L)
        for host_bf16 in host_bf16_options(L, units)  # one is leaner on the GPU (no staging ring), one on the host
        for disk in sorted({0, min(disk_layers_that_fit(cfg, budgets, ranks), L + 1 - units if units else L)})
    ]


def activation_policies(budgets: Budgets, ranks: int = 1) -> tuple[ActivationPolicy, ...]:
    """Uniform policies to consider: saved inputs to host RAM, recomputed from GPU copies, or (given a disk
    budget, one rank: the tier's files are named by layer, not by rank) on to the disk, which frees RAM at the
    disk's speed."""
    return ("offload", "recompute", "disk") if budgets.disk_bytes and ranks == 1 else ("offload", "recompute")


def gpu_unit_grid(num_layers: int) -> list[int]:
    """Numbers of units whose optimizer runs on the GPU: none, powers of two, all."""
    L = num_layers
    return sorted({0, L + 1} | {1 << k for k in range(L.bit_length()) if 1 << k <= L + 1})


def feasible(
    cfg: ModelConfig,
    model: str,
    batch: int,
    seq: int,
    profile: Profile | None,
    budgets: Budgets,
    update: str = "during_backward",
    ranks: int = 1,
) -> bool:
    return any(
        not shortfalls(cfg, p, profile, budgets) for p in lean_plans(cfg, model, batch, seq, update, budgets, ranks)
    )


def least_needs(
    cfg: ModelConfig,
    model: str,
    batch: int,
    seq: int,
    profile: Profile | None,
    budgets: Budgets,
    update: str = "during_backward",
    ranks: int = 1,
) -> tuple[int, int]:
    """The least GPU bytes (per rank) any plan at this batch and seq needs, and the least host bytes (all ranks)
    of those within the GPU budget (of all, if none is)."""
    plans = lean_plans(cfg, model, batch, seq, update, budgets, ranks)
    gpu = {id(p): gpu_need(cfg, p, profile) for p in plans}
    within = [p for p in plans if gpu[id(p)] <= budgets.gpu_bytes] or plans
    return min(gpu.values()), min(host_bytes_all_ranks(cfg, p, profile) for p in within)


def refusal(
    cfg: ModelConfig,
    model: str,
    batch: int,
    seq: int,
    profile: Profile | None,
    budgets: Budgets,
    update: str,
    ranks: int = 1,
) -> list[str]:
    gpu, host = least_needs(cfg, model, batch, seq, profile, budgets, update, ranks)
    return _over_budget(gpu, host, 0, budgets, "needs at least") or [
        f"no single plan fits both budgets at batch {batch}, seq {seq} "
        f"(least GPU {gpu / GiB:.1f} GiB and least host {host / GiB:.1f} GiB come from different plans)"
    ]


def largest(fits, hi: int) -> int:
    """The largest n in [1, hi] with fits(n), for fits monotone (true then false); 0 when none."""
    if not fits(1):
        return 0
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def candidates(
    cfg: ModelConfig,
    model: str,
    batch: int,
    seq: int,
    profile: Profile,
    budgets: Budgets,
    update: str,
    ranks: int = 1,
) -> list[Plan]:
    """Every plan on a fixed grid that fits, each with the fewest layers on disk that make it fit, in the
    grid's order (large grids are checked in worker processes). The grid does not depend on the budgets, so a
    larger budget only adds candidates or moves layers off the disk."""
    points = list(_grid_points(cfg.num_layers, batch, budgets, update, ranks))
    workers = _workers(len(points))
    size = -(-len(points) // (workers * 4))  # a few groups per worker, in the grid's order
    groups = [points[i : i + size] for i in range(0, len(points), size)]
    question = (cfg, model, batch, seq, profile, budgets, update, ranks)
    with _pool(workers) as pool:
        checked = pool.map(_fitting_plans, [(question, group) for group in groups])
        return [plan for plans in checked for plan in plans]


def _fitting_plans(job: tuple[tuple, list[dict]]) -> list[Plan]:
    """For each grid point, its plan with the fewest layers on disk that fits (none where none fits), and that
    plan with the most saved attention that fits where it can save any (`_most_saved_attention`), each with the
    most kept weights that then fit."""
    (cfg, model, batch, seq, profile, budgets, update, ranks), points = job
    L, out = cfg.num_layers, []

    def fitting(point: dict, gpu_layers: int) -> Plan | None:
        return _fewest_disk_layers(
            cfg,
            budgets,
            ranks,
            point["gpu_units"],
            lambda disk, piece, tile, ring, seq_tile, head_grad: uniform_plan(
                model,
                L,
                batch,
                seq,
                update=update,
                ranks=ranks,
                disk_layers=disk,
                loss_chunk_tokens=piece,
                mlp_tile_tokens=tile,
                grad_ring=ring,
                seq_tile_tokens=seq_tile,
                transient_head_grad=head_grad,
                gpu_layers=gpu_layers,
                **point,
            ),
            profile,
            seq_tiles(cfg, seq),
            head_grad_options(cfg, point["gpu_units"]),
        )

    for point in points:
        *more, none = gpu_layer_options(L, point["gpu_units"])
        without_gpu = fitting(point, none)
        if without_gpu is None:
            continue
        plan = without_gpu
        for k in more:  # the most GPU layers that fit with nothing else changed
            with_gpu = fitting(point, k)
            if with_gpu is not None and _same_costs(with_gpu, plan):
                plan = with_gpu
                break
        out.append(_most_kept_weights(cfg, plan, profile, budgets))
        # saved attention's buffers before any kept weights; from the plan without GPU layers too, whose GPU
        # memory may save more than the GPU layers' updates gain
        out += [
            _most_kept_weights(cfg, q, profile, budgets)
            for base in ([plan] if plan is without_gpu else [plan, without_gpu])
            for q in _saved_attention_variants(cfg, base, profile, budgets)
        ]
    return out


def _saved_attention_variants(cfg: ModelConfig, plan: Plan, profile: Profile, budgets: Budgets) -> list[Plan]:
    """The plan with the most saved attention that fits (`_most_saved_attention`), and with a smaller gradient
    ring (2, 1) where the host RAM its buffers give back lets more layers save: at long sequences the CPU's
    updates wait little on the ring, while every saved layer takes its attention's forward off the backward.
    Then each of these and the plan itself with the most resident attention the GPU holds beside
    (`_most_resident_attention`)."""
    if not _can_save_attention(cfg, plan, profile):
        return []
    out: list[Plan] = []
    for ring in sorted({r for r in (plan.grad_ring, 2, 1) if r <= plan.grad_ring}, reverse=True):
        saving = _most_saved_attention(cfg, replace(plan, grad_ring=ring), profile, budgets)
        if saving.saved_attention > max((q.saved_attention for q in out), default=0):
            out.append(saving)
    resident = (_most_resident_attention(cfg, q, profile, budgets) for q in [plan, *out])
    return out + [q for q in resident if q.resident_attention]


def _can_save_attention(cfg: ModelConfig, plan: Plan, profile: Profile) -> bool:
    """Whether saving attention can make this plan faster: our own numerics' whole-sequence layers, where the
    profile's costs claim a backward from a saved attention more than a tie faster than the recomputing one
    (none where it was never timed for this shape and length or a shorter one)."""
    if cfg.family == GENERIC or plan.seq_tile_tokens:
        return False
    cost = CostModel(profile, cfg, plan.seq)
    tokens = plan.chunk * plan.seq
    return cost.layer("bwd_saved_attention_s", tokens) < cost.layer("bwd_recompute_s", tokens) * (1 - TIE)


def _most_saved_attention(cfg: ModelConfig, plan: Plan, profile: Profile, budgets: Budgets) -> Plan:
    """The plan with the most first layers saving their attention for the backward (`Plan.saved_attention`)
    that fits with nothing else changed: host memory spent on less recompute, and 8 KB per token and layer
    more over PCIe each way, which the simulation weighs."""
    offloaded = next((lay for lay, p in enumerate(plan.activations) if p != "offload"), cfg.num_layers)
    if not offloaded:
        return plan
    saved = largest(lambda n: not shortfalls(cfg, replace(plan, saved_attention=n), profile, budgets), offloaded)
    return replace(plan, saved_attention=saved)


def _most_resident_attention(cfg: ModelConfig, plan: Plan, profile: Profile, budgets: Budgets) -> Plan:
    """The plan with the most last layers keeping their saved attention on the GPU (`Plan.resident_attention`)
    that fits with nothing else changed: GPU memory no kept weight has taken yet, at no PCIe cost."""
    L = cfg.num_layers
    free = L - plan.saved_attention
    offloaded = next((k for k in range(free) if plan.activations[L - 1 - k] != "offload"), free)
    if not offloaded:
        return plan

    def fits(n: int) -> bool:
        return not shortfalls(cfg, replace(plan, resident_attention=n), profile, budgets)

    return replace(plan, resident_attention=largest(fits, offloaded))


def _most_kept_weights(cfg: ModelConfig, plan: Plan, profile: Profile, budgets: Budgets) -> Plan:
    """The plan with the most layers below the window keeping their weights for the backward
    (`Plan.kept_weights`) that fits with nothing else changed: the GPU memory left over saves the backward's
    loads of those layers, each slot (one layer's bf16 weights) taking its load's bytes off PCIe."""
    below = cfg.num_layers - plan.window
    kept = largest(lambda k: not shortfalls(cfg, replace(plan, kept_weights=k - 1), profile, budgets), below + 1) - 1
    return replace(plan, kept_weights=kept)


def _same_costs(a: Plan, b: Plan) -> bool:
    """The same layers on disk and the same speed-relevant variants (gradient ring, sequence and MLP tiles, the
    head's gradient); the loss piece does not change the time."""
    keys = ("grad_ring", "seq_tile_tokens", "mlp_tile_tokens", "transient_head_grad")
    return a.disk_units == b.disk_units and all(getattr(a, k) == getattr(b, k) for k in keys)


def _grid_points(L: int, batch: int, budgets: Budgets, update: str, ranks: int) -> Iterator[dict]:
    """The grid's points in a fixed order, as `uniform_plan`'s arguments (those `_fewest_disk_layers` varies
    aside): window, activation policy, chunk, kept layers and GPU-placed units (each trades GPU memory for host
    memory), late updates (host memory for overlap), streamed units (PCIe for CPU time), bf16 weights in RAM
    (RAM and CPU time for PCIe) and a deferred head update (host memory for overlap)."""
    chunks = [c for c in _divisors(batch) if (c & (c - 1) == 0 or c == batch) and batch // c <= MAX_CHUNKS]
    for window in sorted({min(2, L), min(3, L)}):
        keeps = sorted({0, 1, window} & set(range(L + 1)))
        for activation, chunk, keep, gpu_units in product(
            activation_policies(budgets, ranks), chunks, keeps, gpu_unit_grid(L)
        ):
            for late, (streamed, embedding), host_bf16 in product(
                late_update_grid(L, update),
                streamed_grid(L, update, gpu_units, ranks),
                host_bf16_options(L, gpu_units),
            ):
                for deferred in deferred_update_grid(update, gpu_units, late):
                    yield dict(
                        chunk=chunk,
                        window=window,
                        activation=activation,
                        keep_last=keep,
                        gpu_units=gpu_units,
                        late_updates=late,
                        deferred_updates=deferred,
                        streamed_layers=streamed,
                        streamed_embedding=embedding,
                        host_bf16_weights=host_bf16,
                    )


def host_bf16_options(num_layers: int, gpu_units: int) -> tuple[bool, ...]:
    """Whether host-updated units keep bf16 weights in RAM (`Plan.host_bf16_weights`): both, where any unit
    is host-updated (the copies cost RAM and a cast on the CPU, and save half the weight stream and its casts
    on the GPU)."""
    return (False,) if gpu_units >= num_layers + 1 else (False, True)


def late_update_grid(num_layers: int, update: str) -> list[int]:
    """Units whose CPU updates wait for the end of the backward (see Plan.late_updates): none, a quarter,
    half or all of the model; each such layer's gradient takes its own host buffer."""
    if update != "during_backward":
        return [0]
    return sorted({0, num_layers // 4, num_layers // 2, num_layers + 1})


def deferred_update_grid(update: str, gpu_units: int, late: int) -> list[int]:
    """Units from the head down whose CPU updates wait for the end of the backward (Plan.deferred_updates): none
    or the head, whose update then runs beside the next forward instead of leaving the CPU idle there (more
    layers deferred held the next forward's loads up in simulation, and so did a deferred head behind late
    first layers, which already keep the CPU busy there). Only for a host-updated head."""
    return [0, 1] if update == "during_backward" and not gpu_units and not late else [0]


def gpu_layer_options(num_layers: int, gpu_units: int) -> tuple[int, ...]:
    """First decoder layers to update on the GPU beside host-updated edges (`uniform_plan`'s gpu_layers), most
    first: two, one or none, which a small GPU's spare memory holds (each takes its master, states and
    gradient). Their updates end with the backward, so the next forward starts without waiting for the CPU,
    and they take their work off the CPU and PCIe: a point takes the most that fit at no other cost."""
    return tuple(k for k in (2, 1) if k <= num_layers) + (0,) if not gpu_units else (0,)


def streamed_grid(num_layers: int, update: str, gpu_units: int, ranks: int = 1) -> list[tuple[tuple[int, ...], bool]]:
    """Sets of layers the streamed GPU AdamW updates (Plan.placement 'streamed'), each with and without the
    embedding: none, or two to six eighths of the layers spread evenly from layer 0 up, so their PCIe traffic
    interleaves with the backward's loads rather than bunching and the top layer, the backward's first, keeps
    the CPU busy from the start (layers placed on disk stay there). Both take work off the CPU,
    so plans with GPU-placed edges (a large GPU's way) are not combined with streamed units (a small GPU's),
    which keeps the search short. None with several ranks (the runtime refuses 'streamed' there)."""
    if update != "during_backward" or gpu_units or ranks > 1:
        return [((), False)]
    counts = sorted({0, *(k * num_layers // 8 for k in (2, 3, 4, 5, 6))})
    layers = [tuple(i * num_layers // k for i in range(k)) for k in counts]
    return [(s, embedding) for s in layers for embedding in (False, True)]


def _fewest_disk_layers(
    cfg: ModelConfig,
    budgets: Budgets,
    ranks: int,
    gpu_units: int,
    make,
    profile: Profile,
    seq_tile_grid: tuple[int, ...],
    head_grads: tuple[bool, ...],
) -> Plan | None:
    """The plan with the fewest layers on disk that fits (disk only adds time; each layer there frees host
    RAM), with the largest gradient ring (a shorter one can stall the stream), sequence tile (tiles slow the
    layers), the head's gradient kept (a transient one costs a copy's wait), MLP tile (smaller ones add time)
    and loss piece (the piece does not change the time) that fit; None if none fits.

    Whether some variant fits at a disk count is decided by the leanest one (shortest ring, smallest tiles
    and piece); from one layer on disk up, each more layer there only frees host RAM, so the fewest is
    found by bisection."""
    most = min(
        disk_layers_that_fit(cfg, budgets, ranks), cfg.num_layers + 1 - gpu_units if gpu_units else cfg.num_layers
    )

    def leanest_fits(disk: int) -> bool:
        leanest = make(disk, LOSS_PIECES[-1], MLP_TILES[-1], GRAD_RINGS[-1], seq_tile_grid[-1], head_grads[-1])
        return not shortfalls(cfg, leanest, profile, budgets)

    if leanest_fits(0):
        disk = 0
    elif most >= 1 and leanest_fits(most):
        lo, hi = 1, most  # leanest_fits(hi) holds
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if leanest_fits(mid) else (mid + 1, hi)
        disk = lo
    else:
        return None
    for ring in GRAD_RINGS:
        for seq_tile in seq_tile_grid:
            for head_grad in head_grads:
                for tile in MLP_TILES:
                    for piece in LOSS_PIECES:
                        plan = make(disk, piece, tile, ring, seq_tile, head_grad)
                        if not shortfalls(cfg, plan, profile, budgets):
                            return plan
    raise AssertionError("the leanest variant fits, so one is returned above")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def choose_plan(
    cfg: ModelConfig,
    model: str,
    seq: int,
    batch: int | None,
    profile: Profile,
    budgets: Budgets,
    clip: bool = False,
    ranks: int = 1,
) -> Verdict:
    """The fastest plan that fits; batch None picks the batch (powers of two up to the largest that fits).
    `ranks`: data-parallel ranks on the host, each running the plan over `batch` sequences on its own GPU."""
    update = "after_norm" if clip else "during_backward"
    max_batch = largest(lambda b: feasible(cfg, model, b, seq, profile, budgets, update, ranks), 1 << 16)
    if batch is None:
        if max_batch == 0:
            return Verdict(False, None, None, 0, refusal(cfg, model, 1, seq, profile, budgets, update, ranks))
        # Throughput grows with batch (weights stream once per step): score the three largest powers of two.
        batches = [1 << k for k in range(max_batch.bit_length())][-3:]
    else:
        if batch > max_batch:
            return Verdict(
                False, None, None, max_batch, refusal(cfg, model, batch, seq, profile, budgets, update, ranks)
            )
        batches = [batch]
    # Branch and bound: simulate in order of a lower bound on time per token, stop once the bound
    # cannot come within TIE of the best simulated so far (the result is the grid's, as if all were simulated).
    cost = CostModel(profile, cfg, seq)
    bounded = sorted(
        (
            (step_lower_bound(cfg, p, cost) / (p.ranks * p.batch * p.seq), i, p)  # seconds per token, as scored
            for b in batches
            for i, p in enumerate(candidates(cfg, model, b, seq, profile, budgets, update, ranks))
        ),
        key=lambda t: t[:2],
    )
    # Batches of plans are simulated in parallel on large grids: every plan the serial walk would simulate is
    # simulated, and the extra ones cannot win (their time is past the bound that would have stopped it).
    scored: list[tuple[float, Plan]] = []
    fastest = float("inf")
    workers = _workers(len(bounded))
    with _pool(workers) as pool:
        for start in range(0, len(bounded), workers):
            group = [p for bound, _, p in bounded[start : start + workers] if bound < fastest * (1 + TIE)]
            if not group:
                break
            for p, s in zip(group, pool.map(_seconds_per_token, [(cfg, p, profile) for p in group])):
                scored.append((s, p))
                fastest = min(fastest, s)
    assert scored, "a feasible batch always has a candidate plan"
    _, plan = min((s for s in scored if s[0] <= fastest * (1 + TIE)), key=lambda s: (s[1].chunks, s[0]))
    plan, simulation = _refined_streamed_count(cfg, plan, profile, budgets)
    plan, simulation = _refined_master_slots(cfg, plan, simulation, profile, budgets)
    plan, simulation = _refined_memory_trade(cfg, plan, simulation, profile, budgets)
    return Verdict(True, plan, simulation, max_batch)


def with_streamed_layers(plan: Plan, count: int) -> Plan:
    """The plan with `count` layers spread from layer 0 up streamed (as `streamed_grid` spreads them) in place
    of its streamed layers; layers placed elsewhere than the CPU keep their placement."""
    L = len(plan.activations)
    placement = ["cpu" if i in range(1, L + 1) and p == "streamed" else p for i, p in enumerate(plan.placement)]
    for lay in (i * L // count for i in range(count)):
        if placement[lay + 1] == "cpu":
            placement[lay + 1] = "streamed"
    return replace(plan, placement=placement)


def _refined_streamed_count(
    cfg: ModelConfig, plan: Plan, profile: Profile, budgets: Budgets
) -> tuple[Plan, Simulation]:
    """The grid's best plan, or the same plan with a streamed-layer count between the grid's counts next to its
    own where that simulates faster and fits (the balance of CPU and PCIe work rarely falls on the grid); with
    its simulation."""
    L = cfg.num_layers
    grid = sorted({len(layers) for layers, _ in streamed_grid(L, plan.update, 0) if layers})
    # the grid's count this plan was built with (none: no streamed layers, or not spread as the grid spreads)
    count = next((k for k in grid if with_streamed_layers(plan, k).placement == plan.placement), None)
    best = (plan, simulate(cfg, plan, profile))
    if count is None or "streamed" not in plan.placement[1 : L + 1]:
        return best
    lower = max((k for k in grid if k < count), default=count)
    upper = min((k for k in grid if k > count), default=count)
    for k in [*range(lower + 1, count), *range(count + 1, upper)]:
        q = with_streamed_layers(plan, k)
        if shortfalls(cfg, q, profile, budgets):
            continue
        sim = simulate(cfg, q, profile)
        if sim.step_s < best[1].step_s * (1 - TIE / 4):
            best = (q, sim)
    return best


def _refined_master_slots(
    cfg: ModelConfig, plan: Plan, simulation: Simulation, profile: Profile, budgets: Budgets
) -> tuple[Plan, Simulation]:
    """The plan, or one whose streamed layers load their fp32 masters for their backward into GPU master slots
    (`Plan.streamed_master_slots`) where that simulates faster and fits: with the plan's streamed-layer count
    or up to two more (each streamed layer costs PCIe less), the fewest slots or up to two more (a load waits
    for its slot's last copy out), and kept weights given back for the slots' memory where needed."""
    L = cfg.num_layers
    count = plan.placement[1 : L + 1].count("streamed")
    if count == 0:
        return plan, simulation
    best = (plan, simulation)
    for k in range(count, min(count + 2, L) + 1):
        spread = plan if k == count else with_streamed_layers(plan, k)
        for kept in range(plan.kept_weights, -1, -1):
            q = replace(spread, kept_weights=kept, streamed_master_slots=0)
            least = q.min_streamed_master_slots
            for slots in range(least, least + 3) if least else ():
                r = replace(q, streamed_master_slots=slots)
                if shortfalls(cfg, r, profile, budgets):
                    break  # more slots fit no better
                sim = simulate(cfg, r, profile)
                if sim.step_s < best[1].step_s * (1 - TIE / 4):
                    best = (r, sim)
    return best


def _refined_memory_trade(
    cfg: ModelConfig, plan: Plan, simulation: Simulation, profile: Profile, budgets: Budgets
) -> tuple[Plan, Simulation]:
    """The plan, or one that gives memory back (a smaller MLP tile, gradient ring, a transient head gradient)
    and spends it again on saved attention (in RAM, then on the GPU) and kept weights, while that simulates
    faster: the grid takes each memory-taking option at its fastest before it saves attention, which at long
    sequences is not always the better trade."""
    if not _can_save_attention(cfg, plan, profile):
        return plan, simulation
    best = (plan, simulation)
    while True:
        better = None
        for q in _memory_giving_neighbours(cfg, best[0]):
            q = replace(q, saved_attention=0, resident_attention=0, kept_weights=0, streamed_master_slots=0)
            if shortfalls(cfg, q, profile, budgets):
                continue
            q = _most_resident_attention(cfg, _most_saved_attention(cfg, q, profile, budgets), profile, budgets)
            q = _most_kept_weights(cfg, q, profile, budgets)
            sim = simulate(cfg, q, profile)
            if sim.step_s < (better or best)[1].step_s * (1 - TIE / 4):
                better = (q, sim)
        if better is None:
            return best
        best = better


def _memory_giving_neighbours(cfg: ModelConfig, plan: Plan) -> list[Plan]:
    """The plan with the next smaller MLP tile, the next shorter gradient ring, or a transient head gradient."""
    out = []
    tiles = [t for t in MLP_TILES[1:] if plan.mlp_tile_tokens == 0 or t < plan.mlp_tile_tokens]
    if tiles:
        out.append(replace(plan, mlp_tile_tokens=tiles[0]))
    if plan.grad_ring > 1:
        out.append(replace(plan, grad_ring=max(r for r in (*GRAD_RINGS, 1) if r < plan.grad_ring)))
    if not plan.transient_head_grad and head_grad_options(cfg, plan.placement.count("gpu"))[-1]:
        out.append(replace(plan, transient_head_grad=True))
    return out


def _seconds_per_token(job: tuple[ModelConfig, Plan, Profile]) -> float:
    cfg, plan, profile = job
    return 1 / simulate(cfg, plan, profile).tokens_per_s


def _workers(jobs: int) -> int:
    """Worker processes for `jobs` plans to check or simulate: the cores (at most MAX_WORKERS) from PARALLEL_FROM
    jobs on, else the caller alone."""
    return min(os.cpu_count() or 1, MAX_WORKERS) if jobs >= PARALLEL_FROM else 1


def _pool(workers: int) -> ProcessPoolExecutor | _Serial:
    """Worker processes (forked where the platform allows: nothing to re-import), or the caller alone."""
    if workers < 2:
        return _Serial()
    methods = multiprocessing.get_all_start_methods()
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork" if "fork" in methods else None))


class _Serial(contextlib.AbstractContextManager):
    """The caller's own process, with a pool's map."""

    def __exit__(self, *exc: object) -> None:
        return None

    def map(self, fn, jobs):
        return map(fn, jobs)
