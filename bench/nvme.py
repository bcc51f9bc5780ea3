"""The NVMe tier on the GPU machine, in one command: the tier alone (write and read GB/s through kvikio and
through POSIX), then the largest model shape that fits GPU + RAM + disk, shown not to fit without the
disk, trained for a few steps with its states (and, where the planner finds it pays, its layers' saved
activations) partly on disk, beside the simulator's prediction.

    python -m bench.nvme --dir /nvme/scratch --out bench/results/X.json

The simulation uses the committed profile with the disk rates just measured (the I/O path the engine
takes). Results are written after each phase, so a run stopped early keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from pathlib import Path

import torch

from bench.common import memory_readings, provenance, throughput, time_steps, write_result
from slideformer.calibrate.measure import disk_rates
from slideformer.schedule.profile import Disk, Profile
from slideformer.data import random_next_token_batch
from slideformer.models import RandomWeights, load_model_config
from slideformer.schedule.memory import GiB, disk_bytes
from slideformer.planner.search import GPU_BUDGET_FRACTION, Budgets, choose_plan
from slideformer.recipes.train import available_host_bytes
from slideformer.runtime import AdamWConfig, Engine
from slideformer.runtime.disk import DiskTier, kvikio_available
from slideformer.simulator import RESOURCE_NAMES

SHAPES = ["qwen2.5-32b:30", "qwen2.5-32b:28", "qwen2.5-32b:26", "qwen3-14b", "qwen2.5-32b:24", "qwen3-14b:32"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True, help="a directory on the disk to use")
    ap.add_argument("--out", required=True)
    ap.add_argument("--profile", default="h100-80gb")
    ap.add_argument("--shapes", nargs="+", default=SHAPES, help="model shapes to try, the largest that fits wins")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--host-fraction", type=float, default=0.85, help="of available RAM, for the host budget")
    ap.add_argument(
        "--disk-fraction",
        type=float,
        default=0.9,
        help="of the disk's free space, for the disk budget (the train recipe's default)",
    )
    ap.add_argument("--tier-gib", type=float, default=4.0, help="file size for the tier-alone rates")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    a = ap.parse_args()
    root = Path(a.dir)
    root.mkdir(parents=True, exist_ok=True)
    record: dict = {"command": "python -m bench.nvme --dir " + a.dir + " --out " + a.out, **provenance()}

    # 1. The tier alone.
    paths = ["kvikio", "posix"] if kvikio_available() else ["posix"]
    record["tier"] = {io: dataclasses.asdict(disk_rates(DiskTier, root, int(a.tier_gib * GiB), io)) for io in paths}
    write_result(a.out, record)

    # 2. The largest shape that fits with the disk (and not without).
    profile = Profile.load(a.profile)
    engine_io = paths[0]
    profile.disk = Disk(**record["tier"][engine_io])
    budgets = Budgets(
        int(torch.cuda.mem_get_info()[0] * GPU_BUDGET_FRACTION),
        int(available_host_bytes() * a.host_fraction),
        int(shutil.disk_usage(root).free * a.disk_fraction),
    )
    record["budgets_gib"] = {k: v / GiB for k, v in dataclasses.asdict(budgets).items()}
    tried = []
    chosen = None
    for shape in sorted(a.shapes, key=lambda m: -load_model_config(m).total_params):
        cfg = load_model_config(shape)
        with_disk = choose_plan(cfg, shape, a.seq, a.batch, profile, budgets)
        without = choose_plan(cfg, shape, a.seq, a.batch, profile, dataclasses.replace(budgets, disk_bytes=0))
        tried.append(
            {
                "model": shape,
                "params": cfg.total_params,
                "fits_with_disk": with_disk.fits,
                "fits_without_disk": without.fits,
                "without_disk_shortfalls": without.shortfalls,
                "with_disk_shortfalls": with_disk.shortfalls,
            }
        )
        if with_disk.fits and not without.fits:
            chosen = (shape, cfg, with_disk)
            break
    record["shapes_tried"] = tried
    write_result(a.out, record)
    if chosen is None:
        raise SystemExit("no shape fits with the disk and not without it")
    shape, cfg, verdict = chosen
    plan, sim = verdict.plan, verdict.simulation
    record |= {
        "model": shape,
        "params": cfg.total_params,
        "plan": dataclasses.asdict(plan),
        "disk_layers": len(plan.disk_units),
        "disk_activation_layers": plan.activations.count("disk"),
        "disk_tier_bytes": disk_bytes(cfg, plan),
        "predicted": {
            "step_s": sim.step_s,
            "bottleneck": RESOURCE_NAMES[sim.bottleneck],
            "utilisation": sim.utilisation,
            "peak_host_gib": sim.host_memory_bytes / GiB,
            "peak_gpu_gib": sim.peak_gpu_bytes / GiB,
        },
        "profile_disk": dataclasses.asdict(profile.disk),
    }
    write_result(a.out, record)

    # 3. Train it.
    t0 = time.perf_counter()
    engine = Engine(
        cfg, plan, RandomWeights(cfg, seed=0), AdamWConfig(lr=1e-5), disk_dir=str(root / "tier"), disk_io=engine_io
    )
    record["init_s"] = time.perf_counter() - t0
    record["engine_io"] = engine.tier.method
    data = [random_next_token_batch(cfg.vocab_size, a.batch, a.seq, seed=i) for i in range(2)]
    timing = time_steps(lambda i: engine.train_step(*data[i % 2]).loss, a.warmup, a.steps, engine.synchronize)
    measured = timing["step_s"]
    record |= {
        **timing,
        **throughput(shape, a.batch, a.seq, measured),
        **memory_readings(),
        "predicted_over_measured": sim.step_s / measured,
    }
    engine.close()
    write_result(a.out, record)


if __name__ == "__main__":
    main()
