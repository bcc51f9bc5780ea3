"""Decoder-only transformer shapes and numerics: our own for Llama 3.x, Qwen2/2.5, Qwen3 and Mistral (`layers.py`),
any other Hugging Face decoder through its own modules (`hf_decoder.py`)."""

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
