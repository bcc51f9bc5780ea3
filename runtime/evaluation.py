"""The loss of a batch on the current weights, changing nothing (the engine's evaluation): the forward alone,
layer by layer through the window's slots on the compute stream, any batch size."""

from __future__ import annotations

import torch

from slideformer.kernels import IGNORE_INDEX
from slideformer.schedule.op import Resource

from .executor import GraphExecutor
from .ops import StepOps


@torch.no_grad()
def eval_loss(
    ops: StepOps,
    executor: GraphExecutor,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    positions: torch.Tensor | None = None,
) -> float:
    """Mean loss over non-ignored tokens (`positions` as `Engine.train_step` takes them); the caller has waited
    for every pending update."""
    cfg, plan, device = ops.cfg, ops.plan, ops.device
    L, num = cfg.num_layers, ops.numerics
    ids, labels = input_ids.to(device), labels.to(device)
    pieces = [None] * -(-len(ids) // plan.chunk) if positions is None else positions.split(plan.chunk)
    with executor.streams.on(Resource.GPU):
        for unit in (0, L + 1):
            ops.load(unit)
        hidden = []
        for rows in ids.split(plan.chunk):
            x = torch.empty(*rows.shape, cfg.hidden_size, dtype=ops.b.compute, device=device)
            num.embed(ops.embed_w, rows, x)
            hidden.append(x)
        ops.release_edge_weights(0)
        chunks = [num.positions(p, x) for p, x in zip(pieces, hidden)]
        for lay in range(L):
            ops.load(lay + 1)
            params = ops.layer_params(lay)
            hidden = [num.layer(lay, params, x, p, plan.seq_tile_tokens) for x, p in zip(hidden, chunks)]
        total = sum(
            num.head_loss_sum(x, y, ops.norm_w, ops.head_w, plan.loss_chunk_tokens)
            for x, y in zip(hidden, labels.split(plan.chunk))
        )
        ops.release_edge_weights(L + 1)
    return float(total) / max(int((labels != IGNORE_INDEX).sum()), 1)
