"""Seconds each operation of the step graph takes on a profiled machine.

Layer and head times come from the profile's measurements of the model's own shapes (linear in tokens
between measured chunk sizes); shapes it did not measure run at the measured efficiency of the shapes it
did (or half of peak for a spec-sheet profile). Copies cost latency + bytes / bandwidth; a staged fp32
weight load holds the link as its copy alone does, its casts overlapping the copies of the pieces after
them. These are each copy's rate alone; the simulator's replay shares the measured duplex rate between the
two directions while both copy, and slows host-to-GPU copies beside the CPU's updates.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from functools import lru_cache

import networkx as nx
import numpy as np

from slideformer.schedule.profile import Profile, ProfileError, fit_at
from slideformer.models.config import ModelConfig
from slideformer.schedule.graph import op_of, unit_numels
from slideformer.schedule.op import COLLECTIVES, OpKind, Resource, collective_for
from slideformer.schedule.memory import saved_input_bytes
from slideformer.schedule.plan import STREAMED_IN_BYTES, STREAMED_OUT_BYTES, Plan

SPEC_EFFICIENCY = 0.5  # achieved/peak GEMM rate assumed for layers no profile measured
STAGING_PIECE_LAUNCH_S = 20e-6  # host cost of one staging copy + cast pair
COPY_LAUNCH_S = 10e-6
# Two consumer cards without NVLink: NCCL through PCIe 4.0 x16, an assumption until measured (a profile's
# `gpu_link_bandwidth` replaces it).
DEFAULT_GPU_LINK_BANDWIDTH = 25e9
COLLECTIVE_LATENCY_S = 50e-6  # one NCCL collective's launch and ring steps, an assumption until measured


def layer_flops(cfg: ModelConfig, seq: int, tokens: int) -> float:
    """Forward flops of one decoder layer (matmuls and causal attention)."""
    attn = 2 * tokens * seq * cfg.num_heads * cfg.head_dim
    return 2 * cfg.layer_params * tokens + attn


class CostModel:
    def __init__(self, profile: Profile, cfg: ModelConfig, seq: int) -> None:
        if not profile.has_gpu or profile.h2d is None or profile.d2h is None:
            raise ProfileError(
                f"profile {profile.name!r} has no GPU measurements; calibrate on a GPU machine "
                "or pass a GPU profile (e.g. --profile h100-80gb)"
            )
        self.p, self.cfg, self.seq = profile, cfg, seq
        # the GPU measurements checked above, as non-optional values
        self.h2d, self.d2h = profile.h2d, profile.d2h
        self.gpu_flops = float(profile.gpu_bf16_flops or 0.0)
        self.gpu_memory_bandwidth = float(profile.gpu_memory_bandwidth or 0.0)
        self.gpu_adamw_rate = float(profile.gpu_adamw_params_per_s or 0.0)
        shape = cfg.layer_shape()
        whole = [t for t in profile.layers if not t.seq_tile]
        self.own = [t for t in whole if t.shape() == shape and t.seq == seq]
        self.same_shape = [t for t in whole if t.shape() == shape]
        self.own_tiled = [t for t in profile.layers if t.seq_tile and t.shape() == shape and t.seq == seq]
        self.heads = [t for t in profile.heads if (t.hidden, t.vocab) == (cfg.hidden_size, cfg.vocab_size)]
        peak = self.gpu_flops

        def efficiency(work: float, key: str) -> float:
            rates = [work * layer_flops(_cfg_of(t, cfg), t.seq, t.tokens) / getattr(t, key) / peak for t in whole]
            return statistics.median(rates) if rates else SPEC_EFFICIENCY

        self.eff = {
            "fwd_s": efficiency(1, "fwd_s"),
            "bwd_recompute_s": efficiency(3, "bwd_recompute_s"),
            "bwd_kept_s": efficiency(2, "bwd_kept_s"),
        }

    @lru_cache(maxsize=None)
    def layer(self, key: str, tokens: int, seq_tile: int = 0) -> float:
        """key: fwd_s, bwd_recompute_s, bwd_kept_s or bwd_saved_attention_s; `seq_tile` (fwd_s,
        bwd_recompute_s): the layer in sequence tiles, as measured at this tile, else the whole layer's time plus the pass that recomputes k and v."""
        if seq_tile:
            tiled = fit_at([(t.tokens, getattr(t, key)) for t in self.own_tiled if t.seq_tile == seq_tile], tokens)
            if tiled is not None:
                return tiled
            kv = 2 * self.cfg.hidden_size * self.cfg.num_kv_heads * self.cfg.head_dim / self.cfg.layer_params
            return self.layer(key, tokens) + (self.layer("fwd_s", tokens) * kv if key == "bwd_recompute_s" else 0.0)
        pts = [(t.tokens, getattr(t, key)) for t in self.own]
        if key == "bwd_saved_attention_s":  # measured on some entries only
            pts = [p for p in pts if p[1] > 0]
            if not pts:  # not at this length: the share of the recompute measured at a shorter one
                return self.layer("bwd_recompute_s", tokens) * self._saved_attention_share()
        if len(pts) >= 2:
            slope, intercept = np.polyfit([p[0] for p in pts], [p[1] for p in pts], 1)
            return float(max(slope * tokens + intercept, min(p[1] for p in pts) * tokens / max(p[0] for p in pts)))
        if pts:
            return pts[0][1] * tokens / pts[0][0]
        between = self._between_lengths(key, tokens)
        if between is not None:
            return between
        work = {"fwd_s": 1, "bwd_recompute_s": 3, "bwd_kept_s": 2, "bwd_saved_attention_s": 3}[key]
        eff = self.eff.get(key, self.eff["bwd_recompute_s"])
        return work * layer_flops(self.cfg, self.seq, tokens) / (self.gpu_flops * eff)

    def _saved_attention_share(self) -> float:
        """The backward from a saved attention as a share of the recomputing one, at the longest length up to
        this one where the profile timed both (attention's part of a layer grows with the length, so a shorter
        length's gain understates this one's); 1 (no gain claimed) where none was timed below."""
        timed = [t for t in self.same_shape if t.bwd_saved_attention_s > 0 and t.bwd_recompute_s > 0]
        below = [t for t in timed if t.seq <= self.seq]
        if not below:
            return 1.0
        t = max(below, key=lambda t: (t.seq, t.tokens))
        return min(1.0, t.bwd_saved_attention_s / t.bwd_recompute_s)

    def _between_lengths(self, key: str, tokens: int) -> float | None:
        """The layer at a sequence length the profile did not time, from the two timed lengths nearest it
        (the same shape): per token, the matmuls cost the same at any length and causal attention grows in
        proportion to it, so the time per token is a line in the length. Each length's time per token is
        taken at its largest timed chunk (small chunks carry launch overheads). None without two lengths."""
        per_token: dict[int, tuple[int, float]] = {}
        for t in self.same_shape:
            if getattr(t, key) > 0 and t.tokens >= per_token.get(t.seq, (0, 0.0))[0]:
                per_token[t.seq] = (t.tokens, getattr(t, key) / t.tokens)
        if len(per_token) < 2:
            return None
        lengths = sorted(per_token)
        below, above = [s for s in lengths if s < self.seq], [s for s in lengths if s > self.seq]
        if below and above:
            lo, hi = below[-1], above[0]
        else:  # beyond the timed lengths: the line through the two nearest
            lo, hi = (above[0], above[1]) if above else (below[-2], below[-1])
        (_, a), (_, b) = per_token[lo], per_token[hi]
        return tokens * max(a + (b - a) * (self.seq - lo) / (hi - lo), min(a, b))

    @lru_cache(maxsize=None)
    def head(self, tokens: int) -> float:
        measured = fit_at([(t.tokens, t.s) for t in self.heads], tokens)
        if measured is not None:
            return measured
        flops = 6 * self.cfg.vocab_size * self.cfg.hidden_size * tokens
        return flops / (self.gpu_flops * self.eff["bwd_kept_s"])

    def copy(self, direction: str, nbytes: int) -> float:
        link = self.h2d if direction == "h2d" else self.d2h
        return link.latency_s + nbytes / link.bandwidth

    def load(self, nbytes: int, piece_mb: int) -> float:
        """A staged fp32 -> bf16 weight load: its pieces' copies back to back, then the last piece's cast (each
        other cast runs beside the next piece's copy). Traced steps measure the load at the link's rate: 16.6
        ms per 8B layer on the H200 (bench/results/h200-2026-12-01-late-fidelity-1024x8-leaseA.json), where
        calibrate's load beside one 64K-token backward took 38.5 (its casts waited for that backward's SMs)."""
        piece = piece_mb * 2**20
        pieces = -(-nbytes // piece)
        return (
            self.copy("h2d", nbytes)
            + (pieces - 1) * self.h2d.latency_s
            + self.gpu_bytes_moved(1.5 * min(piece, nbytes))
        )

    def master_load(self, numel: int) -> float:
        """A streamed layer's fp32 master copied whole into its GPU master slot, then cast into its window slot
        (read 4 bytes, write 2)."""
        return self.copy("h2d", 4 * numel) + self.gpu_bytes_moved(6 * numel)

    def host_unit_load(self, plan: Plan, unit: int, numel: int) -> float:
        """A host unit's weights onto the GPU: its bf16 weights kept in RAM copied over, or its fp32 master
        staged and cast."""
        if plan.keeps_bf16_weights(unit):
            return self.copy("h2d", 2 * numel)
        return self.load(4 * numel, plan.transfer_chunk_mb)

    def collective(self, kind: OpKind, nbytes: int, ranks: int) -> float:
        """A ring all-reduce of `nbytes` over `ranks` GPUs (each link carries 2 (N - 1) / N of the bytes), or a
        reduce-scatter (its first half: (N - 1) / N)."""
        link = self.p.gpu_link_bandwidth or DEFAULT_GPU_LINK_BANDWIDTH
        passes = 2 if kind == OpKind.ALLREDUCE else 1
        return COLLECTIVE_LATENCY_S + passes * (ranks - 1) / ranks * nbytes / link

    def gpu_bytes_moved(self, nbytes: float) -> float:
        return nbytes / self.gpu_memory_bandwidth

    def disk(self, direction: str, nbytes: int) -> float:
        if self.p.disk is None:
            raise ProfileError(
                f"profile {self.p.name!r} has no disk measurements; calibrate with --disk-dir "
                "on the disk the tier will use"
            )
        d = self.p.disk
        if direction == "read":
            return d.read_latency_s + nbytes / d.read_bandwidth
        return d.write_latency_s + nbytes / d.write_bandwidth

    def host_update(self, params: int, cast: bool) -> float:
        """CPU AdamW, with the cast of the new master to bf16 weights kept in RAM where the unit has them: in the
        update's own pass where the profile measured it, else as a second pass."""
        one_pass = self.p.cpu_adamw_cast_rate()
        if cast and one_pass:
            return params / one_pass
        rate = self.p.host_cast_bandwidth or self.p.host_memcpy_bandwidth  # spec sheets give only the latter
        return params / self.p.cpu_adamw_rate() + (4 * params / rate if cast and rate else 0.0)


def _cfg_of(t, like: ModelConfig) -> ModelConfig:
    """A config with a timing entry's shape, for its flop count (layer_params needs the whole shape)."""
    return replace(
        like,
        hidden_size=t.hidden,
        intermediate_size=t.intermediate,
        num_heads=t.heads,
        num_kv_heads=t.kv_heads,
        head_dim=t.head_dim,
    )


def backward_key(plan: Plan, layer: int) -> str:
    """Which of a layer's measured backward times its backward takes under the plan."""
    if plan.activations[layer] == "keep":
        return "bwd_kept_s"
    return "bwd_saved_attention_s" if plan.saves_attention(layer) else "bwd_recompute_s"


def op_seconds(g: nx.DiGraph, name: str, cost: CostModel) -> float:
    """Duration of op `name` once it starts."""
    a = op_of(g, name)
    cfg, plan = g.graph["cfg"], g.graph["plan"]
    tokens = plan.chunk * plan.seq
    kind = a.kind
    if kind == OpKind.LOAD:
        if a.resource == Resource.GPU:  # fp32 master already on the GPU: read 4 bytes, write 2
            return cost.gpu_bytes_moved(a.nbytes * 1.5)
        if a.slot is not None:  # a streamed layer's master into its master slot
            return cost.master_load(a.nbytes // 4)
        return cost.load(a.nbytes, plan.transfer_chunk_mb) if a.staged else cost.copy("h2d", a.nbytes)
    if kind in (OpKind.SAVE, OpKind.SAVE_ATTENTION, OpKind.GRAD_OUT, OpKind.STATE_OUT):
        return cost.copy("d2h", a.nbytes)
    if kind in (OpKind.FETCH, OpKind.FETCH_ATTENTION, OpKind.STATE_IN):
        return cost.copy("h2d", a.nbytes)
    if kind == OpKind.STATE_UPDATE:  # the fused AdamW on one piece, its bf16 cast (and a bf16 gradient's to fp32)
        casts = 6 if plan.grad_itemsize(a.unit) == 4 else 12
        return a.params / cost.gpu_adamw_rate + cost.gpu_bytes_moved(casts * a.params)
    slow = cost.p.compute_slowdown_under_copies  # layers run beside the weight and gradient streams
    if kind in (OpKind.FWD, OpKind.BWD):  # a kept layer runs whole, the others in the plan's sequence tiles
        policy = plan.activations[a.layer]
        seq_tile = 0 if policy == "keep" else plan.seq_tile_tokens
    if kind == OpKind.FWD:
        return cost.layer("fwd_s", tokens, seq_tile) * slow
    if kind == OpKind.BWD:
        assert a.layer is not None
        t = cost.layer(backward_key(plan, a.layer), tokens, seq_tile)
        # gradient accumulate (copy or add) and the squared-norm dot on the last chunk, and one more
        # accumulate of the three MLP matrices for every further MLP tile
        tiles = -(-tokens // plan.mlp_tile_tokens) if plan.mlp_tile_tokens and policy != "keep" else 1
        mlp = 3 * cfg.hidden_size * cfg.intermediate_size
        per_param = 2 + 2 * plan.grad_itemsize(a.layer + 1)
        return (t + cost.gpu_bytes_moved((cfg.layer_params + (tiles - 1) * mlp) * per_param)) * slow
    if kind == OpKind.HEAD:
        return cost.head(tokens) * slow
    if kind in (OpKind.EMBED, OpKind.EMBED_BWD):
        return cost.gpu_bytes_moved(a.nbytes * (2 if kind == OpKind.EMBED else 6))
    if kind in COLLECTIVES:
        return cost.collective(kind, a.nbytes, plan.ranks)
    if kind == OpKind.UPDATE:
        if a.resource == Resource.GPU:
            return a.params / cost.gpu_adamw_rate
        # With several ranks each process updates its 1/ranks shard of the unit while the others update theirs,
        # all on the one host's memory, which bounds the fused AdamW (bench/results/h200-2026-12-01-host-update
        # .json: 114 GB/s against a 105 GB/s plain copy): the shards together take as long as one process's
        # update of the whole unit, so the cost is the whole unit's whatever the ranks.
        return cost.host_update(a.params, a.cast)
    if kind in (OpKind.DISK_READ, OpKind.ACT_READ):
        return cost.disk("read", a.nbytes)
    if kind in (OpKind.DISK_WRITE, OpKind.ACT_WRITE):
        return cost.disk("write", a.nbytes)
    if kind == OpKind.NORM:
        return 0.0
    raise ValueError(f"no cost for op kind {kind!r}")


def issue_seconds(g: nx.DiGraph, name: str, cost: CostModel) -> float:
    """Host time the executor's thread spends launching op `name`."""
    a = op_of(g, name)
    kind = a.kind
    if kind == OpKind.FWD:
        return cost.p.issue_s
    if kind in (OpKind.BWD, OpKind.HEAD):
        return 3 * cost.p.issue_s  # a forward with autograd, then its backward
    if kind == OpKind.LOAD and a.staged:
        return STAGING_PIECE_LAUNCH_S * -(-a.nbytes // (g.graph["plan"].transfer_chunk_mb * 2**20))
    return COPY_LAUNCH_S


def embedding_turnaround(cfg: ModelConfig, plan, cost: CostModel) -> float:
    """Seconds from a step's last GPU op (the embedding's backward) to the next step's first (its lookup), at
    least: the embedding's update, and its gradient's copy out and its weights' load where it has them."""
    n, where = unit_numels(cfg)[0], plan.placement[0]
    if where == "gpu":  # updated in place, then cast on the GPU
        return n / cost.gpu_adamw_rate + cost.gpu_bytes_moved(6 * n)
    if where == "streamed":  # its pieces' updates, then the load of the bf16 weights the last piece wrote
        return n / cost.gpu_adamw_rate + cost.host_unit_load(plan, 0, n)
    out = cost.copy("d2h", 4 * plan.shard_numel(n))  # its gradient (this rank's shard of it with several ranks)
    return out + cost.host_update(n, plan.keeps_bf16_weights(0)) + cost.host_unit_load(plan, 0, n)


def step_lower_bound(cfg: ModelConfig, plan, cost: CostModel) -> float:
    """A bound no simulated step time of `plan` can beat: the GPU's compute and all-reduces and the embedding's
    turnaround between steps (every compute op of a step lies between its embedding's lookup and backward, or
    its all-reduce after that), the CPU's updates alone, the disk tier's reads and writes alone, or either PCIe
    direction's weight, gradient and streamed-state copies alone (each op's cost is at least its term here), or
    one of the chains `forward_pipeline_bound`, `late_update_bound` and `streamed_embedding_bound` follow."""
    forwards, backward = _pass_seconds(cfg, plan, cost)
    numels = unit_numels(cfg)
    # several ranks: every unit's collective on the compute stream (the embedding's before its turnaround)
    collectives = (
        sum(cost.collective(collective_for(where), 4 * n, plan.ranks) for n, where in zip(numels, plan.placement))
        if plan.ranks > 1
        else 0.0
    )
    gpu = sum(forwards) + backward + collectives + embedding_turnaround(cfg, plan, cost)
    cpu = sum(cost.host_update(n, plan.keeps_bf16_weights(u)) for u, n in enumerate(numels) if plan.host_updated(u))
    files = [12 * numels[u] for u in plan.disk_units] + [saved_input_bytes(cfg, plan)] * plan.activations.count("disk")
    disk = sum(cost.disk("read", n) + cost.disk("write", n) for n in files)
    h2d = d2h = pcie_bytes = 0.0
    L = cfg.num_layers
    for u, n in enumerate(numels):
        where = plan.placement[u]
        if where == "gpu":
            continue
        load, load_bytes = cost.host_unit_load(plan, u, n), (2 if plan.keeps_bf16_weights(u) else 4) * n
        h2d += load
        pcie_bytes += load_bytes
        master = plan.loads_streamed_master(u)  # its backward loads the fp32 master, its update not
        if 0 < u <= L and plan.loads_for_backward(u - 1):  # weights loaded again for backward
            h2d += cost.master_load(n) if master else load
            pcie_bytes += 4 * n if master else load_bytes
        if where == "streamed":  # at least the bandwidth term of every piece
            streamed_in = (STREAMED_IN_BYTES - 4 * master) * n
            h2d += streamed_in / cost.h2d.bandwidth
            d2h += STREAMED_OUT_BYTES * n / cost.d2h.bandwidth
            pcie_bytes += streamed_in + STREAMED_OUT_BYTES * n
        else:  # its gradient, of this rank's shard only with several ranks
            d2h += cost.copy("d2h", plan.grad_itemsize(u) * plan.shard_numel(n))
            pcie_bytes += plan.grad_itemsize(u) * plan.shard_numel(n)
    duplex = pcie_bytes / cost.p.duplex_bandwidth if cost.p.duplex_bandwidth else 0.0
    pipelines = (
        forward_pipeline_bound(cfg, plan, cost),
        late_update_bound(cfg, plan, cost),
        streamed_embedding_bound(cfg, plan, cost),
    )
    return max(gpu, cpu, disk, h2d, d2h, duplex, *pipelines)


def forward_pipeline_bound(cfg: ModelConfig, plan: Plan, cost: CostModel) -> float:
    """A bound on the step from its forward's weight loads: every op of a step starts after the previous step
    returned, the host-to-device stream serves the forward's loads one at a time in layer order (the embedding's
    and, unless deferred, the head's first), a host-placed layer's forward (or head) waits for its load, and the
    step returns only after all GPU work issued from that forward on (the rest of the forward, the head, every
    backward). So the step takes at least, for some such layer, the loads up to it and the GPU's work from its
    forward on (a two-machine flow shop); what a load-bound forward leaves idle on the GPU, the other terms do
    not see."""
    L = cfg.num_layers

    def load(u: int) -> float:
        return _h2d_load(cfg, plan, cost, u)

    forwards, backward = _pass_seconds(cfg, plan, cost)
    head_late = L + 1 in plan.late_units  # a deferred head's load goes after the layers' loads
    loaded, after, bound = load(0) + (0.0 if head_late else load(L + 1)), sum(forwards) + backward, 0.0
    for lay in range(L):
        loaded += load(lay + 1)
        if plan.placement[lay + 1] != "gpu":  # a GPU-placed layer's forward waits for its cast alone
            bound = max(bound, loaded + after)
        after -= forwards[lay]
    if plan.placement[L + 1] == "gpu":
        return bound
    return max(bound, loaded + (load(L + 1) if head_late else 0.0) + backward)  # the head waits for every load


def late_update_bound(cfg: ModelConfig, plan: Plan, cost: CostModel) -> float:
    """A bound on the step from the late updates (`Plan.late_units`) of a CPU-updated embedding's plan: the CPU
    runs them after the embedding's own update (or, late itself, its first), which waits for the embedding's
    backward and its gradient's copy, and the next step's forward of each late unit waits for its update and
    load. From one step's embedding backward to the next step's, then, at least that chain up to a late unit
    and all GPU work of the next step from that unit's forward on (`embedding_turnaround`'s argument, carried
    along the CPU's queue of late updates)."""
    late, L, numels = plan.late_units, cfg.num_layers, unit_numels(cfg)
    if not late or plan.placement[0] != "cpu":
        return 0.0
    forwards, backward = _pass_seconds(cfg, plan, cost)
    ready = cost.copy("d2h", 4 * plan.shard_numel(numels[0]))  # the embedding's gradient, on the host
    bound = 0.0
    for u in ([] if 0 in late else [0]) + late:
        ready += cost.host_update(numels[u], plan.keeps_bf16_weights(u))
        if u in late:  # the GPU work from the unit's first use on: the lookup, a layer's forward or the head
            after = backward + sum(forwards[max(u - 1, 0) :]) if u <= L else backward
            bound = max(bound, ready + _h2d_load(cfg, plan, cost, u) + after)
    return bound


def streamed_embedding_bound(cfg: ModelConfig, plan: Plan, cost: CostModel) -> float:
    """A bound on the step from a streamed embedding's turnaround: every piece's copy out waits for its update,
    which waits for the embedding's backward, and they copy one at a time; the next step's lookup waits for the
    last piece's copy out and the load after it (`embedding_turnaround`'s argument, with the copies out that
    it leaves out), and then all the step's GPU work follows."""
    if plan.placement[0] != "streamed":
        return 0.0
    n, piece = unit_numels(cfg)[0], plan.state_piece_numel
    sizes = [min(piece, n - k * piece) for k in range(plan.streamed_pieces(n))]
    outs = sum(cost.copy("d2h", STREAMED_OUT_BYTES * m) for m in sizes)
    forwards, backward = _pass_seconds(cfg, plan, cost)
    return sizes[0] / cost.gpu_adamw_rate + outs + _h2d_load(cfg, plan, cost, 0) + sum(forwards) + backward


def _h2d_load(cfg: ModelConfig, plan: Plan, cost: CostModel, u: int) -> float:
    """A unit's load on the host-to-device stream (a GPU-placed unit's is a cast on the GPU: none)."""
    return 0.0 if plan.placement[u] == "gpu" else cost.host_unit_load(plan, u, unit_numels(cfg)[u])


def _pass_seconds(cfg: ModelConfig, plan: Plan, cost: CostModel) -> tuple[list[float], float]:
    """The GPU's seconds for each layer's forward (all chunks), and for the head and every layer's backward
    together, as `op_seconds` costs those ops (less the backward's gradient accumulates)."""
    tokens, slow = plan.chunk * plan.seq, cost.p.compute_slowdown_under_copies

    def compute(key: str, lay: int) -> float:
        seq_tile = 0 if plan.activations[lay] == "keep" else plan.seq_tile_tokens
        return plan.chunks * cost.layer(key, tokens, seq_tile) * slow

    forwards = [compute("fwd_s", lay) for lay in range(cfg.num_layers)]
    backward = plan.chunks * cost.head(tokens) * slow + sum(
        compute(backward_key(plan, lay), lay) for lay in range(cfg.num_layers)
    )
    return forwards, backward
