"""SwiGLU, silu(gate) * up, forward and backward in one pass each, rounded where eager bf16 rounds."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _swiglu_fwd(g_ptr, u_ptr, o_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    g = tl.load(g_ptr + i, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + i, mask=mask, other=0.0).to(tl.float32)
    act = (g * tl.sigmoid(g)).to(o_ptr.dtype.element_ty).to(tl.float32)
    tl.store(o_ptr + i, (act * u).to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(do_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    do = tl.load(do_ptr + i, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + i, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + i, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    act = (g * sig).to(dg_ptr.dtype.element_ty).to(tl.float32)
    d_act = (do * u).to(dg_ptr.dtype.element_ty).to(tl.float32)
    tl.store(du_ptr + i, (do * act).to(du_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + i, (d_act * sig * (1.0 + g * (1.0 - sig))).to(dg_ptr.dtype.element_ty), mask=mask)


class SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        n = gate.numel()
        _swiglu_fwd[(triton.cdiv(n, BLOCK),)](gate, up, out, n, BLOCK=BLOCK)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, d_out: torch.Tensor):
        gate, up = ctx.saved_tensors
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        _swiglu_bwd[(triton.cdiv(n, BLOCK),)](d_out.contiguous(), gate, up, dg, du, n, BLOCK=BLOCK)
        return dg, du


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return SwiGLU.apply(gate, up)
