"""Packed rows' attention on the GPU: one variable-length flash call per chunk against one SDPA call per
sample (what `causal_attention` did before), forward and backward, on the 8B shape's heads.

    python -m bench.packed_attention --out bench/results/packed-attention.json
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from bench.common import provenance
from slideformer.models.layers import per_sample_attention, varlen_attention


def packed_spans(rows: int, seq: int, mean: int, seed: int) -> list[list[tuple[int, int]]]:
    """Rows of samples of random lengths (uniform 1..2*mean), the last one cut at the row's end."""
    rng, out = random.Random(seed), []
    for _ in range(rows):
        row, s = [], 0
        while s < seq:
            e = min(seq, s + rng.randint(1, 2 * mean))
            row.append((s, e))
            s = e
        out.append(row)
    return out


def time_ms(fn, repeats: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    heads, kv_heads, d = 32, 8, 128  # Llama-3.1-8B
    results = []
    for mean in (64, 256, 1024):
        spans = packed_spans(a.rows, a.seq, mean, seed=mean)
        q = torch.randn(a.rows, heads, a.seq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (
            torch.randn(a.rows, kv_heads, a.seq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in "kv"
        )
        do = torch.randn_like(q)
        row = {"mean_sample_tokens": mean, "samples": sum(map(len, spans))}
        for name, attend in (("varlen", varlen_attention), ("per_sample", per_sample_attention)):
            row[f"{name}_ms"] = time_ms(lambda: attend(q, k, v, spans).backward(do))
        row["speedup"] = row["per_sample_ms"] / row["varlen_ms"]
        print(row, flush=True)
        results.append(row)
    record = {
        "command": "python -m bench.packed_attention " + f"--rows {a.rows} --seq {a.seq} --out {a.out}",
        **provenance(),
        "what": "forward + backward of one layer's attention over packed rows, ms per call",
        "rows": a.rows,
        "seq": a.seq,
        "results": results,
    }
    with open(a.out, "w") as f:
        json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
