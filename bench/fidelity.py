"""Simulator fidelity: run plans with per-op CUDA-event timing and lay them beside the simulator's prediction.

    python -m bench.fidelity --profile calibrate/profiles/h100-80gb.json --out bench/results/X.json
    python -m bench.fidelity --profile P.json --plan 1024x8=bench/plans/F.json --gpu-cap-gib 24 --out X.json
    python -m bench.fidelity --draw X.json --out gantt.png   # a run's measured step over its simulated one

Each plan runs in its own process (so its peak host RSS is its own): 2 warm-up steps, 3 timed steps
(untraced: the measured step time), then 2 traced steps (the measured Gantt). The parent simulates the
same plan with the profile, which is measured on the same machine beforehand and not fitted to these runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from bench.common import BATCH, MODEL, SEQ, cap_gpu, memory_readings, provenance, time_steps
from slideformer.schedule.profile import Profile
from slideformer.models import load_model_config
from slideformer.schedule.plan import Plan, uniform_plan
from slideformer.schedule.memory import RUNTIME_OVERHEAD, GiB
from slideformer.planner.search import GPU_BUDGET_FRACTION, HOST_BUDGET_FRACTION, Budgets, choose_plan
from slideformer.simulator import simulate

L16 = load_model_config(MODEL).num_layers


def plans(profile: Profile) -> dict[str, Plan]:
    def p(batch=BATCH, seq=SEQ, **kw) -> Plan:
        return uniform_plan(MODEL, L16, batch, seq, **kw)

    chosen = choose_plan(
        load_model_config(MODEL),
        MODEL,
        SEQ,
        BATCH,
        profile,
        Budgets(
            int(profile.gpu_memory_bytes * GPU_BUDGET_FRACTION), int(profile.host_memory_bytes * HOST_BUDGET_FRACTION)
        ),
    ).plan
    return {
        "offload-w2": p(window=2),
        "offload-w3-keep1": p(window=3, keep_last=1),
        "recompute-w2-gpu6": p(window=2, activation="recompute", gpu_units=6),
        "after-norm-w3-keep1": p(window=3, keep_last=1, update="after_norm"),
        "seq4096-b4-chunk2": p(batch=4, seq=4096, chunk=2, window=2),
        "seq1024-b16-chunk8-recompute-keep2-gpu3": p(
            batch=16, seq=1024, chunk=8, window=3, activation="recompute", keep_last=2, gpu_units=3
        ),
        "planner-choice": chosen,
    }


def plan_of(path: str) -> Plan:
    """A plan file, or a verdict file of `bench.consumer --choose` (the plan under "plan")."""
    saved = json.loads(Path(path).read_text())
    return Plan.from_json(json.dumps(saved["plan"])) if "plan" in saved else Plan.load(path)


def run_one(plan: Plan, out: Path, gpu_cap_gib: float | None) -> None:
    from slideformer.data import random_next_token_batch
    from slideformer.models import RandomWeights
    from slideformer.runtime import AdamWConfig, Engine

    budget = cap_gpu(gpu_cap_gib)
    cfg = load_model_config(plan.model)
    engine = Engine(cfg, plan, RandomWeights(cfg, seed=0), AdamWConfig(lr=1e-5), gpu_budget_bytes=budget)
    data = [random_next_token_batch(cfg.vocab_size, plan.batch, plan.seq, seed=i) for i in range(2)]
    step_s = time_steps(lambda i: engine.train_step(*data[i % 2]).loss, 2, 3, engine.synchronize)["step_s"]
    trace = engine.start_trace()
    for i in range(2):
        engine.train_step(*data[i % 2])
    engine.synchronize()
    spans = trace.spans()
    out.write_text(
        json.dumps({"step_s": step_s, "traced_step_ends": trace.step_ends, "spans": spans, **memory_readings()})
    )
    engine.close()


def last_step(spans: list[dict], lo: float, hi: float) -> list[dict]:
    """Spans overlapping [lo, hi], shifted so the window starts at 0."""
    return [{**s, "start": s["start"] - lo, "end": s["end"] - lo} for s in spans if s["end"] > lo and s["start"] < hi]


def compare(name: str, plan: Plan, measured: dict, profile: Profile) -> dict:
    cfg = load_model_config(plan.model)
    sim = simulate(cfg, plan, profile)
    predicted_gpu = (sim.peak_gpu_bytes - RUNTIME_OVERHEAD) / GiB
    ends = measured["traced_step_ends"]
    m_lo, m_hi = (0.0, ends[0]) if len(ends) < 2 else (ends[-2], ends[-1])
    p_lo, p_hi = sim.step_ends[-2], sim.step_ends[-1]
    row = {
        "name": name,
        "plan": asdict(plan),
        "measured_step_s": measured["step_s"],
        "predicted_step_s": sim.step_s,
        "measured_peak_gpu_gib": measured["peak_gpu_allocated_gib"],
        "predicted_peak_gpu_gib": predicted_gpu,
        "measured_peak_host_gib": measured["peak_host_rss_gib"],
        "predicted_peak_host_gib": sim.host_memory_bytes / GiB,
        "predicted_bottleneck": sim.bottleneck,
        "predicted_utilisation": sim.utilisation,
        "measured_spans": last_step(measured["spans"], m_lo, m_hi),
        "predicted_spans": last_step([asdict(s) for s in sim.spans], p_lo, p_hi),
    }
    for k in ("step_s", "peak_gpu_gib", "peak_host_gib"):
        row[f"error_{k}"] = row[f"predicted_{k}"] / row[f"measured_{k}"] - 1
    row["within_10pct"] = all(abs(row[f"error_{k}"]) <= 0.10 for k in ("step_s", "peak_gpu_gib", "peak_host_gib"))
    return row


def draw_run(result: str, name: str | None, path: str) -> None:
    """One traced step as measured above the same step as simulated, on one time axis."""
    from slideformer.simulator.gantt import draw

    runs = [r for r in json.loads(Path(result).read_text())["runs"] if "measured_spans" in r]
    run = next(r for r in runs if name in (None, r["name"]))
    draw(
        [
            (f"{run['name']}: measured, {run['measured_step_s']:.2f} s/step", run["measured_spans"], None),
            (f"{run['name']}: simulated, {run['predicted_step_s']:.2f} s/step", run["predicted_spans"], None),
        ],
        path,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile")
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", help="comma-separated plan names")
    ap.add_argument("--plan", action="append", metavar="NAME=FILE", help="run these plan files instead (repeatable)")
    ap.add_argument("--gpu-cap-gib", type=float, help="cap the GPU at this many GiB (as bench.ours)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child mode: plan JSON path
    ap.add_argument("--draw", metavar="RESULT", help="draw the first run of a result file (--only: that run)")
    a = ap.parse_args()
    if a.draw:
        draw_run(a.draw, a.only, a.out)
        return
    if a.one:
        run_one(Plan.load(a.one), Path(a.out), a.gpu_cap_gib)
        return
    if not a.profile:
        ap.error("--profile is required to run plans")
    profile = Profile.load(a.profile)
    record = {
        "command": " ".join(["python -m bench.fidelity", *sys.argv[1:]]),
        **provenance(),
        "profile": asdict(profile),
        "runs": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        chosen = {name: plan_of(f) for name, f in (p.split("=", 1) for p in a.plan)} if a.plan else plans(profile)
        for name, plan in chosen.items():
            if a.only and name not in a.only.split(","):
                continue
            plan_path, out = Path(tmp) / f"{name}.plan.json", Path(tmp) / f"{name}.json"
            plan.save(plan_path)
            print("+", name, flush=True)
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench.fidelity",
                    "--profile",
                    a.profile,
                    "--one",
                    str(plan_path),
                    *(["--gpu-cap-gib", str(a.gpu_cap_gib)] if a.gpu_cap_gib else []),
                    "--out",
                    str(out),
                ],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                record["runs"].append(
                    {"name": name, "plan": asdict(plan), "error": (proc.stdout + proc.stderr)[-3000:]}
                )
                print(record["runs"][-1]["error"], flush=True)
            else:
                row = compare(name, plan, json.loads(out.read_text()), profile)
                record["runs"].append(row)
                print(json.dumps({k: v for k, v in row.items() if not k.endswith("spans") and k != "plan"}), flush=True)
            Path(a.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
