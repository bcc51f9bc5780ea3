"""One training step as a dependency graph of operations, the contract between runtime and simulator.

Each node is an op with: `seq` (program order; every resource serves its ops in this order, like a CUDA
stream), `kind`, `resource` (gpu, h2d, d2h, cpu, disk, and opt: the GPU stream of streamed updates), the unit or layer and chunk it touches, its work
(`flops`, `bytes` or `params`) and `alloc`/`free` (bytes per tier it takes and gives back). Edges are true
data dependencies and buffer reuse (write-after-read) hazards; ops on one resource are also ordered by seq.
Units: 0 is the embedding, 1..L the decoder layers, L+1 the final norm and LM head.
"""
from __future__ import annotations

import networkx as nx

from slideformer.models.config import ModelConfig

from slideformer.schedule.plan import STATE_STAGING_BUFFERS, STREAMED_IN_BYTES, STREAMED_OUT_BYTES, Plan

def layer_unit(layer: int) -> int:
    return layer + 1


def unit_numels(cfg: ModelConfig) -> list[int]:
    head = cfg.hidden_size + (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    return [cfg.vocab_size * cfg.hidden_size] + [cfg.layer_params] * cfg.num_layers + [head]


def activation_bytes_per_token(cfg: ModelConfig) -> int:
    """GPU bytes autograd keeps for one layer's forward, per token (bf16 tensors saved for backward)."""
    h, kv, ff = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    q = cfg.num_heads * cfg.head_dim
    return 2 * (4 * h + 3 * q + 3 * kv + 4 * ff) + 8


class _Builder:
    def __init__(self, cfg: ModelConfig, plan: Plan) -> None:
        self.cfg, self.plan = cfg, plan
        self.g = nx.DiGraph()
        self.seq = 0

    def op(self, name: str, kind: str, resource: str, deps: list[str | None], **attrs) -> str:
        attrs.setdefault("alloc", {})
        attrs.setdefault("free", {})
        self.g.add_node(name, seq=self.seq, kind=kind, resource=resource, **attrs)
        self.seq += 1
        for d in deps:
            if d is not None:
                assert d in self.g, f"{name} depends on unknown op {d}"
                self.g.add_edge(d, name)
        return name


def build_step_graph(cfg: ModelConfig, plan: Plan) -> nx.DiGraph:
    """The operation graph of one optimizer step under `plan` (already validated)."""
    b = _Builder(cfg, plan)
    L, W, C = cfg.num_layers, plan.window, plan.chunks
    numel = unit_numels(cfg)
    tok = plan.chunk * plan.seq  # tokens per chunk
    act_bytes = tok * cfg.hidden_size * 2
    attn = 2 * plan.chunk * plan.seq**2 * cfg.num_heads * cfg.head_dim  # causal QK^T + AV, forward
    fwd_flops = 2 * cfg.layer_params * tok + attn
    graph_bytes = activation_bytes_per_token(cfg) * tok
    last = C - 1

    def load(u: int, tag: str, deps: list[str | None]) -> str:
        """fp32 masters staged and cast on the GPU, a disk or streamed unit's bf16 weights kept in RAM, or
        GPU-resident."""
        on_gpu, bf16 = plan.placement[u] == "gpu", plan.placement[u] in ("disk", "streamed")
        return b.op(f"load:{u}:{tag}", "load", "gpu" if on_gpu else "h2d", deps, unit=u,
                    bytes=(2 if bf16 else 4) * numel[u], staged=not (on_gpu or bf16))

    # Disk-tier units, in update order, cycle through `disk_ring` host buffers: the first reads start with the
    # step, each later one as soon as the write-back of the unit before it in its buffer is done.
    update_order = [L + 1, *range(L, 0, -1), 0] if plan.update == "during_backward" else list(range(L + 2))
    disk_order = [u for u in update_order if plan.placement[u] == "disk"]
    disk_slot = {u: k % plan.disk_ring for k, u in enumerate(disk_order)}

    def disk_read(u: int, after: str | None) -> None:
        b.op(f"disk_read:{u}", "disk_read", "disk", [after], unit=u, slot=disk_slot[u], bytes=12 * numel[u])

    for u in disk_order[: plan.disk_ring]:
        disk_read(u, None)

    # Layers whose saved inputs go to disk pass them through `disk_ring` host buffers, in forward order on
    # the way out and in backward order on the way back (the disk serves its ops in order, so a read into a
    # buffer follows the write out of it).
    act_out = [lay for lay in range(L) if plan.activations[lay] == "disk"]
    act_back = act_out[::-1]
    layer_bytes = C * act_bytes

    def act_read(lay: int, after: list[str | None]) -> None:
        b.op(f"act_read:{lay}", "act_read", "disk", after, layer=lay, slot=act_back.index(lay) % plan.disk_ring,
             bytes=layer_bytes)

    def fetch(lay: int, c: int, war: str | None) -> None:
        if plan.activations[lay] == "offload":
            b.op(f"fetch:{lay}:{c}", "fetch", "h2d", [f"save:{lay}:{c}", war], layer=lay, chunk=c, bytes=act_bytes)
            return
        k = act_back.index(lay)
        b.op(f"fetch:{lay}:{c}", "fetch", "h2d", [f"act_read:{lay}", war], layer=lay, chunk=c, bytes=act_bytes,
             slot=k % plan.disk_ring)
        if c == C - 1 and k + plan.disk_ring < len(act_back):  # the buffer is free: read ahead into it
            act_read(act_back[k + plan.disk_ring], [f"fetch:{lay}:{cc}" for cc in range(C)])

    # --- forward ---------------------------------------------------------------------------
    load(0, "fwd", [])
    load(L + 1, "fwd", [])
    for lay in range(min(W - 1, L)):
        load(layer_unit(lay), "fwd", [])
    for c in range(C):
        b.op(f"embed:{c}", "embed", "gpu", ["load:0:fwd"], chunk=c, bytes=act_bytes)

    def producer(lay: int, c: int) -> str:
        return f"embed:{c}" if lay == 0 else f"fwd:{lay - 1}:{c}"

    for lay in range(L):
        ahead = lay + W - 1
        if ahead < L:  # into the slot of layer lay-1: wait until its forward is done
            load(layer_unit(ahead), "fwd", [f"fwd:{lay - 1}:{last}" if lay else None])
        policy = plan.activations[lay]
        for c in range(C):
            if policy == "offload":
                b.op(f"save:{lay}:{c}", "save", "d2h", [producer(lay, c)], layer=lay, chunk=c, bytes=act_bytes)
            if policy == "disk":
                k = act_out.index(lay)
                ring_war = f"act_write:{act_out[k - plan.disk_ring]}" if k >= plan.disk_ring else None
                b.op(f"save:{lay}:{c}", "save", "d2h", [producer(lay, c), ring_war], layer=lay, chunk=c,
                     bytes=act_bytes, slot=k % plan.disk_ring)
            saved_before = lay and plan.activations[lay - 1] in ("offload", "disk")
            war = f"save:{lay - 1}:{c}" if saved_before else None
            b.op(f"fwd:{lay}:{c}", "fwd", "gpu", [producer(lay, c), f"load:{layer_unit(lay)}:fwd", war],
                 layer=lay, chunk=c, flops=fwd_flops,
                 alloc={"gpu": graph_bytes if policy == "keep" else act_bytes if policy == "recompute" else 0})
        if policy == "disk":
            b.op(f"act_write:{lay}", "act_write", "disk", [f"save:{lay}:{c}" for c in range(C)], layer=lay,
                 slot=act_out.index(lay) % plan.disk_ring, bytes=layer_bytes)
    head_flops = 6 * cfg.vocab_size * cfg.hidden_size * tok
    for c in range(C):
        b.op(f"head:{c}", "head", "gpu", [f"fwd:{L - 1}:{c}", f"load:{L + 1}:fwd"], chunk=c, flops=head_flops)

    # --- backward and updates ------------------------------------------------------------
    ring: list[int] = []  # CPU-updated layers in gradient arrival order; they share `grad_ring` host buffers
    grad_buffer_reader: dict[int, str] = {}  # last D2H of each of the two shared GPU gradient buffers
    updates: dict[int, str] = {}

    state_outs: list[str] = []  # streamed-update pieces in order; they cycle through the GPU's state slots

    def streamed_update(u: int, ready: str) -> None:
        """Piece by piece: master and states in, the fused AdamW on the GPU, master, states and bf16 weights out."""
        piece = plan.state_piece_numel
        for p in range(plan.streamed_pieces(numel[u])):
            n = min(piece, numel[u] - p * piece)
            j = len(state_outs)
            war = state_outs[j - STATE_STAGING_BUFFERS] if j >= STATE_STAGING_BUFFERS else None
            slot = j % STATE_STAGING_BUFFERS
            into = b.op(f"state_in:{u}:{p}", "state_in", "h2d", [war], unit=u, piece=p, slot=slot,
                        bytes=STREAMED_IN_BYTES * n)
            step = b.op(f"state_update:{u}:{p}", "state_update", "opt", [into, ready], unit=u, piece=p, slot=slot,
                        params=n)
            state_outs.append(b.op(f"state_out:{u}:{p}", "state_out", "d2h", [step], unit=u, piece=p, slot=slot,
                                   bytes=STREAMED_OUT_BYTES * n))
        grad_buffer_reader[u % 2] = step
        updates[u] = state_outs[-1]

    def grad_out_and_update(u: int, ready: str) -> None:
        if plan.placement[u] == "streamed":
            streamed_update(u, ready)
            return
        if plan.placement[u] == "gpu":
            if plan.update == "during_backward":
                updates[u] = b.op(f"update:{u}", "update", "gpu", [ready], unit=u, params=numel[u])
            return
        ring_war = f"update:{L + 1}" if u == 0 and plan.shares_edge_grad else None
        late = u in plan.late_units
        if plan.update == "during_backward" and u not in (0, L + 1) and not late:
            if len(ring) >= plan.grad_ring:
                ring_war = f"update:{ring[-plan.grad_ring]}"
            ring.append(u)
        out = b.op(f"grad_out:{u}", "grad_out", "d2h", [ready, ring_war], unit=u, bytes=4 * numel[u])
        if u not in (0, L + 1):
            grad_buffer_reader[u % 2] = out
        if plan.update == "during_backward" and not late:
            host_update(u, [out])

    def host_update(u: int, deps: list[str]) -> None:
        """A CPU AdamW update; a disk unit's reads its states first, casts its new master to the bf16 weights
        kept in RAM and writes its states back after."""
        on_disk = plan.placement[u] == "disk"
        updates[u] = b.op(f"update:{u}", "update", "cpu", [*deps, f"disk_read:{u}" if on_disk else None],
                          unit=u, params=numel[u], cast=on_disk)
        if on_disk:
            write = b.op(f"disk_write:{u}", "disk_write", "disk", [updates[u]], unit=u, slot=disk_slot[u],
                         bytes=12 * numel[u])
            k = disk_order.index(u) + plan.disk_ring
            if k < len(disk_order):
                disk_read(disk_order[k], write)

    for lay in act_back[: plan.disk_ring]:
        act_read(lay, [f"act_write:{lay}"])
    grad_out_and_update(L + 1, f"head:{last}")
    resident = set(range(max(L - W, 0), L))
    for lay in reversed(range(L)):
        if lay == L - 1 and plan.activations[lay] in ("offload", "disk"):
            for c in range(C):
                fetch(lay, c, None)
        ahead = lay - W + 1
        if ahead >= 0 and ahead not in resident:
            # Into the slot of layer lay+1, whose backward is done by now.
            load(layer_unit(ahead), "bwd", [f"bwd:{lay + 1}:{last}"])
        if lay > 0 and plan.activations[lay - 1] in ("offload", "disk"):
            for c in range(C):
                fetch(lay - 1, c, f"bwd:{lay + 1}:{c}" if lay + 1 < L else None)
        weights = f"load:{layer_unit(lay)}:{'fwd' if lay in resident else 'bwd'}"
        policy = plan.activations[lay]
        shared_grad = plan.placement[layer_unit(lay)] != "gpu"
        grad_war = grad_buffer_reader.get(layer_unit(lay) % 2) if shared_grad else None
        for c in range(C):
            upstream = f"head:{c}" if lay == L - 1 else f"bwd:{lay + 1}:{c}"
            saved = f"fetch:{lay}:{c}" if policy in ("offload", "disk") else f"fwd:{lay}:{c}"
            flops = 2 * fwd_flops + (0 if policy == "keep" else fwd_flops)
            b.op(f"bwd:{lay}:{c}", "bwd", "gpu", [upstream, saved, weights, grad_war if c == 0 else None],
                 layer=lay, chunk=c, flops=flops,
                 free={"gpu": graph_bytes if policy == "keep" else act_bytes if policy == "recompute" else 0})
        grad_out_and_update(layer_unit(lay), f"bwd:{lay}:{last}")
    for c in range(C):
        b.op(f"embed_bwd:{c}", "embed_bwd", "gpu", [f"bwd:0:{c}"], chunk=c, bytes=act_bytes)
    grad_out_and_update(0, f"embed_bwd:{last}")
    for u in plan.late_units:  # after the whole backward, in the order the next forward needs them
        host_update(u, [f"grad_out:{u}"])

    if plan.update == "after_norm":
        ready = [n for n, a in b.g.nodes(data=True) if a["kind"] in ("grad_out", "embed_bwd", "head", "bwd")]
        norm = b.op("norm", "norm", "cpu", ready)
        for u in range(L + 2):  # forward order, so the next step's forward can start early
            if plan.placement[u] == "gpu":
                updates[u] = b.op(f"update:{u}", "update", "gpu", [norm], unit=u, params=numel[u])
            else:
                host_update(u, [norm])
    # Across steps: every load of a unit waits for the previous step's update of that unit.
    after_previous_step = {n: updates[a["unit"]] for n, a in b.g.nodes(data=True) if a["kind"] == "load"}
    b.g.graph.update(cfg=cfg, plan=plan, updates=updates, disk_slot=disk_slot, after_previous_step=after_previous_step)
    return b.g


def issue_order(g: nx.DiGraph) -> list[str]:
    return sorted(g.nodes, key=lambda n: g.nodes[n]["seq"])
