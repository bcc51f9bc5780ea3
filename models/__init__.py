"""Decoder-only transformer shapes and numerics: Llama 3.x, Qwen2/2.5, Qwen3, Mistral."""

from .config import PRESETS, ModelConfig, ModelConfigError, load_model_config
from .model import RandomWeights, Transformer, random_hf_state

__all__ = [
    "PRESETS",
    "ModelConfig",
    "ModelConfigError",
    "RandomWeights",
    "Transformer",
    "load_model_config",
    "random_hf_state",
]
