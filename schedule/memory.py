"""Bytes a plan needs on the GPU and in host RAM, itemised, so a plan that does not fit is refused with numbers.

A recomputed layer's workspace comes from the layer's dimensions (checked against H100 measurements of
several shapes, `bench.layer_memory`); a kept graph and the loss piece from the profile's measured peaks for
the model's shape where there are any, else from formulas.
"""
from __future__ import annotations


from slideformer.schedule.profile import Profile, fit_at
from slideformer.models.config import ModelConfig
from slideformer.schedule.graph import activation_bytes_per_token, unit_numels
from slideformer.schedule.plan import STAGING_BUFFERS, STATE_STAGING_BUFFERS, STREAMED_OUT_BYTES, Plan

GiB = 2**30
DISK_ALIGN = 4096  # disk-tier files and their buffers, for O_DIRECT


def padded(nbytes: int) -> int:
    """Bytes a disk-tier file of `nbytes` takes (and the buffer it is read into)."""
    return -(-nbytes // DISK_ALIGN) * DISK_ALIGN
RUNTIME_OVERHEAD = 512 * 2**20  # CUDA context allocations outside PyTorch's count, kernels' scratch


def _fit(points: list[tuple[int, int]], x: int) -> int | None:
    """Measured bytes at x tokens (see fit_at); None without measurements."""
    got = fit_at(points, x)
    return None if got is None else int(got)


def layer_workspace(cfg: ModelConfig, tokens: int, mlp_tile_tokens: int) -> int:
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
    read off H100 measurements of three shapes (`bench.layer_memory`), which the formula meets within 1.5%."""
    h, ff, heads = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads
    q, kv = heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    qk_norm = (q + kv) if cfg.qk_norm else 0
    attention_phase = (2 * (6 * h + 7 * q + 4 * kv + qk_norm) + 4 * heads) * tokens + 2 * h * q
    saved = (2 * (4 * h + 3 * q + 2 * kv + qk_norm) + 4 * heads) * tokens
    tile = min(mlp_tile_tokens or tokens, tokens)
    return max(attention_phase, saved + 12 * ff * tile, saved + 7 * ff * tile + 4 * h * ff)


def kept_graph(cfg: ModelConfig, seq: int, tokens: int, profile: Profile | None = None) -> int:
    """GPU bytes one kept layer-chunk graph holds (measured where the profile has this shape)."""
    if profile is not None:
        shape = cfg.layer_shape()
        got = _fit([(t.tokens, t.kept_graph_bytes) for t in profile.layers if t.shape() == shape and t.seq == seq],
                   tokens)
        if got is not None:
            return got
    return activation_bytes_per_token(cfg) * tokens


def head_workspace(cfg: ModelConfig, piece_tokens: int, tokens: int, profile: Profile | None = None) -> int:
    if profile is not None:
        got = _fit([(t.tokens, t.peak_bytes) for t in profile.heads
                    if (t.hidden, t.vocab) == (cfg.hidden_size, cfg.vocab_size)], tokens)
        if got is not None:
            return got
    # fp32 logits of one piece, their softmax gradient, and the head-weight gradient temporary
    return piece_tokens * cfg.vocab_size * 8 + cfg.vocab_size * cfg.hidden_size * 2


def saved_input_bytes(cfg: ModelConfig, plan: Plan) -> int:
    """Bytes of one layer's input over the whole batch, as offload and disk save it (in the compute dtype)."""
    return plan.batch * plan.seq * cfg.hidden_size * (4 if plan.compute_dtype == "float32" else 2)


def gpu_bytes(cfg: ModelConfig, plan: Plan, profile: Profile | None = None) -> dict[str, int]:
    L, n = cfg.num_layers, unit_numels(cfg)
    layer_on_host = [p != "gpu" for p in plan.placement[1:-1]]
    hidden = plan.batch * plan.seq * cfg.hidden_size * 2
    chunk_tokens = plan.chunk * plan.seq
    graph = kept_graph(cfg, plan.seq, chunk_tokens, profile)
    return {
        "weight_window": plan.window * n[1] * 2,
        "transfer_staging": STAGING_BUFFERS * plan.transfer_chunk_mb * 2**20 if plan.stages_fp32_loads else 0,
        "layer_grad_buffers": 2 * n[1] * 4 if any(layer_on_host) else 0,
        "state_staging": STATE_STAGING_BUFFERS * STREAMED_OUT_BYTES * plan.state_piece_numel
        if plan.streamed_units else 0,
        "edge_weights_and_grads": (n[0] + n[L + 1]) * (2 + 4),
        "gpu_optimizer_states": sum(n[u] * (12 + (4 if 0 < u <= L else 0))
                                    for u in range(L + 2) if plan.placement[u] == "gpu"),
        "hidden_buffers": hidden * (4 + (2 if {"offload", "disk"} & set(plan.activations) else 0)),
        "kept_inputs": plan.activations.count("recompute") * hidden,
        "kept_graphs": plan.activations.count("keep") * graph * plan.chunks,
        "workspace": max(layer_workspace(cfg, chunk_tokens, plan.mlp_tile_tokens),
                         head_workspace(cfg, min(plan.loss_chunk_tokens, chunk_tokens), chunk_tokens, profile)),
        "runtime_overhead": RUNTIME_OVERHEAD,
    }


def pinned_host_buffers(cfg: ModelConfig, plan: Plan) -> dict[str, list[int]]:
    """Bytes of every pinned host buffer the runtime allocates, by kind: fp32 masters of RAM-updated units,
    streamed units' AdamW states, fp32 gradient destinations of host-updated units (a shared ring for layers
    during backward), offloaded activations, disk and streamed units' bf16 weights and the ring of buffers disk
    units' states pass through."""
    L, n = cfg.num_layers, unit_numels(cfg)
    in_ram = [u for u in range(L + 2) if plan.placement[u] in ("cpu", "streamed")]
    on_host = [u for u in range(L + 2) if plan.host_updated(u)]
    ring = plan.shares_grad_ring
    itemsize = 4 if plan.compute_dtype == "float32" else 2
    saved = saved_input_bytes(cfg, plan)
    return {
        "master_weights": [4 * n[u] for u in in_ram],
        "streamed_states": [4 * n[u] for u in plan.streamed_units for _ in ("exp_avg", "exp_avg_sq")],
        "gradients": [4 * n[1]] * (plan.grad_ring if ring else 0)
        + [4 * n[u] for u in on_host if not (ring and 0 < u <= L and u not in plan.late_units) and u not in (0, L + 1)]
        + ([4 * max(n[0], n[L + 1])] if plan.shares_edge_grad else [4 * n[u] for u in (0, L + 1) if u in on_host]),
        "offloaded_activations": [saved] * plan.activations.count("offload"),
        "disk_activation_ring": [padded(saved)] * (plan.disk_ring if "disk" in plan.activations else 0),
        "bf16_weights": [itemsize * n[u] for u in plan.disk_units + plan.streamed_units],
        "disk_ring": [padded(12 * n[1])] * (plan.disk_ring if plan.disk_units else 0),
    }


def host_bytes(cfg: ModelConfig, plan: Plan, profile: Profile | None = None) -> dict[str, int]:
    """Host RAM of the runtime's buffers: fp32 masters and gradients (pinned), AdamW states (pinned where
    streamed), offloaded
    activations, disk units' bf16 weights, and the disk tier's rings."""
    pinned = {kind: sum(sizes) for kind, sizes in pinned_host_buffers(cfg, plan).items()}
    states = sum(8 * n for n, where in zip(unit_numels(cfg), plan.placement) if where == "cpu") \
        + pinned["streamed_states"]
    return {
        "master_weights": pinned["master_weights"],
        "optimizer_states": states,
        "gradients": pinned["gradients"],
        "offloaded_activations": pinned["offloaded_activations"],
        "bf16_weights": pinned["bf16_weights"],
        "disk_ring": pinned["disk_ring"] + pinned["disk_activation_ring"],
        "process": profile.process_baseline_bytes if profile is not None else 0,
    }


def disk_bytes(cfg: ModelConfig, plan: Plan) -> int:
    """The disk tier's files: each disk unit's fp32 master weights and AdamW states, and each disk-bound
    layer's saved input."""
    n = unit_numels(cfg)
    return sum(padded(12 * n[u]) for u in plan.disk_units) + padded(saved_input_bytes(cfg, plan)) * \
        plan.activations.count("disk")


def describe(need: dict[str, int]) -> str:
    return ", ".join(f"{k} {v / GiB:.2f}" for k, v in need.items() if v) + f" (total {sum(need.values()) / GiB:.2f} GiB)"
