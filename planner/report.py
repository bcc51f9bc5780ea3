"""The capacity report behind `slideformer plan`: one verdict, its numbers, and what would change it."""

from __future__ import annotations

from dataclasses import asdict

from slideformer.schedule.profile import Profile
from slideformer.models.config import ModelConfig
from slideformer.simulator import RESOURCE_NAMES

from slideformer.schedule.memory import GiB
from slideformer.schedule.op import COLLECTIVES
from .search import Budgets, choose_plan, feasible, largest, least_needs


def capacity_report(
    cfg: ModelConfig,
    model: str,
    seq: int,
    batch: int | None,
    profile: Profile,
    budgets: Budgets,
    clip: bool = False,
    ranks: int = 1,
) -> dict:
    """The report for `ranks` data-parallel GPUs of the host: `batch` and the plan per GPU, the GPU budget per
    GPU, the host budget for all; with several, also the same question's prediction on one GPU."""
    update = "after_norm" if clip else "during_backward"
    verdict = choose_plan(cfg, model, seq, batch, profile, budgets, clip, ranks)
    max_seq = largest(
        lambda s: feasible(cfg, model, 1, s, profile, budgets, update, ranks), cfg.max_position_embeddings
    )
    least_gpu, least_host = least_needs(cfg, model, batch or 1, seq, profile, budgets, update, ranks)
    report = {
        "model": model,
        "params": cfg.total_params,
        "seq": seq,
        "ranks": ranks,
        "fits": verdict.fits,
        "batch": verdict.plan.batch if verdict.plan else batch,
        "max_batch": verdict.max_batch,
        "max_seq_at_batch_1": max_seq,  # at most the model's longest
        "max_position_embeddings": cfg.max_position_embeddings,
        "predicted_step_s": None,
        "predicted_tokens_per_s": None,
        "predicted_tflops": None,
        "predicted_tokens_per_s_one_gpu": None,
        "predicted_scaling": None,  # tokens/s on `ranks` GPUs / on one
        "peak_gpu_bytes": None,
        "peak_host_bytes": None,
        "peak_disk_bytes": 0,
        "bottleneck": None,
        "utilisation": None,
        "gpu_breakdown": None,
        "host_breakdown": None,
        "budgets": asdict(budgets),
        "least_gpu_bytes": least_gpu,
        "least_host_bytes": least_host,
        "shortfalls": verdict.shortfalls,
        "profile": profile.name,
        "profile_source": profile.source,
        "plan": None,
        "levers": [],
    }
    if verdict.fits:
        sim, plan = verdict.simulation, verdict.plan
        assert sim is not None and plan is not None, "a plan that fits comes with its simulation"
        report |= {
            "predicted_step_s": sim.step_s,
            "predicted_tokens_per_s": sim.tokens_per_s,
            "predicted_tflops": sim.tflops,
            "peak_gpu_bytes": sim.peak_gpu_bytes,
            "peak_host_bytes": sim.host_memory_bytes,
            "peak_disk_bytes": sim.disk_bytes,
            "bottleneck": RESOURCE_NAMES[sim.bottleneck],
            "utilisation": sim.utilisation,
            "gpu_breakdown": sim.gpu_static,
            "host_breakdown": sim.host_static,
            "plan": asdict(plan),
        }
        one = verdict if ranks == 1 else choose_plan(cfg, model, seq, batch, profile, budgets, clip)
        # one GPU's candidates include every rank's, with less host memory: what fits on several fits on one
        assert one.simulation is not None, "a plan that fits on several GPUs fits on one"
        report["predicted_tokens_per_s_one_gpu"] = one.simulation.tokens_per_s
        report["predicted_scaling"] = sim.tokens_per_s / one.simulation.tokens_per_s
        report["levers"] = _levers_when_fitting(cfg, report, sim)
    else:
        report["levers"] = _levers_when_not(report)
    return report


def _levers_when_fitting(cfg: ModelConfig, report: dict, sim) -> list[str]:
    plan = sim.plan
    out = []
    if sim.bottleneck == "disk":
        out.append(
            f"the disk tier bounds the step ({len(plan.disk_units)} layers' states on disk): more host RAM "
            "keeps more layers off the disk; a faster disk helps in proportion"
        )
    elif sim.bottleneck == "cpu":
        on_cpu = plan.placement.count("cpu")
        out.append(
            f"the CPU optimizer bounds the step ({on_cpu} of {cfg.num_layers + 2} units update on the host): "
            "more GPU memory moves more units' AdamW to the GPU"
        )
    elif sim.bottleneck == "gpu":
        out.append("GPU compute bounds the step: a faster GPU or fewer recomputed layers (more GPU memory) would help")
    else:
        out.append(f"{RESOURCE_NAMES[sim.bottleneck]} bounds the step: a larger batch amortises the weight traffic")
    if plan.ranks > 1:
        last = sim.spans[-1].step
        reducing = sum(s.end - s.start for s in sim.spans if s.step == last and s.kind in COLLECTIVES)
        out.append(
            f"the gradients' all-reduce between the {plan.ranks} GPUs takes {reducing:.2f} s of each step's GPU "
            "time: a faster link between them (a measured profile's gpu_link_bandwidth, NVLink) shortens it"
        )
    if report["max_batch"] > plan.batch:
        out.append(f"batch up to {report['max_batch']} fits at seq {plan.seq}")
    return out


