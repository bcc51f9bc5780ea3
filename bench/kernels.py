"""Each Triton kernel against PyTorch eager and torch.compile (time and peak memory), forward + backward,
at the 16-layer Llama-3.1-8B benchmark's shapes (one chunk of 8 x 2048 tokens).

    python -m bench.kernels --out bench/results/X.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from bench.common import provenance
from slideformer import kernels
from slideformer.kernels.cross_entropy import linear_cross_entropy
from slideformer.kernels.rope import Rope
from slideformer.kernels.swiglu import swiglu
from slideformer.models import PRESETS
from slideformer.models.layers import add_rms_norm, apply_rope, rms_norm, rope_tables
from slideformer.models.loss import head_loss_and_grads

CFG = PRESETS["llama-3.1-8b"]
TOKENS, BATCH, SEQ = 8 * 2048, 8, 2048


def measure(fn, repeats: int = 5) -> dict:
    """Median time of fn() (forward + backward) and its peak GPU memory beyond what was allocated before."""
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return {"ms": sorted(times)[len(times) // 2], "peak_extra_gib": (torch.cuda.max_memory_allocated() - base) / 2**30}


def fwd_bwd(f, *inputs):
    leaves = [t.detach().requires_grad_() for t in inputs]
    d = None

    def run():
        nonlocal d
        out = f(*leaves)
        d = d if d is not None else torch.randn_like(out)
        torch.autograd.grad(out, leaves, d)

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    dev, bf16 = "cuda", torch.bfloat16
    h, ff = CFG.hidden_size, CFG.intermediate_size
    x = torch.randn(TOKENS, h, device=dev, dtype=bf16)
    w = 1 + 0.1 * torch.randn(h, device=dev, dtype=bf16)
    gate, up = torch.randn(TOKENS, ff, device=dev, dtype=bf16), torch.randn(TOKENS, ff, device=dev, dtype=bf16)
    q = torch.randn(BATCH, CFG.num_heads, SEQ, CFG.head_dim, device=dev, dtype=bf16)
    q_proj = torch.randn(BATCH, SEQ, CFG.num_heads * CFG.head_dim, device=dev, dtype=bf16)
    cos, sin = rope_tables(CFG, SEQ, dev, bf16)

    def eager_norm(t, weight):
        hf = t.float()
        return weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(bf16)

    def eager_rope(t):
        a, b = t.chunk(2, dim=-1)
        return t * cos + torch.cat((-b, a), dim=-1) * sin

    heads, d = CFG.num_heads, CFG.head_dim

    def from_projection(t):  # the attention's q: the projection output, viewed per head and transposed
        return t.view(BATCH, SEQ, heads, d).transpose(1, 2)

    def rope_copying_first(t):  # the kernel's previous path: make the transposed q contiguous, rope, copy back
        return Rope.apply(from_projection(t).contiguous(), cos, sin)

    def fused_add_norm(t, delta, weight):
        total, normed = add_rms_norm(t, delta, weight, 1e-5)
        return total + normed

    def eager_add_norm(t, delta, weight):
        total = t + delta
        return total + eager_norm(total, weight)  # both outputs feed the backward, as in the block

    results = {}
    cases = {
        "rms_norm": (lambda t, weight: rms_norm(t, weight, 1e-5), eager_norm, (x, w)),
        "add_rms_norm": (fused_add_norm, eager_add_norm, (x, torch.randn_like(x), w)),
        "swiglu": (swiglu, lambda g, u: F.silu(g) * u, (gate, up)),
        "rope": (lambda t: apply_rope(t, cos, sin), eager_rope, (q,)),
        "rope_from_projection": (
            lambda t: apply_rope(from_projection(t), cos, sin),
            lambda t: eager_rope(from_projection(t)),
            (q_proj,),
        ),
    }
    for name, (ours, eager, inputs) in cases.items():
        with kernels.use(True):
            results[name] = {"triton": measure(fwd_bwd(ours, *inputs))}
        results[name]["eager"] = measure(fwd_bwd(eager, *inputs))
        results[name]["torch_compile"] = measure(fwd_bwd(torch.compile(eager), *inputs))
    with kernels.use(True):
        results["rope_from_projection"]["triton_copying_first"] = measure(fwd_bwd(rope_copying_first, q_proj))

    head = (0.02 * torch.randn(CFG.vocab_size, h, device=dev)).to(bf16)
    labels = torch.randint(0, CFG.vocab_size, (TOKENS,), device=dev)
    grad_w = torch.zeros(CFG.vocab_size, h, device=dev)
    norm_w, grad_norm = torch.ones(h, device=dev, dtype=bf16), torch.zeros(h, device=dev)

    def eager_head_loss(t, weight):
        return F.cross_entropy((t @ weight.t()).float(), labels, reduction="sum") / TOKENS

    results["linear_cross_entropy"] = {
        "triton": measure(lambda: linear_cross_entropy(x, head, labels, 1 / TOKENS, 4096, grad_w)),
        "eager": measure(fwd_bwd(eager_head_loss, x, head)),
        "torch_compile": measure(fwd_bwd(torch.compile(eager_head_loss), x, head)),
    }
    with kernels.use(False):  # the runtime's own chunked PyTorch path (norm + head + loss), for reference
        results["linear_cross_entropy"]["chunked_pytorch"] = measure(
            lambda: head_loss_and_grads(
                x.view(1, TOKENS, h), labels.view(1, -1), norm_w, head, 1e-5, TOKENS, 4096, grad_norm, grad_w
            )
        )
    ce = results["linear_cross_entropy"]
    ce["peak_ratio_eager_over_triton"] = ce["eager"]["peak_extra_gib"] / ce["triton"]["peak_extra_gib"]
    record = {
        "command": "python -m bench.kernels --out " + a.out,
        **provenance(),
        "tokens": TOKENS,
        "model_shape": "llama-3.1-8b",
        "results": results,
    }
    with open(a.out, "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
