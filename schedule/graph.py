"""One training step as a dependency graph of operations, the contract between runtime and simulator.

Each node carries an `Op` record (`schedule.op`): its issue order `seq` (every resource serves its ops in
this order, like a CUDA stream), kind, resource, the unit or layer and chunk it touches, its work (flops,
bytes or parameters) and the GPU bytes it takes and gives back. Edges are true data dependencies and buffer
reuse (write-after-read) hazards; ops on one resource are also ordered by seq. Units: 0 is the embedding,
1..L the decoder layers, L+1 the final norm and LM head.
"""

from __future__ import annotations

from collections.abc import Sequence

import networkx as nx

from slideformer.models.config import GENERIC, ModelConfig

from slideformer.schedule.op import COLLECTIVES, Op, OpKind, Resource, collective_for
from slideformer.schedule.plan import STATE_STAGING_BUFFERS, STREAMED_IN_BYTES, STREAMED_OUT_BYTES, Plan


def layer_unit(layer: int) -> int:
    return layer + 1


def unit_numels(cfg: ModelConfig) -> list[int]:
    head = cfg.hidden_size + (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    return [cfg.vocab_size * cfg.hidden_size] + [cfg.layer_params] * cfg.num_layers + [head]


def transient_embedding_grad(cfg: ModelConfig, plan: Plan) -> bool:
    """The embedding's fp32 gradient exists on the GPU only from its backward until it has been copied to the
    host (a host-updated, untied embedding: nothing else reads it), rather than through the whole step."""
    return plan.placement[0] != "gpu" and not cfg.tie_word_embeddings


def transient_embedding_weights(cfg: ModelConfig, plan: Plan) -> bool:
    """The embedding's bf16 weights exist on the GPU only from their load until the forward's last lookup (as
    its gradient, and where the backward needs no weights: our numerics)."""
    return transient_embedding_grad(cfg, plan) and cfg.family != GENERIC


def transient_head_weights(cfg: ModelConfig, plan: Plan) -> bool:
    """The final norm's and LM head's bf16 weights exist on the GPU only from their load until the head's last
    piece (a host-updated, untied head: the head computes its loss and gradients at once)."""
    return plan.placement[-1] != "gpu" and not cfg.tie_word_embeddings


def transient_edge(cfg: ModelConfig, plan: Plan, what: str, unit: int) -> bool:
    """Whether an edge's (unit 0 or L+1) 'edge_weights' or 'grad' buffer is taken and given back within the step
    rather than static: the one rule the graph, the memory model and the runtime read."""
    if unit == 0:
        return (transient_embedding_grad if what == "grad" else transient_embedding_weights)(cfg, plan)
    assert unit == cfg.num_layers + 1, "only the edges' buffers can be transient"
    return plan.transient_head_grad if what == "grad" else transient_head_weights(cfg, plan)


def attention_stats_bytes(cfg: ModelConfig, tokens: int, itemsize: int) -> int:
    """Bytes of one layer's saved attention output and fp32 log-sum-exp for `tokens` tokens
    (`Plan.saved_attention`)."""
    return tokens * cfg.num_heads * (cfg.head_dim * itemsize + 4)


def activation_bytes_per_token(cfg: ModelConfig) -> int:
    """GPU bytes autograd keeps for one layer's forward, per token (bf16 tensors saved for backward)."""
    h, kv, ff = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    q = cfg.num_heads * cfg.head_dim
    return 2 * (4 * h + 3 * q + 3 * kv + 4 * ff) + 8


class _StepGraph:
    """Builds the graph in the order the runtime issues it, in named steps: the forward, then the backward
    with each unit's gradient and update, then (after_norm) the updates after the norm; the hazards on
    shared buffers (window slots, gradient rings, disk rings, streamed-state slots) are edges added where
    the buffer is reused."""

    def __init__(self, cfg: ModelConfig, plan: Plan) -> None:
        self.cfg, self.plan = cfg, plan
        self.g = nx.DiGraph()
        self.seq = 0
        L, C = cfg.num_layers, plan.chunks
        self.L, self.W, self.C, self.last = L, plan.window, C, C - 1
        self.numel = unit_numels(cfg)
        self.itemsize = plan.compute_itemsize
        tok = plan.chunk * plan.seq  # tokens per chunk
        self.act_bytes = tok * cfg.hidden_size * 2
        self.attention_bytes = attention_stats_bytes(cfg, tok, self.itemsize)  # a saved attention's, per chunk
        attn = 2 * plan.chunk * plan.seq**2 * cfg.num_heads * cfg.head_dim  # causal QK^T + AV, forward
        self.fwd_flops = 2 * cfg.layer_params * tok + attn
        self.graph_bytes = activation_bytes_per_token(cfg) * tok
        self.head_flops = 6 * cfg.vocab_size * cfg.hidden_size * tok
        # Disk-tier units, in update order, cycle through `disk_ring` host buffers: the first reads start with
        # the step, each later one as soon as the write-back of the unit before it in its buffer is done.
        update_order = [L + 1, *range(L, 0, -1), 0] if plan.update == "during_backward" else list(range(L + 2))
        self.disk_order = [u for u in update_order if plan.placement[u] == "disk"]
        self.disk_slot = {u: k % plan.disk_ring for k, u in enumerate(self.disk_order)}
        # Layers whose saved inputs go to disk pass them through `disk_ring` host buffers, in forward order on
        # the way out and in backward order on the way back (the disk serves its ops in order, so a read into
        # a buffer follows the write out of it).
        self.act_out = [lay for lay in range(L) if plan.activations[lay] == "disk"]
        self.act_back = self.act_out[::-1]
        self.ring: list[int] = []  # CPU-updated layers in gradient arrival order; they share `grad_ring` buffers
        self.grad_buffer_reader: dict[int, str] = {}  # last reader of each of the two shared GPU gradient buffers
        self.slot_reader: dict[int, str] = {}  # last reader of each decoder-layer weight slot
        self.state_outs: list[str] = []  # streamed-update pieces in order; they cycle through the state slots
        self.master_slot = plan.streamed_master_slot  # {master-loading unit: its GPU master slot}
        self.master_slot_reader: dict[int, str] = {}  # last copy out of each GPU master slot
        self.updates: dict[int, str] = {}

    def op(self, name: str, kind: OpKind, resource: Resource, deps: Sequence[str | None], **fields) -> str:
        self.g.add_node(name, op=Op(name, self.seq, kind, resource, **fields))
        self.seq += 1
        for d in deps:
            if d is not None:
                assert d in self.g, f"{name} depends on unknown op {d}"
                self.g.add_edge(d, name)
        return name

    def build(self) -> nx.DiGraph:
        self.forward()
        self.backward()
        if self.plan.update == "after_norm":
            self.updates_after_norm()
        # Across steps: every load of a unit waits for the previous step's update of that unit.
        after_previous_step = {
            o.name: self.updates[o.unit] for o in ops(self.g) if o.kind == OpKind.LOAD and o.unit is not None
        }
        self.g.graph.update(
            cfg=self.cfg,
            plan=self.plan,
            updates=self.updates,
            disk_slot=self.disk_slot,
            after_previous_step=after_previous_step,
        )
        return self.g

    # --- weights and saved inputs ------------------------------------------------------------
    def load(self, u: int, tag: str, deps: list[str | None]) -> str:
        """fp32 masters staged and cast on the GPU, bf16 weights kept in RAM (`Plan.keeps_bf16_weights`), or
        GPU-resident; a streamed layer's backward its fp32 master into its master slot, once the copy out of
        the layer before it there is done, cast on the GPU (`Plan.streamed_master_slots`)."""
        if tag == "bwd" and u in self.master_slot:
            slot = self.master_slot[u]
            return self.op(
                f"load:{u}:{tag}",
                OpKind.LOAD,
                Resource.H2D,
                [*deps, self.master_slot_reader.get(slot)],
                unit=u,
                slot=slot,
                nbytes=4 * self.numel[u],
            )
        on_gpu, bf16 = self.plan.placement[u] == "gpu", self.plan.keeps_bf16_weights(u)
        # transient edge weights are taken here, and given back by the embedding's or the head's last chunk
        transient = u in (0, self.L + 1) and transient_edge(self.cfg, self.plan, "edge_weights", u)
        return self.op(
            f"load:{u}:{tag}",
            OpKind.LOAD,
            Resource.GPU if on_gpu else Resource.H2D,
            deps,
            unit=u,
            nbytes=(2 if bf16 else 4) * self.numel[u],
            staged=not (on_gpu or bf16),
            gpu_alloc=self.itemsize * self.numel[u] if transient else 0,
        )

    def disk_read(self, u: int, after: str | None) -> None:
        self.op(
            f"disk_read:{u}",
            OpKind.DISK_READ,
            Resource.DISK,
            [after],
            unit=u,
            slot=self.disk_slot[u],
            nbytes=12 * self.numel[u],
        )

    def act_read(self, lay: int, after: list[str | None]) -> None:
        self.op(
            f"act_read:{lay}",
            OpKind.ACT_READ,
            Resource.DISK,
            after,
            layer=lay,
            slot=self.act_back.index(lay) % self.plan.disk_ring,
            nbytes=self.C * self.act_bytes,
        )

    def fetch(self, lay: int, c: int, war: str | None) -> None:
        if self.plan.attention_in_ram(lay):  # into the buffer the layer two above read in its backward
            above = f"bwd:{lay + 2}:{c}" if self.plan.attention_in_ram(lay + 2) else None
            self.op(
                f"fetch_attention:{lay}:{c}",
                OpKind.FETCH_ATTENTION,
                Resource.H2D,
                [f"save_attention:{lay}:{c}", above],
                layer=lay,
                chunk=c,
                nbytes=self.attention_bytes,
            )
        if self.plan.activations[lay] == "offload":
            self.op(
                f"fetch:{lay}:{c}",
                OpKind.FETCH,
                Resource.H2D,
                [f"save:{lay}:{c}", war],
                layer=lay,
                chunk=c,
                nbytes=self.act_bytes,
            )
            return
        k = self.act_back.index(lay)
        self.op(
            f"fetch:{lay}:{c}",
            OpKind.FETCH,
            Resource.H2D,
            [f"act_read:{lay}", war],
            layer=lay,
            chunk=c,
            nbytes=self.act_bytes,
            slot=k % self.plan.disk_ring,
        )
        if c == self.C - 1 and k + self.plan.disk_ring < len(self.act_back):  # the buffer is free: read ahead
            self.act_read(self.act_back[k + self.plan.disk_ring], [f"fetch:{lay}:{cc}" for cc in range(self.C)])

    # --- forward ---------------------------------------------------------------------------
    def forward(self) -> None:
        plan, L, W, C, last = self.plan, self.L, self.W, self.C, self.last
        for u in self.disk_order[: plan.disk_ring]:
            self.disk_read(u, None)
        # a deferred head's load would hold up the layers' loads behind it: it goes after the last of them
        head_late = L + 1 in plan.late_units
        self.load(0, "fwd", [])
        if not head_late:
            self.load(L + 1, "fwd", [])
        for lay in range(min(W - 1, L)):
            self.load(layer_unit(lay), "fwd", [])
        weights = self.itemsize * self.numel[0] if transient_edge(self.cfg, plan, "edge_weights", 0) else 0
        for c in range(C):
            self.op(
                f"embed:{c}",
                OpKind.EMBED,
                Resource.GPU,
                ["load:0:fwd"],
                chunk=c,
                nbytes=self.act_bytes,
                gpu_free=weights if c == last else 0,
            )
        for lay in range(L):
            ahead = lay + W - 1
            if ahead < L:  # into its slot once the last layer in it (a window slot's: layer lay-1) is done
                self.load(layer_unit(ahead), "fwd", [self.slot_reader.get(plan.weight_slot(ahead))])
                if head_late and ahead == L - 1:
                    self.load(L + 1, "fwd", [])
            self.forward_layer(lay)
        weights = self.itemsize * self.numel[L + 1] if transient_edge(self.cfg, plan, "edge_weights", L + 1) else 0
        grad = 4 * self.numel[L + 1] if transient_edge(self.cfg, plan, "grad", L + 1) else 0  # freed by grad_out
        for c in range(C):
            self.op(
                f"head:{c}",
                OpKind.HEAD,
                Resource.GPU,
                [f"fwd:{L - 1}:{c}", f"load:{L + 1}:fwd"],
                chunk=c,
                flops=self.head_flops,
                gpu_alloc=grad if c == 0 else 0,
                gpu_free=weights if c == last else 0,
            )

    def forward_layer(self, lay: int) -> None:
        plan, policy = self.plan, self.plan.activations[lay]
        for c in range(self.C):
            producer = f"embed:{c}" if lay == 0 else f"fwd:{lay - 1}:{c}"
            if policy == "offload":
                self.op(
                    f"save:{lay}:{c}", OpKind.SAVE, Resource.D2H, [producer], layer=lay, chunk=c, nbytes=self.act_bytes
                )
            if policy == "disk":
                k = self.act_out.index(lay)
                ring_war = f"act_write:{self.act_out[k - plan.disk_ring]}" if k >= plan.disk_ring else None
                self.op(
                    f"save:{lay}:{c}",
                    OpKind.SAVE,
                    Resource.D2H,
                    [producer, ring_war],
                    layer=lay,
                    chunk=c,
                    nbytes=self.act_bytes,
                    slot=k % plan.disk_ring,
                )
            saved_before = lay and plan.activations[lay - 1] in ("offload", "disk")
            war = f"save:{lay - 1}:{c}" if saved_before else None
            # a saved attention goes into one of two buffers, free once the layer two below has copied out of it
            attention_war = f"save_attention:{lay - 2}:{c}" if lay >= 2 and plan.attention_in_ram(lay) else None
            kept = {"keep": self.graph_bytes, "recompute": self.act_bytes}.get(policy, 0)
            self.op(
                f"fwd:{lay}:{c}",
                OpKind.FWD,
                Resource.GPU,
                [producer, f"load:{layer_unit(lay)}:fwd", war, attention_war],
                layer=lay,
                chunk=c,
                flops=self.fwd_flops,
                gpu_alloc=kept,
            )
            if plan.attention_in_ram(lay):
                self.op(
                    f"save_attention:{lay}:{c}",
                    OpKind.SAVE_ATTENTION,
                    Resource.D2H,
                    [f"fwd:{lay}:{c}"],
                    layer=lay,
                    chunk=c,
                    nbytes=self.attention_bytes,
                )
        self.slot_reader[plan.weight_slot(lay)] = f"fwd:{lay}:{self.last}"
        if policy == "disk":
            self.op(
                f"act_write:{lay}",
                OpKind.ACT_WRITE,
                Resource.DISK,
                [f"save:{lay}:{c}" for c in range(self.C)],
                layer=lay,
                slot=self.act_out.index(lay) % plan.disk_ring,
                nbytes=self.C * self.act_bytes,
            )

    # --- backward and updates ------------------------------------------------------------
    def backward(self) -> None:
        plan, L, W, C, last = self.plan, self.L, self.W, self.C, self.last
        for lay in self.act_back[: plan.disk_ring]:
            self.act_read(lay, [f"act_write:{lay}"])
        self.grad_out_and_update(L + 1, f"head:{last}")
        for lay in reversed(range(L)):
            # Saved inputs come back into the forward's hidden-state buffers, whose last reader is the head.
            if lay == L - 1 and plan.activations[lay] in ("offload", "disk"):
                for c in range(C):
                    self.fetch(lay, c, f"head:{c}")
            ahead = lay - W + 1
            if ahead >= 0 and plan.loads_for_backward(ahead):
                # Into its window slot, once the layer above in it (at most layer lay+1) is done.
                self.load(layer_unit(ahead), "bwd", [self.slot_reader[plan.weight_slot(ahead)]])
            if lay > 0 and plan.activations[lay - 1] in ("offload", "disk"):
                for c in range(C):
                    self.fetch(lay - 1, c, f"bwd:{lay + 1}:{c}" if lay + 1 < L else f"head:{c}")
            self.backward_layer(lay, f"load:{layer_unit(lay)}:{'bwd' if plan.loads_for_backward(lay) else 'fwd'}")
            self.grad_out_and_update(layer_unit(lay), f"bwd:{lay}:{last}")
        grad = 4 * self.numel[0] if transient_edge(self.cfg, plan, "grad", 0) else 0  # taken here, freed by grad_out
        for c in range(C):
            self.op(
                f"embed_bwd:{c}",
                OpKind.EMBED_BWD,
                Resource.GPU,
                [f"bwd:0:{c}"],
                chunk=c,
                nbytes=self.act_bytes,
                gpu_alloc=grad if c == 0 else 0,
            )
        self.grad_out_and_update(0, f"embed_bwd:{last}")
        for u in plan.late_units:  # after the whole backward, in the order the next forward needs them
            self.host_update(u, [f"grad_out:{u}"])

    def backward_layer(self, lay: int, weights: str) -> None:
        policy, L = self.plan.activations[lay], self.L
        shared_grad = self.plan.placement[layer_unit(lay)] != "gpu"
        grad_war = self.grad_buffer_reader.get(layer_unit(lay) % 2) if shared_grad else None
        kept = {"keep": self.graph_bytes, "recompute": self.act_bytes}.get(policy, 0)
        flops = 2 * self.fwd_flops + (0 if policy == "keep" else self.fwd_flops)
        for c in range(self.C):
            upstream = f"head:{c}" if lay == L - 1 else f"bwd:{lay + 1}:{c}"
            saved = f"fetch:{lay}:{c}" if policy in ("offload", "disk") else f"fwd:{lay}:{c}"
            attention = f"fetch_attention:{lay}:{c}" if self.plan.attention_in_ram(lay) else None
            # a transient head gradient is gone before the first layer's backward takes its workspace
            head_out = f"grad_out:{L + 1}" if lay == L - 1 and c == 0 and self.plan.transient_head_grad else None
            self.op(
                f"bwd:{lay}:{c}",
                OpKind.BWD,
                Resource.GPU,
                [upstream, saved, attention, weights, grad_war if c == 0 else None, head_out],
                layer=lay,
                chunk=c,
                flops=flops,
                gpu_free=kept,
            )
        self.slot_reader[self.plan.weight_slot(lay)] = f"bwd:{lay}:{self.last}"

    def grad_out_and_update(self, u: int, ready: str) -> None:
        """A unit's gradient is complete: streamed to the GPU's AdamW, updated in place on the GPU, or copied to
        its host buffer (and, during_backward, updated by the CPU AdamW now unless it is a late unit). With
        several ranks it is first summed across them, and what follows reads the sum."""
        plan, L = self.plan, self.L
        if plan.ranks > 1:  # NCCL runs on the compute stream, right after the gradient's last contribution
            kind = collective_for(plan.placement[u])
            ready = self.op(f"{kind}:{u}", kind, Resource.GPU, [ready], unit=u, nbytes=4 * self.numel[u])
        if plan.placement[u] == "streamed":
            self.streamed_update(u, ready)
            return
        if plan.placement[u] == "gpu":
            if plan.update == "during_backward":
                self.updates[u] = self.op(
                    f"update:{u}", OpKind.UPDATE, Resource.GPU, [ready], unit=u, params=self.numel[u]
                )
            return
        ring_war = f"update:{L + 1}" if u == 0 and plan.shares_edge_grad else None
        late = u in plan.late_units
        if plan.update == "during_backward" and u not in (0, L + 1) and not late:
            if len(self.ring) >= plan.grad_ring:
                ring_war = f"update:{self.ring[-plan.grad_ring]}"
            self.ring.append(u)
        transient = u in (0, L + 1) and transient_edge(self.cfg, plan, "grad", u)
        out = self.op(
            f"grad_out:{u}",
            OpKind.GRAD_OUT,
            Resource.D2H,
            [ready, ring_war],
            unit=u,
            nbytes=plan.grad_itemsize(u) * plan.shard_numel(self.numel[u]),
            gpu_free=4 * self.numel[u] if transient else 0,
        )
        if u not in (0, L + 1):
            self.grad_buffer_reader[u % 2] = out
        if plan.update == "during_backward" and not late:
            self.host_update(u, [out])

    def streamed_update(self, u: int, ready: str) -> None:
        """Piece by piece: master and states in, the fused AdamW on the GPU, master, states and bf16 weights out.
        A transient edge gradient (the embedding's) is given back by the last piece's update."""
        piece, pieces = self.plan.state_piece_numel, self.plan.streamed_pieces(self.numel[u])
        transient = u == 0 and transient_edge(self.cfg, self.plan, "grad", 0)
        master_loaded = u in self.master_slot  # only the AdamW states come in
        for p in range(pieces):
            n = min(piece, self.numel[u] - p * piece)
            j = len(self.state_outs)
            war = self.state_outs[j - STATE_STAGING_BUFFERS] if j >= STATE_STAGING_BUFFERS else None
            slot = j % STATE_STAGING_BUFFERS
            into = self.op(
                f"state_in:{u}:{p}",
                OpKind.STATE_IN,
                Resource.H2D,
                [war],
                unit=u,
                piece=p,
                slot=slot,
                nbytes=(STREAMED_IN_BYTES - 4 * master_loaded) * n,
            )
            step = self.op(
                f"state_update:{u}:{p}",
                OpKind.STATE_UPDATE,
                Resource.OPT,
                [into, ready],
                unit=u,
                piece=p,
                slot=slot,
                params=n,
                gpu_free=4 * self.numel[u] if transient and p == pieces - 1 else 0,
            )
            self.state_outs.append(
                self.op(
                    f"state_out:{u}:{p}",
                    OpKind.STATE_OUT,
                    Resource.D2H,
                    [step],
                    unit=u,
                    piece=p,
                    slot=slot,
                    nbytes=STREAMED_OUT_BYTES * n,
                )
            )
        if 0 < u <= self.L:  # a layer's gradient buffer is free for the layer two below
            self.grad_buffer_reader[u % 2] = step
        if master_loaded:
            self.master_slot_reader[self.master_slot[u]] = self.state_outs[-1]
        self.updates[u] = self.state_outs[-1]

    def host_update(self, u: int, deps: list[str]) -> None:
        """A CPU AdamW update, which casts the new master to the bf16 weights kept in RAM where the unit has
        them; a disk unit's reads its states first and writes them back after."""
        plan = self.plan
        on_disk = plan.placement[u] == "disk"
        self.updates[u] = self.op(
            f"update:{u}",
            OpKind.UPDATE,
            Resource.CPU,
            [*deps, f"disk_read:{u}" if on_disk else None],
            unit=u,
            params=self.numel[u],
            cast=plan.keeps_bf16_weights(u),
        )
        if on_disk:
            write = self.op(
                f"disk_write:{u}",
                OpKind.DISK_WRITE,
                Resource.DISK,
                [self.updates[u]],
                unit=u,
                slot=self.disk_slot[u],
                nbytes=12 * self.numel[u],
            )
            k = self.disk_order.index(u) + plan.disk_ring
            if k < len(self.disk_order):
                self.disk_read(self.disk_order[k], write)

    def updates_after_norm(self) -> None:
        """after_norm: the global norm once every gradient is in, then every update in forward order, so the
        next step's forward can start early."""
        complete = (OpKind.GRAD_OUT, *COLLECTIVES, OpKind.EMBED_BWD, OpKind.HEAD, OpKind.BWD)
        ready = [o.name for o in ops(self.g) if o.kind in complete]
        norm = self.op("norm", OpKind.NORM, Resource.CPU, ready)
        for u in range(self.L + 2):
            if self.plan.placement[u] == "gpu":
                self.updates[u] = self.op(
                    f"update:{u}", OpKind.UPDATE, Resource.GPU, [norm], unit=u, params=self.numel[u]
                )
            else:
                self.host_update(u, [norm])


def build_step_graph(cfg: ModelConfig, plan: Plan) -> nx.DiGraph:
    """The operation graph of one optimizer step under `plan` (already validated)."""
    return _StepGraph(cfg, plan).build()


def op_of(g: nx.DiGraph, name: str) -> Op:
    return g.nodes[name]["op"]


def ops(g: nx.DiGraph) -> list[Op]:
    """The graph's ops in issue order."""
    return sorted((a["op"] for _, a in g.nodes(data=True)), key=lambda o: o.seq)