def _levers_when_not(report: dict) -> list[str]:
    out = []
    b = report["budgets"]
    if report["least_host_bytes"] > b["host_bytes"]:
        out.append(
            f"host RAM: even the leanest plan needs {report['least_host_bytes'] / GiB:.0f} GiB "
            f"(fp32 master weights and AdamW states take 12 bytes per parameter); "
            f"budget {b['host_bytes'] / GiB:.0f} GiB"
            + (
                f" with {b['disk_bytes'] / GiB:.0f} GiB of disk"
                if b["disk_bytes"]
                else ". A disk budget (--disk GiB, --disk-dir at train time) moves layers' states to disk"
            )
        )
    if report["least_gpu_bytes"] > b["gpu_bytes"]:
        out.append(
            f"GPU: the leanest plan (window 2, chunk 1) needs {report['least_gpu_bytes'] / GiB:.1f} GiB; "
            f"budget {b['gpu_bytes'] / GiB:.1f} GiB"
        )
    if report["max_batch"]:
        out.append(f"batch up to {report['max_batch']} fits at seq {report['seq']}")
    elif report["max_seq_at_batch_1"]:
        out.append(f"seq up to {report['max_seq_at_batch_1']} fits at batch 1")
    return out


def render(report: dict) -> str:
    g = lambda n: f"{n / GiB:.1f} GiB"  # noqa: E731
    b = report["budgets"]
    lines = [
        f"{report['model']} ({report['params'] / 1e9:.2f} B params), seq {report['seq']}, "
        f"budgets GPU {g(b['gpu_bytes'])} / host {g(b['host_bytes'])} / disk {g(b['disk_bytes'])}; profile {report['profile']}"
        + (" (spec sheet, not measured)" if report["profile_source"] == "spec" else "")
    ]
    ranks = report["ranks"]
    if report["fits"]:
        p = report["plan"]
        per_gpu = f" per GPU x {ranks} GPUs" if ranks > 1 else ""
        lines += [
            f"FITS   batch {report['batch']}{per_gpu}: {report['predicted_step_s']:.2f} s/step, "
            f"{report['predicted_tokens_per_s']:,.0f} tokens/s, {report['predicted_tflops']:.0f} TFLOPS (predicted)",
            f"       peak GPU {g(report['peak_gpu_bytes'])}" + (" each" if ranks > 1 else "") + ", host "
            f"{g(report['peak_host_bytes'])}" + (" (all ranks)" if ranks > 1 else "") + ", "
            f"disk {g(report['peak_disk_bytes'])}",
            f"       bottleneck: {report['bottleneck']} ("
            + ", ".join(f"{k} {v:.0%}" for k, v in report["utilisation"].items())
            + " busy)",
            f"       {'per-GPU plan' if ranks > 1 else 'plan'}: chunk {p['chunk']}, window {p['window']}, "
            f"kept weights {p['kept_weights']}, saved attention {p['saved_attention']} in RAM + {p['resident_attention']} on GPU, activations "
            f"{_runs(p['activations'])}, optimizer on GPU for {p['placement'].count('gpu')} units, "
            f"states on disk for {p['placement'].count('disk')} layers, "
            f"update {p['update']}",
        ]
        if ranks > 1:
            lines.append(
                f"       {ranks} GPUs: {report['predicted_tokens_per_s']:,.0f} tokens/s; the same on 1 GPU: "
                f"{report['predicted_tokens_per_s_one_gpu']:,.0f} tokens/s; predicted scaling "
                f"{report['predicted_scaling']:.2f}x"
            )
    else:
        lines.append(
            "DOES NOT FIT"
            + (f" at batch {report['batch']}" if report["batch"] else "")
            + ": "
            + "; ".join(report["shortfalls"])
        )
    longest = report["max_seq_at_batch_1"] == report["max_position_embeddings"]
    lines.append(
        f"max batch at seq {report['seq']}: {report['max_batch']}; max seq at batch 1: {report['max_seq_at_batch_1']}"
        + (" (the model's longest; more may fit)" if longest else "")
    )
    lines += [f"- {x}" for x in report["levers"]]
    return "\n".join(lines)


def _runs(items: list[str]) -> str:
    """['offload', 'offload', 'keep'] -> 'offload x2, keep x1'."""
    out: list[list] = []
    for x in items:
        if out and out[-1][0] == x:
            out[-1][1] += 1
        else:
            out.append([x, 1])
    return ", ".join(f"{x} x{n}" for x, n in out)
