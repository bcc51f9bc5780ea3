"""Where each parameter of a unit lives inside that unit's flat buffer."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from slideformer.models.config import ModelConfig


@dataclass(frozen=True)
class UnitLayout:
    names: tuple[str, ...]  # Hugging Face names
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    numel: int

    @classmethod
    def of(cls, shapes: dict[str, tuple[int, ...]]) -> UnitLayout:
        offsets, n = [], 0
        for s in shapes.values():
            offsets.append(n)
            n += math.prod(s)
        return cls(tuple(shapes), tuple(shapes.values()), tuple(offsets), n)

    def views(self, flat: torch.Tensor, short_names: bool = False) -> dict[str, torch.Tensor]:
        """Views of `flat` per parameter, keyed by full name or by the name inside the layer."""
        out = {}
        for name, shape, off in zip(self.names, self.shapes, self.offsets):
            key = name.split(".", 3)[3] if short_names and name.startswith("model.layers.") else name
            out[key] = flat[off : off + math.prod(shape)].view(shape)
        return out


def unit_layouts(cfg: ModelConfig) -> list[UnitLayout]:
    """Unit 0: embedding; 1..L: decoder layers; L+1: final norm and (untied) LM head."""
    layers = [
        UnitLayout.of({f"model.layers.{i}.{n}": s for n, s in cfg.layer_param_shapes().items()})
        for i in range(cfg.num_layers)
    ]
    return [UnitLayout.of(cfg.embed_param_shapes()), *layers, UnitLayout.of(cfg.head_param_shapes())]
