"""Cross-entropy over a piece of logits with its gradient written over the logits in place.

One program per row: an online max/sum-exp pass, then a pass that writes (softmax - onehot) * scale.
With the head matmuls around it (`linear_cross_entropy`), a piece of T tokens holds only T x vocab
bf16 logits, never B x S x vocab, and never an fp32 copy or a separate gradient buffer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slideformer.kernels import IGNORE_INDEX


@triton.jit
def _cross_entropy_in_place(
    logits_ptr, stride, labels_ptr, loss_ptr, vocab: tl.constexpr, scale, ignore_index, BLOCK: tl.constexpr
):
    row = tl.program_id(0)
    ptr = logits_ptr + row.to(tl.int64) * stride
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.load(ptr + tl.where(valid, label, 0)).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))
    g_scale = tl.where(valid, scale, 0.0)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < vocab
        x = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)
        tl.store(ptr + cols, (g * g_scale).to(logits_ptr.dtype.element_ty), mask=mask)


def cross_entropy_in_place(logits: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-row loss (fp32, 0 where ignored); `logits` [T, V] becomes d(scale * sum of losses)/d logits."""
    assert logits.is_contiguous() and logits.dim() == 2
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    _cross_entropy_in_place[(logits.shape[0],)](
        logits,
        logits.stride(0),
        labels,
        loss,
        logits.shape[1],
        scale,
        IGNORE_INDEX,
        BLOCK=4096 if logits.is_cuda else 1024,
    )
    return loss


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    scale: float,
    piece_tokens: int,
    grad_weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """scale * summed cross-entropy of x @ weight.T against labels, its gradient to x, and its gradient to
    weight added into the fp32 `grad_weight`; `piece_tokens` rows of logits at a time. x: [T, H]."""
    dx = torch.empty_like(x)
    loss = torch.zeros((), dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], piece_tokens):
        piece = x[start : start + piece_tokens]
        logits = piece @ weight.t()
        loss += cross_entropy_in_place(logits, labels[start : start + piece_tokens], scale).sum() * scale
        dx[start : start + piece_tokens] = logits @ weight
        grad_weight += logits.t() @ piece
    return loss, dx
