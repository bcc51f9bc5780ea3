"""What the step's compute and copy ops do (loads, the forward, the head, the backward): the bodies the executor
runs, one method per op kind; `gradient_ops` has the complete gradients' (collectives, the norm, the copy out),
`update_ops` the updates' and the disk tier's.

They read and write the step's buffers (`StepBuffers`) and units; the executor has already put each on its
resource's stream (or worker thread) and made it wait for its dependencies.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from slideformer.models.config import ModelConfig
from slideformer.models.layers import AttentionStats

from slideformer.models.numerics import numerics_for
from slideformer.schedule.graph import transient_edge
from slideformer.schedule.op import OpKind
from slideformer.schedule.plan import Plan

from .buffers import StepBuffers
from .gradient_ops import GradientOps
from .layout import UnitLayout
from .units import DiskUnit, StreamedUnit, Unit
from .weight_stream import WeightStream


class StepOps:
    def __init__(
        self,
        cfg: ModelConfig,
        plan: Plan,
        layouts: list[UnitLayout],
        units: list[Unit | StreamedUnit | DiskUnit],
        buffers: StepBuffers,
        device: torch.device,
        grads: GradientOps,
    ) -> None:
        """`grads`: what follows a unit's last gradient contribution (`GradientOps.gradient_done`)."""
        self.cfg, self.plan, self.layouts, self.units, self.b = cfg, plan, layouts, units, buffers
        self.device, self.gradient_done = device, grads.gradient_done
        L = cfg.num_layers

        def leaves(layout: UnitLayout, flat: torch.Tensor) -> dict[str, torch.Tensor]:
            # Detached views are autograd leaves sharing the buffer: backward differentiates w.r.t. them.
            return {k: v.detach().requires_grad_() for k, v in layout.views(flat, True).items()}

        self.slot_params = [leaves(layouts[1], s) for s in buffers.slots]
        # the edges' buffers taken and given back within the step, by (buffer, unit)
        self.transient = {
            (what, u): transient_edge(cfg, plan, what, u) for what in ("edge_weights", "grad") for u in (0, L + 1)
        }
        # the layers' gradients by tensor name (the head's views are taken per step: its buffer may be transient)
        self.grad_views = {u: layouts[u].views(buffers.gpu_grad[u], short_names=True) for u in range(1, L + 1)}
        self.weight_stream = WeightStream(buffers.staging) if buffers.staging else None
        self.kept_graph: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        # a saved attention's kernel outputs beside its output and log-sum-exp, by (layer, chunk), for its backward
        self.attention_meta: dict[tuple[int, int], list] = {}
        self.numerics = numerics_for(cfg, device)
        self.unpacked = self.numerics.positions(None, buffers.hidden[0][self._rows(0)])  # rows at 0..seq-1
        self.positions: list[Any] = []  # this step's, by chunk
        self.loss = torch.zeros((), dtype=torch.float32, device=device)
        self.tokens: tuple[torch.Tensor, ...] = ()
        self.labels: tuple[torch.Tensor, ...] = ()
        self.total_tokens = 1
        # What each kind of graph op does (an op's `kind` names one of these).
        self.bodies: dict[OpKind, Callable[..., object]] = {
            OpKind.LOAD: self.load,
            OpKind.EMBED: self._embed,
            OpKind.SAVE: self._save,
            OpKind.FWD: self._fwd,
            OpKind.HEAD: self._head,
            OpKind.FETCH: self._fetch,
            OpKind.SAVE_ATTENTION: self._save_attention,
            OpKind.FETCH_ATTENTION: self._fetch_attention,
            OpKind.BWD: self._bwd,
            OpKind.EMBED_BWD: self._embed_bwd,
        }

    def begin_step(
        self,
        tokens: tuple[torch.Tensor, ...],
        labels: tuple[torch.Tensor, ...],
        total_tokens: int,
        positions: tuple[torch.Tensor, ...] | None = None,
    ) -> None:
        """This step's inputs, split into chunks, the loss's denominator and (packed rows) each chunk's token
        positions in their samples."""
        self.tokens, self.labels, self.total_tokens = tokens, labels, total_tokens
        self.positions = (
            [self.unpacked] * len(tokens)
            if positions is None
            else [self.numerics.positions(p, self.b.hidden[0][self._rows(0)]) for p in positions]
        )
        self.loss.zero_()

    @property
    def embed_w(self) -> torch.Tensor:
        return self.b.edge_weights[0].view(self.cfg.vocab_size, self.cfg.hidden_size)

    @property
    def norm_w(self) -> torch.Tensor:
        return self.layouts[-1].views(self.b.edge_weights[self.cfg.num_layers + 1])["model.norm.weight"]

    @property
    def head_w(self) -> torch.Tensor:
        if self.cfg.tie_word_embeddings:
            return self.embed_w
        return self.layouts[-1].views(self.b.edge_weights[self.cfg.num_layers + 1])["lm_head.weight"]

    def release_edge_weights(self, unit: int) -> None:
        """An edge's transient weights: given back once the work queued on this stream with them is done."""
        if self.transient[("edge_weights", unit)]:
            if self.device.type == "cuda":
                self.b.edge_weights[unit].record_stream(torch.cuda.current_stream(self.device))
            self.b.edge_weights[unit] = torch.empty(0)

    def _destination(self, unit: int) -> torch.Tensor:
        L = self.cfg.num_layers
        if self.transient.get(("edge_weights", unit), False):  # given back after the lookups or the head's last piece
            n = self.layouts[unit].numel
            self.b.edge_weights[unit] = torch.empty(n, dtype=self.b.compute, device=self.device)
        return self.b.edge_weights[unit] if unit in (0, L + 1) else self.b.slots[self.plan.weight_slot(unit - 1)]

    def load(self, unit: int, slot: int | None = None) -> None:
        """bf16 weights kept in RAM straight into the slot, else the fp32 master cast to bf16 on the GPU (streamed
        through the staging ring when on the host); a streamed layer's backward (`slot`: its master slot) copies
        its master whole into that slot, where its update will read it, and casts from there."""
        u = self.units[unit]
        if slot is not None:
            assert isinstance(u, StreamedUnit), f"unit {unit} is not streamed"
            master = self.b.master_slots[slot][: u.master.numel()]
            master.copy_(u.master, non_blocking=True)
            self._destination(unit)[: master.numel()].copy_(master)
            return
        if u.weights is not None:
            self._destination(unit)[: u.weights.numel()].copy_(u.weights, non_blocking=True)
            return
        master = u.master.detach()
        dst = self._destination(unit)[: master.numel()]
        if u.on_gpu or self.weight_stream is None:  # GPU-resident, or a CPU device
            dst.copy_(master)
            return
        self.weight_stream.load(master, dst)

    def _embed(self, chunk: int) -> None:
        self.numerics.embed(self.embed_w, self.tokens[chunk], self.b.hidden[0][self._rows(chunk)])
        if chunk == self.plan.chunks - 1:
            self.release_edge_weights(0)

    def _rows(self, chunk: int) -> slice:
        return slice(chunk * self.plan.chunk, (chunk + 1) * self.plan.chunk)

    def _save(self, layer: int, chunk: int, slot: int | None = None) -> None:
        rows = self._rows(chunk)
        dst = self.b.host_act[layer] if slot is None else self.b.act_views[slot]
        dst[rows].copy_(self.b.hidden[layer % 2][rows], non_blocking=True)

    def layer_params(self, layer: int) -> dict[str, torch.Tensor]:
        return self.slot_params[self.plan.weight_slot(layer)]

    def _fwd(self, layer: int, chunk: int) -> None:
        rows = self._rows(chunk)
        x = self.b.hidden[layer % 2][rows]
        out = self.b.hidden[(layer + 1) % 2][rows]
        policy, pos = self.plan.activations[layer], self.positions[chunk]
        if policy == "recompute":
            self.b.kept_input[layer][rows].copy_(x)
        if policy == "keep":
            x = x.detach().clone().requires_grad_()
            with torch.enable_grad():
                y = self.numerics.layer(layer, self.layer_params(layer), x, pos)
            self.kept_graph[(layer, chunk)] = (x, y)
            out.copy_(y.detach())
        else:
            stats = (
                self._attention_rows(self.b.gpu_attention(layer), chunk) if self.plan.saves_attention(layer) else None
            )
            with torch.no_grad():
                out.copy_(
                    self.numerics.layer(layer, self.layer_params(layer), x, pos, self.plan.seq_tile_tokens, stats)
                )
            if stats is not None:  # what its kernel returned beside them, for the backward
                self.attention_meta[(layer, chunk)] = stats.meta

    def _head(self, chunk: int) -> None:
        L = self.cfg.num_layers
        rows = self._rows(chunk)
        if chunk == 0 and self.transient[("grad", L + 1)]:  # taken now, given back once copied out (GradientOps)
            self.b.gpu_grad[L + 1] = torch.zeros(self.layouts[L + 1].numel, dtype=torch.float32, device=self.device)
        elif chunk == 0:
            self.b.gpu_grad[L + 1].zero_()
            if self.cfg.tie_word_embeddings:
                self.b.gpu_grad[0].zero_()
        g_head = self.layouts[L + 1].views(self.b.gpu_grad[L + 1], short_names=True)
        head_grad = (
            self.b.gpu_grad[0].view(self.cfg.vocab_size, -1)
            if self.cfg.tie_word_embeddings
            else g_head["lm_head.weight"]
        )
        loss, dx = self.numerics.head_loss_and_grads(
            self.b.hidden[L % 2][rows],
            self.labels[chunk],
            self.norm_w,
            self.head_w,
            self.total_tokens,
            self.plan.loss_chunk_tokens,
            g_head["model.norm.weight"],
            head_grad,
        )
        self.loss += loss
        self.b.dgrad[L % 2][rows].copy_(dx)
        if chunk == self.plan.chunks - 1:
            self.release_edge_weights(L + 1)
            self.gradient_done(L + 1)

    def _fetch(self, layer: int, chunk: int, slot: int | None = None) -> None:
        rows = self._rows(chunk)
        src = self.b.host_act[layer] if slot is None else self.b.act_views[slot]
        self.b.fetched[layer % 2][rows].copy_(src[rows], non_blocking=True)

    def _attention_rows(self, stats: AttentionStats, chunk: int) -> AttentionStats:
        rows = self._rows(chunk)
        return AttentionStats(stats.out[rows], stats.lse[rows], [])

    def _copy_attention(self, src: AttentionStats, dst: AttentionStats, chunk: int) -> None:
        src, dst = self._attention_rows(src, chunk), self._attention_rows(dst, chunk)
        dst.out.copy_(src.out, non_blocking=True)
        dst.lse.copy_(src.lse, non_blocking=True)

    def _save_attention(self, layer: int, chunk: int) -> None:
        self._copy_attention(self.b.gpu_attention(layer), self.b.host_attention[layer], chunk)

    def _fetch_attention(self, layer: int, chunk: int) -> None:
        self._copy_attention(self.b.host_attention[layer], self.b.gpu_attention(layer), chunk)

    def _bwd(self, layer: int, chunk: int) -> None:
        rows = self._rows(chunk)
        params = self.layer_params(layer)
        policy = self.plan.activations[layer]
        unit = layer + 1
        acc, written = self.grad_views[unit], set()

        def accumulate(name: str, g: torch.Tensor) -> None:  # fp32 sum over chunks (and MLP tiles)
            if chunk == 0 and name not in written:
                acc[name].copy_(g)
                written.add(name)
            elif acc[name].dtype != torch.float32:  # `Plan.bf16_layer_grads` holds one bf16 result, never a sum
                raise RuntimeError(f"layer {layer}'s {name} got a second gradient under a bf16-gradient plan")
            else:
                acc[name].add_(g)

        dy, pos = self.b.dgrad[(layer + 1) % 2][rows], self.positions[chunk]
        if policy == "keep":
            x, y = self.kept_graph.pop((layer, chunk))
            grads = torch.autograd.grad(y, [x, *params.values()], dy)
            for name, g in zip(params, grads[1:]):
                accumulate(name, g)
            dx = grads[0]
        else:
            saved = self.b.kept_input[layer] if policy == "recompute" else self.b.fetched[layer % 2]
            attention = None
            if self.plan.saves_attention(layer):
                attention = self._attention_rows(self.b.gpu_attention(layer), chunk)
                attention.meta.extend(self.attention_meta.pop((layer, chunk)))
            dx = self.numerics.layer_backward(
                layer,
                params,
                saved[rows],
                dy,
                pos,
                self.plan.mlp_tile_tokens,
                accumulate,
                self.plan.seq_tile_tokens,
                attention,
            )
        self.b.dgrad[layer % 2][rows].copy_(dx)
        if chunk == self.plan.chunks - 1:
            self.gradient_done(unit)

    def _embed_bwd(self, chunk: int) -> None:
        if chunk == 0 and self.transient[("grad", 0)]:  # taken now, given back once copied out (GradientOps)
            self.b.gpu_grad[0] = torch.zeros(self.layouts[0].numel, dtype=torch.float32, device=self.device)
        elif chunk == 0 and not self.cfg.tie_word_embeddings:
            self.b.gpu_grad[0].zero_()
        rows = self._rows(chunk)
        weights = self.b.edge_weights[0]  # (ours reads none: the transient weights are gone by now)
        self.numerics.embed_backward(weights, self.tokens[chunk], self.b.dgrad[0][rows], self.b.gpu_grad[0])
        if chunk == self.plan.chunks - 1:
            self.gradient_done(0)
