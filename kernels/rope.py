"""Rotary embedding applied to q or k, [B, heads, S, D] with cos/sin [S, D] (Llama-3 frequency scaling is in
the tables), forward and backward; each product and the sum rounded as eager bf16 rounds them."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope(x_ptr, cos_ptr, sin_ptr, o_ptr, seq, half, backward: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # one (batch, head, position) row of D = 2 * half values
    pos = row % seq
    j = tl.arange(0, BLOCK)
    mask = j < half
    x1 = tl.load(x_ptr + row * 2 * half + j, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + row * 2 * half + half + j, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + pos * 2 * half + j, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + pos * 2 * half + half + j, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + pos * 2 * half + j, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + pos * 2 * half + half + j, mask=mask, other=0.0).to(tl.float32)
    dt = o_ptr.dtype.element_ty
    if backward:  # the transpose of the rotation
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:  # x * cos + rotate_half(x) * sin, each product rounded, then the sum
        o1 = (x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)
        o2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
    tl.store(o_ptr + row * 2 * half + j, o1.to(dt), mask=mask)
    tl.store(o_ptr + row * 2 * half + half + j, o2.to(dt), mask=mask)


def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    seq, d = x.shape[-2], x.shape[-1]
    _rope[(x.numel() // d,)](x, cos.contiguous(), sin.contiguous(), out, seq, d // 2, backward=backward,
                             BLOCK=triton.next_power_of_2(d // 2))
    return out


class Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _apply(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, d_out: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _apply(d_out, cos, sin, backward=True), None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return Rope.apply(x, cos, sin)
