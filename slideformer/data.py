"""Synthetic training data: random tokens whose label is the next token (benchmarks and plan smoke runs)."""

from __future__ import annotations

import torch

from slideformer.kernels import IGNORE_INDEX


def random_next_token_batch(vocab: int, batch: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [batch, seq] and labels with labels[:, t] = input_ids[:, t+1]; the last position is ignored."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    return ids, labels
