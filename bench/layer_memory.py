"""Where a decoder layer's GPU memory goes in recompute + backward: peak bytes beyond the layer's input,
output gradient and weights, per token, for several shapes, chunk sizes and MLP tiles, next to autograd
through the whole layer at once (the path before `decoder_layer_backward`).

    python -m bench.layer_memory --out bench/results/X.json
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import provenance, write_result
from slideformer.calibrate.measure import peak_extra_bytes
from slideformer.models import load_model_config
from slideformer.models.layers import decoder_layer, decoder_layer_backward, rope_tables

# (model, batch, seq): short sequences in a batch and long single sequences, for each shape
WORKLOADS = {
    "llama-3.1-8b": [(1, 2048), (4, 2048), (8, 2048), (1, 32768), (1, 65536)],
    "qwen3-14b": [(1, 2048), (4, 2048), (1, 16384)],
    "qwen2.5-32b": [(1, 2048), (4, 2048), (1, 16384)],
}
TILES = (0, 8192, 2048)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    dev, bf16 = "cuda", torch.bfloat16
    rows = []
    for model, shapes in WORKLOADS.items():
        cfg = load_model_config(model)
        params = {
            n: (torch.randn(s, device=dev, dtype=bf16) * 0.02).requires_grad_()
            for n, s in cfg.layer_param_shapes().items()
        }
        for batch, seq in shapes:
            x = torch.randn(batch, seq, cfg.hidden_size, device=dev, dtype=bf16)
            dy = torch.randn_like(x)
            cos, sin = rope_tables(cfg, seq, dev, bf16)
            tokens = batch * seq

            def whole_layer_autograd() -> None:
                xi = x.detach().requires_grad_()
                y = decoder_layer(params, xi, cos, sin, cfg)
                torch.autograd.grad(y, [xi, *params.values()], dy)

            variants = {"autograd": whole_layer_autograd} | {
                f"tile{t}": (lambda t=t: decoder_layer_backward(params, x, dy, cos, sin, cfg, t, lambda n, g: None))
                for t in TILES
                if t == 0 or t < tokens
            }
            for name, fn in variants.items():
                try:
                    fn()
                    torch.cuda.synchronize()
                    peak = peak_extra_bytes(fn)
                    t0 = time.perf_counter()
                    for _ in range(3):
                        fn()
                    torch.cuda.synchronize()
                    ms = (time.perf_counter() - t0) / 3 * 1e3
                except torch.OutOfMemoryError:
                    peak, ms = None, None
                torch.cuda.empty_cache()
                row = {
                    "model": model,
                    "batch": batch,
                    "seq": seq,
                    "tokens": tokens,
                    "variant": name,
                    "ms": ms,
                    "peak_extra_bytes": peak,
                    "bytes_per_token": peak / tokens if peak else None,
                }
                rows.append(row)
                print(row, flush=True)
        torch.cuda.empty_cache()
    write_result(a.out, {"command": f"python -m bench.layer_memory --out {a.out}", **provenance(), "rows": rows})


if __name__ == "__main__":
    main()
