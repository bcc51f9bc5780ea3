"""The consumer-GPU suite: full Llama-3.1-8B shape, the GPU capped at 24 GiB (a 24 GB card), full-length
random data, ours with the planner's plan beside the official SlideFormer, in one lease.

    python -m bench.consumer --system ours --only 2048x8,1024x32 --out a.json
    python -m bench.consumer --system official --only 2048x8,1024x32 --out b.json   # needs peers/ (see below)
    python -m bench.consumer --system deepspeed --only 2048x8,1024x32 --out c.json  # needs deepspeed (see below)
    python -m bench.consumer --merge a.json b.json c.json --out bench/results/consumer.json --figure consumer.png

Ours: for each workload the planner picks the plan within 92% of the 24 GiB cap (as the train recipe does
with free GPU memory) and the host's available RAM less `HOST_RESERVE`; a workload it refuses is recorded
with the planner's numbers; one it accepts runs in its own process (`bench.ours`), with predicted and
measured step time and peaks side by side. The official SlideFormer runs through `peers/run_official.sh`
(assembled as `../shared/peers/README.md` says, git-ignored), its CSV and logs kept verbatim. DeepSpeed
ZeRO-3 offload runs `bench.deepspeed_zero` under the same cap (a GPU machine without network installs it from
wheels carried along: `pip install --no-index --find-links DIR deepspeed`, DIR holding deepspeed's wheel,
built with `DS_BUILD_OPS=0 pip wheel deepspeed --no-deps`, and those of its requirements the machine lacks).
Each call runs what fits in the device's 10-minute limit: split workloads across calls with --only.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from bench.common import provenance
from slideformer.schedule.memory import RUNTIME_OVERHEAD, GiB

if TYPE_CHECKING:
    from slideformer.models.config import ModelConfig
    from slideformer.planner.search import Budgets
    from slideformer.schedule.profile import Profile

MODEL = "llama-3.1-8b"
GPU_CAP_GIB = 24
HOST_RESERVE = 4 * 2**30  # left to the OS and the process's own allocations
WORKLOADS = ["2048x8", "1024x8", "1024x16", "1024x32", "1024x64", "16384x1", "32768x1", "65536x1", "131072x1"]


def seq_batch(workload: str) -> tuple[int, int]:
    seq, batch = workload.split("x")
    return int(seq), int(batch)


def plan_file(plans_dir: str, workload: str, profile_name: str) -> Path:
    """Where `--choose` writes, and `--plans` reads, the planner's verdict for a workload and profile."""
    return Path(plans_dir) / f"{MODEL}-{GPU_CAP_GIB}gib-{workload}-{profile_name}.json"


def chosen_plans(plans_dir: str, workloads: list[str], profile, cfg, budgets) -> dict[str, tuple]:
    """Verdicts the planner reached beforehand (`bench.consumer --choose`) for the same profile, so that a lease
    spends no time searching: {workload: (verdict, file, the budgets it was chosen for)}. A file counts as the
    planner's choice for these budgets when it was chosen for budgets at least as large (every plan that fits
    these was on its grid) and its plan fits these; otherwise the planner runs here."""
    from slideformer.planner.search import Budgets, Verdict, shortfalls
    from slideformer.schedule.plan import Plan
    from slideformer.simulator import simulate

    out = {}
    for w in workloads:
        path = plan_file(plans_dir, w, profile.name)
        if not path.exists():
            continue
        saved = json.loads(path.read_text())
        chosen_for = Budgets(**saved["budgets"])
        plan = Plan(**saved["plan"])
        if (
            saved["profile"] != profile.name
            or any(getattr(chosen_for, k) < getattr(budgets, k) for k in ("gpu_bytes", "host_bytes", "disk_bytes"))
            or shortfalls(cfg, plan, profile, budgets)
        ):
            print(f"{w}: {path} was chosen for smaller budgets, another profile or does not fit; planning here")
            continue
        out[w] = (Verdict(True, plan, simulate(cfg, plan, profile), saved["max_batch"]), str(path), chosen_for)
    return out


