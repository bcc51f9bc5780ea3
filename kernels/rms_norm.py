"""RMSNorm, forward and backward, one row per program: statistics in fp32, rounded where Hugging Face's
Llama rounds (the normalised row to the input dtype before the weight multiplies it).

`add_rms_norm` fuses the residual add in front of the norm (the block's `h = x + attn; norm(h)`): one pass
writes both the sum and its norm, and the backward adds the sum's own gradient to the norm's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_fwd(
    x_ptr, delta_ptr, w_ptr, sum_ptr, y_ptr, rstd_ptr, n, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * n + cols, mask=mask, other=0.0)
    if HAS_DELTA:  # the residual sum, rounded to the activation dtype as eager's add rounds it
        x = x.to(tl.float32) + tl.load(delta_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
        x = x.to(y_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * n + cols, x, mask=mask)
    x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / n + eps)
    xn = (x * rstd).to(y_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * n + cols, (xn * w).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd(
    dy_ptr,
    dsum_ptr,
    x_ptr,
    w_ptr,
    rstd_ptr,
    dx_ptr,
    dw_partial_ptr,
    rows,
    n,
    rows_per_program: tl.constexpr,
    HAS_DSUM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), tl.float32)
    for i in range(0, rows_per_program):
        row = (pid * rows_per_program + i).to(tl.int64)
        # the last program's rows may run past the end; one comparison, not `mask & (row < rows)`, whose
        # scalar-broadcast mask Triton 3.9's interpreter rejects
        live = cols < tl.where(row < rows, n, 0)
        x = tl.load(x_ptr + row * n + cols, mask=live, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * n + cols, mask=live, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row, mask=row < rows, other=0.0)
        xn = x * rstd
        dxn = dy * w
        dx = rstd * (dxn - xn * tl.sum(dxn * xn, 0) / n)
        if HAS_DSUM:  # the residual sum also feeds the block's output
            dx += tl.load(dsum_ptr + row * n + cols, mask=live, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row * n + cols, dx.to(dx_ptr.dtype.element_ty), mask=live)
        dw += dy * xn.to(dx_ptr.dtype.element_ty).to(tl.float32)
    tl.store(dw_partial_ptr + pid * n + cols, dw, mask=mask)


def _backward(
    x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor, dsum: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, n = x2.shape
    programs = min(rows, 1024)
    per = -(-rows // programs)
    dx = torch.empty_like(x2)
    partial = torch.empty(programs, n, dtype=torch.float32, device=x2.device)
    dy2 = dy.contiguous().view(-1, n)
    _rms_norm_bwd[(programs,)](
        dy2,
        dy2 if dsum is None else dsum.contiguous().view(-1, n),
        x2,
        weight,
        rstd,
        dx,
        partial,
        rows,
        n,
        per,
        HAS_DSUM=dsum is not None,
        BLOCK=triton.next_power_of_2(n),
    )
    return dx, partial.sum(0).to(weight.dtype)


class RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        n = x.shape[-1]
        x2 = x.contiguous().view(-1, n)
        y = torch.empty_like(x2)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        _rms_norm_fwd[(x2.shape[0],)](
            x2, x2, weight, y, y, rstd, n, eps, HAS_DELTA=False, BLOCK=triton.next_power_of_2(n)
        )
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = _backward(x2, weight, rstd, dy, None)
        return dx.view(dy.shape), dw, None


class AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
        n = x.shape[-1]
        x2, d2 = x.contiguous().view(-1, n), delta.contiguous().view(-1, n)
        total, y = torch.empty_like(x2), torch.empty_like(x2)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        _rms_norm_fwd[(x2.shape[0],)](
            x2, d2, weight, total, y, rstd, n, eps, HAS_DELTA=True, BLOCK=triton.next_power_of_2(n)
        )
        ctx.save_for_backward(total, weight, rstd)
        return total.view(x.shape), y.view(x.shape)

    @staticmethod
    def backward(ctx, dsum: torch.Tensor, dy: torch.Tensor):
        total, weight, rstd = ctx.saved_tensors
        dx, dw = _backward(total, weight, rstd, dy, dsum)
        dx = dx.view(dy.shape)
        return dx, dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return RMSNorm.apply(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta) * weight) in one pass."""
    return AddRMSNorm.apply(x, delta, weight, eps)
