"""SlideFormer on the benchmark workload, one plan per process (so peak host RSS is this run's)."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from bench.common import BATCH, MODEL, SEQ, cap_gpu, memory_readings, provenance, throughput, time_steps, write_result
from slideformer import kernels
from slideformer.data import random_next_token_batch
from slideformer.models import RandomWeights, load_model_config
from slideformer.schedule.plan import Plan, uniform_plan
from slideformer.runtime import AdamWConfig, Engine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--seq", type=int, default=SEQ)
    ap.add_argument("--chunk", type=int, default=None)
    ap.add_argument("--window", type=int, default=2)
    ap.add_argument("--activation", default="offload")
    ap.add_argument("--keep-last", type=int, default=0)
    ap.add_argument("--gpu-units", type=int, default=0)
    ap.add_argument("--update", default="during_backward")
    ap.add_argument("--grad-ring", type=int, default=4)
    ap.add_argument("--loss-chunk", type=int, default=4096)
    ap.add_argument("--plan", help="a plan JSON (overrides the plan flags)")
    ap.add_argument("--gpu-cap-gib", type=float, default=None)
    ap.add_argument("--disk-dir", help="the disk tier's directory, for plans that place layers on disk")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    budget = cap_gpu(a.gpu_cap_gib)
    if a.plan:
        plan = Plan.load(a.plan)
        a.model, a.batch, a.seq = plan.model, plan.batch, plan.seq
    cfg = load_model_config(a.model)
    if not a.plan:
        plan = uniform_plan(
            a.model,
            cfg.num_layers,
            a.batch,
            a.seq,
            chunk=a.chunk,
            window=a.window,
            activation=a.activation,
            keep_last=a.keep_last,
            gpu_units=a.gpu_units,
            update=a.update,
            grad_ring=a.grad_ring,
            loss_chunk_tokens=a.loss_chunk,
        )
    t0 = time.perf_counter()
    engine = Engine(
        cfg, plan, RandomWeights(cfg, seed=0), AdamWConfig(lr=1e-5), gpu_budget_bytes=budget, disk_dir=a.disk_dir
    )
    init_s = time.perf_counter() - t0
    data = [random_next_token_batch(cfg.vocab_size, a.batch, a.seq, seed=i) for i in range(2)]
    timing = time_steps(lambda i: engine.train_step(*data[i % 2]).loss, a.warmup, a.steps, engine.synchronize)
    write_result(
        a.out,
        {
            "system": "slideformer",
            "name": a.name,
            "command": "python -m bench.ours " + " ".join(sys.argv[1:]),
            **provenance(),
            "plan": plan.__dict__,
            "init_s": init_s,
            "triton_kernels": kernels.active(torch.empty(0, device="cuda")),
            **timing,
            **throughput(a.model, a.batch, a.seq, timing["step_s"]),
            **memory_readings(),
            "gpu_cap_gib": a.gpu_cap_gib,
        },
    )
    engine.close()


if __name__ == "__main__":
    main()
