"""Choose the plan with the highest simulated throughput that fits the GPU, host-RAM and disk budgets.

The space: batch (given, or the best of powers of two up to the largest that fits), chunk, window,
activation policy (offload or recompute, with the last layers keeping their graphs), how many units
keep their optimizer on the GPU, and the loss piece size, on a fixed grid. Memory rules candidates out
in closed form; the simulator scores every one left, so the choice is the best of the grid.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from slideformer.calibrate.profile import Profile
from slideformer.models.config import ModelConfig
from slideformer.plan import Plan, uniform_plan
from slideformer.simulator import Simulation, simulate
from slideformer.simulator.costs import CostModel, step_lower_bound

from .memory import GiB, gpu_bytes, host_bytes

LOSS_PIECES = (4096, 2048, 1024, 512)


@dataclass(frozen=True)
class Budgets:
    gpu_bytes: int
    host_bytes: int
    disk_bytes: int = 0  # the disk tier arrives with the NVMe issue; no plan uses disk yet


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


def _over_budget(gpu: int, host: int, budgets: Budgets, needs: str) -> list[str]:
    out = []
    if gpu > budgets.gpu_bytes:
        out.append(f"GPU {needs} {gpu / GiB:.1f} GiB, budget {budgets.gpu_bytes / GiB:.1f} GiB")
    if host > budgets.host_bytes:
        out.append(f"host RAM {needs} {host / GiB:.1f} GiB, budget {budgets.host_bytes / GiB:.1f} GiB")
    return out


def shortfalls(cfg: ModelConfig, plan: Plan, profile: Profile | None, budgets: Budgets) -> list[str]:
    return _over_budget(gpu_need(cfg, plan, profile), sum(host_bytes(cfg, plan, profile).values()), budgets, "needs")


def smallest_plan(cfg: ModelConfig, model: str, batch: int, seq: int, activation: str, update: str) -> Plan:
    """The least GPU memory a plan at this batch and seq can take (host memory depends on `activation`)."""
    return uniform_plan(model, cfg.num_layers, batch, seq, chunk=1, window=min(2, cfg.num_layers),
                        activation=activation, update=update, loss_chunk_tokens=LOSS_PIECES[-1])


def feasible(cfg: ModelConfig, model: str, batch: int, seq: int, profile: Profile | None, budgets: Budgets,
             update: str = "during_backward") -> bool:
    return any(not shortfalls(cfg, smallest_plan(cfg, model, batch, seq, act, update), profile, budgets)
               for act in ("offload", "recompute"))


def least_needs(cfg: ModelConfig, model: str, batch: int, seq: int, profile: Profile | None,
                update: str = "during_backward") -> tuple[int, int]:
    """The least GPU bytes and the least host bytes any plan at this batch and seq needs (maybe not the same plan)."""
    plans = [smallest_plan(cfg, model, batch, seq, act, update) for act in ("offload", "recompute")]
    return (min(gpu_need(cfg, p, profile) for p in plans),
            min(sum(host_bytes(cfg, p, profile).values()) for p in plans))


def refusal(cfg: ModelConfig, model: str, batch: int, seq: int, profile: Profile | None, budgets: Budgets,
            update: str) -> list[str]:
    gpu, host = least_needs(cfg, model, batch, seq, profile, update)
    return _over_budget(gpu, host, budgets, "needs at least") or [f"no single plan fits both budgets at batch {batch}, seq {seq} "
                   f"(least GPU {gpu / GiB:.1f} GiB and least host {host / GiB:.1f} GiB come from different plans)"]


def largest(fits, hi: int) -> int:
    """The largest n in [1, hi] with fits(n), for fits monotone (true then false); 0 when none."""
    if not fits(1):
        return 0
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def candidates(cfg: ModelConfig, model: str, batch: int, seq: int, profile: Profile, budgets: Budgets,
               update: str) -> list[Plan]:
    """Every plan on a fixed grid that fits. The grid does not depend on the budgets, so a larger budget
    only adds candidates and can never make the chosen plan slower."""
    L = cfg.num_layers
    chunks = [c for c in _divisors(batch) if c & (c - 1) == 0 or c == batch]
    units = sorted({0, L + 1} | {1 << k for k in range(L.bit_length()) if 1 << k <= L + 1})
    out = []
    for window in sorted({min(2, L), min(3, L)}):
        for activation in ("offload", "recompute"):
            for chunk in chunks:
                for keep in sorted({0, 1, window} & set(range(L + 1))):
                    for gpu_units in units:  # GPU memory grows with each: stop at the first that does not fit
                        fitting = [p for p in (uniform_plan(model, L, batch, seq, chunk=chunk, window=window,
                                                            activation=activation, keep_last=keep,
                                                            gpu_units=gpu_units, update=update,
                                                            loss_chunk_tokens=piece) for piece in LOSS_PIECES)
                                   if not shortfalls(cfg, p, profile, budgets)]
                        if not fitting:
                            break
                        out.append(fitting[0])  # the largest loss piece that fits; it does not change the time
    return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def choose_plan(cfg: ModelConfig, model: str, seq: int, batch: int | None, profile: Profile, budgets: Budgets,
                clip: bool = False) -> Verdict:
    """The fastest plan that fits; batch None picks the batch (powers of two up to the largest that fits)."""
    update = "after_norm" if clip else "during_backward"
    max_batch = largest(lambda b: feasible(cfg, model, b, seq, profile, budgets, update), 1 << 16)
    if batch is None:
        if max_batch == 0:
            return Verdict(False, None, None, 0, refusal(cfg, model, 1, seq, profile, budgets, update))
        # Throughput grows with batch (weights stream once per step): score the three largest powers of two.
        batches = [1 << k for k in range(max_batch.bit_length())][-3:]
    else:
        if batch > max_batch:
            return Verdict(False, None, None, max_batch, refusal(cfg, model, batch, seq, profile, budgets, update))
        batches = [batch]
    # Branch and bound: simulate in order of a lower bound on time per token, stop once the bound
    # cannot beat the best simulated so far (the result is the grid's best, as if all were simulated).
    cost = CostModel(profile, cfg, seq)
    bounded = sorted(((step_lower_bound(cfg, p, cost) / (p.batch * p.seq), i, p) for b in batches
                      for i, p in enumerate(candidates(cfg, model, b, seq, profile, budgets, update))),
                     key=lambda t: t[:2])
    best: tuple[float, Plan, Simulation] | None = None
    for bound, _, p in bounded:
        if best is not None and bound >= best[0]:
            break
        sim = simulate(cfg, p, profile)
        if best is None or 1 / sim.tokens_per_s < best[0]:
            best = (1 / sim.tokens_per_s, p, sim)
    assert best is not None, "a feasible batch always has a candidate plan"
    return Verdict(True, best[1], best[2], max_batch)
