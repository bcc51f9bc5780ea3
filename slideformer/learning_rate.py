"""Learning-rate schedules: linear warmup, then cosine decay to a floor or constant."""

from __future__ import annotations

import math


def learning_rate(step: int, base: float, total: int, warmup: int, kind: str, min_ratio: float) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total`."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    if kind == "constant":
        return base
    progress = (step - warmup) / max(total - warmup - 1, 1)
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
