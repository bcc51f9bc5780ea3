"""Choose the plan with the highest simulated throughput that fits the GPU, host-RAM and disk budgets.

The space: batch (given, or the best of powers of two up to the largest that fits), chunk, window,
activation policy (offload or recompute, with the last layers keeping their graphs), how many units
keep their optimizer on the GPU, and the loss piece size. Memory rules candidates out in closed form;
the simulator scores the ones left. Larger chunks, more kept layers and more GPU-resident optimizer
states all trade GPU memory for time, so for each window and policy we take the largest chunk that
fits and score a few splits of the remaining memory between kept graphs and GPU optimizer states.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from slideformer.calibrate.profile import Profile
from slideformer.models.config import ModelConfig
from slideformer.plan import Plan, uniform_plan
from slideformer.simulator import Simulation, simulate

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
    shortfalls: list[str] = field(default_factory=list)  # what does not fit, with numbers


def gpu_need(cfg: ModelConfig, plan: Plan, profile: Profile | None) -> int:
    """GPU bytes the plan needs: the larger of the runtime's own pre-check and the profile's measured workspace."""
    return max(sum(gpu_bytes(cfg, plan, None).values()), sum(gpu_bytes(cfg, plan, profile).values()))


def shortfalls(cfg: ModelConfig, plan: Plan, profile: Profile | None, budgets: Budgets) -> list[str]:
    out = []
    gpu, host = gpu_need(cfg, plan, profile), sum(host_bytes(cfg, plan, profile).values())
    if gpu > budgets.gpu_bytes:
        out.append(f"GPU needs {gpu / GiB:.1f} GiB, budget {budgets.gpu_bytes / GiB:.1f} GiB")
    if host > budgets.host_bytes:
        out.append(f"host RAM needs {host / GiB:.1f} GiB, budget {budgets.host_bytes / GiB:.1f} GiB")
    return out


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
    out = []
    if gpu > budgets.gpu_bytes:
        out.append(f"GPU needs at least {gpu / GiB:.1f} GiB, budget {budgets.gpu_bytes / GiB:.1f} GiB")
    if host > budgets.host_bytes:
        out.append(f"host RAM needs at least {host / GiB:.1f} GiB, budget {budgets.host_bytes / GiB:.1f} GiB")
    return out or [f"no single plan fits both budgets at batch {batch}, seq {seq} "
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
    L = cfg.num_layers
    out = []
    for window in sorted({min(2, L), min(3, L)}):
        for activation in ("offload", "recompute"):
            def plan(chunk, keep=0, gpu_units=0, piece=LOSS_PIECES[0]):
                return uniform_plan(model, L, batch, seq, chunk=chunk, window=window, activation=activation,
                                    keep_last=keep, gpu_units=gpu_units, update=update, loss_chunk_tokens=piece)

            def ok(p: Plan) -> bool:
                return not shortfalls(cfg, p, profile, budgets)
            base = next((plan(c, piece=piece) for c in sorted(_divisors(batch), reverse=True)
                         for piece in LOSS_PIECES if ok(plan(c, piece=piece))), None)
            if base is None:
                continue
            c, piece = base.chunk, base.loss_chunk_tokens
            kmax = largest(lambda k: ok(plan(c, k - 1, 0, piece)), window + 1) - 1
            for keep in sorted({0, kmax}):
                gmax = largest(lambda u: ok(plan(c, keep, u - 1, piece)), L + 2) - 1
                for units in sorted({0, gmax // 2, gmax}):
                    out.append(plan(c, keep, units, piece))
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
            return Verdict(False, None, None, refusal(cfg, model, 1, seq, profile, budgets, update))
        batches = sorted({1 << k for k in range(max_batch.bit_length()) if 1 << k <= max_batch} | {max_batch})
    else:
        if batch > max_batch:
            return Verdict(False, None, None, refusal(cfg, model, batch, seq, profile, budgets, update))
        batches = [batch]
    best: tuple[float, Plan, Simulation] | None = None
    for b in batches:
        for p in candidates(cfg, model, b, seq, profile, budgets, update):
            sim = simulate(cfg, p, profile)
            if best is None or sim.tokens_per_s > best[0]:
                best = (sim.tokens_per_s, p, sim)
    assert best is not None, "a feasible batch always has a candidate plan"
    return Verdict(True, best[1], best[2])
