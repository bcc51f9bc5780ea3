"""The sliding-window engine: executes a step's operation graph on the GPU, the copy engines and the CPU.

The GPU holds a window of decoder layers in pre-allocated bf16 slots, streamed in from fp32 master
weights in pinned host memory (cast on the GPU, so the host keeps no bf16 copy); activations are
offloaded or kept per the plan; fp32 gradients come back into pinned host buffers where a fused AdamW
updates master weights and states layer by layer while the GPU works on.
"""
from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from slideformer.models.config import ModelConfig
from slideformer.models.layers import decoder_layer, rope_tables
from slideformer.planner.memory import GiB, describe, gpu_bytes, pinned_host_buffers
from slideformer.opgraph import build_step_graph, issue_order
from slideformer.plan import Plan, PlanError

from .layout import UnitLayout, unit_layouts
from .loss import IGNORE_INDEX, head_loss_and_grads, head_loss_sum
from .pinned import PinnedArena, page_round
from .streams import Handle, Streams, host_wait
from .trace import OpTrace


class WeightSource(Protocol):
    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor: ...


@dataclass
class AdamWConfig:
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = None  # needs plan.update == 'after_norm'


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    tokens: int


class Unit:
    """One unit's fp32 master weights and AdamW state, on the host (pinned) or on the GPU."""

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
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if clip_coef is not None:
            grad.mul_(clip_coef)
        self.master.grad = grad
        self.optimizer.step()
        self.master.grad = None


