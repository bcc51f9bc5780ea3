"""bf16 weights in RAM (the fp32 -> bf16 cast done by the CPU update) against fp32 masters streamed and cast
on the GPU, on the planner's plan for a GPU budget where the CPU optimizer and PCIe bound the step; both
run in this command, each in its own process, beside the simulator's prediction.

    python -m bench.host_weights --out bench/results/X.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import provenance, write_result
from slideformer.calibrate.profile import Profile
from slideformer.models import load_model_config
from slideformer.planner.memory import GiB
from slideformer.planner.search import Budgets, choose_plan
from slideformer.simulator import simulate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.1-8b:16")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--gpu-gib", type=float, default=24.0)
    ap.add_argument("--host-gib", type=float, default=100.0)
    ap.add_argument("--profile", default="h100-80gb")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    profile, cfg = Profile.load(a.profile), load_model_config(a.model)
    # The plan leaves 8% of the capped GPU to the allocator's fragmentation, as `slideformer plan` does.
    budgets = Budgets(int(0.92 * a.gpu_gib * GiB), int(a.host_gib * GiB))
    verdict = choose_plan(cfg, a.model, a.seq, a.batch, profile, budgets)
    if not verdict.fits or not verdict.plan.host_bf16_weights:
        raise SystemExit(f"the planner did not choose bf16 weights in RAM here: {verdict.shortfalls or verdict.plan}")
    record = {"command": f"python -m bench.host_weights --out {a.out}", **provenance(), "model": a.model,
              "gpu_budget_gib": a.gpu_gib, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for bf16 in (True, False):
            plan = dataclasses.replace(verdict.plan, host_bf16_weights=bf16)
            name = "bf16-weights-in-ram" if bf16 else "fp32-streamed"
            plan_path, out = Path(tmp) / f"{name}.plan.json", Path(tmp) / f"{name}.json"
            plan.save(plan_path)
            subprocess.run([sys.executable, "-m", "bench.ours", "--name", name, "--plan", str(plan_path),
                            "--gpu-cap-gib", str(a.gpu_gib), "--warmup", "2", "--steps", "4", "--out", str(out)],
                           check=True)
            run = json.loads(out.read_text())
            run["predicted_step_s"] = simulate(cfg, plan, profile).step_s
            record["runs"].append(run)
    by = {r["name"]: r["step_s"] for r in record["runs"]}
    record["fp32_over_bf16_step_time"] = by["fp32-streamed"] / by["bf16-weights-in-ram"]
    write_result(a.out, record)


if __name__ == "__main__":
    main()
