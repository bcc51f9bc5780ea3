"""The sliding-window engine: trains a model under a Plan, one optimizer step at a time.

The GPU holds a window of decoder layers in pre-allocated bf16 slots, streamed in from fp32 master weights
in pinned host memory (cast on the GPU) or from bf16 copies kept in RAM; activations are offloaded,
recomputed or kept per the plan; fp32 gradients come back into pinned host buffers where a fused AdamW
updates master weights and states layer by layer while the GPU works on. Layers placed on disk keep their
master weights and states in the disk tier (read ahead, written behind by a disk worker); streamed layers
pass theirs through GPU slots in pieces after their backward for a fused AdamW there.

The pieces, in the order a step meets them: the plan's buffers (`buffers.StepBuffers`), its units' state
(`units`), the graph's executor (`executor.GraphExecutor`, the simulator's twin) and the bodies of the ops it
runs (`ops.StepOps`, `gradient_ops.GradientOps`, `update_ops.UpdateOps`); `unit_state` saves and restores
every unit's state; `evaluation` runs the forward alone.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from slideformer.models.config import GENERIC, ModelConfig
from slideformer.schedule.graph import build_step_graph
from slideformer.schedule.memory import GiB, describe, gpu_bytes, saved_input_bytes
from slideformer.schedule.plan import Plan, PlanError

from .buffers import StepBuffers
from .disk import DeferredTensor, DiskTier
from .evaluation import eval_loss
from .executor import GraphExecutor
from .layout import unit_layouts
from slideformer.kernels import IGNORE_INDEX, host_adamw
from .gradient_ops import GradientOps
from .ops import StepOps
from .trace import OpTrace
from .unit_state import UnitStates
from .update_ops import UpdateOps
from .ranks import Ranks
from .units import AdamWConfig, DiskUnit, ShardedUnit, StreamedUnit, Unit, WeightSource

__all__ = ["AdamWConfig", "Engine", "StepResult", "WeightSource"]


def check_chunk_starts(positions: torch.Tensor | None, chunk: int) -> None:
    """A sample may run on from one row into the next only inside a chunk (which a layer computes at once)."""
    if positions is not None and bool((positions[::chunk, 0] != 0).any()):
        raise ValueError(
            f"a chunk's first row continues a sample from the row before: padding-free bins are the plan's chunk "
            f"of {chunk} rows (to_sequences(..., packing='padding_free', chunk={chunk}))"
        )


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    tokens: int


class Engine:
    def __init__(
        self,
        cfg: ModelConfig,
        plan: Plan,
        source: WeightSource,
        optim: AdamWConfig | None = None,
        gpu_budget_bytes: int | None = None,
        disk_dir: str | None = None,
        disk_io: str = "auto",
        ranks: Ranks | None = None,
    ) -> None:
        """`disk_dir`: the disk tier's directory, needed when the plan places layers on disk; `disk_io`:
        'auto' (kvikio when installed), 'kvikio' or 'posix'; `ranks`: this process's data-parallel ranks (each
        trains `plan.batch` sequences of every step; `ranks.py`)."""
        plan.validate(cfg.num_layers)  # with several ranks: no disk or streamed units, no disk activations
        processes = ranks.world if ranks else 1
        if processes != plan.ranks:  # the graph has an all-reduce per unit exactly when the plan has ranks
            raise PlanError(
                f"plan.ranks {plan.ranks} does not match the {processes} processes of the run; make the plan for "
                f"ranks {processes}"
            )
        if plan.transient_head_grad and cfg.tie_word_embeddings:
            raise PlanError("transient_head_grad needs an untied head (a tied one shares the embedding's gradient)")
        if (plan.seq_tile_tokens or plan.saved_attention or plan.resident_attention) and cfg.family == GENERIC:
            raise PlanError(
                "seq_tile_tokens, saved_attention and resident_attention run our own numerics' layers; an "
                "architecture run through its own modules takes 0 for each"
            )
        self.ranks = ranks
        if (plan.disk_units or "disk" in plan.activations) and disk_dir is None:
            raise PlanError("the plan keeps layers' states or activations on disk: give a disk directory")
        self.optim = optim or AdamWConfig()
        self.lr = self.optim.lr
        if (self.optim.max_grad_norm is not None or self.optim.skip_nonfinite) and plan.update != "after_norm":
            raise PlanError(
                "gradient clipping and skipping non-finite steps need the global norm before any update: "
                "use update='after_norm'"
            )
        self.device = torch.device(plan.device)
        if self.device.type == "cuda":
            need = gpu_bytes(cfg, plan)
            budget = gpu_budget_bytes if gpu_budget_bytes is not None else torch.cuda.mem_get_info(self.device)[0]
            if sum(need.values()) > budget:
                raise PlanError(
                    f"plan does not fit the GPU: needs {describe(need)}, budget {budget / GiB:.2f} GiB; "
                    f"lower chunk ({plan.chunk}), window ({plan.window}), mlp_tile_tokens, loss_chunk_tokens or seq_tile_tokens"
                )
        self.cfg, self.plan = cfg, plan
        self.compute_dtype = getattr(torch, plan.compute_dtype)
        self.graph = build_step_graph(cfg, plan)
        self.layouts = unit_layouts(cfg)
        # Opening the tier checks the directory and preallocates its files: before any GPU memory is taken.
        files = {f"unit{u}": 12 * self.layouts[u].numel for u in plan.disk_units} | {
            f"act{lay}": saved_input_bytes(cfg, plan) for lay, p in enumerate(plan.activations) if p == "disk"
        }
        self.tier = DiskTier(disk_dir, files, disk_io) if files and disk_dir is not None else None
        self.buffers = StepBuffers(self, cfg, plan, self.layouts, self.device, self.compute_dtype, ranks)
        self.units = self._make_units(source)
        if plan.bf16_layer_grads and any(plan.host_updated(u) for u in range(1, cfg.num_layers + 1)):
            host_adamw.prepare(torch.bfloat16)  # the CPU AdamW for bf16 gradients, compiled before the first step
        if ranks is not None:  # the first rank has written the shared masters' initial weights
            ranks.barrier()
        self.grads = GradientOps(cfg, plan, self.layouts, self.buffers, self.device, ranks)
        self.ops = StepOps(cfg, plan, self.layouts, self.units, self.buffers, self.device, self.grads)
        updates = UpdateOps(
            plan,
            self.layouts,
            self.units,
            self.buffers,
            self.optim,
            self.tier,
            self.graph.graph["disk_slot"],
            self.grads.sq_norm,
            self.grads.release_grad,
        )
        self.executor = GraphExecutor(self.graph, self.ops.bodies | self.grads.bodies | updates.bodies, self.device)
        self.states = UnitStates(plan, self.units, self.buffers, self.tier, self.executor, self.device)
        for u in plan.disk_units:  # initial states to disk

            def fill(master: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, u: int = u) -> None:
                for name, view in self.layouts[u].views(master).items():
                    view.copy_(source.get(name))
                exp_avg.zero_()
                exp_avg_sq.zero_()

            self.states.write_disk_unit(u, fill)
        self.synchronize()

    def _make_units(self, source: WeightSource) -> list[Unit | StreamedUnit | DiskUnit]:
        b, plan = self.buffers, self.plan

        def make(u: int) -> Unit | StreamedUnit | DiskUnit:
            layout = self.layouts[u]
            if plan.placement[u] == "disk":
                return DiskUnit(layout, b.bf16_weights[u], self.optim)
            if plan.placement[u] == "streamed":
                return StreamedUnit(
                    layout, source, b.master[u], b.exp_avg[u], b.exp_avg_sq[u], b.bf16_weights[u], self.device
                )
            on_gpu = plan.placement[u] == "gpu"
            if self.ranks is not None and not on_gpu:
                return ShardedUnit(layout, source, b.master[u], self.optim, self.ranks, b.bf16_weights.get(u))
            master = b.gpu_master[u] if on_gpu else b.master[u]
            return Unit(layout, source, master, self.optim, on_gpu, b.bf16_weights.get(u))

        with ThreadPoolExecutor(max_workers=min(16, len(self.layouts))) as pool:  # random init is single-threaded
            return list(pool.map(make, range(len(self.layouts))))

    # --- one step ---------------------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        """The learning rate of the following steps. Each step's updates keep the rate they were issued with,
        though the last of them still run while the next step starts."""
        self.lr = lr

    def train_step(
        self, input_ids: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None
    ) -> StepResult:
        """One optimizer step over `plan.batch` sequences. labels[b, t] is the target for input_ids[b, t];
        `positions` (packed rows) each token's position in its sample, 0 where a sample starts: attention
        stays within each sample (None: causal over each whole row)."""
        plan = self.plan
        if (
            input_ids.shape != (plan.batch, plan.seq)
            or labels.shape != input_ids.shape
            or (positions is not None and positions.shape != input_ids.shape)
        ):
            raise ValueError(
                f"expected input_ids, labels (and positions) of shape {(plan.batch, plan.seq)}, got "
                f"{tuple(input_ids.shape)}, {tuple(labels.shape)}"
                + ("" if positions is None else f" and {tuple(positions.shape)}")
            )
        check_chunk_starts(positions, plan.chunk)
        trained = torch.tensor(int((labels != IGNORE_INDEX).sum()), device=self.device)
        if self.ranks is not None:  # the loss is the mean over every rank's trained tokens
            self.ranks.sum(trained)
        total = max(int(trained), 1)
        self.grads.begin_step()
        self.ops.begin_step(
            input_ids.to(self.device, non_blocking=True).split(plan.chunk),
            labels.to(self.device, non_blocking=True).split(plan.chunk),
            total,
            None if positions is None else positions.split(plan.chunk),
        )
        done = self.executor.run_step(self.lr)
        if self.ranks is not None:
            self.ranks.sum(self.ops.loss)
        loss = float(self.ops.loss)
        norm_op = done.get("norm")
        norm = norm_op.result()[0] if isinstance(norm_op, Future) else math.sqrt(float(self.grads.sq_norm))
        if self.executor.trace:
            self.executor.trace.end_step()
        return StepResult(loss=loss, grad_norm=norm, tokens=total)

    def start_trace(self) -> OpTrace:
        """Time every op of the following steps (see OpTrace.spans)."""
        self.synchronize()
        self.executor.trace = OpTrace(self.device)
        return self.executor.trace

    # --- results -------------------------------------------------------------------------------
    def synchronize(self) -> None:
        """Wait for every pending update and disk write-back (before reading weights or saving)."""
        self.executor.wait_all()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def eval_loss(self, input_ids: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None) -> float:
        """Mean loss over non-ignored tokens with the current weights, changing nothing (any batch size;
        `positions` as train_step takes them)."""
        check_chunk_starts(positions, self.plan.chunk)
        self.synchronize()
        return eval_loss(self.ops, self.executor, input_ids, labels, positions)

    def training_state(self) -> dict[str, torch.Tensor | DeferredTensor]:
        """fp32 master weights and AdamW states of every unit, for checkpoints (see UnitStates.training_state)."""
        self.synchronize()
        return self.states.training_state()

    def load_training_state(self, get: Callable[[str], torch.Tensor], names: set[str]) -> None:
        """Restore what training_state saved; `get(name)` returns one tensor at a time."""
        self.synchronize()
        self.states.load_training_state(get, names)

    def hf_state(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Master weights under Hugging Face names (host copies, in `dtype`)."""
        self.synchronize()
        return self.states.hf_state(dtype)

    def close(self) -> None:
        self.synchronize()
        self.executor.close()
        if self.tier:
            self.tier.close()
