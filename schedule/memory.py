"""Bytes a plan needs on the GPU and in host RAM, itemised, so a plan that does not fit is refused with numbers.

A recomputed layer's workspace comes from the layer's dimensions (checked against H100 measurements of
several shapes, `bench.layer_memory`); a kept graph and the loss piece from the profile's measured peaks for
the model's shape where there are any, else from formulas.
"""

from __future__ import annotations

from dataclasses import dataclass

from slideformer.schedule.profile import Profile, fit_at
from slideformer.models.config import GENERIC, ModelConfig
from slideformer.schedule.graph import (
    activation_bytes_per_token,
    attention_stats_bytes,
    transient_edge,
    transient_embedding_grad,
    transient_head_weights,
    unit_numels,
)
from slideformer.schedule.plan import STAGING_BUFFERS, STATE_STAGING_BUFFERS, Plan

GiB = 2**30
DISK_ALIGN = 4096  # disk-tier files and their buffers, for O_DIRECT


def padded(nbytes: int) -> int:
    """Bytes a disk-tier file of `nbytes` takes (and the buffer it is read into)."""
    return -(-nbytes // DISK_ALIGN) * DISK_ALIGN


RUNTIME_OVERHEAD = 512 * 2**20  # CUDA context allocations outside PyTorch's count, kernels' scratch


def _fit(points: list[tuple[int, float]], x: int) -> int | None:
    """Measured bytes at x tokens (see fit_at); None without measurements."""
    got = fit_at(points, x)
    return None if got is None else int(got)


def layer_workspace(cfg: ModelConfig, tokens: int, mlp_tile_tokens: int, tile_tokens: int = 0) -> int:
    """GPU bytes a recomputed layer's backward (`decoder_layer_backward`) allocates at its peak beyond its input,
    output gradient and weights, from the layer's dimensions (bf16, kernels on). The peak is the largest of
    three moments:
    - attention's backward: per token its saved tensors (both norms' outputs, rotated q and k, v, the
      attention output and its flattened copy, the residual sum, the MLP input's gradient) and its gradient
      temporaries, 6 hidden + 7 q + 4 kv wide, plus o_proj's weight gradient;
    - the MLP's SwiGLU backward: the saved attention tensors (4 hidden + 3 q + 2 kv) per token, and six
      intermediate-wide tensors per token of one tile;
    - the MLP's weight gradients: the saved tensors, 3.5 intermediate-wide tensors per tile token, and two
      weight gradients.
    q/k norms save their inputs too; SDPA keeps an fp32 log-sum-exp per head. The temporaries' widths were
    read off H100 measurements of three shapes (`bench.layer_memory`), which the formula meets within 1.5%.

    In sequence tiles (`tile_tokens` of the chunk at a time, `decoder_layer_backward_in_tiles`) those moments
    are a tile's, on top of what every token of the chunk holds: its k and v, their fp32 gradients and its dx,
    and the tile's copy of the keys and values up to it (saved for attention's backward); during the tile's
    attention backward also the earlier keys' and values' gradients and (GQA) flash attention's key and value
    gradients per query head. Within 1.4% of H200 measurements of three shapes at 32K-128K tokens.
    A generic architecture's layer (`models/hf_decoder.py`) is recomputed through autograd whole: its graph, by
    the kept-graph formula, and its weights' gradients (on the H200 the whole step's peak from this formula came
    within 4% of a Llama layer's measured run and 17% over a Gemma 3 layer's,
    `bench/results/h200-2026-12-03-leaseL-generic-speed.json`; calibrate's measured workspace, used where the
    profile has it, came within 4% and 1%)."""
    if cfg.family == GENERIC:  # recomputed whole through autograd: the layer's graph and its weights' gradients
        return activation_bytes_per_token(cfg) * tokens + 2 * cfg.layer_params
    h, ff, heads = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads
    q, kv = heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    qk_norm = (q + kv) if cfg.qk_norm else 0
    block = min(tile_tokens or tokens, tokens)  # tokens whose attention block exists at once
    attention_phase = (2 * (6 * h + 7 * q + 4 * kv + qk_norm) + 4 * heads) * block + 2 * h * q
    saved = (2 * (4 * h + 3 * q + 2 * kv + qk_norm) + 4 * heads) * block
    tile = min(mlp_tile_tokens or block, block)
    mlp_phase = max(saved + 12 * ff * tile, saved + 7 * ff * tile + 4 * h * ff)
    if block == tokens:
        return max(attention_phase, mlp_phase)
    held = (12 * kv + 2 * h + 4 * kv) * tokens  # k, v, their fp32 gradients, dx; the tile's keys and values
    during_attention = (4 * kv + (4 * q if kv != q else 0)) * tokens
    return held + max(during_attention + attention_phase, mlp_phase)


def kept_backward_workspace(cfg: ModelConfig, tokens: int) -> int:
    """GPU bytes a kept layer's backward (autograd through its saved graph) allocates beyond the graph at its
    peak: two intermediate-wide gradient temporaries per token and one MLP weight's gradient (bf16). Exact for
    the H200 measurements of the 8B shape at 16K and 32K tokens (`bench.layer_memory --kept`); other shapes by the
    same dimensions."""
    return 4 * cfg.intermediate_size * tokens + 2 * cfg.hidden_size * cfg.intermediate_size


def embedding_backward_temporary(cfg: ModelConfig, plan: Plan) -> int:
    """GPU bytes the embedding's backward allocates for one chunk: its output gradient in fp32 (ours) or the
    dense gradient in the weights' dtype (an architecture's own embedding)."""
    if cfg.family == GENERIC:
        return 2 * cfg.vocab_size * cfg.hidden_size
    return 4 * plan.chunk * plan.seq * cfg.hidden_size


def embedding_backward_bytes(cfg: ModelConfig, plan: Plan) -> int:
    """The temporary, and the fp32 gradient itself where it is transient (`transient_embedding_grad`; else it
    is a static buffer)."""
    grad = 4 * cfg.vocab_size * cfg.hidden_size if transient_embedding_grad(cfg, plan) else 0
    return embedding_backward_temporary(cfg, plan) + grad


def transient_edge_weights(cfg: ModelConfig, plan: Plan) -> int:
    """Bytes of the edges' transient weights (both live from the step's start: the loads are its first ops)."""
    n = unit_numels(cfg)
    return sum(
        plan.compute_itemsize * n[u] for u in (0, cfg.num_layers + 1) if transient_edge(cfg, plan, "edge_weights", u)
    )


def head_weights_bytes(cfg: ModelConfig, plan: Plan) -> int:
    """The head's weights where transient (they are live through the forward, until the head's last piece)."""
    return plan.compute_itemsize * unit_numels(cfg)[-1] if transient_head_weights(cfg, plan) else 0


def layer_forward_workspace(cfg: ModelConfig, tokens: int, tile_tokens: int = 0) -> int:
    """GPU bytes a layer's forward without gradients allocates at its peak beyond its input and weights: the
    MLP's three intermediate-wide tensors, its input and the layer's output, per token; in sequence tiles
    (`tile_tokens` of the chunk at a time) the whole chunk's k, v and output and one tile's MLP tensors, query
    and attention output. Exact for the H200 measurements of three shapes (`bench.layer_memory --seq-tiles`);
    an architecture's own layer, by the same formula (not measured)."""
    h, ff = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    if 0 < tile_tokens < tokens:
        return (4 * kv + 2 * h) * tokens + (2 * (3 * ff + 2 * h) + 4 * q) * tile_tokens
    return 2 * (3 * ff + 2 * h) * tokens


def measured_workspace(cfg: ModelConfig, plan: Plan, profile: Profile | None, key: str) -> int | None:
    """An architecture's own layer's workspace at one chunk (`key`: fwd_workspace_bytes or bwd_workspace_bytes),
    as calibrate measured it at this sequence length; None for our layers (their formulas are exact) or where
    the profile has no measurement."""
    if cfg.family != GENERIC or profile is None:
        return None
    shape = cfg.layer_shape()
    points = [(t.tokens, getattr(t, key)) for t in profile.layers if t.shape() == shape and t.seq == plan.seq]
    return _fit(points, plan.chunk * plan.seq)


def plan_forward_workspace(cfg: ModelConfig, plan: Plan, profile: Profile | None = None) -> int:
    measured = measured_workspace(cfg, plan, profile, "fwd_workspace_bytes")
    if measured is not None:
        return measured
    tile = plan.chunk * min(plan.seq_tile_tokens, plan.seq) if plan.seq_tile_tokens else 0
    return layer_forward_workspace(cfg, plan.chunk * plan.seq, tile)


def plan_layer_workspace(cfg: ModelConfig, plan: Plan, profile: Profile | None = None) -> int:
    """`layer_workspace` of one chunk under the plan's MLP and sequence tiles (an architecture's own layer: as
    measured, where the profile has it)."""
    measured = measured_workspace(cfg, plan, profile, "bwd_workspace_bytes")
    if measured is not None:
        return measured
    tile = plan.chunk * min(plan.seq_tile_tokens, plan.seq) if plan.seq_tile_tokens else 0
    return layer_workspace(cfg, plan.chunk * plan.seq, plan.mlp_tile_tokens, tile)


def kept_graph(cfg: ModelConfig, seq: int, tokens: int, profile: Profile | None = None) -> int:
    """GPU bytes one kept layer-chunk graph holds (measured where the profile has this shape)."""
    if profile is not None:
        shape = cfg.layer_shape()
        got = _fit(
            [(t.tokens, t.kept_graph_bytes) for t in profile.layers if t.shape() == shape and t.seq == seq], tokens
        )
        if got is not None:
            return got
    return activation_bytes_per_token(cfg) * tokens


def head_workspace(cfg: ModelConfig, piece_tokens: int, tokens: int, profile: Profile | None = None) -> int:
    if profile is not None:
        got = _fit(
            [
                (t.tokens, t.peak_bytes)
                for t in profile.heads
                if (t.hidden, t.vocab) == (cfg.hidden_size, cfg.vocab_size)
            ],
            tokens,
        )
        if got is not None:
            return got
    # fp32 logits of one piece, their softmax gradient, and the head-weight gradient temporary
    return piece_tokens * cfg.vocab_size * 8 + cfg.vocab_size * cfg.hidden_size * 2


def saved_input_bytes(cfg: ModelConfig, plan: Plan) -> int:
    """Bytes of one layer's input over the whole batch, as offload and disk save it (in the compute dtype)."""
    return plan.batch * plan.seq * cfg.hidden_size * plan.compute_itemsize


def saved_attention_bytes(cfg: ModelConfig, plan: Plan) -> int:
    """Bytes of one layer's saved attention output and log-sum-exp over the whole batch (`Plan.saved_attention`)."""
    return attention_stats_bytes(cfg, plan.batch * plan.seq, plan.compute_itemsize)


@dataclass(frozen=True)
class BufferSpec:
    """One buffer the runtime allocates (or, `lazy`, torch's AdamW allocates at its first step): the planner sums
    these and the engine allocates exactly these, by name."""

    name: str  # e.g. 'master:3', 'grad_ring:1', 'slot:0'
    kind: str  # the accounting line it counts under
    nbytes: int
    users: tuple[int, ...] = ()  # units (or layers, for activations) that read or write it
    lazy: bool = False


def host_grad_buffer(cfg: ModelConfig, plan: Plan) -> dict[int, str]:
    """The pinned gradient buffer each host-updated unit's gradient goes to: a ring shared by layers during
    backward (late ones aside), the head's for the embedding when they can share, else its own."""
    L = cfg.num_layers
    out: dict[int, str] = {}
    k = 0
    ring, late, edges = plan.shares_grad_ring, set(plan.late_units), plan.shares_edge_grad
    for u in [L + 1, *range(L, 0, -1), 0]:  # gradient arrival order
        if not plan.host_updated(u):
            continue
        if ring and 0 < u <= L and u not in late:
            out[u] = f"grad_ring:{k % plan.grad_ring}"
            k += 1
        elif u in (0, L + 1) and edges:
            out[u] = "host_grad:edges"
        else:
            out[u] = f"host_grad:{u}"
    return out


def host_buffers(cfg: ModelConfig, plan: Plan) -> list[BufferSpec]:
    """Every pinned host buffer: fp32 masters of RAM-resident units, streamed units' AdamW states, gradient
    destinations of host-updated units, offloaded activations, the bf16 weights of units that keep them in RAM
    (`Plan.keeps_bf16_weights`), and the rings disk traffic passes through."""
    L, n = cfg.num_layers, unit_numels(cfg)
    itemsize = plan.compute_itemsize
    saved = saved_input_bytes(cfg, plan)
    specs = [
        BufferSpec(f"master:{u}", "master_weights", 4 * n[u], (u,))
        for u in range(L + 2)
        if plan.placement[u] in ("cpu", "streamed")
    ]
    specs += [
        BufferSpec(f"{state}:{u}", "streamed_states", 4 * n[u], (u,))
        for u in plan.streamed_units
        for state in ("exp_avg", "exp_avg_sq")
    ]
    grads = host_grad_buffer(cfg, plan)
    for name in dict.fromkeys(grads.values()):  # in first-use order
        users = tuple(u for u, g in grads.items() if g == name)
        specs.append(BufferSpec(name, "gradients", max(plan.grad_itemsize(u) * n[u] for u in users), users))
    specs += [
        BufferSpec(f"act:{lay}", "offloaded_activations", saved, (lay,))
        for lay, p in enumerate(plan.activations)
        if p == "offload"
    ]
    attention = saved_attention_bytes(cfg, plan)
    specs += [
        BufferSpec(f"attention:{lay}", "offloaded_activations", attention, (lay,))
        for lay in range(plan.saved_attention)
    ]
    if "disk" in plan.activations:
        specs += [BufferSpec(f"act_ring:{k}", "disk_activation_ring", padded(saved)) for k in range(plan.disk_ring)]
    specs += [
        BufferSpec(f"bf16:{u}", "bf16_weights", itemsize * n[u], (u,))
        for u in range(L + 2)
        if plan.keeps_bf16_weights(u)
    ]
    if plan.disk_units:
        specs += [BufferSpec(f"disk_ring:{k}", "disk_ring", padded(12 * n[1])) for k in range(plan.disk_ring)]
    return specs


def gpu_buffers(cfg: ModelConfig, plan: Plan) -> list[BufferSpec]:
    """Every GPU buffer that lives through the step: the window's and kept layers' weight slots, the fp32 staging
    ring, gradient buffers, the edges' weights, GPU-placed units' masters (and AdamW states, `lazy`), streamed
    updates' slots, the hidden-state buffers and the inputs recomputed layers keep."""
    L, n = cfg.num_layers, unit_numels(cfg)
    itemsize = plan.compute_itemsize
    hidden = plan.batch * plan.seq * cfg.hidden_size * itemsize
    specs = [BufferSpec(f"slot:{k}", "weight_window", itemsize * n[1]) for k in range(plan.weight_slots)]
    if plan.stages_fp32_loads and plan.device != "cpu":
        specs += [
            BufferSpec(f"staging:{k}", "transfer_staging", plan.transfer_chunk_mb * 2**20)
            for k in range(STAGING_BUFFERS)
        ]
    shared = [u for u in range(1, L + 1) if plan.placement[u] != "gpu"]
    if shared:
        specs += [
            BufferSpec(
                f"layer_grad:{k}",
                "layer_grad_buffers",
                plan.grad_itemsize(shared[0]) * n[1],
                tuple(u for u in shared if u % 2 == k),
            )
            for k in range(2)
        ]
    if plan.streamed_units:
        specs += [
            BufferSpec(f"state_slot:{k}", "state_staging", (12 + itemsize) * plan.state_piece_numel)
            for k in range(STATE_STAGING_BUFFERS)
        ]
        if any(plan.grad_itemsize(u) == 2 for u in plan.streamed_units):  # a bf16 gradient piece, cast for the AdamW
            specs.append(BufferSpec("state_grad", "state_staging", 4 * plan.state_piece_numel))
        specs += [BufferSpec(f"master_slot:{k}", "state_staging", 4 * n[1]) for k in range(plan.streamed_master_slots)]
    specs += [
        BufferSpec(f"{what}:{u}", "edge_weights_and_grads", size * n[u], (u,))
        for u in (0, L + 1)
        for what, size in (("edge_weights", itemsize), ("grad", 4))
        if not transient_edge(cfg, plan, what, u)
    ]
    for u in (u for u in range(L + 2) if plan.placement[u] == "gpu"):
        specs.append(BufferSpec(f"gpu_master:{u}", "gpu_optimizer_states", 4 * n[u], (u,)))
        specs.append(BufferSpec(f"adamw_states:{u}", "gpu_optimizer_states", 8 * n[u], (u,), lazy=True))
        if 0 < u <= L:
            specs.append(BufferSpec(f"grad:{u}", "gpu_optimizer_states", 4 * n[u], (u,)))
    # Two of each: a layer reads one and writes the other. Saved inputs fetched for the backward land in the
    # forward's hidden buffers, free once the head has read them.
    specs += [BufferSpec(f"{what}:{k}", "hidden_buffers", hidden) for what in ("hidden", "dgrad") for k in range(2)]
    specs += [
        BufferSpec(f"kept_input:{lay}", "kept_inputs", hidden, (lay,))
        for lay, p in enumerate(plan.activations)
        if p == "recompute"
    ]
    # saved attention (`Plan.saved_attention`): a layer's forward writes one, its backward reads one fetched back;
    # each resident layer (`Plan.resident_attention`) its own from its forward to its backward
    attention = saved_attention_bytes(cfg, plan)
    specs += [BufferSpec(f"attention:{k}", "hidden_buffers", attention) for k in range(min(2, plan.saved_attention))]
    specs += [
        BufferSpec(f"resident_attention:{lay}", "resident_attention", attention, (lay,))
        for lay in plan.resident_attention_layers
    ]
    return specs


def by_kind(specs: list[BufferSpec], kinds: tuple[str, ...]) -> dict[str, int]:
    out = dict.fromkeys(kinds, 0)
    for spec in specs:
        out[spec.kind] += spec.nbytes
    return out


GPU_STATIC_KINDS = (
    "weight_window",
    "transfer_staging",
    "layer_grad_buffers",
    "state_staging",
    "edge_weights_and_grads",
    "gpu_optimizer_states",
    "hidden_buffers",
    "kept_inputs",
    "resident_attention",
)
# Host buffers that data-parallel ranks on one host share (one copy, in shared memory): the fp32 masters and
# the bf16 weights kept in RAM; every other host buffer is each rank's own.
SHARED_HOST_KINDS = ("master_weights", "bf16_weights")
HOST_KINDS = (
    "master_weights",
    "streamed_states",
    "gradients",
    "offloaded_activations",
    "disk_activation_ring",
    "bf16_weights",
    "disk_ring",
)


def gpu_bytes(cfg: ModelConfig, plan: Plan, profile: Profile | None = None) -> dict[str, int]:
    """GPU bytes by line: the static buffers (`gpu_buffers`), kept layer graphs, the workspace beyond them at the
    step's peak moment, and the CUDA context.

    The kept graphs (of the last layers) live from those layers' forward through the head to their backward,
    which comes first: the forward, the head and the kept backward meet them; the recomputed layers'
    backward, the embedding's and the step's start do not."""
    chunk_tokens = plan.chunk * plan.seq
    kept = plan.activations.count("keep") * kept_graph(cfg, plan.seq, chunk_tokens, profile) * plan.chunks
    with_graphs = max(
        head_workspace(cfg, min(plan.loss_chunk_tokens, chunk_tokens), chunk_tokens, profile)
        + head_weights_bytes(cfg, plan)
        + (4 * unit_numels(cfg)[-1] if plan.transient_head_grad else 0),
        plan_forward_workspace(cfg, plan, profile) + head_weights_bytes(cfg, plan),  # the forward
        kept_backward_workspace(cfg, chunk_tokens) if kept else 0,
    )
    without_graphs = max(
        plan_layer_workspace(cfg, plan, profile),
        embedding_backward_bytes(cfg, plan),
        transient_edge_weights(cfg, plan),  # the step's start
    )
    return by_kind(gpu_buffers(cfg, plan), GPU_STATIC_KINDS) | {
        "kept_graphs": kept,
        "workspace": max(with_graphs, without_graphs - kept),
        "runtime_overhead": RUNTIME_OVERHEAD,
    }


def host_bytes(cfg: ModelConfig, plan: Plan, profile: Profile | None = None) -> dict[str, int]:
    """Host RAM of one process's runtime buffers: fp32 masters and gradients (pinned), AdamW states (pinned where
    streamed; of its shard only for the CPU-updated units of one of several ranks), offloaded activations, bf16
    weights kept in RAM, and the disk tier's rings."""
    pinned = by_kind(host_buffers(cfg, plan), HOST_KINDS)
    states = (
        sum(8 * plan.shard_numel(n) for n, where in zip(unit_numels(cfg), plan.placement) if where == "cpu")
        + pinned["streamed_states"]
    )
    return {
        "master_weights": pinned["master_weights"],
        "optimizer_states": states,
        "gradients": pinned["gradients"],
        "offloaded_activations": pinned["offloaded_activations"],
        "bf16_weights": pinned["bf16_weights"],
        "disk_ring": pinned["disk_ring"] + pinned["disk_activation_ring"],
        "process": profile.process_baseline_bytes if profile is not None else 0,
    }


def host_bytes_all_ranks(cfg: ModelConfig, plan: Plan, profile: Profile | None = None) -> int:
    """Host RAM of all `plan.ranks` processes on the host: the lines they share (`SHARED_HOST_KINDS`) once,
    every other line, the process baseline included, once per rank. The CPU AdamW states are each rank's for
    its shard only, so their total is one process's (to within a shard's rounding)."""
    per_process = host_bytes(cfg, plan, profile)
    shared = sum(per_process[k] for k in SHARED_HOST_KINDS)
    return shared + plan.ranks * (sum(per_process.values()) - shared)


def disk_bytes(cfg: ModelConfig, plan: Plan) -> int:
    """The disk tier's files: each disk unit's fp32 master weights and AdamW states, and each disk-bound
    layer's saved input."""
    n = unit_numels(cfg)
    return sum(padded(12 * n[u]) for u in plan.disk_units) + padded(
        saved_input_bytes(cfg, plan)
    ) * plan.activations.count("disk")


def describe(need: dict[str, int]) -> str:
    return (
        ", ".join(f"{k} {v / GiB:.2f}" for k, v in need.items() if v) + f" (total {sum(need.values()) / GiB:.2f} GiB)"
    )
