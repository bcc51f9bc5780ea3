"""Where a decoder layer's GPU time goes: one Llama-3.1-8B layer, recompute + backward at one chunk of
8 x 2048 tokens (the runtime's offload policy), kernels by total CUDA time (torch.profiler).

    python -m bench.layer_profile --out bench/results/X.json
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import provenance, write_result
from slideformer.models import PRESETS, RandomWeights
from slideformer.models.layers import decoder_layer, rope_tables
from slideformer.runtime.layout import unit_layouts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    cfg, dev, bf16 = PRESETS["llama-3.1-8b"], "cuda", torch.bfloat16
    layout = unit_layouts(cfg)[1]
    src = RandomWeights(cfg, seed=0)
    flat = torch.cat([src.get(n).flatten() for n in layout.views(torch.empty(layout.numel))]).to(dev, bf16)
    params = {k: v.detach().requires_grad_() for k, v in layout.views(flat, short_names=True).items()}
    x = torch.randn(8, 2048, cfg.hidden_size, device=dev, dtype=bf16)
    dy = torch.randn_like(x)
    cos, sin = rope_tables(cfg, 2048, dev, bf16)

    def step() -> None:
        xi = x.detach().requires_grad_()
        y = decoder_layer(params, xi, cos, sin, cfg)
        torch.autograd.grad(y, [xi, *params.values()], dy)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    rows = sorted((e for e in prof.key_averages() if e.device_time_total > 0), key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in rows)
    kernels = [
        {
            "kernel": e.key[:160],
            "ms_per_step": e.device_time_total / 5 / 1e3,
            "share": e.device_time_total / total,
            "calls_per_step": e.count / 5,
        }
        for e in rows[: a.top]
    ]
    write_result(
        a.out,
        {
            "command": f"python -m bench.layer_profile --out {a.out}",
            **provenance(),
            "gpu_ms_per_step": total / 5 / 1e3,
            "kernels": kernels,
        },
    )


if __name__ == "__main__":
    main()
