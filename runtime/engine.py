"""The sliding-window engine: executes a step's operation graph on the GPU, the copy engines and the CPU.

The GPU holds a window of decoder layers in pre-allocated bf16 slots, streamed in from fp32 master
weights in pinned host memory (cast on the GPU, so the host keeps no bf16 copy); activations are
offloaded or kept per the plan; fp32 gradients come back into pinned host buffers where a fused AdamW
updates master weights and states layer by layer while the GPU works on. Layers placed on disk keep their
master weights and states in the disk tier (read ahead, written behind by a disk worker) and only their
bf16 weights in RAM. Streamed layers keep master and states in pinned RAM, pass them through GPU slots in
pieces after their backward for a fused AdamW there, and write back bf16 weights for their loads.
"""
from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from slideformer.models.config import ModelConfig
from slideformer.models.layers import decoder_layer, decoder_layer_backward, rope_tables
from slideformer.schedule.memory import GiB, describe, gpu_bytes, padded, pinned_host_buffers, saved_input_bytes
from slideformer.schedule.graph import build_step_graph, issue_order
from slideformer.schedule.plan import STATE_STAGING_BUFFERS, Plan, PlanError

from .disk import DeferredTensor, DiskTier
from .layout import UnitLayout, unit_layouts
from .loss import IGNORE_INDEX, head_loss_and_grads, head_loss_sum
from .pinned import PinnedArena, page_round
from .streams import Handle, Streams, host_wait
from .trace import OpTrace
from .weight_stream import WeightStream


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


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    tokens: int


