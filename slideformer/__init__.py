"""SlideFormer: full-parameter mixed-precision fine-tuning of LLMs larger than one GPU's memory.

The Python API (see `slideformer.api`): `slideformer.finetune(config, dataset=rows, **settings)`,
`slideformer.train(config, **overrides)`, `slideformer.plan(model, seq, batch, ...)` and
`slideformer.simulate(plan, profile)`; `slideformer.TrainConfig` is the training config and
`slideformer.Plan` a plan.
"""

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