class Engine:
    def __init__(self, cfg: ModelConfig, plan: Plan, source: WeightSource, optim: AdamWConfig | None = None,
                 gpu_budget_bytes: int | None = None) -> None:
        plan.validate(cfg.num_layers)
        self.optim = optim or AdamWConfig()
        self.lr = self.optim.lr
        if self.optim.max_grad_norm is not None and plan.update != "after_norm":
            raise PlanError("gradient clipping needs the global norm before any update: use update='after_norm'")
        self.device = torch.device(plan.device)
        if self.device.type == "cuda":
            need = gpu_bytes(cfg, plan)
            budget = gpu_budget_bytes if gpu_budget_bytes is not None else torch.cuda.mem_get_info(self.device)[0]
            if sum(need.values()) > budget:
                raise PlanError(f"plan does not fit the GPU: needs {describe(need)}, budget {budget / GiB:.2f} GiB; "
                                f"lower chunk ({plan.chunk}), window ({plan.window}) or loss_chunk_tokens")
        self.cfg, self.plan = cfg, plan
        self.compute_dtype = getattr(torch, plan.compute_dtype)
        self.graph = build_step_graph(cfg, plan)
        self.order = issue_order(self.graph)
        self.streams = Streams(self.device)
        self.cpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slideformer-adamw")
        self.trace: OpTrace | None = None
        self._allocate(source)

    # --- buffers ---------------------------------------------------------------------------
    def _allocate(self, source: WeightSource) -> None:
        cfg, plan, dev = self.cfg, self.plan, self.device
        L, W = cfg.num_layers, plan.window
        self.layouts = unit_layouts(cfg)
        # Every buffer _allocate takes from the arena, each on its own pages.
        arena_bytes = sum(page_round(n) for sizes in pinned_host_buffers(cfg, plan).values() for n in sizes)
        self.host = host = PinnedArena(self, arena_bytes, pinned=dev.type == "cuda")
        compute, f32 = self.compute_dtype, torch.float32  # bf16 unless a CPU plan asks for fp32
        with ThreadPoolExecutor(max_workers=min(16, len(self.layouts))) as pool:  # random init is single-threaded
            self.units = list(pool.map(lambda u: Unit(self.layouts[u], source, plan.placement[u] == "gpu", dev,
                                                      self.optim, host), range(L + 2)))
        n_layer = self.layouts[1].numel

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
        self.staging = torch.empty(plan.transfer_chunk_mb * 2**20 // 4, dtype=f32, device=dev)

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
            if plan.placement[u] != "cpu":
                continue
            if ring and 0 < u <= L:
                self.host_grad[u] = ring[k % len(ring)]
                k += 1
            else:
                self.host_grad[u] = host.take(self.layouts[u].numel, f32)

        shape = (plan.batch, plan.seq, cfg.hidden_size)
        self.hidden = [torch.empty(shape, dtype=compute, device=dev) for _ in range(2)]
        self.dgrad = [torch.empty(shape, dtype=compute, device=dev) for _ in range(2)]
        offload = [lay for lay, p in enumerate(plan.activations) if p == "offload"]
        self.fetched = [torch.empty(shape, dtype=compute, device=dev) for _ in range(2)] if offload else []
        self.host_act = {lay: host.take(shape, compute) for lay in offload}
        self.kept_input = {lay: torch.empty(shape, dtype=compute, device=dev)
                           for lay, p in enumerate(plan.activations) if p == "recompute"}
        self.kept_graph: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.cos, self.sin = rope_tables(cfg, plan.seq, dev, compute)
        self.sq_norm = torch.zeros((), dtype=f32, device=dev)
        self.loss = torch.zeros((), dtype=f32, device=dev)

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
        self.total_tokens = max(int((labels != IGNORE_INDEX).sum()), 1)
        self.loss.zero_()
        self.sq_norm.zero_()
        self.streams.barrier()
        done: dict[str, Handle] = {}
        for name in self.order:
            attrs = self.graph.nodes[name]
            resource = attrs["resource"]
            args = {k: attrs[k] for k in ("unit", "layer", "chunk") if k in attrs}
            if attrs["kind"] == "update":
                args["norm"] = done.get("norm")  # this step's (grad_norm, clip coefficient), after_norm only
                args["lr"] = self.lr
            for pred in self.graph.predecessors(name):
                if self.graph.nodes[pred]["resource"] != resource and resource != "cpu":
                    self.streams.wait(resource, done[pred])
            if resource == "cpu":
                preds = [done[p] for p in self.graph.predecessors(name)]
                step = self.trace.step if self.trace else 0
                done[name] = self.cpu.submit(self._run_cpu_op, name, step, attrs["kind"], args, preds)
                continue
            with self.streams.on(resource):
                start = self.trace.mark() if self.trace else None
                getattr(self, "_" + attrs["kind"])(**args)
                if self.trace:
                    self.trace.add(name, self.trace.step, resource, attrs["kind"], start, self.trace.mark())
                done[name] = self.streams.record(resource)
        self.pending_updates = {u: done[op] for u, op in self.graph.graph["updates"].items()}
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

    def _run_cpu_op(self, name: str, step: int, kind: str, args: dict, preds: list[Handle]):
        for h in preds:
            host_wait(h)
        trace = self.trace
        start = trace.host_mark() if trace else None
        out = getattr(self, "_" + kind)(**args)
        if trace:
            trace.add(name, step, "cpu", kind, start, trace.host_mark())
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
        """fp32 master -> bf16 weights on the GPU, streamed through the staging buffer when on the host."""
        prev = getattr(self, "pending_updates", {}).get(unit)
        if prev is not None:
            self.streams.wait("gpu" if self.units[unit].on_gpu else "h2d", prev)
        master = self.units[unit].master.detach()
        dst = self._destination(unit)[: master.numel()]
        if self.units[unit].on_gpu or self.device.type != "cuda":
            dst.copy_(master)
            return
        step = self.staging.numel()
        for start in range(0, master.numel(), step):
            piece = master[start: start + step]
            stage = self.staging[: piece.numel()]
            stage.copy_(piece, non_blocking=True)
            dst[start: start + piece.numel()].copy_(stage)

    def _embed(self, chunk: int) -> None:
        torch.index_select(self.embed_w, 0, self.tokens[chunk].flatten(),
                           out=self.hidden[0][self._rows(chunk)].view(-1, self.cfg.hidden_size))

    def _rows(self, chunk: int) -> slice:
        return slice(chunk * self.plan.chunk, (chunk + 1) * self.plan.chunk)

    def _save(self, layer: int, chunk: int) -> None:
        rows = self._rows(chunk)
        self.host_act[layer][rows].copy_(self.hidden[layer % 2][rows], non_blocking=True)

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

    def _fetch(self, layer: int, chunk: int) -> None:
        rows = self._rows(chunk)
        self.fetched[layer % 2][rows].copy_(self.host_act[layer][rows], non_blocking=True)

    def _bwd(self, layer: int, chunk: int) -> None:
        rows = self._rows(chunk)
        params = self._layer_params(layer)
        policy = self.plan.activations[layer]
        if policy == "keep":
            x, y = self.kept_graph.pop((layer, chunk))
        else:
            saved = self.fetched[layer % 2] if policy == "offload" else self.kept_input[layer]
            x = saved[rows].detach().requires_grad_()
            with torch.enable_grad():
                y = decoder_layer(params, x, self.cos, self.sin, self.cfg)
        names = list(params)
        grads = torch.autograd.grad(y, [x, *params.values()], self.dgrad[(layer + 1) % 2][rows])
        self.dgrad[layer % 2][rows].copy_(grads[0])
        unit = layer + 1
        acc = self.grad_views[unit]
        for name, g in zip(names, grads[1:]):
            acc[name].copy_(g) if chunk == 0 else acc[name].add_(g)
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
        clip = norm.result()[1] if norm is not None else None
        u.step(grad, float(clip) if clip is not None and not u.on_gpu else clip, lr)

    # --- results -------------------------------------------------------------------------------
    def synchronize(self) -> None:
        """Wait for every pending update (before reading weights or saving)."""
        for h in getattr(self, "pending_updates", {}).values():
            host_wait(h)
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

    def training_state(self) -> dict[str, torch.Tensor]:
        """fp32 master weights and AdamW states of every unit, for checkpoints. Host units are returned without
        copying (views of the live state): write them out before the next step."""
        self.synchronize()
        out = {}
        for u, unit in enumerate(self.units):
            out[f"unit{u}.master"] = unit.master.detach().cpu()
            for key, value in unit.optimizer.state.get(unit.master, {}).items():
                out[f"unit{u}.{key}"] = value.detach().cpu().reshape(-1)
        return out

    def load_training_state(self, get: Callable[[str], torch.Tensor], names: set[str]) -> None:
        """Restore what training_state saved; `get(name)` returns one tensor at a time."""
        self.synchronize()
        for u, unit in enumerate(self.units):
            unit.master.detach().copy_(get(f"unit{u}.master"))
            state = {key: get(f"unit{u}.{key}").to(unit.master.device).reshape(() if key == "step" else -1)
                     for key in ("step", "exp_avg", "exp_avg_sq") if f"unit{u}.{key}" in names}
            if state:
                unit.optimizer.state[unit.master] = state
        self.pending_updates = {}

    def hf_state(self) -> dict[str, torch.Tensor]:
        """fp32 master weights under Hugging Face names (host copies)."""
        self.synchronize()
        out = {}
        for unit, layout in zip(self.units, self.layouts):
            out |= {k: v.detach().to("cpu", copy=True) for k, v in layout.views(unit.master.detach()).items()}
        return out

    def close(self) -> None:
        self.synchronize()
        self.cpu.shutdown()
