"""Final norm, LM head and cross-entropy, forward and backward together, a piece of tokens at a time.

Never materialises logits for more than `piece_tokens` rows, so B x S x vocab never exists.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from slideformer import kernels
from slideformer.kernels import IGNORE_INDEX
from .layers import rms_norm


def head_loss_and_grads(
    x: torch.Tensor,
    labels: torch.Tensor,
    norm_w: torch.Tensor,
    head_w: torch.Tensor,
    eps: float,
    total_tokens: int,
    piece_tokens: int,
    grad_norm_w: torch.Tensor,
    grad_head_w: torch.Tensor,
    norm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [b, s, H], labels [b, s]. Returns (loss, dx) and adds the weight gradients into the fp32
    `grad_norm_w` and `grad_head_w`. `norm(x, weight)` is the final norm (default: RMSNorm with `eps`; an
    architecture's own norm for the generic path).

    The loss is the sum over non-ignored tokens divided by `total_tokens` (the whole step's count), so
    summing over chunks gives the step's mean loss and its exact gradient.
    """
    x = x.detach().requires_grad_()
    nw = norm_w.detach().requires_grad_()
    with torch.enable_grad():
        xn = rms_norm(x, nw, eps) if norm is None else norm(x, nw)
    flat = xn.detach().flatten(0, 1)
    lab = labels.flatten()
    if kernels.active(flat):  # fused: logits of one piece in bf16, overwritten by their gradient
        from slideformer.kernels.cross_entropy import linear_cross_entropy

        loss, d_flat = linear_cross_entropy(flat, head_w.detach(), lab, 1.0 / total_tokens, piece_tokens, grad_head_w)
        dx, d_norm = torch.autograd.grad(xn, [x, nw], d_flat.view_as(xn))
        grad_norm_w += d_norm
        return loss, dx
    d_flat = torch.empty_like(flat)
    loss = torch.zeros((), dtype=torch.float32, device=x.device)
    hw = head_w.detach().requires_grad_()
    for start in range(0, flat.shape[0], piece_tokens):
        piece = flat[start : start + piece_tokens].requires_grad_()
        with torch.enable_grad():
            logits = F.linear(piece, hw)
            part = (
                F.cross_entropy(
                    logits.float(), lab[start : start + piece_tokens], ignore_index=IGNORE_INDEX, reduction="sum"
                )
                / total_tokens
            )
        g_piece, g_head = torch.autograd.grad(part, [piece, hw])
        d_flat[start : start + piece_tokens] = g_piece
        grad_head_w += g_head
        loss += part.detach()
    dx, d_norm = torch.autograd.grad(xn, [x, nw], d_flat.view_as(xn))
    grad_norm_w += d_norm
    return loss, dx


@torch.no_grad()
def head_loss_sum(
    x: torch.Tensor, labels: torch.Tensor, norm_w: torch.Tensor, head_w: torch.Tensor, eps: float, piece_tokens: int
) -> torch.Tensor:
    """Summed cross-entropy over non-ignored tokens, without gradients (evaluation), in pieces."""
    flat = rms_norm(x, norm_w, eps).flatten(0, 1)
    lab = labels.flatten()
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    for start in range(0, flat.shape[0], piece_tokens):
        logits = F.linear(flat[start : start + piece_tokens], head_w)
        total += F.cross_entropy(
            logits.float(), lab[start : start + piece_tokens], ignore_index=IGNORE_INDEX, reduction="sum"
        )
    return total
