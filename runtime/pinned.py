"""Page-locked host buffers registered in place.

PyTorch's pinned allocator rounds every buffer up to a power of two (a 0.87 GB layer of fp32 masters
costs 1 GiB); registering ordinary allocations with cudaHostRegister pins exactly what is used.
"""
from __future__ import annotations

import mmap
import math
import weakref

import torch

PAGE = mmap.PAGESIZE


class PinnedPool:
    """Allocates host tensors, page-locked on CUDA machines; unregisters them when the owner goes away."""

    def __init__(self, owner: object, pinned: bool) -> None:
        self.pinned = pinned
        self.registered: list[int] = []
        if pinned:
            weakref.finalize(owner, _unregister, self.registered)

    def empty(self, shape: int | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if not self.pinned:
            return torch.empty(shape, dtype=dtype)
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        nbytes = math.prod(shape) * dtype.itemsize
        span = -(-max(nbytes, 1) // PAGE) * PAGE  # whole pages, so no two buffers share a registered page
        raw = torch.empty(span + PAGE, dtype=torch.uint8)
        start = -raw.data_ptr() % PAGE
        err = torch.cuda.cudart().cudaHostRegister(raw.data_ptr() + start, span, 0)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister of {span} bytes failed ({err})")
        self.registered.append(raw.data_ptr() + start)
        return raw[start: start + nbytes].view(dtype).view(shape)


def _unregister(pointers: list[int]) -> None:
    cudart = torch.cuda.cudart()
    for p in pointers:
        cudart.cudaHostUnregister(p)
    pointers.clear()
