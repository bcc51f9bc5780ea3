"""Data-parallel ranks (torch.distributed): each rank runs the same plan's sliding window on its share of the
batch; every unit's gradient is summed across ranks on the device before its norm and update (a host unit's
shard by shard, each rank receiving the sum of its own shard, the only part it copies out and updates), and each
host unit's AdamW runs sharded: the ranks share one copy of the masters (and of the bf16 weights kept in RAM) in
shared host memory, each rank updates its slice in place and waits for the others before the unit is loaded
again, so the host optimizer's work and states are split between the ranks and the masters exist once.
Exact: the same AdamW as one process with the whole batch (AdamW is elementwise; only the order of the
gradient sums differs).

Two process groups keep each thread's collectives in one order on every rank: `step` for the issuing thread
(gradients, token counts, the loss, checkpoints) and `update` for the CPU optimizer's worker."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from slideformer.schedule.plan import shard_numel


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    step: Any  # process group of the issuing thread (the device's backend: gradients, counts, the loss)
    update: Any  # gloo group of the CPU optimizer's thread (host masters; checkpoints' states, engine idle)

    @classmethod
    def from_default_group(cls) -> Ranks:
        """The ranks of the initialised default process group (gloo on CPU devices, NCCL on GPUs)."""
        return cls(dist.get_rank(), dist.get_world_size(), dist.new_group(), dist.new_group(backend="gloo"))

    def shard(self, numel: int, rank: int | None = None) -> slice:
        """Rank `rank`'s (default: this one's) contiguous slice of a unit of `numel` parameters."""
        per = shard_numel(numel, self.world)
        r = self.rank if rank is None else rank
        return slice(min(r * per, numel), min((r + 1) * per, numel))

    def sum(self, tensor: torch.Tensor) -> None:
        """In place, the sum over ranks (issuing thread)."""
        dist.all_reduce(tensor, group=self.step)

    def sum_to_owners(self, flat: torch.Tensor) -> None:
        """In place, each rank's shard of `flat` (`shard`) summed over ranks into that rank's copy (issuing thread):
        a reduce-scatter that allows shards of unequal length; the other shards are left as they were."""
        for r in range(self.world):
            part = flat[self.shard(flat.numel(), r)]
            if part.numel():
                dist.reduce(part, dst=r, group=self.step)

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether `flag` is set on any rank (issuing thread), so that every rank takes the same branch."""
        t = torch.tensor(int(flag), device=device)
        self.sum(t)
        return bool(t)

    def barrier(self) -> None:
        """Every rank's CPU optimizer thread (or the issuing thread, engine idle) has reached this point."""
        dist.barrier(group=self.update)

    def shared_host_memory(self, nbytes: int) -> torch.Tensor:
        """`nbytes` of host memory every rank maps (an anonymous shared-memory file of the first rank's, so no
        /dev/shm size limit applies and nothing is left behind): the ranks' one copy of the masters."""
        fd = os.memfd_create("slideformer-shared", 0) if self.rank == 0 else -1
        if fd >= 0:
            os.ftruncate(fd, nbytes)
        path = [f"/proc/{os.getpid()}/fd/{fd}"]
        dist.broadcast_object_list(path, src=0, group=self.update)  # the first rank's path, to every rank
        memory = torch.from_file(path[0], shared=True, size=nbytes, dtype=torch.uint8)
        self.barrier()  # every rank has mapped it: the file itself can go
        if fd >= 0:
            os.close(fd)
        return memory

    def assemble(self, flat: torch.Tensor, group: Any) -> None:
        """Every rank's slice of `flat`, from its owner, into every rank's `flat`."""
        for r in range(self.world):
            part = flat[self.shard(flat.numel(), r)]
            if part.numel():
                dist.broadcast(part, src=r, group=group)
