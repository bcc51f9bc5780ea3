"""SlideFormer: full-parameter mixed-precision fine-tuning of LLMs larger than one GPU's memory.

The Python API (see `slideformer.api`): `slideformer.train(config, **overrides)` and
`slideformer.plan(model, seq, batch, ...)`; `slideformer.TrainConfig` is the training config.
"""
__version__ = "0.1.0"
__all__ = ["TrainConfig", "plan", "train"]


def __getattr__(name: str):
    # Imported on first use: `import slideformer.kernels` and the CLI's start stay light.
    if name in ("train", "plan"):
        from slideformer import api
        return getattr(api, name)
    if name == "TrainConfig":
        from slideformer.train_config import TrainConfig
        return TrainConfig
    raise AttributeError(f"module 'slideformer' has no attribute {name!r}")
