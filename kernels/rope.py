"""Rotary embedding applied to q or k, forward and backward; each product and the sum rounded as eager bf16
rounds them. Llama-3 frequency scaling is in the cos/sin [S, D] tables.

The kernel reads any [B, heads, S, D] layout with unit stride in D: the attention passes the projection's
output transposed ([B, S, heads, D] in memory), and the rotation writes [B, heads, S, D] contiguous for the
attention kernel, so the transpose costs no copy of its own. The backward writes its gradient back in
the projection's layout, so the gradient flows into the projection's matmul without a copy either.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope(
    x_ptr,
    cos_ptr,
    sin_ptr,
    o_ptr,
    heads,
    seq,
    half,
    xb,
    xh,
    xs,
    ob,
    oh,
    os,
    backward: tl.constexpr,
    PER_ROW: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One (batch, position) per program, all its heads at once: one load of the position's cos/sin, and in
    # the projection's layout one contiguous [heads, D] read.
    pid = tl.program_id(0).to(tl.int64)
    pos = pid % seq
    b = pid // seq
    h = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, BLOCK)[None, :]
    mask = (h < heads) & (j < half)
    x_row = x_ptr + b * xb + h * xh + pos * xs
    o_row = o_ptr + b * ob + h * oh + pos * os
    x1 = tl.load(x_row + j, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + half + j, mask=mask, other=0.0).to(tl.float32)
    table = (pid if PER_ROW else pos) * 2 * half  # [B, S, D] tables: this token's own row
    c1 = tl.load(cos_ptr + table + j, mask=j < half, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + table + half + j, mask=j < half, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + table + j, mask=j < half, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + table + half + j, mask=j < half, other=0.0).to(tl.float32)
    dt = o_ptr.dtype.element_ty
    if backward:  # the transpose of the rotation
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:  # x * cos + rotate_half(x) * sin, each product rounded, then the sum
        o1 = (x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)
        o2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
    tl.store(o_row + j, o1.to(dt), mask=mask)
    tl.store(o_row + half + j, o2.to(dt), mask=mask)


def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor, backward: bool) -> torch.Tensor:
    if x.stride(-1) != 1:
        x = x.contiguous()
    b, heads, seq, d = x.shape
    _rope[(b * seq,)](
        x,
        cos.contiguous(),
        sin.contiguous(),
        out,
        heads,
        seq,
        d // 2,
        *x.stride()[:3],
        *out.stride()[:3],
        backward=backward,
        PER_ROW=cos.dim() == 3,
        BLOCK_H=triton.next_power_of_2(heads),
        BLOCK=triton.next_power_of_2(d // 2),
    )
    return out


class Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.in_order = sorted(range(4), key=lambda i: -x.stride()[i])  # x's dims from outermost in memory
        return _apply(x, cos, sin, torch.empty(x.shape, dtype=x.dtype, device=x.device), backward=False)

    @staticmethod
    def backward(ctx, d_out: torch.Tensor):
        cos, sin = ctx.saved_tensors
        order = ctx.in_order  # the gradient in x's memory layout: a view back to the projection, not a copy
        grad = torch.empty([d_out.shape[i] for i in order], dtype=d_out.dtype, device=d_out.device)
        grad = grad.permute(*sorted(range(4), key=order.__getitem__))
        return _apply(d_out, cos, sin, grad, backward=True), None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, S, D], any strides with unit stride in D; cos, sin [S, D] or [B, S, D]; returns
    [B, heads, S, D] contiguous."""
    return Rope.apply(x, cos, sin)
