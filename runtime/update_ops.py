"""What the updates' and the disk tier's ops do: the CPU or GPU AdamW on a unit, the global norm, a streamed
update's pieces in, updated and out, and the disk tier's reads and writes (bodies the executor runs, one
method per op kind)."""

from __future__ import annotations

import math
from concurrent.futures import Future
from typing import Callable

import torch

from slideformer.schedule.op import OpKind
from slideformer.schedule.plan import Plan

from .buffers import StepBuffers
from .disk import DiskTier
from .layout import UnitLayout
from .units import AdamWConfig, DiskUnit, StreamedUnit, Unit


class UpdateOps:
    def __init__(
        self,
        plan: Plan,
        layouts: list[UnitLayout],
        units: list[Unit | StreamedUnit | DiskUnit],
        buffers: StepBuffers,
        optim: AdamWConfig,
        tier: DiskTier | None,
        disk_slot: dict[int, int],
        sq_norm: torch.Tensor,
        release_grad: Callable[[int], None],
    ) -> None:
        """`sq_norm`: the step's squared gradient norm, which the backward's ops accumulate; `release_grad(unit)`
        gives a transient gradient back (`GradientOps.release_grad`) once a streamed update has read all of it."""
        self.plan, self.layouts, self.units, self.b = plan, layouts, units, buffers
        self.optim, self.tier, self.disk_slot, self.sq_norm = optim, tier, disk_slot, sq_norm
        self.release_grad = release_grad
        self.master_slot = plan.streamed_master_slot  # {master-loading unit: its GPU master slot}
        self.bodies: dict[OpKind, Callable[..., object]] = {
            OpKind.UPDATE: self._update,
            OpKind.NORM: self._norm,
            OpKind.STATE_IN: self._state_in,
            OpKind.STATE_UPDATE: self._state_update,
            OpKind.STATE_OUT: self._state_out,
            OpKind.DISK_READ: self._disk_read,
            OpKind.DISK_WRITE: self._disk_write,
            OpKind.ACT_WRITE: self._act_write,
            OpKind.ACT_READ: self._act_read,
        }

    def _norm(self) -> tuple[float, torch.Tensor | None]:
        """The global gradient norm, and torch's clip coefficient min(1, max_norm / (norm + 1e-6))."""
        norm = self.sq_norm.sqrt()
        clip = None
        if self.optim.max_grad_norm is not None:
            clip = torch.clamp(self.optim.max_grad_norm / (norm + 1e-6), max=1.0)
        return float(norm), clip

    def _update(self, unit: int, norm: Future | None, lr: float) -> None:
        """AdamW on one unit: on the CPU worker for host units, on the compute stream for GPU units."""
        n = self.layouts[unit].numel
        u = self.units[unit]
        assert not isinstance(u, StreamedUnit), "streamed units are updated piece by piece (_state_update)"
        grad = (self.b.gpu_grad[unit] if u.on_gpu else self.b.host_grad[unit])[:n]
        if self.optim.skip_nonfinite and norm is not None and not math.isfinite(norm.result()[0]):
            return
        clip = norm.result()[1] if norm is not None else None
        clip = float(clip) if clip is not None and not u.on_gpu else clip
        if isinstance(u, DiskUnit):
            u.step(self.b.disk_ring[self.disk_slot[unit]], grad, clip, lr)
        else:
            u.step(grad, clip, lr)

    def _piece(self, unit: int, piece: int) -> tuple[StreamedUnit, slice]:
        """A streamed unit and the parameters of one of its pieces."""
        u, step = self.units[unit], self.plan.state_piece_numel
        assert isinstance(u, StreamedUnit), f"unit {unit} is not streamed"
        return u, slice(piece * step, min((piece + 1) * step, self.layouts[unit].numel))

    def _master(self, unit: int, rows: slice, slot: int) -> torch.Tensor:
        """Where a piece's master is updated on the GPU: in the unit's master slot, where its backward loaded it
        (`Plan.streamed_master_slot`), else in the piece's state slot."""
        if unit in self.master_slot:
            return self.b.master_slots[self.master_slot[unit]][rows]
        return self.b.state_slots[slot][0][0, : rows.stop - rows.start]

    def _state_in(self, unit: int, piece: int, slot: int) -> None:
        """A streamed unit's AdamW states (and master, unless its backward loaded it), one piece, into a GPU
        slot."""
        u, rows = self._piece(unit, piece)
        n = rows.stop - rows.start
        states = self.b.state_slots[slot][0]
        for k, src in enumerate((u.master, u.exp_avg, u.exp_avg_sq)):
            if k or unit not in self.master_slot:
                states[k, :n].copy_(src[rows], non_blocking=True)

    def _state_update(self, unit: int, piece: int, slot: int, lr: float) -> None:
        """torch.optim.AdamW's fused step (the same kernel, so the same maths) on one piece, and its bf16 cast.
        The step count goes up once per unit, before its first piece, as the optimizer's own step does."""
        (u, rows), o = self._piece(unit, piece), self.optim
        n = rows.stop - rows.start
        states, weights = self.b.state_slots[slot]
        master, (exp_avg, exp_avg_sq) = self._master(unit, rows, slot), states[1:, :n]
        if piece == 0:
            u.steps += 1
        grad = self.b.gpu_grad[unit][rows]
        if grad.dtype != torch.float32:  # a bf16 layer gradient (`Plan.bf16_layer_grads`): the same values in fp32
            assert self.b.state_grad is not None
            grad = self.b.state_grad[:n].copy_(grad)
        torch._fused_adamw_(
            [master],
            [grad],
            [exp_avg],
            [exp_avg_sq],
            [],
            [u.steps],
            lr=lr,
            beta1=o.betas[0],
            beta2=o.betas[1],
            weight_decay=o.weight_decay,
            eps=o.eps,
            amsgrad=False,
            maximize=False,
        )
        weights[:n].copy_(master)
        if rows.stop == self.layouts[unit].numel:
            self.release_grad(unit)

    def _state_out(self, unit: int, piece: int, slot: int) -> None:
        """The updated piece back to the host: master, states and the bf16 weights the unit's loads read."""
        u, rows = self._piece(unit, piece)
        n = rows.stop - rows.start
        states, weights = self.b.state_slots[slot]
        u.master[rows].copy_(self._master(unit, rows, slot), non_blocking=True)
        for k, dst in enumerate((u.exp_avg, u.exp_avg_sq)):
            dst[rows].copy_(states[k + 1, :n], non_blocking=True)
        u.weights[rows].copy_(weights[:n], non_blocking=True)

    def _disk(self) -> DiskTier:
        assert self.tier is not None, "disk ops come only with a disk tier"
        return self.tier

    def _disk_read(self, unit: int, slot: int) -> None:
        self._disk().read(f"unit{unit}", self.b.disk_ring[slot])

    def _disk_write(self, unit: int, slot: int) -> None:
        self._disk().write(f"unit{unit}", self.b.disk_ring[slot])

    def _act_write(self, layer: int, slot: int) -> None:
        self._disk().write(f"act{layer}", self.b.act_ring[slot])

    def _act_read(self, layer: int, slot: int) -> None:
        self._disk().read(f"act{layer}", self.b.act_ring[slot])
