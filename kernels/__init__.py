"""Triton kernels for the step's bottlenecks, each with its backward, and the switch that turns them on.

On CUDA the model's layers and the LM-head loss use them by default (`SLIDEFORMER_KERNELS=0` turns them
off); the plain PyTorch code in `models/layers.py` and `models/loss.py` stays the reference and the CPU
path. They round once in fp32 where eager bf16 rounds every op, so training with them is checked to stay
no farther from an fp32 loop than eager bf16 is. Tests run the kernels on the CPU through `TRITON_INTERPRET=1`.
`host_adamw` is the one host kernel: the CPU AdamW that writes bf16 weights in its own pass.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

IGNORE_INDEX = -100  # the label of a token that is no target (Hugging Face's convention)

_enabled = os.environ.get("SLIDEFORMER_KERNELS", "1") != "0"
_forced_on_cpu = False


def active(x: torch.Tensor) -> bool:
    """Whether ops on `x` take the Triton path: enabled, and on CUDA (or forced on CPU by the interpreter)."""
    return _enabled and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1" and _forced_on_cpu)


@contextlib.contextmanager
def use(enabled: bool, on_cpu: bool = False) -> Iterator[None]:
    """Turn the kernels on or off within a block (the reference loop runs with them off);
    `on_cpu` also routes CPU tensors to them, for interpreter tests."""
    global _enabled, _forced_on_cpu
    saved = _enabled, _forced_on_cpu
    _enabled, _forced_on_cpu = enabled, on_cpu
    try:
        yield
    finally:
        _enabled, _forced_on_cpu = saved