def adamw_step(optimizer: torch.optim.AdamW, param: torch.nn.Parameter, grad: torch.Tensor,
               clip_coef: torch.Tensor | float | None, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
    if clip_coef is not None:
        grad.mul_(clip_coef)
    param.grad = grad
    optimizer.step()
    param.grad = None


class Unit:
    """One unit's fp32 master weights and AdamW state, on the host (pinned) or on the GPU."""

    weights = None  # no bf16 copy in RAM: loads stream and cast the master

    def __init__(self, layout: UnitLayout, source: WeightSource, on_gpu: bool, device: torch.device,
                 optim: AdamWConfig, host: PinnedArena) -> None:
        self.layout = layout
        self.on_gpu = on_gpu
        master = torch.empty(layout.numel, dtype=torch.float32) if on_gpu else host.take(layout.numel, torch.float32)
        for name, view in layout.views(master).items():
            view.copy_(source.get(name))
        self.master = torch.nn.Parameter(master.to(device) if on_gpu else master)
        self.optimizer = torch.optim.AdamW([self.master], lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                           weight_decay=optim.weight_decay, fused=True)

    def step(self, grad: torch.Tensor, clip_coef: torch.Tensor | float | None, lr: float) -> None:
        adamw_step(self.optimizer, self.master, grad, clip_coef, lr)

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        return self.optimizer.state.get(self.master, {})

    def load_optimizer_state(self, state: dict[str, torch.Tensor]) -> None:
        self.optimizer.state[self.master] = state


class StreamedUnit:
    """A decoder layer whose fp32 master and AdamW states stay in pinned host memory and are updated on the
    GPU piece by piece (`Engine._state_in/_state_update/_state_out`); the host also keeps its bf16 weights,
    rewritten by every update, for the GPU's loads."""

    on_gpu = False

    def __init__(self, layout: UnitLayout, source: WeightSource, device: torch.device, host: PinnedArena,
                 compute: torch.dtype) -> None:
        self.layout = layout
        self.master = host.take(layout.numel, torch.float32)
        for name, view in layout.views(self.master).items():
            view.copy_(source.get(name))
        self.exp_avg = host.take(layout.numel, torch.float32).zero_()
        self.exp_avg_sq = host.take(layout.numel, torch.float32).zero_()
        self.weights = host.take(layout.numel, compute)
        self.weights.copy_(self.master)
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

    def __init__(self, layout: UnitLayout, optim: AdamWConfig, host: PinnedArena, compute: torch.dtype) -> None:
        self.layout = layout
        self.weights = host.take(layout.numel, compute)
        self.param = torch.nn.Parameter(torch.empty(0))
        self.optimizer = torch.optim.AdamW([self.param], lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                           weight_decay=optim.weight_decay, fused=True)
        self.steps = torch.zeros((), dtype=torch.float32)  # AdamW's step count, kept in RAM

    def states(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Master, exp_avg and exp_avg_sq as views of a tier buffer (the file's layout)."""
        n = self.layout.numel
        return buf[: 12 * n].view(torch.float32).split(n)

    def step(self, buf: torch.Tensor, grad: torch.Tensor, clip_coef: float | None, lr: float) -> None:
        master, exp_avg, exp_avg_sq = self.states(buf)
        self.param.data = master
        self.optimizer.state[self.param] = {"step": self.steps, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
        adamw_step(self.optimizer, self.param, grad, clip_coef, lr)
        self.weights.copy_(master)
        self.param.data = torch.empty(0)


class Engine:
    def __init__(self, cfg: ModelConfig, plan: Plan, source: WeightSource, optim: AdamWConfig | None = None,
                 gpu_budget_bytes: int | None = None, disk_dir: str | None = None, disk_io: str = "auto") -> None:
        """`disk_dir`: the disk tier's directory, needed when the plan places layers on disk; `disk_io`:
        'auto' (kvikio when installed), 'kvikio' or 'posix'."""
        plan.validate(cfg.num_layers)
        if (plan.disk_units or "disk" in plan.activations) and disk_dir is None:
            raise PlanError("the plan keeps layers' states or activations on disk: give a disk directory")
        self.optim = optim or AdamWConfig()
        self.lr = self.optim.lr
        if (self.optim.max_grad_norm is not None or self.optim.skip_nonfinite) and plan.update != "after_norm":
            raise PlanError("gradient clipping and skipping non-finite steps need the global norm before any update: "
                            "use update='after_norm'")
        self.device = torch.device(plan.device)
        if self.device.type == "cuda":
            need = gpu_bytes(cfg, plan)
            budget = gpu_budget_bytes if gpu_budget_bytes is not None else torch.cuda.mem_get_info(self.device)[0]
            if sum(need.values()) > budget:
                raise PlanError(f"plan does not fit the GPU: needs {describe(need)}, budget {budget / GiB:.2f} GiB; "
                                f"lower chunk ({plan.chunk}), window ({plan.window}), mlp_tile_tokens or loss_chunk_tokens")
        self.cfg, self.plan = cfg, plan
        self.compute_dtype = getattr(torch, plan.compute_dtype)
        self.graph = build_step_graph(cfg, plan)
        self.order = issue_order(self.graph)
        self.write_backs = [op for op in self.order if self.graph.nodes[op]["kind"] == "disk_write"]
        self.layouts = unit_layouts(cfg)
        # Opening the tier checks the directory and preallocates its files: before any GPU memory is taken.
        files = {f"unit{u}": 12 * self.layouts[u].numel for u in plan.disk_units} | \
            {f"act{lay}": saved_input_bytes(cfg, plan) for lay, p in enumerate(plan.activations) if p == "disk"}
        self.tier = DiskTier(disk_dir, files, disk_io) if files else None
        self.streams = Streams(self.device)
        self.host_workers = {"cpu": ThreadPoolExecutor(max_workers=1, thread_name_prefix="slideformer-adamw"),
                             "disk": ThreadPoolExecutor(max_workers=1, thread_name_prefix="slideformer-tier")}
        self.trace: OpTrace | None = None
        self.after_previous_step: dict[str, str] = self.graph.graph["after_previous_step"]
        self.previous_updates: dict[str, Handle] = {}  # the last step's update ops' completion
        self.pending_disk: dict[object, Future] = {}  # write-backs nothing in the step waits on
        self._allocate(source)
        # What each kind of graph op does (the graph's `kind` attribute names one of these).
        self.op_bodies: dict[str, Callable[..., object]] = {
            "load": self._load, "embed": self._embed, "save": self._save, "fwd": self._fwd, "head": self._head,
            "fetch": self._fetch, "bwd": self._bwd, "embed_bwd": self._embed_bwd, "grad_out": self._grad_out,
            "update": self._update, "norm": self._norm, "disk_read": self._disk_read,
            "state_in": self._state_in, "state_update": self._state_update, "state_out": self._state_out,
            "disk_write": self._disk_write, "act_write": self._act_write, "act_read": self._act_read}

    # --- buffers ---------------------------------------------------------------------------
    def _allocate(self, source: WeightSource) -> None:
        cfg, plan, dev = self.cfg, self.plan, self.device
        L, W = cfg.num_layers, plan.window
        # Every buffer _allocate takes from the arena, each on its own pages.
        arena_bytes = sum(page_round(n) for sizes in pinned_host_buffers(cfg, plan).values() for n in sizes)
        self.host = host = PinnedArena(self, arena_bytes, pinned=dev.type == "cuda")
        compute, f32 = self.compute_dtype, torch.float32  # bf16 unless a CPU plan asks for fp32
        n_layer = self.layouts[1].numel
        self.disk_ring = [host.take(padded(12 * n_layer), torch.uint8) for _ in range(plan.disk_ring)] \
            if plan.disk_units else []

        def make(u: int) -> Unit | DiskUnit | StreamedUnit:
            if plan.placement[u] == "disk":
                return DiskUnit(self.layouts[u], self.optim, host, compute)
            if plan.placement[u] == "streamed":
                return StreamedUnit(self.layouts[u], source, dev, host, compute)
            return Unit(self.layouts[u], source, plan.placement[u] == "gpu", dev, self.optim, host)
        with ThreadPoolExecutor(max_workers=min(16, len(self.layouts))) as pool:  # random init is single-threaded
            self.units = list(pool.map(make, range(L + 2)))
        for u in plan.disk_units:  # initial states to disk
            def fill(master: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, u: int = u) -> None:
                for name, view in self.layouts[u].views(master).items():
                    view.copy_(source.get(name))
                exp_avg.zero_()
                exp_avg_sq.zero_()
            self._write_disk_unit(u, fill)
        self.synchronize()

        def leaves(layout: UnitLayout, flat: torch.Tensor, short: bool) -> dict[str, torch.Tensor]:
            # Detached views are autograd leaves sharing the buffer: backward differentiates w.r.t. them.
            return {k: v.detach().requires_grad_() for k, v in layout.views(flat, short).items()}

        self.slots = [torch.empty(n_layer, dtype=compute, device=dev) for _ in range(W)]
        self.slot_params = [leaves(self.layouts[1], s, True) for s in self.slots]
        self.edge_bf16 = {u: torch.empty(self.layouts[u].numel, dtype=compute, device=dev) for u in (0, L + 1)}
        embed_w = self.edge_bf16[0].view(cfg.vocab_size, cfg.hidden_size)
        head = self.layouts[L + 1].views(self.edge_bf16[L + 1])
        self.norm_w = head["model.norm.weight"]
        self.head_w = embed_w if cfg.tie_word_embeddings else head["lm_head.weight"]
        self.embed_w = embed_w
        self.weight_stream = WeightStream(dev, plan.transfer_chunk_mb * 2**20 // 4) \
            if plan.stages_fp32_loads and dev.type == "cuda" else None

        # fp32 gradients on the GPU: edges and GPU-updated layers own one, CPU-updated layers share two.
        shared = [torch.empty(n_layer, dtype=f32, device=dev) for _ in range(2)]
        self.gpu_grad: list[torch.Tensor] = []
        for u in range(L + 2):
            own = u in (0, L + 1) or plan.placement[u] == "gpu"
            self.gpu_grad.append(torch.empty(self.layouts[u].numel, dtype=f32, device=dev) if own else shared[u % 2])
        self.grad_views = [self.layouts[u].views(self.gpu_grad[u], short_names=True) for u in range(L + 2)]
        # Host gradient destinations: dedicated for edges and for every unit under after_norm, else a ring.
        ring = [host.take(n_layer, f32) for _ in range(plan.grad_ring)] if plan.shares_grad_ring else []
        self.host_grad: dict[int, torch.Tensor] = {}
        k = 0
        for u in [L + 1, *range(L, 0, -1), 0]:  # gradient arrival order
            if not plan.host_updated(u):
                continue
            if ring and 0 < u <= L and u not in plan.late_units:
                self.host_grad[u] = ring[k % len(ring)]
                k += 1
            elif u == 0 and plan.shares_edge_grad:  # the head's buffer, free once its update is done
                self.host_grad[0] = self.host_grad[L + 1]
            elif u == L + 1 and plan.shares_edge_grad:
                self.host_grad[u] = host.take(max(self.layouts[0].numel, self.layouts[L + 1].numel), f32)
            else:
                self.host_grad[u] = host.take(self.layouts[u].numel, f32)

        # GPU slots the streamed updates' pieces pass through: fp32 master, exp_avg, exp_avg_sq; new bf16 weights.
        piece = plan.state_piece_numel if plan.streamed_units else 0
        self.state_slots = [(torch.empty(3, piece, dtype=f32, device=dev), torch.empty(piece, dtype=compute, device=dev))
                            for _ in range(STATE_STAGING_BUFFERS if piece else 0)]

        shape = (plan.batch, plan.seq, cfg.hidden_size)
        self.hidden = [torch.empty(shape, dtype=compute, device=dev) for _ in range(2)]
        self.dgrad = [torch.empty(shape, dtype=compute, device=dev) for _ in range(2)]
        offload = [lay for lay, p in enumerate(plan.activations) if p == "offload"]
        self.fetched = [torch.empty(shape, dtype=compute, device=dev) for _ in range(2)] \
            if set(plan.activations) & {"offload", "disk"} else []
        self.host_act = {lay: host.take(shape, compute) for lay in offload}
        # Activations bound for disk pass through a ring of host buffers (uint8, padded for the tier).
        act_bytes = saved_input_bytes(cfg, plan)
        self.act_ring = [host.take(padded(act_bytes), torch.uint8) for _ in range(plan.disk_ring)] \
            if "disk" in plan.activations else []
        self.act_views = [buf[:act_bytes].view(compute).view(shape) for buf in self.act_ring]
        self.kept_input = {lay: torch.empty(shape, dtype=compute, device=dev)
                           for lay, p in enumerate(plan.activations) if p == "recompute"}
        self.kept_graph: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.cos, self.sin = rope_tables(cfg, plan.seq, dev, compute)
        self.sq_norm = torch.zeros((), dtype=f32, device=dev)
        self.loss = torch.zeros((), dtype=f32, device=dev)

    def _write_disk_unit(self, unit: int, fill: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]) -> None:
        """`fill(master, exp_avg, exp_avg_sq)` a ring buffer with a disk unit's state, refresh its bf16 weights
        and queue the write on the disk worker (ring buffers alternate, so filling overlaps writing)."""
        k = self.plan.disk_units.index(unit) % len(self.disk_ring)
        if k in self.pending_disk:
            self.pending_disk.pop(k).result()
        buf = self.disk_ring[k]
        master, exp_avg, exp_avg_sq = self.units[unit].states(buf)
        fill(master, exp_avg, exp_avg_sq)
        self.units[unit].weights.copy_(master)
        self.pending_disk[k] = self.host_workers["disk"].submit(self.tier.write, f"unit{unit}", buf)

    def _read_disk_unit(self, unit: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A disk unit's (master, exp_avg, exp_avg_sq), read into the first ring buffer (engine idle);
        valid until the next read."""
        self.tier.read(f"unit{unit}", self.disk_ring[0])
        return self.units[unit].states(self.disk_ring[0])

    # --- one step ---------------------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        """The learning rate of the following steps. Each step's updates keep the rate they were issued with,
        though the last of them still run while the next step starts."""
        self.lr = lr

    def train_step(self, input_ids: torch.Tensor, labels: torch.Tensor) -> StepResult:
        """One optimizer step over `plan.batch` sequences. labels[b, t] is the target for input_ids[b, t]."""
        plan = self.plan
        if input_ids.shape != (plan.batch, plan.seq) or labels.shape != input_ids.shape:
            raise ValueError(f"expected input_ids and labels of shape {(plan.batch, plan.seq)}, "
                             f"got {tuple(input_ids.shape)} and {tuple(labels.shape)}")
        self.tokens = input_ids.to(self.device, non_blocking=True).split(plan.chunk)
        self.labels = labels.to(self.device, non_blocking=True).split(plan.chunk)
        for write in self.pending_disk.values():  # a failed write-back of the last step stops the run here
            if write.done():
                write.result()
        self.total_tokens = max(int((labels != IGNORE_INDEX).sum()), 1)
        self.loss.zero_()
        self.sq_norm.zero_()
        self.streams.barrier()
        done: dict[str, Handle] = {}
        for name in self.order:
            attrs = self.graph.nodes[name]
            resource = attrs["resource"]
            args = {k: attrs[k] for k in ("unit", "layer", "chunk", "slot", "piece") if k in attrs}
            if attrs["kind"] == "update":
                args["norm"] = done.get("norm")  # this step's (grad_norm, clip coefficient), after_norm only
            if attrs["kind"] in ("update", "state_update"):
                args["lr"] = self.lr
            on_host = resource in self.host_workers
            previous = self.previous_updates.get(self.after_previous_step.get(name))
            if previous is not None:  # a load waits for the previous step's update of its unit
                self.streams.wait(resource, previous)
            for pred in self.graph.predecessors(name):
                if self.graph.nodes[pred]["resource"] != resource and not on_host:
                    self.streams.wait(resource, done[pred])
            if on_host:  # the CPU optimizer or the disk worker, each serving its ops in order
                preds = [done[p] for p in self.graph.predecessors(name)]
                step = self.trace.step if self.trace else 0
                done[name] = self.host_workers[resource].submit(self._run_host_op, name, step, resource,
                                                                attrs["kind"], args, preds)
                continue
            with self.streams.on(resource):
                start = self.trace.mark() if self.trace else None
                self.op_bodies[attrs["kind"]](**args)
                if self.trace:
                    self.trace.add(name, self.trace.step, resource, attrs["kind"], start, self.trace.mark())
                done[name] = self.streams.record(resource)
        self.previous_updates = {op: done[op] for op in self.graph.graph["updates"].values()}
        self.pending_disk = {op: done[op] for op in self.write_backs}
        loss = float(self.loss)
        norm = done["norm"].result()[0] if "norm" in done else math.sqrt(float(self.sq_norm))
        if self.trace:
            self.trace.end_step()
        return StepResult(loss=loss, grad_norm=norm, tokens=self.total_tokens)

    def start_trace(self) -> OpTrace:
        """Time every op of the following steps (see OpTrace.spans)."""
        self.synchronize()
        self.trace = OpTrace(self.device)
        return self.trace

    def _run_host_op(self, name: str, step: int, resource: str, kind: str, args: dict, preds: list[Handle]):
        for h in preds:
            host_wait(h)
        trace = self.trace
        start = trace.host_mark() if trace else None
        out = self.op_bodies[kind](**args)
        if trace:
            trace.add(name, step, resource, kind, start, trace.host_mark())
        return out

    def _norm(self) -> tuple[float, torch.Tensor | None]:
        """The global gradient norm, and torch's clip coefficient min(1, max_norm / (norm + 1e-6))."""
        norm = self.sq_norm.sqrt()
        clip = None
        if self.optim.max_grad_norm is not None:
            clip = torch.clamp(self.optim.max_grad_norm / (norm + 1e-6), max=1.0)
        return float(norm), clip

    # --- ops ---------------------------------------------------------------------------------
    def _destination(self, unit: int) -> torch.Tensor:
        L = self.cfg.num_layers
        return self.edge_bf16[unit] if unit in (0, L + 1) else self.slots[(unit - 1) % self.plan.window]

    def _load(self, unit: int) -> None:
        """fp32 master -> bf16 weights on the GPU, streamed through the staging ring when on the host."""
        weights = self.units[unit].weights
        if weights is not None:  # a disk unit's bf16 weights, in RAM: straight into the slot
            self._destination(unit)[: weights.numel()].copy_(weights, non_blocking=True)
            return
        master = self.units[unit].master.detach()
        dst = self._destination(unit)[: master.numel()]
        if self.units[unit].on_gpu or self.device.type != "cuda":
            dst.copy_(master)
            return
        self.weight_stream.load(master, dst)

    def _embed(self, chunk: int) -> None:
        torch.index_select(self.embed_w, 0, self.tokens[chunk].flatten(),
                           out=self.hidden[0][self._rows(chunk)].view(-1, self.cfg.hidden_size))

    def _rows(self, chunk: int) -> slice:
        return slice(chunk * self.plan.chunk, (chunk + 1) * self.plan.chunk)

    def _save(self, layer: int, chunk: int, slot: int | None = None) -> None:
        rows = self._rows(chunk)
        dst = self.host_act[layer] if slot is None else self.act_views[slot]
        dst[rows].copy_(self.hidden[layer % 2][rows], non_blocking=True)

    def _layer_params(self, layer: int) -> dict[str, torch.Tensor]:
        return self.slot_params[layer % self.plan.window]

    def _fwd(self, layer: int, chunk: int) -> None:
        rows = self._rows(chunk)
        x = self.hidden[layer % 2][rows]
        out = self.hidden[(layer + 1) % 2][rows]
        policy = self.plan.activations[layer]
        if policy == "recompute":
            self.kept_input[layer][rows].copy_(x)
        if policy == "keep":
            x = x.detach().clone().requires_grad_()
            with torch.enable_grad():
                y = decoder_layer(self._layer_params(layer), x, self.cos, self.sin, self.cfg)
            self.kept_graph[(layer, chunk)] = (x, y)
            out.copy_(y.detach())
        else:
            with torch.no_grad():
                out.copy_(decoder_layer(self._layer_params(layer), x, self.cos, self.sin, self.cfg))

    def _head(self, chunk: int) -> None:
        L = self.cfg.num_layers
        rows = self._rows(chunk)
        if chunk == 0:
            self.gpu_grad[L + 1].zero_()
            if self.cfg.tie_word_embeddings:
                self.gpu_grad[0].zero_()
        g_head = self.grad_views[L + 1]
        head_grad = self.gpu_grad[0].view(self.cfg.vocab_size, -1) if self.cfg.tie_word_embeddings \
            else g_head["lm_head.weight"]
        loss, dx = head_loss_and_grads(self.hidden[L % 2][rows], self.labels[chunk], self.norm_w, self.head_w,
                                       self.cfg.rms_norm_eps, self.total_tokens, self.plan.loss_chunk_tokens,
                                       g_head["model.norm.weight"], head_grad)
        self.loss += loss
        self.dgrad[L % 2][rows].copy_(dx)
        if chunk == self.plan.chunks - 1:
            self._accumulate_norm(L + 1)

    def _fetch(self, layer: int, chunk: int, slot: int | None = None) -> None:
        rows = self._rows(chunk)
        src = self.host_act[layer] if slot is None else self.act_views[slot]
        self.fetched[layer % 2][rows].copy_(src[rows], non_blocking=True)

    def _bwd(self, layer: int, chunk: int) -> None:
        rows = self._rows(chunk)
        params = self._layer_params(layer)
        policy = self.plan.activations[layer]
        unit = layer + 1
        acc, written = self.grad_views[unit], set()

        def accumulate(name: str, g: torch.Tensor) -> None:  # fp32 sum over chunks (and MLP tiles)
            if chunk == 0 and name not in written:
                acc[name].copy_(g)
                written.add(name)
            else:
                acc[name].add_(g)
        dy = self.dgrad[(layer + 1) % 2][rows]
        if policy == "keep":
            x, y = self.kept_graph.pop((layer, chunk))
            grads = torch.autograd.grad(y, [x, *params.values()], dy)
            for name, g in zip(params, grads[1:]):
                accumulate(name, g)
            dx = grads[0]
        else:
            saved = self.kept_input[layer] if policy == "recompute" else self.fetched[layer % 2]
            dx = decoder_layer_backward(params, saved[rows], dy, self.cos, self.sin, self.cfg,
                                        self.plan.mlp_tile_tokens, accumulate)
        self.dgrad[layer % 2][rows].copy_(dx)
        if chunk == self.plan.chunks - 1:
            self._accumulate_norm(unit)

    def _embed_bwd(self, chunk: int) -> None:
        if chunk == 0 and not self.cfg.tie_word_embeddings:
            self.gpu_grad[0].zero_()
        rows = self._rows(chunk)
        self.gpu_grad[0].view(self.cfg.vocab_size, -1).index_add_(
            0, self.tokens[chunk].flatten(), self.dgrad[0][rows].flatten(0, 1).float())
        if chunk == self.plan.chunks - 1:
            self._accumulate_norm(0)

    def _accumulate_norm(self, unit: int) -> None:
        g = self.gpu_grad[unit][: self.layouts[unit].numel]
        self.sq_norm += torch.dot(g, g)

    def _grad_out(self, unit: int) -> None:
        n = self.layouts[unit].numel
        self.host_grad[unit][:n].copy_(self.gpu_grad[unit][:n], non_blocking=True)

    def _update(self, unit: int, norm: Future | None, lr: float) -> None:
        """AdamW on one unit: on the CPU worker for host units, on the compute stream for GPU units."""
        n = self.layouts[unit].numel
        u = self.units[unit]
        grad = (self.gpu_grad[unit] if u.on_gpu else self.host_grad[unit])[:n]
        if self.optim.skip_nonfinite and not math.isfinite(norm.result()[0]):
            return
        clip = norm.result()[1] if norm is not None else None
        clip = float(clip) if clip is not None and not u.on_gpu else clip
        if isinstance(u, DiskUnit):
            u.step(self.disk_ring[self.graph.graph["disk_slot"][unit]], grad, clip, lr)
        else:
            u.step(grad, clip, lr)

    def _piece(self, unit: int, piece: int) -> slice:
        step = self.plan.state_piece_numel
        return slice(piece * step, min((piece + 1) * step, self.layouts[unit].numel))

    def _state_in(self, unit: int, piece: int, slot: int) -> None:
        """A streamed unit's master and AdamW states, one piece, into a GPU slot."""
        u, rows = self.units[unit], self._piece(unit, piece)
        n = rows.stop - rows.start
        states = self.state_slots[slot][0]
        for k, src in enumerate((u.master, u.exp_avg, u.exp_avg_sq)):
            states[k, :n].copy_(src[rows], non_blocking=True)

    def _state_update(self, unit: int, piece: int, slot: int, lr: float) -> None:
        """torch.optim.AdamW's fused step (the same kernel, so the same maths) on one piece, and its bf16 cast.
        The step count goes up once per unit, before its first piece, as the optimizer's own step does."""
        u, rows, o = self.units[unit], self._piece(unit, piece), self.optim
        n = rows.stop - rows.start
        states, weights = self.state_slots[slot]
        master, exp_avg, exp_avg_sq = states[:, :n]
        if piece == 0:
            u.steps += 1
        torch._fused_adamw_([master], [self.gpu_grad[unit][rows]], [exp_avg], [exp_avg_sq], [], [u.steps],
                            lr=lr, beta1=o.betas[0], beta2=o.betas[1], weight_decay=o.weight_decay, eps=o.eps,
                            amsgrad=False, maximize=False)
        weights[:n].copy_(master)

    def _state_out(self, unit: int, piece: int, slot: int) -> None:
        """The updated piece back to the host: master, states and the bf16 weights the unit's loads read."""
        u, rows = self.units[unit], self._piece(unit, piece)
        n = rows.stop - rows.start
        states, weights = self.state_slots[slot]
        for k, dst in enumerate((u.master, u.exp_avg, u.exp_avg_sq)):
            dst[rows].copy_(states[k, :n], non_blocking=True)
        u.weights[rows].copy_(weights[:n], non_blocking=True)

    def _disk_read(self, unit: int, slot: int) -> None:
        self.tier.read(f"unit{unit}", self.disk_ring[slot])

    def _disk_write(self, unit: int, slot: int) -> None:
        self.tier.write(f"unit{unit}", self.disk_ring[slot])

    def _act_write(self, layer: int, slot: int) -> None:
        self.tier.write(f"act{layer}", self.act_ring[slot])

    def _act_read(self, layer: int, slot: int) -> None:
        self.tier.read(f"act{layer}", self.act_ring[slot])

    # --- results -------------------------------------------------------------------------------
    def synchronize(self) -> None:
        """Wait for every pending update and disk write-back (before reading weights or saving)."""
        for h in [*self.previous_updates.values(), *self.pending_disk.values()]:
            host_wait(h)
        self.pending_disk = {}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def eval_loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> float:
        """Mean loss over non-ignored tokens with the current weights, changing nothing (any batch size)."""
        self.synchronize()
        cfg, L = self.cfg, self.cfg.num_layers
        ids, labels = input_ids.to(self.device), labels.to(self.device)
        cos, sin = rope_tables(cfg, ids.shape[1], self.device, self.compute_dtype)
        with self.streams.on("gpu"):
            for unit in (0, L + 1):
                self._load(unit)
            hidden = [torch.index_select(self.embed_w, 0, rows.flatten()).view(*rows.shape, -1)
                      for rows in ids.split(self.plan.chunk)]
            for lay in range(L):
                self._load(lay + 1)
                params = self._layer_params(lay)
                hidden = [decoder_layer(params, x, cos, sin, cfg) for x in hidden]
            total = sum(head_loss_sum(x, y, self.norm_w, self.head_w, cfg.rms_norm_eps, self.plan.loss_chunk_tokens)
                        for x, y in zip(hidden, labels.split(self.plan.chunk)))
        return float(total) / max(int((labels != IGNORE_INDEX).sum()), 1)

    def training_state(self) -> dict[str, torch.Tensor | DeferredTensor]:
        """fp32 master weights and AdamW states of every unit, for checkpoints. Host units are returned without
        copying (views of the live state) and disk units as deferred reads, one unit at a time: write them
        out, in order, before the next step."""
        self.synchronize()
        out: dict[str, torch.Tensor | DeferredTensor] = {}
        for u, unit in enumerate(self.units):
            if isinstance(unit, DiskUnit):
                out[f"unit{u}.step"] = unit.steps.reshape(-1)
                for i, key in enumerate(("master", "exp_avg", "exp_avg_sq")):
                    # master triggers the read; the two states are views of the same buffer, written next
                    load = (lambda u=u: self._read_disk_unit(u)[0]) if i == 0 else \
                        (lambda u=u, i=i: self.units[u].states(self.disk_ring[0])[i])
                    out[f"unit{u}.{key}"] = DeferredTensor((unit.layout.numel,), torch.float32, load)
                continue
            out[f"unit{u}.master"] = unit.master.detach().cpu()
            for key, value in unit.optimizer_state().items():
                out[f"unit{u}.{key}"] = value.detach().cpu().reshape(-1)
        return out

    def load_training_state(self, get: Callable[[str], torch.Tensor], names: set[str]) -> None:
        """Restore what training_state saved; `get(name)` returns one tensor at a time."""
        self.synchronize()
        for u, unit in enumerate(self.units):
            if isinstance(unit, DiskUnit):
                unit.steps.copy_(get(f"unit{u}.step").reshape(()))

                def fill(master, exp_avg, exp_avg_sq, u=u):
                    for key, view in (("master", master), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
                        view.copy_(get(f"unit{u}.{key}"))
                self._write_disk_unit(u, fill)
                continue
            unit.master.detach().copy_(get(f"unit{u}.master"))
            state = {key: get(f"unit{u}.{key}").to(unit.master.device).reshape(() if key == "step" else -1)
                     for key in ("step", "exp_avg", "exp_avg_sq") if f"unit{u}.{key}" in names}
            if state or isinstance(unit, StreamedUnit):
                unit.load_optimizer_state(state)
        self.synchronize()
        self.previous_updates = {}

    def hf_state(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Master weights under Hugging Face names (host copies, in `dtype`; in bf16, disk units' come from
        their bf16 weights in RAM, which are exactly their rounded masters)."""
        self.synchronize()
        out = {}
        for u, (unit, layout) in enumerate(zip(self.units, self.layouts)):
            if isinstance(unit, DiskUnit):
                flat = unit.weights if dtype == unit.weights.dtype else self._read_disk_unit(u)[0]
            else:
                flat = unit.master.detach()
            out |= {k: v.to("cpu", dtype, copy=True) for k, v in layout.views(flat).items()}
        return out

    def close(self) -> None:
        self.synchronize()
        for worker in self.host_workers.values():
            worker.shutdown()
        if self.tier:
            self.tier.close()
