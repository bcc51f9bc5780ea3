"""RMSNorm, forward and backward, one row per program: statistics in fp32, rounded where Hugging Face's
Llama rounds (the normalised row to the input dtype before the weight multiplies it)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, n, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / n + eps)
    xn = (x * rstd).to(y_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * n + cols, (xn * w).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, rows, n, rows_per_program: tl.constexpr,
                  BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), tl.float32)
    for i in range(0, rows_per_program):
        row = (pid * rows_per_program + i).to(tl.int64)
        live = mask & (row < rows)  # the last program's rows may run past the end
        x = tl.load(x_ptr + row * n + cols, mask=live, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * n + cols, mask=live, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row, mask=row < rows, other=0.0)
        xn = x * rstd
        dxn = dy * w
        dx = rstd * (dxn - xn * tl.sum(dxn * xn, 0) / n)
        tl.store(dx_ptr + row * n + cols, dx.to(dx_ptr.dtype.element_ty), mask=live)
        dw += dy * xn.to(dx_ptr.dtype.element_ty).to(tl.float32)
    tl.store(dw_partial_ptr + pid * n + cols, dw, mask=mask)


class RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        n = x.shape[-1]
        x2 = x.contiguous().view(-1, n)
        y = torch.empty_like(x2)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        _rms_norm_fwd[(x2.shape[0],)](x2, weight, y, rstd, n, eps, BLOCK=triton.next_power_of_2(n))
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        rows, n = x2.shape
        programs = min(rows, 1024)
        per = -(-rows // programs)
        dx = torch.empty_like(x2)
        partial = torch.empty(programs, n, dtype=torch.float32, device=x2.device)
        _rms_norm_bwd[(programs,)](dy.contiguous().view(-1, n), x2, weight, rstd, dx, partial, rows, n, per,
                                   BLOCK=triton.next_power_of_2(n))
        return dx.view(dy.shape), partial.sum(0).to(weight.dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return RMSNorm.apply(x, weight, eps)
