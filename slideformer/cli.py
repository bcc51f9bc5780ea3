"""The `slideformer` command. Recipes live here; components stay in their packages."""
from __future__ import annotations

import argparse
import json
import sys
import time

from slideformer.data import random_next_token_batch
from slideformer.models import ModelConfigError, RandomWeights, load_model_config
from slideformer.plan import Plan, PlanError

LATER = {
    "plan": "capacity reports and plan search arrive with issue 3 (calibrate, simulate, plan)",
    "calibrate": "machine calibration arrives with issue 3 (calibrate, simulate, plan)",
    "simulate": "the discrete-event simulator arrives with issue 3 (calibrate, simulate, plan)",
}


def cmd_train(a: argparse.Namespace) -> int:
    import torch

    from slideformer.models.weights import SafetensorsReader
    from slideformer.runtime import AdamWConfig, Engine

    plan = Plan.load(a.plan)
    cfg = load_model_config(plan.model)
    if plan.device == "cuda" and not torch.cuda.is_available():
        raise PlanError("plan.device is 'cuda' but no CUDA device is available (set device to 'cpu' to run on CPU)")
    source = SafetensorsReader(a.weights) if a.weights else RandomWeights(cfg, seed=a.seed)
    engine = Engine(cfg, plan, source, AdamWConfig(lr=a.lr, weight_decay=a.weight_decay,
                                                   max_grad_norm=a.max_grad_norm))
    ids, labels = random_next_token_batch(cfg.vocab_size, plan.batch, plan.seq, a.seed)
    tokens_per_step = plan.batch * plan.seq
    for step in range(a.steps):
        t = time.perf_counter()
        r = engine.train_step(ids, labels)
        dt = time.perf_counter() - t
        print(f"step {step + 1}/{a.steps}  loss {r.loss:.4f}  grad-norm {r.grad_norm:.3f}  {dt:.2f} s  "
              f"{tokens_per_step / dt:.0f} tok/s  "
              f"{cfg.model_flops_per_token(plan.seq) * tokens_per_step / dt / 1e12:.1f} TFLOPS", flush=True)
    engine.close()
    return 0


def cmd_later(a: argparse.Namespace) -> int:
    print(f"slideformer {a.command}: not available yet: {LATER[a.command]}", file=sys.stderr)
    return 3


def cmd_model(a: argparse.Namespace) -> int:
    cfg = load_model_config(a.model)
    print(json.dumps({**cfg.to_dict(), "total_params": cfg.total_params, "layer_params": cfg.layer_params}, indent=2))
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="slideformer", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="run a plan (random-token steps until the data pipeline of issue 6 lands)")
    t.add_argument("--plan", required=True, help="plan JSON (see slideformer.plan.Plan)")
    t.add_argument("--weights", help="Hugging Face model directory with safetensors (default: random weights)")
    t.add_argument("--steps", type=int, default=3)
    t.add_argument("--lr", type=float, default=1e-5)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--max-grad-norm", type=float, default=None)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_train)
    m = sub.add_parser("model", help="print a model's shape and parameter count")
    m.add_argument("model", help="preset (optionally NAME:LAYERS), config.json or model directory")
    m.set_defaults(func=cmd_model)
    for name in LATER:
        sub.add_parser(name, help=LATER[name]).set_defaults(func=cmd_later)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        return a.func(a)
    except (ModelConfigError, PlanError, FileNotFoundError) as e:
        print(f"slideformer: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
