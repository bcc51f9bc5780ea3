"""Every unit's state in and out, whatever its placement: checkpoints (`training_state`, `load_training_state`),
Hugging Face weights (`hf_state`) and the disk tier's unit files."""

from __future__ import annotations

from typing import Callable

import torch

from slideformer.schedule.plan import Plan

from .buffers import StepBuffers
from .disk import DeferredTensor, DiskTier
from .executor import GraphExecutor
from .units import DiskUnit, StreamedUnit, Unit


class UnitStates:
    def __init__(
        self,
        plan: Plan,
        units: list[Unit | StreamedUnit | DiskUnit],
        buffers: StepBuffers,
        tier: DiskTier | None,
        executor: GraphExecutor,
        device: torch.device,
    ) -> None:
        self.plan, self.units, self.b, self.tier, self.executor, self.device = (
            plan,
            units,
            buffers,
            tier,
            executor,
            device,
        )

    def _disk_unit(self, unit: int) -> tuple[DiskUnit, DiskTier]:
        u = self.units[unit]
        assert isinstance(u, DiskUnit) and self.tier is not None, f"unit {unit} is not in the disk tier"
        return u, self.tier

    def write_disk_unit(self, unit: int, fill: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]) -> None:
        """`fill(master, exp_avg, exp_avg_sq)` a ring buffer with a disk unit's state, refresh its bf16 weights
        and queue the write on the disk worker (ring buffers alternate, so filling overlaps writing)."""
        k = self.plan.disk_units.index(unit) % len(self.b.disk_ring)
        self.executor.wait_disk_write(k)
        buf = self.b.disk_ring[k]
        u, tier = self._disk_unit(unit)
        master, exp_avg, exp_avg_sq = u.states(buf)
        fill(master, exp_avg, exp_avg_sq)
        u.weights.copy_(master)
        self.executor.submit_disk_write(k, lambda: tier.write(f"unit{unit}", buf))

    def read_disk_unit(self, unit: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A disk unit's (master, exp_avg, exp_avg_sq), read into the first ring buffer (engine idle);
        valid until the next read."""
        u, tier = self._disk_unit(unit)
        tier.read(f"unit{unit}", self.b.disk_ring[0])
        return u.states(self.b.disk_ring[0])

    def training_state(self) -> dict[str, torch.Tensor | DeferredTensor]:
        """fp32 master weights and AdamW states of every unit, for checkpoints (engine idle). Host units are
        returned without copying (views of the live state) and disk units as deferred reads, one unit at a time:
        write them out, in order, before the next step."""
        out: dict[str, torch.Tensor | DeferredTensor] = {}
        for u, unit in enumerate(self.units):
            if isinstance(unit, DiskUnit):
                out[f"unit{u}.step"] = unit.steps.reshape(-1)
                for i, key in enumerate(("master", "exp_avg", "exp_avg_sq")):
                    # master triggers the read; the two states are views of the same buffer, written next
                    load = (
                        (lambda u=u: self.read_disk_unit(u)[0])
                        if i == 0
                        else (lambda unit=unit, i=i: unit.states(self.b.disk_ring[0])[i])
                    )
                    out[f"unit{u}.{key}"] = DeferredTensor((unit.layout.numel,), torch.float32, load)
                continue
            out[f"unit{u}.master"] = unit.master.detach().cpu()
            for key, value in unit.optimizer_state().items():
                out[f"unit{u}.{key}"] = value.detach().cpu().reshape(-1)
        return out

    def load_training_state(self, get: Callable[[str], torch.Tensor], names: set[str]) -> None:
        """Restore what training_state saved; `get(name)` returns one tensor at a time."""
        for u, unit in enumerate(self.units):
            if isinstance(unit, DiskUnit):
                unit.steps.copy_(get(f"unit{u}.step").reshape(()))

                def fill(master, exp_avg, exp_avg_sq, u=u):
                    for key, view in (("master", master), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
                        view.copy_(get(f"unit{u}.{key}"))

                self.write_disk_unit(u, fill)
                continue
            unit.master.detach().copy_(get(f"unit{u}.master"))
            if isinstance(unit, Unit):
                unit.refresh_weights()
            state = {
                key: get(f"unit{u}.{key}").to(unit.master.device).reshape(() if key == "step" else -1)
                for key in ("step", "exp_avg", "exp_avg_sq")
                if f"unit{u}.{key}" in names
            }
            if state or isinstance(unit, StreamedUnit):
                unit.load_optimizer_state(state)
        self.executor.wait_all()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.executor.forget_previous_step()

    def hf_state(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Master weights under Hugging Face names (host copies, in `dtype`; in bf16, disk units' come from
        their bf16 weights in RAM, which are exactly their rounded masters)."""
        out: dict[str, torch.Tensor] = {}
        for u, unit in enumerate(self.units):
            layout = unit.layout
            if isinstance(unit, DiskUnit):
                flat = unit.weights if dtype == unit.weights.dtype else self.read_disk_unit(u)[0]
            else:
                flat = unit.master.detach()
            out |= {k: v.to("cpu", dtype, copy=True) for k, v in layout.views(flat).items()}
        return out
