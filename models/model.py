"""A plain `nn.Module` transformer over the same layer functions: the reference the runtime is tested against."""

from __future__ import annotations

import zlib

import torch
from torch import nn

from .config import ModelConfig
from .layers import TokenPositions, decoder_layer, head_logits, token_positions

INIT_STD = 0.02


def init_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Random init in fp32: norms at one, biases at zero, matrices N(0, 0.02)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    return torch.empty(shape).normal_(0.0, INIT_STD, generator=generator)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.names = list(cfg.layer_param_shapes())
        # ParameterDict cannot hold dotted names; keep a flat list in declared order.
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(s)) for s in cfg.layer_param_shapes().values())

    def params(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.weights))

    def forward(self, x: torch.Tensor, pos: TokenPositions) -> torch.Tensor:
        return decoder_layer(self.params(), x, pos.cos, pos.sin, self.cfg, pos.spans)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.empty(cfg.hidden_size))
        self.lm_head = None if cfg.tie_word_embeddings else nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))

    def named_hf_parameters(self) -> dict[str, torch.Tensor]:
        """Every parameter under its Hugging Face name."""
        out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": self.embed, "model.norm.weight": self.norm}
        for i, layer in enumerate(self.layers):
            assert isinstance(layer, DecoderLayer)
            out |= {f"model.layers.{i}.{n}": p for n, p in layer.params().items()}
        if self.lm_head is not None:
            out["lm_head.weight"] = self.lm_head
        return out

    @torch.no_grad()
    def load_hf_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, p in self.named_hf_parameters().items():
            p.copy_(tensors[name])

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, S, vocab]; `positions` (packed rows) each token's position in its sample, attention within
        each sample."""
        x = self.embed[input_ids]
        pos = token_positions(self.cfg, positions, input_ids.shape[1], x.device, x.dtype)
        for layer in self.layers:
            x = layer(x, pos)
        head = self.embed if self.lm_head is None else self.lm_head
        return head_logits(self.norm, head, x, self.cfg.rms_norm_eps)


class RandomWeights:
    """Deterministic random weights, each tensor seeded by its own name so units can be built in any order."""

    def __init__(self, cfg: ModelConfig, seed: int = 0) -> None:
        self.cfg, self.seed = cfg, seed
        self.shapes = hf_param_shapes(cfg)

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return init_tensor(name, self.shapes[name], g).to(dtype)


def hf_param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    shapes = dict(cfg.embed_param_shapes())
    for i in range(cfg.num_layers):
        shapes |= {f"model.layers.{i}.{n}": s for n, s in cfg.layer_param_shapes().items()}
    return shapes | cfg.head_param_shapes()


def random_hf_state(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random fp32 weights for every parameter, under Hugging Face names."""
    src = RandomWeights(cfg, seed)
    return {n: src.get(n) for n in src.shapes}
