"""The CPU AdamW step that also writes the unit's bf16 weights, in one pass over memory.

A CPU-updated unit that keeps bf16 weights in RAM (`cpu` units under `Plan.host_bf16_weights`, and disk
units) needs them cast from the new master after every update. As a second pass the cast reads the master again: 34 bytes
per parameter of host memory traffic instead of 30, and the CPU update is the step's bottleneck at small
batch (the fused torch AdamW already runs at the host's copy bandwidth, so only fewer bytes make it faster).

The step is torch's fused CPU AdamW's formula, term for term in its order, in fp32, compiled by
`torch.compile` (Inductor's C++ backend: one vectorised, multithreaded loop). The compiler may contract a
multiply and an add into one rounding where torch's kernel rounds twice, so the results agree with
`torch.optim.AdamW(fused=True)` to within rounding (a few ulps), not bit for bit; the bf16 weights are exactly
the new master rounded. The gradient may be fp32 or bf16 (`Plan.bf16_layer_grads`: read as fp32 in the same
loop) and is scaled by the clip coefficient there, in fp32. Where no C++ compiler is found the step falls
back, with a warning, to torch's fused AdamW followed by the cast.
"""

from __future__ import annotations

import math
import threading
import warnings
from typing import Callable

import torch

_lock = threading.Lock()
_step: Callable[..., None] | None = None
_warmed: set[torch.dtype] = set()  # the gradient dtypes the compiled step has been called with


def _adamw_and_cast(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    weights: torch.Tensor,
    grad_scale: torch.Tensor,
    decay: torch.Tensor,
    grad_coef: torch.Tensor,
    beta2: torch.Tensor,
    grad_sq_coef: torch.Tensor,
    neg_step_size: torch.Tensor,
    bias_correction2_sqrt: torch.Tensor,
    eps: torch.Tensor,
) -> None:
    grad = grad.to(torch.float32) * grad_scale  # exact for a scale of 1 (no clipping)
    param.mul_(decay)
    exp_avg.lerp_(grad, grad_coef)
    exp_avg_sq.copy_(exp_avg_sq * beta2 + grad_sq_coef * grad * grad)
    param.add_(neg_step_size * exp_avg / (exp_avg_sq.sqrt() / bias_correction2_sqrt + eps))
    weights.copy_(param)


def _two_passes(param, grad, exp_avg, exp_avg_sq, weights, step, lr, beta1, beta2, eps, weight_decay) -> None:
    """torch's fused AdamW on an fp32 gradient (already scaled), then the cast."""
    step_t = torch.tensor(float(step))
    torch._fused_adamw_(
        [param], [grad], [exp_avg], [exp_avg_sq], [], [step_t], lr=lr, beta1=beta1, beta2=beta2,
        weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False,
    )  # fmt: skip
    weights.copy_(param)


def prepare(grad_dtype: torch.dtype = torch.float32) -> bool:
    """Compile the one-pass step for gradients of `grad_dtype` (on the calling thread, once per process and
    dtype; about 10-30 s the first time, then from Inductor's cache). False, with a warning, where it cannot be
    compiled: the step then takes two passes."""
    global _step
    with _lock:
        if _step is None:
            _warmed.clear()
        elif _step is _two_passes or grad_dtype in _warmed:
            return _step is not _two_passes
        # The C++ wrapper releases the GIL while the loop runs (the default Python binding holds it, which
        # stalled the runtime's issuing thread for whole updates); same loop, same results.
        compiled = _step or torch.compile(_adamw_and_cast, dynamic=True, fullgraph=True, options={"cpp_wrapper": True})
        try:
            # The first call's size is Inductor's hint for every size after it (dynamic shapes): below 512
            # elements per thread it emits a serial loop (16 threads: 8,192), so warm up with plenty.
            n = 1 << 20
            p, m, v = (torch.zeros(n) for _ in range(3))
            grad, weights = torch.zeros(n, dtype=grad_dtype), torch.empty(n, dtype=torch.bfloat16)
            scalars = (1.0, 1.0, 0.1, 0.999, 0.001, -1e-5, 1.0, 1e-8)
            compiled(p, grad, m, v, weights, *(torch.tensor(x) for x in scalars))
            _step = compiled
            _warmed.add(grad_dtype)
        except Exception as e:  # no C++ compiler, or an Inductor that cannot build the loop
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            warnings.warn(f"one-pass CPU AdamW + bf16 cast unavailable ({first}): two passes instead")
            _step = _two_passes
        return _step is not _two_passes


def adamw_and_cast(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    weights: torch.Tensor,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_scale: float | None = None,
) -> None:
    """AdamW's step `step` (counted from 1) on fp32 CPU tensors in place from `grad` (fp32 or bf16) times
    `grad_scale` (the clip coefficient; None: 1), and `weights` (bf16, same numel) set to the new `param`; none
    may require grad. An fp32 `grad` may be scaled in place."""
    if _step is None or (_step is not _two_passes and grad.dtype not in _warmed):
        prepare(grad.dtype)
    assert _step is not None
    if _step is _two_passes:
        if grad.dtype != torch.float32:
            grad = grad.to(torch.float32)
        if grad_scale is not None:
            grad.mul_(grad_scale)
        return _two_passes(param, grad, exp_avg, exp_avg_sq, weights, step, lr, beta1, beta2, eps, weight_decay)
    # The scalars as torch's kernel forms them: in double, then rounded to fp32 once.
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    scalars = (
        1.0 if grad_scale is None else grad_scale,
        1 - lr * weight_decay,
        1 - beta1,
        beta2,
        1 - beta2,
        -lr / bias_correction1,
        math.sqrt(bias_correction2),
        eps,
    )
    _step(param, grad, exp_avg, exp_avg_sq, weights, *(torch.tensor(x, dtype=torch.float32) for x in scalars))
