"""A unit's fp32 master weights and AdamW state, wherever its placement keeps them.

- `Unit`: on the host (pinned master, torch's fused CPU AdamW; with bf16 weights in RAM, the one-pass AdamW +
  cast of `kernels.host_adamw`) or on the GPU (torch's fused GPU AdamW);
- `StreamedUnit`: master and states pinned on the host, updated on the GPU piece by piece (`ops.StepOps`);
- `DiskUnit`: master and states in the disk tier, updated by the one-pass CPU AdamW + cast in a ring buffer.
Streamed and disk units keep bf16 weights in RAM for the GPU's loads, host units too under
`Plan.host_bf16_weights`; units with no such copy stream their master, cast on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from slideformer.kernels import host_adamw

from .layout import UnitLayout
from .ranks import Ranks


class WeightSource(Protocol):
    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor: ...


@dataclass
class AdamWConfig:
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = None  # needs plan.update == 'after_norm'
    skip_nonfinite: bool = False  # a step whose gradient norm is not finite updates nothing (needs 'after_norm')

    def optimizer(self, param: torch.nn.Parameter) -> torch.optim.AdamW:
        return torch.optim.AdamW(
            [param], lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay, fused=True
        )


def adamw_step(
    optimizer: torch.optim.AdamW,
    param: torch.nn.Parameter,
    grad: torch.Tensor,
    clip_coef: torch.Tensor | float | None,
    lr: float,
) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
    if clip_coef is not None:
        grad.mul_(clip_coef)
    param.grad = grad
    optimizer.step()
    param.grad = None


def adamw_step_and_cast(
    optimizer: torch.optim.AdamW,
    param: torch.nn.Parameter,
    grad: torch.Tensor,
    clip_coef: torch.Tensor | float | None,
    lr: float,
    weights: torch.Tensor,
) -> None:
    """`adamw_step` on a host parameter, and its bf16 `weights` cast from the new value in the same pass over
    memory (`kernels.host_adamw`, which also scales the gradient, fp32 or bf16, by the clip coefficient in fp32);
    the optimizer's state is kept as its own step would keep it."""
    state = optimizer.state[param]
    if not state:  # as torch.optim.AdamW(fused=True) creates it
        state.update(
            step=torch.zeros((), dtype=torch.float32),
            exp_avg=torch.zeros_like(param, memory_format=torch.preserve_format),
            exp_avg_sq=torch.zeros_like(param, memory_format=torch.preserve_format),
        )
    state["step"] += 1
    group = optimizer.param_groups[0]
    group["lr"] = lr
    host_adamw.adamw_and_cast(
        param.detach(),
        grad,
        state["exp_avg"],
        state["exp_avg_sq"],
        weights,
        int(state["step"].item()),
        lr,
        group["betas"][0],
        group["betas"][1],
        group["eps"],
        group["weight_decay"],
        None if clip_coef is None else float(clip_coef),
    )


def fill_from(source: WeightSource, layout: UnitLayout, flat: torch.Tensor) -> None:
    for name, view in layout.views(flat).items():
        view.copy_(source.get(name))


class Unit:
    """fp32 master weights and AdamW state on the host (`master` pinned) or on the GPU (`on_gpu`); a host unit
    may keep bf16 `weights` in RAM too (`Plan.host_bf16_weights`), cast from the master after every update, for
    the GPU's loads (without them, loads stream and cast the master)."""

    ONE_PASS = True  # whether a host unit with bf16 weights casts them in its update's pass

    def __init__(
        self,
        layout: UnitLayout,
        source: WeightSource,
        master: torch.Tensor,
        optim: AdamWConfig,
        on_gpu: bool,
        weights: torch.Tensor | None = None,
        fill: bool = True,
    ) -> None:
        """`fill`: write the initial weights into `master` (and `weights`); not where another process does."""
        self.layout = layout
        self.on_gpu = on_gpu  # placed on the GPU (on a CPU device, the plan's 'gpu' units are updated in place too)
        self.weights = weights
        self.master = torch.nn.Parameter(master)
        self.optimizer = optim.optimizer(self.master)
        if self.casts_in_update:
            host_adamw.prepare()
        if fill:
            on_host = master if master.device.type == "cpu" else torch.empty(layout.numel, dtype=torch.float32)
            fill_from(source, layout, on_host)
            if on_host is not master:  # filled on the host, then copied over whole
                master.copy_(on_host)
            self.refresh_weights()

    @property
    def casts_in_update(self) -> bool:
        """Its step writes the bf16 weights in RAM in the update's own pass (`kernels.host_adamw`)."""
        return self.ONE_PASS and self.weights is not None and not self.on_gpu

    def refresh_weights(self) -> None:
        """The bf16 weights in RAM, from the master (after an update or a restore)."""
        if self.weights is not None:
            self.weights.copy_(self.master.detach())

    def step(self, grad: torch.Tensor, clip_coef: torch.Tensor | float | None, lr: float) -> None:
        weights = self.weights if self.casts_in_update else None
        if weights is not None:
            adamw_step_and_cast(self.optimizer, self.master, grad, clip_coef, lr, weights)
        else:
            adamw_step(self.optimizer, self.master, grad, clip_coef, lr)
            self.refresh_weights()

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        return self.optimizer.state.get(self.master, {})

    def load_optimizer_state(self, state: dict[str, torch.Tensor]) -> None:
        self.optimizer.state[self.master] = state


