"""Bytes a plan needs on the GPU and in host RAM, itemised, so a plan that does not fit is refused with numbers."""
from __future__ import annotations

from slideformer.models.config import ModelConfig
from slideformer.opgraph import activation_bytes_per_token, unit_numels
from slideformer.plan import Plan

GiB = 2**30
RUNTIME_OVERHEAD = 512 * 2**20  # CUDA context allocations outside PyTorch's count, kernels' scratch


def gpu_bytes(cfg: ModelConfig, plan: Plan) -> dict[str, int]:
    L, n = cfg.num_layers, unit_numels(cfg)
    layer_on_cpu = [p == "cpu" for p in plan.placement[1:-1]]
    hidden = plan.batch * plan.seq * cfg.hidden_size * 2
    chunk_tokens = plan.chunk * plan.seq
    graph = activation_bytes_per_token(cfg) * chunk_tokens
    loss_piece = min(plan.loss_chunk_tokens, chunk_tokens)
    need = {
        "weight_window": plan.window * n[1] * 2,
        "transfer_staging": plan.transfer_chunk_mb * 2**20 if "cpu" in plan.placement else 0,
        "layer_grad_buffers": 2 * n[1] * 4 if any(layer_on_cpu) else 0,
        "edge_weights_and_grads": (n[0] + n[L + 1]) * (2 + 4),
        "gpu_optimizer_states": sum(n[u] * (12 + (4 if 0 < u <= L else 0))
                                    for u in range(L + 2) if plan.placement[u] == "gpu"),
        "hidden_buffers": hidden * (4 + (2 if "offload" in plan.activations else 0)),
        "kept_inputs": plan.activations.count("recompute") * hidden,
        "kept_graphs": plan.activations.count("keep") * graph * plan.chunks,
        # One layer's recomputed graph plus its backward temporaries, or the loss piece with its
        # fp32 logits, softmax grad and the head-weight gradient temporary, whichever is larger.
        "workspace": max(graph * 3 // 2 + n[1] * 2,
                         loss_piece * cfg.vocab_size * 10 + cfg.vocab_size * cfg.hidden_size * 2),
        "runtime_overhead": RUNTIME_OVERHEAD,
    }
    return need


def describe(need: dict[str, int]) -> str:
    return ", ".join(f"{k} {v / GiB:.2f}" for k, v in need.items() if v) + f" (total {sum(need.values()) / GiB:.2f} GiB)"
