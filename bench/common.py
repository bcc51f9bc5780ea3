"""Shared pieces of the benchmark: the workload, timing, memory readings and the result record."""

from __future__ import annotations

import datetime
import json
import os
import resource
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

from slideformer.models import load_model_config

MODEL = "llama-3.1-8b:16"
SEQ = 2048
BATCH = 8


def time_steps(step: Callable[[int], float], warmup: int, steps: int, sync: Callable[[], None]) -> dict:
    """Run warmup steps, then `steps` timed steps back to back; step time is the mean of the timed span."""
    losses = [step(i) for i in range(warmup)]
    sync()
    start = time.perf_counter()
    per_step = []
    for i in range(warmup, warmup + steps):
        t = time.perf_counter()
        losses.append(step(i))
        per_step.append(time.perf_counter() - t)
    sync()
    total = time.perf_counter() - start
    return {"step_s": total / steps, "per_step_s": per_step, "losses": losses}


def memory_readings() -> dict:
    return {
        "peak_gpu_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "peak_gpu_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None,
        "peak_host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def throughput(model: str, batch: int, seq: int, step_s: float) -> dict:
    cfg = load_model_config(model)
    tokens = batch * seq
    return {
        "model": model,
        "params": cfg.total_params,
        "batch": batch,
        "seq": seq,
        "tokens_per_s": tokens / step_s,
        # Model TFLOPS = (6·P + 6·L·S·H) · tokens/s: the convention of the peers' reports.
        "model_tflops": cfg.model_flops_per_token(seq) * tokens / step_s / 1e12,
    }


def cap_gpu(gpu_cap_gib: float | None) -> int | None:
    """Cap the CUDA caching allocator at `gpu_cap_gib` (as on a card of that size) and return the same cap in
    bytes for the engine's own check; None (no cap) without one."""
    if not gpu_cap_gib:
        return None
    torch.cuda.set_per_process_memory_fraction(gpu_cap_gib * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    return int(gpu_cap_gib * 2**30)


def provenance() -> dict:
    def run(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "git_commit": os.environ.get("SLIDEFORMER_COMMIT") or run(["git", "rev-parse", "HEAD"]),
        "torch": torch.__version__,
        "host": run(["hostname"]),
        "cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),  # as the run's CUDA allocator read it
    }


def write_result(path: str | Path, record: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=2))
    print(json.dumps({k: v for k, v in record.items() if k not in ("per_step_s", "losses")}))
