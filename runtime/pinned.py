"""Page-locked host memory as one registered arena.

PyTorch's pinned allocator rounds every buffer up to a power of two (a 0.87 GB layer of fp32 masters
costs 1 GiB). Instead the engine sizes all its pinned buffers up front, allocates them as one ordinary
buffer, page-locks it with a single cudaHostRegister before any worker thread starts, and hands out
page-aligned views.
"""

from __future__ import annotations

import math
import mmap
import threading
import weakref

import torch

PAGE = mmap.PAGESIZE


def page_round(nbytes: int) -> int:
    return -(-max(nbytes, 1) // PAGE) * PAGE


class PinnedArena:
    """`capacity` bytes of host memory (page-locked when `pinned`), carved into tensors by `take`: the process's
    own, or `memory` (at least capacity + one page) that other processes map too (`Ranks.shared_host_memory`)."""

    def __init__(self, owner: object, capacity: int, pinned: bool, memory: torch.Tensor | None = None) -> None:
        self.raw = torch.empty(capacity + PAGE, dtype=torch.uint8) if memory is None else memory
        assert self.raw.numel() >= capacity + PAGE, "the arena's memory is smaller than its capacity"
        self.offset = -self.raw.data_ptr() % PAGE
        self.end = self.offset + capacity
        self.lock = threading.Lock()
        if pinned and capacity:
            ptr = self.raw.data_ptr() + self.offset
            err = torch.cuda.cudart().cudaHostRegister(ptr, capacity, 0)
            if int(err) != 0:
                raise RuntimeError(f"page-locking {capacity / 2**30:.2f} GiB of host memory failed ({err})")
            weakref.finalize(owner, torch.cuda.cudart().cudaHostUnregister, ptr)

    def take(self, shape: int | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        nbytes = math.prod(shape) * dtype.itemsize
        with self.lock:
            start, self.offset = self.offset, self.offset + page_round(nbytes)
        if self.offset > self.end:
            raise RuntimeError("pinned arena overflow: the engine's buffer list and its sizing disagree")
        return self.raw[start : start + nbytes].view(dtype).view(shape)