def choose(workloads: list[str], profile_path: str, host_bytes: int, plans_dir: str) -> None:
    """The planner's verdicts for the consumer budgets, written for `--plans` (on any machine: the same
    profile and budgets give the same plans)."""
    from slideformer.models import load_model_config
    from slideformer.planner.search import GPU_BUDGET_FRACTION, Budgets, choose_plan
    from slideformer.schedule.profile import Profile

    cfg, profile = load_model_config(MODEL), Profile.load(profile_path)
    budgets = Budgets(int(GPU_CAP_GIB * GiB * GPU_BUDGET_FRACTION), host_bytes, 0)
    for w in workloads:
        seq, batch = seq_batch(w)
        verdict = choose_plan(cfg, MODEL, seq, batch, profile, budgets)
        path = plan_file(plans_dir, w, profile.name)
        if not verdict.fits:
            print(f"{w}: refused: {'; '.join(verdict.shortfalls)}", flush=True)
            continue
        record = {
            "command": "python -m bench.consumer " + " ".join(sys.argv[1:]),
            "profile": profile.name,
            "budgets": asdict(budgets),
            "max_batch": verdict.max_batch,
            "predicted_step_s": verdict.simulation.step_s,
            "plan": asdict(verdict.plan),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2))
        print(f"{w}: predicted {verdict.simulation.step_s:.3f} s/step, wrote {path}", flush=True)


def run_ours(
    workloads: list[str],
    timeout_s: int,
    profile_path: str,
    disk_dir: str | None,
    plans_dir: str | None,
    save: Callable[[dict], None],
) -> dict:
    from slideformer.schedule.profile import Profile
    from slideformer.models import load_model_config
    from slideformer.planner.search import (
        DISK_BUDGET_FRACTION,
        GPU_BUDGET_FRACTION,
        Budgets,
        feasible,
        largest,
    )
    from slideformer.recipes.train import available_host_bytes

    cfg, profile = load_model_config(MODEL), Profile.load(profile_path)
    disk = 0
    if disk_dir is not None:  # the train recipe's disk budget: a share of the free space there
        Path(disk_dir).mkdir(parents=True, exist_ok=True)
        disk = int(shutil.disk_usage(disk_dir).free * DISK_BUDGET_FRACTION)
    budgets = Budgets(int(GPU_CAP_GIB * GiB * GPU_BUDGET_FRACTION), available_host_bytes() - HOST_RESERVE, disk)
    rows: dict[str, dict] = {}
    chosen = chosen_plans(plans_dir, workloads, profile, cfg, budgets) if plans_dir else {}
    for w in workloads:
        rows[w] = ours_row(w, cfg, profile, budgets, chosen, timeout_s, disk_dir)
        save({"workloads": rows})  # after each workload, so that a call's time limit loses no finished row
    # what `slideformer plan` reports as capacity (its max batch and max seq), without its plan search
    capacity = {
        "max_batch_at_seq_1024": largest(lambda b: feasible(cfg, MODEL, b, 1024, profile, budgets), 1 << 16),
        "max_seq_at_batch_1": largest(
            lambda s: feasible(cfg, MODEL, 1, s, profile, budgets), cfg.max_position_embeddings
        ),
    }
    return {"workloads": rows, "planner_capacity": capacity}


