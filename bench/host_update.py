"""The CPU update of one decoder layer against the host's memory bandwidth: torch's fused AdamW alone, with the
cast of the new master into bf16 weights after it (`Plan.host_bf16_weights` as the runtime did up to
2026-12-01), both in cache-sized pieces (each piece cast while it is still in cache), and the runtime's
one-pass AdamW + cast (`kernels.host_adamw`).

    python -m bench.host_update --out host-update.json

AdamW reads master, gradient and both states (16 bytes per parameter) and writes master and states (12); the
cast reads the master (4) and writes bf16 (2); the one pass moves 30. Bytes per second are those counts over the measured time, set
beside a plain copy's (read plus written) on the same threads.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import provenance, write_result
from slideformer.kernels import host_adamw
from slideformer.models import load_model_config

ADAMW = dict(lr=1e-5, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)


def seconds(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--pieces", default="1048576,4194304,16777216", help="parameters per piece")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    n = load_model_config(args.model).layer_params
    pin = torch.cuda.is_available()  # the runtime's buffers are pinned on a GPU machine
    master, grad, m, v = (torch.full((n,), x, dtype=torch.float32, pin_memory=pin) for x in (0.5, 1e-3, 0.0, 0.0))
    bf16 = torch.empty(n, dtype=torch.bfloat16, pin_memory=pin)
    step = torch.zeros(())

    def adamw(rows: slice = slice(None)) -> None:
        step.add_(1)
        torch._fused_adamw_([master[rows]], [grad[rows]], [m[rows]], [v[rows]], [], [step], **ADAMW)

    def with_cast() -> None:
        adamw()
        bf16.copy_(master)

    def in_pieces(piece: int) -> None:
        for start in range(0, n, piece):
            rows = slice(start, min(start + piece, n))
            adamw(rows)
            bf16[rows].copy_(master[rows])

    def one_pass() -> None:
        step.add_(1)
        host_adamw.adamw_and_cast(master, grad, m, v, bf16, int(step.item()), 1e-5, 0.9, 0.999, 1e-8, 0.0)

    compiled = host_adamw.prepare()
    src, dst = torch.empty(n, dtype=torch.float32), torch.empty(n, dtype=torch.float32)
    copy_s = seconds(lambda: dst.copy_(src))
    rows = {"adamw": seconds(adamw), "adamw_then_cast": seconds(with_cast), "cast": seconds(lambda: bf16.copy_(master))}
    for piece in map(int, args.pieces.split(",")):
        rows[f"adamw_and_cast_in_pieces_of_{piece}"] = seconds(lambda piece=piece: in_pieces(piece))
    rows["adamw_and_cast_one_pass"] = seconds(one_pass)
    # bytes per parameter each run moves: AdamW 28, the cast 6, the one pass 30
    moved = {name: 30 if "one_pass" in name else 28 * ("adamw" in name) + 6 * ("cast" in name) for name in rows}
    out = {
        "command": " ".join(["python -m bench.host_update", *[f"--{k} {v}" for k, v in vars(args).items()]]),
        **provenance(),
        "params": n,
        "threads": torch.get_num_threads(),
        "pinned": pin,
        "one_pass_compiled": compiled,
        "copy_bytes_per_s": 8 * n / copy_s,
        "runs": {
            name: {
                "s": s,
                "params_per_s": n / s,
                "bytes_per_s": n * moved[name] / s,
            }
            for name, s in rows.items()
        },
    }
    write_result(args.out, out)


if __name__ == "__main__":
    main()
