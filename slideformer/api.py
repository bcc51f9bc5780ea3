"""The Python entry points, for pipelines: what `slideformer train`, `plan --json` and `simulate` do.

import slideformer
report = slideformer.plan("llama-3.1-8b", seq=2048, batch=8, gpu_mem_gib=22, host_mem_gib=110)
summary = slideformer.finetune(model="/models/Llama-3.1-8B-Instruct", dataset=rows, max_steps=200)
sim = slideformer.simulate(slideformer.Plan(**report["plan"]))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path

from slideformer.models import load_model_config
from slideformer.planner.report import capacity_report
from slideformer.planner.search import GPU_BUDGET_FRACTION, HOST_BUDGET_FRACTION, Budgets
from slideformer.progress import MetricsCallback
from slideformer.schedule.memory import GiB
from slideformer.schedule.plan import Plan
from slideformer.schedule.profile import Profile, ProfileError
from slideformer.simulator import Simulation
from slideformer.train_config import ConfigError, TrainConfig, config_values

DEFAULT_PROFILE = "h100-80gb"


def _config(config: TrainConfig | dict | str | Path | None, overrides: dict, rows_given: bool) -> TrainConfig:
    """A validated TrainConfig from a TrainConfig, a dict of its fields or a YAML file, with keyword overrides."""
    if isinstance(config, (str, Path)):
        values = config_values(str(config))
    else:
        values = dataclasses.asdict(config) if isinstance(config, TrainConfig) else dict(config or {})
    unknown = set(values) | set(overrides)
    unknown -= {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise ConfigError(f"unknown training settings {sorted(unknown)}")
    cfg = TrainConfig(**(values | overrides))
    cfg.validate(rows_given)
    return cfg


def train(config: TrainConfig | dict | str | Path, **overrides) -> dict:
    """Fine-tune as `slideformer train` does and return the run's summary (also in output_dir/summary.json).
    `config`: a TrainConfig, a dict of its fields, or a YAML file; keyword arguments override its fields."""
    from slideformer.recipes.train import train_from_config

    return train_from_config(_config(config, overrides, rows_given=False))


def finetune(
    config: TrainConfig | dict | str | Path | None = None,
    *,
    dataset: Iterable[dict] | None = None,
    eval_dataset: Iterable[dict] | None = None,
    callbacks: Sequence[MetricsCallback] = (),
    **settings,
) -> dict:
    """Fine-tune on rows given in Python and return the run's summary: 'checkpoint' (a Hugging Face directory),
    'first_loss', 'last_loss', 'eval_loss_before/after', 'steps', 'seconds', 'plan'.

    `config` and `settings`: the keys of the YAML config (`slideformer train --print-config`), as a TrainConfig,
    a dict, a YAML file or keyword arguments (which win). `dataset`: a `datasets.Dataset` or any iterable of rows
    of the shapes data files hold ({"text"}, {"messages": [...]}, {"instruction", "input", "output"}), in place
    of `data`; `eval_dataset` likewise for `eval_data`. Without `dataset` it trains on `data` as `train` does.
    `callbacks`: functions called with every metrics record (a step's loss, grad_norm, lr, tokens_per_s, ...,
    or an eval_loss), besides metrics.jsonl and the `report_to` sinks."""
    from slideformer.recipes.train import train_from_config

    cfg = _config(config, settings, rows_given=dataset is not None)
    if eval_dataset is not None and (cfg.eval_data or cfg.eval_fraction):
        raise ConfigError("give eval_dataset, eval_data or eval_fraction, not two of them")
    return train_from_config(cfg, dataset, eval_dataset, callbacks)


def simulate(plan: Plan | str | Path, profile: str | Path = DEFAULT_PROFILE) -> Simulation:
    """Predict one plan (a Plan or a plan JSON) on a profile's machine: `.step_s`, `.tokens_per_s`, `.tflops`,
    `.utilisation`, `.bottleneck`, the peaks, every op's simulated span (`.spans`) and `.summary()` (what
    `slideformer simulate --json` prints)."""
    from slideformer.simulator import simulate as replay

    plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    return replay(load_model_config(plan.model), plan, Profile.load(profile))


def plan(
    model: str,
    seq: int,
    batch: int | None = None,
    *,
    gpu_mem_gib: float | None = None,
    host_mem_gib: float | None = None,
    disk_gib: float = 0.0,
    profile: str | Path = DEFAULT_PROFILE,
    clip: bool = False,
    gpus: int = 1,
) -> dict:
    """The capacity report of `slideformer plan --json`: whether `batch` x `seq` fits these budgets (default:
    92% of the profile's GPU and 90% of its RAM), the fastest plan found (report['plan'], a Plan's fields), its
    predicted step time and peaks, the largest batch at this seq and the longest seq at batch 1.
    `batch` None picks the batch. `gpus`: data-parallel GPUs of the host, each with `gpu_mem_gib` and running
    the plan over `batch` sequences, all sharing `host_mem_gib`; the report adds the same question's tokens/s
    on one GPU and the predicted scaling."""
    problems = [
        f"{name} must be > 0, got {v}"
        for name, v in (("gpu_mem_gib", gpu_mem_gib), ("host_mem_gib", host_mem_gib))
        if v is not None and not v > 0
    ]
    if not disk_gib >= 0:
        problems.append(f"disk_gib must be >= 0, got {disk_gib}")
    if seq < 2:
        problems.append(f"seq must be >= 2, got {seq}")
    if batch is not None and batch < 1:
        problems.append(f"batch must be None (pick one) or >= 1, got {batch}")
    if gpus < 1:
        problems.append(f"gpus must be >= 1, got {gpus}")
    if problems:
        raise ConfigError("; ".join(problems))
    prof = Profile.load(profile)
    cfg = load_model_config(model)
    # By default leave 8% of the GPU to the caching allocator's fragmentation (reserved above allocated).
    gpu = (
        gpu_mem_gib * GiB
        if gpu_mem_gib is not None
        else prof.gpu_memory_bytes and int(prof.gpu_memory_bytes * GPU_BUDGET_FRACTION)
    )
    host = host_mem_gib * GiB if host_mem_gib is not None else int(prof.host_memory_bytes * HOST_BUDGET_FRACTION)
    if gpu is None:
        raise ProfileError(f"profile {prof.name!r} has no GPU; pass gpu_mem_gib and a GPU profile")
    budgets = Budgets(int(gpu), int(host), int(disk_gib * GiB))
    return capacity_report(cfg, model, seq, batch, prof, budgets, clip=clip, ranks=gpus)