def ours_row(
    w: str,
    cfg: ModelConfig,
    profile: Profile,
    budgets: Budgets,
    chosen: dict,
    timeout_s: int,
    disk_dir: str | None,
) -> dict:
    """One workload: the planner's verdict and, where it fits, the plan's run in its own process."""
    from slideformer.planner.search import choose_plan

    seq, batch = seq_batch(w)
    if w in chosen:
        verdict, source, chosen_for = chosen[w]
    else:
        verdict, source, chosen_for = choose_plan(cfg, MODEL, seq, batch, profile, budgets), "planner", budgets
    row: dict = {
        "seq": seq,
        "batch": batch,
        "budgets": asdict(budgets),
        "plan_source": source,  # the planner here, or its file from --choose
        "plan_budgets": asdict(chosen_for),
        "profile": profile.name,
        "profile_date": profile.date,
        "fits": verdict.fits,
        "planner_max_batch": verdict.max_batch,
        "shortfalls": verdict.shortfalls,
    }
    print(f"{w}: {'FITS' if verdict.fits else 'refused: ' + '; '.join(verdict.shortfalls)}", flush=True)
    if not verdict.fits:
        return row
    sim = verdict.simulation
    row |= {
        "plan": asdict(verdict.plan),
        "predicted_step_s": sim.step_s,
        "predicted_peak_gpu_gib": sim.peak_gpu_bytes / GiB,
        "predicted_peak_gpu_allocated_gib": sim.peak_gpu_allocated_bytes / GiB,
        "predicted_peak_host_gib": sim.host_memory_bytes / GiB,
        "predicted_bottleneck": sim.bottleneck,
    }
    long_step = seq * batch >= 32768
    with tempfile.TemporaryDirectory() as tmp:
        plan_path, out = Path(tmp) / "plan.json", Path(tmp) / "result.json"
        verdict.plan.save(plan_path)
        cmd = [
            sys.executable,
            "-m",
            "bench.ours",
            "--name",
            f"consumer-{w}",
            "--plan",
            str(plan_path),
            "--gpu-cap-gib",
            str(GPU_CAP_GIB),
            "--warmup",
            "1" if long_step else "2",
            "--steps",
            "2" if long_step else "3",
            "--out",
            str(out),
        ] + (["--disk-dir", disk_dir] if disk_dir is not None else [])
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            error = None if proc.returncode == 0 and out.exists() else (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired:
            error = f"timed out after {timeout_s} s"
        if error is not None:
            row["error"] = error
            print(f"  FAILED: {error[-800:]}", flush=True)
            return row
        measured = json.loads(out.read_text())
    row |= {
        k: measured[k]
        for k in (
            "step_s",
            "per_step_s",
            "losses",
            "tokens_per_s",
            "model_tflops",
            "init_s",
            "peak_gpu_allocated_gib",
            "peak_gpu_reserved_gib",
            "peak_host_rss_gib",
        )
    }
    row["step_error"] = row["predicted_step_s"] / row["step_s"] - 1
    row["gpu_peak_error"] = row["predicted_peak_gpu_allocated_gib"] / row["peak_gpu_allocated_gib"] - 1
    row["host_peak_error"] = row["predicted_peak_host_gib"] / row["peak_host_rss_gib"] - 1
    print(
        f"  {row['step_s']:.2f} s/step (predicted {row['predicted_step_s']:.2f}), {row['tokens_per_s']:.0f} tok/s, "
        f"GPU {row['peak_gpu_allocated_gib']:.1f} GiB (pred {row['predicted_peak_gpu_allocated_gib']:.1f}), "
        f"host {row['peak_host_rss_gib']:.1f} GiB (pred {row['predicted_peak_host_gib']:.1f})",
        flush=True,
    )
    return row


def run_official(workloads: list[str], deadline_s: int) -> dict:
    """The peer's own benchmark script on the same workloads; its CSV rows and peak-memory lines verbatim."""
    out = Path(tempfile.mkdtemp(prefix="sf-official-"))
    configs = " ".join(f"{seq}:{batch}" for seq, batch in map(seq_batch, workloads))
    env = os.environ | {
        "OUT": str(out),
        "CONFIGS": configs,
        "GPU_CAP_GIB": str(GPU_CAP_GIB),
        "FULL_LENGTH": "1",
        "WARM": "1",
        "TEST": "3",
        "DEADLINE_S": str(deadline_s),
        "KEEP_MODEL": "1",
    }
    proc = subprocess.run(["bash", "peers/run_official.sh"], env=env, capture_output=True, text=True)
    rows = (
        list(csv.DictReader((out / "slideformer_official_results.csv").open()))
        if (out / "slideformer_official_results.csv").exists()
        else []
    )
    logs = {p.name: p.read_text()[-6000:] for p in sorted(out.glob("sf_run_*.log"))}
    peaks = {}
    for name, text in logs.items():
        m = re.search(r"launcher-sampled peak RSS: .*\(([\d.]+) GiB\)", text)
        peaks[name] = float(m.group(1)) if m else None
    return {
        "returncode": proc.returncode,
        "stdout_tail": (proc.stdout + proc.stderr)[-4000:],
        "csv_rows": rows,
        "peak_rss_gib_by_log": peaks,
        "logs_tail": logs,
        "summary": (out / "slideformer_official_summary.txt").read_text()
        if (out / "slideformer_official_summary.txt").exists()
        else None,
    }


def run_deepspeed(workloads: list[str], timeout_s: int) -> dict:
    """DeepSpeed ZeRO-3 with params and optimizer offloaded (`bench.deepspeed_zero`), each workload in its own
    process within `timeout_s`: its result, or its exit status and the tail of its output."""
    out: dict = {}
    for w in workloads:
        seq, batch = seq_batch(w)
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "r.json"
            cmd = [sys.executable, "-m", "bench.deepspeed_zero", "--stage", "3", "--model", MODEL, "--seq", str(seq)]
            cmd += ["--batch", str(batch), "--gpu-cap-gib", str(GPU_CAP_GIB), "--warmup", "1", "--steps", "3"]
            cmd += ["--out", str(result)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
                tail, code = (proc.stdout + proc.stderr)[-3000:], proc.returncode
            except subprocess.TimeoutExpired as e:
                tail, code = f"timed out after {timeout_s} s: {str(e.stdout or '')[-2000:]}", None
            out[w] = json.loads(result.read_text()) if result.exists() else {"returncode": code, "error": tail}
    return {"workloads": out}


def merge(paths: list[str]) -> dict:
    record: dict = {"command": "python -m bench.consumer " + " ".join(sys.argv[1:]), "systems": {}}
    for p in paths:
        part = json.loads(Path(p).read_text())
        for system, result in part["systems"].items():
            got = record["systems"].setdefault(system, {"calls": []})
            got["calls"].append({k: v for k, v in part.items() if k != "systems"} | {"result": result})
            record.setdefault("device", part.get("device"))
    return record


def table(record: dict) -> dict[str, dict]:
    """Per workload: ours and the official's tokens/s, step and peaks, from a merged record."""
    rows: dict[str, dict] = {}
    for call in record["systems"].get("official", {}).get("calls", []):
        peaks = call["result"]["peak_rss_gib_by_log"]
        for r in call["result"]["csv_rows"]:
            w = f"{r['Sequence_Length']}x{r['Batch_Size']}"
            rows.setdefault(w, {})["official"] = {
                "tokens_per_s": float(r["Avg_Tokens_Per_Second"]),
                "step_s": float(r["Avg_Time"]),
                "peak_gpu_allocated_gib": float(r["Max_CUDA_Memory_Allocated_MB"]) / 1024,
                "peak_host_rss_gib": peaks.get(f"sf_run_s{r['Sequence_Length']}_b{r['Batch_Size']}.log"),
            }
    for call in record["systems"].get("ours", {}).get("calls", []):
        for w, r in call["result"]["workloads"].items():
            if "step_s" in r and "predicted_peak_gpu_allocated_gib" not in r:  # recorded before the field existed
                r["predicted_peak_gpu_allocated_gib"] = r["predicted_peak_gpu_gib"] - RUNTIME_OVERHEAD / GiB
                r["gpu_peak_error"] = r["predicted_peak_gpu_allocated_gib"] / r["peak_gpu_allocated_gib"] - 1
            rows.setdefault(w, {})["ours"] = r
    for call in record["systems"].get("deepspeed", {}).get("calls", []):
        for w, r in call["result"]["workloads"].items():
            keys = ("tokens_per_s", "step_s", "peak_gpu_allocated_gib", "peak_host_rss_gib", "error", "returncode")
            rows.setdefault(w, {})["deepspeed"] = {k: r[k] for k in keys if k in r}
    return rows


def figure(record: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table(record)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    labels = {"ours": "SlideFormer (this project)", "official": "official SlideFormer", "deepspeed": "DeepSpeed ZeRO-3"}
    for system, style in (("ours", "o-"), ("official", "s--"), ("deepspeed", "^:")):

        def points(pick) -> tuple[list[int], list[float]]:
            """(x, tokens/s) of this system's runs that `pick` places on the x axis (None: not on it)."""
            got = sorted(
                (pick(*seq_batch(w)), r[system]["tokens_per_s"])
                for w, r in rows.items()
                if "tokens_per_s" in r.get(system, {}) and pick(*seq_batch(w)) is not None
            )
            return [x for x, _ in got], [t for _, t in got]

        label = labels[system]
        axes[0].plot(*points(lambda seq, batch: batch if seq == 1024 else None), style, label=label)
        axes[1].plot(*points(lambda seq, batch: seq if batch == 1 else None), style, label=label)
        mem = sorted(
            (seq_batch(w)[0] * seq_batch(w)[1], r[system]["peak_gpu_allocated_gib"])
            for w, r in rows.items()
            if system in r and r[system].get("peak_gpu_allocated_gib")
        )
        axes[2].plot([t for t, _ in mem], [g for _, g in mem], style, label=label)
    axes[0].set(xscale="log", xlabel="batch (seq 1024)", ylabel="tokens/s", title="throughput against batch")
    axes[1].set(xscale="log", xlabel="sequence length (batch 1)", ylabel="tokens/s", title="throughput against length")
    axes[2].set(
        xscale="log", xlabel="tokens per step", ylabel="peak GPU allocated, GiB", title="GPU memory (24 GiB cap)"
    )
    axes[2].axhline(GPU_CAP_GIB, color="grey", lw=0.8)
    for ax in axes:
        ax.set_ylim(bottom=0)  # a ratio reads true only from zero
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Llama-3.1-8B, GPU capped at {GPU_CAP_GIB} GiB, one lease on {record.get('device', 'the H100')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--system", choices=["ours", "official", "deepspeed"])
    ap.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated SEQxBATCH workloads")
    ap.add_argument(
        "--timeout", type=int, default=300, help="seconds per workload (ours, deepspeed) / deadline (official)"
    )
    ap.add_argument("--profile", default="h100-80gb", help="the planner's profile (ours): a JSON or committed name")
    ap.add_argument("--disk-dir", help="ours: a directory for the disk tier (budget: 90%% of its free space)")
    ap.add_argument("--plans", help="ours: a directory of the planner's verdicts from --choose, used where they match")
    ap.add_argument(
        "--choose",
        type=int,
        metavar="HOST_BYTES",
        help="write the planner's verdicts for this host budget into --plans and stop (no GPU needed)",
    )
    ap.add_argument("--merge", nargs="+", help="result files of earlier calls to merge into --out")
    ap.add_argument("--figure", help="with --merge: a PNG of tokens/s and peak GPU memory, every system")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.choose:
        if not a.plans:
            ap.error("--choose writes into --plans DIR")
        choose(a.only.split(","), a.profile, a.choose, a.plans)
        return
    if not a.out:
        ap.error("--out is required")
    if a.merge:
        record = merge(a.merge)
        record["table"] = table(record)
        if a.figure:
            figure(record, a.figure)
    else:
        head = {
            "command": "python -m bench.consumer " + " ".join(sys.argv[1:]),
            **provenance(),
            "gpu_cap_gib": GPU_CAP_GIB,
            "model": MODEL,
        }

        def save(result: dict) -> None:
            write(a.out, head | {"systems": {a.system: result}})

        workloads = a.only.split(",")
        if a.system == "ours":
            result = run_ours(workloads, a.timeout, a.profile, a.disk_dir, a.plans, save)
        else:
            result = (run_official if a.system == "official" else run_deepspeed)(workloads, a.timeout)
        record = head | {"systems": {a.system: result}}
    write(a.out, record)


def write(path: str, record: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
