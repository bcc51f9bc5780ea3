"""What follows a unit's last gradient contribution: with several ranks the collectives (an all-reduce, or a
reduce-scatter to the ranks that update each shard), the squared norm, and the copy to the host buffer (bodies
the executor runs, one method per op kind)."""

from __future__ import annotations

from typing import Callable

import torch

from slideformer.models.config import ModelConfig
from slideformer.schedule.graph import transient_edge
from slideformer.schedule.op import OpKind
from slideformer.schedule.plan import Plan

from .buffers import StepBuffers
from .layout import UnitLayout
from .ranks import Ranks


class GradientOps:
    def __init__(
        self,
        cfg: ModelConfig,
        plan: Plan,
        layouts: list[UnitLayout],
        buffers: StepBuffers,
        device: torch.device,
        ranks: Ranks | None = None,
    ) -> None:
        self.plan, self.layouts, self.b, self.device, self.ranks = plan, layouts, buffers, device, ranks
        L = cfg.num_layers
        self.transient_grad = {u: transient_edge(cfg, plan, "grad", u) for u in (0, L + 1)}
        self.sq_norm = torch.zeros((), dtype=torch.float32, device=device)
        self.sq_norm_shards = torch.zeros((), dtype=torch.float32, device=device)  # this rank's shards' (ranks > 1)
        self.bodies: dict[OpKind, Callable[..., object]] = {
            OpKind.ALLREDUCE: self._allreduce,
            OpKind.REDUCE_SCATTER: self._reduce_scatter,
            OpKind.GRAD_OUT: self._grad_out,
        }

    def begin_step(self) -> None:
        self.sq_norm.zero_()
        self.sq_norm_shards.zero_()

    def gradient_done(self, unit: int) -> None:
        """A unit's gradient is complete: one rank's is the whole batch's, added to the norm now; several ranks'
        are summed first, by the unit's all-reduce op."""
        if self.plan.ranks == 1:
            self._add_to_norm(unit)

    def _allreduce(self, unit: int) -> None:
        """A GPU-updated unit's complete gradient summed over the data-parallel ranks, then the sum added to the
        norm."""
        assert self.ranks is not None, "an all-reduce op exists only in a plan of several ranks"
        self.ranks.sum(self.b.gpu_grad[unit][: self.layouts[unit].numel])
        self._add_to_norm(unit)
        self._collectives_done(unit)

    def _reduce_scatter(self, unit: int) -> None:
        """A host-updated unit's gradient: each rank gets the sum over ranks of its own shard (all its CPU
        AdamW updates), whose square goes into this rank's part of the norm."""
        assert self.ranks is not None, "a reduce-scatter op exists only in a plan of several ranks"
        g = self.b.gpu_grad[unit][: self.layouts[unit].numel]
        self.ranks.sum_to_owners(g)
        shard = g[self.ranks.shard(g.numel())]
        self.sq_norm_shards += torch.dot(shard, shard)
        self._collectives_done(unit)

    def _collectives_done(self, unit: int) -> None:
        """After the step's last collective (the embedding's: its gradient completes last), the ranks' shard
        norms summed into the step's norm, so every rank reads the whole batch's."""
        if unit == 0:
            assert self.ranks is not None
            self.ranks.sum(self.sq_norm_shards)
            self.sq_norm += self.sq_norm_shards

    def _add_to_norm(self, unit: int) -> None:
        """The unit's squared gradient into the step's squared norm (once per unit and step)."""
        self.sq_norm += squared_norm(self.b.gpu_grad[unit][: self.layouts[unit].numel])

    def _grad_out(self, unit: int) -> None:
        """The unit's gradient to its host buffer: with several ranks, this rank's shard of it."""
        n = self.layouts[unit].numel
        part = slice(0, n) if self.ranks is None else self.ranks.shard(n)
        self.b.host_grad[unit][part].copy_(self.b.gpu_grad[unit][part], non_blocking=True)
        self.release_grad(unit)

    def release_grad(self, unit: int) -> None:
        """An edge's transient gradient: free for reuse once the work queued on this stream with it is done (its
        copy to the host, or a streamed update's last piece)."""
        if self.transient_grad.get(unit, False):
            if self.device.type == "cuda":
                self.b.gpu_grad[unit].record_stream(torch.cuda.current_stream(self.device))
            self.b.gpu_grad[unit] = torch.empty(0)


def squared_norm(g: torch.Tensor) -> torch.Tensor:
    """The squared 2-norm of an fp32 or bf16 gradient, summed in fp32 (a bf16 one under
    `Plan.bf16_layer_grads`) without an fp32 copy of it on the GPU."""
    if g.dtype == torch.float32:
        return torch.dot(g, g)
    if g.is_cuda:  # the reduction reads bf16 and accumulates in fp32
        return torch.linalg.vector_norm(g, dtype=torch.float32).square()
    # the CPU's reduction would copy the whole tensor to fp32 first: in bounded pieces instead
    return sum((torch.dot(p, p) for p in (piece.float() for piece in g.split(1 << 22))), torch.zeros(()))
