"""SlideFormer: full-parameter mixed-precision fine-tuning of LLMs larger than one GPU's memory.

The Python API (see `slideformer.api`): `slideformer.finetune(config, dataset=rows, **settings)`,
`slideformer.train(config, **overrides)`, `slideformer.plan(model, seq, batch, ...)` and
`slideformer.simulate(plan, profile)`; `slideformer.TrainConfig` is the training config and
`slideformer.Plan` a plan.
"""

import os

# A step's GPU buffers change size from op to op (sequence tiles, loss pieces, the head), and under a tight cap
# the caching allocator's fixed segments fragment: a 128K-token plan with 3 GiB to spare ran out of memory with
# 5.9 GiB reserved but unallocated, and ran with expandable segments (bench/results/h200-2026-12-01-night-
# consumer.json). Set before torch's CUDA allocator starts, unless the user chose a setting.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

__version__ = "0.1.0"
__all__ = ["Plan", "TrainConfig", "finetune", "plan", "simulate", "train"]


def __getattr__(name: str):
    # Imported on first use: `import slideformer.kernels` and the CLI's start stay light.
    if name in ("finetune", "train", "plan", "simulate"):
        from slideformer import api

        return getattr(api, name)
    if name == "TrainConfig":
        from slideformer.train_config import TrainConfig

        return TrainConfig
    if name == "Plan":
        from slideformer.schedule.plan import Plan

        return Plan
    raise AttributeError(f"module 'slideformer' has no attribute {name!r}")
