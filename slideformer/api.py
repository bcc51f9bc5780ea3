"""The Python entry points, for pipelines: what `slideformer train` and `slideformer plan --json` do.

    import slideformer
    report = slideformer.plan("llama-3.1-8b", seq=2048, batch=8, gpu_mem_gib=22, host_mem_gib=110)
    summary = slideformer.train({"model": "/models/Llama-3.1-8B-Instruct", "data": ["chat.jsonl"]}, max_steps=200)
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from slideformer.models import load_model_config
from slideformer.planner.report import capacity_report
from slideformer.planner.search import GPU_BUDGET_FRACTION, HOST_BUDGET_FRACTION, Budgets
from slideformer.schedule.memory import GiB
from slideformer.schedule.profile import Profile, ProfileError
from slideformer.train_config import ConfigError, TrainConfig, load_config

DEFAULT_PROFILE = "h100-80gb"


def train(config: TrainConfig | dict | str | Path, **overrides) -> dict:
    """Fine-tune as `slideformer train` does and return the run's summary (also in output_dir/summary.json).
    `config`: a TrainConfig, a dict of its fields, or a YAML file; keyword arguments override its fields."""
    from slideformer.recipes.train import train_from_config

    if isinstance(config, (str, Path)):
        config = load_config(str(config))
    values = dataclasses.asdict(config) if isinstance(config, TrainConfig) else dict(config)
    unknown = set(values) | set(overrides)
    unknown -= {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise ConfigError(f"unknown training settings {sorted(unknown)}")
    cfg = TrainConfig(**(values | overrides))
    cfg.validate()
    return train_from_config(cfg)


def plan(model: str, seq: int, batch: int | None = None, *, gpu_mem_gib: float | None = None,
         host_mem_gib: float | None = None, disk_gib: float = 0.0, profile: str | Path = DEFAULT_PROFILE,
         clip: bool = False) -> dict:
    """The capacity report of `slideformer plan --json`: whether `batch` x `seq` fits these budgets (default:
    92% of the profile's GPU and 90% of its RAM), the fastest plan found (report['plan'], a Plan's fields), its
    predicted step time and peaks, the largest batch at this seq and the longest seq at batch 1.
    `batch` None picks the batch."""
    problems = [f"{name} must be > 0, got {v}" for name, v in (("gpu_mem_gib", gpu_mem_gib), ("host_mem_gib", host_mem_gib))
                if v is not None and not v > 0]
    if not disk_gib >= 0:
        problems.append(f"disk_gib must be >= 0, got {disk_gib}")
    if seq < 2:
        problems.append(f"seq must be >= 2, got {seq}")
    if batch is not None and batch < 1:
        problems.append(f"batch must be None (pick one) or >= 1, got {batch}")
    if problems:
        raise ConfigError("; ".join(problems))
    prof = Profile.load(profile)
    cfg = load_model_config(model)
    # By default leave 8% of the GPU to the caching allocator's fragmentation (reserved above allocated).
    gpu = gpu_mem_gib * GiB if gpu_mem_gib is not None else \
        prof.gpu_memory_bytes and int(prof.gpu_memory_bytes * GPU_BUDGET_FRACTION)
    host = host_mem_gib * GiB if host_mem_gib is not None else int(prof.host_memory_bytes * HOST_BUDGET_FRACTION)
    if gpu is None:
        raise ProfileError(f"profile {prof.name!r} has no GPU; pass gpu_mem_gib and a GPU profile")
    return capacity_report(cfg, model, seq, batch, prof, Budgets(int(gpu), int(host), int(disk_gib * GiB)), clip=clip)
