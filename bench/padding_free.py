"""Padding-free bins beside best-fit rows: the same samples packed both ways for one plan, then trained on the GPU.

The samples' lengths are drawn from a seeded log-normal (median `--median` tokens, `--sigma`, 32 to 4,096
tokens; sigma 0.9 spreads them as chat fine-tuning data does, a small sigma is data of one length), every token
trained, random ids. Per packing: the share of computed tokens that are padding or a sample's last token (which
predicts nothing), the sequences an epoch takes, and, on the Llama-3.1-8B layer shape cut to `--layers` layers
(per-sample variable-length attention, random weights), the step time, trained tokens per second and the epoch's
time, both packings trained by one engine in alternating rounds.

    python -m bench.padding_free --out bench/results/<device>-<date>-padding-free.json
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace
from typing import cast

import numpy as np
import torch

from bench.common import memory_readings, provenance, time_steps, write_result
from bench.generic_speed import LLAMA_8B_LAYERS
from slideformer.dataset import Batches, Example, to_sequences
from slideformer.kernels import IGNORE_INDEX
from slideformer.models import ModelConfig, RandomWeights
from slideformer.runtime import AdamWConfig, Engine
from slideformer.schedule.plan import uniform_plan
from slideformer.tokenizer import Tokenizer

PACKINGS = ("best_fit", "padding_free")


def samples(count: int, median: int, sigma: float, vocab: int, seed: int) -> list[Example]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(median), sigma, count), 32, 4096).astype(int)
    return [Example(rng.integers(3, vocab, n).tolist(), [True] * int(n)) for n in lengths]


def packed(packing: str, a: argparse.Namespace, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pad = cast(Tokenizer, SimpleNamespace(pad_id=0))  # to_sequences reads the pad id alone
    data = samples(a.samples, a.median, a.sigma, vocab, a.seed)
    ids, labels, positions = to_sequences(data, a.seq, pad, True, True, packing, a.chunk)
    assert positions is not None
    return ids, labels, positions


def fill(ids: torch.Tensor, labels: torch.Tensor) -> dict:
    computed, trained = ids.numel(), int((labels != IGNORE_INDEX).sum())
    return {
        "sequences": len(ids),
        "computed_tokens": computed,
        "trained_tokens": trained,
        "untrained_share": 1 - trained / computed,
    }


def timed(a: argparse.Namespace) -> dict:
    """Both packings' batches trained by one engine (one plan), in alternating rounds: the step times differ only
    by the data (separate processes differed by up to 10% from one to the next on the same data)."""
    cfg = ModelConfig.from_hf(LLAMA_8B_LAYERS | {"num_hidden_layers": a.layers}, name="llama-3.1-8b-layers")
    plan = uniform_plan(cfg.name, cfg.num_layers, a.batch, a.seq, chunk=a.chunk, window=2, activation="offload")
    engine = Engine(cfg, plan, RandomWeights(cfg, seed=0), AdamWConfig(lr=1e-5))
    rows, steps = {}, {}
    for packing in PACKINGS:
        ids, labels, positions = packed(packing, a, cfg.vocab_size)
        batches = Batches(ids, labels, a.batch, a.seed, positions, a.chunk if packing == "padding_free" else 1)
        steps[packing] = [batches.next() for _ in range(a.warmup + a.steps)]
        trained = sum(int((lab != IGNORE_INDEX).sum()) for _, lab, _ in steps[packing][a.warmup :]) / a.steps
        rows[packing] = {
            **fill(ids, labels),
            "steps_per_epoch": batches.steps_per_epoch,
            "trained_tokens_per_step": trained,
            "rounds": [],
        }
    for _ in range(a.rounds):
        for packing in PACKINGS:
            run = steps[packing]
            rows[packing]["rounds"].append(
                time_steps(lambda i: engine.train_step(*run[i]).loss, a.warmup, a.steps, engine.synchronize)
            )
    engine.close()
    for row in rows.values():
        row["step_s"] = sum(r["step_s"] for r in row["rounds"]) / a.rounds
        row["trained_tokens_per_s"] = row["trained_tokens_per_step"] / row["step_s"]
        row["epoch_s"] = row["steps_per_epoch"] * row["step_s"]
    return {"plan": plan.__dict__, "rows": rows, **memory_readings()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=4)
    ap.add_argument("--samples", type=int, default=1500)
    ap.add_argument("--median", type=int, default=400)
    ap.add_argument("--sigma", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cpu-only", action="store_true", help="the packings' fill alone (no GPU)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if a.cpu_only:
        measured = {"rows": {p: fill(*packed(p, a, LLAMA_8B_LAYERS["vocab_size"])[:2]) for p in PACKINGS}}
    else:
        measured = timed(a)
    rows = measured["rows"]
    for packing, row in rows.items():
        print(
            f"{packing}: {row['sequences']} sequences, {row['untrained_share']:.1%} of computed tokens untrained"
            + (
                ""
                if a.cpu_only
                else f", {row['step_s']:.3f} s/step, {row['trained_tokens_per_s']:,.0f} trained "
                f"tokens/s, epoch {row['epoch_s']:.1f} s"
            ),
            flush=True,
        )
    result = {
        "command": "python -m bench.padding_free "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if k != "cpu_only")
        + (" --cpu-only" if a.cpu_only else ""),
        **provenance(),
        **measured,
        "sequences_ratio": rows["padding_free"]["sequences"] / rows["best_fit"]["sequences"],
    }
    if not a.cpu_only:
        result["trained_tokens_per_s_ratio"] = (
            rows["padding_free"]["trained_tokens_per_s"] / rows["best_fit"]["trained_tokens_per_s"]
        )
        result["epoch_time_ratio"] = rows["padding_free"]["epoch_s"] / rows["best_fit"]["epoch_s"]
    write_result(a.out, result)


if __name__ == "__main__":
    main()
