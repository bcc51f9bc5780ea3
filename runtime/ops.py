"""What the step's compute and copy ops do (loads, the forward, the head, the backward, gradients out): the bodies
the executor runs, one method per op kind; `update_ops` has the updates' and the disk tier's.

They read and write the step's buffers (`StepBuffers`) and units; the executor has already put each on its
resource's stream (or worker thread) and made it wait for its dependencies.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from slideformer.models.config import ModelConfig

from slideformer.models.numerics import numerics_for
from slideformer.schedule.graph import transient_edge
from slideformer.schedule.op import OpKind
from slideformer.schedule.plan import Plan

from .buffers import StepBuffers
from .layout import UnitLayout
from .ranks import Ranks
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
        ranks: Ranks | None = None,
    ) -> None:
        self.cfg, self.plan, self.layouts, self.units, self.b = cfg, plan, layouts, units, buffers
        self.ranks, self.device = ranks, device
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
        self.numerics = numerics_for(cfg, device)
        self.unpacked = self.numerics.positions(None, buffers.hidden[0][self._rows(0)])  # rows at 0..seq-1
        self.positions: list[Any] = []  # this step's, by chunk
        self.sq_norm = torch.zeros((), dtype=torch.float32, device=device)
        self.sq_norm_shards = torch.zeros((), dtype=torch.float32, device=device)  # this rank's shards' (ranks > 1)
        self.loss = torch.zeros((), dtype=torch.float32, device=device)
        self.tokens: tuple[torch.Tensor, ...] = ()
        self.labels: tuple[torch.Tensor, ...] = ()
        self.total_tokens = 1
        # What each kind of graph op does (an op's `kind` names one of these).
        self.bodies: dict[OpKind, Callable[..., object]] = {
            OpKind.LOAD: self._load,
            OpKind.EMBED: self._embed,
            OpKind.SAVE: self._save,
            OpKind.FWD: self._fwd,
            OpKind.HEAD: self._head,
            OpKind.FETCH: self._fetch,
            OpKind.BWD: self._bwd,
            OpKind.EMBED_BWD: self._embed_bwd,
            OpKind.ALLREDUCE: self._allreduce,
            OpKind.REDUCE_SCATTER: self._reduce_scatter,
            OpKind.GRAD_OUT: self._grad_out,
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
        self.sq_norm.zero_()
        self.sq_norm_shards.zero_()

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
        return self.b.edge_weights[unit] if unit in (0, L + 1) else self.b.slots[(unit - 1) % self.plan.window]

    def _load(self, unit: int) -> None:
        """bf16 weights kept in RAM straight into the slot, else the fp32 master cast to bf16 on the GPU (streamed
        through the staging ring when on the host)."""
        u = self.units[unit]
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

    def _layer_params(self, layer: int) -> dict[str, torch.Tensor]:
        return self.slot_params[layer % self.plan.window]

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
                y = self.numerics.layer(layer, self._layer_params(layer), x, pos)
            self.kept_graph[(layer, chunk)] = (x, y)
            out.copy_(y.detach())
        else:
            with torch.no_grad():
                out.copy_(self.numerics.layer(layer, self._layer_params(layer), x, pos, self.plan.seq_tile_tokens))

    def _head(self, chunk: int) -> None:
        L = self.cfg.num_layers
        rows = self._rows(chunk)
        if chunk == 0 and self.transient[("grad", L + 1)]:  # taken now, given back once copied out (_grad_out)
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
            self._gradient_done(L + 1)

    def _fetch(self, layer: int, chunk: int, slot: int | None = None) -> None:
        rows = self._rows(chunk)
        src = self.b.host_act[layer] if slot is None else self.b.act_views[slot]
        self.b.fetched[layer % 2][rows].copy_(src[rows], non_blocking=True)

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

        dy, pos = self.b.dgrad[(layer + 1) % 2][rows], self.positions[chunk]
        if policy == "keep":
            x, y = self.kept_graph.pop((layer, chunk))
            grads = torch.autograd.grad(y, [x, *params.values()], dy)
            for name, g in zip(params, grads[1:]):
                accumulate(name, g)
            dx = grads[0]
        else:
            saved = self.b.kept_input[layer] if policy == "recompute" else self.b.fetched[layer % 2]
            dx = self.numerics.layer_backward(
                layer, params, saved[rows], dy, pos, self.plan.mlp_tile_tokens, accumulate, self.plan.seq_tile_tokens
            )
        self.b.dgrad[layer % 2][rows].copy_(dx)
        if chunk == self.plan.chunks - 1:
            self._gradient_done(unit)

    def _embed_bwd(self, chunk: int) -> None:
        if chunk == 0 and self.transient[("grad", 0)]:  # taken now, given back once copied out (_grad_out)
            self.b.gpu_grad[0] = torch.zeros(self.layouts[0].numel, dtype=torch.float32, device=self.device)
        elif chunk == 0 and not self.cfg.tie_word_embeddings:
            self.b.gpu_grad[0].zero_()
        rows = self._rows(chunk)
        weights = self.b.edge_weights[0]  # (ours reads none: the transient weights are gone by now)
        self.numerics.embed_backward(weights, self.tokens[chunk], self.b.dgrad[0][rows], self.b.gpu_grad[0])
        if chunk == self.plan.chunks - 1:
            self._gradient_done(0)

    def _gradient_done(self, unit: int) -> None:
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
        g = self.b.gpu_grad[unit][: self.layouts[unit].numel]
        self.sq_norm += torch.dot(g, g)

    def _grad_out(self, unit: int) -> None:
        """The unit's gradient to its host buffer: with several ranks, this rank's shard of it."""
        n = self.layouts[unit].numel
        part = slice(0, n) if self.ranks is None else self.ranks.shard(n)
        self.b.host_grad[unit][part].copy_(self.b.gpu_grad[unit][part], non_blocking=True)
        self.release_grad(unit)

    def release_grad(self, unit: int) -> None:
        """An edge's transient gradient: free for reuse once the work queued on this stream with it is done (its
        copy to the host, or a streamed update's last piece)."""
        if self.transient.get(("grad", unit), False):
            if self.device.type == "cuda":
                self.b.gpu_grad[unit].record_stream(torch.cuda.current_stream(self.device))
            self.b.gpu_grad[unit] = torch.empty(0)