class ShardedUnit(Unit):
    """A host unit of data-parallel ranks: the ranks share one master (and bf16 weights) in shared host memory;
    this rank's AdamW updates its slice of it in place (states for the slice only), casts that slice's bf16
    weights, and waits for every rank to have done the same; the first rank writes the initial weights."""

    ONE_PASS = False  # it casts its slice in a second pass, so it compiles no one-pass update

    def __init__(
        self,
        layout: UnitLayout,
        source: WeightSource,
        master: torch.Tensor,
        optim: AdamWConfig,
        ranks: Ranks,
        weights: torch.Tensor | None = None,
    ) -> None:
        super().__init__(layout, source, master, optim, on_gpu=False, weights=weights, fill=ranks.rank == 0)
        self.ranks, self.shard = ranks, ranks.shard(layout.numel)
        self.param = torch.nn.Parameter(master[self.shard])  # a view: updates land in the master
        self.optimizer = optim.optimizer(self.param)  # AdamW states for this rank's slice only

    def step(self, grad: torch.Tensor, clip_coef: torch.Tensor | float | None, lr: float) -> None:
        adamw_step(self.optimizer, self.param, grad[self.shard], clip_coef, lr)
        if self.weights is not None:
            self.weights[self.shard].copy_(self.master.detach()[self.shard])
        self.ranks.barrier()  # every slice is updated before any rank loads the unit again

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """The whole unit's states (every rank's slices, gathered on the issuing thread: engine idle)."""
        state = self.optimizer.state.get(self.param, {})
        if not state:
            return {}
        out = {"step": state["step"]}
        for key in ("exp_avg", "exp_avg_sq"):
            full = torch.zeros(self.layout.numel, dtype=torch.float32)
            full[self.shard] = state[key]
            self.ranks.assemble(full, self.ranks.update)
            out[key] = full
        return out

    def load_optimizer_state(self, state: dict[str, torch.Tensor]) -> None:
        """From the whole unit's states (a checkpoint of any number of ranks)."""
        self.optimizer.state[self.param] = {k: (v if k == "step" else v[self.shard].clone()) for k, v in state.items()}


class StreamedUnit:
    """A decoder layer (or the embedding) whose fp32 master and AdamW states stay in pinned host memory and are
    updated on the GPU piece by piece; the host also keeps its bf16 weights, rewritten by every update, for the
    GPU's loads."""

    on_gpu = False

    def __init__(
        self,
        layout: UnitLayout,
        source: WeightSource,
        master: torch.Tensor,
        exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor,
        weights: torch.Tensor,
        device: torch.device,
    ) -> None:
        self.layout = layout
        self.master, self.exp_avg, self.exp_avg_sq, self.weights = master, exp_avg.zero_(), exp_avg_sq.zero_(), weights
        fill_from(source, layout, master)
        weights.copy_(master)
        self.steps = torch.zeros((), dtype=torch.float32, device=device)  # where the fused kernel reads it

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        return {"step": self.steps, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def load_optimizer_state(self, state: dict[str, torch.Tensor]) -> None:
        self.steps.copy_(state.get("step", torch.zeros(())))
        for key in ("exp_avg", "exp_avg_sq"):
            getattr(self, key).copy_(state[key]) if key in state else getattr(self, key).zero_()
        self.weights.copy_(self.master)


class DiskUnit:
    """A decoder layer whose fp32 master weights and AdamW state live in the disk tier; the host keeps its
    bf16 weights (pinned), refreshed by every update, for the GPU's loads."""

    on_gpu = False

    def __init__(self, layout: UnitLayout, weights: torch.Tensor, optim: AdamWConfig) -> None:
        self.layout = layout
        self.weights = weights
        self.param = torch.nn.Parameter(torch.empty(0))
        self.optimizer = optim.optimizer(self.param)
        self.steps = torch.zeros((), dtype=torch.float32)  # AdamW's step count, kept in RAM
        host_adamw.prepare()

    def states(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Master, exp_avg and exp_avg_sq as views of a tier buffer (the file's layout)."""
        n = self.layout.numel
        return buf[: 12 * n].view(torch.float32).split(n)

    def step(self, buf: torch.Tensor, grad: torch.Tensor, clip_coef: float | None, lr: float) -> None:
        master, exp_avg, exp_avg_sq = self.states(buf)
        self.param.data = master
        self.optimizer.state[self.param] = {"step": self.steps, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
        adamw_step_and_cast(self.optimizer, self.param, grad, clip_coef, lr, self.weights)
        self.param.data = torch.empty(0)
